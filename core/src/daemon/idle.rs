//! Idle stop: counting a running guest's connections in the host kernel.

use super::*;

impl Daemon {
    /// Makes sure an idle check comes in time for the unit's guest, just started
    /// (a look at one unit: a guest's stop needs none, the next check sees it).
    pub(super) fn schedule_idle_check(&mut self, u: usize) {
        if let Some(idle) = self.unit(u).config.idle_stop {
            let next = Instant::now() + (idle / 10).clamp(IDLE_CHECK_MIN, IDLE_CHECK_MAX);
            self.next_idle_check = Some(self.next_idle_check.map_or(next, |t| t.min(next)));
        }
    }

    /// Stops running guests whose stream listeners have had no connection for
    /// their `idle_stop`; connections are counted by the host kernel.
    pub(super) fn check_idle(&mut self, now: Instant) {
        self.next_idle_check = None;
        let candidates: Vec<usize> = self
            .live_units()
            .filter(|(_, u)| {
                u.config.idle_stop.is_some() && matches!(u.state, State::Running { .. })
            })
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let connections = match Connections::snapshot() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot count connections (sock_diag); idle stop skipped this round");
                for u in candidates {
                    self.schedule_idle_check(u);
                }
                return;
            }
        };
        for &u in &candidates {
            let unit = self.unit_mut(u);
            let open: usize = unit
                .listeners
                .iter()
                .map(|l| connections.count(&l.config))
                .sum();
            tracing::trace!(unit = %unit.config.name, open, "idle check");
            if open > 0 || unit.was_busy {
                // The last connection closed at some time since the previous check:
                // count the idle time from now, so it is never cut short.
                unit.last_busy = now;
                unit.was_busy = open > 0;
                continue;
            }
            let idle = unit.config.idle_stop.expect("filtered");
            if now.duration_since(unit.last_busy) >= idle {
                let State::Running { guest, .. } = unit.state else {
                    continue;
                };
                unit.stats.idle_stops += 1;
                info!(unit = %unit.config.name, guest, idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX), "idle: no connection for idle_stop");
                self.stop(u, guest, AfterStop::Listen);
            }
        }
        for u in candidates {
            if matches!(self.unit(u).state, State::Running { .. }) {
                self.schedule_idle_check(u);
            }
        }
    }
}

/// Open connections in the host's namespace, for idle stop.
struct Connections {
    tcp: Vec<std::net::SocketAddr>,
    unix: Vec<String>,
}

impl Connections {
    fn snapshot() -> io::Result<Self> {
        use netlink_packet_sock_diag::inet::StateFlags;
        let open =
            StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE;
        let tcp = sock_diag::tcp_sockets(open)?
            .into_iter()
            .map(|s| s.local)
            .collect();
        let unix =
            sock_diag::unix_sockets(netlink_packet_sock_diag::unix::StateFlags::ESTABLISHED)?
                .into_iter()
                .filter_map(|s| s.name)
                .collect();
        Ok(Self { tcp, unix })
    }

    /// Connections accepted from this listener (TCP by local address, unix by name).
    pub(super) fn count(&self, listener: &ListenerConfig) -> usize {
        use crate::address::ListenAddress;
        if listener.kind == portwake_plugin_api::SocketKind::Datagram {
            return 0;
        }
        match &listener.address {
            ListenAddress::Path(_) | ListenAddress::Abstract(_) => {
                let name = listener.address.to_string();
                self.unix.iter().filter(|n| **n == name).count()
            }
            inet => {
                let bound = inet.inet().expect("inet address");
                self.tcp
                    .iter()
                    .filter(|local| {
                        local.port() == bound.port()
                            && (bound.ip().is_unspecified() || local.ip() == bound.ip())
                    })
                    .count()
            }
        }
    }
}
