//! Operating the daemon: the control socket and its commands, reload, idle stop,
//! and living under a supervisor (LISTEN_FDS, NOTIFY_SOCKET and the fd store).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use portwake_tests::{
    alive, free_port, guest, http_get, info, int, portwake, wait_until, Daemon, Hammer,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn one_unit(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"(name: "{name}", plugin: "exec", options: (command: ["{}"{extra}]),
            listen: [Stream(address: "127.0.0.1:{port}")])"#,
        guest()
    )
}

#[test]
fn control_commands_start_stop_hold_and_report() {
    let port = free_port();
    let daemon = Daemon::start(&format!("(units: [{}])", one_unit("web", port, ""))).unwrap();
    let status = daemon.unit_status("web");
    assert_eq!(status["state"], "listening");
    assert_eq!(
        status["listeners"][0]["address"],
        format!("127.0.0.1:{port}")
    );
    assert_eq!(status["activations"], 0);

    // start without a client
    let (code, out) = daemon.ctl(&["start", "web"]);
    assert_eq!((code, out.trim()), (0, "web: starting"));
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("web")["state"]
        == "running"));
    let pid = int(&daemon.unit_status("web")["pid"]);
    assert!(alive(pid));

    // stop: the guest goes, the unit listens again
    let (code, _) = daemon.ctl(&["stop", "web"]);
    assert_eq!(code, 0);
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("web")["state"]
        == "listening"));
    assert!(wait_until(Duration::from_secs(2), || !alive(pid)));

    // hold: a client waits in the backlog, nothing starts, status counts it
    let (code, out) = daemon.ctl(&["stop", "--hold", "web"]);
    assert_eq!((code, out.trim()), (0, "web: held"));
    let waiting = std::thread::spawn(move || http_get(local(port), "/"));
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("web")["listeners"][0]["queued"]
        == 1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.unit_status("web")["state"], "held");
    let (_, table) = daemon.ctl(&["status"]);
    assert!(
        table.contains("web") && table.contains("held") && table.contains("1 waiting"),
        "{table}"
    );

    // start ends the hold and serves the waiting client
    assert_eq!(daemon.ctl(&["start", "web"]).0, 0);
    let answer = waiting.join().unwrap().unwrap();
    assert!(answer.starts_with("hello from web"), "{answer}");
    assert_eq!(daemon.unit_status("web")["activations"], 2);

    let (code, out) = daemon.ctl(&["stop", "nosuch"]);
    assert_eq!((code, out.trim()), (1, "portwake: no unit \"nosuch\""));

    let (code, metrics) = daemon.ctl(&["status", "--prometheus"]);
    assert_eq!(code, 0);
    assert!(
        metrics.contains("portwake_activations_total{unit=\"web\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portwake_unit_running{unit=\"web\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portwake_activation_seconds_count{unit=\"web\"} 2"),
        "{metrics}"
    );
    // Both starts were an admin's: nothing went through dispatch yet.
    assert!(
        metrics.contains("portwake_dispatch_seconds_count{unit=\"web\"} 0"),
        "{metrics}"
    );

    // A client's start is timed from the loop's wake-up to the plugin call.
    assert_eq!(daemon.ctl(&["stop", "web"]).0, 0);
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("web")["state"]
        == "listening"));
    let answer = http_get(local(port), "/").unwrap();
    assert!(answer.contains("hello from web"), "{answer}");
    let (_, metrics) = daemon.ctl(&["status", "--prometheus"]);
    assert!(
        metrics.contains("portwake_dispatch_seconds_count{unit=\"web\"} 1"),
        "{metrics}"
    );
    let dispatch = &daemon.unit_status("web")["dispatch_seconds"];
    assert_eq!(dispatch["count"], 1, "{dispatch}");
    let took = dispatch["sum"].as_f64().unwrap();
    assert!(took > 0.0 && took < 1.0, "{dispatch}");
}

