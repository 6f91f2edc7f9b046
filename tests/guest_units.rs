//! Guest socket-unit awareness: `check` catches every listener a systemd guest would
//! not adopt, `generate` writes a config that `check` passes, and `run` hands the fds
//! over in the guest's order with the guest's names.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portwake_tests::{free_port, guest, info, portwake, root, sockets, Daemon};

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/guests").join(name)
}

/// Writes a config with one unit of `guest_units` and these listeners; returns its path.
fn config(dir: &Path, guest_units: &Path, listen: &[&str]) -> String {
    let path = dir.join("host.ron");
    let listen: String = listen.iter().map(|l| format!("        {l},\n")).collect();
    std::fs::write(
        &path,
        format!(
            "(units: [(name: \"c\", plugin: \"exec\", options: (command: [\"/bin/true\"]),\n    guest_units: {:?},\n    listen: [\n{listen}    ])])\n",
            guest_units.display().to_string()
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn the_seed_scenario_passes_when_host_and_guest_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &fixture("seed"),
        &[
            r#"Stream(address: "443")"#,
            r#"Stream(address: "23")"#,
            r#"Stream(address: "[::]:80")"#,
        ],
    );
    let (code, out) = portwake(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "note: unit \"c\": guest sshd.socket has Accept=yes: the guest's systemd spawns sshd@.service for each connection".to_owned(),
            format!("{cfg}: ok"),
        ]
    );
}

