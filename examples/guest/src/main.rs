//! `hello-guest`: a small socket-activated server, the guest of the quickstart and
//! of most tests. It takes its listeners from `LISTEN_FDS` as `sd_listen_fds(3)`
//! does and answers on each: HTTP `hello from <fd name> (pid N)`, or a JSON report
//! of what it was handed for `GET /info` (a datagram or packet starting with `info`).
//!
//! Flags, all optional:
//! `--startup-delay-ms N` sleep before serving (a slow guest);
//! `--exit-after N` exit after N answers; `--exit-immediately` exit at once (status 3);
//! `--require FILE` exit 1 at start unless FILE exists (a broken guest, fixable);
//! `--record-starts FILE` append `pid` to FILE at each start;
//! `--say WORD` answer `WORD from <fd name>` instead of `hello from …`;
//! `--shutdown-listeners-once FILE` the first time (FILE absent), `shutdown(2)` every
//! listener and exit, as a buggy guest might.
//!
//! A request starting with `hold` is answered `holding` and the connection then
//! stays open until the client closes it (an idle but open connection).

use std::ffi::CStr;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// First fd passed by the activator, as in `sd_listen_fds(3)`.
const SD_LISTEN_FDS_START: RawFd = 3;

#[derive(Default)]
struct Flags {
    startup_delay: Duration,
    exit_after: Option<u64>,
    exit_immediately: bool,
    require: Option<String>,
    record_starts: Option<String>,
    say: Option<String>,
    shutdown_once: Option<String>,
}

