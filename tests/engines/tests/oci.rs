//! crun and podman: a rootfs holding hello-guest (and the libraries it links);
//! the first connection to each of two listeners is served from inside the
//! container; a container killed from outside is noticed and the next
//! connection starts a new one; portwake's stop stops and removes it. The guest
//! sees exactly fds 0-4 with another unit in the same daemon; a live `portwake
//! restart` adopts the running container, which keeps serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use portwake_engine_tests::{
    bin_dir, cgroups_named, free_port, hello_info, hello_rootfs, hybrid_wrapped, prerequisites,
    remove_cgroup_tree, report, run_status, served_from_container, unmount_under, Daemon,
};

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Both listeners served from one container; returns its pid namespace and the
/// first connection's time to first byte.
fn check_served(engine: &str, ports: [u16; 2]) -> (String, Duration) {
    let served = served_from_container(engine, ports, ["web", "api"], Duration::from_secs(60));
    assert_eq!(served.info["listen_pid"], "1", "{engine}: {}", served.info);
    // Seen from the host: 0 is /dev/null; 1 and 2 are the daemon's stderr (crun)
    // or conmon's log pipes (podman); no other fd: crun keeps only --preserve-fds,
    // podman passes LISTEN_FDS only.
    assert_eq!(
        served
            .host_view
            .iter()
            .map(|(fd, _)| *fd)
            .collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "{engine}: {:?}",
        served.host_view
    );
    (served.ns, served.total)
}

/// What an engine test does once the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Serve, kill from outside, serve again, stop.
    RoundTrip,
    /// Serve, `portwake restart` (the container is adopted and keeps serving),
    /// `portwake stop`, serve again, stop.
    LiveRestart,
}

/// One engine, end to end. `engine_cmd` builds an engine command line as the
/// test runs it from outside (same state directories as the plugin).
fn engine_round_trip(
    engine: &str,
    tmp: &Path,
    options: &str,
    engine_cmd: &dyn Fn(&[&str]) -> Vec<String>,
    name: &str,
    scenario: Scenario,
) {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"(
    plugin_dir: {plugin_dir:?},
    units: [(
        name: "box",
        plugin: "oci",
        options: {options},
        listen: [
            Stream(address: "127.0.0.1:{p1}", name: "web"),
            Stream(address: "127.0.0.1:{p2}", name: "api"),
        ],
        stop_timeout: "1s",
    ), (
        name: "other",
        plugin: "exec",
        options: (command: [{guest:?}]),
        listen: [Stream(address: "127.0.0.1:{p3}", name: "other")],
        stop_timeout: "1s",
    )],
)"#,
        plugin_dir = bin_dir().display().to_string(),
        guest = bin_dir().join("hello-guest").display().to_string(),
    );
    let cgroups_before = cgroups_named("libpod_parent");
    let crun_state_existed = Path::new("/run/crun").exists();
    let mut daemon = Daemon::start(tmp, &config);
    let (rm, tmp_owned) = (engine_cmd(&["__remove__", name]), tmp.to_owned());
    daemon.cleanup_after(move || {
        let _ = run_status(&rm);
        unmount_under(&tmp_owned);
        // podman's cgroupfs manager leaves its parent cgroup behind.
        for dir in cgroups_named("libpod_parent") {
            if !cgroups_before.contains(&dir) {
                remove_cgroup_tree(&dir);
            }
        }
        // crun's default state directory, created empty by podman's calls.
        if !crun_state_existed {
            let _ = std::fs::remove_dir("/run/crun");
        }
    });

    // Another unit of the same daemon runs (its guest holds its own listener)
    // while the container starts; the container must not see its socket.
    let (other, _) = hello_info(addr(p3), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{engine}: the other unit: {e}"));
    assert_eq!(
        other["open_fds"],
        serde_json::json!([0, 1, 2, 3]),
        "exec guest's fds: {other}"
    );
    let (ns, first) = check_served(engine, [p1, p2]);
    report(engine, "first byte (container start)", first);

    if scenario == Scenario::LiveRestart {
        // The new daemon image adopts the container (and the other unit's guest).
        let mut kids = daemon.children();
        kids.sort_unstable();
        let took = daemon.live_restart();
        report(engine, "live restart (portwake restart returned)", took);
        daemon.wait_log("adopted a running guest", 2, Duration::from_secs(10));
        daemon.wait_log("adopted container", 1, Duration::from_secs(1));
        let (ns_after, after) = check_served(engine, [p1, p2]);
        report(engine, "first byte after live restart (adopted)", after);
        assert_eq!(
            ns_after, ns,
            "{engine}: another container after the restart"
        );
        let mut kids_after = daemon.children();
        kids_after.sort_unstable();
        assert_eq!(kids_after, kids, "{engine}: engine processes changed");
        assert_eq!(daemon.log().matches("started container").count(), 1);

        // A later stop goes through the adopting plugin and removes the container.
        let t = Instant::now();
        let (ok, out) = daemon.control("stop", &["box"]);
        assert!(ok, "portwake stop box: {out}");
        daemon.wait_log("guest stopped", 1, Duration::from_secs(30));
        report(
            engine,
            "stop after live restart (portwake stop; PID 1 ignores TERM, stop_timeout 1s)",
            t.elapsed(),
        );
        let (_, list) = run_status(&engine_cmd(&["list"]));
        assert!(
            !list.contains(name),
            "{engine}: container left after stop: {list}"
        );
    } else {
        // Killed from outside: noticed, listening again, next connection restarts it.
        let t = Instant::now();
        let (ok, out) = run_status(&engine_cmd(&["kill", name]));
        assert!(ok, "{engine} kill: {out}");
        daemon.wait_log("guest stopped", 1, Duration::from_secs(30));
        report(
            engine,
            "outside kill -> guest stopped reported",
            t.elapsed(),
        );
    }
    let (_, again) = check_served(engine, [p1, p2]);
    report(engine, "first byte after re-activation", again);
    daemon.wait_log("started container", 2, Duration::from_secs(5));

    // portwake's stop: TERM (ignored by a PID 1 without a handler), KILL after 1s, remove.
    let (took, clean) = daemon.terminate(Duration::from_secs(60));
    assert!(clean, "daemon did not exit cleanly:\n{}", daemon.log());
    report(
        engine,
        "stop (daemon SIGTERM; stop_timeout 1s, PID 1 ignores TERM)",
        took,
    );
    let (_, list) = run_status(&engine_cmd(&["list"]));
    assert!(
        !list.contains(name),
        "{engine}: container left after stop: {list}"
    );
}

