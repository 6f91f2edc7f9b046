//! First contact: each kind of listener starts the guest, which gets exactly its
//! own fds, in order, with the right `LISTEN_*` variables.

use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};

use portwake_tests::{free_port, guest, info, int, sockets, udp_info, unix_info, Daemon};

#[test]
fn first_tcp_connection_is_served_by_a_fresh_guest_with_its_fds_in_order() {
    let (a, b) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [(
            name: "web",
            plugin: "exec",
            options: (command: ["{guest}"]),
            listen: [
                Stream(address: "127.0.0.1:{a}", name: "http"),
                Stream(address: "127.0.0.1:{b}", name: "admin"),
                Datagram(address: "127.0.0.1:{a}"),
            ],
        )])"#,
        guest = guest()
    ))
    .unwrap();
    assert_eq!(
        daemon.count("starting guest"),
        0,
        "nothing starts before a client"
    );

    let report = info(SocketAddr::from(([127, 0, 0, 1], b))).unwrap();
    let pid = int(&report["pid"]);
    assert_eq!(
        int(&report["listen_pid"]),
        pid,
        "LISTEN_PID is the guest's own pid"
    );
    assert_eq!(report["listen_fds"], "3");
    assert_eq!(
        report["listen_fdnames"], "http:admin:web",
        "names in config order; default = unit name"
    );
    assert_eq!(report["served_fd"], 4, "the second listener is fd 4");
    let sockets = sockets(&report);
    assert_eq!(
        sockets,
        [
            (3, "stream".into(), format!("127.0.0.1:{a}")),
            (4, "stream".into(), format!("127.0.0.1:{b}")),
            (5, "datagram".into(), format!("127.0.0.1:{a}")),
        ]
    );
    assert!(daemon.wait_log("guest started", std::time::Duration::from_secs(5)));
    assert_eq!(daemon.count("starting guest"), 1);
}

#[test]
fn first_datagram_reaches_the_guest() {
    let port = free_port();
    let _daemon = Daemon::start(&format!(
        r#"(units: [(name: "dns", plugin: "exec", options: (command: ["{}"]),
            listen: [Datagram(address: "127.0.0.1:{port}", name: "dns")])])"#,
        guest()
    ))
    .unwrap();
    let report = udp_info(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    assert_eq!(report["served_name"], "dns");
    assert_eq!(report["sockets"][0]["type"], "datagram");
}

#[test]
fn unix_path_with_mode_and_abstract_and_seqpacket_sockets_activate() {
    let abstract_name = format!("portwake-test-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/api.sock");
    let seq = dir.path().join("seq.sock");
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "api", plugin: "exec", options: (command: ["{guest}"]),
            listen: [
                Stream(address: "{path}", name: "api", mode: 0o640, group: "0"),
                Stream(address: "@{abstract_name}", name: "abstract"),
                SequentialPacket(address: "{seq}", name: "seq"),
            ])])"#,
        guest = guest(),
        path = path.display(),
        seq = seq.display(),
    ))
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "socket file mode applied");

    let report = unix_info(UnixStream::connect(&path).unwrap()).unwrap();
    assert_eq!(report["served_name"], "api");
    assert_eq!(report["sockets"][1]["address"], format!("@{abstract_name}"));
    assert_eq!(report["sockets"][2]["type"], "seqpacket");

    let addr = UnixAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
    let report = unix_info(UnixStream::connect_addr(&addr).unwrap()).unwrap();
    assert_eq!(report["served_name"], "abstract");

    let reply = portwake_tests::seqpacket_ask(&seq, b"info").unwrap();
    let report: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(report["served_name"], "seq");
    assert_eq!(
        daemon.count("starting guest"),
        1,
        "one guest serves all three"
    );
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_regular_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "the stale socket file stays behind");
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "s", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "{}")])])"#,
        guest(),
        stale.display()
    ))
    .unwrap();
    let report = unix_info(UnixStream::connect(&stale).unwrap()).unwrap();
    assert_eq!(report["served_name"], "s");
    drop(daemon);

    let regular = dir.path().join("regular");
    std::fs::write(&regular, "keep me").unwrap();
    let mut daemon = Daemon::spawn(&format!(
        r#"(units: [(name: "r", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "{}")])])"#,
        guest(),
        regular.display()
    ))
    .unwrap();
    let status = daemon
        .wait_exit(std::time::Duration::from_secs(10))
        .unwrap();
    assert!(!status.success());
    assert!(
        daemon.log().contains(&format!(
            "Stream {}: {} exists and is not a socket; refusing to replace it",
            regular.display(),
            regular.display()
        )),
        "{}",
        daemon.log()
    );
    assert_eq!(std::fs::read_to_string(&regular).unwrap(), "keep me");
}

