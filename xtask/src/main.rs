//! `cargo xtask bench [--quick] [--fused wgpu|cuda]`: runs burn-fabric's benchmarks and prints
//! one Markdown table of ratios, each measured side by side in one run; writes
//! `target/bench/results.json`, `target/bench/ratios.svg` and `target/bench/BENCHMARKS.md`.
//!
//! * `paired`: plain Burn vs Fabric on one device vs Fabric DDP on two (overhead, DDP
//!   efficiency).
//! * `precision`: each precision plugin's step time ÷ `32-true`'s.
//! * `zero`: optimizer-state bytes per rank under ZeRO ÷ DDP's, and step time ÷ DDP's.
//! * `fsdp`: FSDP's step time ÷ DDP's at 2 ranks; and (when `mpirun` is installed) the peak
//!   memory of each process of DDP, zero2 and FSDP jobs started by `fabric run` ([`memory`]).
//! * `collective` (Criterion): the in-process all-reduce of 10M f32 ÷ a 40 MB memcpy.
//! * `mpi_all_reduce` (when `mpirun` is installed): burn-fabric ÷ raw rsmpi across 2 processes.
//! * `fused` (with `--fused wgpu` or `--fused cuda`): the fused all-reduce-and-cast kernel ÷ the
//!   unfused path.
//! * `peer`: samples/s ours ÷ Lightning Fabric's (`benches/peers/lightning_mlp.py`, run when a
//!   Python with torch and lightning is found) on 1 device and as 2-rank DDP.
//! * the `language_model` example (small preset): tokens/s ours ÷ Lightning Fabric's
//!   (`benches/peers/lightning_lm.py`) on 1 device and as 2-rank DDP.
//! * `training` (Criterion, not with `--quick`): the per-step times behind the ratios.

