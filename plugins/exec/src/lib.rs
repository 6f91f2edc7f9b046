//! The `exec` activation plugin: runs a command as the guest, as
//! `systemd-socket-activate` would, and reports when it exits.
//!
//! Options (RON): `(command: ["/path/prog", "arg"], env: {"K": "V"}, working_dir: "/dir")`;
//! only `command` is required.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use portwake_plugin_api::{
    export_plugin, Activation, GuestCommand, GuestExit, GuestId, GuestInfo, GuestProcess, Host,
    LogLevel, Plugin,
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

/// A running guest and the record of its exit, filled by its waiter thread.
#[derive(Debug)]
struct Guest {
    process: GuestProcess,
    exit: Mutex<Option<GuestExit>>,
    exited: Condvar,
}

impl Guest {
    /// Waits up to `timeout` for the waiter thread to have reaped the guest.
    fn wait_exited(&self, timeout: Duration) -> bool {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        let (exit, _) = self
            .exited
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        exit.is_some()
    }
}

/// One instance per unit.
#[derive(Debug)]
struct ExecPlugin {
    options: ExecOptions,
    host: Host,
    guests: Arc<Mutex<HashMap<GuestId, Arc<Guest>>>>,
}

impl Plugin for ExecPlugin {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let options: ExecOptions = portwake_plugin_api::options::parse_options(options)?;
        if options.command.first().is_none_or(String::is_empty) {
            return Err("options: command must name a program".into());
        }
        Ok(Self {
            options,
            host,
            guests: Arc::default(),
        })
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        let mut command = GuestCommand::new(&self.options.command);
        for (k, v) in &self.options.env {
            command.env(k, v);
        }
        for (k, v) in &activation.env {
            command.env(k, v);
        }
        if let Some(dir) = &self.options.working_dir {
            command.working_dir(dir);
        }
        let process = command.spawn(&activation.fds).map_err(|e| e.to_string())?;
        let guest = Arc::new(Guest {
            process,
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        self.lock_guests()
            .insert(activation.guest, Arc::clone(&guest));
        self.host.log(
            LogLevel::Debug,
            &format!("started {} as pid {}", self.options.command[0], process.pid),
        );
        let (id, host, guests) = (activation.guest, self.host, Arc::clone(&self.guests));
        std::thread::Builder::new()
            .name(format!("exec-wait-{}", process.pid))
            .spawn(move || {
                let exit = guest.process.wait();
                // Like systemd after a service's main process exits: whatever it
                // left behind in its process group goes too.
                let _ = guest.process.signal(libc::SIGKILL);
                *guest.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(exit);
                guest.exited.notify_all();
                guests
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                host.guest_stopped(id, exit);
            })
            .map_err(|e| format!("spawning the waiter thread: {e}"))?;
        Ok(GuestInfo {
            pid: Some(i64::from(process.pid)),
        })
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        let Some(guest) = self.lock_guests().get(&guest).cloned() else {
            return Ok(()); // already gone: its exit is (being) reported
        };
        if guest
            .process
            .terminate(timeout, |left| guest.wait_exited(left))
        {
            Ok(())
        } else {
            Err(format!(
                "pid {} did not exit after SIGKILL",
                guest.process.pid
            ))
        }
    }
}

impl ExecPlugin {
    fn lock_guests(&self) -> std::sync::MutexGuard<'_, HashMap<GuestId, Arc<Guest>>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

export_plugin!(ExecPlugin, "exec");
