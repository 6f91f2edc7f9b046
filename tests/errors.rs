//! Bad input gets a clear error naming the file, line and field (or the address, the
//! plugin file and the versions), and a non-zero exit.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use portwake_tests::{artifact, free_port, guest, portwake, Daemon};

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("host.ron");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Runs the daemon on a config that must be refused; returns its log.
fn refused(config: &str) -> String {
    let mut daemon = Daemon::spawn(config).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert!(!daemon.log().contains("ready units="), "{}", daemon.log());
    daemon.log()
}

#[test]
fn check_reports_every_problem_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"(units: [
    (name: "a", plugin: "exec", options: (command: ["/bin/true"]), listen: [Stream(address: "127.0.0.1:0")]),
    (name: "a", plugin: "exec", options: (command: ["/bin/true"]), listen: []),
])"#,
    );
    let (code, out) = portwake(&["check", "--config", &config]);
    assert_eq!(code, 1);
    let expected = [
        format!("{config}:2:93: unit \"a\": listen[0].address: \"127.0.0.1:0\": port must be 1 to 65535"),
        format!("{config}:3:12: unit \"a\": name: duplicate unit name"),
        format!("{config}:3:12: unit \"a\": listen: is empty: a unit needs at least one listener"),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn unknown_fields_and_syntax_errors_name_the_position() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "(units: [(name: \"a\", plugin: \"exec\",\n  listen: [Stream(address: \"80\", colour: \"red\")])])",
    );
    let (code, out) = portwake(&["check", "--config", &config]);
    assert_eq!(code, 1);
    assert!(out.starts_with(&format!("{config}:2:")), "{out}");
    assert!(out.contains("colour"), "{out}");
    assert!(
        out.contains("address"),
        "the message lists the fields that are allowed: {out}"
    );
}

#[test]
fn check_lets_the_plugin_validate_its_options_and_places_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"(units: [
    (name: "web", plugin: "exec",
     options: (command: ["/bin/true"], colour: "red"),
     listen: [Stream(address: "127.0.0.1:8080")]),
])"#,
    );
    let (code, out) = portwake(&["check", "--config", &config]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("{config}:3:"))
            && out.contains("unit \"web\": options:")
            && out.contains("colour"),
        "{out}"
    );
    let good = write_config(
        dir.path(),
        r#"(units: [(name: "web", plugin: "exec", options: (command: ["/bin/true"]),
            listen: [Stream(address: "127.0.0.1:8080")])])"#,
    );
    let (code, out) = portwake(&["check", "--config", &good]);
    assert_eq!((code, out.trim()), (0, format!("{good}: ok").as_str()));
}

#[test]
fn run_refuses_a_bad_config_before_binding_anything() {
    let port = free_port();
    let log = refused(&format!(
        r#"(units: [(name: "x", plugin: "exec", options: (command: ["/bin/true"]),
            listen: [Stream(address: "127.0.0.1:{port}"), Stream(address: "127.0.0.1:{port}")])])"#
    ));
    assert!(
        log.contains(&format!(
            "listen[1].address: Stream 127.0.0.1:{port} is already a listener of unit \"x\""
        )),
        "{log}"
    );
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing left bound"
    );
}

#[test]
fn an_address_in_use_names_the_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let log = refused(&format!(
        r#"(units: [(name: "busy", plugin: "exec", options: (command: ["{}"]),
            listen: [Stream(address: "127.0.0.1:{port}")])])"#,
        guest()
    ));
    assert!(
        log.contains(&format!(
            "unit \"busy\": Stream 127.0.0.1:{port}: address already in use (another socket is bound to port {port})"
        )),
        "{log}"
    );
}

#[test]
fn a_missing_plugin_says_where_it_looked() {
    let log = refused(
        r#"(units: [(name: "m", plugin: "nosuch", listen: [Stream(address: "127.0.0.1:1")])])"#,
    );
    assert!(
        log.contains(
            "unit \"m\": plugin \"nosuch\" not found: looked for libportwake_nosuch.so in "
        ),
        "{log}"
    );
    assert!(
        log.contains(
            &artifact("")
                .display()
                .to_string()
                .trim_end_matches('/')
                .to_owned()
        ),
        "{log}"
    );
}

