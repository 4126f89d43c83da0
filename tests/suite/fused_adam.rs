//! `FusedAdam` through Fabric: the same parameters as Burn's `Adam` bit for bit on 1 and 2 ranks,
//! and optimizer records that move between the two.

use crate::common;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn_fabric::FusedAdamConfig;
use common::{B, Mlp, batch, train};

const STEPS: usize = 12;
const BATCH: usize = 16;

#[test]
fn fused_adam_equals_adam_on_1_and_2_ranks() {
    for devices in [1, 2] {
        for decay in [None, Some(1e-2)] {
            let adam = || {
                AdamConfig::new()
                    .with_weight_decay(decay.map(WeightDecayConfig::new))
                    .init()
            };
            let fused = || FusedAdamConfig::new().with_weight_decay(decay).init();
            let want = train(devices, 1, STEPS, BATCH, 0.01, adam).unwrap();
            let got = train(devices, 1, STEPS, BATCH, 0.01, fused).unwrap();
            assert_eq!(got, want, "{devices} rank(s), weight decay {decay:?}");
            let start = common::params(&Mlp::<B>::deterministic(&Default::default()));
            assert_ne!(got, start, "training moved the parameters");
        }
    }
}

/// Five steps of Adam, its record loaded into FusedAdam, five more: the same parameters as ten
/// steps of Adam.
#[test]
fn adam_records_load_into_fused_adam() {
    let device = Default::default();
    let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
    let step = |model: Mlp<B>, optimizer: &mut dyn FnMut(Mlp<B>, GradientsParams) -> Mlp<B>, i| {
        let (x, y) = batch::<B>(i * BATCH, BATCH, &device);
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optimizer(model, grads)
    };
    let mut adam = AdamConfig::new().init::<B, Mlp<B>>();
    let mut reference = Mlp::<B>::deterministic(&device);
    for i in 0..10 {
        reference = step(reference, &mut |m, g| adam.step(1e-2, m, g), i);
    }

    let mut adam = AdamConfig::new().init::<B, Mlp<B>>();
    let mut model = Mlp::<B>::deterministic(&device);
    for i in 0..5 {
        model = step(model, &mut |m, g| adam.step(1e-2, m, g), i);
    }
    let bytes = recorder.record(adam.to_record(), ()).unwrap();
    let mut fused = FusedAdamConfig::new().init::<B, Mlp<B>>();
    fused = fused.load_record(recorder.load(bytes, &device).unwrap());
    for i in 5..10 {
        model = step(model, &mut |m, g| fused.step(1e-2, m, g), i);
    }
    assert_eq!(common::params(&model), common::params(&reference));
}