#[test]
fn control_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock").display().to_string();
    let (code, out) = portwake(&["status", "--socket", &socket]);
    assert_eq!(code, 1);
    assert_eq!(
        out.trim(),
        format!("portwake: portwake is not running (nothing answers on {socket})")
    );

    let daemon = Daemon::start(&format!("(units: [{}])", one_unit("x", free_port(), ""))).unwrap();
    let control = daemon.control_socket();
    let mode = std::fs::metadata(&control)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.unwrap(), 0o600);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the peer-credential check: needs root to act as another user");
        return;
    }
    // Open the file mode so that only the daemon's credential check stands in the way.
    std::fs::set_permissions(
        &control,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    std::fs::set_permissions(
        daemon.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = std::process::Command::new(portwake_tests::artifact("portwake"))
        .args(["status", "--socket"])
        .arg(&control)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "portwake: {}: permission denied: run as root or as the daemon's user",
            control.display()
        )
    );
    assert!(
        daemon.wait_log(
            "control request refused: not root or the daemon's user uid=65534",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
}

#[test]
fn reload_applies_the_difference_and_keeps_a_bad_config_out() {
    let (kept, added) = (free_port(), free_port());
    let removed = free_port();
    let daemon = Daemon::start(&format!(
        "(units: [{}, {}])",
        one_unit("kept", kept, ""),
        one_unit("gone", removed, "")
    ))
    .unwrap();
    let before = info(local(kept)).unwrap();

    // A bad config is refused, the old one stays in force.
    daemon.write_config("(units: [(name: \"kept\", plugin: \"exec\", listen: [], colour: 1)])");
    let (code, out) = daemon.ctl(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("reload refused, the old config stays in force:") && out.contains("colour"),
        "{out}"
    );
    // A busy port is refused and named, too.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    daemon.write_config(&format!(
        "(units: [{}, {}])",
        one_unit("kept", kept, ""),
        one_unit("new", busy_port, "")
    ));
    let (code, out) = daemon.ctl(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!(
            "Stream 127.0.0.1:{busy_port}: address already in use"
        )),
        "{out}"
    );
    assert_eq!(daemon.status()["units"].as_array().unwrap().len(), 2);
    assert!(
        http_get(local(removed), "/").is_ok(),
        "the old unit still serves"
    );

    // A good config: one unit changes its options (applied at the next start), one
    // is removed (its port closes), one is added.
    daemon.write_config(&format!(
        "(units: [{}, {}])",
        one_unit("kept", kept, r#", "--say", "bonjour""#),
        one_unit("added", added, "")
    ));
    let (code, out) = daemon.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        "reloaded: 1 added, 1 removed, 0 changed now, 1 at their guest's next stop, 0 unchanged"
    );
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(local(
            removed
        ))
        .is_err()),
        "removed unit's port closed"
    );
    assert!(http_get(local(added), "/")
        .unwrap()
        .starts_with("hello from added"));
    // The running guest of "kept" is the same and still says hello ...
    assert_eq!(info(local(kept)).unwrap()["pid"], before["pid"]);
    assert!(daemon.unit_status("kept")["reload_pending"] == true);
    // ... until it stops; the next one has the new options.
    assert_eq!(daemon.ctl(&["stop", "kept"]).0, 0);
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("kept")["state"]
        == "listening"));
    assert!(http_get(local(kept), "/")
        .unwrap()
        .starts_with("bonjour from kept"));

    // SIGHUP reloads too.
    daemon.write_config(&format!(
        "(units: [{}])",
        one_unit("kept", kept, r#", "--say", "bonjour""#)
    ));
    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_log("SIGHUP: reloaded", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect(
        local(added)
    )
    .is_err()));
}

