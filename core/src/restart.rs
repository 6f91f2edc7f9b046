//! Live restart: a fresh portwake image takes over every listener (as `LISTEN_FDS`,
//! in the same process, so guests stay its children) and, from a state file, the
//! running guests, which it adopts through their plugins.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::listener::BoundSocket;
use crate::sys;

/// What the next daemon image needs to know besides its listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartState {
    /// The next guest id to hand out (ids stay unique across the restart).
    pub next_guest: u64,
    /// Guests running at the handover.
    pub guests: Vec<RunningGuest>,
}

/// A guest running at the handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningGuest {
    /// Its unit.
    pub unit: String,
    /// Its guest id.
    pub guest: u64,
    /// Its pid, if known.
    pub pid: Option<i64>,
    /// The plugin's handle, for `adopt`.
    pub handle: String,
}

/// The state file beside the control socket.
pub fn state_path(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("handover.json")
}

impl RestartState {
    /// Reads and removes the state file, if there is one.
    pub fn take(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let _ = std::fs::remove_file(path);
        match serde_json::from_str(&text) {
            Ok(state) => Some(state),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "unreadable handover state; no guest adopted");
                None
            }
        }
    }
}

/// Writes the state, places `listeners` at fd 3.. and execs `executable` with this
/// process's arguments and `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`. Returns only
/// if that failed.
pub fn exec(
    executable: &Path,
    listeners: &[(Arc<BoundSocket>, String)],
    state: &RestartState,
    state_path: &Path,
    started: Instant,
) -> io::Error {
    let text = serde_json::to_string(state).expect("state serializes");
    if let Err(e) = std::fs::write(state_path, text) {
        return e;
    }
    // Everything that can fail without harm is prepared before the fds move.
    let path = match CString::new(executable.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(_) => return io::Error::other("executable path contains NUL"),
    };
    if let Err(e) = std::fs::metadata(executable) {
        return e;
    }
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let names: Vec<&str> = listeners.iter().map(|(_, name)| name.as_str()).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(
                k.to_str(),
                Some("LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
            )
        })
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    for (k, v) in [
        ("LISTEN_FDS", listeners.len().to_string()),
        ("LISTEN_PID", std::process::id().to_string()),
        ("LISTEN_FDNAMES", names.join(":")),
    ] {
        env.extend(CString::new(format!("{k}={v}")).ok());
    }
    let fds: Vec<i32> = listeners.iter().map(|(s, _)| s.as_raw_fd()).collect();
    info!(
        prepared_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "exec"
    );
    if let Err(e) = sys::place_fds_for_exec(&fds) {
        return e;
    }
    match nix::unistd::execve(&path, &args, &env) {
        Err(e) => io::Error::from(e),
        Ok(never) => match never {},
    }
}
