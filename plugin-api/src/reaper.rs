//! One thread per plugin library that reaps every guest process its instances
//! watch. It polls their pidfds, so a running guest costs the daemon an fd rather
//! than a thread of its own (a stack, and creating one on every start). Where
//! pidfds are unavailable (Linux before 5.3), each guest gets a thread as before.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::sdk::GuestExit;
use crate::spawn::GuestProcess;
use crate::sys;

/// Called on the reaper thread with how the process ended, once it is reaped.
pub(crate) type OnExit = Box<dyn FnOnce(GuestExit) + Send>;

/// A process being watched.
struct Watched {
    pidfd: OwnedFd,
    process: GuestProcess,
    on_exit: OnExit,
}

/// The watched processes, and the eventfd that tells the thread the set changed.
struct Reaper {
    watched: Mutex<Vec<Watched>>,
    wake: OwnedFd,
}

/// Set up once, on the first watch; `None` when no reaper thread could be had.
static REAPER: OnceLock<Option<&'static Reaper>> = OnceLock::new();

/// Watches `process` until it exits, then reaps it and calls `on_exit`.
pub(crate) fn watch(process: GuestProcess, on_exit: OnExit) -> std::io::Result<()> {
    if let Some(reaper) = REAPER.get_or_init(Reaper::start) {
        if let Ok(pidfd) = sys::pidfd_open(process.pid) {
            reaper
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Watched {
                    pidfd,
                    process,
                    on_exit,
                });
            sys::eventfd_signal(reaper.wake.as_fd());
            return Ok(());
        }
    }
    std::thread::Builder::new()
        .name(format!("reap-{}", process.pid))
        .spawn(move || on_exit(process.wait()))
        .map(|_| ())
}

impl Reaper {
    fn start() -> Option<&'static Self> {
        let wake = sys::eventfd().ok()?;
        // Lives as long as the plugin library, which is never unloaded.
        let reaper: &'static Self = Box::leak(Box::new(Self {
            watched: Mutex::new(Vec::new()),
            wake,
        }));
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.run())
            .ok()?;
        Some(reaper)
    }

    fn run(&self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let pollfd = |fd: std::os::fd::RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            fds.clear();
            fds.push(pollfd(self.wake.as_raw_fd()));
            fds.extend(self.lock().iter().map(|w| pollfd(w.pidfd.as_raw_fd())));
            if sys::poll(&mut fds).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            if fds[0].revents != 0 {
                sys::eventfd_drain(self.wake.as_fd());
            }
            // A pidfd is readable once its process has exited. Only this thread
            // removes entries (and so closes pidfds), so a ready fd number still
            // names the entry it was polled for.
            let ready: Vec<_> = fds[1..]
                .iter()
                .filter(|p| p.revents & libc::POLLIN != 0)
                .map(|p| p.fd)
                .collect();
            if ready.is_empty() {
                continue;
            }
            let exited: Vec<Watched> = {
                let mut watched = self.lock();
                let mut exited = Vec::new();
                let mut i = 0;
                while i < watched.len() {
                    if ready.contains(&watched[i].pidfd.as_raw_fd()) {
                        exited.push(watched.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
                exited
            };
            for w in exited {
                let exit = w.process.wait();
                drop(w.pidfd);
                (w.on_exit)(exit);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watched>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A child for the reaper under test to reap (so never waited for here).
    #[allow(clippy::zombie_processes)]
    fn child(argv: &[&str]) -> GuestProcess {
        let child = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .spawn()
            .expect("spawn");
        GuestProcess::of_child(i32::try_from(child.id()).expect("pid"))
    }

    #[test]
    fn each_watched_child_is_reaped_and_reported_once_with_its_status() {
        let (tx, rx) = mpsc::channel();
        let long = child(&["sleep", "30"]);
        for (code, argv) in [(3, ["sh", "-c", "exit 3"]), (0, ["sh", "-c", "exit 0"])] {
            let tx = tx.clone();
            watch(
                child(&argv),
                Box::new(move |exit| tx.send((code, exit)).unwrap()),
            )
            .unwrap();
        }
        let tx2 = tx.clone();
        watch(long, Box::new(move |exit| tx2.send((-1, exit)).unwrap())).unwrap();
        let mut got: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("reported"))
            .collect();
        got.sort_by_key(|(code, _)| *code);
        assert_eq!(got, [(0, GuestExit::Exited(0)), (3, GuestExit::Exited(3))]);
        // The long one is still watched, not reported; killing it reports it.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        long.signal(libc::SIGKILL).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).expect("reported"),
            (-1, GuestExit::Signaled(libc::SIGKILL))
        );
        // Reaped: no zombie is left under that pid.
        assert!(std::fs::read_to_string(format!("/proc/{}/stat", long.pid)).is_err());
        drop(tx);
    }
}