#[test]
fn clients_hammering_through_reloads_are_never_refused() {
    let port = free_port();
    let config = |say: &str| {
        format!(
            "(units: [{}])",
            one_unit("busy", port, &format!(r#", "--say", "{say}""#))
        )
    };
    let daemon = Daemon::start(&config("a")).unwrap();
    let hammer = Hammer::start(local(port), " from busy");
    for round in 0..10 {
        daemon.write_config(&config(if round % 2 == 0 { "b" } else { "a" }));
        assert_eq!(daemon.ctl(&["reload"]).0, 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let served = hammer.finish(50);
    eprintln!("MEASURED reload hammer: {served} requests, 0 refused, 0 lost across 10 reloads");
}

#[test]
fn idle_stop_waits_for_the_last_open_connection() {
    let (port, other) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "idle", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "127.0.0.1:{port}"), Stream(address: "{}")],
            idle_stop: "1s"),
            {}])"#,
        guest(),
        sock.display(),
        one_unit("other", other, "")
    ))
    .unwrap();
    // An open, idle TCP connection keeps the guest running well past idle_stop.
    let mut tcp = TcpStream::connect(local(port)).unwrap();
    tcp.write_all(b"hold\n").unwrap();
    let mut line = String::new();
    BufReader::new(&tcp).read_line(&mut line).unwrap();
    assert_eq!(line, "holding\n");
    let pid = int(&daemon.unit_status("idle")["pid"]);
    // A busy neighbour's connections do not count for this unit.
    let _neighbour = info(local(other)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        daemon.unit_status("idle")["state"],
        "running",
        "{}",
        daemon.log()
    );
    // Hand over to a unix connection, then close the TCP one: still busy.
    let mut unix = UnixStream::connect(&sock).unwrap();
    unix.write_all(b"hold\n").unwrap();
    let mut line = String::new();
    BufReader::new(&unix).read_line(&mut line).unwrap();
    drop(tcp);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        daemon.unit_status("idle")["state"],
        "running",
        "{}",
        daemon.log()
    );
    // After the last connection closes, idle_stop later the guest is stopped.
    let closed = std::time::Instant::now();
    drop(unix);
    assert!(
        daemon.wait_log(
            "idle: no connection for idle_stop unit=idle",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
    let after = closed.elapsed();
    assert!(
        after >= Duration::from_secs(1),
        "stopped {after:?} after the last close\n{}",
        daemon.log()
    );
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("idle")["state"]
        == "listening"));
    assert!(!alive(pid));
    assert_eq!(daemon.unit_status("idle")["idle_stops"], 1);
    assert_eq!(
        daemon.unit_status("other")["state"],
        "running",
        "no idle_stop, no stop"
    );
    eprintln!("MEASURED idle stop {after:?} after the last connection closed (idle_stop 1s)");
    // The next client starts it again.
    assert!(http_get(local(port), "/")
        .unwrap()
        .starts_with("hello from idle"));
}

/// Receives notify messages (with any fds) on a datagram socket.
fn receive_notifications(socket: &UnixDatagram, until: &str) -> Vec<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut messages = Vec::new();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("a notify message");
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: SCM_RIGHTS installed these fds in this process for us to own.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let done = text.contains(until);
        messages.push((text, fds));
        if done {
            return messages;
        }
    }
}