#[test]
fn each_mismatch_is_one_line_naming_both_sides_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fixture("seed");
    let cfg = config(
        dir.path(),
        &seed,
        &[
            r#"Stream(address: "127.0.0.1:23")"#,
            r#"Datagram(address: "80")"#,
            r#"Stream(address: "127.0.0.1:8443")"#,
        ],
    );
    let (code, out) = portwake(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    let sshd = seed.join("etc/systemd/system/sshd.socket");
    let httpd = seed.join("lib/systemd/system/httpd.socket");
    let expected = [
        format!("{cfg}:4:25: unit \"c\": listen[0] Stream 127.0.0.1:23: guest {}:5 ListenStream=23 parses to [::]:23 (AF_INET6); host listener 127.0.0.1:23 is AF_INET: write ListenStream=127.0.0.1:23 in the guest or listen on Stream(address: \"23\") on the host", sshd.display()),
        format!("{cfg}:5:27: unit \"c\": listen[1] Datagram [::]:80: guest {}:6 ListenStream=80 is SOCK_STREAM; host listener is SOCK_DGRAM: write ListenDatagram=[::]:80 in the guest or listen on Stream(address: \"80\") on the host", httpd.display()),
        format!("{cfg}:6:25: unit \"c\": listen[2] Stream 127.0.0.1:8443: no enabled guest socket unit listens there: add ListenStream=127.0.0.1:8443 to a guest socket unit"),
        format!("{cfg}: unit \"c\": guest {}:7 ListenStream=443 parses to [::]:443 (AF_INET6) and no host listener matches it: add Stream(address: \"443\") to listen", httpd.display()),
        "note: unit \"c\": guest sshd.socket has Accept=yes: the guest's systemd spawns sshd@.service for each connection".to_owned(),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn disabled_masked_ambiguous_and_unsupported_units_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let states = fixture("states");
    let cfg = config(
        dir.path(),
        &states,
        &[
            r#"Stream(address: "/run/api.sock")"#,
            r#"Stream(address: "127.0.0.1:9200")"#,
            r#"Stream(address: "127.0.0.1:9300")"#,
            r#"Datagram(address: "127.0.0.1:53")"#,
        ],
    );
    let (code, out) = portwake(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    let unit = |name: &str| {
        states
            .join("etc/systemd/system")
            .join(name)
            .display()
            .to_string()
    };
    let expected = [
        format!("{cfg}:5:25: unit \"c\": listen[1] Stream 127.0.0.1:9200: matches guest {}:2 ListenStream=127.0.0.1:9200, but old.socket is not enabled: enable it with a symlink in sockets.target.wants/", unit("old.socket")),
        format!("{cfg}:6:25: unit \"c\": listen[2] Stream 127.0.0.1:9300: no enabled guest socket unit listens there (masked in the guest, so not read: masked.socket): add ListenStream=127.0.0.1:9300 to a guest socket unit"),
        format!("{cfg}:7:27: unit \"c\": listen[3] Datagram 127.0.0.1:53: matches guest dns-too.socket ({}:2) and dns.socket ({}:2): systemd hands the fd to any one of them; keep one", unit("dns-too.socket"), unit("dns.socket")),
        format!("note: unit \"c\": guest {}:3 ListenFIFO=/run/api.fifo is not served by portwake: portwake passes sockets only, not FIFOs", unit("api.socket")),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn a_missing_guest_tree_is_a_problem_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-guest");
    let cfg = config(dir.path(), &missing, &[r#"Stream(address: "23")"#]);
    let (code, out) = portwake(&["check", "--config", &cfg]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!(
            "{cfg}: unit \"c\": guest_units: {}",
            missing.display()
        )),
        "{out}"
    );
}

#[test]
fn generate_writes_a_config_that_check_passes_unchanged() {
    for (name, ipv6) in [("seed", true), ("seed", false), ("mixed", true)] {
        let mut args = vec!["generate", "--guest-units"];
        let tree = fixture(name).display().to_string();
        args.push(&tree);
        args.extend(["--plugin", "exec"]);
        if !ipv6 {
            args.push("--no-ipv6");
        }
        let (code, generated) = portwake(&args);
        assert_eq!(code, 0, "{generated}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generated.ron");
        std::fs::write(&path, &generated).unwrap();
        let (code, out) = portwake(&["check", "--config", &path.display().to_string()]);
        assert_eq!(code, 0, "{name} ipv6={ipv6}:\n{generated}\n{out}");
        if name == "seed" {
            let first = if ipv6 { "\"23\"" } else { "\"0.0.0.0:23\"" };
            assert!(
                generated.contains(&format!("Stream(address: {first})")),
                "{generated}"
            );
        }
    }
}

/// Writes an enabled socket unit into a guest unit directory.
fn guest_unit(dir: &Path, name: &str, body: &str) {
    let system = dir.join("etc/systemd/system");
    std::fs::create_dir_all(system.join("sockets.target.wants")).unwrap();
    std::fs::write(system.join(name), format!("[Socket]\n{body}")).unwrap();
    std::os::unix::fs::symlink(
        format!("../{name}"),
        system.join("sockets.target.wants").join(name),
    )
    .unwrap();
}

#[test]
fn fds_arrive_in_guest_unit_order_with_guest_unit_names() {
    let (web, admin) = (free_port(), free_port());
    let guest_root = tempfile::tempdir().unwrap();
    let sock = guest_root.path().join("api.sock");
    guest_unit(
        guest_root.path(),
        "a-admin.socket",
        &format!("ListenStream=127.0.0.1:{admin}\nFileDescriptorName=admin\n"),
    );
    guest_unit(
        guest_root.path(),
        "b-web.socket",
        &format!("ListenStream=127.0.0.1:{web}\nListenDatagram=127.0.0.1:{web}\n"),
    );
    // The guest's own sockets (as every systemd guest has) need no host listener.
    guest_unit(
        guest_root.path(),
        "systemd-journald.socket",
        "ListenStream=/run/systemd/journal/stdout\nListenDatagram=/run/systemd/journal/socket\n",
    );
    guest_unit(
        guest_root.path(),
        "c-api.socket",
        &format!("ListenStream={}\n", sock.display()),
    );
    // The host lists them in another order; one listener names itself.
    let daemon = Daemon::start(&format!(
        r#"(units: [(name: "ordered", plugin: "exec", options: (command: ["{guest}"]),
            guest_units: "{root}",
            listen: [
                Stream(address: "{sock}", name: "api-explicit"),
                Datagram(address: "127.0.0.1:{web}"),
                Stream(address: "127.0.0.1:{web}"),
                Stream(address: "127.0.0.1:{admin}"),
            ])])"#,
        guest = guest(),
        root = guest_root.path().display(),
        sock = sock.display(),
    ))
    .unwrap();
    assert!(
        daemon.log().contains("2 guest unix socket(s) have no host listener; the guest binds them itself: systemd-journald.socket /run/systemd/journal/stdout, systemd-journald.socket /run/systemd/journal/socket"),
        "{}",
        daemon.log()
    );
    let report = info(SocketAddr::from(([127, 0, 0, 1], web))).unwrap();
    assert_eq!(
        report["listen_fdnames"],
        "admin:b-web.socket:b-web.socket:api-explicit"
    );
    let sockets = sockets(&report);
    assert_eq!(
        sockets,
        [
            (3, "stream".into(), format!("127.0.0.1:{admin}")),
            (4, "stream".into(), format!("127.0.0.1:{web}")),
            (5, "datagram".into(), format!("127.0.0.1:{web}")),
            (6, "stream".into(), sock.display().to_string()),
        ]
    );
}

#[test]
fn run_refuses_a_mismatch_unless_told_to_warn() {
    let port = free_port();
    let guest_root = tempfile::tempdir().unwrap();
    guest_unit(
        guest_root.path(),
        "ssh.socket",
        &format!("ListenStream={port}\n"),
    );
    let unit = |policy: &str| {
        format!(
            r#"(units: [(name: "m", plugin: "exec", options: (command: ["{}"]),
                guest_units: "{}", {policy}
                listen: [Stream(address: "127.0.0.1:{port}")])])"#,
            guest(),
            guest_root.path().display()
        )
    };
    let mut refused = Daemon::spawn(&unit("")).unwrap();
    assert_eq!(
        refused.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(1)
    );
    let log = refused.log();
    assert!(log.contains("unit \"m\": listeners do not match the guest's socket units (set on_guest_mismatch: \"warn\" to run anyway):"), "{log}");
    assert!(
        log.contains(&format!("ListenStream={port} parses to [::]:{port} (AF_INET6); host listener 127.0.0.1:{port} is AF_INET: write ListenStream=127.0.0.1:{port} in the guest")),
        "{log}"
    );

    let warned = Daemon::start(&unit(r#"on_guest_mismatch: "warn","#)).unwrap();
    assert!(
        warned
            .log()
            .contains("listener does not match the guest's units"),
        "{}",
        warned.log()
    );
    let report = info(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    assert_eq!(report["listen_fds"], "1");
}
