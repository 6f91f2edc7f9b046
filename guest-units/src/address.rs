//! Socket addresses as systemd parses and compares them.
//!
//! Parsing follows `socket_address_parse()` (systemd `src/shared/socket-netlink.c`) together with
//! `in_addr_port_ifindex_name_from_string_auto()` in the same file and `sockaddr_un_set_path()` in
//! `src/basic/socket-util.c`; comparison follows `socket_address_matches_fd()` and
//! `socket_address_equal()` in `src/basic/socket-util.c`. A guest adopts a passed fd only when these
//! agree, and nothing in the guest reports a mismatch, so the rules are reproduced exactly here.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

/// Longest unix socket path systemd accepts: `sun_path` is 108 bytes and systemd insists on a
/// terminating NUL (`sockaddr_un_set_path()`).
pub const UNIX_PATH_MAX: usize = 107;

/// The address family a socket has, as `getsockname()` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `AF_INET`
    Inet4,
    /// `AF_INET6`
    Inet6,
    /// `AF_UNIX`, path or abstract
    Unix,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Inet4 => "AF_INET",
            Family::Inet6 => "AF_INET6",
            Family::Unix => "AF_UNIX",
        })
    }
}

/// The socket type of a `Listen*=` line; systemd compares it with `SO_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenKind {
    /// `ListenStream=`, `SOCK_STREAM`
    Stream,
    /// `ListenDatagram=`, `SOCK_DGRAM`
    Datagram,
    /// `ListenSequentialPacket=`, `SOCK_SEQPACKET` (unix only)
    SequentialPacket,
}

impl ListenKind {
    /// The unit-file key, e.g. `ListenStream`.
    pub fn directive(self) -> &'static str {
        match self {
            ListenKind::Stream => "ListenStream",
            ListenKind::Datagram => "ListenDatagram",
            ListenKind::SequentialPacket => "ListenSequentialPacket",
        }
    }

    /// The kind a unit-file key stands for, if it is one of the three socket kinds.
    pub fn from_directive(key: &str) -> Option<ListenKind> {
        match key {
            "ListenStream" => Some(ListenKind::Stream),
            "ListenDatagram" => Some(ListenKind::Datagram),
            "ListenSequentialPacket" => Some(ListenKind::SequentialPacket),
            _ => None,
        }
    }

    /// The kernel's name for the type, e.g. `SOCK_STREAM`, for messages.
    pub fn socket_type(self) -> &'static str {
        match self {
            ListenKind::Stream => "SOCK_STREAM",
            ListenKind::Datagram => "SOCK_DGRAM",
            ListenKind::SequentialPacket => "SOCK_SEQPACKET",
        }
    }
}

/// Prints the config spelling (`Stream`, `Datagram`, `SequentialPacket`).
impl fmt::Display for ListenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenKind::Stream => "Stream",
            ListenKind::Datagram => "Datagram",
            ListenKind::SequentialPacket => "SequentialPacket",
        })
    }
}

/// A socket address in systemd's terms.
///
/// `Port` keeps a bare `ListenStream=PORT` unresolved, because its family depends on whether the
/// guest has IPv6 (`socket_ipv6_is_supported()`); [`GuestAddress::resolve`] decides it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GuestAddress {
    /// A bare port: `[::]:PORT` where the guest has IPv6, else `0.0.0.0:PORT`.
    Port(u16),
    /// `IPv4:PORT`
    Inet4(SocketAddrV4),
    /// `[IPv6]:PORT` with an optional interface scope written after the port (`%dev`).
    Inet6 {
        /// The address.
        ip: Ipv6Addr,
        /// The port, never 0.
        port: u16,
        /// Interface name or index after `%`. systemd resolves it inside the guest and
        /// `socket_address_equal()` ignores it, so it is kept for display only.
        scope: Option<String>,
    },
    /// An absolute file-system socket path.
    Unix(PathBuf),
    /// An abstract unix socket name, without the leading `@`.
    Abstract(String),
}

impl GuestAddress {
    /// Parses one address the way `socket_address_parse()` does, keeping a bare port unresolved.
    pub fn parse(s: &str) -> Result<GuestAddress, AddressError> {
        parse(s)
    }

