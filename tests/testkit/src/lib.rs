//! `testkit`: a test-only plugin that runs a command like `exec`, with dials the
//! tests turn to make activation slow or make a call fail or panic.
//!
//! Options: `(command: [...], activate_delay_ms: 2000, fail_in: "activate", panic_in: "stop")`,
//! and for the fault-injection tests: `activate_hangs: true` (activate never returns),
//! `bogus_reports: true` ("stopped" for an unknown guest right away, and for each real
//! guest a second, late time after its exit), `leak_fds: N` (every activate leaves N
//! inheritable fds open in the daemon).

use std::time::Duration;

use portwake_plugin_api::options::parse_options;
use portwake_plugin_api::{
    export_plugin, Activation, AdoptError, GuestCommand, GuestExit, GuestId, GuestInfo, Host,
    Plugin, ProcessGuests,
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
    #[serde(default)]
    activate_hangs: bool,
    #[serde(default)]
    bogus_reports: bool,
    #[serde(default)]
    leak_fds: u32,
}

#[derive(Debug)]
struct Testkit {
    options: Options,
    host: Host,
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
            host,
            guests: ProcessGuests::new(host),
        };
        plugin.dials("create")?;
        Ok(plugin)
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        std::thread::sleep(Duration::from_millis(self.options.activate_delay_ms));
        self.dials("activate")?;
        if self.options.activate_hangs {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        for _ in 0..self.options.leak_fds {
            // Deliberately leaked, without close-on-exec: the daemon must keep them
            // away from every other guest anyway.
            std::mem::forget(std::fs::File::open("/dev/null").map_err(|e| e.to_string())?);
            // SAFETY: dup has no memory-safety preconditions; the fd is borrowed for
            // the call and the copy is leaked on purpose.
            unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&activation.fds[0].fd)) };
        }
        let info = self
            .guests
            .start(activation, &GuestCommand::new(&self.options.command))?;
        if self.options.bogus_reports {
            let (host, guest) = (self.host, activation.guest);
            let pid = info.pid.unwrap_or(0);
            host.guest_stopped(u64::MAX, GuestExit::Exited(99));
            std::thread::spawn(move || {
                while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(300));
                host.guest_stopped(guest, GuestExit::Exited(98));
            });
        }
        Ok(info)
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        self.dials("stop")?;
        self.guests.stop(guest, timeout)
    }

    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        self.dials("adopt").map_err(AdoptError::Failed)?;
        self.guests.adopt(guest, handle)
    }
}

export_plugin!(Testkit, "testkit");
