//! Binding listening sockets with systemd's socket options.
//!
//! Sockets are CLOEXEC (socket2 creates them so) and stay in blocking mode: that is
//! how systemd hands them to services, and the daemon itself never accepts or reads
//! on them; it only waits for readiness.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use portwake_plugin_api::SocketKind;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::address::ListenAddress;
use crate::config::{BindIpv6Only, ListenerConfig};

/// A bound (and, for stream and packet sockets, listening) socket.
#[derive(Debug)]
pub struct BoundSocket {
    socket: OwnedFd,
}

impl BoundSocket {
    /// The socket, borrowed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Puts the socket back as the next guest expects it: in blocking mode (a guest
    /// may have changed O_NONBLOCK on the shared file description), and listening
    /// (a guest's `shutdown(2)` ends listening for every holder of the socket).
    /// Returns whether it had to listen again.
    pub fn restore(&self, config: &ListenerConfig) -> Result<bool, ListenError> {
        let os = |step: &'static str| {
            move |source: io::Error| ListenError::Os {
                listener: config.describe(),
                step,
                source,
            }
        };
        set_blocking(self.socket.as_fd()).map_err(os("resetting O_NONBLOCK"))?;
        if self.is_listening() {
            return Ok(false);
        }
        self.adjust(config)?;
        Ok(true)
    }

    /// Whether a stream or packet socket still listens (datagram sockets always do).
    pub fn is_listening(&self) -> bool {
        let socket = socket2::SockRef::from(&self.socket);
        match socket.r#type() {
            Ok(t) if t == Type::DGRAM => true,
            _ => socket.is_listener().unwrap_or(true),
        }
    }
}

/// Why a listener could not be set up; the message names the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another socket holds the address.
    #[error("{listener}: address already in use{hint}")]
    InUse {
        /// `Stream 127.0.0.1:80`.
        listener: String,
        /// Which port or path, in words.
        hint: String,
    },
    /// A path exists and is not a socket.
    #[error("{listener}: {} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// `Stream /run/x.sock`.
        listener: String,
        /// The path.
        path: PathBuf,
    },
    /// A `user` or `group` that does not exist.
    #[error("{listener}: no such {what} {name:?}")]
    NoSuchOwner {
        /// The listener.
        listener: String,
        /// "user" or "group".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// Any other OS error, with the step that failed.
    #[error("{listener}: {step}: {source}")]
    Os {
        /// The listener.
        listener: String,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Binds one listener as its config says.
pub fn bind(config: &ListenerConfig) -> Result<BoundSocket, ListenError> {
    let listener = config.describe();
    let os = |step: &'static str| {
        let listener = listener.clone();
        move |source: io::Error| ListenError::Os {
            listener,
            step,
            source,
        }
    };
    let (domain, address) = match &config.address {
        ListenAddress::Path(path) => (Domain::UNIX, SockAddr::unix(path).map_err(os("address"))?),
        ListenAddress::Abstract(name) => (
            Domain::UNIX,
            SockAddr::unix(format!("\0{name}")).map_err(os("address"))?,
        ),
        inet => {
            let addr = inet.inet().expect("non-unix addresses are inet");
            (Domain::for_address(addr), SockAddr::from(addr))
        }
    };
    let socket = Socket::new(domain, socket_type(config.kind), None).map_err(os("socket"))?;
    if !config.address.is_unix() {
        socket.set_reuse_address(true).map_err(os("SO_REUSEADDR"))?;
        if config.reuse_port {
            socket.set_reuse_port(true).map_err(os("SO_REUSEPORT"))?;
        }
        if let Some(device) = &config.bind_to_device {
            socket
                .bind_device(Some(device.as_bytes()))
                .map_err(os("SO_BINDTODEVICE"))?;
        }
    }
    if config.address.is_ipv6() {
        let only_v6 = match (config.bind_ipv6_only, &config.address) {
            (BindIpv6Only::Ipv6Only, _) => Some(true),
            (BindIpv6Only::Both, _) | (BindIpv6Only::Default, ListenAddress::Port(_)) => {
                Some(false)
            }
            (BindIpv6Only::Default, _) => None,
        };
        if let Some(only_v6) = only_v6 {
            socket.set_only_v6(only_v6).map_err(os("IPV6_V6ONLY"))?;
        }
        if config.free_bind {
            socket.set_freebind_v6(true).map_err(os("IPV6_FREEBIND"))?;
        }
    } else if config.free_bind {
        socket.set_freebind_v4(true).map_err(os("IP_FREEBIND"))?;
    }
    if let ListenAddress::Path(path) = &config.address {
        prepare_path(path, config, &listener)?;
    }
    socket.bind(&address).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ListenError::InUse {
                hint: in_use_hint(&config.address),
                listener: listener.clone(),
            }
        } else {
            os("bind")(source)
        }
    })?;
    if let ListenAddress::Path(path) = &config.address {
        apply_ownership(path, config, &listener)?;
    }
    if config.kind != SocketKind::Datagram {
        socket.listen(backlog(config)).map_err(os("listen"))?;
    }
    Ok(BoundSocket {
        socket: socket.into(),
    })
}

