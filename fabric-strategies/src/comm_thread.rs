//! A rank's communication thread: collectives run there, one after another in the order they
//! were handed over, while the rank's own thread computes (DDP's overlapped buckets, FSDP's
//! gathers and scatters).
//!
//! Every rank hands over the same collectives in the same order, so the threads of the ranks
//! meet in the same sequence; a rank must not run a collective of its own while the thread
//! still has work from it (wait for what it handed over first, or use [`CommThread::call`]).

use fabric_core::CollectiveError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

/// One job for the thread.
type Job = Box<dyn FnOnce() + Send>;

/// The thread (`fabric-comm-<rank>`), started at the first job.
pub struct CommThread {
    rank: usize,
    jobs: Mutex<Option<Sender<Job>>>,
    /// Jobs handed over and not finished.
    busy: Arc<AtomicUsize>,
}

impl CommThread {
    /// The communication thread of `rank` (not started yet).
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            jobs: Mutex::new(None),
            busy: Arc::default(),
        }
    }

    /// Runs `job` on the thread after the jobs handed over before it; the receiver gets its
    /// result. A thread that could not start or stopped drops the job: the receiver then gets
    /// an error.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        self.hand_over(&mut jobs, job)
    }

    /// `job`'s result, after the jobs handed over before it: run here and now when the thread
    /// has none (no hand-over to pay), otherwise on the thread after them. `None` when the
    /// thread stopped before running it.
    pub fn call<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if self.busy.load(Ordering::Acquire) == 0 {
            // Nothing can be handed over while the lock is held: the job runs alone.
            return Some(job());
        }
        let result = self.hand_over(&mut jobs, job);
        drop(jobs);
        result.recv().ok()
    }

    /// Returns once the thread has run every job handed over so far.
    pub fn wait_idle(&self) {
        self.call(|| ());
    }

    fn hand_over<T: Send + 'static>(
        &self,
        jobs: &mut Option<Sender<Job>>,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Receiver<T> {
        let (result, receiver) = sync_channel(1);
        self.busy.fetch_add(1, Ordering::AcqRel);
        // Counts the job finished when it is dropped: run, panicked or never run.
        let pending = Pending(Arc::clone(&self.busy));
        let job: Job = Box::new(move || {
            let done = job();
            drop(pending);
            // The waiter may have given up: nothing to tell then.
            result.send(done).ok();
        });
        let sender = jobs.get_or_insert_with(|| self.start());
        if let Err(returned) = sender.send(job) {
            // The thread is gone (a job panicked): a new one runs this job.
            let sender = jobs.insert(self.start());
            // Without a thread at all the job is dropped: the receiver gets an error.
            sender.send(returned.0).ok();
        }
        receiver
    }

    fn start(&self) -> Sender<Job> {
        let (jobs, inbox) = channel::<Job>();
        // Without a thread the inbox is dropped here and every send fails.
        std::thread::Builder::new()
            .name(format!("fabric-comm-{}", self.rank))
            .spawn(move || {
                for job in inbox {
                    job();
                }
            })
            .ok();
        jobs
    }
}

/// The error of a collective `operation` of `engine` on `rank` that a communication thread
/// dropped (it stopped, or could not start).
pub(crate) fn stopped(
    rank: usize,
    engine: &'static str,
    operation: &'static str,
) -> CollectiveError {
    CollectiveError::Engine {
        rank,
        engine,
        operation,
        message: "the communication thread stopped".into(),
    }
}

/// A job handed over and not finished yet.
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_on_one_named_thread() {
        let comm = CommThread::new(3);
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let waits: Vec<_> = (0..5)
            .map(|i| {
                let log = log.clone();
                comm.run(move || {
                    let name = std::thread::current().name().map(str::to_owned);
                    log.lock().unwrap().push(i);
                    name
                })
            })
            .collect();
        for wait in waits {
            assert_eq!(wait.recv().unwrap().as_deref(), Some("fabric-comm-3"));
        }
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_call_runs_here_when_the_thread_is_idle_and_after_its_jobs_otherwise() {
        let comm = Arc::new(CommThread::new(1));
        let here = std::thread::current().id();
        assert_eq!(
            comm.call(move || std::thread::current().id() == here),
            Some(true)
        );
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let log = Arc::new(Mutex::new(Vec::new()));
        let first = {
            let log = log.clone();
            comm.run(move || {
                gate.recv().ok();
                log.lock().unwrap().push("first");
            })
        };
        let waiter = {
            let (log, comm) = (log.clone(), comm.clone());
            std::thread::spawn(move || {
                comm.call(move || {
                    log.lock().unwrap().push("call");
                    std::thread::current().name().map(str::to_owned)
                })
            })
        };
        // The call is queued behind the blocked job before that job is let go.
        while comm.busy.load(Ordering::Acquire) < 2 {
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        first.recv().unwrap();
        let ran_on = waiter.join().unwrap();
        assert_eq!(ran_on.flatten().as_deref(), Some("fabric-comm-1"));
        assert_eq!(*log.lock().unwrap(), ["first", "call"]);
        // Idle again: back to running here.
        assert_eq!(
            comm.call(move || std::thread::current().id() == here),
            Some(true)
        );
    }

    #[test]
    fn a_job_that_panics_shows_as_an_error_and_the_next_job_runs() {
        let comm = CommThread::new(0);
        let failed = comm.run(|| -> u8 { panic!("collective broke") });
        assert!(failed.recv().is_err());
        // The thread died with the job (a job handed over while it unwinds is lost with it);
        // a job handed over after that starts a new thread.
        let answer = (0..100).find_map(|_| comm.run(|| 42).recv().ok());
        assert_eq!(answer, Some(42));
    }
}
