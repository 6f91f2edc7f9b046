//! Control requests: status, metrics, start, stop, reload, restart.

use super::*;

impl Daemon {
    pub(super) fn control(&mut self, request: Request) -> serde_json::Value {
        let unit_slot = |name: &str| {
            self.by_name
                .get(name)
                .copied()
                .ok_or_else(|| error_reply(&format!("no unit {name:?}")))
        };
        match request {
            Request::Status => self.status(),
            Request::Metrics => serde_json::json!({
                "ok": true,
                "text": metrics::render(self.live_units().map(|(_, u)| u)),
            }),
            Request::Start { unit } => match unit_slot(&unit) {
                Err(e) => e,
                Ok(u) => {
                    match self.unit(u).state {
                        State::Listening | State::Held | State::Backoff { .. } => {
                            info!(unit = %unit, "start requested");
                            self.start(u, Instant::now(), Trigger::Admin);
                        }
                        _ => {
                            let unit = self.unit_mut(u);
                            unit.after_stop = AfterStop::Listen;
                            unit.stop_requested = false;
                        }
                    }
                    serde_json::json!({"ok": true, "unit": unit, "state": self.unit(u).state.name()})
                }
            },
            Request::Stop { unit, hold } => match unit_slot(&unit) {
                Err(e) => e,
                Ok(u) => {
                    let after = if hold {
                        AfterStop::Hold
                    } else {
                        AfterStop::Listen
                    };
                    match self.unit(u).state {
                        State::Running { guest, .. } => self.stop(u, guest, after),
                        State::Starting { .. } => {
                            // Stopped once the start reports back.
                            let unit = self.unit_mut(u);
                            unit.stop_requested = true;
                            unit.after_stop = after;
                        }
                        State::Stopping { .. } => self.unit_mut(u).after_stop = after,
                        State::Listening | State::Backoff { .. } if hold => {
                            self.deregister(u);
                            self.unit_mut(u).set_state(State::Held);
                        }
                        _ => {}
                    }
                    serde_json::json!({"ok": true, "unit": unit, "state": self.unit(u).state.name()})
                }
            },
            Request::Reload => match self.reload() {
                Ok(summary) => {
                    info!(%summary, "reloaded");
                    serde_json::json!({"ok": true, "summary": summary})
                }
                Err(e) => {
                    error!(error = %e, "reload refused; the old config stays in force");
                    error_reply(&format!(
                        "reload refused, the old config stays in force: {e}"
                    ))
                }
            },
            Request::Restart => {
                if self.shutdown_deadline.is_some() {
                    return error_reply("the daemon is stopping");
                }
                info!("live restart requested");
                self.restart_requested.get_or_insert_with(Instant::now);
                serde_json::json!({"ok": true, "restarting": true, "instance": self.instance.to_string()})
            }
        }
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let queues = ListenQueues::snapshot();
        let units: Vec<_> = self
            .live_units()
            .map(|(_, u)| u.status(|socket| queues.get(socket)))
            .collect();
        serde_json::json!({
            "ok": true,
            "pid": std::process::id(),
            "instance": self.instance.to_string(),
            "config": self.config_path.display().to_string(),
            "units": units,
        })
    }
}

/// Accept-queue lengths of listening sockets by inode, for status.
struct ListenQueues(HashMap<u64, u32>);

impl ListenQueues {
    fn snapshot() -> Self {
        use netlink_packet_sock_diag::inet::StateFlags;
        let mut queues = HashMap::new();
        if let Ok(tcp) = sock_diag::tcp_sockets(StateFlags::LISTEN) {
            queues.extend(tcp.into_iter().map(|s| (u64::from(s.inode), s.queued)));
        }
        if let Ok(unix) =
            sock_diag::unix_sockets(netlink_packet_sock_diag::unix::StateFlags::LISTEN)
        {
            queues.extend(unix.into_iter().map(|s| (u64::from(s.inode), s.queued)));
        }
        Self(queues)
    }

    pub(super) fn get(&self, socket: &BoundSocket) -> Option<u32> {
        self.0.get(&socket.inode()).copied()
    }
}
