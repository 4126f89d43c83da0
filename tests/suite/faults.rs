//! Nothing hangs: a rank that panics, errors, stalls or leaves early is reported by rank number,
//! and the ranks waiting for it are released.

use burn::backend::Flex;
use burn::tensor::Tensor;
use burn_fabric::{Fabric, FabricError, ReduceOp};
use std::time::{Duration, Instant};

type B = burn::backend::Autodiff<Flex>;

fn fabric(devices: usize, timeout: Duration) -> Fabric<B> {
    Fabric::<B>::builder()
        .devices(devices)
        .collective_timeout(timeout)
        .build()
        .unwrap()
}

fn failed_rank(err: FabricError) -> (usize, String) {
    match err {
        FabricError::RankFailed { rank, message } => (rank, message),
        other => panic!("expected RankFailed, got {other}"),
    }
}

#[test]
fn a_panicking_rank_is_named_and_the_others_released_at_once() {
    // A long timeout: the waiters must be released by the failure, not by the clock.
    let mut fabric = fabric(4, Duration::from_secs(600));
    let start = Instant::now();
    let err = fabric
        .launch(|fabric| {
            let device = *fabric.device();
            if fabric.global_rank() == 3 {
                std::thread::sleep(Duration::from_millis(100));
                panic!("rank three exploded");
            }
            fabric.all_reduce(Tensor::<Flex, 1>::ones([1000], &device), ReduceOp::Mean)?;
            Ok::<_, FabricError>(())
        })
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    let (rank, message) = failed_rank(err);
    assert_eq!(rank, 3);
    assert!(message.contains("rank three exploded"), "{message}");
}

#[test]
fn a_rank_returning_an_error_is_named() {
    let mut fabric = fabric(2, Duration::from_secs(600));
    let err = fabric
        .launch(|fabric| {
            if fabric.global_rank() == 1 {
                return Err("could not read shard 1".to_string());
            }
            fabric.barrier().map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
    let (rank, message) = failed_rank(err);
    assert_eq!(rank, 1);
    assert!(message.contains("could not read shard 1"), "{message}");
}

/// Launches `fabric` with rank 0 asleep for `stall` before an `all_reduce` the others wait in;
/// asserts the job failed within 10 s and returns the failed rank and message.
fn stall_rank_0(fabric: &mut Fabric<B>, stall: Duration) -> (usize, String) {
    let start = Instant::now();
    let err = fabric
        .launch(|fabric| {
            let device = *fabric.device();
            if fabric.global_rank() == 0 {
                std::thread::sleep(stall);
            }
            fabric.all_reduce(Tensor::<Flex, 1>::ones([4], &device), ReduceOp::Sum)?;
            Ok::<_, FabricError>(())
        })
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    failed_rank(err)
}

#[test]
fn a_stalled_rank_is_named_when_the_timeout_expires() {
    let mut fabric = fabric(2, Duration::from_millis(400));
    let (rank, message) = stall_rank_0(&mut fabric, Duration::from_secs(3));
    assert_eq!(rank, 0, "{message}");
    assert!(
        message.contains("all_reduce") && message.contains("400ms"),
        "{message}"
    );
}

#[test]
fn uneven_loops_fail_instead_of_hanging() {
    // Rank 1 runs one collective fewer: rank 0's last one must not wait forever.
    let mut fabric = fabric(2, Duration::from_secs(600));
    let err = fabric
        .launch(|fabric| {
            let steps = if fabric.global_rank() == 0 { 3 } else { 2 };
            for _ in 0..steps {
                fabric.barrier()?;
            }
            Ok::<_, FabricError>(())
        })
        .unwrap_err();
    let (rank, message) = failed_rank(err);
    assert_eq!(rank, 1, "{message}");
    assert!(message.contains("returned"), "{message}");
}

#[test]
fn launching_twice_is_refused() {
    let mut fabric = fabric(2, Duration::from_secs(60));
    fabric.launch(|_| Ok::<_, FabricError>(())).unwrap();
    assert!(matches!(
        fabric.launch(|_| Ok::<_, FabricError>(())),
        Err(FabricError::AlreadyLaunched { .. })
    ));
}

/// `LT_COLLECTIVE_TIMEOUT` (what `fabric run --collective-timeout` sets) bounds a stall without
/// any change to the code: the job ends well before the stalled rank wakes, naming the
/// operation and the timeout. A value the CLI set that contradicts the code's is an error.
#[test]
fn the_environment_sets_the_collective_timeout() {
    use burn_fabric::EnvVars;
    let env = EnvVars::from_pairs([("LT_COLLECTIVE_TIMEOUT", "300ms")]);
    let mut fabric = Fabric::<B>::builder().devices(2).env(env).build().unwrap();
    let (_, message) = stall_rank_0(&mut fabric, Duration::from_secs(5));
    assert!(
        message.contains("all_reduce") && message.contains("300ms"),
        "{message}"
    );

    let conflict = EnvVars::from_pairs([("LT_COLLECTIVE_TIMEOUT", "5s"), ("LT_CLI_USED", "1")]);
    let err = Fabric::<B>::builder()
        .collective_timeout(Duration::from_secs(2))
        .env(conflict)
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("collective_timeout") && err.contains("LT_COLLECTIVE_TIMEOUT"),
        "{err}"
    );
    let bad = EnvVars::from_pairs([("LT_COLLECTIVE_TIMEOUT", "soon")]);
    let err = Fabric::<B>::builder()
        .env(bad)
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("soon") && err.contains("90s"), "{err}");
}
