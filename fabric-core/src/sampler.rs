//! PyTorch's `DistributedSampler`, index for index (apart from the shuffle permutation, which
//! comes from a seeded ChaCha generator rather than torch's `randperm`).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Which dataset indices one rank visits in one epoch.
///
/// * With `shuffle`, all ranks draw the same permutation of `0..len` from `seed + epoch`.
/// * Each rank gets `ceil(len / replicas)` indices (or `floor` with `drop_last`) taken by stride
///   `rank, rank + replicas, ...`, so the ranks' shares are disjoint when `len` divides evenly.
/// * Without `drop_last` the list is padded by wrapping around to its start, so every rank has
///   the same number of indices (and therefore the same number of batches: no rank waits forever
///   in a collective for a peer that ran out of data).
/// * Without padding ([`with_padding(false)`](Self::with_padding), for evaluation) every index
///   is visited exactly once over all ranks, and the first `len % replicas` ranks get one more
///   index than the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    replicas: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    pad: bool,
    epoch: u64,
}

impl DistributedSampler {
    /// A sampler over `len` items for `rank` of `replicas`, shuffling with seed 0, keeping the
    /// tail (padding), starting at epoch 0. `replicas` of 0 is treated as 1 and `rank` is
    /// clamped below it.
    pub fn new(len: usize, replicas: usize, rank: usize) -> Self {
        let replicas = replicas.max(1);
        Self {
            len,
            replicas,
            rank: rank.min(replicas - 1),
            shuffle: true,
            seed: 0,
            drop_last: false,
            pad: true,
            epoch: 0,
        }
    }

    /// Whether to shuffle (default `true`).
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The shuffle seed, identical on every rank (default 0).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drop the tail that does not divide evenly instead of padding (default `false`).
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Whether to pad the ranks' shares to equal length by wrapping around (default `true`).
    /// `false` visits every index exactly once, so metrics over an evaluation set that does
    /// not divide by the number of ranks count each sample once; ranks may then get different
    /// numbers of batches, so no collective may run per batch.
    pub fn with_padding(mut self, pad: bool) -> Self {
        self.pad = pad;
        self
    }

    /// Sets the epoch, which changes the shuffle.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of indices this rank visits per epoch.
    pub fn num_samples(&self) -> usize {
        if !self.pad && !self.drop_last {
            return self.len.saturating_sub(self.rank).div_ceil(self.replicas);
        }
        if self.drop_last && !self.len.is_multiple_of(self.replicas) {
            // torch: ceil((len - replicas) / replicas), i.e. floor(len / replicas).
            self.len / self.replicas
        } else {
            self.len.div_ceil(self.replicas)
        }
    }

    /// Total indices over all ranks (`num_samples * replicas` when padded or dropped; the
    /// dataset's length without padding).
    pub fn total_size(&self) -> usize {
        if !self.pad && !self.drop_last {
            return self.len;
        }
        let per_rank = if self.drop_last && !self.len.is_multiple_of(self.replicas) {
            self.len / self.replicas
        } else {
            self.len.div_ceil(self.replicas)
        };
        per_rank * self.replicas
    }

    /// This rank's indices for the current epoch.
    pub fn indices(&self) -> Vec<usize> {
        let mut indices: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch));
            indices.shuffle(&mut rng);
        }
        let total = self.total_size();
        if self.drop_last {
            indices.truncate(total);
        } else if !indices.is_empty() {
            let mut i = 0;
            while indices.len() < total {
                indices.push(indices[i]);
                i += 1;
            }
        }
        indices
            .into_iter()
            .skip(self.rank)
            .step_by(self.replicas)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(
        len: usize,
        replicas: usize,
        f: impl Fn(DistributedSampler) -> DistributedSampler,
    ) -> Vec<Vec<usize>> {
        (0..replicas)
            .map(|rank| f(DistributedSampler::new(len, replicas, rank)).indices())
            .collect()
    }

    #[test]
    fn disjoint_and_complete_when_divisible() {
        let parts = shares(12, 4, |s| s.with_seed(7));
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| p.len() == 3));
    }

    #[test]
    fn pads_by_wrapping_when_not_divisible() {
        let parts = shares(10, 4, |s| s.with_shuffle(false));
        // torch: indices [0..10] + [0, 1] -> rank r takes r::4
        assert_eq!(
            parts,
            vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]
        );
    }

    #[test]
    fn pads_by_repeating_when_shorter_than_replicas() {
        let parts = shares(2, 5, |s| s.with_shuffle(false));
        assert_eq!(parts, vec![vec![0], vec![1], vec![0], vec![1], vec![0]]);
    }

    #[test]
    fn without_padding_every_index_is_visited_once() {
        let parts = shares(10, 4, |s| s.with_shuffle(false).with_padding(false));
        assert_eq!(
            parts,
            vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6], vec![3, 7]]
        );
        let parts = shares(10, 4, |s| s.with_seed(5).with_padding(false));
        let mut all = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        for (rank, part) in parts.iter().enumerate() {
            let sampler = DistributedSampler::new(10, 4, rank).with_padding(false);
            assert_eq!(sampler.num_samples(), part.len());
            assert_eq!(sampler.total_size(), 10);
        }
        assert_eq!(shares(2, 3, |s| s.with_padding(false)).concat().len(), 2);
    }

    #[test]
    fn drop_last_truncates_to_equal_shares() {
        let parts = shares(10, 4, |s| s.with_shuffle(false).with_drop_last(true));
        assert_eq!(parts, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    }

    #[test]
    fn reshuffles_per_epoch_deterministically() {
        let mut a = DistributedSampler::new(100, 2, 0).with_seed(3);
        let e0 = a.indices();
        a.set_epoch(1);
        let e1 = a.indices();
        assert_ne!(e0, e1);
        let mut b = DistributedSampler::new(100, 2, 0).with_seed(3);
        b.set_epoch(1);
        assert_eq!(b.indices(), e1);
        assert_eq!(
            DistributedSampler::new(100, 2, 0).with_seed(3).indices(),
            e0
        );
    }

    #[test]
    fn empty_dataset_gives_nothing() {
        assert!(DistributedSampler::new(0, 3, 1).indices().is_empty());
    }
}
