//! One training step of the same MLP, batch and optimizer: plain Burn vs burn-fabric on one
//! device (Fabric's overhead), and burn-fabric DDP on 2 ranks with the same global batch (DDP
//! efficiency = time per step on 1 rank ÷ time per step on 2 ranks).

use criterion::{Criterion, criterion_group, criterion_main};
use fabric_benches::{DIGITS_MLP, MNIST_MLP, Shape, fabric, plain_burn, total};
use std::time::Duration;

const GLOBAL_BATCH: usize = 128;

fn bench_model(c: &mut Criterion, name: &str, shape: Shape) {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    group.bench_function("plain_burn", |b| {
        b.iter_custom(|steps| total(&plain_burn(shape, GLOBAL_BATCH, steps)))
    });
    group.bench_function("fabric_1_device", |b| {
        b.iter_custom(|steps| total(&fabric(shape, GLOBAL_BATCH, 1, steps).expect("fabric run")))
    });
    group.bench_function("fabric_ddp_2_devices", |b| {
        b.iter_custom(|steps| total(&fabric(shape, GLOBAL_BATCH, 2, steps).expect("fabric run")))
    });
    group.finish();
}

fn training(c: &mut Criterion) {
    bench_model(c, "train_step_digits_mlp", DIGITS_MLP);
    bench_model(c, "train_step_mlp_784_1024", MNIST_MLP);
}

criterion_group!(benches, training);
criterion_main!(benches);
