//! Sharded optimizer state (DeepSpeed's ZeRO stages 1 and 2): every rank holds the whole model,
//! but each owns a partition of the parameters; only the owner keeps optimizer state for a
//! parameter and steps it, then the owners broadcast the updated values to everyone.

use crate::bucket::{broadcast_buckets, reduce_buckets};
use crate::checkpoint_io::{ApplyEntries, EncodeEntries};
use crate::ddp::Ddp;
use crate::module::{FlatGrad, ModuleParams, ParamSlot, StepTarget};
use crate::rank_state::RankState;
use crate::sharded::{self, Sharded};
use crate::strategy::Strategy;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};
use fabric_core::FabricError;
use std::path::Path;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// How much ZeRO shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// Optimizer state sharded; gradients all-reduced as in DDP, then each rank keeps its own.
    One,
    /// Optimizer state and gradients sharded: each gradient bucket is reduced to its owner only.
    Two,
}

/// ZeRO stage 1 or 2. The partition depends only on the parameters' sizes and visit order (see
/// [`partition`]), so it is the same on every rank and in every run.
///
/// After a synchronised `backward` a rank holds gradients for its own parameters only, so
/// `Fabric::gradient` returns `None` for the others, and gradient-norm clipping combines the
/// ranks' partial norms.
pub struct Zero<B: AutodiffBackend> {
    /// Setup broadcast, stage 1's reduction and the rank's state.
    ddp: Ddp<B>,
    stage: ZeroStage,
}

impl<B: AutodiffBackend> Zero<B> {
    /// ZeRO at `stage` for the rank `state` describes.
    pub fn new(state: RankState<B>, stage: ZeroStage) -> Self {
        Self {
            ddp: Ddp::new(state),
            stage,
        }
    }

    fn owners_of(&self, layout: &[(usize, DType)]) -> Vec<usize> {
        partition(layout, self.collective().world_size())
    }
}

/// The owning rank of each parameter (given as `(numel, dtype)` in visit order), balancing bytes:
/// largest parameter first (ties: earlier in visit order) to the least-loaded rank (ties: lower
/// rank). A parameter is never split, so one tensor larger than `total / world` leaves its owner
/// above the even share.
pub fn partition(layout: &[(usize, DType)], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let bytes: Vec<usize> = layout.iter().map(|(n, d)| n * d.size()).collect();
    let mut order: Vec<usize> = (0..layout.len()).collect();
    order.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owners = vec![0; layout.len()];
    for index in order {
        let (rank, _) = load
            .iter()
            .enumerate()
            .min_by(|(ra, la), (rb, lb)| la.cmp(lb).then(ra.cmp(rb)))
            .unwrap_or((0, &0));
        owners[index] = rank;
        load[rank] += bytes[index];
    }
    owners
}

impl<B: AutodiffBackend> Strategy<B> for Zero<B> {
    fn name(&self) -> &'static str {
        match self.stage {
            ZeroStage::One => "zero1",
            ZeroStage::Two => "zero2",
        }
    }

    fn rank_state(&self) -> &RankState<B> {
        self.ddp.rank_state()
    }

    fn broadcast_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        self.ddp.broadcast_parameters(params)
    }

    fn reduce_gradients(
        &self,
        grads: Vec<FlatGrad<Inner<B>>>,
    ) -> Result<Vec<FlatGrad<Inner<B>>>, FabricError> {
        let owners = self.owners_of(&grads.iter().map(|g| (g.numel, g.dtype)).collect::<Vec<_>>());
        let state = self.rank_state();
        let reduced = match self.stage {
            ZeroStage::One => self.ddp.reduce_gradients(grads)?,
            ZeroStage::Two => reduce_buckets(
                state.collective(),
                state.device(),
                grads,
                state.bucket_bytes(),
                Some(&owners),
            )?,
        };
        // Stage 1 received every average; keep only this rank's.
        let rank = state.collective().rank();
        Ok(reduced
            .into_iter()
            .zip(owners)
            .map(|(g, owner)| FlatGrad {
                grad: g.grad.filter(|_| owner == rank),
                ..g
            })
            .collect())
    }

    fn sampler_shard(&self) -> Option<(usize, usize)> {
        self.ddp.sampler_shard()
    }

    fn optimizer_step(&self, lr: f64, target: &mut dyn StepTarget<B>) -> Result<(), FabricError> {
        sharded::step(self, lr, target)
    }

    fn clip_gradients_norm(
        &self,
        module: &dyn ModuleParams<B>,
        max_norm: f64,
        norm_type: f64,
    ) -> Result<f64, FabricError> {
        crate::grads::clip_norm(self.rank_state(), module, max_norm, norm_type, |partial| {
            sharded::combine_norm(self.collective(), partial, norm_type)
        })
    }

    fn save_checkpoint(&self, path: &Path, encode: EncodeEntries<'_>) -> Result<(), FabricError> {
        sharded::save(self, path, encode)
    }

    fn load_checkpoint(&self, path: &Path, apply: ApplyEntries<'_>) -> Result<(), FabricError> {
        sharded::load(self, path, apply)
    }
}

impl<B: AutodiffBackend> Sharded<B> for Zero<B> {
    fn owners(&self, layout: &[ParamSlot]) -> Vec<usize> {
        self.owners_of(
            &layout
                .iter()
                .map(|p| (p.numel, p.dtype))
                .collect::<Vec<_>>(),
        )
    }

    /// One bucketed broadcast per owner, from the owner.
    fn sync_parameters(
        &self,
        params: Vec<Tensor<Inner<B>, 1>>,
        layout: &[ParamSlot],
    ) -> Result<Vec<Tensor<Inner<B>, 1>>, FabricError> {
        let owners = self.owners(layout);
        let state = self.rank_state();
        let mut slots: Vec<Option<Tensor<Inner<B>, 1>>> = params.into_iter().map(Some).collect();
        for owner in 0..state.collective().world_size() {
            let indices: Vec<usize> = (0..slots.len()).filter(|&i| owners[i] == owner).collect();
            let values: Vec<_> = indices.iter().filter_map(|&i| slots[i].take()).collect();
            let synced = broadcast_buckets::<Inner<B>>(
                state.collective(),
                state.device(),
                values,
                state.bucket_bytes(),
                owner,
            )?;
            for (&i, value) in indices.iter().zip(synced) {
                slots[i] = Some(value);
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_balances_bytes_and_is_deterministic() {
        let f = DType::F32;
        let layout = [(100, f), (10, f), (60, f), (50, f), (1, f)];
        assert_eq!(partition(&layout, 2), vec![0, 0, 1, 1, 0]);
        assert_eq!(partition(&layout, 1), vec![0; 5]);
        // Ties go to the earlier parameter and the lower rank.
        assert_eq!(partition(&[(4, f), (4, f), (4, f)], 2), vec![0, 1, 0]);
    }

    #[test]
    fn partition_counts_bytes_not_elements() {
        // 100 f16 values (200 bytes) against 60 f64 values (480 bytes).
        let layout = [(100, DType::F16), (60, DType::F64), (100, DType::F16)];
        assert_eq!(partition(&layout, 2), vec![1, 0, 1]);
    }

    #[test]
    fn partition_of_many_equal_layers_is_even() {
        let layout = vec![(1000, DType::F32); 16];
        let owners = partition(&layout, 4);
        for rank in 0..4 {
            assert_eq!(owners.iter().filter(|&&o| o == rank).count(), 4);
        }
    }
}
