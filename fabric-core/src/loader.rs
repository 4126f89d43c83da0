//! Data loading for ranks: a dataset and a batcher (Burn's own traits) with a batch size, made
//! distributed by [`DistributedSampler`] when the Fabric sets it up.

use crate::FabricError;
use crate::sampler::DistributedSampler;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::backend::Backend;
use std::sync::Arc;

/// What a training script would hand to a PyTorch `DataLoader`: a dataset, how to batch it, the
/// batch size, and whether to shuffle or drop the last short batch.
pub struct DataLoader<BT: Backend, I, O> {
    dataset: Arc<dyn Dataset<I>>,
    batcher: Arc<dyn Batcher<BT, I, O>>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    distributed: bool,
    even_batches: bool,
}

impl<BT: Backend, I, O> Clone for DataLoader<BT, I, O> {
    fn clone(&self) -> Self {
        Self {
            dataset: Arc::clone(&self.dataset),
            batcher: Arc::clone(&self.batcher),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            drop_last: self.drop_last,
            distributed: self.distributed,
            even_batches: self.even_batches,
        }
    }
}

impl<BT: Backend, I: Send + Sync + 'static, O> DataLoader<BT, I, O> {
    /// A loader over `dataset` batched by `batcher`, batch size 1, no shuffle.
    pub fn new(
        dataset: impl Dataset<I> + 'static,
        batcher: impl Batcher<BT, I, O> + 'static,
    ) -> Self {
        Self {
            dataset: Arc::new(dataset),
            batcher: Arc::new(batcher),
            batch_size: 1,
            shuffle: false,
            drop_last: false,
            distributed: true,
            even_batches: true,
        }
    }

    /// Items per batch, per rank (Fabric never rescales it, as in Lightning).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Reshuffle every epoch (with the Fabric's seed plus the epoch, the same on all ranks).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Drop the last batch of an epoch if it is shorter than `batch_size`.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Whether each rank gets its own shard (default). `false` is Lightning's
    /// `use_distributed_sampler=False`: every rank iterates the whole dataset.
    pub fn distributed(mut self, distributed: bool) -> Self {
        self.distributed = distributed;
        self
    }

    /// Whether every rank gets the same number of batches (default), padding the ranks' shares
    /// by repeating samples from the start as PyTorch's `DistributedSampler` does. `false`, for
    /// evaluation, visits each sample exactly once over all ranks, so metrics synchronised with
    /// `Fabric::sync_metric` count each sample once even when the dataset does not divide by
    /// the world size; ranks may then run different numbers of batches, so run no collective
    /// per batch (synchronise after the loop).
    pub fn even_batches(mut self, even_batches: bool) -> Self {
        self.even_batches = even_batches;
        self
    }

    /// Number of items in the dataset.
    pub fn dataset_len(&self) -> usize {
        self.dataset.len()
    }

    /// Binds the loader to one rank: `shard` is `(num_replicas, rank)` (ignored when the loader
    /// is not distributed), `seed` the shuffle seed, batches go to `device`.
    pub fn into_rank(
        self,
        shard: Option<(usize, usize)>,
        seed: u64,
        device: BT::Device,
    ) -> Result<RankDataLoader<BT, I, O>, FabricError> {
        if self.batch_size == 0 {
            return Err(FabricError::InvalidArgument {
                name: "batch_size",
                value: "0".into(),
                reason: "a batch needs at least one item".into(),
            });
        }
        let (replicas, rank) = match shard {
            Some(shard) if self.distributed => shard,
            _ => (1, 0),
        };
        let sampler = DistributedSampler::new(self.dataset.len(), replicas, rank)
            .with_shuffle(self.shuffle)
            .with_seed(seed)
            .with_padding(self.even_batches);
        Ok(RankDataLoader {
            loader: self,
            sampler,
            device,
            iterations: 0,
        })
    }
}

/// A loader bound to one rank (what `Fabric::setup_dataloader` returns): each call of
/// [`iter`](Self::iter) starts a new epoch, reshuffles, and yields this rank's batches on its
/// device. Every rank yields the same number of batches (unless
/// [`even_batches(false)`](DataLoader::even_batches)).
pub struct RankDataLoader<BT: Backend, I, O> {
    loader: DataLoader<BT, I, O>,
    sampler: DistributedSampler,
    device: BT::Device,
    iterations: u64,
}

impl<BT: Backend, I, O> RankDataLoader<BT, I, O> {
    /// Batches per epoch on this rank.
    pub fn len(&self) -> usize {
        let samples = self.sampler.num_samples();
        if self.loader.drop_last {
            samples / self.loader.batch_size
        } else {
            samples.div_ceil(self.loader.batch_size)
        }
    }

    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The epoch the next [`iter`](Self::iter) call will run.
    pub fn next_epoch(&self) -> u64 {
        self.iterations
    }

    /// Makes the next [`iter`](Self::iter) run `epoch` (to resume a run).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.iterations = epoch;
    }

    /// The sampler (for its indices and sizes).
    pub fn sampler(&self) -> &DistributedSampler {
        &self.sampler
    }

    /// Starts the next epoch and iterates over its batches.
    pub fn iter(&mut self) -> Batches<'_, BT, I, O> {
        self.sampler.set_epoch(self.iterations);
        self.iterations += 1;
        let mut indices = self.sampler.indices();
        if self.loader.drop_last {
            indices.truncate(indices.len() - indices.len() % self.loader.batch_size);
        }
        Batches {
            loader: &self.loader,
            device: &self.device,
            indices,
            next: 0,
        }
    }
}

/// The batches of one epoch on one rank.
pub struct Batches<'a, BT: Backend, I, O> {
    loader: &'a DataLoader<BT, I, O>,
    device: &'a BT::Device,
    indices: Vec<usize>,
    next: usize,
}

impl<BT: Backend, I, O> Iterator for Batches<'_, BT, I, O> {
    type Item = O;

    fn next(&mut self) -> Option<O> {
        if self.next >= self.indices.len() {
            return None;
        }
        let end = (self.next + self.loader.batch_size).min(self.indices.len());
        let items: Vec<I> = self.indices[self.next..end]
            .iter()
            .filter_map(|&i| self.loader.dataset.get(i))
            .collect();
        self.next = end;
        Some(self.loader.batcher.batch(items, self.device))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.indices.len() - self.next).div_ceil(self.loader.batch_size);
        (left, Some(left))
    }
}

impl<BT: Backend, I, O> ExactSizeIterator for Batches<'_, BT, I, O> {}
