//! Every raw syscall of this crate lives here.
//!
//! The fork/exec path cannot use `std::process::Command`: `LISTEN_PID` must hold the
//! child's own pid, which exists only after `fork`, and std builds the environment
//! before forking. So the environment is prepared in the parent with a reserved slot
//! for the pid, and the child only runs async-signal-safe calls (no allocation, no
//! locks) before `execve`, as it must in a multi-threaded parent.

use std::ffi::{c_char, c_int, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Prefix of the environment entry the child completes with its pid.
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for the digits of any pid, plus the terminating NUL.
const PID_DIGITS: usize = 21;

/// Everything the child needs, allocated before `fork`.
pub(crate) struct ExecPlan {
    path: CString,
    /// Keeps the argument strings alive for `argv`.
    _args: Vec<CString>,
    argv: Vec<*const c_char>,
    /// Keeps the environment strings alive for `envp`.
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the pid; completed in the child.
    listen_pid: Vec<u8>,
    envp: Vec<*const c_char>,
    cwd: Option<CString>,
    dev_null: CString,
    fds: Vec<RawFd>,
    new_session: bool,
    /// Sources for the child's fd 1 and 2 (`None`: inherited from the daemon).
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
}

// SAFETY: the raw pointers point into buffers owned by the plan itself (`_args`,
// `_env`, `listen_pid`), which move with it; nothing is shared.
unsafe impl Send for ExecPlan {}

impl ExecPlan {
    /// Prepares an exec of `path` with `args` (argv[0] included) and `env`; the pid
    /// slot is appended to the environment. `fds` become 3, 4, … in the child.
    pub(crate) fn new(
        path: CString,
        args: Vec<CString>,
        env: Vec<CString>,
        cwd: Option<CString>,
        fds: &[BorrowedFd<'_>],
        new_session: bool,
    ) -> Self {
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS, 0);
        let argv = args
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp = env
            .iter()
            .map(|e| e.as_ptr())
            .chain([listen_pid.as_ptr().cast(), std::ptr::null()])
            .collect();
        Self {
            path,
            _args: args,
            argv,
            _env: env,
            listen_pid,
            envp,
            cwd,
            dev_null: c"/dev/null".to_owned(),
            fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
            new_session,
            stdout: None,
            stderr: None,
        }
    }

    /// Makes `stdout` / `stderr` the child's fd 1 / 2. The fds must stay open until
    /// `fork_exec` returns.
    pub(crate) fn redirect(
        &mut self,
        stdout: Option<BorrowedFd<'_>>,
        stderr: Option<BorrowedFd<'_>>,
    ) {
        self.stdout = stdout.map(|fd| fd.as_raw_fd());
        self.stderr = stderr.map(|fd| fd.as_raw_fd());
    }
}

/// Which step of the child's setup failed, sent to the parent with the errno.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum ChildStep {
    Session = 1,
    Stdin = 2,
    Fds = 3,
    Chdir = 4,
    Exec = 5,
    Stdio = 6,
}

impl ChildStep {
    pub(crate) fn describe(code: u32) -> &'static str {
        match code {
            1 => "setsid",
            2 => "opening /dev/null for stdin",
            3 => "placing the listening fds",
            4 => "changing directory",
            6 => "redirecting stdout/stderr",
            _ => "exec",
        }
    }
}

/// Forks and execs the plan; returns the child's pid once `execve` has succeeded,
/// or the step and errno at which the child failed.
pub(crate) fn fork_exec(plan: &mut ExecPlan) -> Result<i32, (u32, io::Error)> {
    let (err_read, err_write) = pipe_cloexec().map_err(|e| (0, e))?;
    let listen_pid_ptr = plan.listen_pid.as_mut_ptr();
    // SAFETY: after fork the child runs only `child_after_fork`, which performs
    // async-signal-safe calls on memory prepared before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err((0, io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; see `child_after_fork`'s contract.
        unsafe { child_after_fork(plan, listen_pid_ptr, err_write.as_raw_fd()) };
    }
    drop(err_write);
    let mut report = [0u8; 8];
    let n = read_full(err_read.as_raw_fd(), &mut report);
    match n {
        Ok(0) => Ok(pid),
        Ok(8) => {
            let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
            let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
            // The child has failed and called `_exit`; reap it so it is no zombie.
            let _ = wait_pid(pid);
            Err((step, io::Error::from_raw_os_error(errno)))
        }
        Ok(_) => Err((0, io::Error::other("short error report from child"))),
        Err(e) => Err((0, e)),
    }
}