/// The `listen()` backlog: as configured, else i32::MAX, which asks for the
/// kernel's cap (somaxconn), as systemd's default does.
fn backlog(config: &ListenerConfig) -> i32 {
    config
        .backlog
        .map_or(i32::MAX, |b| i32::try_from(b).unwrap_or(i32::MAX))
}

fn socket_type(kind: SocketKind) -> Type {
    match kind {
        SocketKind::Stream => Type::STREAM,
        SocketKind::Datagram => Type::DGRAM,
        SocketKind::SequentialPacket => Type::SEQPACKET,
    }
}

fn in_use_hint(address: &ListenAddress) -> String {
    match address {
        ListenAddress::Inet(a) => format!(" (another socket is bound to port {})", a.port()),
        ListenAddress::Port(p) => format!(" (another socket is bound to port {p})"),
        ListenAddress::Path(_) => " (another process is listening on this path)".into(),
        ListenAddress::Abstract(_) => " (another socket holds this abstract name)".into(),
    }
}

/// Makes room for a unix socket file: parents are created, a stale socket file is
/// removed, a live one is in use, and anything else is never touched.
fn prepare_path(path: &Path, config: &ListenerConfig, listener: &str) -> Result<(), ListenError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ListenError::Os {
            listener: listener.to_owned(),
            step: "creating the parent directory",
            source,
        })?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Os {
                listener: listener.to_owned(),
                step: "inspecting the path",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            listener: listener.to_owned(),
            path: path.to_owned(),
        });
    }
    if socket_is_live(path, config.kind) {
        return Err(ListenError::InUse {
            listener: listener.to_owned(),
            hint: in_use_hint(&config.address),
        });
    }
    std::fs::remove_file(path).map_err(|source| ListenError::Os {
        listener: listener.to_owned(),
        step: "removing the stale socket file",
        source,
    })
}

/// Whether something still listens on the socket file at `path`.
fn socket_is_live(path: &Path, kind: SocketKind) -> bool {
    let Ok(probe) = Socket::new(Domain::UNIX, socket_type(kind), None) else {
        return false;
    };
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    // A live stream socket accepts the probe (it waits in the backlog and is then
    // dropped); a stale one refuses it.
    probe.connect(&addr).is_ok()
}

fn apply_ownership(
    path: &Path,
    config: &ListenerConfig,
    listener: &str,
) -> Result<(), ListenError> {
    let os = |step: &'static str| {
        move |source: io::Error| ListenError::Os {
            listener: listener.to_owned(),
            step,
            source,
        }
    };
    let mode = config.mode.unwrap_or(0o666);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(os("chmod"))?;
    let uid = match &config.user {
        None => None,
        Some(user) => Some(lookup_user(user).ok_or_else(|| ListenError::NoSuchOwner {
            listener: listener.to_owned(),
            what: "user",
            name: user.clone(),
        })?),
    };
    let gid = match &config.group {
        None => None,
        Some(group) => Some(lookup_group(group).ok_or_else(|| ListenError::NoSuchOwner {
            listener: listener.to_owned(),
            what: "group",
            name: group.clone(),
        })?),
    };
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(path, uid, gid).map_err(|e| os("chown")(io::Error::from(e)))?;
    }
    Ok(())
}

