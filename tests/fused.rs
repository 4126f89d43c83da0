//! The fused all-reduce-and-cast kernel against a plain-Rust reference, on Wgpu (Mesa's lavapipe
//! on a CPU-only machine): pseudo-random data, lengths that no cube or vector size divides,
//! f32 → f16, f16 → f32, f32 → f32 and f16 → f16, fused and unfused paths alike.
//!
//! `cargo test --release --features wgpu --test fused`. Without a Vulkan driver the
//! tests print why they skip, unless `FABRIC_REQUIRE_WGPU=1` (as in CI) makes that a failure.
#![cfg(feature = "wgpu")]

use burn::backend::Wgpu;
use burn::tensor::f16;
use burn_fabric::fabric_collective::fused::cubecl::prelude::*;
use burn_fabric::fabric_collective::fused::cubecl::server::Handle;
use burn_fabric::fabric_collective::fused::cubecl::wgpu::WgpuRuntime;
use burn_fabric::fabric_collective::fused::{FloatKind, Path, sum_cast};
use burn_fabric::fabric_core::backend::{BackendDevices, DevicePool};
use burn_fabric::fabric_core::config::Accelerator;

/// The Wgpu device, or `None` (and why, printed) when there is no Vulkan driver.
fn device() -> Option<burn::backend::wgpu::WgpuDevice> {
    match Wgpu::device_pool(Accelerator::Wgpu) {
        Ok(DevicePool::Shared(device)) => Some(device),
        Ok(DevicePool::Countable(devices)) => devices.into_iter().next(),
        Err(err) if std::env::var_os("FABRIC_REQUIRE_WGPU").is_some() => panic!("{err}"),
        Err(err) => {
            println!("skipped: {err}");
            None
        }
    }
}

fn client() -> Option<ComputeClient<WgpuRuntime>> {
    Some(WgpuRuntime::client(&device()?))
}

/// Deterministic values in [-4, 4) (a 64-bit LCG; the kernel's inputs need no better).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn upload(client: &ComputeClient<WgpuRuntime>, values: &[f32], kind: FloatKind) -> Handle {
    match kind {
        FloatKind::F32 => {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
            client.create_from_slice(&bytes)
        }
        FloatKind::F16 => {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_ne_bytes())
                .collect();
            client.create_from_slice(&bytes)
        }
        FloatKind::BF16 => unreachable!("wgpu has no bf16"),
    }
}

