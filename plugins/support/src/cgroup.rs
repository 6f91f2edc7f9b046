use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A cgroup of a guest's own, created under the daemon's cgroup in the hierarchies
/// that container engines use to track their processes: the named `systemd`
/// hierarchy (cgroup v1) and the unified one (cgroup v2, `/sys/fs/cgroup/unified`
/// on hybrid hosts or `/sys/fs/cgroup` on pure v2 hosts). Resource controllers
/// are left alone.
///
/// The guest's engine joins it before it executes (see [`wrap`](Self::wrap)); on
/// [`remove`](Self::remove) every process left in the tree is killed and the tree
/// (including what the engine created inside, e.g. nspawn's `payload/`) removed.
#[derive(Debug)]
pub struct CgroupScope {
    dirs: Vec<PathBuf>,
}

/// `sh` script run as `sh -c SCRIPT NAME PROCS… -- PROGRAM ARGS…`: writes its pid
/// into each `cgroup.procs`, then executes the program in its place (same pid, so
/// a `LISTEN_PID` set for it stays right).
const JOIN_AND_EXEC: &str =
    r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

impl CgroupScope {
    /// Creates `NAME` under the daemon's own cgroup in each tracking hierarchy
    /// mounted here; an existing leftover of that name is cleaned up first.
    pub fn create(name: &str) -> Result<Self, String> {
        let dirs = scope_dirs(name)?;
        for dir in &dirs {
            if dir.exists() {
                remove_tree(dir, Duration::from_secs(5))?;
            }
            std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        Ok(Self { dirs })
    }

    /// The existing scope `NAME` under the daemon's own cgroup, as [`create`](Self::create)
    /// made it (by this process before a live restart, which keeps the pid and the
    /// cgroup); hierarchies where it does not exist are left out.
    pub fn open(name: &str) -> Result<Self, String> {
        let dirs = scope_dirs(name)?
            .into_iter()
            .filter(|d| d.is_dir())
            .collect();
        Ok(Self { dirs })
    }

    /// The scope's directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// An argv that joins this scope, then executes `argv` with the same pid.
    pub fn wrap(&self, argv: impl IntoIterator<Item = impl Into<OsString>>) -> Vec<OsString> {
        let mut wrapped: Vec<OsString> = vec![
            "/bin/sh".into(),
            "-c".into(),
            JOIN_AND_EXEC.into(),
            "portwake-join-cgroup".into(),
        ];
        wrapped.extend(
            self.dirs
                .iter()
                .map(|d| d.join("cgroup.procs").into_os_string()),
        );
        wrapped.push("--".into());
        wrapped.extend(argv.into_iter().map(Into::into));
        wrapped
    }

    /// Pids of every process in the scope, in any of its hierarchies.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            collect_pids(dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Sends `signal` to every process in the scope; returns how many it reached.
    pub fn kill_all(&self, signal: Signal) -> usize {
        self.pids()
            .into_iter()
            .filter(|&p| kill(Pid::from_raw(p), signal).is_ok())
            .count()
    }

    /// Kills whatever is left in the scope and removes it, waiting up to `timeout`
    /// for killed processes to leave.
    pub fn remove(&self, timeout: Duration) -> Result<(), String> {
        let mut errors = Vec::new();
        for dir in &self.dirs {
            if let Err(e) = remove_tree(dir, timeout) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// `NAME` under the daemon's own cgroup in each tracking hierarchy mounted here.
fn scope_dirs(name: &str) -> Result<Vec<PathBuf>, String> {
    let me = procfs::process::Process::myself().map_err(|e| format!("/proc/self: {e}"))?;
    let mounts = me
        .mountinfo()
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let cgroups = me
        .cgroups()
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mut dirs = Vec::new();
    for mount in mounts {
        let own = match mount.fs_type.as_str() {
            "cgroup2" => cgroups.0.iter().find(|c| c.hierarchy == 0),
            "cgroup"
                if mount.super_options.get("name").map(Option::as_deref)
                    == Some(Some("systemd")) =>
            {
                cgroups
                    .0
                    .iter()
                    .find(|c| c.controllers.iter().any(|n| n == "name=systemd"))
            }
            _ => None,
        };
        let Some(own) = own else { continue };
        let dir = mount
            .mount_point
            .join(own.pathname.trim_start_matches('/'))
            .join(name);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    Ok(dirs)
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for child in subdirs(dir) {
        collect_pids(&child, pids);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process under `dir` and removes the directories, deepest first.
fn remove_tree(dir: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pids = Vec::new();
        collect_pids(dir, &mut pids);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        match rmdir_tree(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("removing cgroup {}: {e}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn rmdir_tree(dir: &Path) -> io::Result<()> {
    for child in subdirs(dir) {
        rmdir_tree(&child)?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
