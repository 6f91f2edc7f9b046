//! Shared helpers for the integration tests: build the workspace's binaries once,
//! run a real `portwake` daemon on a config, and talk to guests over real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `target/debug` (or the profile the tests were built with).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Builds the daemon, the plugins and the example guest once per test process.
pub fn build() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root()).args([
            "build",
            "-q",
            "-p",
            "portwake",
            "-p",
            "portwake-exec",
            "-p",
            "portwake-testkit",
            "-p",
            "portwake-example-guest",
        ]);
        if target_dir().file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the test artifacts failed");
    });
}

/// Path of a built binary or plugin in the target directory.
pub fn artifact(name: &str) -> PathBuf {
    build();
    target_dir().join(name)
}

/// The example guest.
pub fn guest() -> String {
    artifact("hello-guest").display().to_string()
}

/// A TCP port free on 127.0.0.1 and ::1 right now.
pub fn free_port() -> u16 {
    loop {
        let v6 = TcpListener::bind("[::]:0").expect("bind [::]:0");
        let port = v6.local_addr().expect("local addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// A running `portwake run` with its captured log; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The directory holding the config (and anything else the test puts there).
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `config` and starts the daemon on it; returns once it logged "ready".
    pub fn start(config: &str) -> Result<Self> {
        let mut daemon = Self::spawn(config)?;
        if !daemon.wait_log("ready", Duration::from_secs(20)) {
            let status = daemon.child.try_wait()?;
            bail!(
                "daemon did not become ready (exit: {status:?}); log:\n{}",
                daemon.log()
            );
        }
        Ok(daemon)
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn spawn(config: &str) -> Result<Self> {
        Self::spawn_with(config, |_| {})
    }

    /// Starts the daemon, letting `customize` change its command (environment,
    /// fds, a wrapper) first; returns once it logged "ready".
    pub fn start_with(config: &str, customize: impl FnOnce(&mut Command)) -> Result<Self> {
        let daemon = Self::spawn_with(config, customize)?;
        if !daemon.wait_log("ready", Duration::from_secs(20)) {
            bail!("daemon did not become ready; log:\n{}", daemon.log());
        }
        Ok(daemon)
    }

    /// Starts the daemon without waiting, after `customize` changed its command.
    pub fn spawn_with(config: &str, customize: impl FnOnce(&mut Command)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("host.ron");
        std::fs::write(&path, config)?;
        let mut command = Command::new(artifact("portwake"));
        command
            .args(["run", "--log-level", "debug", "--config"])
            .arg(&path)
            .arg("--control-socket")
            .arg(dir.path().join("control.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        customize(&mut command);
        let mut child = command.spawn().context("spawning portwake")?;
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("log lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Self { child, log, dir })
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Runs a control command (`status`, `stop UNIT`, …) against this daemon.
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let socket = self.control_socket().display().to_string();
        let mut full: Vec<&str> = args.to_vec();
        full.insert(1, "--socket");
        full.insert(2, &socket);
        portwake(&full)
    }

    /// The daemon's status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, out) = self.ctl(&["status", "--json"]);
        assert_eq!(code, 0, "status failed: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
    }

    /// One unit's status.
    pub fn unit_status(&self, unit: &str) -> serde_json::Value {
        self.status()["units"]
            .as_array()
            .and_then(|units| units.iter().find(|u| u["name"] == unit).cloned())
            .unwrap_or_else(|| panic!("no unit {unit} in status"))
    }

    /// Replaces the config file (for reload tests).
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("host.ron"), config).expect("writing the config");
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_count(needle, 1, timeout)
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub fn wait_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count(needle) >= n)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(pid, signal) };
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits (bounded) for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the log reader drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Orderly first, so guests are stopped too; then by force.
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Runs `portwake` with `args` to completion; returns (exit code, stdout + stderr).
pub fn portwake(args: &[&str]) -> (i32, String) {
    let out = Command::new(artifact("portwake"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running portwake");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends an HTTP request for `path` over a connected stream; returns the body.
pub fn http_over(mut stream: impl Read + Write, path: &str) -> Result<String> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response: {response:?}"))?;
    Ok(body.to_owned())
}

/// `GET path` on a TCP address, with a generous timeout (the guest may be starting).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    http_over(stream, path)
}

/// The guest's `/info` report over TCP.
pub fn info(addr: SocketAddr) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(addr, "/info")?)?)
}

/// The guest's `/info` report over a unix stream socket.
pub fn unix_info(stream: UnixStream) -> Result<serde_json::Value> {
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(serde_json::from_str(&http_over(stream, "/info")?)?)
}

/// Sends `info` as a datagram and returns the guest's JSON reply.
pub fn udp_info(addr: SocketAddr) -> Result<serde_json::Value> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(20)))?;
    socket.send_to(b"info", addr)?;
    let mut buf = [0u8; 8192];
    let n = socket.recv(&mut buf)?;
    Ok(serde_json::from_slice(&buf[..n])?)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(after != 'Z')
        })
        .unwrap_or(false)
}

