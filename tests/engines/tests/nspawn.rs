//! systemd-nspawn + a real systemd guest (debootstrap'd bookworm, see setup.sh) +
//! a real `ssh`: portwake holds the guest's sshd port and a second
//! socket-activated service; the first connection boots the container; after the
//! guest powers itself off both ports listen again and work again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portwake_engine_tests::{
    bin_dir, cgroups_named, exchange, prerequisites, remove_cgroup_tree, report, run_ok, wait_for,
    Daemon,
};

fn guest_dir() -> PathBuf {
    std::env::var_os("PORTWAKE_GUEST_DIR").map_or_else(
        || PathBuf::from("/var/tmp/portwake-guest-bookworm"),
        PathBuf::from,
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Guest unit files: sshd.socket (Accept=yes) + sshd@.service, and hello.socket +
/// hello@.service, a second per-connection service; both enabled by relative
/// symlinks in `sockets.target.wants/`. Written into `DIR/units`, a unit directory
/// laid out as the guest's `/etc/systemd/system` (and given to portwake as
/// `guest_units`); returns it and the nspawn arguments that bind it in.
fn guest_units(dir: &Path, ssh_port: u16, hello_port: u16) -> (PathBuf, Vec<String>) {
    let units = dir.join("units");
    write_units(&units, &format!("127.0.0.1:{ssh_port}"), hello_port);
    let mut binds = Vec::new();
    for name in [
        "sshd.socket",
        "sshd@.service",
        "hello.socket",
        "hello@.service",
        "sockets.target.wants",
    ] {
        binds.push(format!(
            "--bind-ro={}:/etc/systemd/system/{name}",
            units.join(name).display()
        ));
    }
    (units, binds)
}

/// The four unit files and `sockets.target.wants/` in `units`; sshd.socket has
/// `ListenStream={ssh_listen}`.
fn write_units(units: &Path, ssh_listen: &str, hello_port: u16) {
    let wants = units.join("sockets.target.wants");
    std::fs::create_dir_all(&wants).expect("units dir");
    write(
        &units.join("sshd.socket"),
        &format!(
            "[Unit]\nDescription=OpenSSH per-connection socket (portwake)\n\n\
             [Socket]\nListenStream={ssh_listen}\nAccept=yes\n\n\
             [Install]\nWantedBy=sockets.target\n"
        ),
    );
    write(
        &units.join("sshd@.service"),
        "[Unit]\nDescription=OpenSSH per-connection server\n\n\
         [Service]\nExecStart=-/usr/sbin/sshd -i\nStandardInput=socket\n\
         RuntimeDirectory=sshd\nRuntimeDirectoryPreserve=yes\n",
    );
    write(
        &units.join("hello.socket"),
        &format!(
            "[Unit]\nDescription=hello per-connection socket (portwake)\n\n\
             [Socket]\nListenStream=127.0.0.1:{hello_port}\nAccept=yes\n\n\
             [Install]\nWantedBy=sockets.target\n"
        ),
    );
    write(
        &units.join("hello@.service"),
        "[Unit]\nDescription=hello per-connection service\n\n\
         [Service]\nStandardInput=socket\n\
         ExecStart=/bin/sh -c 'echo \"hello from $(cat /proc/1/comm) in $(readlink /proc/self/ns/pid)\"'\n",
    );
    for name in ["sshd.socket", "hello.socket"] {
        std::os::unix::fs::symlink(format!("../{name}"), wants.join(name)).expect("symlink");
    }
}

/// `portwake check --config PATH`: whether it passed, and what it printed.
fn check(config: &Path) -> (bool, String) {
    let out = Command::new(bin_dir().join("portwake"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run portwake check");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ssh(key: &Path, port: u16, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-i")
        .arg(key)
        .args([
            "-p",
            &port.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=30",
            "root@127.0.0.1",
            command,
        ])
        .stdin(Stdio::null());
    c
}

fn ssh_ok(key: &Path, port: u16, command: &str) -> String {
    let out = ssh(key, port, command).output().expect("run ssh");
    assert!(
        out.status.success(),
        "ssh {command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host config: one unit "box" booting `guest` with `args`, its guest units
/// in `units`, listening on the ssh and hello ports.
fn nspawn_config(
    guest: &Path,
    machine: &str,
    args: &[String],
    units: &Path,
    ssh_port: u16,
    hello_port: u16,
) -> String {
    let args_ron: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"(
    plugin_dir: {plugin_dir:?},
    units: [(
        name: "box",
        plugin: "nspawn",
        options: (
            directory: {guest:?},
            machine: {machine:?},
            private_network: true,
            volatile: "overlay",
            args: [{args}],
        ),
        guest_units: {units:?},
        listen: [
            Stream(address: "127.0.0.1:{ssh_port}", name: "ssh"),
            Stream(address: "127.0.0.1:{hello_port}", name: "hello"),
        ],
        stop_timeout: "20s",
    )],
)"#,
        plugin_dir = bin_dir().display().to_string(),
        guest = guest.display().to_string(),
        args = args_ron.join(", "),
        units = units.display().to_string(),
    )
}

fn nspawn_prerequisites(test: &str) -> bool {
    let guest = guest_dir();
    prerequisites(
        test,
        &["systemd-nspawn", "ssh", "ssh-keygen"],
        &[
            &bin_dir().join("portwake"),
            &bin_dir().join("libportwake_nspawn.so"),
            &guest.join("lib/systemd/systemd"),
            &guest.join("usr/sbin/sshd"),
        ],
    )
}

/// Starts portwake; whatever happens, no cgroup of its guests stays behind. Returns
/// the daemon and the name prefix of its guests' cgroups.
fn start_daemon(dir: &Path, config: &str) -> (Daemon, String) {
    let mut daemon = Daemon::start(dir, config);
    let scope_prefix = format!("portwake-nspawn.{}.", daemon.pid);
    let prefix = scope_prefix.clone();
    daemon.cleanup_after(move || {
        for dir in cgroups_named(&prefix) {
            remove_cgroup_tree(&dir);
        }
    });
    (daemon, scope_prefix)
}

/// The guest is gone without a trace: no nspawn left as the daemon's child, no
/// guest cgroup.
fn assert_guest_gone(daemon: &Daemon, scope_prefix: &str) {
    assert!(
        wait_for(Duration::from_secs(10), || daemon
            .children()
            .is_empty()
            .then_some(()))
        .is_some(),
        "nspawn still running: {:?}",
        daemon.children()
    );
    assert!(
        wait_for(Duration::from_secs(10), || cgroups_named(scope_prefix)
            .is_empty()
            .then_some(()))
        .is_some(),
        "guest cgroups left: {:?}",
        cgroups_named(scope_prefix)
    );
}

#[test]
fn nspawn_systemd_guest_ssh_and_second_service_reactivate() {
    let guest = guest_dir();
    if !nspawn_prerequisites("nspawn") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("portwake-nspawn-")
        .tempdir()
        .expect("tempdir");
    let (ssh_port, hello_port) = (
        portwake_engine_tests::free_port(),
        portwake_engine_tests::free_port(),
    );
    let key = tmp.path().join("id_ed25519");
    run_ok(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        key.to_str().expect("utf8"),
    ]);
    let authorized = tmp.path().join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized).expect("authorized_keys");
    let (units, mut args) = guest_units(tmp.path(), ssh_port, hello_port);
    args.push(format!(
        "--bind-ro={}:/root/.ssh/authorized_keys",
        authorized.display()
    ));
    let machine = format!("pwtest-{}", std::process::id());
    let config_for =
        |units: &Path| nspawn_config(&guest, &machine, &args, units, ssh_port, hello_port);
    let config = config_for(&units);

    // The guest units the container boots with match the host's listeners …
    let config_path = tmp.path().join("portwake.ron");
    write(&config_path, &config);
    let (clean, out) = check(&config_path);
    assert!(
        clean && out.trim_end().ends_with(": ok"),
        "portwake check: {out}"
    );
    // … and a guest whose sshd.socket says a bare port (= [::]:PORT, AF_INET6)
    // would not adopt the AF_INET 127.0.0.1:PORT listener: check says so.
    let bad_units = tmp.path().join("units-mismatch");
    write_units(&bad_units, &ssh_port.to_string(), hello_port);
    let bad_path = tmp.path().join("mismatch.ron");
    let bad_config = config_for(&bad_units);
    write(&bad_path, &bad_config);
    let (clean, out) = check(&bad_path);
    // The position check names: the address of listen[0], 1-based.
    let needle = format!("\"127.0.0.1:{ssh_port}\"");
    let (line, col) = bad_config
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find(&needle).map(|c| (i + 1, c + 1)))
        .expect("listen[0] in the config");
    let expected = format!(
        "{bad}:{line}:{col}: unit \"box\": listen[0] Stream 127.0.0.1:{ssh_port}: guest {sock}:5 \
         ListenStream={ssh_port} parses to [::]:{ssh_port} (AF_INET6); host listener \
         127.0.0.1:{ssh_port} is AF_INET: write ListenStream=127.0.0.1:{ssh_port} in the guest \
         or listen on Stream(address: \"{ssh_port}\") on the host",
        bad = bad_path.display(),
        sock = bad_units.join("sshd.socket").display(),
    );
    assert!(!clean, "check passed a mismatched guest: {out}");
    assert!(
        out.lines().any(|l| l == expected),
        "check did not print the mismatch line\nexpected: {expected}\ngot:\n{out}"
    );
    assert_eq!(
        out.lines().filter(|l| !l.starts_with("note:")).count(),
        1,
        "one problem expected: {out}"
    );

    let (mut daemon, scope_prefix) = start_daemon(tmp.path(), &config);
    let ssh_addr: SocketAddr = ([127, 0, 0, 1], ssh_port).into();
    let hello_addr: SocketAddr = ([127, 0, 0, 1], hello_port).into();

    // 1. First connection: the SSH banner comes from the guest's sshd.
    let t0 = Instant::now();
    let banner = exchange(ssh_addr, b"", Some("\n"), Duration::from_secs(60))
        .expect("ssh banner from the booted guest");
    assert!(
        banner.text.starts_with("SSH-2.0-"),
        "banner: {:?}",
        banner.text
    );
    report(
        "nspawn",
        "first byte (ssh banner, container boot)",
        banner.total,
    );
    daemon.wait_log("started systemd-nspawn", 1, Duration::from_secs(5));

    // 2. A real ssh login with a key, running a command in the guest.
    let t = Instant::now();
    let out = ssh_ok(
        &key,
        ssh_port,
        "cat /proc/1/comm; readlink /proc/self/ns/pid",
    );
    report(
        "nspawn",
        "ssh command round trip (running guest)",
        t.elapsed(),
    );
    let host_ns = portwake_engine_tests::host_pid_namespace();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("systemd"), "guest PID 1: {out}");
    let guest_ns = lines.next().unwrap_or_default().to_owned();
    assert_ne!(guest_ns, host_ns, "ssh ran in the host's pid namespace");

    // 3. The second service answers, from the same container.
    let hello = exchange(hello_addr, b"", None, Duration::from_secs(30)).expect("hello service");
    assert!(
        hello
            .text
            .contains(&format!("hello from systemd in {guest_ns}")),
        "hello: {:?}",
        hello.text
    );
    eprintln!("nspawn: first activation done in {:?}", t0.elapsed());

    // 4. The guest powers itself off: portwake notices and listens again.
    let t = Instant::now();
    let _ = ssh(&key, ssh_port, "systemctl poweroff").output();
    daemon.wait_log("guest stopped", 1, Duration::from_secs(60));
    report(
        "nspawn",
        "stop (poweroff inside -> guest stopped reported)",
        t.elapsed(),
    );
    assert_guest_gone(&daemon, &scope_prefix);

    // 5. Both ports work again: the hello port boots a new container first …
    let hello2 = exchange(hello_addr, b"", None, Duration::from_secs(60)).expect("hello again");
    assert!(
        hello2.text.contains("hello from systemd"),
        "hello: {:?}",
        hello2.text
    );
    report(
        "nspawn",
        "first byte after re-activation (hello service)",
        hello2.total,
    );
    daemon.wait_log("started systemd-nspawn", 2, Duration::from_secs(5));
    // … and ssh works in it.
    let out = ssh_ok(&key, ssh_port, "cat /proc/1/comm");
    assert_eq!(out.trim(), "systemd");

    // 6. portwake's own stop: SIGTERM to nspawn → clean guest shutdown.
    let (took, clean) = daemon.terminate(Duration::from_secs(60));
    assert!(clean, "daemon did not exit cleanly:\n{}", daemon.log());
    report(
        "nspawn",
        "stop (daemon SIGTERM -> guest shut down, daemon exited)",
        took,
    );
    assert!(
        daemon.log().contains("all guests stopped"),
        "{}",
        daemon.log()
    );
    assert!(
        cgroups_named(&scope_prefix).is_empty(),
        "guest cgroups left after stop"
    );
    assert!(
        !Path::new("/run/systemd/nspawn/propagate")
            .join(&machine)
            .exists(),
        "nspawn's propagate directory left behind"
    );
}

