//! Smoke test of the main example: it trains to the accuracy the README promises, on one and on
//! two ranks, and rejects bad flags with an error instead of a panic.

#[path = "../../examples/image_classifier.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::Args;

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

fn args(extra: &[&str]) -> Args {
    Args::parse_from(["image_classifier"].iter().chain(extra))
}

#[test]
fn reaches_95_percent_on_one_and_two_ranks() {
    for devices in ["1", "2"] {
        let report = run(&args(&["--devices", devices])).unwrap();
        assert!(
            report.test_accuracy >= 0.95,
            "{devices} device(s): {}",
            report.test_accuracy
        );
        assert!(report.steps > 0 && report.samples_per_second > 0.0);
    }
}

#[test]
fn mixed_precision_reaches_the_f32_accuracy_within_one_point() {
    let full = run(&args(&["--devices", "2"])).unwrap().test_accuracy;
    for precision in ["bf16-mixed", "16-mixed"] {
        let mixed = run(&args(&["--devices", "2", "--precision", precision]))
            .unwrap()
            .test_accuracy;
        assert!(
            mixed >= full - 0.01,
            "{precision}: {mixed} vs 32-true {full}"
        );
    }
}

#[test]
fn fsdp_reaches_ddps_accuracy() {
    let ddp = run(&args(&["--devices", "2"])).unwrap().test_accuracy;
    for strategy in ["fsdp", "fsdp_shard_grad_op"] {
        let fsdp = run(&args(&["--devices", "2", "--strategy", strategy]))
            .unwrap()
            .test_accuracy;
        // Same data, same averaged gradients: only the summation order differs.
        assert!(
            (fsdp - ddp).abs() <= 0.005,
            "{strategy}: {fsdp} vs ddp {ddp}"
        );
    }
}

#[test]
fn a_short_run_on_four_ranks_learns() {
    let report = run(&args(&["--devices", "4", "--epochs", "3"])).unwrap();
    // 3 epochs is not enough for 95 %, but far above chance (10 %).
    assert!(report.test_accuracy > 0.5, "{}", report.test_accuracy);
}

#[test]
fn bad_flags_are_errors() {
    for bad in [
        ["--devices", "0"],
        ["--strategy", "deepspeed"],
        ["--precision", "8-true"],
        ["--accelerator", "tpu"],
        ["--backend", "candle"],
    ] {
        let err = run(&args(&bad)).unwrap_err().to_string();
        assert!(err.contains(bad[1]), "{err}");
    }
}

#[test]
fn backend_flag_picks_a_compiled_backend() {
    let err = run(&args(&["--backend", "candle"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("compiled in: flex"), "{err}");
    // NdArray has no f16: the refusal names the backend `--backend` picked.
    let err = run(&args(&["--backend", "ndarray", "--precision", "16-mixed"]));
    if cfg!(feature = "ndarray") {
        assert!(err.unwrap_err().to_string().contains("ndarray"));
    }
    let report = run(&args(&["--backend", "flex", "--epochs", "2"])).unwrap();
    assert!(report.steps > 0);
}

#[test]
fn resuming_from_a_checkpoint_matches_the_uninterrupted_run() {
    let dir = std::env::temp_dir().join(format!("fabric-example-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().into_owned();
    let full = run(&args(&["--devices", "2", "--epochs", "4"])).unwrap();
    let first = run(&args(&[
        "--devices",
        "2",
        "--epochs",
        "2",
        "--checkpoint-dir",
        &dir_text,
        "--checkpoint-every",
        "5",
    ]))
    .unwrap();
    assert_eq!(first.steps, 24);
    let resumed = run(&args(&[
        "--devices",
        "2",
        "--epochs",
        "4",
        "--checkpoint-dir",
        &dir_text,
        "--resume",
    ]))
    .unwrap();
    assert_eq!(resumed.steps, 24, "only the last two epochs ran");
    assert_eq!(resumed.final_loss, full.final_loss);
    assert_eq!(resumed.test_accuracy, full.test_accuracy);
    // mid-epoch: resume from step 5 of a fresh directory
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run(&args(&[
        "--devices",
        "2",
        "--epochs",
        "1",
        "--checkpoint-dir",
        &dir_text,
        "--checkpoint-every",
        "5",
    ]))
    .unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.ends_with("step-00000005.ckpt") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let resumed = run(&args(&[
        "--devices",
        "2",
        "--epochs",
        "4",
        "--checkpoint-dir",
        &dir_text,
        "--resume",
    ]))
    .unwrap();
    assert_eq!(resumed.steps, 48 - 5);
    assert_eq!(resumed.final_loss, full.final_loss);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn csv_logs_and_safetensors_export() {
    let dir = std::env::temp_dir().join(format!("fabric-example-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().into_owned();
    let export = dir.join("weights.safetensors");
    let export_text = export.to_string_lossy().into_owned();
    run(&args(&[
        "--devices",
        "2",
        "--epochs",
        "2",
        "--logger",
        "csv",
        "--log-dir",
        &dir_text,
        "--export-safetensors",
        &export_text,
    ]))
    .unwrap();
    let csv = std::fs::read_to_string(dir.join("image_classifier/version_0/metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for column in [
        "step",
        "train/loss",
        "train/epoch_loss",
        "test/accuracy",
        "device/samples_per_sec",
        "samples_per_sec",
    ] {
        assert!(
            header.split(',').any(|c| c == column),
            "{column} missing from {header}"
        );
    }
    assert_eq!(
        csv.lines().count(),
        1 + 24 + 2 + 1 + 1,
        "one row per log call:\n{csv}"
    );
    assert!(export.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
