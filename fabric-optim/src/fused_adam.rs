//! Adam that updates each parameter in one pass over its memory on CPU backends.
//!
//! Burn's [`Adam`] runs about fourteen tensor operations per parameter and step, each a pass over
//! the parameter's memory (and most a fresh allocation). On a CPU backend whose tensors are host
//! memory (Flex, LibTorch on the CPU) [`FusedAdam`] reads the gradient and updates the parameter
//! and its two moments in the tensors' own memory (when no other tensor shares theirs; the
//! gradient may be a view into DDP's bucket), in one loop (over the rank's rayon threads on
//! Flex); tensors it cannot reach in place go through host copies. The arithmetic
//! is Burn's, operation for operation in `f32`, so on Flex the results equal [`Adam`]'s bit for
//! bit (LibTorch's kernels round a few of Burn's Adam operations differently, so there they agree
//! to an ulp or so per step); the state is Burn's [`AdamState`], so records and checkpoints are
//! interchangeable with [`Adam`]'s.
//! Other backends, dtypes other than `f32`, and AMSGrad go through Burn's [`Adam`].

use crate::host;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{Adam, AdamConfig, AdamState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Elements per task of the parallel update: large enough to amortise the task, small enough
/// that two ranks' threads share the work evenly.
const CHUNK: usize = 1 << 15;

/// Configuration of [`FusedAdam`]; the same fields and defaults as Burn's [`AdamConfig`].
#[derive(burn::config::Config, Debug)]
pub struct FusedAdamConfig {
    /// Decay of the first moment.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay of the second moment.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the denominator for stability.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// L2 penalty added to the gradient (`grad + penalty * param`), as Burn's `WeightDecay`.
    pub weight_decay: Option<f32>,
}

impl FusedAdamConfig {
    /// The optimizer for module `M` on backend `B` (hand it to `Fabric::setup` like any Burn
    /// optimizer).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> OptimizerAdaptor<FusedAdam, M, B> {
        OptimizerAdaptor::from(self.build())
    }

    /// The per-parameter rule.
    pub fn build(&self) -> FusedAdam {
        let burn = AdamConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay.map(WeightDecayConfig::new))
            .build();
        FusedAdam {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            burn,
        }
    }
}

