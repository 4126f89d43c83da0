//! The trainer example: it learns, resumes mid-epoch to the uninterrupted run's weights, and
//! stops early when it should.

#[path = "../../examples/trainer.rs"]
#[allow(dead_code)]
mod example;

use burn_fabric::fabric_core::checkpoint::Newest;
use clap::Parser;
use example::Args;

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

fn args(extra: &[&str]) -> Args {
    let base = [
        "trainer",
        "--devices",
        "2",
        "--hidden",
        "32",
        "--batch-size",
        "64",
    ];
    Args::parse_from(base.iter().chain(extra))
}

fn step_of(path: &std::path::Path) -> u64 {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name["step-".len()..name.len() - ".ckpt".len()]
        .parse()
        .unwrap()
}

#[test]
fn resuming_mid_epoch_reaches_the_uninterrupted_weights() {
    let dir = std::env::temp_dir().join(format!("fabric-trainer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.display().to_string();
    let flags = [
        "--epochs",
        "3",
        "--accumulate",
        "2",
        "--checkpoint-dir",
        &dir_arg,
        "--checkpoint-every",
        "5",
    ];
    let uninterrupted = run(&args(&flags)).unwrap();
    assert_eq!(uninterrupted.epochs_run, 3);
    // A crash in epoch 2: keep only the checkpoints up to a mid-epoch one there.
    let per_epoch = uninterrupted.steps_per_epoch;
    let crash = (per_epoch + 1..2 * per_epoch)
        .find(|s| s % 5 == 0)
        .expect("a mid-epoch checkpoint in epoch 2");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if step_of(&entry.path()) > crash {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let Newest { path, .. } = burn_fabric::newest_checkpoint(&dir);
    assert_eq!(path.map(|p| step_of(&p)), Some(crash));
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let resumed = run(&args(&resume)).unwrap();
    assert_eq!(resumed.epochs_run, 2, "epochs 2 (the rest of it) and 3");
    assert!(
        resumed.weights == uninterrupted.weights,
        "the resumed run's weights differ from the uninterrupted run's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn early_stopping_stops_when_the_validation_loss_stops_improving() {
    // No decrease is as large as the minimum delta: the first epoch sets the best, the next two
    // do not improve on it, so with patience 2 training stops after 3 of the 10 epochs.
    let scripted = ["--epochs", "10", "--patience", "2", "--min-delta", "1e9"];
    let report = run(&args(&scripted)).unwrap();
    assert!(report.stopped_early);
    assert_eq!(report.epochs_run, 3);
    // Learning, with the default minimum delta, it runs to the end.
    let report = run(&args(&["--epochs", "3", "--patience", "2"])).unwrap();
    assert!(!report.stopped_early);
    assert_eq!(report.epochs_run, 3);
}

#[test]
fn learns_the_digits_on_two_ranks() {
    let report = run(&Args::parse_from([
        "trainer",
        "--devices",
        "2",
        "--epochs",
        "6",
    ]))
    .unwrap();
    assert!(
        report.val_accuracy > 93.0,
        "validation accuracy {}",
        report.val_accuracy
    );
    assert!(report.val_loss < 0.3, "validation loss {}", report.val_loss);
}

#[test]
fn validation_counts_every_held_out_digit_once_at_any_world_size() {
    let one = run(&Args::parse_from([
        "trainer",
        "--devices",
        "1",
        "--epochs",
        "1",
    ]))
    .unwrap();
    let three = run(&Args::parse_from([
        "trainer",
        "--devices",
        "3",
        "--epochs",
        "1",
    ]))
    .unwrap();
    let (_, held_out) =
        fabric_examples::digits::train_test_split(fabric_examples::digits::load().unwrap());
    assert_eq!(one.val_samples, held_out.len());
    assert_eq!(
        three.val_samples,
        held_out.len(),
        "3 ranks count each digit once"
    );
}
