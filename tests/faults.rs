//! Fault injection: deliberately bad plugins, guests and host limits. In every case
//! the daemon lives, the other units keep serving, and the log says what happened.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use portwake_tests::{
    alive, cc_plugin, cpu_ticks, free_port, guest, http_get, info, int, wait_until, Daemon,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A healthy unit to put beside a faulty one.
fn healthy(port: u16) -> String {
    format!(
        r#"(name: "healthy", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "127.0.0.1:{port}")])"#,
        guest()
    )
}

fn assert_healthy_serves(daemon: &Daemon, port: u16) {
    let answer = http_get(local(port), "/").unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(answer.starts_with("hello from healthy"), "{answer}");
}

/// The daemon uses little CPU over `window`: it does not spin on a fault.
fn assert_idle(daemon: &Daemon, window: Duration) {
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(window);
    let used = cpu_ticks(daemon.pid()) - before;
    // 100 ticks a second: a busy loop would use about as many as the window is long.
    assert!(
        used < 30,
        "the daemon used {used} ticks of CPU in {window:?}\n{}",
        daemon.log()
    );
}

#[test]
fn an_activate_that_never_returns_times_out_and_the_loop_keeps_serving() {
    let (hang, ok) = (free_port(), free_port());
    let mut daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "hang", plugin: "testkit", options: (command: ["{}"], activate_hangs: true),
             listen: [Stream(address: "127.0.0.1:{hang}")],
             activate_timeout: "1s", backoff: (initial: "300ms", max: "600ms")),
            {},
        ])"#,
        guest(),
        healthy(ok)
    ))
    .unwrap();
    // A client waits on the hanging unit for the whole test.
    let _waiting = TcpStream::connect(local(hang)).unwrap();
    assert!(daemon.wait_log("starting guest unit=hang", Duration::from_secs(5)));
    assert_healthy_serves(&daemon, ok);
    assert!(
        daemon.wait_log(
            "activation timed out: the plugin's activate call did not return; abandoning it unit=hang",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
    // It backs off, listens again, sees the waiting client, tries again, times out again.
    assert!(
        daemon.wait_count("activation timed out", 2, Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    assert!(daemon
        .log()
        .contains("backing off before listening again unit=hang"));
    assert_healthy_serves(&daemon, ok);
    let status = daemon.terminate(Duration::from_secs(15)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

const BAD_PLUGIN: &str = r#"
#include <string.h>
#include "portwake_plugin.h"

static int mode_is(PwStr options, const char *mode) {
    size_t n = strlen(mode);
    for (size_t i = 0; i + n <= options.len; i++)
        if (memcmp(options.ptr + i, mode, n) == 0) return 1;
    return 0;
}
static int instance_token;
static int32_t bad_create(const PwHostV1 *host, PwStr options, void **instance, PwErrorBuf *error) {
    (void)host; (void)error;
    if (mode_is(options, "null_instance")) { *instance = NULL; return PW_OK; }
    *instance = mode_is(options, "garbage_status") ? (void *)&instance_token : (void *)(&instance_token + 1);
    return PW_OK;
}
static int32_t bad_activate(void *instance, const PwActivation *a, PwGuestInfo *info, PwErrorBuf *error) {
    (void)a; (void)info;
    if (instance == &instance_token) {
        /* Invalid UTF-8, and a length far beyond the buffer. */
        memcpy(error->ptr, "\xff\xfe garbage", 10);
        error->len = error->cap + 1000;
        return 77;
    }
    return -1;
}
static int32_t bad_stop(void *instance, uint64_t guest, uint64_t timeout_ms, PwErrorBuf *error) {
    (void)instance; (void)guest; (void)timeout_ms; (void)error;
    return 12345;
}
static void bad_destroy(void *instance) { (void)instance; }
static const PwPluginV1 ENTRY = {
    sizeof(PwPluginV1), PW_ABI_MAJOR, PW_ABI_MINOR, "bad", "0",
    bad_create, bad_activate, bad_stop, bad_destroy, NULL,
};
const struct PwPluginV1 *portwake_plugin_entry(void) {
#ifdef NULL_ENTRY
    (void)ENTRY;
    return NULL;
#else
    return &ENTRY;
#endif
}
"#;

fn bad_plugin(dir: &Path, name: &str, null_entry: bool) -> String {
    let source = dir.join(format!("{name}.c"));
    let text = if null_entry {
        format!("#define NULL_ENTRY 1\n{BAD_PLUGIN}")
    } else {
        BAD_PLUGIN.to_owned()
    };
    std::fs::write(&source, text).unwrap();
    cc_plugin(dir, name, &source).display().to_string()
}

#[test]
fn garbage_statuses_and_messages_fail_only_their_unit() {
    let dir = tempfile::tempdir().unwrap();
    let lib = bad_plugin(dir.path(), "bad", false);
    let (bad, minus, ok) = (free_port(), free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "garbage", plugin: "{lib}", options: (mode: "garbage_status"),
             listen: [Stream(address: "127.0.0.1:{bad}")], backoff: (initial: "5s", max: "5s")),
            (name: "negative", plugin: "{lib}", options: (mode: "negative"),
             listen: [Stream(address: "127.0.0.1:{minus}")], backoff: (initial: "5s", max: "5s")),
            {},
        ])"#,
        healthy(ok)
    ))
    .unwrap();
    let _a = TcpStream::connect(local(bad)).unwrap();
    let _b = TcpStream::connect(local(minus)).unwrap();
    assert!(
        daemon.wait_count("activation failed", 2, Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(
        log.contains("plugin bad activate failed: unknown status 77 (\u{fffd}\u{fffd} garbage"),
        "the message is cut to the buffer and made valid text\n{log}"
    );
    assert!(
        log.contains("plugin bad activate failed: unknown status -1 (no message)"),
        "{log}"
    );
    assert_healthy_serves(&daemon, ok);
}

#[test]
fn a_null_entry_table_or_a_null_instance_is_refused_at_start_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    for (lib, options, expected) in [
        (
            bad_plugin(dir.path(), "nullentry", true),
            "()",
            "entry returned null".to_owned(),
        ),
        (
            bad_plugin(dir.path(), "nullinstance", false),
            "(mode: \"null_instance\")",
            "plugin bad create failed: returned no instance".to_owned(),
        ),
    ] {
        let mut daemon = Daemon::spawn(&format!(
            r#"(units: [(name: "n", plugin: "{lib}", options: {options},
                listen: [Stream(address: "127.0.0.1:{port}")])])"#
        ))
        .unwrap();
        let status = daemon.wait_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(1), "{}", daemon.log());
        assert!(daemon.log().contains(&expected), "{}", daemon.log());
    }
}

