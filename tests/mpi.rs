//! Jobs of several processes joined by MPI, started through `fabric run` (needs the `mpi`
//! feature and Open MPI: `cargo test --features mpi --test mpi`).
//!
//! Each test starts this same test binary under `fabric run --num-nodes 2`, filtered to itself,
//! with `FABRIC_MPI_CHILD` set; in that mode the test body is one process of the job. The
//! parent checks the job's exit status and output.
#![cfg(feature = "mpi")]

mod common;

use burn::backend::Flex;
use burn::module::Module;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, SgdConfig};
use burn::tensor::{Int, Tensor, TensorData};
use burn_fabric::{Fabric, FabricError, ReduceOp};
use common::tower::train_tower;
use common::{B, train, train_on, worst_ratio};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const CHILD: &str = "FABRIC_MPI_CHILD";

/// Whether this process is one process of a job (rather than the test that starts it).
fn child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs test `name` of this binary as a job of `nodes` processes with `devices` ranks each.
fn job(name: &str, nodes: usize, devices: usize) -> (Output, Duration) {
    let exe = std::env::current_exe().expect("test binary path");
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args([
            "run",
            "--num-nodes",
            &nodes.to_string(),
            "--devices",
            &devices.to_string(),
            "--",
        ])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .expect("start fabric run");
    (output, start.elapsed())
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn succeeds(name: &str, nodes: usize, devices: usize) {
    let (output, _) = job(name, nodes, devices);
    assert!(
        output.status.success(),
        "{nodes} x {devices}: {}",
        text(&output)
    );
    // the child really ran (the filter matched one test)
    assert!(text(&output).contains("1 passed"), "{}", text(&output));
}

const STEPS: usize = 10;
const BATCH: usize = 16;

fn sgd() -> impl burn::optim::Optimizer<common::Mlp<B>, B> {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .init()
}

fn adam() -> impl burn::optim::Optimizer<common::Mlp<B>, B> {
    AdamConfig::new().init()
}

#[test]
fn ddp_equivalence_across_processes() {
    if !child() {
        succeeds("ddp_equivalence_across_processes", 2, 1);
        succeeds("ddp_equivalence_across_processes", 2, 2);
        return;
    }
    // One process of the job: the same training as the single-rank reference, within the
    // tolerance of the in-process DDP test (|ddp - single| <= 1e-6 + 1e-5 |single|).
    let fabric = Fabric::<B>::builder().build().unwrap();
    let world = fabric.world_size();
    assert!(
        world >= 2,
        "expected a multi-process job, got world size {world}"
    );
    let ddp = train_on(fabric, 1, STEPS, BATCH, 0.1, sgd).unwrap();
    let single = train(1, 1, STEPS, BATCH, 0.1, sgd).unwrap();
    let ratio = worst_ratio(&ddp, &single, 1e-5, 1e-6);
    assert!(
        ratio <= 1.0,
        "sgd across {world} ranks: {ratio} x tolerance"
    );
    let fabric = Fabric::<B>::builder().build().unwrap();
    let ddp = train_on(fabric, 2, STEPS, BATCH, 0.01, adam).unwrap();
    let single = train(1, 1, STEPS, BATCH, 0.01, adam).unwrap();
    let ratio = worst_ratio(&ddp, &single, 1e-5, 1e-6);
    assert!(
        ratio <= 1.0,
        "adam with no_backward_sync across {world} ranks: {ratio} x tolerance"
    );
}

#[test]
fn communication_threads_across_processes() {
    if !child() {
        succeeds("communication_threads_across_processes", 2, 1);
        succeeds("communication_threads_across_processes", 2, 2);
        return;
    }
    // Each rank's communication thread averages the units' buckets over MPI (initialised with
    // MPI_THREAD_MULTIPLE) while backward runs: the DDP tolerance again, with accumulation.
    let reference = Fabric::<B>::builder()
        .devices(1)
        .env(burn_fabric::EnvVars::default())
        .build()
        .unwrap();
    let (single, _) = train_tower(reference, 1).unwrap();
    for micro in [1, 2] {
        let fabric = Fabric::<B>::builder()
            .bucket_bytes(200)
            .overlap_backward(true)
            .build()
            .unwrap();
        let world = fabric.world_size();
        let (ddp, overlapped) = train_tower(fabric, micro).unwrap();
        let ratio = worst_ratio(&ddp, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "overlapped ddp across {world} ranks, {micro} micro-batches: {ratio} x tolerance"
        );
        assert!(overlapped, "no communication thread ran");
    }
    // FSDP on the same units: each unit's gathers start while the one before it computes and
    // its reduce-scatter travels while backward goes on, over MPI from the rank's
    // communication thread.
    for strategy in ["fsdp", "fsdp_hybrid_shard"] {
        let fabric = Fabric::<B>::builder()
            .strategy(strategy)
            .forward_prefetch(true)
            .overlap_backward(true)
            .build()
            .unwrap();
        let world = fabric.world_size();
        let (fsdp, _) = train_tower(fabric, 2).unwrap();
        let ratio = worst_ratio(&fsdp, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "prefetching {strategy} across {world} ranks: {ratio} x tolerance"
        );
    }
}

#[test]
fn zero_equivalence_across_processes() {
    if !child() {
        succeeds("zero_equivalence_across_processes", 2, 1);
        succeeds("zero_equivalence_across_processes", 2, 2);
        return;
    }
    // ZeRO's owners step and broadcast across processes: the same tolerance as DDP.
    let single = train(1, 1, STEPS, BATCH, 0.01, adam).unwrap();
    for strategy in ["zero1", "zero2"] {
        let fabric = Fabric::<B>::builder().strategy(strategy).build().unwrap();
        let world = fabric.world_size();
        let zero = train_on(fabric, 2, STEPS, BATCH, 0.01, adam).unwrap();
        let ratio = worst_ratio(&zero, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "{strategy} across {world} ranks: {ratio} x tolerance"
        );
    }
}

#[test]
fn fsdp_equivalence_across_processes() {
    if !child() {
        succeeds("fsdp_equivalence_across_processes", 2, 1);
        succeeds("fsdp_equivalence_across_processes", 2, 2);
        return;
    }
    // Shards gathered and gradients reduce-scattered across processes (and across the threads
    // of each): the same tolerance as DDP, for each sharding choice, with accumulation. Under
    // hybrid_shard the shards are gathered within each process and the gradients averaged
    // across all.
    let single = train(1, 1, STEPS, BATCH, 0.01, adam).unwrap();
    for strategy in ["fsdp", "fsdp_shard_grad_op", "fsdp_hybrid_shard"] {
        let fabric = Fabric::<B>::builder().strategy(strategy).build().unwrap();
        let world = fabric.world_size();
        let fsdp = train_on(fabric, 2, STEPS, BATCH, 0.01, adam).unwrap();
        let ratio = worst_ratio(&fsdp, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "{strategy} across {world} ranks: {ratio} x tolerance"
        );
    }
    hybrid_shards_within_each_process_and_saves_one_copy();
}

/// Under hybrid_shard a process's ranks cut the parameters among themselves; the first process
/// writes the checkpoint (one file per rank of a process), which full sharding across every
/// rank loads (cut again) to the same parameters.
fn hybrid_shards_within_each_process_and_saves_one_copy() {
    let dir = std::env::temp_dir().join("fabric-mpi-hybrid.ckpt");
    let mut saved = Vec::new();
    for strategy in ["fsdp_hybrid_shard", "fsdp"] {
        let mut fabric = Fabric::<B>::builder().strategy(strategy).build().unwrap();
        let params = fabric
            .launch(|fabric| -> Result<_, FabricError> {
                let device = *fabric.device();
                let mut model = fabric.setup_module(common::Mlp::deterministic(&device))?;
                let rows = model.l1.weight.val().dims()[0];
                let cut = match strategy {
                    "fsdp" => fabric.world_size(),
                    _ => fabric.world_size() / 2,
                };
                assert_eq!(rows, 8_usize.div_ceil(cut), "{strategy}: rows of l1.weight");
                if strategy == "fsdp" {
                    let restore = burn_fabric::Restore::new().module("model", &mut model);
                    fabric.load(&dir, restore)?;
                } else {
                    // Moved off the deterministic start, so that loading shows.
                    model = model.map(&mut Doubled);
                    fabric.save(&dir, burn_fabric::Checkpoint::new().module("model", &model))?;
                }
                Ok(common::params(&fabric.gathered(&model)?))
            })
            .unwrap();
        saved.push(params);
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    let world = Fabric::<B>::builder().build().unwrap().world_size();
    assert_eq!(files, world / 2, "one shard file per rank of a process");
    assert_eq!(saved[0], saved[1]);
}

/// Doubles every float parameter.
struct Doubled;

impl burn::module::ModuleMapper<B> for Doubled {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        param.map(|t| t.mul_scalar(2.0))
    }
}

#[test]
fn every_collective_across_processes() {
    if !child() {
        succeeds("every_collective_across_processes", 2, 1);
        succeeds("every_collective_across_processes", 2, 2);
        return;
    }
    let mut fabric = Fabric::<B>::builder().build().unwrap();
    fabric
        .launch(|fabric| {
            let world = fabric.world_size();
            let rank = fabric.global_rank();
            let device = *fabric.device();
            fabric.barrier()?;
            // all_reduce, float and int, every op
            let v = |r: usize| vec![r as f32 + 1.0, -2.0 * r as f32, 10.0];
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Min, ReduceOp::Max] {
                let f = fabric.all_reduce(
                    Tensor::<Flex, 1>::from_data(TensorData::new(v(rank), [3]), &device),
                    op,
                )?;
                let i = fabric.all_reduce(
                    Tensor::<Flex, 1, Int>::from_data(
                        TensorData::new(v(rank).iter().map(|x| *x as i64).collect::<Vec<_>>(), [3]),
                        &device,
                    ),
                    op,
                )?;
                let want: Vec<f64> = (0..3)
                    .map(|k| {
                        let col: Vec<f64> = (0..world).map(|r| v(r)[k] as f64).collect();
                        match op {
                            ReduceOp::Sum => col.iter().sum(),
                            ReduceOp::Mean => col.iter().sum::<f64>() / world as f64,
                            ReduceOp::Min => col.iter().cloned().fold(f64::INFINITY, f64::min),
                            ReduceOp::Max => col.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                        }
                    })
                    .collect();
                assert_eq!(
                    f.into_data().to_vec::<f32>().unwrap(),
                    want.iter().map(|x| *x as f32).collect::<Vec<_>>(),
                    "float {op}"
                );
                assert_eq!(
                    i.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
                    want.iter().map(|x| x.round() as i64).collect::<Vec<_>>(),
                    "int {op}"
                );
            }
            // all_gather stacks every rank, in global rank order
            let mine = Tensor::<Flex, 2>::from_data(
                TensorData::new(vec![rank as f32, 0.5], [1, 2]),
                &device,
            );
            let all: Tensor<Flex, 3> = fabric.all_gather(mine)?;
            assert_eq!(all.dims(), [world, 1, 2]);
            let all = all.into_data().to_vec::<f32>().unwrap();
            for r in 0..world {
                assert_eq!(all[r * 2..r * 2 + 2], [r as f32, 0.5]);
            }
            // broadcast from the last rank (in the last process), tensor and object
            let src = world - 1;
            let t = fabric.broadcast(
                Tensor::<Flex, 1>::from_data(TensorData::new(vec![rank as f32; 4], [4]), &device),
                src,
            )?;
            assert_eq!(t.into_data().to_vec::<f32>().unwrap(), vec![src as f32; 4]);
            let text = fabric.broadcast_object(&format!("from {rank}"), src)?;
            assert_eq!(text, format!("from {src}"));
            assert_eq!(
                fabric.all_reduce_scalar(rank as f64, ReduceOp::Sum)?,
                (0..world).sum::<usize>() as f64
            );
            fabric.barrier()?;
            Ok::<_, FabricError>(())
        })
        .unwrap();
}

