//! Every façade collective on 1, 2 and 4 ranks, for float, int and bool tensors.

use burn::backend::Flex;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_fabric::{Fabric, FabricError, ReduceOp};

type B = burn::backend::Autodiff<Flex>;

fn on_ranks<T: Send>(
    devices: usize,
    body: impl Fn(&mut Fabric<B>) -> Result<T, FabricError> + Sync,
) -> T {
    let mut fabric = Fabric::<B>::builder().devices(devices).build().unwrap();
    fabric.launch(body).unwrap()
}

fn floats(t: Tensor<Flex, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn ints(t: Tensor<Flex, 1, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

/// Rank r holds [r + 1, -(r + 1) * 2, 10 r] (float) and the same as integers.
fn values(rank: usize) -> Vec<f32> {
    let r = rank as f32;
    vec![r + 1.0, -(r + 1.0) * 2.0, 10.0 * r]
}

fn expected(world: usize, op: ReduceOp) -> Vec<f64> {
    (0..3)
        .map(|i| {
            let column: Vec<f64> = (0..world).map(|r| values(r)[i] as f64).collect();
            match op {
                ReduceOp::Sum => column.iter().sum(),
                ReduceOp::Mean => column.iter().sum::<f64>() / world as f64,
                ReduceOp::Min => column.iter().cloned().fold(f64::INFINITY, f64::min),
                ReduceOp::Max => column.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

#[test]
fn all_reduce_float_and_int_every_op() {
    for world in [1, 2, 4] {
        let results = on_ranks(world, |fabric| {
            let device = *fabric.device();
            let mut out = Vec::new();
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Min, ReduceOp::Max] {
                let v = values(fabric.global_rank());
                let f = Tensor::<Flex, 1>::from_data(TensorData::new(v.clone(), [3]), &device);
                let i = Tensor::<Flex, 1, Int>::from_data(
                    TensorData::new(v.iter().map(|x| *x as i64).collect::<Vec<_>>(), [3]),
                    &device,
                );
                out.push((
                    op,
                    floats(fabric.all_reduce(f, op)?),
                    ints(fabric.all_reduce(i, op)?),
                ));
            }
            Ok(out)
        });
        for (op, f, i) in results {
            let want = expected(world, op);
            let want_f: Vec<f32> = want.iter().map(|x| *x as f32).collect();
            assert_eq!(f, want_f, "float {op} on {world} ranks");
            // integer mean rounds to nearest, ties away from zero
            let want_i: Vec<i64> = want.iter().map(|x| x.round() as i64).collect();
            assert_eq!(i, want_i, "int {op} on {world} ranks");
        }
    }
}

#[test]
fn all_reduce_of_autodiff_tensors_and_booleans() {
    let (sum, any, all) = on_ranks(2, |fabric| {
        let device = *fabric.device();
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
            &device,
        )
        .mul_scalar(fabric.global_rank() as f64 + 1.0);
        let sum = fabric.all_reduce(x, ReduceOp::Sum)?;
        let flag = Tensor::<Flex, 1, Bool>::from_data(
            TensorData::new(vec![fabric.global_rank() == 0, true], [2]),
            &device,
        );
        let any = fabric.all_reduce(flag.clone(), ReduceOp::Max)?;
        let all = fabric.all_reduce(flag, ReduceOp::Min)?;
        Ok((
            sum.into_data().to_vec::<f32>().unwrap(),
            any.into_data().to_vec::<bool>().unwrap(),
            all.into_data().to_vec::<bool>().unwrap(),
        ))
    });
    assert_eq!(sum, vec![3.0, 6.0, 9.0, 12.0]);
    assert_eq!(any, vec![true, true]);
    assert_eq!(all, vec![false, true]);
}

#[test]
fn all_gather_stacks_along_a_new_first_dimension() {
    for world in [1, 2, 4] {
        let (shape, rows, int_rows) = on_ranks(world, |fabric| {
            let device = *fabric.device();
            let r = fabric.global_rank() as f32;
            let x = Tensor::<Flex, 2>::from_data(
                TensorData::new(vec![r, r + 0.5, -r, 1.0], [2, 2]),
                &device,
            );
            let gathered: Tensor<Flex, 3> = fabric.all_gather(x)?;
            let n = Tensor::<Flex, 1, Int>::from_data(
                TensorData::new(vec![fabric.global_rank() as i64 * 3], [1]),
                &device,
            );
            let gathered_int: Tensor<Flex, 2, Int> = fabric.all_gather(n)?;
            Ok((
                gathered.dims(),
                gathered.into_data().to_vec::<f32>().unwrap(),
                gathered_int
                    .into_data()
                    .convert::<i64>()
                    .to_vec::<i64>()
                    .unwrap(),
            ))
        });
        assert_eq!(shape, [world, 2, 2]);
        for r in 0..world {
            let r32 = r as f32;
            assert_eq!(rows[r * 4..(r + 1) * 4], [r32, r32 + 0.5, -r32, 1.0]);
        }
        assert_eq!(
            int_rows,
            (0..world as i64).map(|r| r * 3).collect::<Vec<_>>()
        );
    }
}

#[test]
fn broadcast_tensor_and_object_from_any_source() {
    for world in [1, 2, 4] {
        let src = world - 1;
        let (tensor, text) = on_ranks(world, |fabric| {
            let device = *fabric.device();
            let mine = vec![fabric.global_rank() as f32; 3];
            let t = fabric.broadcast(
                Tensor::<Flex, 1>::from_data(TensorData::new(mine, [3]), &device),
                src,
            )?;
            let text =
                fabric.broadcast_object(&format!("hello from {}", fabric.global_rank()), src)?;
            // every rank must agree, not just rank 0
            let agreed =
                fabric.all_reduce_scalar(t.clone().sum().into_scalar() as f64, ReduceOp::Min)?;
            assert_eq!(agreed, 3.0 * src as f64);
            Ok((floats(t), text))
        });
        assert_eq!(tensor, vec![src as f32; 3]);
        assert_eq!(text, format!("hello from {src}"));
    }
}

#[test]
fn broadcast_from_a_rank_that_does_not_exist_is_an_error() {
    let mut fabric = Fabric::<B>::builder().devices(2).build().unwrap();
    let err = fabric
        .launch(|fabric| {
            let device = *fabric.device();
            fabric.broadcast(Tensor::<Flex, 1>::zeros([1], &device), 5)
        })
        .unwrap_err();
    assert!(err.to_string().contains("source rank 5"), "{err}");
}

#[test]
fn barrier_and_scalar_reduce_on_every_world_size() {
    for world in [1, 2, 4] {
        let total = on_ranks(world, |fabric| {
            fabric.barrier()?;
            fabric.all_reduce_scalar(fabric.global_rank() as f64, ReduceOp::Sum)
        });
        assert_eq!(total, (0..world).sum::<usize>() as f64);
    }
}

#[test]
fn collectives_before_launch_are_refused() {
    let fabric = Fabric::<B>::builder().devices(2).build().unwrap();
    let err = fabric.barrier().unwrap_err();
    assert!(
        matches!(
            err,
            FabricError::NotLaunched {
                operation: "barrier",
                world_size: 2
            }
        ),
        "{err}"
    );
    // one device needs no launch
    let single = Fabric::<B>::builder().build().unwrap();
    assert!(single.barrier().is_ok());
}
