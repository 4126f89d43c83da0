//! The strategy seam (Lightning's `Strategy`): one per rank, it owns the rank's collective,
//! precision plugin and gradient store, and with them every arrow of a training step —
//! backward (scale, back-propagate, unscale, synchronise), clipping, the optimizer step and
//! checkpoint I/O. The façade only hands it the module, the optimizer and the files.
//!
//! A strategy sees modules through the [module seam](crate::module): trainable parameters
//! flattened in module-visit order, the same on every rank.

use crate::checkpoint_io::{self, ApplyEntries, EncodeEntries};
use crate::fsdp::ParamGather;
use crate::module::{FlatGrad, ModuleParams, ParamSlot, SetupParam, StepTarget};
use crate::overlap::ParamWatch;
use crate::rank_state::RankState;
use burn::module::ParamId;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fabric_collective::Collective;
use fabric_core::FabricError;
use fabric_precision::PrecisionPlugin;
use std::path::Path;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// A parallel strategy for backend `B`. Implementors say how parameters and gradients cross
/// between ranks; the provided methods run the step on top of that, and a sharded strategy
/// ([`Sharded`](crate::Sharded)) overrides the step and checkpoint I/O.
pub trait Strategy<B: AutodiffBackend>: Send + Sync {
    /// Lightning's registry name (`single_device`, `ddp`, ...).
    fn name(&self) -> &'static str;

    /// The rank's collective, device, precision and gradients.
    fn rank_state(&self) -> &RankState<B>;

    /// Makes every rank hold rank 0's parameters (each flattened, in module-visit order).
    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError>;

    /// The part of each parameter (rank 0's values, after the broadcast) this rank keeps, and
    /// the shape it keeps it in. Strategies that replicate keep every parameter whole.
    fn shard_parameters(
        &self,
        params: Vec<SetupParam<Inner<B>>>,
    ) -> Result<Vec<SetupParam<Inner<B>>>, FabricError> {
        Ok(params)
    }

    /// How a forward pass sees whole parameters when this rank holds shards of them (FSDP);
    /// `None` when the module's parameters are whole.
    fn gather(&self) -> Option<ParamGather> {
        None
    }

    /// How a forward pass lets backward hand over the gradients of each unit's parameters
    /// as soon as they are computed (DDP's overlapped averaging); `None` when the strategy
    /// averages after backward.
    fn watch(&self) -> Option<ParamWatch> {
        None
    }

    /// An error the collectives run inside forward and backward passes (FSDP's gathers and
    /// reduce-scatters) met since the last check: they run inside module mapping and autodiff,
    /// where no error can be returned.
    fn pass_result(&self) -> Result<(), FabricError> {
        Ok(())
    }

    /// Averages gradients over the ranks, in the given (module-visit) order. A gradient that no
    /// rank has stays `None`; one that only some ranks have counts as zero on the others.
    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError>;

    /// `(num_replicas, rank)` for the distributed sampler, or `None` if every rank should see
    /// the whole dataset.
    fn sampler_shard(&self) -> Option<(usize, usize)>;

    /// The rank's collective, for the façade's `barrier`, `broadcast`, `all_gather` and
    /// `all_reduce`.
    fn collective(&self) -> &dyn Collective {
        self.rank_state().collective()
    }

    /// The rank's precision plugin.
    fn precision(&self) -> &PrecisionPlugin {
        self.rank_state().precision()
    }

    /// The rank's device.
    fn device(&self) -> &B::Device {
        self.rank_state().device()
    }

    /// Back-propagates `loss` (scaled by the precision), stores `module`'s gradients (unscaled),
    /// adding to any not yet consumed by a step, and with `sync` averages the stored gradients
    /// across ranks.
    fn backward(
        &self,
        loss: Tensor<B, 1>,
        module: &dyn ModuleParams<B>,
        sync: bool,
    ) -> Result<(), FabricError> {
        run_backward(self, loss, module, sync)
    }

    /// Stores `grads` (flattened, in `module`'s layout order; scaled by the loss scale when
    /// there is one), adding to any not yet consumed by a step, and outside `no_backward_sync`
    /// averages the stored gradients across ranks. The second half of
    /// [`backward`](Self::backward), for gradients a backward pass outside Fabric computed
    /// (a burn-train `TrainStep`).
    fn accumulate_gradients(
        &self,
        module: &dyn ModuleParams<B>,
        grads: Vec<Option<Tensor<Inner<B>, 1>>>,
        sync: bool,
    ) -> Result<(), FabricError> {
        store_gradients(self, &module.layout(), grads, sync)
    }