#[test]
fn the_supervisor_hears_ready_status_stopping_and_gets_every_listener_in_its_fd_store() {
    let (a, b) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut daemon = Daemon::start_with(
        &format!(
            r#"(units: [(name: "svc", plugin: "exec", options: (command: ["{}"]),
                listen: [Stream(address: "127.0.0.1:{a}"), Datagram(address: "127.0.0.1:{b}")])])"#,
            guest()
        ),
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &notify_path);
        },
    )
    .unwrap();
    let messages = receive_notifications(&notify, "READY=1");
    let stored: Vec<&(String, Vec<OwnedFd>)> = messages
        .iter()
        .filter(|(t, _)| t.contains("FDSTORE=1"))
        .collect();
    assert_eq!(stored.len(), 2, "{messages:?}");
    assert!(
        stored[0]
            .0
            .contains(&format!("FDNAME=svc/Stream/127.0.0.1_{a}")),
        "{}",
        stored[0].0
    );
    assert!(
        stored[1]
            .0
            .contains(&format!("FDNAME=svc/Datagram/127.0.0.1_{b}")),
        "{}",
        stored[1].0
    );
    // The stored fd is the listener itself: a client of it is served by the guest.
    let copy = stored[0].1.first().expect("one fd per FDSTORE message");
    let bound = socket2::SockRef::from(copy)
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap();
    assert_eq!(bound, local(a));
    let ready = &messages.last().unwrap().0;
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=1 units, 0 running, 2 listeners"),
        "{ready}"
    );
    daemon.signal(libc::SIGTERM);
    let stopping = receive_notifications(&notify, "STOPPING=1");
    assert!(stopping.last().unwrap().0.contains("STOPPING=1"));
    assert!(daemon.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn sockets_handed_over_with_listen_fds_are_adopted_by_address() {
    let (a, b) = (free_port(), free_port());
    let first = TcpListener::bind(local(a)).unwrap();
    let second = TcpListener::bind(local(b)).unwrap();
    let (fd_a, fd_b) = (first.as_raw_fd(), second.as_raw_fd());
    let daemon = Daemon::start_with(
        &format!(
            r#"(units: [(name: "handed", plugin: "exec", options: (command: ["{}"]),
                listen: [Stream(address: "127.0.0.1:{b}"), Stream(address: "127.0.0.1:{a}")])])"#,
            guest()
        ),
        |cmd| {
            // As a supervisor does: the sockets at 3 and 4, LISTEN_PID = the daemon's pid
            // (the shell sets it to its own pid, then execs the daemon in its place).
            let program = cmd.get_program().to_owned();
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let mut wrapped = std::process::Command::new("sh");
            wrapped
                .arg("-c")
                .arg(r#"LISTEN_PID=$$ LISTEN_FDS=2 exec "$0" "$@""#)
                .arg(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
            unsafe {
                wrapped.pre_exec(move || {
                    // Lift both above 3 and 4 first, so neither dup2 clobbers the other.
                    let (high_a, high_b) = (
                        libc::fcntl(fd_a, libc::F_DUPFD, 100),
                        libc::fcntl(fd_b, libc::F_DUPFD, 100),
                    );
                    if high_a < 0
                        || high_b < 0
                        || libc::dup2(high_a, 3) < 0
                        || libc::dup2(high_b, 4) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            *cmd = wrapped;
        },
    )
    .unwrap();
    drop((first, second));
    let log = daemon.log();
    assert_eq!(daemon.count("inherited listener"), 2, "{log}");
    assert_eq!(daemon.count("bound"), 2, "{log}");
    let report = info(local(a)).unwrap();
    assert_eq!(
        report["sockets"][0]["address"],
        format!("127.0.0.1:{b}"),
        "config order, not fd order"
    );
    assert_eq!(report["sockets"][1]["address"], format!("127.0.0.1:{a}"));
}

#[test]
fn a_live_restart_keeps_listeners_and_adopts_the_running_guest_without_refusing_anyone() {
    let (port, other) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        "(units: [{}, {}])",
        one_unit("busy", port, ""),
        one_unit("quiet", other, "")
    ))
    .unwrap();
    let before = info(local(port)).unwrap();
    let guest_pid = int(&before["pid"]);
    let instance = daemon.status()["instance"].clone();
    let hammer = Hammer::start(local(port), "hello from busy");
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..3 {
        let (code, out) = daemon.ctl(&["restart"]);
        assert_eq!(code, 0, "round {round}: {out}\n{}", daemon.log());
        assert!(out.starts_with("restarted in "), "{out}");
        eprintln!("MEASURED live restart round {round}: {}", out.trim());
        std::thread::sleep(Duration::from_millis(200));
    }
    let served = hammer.finish(50);
    eprintln!(
        "MEASURED live restart hammer: {served} requests, 0 refused, 0 lost across 3 restarts"
    );
    let status = daemon.status();
    assert_ne!(status["instance"], instance, "a new image answers");
    assert_eq!(
        status["pid"],
        daemon.pid(),
        "same process: the guest is still its child"
    );
    // The same guest serves on, adopted, and the unit without a guest still listens.
    assert_eq!(
        daemon.count("adopted a running guest unit=busy"),
        3,
        "{}",
        daemon.log()
    );
    assert_eq!(int(&info(local(port)).unwrap()["pid"]), guest_pid);
    assert_eq!(daemon.unit_status("busy")["state"], "running");
    assert_eq!(daemon.unit_status("quiet")["state"], "listening");
    // The adopted guest is really tracked: stopping it works and is reported.
    assert_eq!(daemon.ctl(&["stop", "busy"]).0, 0);
    assert!(wait_until(Duration::from_secs(5), || !alive(guest_pid)));
    assert!(wait_until(Duration::from_secs(5), || daemon
        .unit_status("busy")["state"]
        == "listening"));
    assert!(http_get(local(other), "/")
        .unwrap()
        .starts_with("hello from quiet"));
    assert_ne!(
        int(&info(local(port)).unwrap()["pid"]),
        guest_pid,
        "a new guest after the stop"
    );
}

#[test]
fn json_logs_carry_the_unit_as_a_field() {
    let port = free_port();
    let mut daemon =
        Daemon::start_with(&format!("(units: [{}])", one_unit("js", port, "")), |cmd| {
            cmd.args(["--log-format", "json"]);
        })
        .unwrap();
    assert!(http_get(local(port), "/")
        .unwrap()
        .starts_with("hello from js"));
    assert!(daemon.wait_log("guest started", Duration::from_secs(5)));
    daemon.terminate(Duration::from_secs(10)).unwrap();
    let events: Vec<serde_json::Value> = daemon
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let started = events
        .iter()
        .find(|e| e["fields"]["message"] == "guest started")
        .expect("a guest started event");
    assert_eq!(started["fields"]["unit"], "js");
    assert_eq!(started["level"], "INFO");
    assert!(started["fields"]["pid"].as_i64().unwrap() > 0);
}