#[test]
fn a_process_that_exits_mid_training_ends_the_job() {
    if !child() {
        let (output, took) = job("a_process_that_exits_mid_training_ends_the_job", 2, 1);
        assert!(!output.status.success(), "{}", text(&output));
        assert!(took < Duration::from_secs(60), "took {took:?}");
        let out = text(&output);
        assert!(out.contains("process 1 exits now"), "{out}");
        assert!(
            out.contains("process 1 exited in the middle of training"),
            "{out}"
        );
        // well before the 20 s collective timeout: the exit itself ends the job
        assert!(took < Duration::from_secs(15), "took {took:?}");
        return;
    }
    let mut fabric = Fabric::<B>::builder()
        .collective_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    fabric
        .launch(|fabric| {
            let device = *fabric.device();
            for step in 0..100 {
                if step == 3 && fabric.global_rank() == 1 {
                    eprintln!("process 1 exits now");
                    std::process::exit(3);
                }
                fabric.all_reduce(Tensor::<Flex, 1>::ones([1024], &device), ReduceOp::Sum)?;
            }
            Ok::<_, FabricError>(())
        })
        .unwrap();
}

#[test]
fn a_rank_stuck_before_a_collective_is_reported_and_the_job_aborted() {
    if !child() {
        for devices in [1, 2] {
            let (output, took) = job(
                "a_rank_stuck_before_a_collective_is_reported_and_the_job_aborted",
                2,
                devices,
            );
            let out = text(&output);
            assert!(!output.status.success(), "{out}");
            assert!(took < Duration::from_secs(40), "took {took:?}: {out}");
            assert!(out.contains("all_reduce"), "{out}");
            if devices == 1 {
                // The watchdog names the rank that waited, and its roll call the process
                // that never came: alive, but outside every collective.
                assert!(out.contains("rank 0 waited"), "{out}");
                assert!(
                    out.contains("process 1 (rank 1)")
                        && out.contains("it is stuck in the program's own code"),
                    "{out}"
                );
            } else {
                // the late rank's own process names it
                assert!(
                    out.contains("rank 3 failed: did not reach `all_reduce`"),
                    "{out}"
                );
            }
        }
        return;
    }
    let mut fabric = Fabric::<B>::builder()
        .collective_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    fabric
        .launch(|fabric| {
            let device = *fabric.device();
            if fabric.global_rank() == fabric.world_size() - 1 {
                std::thread::sleep(Duration::from_secs(60));
            }
            fabric.all_reduce(Tensor::<Flex, 1>::ones([8], &device), ReduceOp::Sum)?;
            Ok::<_, FabricError>(())
        })
        .unwrap();
}

