//! N-rank DDP with per-rank batch B/N reaches the same parameters as 1 rank with batch B.
//!
//! Tolerance: |ddp - single| <= 1e-6 + 1e-5 * |single| for every parameter after 10 steps. The
//! two differ only in the order float additions happen (per-rank means averaged vs one mean).

mod common;

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, SgdConfig};
use common::{B, Mlp, train, worst_ratio};

const STEPS: usize = 10;
const BATCH: usize = 16;
const RTOL: f32 = 1e-5;
const ATOL: f32 = 1e-6;

fn sgd() -> burn::optim::adaptor::OptimizerAdaptor<burn::optim::Sgd<burn::backend::Flex>, Mlp<B>, B>
{
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .init()
}

fn adam() -> burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, Mlp<B>, B> {
    AdamConfig::new().init()
}

fn check(name: &str, ddp: Vec<Vec<f32>>, single: &[Vec<f32>]) {
    let ratio = worst_ratio(&ddp, single, RTOL, ATOL);
    assert!(
        ratio <= 1.0,
        "{name}: worst error is {ratio:.3} x the tolerance"
    );
    // Training must have moved the parameters, or the comparison proves nothing.
    let start = common::params(&Mlp::<B>::deterministic(&Default::default()));
    assert!(
        worst_ratio(single, &start, RTOL, ATOL) > 100.0,
        "{name}: parameters did not move"
    );
}

#[test]
fn sgd_with_momentum_2_and_4_ranks() {
    let single = train(1, 1, STEPS, BATCH, 0.1, sgd).unwrap();
    for devices in [2, 4] {
        check(
            &format!("sgd {devices} ranks"),
            train(devices, 1, STEPS, BATCH, 0.1, sgd).unwrap(),
            &single,
        );
    }
}

#[test]
fn adam_2_and_4_ranks() {
    let single = train(1, 1, STEPS, BATCH, 0.01, adam).unwrap();
    for devices in [2, 4] {
        check(
            &format!("adam {devices} ranks"),
            train(devices, 1, STEPS, BATCH, 0.01, adam).unwrap(),
            &single,
        );
    }
}

#[test]
fn no_backward_sync_over_two_micro_batches() {
    let single_sgd = train(1, 1, STEPS, BATCH, 0.1, sgd).unwrap();
    let single_adam = train(1, 1, STEPS, BATCH, 0.01, adam).unwrap();
    for devices in [2, 4] {
        check(
            &format!("sgd {devices} ranks x 2 micro"),
            train(devices, 2, STEPS, BATCH, 0.1, sgd).unwrap(),
            &single_sgd,
        );
        check(
            &format!("adam {devices} ranks x 2 micro"),
            train(devices, 2, STEPS, BATCH, 0.01, adam).unwrap(),
            &single_adam,
        );
    }
}
