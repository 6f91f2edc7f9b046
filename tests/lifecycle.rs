//! After the first start: re-activation, bursts of clients, slow plugins, start
//! loops and failing plugins.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use portwake_tests::{free_port, guest, http_get, info, int, wait_until, Daemon};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_guest_that_exits_is_started_again_by_the_next_client() {
    let port = free_port();
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "once", plugin: "exec",
            options: (command: ["{}", "--exit-after", "1"]),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest()
    ))
    .unwrap();
    let mut pids = Vec::new();
    for round in 1..=4 {
        let report = info(local(port)).unwrap();
        pids.push(int(&report["pid"]));
        assert!(
            daemon.wait_count("guest stopped", round, Duration::from_secs(10)),
            "round {round}: the guest exits after one answer\n{}",
            daemon.log()
        );
    }
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "a new guest each time: {pids:?}");
    assert_eq!(daemon.count("starting guest"), 4);
}

#[test]
fn five_hundred_clients_arriving_during_a_slow_start_are_all_served() {
    let port = free_port();
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "slow", plugin: "exec",
            options: (command: ["{}", "--startup-delay-ms", "500"]),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest()
    ))
    .unwrap();
    let clients: Vec<_> = (0..500)
        .map(|_| std::thread::spawn(move || http_get(local(port), "/")))
        .collect();
    let answers: Vec<String> = clients
        .into_iter()
        .map(|c| c.join().unwrap().unwrap())
        .collect();
    assert!(
        answers
            .iter()
            .all(|a| a.starts_with("hello from slow (pid ")),
        "{answers:?}"
    );
    let first = &answers[0];
    assert!(
        answers.iter().all(|a| a == first),
        "one guest served all 500"
    );
    assert_eq!(daemon.count("starting guest"), 1);
}

#[test]
fn a_unit_whose_start_takes_two_seconds_does_not_delay_another() {
    let (slow, fast) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "slow", plugin: "testkit",
             options: (command: ["{guest}"], activate_delay_ms: 2000),
             listen: [Stream(address: "127.0.0.1:{slow}")]),
            (name: "fast", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{fast}")]),
        ])"#,
        guest = guest()
    ))
    .unwrap();
    let slow_client = std::thread::spawn(move || http_get(local(slow), "/"));
    assert!(daemon.wait_log("starting guest unit=slow", Duration::from_secs(5)));
    let answer = http_get(local(fast), "/").unwrap();
    assert!(answer.starts_with("hello from fast"), "{answer}");
    assert_eq!(
        daemon.count("guest started unit=slow"),
        0,
        "the fast unit answered while the slow one was still starting\n{}",
        daemon.log()
    );
    let answer = slow_client.join().unwrap().unwrap();
    assert!(answer.starts_with("hello from slow"), "{answer}");
}

#[test]
fn a_start_loop_backs_off_and_recovers_once_the_guest_is_fixed() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (fixed, starts) = (dir.path().join("fixed"), dir.path().join("starts"));
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "loop", plugin: "exec",
            options: (command: ["{}", "--require", "{}", "--record-starts", "{}"]),
            listen: [Stream(address: "127.0.0.1:{port}")],
            backoff: (initial: "1s", max: "8s"))])"#,
        guest(),
        fixed.display(),
        starts.display()
    ))
    .unwrap();
    let count_starts = || {
        std::fs::read_to_string(&starts)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    // One client waits in the backlog throughout; every guest exits at once.
    let client = std::thread::spawn(move || {
        let stream = TcpStream::connect(local(port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        portwake_tests::http_over(stream, "/")
    });
    assert!(
        daemon.wait_log("trigger limit hit", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    assert_eq!(
        count_starts(),
        20,
        "systemd's default burst: 20 starts, then backoff"
    );
    assert!(daemon.wait_log(
        "backing off before listening again unit=loop step=1 delay_ms=1000",
        Duration::from_secs(1)
    ));
    // Second round of the loop: the delay doubles.
    assert!(
        daemon.wait_log("step=2 delay_ms=2000", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    assert_eq!(count_starts(), 40);
    std::fs::write(&fixed, "").unwrap();
    let answer = client.join().unwrap().unwrap();
    assert!(answer.starts_with("hello from loop"), "{answer}");
    assert_eq!(
        count_starts(),
        41,
        "served by the first guest after the backoff"
    );
    assert!(daemon.count("backoff over; listening again") >= 2);
}

#[test]
fn a_failing_or_panicking_plugin_fails_its_unit_and_never_the_daemon() {
    let (fails, panics, healthy) = (free_port(), free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "fails", plugin: "testkit",
             options: (command: ["{guest}"], fail_in: "activate"),
             listen: [Stream(address: "127.0.0.1:{fails}")]),
            (name: "panics", plugin: "testkit",
             options: (command: ["{guest}"], panic_in: "activate"),
             listen: [Stream(address: "127.0.0.1:{panics}")]),
            (name: "healthy", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{healthy}")]),
        ])"#,
        guest = guest()
    ))
    .unwrap();
    let _waiting = [
        TcpStream::connect(local(fails)).unwrap(),
        TcpStream::connect(local(panics)).unwrap(),
    ];
    assert!(daemon.wait_log(
        "testkit: activate fails as configured",
        Duration::from_secs(5)
    ));
    assert!(
        daemon.wait_log(
            "plugin panicked: testkit: panic in activate as configured",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
    assert!(daemon.wait_log(
        "backing off before listening again unit=panics",
        Duration::from_secs(5)
    ));
    let answer = http_get(local(healthy), "/").unwrap();
    assert!(answer.starts_with("hello from healthy"), "{answer}");
    // The failing units retry after their backoff, and fail again: still no crash.
    assert!(daemon.wait_count("activation failed unit=fails", 2, Duration::from_secs(5)));
    assert!(wait_until(
        Duration::from_secs(1),
        || portwake_tests::alive(i64::from(daemon.pid()))
    ));
}