/// Builds a fake plugin in C whose entry reports `major.minor` (or has no entry at all).
fn c_plugin(dir: &Path, name: &str, body: &str) -> String {
    let source = dir.join(format!("{name}.c"));
    std::fs::write(&source, body).unwrap();
    let lib = dir.join(format!("lib{name}.so"));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .status()
        .expect("the system C compiler");
    assert!(status.success());
    lib.display().to_string()
}

fn versioned_entry(major: u32, minor: u32) -> String {
    format!(
        r#"#include <stddef.h>
struct entry {{ size_t size; unsigned major, minor; const char *name, *version; void *f[4]; }};
static const struct entry e = {{ sizeof(struct entry), {major}, {minor}, "fake", "0", {{0}} }};
const struct entry *portwake_plugin_entry(void) {{ return &e; }}
"#
    )
}

/// A plugin built against ABI 1.0: its table ends before 1.1's `adopt`.
const ABI_1_0_PLUGIN: &str = r#"#include <stddef.h>
#include <stdint.h>
#include <string.h>
typedef struct { const char *ptr; size_t len; } Str;
typedef struct { uint8_t *ptr; size_t cap; size_t len; } Err;
static int32_t create(const void *host, Str options, void **instance, Err *e) {
    (void)host; (void)options; (void)e; *instance = (void *)1; return 0;
}
static int32_t activate(void *i, const void *a, void *info, Err *e) {
    (void)i; (void)a; (void)info;
    const char *m = "v1.0 activate called";
    size_t n = strlen(m) < e->cap ? strlen(m) : e->cap;
    memcpy(e->ptr, m, n); e->len = n; return 2;
}
static int32_t stop(void *i, uint64_t g, uint64_t t, Err *e) { (void)i; (void)g; (void)t; (void)e; return 0; }
static void destroy(void *i) { (void)i; }
struct entry { size_t size; uint32_t major, minor; const char *name, *version; void *f[4]; };
static const struct entry e = { sizeof(struct entry), 1, 0, "old", "0.9",
    { (void *)create, (void *)activate, (void *)stop, (void *)destroy } };
const struct entry *portwake_plugin_entry(void) { return &e; }
"#;

#[test]
fn a_plugin_built_for_abi_1_0_still_loads_and_is_called() {
    let dir = tempfile::tempdir().unwrap();
    let lib = c_plugin(dir.path(), "old", ABI_1_0_PLUGIN);
    let port = free_port();
    let daemon = Daemon::start(&format!(
        r#"(allow_untrusted_plugins: true, units: [(name: "old", plugin: "{lib}", listen: [Stream(address: "127.0.0.1:{port}")])])"#
    ))
    .unwrap();
    let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        daemon.wait_log("v1.0 activate called", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_plugin_of_another_abi_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    for (major, minor, expected) in [
        (2, 0, "plugin ABI 2.0 is not supported by this portwake (ABI 1.1): rebuild the plugin against ABI 1"),
        (1, 7, "plugin ABI 1.7 is newer than this portwake's ABI 1.1: upgrade portwake"),
    ] {
        let lib = c_plugin(dir.path(), &format!("abi{major}{minor}"), &versioned_entry(major, minor));
        let log = refused(&format!(
            r#"(units: [(name: "v", plugin: "{lib}", listen: [Stream(address: "127.0.0.1:1")])])"#
        ));
        assert!(log.contains(&format!("unit \"v\": {lib}: {expected}")), "{log}");
    }
    let lib = c_plugin(dir.path(), "noentry", "int unrelated(void) { return 0; }\n");
    let log = refused(&format!(
        r#"(units: [(name: "n", plugin: "{lib}", listen: [Stream(address: "127.0.0.1:1")])])"#
    ));
    assert!(
        log.contains(&format!(
            "{lib}: not a portwake plugin: no `portwake_plugin_entry` symbol"
        )),
        "{log}"
    );
}

#[test]
fn plugins_lists_the_built_in_plugins_with_versions() {
    let (code, out) = portwake(&["plugins"]);
    assert_eq!(code, 0, "{out}");
    let exec = out
        .lines()
        .find(|l| l.starts_with("exec "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(exec.contains("ABI 1.1"), "{exec}");
    assert!(
        exec.contains(&artifact("libportwake_exec.so").display().to_string()),
        "{exec}"
    );
}
