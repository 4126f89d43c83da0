//! Cases 1-3, 5 and 6: jobs of the `image_classifier` example started through `fabric run`,
//! on two hosts (network namespaces) where the machine allows it.

use super::{files_under, serial, temp_dir};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NAMESPACES: [&str; 2] = ["fabric-fault-h0", "fabric-fault-h1"];
const LINKS: [&str; 2] = ["fabft0", "fabft1"];
const ADDRESSES: [&str; 2] = ["10.231.0.1", "10.231.0.2"];
const SUBNET: &str = "10.231.0.0/24";
/// Training long enough to be interrupted mid-run: 80 epochs of 12 steps.
const EPOCHS: &str = "80";
/// Faults strike once this step's checkpoint exists.
const FAULT_AT_STEP: u64 = 240;
const TIMEOUT: &str = "5s";

fn fabric() -> &'static str {
    env!("CARGO_BIN_EXE_fabric")
}

/// The example, built with the `mpi` feature next to this test binary (run with `--backend
/// flex`, which every build has, whatever other backends it was built with).
fn example() -> PathBuf {
    let path = std::env::var_os("FABRIC_FAULT_EXAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent() // deps
                .and_then(Path::parent) // debug
                .unwrap()
                .join("examples")
                .join("image_classifier")
        });
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --features burn-fabric/mpi,fabric-examples/mpi --example image_classifier)",
        path.display()
    );
    path
}

/// Open MPI's `plm_rsh_agent` for the namespace hosts, written once; `None` on one host.
fn two_hosts() -> Option<&'static Path> {
    static HOSTS: OnceLock<Option<PathBuf>> = OnceLock::new();
    HOSTS
        .get_or_init(|| match make_hosts() {
            Ok(agent) => {
                println!(
                    "fault suite: two hosts, network namespaces {} ({}) and {} ({}) joined by a veth pair; Open MPI over TCP",
                    NAMESPACES[0], ADDRESSES[0], NAMESPACES[1], ADDRESSES[1]
                );
                Some(agent)
            }
            Err(why) => {
                assert!(
                    std::env::var_os("FABRIC_REQUIRE_HOSTS").is_none(),
                    "FABRIC_REQUIRE_HOSTS is set but two hosts cannot be made: {why}"
                );
                println!("fault suite: ONE HOST only (network namespaces unavailable: {why})");
                None
            }
        })
        .as_deref()
}