/// What this process was handed, reported by `/info`.
struct Report {
    pid: u32,
    greeting: String,
    listen_pid: Option<String>,
    listen_fds: Option<String>,
    listen_fdnames: Option<String>,
    open_fds: Vec<i32>,
    pid_namespace: String,
    sockets: Vec<(RawFd, &'static str, String, String)>,
}

fn main() {
    // Taken first, before this process opens anything of its own.
    let open_fds = open_fds();
    let flags = parse_flags();
    let pid = std::process::id();
    if let Some(path) = &flags.record_starts {
        let line = format!("{pid}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    if let Some(path) = &flags.require {
        if !std::path::Path::new(path).exists() {
            eprintln!("hello-guest: {path} is missing, exiting");
            std::process::exit(1);
        }
    }
    if flags.exit_immediately {
        std::process::exit(3);
    }
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let n = listen_fds(listen_pid.as_deref(), pid);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let sockets = (0..n)
        .map(|i| {
            let fd = SD_LISTEN_FDS_START + i;
            let name = names
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            (fd, socket_type(fd), local_address(fd), name)
        })
        .collect();
    let report = Arc::new(Report {
        pid,
        greeting: flags.say.clone().unwrap_or_else(|| "hello".into()),
        listen_pid,
        listen_fds: std::env::var("LISTEN_FDS").ok(),
        listen_fdnames: std::env::var("LISTEN_FDNAMES").ok(),
        open_fds,
        pid_namespace: std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        sockets,
    });
    if n == 0 {
        eprintln!("hello-guest: no listening fds (LISTEN_FDS/LISTEN_PID not for me)");
        std::process::exit(2);
    }
    if let Some(marker) = &flags.shutdown_once {
        // Misbehave once: shut the shared listeners down (which stops them listening
        // for every holder) and exit, as a buggy guest might.
        if !std::path::Path::new(marker).exists() {
            let _ = std::fs::write(marker, "done");
            for (fd, _, _, _) in &report.sockets {
                // SAFETY: shutdown on an fd handed to this process.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
            std::process::exit(0);
        }
    }
    std::thread::sleep(flags.startup_delay);
    let answered = Arc::new(AtomicU64::new(0));
    let exit_after = flags.exit_after;
    let threads: Vec<_> = report
        .sockets
        .iter()
        .map(|(fd, kind, _, name)| {
            // SAFETY: fds 3..3+LISTEN_FDS were handed to this process for it to own.
            let listener = unsafe { OwnedFd::from_raw_fd(*fd) };
            set_blocking(listener.as_raw_fd());
            let (kind, name) = (*kind, name.clone());
            let (report, answered) = (Arc::clone(&report), Arc::clone(&answered));
            std::thread::spawn(move || {
                serve(&listener, kind, &name, &report, &|| {
                    let done = answered.fetch_add(1, Ordering::SeqCst) + 1;
                    if exit_after.is_some_and(|limit| done >= limit) {
                        std::process::exit(0);
                    }
                })
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn parse_flags() -> Flags {
    let mut flags = Flags::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--startup-delay-ms" => {
                flags.startup_delay = Duration::from_millis(number(&value()));
            }
            "--exit-after" => flags.exit_after = Some(number(&value())),
            "--exit-immediately" => flags.exit_immediately = true,
            "--require" => flags.require = Some(value()),
            "--record-starts" => flags.record_starts = Some(value()),
            "--say" => flags.say = Some(value()),
            "--shutdown-listeners-once" => flags.shutdown_once = Some(value()),
            other => die(&format!("unknown flag {other}")),
        }
    }
    flags
}

fn number(s: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| die(&format!("{s} is not a number")))
}

fn die(message: &str) -> ! {
    eprintln!("hello-guest: {message}");
    std::process::exit(64)
}

/// `sd_listen_fds(3)`: the count, only if `LISTEN_PID` names this process.
fn listen_fds(listen_pid: Option<&str>, pid: u32) -> i32 {
    if listen_pid.and_then(|p| p.parse::<u32>().ok()) != Some(pid) {
        return 0;
    }
    std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn open_fds() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    // The directory handle itself was the highest fd while listing it.
    fds.pop();
    fds
}

fn serve(listener: &OwnedFd, kind: &str, name: &str, report: &Report, answered: &dyn Fn()) {
    let fd = listener.as_raw_fd();
    loop {
        match kind {
            "datagram" => {
                let mut buf = [0u8; 2048];
                let Some((len, peer, peer_len)) = recv_from(fd, &mut buf) else {
                    continue;
                };
                let reply = answer(&buf[..len], fd, name, report, false);
                send_to(fd, reply.as_bytes(), &peer, peer_len);
                answered();
            }
            _ => {
                // SAFETY: accept on our listening fd; null address arguments are allowed.
                let conn = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    continue;
                }
                // SAFETY: accept4 returned a new fd that nothing else owns.
                let conn = unsafe { OwnedFd::from_raw_fd(conn) };
                let mut file = std::fs::File::from(conn);
                let request = read_request(&mut file, kind == "seqpacket");
                if request.starts_with(b"hold") {
                    // Answer, then keep the connection open on a thread of its own.
                    let _ = file.write_all(b"holding\n");
                    answered();
                    std::thread::spawn(move || {
                        let _ = set_read_timeout(&file, 0);
                        let mut sink = [0u8; 256];
                        while matches!(file.read(&mut sink), Ok(n) if n > 0) {}
                    });
                    continue;
                }
                let reply = answer(&request, fd, name, report, kind == "stream");
                let _ = file.write_all(reply.as_bytes());
                answered();
            }
        }
    }
}

/// Reads an HTTP request head (or one packet), bounded in time and size.
fn read_request(file: &mut std::fs::File, one_packet: bool) -> Vec<u8> {
    set_read_timeout(file, 2);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = file.read(&mut buf) {
        request.extend_from_slice(&buf[..n]);
        if n == 0
            || one_packet
            || request.windows(4).any(|w| w == b"\r\n\r\n")
            || (!request.starts_with(b"GET ") && request.ends_with(b"\n"))
            || request.len() > 65536
        {
            break;
        }
    }
    request
}

/// `SO_RCVTIMEO` in seconds; 0 waits for ever.
fn set_read_timeout(file: &std::fs::File, seconds: i64) -> i32 {
    let timeout = libc::timeval {
        tv_sec: seconds,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval of the right size on our own socket.
    unsafe {
        libc::setsockopt(
            file.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0),
        )
    }
}

fn answer(request: &[u8], fd: RawFd, name: &str, report: &Report, http: bool) -> String {
    let wants_info = request.starts_with(b"info") || request.starts_with(b"GET /info");
    let body = if wants_info {
        info_json(fd, name, report)
    } else {
        format!("{} from {name} (pid {})\n", report.greeting, report.pid)
    };
    if http && request.starts_with(b"GET ") {
        let kind = if wants_info {
            "application/json"
        } else {
            "text/plain"
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    }
}

fn info_json(fd: RawFd, name: &str, report: &Report) -> String {
    let sockets: Vec<_> = report
        .sockets
        .iter()
        .map(|(fd, kind, address, name)| {
            serde_json::json!({"fd": fd, "type": kind, "address": address, "name": name})
        })
        .collect();
    let mut json = serde_json::json!({
        "pid": report.pid,
        "served_fd": fd,
        "served_name": name,
        "listen_pid": report.listen_pid,
        "listen_fds": report.listen_fds,
        "listen_fdnames": report.listen_fdnames,
        "open_fds": report.open_fds,
        "pid_namespace": report.pid_namespace,
        "sockets": sockets,
    })
    .to_string();
    json.push('\n');
    json
}

fn set_blocking(fd: RawFd) {
    // SAFETY: fcntl flag calls on an fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

fn socket_type(fd: RawFd) -> &'static str {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    match (r, value) {
        (0, libc::SOCK_STREAM) => "stream",
        (0, libc::SOCK_DGRAM) => "datagram",
        (0, libc::SOCK_SEQPACKET) => "seqpacket",
        _ => "unknown",
    }
}

/// The bound address in systemd's spelling.
fn local_address(fd: RawFd) -> String {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>()).unwrap_or(0);
    // SAFETY: getsockname writes at most `len` bytes into `storage`.
    if unsafe { libc::getsockname(fd, std::ptr::from_mut(&mut storage).cast(), &mut len) } < 0 {
        return String::new();
    }
    format_address(&storage, usize::try_from(len).unwrap_or(0))
}

fn format_address(storage: &libc::sockaddr_storage, len: usize) -> String {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))).to_string()
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0)).to_string()
        }
        libc::AF_UNIX => {
            // SAFETY: the family says this storage holds a sockaddr_un.
            let sun = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_un>() };
            let path_len = len.saturating_sub(std::mem::size_of::<libc::sa_family_t>());
            let bytes: Vec<u8> = sun.sun_path[..path_len.min(sun.sun_path.len())]
                .iter()
                .map(|&c| c.to_ne_bytes()[0])
                .collect();
            match bytes.split_first() {
                Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
                _ => CStr::from_bytes_until_nul(&bytes)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned()),
            }
        }
        other => format!("family {other}"),
    }
}

fn recv_from(
    fd: RawFd,
    buf: &mut [u8],
) -> Option<(usize, libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut peer_len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>()).ok()?;
    // SAFETY: recvfrom writes at most buf.len() bytes and at most peer_len address bytes.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            std::ptr::from_mut(&mut peer).cast(),
            &mut peer_len,
        )
    };
    Some((usize::try_from(n).ok()?, peer, peer_len))
}

fn send_to(fd: RawFd, data: &[u8], peer: &libc::sockaddr_storage, peer_len: libc::socklen_t) {
    // SAFETY: sendto reads data.len() bytes and peer_len address bytes we own.
    unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            std::ptr::from_ref(peer).cast(),
            peer_len,
        )
    };
}
