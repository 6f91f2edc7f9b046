//! Reads the systemd socket units of a guest OS tree and answers which host socket a systemd
//! guest would adopt.
//!
//! A systemd PID 1 adopts an inherited fd only when its family, socket type and bound address
//! equal what one of its socket units' `Listen*=` lines parses to; otherwise it silently binds its
//! own socket inside the guest and host clients hang. portwake therefore reads the guest's units
//! as systemd does (search path, drop-ins, masking, `.wants/` enablement, unit-file syntax) and
//! compares addresses with systemd's rules, so `portwake check` can catch a mismatch first.
//!
//! The systemd sources followed, function by function: `config_parse()` (`src/shared/conf-parser.c`)
//! for the syntax; `config_parse_socket_listen()` and friends (`src/core/load-fragment.c`) for the
//! `[Socket]` keys; `socket_verify()` and `socket_fdname()` (`src/core/socket.c`);
//! `unit_file_find_dropin_paths()` (`src/shared/dropin.c`) and `process_deps()`
//! (`src/core/load-dropin.c`) for drop-ins and `.wants/`; `socket_address_parse()`
//! (`src/shared/socket-netlink.c`) and `socket_address_matches_fd()`/`socket_address_equal()`
//! (`src/basic/socket-util.c`) for addresses.
//!
//! ```
//! use portwake_guest_units::{matches_address, parse_address, GuestAddress, HostSocket, ListenKind};
//!
//! // `ListenStream=2222` is `[::]:2222` on a guest with IPv6 ...
//! let guest = GuestAddress::parse("2222").unwrap();
//! assert_eq!(guest.resolve(true).to_string(), "[::]:2222");
//! // ... which an AF_INET host socket on 127.0.0.1:2222 does not match.
//! let host = HostSocket::new(ListenKind::Stream, parse_address("127.0.0.1:2222", true).unwrap());
//! assert!(!matches_address(ListenKind::Stream, &guest, &host, true));
//! ```
#![forbid(unsafe_code)]

mod address;
mod error;
mod load;
mod root;
mod specifier;
mod unitfile;

pub use address::{
    compare, parse_address, AddressError, Family, GuestAddress, HostSocket, ListenKind, Mismatch,
    UNIX_PATH_MAX,
};
pub use error::GuestUnitsError;
pub use load::{BindIpv6Only, GuestUnits, ListenLine, SocketUnit, UnsupportedLine, SEARCH_DIRS};

/// Whether a systemd guest adopts `host` for `line` (`socket_address_matches_fd()`).
/// `guest_ipv6` says whether the guest kernel has IPv6, which decides what a bare port means.
pub fn matches(line: &ListenLine, host: &HostSocket, guest_ipv6: bool) -> bool {
    line.matches(host, guest_ipv6)
}

/// [`matches()`] for an address not read from a unit file (e.g. one a user typed).
pub fn matches_address(
    kind: ListenKind,
    guest: &GuestAddress,
    host: &HostSocket,
    guest_ipv6: bool,
) -> bool {
    compare(kind, guest, host, guest_ipv6).is_ok()
}
