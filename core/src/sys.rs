//! The daemon's own raw syscalls, fenced here.

use std::io;
use std::os::fd::RawFd;

/// Places `fds` at 3, 4, … without CLOEXEC, for the image about to be exec'd;
/// every other fd keeps its CLOEXEC and closes at exec. Whatever occupied 3, 4, …
/// is replaced, so call this only right before `execve`.
pub fn place_fds_for_exec(fds: &[RawFd]) -> io::Result<()> {
    let count = RawFd::try_from(fds.len()).map_err(|_| io::Error::other("too many fds"))?;
    let first_free = 3 + count;
    let mut lifted = Vec::with_capacity(fds.len());
    // Lift every source above the target range first, so no dup2 below can
    // overwrite a source still to be moved.
    for &fd in fds {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own returns a new fd or -1.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free) };
        if high < 0 {
            return Err(io::Error::last_os_error());
        }
        lifted.push(high);
    }
    for (target, high) in (3..).zip(lifted) {
        // SAFETY: dup2 between fds of this process; the new fd has CLOEXEC clear.
        if unsafe { libc::dup2(high, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks every fd from 3 up close-on-exec: whatever the parent left open for us
/// by accident must not reach a guest or a re-exec'd daemon. (Sockets handed over
/// on purpose, `LISTEN_FDS`, are CLOEXEC in the daemon too.)
pub fn cloexec_all_inherited() -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every listener is an fd,
/// and supervisors start services with a soft limit of 1,024. Returns (old, new).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one valid rlimit; raising soft up to hard is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old, limit.rlim_cur))
}