    /// Steps `target`'s optimizer with the stored gradients of its module and clears them,
    /// unless the precision skips the step (an overflow under `16-mixed`).
    fn optimizer_step(&self, lr: f64, target: &mut dyn StepTarget<B>) -> Result<(), FabricError> {
        let grads = self.rank_state().grads().take(&target.layout());
        if self.precision().step_allowed() {
            target.step(lr, grads);
        }
        Ok(())
    }

    /// Discards `module`'s stored gradients.
    fn zero_grad(&self, module: &dyn ModuleParams<B>) {
        drop(self.rank_state().grads().take(&module.layout()));
    }

    /// The stored gradient of parameter `id`, flattened (`None` where this rank holds none).
    fn gradient(&self, id: ParamId) -> Option<Tensor<Inner<B>, 1>> {
        self.rank_state().grads().get(id)
    }

    /// Scales `module`'s stored gradients so that their total `norm_type`-norm is at most
    /// `max_norm`; returns the norm before clipping.
    fn clip_gradients_norm(
        &self,
        module: &dyn ModuleParams<B>,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64, FabricError> {
        crate::grads::clip_norm(self.rank_state(), module, max_norm, norm_type, Ok)
    }

    /// Clamps `module`'s stored gradients into `[-clip_value, clip_value]`.
    fn clip_gradients_value(
        &self,
        module: &dyn ModuleParams<B>,
        clip_value: f64,
    ) -> Result<(), FabricError> {
        crate::grads::clip_value(self.rank_state(), module, clip_value)
    }

    /// Writes a checkpoint of the entries `encode` makes (plus the precision's own state) to
    /// `path`: one file written by global rank 0, atomically. Returns on every rank once it is
    /// on disk, with an error on every rank if it failed anywhere.
    fn save_checkpoint(&self, path: &Path, encode: EncodeEntries<'_>) -> Result<(), FabricError> {
        checkpoint_io::save_whole(self.rank_state(), path, encode)
    }

    /// Reads the checkpoint at `path` (a file, or a directory of shards consolidated in
    /// memory), restores the precision's own state, and hands the other entries to `apply`;
    /// an error on any rank is an error on every rank.
    fn load_checkpoint(&self, path: &Path, apply: ApplyEntries<'_>) -> Result<(), FabricError> {
        checkpoint_io::load_whole(self.rank_state(), path, apply)
    }
}

/// The provided [`Strategy::backward`].
pub(crate) fn run_backward<B: AutodiffBackend, S: Strategy<B> + ?Sized>(
    strategy: &S,
    loss: Tensor<B, 1>,
    module: &dyn ModuleParams<B>,
    sync: bool,
) -> Result<(), FabricError> {
    // The forward pass's collectives may have failed already, the backward pass's too.
    strategy.pass_result()?;
    let mut grads = strategy.precision().scale_loss(loss)?.backward();
    strategy.pass_result()?;
    let new = module.gradients(&mut grads);
    strategy.accumulate_gradients(module, new, sync)
}

/// Unscales `grads` (in `layout` order), adds them to the stored ones and with `sync` averages
/// those (the provided [`Strategy::accumulate_gradients`]).
pub(crate) fn store_gradients<B: AutodiffBackend, S: Strategy<B> + ?Sized>(
    strategy: &S,
    layout: &[ParamSlot],
    grads: Vec<Option<Tensor<Inner<B>, 1>>>,
    sync: bool,
) -> Result<(), FabricError> {
    let new = strategy.precision().unscale_gradients(grads);
    strategy.rank_state().grads().accumulate(layout, new);
    sync_stored(strategy, layout, sync)
}

/// With `sync` (outside `no_backward_sync`, several ranks), averages the stored gradients of
/// `layout`'s parameters across ranks and agrees on a loss-scale overflow.
pub(crate) fn sync_stored<B: AutodiffBackend, S: Strategy<B> + ?Sized>(
    strategy: &S,
    layout: &[ParamSlot],
    sync: bool,
) -> Result<(), FabricError> {
    if !sync || strategy.collective().world_size() == 1 {
        return Ok(());
    }
    let state = strategy.rank_state();
    let taken = state.grads().take(layout);
    let reduced = strategy.reduce_gradients(taken)?;
    state.grads().put(layout, reduced);
    strategy.precision().agree_overflow(strategy.collective())
}
