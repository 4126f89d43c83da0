//! `fabric run --max-restarts N`: runs the job, and when it fails (any process's failure ends
//! the whole job, through mpirun or the rank threads' error) starts it again, whole and at the
//! same world size, up to N times. Each attempt finds its number in `LT_RESTART_COUNT`, so the
//! program can resume from its newest complete checkpoint. A job stopped by the user (SIGINT,
//! SIGTERM or SIGHUP to the launcher) is not restarted: the signal is passed on to the job (in a
//! process group of its own, so it arrives once), and a second signal, or a job still running
//! [`USER_GRACE`] later, ends it with SIGKILL. If the launcher itself dies, the job gets SIGTERM.
//!
//! Through mpirun, the launcher also watches the job's error output: once a process reports
//! that it is aborting the job (or mpirun that a process failed), mpirun has [`ABORT_GRACE`] to
//! end; after that (mpirun waiting for a host it can no longer reach) the launcher kills it and
//! the processes it started on this machine, so a cut network never hangs the job.

use super::LaunchPlan;
use crate::FabricError;
use fabric_core::config::LT_RESTART_COUNT;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long mpirun may take to end the job after a process aborted it.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// How long the job may take to stop after the user's signal was passed on.
pub const USER_GRACE: Duration = Duration::from_secs(30);

/// Lines on the job's error output that mean the job is ending: burn-fabric's own and mpirun's.
const ABORT_MARKS: [&str; 4] = [
    "aborting the job",
    "MPI_ABORT was invoked",
    "mpirun noticed that process",
    "the job has been aborted",
];

/// How one attempt of the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Every process finished successfully.
    Succeeded,
    /// The job (mpirun, or the one process) exited with this code.
    Exited(i32),
    /// The job's top process was killed by this signal.
    Killed(i32),
    /// The user stopped the launcher with this signal; it was passed on to the job.
    Interrupted(i32),
}

impl Attempt {
    /// The launcher's exit code for this ending (128 + signal for signals, as shells do).
    pub fn exit_code(self) -> u8 {
        match self {
            Attempt::Succeeded => 0,
            Attempt::Exited(code) => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
            Attempt::Killed(signal) | Attempt::Interrupted(signal) => {
                u8::try_from(128 + signal).unwrap_or(1)
            }
        }
    }

    /// Whether another attempt may follow.
    fn restartable(self) -> bool {
        matches!(self, Attempt::Exited(_) | Attempt::Killed(_))
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempt::Succeeded => f.write_str("succeeded"),
            Attempt::Exited(code) => write!(f, "failed with exit code {code}"),
            Attempt::Killed(signal) => write!(f, "was killed by signal {signal}"),
            Attempt::Interrupted(signal) => write!(f, "was stopped by the user (signal {signal})"),
        }
    }
}

/// The first signal the launcher received (0: none), and how many it received.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Atomics are async-signal-safe.
    let _ = INTERRUPTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP, except those the launcher was started to ignore
/// (`nohup`), which the job then ignores too.
fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches atomics; restoring SIG_IGN is plain `signal`.
        unsafe {
            let previous = libc::signal(
                signal,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
            if previous == libc::SIG_IGN {
                libc::signal(signal, libc::SIG_IGN);
            }
        }
    }
}

/// Makes the job's top process receive SIGTERM when the launcher dies (Linux), so that a killed
/// launcher does not leave the job running unseen in its own process group.
fn end_with_the_launcher(command: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Runs `plan` until an attempt succeeds, the user stops it, or `max_restarts` restarts are
/// spent, printing on stderr why each failed attempt ended. Returns every attempt's ending, in
/// order; an error if the program cannot be started at all.
pub fn supervise(plan: &LaunchPlan, max_restarts: usize) -> Result<Vec<Attempt>, FabricError> {
    catch_signals();
    let attempts_allowed = max_restarts + 1;
    let mut attempts = Vec::new();
    for restart in 0..attempts_allowed {
        if let signal @ 1.. = INTERRUPTED.load(Ordering::SeqCst) {
            // Stopped between two attempts: start no other.
            attempts.push(Attempt::Interrupted(signal));
            break;
        }
        let mut command = Command::new(&plan.program);
        command
            .args(&plan.args)
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .env(LT_RESTART_COUNT, restart.to_string());
        // A process group of its own: the user's signal arrives once (passed on), and a hung
        // job can be ended with everything it started on this machine.
        command.process_group(0);
        end_with_the_launcher(&mut command);
        if plan.through_mpirun {
            command.stderr(Stdio::piped());
        }
        let mut child = command.spawn().map_err(|e| FabricError::InvalidArgument {
            name: "program",
            value: plan.program.clone(),
            reason: format!("cannot be started: {e}"),
        })?;
        let aborted = watch_for_abort(&mut child);
        let attempt = wait(child, &aborted)?;
        attempts.push(attempt);
        if !attempt.restartable() {
            break;
        }
        let number = restart + 1;
        if number < attempts_allowed {
            eprintln!(
                "fabric run: attempt {number} of {attempts_allowed} {attempt}; restarting the whole job ({LT_RESTART_COUNT}={number})"
            );
        } else if max_restarts > 0 {
            eprintln!(
                "fabric run: attempt {number} of {attempts_allowed} {attempt}; no restarts left (--max-restarts {max_restarts})"
            );
        } else {
            eprintln!("fabric run: `{}` {attempt}", plan.program);
        }
    }
    Ok(attempts)
}

/// When a line of the job's error output first said it is aborting; copies that output to the
/// launcher's own meanwhile.
type Aborted = Arc<Mutex<Option<Instant>>>;

fn watch_for_abort(child: &mut Child) -> Aborted {
    let aborted: Aborted = Arc::default();
    if let Some(stderr) = child.stderr.take() {
        let seen = Arc::clone(&aborted);
        std::thread::spawn(move || {
            // Bytes, not text: a line that is not UTF-8 must neither stop the copying (mpirun
            // would then die writing to a closed pipe) nor be lost.
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let _ = std::io::stderr().lock().write_all(&line);
                let text = String::from_utf8_lossy(&line);
                if ABORT_MARKS.iter().any(|mark| text.contains(mark)) {
                    let mut when = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    when.get_or_insert_with(Instant::now);
                }
                line.clear();
            }
        });
    }
    aborted
}