fn sh(script: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`{script}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Two namespaces, a veth pair between them, and the agent script that runs a command "on" a
/// host by its address.
fn make_hosts() -> Result<PathBuf, String> {
    let [h0, h1] = NAMESPACES;
    let [l0, l1] = LINKS;
    let [a0, a1] = ADDRESSES;
    let _ = sh(&format!(
        "ip netns del {h0} 2>/dev/null; ip netns del {h1} 2>/dev/null"
    ));
    sh(&format!(
        "ip netns add {h0} && ip netns add {h1} && ip link add {l0} type veth peer name {l1} \
         && ip link set {l0} netns {h0} && ip link set {l1} netns {h1} \
         && ip -n {h0} addr add {a0}/24 dev {l0} && ip -n {h1} addr add {a1}/24 dev {l1} \
         && ip -n {h0} link set lo up && ip -n {h1} link set lo up \
         && ip -n {h0} link set {l0} up && ip -n {h1} link set {l1} up \
         && ip netns exec {h0} true"
    ))?;
    let agent = std::env::temp_dir().join(format!("fabric-fault-agent-{}.sh", std::process::id()));
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n# Open MPI's plm_rsh_agent: runs the daemon's command on a host, a network namespace.\n\
             host=$1; shift\ncase \"$host\" in\n  {a0}) ns={h0} ;;\n  {a1}) ns={h1} ;;\n  *) echo \"agent: unknown host $host\" >&2; exit 1 ;;\nesac\n\
             exec ip netns exec \"$ns\" /bin/sh -c \"$*\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    sh(&format!("chmod +x {}", agent.display()))?;
    Ok(agent)
}

/// Kills whatever a case left in the namespaces (a remote daemon cut off from mpirun) and
/// brings the link back up.
fn clean_hosts() {
    if two_hosts().is_some() {
        for ns in NAMESPACES {
            let _ = sh(&format!("ip netns pids {ns} | xargs -r kill -9"));
        }
        let _ = sh(&format!("ip -n {} link set {} up", NAMESPACES[1], LINKS[1]));
    }
}

/// A job started through `fabric run`, its output going to a file.
struct Job {
    child: Child,
    output: PathBuf,
    /// A string only this job's processes have on their command line.
    marker: String,
}

/// Where a job runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    /// 2 processes on the hosts (two namespaces when available).
    Hosts,
    /// 2 processes on this machine.
    OneHost,
}

/// Starts `fabric run --num-nodes 2 FLAGS -- image_classifier ARGS` with `dir` as the
/// checkpoint directory (also the job's marker).
fn start(place: Place, flags: &[&str], dir: &Path, args: &[&str]) -> Job {
    let output = dir.with_extension("out");
    let file = File::create(&output).unwrap();
    let agent = two_hosts().filter(|_| place == Place::Hosts);
    let mut command = match agent {
        Some(_) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", NAMESPACES[0], fabric()]);
            c
        }
        None => Command::new(fabric()),
    };
    command.args(["run", "--num-nodes", "2"]);
    if let Some(agent) = agent {
        command
            .args(["--hosts", &ADDRESSES.join(",")])
            .env("OMPI_MCA_plm_rsh_agent", agent)
            .env("OMPI_MCA_btl", "tcp,self")
            .env("OMPI_MCA_btl_tcp_if_include", SUBNET)
            .env("OMPI_MCA_oob_tcp_if_include", SUBNET);
    }
    command
        .args(flags)
        .arg("--")
        .arg(example())
        .args([
            "--backend",
            "flex",
            "--checkpoint-dir",
            &dir.display().to_string(),
        ])
        .args(args)
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    Job {
        child: command.spawn().unwrap(),
        output,
        marker: dir.display().to_string(),
    }
}

impl Drop for Job {
    /// A case that fails midway must not leave its job running under the next: killing the
    /// launcher sends its mpirun SIGTERM (`fabric run` arranges it), which ends the job.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Job {
    /// Waits at most `limit` for the job to end: its status, how long it took from `since`,
    /// and its output. A job still running after `limit` is killed and the case fails: a hang.
    fn finish(mut self, since: Instant, limit: Duration) -> (ExitStatus, Duration, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = since.elapsed();
                let text = std::fs::read_to_string(&self.output).unwrap_or_default();
                return (status, took, text);
            }
            if since.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                clean_hosts();
                let text = std::fs::read_to_string(&self.output).unwrap_or_default();
                panic!("the job hung: still running after {limit:?}\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The PID of the job's process of MPI rank `rank`.
    fn pid(&self, rank: usize) -> u32 {
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains(&self.marker) {
                continue;
            }
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
                return pid;
            }
        }
        panic!("no process of rank {rank} in the job");
    }

    /// Waits until the checkpoint of step [`FAULT_AT_STEP`] exists (training is under way).
    fn wait_for_training(&mut self, dir: &Path) {
        let started = Instant::now();
        let target = burn_fabric::step_checkpoint(dir, FAULT_AT_STEP);
        while !target.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&self.output).unwrap_or_default();
                panic!("the job ended ({status}) before the fault:\n{text}");
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn signal(pid: u32, signal: &str) {
    sh(&format!("kill -{signal} {pid}")).unwrap();
}

/// The weights of an uninterrupted run: 2 rank threads in one process.
fn reference() -> &'static [u8] {
    static REFERENCE: OnceLock<Vec<u8>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = temp_dir("reference");
        let export = dir.join("model.safetensors");
        let out = Command::new(example())
            .args(["--backend", "flex", "--devices", "2", "--epochs", EPOCHS])
            .arg("--export-safetensors")
            .arg(&export)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read(&export).unwrap()
    })
}

/// Runs a case's faulty job: starts it, applies `fault` to rank 1 once training is under way,
/// and returns the ending and the time from the fault to the end.
fn faulty_job(
    name: &str,
    flags: &[&str],
    limit: Duration,
    fault: impl FnOnce(u32),
) -> (ExitStatus, Duration, String, PathBuf) {
    let dir = temp_dir(name);
    let export = dir.with_extension("safetensors");
    let export_arg = export.display().to_string();
    let mut job = start(
        Place::Hosts,
        flags,
        &dir,
        &[
            "--epochs",
            EPOCHS,
            "--checkpoint-every",
            "40",
            "--export-safetensors",
            &export_arg,
        ],
    );
    job.wait_for_training(&dir);
    let pid = job.pid(1);
    let at = Instant::now();
    fault(pid);
    let (status, took, text) = job.finish(at, limit);
    clean_hosts();
    (status, took, text, export)
}

#[test]
fn case_1_a_killed_process_ends_the_job_and_a_restart_finishes_it_bit_for_bit() {
    let _serial = serial();
    let reference = reference();
    let (status, took, text, _) =
        faulty_job("kill", &[], Duration::from_secs(30), |pid| signal(pid, "9"));
    assert!(!status.success(), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}\n{text}");
    assert!(
        text.contains("process rank 1"),
        "the process is not named:\n{text}"
    );
    println!(
        "fault suite case 1: kill -9 of rank 1's process; the job ended in {took:.1?} (bound 10 s)"
    );

    let (status, took, text, export) = faulty_job(
        "kill-restart",
        &["--max-restarts", "1"],
        Duration::from_secs(120),
        |pid| signal(pid, "9"),
    );
    assert!(status.success(), "{text}");
    assert!(
        text.contains("restarting the whole job (LT_RESTART_COUNT=1)"),
        "{text}"
    );
    assert!(text.contains("resumed from epoch"), "{text}");
    assert!(
        std::fs::read(&export).unwrap() == reference,
        "the restarted job's weights differ from the uninterrupted run's"
    );
    println!(
        "fault suite case 1: with --max-restarts 1 the job restarted, resumed and completed {took:.1?} after the kill; weights equal the uninterrupted run's bit for bit"
    );
}

#[test]
fn case_2_a_stopped_process_is_named_within_the_timeout_and_a_restart_finishes_it() {
    let _serial = serial();
    let reference = reference();
    let flags = ["--collective-timeout", TIMEOUT];
    let (status, took, text, _) = faulty_job("stop", &flags, Duration::from_secs(60), |pid| {
        signal(pid, "STOP")
    });
    assert!(!status.success(), "{text}");
    assert!(took < Duration::from_secs(15), "took {took:?}\n{text}");
    assert!(
        text.contains("process 1 (rank 1) did not answer") && text.contains("in MPI `"),
        "the stalled rank or the operation is not named:\n{text}"
    );
    println!(
        "fault suite case 2: kill -STOP of rank 1's process, 5 s timeout; the job ended in {took:.1?} (bound 15 s)"
    );

    let restart = ["--collective-timeout", TIMEOUT, "--max-restarts", "1"];
    let (status, took, text, export) =
        faulty_job("stop-restart", &restart, Duration::from_secs(120), |pid| {
            signal(pid, "STOP")
        });
    assert!(status.success(), "{text}");
    assert!(text.contains("resumed from epoch"), "{text}");
    assert!(
        std::fs::read(&export).unwrap() == reference,
        "weights differ"
    );
    println!(
        "fault suite case 2: with --max-restarts 1 the job completed {took:.1?} after the stop; weights equal the uninterrupted run's"
    );
}

