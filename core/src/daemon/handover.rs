//! Live restart: handing listeners and running guests to a fresh daemon image,
//! and adopting them on the other side.

use super::*;

impl Daemon {
    /// Once no unit is between states: stops the guests no plugin can adopt, then
    /// execs a fresh portwake with every listener (`LISTEN_FDS`) and a state file
    /// naming the running guests, which it adopts. Returns only on failure.
    pub(super) fn try_restart(&mut self, now: Instant) -> Result<(), DaemonError> {
        let asked = self.restart_requested.expect("checked by the caller");
        let in_flight = self
            .live_units()
            .any(|(_, u)| matches!(u.state, State::Starting { .. } | State::Stopping { .. }));
        if in_flight && now < asked + RESTART_SETTLE {
            return Ok(());
        }
        let unadoptable: Vec<(usize, u64)> = self
            .live_units()
            .filter_map(|(i, u)| match u.state {
                State::Running { guest, .. }
                    if !u.plugin.can_adopt() || u.guest_handle.is_none() =>
                {
                    Some((i, guest))
                }
                _ => None,
            })
            .collect();
        if !unadoptable.is_empty() && now < asked + RESTART_SETTLE {
            for (u, guest) in unadoptable {
                info!(unit = %self.unit(u).config.name, guest, "its plugin cannot adopt guests: stopping it before the restart");
                self.stop(u, guest, AfterStop::Listen);
            }
            return Ok(());
        }
        let mut fds = Vec::new();
        let mut guests = Vec::new();
        for (_, unit) in self.live_units() {
            let pending = unit.pending.iter().flat_map(|p| p.listeners.iter());
            for l in unit.listeners.iter().chain(pending) {
                if !fds
                    .iter()
                    .any(|(s, _): &(Arc<BoundSocket>, String)| Arc::ptr_eq(s, &l.socket))
                {
                    fds.push((
                        Arc::clone(&l.socket),
                        supervisor::fd_store_name(&unit.config.name, &l.config),
                    ));
                }
            }
            if let (State::Running { guest, pid, .. }, Some(handle)) =
                (unit.state, &unit.guest_handle)
            {
                guests.push(RunningGuest {
                    unit: unit.config.name.clone(),
                    guest,
                    pid,
                    handle: handle.clone(),
                });
            }
        }
        let state = RestartState {
            next_guest: self.next_guest,
            guests,
        };
        let path = restart::state_path(&self.control_path);
        info!(listeners = fds.len(), guests = state.guests.len(), executable = %self.executable.display(), "live restart: handing over");
        if let Some(written) = self.restart_reply_written.take() {
            let _ = written.recv_timeout(Duration::from_secs(1));
        }
        let started = Instant::now();
        let error = restart::exec(&self.executable, &fds, &state, &path, started);
        Err(DaemonError::Io {
            step: "live restart (exec)",
            source: error,
        })
    }

    /// Takes over the guests an earlier daemon process left running.
    pub(super) fn adopt_guests(&mut self, state: RestartState) {
        self.next_guest = self.next_guest.max(state.next_guest);
        for running in state.guests {
            let Some(&u) = self.by_name.get(&running.unit) else {
                warn!(unit = %running.unit, guest = running.guest, "a guest of a unit no longer in the config was left running; not adopted");
                continue;
            };
            let plugin = Arc::clone(&self.unit(u).plugin);
            match plugin.adopt(running.guest, &running.handle) {
                Ok(started) => {
                    self.deregister(u);
                    let unit = self.unit_mut(u);
                    info!(unit = %unit.config.name, guest = running.guest, pid = started.pid.unwrap_or(0), "adopted a running guest");
                    unit.guest_handle = started.handle.or(Some(running.handle));
                    unit.set_state(State::Running {
                        guest: running.guest,
                        pid: started.pid.or(running.pid),
                        since: Instant::now(),
                    });
                    unit.last_busy = Instant::now();
                    self.schedule_idle_check(u);
                }
                Err(AdoptFailure::Gone) => {
                    info!(unit = %running.unit, guest = running.guest, "the guest ended during the restart; listening");
                }
                Err(e) => {
                    warn!(unit = %running.unit, guest = running.guest, pid = running.pid.unwrap_or(0), error = %e, "cannot adopt the running guest; listening (it may still run)");
                }
            }
        }
    }
}
