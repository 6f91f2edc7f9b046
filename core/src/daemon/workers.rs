//! The threads plugin calls run on.
//!
//! A plugin call may block for as long as a container takes to boot, or forever
//! (the activation timeout abandons it), so every call gets a thread of its own
//! whenever none is idle. A thread whose call returned waits a while for the next
//! one instead of exiting: a start then wakes a thread that exists rather than
//! creating one (stack mapping, page faults, clone), which is most of a start's
//! cost on the event loop and, in a herd of starts, CPU the guests need.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A plugin call to run.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for another call before it exits.
const IDLE_LINGER: Duration = Duration::from_secs(10);

/// Runs jobs on threads of their own, reusing idle ones.
#[derive(Debug, Default)]
pub(super) struct Workers {
    idle: Arc<Idle>,
}

/// The threads waiting for a call, each by the id and sending end of its channel.
#[derive(Default)]
struct Idle {
    threads: Mutex<Vec<(u64, Sender<Job>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").finish_non_exhaustive()
    }
}

impl Idle {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Sender<Job>)>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Workers {
    /// Runs `job` now: on an idle thread if there is one, else on a new thread.
    pub(super) fn run(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut job: Job = Box::new(job);
        // Taken off the idle list under the lock, the thread is promised this job:
        // it no longer exits on its own (see `work`).
        while let Some((_, thread)) = self.idle.lock().pop() {
            match thread.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(back)) => job = back,
            }
        }
        let (sender, receiver) = mpsc::channel();
        let id = self
            .idle
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let idle = Arc::clone(&self.idle);
        std::thread::Builder::new()
            .name("plugin-call".into())
            .spawn(move || work(job, id, &sender, &receiver, &idle))?;
        Ok(())
    }

    /// Threads now waiting for a call (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A worker thread: runs its first job, then each job sent to it while it is on
/// the idle list, until none comes for `IDLE_LINGER`.
fn work(first: Job, id: u64, sender: &Sender<Job>, receiver: &Receiver<Job>, idle: &Idle) {
    let mut job = first;
    loop {
        job();
        idle.lock().push((id, sender.clone()));
        job = match receiver.recv_timeout(IDLE_LINGER) {
            Ok(next) => next,
            Err(RecvTimeoutError::Timeout) => {
                let mut threads = idle.lock();
                if let Some(at) = threads.iter().position(|(t, _)| *t == id) {
                    threads.swap_remove(at);
                    return;
                }
                drop(threads);
                // Taken off the list meanwhile: a job is on its way.
                match receiver.recv() {
                    Ok(next) => next,
                    Err(_) => return,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_thread_whose_call_returned_takes_the_next_call() {
        let workers = Workers::default();
        let (tx, rx) = mpsc::channel();
        let first = tx.clone();
        workers
            .run(move || first.send(std::thread::current().id()).unwrap())
            .unwrap();
        let a = rx.recv().unwrap();
        // Wait until that thread is idle again, then the next call reuses it.
        while workers.idle() == 0 {
            std::thread::yield_now();
        }
        workers
            .run(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), a);
    }

    #[test]
    fn a_call_that_blocks_does_not_hold_up_the_next() {
        let workers = Workers::default();
        let (release, blocked) = mpsc::channel::<()>();
        workers
            .run(move || {
                let _ = blocked.recv();
            })
            .unwrap();
        let (tx, rx) = mpsc::channel();
        workers.run(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the second call ran while the first blocked");
        release.send(()).unwrap();
    }
}
