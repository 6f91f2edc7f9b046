//! Bookkeeping for plugins whose guest is one host process (the guest itself, or an
//! engine's foreground process such as `systemd-nspawn` or `crun run`): spawn it,
//! reap it (through the library's one reaper thread), report its exit once, and
//! stop it on request.

use std::sync::Arc;
use std::time::Duration;

use crate::sdk::{Activation, AdoptError, GuestId, GuestInfo, Host, LogLevel};
use crate::spawn::{GuestCommand, GuestProcess};
use crate::table::{GuestSlot, GuestTable};

/// The guest processes of one plugin instance.
#[derive(Debug)]
pub struct ProcessGuests {
    host: Host,
    guests: GuestTable<GuestProcess>,
}

impl ProcessGuests {
    /// An empty set reporting to `host`.
    pub fn new(host: Host) -> Self {
        Self {
            host,
            guests: GuestTable::default(),
        }
    }

    /// Spawns `command` with the activation's listeners and watches it; its exit is
    /// reported to the host (once), after whatever is left in its process group is
    /// killed, as systemd does once a service's main process is gone.
    pub fn start(
        &self,
        activation: &Activation<'_>,
        command: &GuestCommand,
    ) -> Result<GuestInfo, String> {
        let process = command.spawn(&activation.fds).map_err(|e| e.to_string())?;
        self.watch(activation.guest, process)
    }

    /// Takes over a guest process started by an earlier daemon, named by the handle
    /// `start` returned; it is watched and stopped as if started here.
    pub fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        match GuestProcess::from_handle(handle).map_err(AdoptError::Failed)? {
            Some(process) => self.watch(guest, process).map_err(AdoptError::Failed),
            None => Err(AdoptError::Gone),
        }
    }

    fn watch(&self, id: GuestId, process: GuestProcess) -> Result<GuestInfo, String> {
        let guest = Arc::new(GuestSlot::new(process));
        self.guests.insert(id, Arc::clone(&guest));
        self.host.log(
            LogLevel::Debug,
            &format!("watching pid {} for guest {id}", process.pid),
        );
        let (host, guests) = (self.host, self.guests.clone());
        crate::reaper::watch(
            process,
            Box::new(move |exit| {
                // Whatever the guest left in its process group goes with it.
                let _ = guest.data.signal(libc::SIGKILL);
                guest.set_exited(exit);
                guests.remove(id);
                host.guest_stopped(id, exit);
            }),
        )
        .map_err(|e| format!("watching the guest process: {e}"))?;
        Ok(GuestInfo {
            pid: Some(i64::from(process.pid)),
            handle: process.handle(),
        })
    }

    /// SIGTERM, then SIGKILL after `timeout`; returns once the guest is reaped.
    /// A guest that is already gone is fine: its exit is (being) reported.
    pub fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        let Some(guest) = self.guests.get(guest) else {
            return Ok(());
        };
        if guest
            .data
            .terminate(timeout, |left| guest.wait_exited(left))
        {
            Ok(())
        } else {
            Err(format!("pid {} did not exit after SIGKILL", guest.data.pid))
        }
    }

    /// The pid of a running guest.
    pub fn pid(&self, guest: GuestId) -> Option<i32> {
        self.guests.get(guest).map(|g| g.data.pid)
    }
}
