//! Smoke test of the main example: it trains to the accuracy the README promises, on one and on
//! two ranks, and rejects bad flags with an error instead of a panic.

#[path = "../examples/image_classifier.rs"]
#[allow(dead_code)]
mod image_classifier;

use clap::Parser;
use image_classifier::{Args, run};

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
fn a_short_run_on_four_ranks_learns() {
    let report = run(&args(&["--devices", "4", "--epochs", "3"])).unwrap();
    // 3 epochs is not enough for 95 %, but far above chance (10 %).
    assert!(report.test_accuracy > 0.5, "{}", report.test_accuracy);
}

#[test]
fn bad_flags_are_errors() {
    for bad in [
        ["--devices", "0"],
        ["--strategy", "fsdp"],
        ["--precision", "8-true"],
        ["--accelerator", "tpu"],
    ] {
        let err = run(&args(&bad)).unwrap_err().to_string();
        assert!(err.contains(bad[1]), "{err}");
    }
}
