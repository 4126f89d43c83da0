//! Smoke test of the k-fold example: the folds partition the data, and each fold's model,
//! trained on two ranks, scores well on its held-out fold.

#[path = "../../examples/kfold_cv.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::{Args, split};

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}

#[test]
fn folds_partition_the_data_evenly() {
    let folds = split(1797, 5, 42);
    assert_eq!(folds.len(), 5);
    let mut seen: Vec<usize> = folds.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..1797).collect::<Vec<_>>());
    assert!(folds.iter().all(|f| f.len() == 359 || f.len() == 360));
    assert_ne!(split(1797, 5, 1)[0], folds[0]);
}

#[test]
fn three_folds_on_two_ranks_score_on_held_out_digits() {
    let args = Args::parse_from([
        "kfold_cv",
        "--devices",
        "2",
        "--folds",
        "3",
        "--epochs",
        "6",
    ]);
    let report = run(&args).unwrap();
    assert_eq!(report.fold_accuracy.len(), 3);
    assert!(report.fold_accuracy.iter().all(|&a| a > 0.85), "{report:?}");
    let mean = report.fold_accuracy.iter().sum::<f64>() / 3.0;
    assert!((mean - report.mean_accuracy).abs() < 1e-12);
    assert!(report.std_accuracy >= 0.0 && report.std_accuracy < 0.1);
}

#[test]
fn one_fold_is_refused() {
    assert!(Args::try_parse_from(["kfold_cv", "--folds", "1"]).is_err());
}