#[test]
fn reduce_scatter_and_all_gather_flat_across_processes() {
    if !child() {
        succeeds("reduce_scatter_and_all_gather_flat_across_processes", 2, 1);
        succeeds("reduce_scatter_and_all_gather_flat_across_processes", 2, 2);
        return;
    }
    use burn_fabric::CollectiveError;
    use burn_fabric::fabric_collective::launcher::{ThreadLaunch, launch_threads_with};
    use burn_fabric::fabric_collective::mpi::MpiProcesses;
    use burn_fabric::fabric_collective::{Collective, HierarchicalCollective};
    use std::sync::Arc;

    // Building the Fabric joins the job's MPI world; the engine below shares it, so the
    // operations run through the hierarchical engine itself (threads x MPI processes).
    let fabric = Fabric::<B>::builder().build().unwrap();
    let world = fabric.world_size();
    assert!(world >= 2, "expected a multi-process job, got {world}");
    let timeout = Duration::from_secs(30);
    let processes = MpiProcesses::get(timeout).unwrap();
    let launch = ThreadLaunch {
        world_size: world / processes.size(),
        first_rank: fabric.global_rank(),
        timeout,
        threads_per_rank: Some(1),
    };
    // A failed rank ends the job at once rather than leaving the other process waiting.
    let abort = |rank: usize, message: &str| {
        processes.abort(&format!("rank {rank}: {message}"));
    };
    // Integers and halves: every sum is exact in f32.
    let value = |r: usize, i: usize| ((r + 1) * (i % 100)) as f32 * 0.5 - r as f32;
    launch_threads_with(
        &launch,
        |_, member| {
            let c = HierarchicalCollective::new(member, Arc::clone(&processes));
            let rank = c.rank();
            assert_eq!(c.world_size(), world);
            for per_rank in [3, 1000] {
                let n = per_rank * world;
                for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                    let data: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
                    let got = c
                        .reduce_scatter(TensorData::new(data, [n]), op)
                        .map_err(|e| e.to_string())?;
                    let want: Vec<f32> = (rank * per_rank..(rank + 1) * per_rank)
                        .map(|i| {
                            let col = (0..world).map(|r| value(r, i));
                            match op {
                                ReduceOp::Sum => col.sum(),
                                ReduceOp::Mean => col.sum::<f32>() / world as f32,
                                _ => col.fold(f32::NEG_INFINITY, f32::max),
                            }
                        })
                        .collect();
                    assert_eq!(got.shape.to_vec(), vec![per_rank]);
                    assert_eq!(got.to_vec::<f32>().unwrap(), want, "{op} rank {rank} n {n}");
                }
            }
            // integers: the mean rounds to nearest
            let ints: Vec<i64> = (0..world as i64).map(|k| rank as i64 * 3 + k).collect();
            let got = c
                .reduce_scatter(TensorData::new(ints, [world]), ReduceOp::Mean)
                .map_err(|e| e.to_string())?;
            let sum: i64 = (0..world as i64).map(|r| r * 3 + rank as i64).sum();
            let mean = (sum as f64 / world as f64).round() as i64;
            assert_eq!(got.to_vec::<i64>().unwrap(), vec![mean], "i64 mean");
            // all_gather_flat: every rank's buffer in global rank order
            let mine: Vec<f32> = (0..3).map(|k| (rank * 10 + k) as f32).collect();
            let got = c
                .all_gather_flat(TensorData::new(mine, [3]))
                .map_err(|e| e.to_string())?;
            let want: Vec<f32> = (0..world)
                .flat_map(|r| (0..3).map(move |k| (r * 10 + k) as f32))
                .collect();
            assert_eq!(got.shape.to_vec(), vec![3 * world]);
            assert_eq!(got.to_vec::<f32>().unwrap(), want, "all_gather_flat");
            let got = c
                .all_gather_flat(TensorData::new(vec![rank as i32, -1], [2]))
                .map_err(|e| e.to_string())?;
            let want: Vec<i32> = (0..world as i32).flat_map(|r| [r, -1]).collect();
            assert_eq!(got.to_vec::<i32>().unwrap(), want, "all_gather_flat i32");
            // a length the world size does not divide: a typed error on every rank, no hang
            let n = 3 * world + 1;
            match c.reduce_scatter(TensorData::new(vec![1.0f32; n], [n]), ReduceOp::Sum) {
                Err(CollectiveError::InvalidShape { shape, .. }) => assert_eq!(shape, vec![n]),
                other => panic!("expected InvalidShape, got {other:?}"),
            }
            c.barrier().map_err(|e| e.to_string())?;
            Ok(())
        },
        &abort,
    )
    .unwrap();
}
