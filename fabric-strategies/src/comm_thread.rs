//! A rank's communication thread: collectives run there, one after another in the order they
//! were handed over, while the rank's own thread computes (DDP's overlapped buckets, FSDP's
//! gathers and scatters).
//!
//! Every rank hands over the same collectives in the same order, so the threads of the ranks
//! meet in the same sequence; a rank must not run a collective of its own while the thread
//! still has work from it (wait for what it handed over first).

use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Mutex, PoisonError};

/// One job for the thread.
type Job = Box<dyn FnOnce() + Send>;

/// The thread (`fabric-comm-<rank>`), started at the first job.
pub struct CommThread {
    rank: usize,
    jobs: Mutex<Option<Sender<Job>>>,
}

impl CommThread {
    /// The communication thread of `rank` (not started yet).
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            jobs: Mutex::new(None),
        }
    }

    /// Runs `job` on the thread after the jobs handed over before it; the receiver gets its
    /// result. A thread that could not start or stopped drops the job: the receiver then gets
    /// an error.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
        let (result, receiver) = sync_channel(1);
        let job: Job = Box::new(move || {
            // The waiter may have given up: nothing to tell then.
            result.send(job()).ok();
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = jobs.get_or_insert_with(|| self.start());
        if let Err(returned) = sender.send(job) {
            // The thread is gone; the next job starts another.
            *jobs = None;
            drop(returned);
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
    fn a_job_that_panics_shows_as_an_error_and_the_next_job_runs() {
        let comm = CommThread::new(0);
        let failed = comm.run(|| -> u8 { panic!("collective broke") });
        assert!(failed.recv().is_err());
        // The thread died with the job: the next one starts a new thread.
        let mut answer = comm.run(|| 42).recv();
        if answer.is_err() {
            answer = comm.run(|| 42).recv();
        }
        assert_eq!(answer, Ok(42));
    }
}
