//! `testkit`: a test-only plugin that runs a command like `exec`, with dials the
//! tests turn to make activation slow or make a call fail or panic.
//!
//! Options: `(command: [...], activate_delay_ms: 2000, fail_in: "activate", panic_in: "stop")`.

use std::time::Duration;

use portwake_plugin_api::options::parse_options;
use portwake_plugin_api::{
    export_plugin, Activation, GuestCommand, GuestId, GuestInfo, Host, Plugin, ProcessGuests,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    command: Vec<String>,
    #[serde(default)]
    activate_delay_ms: u64,
    #[serde(default)]
    fail_in: Option<String>,
    #[serde(default)]
    panic_in: Option<String>,
}

#[derive(Debug)]
struct Testkit {
    options: Options,
    guests: ProcessGuests,
}

impl Testkit {
    fn dials(&self, call: &str) -> Result<(), String> {
        if self.options.panic_in.as_deref() == Some(call) {
            panic!("testkit: panic in {call} as configured");
        }
        if self.options.fail_in.as_deref() == Some(call) {
            return Err(format!("testkit: {call} fails as configured"));
        }
        Ok(())
    }
}

impl Plugin for Testkit {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let plugin = Self {
            options: parse_options(options)?,
            guests: ProcessGuests::new(host),
        };
        plugin.dials("create")?;
        Ok(plugin)
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        std::thread::sleep(Duration::from_millis(self.options.activate_delay_ms));
        self.dials("activate")?;
        self.guests
            .start(activation, &GuestCommand::new(&self.options.command))
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        self.dials("stop")?;
        self.guests.stop(guest, timeout)
    }
}

export_plugin!(Testkit, "testkit");