#[test]
fn case_3_a_link_cut_mid_step_ends_the_job_naming_the_operation() {
    let _serial = serial();
    if two_hosts().is_none() {
        println!("fault suite case 3: skipped, it needs two hosts (one host only here)");
        return;
    }
    let flags = ["--collective-timeout", TIMEOUT];
    // Timeout (5 s, the watchdog 1 s after it), the roll call (2 s), mpirun's grace (5 s).
    let bound = Duration::from_secs(20);
    let (status, took, text, _) = faulty_job("link", &flags, Duration::from_secs(60), |_| {
        sh(&format!(
            "ip -n {} link set {} down",
            NAMESPACES[1], LINKS[1]
        ))
        .unwrap()
    });
    assert!(!status.success(), "{text}");
    assert!(took < bound, "took {took:?}\n{text}");
    assert!(
        text.contains("in MPI `") && text.contains("aborting the job"),
        "the operation is not named:\n{text}"
    );
    println!(
        "fault suite case 3: link between the hosts cut mid-step, 5 s timeout; the job ended in {took:.1?} (bound {bound:?})"
    );
}

#[test]
fn case_5_processes_with_different_settings_fail_at_start() {
    let _serial = serial();
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let example = example().display().to_string();
    for (first, second, needle) in [
        (
            ["--num-nodes=2", "--devices=1"],
            ["--num-nodes=2", "--devices=2"],
            "devices=2",
        ),
        (
            ["--num-nodes=2", "--strategy=ddp"],
            ["--num-nodes=2", "--strategy=zero2"],
            "strategy=zero2",
        ),
        (
            ["--num-nodes=2", "--devices=1"],
            ["--num-nodes=3", "--devices=1"],
            "num_nodes=3",
        ),
    ] {
        // mpirun's `:` gives each process its own command line.
        let mut args = vec!["--oversubscribe", "--bind-to", "none"];
        if root {
            args.push("--allow-run-as-root");
        }
        args.extend(["-np", "1", &example, "--backend", "flex", "--epochs", "1"]);
        args.extend(first);
        args.extend([
            ":",
            "-np",
            "1",
            &example,
            "--backend",
            "flex",
            "--epochs",
            "1",
        ]);
        args.extend(second);
        let (first, second) = (first.join(" "), second.join(" "));
        let started = Instant::now();
        let output =
            std::env::temp_dir().join(format!("fabric-fault-settings-{}.out", std::process::id()));
        let file = File::create(&output).unwrap();
        let job = Job {
            child: Command::new("mpirun")
                .args(&args)
                .stdout(Stdio::from(file.try_clone().unwrap()))
                .stderr(Stdio::from(file))
                .spawn()
                .unwrap(),
            output,
            marker: String::new(),
        };
        let (status, took, text) = job.finish(started, Duration::from_secs(60));
        assert!(!status.success(), "{first} vs {second}: {text}");
        assert!(
            took < Duration::from_secs(30),
            "{first} vs {second}: took {took:?}"
        );
        assert!(
            text.contains("process 1 has `") && text.contains(needle),
            "{first} vs {second}: not named:\n{text}"
        );
        println!(
            "fault suite case 5: {first} in process 0, {second} in process 1: error at start in {took:.1?}"
        );
    }
}

