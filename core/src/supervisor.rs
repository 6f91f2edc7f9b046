//! Living under a service supervisor: taking over sockets it hands us
//! (`LISTEN_FDS`), and telling it how we are (`NOTIFY_SOCKET`: `READY=1`,
//! `STATUS=`, `STOPPING=1`, and the fd store that keeps listeners across a
//! `systemctl restart`).

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};

use portwake_plugin_api::SocketKind;
use sd_notify::NotifyState;
use tracing::{info, warn};

use crate::config::{kind_name, ListenerConfig};
use crate::listener::BoundSocket;

/// Sockets this process was started with, waiting to be claimed by address.
#[derive(Debug, Default)]
pub struct Inherited {
    pool: HashMap<(SocketKind, String), BoundSocket>,
}

impl Inherited {
    /// Takes the fds of `LISTEN_FDS` (when `LISTEN_PID` is ours); they become CLOEXEC.
    pub fn take() -> Self {
        let fds = match sd_notify::listen_fds() {
            Ok(fds) => fds,
            Err(e) => {
                warn!(error = %e, "ignoring malformed LISTEN_FDS");
                return Self::default();
            }
        };
        let mut pool = HashMap::new();
        for fd in fds {
            // SAFETY: LISTEN_FDS hands these fds to this process, which owns them now.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            match BoundSocket::inherit(owned) {
                Some((socket, kind, address)) => {
                    info!(fd, kind = kind_name(kind), %address, "inherited listener");
                    pool.insert((kind, address), socket);
                }
                None => warn!(fd, "inherited fd is not a socket; closed"),
            }
        }
        Self { pool }
    }

    /// The inherited socket for this listener, if there is one.
    pub fn claim(&mut self, config: &ListenerConfig) -> Option<BoundSocket> {
        self.pool.remove(&(config.kind, BoundSocket::key(config)))
    }

    /// Closes what no listener claimed, saying so.
    pub fn release_unclaimed(&mut self) {
        for ((kind, address), _) in self.pool.drain() {
            warn!(kind = kind_name(kind), %address, "inherited socket matches no listener in the config; closed");
        }
    }
}

/// Sends states to the supervisor, if there is one (`NOTIFY_SOCKET`).
pub fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the supervisor");
    }
}

/// The fd store name of a listener: unique per unit and address, valid for systemd
/// (printable, no ':').
pub fn fd_store_name(unit: &str, config: &ListenerConfig) -> String {
    format!("{unit}/{}/{}", kind_name(config.kind), config.address)
        .replace(':', "_")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// Puts a listener into the supervisor's fd store, so a restart gets it back.
pub fn store(unit: &str, config: &ListenerConfig, socket: &BoundSocket) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let name = fd_store_name(unit, config);
    if let Err(e) = sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(&name)],
        &[socket.fd()],
    ) {
        warn!(unit, fd_name = %name, error = %e, "cannot store the listener in the supervisor's fd store");
    }
}

/// Takes a closed listener out of the supervisor's fd store.
pub fn unstore(unit: &str, config: &ListenerConfig) {
    let name = fd_store_name(unit, config);
    notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
}
