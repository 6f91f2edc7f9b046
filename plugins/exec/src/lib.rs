//! The `exec` activation plugin: runs a command as the guest, as
//! `systemd-socket-activate` would, and reports when it exits.
//!
//! Options (RON): `(command: ["/path/prog", "arg"], env: {"K": "V"}, working_dir: "/dir")`;
//! only `command` is required.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use portwake_plugin_api::options::parse_options;
use portwake_plugin_api::{
    export_plugin, Activation, AdoptError, GuestCommand, GuestId, GuestInfo, Host, Plugin,
    ProcessGuests,
};
use serde::Deserialize;

/// The unit's `options` for this plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecOptions {
    /// Program and arguments; the program is a path or a name looked up in `PATH`.
    command: Vec<String>,
    /// Extra environment on top of the daemon's.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Directory to run in; the daemon's own when absent.
    #[serde(default)]
    working_dir: Option<PathBuf>,
}

/// One instance per unit.
#[derive(Debug)]
struct ExecPlugin {
    options: ExecOptions,
    guests: ProcessGuests,
}

impl Plugin for ExecPlugin {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let options: ExecOptions = parse_options(options)?;
        if options.command.first().is_none_or(String::is_empty) {
            return Err("options: command must name a program".into());
        }
        Ok(Self {
            options,
            guests: ProcessGuests::new(host),
        })
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        let mut command = GuestCommand::new(&self.options.command);
        for (k, v) in self
            .options
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(activation.env.iter().copied())
        {
            command.env(k, v);
        }
        if let Some(dir) = &self.options.working_dir {
            command.working_dir(dir);
        }
        self.guests.start(activation, &command)
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        self.guests.stop(guest, timeout)
    }

    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        self.guests.adopt(guest, handle)
    }
}

export_plugin!(ExecPlugin, "exec");
