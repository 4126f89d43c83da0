//! Runs one function per local rank, each on its own thread, and turns any rank's error or panic
//! into an error naming that rank, after releasing every rank blocked in a collective.

use crate::thread_group::{ThreadCollective, ThreadGroup};
use fabric_core::FabricError;
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

/// Stack size of rank threads: backward passes of deep models recurse.
const RANK_STACK_BYTES: usize = 32 * 1024 * 1024;

/// How to start the rank threads.
#[derive(Debug, Clone)]
pub struct ThreadLaunch {
    /// Number of ranks (threads) to start.
    pub world_size: usize,
    /// Global rank of the first thread (ranks of other processes come before it).
    pub first_rank: usize,
    /// Timeout of every collective among them.
    pub timeout: Duration,
    /// Size of the rayon pool each rank's work runs in; `None` shares the global pool. CPU
    /// backends parallelise with rayon, so ranks sharing a CPU each get `cores / ranks` threads
    /// (Lightning sets `OMP_NUM_THREADS` the same way).
    pub threads_per_rank: Option<usize>,
}

/// Runs `rank_fn(rank, collective)` on `world_size` threads and returns rank 0's value.
///
/// If a rank returns `Err(message)` or panics, every rank waiting in a collective is released at
/// once and this returns [`FabricError::RankFailed`] naming the first rank that failed (for a
/// timeout: the rank that never arrived). A rank that returns while another still waits for it
/// in a collective counts as failed too. Nothing here waits without a deadline.
pub fn launch_threads<T, F>(launch: &ThreadLaunch, rank_fn: F) -> Result<T, FabricError>
where
    T: Send,
    F: Fn(usize, ThreadCollective) -> Result<T, String> + Sync,
{
    launch_threads_with(launch, rank_fn, &|_, _| {})
}

/// [`launch_threads`], calling `on_failure(rank, message)` with the group's first failure as
/// soon as a rank fails, before waiting for the other threads to finish. A multi-process job
/// uses it to end every process at once, even while a rank of this one is stuck.
pub fn launch_threads_with<T, F>(
    launch: &ThreadLaunch,
    rank_fn: F,
    on_failure: &(dyn Fn(usize, &str) + Sync),
) -> Result<T, FabricError>
where
    T: Send,
    F: Fn(usize, ThreadCollective) -> Result<T, String> + Sync,
{
    let world = launch.world_size.max(1);
    let group = ThreadGroup::starting_at(world, launch.timeout, launch.first_rank);
    let rank_fn = &rank_fn;
    let mut results: Vec<Option<T>> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(world);
        for rank in 0..world {
            let member_group = group.clone();
            let pool_size = launch.threads_per_rank;
            let spawned = std::thread::Builder::new()
                .name(format!("fabric-rank-{rank}"))
                .stack_size(RANK_STACK_BYTES)
                .spawn_scoped(scope, move || {
                    run_rank(rank, &member_group, pool_size, rank_fn, on_failure)
                });
            match spawned {
                Ok(handle) => handles.push(Some(handle)),
                Err(err) => {
                    group.fail(rank, format!("could not start its thread: {err}"));
                    handles.push(None);
                }
            }
        }
        handles
            .into_iter()
            .map(|handle| handle.and_then(|h| h.join().ok().flatten()))
            .collect()
    });
    if let Some((rank, message)) = group.failure() {
        return Err(FabricError::RankFailed { rank, message });
    }
    results[0].take().ok_or_else(|| FabricError::RankFailed {
        rank: 0,
        message: "returned no result".into(),
    })
}

fn run_rank<T, F>(
    rank: usize,
    group: &ThreadGroup,
    pool_size: Option<usize>,
    rank_fn: &F,
    on_failure: &(dyn Fn(usize, &str) + Sync),
) -> Option<T>
where
    T: Send,
    F: Fn(usize, ThreadCollective) -> Result<T, String> + Sync,
{
    let member = group.member(rank);
    let run = move || catch_unwind(AssertUnwindSafe(|| rank_fn(rank, member)));
    let pool = pool_size.and_then(|threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .stack_size(RANK_STACK_BYTES)
            .thread_name(move |i| format!("fabric-rank-{rank}-worker-{i}"))
            .build()
            .ok()
    });
    let outcome = match pool {
        Some(pool) => pool.install(run),
        None => run(),
    };
    let failure = match outcome {
        Ok(Ok(value)) => {
            group.exit(rank);
            return Some(value);
        }
        Ok(Err(message)) => message,
        Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
    };
    group.fail(rank, failure);
    if let Some((first, message)) = group.failure() {
        on_failure(first, &message);
    }
    None
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Collective, ReduceOp};
    use burn::tensor::TensorData;
    use std::time::Instant;

    fn launch(world: usize, timeout_ms: u64) -> ThreadLaunch {
        ThreadLaunch {
            world_size: world,
            first_rank: 0,
            timeout: Duration::from_millis(timeout_ms),
            threads_per_rank: Some(1),
        }
    }

    /// `err` names rank `rank` as failed, with `needle` in its message.
    pub(crate) fn assert_rank_failed(err: FabricError, rank: usize, needle: &str) {
        match err {
            FabricError::RankFailed {
                rank: failed,
                message,
            } => {
                assert_eq!(failed, rank, "{message}");
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn returns_rank_zero_value() {
        let out = launch_threads(&launch(3, 5_000), |rank, c| {
            let data = c
                .all_reduce(TensorData::new(vec![rank as f32], [1]), ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            Ok((rank, data.to_vec::<f32>().map_err(|e| format!("{e:?}"))?))
        })
        .unwrap();
        assert_eq!(out, (0, vec![3.0]));
    }

    #[test]
    fn a_panicking_rank_releases_the_others_and_is_named() {
        let start = Instant::now();
        let err = launch_threads(&launch(4, 60_000), |rank, c| {
            if rank == 2 {
                panic!("boom in rank two");
            }
            c.all_reduce(TensorData::new(vec![1.0f32; 8], [8]), ReduceOp::Mean)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        assert_rank_failed(err, 2, "boom in rank two");
    }

    #[test]
    fn a_sleeping_rank_times_out_and_is_named() {
        let start = Instant::now();
        let err = launch_threads(&launch(2, 300), |rank, c| {
            if rank == 1 {
                std::thread::sleep(Duration::from_millis(1_500));
            }
            c.barrier().map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_rank_failed(err, 1, "barrier");
    }

    #[test]
    fn a_rank_that_returns_early_is_named() {
        let err = launch_threads(&launch(2, 60_000), |rank, c| {
            if rank == 0 {
                c.barrier().map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .unwrap_err();
        assert_rank_failed(err, 1, "returned");
    }

    #[test]
    fn mismatched_calls_fail_instead_of_hanging() {
        let err = launch_threads(&launch(2, 60_000), |rank, c| {
            let n = if rank == 0 { 4 } else { 5 };
            c.all_reduce(TensorData::new(vec![0.0f32; n], [n]), ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