    /// Turns a bare port into the address systemd binds on a guest with or without IPv6.
    pub fn resolve(&self, guest_ipv6: bool) -> GuestAddress {
        match self {
            GuestAddress::Port(port) if guest_ipv6 => GuestAddress::Inet6 {
                ip: Ipv6Addr::UNSPECIFIED,
                port: *port,
                scope: None,
            },
            GuestAddress::Port(port) => {
                GuestAddress::Inet4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *port))
            }
            other => other.clone(),
        }
    }

    /// The family systemd gives this address on a guest with or without IPv6.
    pub fn family(&self, guest_ipv6: bool) -> Family {
        match self {
            GuestAddress::Port(_) if guest_ipv6 => Family::Inet6,
            GuestAddress::Port(_) | GuestAddress::Inet4(_) => Family::Inet4,
            GuestAddress::Inet6 { .. } => Family::Inet6,
            GuestAddress::Unix(_) | GuestAddress::Abstract(_) => Family::Unix,
        }
    }

    /// The port of an IP address (bare or not); `None` for unix sockets.
    pub fn port(&self) -> Option<u16> {
        match self {
            GuestAddress::Port(port) | GuestAddress::Inet6 { port, .. } => Some(*port),
            GuestAddress::Inet4(sa) => Some(sa.port()),
            GuestAddress::Unix(_) | GuestAddress::Abstract(_) => None,
        }
    }
}

/// systemd's spelling (`sockaddr_pretty()`): `127.0.0.1:2222`, `[::]:2222`, `[fe80::1]:80%eth0`,
/// `/run/x.sock`, `@name`. An unresolved bare port prints as written (`2222`); resolve it first to
/// get the address systemd would print.
impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestAddress::Port(port) => write!(f, "{port}"),
            GuestAddress::Inet4(sa) => write!(f, "{}:{}", sa.ip(), sa.port()),
            GuestAddress::Inet6 { ip, port, scope } => {
                write!(f, "[{ip}]:{port}")?;
                if let Some(scope) = scope {
                    write!(f, "%{scope}")?;
                }
                Ok(())
            }
            GuestAddress::Unix(path) => write!(f, "{}", path.display()),
            GuestAddress::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

/// Why an address string is not one systemd would bind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing to parse.
    #[error("empty address")]
    Empty,
    /// Port 0 would let the kernel pick a port, which systemd refuses.
    #[error("port 0 is not allowed")]
    PortZero,
    /// A number too large for a port.
    #[error("port {0} is out of range (1-65535)")]
    PortRange(String),
    /// Something after the last ':' that is not a number.
    #[error("invalid port '{0}'")]
    InvalidPort(String),
    /// An IP address without a port.
    #[error("missing port (write {0})")]
    MissingPort(String),
    /// Text before `:PORT` that is not a dotted-quad IPv4 address.
    #[error("'{0}' is not an IPv4 address")]
    InvalidIpv4(String),
    /// Text inside `[...]` that is not an IPv6 address.
    #[error("'{0}' is not an IPv6 address")]
    InvalidIpv6(String),
    /// `[IPv6%dev]:PORT`: systemd reads the interface after the port, so this spelling fails.
    #[error("systemd reads the interface after the port: write {0}")]
    ScopeInsideBrackets(String),
    /// Text after `%` that is not an interface name or index.
    #[error("'{0}' is not a valid interface name")]
    InvalidInterface(String),
    /// `#name` is for DNS server names, not socket addresses.
    #[error("a '#' server name is not allowed in a socket address")]
    ServerName,
    /// `/` or `@` alone.
    #[error("unix socket name is empty")]
    UnixEmpty,
    /// A unix path longer than `sun_path` holds with its NUL.
    #[error("unix socket path is {0} bytes, longer than the {max} that fit", max = UNIX_PATH_MAX)]
    UnixTooLong(usize),
    /// An `AF_VSOCK` address, which portwake does not bind.
    #[error("AF_VSOCK addresses are not supported")]
    Vsock,
    /// `ListenSequentialPacket=` with an IP address, which systemd ignores.
    #[error("SOCK_SEQPACKET needs a unix socket address")]
    SequentialPacketNeedsUnix,
    /// None of the accepted forms.
    #[error("not a port, IPv4:PORT, [IPv6]:PORT, absolute unix path or @abstract name")]
    Unrecognized,
}

/// Parses `s` like systemd's `socket_address_parse()` and resolves a bare port for a guest with
/// (`[::]:PORT`) or without (`0.0.0.0:PORT`) IPv6.
pub fn parse_address(s: &str, guest_ipv6: bool) -> Result<GuestAddress, AddressError> {
    Ok(parse(s)?.resolve(guest_ipv6))
}

