//! DDP averages the gradients of each `burn_fabric::unit` on a communication thread while the
//! rest of backward runs, and still trains the model one rank trains on the full batch.
//!
//! Tolerance: the DDP tests' (|ddp - single| <= 1e-6 + 1e-5 * |single|). The model
//! ([`common::tower`]) has a block used by two units, a bias also used outside its unit and a
//! head outside any unit; the runs add gradient accumulation under `no_backward_sync`, and
//! buckets small enough that each unit's parameters travel on their own.

use crate::common;

use burn_fabric::Fabric;
use common::tower::{Tower, train_tower};
use common::{B, worst_ratio};

fn train(strategy: &str, devices: usize, micro: usize) -> (Vec<Vec<f32>>, bool) {
    let fabric = Fabric::<B>::builder()
        .devices(devices)
        .strategy(strategy)
        // About one unit's parameters per bucket.
        .bucket_bytes(200)
        .overlap_backward(true)
        .env(burn_fabric::EnvVars::default())
        .build()
        .unwrap();
    train_tower(fabric, micro).unwrap()
}

#[test]
fn overlapped_ddp_trains_like_one_rank() {
    let (single, _) = train("single_device", 1, 1);
    let start = common::params(&Tower::<B>::deterministic(&Default::default()));
    assert!(
        worst_ratio(&single, &start, 1e-5, 1e-6) > 100.0,
        "training moved nothing"
    );
    for (devices, micro) in [(2, 1), (4, 1), (2, 2), (3, 2)] {
        let (ddp, overlapped) = train("ddp", devices, micro);
        let ratio = worst_ratio(&ddp, &single, 1e-5, 1e-6);
        assert!(
            ratio <= 1.0,
            "ddp {devices} ranks, {micro} micro-batches: {ratio:.3} x the tolerance"
        );
        if cfg!(target_os = "linux") {
            assert!(
                overlapped,
                "ddp {devices} ranks: no communication thread ran"
            );
        }
    }
}
