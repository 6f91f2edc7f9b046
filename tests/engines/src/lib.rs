//! Helpers for the engine system tests: prerequisites (skip, or fail under CI),
//! the real `portwake` daemon as a child with its log, free ports, timed clients,
//! and clean-up guards.
//!
//! The tests expect `cargo build --workspace` to have run (the README's test
//! command does it) and, for the fixtures, `tests/engines/setup.sh`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub mod libvirtd;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `cargo build --workspace` put the binaries and plugins.
pub fn bin_dir() -> PathBuf {
    build();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("debug")
}

/// Builds the daemon, the engine plugins and the example guest once per test
/// process: `cargo test` alone builds no cdylib of another package.
fn build() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(workspace_root()).args(["build", "-q"]);
        for package in [
            "portwake",
            "portwake-example-guest",
            "portwake-exec",
            "portwake-nspawn",
            "portwake-libvirt-lxc",
            "portwake-oci",
        ] {
            command.args(["-p", package]);
        }
        let status = command.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build of the engine test artifacts failed"
        );
    });
}

/// Whether we run under CI, where a missing prerequisite is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Finds `program` in `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Checks what a test needs: root, the programs, the files. Returns `false` (the
/// test should return, skipped) when something is missing outside CI; panics when
/// something is missing under CI.
pub fn prerequisites(test: &str, programs: &[&str], files: &[&Path]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_owned());
    }
    for p in programs {
        if which(p).is_none() {
            missing.push(format!("program {p} (run tests/engines/setup.sh)"));
        }
    }
    for f in files {
        if !f.exists() {
            missing.push(format!(
                "{} (run cargo build --workspace and tests/engines/setup.sh)",
                f.display()
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: missing {}", missing.join(", "));
    assert!(
        !under_ci(),
        "{why} (CI is set: prerequisites must be present)"
    );
    eprintln!("SKIPPED {why}");
    false
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a client got: the text, and how long after connecting the first byte came.
#[derive(Debug)]
pub struct Reply {
    /// Everything read until EOF (or the timeout).
    pub text: String,
    /// From `connect` returning to the first byte.
    pub first_byte: Duration,
    /// From before `connect` to the first byte.
    pub total: Duration,
}

/// Connects to `addr`, sends `request` (if any), reads until EOF or until
/// `until` appears in what was read; fails after `timeout`.
pub fn exchange(
    addr: SocketAddr,
    request: &[u8],
    until: Option<&str>,
    timeout: Duration,
) -> Result<Reply, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    let connected = Instant::now();
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    if !request.is_empty() {
        s.write_all(request)
            .map_err(|e| format!("{addr}: write: {e}"))?;
    }
    let mut buf = Vec::new();
    let mut first = None;
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
                if until.is_some_and(|u| String::from_utf8_lossy(&buf).contains(u)) {
                    break;
                }
            }
            Err(e) => {
                return Err(format!(
                    "{addr}: read after {:?}: {e} (got {:?})",
                    start.elapsed(),
                    String::from_utf8_lossy(&buf)
                ))
            }
        }
    }
    let first = first.ok_or_else(|| format!("{addr}: closed without a byte"))?;
    Ok(Reply {
        text: String::from_utf8_lossy(&buf).into_owned(),
        first_byte: first - connected,
        total: first - start,
    })
}