/// A live `portwake restart` while the container runs: the new daemon image
/// adopts the same nspawn (same pid, same guest pid namespace, no second boot),
/// which keeps serving; a later `portwake stop` still shuts it down cleanly and
/// removes its cgroups, and the next connection boots a new one.
#[test]
fn nspawn_guest_survives_live_restart() {
    if !nspawn_prerequisites("nspawn restart") {
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::Builder::new()
        .prefix("portwake-nspawn-restart-")
        .tempdir()
        .expect("tempdir");
    let (ssh_port, hello_port) = (
        portwake_engine_tests::free_port(),
        portwake_engine_tests::free_port(),
    );
    let (units, args) = guest_units(tmp.path(), ssh_port, hello_port);
    let machine = format!("pwtest-r-{}", std::process::id());
    let config = nspawn_config(&guest, &machine, &args, &units, ssh_port, hello_port);
    let (mut daemon, scope_prefix) = start_daemon(tmp.path(), &config);
    let hello_addr: SocketAddr = ([127, 0, 0, 1], hello_port).into();
    let hello = || {
        let reply =
            exchange(hello_addr, b"", None, Duration::from_secs(60)).expect("hello service");
        assert!(
            reply.text.contains("hello from systemd in pid:"),
            "hello: {:?}",
            reply.text
        );
        reply
    };

    let before = hello().text;
    let nspawn = daemon.children();
    assert_eq!(nspawn.len(), 1, "one nspawn expected: {nspawn:?}");

    let took = daemon.live_restart();
    report("nspawn", "live restart (portwake restart returned)", took);
    daemon.wait_log("adopted a running guest", 1, Duration::from_secs(10));
    assert!(!daemon.log().contains("cannot adopt"), "{}", daemon.log());
    let t = Instant::now();
    let after = hello();
    report(
        "nspawn",
        "first byte after live restart (adopted guest)",
        after.total,
    );
    assert_eq!(
        after.text, before,
        "served by another container after the restart"
    );
    assert_eq!(
        daemon.children(),
        nspawn,
        "nspawn changed across the restart"
    );
    assert_eq!(
        daemon.log().matches("started systemd-nspawn").count(),
        1,
        "the guest booted again:\n{}",
        daemon.log()
    );
    eprintln!("nspawn: served after restart in {:?}", t.elapsed());

    // A later stop goes through the adopting plugin: clean shutdown, cgroups removed.
    let t = Instant::now();
    let (ok, out) = daemon.control("stop", &["box"]);
    assert!(ok, "portwake stop box: {out}");
    daemon.wait_log("guest stopped", 1, Duration::from_secs(30));
    report(
        "nspawn",
        "stop after live restart (portwake stop)",
        t.elapsed(),
    );
    assert_guest_gone(&daemon, &scope_prefix);

    // Listening again: the next connection boots a new container.
    hello();
    daemon.wait_log("started systemd-nspawn", 2, Duration::from_secs(5));
    let (took, clean) = daemon.terminate(Duration::from_secs(60));
    assert!(clean, "daemon did not exit cleanly:\n{}", daemon.log());
    report(
        "nspawn",
        "stop (daemon SIGTERM after restart and re-activation)",
        took,
    );
    assert!(
        cgroups_named(&scope_prefix).is_empty(),
        "guest cgroups left after stop"
    );
}
