//! The fused all-reduce-and-cast kernel against the unfused path (add into f32, then cast), and
//! against a plain copy kernel as the achievable bandwidth, at 1M–64M elements.
//!
//! Bandwidth counts bytes read and written: fused `2·n·in + n·out`, unfused
//! `2·n·in + n·4 + n·4 + n·out`, copy `2·n·4`. Each figure is the mean of `reps` launches issued
//! back to back after a warm-up, between two device synchronisations (so the per-launch sync
//! does not count); the median over 5 such batches is reported.
//!
//! `cargo bench -p fabric-benches --features wgpu --bench fused [-- --quick]` (Wgpu; Mesa's
//! lavapipe on a CPU-only machine) or `--features cuda` (an NVIDIA GPU).

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod run {
    use cubecl::prelude::*;
    use cubecl::server::Handle;
    use fabric_benches::report::{Goal, Row};
    use fabric_collective::fused::{FloatKind, Path, sum_cast};
    use std::time::{Duration, Instant};

    #[cube(launch)]
    fn copy<N: Size>(input: &Array<Vector<f32, N>>, out: &mut Array<Vector<f32, N>>) {
        if ABSOLUTE_POS < out.len() {
            out[ABSOLUTE_POS] = input[ABSOLUTE_POS];
        }
    }

    fn sync<R: Runtime>(client: &ComputeClient<R>) {
        cubecl::future::block_on(client.sync()).expect("device sync");
    }

    fn median_time<R: Runtime>(
        client: &ComputeClient<R>,
        reps: usize,
        mut f: impl FnMut(),
    ) -> Duration {
        for _ in 0..3 {
            f();
        }
        sync(client);
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..reps {
                    f();
                }
                sync(client);
                start.elapsed() / reps as u32
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    }

    fn gbps(bytes: usize, time: Duration) -> f64 {
        bytes as f64 / time.as_secs_f64() / 1e9
    }

    pub fn bench<R: Runtime>(client: ComputeClient<R>, label: &str, quick: bool) -> Vec<Row> {
        let client = &client;
        let sizes: &[usize] = if quick {
            &[1 << 20, 16 << 20]
        } else {
            &[1 << 20, 4 << 20, 16 << 20, 64 << 20]
        };
        let reps = if quick { 5 } else { 20 };
        println!(
            "\nfused all-reduce-and-cast on {label}: {reps} launches per batch, median of 5 batches; bandwidth = bytes read + written / time"
        );
        println!(
            "| elements | in → out | fused GB/s | unfused GB/s | fused ÷ unfused time | copy GB/s | fused ÷ copy bandwidth |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut rows = Vec::new();
        let note = format!("{label}, {reps} launches per batch, median of 5 batches");
        // The largest buffer the runtime allocates (lavapipe stops below 256 MiB).
        let max_bytes = client.properties().memory.max_page_size;
        for &n in sizes {
            if (n * 4) as u64 > max_bytes {
                println!(
                    "| {}M | skipped: an f32 buffer of {} MiB exceeds this runtime's largest allocation ({} MiB) | | | | | |",
                    n >> 20,
                    n * 4 >> 20,
                    max_bytes >> 20
                );
                continue;
            }
            let f32_buf = |v: f32| client.create_from_slice(bytemuck::cast_slice(&vec![v; n]));
            let f16_buf = |v: f32| {
                client.create_from_slice(bytemuck::cast_slice(&vec![half::f16::from_f32(v); n]))
            };
            let src = f32_buf(1.0);
            let dst = client.empty(n * 4);
            let vector = client
                .io_optimized_vector_sizes(4)
                .find(|v| n % v == 0)
                .unwrap_or(1);
            let units = n / vector;
            let dim = CubeDim::new(client, units);
            let count = cubecl::calculate_cube_count_elemwise(client, units, dim);
            // SAFETY: both buffers hold n f32 values, n divisible by 4.
            let arg = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), n) };
            let copy_time = median_time(client, reps, || {
                copy::launch::<R>(client, count.clone(), dim, vector, arg(&src), arg(&dst))
            });
            let copy_bw = gbps(2 * n * 4, copy_time);
            for (input, output) in [
                (FloatKind::F16, FloatKind::F32),
                (FloatKind::F32, FloatKind::F16),
            ] {
                let (a, b): (Handle, Handle) = match input {
                    FloatKind::F16 => (f16_buf(1.0), f16_buf(2.0)),
                    _ => (f32_buf(1.0), f32_buf(2.0)),
                };
                let fused = median_time(client, reps, || {
                    drop(sum_cast(client, &a, &b, n, input, output, Path::Fused));
                });
                let unfused = median_time(client, reps, || {
                    drop(sum_cast(client, &a, &b, n, input, output, Path::Unfused));
                });
                let fused_bytes = n * (2 * input.size() + output.size());
                let unfused_bytes = n * (2 * input.size() + 4 + 4 + output.size());
                let fused_bw = gbps(fused_bytes, fused);
                println!(
                    "| {}M | {input:?} → {output:?} | {fused_bw:.1} | {:.1} | {:.3} | {copy_bw:.1} | {:.3} |",
                    n >> 20,
                    gbps(unfused_bytes, unfused),
                    fused.as_secs_f64() / unfused.as_secs_f64(),
                    fused_bw / copy_bw,
                );
                let what = format!("{}M {input:?} → {output:?}", n >> 20);
                rows.push(Row::single(
                    "Fused all-reduce-and-cast",
                    &format!("{what}: fused ÷ unfused time"),
                    fused.as_secs_f64() / unfused.as_secs_f64(),
                    Some(Goal::AtMost(1.0)),
                    note.clone(),
                ));
                rows.push(Row::single(
                    "Fused all-reduce-and-cast",
                    &format!("{what}: fused ÷ copy-kernel bandwidth"),
                    fused_bw / copy_bw,
                    None,
                    note.clone(),
                ));
            }
        }
        rows
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    #[cfg(feature = "cuda")]
    {
        let device = cubecl::cuda::CudaDevice::new(0);
        use burn_fabric::BackendDevices;
        match burn::backend::Cuda::device_pool(burn_fabric::Accelerator::Cuda) {
            Ok(_) => {
                let client = <cubecl::cuda::CudaRuntime as cubecl::Runtime>::client(&device);
                fabric_benches::report::record(
                    "fused_cuda",
                    &run::bench(client, "cuda device 0", quick),
                );
            }
            Err(err) => println!("fused (cuda): skipped, {err}"),
        }
    }
    #[cfg(feature = "wgpu")]
    {
        use burn_fabric::BackendDevices;
        use burn_fabric::fabric_core::backend::DevicePool;
        let device = match burn::backend::Wgpu::device_pool(burn_fabric::Accelerator::Wgpu) {
            Ok(DevicePool::Shared(device)) => Ok(device),
            Ok(DevicePool::Countable(devices)) => Ok(devices[0].clone()),
            Err(err) => Err(err),
        };
        match device {
            Ok(device) => {
                let client = <cubecl::wgpu::WgpuRuntime as cubecl::Runtime>::client(&device);
                fabric_benches::report::record(
                    "fused_wgpu",
                    &run::bench(client, "wgpu default adapter", quick),
                );
            }
            Err(err) => println!("fused (wgpu): skipped, {err}"),
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = quick;
        println!(
            "fused: built without a CubeCL runtime; add `--features wgpu` or `--features cuda`"
        );
    }
}
