//! Gradient clipping by global norm and by value, on the synchronised gradients.

use crate::common;

use burn::optim::SgdConfig;
use burn_fabric::{Fabric, FabricError, ReduceOp};
use common::{B, Mlp, batch};

/// Every gradient of the model, flattened.
fn grads(fabric: &Fabric<B>, model: &Mlp<B>) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = vec![
        fabric
            .gradient(&model.l1.weight)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap(),
        fabric
            .gradient(model.l1.bias.as_ref().unwrap())
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap(),
        fabric
            .gradient(&model.l2.weight)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap(),
        fabric
            .gradient(model.l2.bias.as_ref().unwrap())
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap(),
    ];
    parts.concat()
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn backward(fabric: &mut Fabric<B>, model: &Mlp<B>, device: &burn::backend::flex::FlexDevice) {
    let (x, y) = batch::<B>(fabric.global_rank() * 8, 8, device);
    let loss = (model.forward(x) - y)
        .powi_scalar(2)
        .mean()
        .mul_scalar(50.0);
    fabric.backward(loss, model).unwrap();
}

/// A one-device Fabric whose deterministic model holds gradients, and those gradients.
fn with_gradients() -> (Fabric<B>, Mlp<B>, Vec<f32>) {
    let mut fabric = Fabric::<B>::builder().build().unwrap();
    let device = *fabric.device();
    let model = fabric
        .setup_module(Mlp::<B>::deterministic(&device))
        .unwrap();
    backward(&mut fabric, &model, &device);
    let before = grads(&fabric, &model);
    (fabric, model, before)
}

#[test]
fn norm_clipping_returns_the_pre_clip_norm_and_scales_to_max_norm() {
    let (mut fabric, model, before) = with_gradients();
    let norm = fabric.clip_gradients_norm(&model, 0.5, 2.0).unwrap();
    assert!(
        (norm - l2(&before)).abs() < 1e-4 * norm,
        "{norm} vs {}",
        l2(&before)
    );
    assert!(
        norm > 0.5,
        "the test needs a norm above max_norm, got {norm}"
    );
    let after = grads(&fabric, &model);
    assert!(
        (l2(&after) - 0.5).abs() < 1e-4,
        "clipped norm {}",
        l2(&after)
    );
    // direction kept
    let scale = after[0] / before[0];
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|(b, a)| (b * scale - a).abs() <= 1e-6 + 1e-4 * a.abs())
    );

    // infinity norm, below the limit: nothing changes
    let inf = fabric
        .clip_gradients_norm(&model, 10.0, f64::INFINITY)
        .unwrap();
    let max_abs = after.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
    assert!((inf - max_abs).abs() < 1e-6, "{inf} vs {max_abs}");
    assert_eq!(grads(&fabric, &model), after);
}

#[test]
fn value_clipping_clamps_each_element() {
    let (mut fabric, model, before) = with_gradients();
    let limit = 0.05f32;
    assert!(before.iter().any(|g| g.abs() > limit) && before.iter().any(|g| g.abs() < limit));
    fabric.clip_gradients_value(&model, limit as f64).unwrap();
    let after = grads(&fabric, &model);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(*a, b.clamp(-limit, limit));
    }
}

#[test]
fn bad_arguments_and_non_finite_norms_are_errors() {
    let mut fabric = Fabric::<B>::builder().build().unwrap();
    let device = *fabric.device();
    let model = fabric
        .setup_module(Mlp::<B>::deterministic(&device))
        .unwrap();
    assert!(fabric.clip_gradients_norm(&model, 1.0, 0.0).is_err());
    assert!(fabric.clip_gradients_norm(&model, -1.0, 2.0).is_err());
    assert!(fabric.clip_gradients_value(&model, f64::NAN).is_err());
    let (x, _) = batch::<B>(0, 4, &device);
    let loss = model.forward(x).mean().mul_scalar(f64::INFINITY);
    fabric.backward(loss, &model).unwrap();
    let err = fabric.clip_gradients_norm(&model, 1.0, 2.0).unwrap_err();
    assert!(matches!(err, FabricError::NonFiniteNorm { .. }), "{err}");
}

#[test]
fn ddp_clipping_sees_the_same_synced_norm_on_every_rank() {
    let mut fabric = Fabric::<B>::builder().devices(2).build().unwrap();
    fabric
        .launch(|fabric| {
            let device = *fabric.device();
            let (model, mut optim) =
                fabric.setup(Mlp::<B>::random(&device), SgdConfig::new().init())?;
            backward(fabric, &model, &device);
            let norm = fabric.clip_gradients_norm(&model, 0.1, 2.0)?;
            let lo = fabric.all_reduce_scalar(norm, ReduceOp::Min)?;
            let hi = fabric.all_reduce_scalar(norm, ReduceOp::Max)?;
            assert_eq!(lo, hi);
            let model = optim.step(0.1, model)?;
            drop(model);
            Ok::<_, FabricError>(())
        })
        .unwrap();
}