#[test]
fn case_6_identical_runs_write_identical_bytes_on_threads_processes_and_hosts() {
    let _serial = serial();
    let reference = reference();
    let mut runs = Vec::new();
    for (name, place) in [
        ("same-1", Place::Hosts),
        ("same-2", Place::Hosts),
        ("one-host", Place::OneHost),
    ] {
        let dir = temp_dir(name);
        let export = dir.with_extension("safetensors");
        let export_arg = export.display().to_string();
        let job = start(
            place,
            &[],
            &dir,
            &[
                "--epochs",
                EPOCHS,
                "--checkpoint-every",
                "200",
                "--export-safetensors",
                &export_arg,
            ],
        );
        let (status, _, text) = job.finish(Instant::now(), Duration::from_secs(120));
        assert!(status.success(), "{name}: {text}");
        runs.push((dir, std::fs::read(&export).unwrap()));
    }
    // Two identical runs: every checkpoint file and the export, byte for byte.
    let (first, second) = (&runs[0], &runs[1]);
    let files = files_under(&first.0);
    assert!(files.len() >= 4, "{files:?}");
    assert_eq!(files, files_under(&second.0));
    for file in &files {
        assert!(
            std::fs::read(first.0.join(file)).unwrap()
                == std::fs::read(second.0.join(file)).unwrap(),
            "{} differs between identical runs",
            file.display()
        );
    }
    assert!(first.1 == second.1, "the exports of identical runs differ");
    // Threads, processes on one host, processes on two hosts: the same weights.
    assert!(
        runs[2].1 == reference,
        "2 processes on one host differ from 2 threads"
    );
    assert!(
        first.1 == reference,
        "2 processes on the hosts differ from 2 threads"
    );
    let hosts = if two_hosts().is_some() {
        "two hosts"
    } else {
        "one host"
    };
    println!(
        "fault suite case 6: {} checkpoint files and the export byte-identical across identical runs; 2 threads = 2 processes = 2 processes on {hosts}, bit for bit",
        files.len()
    );
}
