//! Precision plugins through the façade: parameter dtypes, mixed-precision gradients, loss
//! scaling with a forced overflow on one rank, and backends that cannot run a precision.

use crate::common;

use burn::backend::Flex;
use burn::module::Module;
use burn::optim::SgdConfig;
use burn::tensor::{DType, Tensor};
use burn_fabric::fabric_strategies::CollectParams;
use burn_fabric::{EnvVars, Fabric, FabricError};
use common::{B, Mlp, batch};

fn fabric(precision: &str, devices: usize) -> Fabric<B> {
    Fabric::<B>::builder()
        .precision(precision)
        .devices(devices)
        .env(EnvVars::default())
        .build()
        .unwrap()
}

fn param_dtypes(model: &Mlp<B>) -> Vec<DType> {
    let mut collect = CollectParams::<B>::default();
    model.visit(&mut collect);
    collect.values.iter().map(|t| t.dtype()).collect()
}

#[test]
fn each_precision_trains_in_its_dtype() {
    for (precision, params, compute) in [
        ("64-true", DType::F64, DType::F64),
        ("32-true", DType::F32, DType::F32),
        ("16-true", DType::F16, DType::F16),
        ("bf16-true", DType::BF16, DType::BF16),
        ("16-mixed", DType::F32, DType::F16),
        ("bf16-mixed", DType::F32, DType::BF16),
    ] {
        let mut fabric = fabric(precision, 1);
        let device = *fabric.device();
        let (model, mut optim) = fabric
            .setup(Mlp::<B>::deterministic(&device), SgdConfig::new().init())
            .unwrap();
        assert!(
            param_dtypes(&model).iter().all(|d| *d == params),
            "{precision}: {:?}",
            param_dtypes(&model)
        );
        let (x, y) = batch::<B>(0, 8, &device);
        let mut seen = None;
        let out = fabric.forward(&model, x, |m, x| {
            seen = Some(x.dtype());
            m.forward(x)
        });
        assert_eq!(
            seen,
            Some(compute),
            "{precision}: input dtype inside forward"
        );
        assert_eq!(
            out.dtype(),
            DType::F32,
            "{precision}: outputs come back in f32"
        );
        let loss = (out - y).powi_scalar(2).mean();
        fabric.backward(loss, &model).unwrap();
        let grad = fabric.gradient(&model.l1.weight).unwrap();
        assert_eq!(
            grad.dtype(),
            params,
            "{precision}: gradients in the parameters' dtype"
        );
        let before = model.l1.weight.val().into_data();
        let model = optim.step(0.1, model).unwrap();
        assert_ne!(
            model.l1.weight.val().into_data(),
            before,
            "{precision}: the step changed nothing"
        );
        assert!(
            param_dtypes(&model).iter().all(|d| *d == params),
            "{precision} after the step"
        );
    }
}

#[test]
fn mixed_precision_gradients_match_f32_closely() {
    let grad = |precision: &str| -> Vec<f32> {
        let mut fabric = fabric(precision, 1);
        let device = *fabric.device();
        let model = fabric
            .setup_module(Mlp::<B>::deterministic(&device))
            .unwrap();
        let (x, y) = batch::<B>(0, 16, &device);
        let loss = (fabric.forward(&model, x, |m, x| m.forward(x)) - y)
            .powi_scalar(2)
            .mean();
        fabric.backward(loss, &model).unwrap();
        fabric
            .gradient(&model.l2.weight)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap()
    };
    let full = grad("32-true");
    let scale = full.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    for (precision, tolerance) in [("16-mixed", 5e-3), ("bf16-mixed", 3e-2)] {
        let mixed = grad(precision);
        let worst = mixed
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // relative to the largest gradient: half precision keeps 3 (f16) or 2 (bf16) digits
        assert!(
            worst <= tolerance * scale,
            "{precision}: worst {worst} vs scale {scale}"
        );
        assert!(mixed.iter().any(|g| *g != 0.0));
    }
}