/// Waits for the job, passing on a signal the launcher receives meanwhile, and ending with
/// SIGKILL (its whole process group) a job that outlives its grace: [`ABORT_GRACE`] after it
/// aborted, [`USER_GRACE`] after the user's signal, or at once on a second signal.
fn wait(mut child: Child, aborted: &Aborted) -> Result<Attempt, FabricError> {
    let group = libc::pid_t::try_from(child.id()).ok();
    let signal_group = |signal: libc::c_int| {
        if let Some(group) = group {
            // SAFETY: signalling the process group our child leads.
            unsafe {
                libc::kill(-group, signal);
            }
        }
    };
    let mut passed_on: Option<Instant> = None;
    let mut killed = false;
    loop {
        let status = child.try_wait().map_err(|e| FabricError::InvalidArgument {
            name: "program",
            value: format!("process {}", child.id()),
            reason: format!("cannot be waited for: {e}"),
        })?;
        let signal = INTERRUPTED.load(Ordering::SeqCst);
        if let Some(status) = status {
            return Ok(match (signal, status.code(), status.signal()) {
                (0, Some(0), _) => Attempt::Succeeded,
                (0, Some(code), _) => Attempt::Exited(code),
                (0, None, Some(killed)) => Attempt::Killed(killed),
                (0, None, None) => Attempt::Exited(1),
                (signal, ..) => Attempt::Interrupted(signal),
            });
        }
        if signal != 0 && passed_on.is_none() {
            passed_on = Some(Instant::now());
            if let Some(pid) = group {
                // SAFETY: signalling our own child, which has not been reaped yet.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
        }
        let aborted_at = *aborted.lock().unwrap_or_else(PoisonError::into_inner);
        let reason = match (aborted_at, passed_on) {
            _ if killed => None,
            (_, Some(_)) if SIGNALS.load(Ordering::SeqCst) > 1 => Some("a second signal".into()),
            (_, Some(at)) if at.elapsed() > USER_GRACE => {
                Some(format!("still running {USER_GRACE:?} after the signal"))
            }
            (Some(at), _) if at.elapsed() > ABORT_GRACE => Some(format!(
                "the job aborted {:.1?} ago but mpirun has not ended it (a host it cannot reach?)",
                at.elapsed()
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            killed = true;
            eprintln!("fabric run: {reason}; killing the job and what it started on this machine");
            signal_group(libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> LaunchPlan {
        LaunchPlan {
            env: vec![("LT_RESTART_COUNT".into(), "0".into())],
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            through_mpirun: false,
        }
    }

    #[test]
    fn a_failed_job_is_restarted_with_its_attempt_number_until_it_succeeds() {
        // Fails on attempts 0 and 1, succeeds on attempt 2.
        let plan = shell(r#"test "$LT_RESTART_COUNT" = 2 || exit 7"#);
        assert_eq!(
            supervise(&plan, 5).unwrap(),
            vec![Attempt::Exited(7), Attempt::Exited(7), Attempt::Succeeded]
        );
        // Without restarts the first failure is final.
        assert_eq!(supervise(&plan, 0).unwrap(), vec![Attempt::Exited(7)]);
    }

    #[test]
    fn restarts_are_bounded_and_a_killed_job_counts_as_failed() {
        let plan = shell("kill -9 $$");
        let attempts = supervise(&plan, 2).unwrap();
        assert_eq!(attempts, vec![Attempt::Killed(9); 3]);
        assert_eq!(attempts[2].exit_code(), 137);
        assert_eq!(Attempt::Exited(3).exit_code(), 3);
        assert_eq!(Attempt::Exited(256).exit_code(), 1);
    }

    #[test]
    fn an_aborted_job_that_does_not_end_is_killed_after_the_grace_period() {
        // Stands in for an mpirun that waits forever for a host cut off from it.
        let mut plan =
            shell("echo 'burn-fabric: rank 0 waited 5s; aborting the job' >&2; sleep 60");
        plan.through_mpirun = true;
        let started = Instant::now();
        let attempts = supervise(&plan, 0).unwrap();
        assert_eq!(attempts, vec![Attempt::Killed(libc::SIGKILL)]);
        let took = started.elapsed();
        assert!(
            took >= ABORT_GRACE && took < ABORT_GRACE * 4,
            "took {took:?}"
        );
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error_naming_it() {
        let mut plan = shell("true");
        plan.program = "/nonexistent/trainer".into();
        let err = supervise(&plan, 3).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/trainer"), "{err}");
    }
}