mod chart;
mod memory;
mod peer;
#[path = "../../benches/src/report.rs"]
#[allow(dead_code)]
mod report;
mod rows;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(about = "burn-fabric project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the benchmarks; print the ratios as a Markdown table and write them as JSON, SVG and
    /// BENCHMARKS.md under target/bench/.
    Bench {
        /// A reduced run of every benchmark (under 5 minutes on 2 cores, once built).
        #[arg(long)]
        quick: bool,
        /// Also time the fused all-reduce-and-cast kernel on this CubeCL runtime (builds the
        /// Wgpu or Cuda stack; Wgpu runs on Mesa's lavapipe without a GPU).
        #[arg(long, value_enum)]
        fused: Option<Runtime>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Runtime {
    Wgpu,
    Cuda,
}

impl Runtime {
    fn feature(self) -> &'static str {
        match self {
            Runtime::Wgpu => "wgpu",
            Runtime::Cuda => "cuda",
        }
    }
}

/// Why `cargo xtask bench` stopped.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("could not run {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("benchmark `{bench}` failed with {status}")]
    Bench {
        bench: String,
        status: std::process::ExitStatus,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where cargo builds: `CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `cargo ARGS` in the workspace (with `envs` set); `what` names it in errors.
fn cargo(args: &[&str], envs: &[(&str, &Path)], what: &str) -> Result<(), Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .envs(envs.iter().copied())
        .status()
        .map_err(|source| Error::Spawn {
            what: format!("cargo {}", args.join(" ")),
            source,
        })?;
    match status.success() {
        true => Ok(()),
        false => Err(Error::Bench {
            bench: what.into(),
            status,
        }),
    }
}

/// `cargo bench -p fabric-benches --bench NAME [--features F] -- ARGS`, with the row directory
/// in `FABRIC_BENCH_OUT`.
fn cargo_bench(
    bench: &str,
    features: Option<&str>,
    args: &[&str],
    rows: &Path,
) -> Result<(), Error> {
    let mut command = vec!["bench", "-p", "fabric-benches", "--bench", bench];
    if let Some(features) = features {
        command.extend(["--features", features]);
    }
    if !args.is_empty() {
        command.push("--");
        command.extend(args);
    }
    cargo(&command, &[("FABRIC_BENCH_OUT", rows)], bench)
}

/// Criterion's median estimate of one benchmark function, in nanoseconds.
fn criterion_median(group: &str, function: &str) -> Option<f64> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The date and the facts of this machine, for the report's header.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or("unknown".into(), |s| s.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    serde_json::json!({
        "date": command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "cpu": cpu,
        "logical_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": memory_gib,
        "os": command_line("uname", &["-sr"]),
        "rustc": command_line("rustc", &["-V"]),
    })
}

fn bench(quick: bool, fused: Option<Runtime>) -> Result<(), Error> {
    let out = target_dir().join("bench");
    let rows_dir = out.join("rows");
    if rows_dir.exists() {
        std::fs::remove_dir_all(&rows_dir).map_err(io(&rows_dir))?;
    }
    std::fs::create_dir_all(&rows_dir).map_err(io(&rows_dir))?;
    let quick_arg: &[&str] = if quick { &["--quick"] } else { &[] };
    let mut skipped = Vec::new();

    cargo_bench("paired", None, quick_arg, &rows_dir)?;
    cargo_bench("precision", None, quick_arg, &rows_dir)?;
    cargo_bench("zero", None, quick_arg, &rows_dir)?;
    cargo_bench("fsdp", None, quick_arg, &rows_dir)?;
    let memory_rows = memory::rows(quick, &mut skipped)?;
    report::record_json_in(&rows_dir, "fsdp_memory", &memory_rows);
    let criterion_args: &[&str] = if quick {
        &["--warm-up-time", "1", "--measurement-time", "3"]
    } else {
        &[]
    };
    cargo_bench("collective", None, criterion_args, &rows_dir)?;
    let group = "all_reduce_10m_f32";
    match (
        criterion_median(group, "in_process_2_ranks"),
        criterion_median(group, "memcpy_40mb"),
    ) {
        (Some(ours), Some(copy)) => report::record_json_in(
            &rows_dir,
            "collective",
            &[report::Row::single(
                "Collective",
                "all-reduce of 10M f32, 2 ranks in-process ÷ 40 MB memcpy (time)",
                ours / copy,
                None,
                "Criterion medians of one run".into(),
            )],
        ),
        _ => skipped.push("collective row: Criterion's estimates were not found".to_string()),
    }
    if command_line("mpirun", &["--version"]).is_some() {
        cargo_bench("mpi_all_reduce", Some("mpi"), quick_arg, &rows_dir)?;
    } else {
        skipped.push(
            "MPI row: mpirun not found (install Open MPI: libopenmpi-dev openmpi-bin libclang-dev)"
                .into(),
        );
    }
    match fused {
        Some(runtime) => cargo_bench("fused", Some(runtime.feature()), quick_arg, &rows_dir)?,
        None => skipped.push(
            "fused-kernel rows: not run; `cargo xtask bench --fused wgpu` (Mesa's lavapipe without a GPU) or `--fused cuda`"
                .into(),
        ),
    }
    peer_rows(quick, &rows_dir, &mut skipped)?;
    language_model_peer_rows(quick, &rows_dir, &mut skipped)?;
    if !quick {
        cargo_bench("training", None, &[], &rows_dir)?;
    }

    let rows = rows::read_dir(&rows_dir);
    let table = rows::markdown(&rows);
    let machine = machine();
    println!("\n{table}");
    for note in &skipped {
        println!("- {note}");
    }

    let results =
        serde_json::json!({ "machine": machine, "quick": quick, "rows": rows, "skipped": skipped });
    let json_path = out.join("results.json");
    let json = serde_json::to_vec_pretty(&results).unwrap_or_default();
    std::fs::write(&json_path, json).map_err(io(&json_path))?;
    let svg_path = out.join("ratios.svg");
    let title = format!(
        "burn-fabric ratios, {} ({})",
        machine["date"].as_str().unwrap_or(""),
        machine["cpu"].as_str().unwrap_or("")
    );
    std::fs::write(&svg_path, chart::svg(&title, &rows)).map_err(io(&svg_path))?;
    let md_path = out.join("BENCHMARKS.md");
    std::fs::write(
        &md_path,
        benchmarks_md(&machine, quick, &rows, &table, &skipped),
    )
    .map_err(io(&md_path))?;
    println!(
        "\nwrote {}, {} and {}",
        json_path.display(),
        svg_path.display(),
        md_path.display()
    );
    Ok(())
}

/// Runs our side (the `peer` bench, one round at a time) and the Lightning script in
/// alternating rounds, adding the ratio rows; without torch and lightning, notes how to get them.
fn peer_rows(quick: bool, rows_dir: &Path, skipped: &mut Vec<String>) -> Result<(), Error> {
    let python = peer::python();
    if !peer::available(&python) {
        println!("{}", peer::INSTALL_HINT);
        skipped.push(peer::INSTALL_HINT.into());
        // Ours alone still prints its samples/s.
        return cargo_bench(
            "peer",
            std::env::var_os("LIBTORCH").map(|_| "tch"),
            if quick { &["--quick"] } else { &[] },
            rows_dir,
        );
    }
    let script = workspace_root().join("benches/peers/lightning_mlp.py");
    // Ours on LibTorch too when a libtorch is there to build against.
    let features = std::env::var_os("LIBTORCH").map(|_| "tch");
    if features.is_none() {
        skipped.push(
            "peer rows on LibTorch: not run; set LIBTORCH (and LD_LIBRARY_PATH=$LIBTORCH/lib) to a libtorch 2.9.0, e.g. one `.ci/libtorch.sh DIR` assembles".into(),
        );
    }
    let (steps, rounds) = if quick { (15, 2) } else { (40, 3) };
    // Both sides time the same number of steps.
    let steps_arg = steps.to_string();
    let ours_args = ["--steps", steps_arg.as_str(), "--rounds", "1"];
    let mut measured = Vec::new();
    for round in 0..rounds {
        let mut theirs = Vec::new();
        let mut run_theirs = |theirs: &mut Vec<(usize, f64)>| {
            for devices in [1, 2] {
                let args = [format!("--devices={devices}"), format!("--steps={steps}")];
                match peer::lightning(&python, &script, &args, "samples_per_second") {
                    Ok(value) => theirs.push((devices, value)),
                    Err(err) => skipped.push(format!("peer, {devices} device(s): {err}")),
                }
            }
        };
        // Alternate which side goes first.
        if round % 2 == 1 {
            run_theirs(&mut theirs);
        }
        cargo_bench("peer", features, &ours_args, rows_dir)?;
        if round % 2 == 0 {
            run_theirs(&mut theirs);
        }
        let ours: Vec<peer::Throughput> = std::fs::read(rows_dir.join("peer_ours.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        for (devices, their) in theirs {
            for our in ours.iter().filter(|o| o.devices == devices) {
                println!(
                    "peer round {}: {devices} device(s): ours on {} {:.0}, Lightning Fabric {their:.0} samples/s",
                    round + 1,
                    our.backend,
                    our.samples_per_second
                );
                measured.push(peer::Round {
                    backend: our.backend.clone(),
                    devices,
                    ours: our.samples_per_second,
                    theirs: their,
                });
            }
        }
    }
    let note = format!(
        "MLP 784-1024-1024-10, synthetic data, Adam (ours: FusedAdam), global batch 128, {steps} timed steps"
    );
    report::record_json_in(rows_dir, "peer", &peer::rows(&peer::MLP, &measured, &note));
    Ok(())
}

/// The `language_model` example (small preset) against `benches/peers/lightning_lm.py`, in
/// alternating rounds, on 1 device and as 2-rank DDP: tokens/s ours ÷ theirs.
fn language_model_peer_rows(
    quick: bool,
    rows_dir: &Path,
    skipped: &mut Vec<String>,
) -> Result<(), Error> {
    let python = peer::python();
    if !peer::available(&python) {
        skipped.push(format!("language-model {}", peer::INSTALL_HINT));
        return Ok(());
    }
    // Ours on LibTorch too when a libtorch is there to build against.
    let mut build = vec!["build", "--release", "-p", "fabric-examples"];
    build.extend(["--example", "language_model"]);
    let backends: &[&str] = match std::env::var_os("LIBTORCH") {
        Some(_) => {
            build.extend(["--features", "tch"]);
            &["flex", "tch"]
        }
        None => {
            skipped.push("language-model peer rows on LibTorch: not run; set LIBTORCH".into());
            &["flex"]
        }
    };
    cargo(&build, &[], "language_model (build)")?;
    let example = target_dir().join("release/examples/language_model");
    let script = workspace_root().join("benches/peers/lightning_lm.py");
    let (steps, rounds, batch) = (if quick { 10 } else { 30 }, if quick { 1 } else { 3 }, 16);
    let shared = |devices: usize| {
        vec![
            format!("--devices={devices}"),
            format!("--batch-size={batch}"),
            "--size=small".to_string(),
        ]
    };
    let ours = |backend: &str, devices: usize| -> Result<f64, String> {
        let strategy = if devices > 1 { "ddp" } else { "auto" };
        let output = Command::new(&example)
            .args(shared(devices))
            .args([
                "--backend",
                backend,
                "--strategy",
                strategy,
                "--epochs",
                "1",
            ])
            .args(["--val-blocks", "1", "--sample-chars", "0"])
            .arg(format!("--steps-per-epoch={steps}"))
            .output()
            .map_err(|e| format!("could not run {}: {e}", example.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        peer::tokens_per_second(&stdout).ok_or_else(|| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().last().unwrap_or("");
            format!(
                "language_model printed no tokens/s ({}): {last}",
                output.status
            )
        })
    };
    let theirs = |devices: usize| {
        let mut args = shared(devices);
        args.push(format!("--steps={steps}"));
        peer::lightning(&python, &script, &args, "tokens_per_second")
    };
    let mut measured = Vec::new();
    for round in 0..rounds {
        for devices in [1, 2] {
            for &backend in backends {
                // Alternate which side goes first.
                let pair = match round % 2 {
                    0 => ours(backend, devices).and_then(|o| Ok((o, theirs(devices)?))),
                    _ => theirs(devices).and_then(|t| Ok((ours(backend, devices)?, t))),
                };
                let (ours, theirs) = match pair {
                    Ok(pair) => pair,
                    Err(err) => {
                        skipped.push(format!(
                            "language-model peer, {devices} device(s), ours on {backend}: {err}"
                        ));
                        continue;
                    }
                };
                println!(
                    "language-model peer round {}: {devices} device(s): ours on {backend} {ours:.0}, Lightning Fabric {theirs:.0} tokens/s",
                    round + 1
                );
                let backend = backend.to_string();
                measured.push(peer::Round {
                    backend,
                    devices,
                    ours,
                    theirs,
                });
            }
        }
    }
    let note = format!(
        "language_model --size small (3.2M parameters, block 128) on Pride and Prejudice, batch \
         {batch} per rank, AdamW (theirs fused=True; no torch.compile), clipping at 1, {steps} steps \
         timed end to end as the example does"
    );
    let rows = peer::rows(&peer::LANGUAGE_MODEL, &measured, &note);
    report::record_json_in(rows_dir, "peer_language_model", &rows);
    Ok(())
}

/// The text of BENCHMARKS.md.
fn benchmarks_md(
    machine: &serde_json::Value,
    quick: bool,
    rows: &[rows::Row],
    table: &str,
    skipped: &[String],
) -> String {
    let field = |key: &str| match &machine[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "unknown".into(),
        other => other.to_string(),
    };
    let mut text = format!(
        "# Benchmarks\n\nProduced by `cargo xtask bench{}` on {}.\n\n\
         Machine: {} ({} logical CPUs), {} GiB memory, {}; {}.\n\n\
         Every ratio is measured side by side in one run (rounds that alternate the compared \
         runs, rotating which goes first); the median is the median of the per-round ratios and \
         the range their spread. The chart is `target/bench/ratios.svg`, the numbers \
         `target/bench/results.json`.\n\n{table}\n",
        if quick { " --quick" } else { "" },
        field("date"),
        field("cpu"),
        field("logical_cpus"),
        field("memory_gib"),
        field("os"),
        field("rustc"),
    );
    text.push_str("## How each row was measured\n\n");
    for row in rows {
        text.push_str(&format!("- {} — {}: {}\n", row.section, row.name, row.note));
    }
    if !skipped.is_empty() {
        text.push_str("\n## Not measured in this run\n\n");
        for note in skipped {
            text.push_str(&format!("- {note}\n"));
        }
    }
    text
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Bench { quick, fused } => bench(quick, fused),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}
