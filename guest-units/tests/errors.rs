//! Every error names its file and line (or path), with the exact message asserted.

use std::fs;
use std::path::{Path, PathBuf};

use portwake_guest_units::{GuestUnits, GuestUnitsError};

/// A fresh unit directory under the test target's scratch space.
fn unit_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("guest-units-errors")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Loads a unit directory holding `x.socket` with `text` and returns the error message.
fn error_for(case: &str, text: &[u8]) -> (GuestUnitsError, PathBuf) {
    let dir = unit_dir(case);
    let file = dir.join("x.socket");
    fs::write(&file, text).unwrap();
    let err = GuestUnits::load(&dir).expect_err("load should fail");
    (err, file)
}

fn message_for(case: &str, text: &str) -> (String, String) {
    let (err, file) = error_for(case, text.as_bytes());
    assert_eq!(err.path(), file.as_path(), "{case}");
    (err.to_string(), file.display().to_string())
}

#[test]
fn syntax_errors_name_file_and_line() {
    let cases = [
        (
            "section",
            "[Socket\nListenStream=1\n",
            ":1: invalid section header '[Socket'",
        ),
        (
            "section-quote",
            "[So\"cket]\n",
            ":1: invalid section header '[So\"cket]'",
        ),
        (
            "equals",
            "[Socket]\n\nListenStream 22\n",
            ":3: missing '=' in 'ListenStream 22'",
        ),
        ("key", "[Socket]\n=22\n", ":2: missing key name before '='"),
    ];
    for (case, text, suffix) in cases {
        let (message, file) = message_for(case, text);
        assert_eq!(message, format!("{file}{suffix}"), "{case}");
    }
    let (err, file) = error_for(
        "utf8",
        b"[Socket]\nListenStream=1\nListenStream=/run/\xff\n",
    );
    assert_eq!(
        err.to_string(),
        format!("{}:3: not valid UTF-8", file.display())
    );
    assert_eq!(err.line(), Some(3));
}

#[test]
fn invalid_listen_values_name_file_line_and_reason() {
    let long = format!("/{}", "x".repeat(120));
    let too_long = "unix socket path is 121 bytes, longer than the 107 that fit".to_owned();
    let cases: Vec<(&str, String, String)> = vec![
        ("ListenStream", "0".into(), "port 0 is not allowed".into()),
        (
            "ListenStream",
            "65536".into(),
            "port 65536 is out of range (1-65535)".into(),
        ),
        (
            "ListenDatagram",
            "127.0.0.1:0".into(),
            "port 0 is not allowed".into(),
        ),
        (
            "ListenStream",
            "127.0.0.1".into(),
            "missing port (write 127.0.0.1:PORT)".into(),
        ),
        (
            "ListenStream",
            "localhost:22".into(),
            "'localhost' is not an IPv4 address".into(),
        ),
        (
            "ListenStream",
            "[::1]:ssh".into(),
            "invalid port 'ssh'".into(),
        ),
        (
            "ListenStream",
            "[fe80::1%%eth0]:22".into(),
            "systemd reads the interface after the port: write [fe80::1]:22%eth0".into(),
        ),
        (
            "ListenStream",
            "@".into(),
            "unix socket name is empty".into(),
        ),
        ("ListenStream", long, too_long),
        (
            "ListenSequentialPacket",
            "127.0.0.1:80".into(),
            "SOCK_SEQPACKET needs a unix socket address".into(),
        ),
        (
            "ListenStream",
            "sshd.sock".into(),
            "not a port, IPv4:PORT, [IPv6]:PORT, absolute unix path or @abstract name".into(),
        ),
    ];
    for (i, (key, value, reason)) in cases.into_iter().enumerate() {
        let text = format!("[Unit]\nDescription=x\n[Socket]\n{key}={value}\n");
        let (message, file) = message_for(&format!("address-{i}"), &text);
        assert_eq!(message, format!("{file}:4: {key}={value}: {reason}"));
    }
}

#[test]
fn a_continued_value_keeps_the_space_systemd_puts_for_the_backslash() {
    let (message, file) = message_for(
        "continuation",
        "[Socket]\nListenDatagram=127.0.0.1:\\\n# dropped comment\n5353\n",
    );
    assert_eq!(
        message,
        format!("{file}:2: ListenDatagram=127.0.0.1: 5353: invalid port ' 5353'")
    );
}

