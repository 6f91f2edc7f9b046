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
    Fetch = 7,
}

impl ChildStep {
    pub(crate) fn describe(code: u32) -> &'static str {
        match code {
            1 => "setsid",
            2 => "opening /dev/null for stdin",
            3 => "placing the listening fds",
            4 => "changing directory",
            6 => "redirecting stdout/stderr",
            7 => "taking the fds from the daemon (pidfd_getfd)",
            _ => "exec",
        }
    }
}

/// Forks and execs the plan; returns the child's pid once `execve` has succeeded,
/// or the step and errno at which the child failed.
pub(crate) fn fork_exec(plan: &mut ExecPlan) -> Result<i32, (u32, io::Error)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Set once the child could not take its fds with pidfd_getfd (no ptrace
    /// permission on the daemon, or an old kernel): spawn the classic way from then on.
    static NO_FETCH: AtomicBool = AtomicBool::new(false);
    if !NO_FETCH.load(Ordering::Relaxed) {
        match spawn(plan, true) {
            Err((step, e)) if step == ChildStep::Fetch as u32 => {
                NO_FETCH.store(true, Ordering::Relaxed);
                let _ = e;
            }
            other => return other,
        }
    }
    spawn(plan, false)
}

struct ChildArgs {
    plan: *const ExecPlan,
    listen_pid: *mut u8,
    /// Share the daemon's fd table, then keep only 0-2 and take the fds it needs
    /// with pidfd_getfd: the daemon's other fds are never copied nor closed.
    fetch: bool,
    /// Written by the child when it fails, read by the parent once it resumes.
    failed_step: u32,
    failed_errno: i32,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive while the parent is
    // suspended (CLONE_VFORK) until this child execs or exits.
    let a = unsafe { &mut *arg.cast::<ChildArgs>() };
    // SAFETY: see `child_after_fork`'s contract; the plan was prepared before clone.
    unsafe { child_after_fork(a) }
}

/// Clones a child that shares the daemon's memory (CLONE_VM) while the calling
/// thread waits until it has exec'd or failed (CLONE_VFORK), as posix_spawn does:
/// no page tables are copied, whatever the daemon's size and thread count.
fn spawn(plan: &mut ExecPlan, fetch: bool) -> Result<i32, (u32, io::Error)> {
    let mut args = ChildArgs {
        plan: std::ptr::from_ref(plan),
        listen_pid: plan.listen_pid.as_mut_ptr(),
        fetch,
        failed_step: 0,
        failed_errno: 0,
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: one past the end of `stack`, rounded down to 16 bytes.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) };
    let top = ((top as usize) & !15) as *mut libc::c_void;
    // Signals stay blocked until the child has reset every handler to the default,
    // so no handler of the daemon runs on the shared memory.
    // SAFETY: an all-zero sigset_t is a valid value.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset manipulation on locals; pthread_sigmask with valid pointers.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let flags = libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::SIGCHLD
        | if fetch { libc::CLONE_FILES } else { 0 };
    // SAFETY: the child runs only async-signal-safe calls on memory prepared
    // before the clone and never returns; `stack` and `args` outlive its use of them.
    let pid = unsafe {
        libc::clone(
            child_entry,
            top,
            flags,
            std::ptr::from_mut(&mut args).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err((0, clone_error));
    }
    // SAFETY: the child has exec'd or exited: nothing writes `args` any more.
    let (step, errno) = unsafe {
        (
            std::ptr::read_volatile(&args.failed_step),
            std::ptr::read_volatile(&args.failed_errno),
        )
    };
    if step != 0 {
        // The child has failed and called `_exit`; reap it so it is no zombie.
        let _ = wait_pid(pid);
        return Err((step, io::Error::from_raw_os_error(errno)));
    }
    Ok(pid)
}

/// The child's side of `fork_exec`. Never returns.
///
/// # Safety
/// Must be called only in the child of `spawn`'s clone, with a plan whose buffers
/// were prepared in the parent; it uses only async-signal-safe functions.
unsafe fn child_after_fork(a: &mut ChildArgs) -> ! {
    // SAFETY: the plan outlives the child (the parent waits).
    let plan = unsafe { &*a.plan };
    let mut fds = [0 as c_int; 1024];
    let (mut stdout, mut stderr) = (plan.stdout, plan.stderr);
    let step = 'fail: {
        // SAFETY: each call below is an async-signal-safe syscall on fds and
        // NUL-terminated buffers the parent prepared; none allocates or locks.
        unsafe {
            if plan.fds.len() > fds.len() {
                break 'fail ChildStep::Fds;
            }
            fds[..plan.fds.len()].copy_from_slice(&plan.fds);
            if a.fetch {
                // A table of our own with 0-2 only: the daemon's fds are not copied.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_UNSHARE,
                ) < 0
                {
                    break 'fail ChildStep::Fetch;
                }
                let parent = libc::syscall(libc::SYS_pidfd_open, libc::getppid(), 0);
                if parent < 0 {
                    break 'fail ChildStep::Fetch;
                }
                let parent = c_int::try_from(parent).unwrap_or(-1);
                let get = |fd: c_int| {
                    c_int::try_from(libc::syscall(libc::SYS_pidfd_getfd, parent, fd, 0))
                        .unwrap_or(-1)
                };
                for fd in &mut fds[..plan.fds.len()] {
                    *fd = get(*fd);
                    if *fd < 0 {
                        break 'fail ChildStep::Fetch;
                    }
                }
                for fd in [&mut stdout, &mut stderr].into_iter().flatten() {
                    *fd = get(*fd);
                    if *fd < 0 {
                        break 'fail ChildStep::Fetch;
                    }
                }
                libc::close(parent);
            }
            if plan.new_session && libc::setsid() < 0 {
                break 'fail ChildStep::Session;
            }
            reset_signals();
            // stdout/stderr first: their sources are >= 3, which the steps below
            // do not touch before the listeners are lifted above 3 + n.
            for (source, target) in [(stdout, 1), (stderr, 2)] {
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
            for (i, &fd) in fds[..plan.fds.len()].iter().enumerate() {
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
            // Everything from `first_free` up closes at exec.
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
            write_pid(a.listen_pid.add(LISTEN_PID_PREFIX.len()), libc::getpid());
            libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            ChildStep::Exec
        }
    };
    // SAFETY: the parent is suspended until we exit; it reads these afterwards.
    unsafe {
        let errno = *libc::__errno_location();
        std::ptr::write_volatile(&mut a.failed_step, step as u32);
        std::ptr::write_volatile(&mut a.failed_errno, errno);
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
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
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

#[cfg(test)]
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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

/// A pidfd for `pid` (close-on-exec): readable once the process has exited.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until process `pid` (not necessarily our child) has exited, using a pidfd.
pub(crate) fn wait_exit_of(pid: i32) -> io::Result<()> {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        // Already gone and reaped: nothing to wait for.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    poll(&mut fds)
}

/// poll(2) without a timeout, retried when a signal interrupts it.
pub(crate) fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
    let count = libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::other("too many fds"))?;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `count` pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A non-blocking, close-on-exec eventfd, to wake a thread blocked in `poll`.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; a full counter (EAGAIN)
    // is still readable, which is all a wake-up needs.
    let _ = unsafe { libc::write(fd.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
}

/// Resets an eventfd to not readable.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    let _ = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(count).cast(), 8) };
}
