//! N-rank DDP with per-rank batch B/N reaches the same parameters as 1 rank with batch B.
//!
//! Tolerance: |ddp - single| <= 1e-6 + 1e-5 * |single| for every parameter after 10 steps. The
//! two differ only in the order float additions happen (per-rank means averaged vs one mean).

use crate::common;

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

mod partial_use {
    //! Parameters that only some ranks use are averaged with zeros from the others; parameters
    //! no rank uses keep no gradient and are not stepped.
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::SgdConfig;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Tensor, TensorData};
    use burn_fabric::{Fabric, FabricError};

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    #[derive(Module, Debug)]
    struct Heads<B: Backend> {
        a: Linear<B>,
        b: Linear<B>,
        unused: Linear<B>,
    }

    #[test]
    fn gradients_of_rank_local_heads_are_averaged_with_zeros() {
        let mut fabric = Fabric::<B>::builder().devices(2).build().unwrap();
        let (a, b, unused, a_only_rank0) = fabric
            .launch(|fabric| {
                let device = *fabric.device();
                let heads = Heads {
                    a: LinearConfig::new(2, 1).init(&device),
                    b: LinearConfig::new(2, 1).init(&device),
                    unused: LinearConfig::new(2, 1).init(&device),
                };
                let (heads, mut optim) = fabric.setup(heads, SgdConfig::new().init())?;
                let x =
                    Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2]), &device);
                // rank 0 trains head a, rank 1 head b; nobody touches `unused`
                let head = if fabric.global_rank() == 0 {
                    &heads.a
                } else {
                    &heads.b
                };
                let loss = head.forward(x.clone()).sum();
                // what rank 0 alone would compute for head a's weight: d(sum(xW + b))/dW = x^T
                fabric.backward(loss, &heads)?;
                let grad = |p: &burn::module::Param<Tensor<B, 2>>| {
                    fabric
                        .gradient(p)
                        .map(|g| g.into_data().to_vec::<f32>().unwrap())
                };
                let out = (
                    grad(&heads.a.weight),
                    grad(&heads.b.weight),
                    grad(&heads.unused.weight),
                    vec![1.0f32, 2.0],
                );
                let before = heads.unused.weight.val().into_data();
                let heads = optim.step(0.1, heads)?;
                assert_eq!(
                    heads.unused.weight.val().into_data(),
                    before,
                    "an unused parameter moved"
                );
                Ok::<_, FabricError>(out)
            })
            .unwrap();
        let half: Vec<f32> = a_only_rank0.iter().map(|g| g / 2.0).collect();
        assert_eq!(
            a,
            Some(half.clone()),
            "head a: rank 0's gradient averaged with rank 1's zero"
        );
        assert_eq!(
            b,
            Some(half),
            "head b: rank 1's gradient averaged with rank 0's zero"
        );
        assert_eq!(unused, None, "no rank used this head");
    }
}