#[test]
fn panics_in_create_and_in_stop_are_contained() {
    let port = free_port();
    let mut daemon = Daemon::spawn(&format!(
        r#"(units: [(name: "p", plugin: "testkit", options: (command: ["{}"], panic_in: "create"),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest()
    ))
    .unwrap();
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(1)
    );
    assert!(
        daemon
            .log()
            .contains("unit \"p\": plugin testkit create failed: plugin panicked: testkit: panic in create as configured"),
        "{}",
        daemon.log()
    );

    let mut daemon = Daemon::start(&format!(
        r#"(units: [(name: "p", plugin: "testkit", options: (command: ["{}"], panic_in: "stop"),
            listen: [Stream(address: "127.0.0.1:{port}")], stop_timeout: "1s")])"#,
        guest()
    ))
    .unwrap();
    let pid = int(&info(local(port)).unwrap()["pid"]);
    let status = daemon.terminate(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains(
            "plugin testkit stop failed: plugin panicked: testkit: panic in stop as configured"
        ),
        "{log}"
    );
    assert!(
        log.contains("guest still up at the shutdown deadline unit=p"),
        "{log}"
    );
    // The plugin could not stop its guest; clean up after it.
    // SAFETY: kill has no memory-safety preconditions; the pid is the guest's.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
}

#[test]
fn stopped_reported_twice_late_or_for_an_unknown_guest_is_ignored() {
    let (port, ok) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "liar", plugin: "testkit",
             options: (command: ["{}", "--exit-after", "1"], bogus_reports: true),
             listen: [Stream(address: "127.0.0.1:{port}")]),
            {},
        ])"#,
        guest(),
        healthy(ok)
    ))
    .unwrap();
    let first = int(&info(local(port)).unwrap()["pid"]);
    assert!(
        daemon.wait_log(
            "plugin reported the stop of a guest that is not running; ignored unit=liar guest=18446744073709551615",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
    assert!(daemon.wait_log("guest stopped unit=liar guest=1", Duration::from_secs(10)));
    // The second, late report for guest 1 arrives after its real one.
    assert!(
        daemon.wait_log(
            "plugin reported the stop of a guest that is not running; ignored unit=liar guest=1",
            Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
    let second = int(&info(local(port)).unwrap()["pid"]);
    assert_ne!(first, second);
    assert_eq!(daemon.count("guest stopped unit=liar guest=1 "), 1);
    assert_healthy_serves(&daemon, ok);
}

#[test]
fn fds_a_plugin_leaks_never_reach_another_guest() {
    let (leaky, ok) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "leaky", plugin: "testkit", options: (command: ["{}"], leak_fds: 4),
             listen: [Stream(address: "127.0.0.1:{leaky}")]),
            {},
        ])"#,
        guest(),
        healthy(ok)
    ))
    .unwrap();
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count();
    let own = info(local(leaky)).unwrap();
    let open = portwake_tests::open_fds(&own);
    assert_eq!(
        open,
        [0, 1, 2, 3],
        "not even the leaking plugin's own guest"
    );
    let other = info(local(ok)).unwrap();
    let open = portwake_tests::open_fds(&other);
    assert_eq!(
        open,
        [0, 1, 2, 3],
        "the other unit's guest gets only its own"
    );
    let fds_after = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .count();
    assert!(
        fds_after >= fds_before + 8,
        "the leak happened in the daemon ({fds_before} → {fds_after} fds)"
    );
}