/// Adam with a one-pass update on host-memory backends (see the [module](self) docs).
#[derive(Clone)]
pub struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: Option<f32>,
    /// Burn's Adam with the same settings, for what the fused loop does not cover.
    burn: Adam,
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdam {
    type State<const D: usize> = AdamState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let f32_only = tensor.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && state
                .as_ref()
                .is_none_or(|s| s.momentum.max_moment_2.is_none());
        match host::in_place::<B>(&tensor.device()) {
            Some(parallel) if f32_only => self.step_in_place(lr, tensor, grad, state, parallel),
            _ => self.burn.step(lr, tensor, grad, state),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <Adam as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// A parameter's, its two moments' and its gradient's elements, where they could be reached.
type Buffers<'a> = (
    Option<&'a mut [f32]>,
    Option<&'a mut [f32]>,
    Option<&'a mut [f32]>,
    Option<&'a [f32]>,
);

/// The scalars of one step, computed as Burn's `AdaptiveMomentum` computes them.
#[derive(Clone, Copy)]
struct Coefficients {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    combined: f32,
    epsilon: f32,
    lr: f32,
    decay: f32,
}

impl FusedAdam {
    /// The scalars of step number `time` (1 for the first).
    fn coefficients(&self, time: usize, lr: f64) -> Coefficients {
        let t = time as i32;
        let bias_correction2_sqrt = (1.0 - self.beta_2.powi(t)).sqrt();
        Coefficients {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            combined: bias_correction2_sqrt / (1.0 - self.beta_1.powi(t)),
            epsilon: self.epsilon * bias_correction2_sqrt,
            lr: lr as f32,
            decay: self.weight_decay.unwrap_or(0.0),
        }
    }

    /// Updates `p`, `m`, `v` from `g` in place when all four buffers are there and equally
    /// long, and says whether it did; `first` when the moments are new; over the rank's rayon
    /// threads when `parallel`.
    fn update(
        &self,
        (first, parallel): (bool, bool),
        buffers: Buffers<'_>,
        k: Coefficients,
    ) -> bool {
        let (Some(p), Some(m), Some(v), Some(g)) = buffers else {
            return false;
        };
        if [m.len(), v.len(), g.len()] != [p.len(); 3] {
            return false;
        }
        match (first, self.weight_decay.is_some()) {
            (true, true) => update::<true, true>(parallel, p, m, v, g, k),
            (true, false) => update::<true, false>(parallel, p, m, v, g, k),
            (false, true) => update::<false, true>(parallel, p, m, v, g, k),
            (false, false) => update::<false, false>(parallel, p, m, v, g, k),
        }
        true
    }

    /// The step on host buffers taken out of the tensors (copies where they are shared): what
    /// [`step_in_place`](Self::step_in_place) falls back to.
    fn step_data<B: Backend, const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamState<B, D>>,
    ) -> (Tensor<B, D>, Option<AdamState<B, D>>) {
        let device = tensor.device();
        let (time, first, m, v) = moments(state, &tensor);
        let mut param = tensor.into_data();
        let grad = grad.into_data();
        let (mut m, mut v) = (m.into_data(), v.into_data());
        let k = self.coefficients(time, lr);
        let buffers = (
            param.as_mut_slice::<f32>().ok(),
            m.as_mut_slice::<f32>().ok(),
            v.as_mut_slice::<f32>().ok(),
            grad.as_slice::<f32>().ok(),
        );
        let updated = self.update((first, true), buffers, k);
        let back = |data: TensorData| Tensor::<B, D>::from_data(data, (&device, DType::F32));
        if !updated {
            // Unaligned or odd buffers: Burn's operations on the untouched values.
            let state = (!first)
                .then(|| AdamState::new(AdaptiveMomentumState::new(time - 1, back(m), back(v))));
            return self.burn.step(lr, back(param), back(grad), state);
        }
        let state = AdamState::new(AdaptiveMomentumState::new(time, back(m), back(v)));
        (back(param), Some(state))
    }

    /// The step in the tensors' own memory (Flex, LibTorch CPU) when nothing else holds the
    /// parameter and the moments; otherwise through host copies ([`step_data`](Self::step_data)).
    fn step_in_place<B: Backend, const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamState<B, D>>,
        parallel: bool,
    ) -> (Tensor<B, D>, Option<AdamState<B, D>>) {
        use burn::tensor::TensorPrimitive;
        let (time, first, m, v) = moments(state, &tensor);
        let primitive = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (mut p, mut g) = (primitive(tensor), primitive(grad));
        let (mut m, mut v) = (primitive(m), primitive(v));
        // A weight's gradient may be a transposed view: one copy makes it readable in order.
        host::make_contiguous(&mut g);
        let k = self.coefficients(time, lr);
        let buffers = (
            host::slice_mut(&mut p),
            host::slice_mut(&mut m),
            host::slice_mut(&mut v),
            host::slice(&g),
        );
        let updated = self.update((first, parallel), buffers, k);
        let back = |t| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
        let (p, g, m, v) = (back(p), back(g), back(m), back(v));
        if !updated {
            return self.step_data(
                lr,
                p,
                g,
                (!first).then(|| AdamState::new(AdaptiveMomentumState::new(time - 1, m, v))),
            );
        }
        (
            p,
            Some(AdamState::new(AdaptiveMomentumState::new(time, m, v))),
        )
    }
}

/// The step number this step will have, whether it is the first, and the two moments (zeros,
/// shaped like `param`, on the first step).
fn moments<B: Backend, const D: usize>(
    state: Option<AdamState<B, D>>,
    param: &Tensor<B, D>,
) -> (usize, bool, Tensor<B, D>, Tensor<B, D>) {
    match state {
        Some(state) => {
            let momentum = state.momentum;
            let (m, v) = (momentum.moment_1, momentum.moment_2);
            (momentum.time + 1, false, m, v)
        }
        None => {
            let zeros = || Tensor::<B, D>::zeros(param.shape(), (&param.device(), DType::F32));
            (1, true, zeros(), zeros())
        }
    }
}

/// One step over every element, in parallel chunks when `parallel`. `FIRST`: the moments
/// start from the gradient (Burn's first step, not a blend with zeros); `DECAY`: add the L2
/// penalty first.
fn update<const FIRST: bool, const DECAY: bool>(
    parallel: bool,
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    k: Coefficients,
) {
    if parallel {
        param
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| update_chunk::<FIRST, DECAY>(p, m, v, g, k));
    } else {
        update_chunk::<FIRST, DECAY>(param, m, v, grad, k);
    }
}

