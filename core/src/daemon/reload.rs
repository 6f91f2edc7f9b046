//! Reload: apply a changed config without closing a listener that stays.

use super::*;

impl Daemon {
    /// Re-reads the config and applies the difference. Everything new is prepared
    /// (plugins created, sockets bound) before anything changes, so a bad config or a
    /// busy port leaves the running set exactly as it was.
    pub(super) fn reload(&mut self) -> Result<String, DaemonError> {
        supervisor::notify(&[NotifyState::Reloading]);
        let result = self.reload_inner();
        supervisor::notify(&[NotifyState::Ready, NotifyState::Status(&self.summary())]);
        result
    }

    pub(super) fn reload_inner(&mut self) -> Result<String, DaemonError> {
        let config = Config::load(&self.config_path)?;
        let mut prepared = Vec::with_capacity(config.units.len());
        let mut next_slot = self.units.len();
        let mut none = Inherited::default();
        let held = self.held_sockets();
        for unit in &config.units {
            let slot = self.by_name.get(&unit.name).copied().unwrap_or_else(|| {
                next_slot += 1;
                next_slot - 1
            });
            prepared.push(self.prepare(&config, unit, slot, &mut none, &held)?);
        }
        let keep: HashSet<&str> = config.units.iter().map(|u| u.name.as_str()).collect();
        let removed: Vec<usize> = self
            .live_units()
            .filter(|(_, u)| !keep.contains(u.config.name.as_str()))
            .map(|(i, _)| i)
            .collect();
        let (mut added, mut changed, mut deferred, mut unchanged) = (0, 0, 0, 0);
        // Deregister first, so a socket moving between units is never registered twice.
        for &u in &removed {
            self.deregister(u);
        }
        for p in &prepared {
            if let Some(&u) = self.by_name.get(&p.config.name) {
                let unit = self.unit(u);
                if !unit.has_guest() && !unit.is_same(p) {
                    self.deregister(u);
                }
            }
        }
        for &u in &removed {
            match self.unit(u).state {
                State::Running { guest, .. } => self.stop(u, guest, AfterStop::Remove),
                State::Starting { .. } | State::Stopping { .. } => {
                    let unit = self.unit_mut(u);
                    unit.after_stop = AfterStop::Remove;
                    unit.stop_requested = true;
                }
                _ => self.remove_unit(u),
            }
        }
        for p in prepared {
            match self.by_name.get(&p.config.name).copied() {
                Some(u) if self.unit(u).is_same(&p) => {
                    // Drops a change an earlier reload left pending, if this one undid it.
                    self.unit_mut(u).pending = None;
                    unchanged += 1;
                }
                None => {
                    for l in &p.listeners {
                        supervisor::store(&p.config.name, &l.config, &l.socket);
                    }
                    self.add_unit(p);
                    added += 1;
                }
                Some(u) if self.unit(u).has_guest() => {
                    self.unit_mut(u).pending = Some(p);
                    deferred += 1;
                }
                Some(u) => {
                    self.retire_listeners(u, &p.listeners);
                    let unit = self.unit_mut(u);
                    let held = unit.state == State::Held;
                    unit.switch_to(p);
                    if !held {
                        self.listen_again(u);
                    }
                    changed += 1;
                }
            }
        }
        Ok(format!(
            "{added} added, {} removed, {changed} changed now, {deferred} at their guest's next stop, {unchanged} unchanged",
            removed.len()
        ))
    }
}