/// The pids of `pid`'s children, from /proc.
pub fn children(pid: u32) -> Vec<i64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let child: i64 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// The JSON value as an i64, for pids and counts in guest reports.
pub fn int(value: &serde_json::Value) -> i64 {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not an integer: {value}"))
}

/// Sends one packet on a fresh `SOCK_SEQPACKET` connection to `path`; returns the reply.
pub fn seqpacket_ask(path: &Path, message: &[u8]) -> Result<Vec<u8>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: socket(2) returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)?;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        bail!("path too long");
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())?;
    // SAFETY: connect with a valid sockaddr_un of the given length.
    if unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let timeout = libc::timeval {
        tv_sec: 20,
        tv_usec: 0,
    };
    let tv_len = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>())?;
    // SAFETY: setsockopt with a valid timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            tv_len,
        )
    };
    // SAFETY: send reads message.len() bytes from a live slice.
    if unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

/// Compiles the C source `source` into `dir/lib<name>.so` with the system `cc`,
/// against the checked-in plugin header alone (`plugin-api/include`).
pub fn cc_plugin(dir: &Path, name: &str, source: &Path) -> PathBuf {
    let lib = dir.join(format!("lib{name}.so"));
    let out = Command::new("cc")
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread", "-I",
        ])
        .arg(root().join("plugin-api/include"))
        .arg("-o")
        .arg(&lib)
        .arg(source)
        .output()
        .expect("running the system C compiler `cc`");
    assert!(
        out.status.success(),
        "cc {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// Whether the tests run as root (the plugin trust rules apply only then).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// CPU time (user + system, in clock ticks) a process has used so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// The guest report's listeners as (fd, type, address), for exact comparisons.
pub fn sockets(report: &serde_json::Value) -> Vec<(i64, String, String)> {
    report["sockets"]
        .as_array()
        .expect("a guest report lists its sockets")
        .iter()
        .map(|s| {
            let text = |key: &str| s[key].as_str().unwrap_or_default().to_owned();
            (int(&s["fd"]), text("type"), text("address"))
        })
        .collect()
}

/// Clients sending requests to a TCP port in a loop, counting answers that contain
/// `expect` and keeping every failure, until stopped.
#[derive(Debug)]
pub struct Hammer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u32, Vec<String>)>,
}

impl Hammer {
    /// Starts hammering `addr`.
    pub fn start(addr: SocketAddr, expect: &'static str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut served, mut failed) = (0u32, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match http_get(addr, "/") {
                    Ok(body) if body.contains(expect) => served += 1,
                    other => failed.push(format!("{:?}", other.map_err(|e| e.to_string()))),
                }
            }
            (served, failed)
        });
        Self { stop, thread }
    }

    /// Stops; asserts that nothing failed and that more than `at_least` were served.
    /// Returns how many were served.
    pub fn finish(self, at_least: u32) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (served, failed) = self.thread.join().expect("the hammer thread");
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            served as usize + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(served > at_least, "only {served} requests served");
        served
    }
}

impl Daemon {
    /// SIGKILLs a guest from outside and waits until the daemon logged its stop
    /// (`killed by signal 9`) for `unit`.
    pub fn kill_guest_and_wait(&self, pid: i64, unit: &str) {
        // SAFETY: kill has no memory-safety preconditions; the pid is the guest's.
        unsafe { libc::kill(i32::try_from(pid).expect("pid fits"), libc::SIGKILL) };
        assert!(
            self.wait_log(
                &format!("guest stopped unit={unit}"),
                Duration::from_secs(10)
            ),
            "{}",
            self.log()
        );
        assert!(self.log().contains("killed by signal 9"), "{}", self.log());
    }
}

/// The fds the guest found open at its start, from its report.
pub fn open_fds(report: &serde_json::Value) -> Vec<i64> {
    report["open_fds"]
        .as_array()
        .expect("a guest report lists its open fds")
        .iter()
        .map(int)
        .collect()
}
