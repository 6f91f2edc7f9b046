//! Listen addresses, parsed and printed exactly as systemd's `Listen*=` values are.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;

/// A parsed listen address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddress {
    /// `IP:PORT` or `[IPv6]:PORT` (a scope as systemd writes it, `[IPv6]:PORT%ifname`,
    /// or as `[IPv6%ifname]:PORT`; an index works in place of the name).
    Inet(SocketAddr),
    /// A bare `PORT`: `[::]:PORT`, dual-stack unless told otherwise, as systemd parses it.
    Port(u16),
    /// An absolute path of a unix socket in the file system.
    Path(PathBuf),
    /// `@name`: a unix socket in the abstract namespace.
    Abstract(String),
}

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty value.
    #[error("address is empty")]
    Empty,
    /// Port 0 or above 65535.
    #[error("port must be 1 to 65535")]
    Port,
    /// `@` without a name.
    #[error("abstract socket name is empty")]
    EmptyAbstract,
    /// A unix path longer than `sun_path` holds.
    #[error("unix socket path is longer than 107 bytes")]
    PathTooLong,
    /// A `%scope` naming no interface.
    #[error("no network interface {0:?}")]
    Interface(String),
    /// Anything else.
    #[error("not an address: expected IP:PORT, [IPv6]:PORT, PORT, /path or @name")]
    Syntax,
}

/// Room in `sockaddr_un.sun_path`, less the terminating NUL.
const SUN_PATH_MAX: usize = 107;

impl ListenAddress {
    /// Parses a `Listen*=`-style value.
    pub fn parse(value: &str) -> Result<Self, AddressError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(AddressError::Empty);
        }
        if value.starts_with('/') {
            if value.len() > SUN_PATH_MAX {
                return Err(AddressError::PathTooLong);
            }
            return Ok(Self::Path(PathBuf::from(value)));
        }
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return Err(AddressError::EmptyAbstract);
            }
            if name.len() > SUN_PATH_MAX {
                return Err(AddressError::PathTooLong);
            }
            return Ok(Self::Abstract(name.to_owned()));
        }
        if value.bytes().all(|b| b.is_ascii_digit()) {
            return parse_port(value).map(Self::Port);
        }
        if let Some((host, scope)) = scoped_v6(value) {
            return Ok(Self::Inet(SocketAddr::V6(resolve_scope(host, scope)?)));
        }
        let (host, port) = value.rsplit_once(':').ok_or(AddressError::Syntax)?;
        let port = parse_port(port)?;
        let ip: IpAddr = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => IpAddr::V6(v6.parse().map_err(|_| AddressError::Syntax)?),
            None => IpAddr::V4(host.parse().map_err(|_| AddressError::Syntax)?),
        };
        Ok(Self::Inet(SocketAddr::new(ip, port)))
    }

    /// Whether this is a unix-domain address (path or abstract).
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Path(_) | Self::Abstract(_))
    }

    /// Whether the socket is AF_INET6 (a bare port is).
    pub fn is_ipv6(&self) -> bool {
        matches!(self, Self::Port(_) | Self::Inet(SocketAddr::V6(_)))
    }

    /// The socket address to bind; `None` for unix addresses.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Self::Inet(a) => Some(*a),
            Self::Port(p) => Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::UNSPECIFIED,
                *p,
                0,
                0,
            ))),
            Self::Path(_) | Self::Abstract(_) => None,
        }
    }
}

/// `[addr]:port%scope` (systemd's spelling) or `[addr%scope]:port` → (address and
/// port, scope).
fn scoped_v6(value: &str) -> Option<((&str, &str), &str)> {
    let inner = value.strip_prefix('[')?;
    let (inside, port) = inner.split_once("]:")?;
    if let Some((port, scope)) = port.split_once('%') {
        return Some(((inside, port), scope));
    }
    let (addr, scope) = inside.split_once('%')?;
    Some(((addr, port), scope))
}

fn resolve_scope((addr, port): (&str, &str), scope: &str) -> Result<SocketAddrV6, AddressError> {
    let ip: Ipv6Addr = addr.parse().map_err(|_| AddressError::Syntax)?;
    let port = parse_port(port)?;
    let index = match scope.parse::<u32>() {
        Ok(index) => index,
        Err(_) => nix::net::if_::if_nametoindex(scope)
            .map_err(|_| AddressError::Interface(scope.to_owned()))?,
    };
    Ok(SocketAddrV6::new(ip, port, 0, index))
}

fn parse_port(s: &str) -> Result<u16, AddressError> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddressError::Port),
        Ok(p) => Ok(p),
    }
}

impl fmt::Display for ListenAddress {
    /// systemd's spelling: `[::]:80` for a bare port, `127.0.0.1:80`, `/path`, `@name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet(SocketAddr::V6(a)) if a.scope_id() != 0 => {
                write!(f, "[{}]:{}%{}", a.ip(), a.port(), a.scope_id())
            }
            Self::Inet(a) => write!(f, "{a}"),
            Self::Port(p) => write!(f, "[::]:{p}"),
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(ListenAddress::parse("2222"), Ok(ListenAddress::Port(2222)));
        assert_eq!(
            ListenAddress::parse("127.0.0.1:80").unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            ListenAddress::parse("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        assert_eq!(
            ListenAddress::parse("2222").unwrap().to_string(),
            "[::]:2222"
        );
        assert_eq!(
            ListenAddress::parse("[fe80::1%1]:80").unwrap().to_string(),
            "[fe80::1]:80%1"
        );
        assert_eq!(
            ListenAddress::parse("[fe80::1]:80%lo").unwrap().to_string(),
            "[fe80::1]:80%1"
        );
        assert_eq!(
            ListenAddress::parse("/run/x.sock"),
            Ok(ListenAddress::Path("/run/x.sock".into()))
        );
        assert_eq!(
            ListenAddress::parse("@api"),
            Ok(ListenAddress::Abstract("api".into()))
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(ListenAddress::parse(""), Err(AddressError::Empty));
        assert_eq!(ListenAddress::parse("0"), Err(AddressError::Port));
        assert_eq!(ListenAddress::parse("70000"), Err(AddressError::Port));
        assert_eq!(ListenAddress::parse("1.2.3.4:0"), Err(AddressError::Port));
        assert_eq!(ListenAddress::parse("@"), Err(AddressError::EmptyAbstract));
        assert_eq!(
            ListenAddress::parse("localhost:80"),
            Err(AddressError::Syntax)
        );
        assert_eq!(ListenAddress::parse("::1:80"), Err(AddressError::Syntax));
        assert_eq!(
            ListenAddress::parse("run/x.sock"),
            Err(AddressError::Syntax)
        );
        assert_eq!(
            ListenAddress::parse("[fe80::1%nosuchif0]:80"),
            Err(AddressError::Interface("nosuchif0".into()))
        );
        assert_eq!(
            ListenAddress::parse(&format!("/{}", "x".repeat(107))),
            Err(AddressError::PathTooLong)
        );
    }
}