fn parse(s: &str) -> Result<GuestAddress, AddressError> {
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    if let Some(name) = s.strip_prefix('@') {
        return parse_unix_len(s).map(|()| GuestAddress::Abstract(name.to_owned()));
    }
    if s.starts_with('/') {
        return parse_unix_len(s).map(|()| GuestAddress::Unix(PathBuf::from(s)));
    }
    if [
        "vsock:",
        "vsock-stream:",
        "vsock-dgram:",
        "vsock-seqpacket:",
    ]
    .iter()
    .any(|p| s.starts_with(p))
    {
        return Err(AddressError::Vsock);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        // parse_ip_port(); systemd then fails port 0 through the IP path with EINVAL.
        return parse_port(s).map(GuestAddress::Port);
    }
    if s.contains('#') {
        return Err(AddressError::ServerName);
    }
    let (s, scope) = match s.split_once('%') {
        Some((head, ifname)) => {
            if head.starts_with('[') && ifname.contains(']') {
                return Err(scope_hint(head, ifname));
            }
            if !ifname_valid(ifname) {
                return Err(AddressError::InvalidInterface(ifname.to_owned()));
            }
            (head, Some(ifname.to_owned()))
        }
        None => (s, None),
    };
    match s.rfind(':') {
        Some(colon) if s.starts_with('[') => {
            let Some(ip) = s[..colon]
                .strip_prefix('[')
                .and_then(|x| x.strip_suffix(']'))
            else {
                return Err(AddressError::Unrecognized);
            };
            let port = parse_port(&s[colon + 1..])?;
            let ip = ip
                .parse::<Ipv6Addr>()
                .map_err(|_| AddressError::InvalidIpv6(ip.to_owned()))?;
            Ok(GuestAddress::Inet6 { ip, port, scope })
        }
        Some(colon) => {
            if s.parse::<Ipv6Addr>().is_ok() {
                return Err(AddressError::MissingPort(format!("[{s}]:PORT")));
            }
            let ip = &s[..colon];
            let ip = ip
                .parse::<Ipv4Addr>()
                .map_err(|_| AddressError::InvalidIpv4(ip.to_owned()))?;
            let port = parse_port(&s[colon + 1..])?;
            // systemd resolves the interface but keeps no scope for AF_INET.
            Ok(GuestAddress::Inet4(SocketAddrV4::new(ip, port)))
        }
        None if s.parse::<Ipv4Addr>().is_ok() => {
            Err(AddressError::MissingPort(format!("{s}:PORT")))
        }
        None => Err(AddressError::Unrecognized),
    }
}

fn parse_unix_len(s: &str) -> Result<(), AddressError> {
    if s.len() < 2 {
        Err(AddressError::UnixEmpty)
    } else if s.len() > UNIX_PATH_MAX {
        Err(AddressError::UnixTooLong(s.len()))
    } else {
        Ok(())
    }
}

/// `parse_ip_port()`: decimal, 1..=65535.
fn parse_port(s: &str) -> Result<u16, AddressError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::InvalidPort(s.to_owned()));
    }
    match s.parse::<u16>() {
        Ok(0) => Err(AddressError::PortZero),
        Ok(port) => Ok(port),
        Err(_) => Err(AddressError::PortRange(s.to_owned())),
    }
}

/// Builds the hint for `[ip%dev]:port`, which systemd rejects.
fn scope_hint(head: &str, tail: &str) -> AddressError {
    let ip = head.trim_start_matches('[');
    match tail.split_once(']') {
        Some((ifname, rest)) => {
            let port = rest.strip_prefix(':').unwrap_or("PORT");
            AddressError::ScopeInsideBrackets(format!("[{ip}]:{port}%{ifname}"))
        }
        None => AddressError::Unrecognized,
    }
}

/// `ifname_valid_full()` with `IFNAME_VALID_ALTERNATIVE | IFNAME_VALID_NUMERIC`: an ifindex, or a
/// printable name without `:`, `/`, `%` that is not all digits, `.`, `..`, `all` or `default`.
fn ifname_valid(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return matches!(s.parse::<i32>(), Ok(n) if n > 0);
    }
    // ALTIFNAMSIZ is 128 including the NUL.
    s.len() < 128
        && !matches!(s, "." | ".." | "all" | "default")
        && s.bytes()
            .all(|b| b > 32 && b < 127 && !matches!(b, b':' | b'/' | b'%'))
}

/// A host socket as portwake binds it, or as `getsockname()` and `SO_TYPE` describe it.
///
/// Pure data so the caller can build it from config before binding, or from a live fd.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostSocket {
    /// The socket's family. A bare [`GuestAddress::Port`] in `address` is read in this family.
    pub family: Family,
    /// The socket type.
    pub kind: ListenKind,
    /// The bound address.
    pub address: GuestAddress,
}

impl HostSocket {
    /// A host socket whose family follows from its address; a bare port is `[::]:PORT`, the
    /// dual-stack socket the daemon binds for it.
    pub fn new(kind: ListenKind, address: GuestAddress) -> HostSocket {
        HostSocket {
            family: address.family(true),
            kind,
            address,
        }
    }

    /// The concrete address, with a bare port read in the socket's own family.
    pub fn resolved(&self) -> GuestAddress {
        match (&self.address, self.family) {
            (GuestAddress::Port(_), Family::Inet4) => self.address.resolve(false),
            (GuestAddress::Port(_), _) => self.address.resolve(true),
            (other, _) => other.clone(),
        }
    }
}