#[test]
fn invalid_settings_name_file_line_and_what_is_expected() {
    let cases = [
        (
            "Accept=maybe",
            "Accept=maybe: expected a boolean (yes/no, true/false, on/off, 1/0)",
        ),
        (
            "Accept=",
            "Accept=: expected a boolean (yes/no, true/false, on/off, 1/0)",
        ),
        (
            "Service=sshd.target",
            "Service=sshd.target: expected a unit name ending in .service",
        ),
        (
            "FileDescriptorName=a:b",
            "FileDescriptorName=a:b: expected at most 255 printable ASCII characters without ':'",
        ),
        (
            "BindIPv6Only=sometimes",
            "BindIPv6Only=sometimes: expected default, both, ipv6-only or a boolean",
        ),
        (
            "ListenStream=/run/%H.sock",
            "ListenStream=/run/%H.sock: specifier %H cannot be resolved outside the guest",
        ),
        (
            "FileDescriptorName=50%",
            "FileDescriptorName=50%: a lone '%' ends the value (write %% for a percent sign)",
        ),
    ];
    for (i, (assignment, expected)) in cases.into_iter().enumerate() {
        let text = format!("[Socket]\nListenStream=1\n{assignment}\n");
        let (message, file) = message_for(&format!("value-{i}"), &text);
        assert_eq!(message, format!("{file}:3: {expected}"));
    }
}

#[test]
fn refusals_point_at_the_setting_systemd_refuses() {
    let (message, file) = message_for(
        "accept-service",
        "[Socket]\nListenStream=22\nAccept=yes\nService=sshd.service\n",
    );
    assert_eq!(
        message,
        format!("{file}:4: systemd refuses to load x.socket: Service= cannot be combined with Accept=yes")
    );
    let (message, file) = message_for(
        "accept-datagram",
        "[Socket]\nAccept=true\nListenDatagram=5353\n",
    );
    assert_eq!(
        message,
        format!("{file}:2: systemd refuses to load x.socket: Accept=yes needs stream or sequential-packet sockets only")
    );
    let (message, file) = message_for(
        "accept-fifo",
        "[Socket]\nListenStream=22\nListenFIFO=/run/f\nAccept=1\n",
    );
    assert_eq!(
        message,
        format!("{file}:4: systemd refuses to load x.socket: Accept=yes needs stream or sequential-packet sockets only")
    );
}

#[test]
fn errors_in_dropins_name_the_dropin() {
    let dir = unit_dir("dropin");
    fs::write(dir.join("x.socket"), "[Socket]\nListenStream=22\n").unwrap();
    fs::create_dir(dir.join("x.socket.d")).unwrap();
    let dropin = dir.join("x.socket.d/10-bad.conf");
    fs::write(&dropin, "# comment\n[Socket]\nListenStream=99999\n").unwrap();
    let err = GuestUnits::load(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3: ListenStream=99999: port 99999 is out of range (1-65535)",
            dropin.display()
        )
    );
    assert_eq!(err.path(), dropin.as_path());
    assert_eq!(err.line(), Some(3));
}

#[test]
fn io_errors_name_the_path() {
    let missing = unit_dir("io").join("nowhere");
    let err = GuestUnits::load(&missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(err.line(), None);

    let file = unit_dir("io-file").join("x.socket");
    fs::write(&file, "[Socket]\nListenStream=1\n").unwrap();
    let err = GuestUnits::load(&file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: not a directory", file.display())
    );
}

#[test]
fn symlink_loops_inside_the_guest_are_reported() {
    let dir = unit_dir("loop");
    std::os::unix::fs::symlink("b.socket", dir.join("a.socket")).unwrap();
    std::os::unix::fs::symlink("/a.socket", dir.join("b.socket")).unwrap();
    let err = GuestUnits::load(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: too many levels of symbolic links inside the guest root",
            dir.join("a.socket").display()
        )
    );
}

#[test]
fn ignored_lines_are_not_errors() {
    // Assignments before any section, unknown sections and keys, and other unit types are
    // ignored as systemd ignores them.
    let dir = unit_dir("ignored");
    fs::write(
        dir.join("x.socket"),
        "Stray=1\n[X-Custom]\nListenStream=not-an-address\n[Socket]\nBacklog=5\nListenStream=1\n",
    )
    .unwrap();
    fs::write(dir.join("x.service"), "this is not parsed\n").unwrap();
    let guest = GuestUnits::load(&dir).unwrap();
    assert_eq!(guest.units.len(), 1);
    assert_eq!(guest.units[0].listens.len(), 1);
}