#[test]
fn an_overflow_on_one_rank_skips_that_step_everywhere_and_halves_the_scale() {
    let mut fabric = fabric("16-mixed", 2);
    let results = fabric
        .launch(|fabric| {
            let device = *fabric.device();
            let (mut model, mut optim) =
                fabric.setup(Mlp::<B>::deterministic(&device), SgdConfig::new().init())?;
            let mut moved = Vec::new();
            let mut scales = Vec::new();
            for step in 0..4 {
                let (x, y) = batch::<B>(step * 8 + fabric.global_rank() * 4, 4, &device);
                let mut loss = (fabric.forward(&model, x, |m, x| m.forward(x)) - y)
                    .powi_scalar(2)
                    .mean();
                if step == 2 && fabric.global_rank() == 1 {
                    loss = loss.mul_scalar(f64::INFINITY);
                }
                fabric.backward(loss, &model)?;
                let before = model.l1.weight.val().into_data();
                model = optim.step(0.1, model)?;
                moved.push(model.l1.weight.val().into_data() != before);
                scales.push(fabric.grad_scaler().map(|s| s.scale));
            }
            let skipped = fabric.grad_scaler().map(|s| s.skipped_steps);
            // report what every rank saw, not just rank 0
            let mine = Tensor::<Flex, 1>::from_floats(
                [
                    moved.iter().filter(|m| **m).count() as f32,
                    skipped.unwrap_or(0) as f32,
                ],
                &device,
            );
            let all: Tensor<Flex, 2> = fabric.all_gather(mine)?;
            Ok::<_, FabricError>((moved, scales, all.into_data().to_vec::<f32>().unwrap()))
        })
        .unwrap();
    let (moved, scales, per_rank) = results;
    assert_eq!(
        moved,
        vec![true, true, false, true],
        "only step 2 is skipped"
    );
    let s = 65536.0;
    assert_eq!(scales, vec![Some(s), Some(s), Some(s / 2.0), Some(s / 2.0)]);
    assert_eq!(
        per_rank,
        vec![3.0, 1.0, 3.0, 1.0],
        "both ranks stepped 3 times and skipped once"
    );
}

#[test]
fn the_scaler_state_round_trips() {
    let mut fabric = fabric("16-mixed", 1);
    let state = fabric.grad_scaler().unwrap();
    assert_eq!(state.scale, 65536.0);
    let mut changed = state;
    changed.scale = 1024.0;
    changed.skipped_steps = 7;
    fabric.load_grad_scaler(changed);
    assert_eq!(fabric.grad_scaler(), Some(changed));
    assert_eq!(self::fabric("bf16-mixed", 1).grad_scaler(), None);
}

#[test]
fn backends_without_the_dtype_are_refused_at_configuration() {
    type Nd = burn::backend::Autodiff<burn::backend::NdArray>;
    for precision in ["16-mixed", "bf16-mixed", "16-true", "bf16-true"] {
        let err = Fabric::<Nd>::builder()
            .precision(precision)
            .env(EnvVars::default())
            .build()
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ndarray") && err.contains(precision) && err.contains("flex"),
            "{err}"
        );
    }
    for precision in ["32-true", "64-true"] {
        assert!(
            Fabric::<Nd>::builder()
                .precision(precision)
                .env(EnvVars::default())
                .build()
                .is_ok()
        );
    }
}

/// Under `*-mixed` a loss from a bare `model.forward` (outside `fabric.forward`) would train in
/// f32 without anyone noticing: `backward` refuses it, names the precision and says what to do,
/// and stores no gradient; the same loss through `fabric.forward` is accepted. Under `32-true`
/// there is nothing to bypass.
#[test]
fn mixed_precision_refuses_a_loss_that_skipped_the_precision_context() {
    for precision in ["bf16-mixed", "16-mixed"] {
        let mut fabric = fabric(precision, 1);
        let device = *fabric.device();
        let (model, _optim) = fabric
            .setup(Mlp::<B>::deterministic(&device), SgdConfig::new().init())
            .unwrap();
        let (x, y) = batch::<B>(0, 8, &device);
        let bare = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        let err = fabric.backward(bare, &model).unwrap_err();
        assert!(
            matches!(&err, FabricError::PrecisionBypassed { precision: p } if p == precision),
            "{precision}: {err}"
        );
        assert!(err.to_string().contains("fabric.forward"), "{err}");
        assert!(fabric.gradient(&model.l1.weight).is_none(), "{precision}");

        let out = fabric.forward(&model, x, |m, x| m.forward(x));
        let loss = (out - y).powi_scalar(2).mean();
        fabric.backward(loss, &model).unwrap();
        assert!(fabric.gradient(&model.l1.weight).is_some(), "{precision}");
    }
    let mut fabric = fabric("32-true", 1);
    let device = *fabric.device();
    let (model, _optim) = fabric
        .setup(Mlp::<B>::deterministic(&device), SgdConfig::new().init())
        .unwrap();
    let (x, y) = batch::<B>(0, 8, &device);
    let bare = (model.forward(x) - y).powi_scalar(2).mean();
    fabric.backward(bare, &model).unwrap();
}