/// The child's side of `fork_exec`. Never returns.
///
/// # Safety
/// Must be called only in the child right after `fork`, with a plan whose buffers
/// were prepared in the parent; it uses only async-signal-safe functions.
unsafe fn child_after_fork(plan: &ExecPlan, listen_pid: *mut u8, err_fd: c_int) -> ! {
    let step = 'fail: {
        // SAFETY: each call below is an async-signal-safe syscall on fds and
        // NUL-terminated buffers the parent prepared; none allocates or locks.
        unsafe {
            if plan.new_session && libc::setsid() < 0 {
                break 'fail ChildStep::Session;
            }
            reset_signals();
            // stdout/stderr first: their sources are the plugin's fds (>= 3 in a
            // daemon whose 0-2 are open), which the steps below do not touch
            // before the listeners are lifted above 3 + n.
            for (source, target) in [(plan.stdout, 1), (plan.stderr, 2)] {
                let Some(source) = source else { continue };
                let done = if source == target {
                    // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                    libc::fcntl(source, libc::F_SETFD, 0)
                } else {
                    libc::dup2(source, target)
                };
                if done < 0 {
                    break 'fail ChildStep::Stdio;
                }
            }
            let null = libc::open(plan.dev_null.as_ptr(), libc::O_RDONLY);
            if null < 0 || libc::dup2(null, 0) < 0 {
                break 'fail ChildStep::Stdin;
            }
            if null != 0 {
                libc::close(null);
            }
            let n = c_int::try_from(plan.fds.len()).unwrap_or(c_int::MAX - 3);
            let first_free = 3 + n;
            // Lift every source fd above the target range first, so no dup2 below
            // can overwrite a source that is still to be moved.
            let mut lifted = [0 as c_int; 1024];
            if plan.fds.len() > lifted.len() {
                break 'fail ChildStep::Fds;
            }
            for (i, &fd) in plan.fds.iter().enumerate() {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
                if high < 0 {
                    break 'fail ChildStep::Fds;
                }
                lifted[i] = high;
            }
            for (i, &high) in lifted[..plan.fds.len()].iter().enumerate() {
                // dup2 leaves FD_CLOEXEC clear on the target: these fds cross exec.
                let target = 3 + c_int::try_from(i).unwrap_or(0);
                if libc::dup2(high, target) < 0 {
                    break 'fail ChildStep::Fds;
                }
            }
            // Everything from `first_free` up (lifted copies, the daemon's own fds)
            // closes at exec; the error pipe stays usable until then.
            let first = u32::try_from(first_free).unwrap_or(3);
            if libc::syscall(
                libc::SYS_close_range,
                first,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                break 'fail ChildStep::Fds;
            }
            if let Some(cwd) = &plan.cwd {
                if libc::chdir(cwd.as_ptr()) < 0 {
                    break 'fail ChildStep::Chdir;
                }
            }
            write_pid(listen_pid.add(LISTEN_PID_PREFIX.len()), libc::getpid());
            libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            ChildStep::Exec
        }
    };
    // SAFETY: async-signal-safe reporting on an fd we own, then `_exit`.
    unsafe {
        let errno = *libc::__errno_location();
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_fd, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

/// Resets signal mask and dispositions the daemon may have changed (Rust ignores
/// SIGPIPE; ignored signals survive exec), as systemd does for its services.
///
/// # Safety
/// Async-signal-safe; meant for a forked child.
unsafe fn reset_signals() {
    // SAFETY: sigset manipulation on a local set and sigaction/sigprocmask with
    // valid arguments; all async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Writes `pid` in decimal, NUL-terminated, at `out` (room for `PID_DIGITS` bytes).
///
/// # Safety
/// `out` must be writable for `PID_DIGITS` bytes.
unsafe fn write_pid(out: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = 0;
    let mut v = u64::try_from(pid).unwrap_or(0);
    loop {
        digits[n] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: `i < n < PID_DIGITS`, within the caller's buffer.
        unsafe { *out.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: `n < PID_DIGITS`, within the caller's buffer.
    unsafe { *out.add(n) = 0 };
}

pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the destination is the unread tail of `buf`.
        let n = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        match n {
            0 => break,
            n if n > 0 => done += usize::try_from(n).unwrap_or(0),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// Raw wait status of a reaped child.
pub(crate) fn wait_pid(pid: i32) -> io::Result<c_int> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: waitpid on a pid we forked, with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Decodes a wait status into (exited?, code-or-signal).
pub(crate) fn decode_status(status: c_int) -> (bool, i32) {
    if libc::WIFEXITED(status) {
        (true, libc::WEXITSTATUS(status))
    } else {
        (false, libc::WTERMSIG(status))
    }
}

/// Sends `signal` to `target` as kill(2) reads it (a pid, or a negated process-group
/// id); `Ok(false)` if nothing by that id remains.
pub(crate) fn kill(target: i32, signal: c_int) -> io::Result<bool> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(target, signal) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Blocks until process `pid` (not necessarily our child) has exited, using a pidfd.
pub(crate) fn wait_exit_of(pid: i32) -> io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // Already gone and reaped: nothing to wait for.
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e)
        };
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: poll on one valid pollfd; a pidfd becomes readable when the process exits.
        let r = unsafe { libc::poll(&mut poll, 1, -1) };
        if r > 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
