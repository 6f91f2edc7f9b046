//! The host config: RON parse and whole validation. No input may panic, and every
//! error must be a message that names the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portwake::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new("/fuzz/host.ron"), text) {
        let message = e.to_string();
        assert!(message.starts_with("/fuzz/host.ron"), "{message}");
    }
});
