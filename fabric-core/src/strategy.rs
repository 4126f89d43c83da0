//! The strategy seam: how ranks share parameters and gradients. The façade flattens a module's
//! parameters or gradients in module-visit order (never by the random `ParamId`s) and hands the
//! list to the strategy; the strategy decides what crosses between ranks.

use crate::FabricError;
use crate::collective::Collective;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

/// One parameter's gradient, flattened to one dimension.
#[derive(Debug, Clone)]
pub struct FlatGrad<B: Backend> {
    /// Number of elements of the parameter.
    pub numel: usize,
    /// Dtype of the parameter (and of its gradient).
    pub dtype: DType,
    /// The gradient, or `None` if this rank's backward did not reach the parameter.
    pub grad: Option<Tensor<B, 1>>,
}

/// A parallel strategy for backend `B`, as Lightning's `Strategy`: it owns the rank's collective
/// and decides how parameters and gradients are shared.
pub trait Strategy<B: AutodiffBackend>: Send + Sync {
    /// Lightning's registry name (`single_device`, `ddp`, ...).
    fn name(&self) -> &'static str;

    /// The rank's collective, used for the façade's `barrier`, `broadcast`, `all_gather` and
    /// `all_reduce`.
    fn collective(&self) -> &dyn Collective;

    /// Makes every rank hold rank 0's parameters (each flattened, in module-visit order).
    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<B::InnerBackend, 1>>,
    ) -> Result<Vec<Tensor<B::InnerBackend, 1>>, FabricError>;

    /// Averages gradients over the ranks, in the given (module-visit) order. A gradient that no
    /// rank has stays `None`; one that only some ranks have counts as zero on the others.
    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<B::InnerBackend>>,
    ) -> Result<Vec<FlatGrad<B::InnerBackend>>, FabricError>;

    /// `(num_replicas, rank)` for the distributed sampler, or `None` if every rank should see
    /// the whole dataset.
    fn sampler_shard(&self) -> Option<(usize, usize)>;

    /// Which trainable parameters (by visit-order index, with their element counts and dtypes)
    /// this rank updates, when the strategy shards the update (ZeRO). `None`: all of them.
    fn owned_parameters(&self, _layout: &[(usize, DType)]) -> Option<Vec<bool>> {
        None
    }

    /// After a sharded step, gives every rank the updated trainable parameters (flattened,
    /// visit order; only those marked `owned` are current on this rank).
    fn sync_parameters(
        &self,
        params: Vec<Tensor<B::InnerBackend, 1>>,
        _owned: &[bool],
    ) -> Result<Vec<Tensor<B::InnerBackend, 1>>, FabricError> {
        Ok(params)
    }

    /// Whether each rank holds only its own part of the optimizer state (ZeRO): checkpoints are
    /// then saved as one shard file per rank.
    fn shards_optimizer(&self) -> bool {
        false
    }

    /// Combines this rank's partial gradient norm (`sum |g|^p`, or `max |g|` for the infinity
    /// norm) into the job's; the identity when every rank holds every gradient.
    fn combine_norm(&self, partial: f64, _norm_type: f64) -> Result<f64, FabricError> {
        Ok(partial)
    }
}
