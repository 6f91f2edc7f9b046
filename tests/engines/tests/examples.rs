//! The engine examples' host configs pass `portwake check` as shipped: their
//! `guest_units` (the example's `guest/` directory, the files the README copies
//! into the guest) match the host listeners. Needs no engine and no root.

use std::process::Command;

use portwake_engine_tests::{bin_dir, workspace_root};

#[test]
fn engine_examples_pass_check() {
    let portwake = bin_dir().join("portwake");
    if !portwake.exists() {
        assert!(
            !portwake_engine_tests::under_ci(),
            "{} missing: run cargo build --workspace",
            portwake.display()
        );
        eprintln!("SKIPPED: {} missing", portwake.display());
        return;
    }
    for example in ["nspawn-ssh", "libvirt-lxc-ssh"] {
        let config = workspace_root()
            .join("examples")
            .join(example)
            .join("portwake.ron");
        let text = std::fs::read_to_string(&config).expect("read example config");
        assert!(
            text.contains("guest_units: \"guest\""),
            "{example}: no guest_units"
        );
        let out = Command::new(&portwake)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("run portwake check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": ok"),
            "{example}: portwake check failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
