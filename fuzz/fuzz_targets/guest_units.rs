//! The guest socket-unit reader: a unit file, a drop-in and an enablement link built
//! from the input, read the way `portwake check` reads a guest. No input may panic.
//!
//! Input: `<unit file>\0<drop-in>\0<address>`; missing parts are empty.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portwake_guest_units::{parse_address, GuestAddress, GuestUnits};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portwake-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("fuzz.socket.d")).unwrap();
        std::fs::create_dir_all(dir.join("sockets.target.wants")).unwrap();
        let _ = std::os::unix::fs::symlink(
            "../fuzz.socket",
            dir.join("sockets.target.wants/fuzz.socket"),
        );
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let unit = parts.next().unwrap_or_default();
    let dropin = parts.next().unwrap_or_default();
    let address = parts.next().unwrap_or_default();
    if let Ok(address) = std::str::from_utf8(address) {
        let _ = parse_address(address, true);
        if let Ok(a) = GuestAddress::parse(address) {
            let _ = a.resolve(false).to_string();
        }
    }
    let dir = dir();
    std::fs::write(dir.join("fuzz.socket"), unit).unwrap();
    std::fs::write(dir.join("fuzz.socket.d/override.conf"), dropin).unwrap();
    match GuestUnits::load(dir) {
        Ok(units) => {
            for (unit, line) in units.listen_lines() {
                let _ = (
                    unit.fd_name(),
                    unit.service_name(),
                    line.adopted_address(true),
                );
            }
            let _ = units.active().count();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