/// `GET /info` to a hello-guest, parsed.
pub fn hello_info(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(serde_json::Value, Reply), String> {
    let reply = exchange(
        addr,
        b"GET /info HTTP/1.0\r\nHost: test\r\n\r\n",
        None,
        timeout,
    )?;
    let body = reply
        .text
        .split_once("\r\n\r\n")
        .map_or(reply.text.as_str(), |(_, b)| b);
    let json = serde_json::from_str(body.trim())
        .map_err(|e| format!("{addr}: /info is not JSON ({e}): {:?}", reply.text))?;
    Ok((json, reply))
}

/// What [`served_from_container`] found.
#[derive(Debug)]
pub struct Served {
    /// The guest's `/info`, from the first listener.
    pub info: serde_json::Value,
    /// The container's pid namespace.
    pub ns: String,
    /// The first connection's time from before `connect` to the first byte.
    pub total: Duration,
    /// The container init's fds and their targets, seen from the host.
    pub host_view: Vec<(i32, String)>,
}

/// Both listeners of a unit (`ports`, named `names` in LISTEN_FDNAMES) answer from
/// one container's init (pid 1 of a pid namespace other than the host's), which
/// was handed exactly two fds and holds stdio and those two listeners at 3 and 4,
/// nothing of the daemon's (another unit's listeners, the control socket, epoll).
pub fn served_from_container(
    who: &str,
    ports: [u16; 2],
    names: [&str; 2],
    timeout: Duration,
) -> Served {
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let (info, reply) = hello_info(addr(ports[0]), timeout)
        .unwrap_or_else(|e| panic!("{who}: first connection: {e}"));
    let ns = info["pid_namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(
        ns,
        host_pid_namespace(),
        "{who}: served from the host's pid namespace"
    );
    assert_eq!(
        info["pid"], 1,
        "{who}: not served by the container's init: {info}"
    );
    assert_eq!(info["listen_fds"], "2", "{who}: {info}");
    assert_eq!(info["served_name"], names[0], "{who}: {info}");
    assert_eq!(
        info["open_fds"],
        serde_json::json!([0, 1, 2, 3, 4]),
        "{who}: the guest's fds at start: {info}"
    );
    let listeners: Vec<String> = info["sockets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| format!("{} {}", s["fd"], s["address"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        listeners,
        [
            format!("3 127.0.0.1:{}", ports[0]),
            format!("4 127.0.0.1:{}", ports[1])
        ],
        "{who}: fds 3 and 4 are not the unit's listeners: {info}"
    );
    let host_view = init_fds_of_namespace(&ns);
    eprintln!("{who}: the container init's fds, seen from the host: {host_view:?}");
    let (second, _) = hello_info(addr(ports[1]), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{who}: second listener: {e}"));
    assert_eq!(
        second["pid_namespace"],
        ns.as_str(),
        "{who}: second listener, other container: {second}"
    );
    assert_eq!(second["served_name"], names[1], "{who}: {second}");
    Served {
        info,
        ns,
        total: reply.total,
        host_view,
    }
}

/// This process's pid namespace, as `/proc/self/ns/pid` names it.
pub fn host_pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A running `portwake run` with its log in a file; stopped (SIGTERM, then
/// SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    control: PathBuf,
    /// The daemon's pid.
    pub pid: i32,
    after_exit: Vec<Box<dyn FnMut()>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("pid", &self.pid)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Writes `config` into `dir` and starts the daemon on it; waits for "ready".
    pub fn start(dir: &Path, config: &str) -> Self {
        let config_path = dir.join("portwake.ron");
        std::fs::write(&config_path, config).expect("write config");
        let log = dir.join("portwake.log");
        let log_file = std::fs::File::create(&log).expect("create log");
        let portwake = bin_dir().join("portwake");
        let check = Command::new(&portwake)
            .args(["check", "--config"])
            .arg(&config_path)
            .output()
            .expect("run portwake check");
        assert!(
            check.status.success(),
            "portwake check failed:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&portwake)
            .args(["run", "--config"])
            .arg(&config_path)
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn portwake");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let daemon = Self {
            child: Some(child),
            log,
            control: dir.join("control.sock"),
            pid,
            after_exit: Vec::new(),
        };
        daemon.wait_log("ready", 1, Duration::from_secs(20));
        daemon
    }

    /// Registers clean-up that runs when the daemon is dropped, after it has
    /// exited (or been killed): the last resort for what its guests left.
    pub fn cleanup_after(&mut self, f: impl FnMut() + 'static) {
        self.after_exit.push(Box::new(f));
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` appears at least `count` times in the log; panics
    /// with the log after `timeout`.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        if wait_for(timeout, || {
            (self.log().matches(needle).count() >= count).then_some(())
        })
        .is_none()
        {
            panic!(
                "no {count}x {needle:?} in the daemon log after {timeout:?}:\n{}",
                self.log()
            );
        }
        start.elapsed()
    }

    /// SIGTERM; waits for the daemon to exit (it stops its guests first) and
    /// returns how long that took, and whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> (Duration, bool) {
        let Some(mut child) = self.child.take() else {
            return (Duration::ZERO, true);
        };
        let start = Instant::now();
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let status = wait_for(timeout, || child.try_wait().ok().flatten());
        let elapsed = start.elapsed();
        match status {
            Some(s) => (elapsed, s.success()),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                (elapsed, false)
            }
        }
    }

    /// `portwake COMMAND --socket CONTROL ARGS…` (status, stop, restart, …):
    /// whether it succeeded, and what it printed.
    pub fn control(&self, command: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin_dir().join("portwake"))
            .arg(command)
            .arg("--socket")
            .arg(&self.control)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run portwake");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `portwake restart`, which returns once the new image answers; returns how
    /// long that took. Panics (with the log) when it fails.
    pub fn live_restart(&self) -> Duration {
        let t = Instant::now();
        let (ok, out) = self.control("restart", &[]);
        assert!(ok, "portwake restart failed: {out}\n{}", self.log());
        eprintln!("portwake restart: {}", out.trim());
        t.elapsed()
    }

    /// Host pids of the daemon's direct children (the guests' engine processes).
    pub fn children(&self) -> Vec<i32> {
        children_of(self.pid)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let (_, ok) = self.terminate(Duration::from_secs(40));
            if !ok || std::thread::panicking() {
                eprintln!("---- portwake log ----\n{}", self.log());
            }
        }
        for f in &mut self.after_exit {
            f();
        }
    }
}

/// Direct children of `pid`, from `/proc/PID/task/*/children`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(Result::ok) {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                kids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    kids
}

/// Runs a command to completion; panics with its output unless it succeeds.
pub fn run_ok(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cgroup directories whose name starts with `prefix` directly under the root of
/// any cgroup hierarchy mounted under /sys/fs/cgroup (or of /sys/fs/cgroup itself).
pub fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists()),
        );
    }
    roots
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flat_map(|d| d.filter_map(Result::ok))
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// Kills every process in `dir` and below, then removes the directories.
pub fn remove_cgroup_tree(dir: &Path) {
    for _ in 0..100 {
        let mut pids = Vec::new();
        collect_procs(dir, &mut pids);
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        if rmdir_tree(dir) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("could not remove cgroup {}", dir.display());
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for sub in subdirs(dir) {
        collect_procs(&sub, pids);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn rmdir_tree(dir: &Path) -> bool {
    subdirs(dir).iter().all(|d| rmdir_tree(d))
        && (std::fs::remove_dir(dir).is_ok() || !dir.exists())
}

/// Runs a closure when dropped: clean-up that must happen even when a test fails.
pub struct Cleanup<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for Cleanup<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

impl<F: FnMut()> std::fmt::Debug for Cleanup<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cleanup")
    }
}

/// Prints a measurement so that it shows with `--nocapture` and in CI logs.
pub fn report(engine: &str, what: &str, value: Duration) {
    eprintln!("MEASURED {engine}: {what} = {} ms", value.as_millis());
}

/// A minimal root filesystem holding `hello-guest` (as `/hello-guest`) and the
/// shared libraries `ldd` lists for it, in `dir`.
pub fn hello_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["proc", "dev", "sys", "tmp", "etc", "run"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    let guest = bin_dir().join("hello-guest");
    std::fs::copy(&guest, root.join("hello-guest")).expect("copy hello-guest");
    let ldd = run_ok(&["ldd", guest.to_str().expect("utf8 path")]);
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let target = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir lib");
        std::fs::copy(lib, &target).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/hello-guest\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    root
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `argv` run in a private mount namespace where `/dev/null` hides the hybrid
/// cgroup controllers file (what the oci plugin's `hide_hybrid_cgroup` does).
pub fn hybrid_wrapped(argv: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        "mount --bind /dev/null /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null; exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    v.extend(argv.iter().map(|s| (*s).to_owned()));
    v
}

/// Runs a command; `(success, stdout + stderr)`.
pub fn run_status(argv: &[String]) -> (bool, String) {
    match Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The open fds of the process that is PID 1 of the pid namespace `ns` (as
/// `/proc/PID/ns/pid` names it), seen from the host: `(fd, readlink target)`,
/// sorted. Empty when no such process is found.
pub fn init_fds_of_namespace(ns: &str) -> Vec<(i32, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let init = procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.to_string_lossy() == ns)
                && std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|l| l.split_whitespace().last())
                        == Some("1")
                })
        });
    let Some(pid) = init else {
        return Vec::new();
    };
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let fd = e.file_name().to_str()?.parse().ok()?;
                    let target = std::fs::read_link(e.path()).ok()?;
                    Some((fd, target.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}