impl fmt::Display for HostSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.kind, self.resolved(), self.family)
    }
}

/// Why a guest line would not adopt a host socket, first difference first, in the order
/// `socket_address_matches_fd()` checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The guest has no IPv6, so systemd drops an IPv6 line (`socket_address_parse_and_warn()`).
    NoGuestIpv6,
    /// Families differ (`getsockname()` family).
    Family {
        /// What the guest line parses to.
        guest: Family,
        /// What the host socket is.
        host: Family,
    },
    /// Socket types differ (`SO_TYPE`).
    Kind {
        /// The guest line's type.
        guest: ListenKind,
        /// The host socket's type.
        host: ListenKind,
    },
    /// Same family and type, different address or port (`socket_address_equal()`).
    Address {
        /// The guest line's address, resolved.
        guest: GuestAddress,
        /// The host socket's address, resolved.
        host: GuestAddress,
    },
    /// An address `socket_address_verify()` rejects, which equals nothing (e.g. port 0, or
    /// `SOCK_SEQPACKET` on IP).
    Invalid,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::NoGuestIpv6 => {
                f.write_str("the guest has no IPv6, so systemd drops the line")
            }
            Mismatch::Family { guest, host } => {
                write!(f, "family differs: guest {guest}, host {host}")
            }
            Mismatch::Kind { guest, host } => write!(
                f,
                "socket type differs: guest {}, host {}",
                guest.socket_type(),
                host.socket_type()
            ),
            Mismatch::Address { guest, host } => {
                write!(f, "address differs: guest {guest}, host {host}")
            }
            Mismatch::Invalid => f.write_str("the address is not one systemd can compare"),
        }
    }
}

/// Compares a guest `Listen*=` value with a host socket as `socket_address_matches_fd()` does:
/// family, then `SO_TYPE`, then `socket_address_equal()` (IP and port; the IPv6 scope is not
/// compared; unix paths compare as normalised paths, abstract names byte for byte).
///
/// systemd also accepts two different unix paths naming the same inode inside the guest
/// (`path_equal_or_files_same()`); that cannot be seen from the host, so only equal paths match.
pub fn compare(
    kind: ListenKind,
    guest: &GuestAddress,
    host: &HostSocket,
    guest_ipv6: bool,
) -> Result<(), Mismatch> {
    if !guest_ipv6 && matches!(guest, GuestAddress::Inet6 { .. }) {
        return Err(Mismatch::NoGuestIpv6);
    }
    let guest = guest.resolve(guest_ipv6);
    let host_addr = host.resolved();
    let guest_family = guest.family(guest_ipv6);
    if guest_family != host.family {
        return Err(Mismatch::Family {
            guest: guest_family,
            host: host.family,
        });
    }
    if kind != host.kind {
        return Err(Mismatch::Kind {
            guest: kind,
            host: host.kind,
        });
    }
    if !verify(kind, &guest)
        || !verify(host.kind, &host_addr)
        || host_addr.family(true) != host.family
    {
        return Err(Mismatch::Invalid);
    }
    let equal = match (&guest, &host_addr) {
        (GuestAddress::Inet4(a), GuestAddress::Inet4(b)) => a == b,
        (
            GuestAddress::Inet6 { ip: a, port: p, .. },
            GuestAddress::Inet6 { ip: b, port: q, .. },
        ) => a == b && p == q,
        (GuestAddress::Unix(a), GuestAddress::Unix(b)) => path_equal(a, b),
        (GuestAddress::Abstract(a), GuestAddress::Abstract(b)) => a == b,
        _ => false,
    };
    if equal {
        Ok(())
    } else {
        Err(Mismatch::Address {
            guest,
            host: host_addr,
        })
    }
}

/// `socket_address_verify()` in its non-strict form: IP sockets are stream or datagram with a
/// non-zero port; unix names are not empty.
fn verify(kind: ListenKind, address: &GuestAddress) -> bool {
    match address {
        GuestAddress::Port(port) | GuestAddress::Inet6 { port, .. } => {
            *port != 0 && kind != ListenKind::SequentialPacket
        }
        GuestAddress::Inet4(sa) => sa.port() != 0 && kind != ListenKind::SequentialPacket,
        GuestAddress::Unix(path) => path.as_os_str().len() > 1,
        GuestAddress::Abstract(_) => true,
    }
}

/// `path_equal()`: equal after dropping repeated slashes, `.` components and trailing slashes.
fn path_equal(a: &Path, b: &Path) -> bool {
    fn parts(p: &Path) -> Vec<Component<'_>> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    }
    parts(a) == parts(b)
}
