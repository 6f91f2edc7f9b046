//! Starting a guest process the way systemd starts a socket-activated service:
//! exactly the given listeners at fd 3, 4, …, `LISTEN_FDS`, `LISTEN_FDNAMES`, and
//! `LISTEN_PID` equal to the child's own pid; every other fd of the daemon closed.
//! Standard input is `/dev/null`; standard output and error are the daemon's,
//! unless [`GuestCommand::stdout_to`] / [`GuestCommand::stderr_to`] name an fd
//! (a pipe the plugin reads, to report an engine command's error message).

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sdk::{GuestExit, ListenFd};
use crate::sys;

/// Variables the daemon may itself have been given that must not leak to a guest.
const DAEMON_ONLY_ENV: [&str; 4] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Why a guest could not be spawned.
#[derive(Debug)]
pub enum SpawnError {
    /// The command line was empty.
    EmptyCommand,
    /// A program name without '/' was not found in `PATH`.
    NotFound(String),
    /// An argument, variable or path held a NUL byte.
    Nul(String),
    /// A syscall failed, in the parent or in the child before exec.
    Os {
        /// The program being started.
        program: PathBuf,
        /// What the child was doing.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyCommand => f.write_str("command is empty"),
            Self::NotFound(p) => write!(f, "{p}: command not found in PATH"),
            Self::Nul(what) => write!(f, "{what} contains a NUL byte"),
            Self::Os {
                program,
                step,
                source,
            } => write!(f, "{}: {step} failed: {source}", program.display()),
        }
    }
}

impl std::error::Error for SpawnError {}

/// A command to run as a guest with listening fds.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    working_dir: Option<PathBuf>,
    new_session: bool,
    stdout: Option<Arc<OwnedFd>>,
    stderr: Option<Arc<OwnedFd>>,
}

impl GuestCommand {
    /// `argv[0]` is the program: a path, or a name looked up in `PATH`.
    pub fn new(argv: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            working_dir: None,
            new_session: true,
            stdout: None,
            stderr: None,
        }
    }

    /// Gives the guest `fd` as its standard output instead of the daemon's, e.g.
    /// the write end of a pipe the plugin reads (create it close-on-exec, as
    /// `pipe2(O_CLOEXEC)` does; the child gets its own copy at fd 1). The command
    /// keeps `fd` open until it is dropped: drop it (and every clone) after
    /// `spawn`, or the plugin's reader never sees end-of-file.
    pub fn stdout_to(&mut self, fd: impl Into<OwnedFd>) -> &mut Self {
        self.stdout = Some(Arc::new(fd.into()));
        self
    }

    /// As [`stdout_to`](Self::stdout_to), for standard error (fd 2): how a plugin
    /// captures an engine command's error message (`virsh start`, …) to report it.
    /// Both may be the same pipe (pass a `try_clone` of it).
    pub fn stderr_to(&mut self, fd: impl Into<OwnedFd>) -> &mut Self {
        self.stderr = Some(Arc::new(fd.into()));
        self
    }

    /// Sets a variable on top of the inherited environment.
    pub fn env(&mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs the guest in `dir`.
    pub fn working_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Whether the guest gets a session (and process group) of its own; default yes,
    /// so that stopping it reaches everything it forked and a terminal's Ctrl-C
    /// reaches only the daemon.
    pub fn new_session(&mut self, yes: bool) -> &mut Self {
        self.new_session = yes;
        self
    }

    /// Spawns the guest with `fds` at 3, 4, … and the `LISTEN_*` variables.
    pub fn spawn(&self, fds: &[ListenFd<'_>]) -> Result<GuestProcess, SpawnError> {
        let program = self.argv.first().ok_or(SpawnError::EmptyCommand)?;
        let path = resolve_program(program)?;
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !DAEMON_ONLY_ENV.iter().any(|d| OsStr::new(d) == k))
            .collect();
        for (k, v) in &self.env {
            env.retain(|(old, _)| old != k);
            env.push((k.clone(), v.clone()));
        }
        env.retain(|(k, _)| !DAEMON_ONLY_ENV.iter().any(|d| OsStr::new(d) == k));
        env.push(("LISTEN_FDS".into(), fds.len().to_string().into()));
        let names: Vec<&str> = fds.iter().map(|f| f.name).collect();
        env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));

        let c_path = cstring(path.as_os_str().as_bytes(), "program path")?;
        let args = self
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "argument"))
            .collect::<Result<_, _>>()?;
        let env = env
            .into_iter()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                cstring(&kv, "environment variable")
            })
            .collect::<Result<_, _>>()?;
        let cwd = self
            .working_dir
            .as_ref()
            .map(|d| cstring(d.as_os_str().as_bytes(), "working directory"))
            .transpose()?;
        let borrowed: Vec<_> = fds.iter().map(|f| f.fd).collect();
        let mut plan = sys::ExecPlan::new(c_path, args, env, cwd, &borrowed, self.new_session);
        plan.redirect(
            self.stdout.as_deref().map(AsFd::as_fd),
            self.stderr.as_deref().map(AsFd::as_fd),
        );
        let pid = sys::fork_exec(&mut plan).map_err(|(step, source)| SpawnError::Os {
            program: path.clone(),
            step: if step == 0 {
                "fork"
            } else {
                sys::ChildStep::describe(step)
            },
            source,
        })?;
        Ok(GuestProcess {
            pid,
            group: self.new_session,
        })
    }
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul(what.to_owned()))
}