/// The inputs as the kernel sees them (rounded to their dtype), as f32.
fn as_input(values: &[f32], kind: FloatKind) -> Vec<f32> {
    match kind {
        FloatKind::F16 => values.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

fn download(
    client: &ComputeClient<WgpuRuntime>,
    handle: Handle,
    len: usize,
    kind: FloatKind,
) -> Vec<f32> {
    let bytes = client.read_one_unchecked(handle);
    match kind {
        FloatKind::F32 => bytes[..len * 4]
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        FloatKind::F16 => bytes[..len * 2]
            .chunks_exact(2)
            .map(|b| f16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect(),
        FloatKind::BF16 => unreachable!("wgpu has no bf16"),
    }
}

#[test]
fn fused_and_unfused_match_the_reference() {
    let Some(client) = client() else {
        return;
    };
    let pairs = [
        (FloatKind::F32, FloatKind::F16),
        (FloatKind::F16, FloatKind::F32),
        (FloatKind::F32, FloatKind::F32),
        (FloatKind::F16, FloatKind::F16),
    ];
    // 1, odd, prime, just past a cube of 256 and of 1024 vectors of 4, and a multiple of 4.
    for len in [1usize, 3, 257, 1031, 4099, 65_536] {
        let (a, b) = (values(len, len as u64), values(len, 7 + len as u64));
        for (input, output) in pairs {
            let (la, lb) = (upload(&client, &a, input), upload(&client, &b, input));
            let reference: Vec<f32> = as_input(&a, input)
                .iter()
                .zip(as_input(&b, input))
                .map(|(x, y)| {
                    let sum = x + y;
                    match output {
                        FloatKind::F16 => f16::from_f32(sum).to_f32(),
                        _ => sum,
                    }
                })
                .collect();
            for path in [Path::Fused, Path::Unfused] {
                let out = sum_cast(&client, &la, &lb, len, input, output, path);
                let got = download(&client, out, len, output);
                for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                    // One f16 ulp where the output is f16 (the GPU may round ties differently).
                    let tolerance = if output == FloatKind::F16 {
                        r.abs() / 1024.0
                    } else {
                        0.0
                    };
                    assert!(
                        (g - r).abs() <= tolerance,
                        "{path:?} {input:?}->{output:?} len {len} at {i}: {g} vs {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn f16_inputs_accumulate_in_f32() {
    let Some(client) = client() else {
        return;
    };
    // 2048 + 1 is not an f16 (its spacing there is 2), but the f32 output keeps it exactly.
    let a = upload(&client, &[2048.0, 0.5], FloatKind::F16);
    let b = upload(&client, &[1.0, 0.25], FloatKind::F16);
    let out = sum_cast(
        &client,
        &a,
        &b,
        2,
        FloatKind::F16,
        FloatKind::F32,
        Path::Fused,
    );
    assert_eq!(download(&client, out, 2, FloatKind::F32), [2049.0, 0.75]);
}

/// DDP's engine for ranks sharing the Wgpu device: every rank's buffer averaged (and summed) on
/// the device by the fused kernel equals the host engine's result for the same buffers, for
/// f32 and f16 buckets at 2 and 3 ranks over several rounds; f64 goes through the host.
#[test]
fn shared_device_engine_equals_the_host_engine() {
    use burn::tensor::{DType, Tensor, TensorData};
    use burn_fabric::fabric_collective::launcher::{ThreadLaunch, launch_threads};
    use burn_fabric::fabric_collective::shared_device;
    use burn_fabric::fabric_collective::{Collective, ReduceOp};

    let Some(device) = device() else {
        return;
    };
    assert!(shared_device::engine::<Wgpu>(std::slice::from_ref(&device)).is_none());
    assert!(shared_device::engine::<burn::backend::Flex>(&[Default::default(); 2]).is_none());
    for world in [2, 3] {
        let engine = shared_device::engine::<Wgpu>(&vec![device.clone(); world])
            .expect("ranks sharing a Wgpu device get the fused engine");
        assert_eq!(engine.name(), "fused");
        let launch = ThreadLaunch {
            world_size: world,
            first_rank: 0,
            timeout: std::time::Duration::from_secs(60),
            threads_per_rank: None,
        };
        launch_threads(&launch, |rank, host| {
            let mine = engine.for_rank(rank);
            let rounds = [
                (4099, DType::F32, ReduceOp::Mean),
                (1031, DType::F16, ReduceOp::Mean),
                (257, DType::F32, ReduceOp::Sum),
                (3, DType::F64, ReduceOp::Mean),
                (65_536, DType::F32, ReduceOp::Mean),
            ];
            for (round, (len, dtype, op)) in rounds.into_iter().enumerate() {
                let data = TensorData::new(values(len, (100 * round + rank) as u64), [len])
                    .convert_dtype(dtype);
                let tensor = Tensor::<Wgpu, 1>::from_data(data.clone(), (&device, dtype));
                let expected = host.all_reduce(data, op).map_err(|e| e.to_string())?;
                let got = mine
                    .all_reduce(&host, tensor, op)
                    .map_err(|e| e.to_string())?;
                mine.wait().map_err(|e| e.to_string())?;
                let got = got.into_data();
                if got.dtype != dtype {
                    return Err(format!(
                        "round {round}: dtype {:?}, not {dtype:?}",
                        got.dtype
                    ));
                }
                let got: Vec<f64> = got.convert::<f64>().to_vec().map_err(|e| e.to_string())?;
                let want: Vec<f64> = expected
                    .convert::<f64>()
                    .to_vec()
                    .map_err(|e| e.to_string())?;
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Both add in f32 in rank order and divide once: equal, but for the GPU
                    // rounding an f16 tie or a division by 3 another way (one ulp).
                    let ulp = match dtype {
                        DType::F16 => w.abs() / 1024.0,
                        _ => w.abs() * f64::from(f32::EPSILON),
                    };
                    if (g - w).abs() > ulp {
                        return Err(format!(
                            "world {world} rank {rank} round {round} ({dtype:?} {op:?}) at {i}: \
                             {g} vs host {w}"
                        ));
                    }
                }
            }
            Ok(())
        })
        .unwrap_or_else(|err| panic!("world {world}: {err}"));
    }
}

/// The operands of one pass may differ in dtype (an f32 running sum and a rank's f16 buffer) and
/// the pass may divide (the last step of a mean): against the reference, fused and unfused.
#[test]
fn mixed_operands_and_divisor_match_the_reference() {
    use burn_fabric::fabric_collective::fused::{Operand, sum_scale_cast};
    let Some(client) = client() else {
        return;
    };
    for len in [5usize, 1031, 4099] {
        let (a, b) = (values(len, 3 + len as u64), values(len, 11 + len as u64));
        let (la, lb) = (
            upload(&client, &a, FloatKind::F32),
            upload(&client, &b, FloatKind::F16),
        );
        for (output, divisor) in [
            (FloatKind::F16, 3.0f32),
            (FloatKind::F32, 3.0),
            (FloatKind::F32, 1.0),
        ] {
            let reference: Vec<f32> = a
                .iter()
                .zip(as_input(&b, FloatKind::F16))
                .map(|(x, y)| {
                    let v = (x + y) / divisor;
                    match output {
                        FloatKind::F16 => f16::from_f32(v).to_f32(),
                        _ => v,
                    }
                })
                .collect();
            let local = Operand {
                handle: &la,
                kind: FloatKind::F32,
            };
            let peer = Operand {
                handle: &lb,
                kind: FloatKind::F16,
            };
            for path in [Path::Fused, Path::Unfused] {
                let out = sum_scale_cast(&client, local, peer, len, output, divisor, path);
                let got = download(&client, out, len, output);
                for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                    let tolerance = match output {
                        FloatKind::F16 => r.abs() / 1024.0,
                        _ => r.abs() * f32::EPSILON,
                    };
                    assert!(
                        (g - r).abs() <= tolerance,
                        "{path:?} f32+f16 -> {output:?} / {divisor} len {len} at {i}: {g} vs {r}"
                    );
                }
            }
        }
    }
}

/// FSDP's exchanges on the engine for ranks sharing the Wgpu device: the all-gather
/// concatenates every rank's buffer in rank order (bit for bit the host engine's, f32 and f16),
/// and each rank's reduce-scatter part equals the host engine's within a rounding of the same
/// f32 sum; a length the world size does not divide is the host engines' typed error, and
/// buffers that differ across ranks are an error on every rank, after which the ranks go on.
#[test]
fn shared_device_engine_gathers_and_reduce_scatters_like_the_host() {
    use burn::tensor::{DType, Tensor, TensorData};
    use burn_fabric::fabric_collective::launcher::{ThreadLaunch, launch_threads};
    use burn_fabric::fabric_collective::shared_device;
    use burn_fabric::fabric_collective::{Collective, ReduceOp};

    let Some(device) = device() else {
        return;
    };
    let world = 3;
    let engine = shared_device::engine::<Wgpu>(&vec![device.clone(); world])
        .expect("ranks sharing a Wgpu device get the fused engine");
    let launch = ThreadLaunch {
        world_size: world,
        first_rank: 0,
        timeout: std::time::Duration::from_secs(60),
        threads_per_rank: None,
    };
    let text = |e: burn_fabric::CollectiveError| e.to_string();
    launch_threads(&launch, |rank, host| {
        let mine = engine.for_rank(rank);
        for (round, (len, dtype)) in [
            (1031, DType::F32),
            (258, DType::F16),
            (3 * 4099, DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let data = TensorData::new(values(len, (10 * round + rank) as u64), [len])
                .convert_dtype(dtype);
            let tensor = Tensor::<Wgpu, 1>::from_data(data.clone(), (&device, dtype));
            let whole = mine
                .all_gather(&host, tensor.clone())
                .map_err(text)?
                .into_data();
            let expected = host.all_gather_flat(data.clone()).map_err(text)?;
            if whole.dtype != dtype || whole.shape.to_vec() != [len * world] {
                return Err(format!(
                    "round {round}: gathered {:?} {:?}",
                    whole.dtype, whole.shape
                ));
            }
            if whole.as_bytes() != expected.as_bytes() {
                return Err(format!(
                    "round {round}: the gathered bytes differ from the host's"
                ));
            }
            if len % world != 0 {
                continue;
            }
            let part = mine
                .reduce_scatter(&host, tensor, ReduceOp::Mean)
                .map_err(text)?
                .into_data();
            let expected = host.reduce_scatter(data, ReduceOp::Mean).map_err(text)?;
            let got: Vec<f64> = part
                .convert::<f64>()
                .to_vec()
                .map_err(|e| format!("{e:?}"))?;
            let want: Vec<f64> = expected
                .convert::<f64>()
                .to_vec()
                .map_err(|e| format!("{e:?}"))?;
            if got.len() != len / world {
                return Err(format!("round {round}: a part of {} elements", got.len()));
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let ulp = match dtype {
                    DType::F16 => w.abs() / 1024.0,
                    _ => w.abs() * f64::from(f32::EPSILON),
                };
                if (g - w).abs() > ulp {
                    return Err(format!("rank {rank} round {round} at {i}: {g} vs host {w}"));
                }
            }
        }
        let odd = Tensor::<Wgpu, 1>::zeros([10], &device);
        match mine.reduce_scatter(&host, odd, ReduceOp::Mean) {
            Err(err) if err.to_string().contains("multiple of the world size 3") => {}
            other => {
                return Err(format!(
                    "a length of 10 over 3 ranks gave {:?}",
                    other.map(|t| t.dims())
                ));
            }
        }
        // Ranks that pass different lengths all get rank 0's error, and stay in step: the
        // next gather is whole.
        let uneven = Tensor::<Wgpu, 1>::zeros([4 + rank], &device);
        match mine.all_gather(&host, uneven) {
            Err(err) if err.to_string().contains("ranks passed different buffers") => {}
            other => {
                return Err(format!(
                    "rank {rank}: uneven buffers gave {:?}",
                    other.map(|t| t.dims())
                ));
            }
        }
        let ones = Tensor::<Wgpu, 1>::ones([2], &device);
        let whole = mine.all_gather(&host, ones).map_err(text)?.into_data();
        match whole.to_vec::<f32>() {
            Ok(values) if values == [1.0; 6] => Ok(()),
            other => Err(format!(
                "rank {rank}: the gather after an error gave {other:?}"
            )),
        }
    })
    .unwrap_or_else(|err| panic!("{err}"));
}