#[test]
fn bare_port_listens_dual_stack_on_127_0_0_1_and_ipv6_loopback() {
    let port = free_port();
    let _daemon = Daemon::start(&format!(
        r#"(units: [(name: "dual", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "{port}", name: "any")])])"#,
        guest()
    ))
    .unwrap();
    let v4 = info(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    let v6 = info(format!("[::1]:{port}").parse().unwrap()).unwrap();
    assert_eq!(v4["sockets"][0]["address"], format!("[::]:{port}"));
    assert_eq!(v4["pid"], v6["pid"], "one guest on one dual-stack socket");
}

#[test]
fn the_guest_sees_only_stdio_and_its_own_listeners() {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let dir = tempfile::tempdir().unwrap();
    let units: Vec<String> = (0..3)
        .map(|i| {
            format!(
                r#"(name: "u{i}", plugin: "exec", options: (command: ["{}"]),
                    listen: [Stream(address: "127.0.0.1:{}"), Stream(address: "{}/u{i}.sock")])"#,
                guest(),
                ports[i],
                dir.path().display()
            )
        })
        .collect();
    let _daemon = Daemon::start(&format!("(units: [{}])", units.join(",\n"))).unwrap();
    // Start u0 and u2 so that other guests and worker threads exist too.
    info(SocketAddr::from(([127, 0, 0, 1], ports[0]))).unwrap();
    let report = info(SocketAddr::from(([127, 0, 0, 1], ports[2]))).unwrap();
    let open = portwake_tests::open_fds(&report);
    assert_eq!(
        open,
        [0, 1, 2, 3, 4],
        "only stdio and its own two listeners"
    );
    assert_eq!(
        report["sockets"][0]["address"],
        format!("127.0.0.1:{}", ports[2])
    );
    assert_eq!(
        report["sockets"][1]["address"],
        format!("{}/u2.sock", dir.path().display())
    );
}

#[test]
fn every_fd_of_the_daemon_is_close_on_exec() {
    let (port, other) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "a", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{port}"), Datagram(address: "127.0.0.1:{port}"),
                      Stream(address: "{}/a.sock"), SequentialPacket(address: "@pw-cloexec-{port}")]),
            (name: "b", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{other}")], idle_stop: "1h"),
        ])"#,
        dir.path().display(),
        guest = guest()
    ))
    .unwrap();
    // A running guest, a status request (sock_diag) and the control socket in use.
    info(SocketAddr::from(([127, 0, 0, 1], other))).unwrap();
    assert_eq!(daemon.status()["units"][1]["state"], "running");
    let fds: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    assert!(
        fds.len() >= 8,
        "listeners, epoll, waker, signal pipe, control: {fds:?}"
    );
    for fd in fds {
        let Ok(info) = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", daemon.pid()))
        else {
            continue; // closed meanwhile
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        let target =
            std::fs::read_link(format!("/proc/{}/fd/{fd}", daemon.pid())).unwrap_or_default();
        assert_ne!(
            flags & 0o2_000_000,
            0,
            "fd {fd} ({}) lacks O_CLOEXEC",
            target.display()
        );
    }
}
