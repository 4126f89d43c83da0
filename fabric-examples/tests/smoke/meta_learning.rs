//! Smoke test of the meta-learning example: tasks are well formed, and a short first-order
//! MAML run on two ranks improves the few-shot accuracy on held-out digits.

#[path = "../../examples/meta_learning.rs"]
#[allow(dead_code)]
mod example;

use clap::Parser;
use example::{Args, Pool};

/// The example's `run`, alone in this binary (see [`crate::exclusive`]).
fn run(args: &Args) -> Result<example::Report, Box<dyn std::error::Error>> {
    crate::exclusive(|| example::run(args))
}
use fabric_examples::digits;

#[test]
fn tasks_relabel_distinct_digits_of_distinct_classes() {
    let pool = Pool::new(digits::load().unwrap());
    let mut rng = fabric_examples::noise::rank_rng(3, 0);
    for _ in 0..20 {
        let task = pool.task(&mut rng, 5, 2, 3);
        assert_eq!((task.support.len(), task.query.len()), (10, 15));
        for label in 0..5u8 {
            let support: Vec<_> = task.support.iter().filter(|d| d.label == label).collect();
            let query: Vec<_> = task.query.iter().filter(|d| d.label == label).collect();
            assert_eq!((support.len(), query.len()), (2, 3));
            // All five digits of a label are distinct images.
            let all: Vec<_> = support.iter().chain(&query).map(|d| d.pixels).collect();
            for (i, a) in all.iter().enumerate() {
                assert!(all[i + 1..].iter().all(|b| b != a));
            }
        }
    }
}

#[test]
fn short_meta_training_on_two_ranks_beats_the_untrained_learner() {
    let args = Args::parse_from([
        "meta_learning",
        "--devices",
        "2",
        "--epochs",
        "5",
        "--test-tasks",
        "100",
    ]);
    let report = run(&args).unwrap();
    assert!(report.final_query_loss.is_finite(), "{report:?}");
    assert!(
        report.accuracy_after > report.accuracy_before + 0.03,
        "{report:?}"
    );
    assert!(report.accuracy_after > 0.5, "{report:?}");
}

#[test]
fn more_shots_and_queries_than_a_class_holds_is_an_error() {
    let args = Args::parse_from(["meta_learning", "--shots", "200", "--queries", "1"]);
    let err = run(&args).unwrap_err().to_string();
    assert!(err.contains("--shots 200"), "{err}");
}