/// A user name or numeric uid.
fn lookup_user(user: &str) -> Option<Uid> {
    if let Ok(id) = user.parse::<u32>() {
        return Some(Uid::from_raw(id));
    }
    User::from_name(user).ok().flatten().map(|u| u.uid)
}

/// A group name or numeric gid.
fn lookup_group(group: &str) -> Option<Gid> {
    if let Ok(id) = group.parse::<u32>() {
        return Some(Gid::from_raw(id));
    }
    Group::from_name(group).ok().flatten().map(|g| g.gid)
}

fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags);
    if flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    }
    Ok(())
}

impl AsRawFd for BoundSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// Whether an already bound socket for `old` can serve as `new`: same type and
/// address, and no option that only a fresh `bind` can change.
pub fn reusable(old: &ListenerConfig, new: &ListenerConfig) -> Result<bool, String> {
    if old.kind != new.kind || old.address != new.address {
        return Ok(false);
    }
    let fixed = [
        ("reuse_port", old.reuse_port == new.reuse_port),
        ("free_bind", old.free_bind == new.free_bind),
        ("bind_ipv6_only", old.bind_ipv6_only == new.bind_ipv6_only),
        ("bind_to_device", old.bind_to_device == new.bind_to_device),
    ];
    match fixed.iter().find(|(_, same)| !same) {
        None => Ok(true),
        Some((option, _)) => Err(format!(
            "{}: changing {option} of a bound listener needs a restart of portwake",
            new.describe()
        )),
    }
}

impl BoundSocket {
    /// Applies what can change on a bound socket: backlog, and a unix file's mode and owner.
    pub fn adjust(&self, config: &ListenerConfig) -> Result<(), ListenError> {
        if config.kind != SocketKind::Datagram {
            socket2::SockRef::from(&self.socket)
                .listen(backlog(config))
                .map_err(|source| ListenError::Os {
                    listener: config.describe(),
                    step: "listen",
                    source,
                })?;
        }
        if let ListenAddress::Path(path) = &config.address {
            apply_ownership(path, config, &config.describe())?;
        }
        Ok(())
    }

    /// Takes over a socket handed to this process (`LISTEN_FDS`); returns it with
    /// its type and its address in systemd's spelling, or `None` if it is no socket.
    pub fn inherit(fd: OwnedFd) -> Option<(Self, SocketKind, String)> {
        let socket = Socket::from(fd);
        let kind = match socket.r#type().ok()? {
            t if t == Type::STREAM => SocketKind::Stream,
            t if t == Type::DGRAM => SocketKind::Datagram,
            t if t == Type::SEQPACKET => SocketKind::SequentialPacket,
            _ => return None,
        };
        let local = socket.local_addr().ok()?;
        let address = if let Some(inet) = local.as_socket() {
            ListenAddress::Inet(inet).to_string()
        } else if let Some(name) = local.as_abstract_namespace() {
            format!("@{}", String::from_utf8_lossy(name))
        } else {
            local.as_pathname()?.display().to_string()
        };
        Some((
            Self {
                socket: socket.into(),
            },
            kind,
            address,
        ))
    }

    /// The key `inherit` returns for a socket of this config.
    pub fn key(config: &ListenerConfig) -> String {
        match &config.address {
            ListenAddress::Port(_) => {
                ListenAddress::Inet(config.address.inet().expect("a port is inet")).to_string()
            }
            other => other.to_string(),
        }
    }

    /// The socket's inode, by which sock_diag names it.
    pub fn inode(&self) -> u64 {
        nix::sys::stat::fstat(&self.socket).map_or(0, |s| s.st_ino)
    }
}
