//! Third-party plugins: one written in C against the header alone serves clients end
//! to end, and as root a plugin that someone other than root could replace is refused.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portwake_tests::{
    alive, artifact, cc_plugin, free_port, guest, info, int, is_root, portwake, root, unix_info,
    Daemon,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Builds `examples/c-plugin` into a fresh directory (root-owned, mode 0700).
fn cdemo(dir: &Path) -> PathBuf {
    cc_plugin(
        dir,
        "portwake_cdemo",
        &root().join("examples/c-plugin/portwake_cdemo.c"),
    )
}

#[test]
fn a_plugin_written_in_c_against_the_header_serves_clients_end_to_end() {
    let build = tempfile::tempdir().unwrap();
    let lib = cdemo(build.path());
    let (port, other) = (free_port(), free_port());
    let sock = build.path().join("api.sock");
    let mut daemon = Daemon::start(&format!(
        r#"(units: [
            (name: "cweb", plugin: "{lib}", options: (command: ["{guest}", "--startup-delay-ms", "100"]),
             listen: [Stream(address: "127.0.0.1:{port}", name: "http"), Stream(address: "{sock}", name: "api")],
             env: {{"FROM_CONFIG": "yes"}}),
            (name: "other", plugin: "exec", options: (command: ["{guest}"]),
             listen: [Stream(address: "127.0.0.1:{other}")]),
        ])"#,
        lib = lib.display(),
        guest = guest(),
        sock = sock.display(),
    ))
    .unwrap();
    // Another unit's guest runs too, so that its sockets exist in the daemon.
    info(local(other)).unwrap();

    let report = info(local(port)).unwrap();
    let pid = int(&report["pid"]);
    assert_eq!(
        int(&report["listen_pid"]),
        pid,
        "LISTEN_PID is the guest's own pid"
    );
    assert_eq!(report["listen_fds"], "2");
    assert_eq!(report["listen_fdnames"], "http:api");
    let open = portwake_tests::open_fds(&report);
    assert_eq!(open, [0, 1, 2, 3, 4], "exactly stdio and its own listeners");
    let same = unix_info(UnixStream::connect(&sock).unwrap()).unwrap();
    assert_eq!(int(&same["pid"]), pid, "one guest serves both listeners");
    assert!(
        daemon.wait_log("cdemo: started", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("guest started unit=cweb guest="),
        "{}",
        daemon.log()
    );

    // Killed from outside: the C plugin's reaper thread reports it, once.
    daemon.kill_guest_and_wait(pid, "cweb");
    let again = info(local(port)).unwrap();
    assert_ne!(
        int(&again["pid"]),
        pid,
        "the next client starts a new guest"
    );

    // SIGTERM: the daemon stops the guest through the C plugin's stop.
    let second = int(&again["pid"]);
    let status = daemon.terminate(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(!alive(second), "the C plugin stopped its guest");
    assert_eq!(
        daemon.count("guest stopped unit=cweb"),
        2,
        "{}",
        daemon.log()
    );
    assert!(
        !daemon.log().contains("not running; ignored"),
        "every stop reported exactly once\n{}",
        daemon.log()
    );
}

#[test]
fn the_c_plugin_validates_its_options_for_check() {
    let build = tempfile::tempdir().unwrap();
    let lib = cdemo(build.path());
    let config = build.path().join("host.ron");
    std::fs::write(
        &config,
        format!(
            r#"(units: [(name: "c", plugin: "{}", options: (command: ["relative"]),
                listen: [Stream(address: "127.0.0.1:{}")])])"#,
            lib.display(),
            free_port()
        ),
    )
    .unwrap();
    let (code, out) = portwake(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unit \"c\": options: command: must start with an absolute program path"),
        "{out}"
    );
}

/// Copies the exec plugin into `dir` (mode as built, 0755) and returns its path.
fn exec_copy(dir: &Path) -> PathBuf {
    let lib = dir.join("libportwake_exec.so");
    std::fs::copy(artifact("libportwake_exec.so"), &lib).unwrap();
    lib
}

fn config_for(lib: &Path, port: u16, allow: bool) -> String {
    format!(
        r#"(allow_untrusted_plugins: {allow}, units: [(name: "t", plugin: "{}",
            options: (command: ["{}"]), listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        lib.display(),
        guest()
    )
}

fn refused_because(lib: &Path, reason: &str) {
    let mut daemon = Daemon::spawn(&config_for(lib, free_port(), false)).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert!(
        daemon.log().contains(&format!(
            "unit \"t\": {}: refusing to load this plugin as root: {reason}; a plugin runs with the daemon's privileges",
            lib.display()
        )),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("allow_untrusted_plugins: true"),
        "{}",
        daemon.log()
    );
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn as_root_a_plugin_others_could_replace_is_refused_unless_allowed() {
    if !is_root() {
        eprintln!("skipped: the trust rules apply to a daemon running as root only");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    let lib = exec_copy(&dir);

    chmod(&dir, 0o777);
    refused_because(
        &lib,
        &format!(
            "directory {} is writable by others (mode 0777)",
            dir.display()
        ),
    );
    chmod(&dir, 0o755);
    chmod(&lib, 0o775);
    refused_because(
        &lib,
        &format!(
            "file {} is writable by its group (mode 0775)",
            lib.display()
        ),
    );
    chmod(&lib, 0o755);
    std::os::unix::fs::chown(&lib, Some(65534), None).unwrap();
    refused_because(
        &lib,
        &format!("file {} is owned by uid 65534, not root", lib.display()),
    );

    // `check` says the same.
    let config = top.path().join("host.ron");
    std::fs::write(&config, config_for(&lib, free_port(), false)).unwrap();
    let (code, out) = portwake(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is owned by uid 65534, not root"), "{out}");

    // The development switch: loaded, with a warning, and it serves.
    let port = free_port();
    let daemon = Daemon::start(&config_for(&lib, port, true)).unwrap();
    assert!(
        daemon
            .log()
            .contains("loading an untrusted plugin because allow_untrusted_plugins is set"),
        "{}",
        daemon.log()
    );
    info(local(port)).unwrap();
}

#[test]
fn as_root_a_sticky_root_owned_directory_like_tmp_is_accepted() {
    if !is_root() {
        eprintln!("skipped: the trust rules apply to a daemon running as root only");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("sticky");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o1777);
    let lib = exec_copy(&dir);
    let port = free_port();
    let daemon = Daemon::start(&config_for(&lib, port, false)).unwrap();
    info(local(port)).unwrap();
    assert!(!daemon.log().contains("untrusted"), "{}", daemon.log());
}
