//! SIGTERM and SIGINT stop every guest through its plugin, then the daemon exits 0,
//! leaving no process behind.

use std::net::SocketAddr;
use std::time::Duration;

use portwake_tests::{alive, children, free_port, guest, info, int, wait_until, Daemon};

#[test]
fn sigterm_stops_every_guest_and_what_it_forked() {
    let (a, b) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let forked = dir.path().join("forked.pid");
    let mut daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "plain", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{a}")]),
            (name: "forks", plugin: "exec",
             options: (command: ["sh", "-c", "sleep 1000 & echo $! > {forked}; exec {guest}"]),
             listen: [Stream(address: "127.0.0.1:{b}")]),
        ])"#,
        guest = guest(),
        forked = forked.display()
    ))
    .unwrap();
    let pids = [
        int(&info(SocketAddr::from(([127, 0, 0, 1], a))).unwrap()["pid"]),
        int(&info(SocketAddr::from(([127, 0, 0, 1], b))).unwrap()["pid"]),
    ];
    let sleeper: i64 = std::fs::read_to_string(&forked)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pids.iter().all(|&p| alive(p)) && alive(sleeper));

    let status = daemon.terminate(Duration::from_secs(20)).unwrap();
    assert!(
        status.success(),
        "exit 0 after an orderly stop\n{}",
        daemon.log()
    );
    assert_eq!(daemon.count("guest stopped"), 2, "{}", daemon.log());
    assert!(wait_until(Duration::from_secs(2), || !pids
        .iter()
        .any(|&p| alive(p))));
    assert!(
        wait_until(Duration::from_secs(2), || !alive(sleeper)),
        "the guest's own child went too"
    );
}

#[test]
fn sigint_kills_a_guest_that_ignores_sigterm_after_its_stop_timeout() {
    let port = free_port();
    let mut daemon = Daemon::start(&format!(
        r#"(units: [(name: "stubborn", plugin: "exec",
            options: (command: ["sh", "-c", "trap '' TERM; exec {}"]),
            listen: [Stream(address: "127.0.0.1:{port}")],
            stop_timeout: "300ms")])"#,
        guest()
    ))
    .unwrap();
    let pid = int(&info(SocketAddr::from(([127, 0, 0, 1], port))).unwrap()["pid"]);
    daemon.signal(libc::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{}", daemon.log());
    assert!(
        daemon.log().contains("exit=killed by signal 9"),
        "{}",
        daemon.log()
    );
    assert!(!alive(pid));
    assert!(children(daemon.pid()).is_empty());
}
