//! Smoke test of the language model: a few steps of the tiny preset learn on two ranks under
//! FSDP, every strategy trains the same model to the same numbers, a resumed run ends where
//! the uninterrupted one does, and bad flags are errors.

#[path = "../../examples/language_model.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::{Args, Report};

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

/// Two ranks, the tiny preset, short epochs and a short validation; no sample unless asked.
fn run_with(extra: &[&str]) -> Report {
    let base = [
        "language_model",
        "--devices",
        "2",
        "--batch-size",
        "16",
        "--val-blocks",
        "32",
    ];
    let no_sample = ["--sample-chars", "0"];
    let no_sample = match extra.contains(&"--sample-chars") {
        true => &[][..],
        false => &no_sample[..],
    };
    let args = Args::parse_from(base.iter().chain(no_sample).chain(extra));
    run(&args).unwrap()
}

#[test]
fn the_tiny_preset_learns_on_two_ranks_under_fsdp() {
    let flags = [
        "--strategy",
        "fsdp",
        "--epochs",
        "3",
        "--steps-per-epoch",
        "12",
        "--sample-chars",
        "20",
    ];
    let report = run_with(&flags);
    assert_eq!(report.steps, 36);
    let [first, .., last] = report.epochs.as_slice() else {
        panic!("{} epochs", report.epochs.len());
    };
    assert!(last.train_loss < first.train_loss - 0.3, "{report:?}");
    assert!(last.val_loss < first.val_loss, "{report:?}");
    // A model that learned nothing predicts uniformly: perplexity = vocabulary size (75).
    assert!(last.perplexity < 25.0, "{report:?}");
    assert!((last.perplexity - last.val_loss.exp()).abs() < 1e-9);
    assert!(last.tokens_per_second > 0.0);
    assert_eq!(report.sample.chars().count(), 20);
}

#[test]
fn every_strategy_reaches_the_same_losses() {
    let steps = ["--epochs", "1", "--steps-per-epoch", "4"];
    let of = |strategy: &str| {
        let mut flags = steps.to_vec();
        flags.extend(["--strategy", strategy]);
        run_with(&flags).epochs[0]
    };
    let ddp = of("ddp");
    for strategy in ["zero2", "fsdp", "fsdp_shard_grad_op"] {
        let other = of(strategy);
        // The same initial model and data; only the order of summation differs.
        assert!(
            (other.val_loss - ddp.val_loss).abs() < 1e-4,
            "{strategy}: {other:?} vs ddp {ddp:?}"
        );
        assert!((other.train_loss - ddp.train_loss).abs() < 1e-4);
    }
    let mut flags = steps.to_vec();
    flags.extend(["--strategy", "fsdp", "--precision", "bf16-mixed"]);
    let mixed = run_with(&flags).epochs[0];
    assert!(
        (mixed.val_loss - ddp.val_loss).abs() < 0.05,
        "{mixed:?} vs {ddp:?}"
    );
}

#[test]
fn resuming_under_fsdp_matches_the_uninterrupted_run() {
    let dir = std::env::temp_dir().join(format!("fabric-lm-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().into_owned();
    let flags = [
        "--strategy",
        "fsdp",
        "--epochs",
        "2",
        "--steps-per-epoch",
        "4",
        "--checkpoint-dir",
        &dir_text,
        "--checkpoint-every",
        "2",
    ];
    let full = run_with(&flags);
    // A crash after step 6, mid-way through epoch 2: keep the checkpoints up to it.
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && name.as_str() > "step-00000006.ckpt" {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
    let mut resume = flags.to_vec();
    resume.push("--resume");
    let resumed = run_with(&resume);
    assert_eq!(resumed.steps, 2, "only the last two steps ran");
    let (resumed, full) = (resumed.epochs[0], full.epochs[1]);
    assert_eq!(resumed.val_loss, full.val_loss);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validation_counts_every_block_once_at_any_world_size() {
    // No training step: the initial model, the same at every world size, validated on 33
    // blocks, which 2 and 3 ranks share with padding.
    let of = |devices: &str| {
        let args = Args::parse_from([
            "language_model",
            "--devices",
            devices,
            "--strategy",
            "fsdp",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "0",
            "--val-blocks",
            "33",
            "--batch-size",
            "8",
            "--sample-chars",
            "0",
        ]);
        run(&args).unwrap().epochs[0]
    };
    let one = of("1");
    assert!(one.train_loss.is_nan(), "no step, no training loss");
    for devices in ["2", "3"] {
        let other = of(devices);
        assert!(
            (other.val_loss - one.val_loss).abs() < 1e-9,
            "{devices}: {other:?} vs {one:?}"
        );
    }
}

#[test]
fn bad_flags_are_errors() {
    for (bad, named) in [
        (["--heads", "3"], "embed"),
        (["--prompt", "Élise"], "'É'"),
        (["--val-blocks", "0"], "val_blocks"),
        (["--block-size", "0"], "block_size"),
    ] {
        let args = Args::parse_from(["language_model"].iter().chain(&bad));
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains(named), "{bad:?}: {err}");
    }
}
