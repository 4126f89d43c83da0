//! `setup_dataloader` shards data exactly like PyTorch's DistributedSampler: equal batch counts,
//! disjoint shares when divisible, wrap-around padding when not, a new shuffle each epoch.

use crate::common::Indices;
use burn::backend::Flex;
use burn::data::dataset::InMemDataset;
use burn::tensor::{Int, Tensor};
use burn_fabric::{DataLoader, Fabric, FabricError};

type B = burn::backend::Autodiff<Flex>;

/// Per epoch, every rank's visited items in order, and every rank's batch count.
fn visit(
    world: usize,
    len: usize,
    batch: usize,
    configure: impl Fn(
        DataLoader<Flex, i64, Tensor<Flex, 1, Int>>,
    ) -> DataLoader<Flex, i64, Tensor<Flex, 1, Int>>
    + Sync,
    epochs: usize,
) -> Vec<Vec<Vec<i64>>> {
    let mut fabric = Fabric::<B>::builder().devices(world).build().unwrap();
    fabric
        .launch(|fabric| {
            fabric.seed_everything(42);
            let dataset = InMemDataset::new((0..len as i64).collect::<Vec<_>>());
            let loader = configure(DataLoader::new(dataset, Indices).batch_size(batch));
            let mut loader = fabric.setup_dataloader(loader)?;
            let mut per_epoch = Vec::new();
            for _ in 0..epochs {
                let expected_batches = loader.len();
                let batches: Vec<Tensor<Flex, 1, Int>> = loader.iter().collect();
                assert_eq!(batches.len(), expected_batches);
                let count = batches.len() as f64;
                let min = fabric.all_reduce_scalar(count, burn_fabric::ReduceOp::Min)?;
                let max = fabric.all_reduce_scalar(count, burn_fabric::ReduceOp::Max)?;
                assert_eq!(min, max, "ranks disagree on the number of batches");
                let mine = Tensor::cat(batches, 0);
                // equal lengths on every rank, or all_gather fails
                let all: Tensor<Flex, 2, Int> = fabric.all_gather(mine)?;
                let [ranks, n] = all.dims();
                let flat = all.into_data().convert::<i64>().to_vec::<i64>().unwrap();
                per_epoch.push(
                    (0..ranks)
                        .map(|r| flat[r * n..(r + 1) * n].to_vec())
                        .collect(),
                );
            }
            Ok::<_, FabricError>(per_epoch)
        })
        .unwrap()
}

#[test]
fn divisible_data_is_split_disjointly_and_completely() {
    let epochs = visit(4, 12, 2, |l| l.shuffle(true), 1);
    let mut all: Vec<i64> = epochs[0].concat();
    all.sort_unstable();
    assert_eq!(all, (0..12).collect::<Vec<_>>());
    assert!(epochs[0].iter().all(|r| r.len() == 3));
}

#[test]
fn indivisible_data_is_padded_by_wrapping_and_batches_stay_equal() {
    // 10 items over 4 ranks: 3 each, the first two items of the list reused.
    let epochs = visit(4, 10, 2, |l| l.shuffle(false), 1);
    assert_eq!(
        epochs[0],
        vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]
    );
}

#[test]
fn drop_last_drops_the_short_batch_on_every_rank() {
    let epochs = visit(4, 10, 2, |l| l.shuffle(false).drop_last(true), 1);
    assert_eq!(
        epochs[0],
        vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
    );
}

#[test]
fn each_epoch_reshuffles_the_same_way_on_every_run() {
    let first = visit(2, 40, 4, |l| l.shuffle(true), 2);
    assert_ne!(first[0], first[1], "epoch 1 must differ from epoch 0");
    for epoch in &first {
        let mut all = epoch.concat();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }
    assert_eq!(
        visit(2, 40, 4, |l| l.shuffle(true), 2),
        first,
        "same seed, same order"
    );
}

#[test]
fn undistributed_loaders_give_every_rank_everything() {
    let epochs = visit(2, 6, 4, |l| l.distributed(false), 1);
    assert_eq!(epochs[0], vec![(0..6).collect::<Vec<_>>(); 2]);
}

#[test]
fn zero_batch_size_is_an_error() {
    let mut fabric = Fabric::<B>::builder().build().unwrap();
    let loader =
        DataLoader::<Flex, i64, Tensor<Flex, 1, Int>>::new(InMemDataset::new(vec![1i64]), Indices)
            .batch_size(0);
    let err = fabric.setup_dataloader(loader).err().unwrap().to_string();
    assert!(err.contains("batch_size") && err.contains('0'), "{err}");
}