/// [`update`] over one chunk (all four slices of one length).
fn update_chunk<const FIRST: bool, const DECAY: bool>(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    k: Coefficients,
) {
    for i in 0..p.len() {
        let g = if DECAY { p[i] * k.decay + g[i] } else { g[i] };
        let (mi, vi) = if FIRST {
            (g * k.factor_1, (g * g) * k.factor_2)
        } else {
            (
                m[i] * k.beta_1 + g * k.factor_1,
                v[i] * k.beta_2 + (g * g) * k.factor_2,
            )
        };
        let step = (mi * k.combined) / (vi.sqrt() + k.epsilon);
        p[i] -= step * k.lr;
        m[i] = mi;
        v[i] = vi;
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Values in [-1, 1) that differ per `seed` (sin of a scaled index).
    fn tensor(len: usize, seed: f32) -> Tensor<Flex, 1> {
        let values: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_data(TensorData::new(values, [len]), &Default::default())
    }

    fn bits(tensor: &Tensor<Flex, 1>) -> Vec<u32> {
        let values: Vec<f32> = tensor.to_data().to_vec().unwrap();
        values.into_iter().map(f32::to_bits).collect()
    }

    /// The one-pass loop (several chunks: more elements than `CHUNK`) against Burn's Adam, step
    /// for step, with and without weight decay: parameters and both moments equal bit for bit.
    #[test]
    fn fused_step_equals_burn_adam_bit_for_bit() {
        assert_eq!(host::in_place::<Flex>(&Default::default()), Some(true));
        let len = 2 * CHUNK + 123;
        for decay in [None, Some(0.05)] {
            let config = FusedAdamConfig::new().with_weight_decay(decay);
            let fused = config.build();
            let (mut p_fused, mut p_burn) = (tensor(len, 0.0), tensor(len, 0.0));
            let (mut s_fused, mut s_burn) = (None, None);
            for step in 0..4 {
                let grad = tensor(len, 1.0 + step as f32).mul_scalar(1e-2 * (step + 1) as f32);
                let lr = 1e-2 / (step + 1) as f64;
                (p_fused, s_fused) =
                    SimpleOptimizer::<Flex>::step(&fused, lr, p_fused, grad.clone(), s_fused);
                (p_burn, s_burn) = fused.burn.step(lr, p_burn, grad, s_burn);
                assert_eq!(
                    bits(&p_fused),
                    bits(&p_burn),
                    "step {step}, decay {decay:?}"
                );
                let (f, b) = (
                    &s_fused.as_ref().unwrap().momentum,
                    &s_burn.as_ref().unwrap().momentum,
                );
                assert_eq!(f.time, b.time);
                assert_eq!(
                    bits(&f.moment_1),
                    bits(&b.moment_1),
                    "first moment, step {step}"
                );
                assert_eq!(
                    bits(&f.moment_2),
                    bits(&b.moment_2),
                    "second moment, step {step}"
                );
            }
            // The parameters moved, so equality is not that of two untouched tensors.
            assert_ne!(bits(&p_fused), bits(&tensor(len, 0.0)));
        }
    }

    /// Flex tensors are reached in place when unshared, read in place when shared (DDP's
    /// gradient views), and never written while shared.
    #[test]
    fn flex_elements_in_place_only_when_unshared() {
        let mut unique = tensor(10, 0.0).into_primitive().tensor();
        assert_eq!(host::slice_mut(&mut unique).map(|s| s.len()), Some(10));
        let whole = tensor(10, 0.0);
        let mut view = whole.clone().slice(2..7).into_primitive().tensor();
        assert!(
            host::slice_mut(&mut view).is_none(),
            "a view shares its buffer"
        );
        let read = host::slice(&view).map(<[f32]>::to_vec);
        let want: Vec<f32> = whole.to_data().to_vec::<f32>().unwrap()[2..7].to_vec();
        assert_eq!(read, Some(want));
    }

    /// Other dtypes take Burn's path (and still train).
    #[test]
    fn half_parameters_use_burns_adam() {
        let fused = FusedAdamConfig::new().build();
        let p = tensor(10, 0.0).cast(DType::F16);
        let g = tensor(10, 1.0).cast(DType::F16);
        let (p, state) = SimpleOptimizer::<Flex>::step(&fused, 0.1, p, g, None);
        assert_eq!(p.dtype(), DType::F16);
        assert_eq!(state.unwrap().momentum.moment_1.dtype(), DType::F16);
    }
}