#[test]
fn a_guest_that_crashes_at_start_forever_backs_off_without_spinning() {
    let (crash, ok) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "crash", plugin: "exec", options: (command: ["{}", "--exit-immediately"]),
             listen: [Stream(address: "127.0.0.1:{crash}")],
             trigger_limit: (interval: "2s", burst: 3), backoff: (initial: "200ms", max: "800ms")),
            {},
        ])"#,
        guest(),
        healthy(ok)
    ))
    .unwrap();
    let _waiting = TcpStream::connect(local(crash)).unwrap();
    assert!(
        daemon.wait_count(
            "backing off before listening again unit=crash",
            3,
            Duration::from_secs(15)
        ),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("exited with status 3"),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("trigger limit hit unit=crash"),
        "{}",
        daemon.log()
    );
    assert_healthy_serves(&daemon, ok);
    assert_idle(&daemon, Duration::from_secs(1));
}

#[test]
fn a_guest_sigkilled_while_serving_is_replaced_by_the_next_client() {
    let (port, ok) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "victim", plugin: "exec", options: (command: ["{}"]),
             listen: [Stream(address: "127.0.0.1:{port}")]),
            {},
        ])"#,
        guest(),
        healthy(ok)
    ))
    .unwrap();
    let pid = int(&info(local(port)).unwrap()["pid"]);
    // A client mid-conversation when the guest dies.
    let open = TcpStream::connect(local(port)).unwrap();
    daemon.kill_guest_and_wait(pid, "victim");
    drop(open);
    let again = int(&info(local(port)).unwrap()["pid"]);
    assert_ne!(again, pid);
    assert!(!alive(pid));
    assert_healthy_serves(&daemon, ok);
}

#[test]
fn clients_waiting_while_the_guest_exits_are_served_by_the_next_guests() {
    let port = free_port();
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "short", plugin: "exec",
            options: (command: ["{}", "--exit-after", "1", "--startup-delay-ms", "200"]),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest()
    ))
    .unwrap();
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || http_get(local(port), "/")))
        .collect();
    let mut answers: Vec<String> = clients
        .into_iter()
        .map(|c| c.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    answers.sort();
    answers.dedup();
    assert_eq!(
        answers.len(),
        5,
        "five guests, one answer each: {answers:?}"
    );
    assert!(daemon.count("starting guest unit=short") >= 5);
}

/// Sets the daemon's soft `RLIMIT_NOFILE` (the hard limit stays).
fn set_nofile(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = i32::try_from(pid).unwrap();
    // SAFETY: prlimit reads the current limits into `old`, a valid rlimit.
    let got = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(got, 0);
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit with a valid new limit and no old-limit output.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(set, 0);
}

#[test]
fn out_of_fds_the_daemon_backs_off_without_spinning_and_recovers() {
    let port = free_port();
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "starved", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "127.0.0.1:{port}")],
            backoff: (initial: "200ms", max: "400ms"))])"#,
        guest()
    ))
    .unwrap();
    // No new fd can be opened: the next activation runs into EMFILE.
    set_nofile(daemon.pid(), 3);
    let client = std::thread::spawn(move || http_get(local(port), "/"));
    assert!(
        daemon.wait_log("activation failed unit=starved", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("Too many open files"),
        "{}",
        daemon.log()
    );
    assert_idle(&daemon, Duration::from_secs(1));
    assert!(
        daemon.count("activation failed unit=starved") >= 2,
        "it keeps trying, at the backoff's pace\n{}",
        daemon.log()
    );
    set_nofile(daemon.pid(), 1024);
    let answer = client.join().unwrap().unwrap();
    assert!(
        answer.starts_with("hello from starved"),
        "the waiting client is served: {answer}"
    );
    assert!(wait_until(Duration::from_secs(5), || daemon
        .count("guest started unit=starved")
        == 1));
}

#[test]
fn a_guest_that_shuts_the_listener_down_does_not_break_the_unit() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("shut");
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "shut", plugin: "exec",
            options: (command: ["{}", "--shutdown-listeners-once", "{}"]),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest(),
        marker.display()
    ))
    .unwrap();
    // The first guest shuts the shared listener down and exits: this client is reset.
    let _ = http_get(local(port), "/");
    assert!(
        daemon.wait_log("the listener had stopped listening", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    // The daemon listens again; the next client is served by a well-behaved guest.
    let answer = http_get(local(port), "/").unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(answer.starts_with("hello from shut"), "{answer}");
    assert_eq!(
        daemon.count("starting guest unit=shut"),
        2,
        "{}",
        daemon.log()
    );
}