#[test]
fn crun_serves_stops_removes_and_reactivates() {
    crun(Scenario::RoundTrip);
}

#[test]
fn crun_container_survives_live_restart() {
    crun(Scenario::LiveRestart);
}

fn crun(scenario: Scenario) {
    if !prerequisites(
        "crun",
        &["crun", "unshare", "ldd"],
        &[
            &bin_dir().join("portwake"),
            &bin_dir().join("libportwake_oci.so"),
            &bin_dir().join("hello-guest"),
        ],
    ) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("portwake-crun-")
        .tempdir()
        .expect("tempdir");
    let rootfs = hello_rootfs(tmp.path());
    let state = tmp.path().join("state");
    let root = tmp.path().join("crun-root");
    let root_arg = format!("--root={}", root.display());
    let name = format!("pwtest-crun-{}-{scenario:?}", std::process::id());
    let options = format!(
        r#"(engine: "crun", name: {name:?}, rootfs: {rootfs:?}, command: ["/hello-guest"], hide_hybrid_cgroup: true, state_dir: {state:?}, engine_args: [{root_arg:?}])"#,
        rootfs = rootfs.display().to_string(),
        state = state.display().to_string(),
    );
    let n = name.clone();
    let cmd = move |args: &[&str]| -> Vec<String> {
        match args {
            ["__remove__", c] => hybrid_wrapped(&["crun", &root_arg, "delete", "-f", c]),
            ["kill", c] => hybrid_wrapped(&["crun", &root_arg, "kill", c, "KILL"]),
            ["list"] => hybrid_wrapped(&["crun", &root_arg, "list"]),
            other => panic!("unexpected {other:?} for {n}"),
        }
    };
    engine_round_trip("crun", tmp.path(), &options, &cmd, &name, scenario);
}

#[test]
fn podman_serves_stops_removes_and_reactivates() {
    podman(Scenario::RoundTrip);
}

#[test]
fn podman_container_survives_live_restart() {
    podman(Scenario::LiveRestart);
}

fn podman(scenario: Scenario) {
    if !prerequisites(
        "podman",
        &["podman", "crun", "unshare", "ldd"],
        &[
            &bin_dir().join("portwake"),
            &bin_dir().join("libportwake_oci.so"),
            &bin_dir().join("hello-guest"),
        ],
    ) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("portwake-podman-")
        .tempdir()
        .expect("tempdir");
    let rootfs = hello_rootfs(tmp.path());
    let name = format!("pwtest-podman-{}-{scenario:?}", std::process::id());
    let global: Vec<String> = vec![
        format!("--root={}", tmp.path().join("root").display()),
        format!("--runroot={}", tmp.path().join("runroot").display()),
        format!("--tmpdir={}", tmp.path().join("tmpdir").display()),
        "--cgroup-manager=cgroupfs".into(),
        "--events-backend=file".into(),
        "--runtime=crun".into(),
    ];
    let global_ron: Vec<String> = global.iter().map(|a| format!("{a:?}")).collect();
    let options = format!(
        r#"(engine: "podman", name: {name:?}, rootfs: {rootfs:?}, command: ["/hello-guest"], hide_hybrid_cgroup: true,
            engine_args: [{global}],
            run_args: ["--network=none", "--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"])"#,
        rootfs = rootfs.display().to_string(),
        global = global_ron.join(", "),
    );
    let n = name.clone();
    let cmd = move |args: &[&str]| -> Vec<String> {
        let mut argv: Vec<&str> = vec!["podman"];
        argv.extend(global.iter().map(String::as_str));
        match args {
            ["__remove__", c] => argv.extend(["rm", "-f", "--ignore", c]),
            ["kill", c] => argv.extend(["kill", c]),
            ["list"] => argv.extend(["ps", "-a", "--format", "{{.Names}}"]),
            other => panic!("unexpected {other:?} for {n}"),
        }
        hybrid_wrapped(&argv)
    };
    engine_round_trip("podman", tmp.path(), &options, &cmd, &name, scenario);
}
