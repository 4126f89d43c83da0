//! In-process all-reduce of 10M f32 between 2 ranks (threads), beside a plain 40 MB copy
//! between warm buffers: the copy is the floor any exchange of that much data pays.

use burn::tensor::TensorData;
use burn_fabric::fabric_collective::{Collective, ReduceOp, ThreadGroup};
use criterion::{Criterion, criterion_group, criterion_main};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ELEMENTS: usize = 10_000_000;

/// `iters` all-reduces on 2 ranks; returns rank 0's time.
fn all_reduce_2_ranks(iters: u64) -> Duration {
    let group = ThreadGroup::new(2, Duration::from_secs(60));
    let peer = group.member(1);
    let (ready_tx, ready_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let mut data = TensorData::new(vec![1.0f32; ELEMENTS], [ELEMENTS]);
        ready_tx.send(()).ok();
        for _ in 0..iters + 1 {
            data = peer
                .all_reduce(data, ReduceOp::Mean)
                .expect("rank 1 all_reduce");
        }
    });
    let me = group.member(0);
    let mut data = TensorData::new(vec![2.0f32; ELEMENTS], [ELEMENTS]);
    ready_rx.recv().ok();
    // one untimed round so both buffers are warm
    data = me
        .all_reduce(data, ReduceOp::Mean)
        .expect("rank 0 all_reduce");
    let start = Instant::now();
    for _ in 0..iters {
        data = me
            .all_reduce(data, ReduceOp::Mean)
            .expect("rank 0 all_reduce");
    }
    let elapsed = start.elapsed();
    worker.join().expect("rank 1 thread");
    std::hint::black_box(data);
    elapsed
}

fn collective(c: &mut Criterion) {
    let mut group = c.benchmark_group("all_reduce_10m_f32");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("in_process_2_ranks", |b| b.iter_custom(all_reduce_2_ranks));
    group.bench_function("memcpy_40mb", |b| {
        let src = vec![1.0f32; ELEMENTS];
        let mut dst = vec![0.0f32; ELEMENTS];
        b.iter(|| {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        })
    });
    group.finish();
}

criterion_group!(benches, collective);
criterion_main!(benches);