/// Finds `program` as `execvp` would, but before forking.
fn resolve_program(program: &OsStr) -> Result<PathBuf, SpawnError> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| SpawnError::NotFound(program.to_string_lossy().into_owned()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A spawned guest: its pid, and whether it leads its own process group.
#[derive(Debug, Clone, Copy)]
pub struct GuestProcess {
    /// The guest's pid.
    pub pid: i32,
    group: bool,
}

impl GuestProcess {
    /// Blocks until the guest's main process exits, and reaps it. A guest that is
    /// not this process's child (adopted after a supervisor restart) is watched
    /// through a pidfd; its exit status is then unknown.
    pub fn wait(&self) -> GuestExit {
        match sys::wait_pid(self.pid) {
            Ok(status) => match sys::decode_status(status) {
                (true, code) => GuestExit::Exited(code),
                (false, signal) => GuestExit::Signaled(signal),
            },
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                let _ = sys::wait_exit_of(self.pid);
                GuestExit::Unknown
            }
            Err(_) => GuestExit::Unknown,
        }
    }

    /// A child this plugin started by other means (say `std::process::Command`), so
    /// that its [`handle`](Self::handle) can name it across a live restart.
    pub fn of_child(pid: i32) -> Self {
        Self { pid, group: false }
    }

    /// A handle naming this process for `adopt`: its pid and kernel start time, so a
    /// recycled pid is never mistaken for the guest.
    pub fn handle(&self) -> Option<String> {
        start_time(self.pid).map(|t| format!("pid={} start={t} group={}", self.pid, self.group))
    }

    /// The process a `handle` names, if it still runs; `None` if it is gone (or the
    /// pid now belongs to another process).
    pub fn from_handle(handle: &str) -> Result<Option<Self>, String> {
        let field = |key: &str| {
            handle
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| format!("handle {handle:?} lacks {key}="))
        };
        let pid: i32 = field("pid")?
            .parse()
            .map_err(|_| format!("bad pid in {handle:?}"))?;
        let start: u64 = field("start")?
            .parse()
            .map_err(|_| format!("bad start in {handle:?}"))?;
        let group = field("group").map_or(true, |g| g == "true");
        Ok((start_time(pid) == Some(start)).then_some(Self { pid, group }))
    }

    /// Sends `signal` to the guest (its whole process group when it has one);
    /// `false` when nothing was left to signal.
    pub fn signal(&self, signal: i32) -> std::io::Result<bool> {
        if self.group {
            sys::kill(-self.pid, signal)
        } else {
            sys::kill(self.pid, signal)
        }
    }

    /// SIGTERM, then SIGKILL once `timeout` passes while `exited()` stays false.
    /// `exited` is polled, as the reaping happens on another thread.
    pub fn terminate(&self, timeout: Duration, exited: impl Fn(Duration) -> bool) -> bool {
        if !self.signal(libc::SIGTERM).unwrap_or(false) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        if exited(deadline.saturating_duration_since(Instant::now())) {
            return true;
        }
        let _ = self.signal(libc::SIGKILL);
        exited(Duration::from_secs(5))
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22),
/// `None` if it is gone or a zombie.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, starttime field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_all(fd: OwnedFd) -> String {
        let mut text = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut text)
            .expect("read pipe");
        text
    }

    #[test]
    fn stdout_and_stderr_go_to_the_given_fds() {
        let (out_r, out_w) = sys::pipe_cloexec().expect("pipe");
        let (err_r, err_w) = sys::pipe_cloexec().expect("pipe");
        let mut command = GuestCommand::new([
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; ls /proc/self/fd >&2",
        ]);
        command.stdout_to(out_w).stderr_to(err_w);
        let process = command.spawn(&[]).expect("spawn");
        // The command holds the write ends: drop it, or the reads never end.
        drop(command);
        let (out, err) = (read_all(out_r), read_all(err_r));
        assert!(matches!(process.wait(), GuestExit::Exited(0)));
        assert_eq!(out, "out\n");
        let mut lines = err.lines();
        assert_eq!(lines.next(), Some("err"));
        // Only 0, 1, 2 and ls's own directory fd: no pipe end leaked as an extra fd.
        let fds: Vec<&str> = lines.collect();
        assert_eq!(fds, ["0", "1", "2", "3"], "{err}");
    }
}
