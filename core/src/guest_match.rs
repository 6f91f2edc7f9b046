//! Matching a unit's host listeners with its guest's systemd socket units.
//!
//! A systemd guest adopts a passed fd only if family, socket type and address equal
//! what one of its `Listen*=` lines parses to; otherwise it binds its own socket in
//! its own netns and host clients hang without an error anywhere. This module finds
//! every such mismatch before a user does, orders the fds as the guest's units list
//! them, and names them as systemd would.

use std::path::Path;

use portwake_guest_units::{
    compare, GuestAddress, GuestUnits, HostSocket, ListenKind, ListenLine, Mismatch, SocketUnit,
};
use portwake_plugin_api::SocketKind;

use crate::address::ListenAddress;
use crate::config::{ListenerConfig, UnitConfig};

/// What the guest's units say about a unit's listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestPlan {
    /// Host listener indices in the guest's fd order (unmatched listeners last).
    pub order: Vec<usize>,
    /// Per host listener: the fd name the guest unit gives it, if one claims it.
    pub names: Vec<Option<String>>,
    /// Mismatches, one line each, naming both sides.
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
}

/// Checks `unit`'s listeners against its `guest_units` (which must be set).
pub fn plan(config_path: &Path, unit: &UnitConfig) -> GuestPlan {
    let at = format!("{}: unit {:?}", config_path.display(), unit.name);
    let Some(dir) = &unit.guest_units else {
        return GuestPlan {
            order: (0..unit.listen.len()).collect(),
            names: vec![None; unit.listen.len()],
            ..GuestPlan::default()
        };
    };
    let guest = match GuestUnits::load(dir) {
        Ok(g) => g,
        Err(e) => {
            return GuestPlan {
                order: (0..unit.listen.len()).collect(),
                names: vec![None; unit.listen.len()],
                problems: vec![format!("{at}: guest_units: {e}")],
                notes: Vec::new(),
            }
        }
    };
    Matcher {
        config_path,
        unit,
        guest: &guest,
        ipv6: unit.guest_ipv6,
    }
    .run()
}

/// Returns `unit` with its listeners in guest order and named by the guest's units
/// where the config names none.
pub fn apply(unit: &UnitConfig, plan: &GuestPlan) -> UnitConfig {
    let mut ordered = unit.clone();
    ordered.listen = plan
        .order
        .iter()
        .map(|&i| {
            let mut listener = unit.listen[i].clone();
            if let (false, Some(name)) = (listener.named, &plan.names[i]) {
                listener.name.clone_from(name);
            }
            listener
        })
        .collect();
    ordered
}

struct Matcher<'a> {
    config_path: &'a Path,
    unit: &'a UnitConfig,
    guest: &'a GuestUnits,
    ipv6: bool,
}

impl Matcher<'_> {
    fn run(&self) -> GuestPlan {
        let listen = &self.unit.listen;
        let hosts: Vec<HostSocket> = listen.iter().map(host_socket).collect();
        let lines: Vec<(&SocketUnit, &ListenLine)> = self.guest.listen_lines().collect();
        let mut plan = GuestPlan {
            names: vec![None; listen.len()],
            ..GuestPlan::default()
        };
        // claims[l] = host listeners adopted by guest line l.
        let mut claims: Vec<Vec<usize>> = vec![Vec::new(); lines.len()];
        let mut near_missed = vec![false; lines.len()];
        for (i, host) in hosts.iter().enumerate() {
            let adopters: Vec<usize> = (0..lines.len())
                .filter(|&l| lines[l].1.matches(host, self.ipv6))
                .collect();
            match adopters.as_slice() {
                [l] => {
                    claims[*l].push(i);
                    plan.names[i] = Some(lines[*l].0.fd_name().to_owned());
                }
                [] => {
                    let problem = self.unadopted(i, host, &lines, &mut near_missed);
                    plan.problems.push(problem);
                }
                several => {
                    let who: Vec<String> = several
                        .iter()
                        .map(|&l| format!("{} ({})", lines[l].0.name, place(lines[l].1)))
                        .collect();
                    plan.problems.push(format!(
                        "{}: matches guest {}: systemd hands the fd to any one of them; keep one",
                        self.host_side(i),
                        who.join(" and ")
                    ));
                    claims[several[0]].push(i);
                    for &l in &several[1..] {
                        // Reported above; not also as a line without a listener.
                        near_missed[l] = true;
                    }
                }
            }
        }
        let mut guest_own = Vec::new();
        for (l, (unit, line)) in lines.iter().enumerate() {
            match claims[l].as_slice() {
                // A guest's own unix sockets (journald's, D-Bus's, …) are bound by the
                // guest itself: no host client waits on them, so no mismatch can hang one.
                [] if !near_missed[l] && matches!(line.address, GuestAddress::Unix(_) | GuestAddress::Abstract(_)) => {
                    guest_own.push(format!("{} {}", unit.name, line.value));
                }
                [] if !near_missed[l] => plan.problems.push(format!(
                    "{}: unit {:?}: guest {} {}={} parses to {} and no host listener matches it: add {}(address: {:?}) to listen",
                    self.config_path.display(),
                    self.unit.name,
                    place(line),
                    line.kind.directive(),
                    line.value,
                    self.parsed(line),
                    line.kind,
                    self.host_literal(line),
                )),
                [first, rest @ ..] if !rest.is_empty() => plan.problems.push(format!(
                    "{}: also matches guest {} {}={}, as listen[{first}] does: one guest line adopts one fd",
                    self.host_side(rest[0]),
                    place(line),
                    line.kind.directive(),
                    line.value,
                )),
                _ => {}
            }
            plan.order.extend(claims[l].first());
        }
        plan.order
            .extend((0..listen.len()).filter(|i| !claims.iter().any(|c| c.first() == Some(i))));
        plan.notes = self.notes();
        if !guest_own.is_empty() {
            plan.notes.push(format!(
                "unit {:?}: {} guest unix socket(s) have no host listener; the guest binds them itself: {}",
                self.unit.name,
                guest_own.len(),
                guest_own.join(", ")
            ));
        }
        plan
    }

    /// The problem line for a host listener no active guest line adopts.
    fn unadopted(
        &self,
        i: usize,
        host: &HostSocket,
        lines: &[(&SocketUnit, &ListenLine)],
        near_missed: &mut [bool],
    ) -> String {
        let side = self.host_side(i);
        // A line of a unit the guest does not start, matching exactly.
        if let Some((unit, line)) = self
            .guest
            .units
            .iter()
            .filter(|u| !u.is_active())
            .flat_map(|u| u.listens.iter().map(move |l| (u, l)))
            .find(|(_, l)| l.matches(host, self.ipv6))
        {
            let why = if unit.masked {
                format!("{} is masked: unmask it", unit.name)
            } else {
                format!(
                    "{} is not enabled: enable it with a symlink in sockets.target.wants/",
                    unit.name
                )
            };
            return format!(
                "{side}: matches guest {} {}={}, but {why}",
                place(line),
                line.kind.directive(),
                line.value
            );
        }
        // The nearest active line: same port (or both unix), not adopted by another listener.
        let near = lines.iter().enumerate().find(|(l, (_, line))| {
            !near_missed[*l]
                && !self
                    .unit
                    .listen
                    .iter()
                    .any(|other| line.matches(&host_socket(other), self.ipv6))
                && same_port(&line.address, &host.address)
        });
        let Some((l, (_, line))) = near else {
            let masked: Vec<&str> = self
                .guest
                .units
                .iter()
                .filter(|u| u.masked)
                .map(|u| u.name.as_str())
                .collect();
            let masked = if masked.is_empty() {
                String::new()
            } else {
                format!(" (masked in the guest, so not read: {})", masked.join(", "))
            };
            return format!(
                "{side}: no enabled guest socket unit listens there{masked}: add {}={} to a guest socket unit",
                host.kind.directive(),
                host.resolved()
            );
        };
        near_missed[l] = true;
        let Err(mismatch) = compare(line.kind, &line.address, host, self.ipv6) else {
            unreachable!("a matching line would have adopted the listener");
        };
        let guest_says = format!(
            "guest {} {}={}",
            place(line),
            line.kind.directive(),
            line.value
        );
        let fix = format!(
            "write {}={} in the guest or listen on {}(address: {:?}) on the host",
            host.kind.directive(),
            host.resolved(),
            line.kind,
            self.host_literal(line)
        );
        match mismatch {
            Mismatch::Family { guest, host: host_family } => format!(
                "{side}: {guest_says} parses to {} ({guest}); host listener {} is {host_family}: {fix}",
                self.parsed_address(line),
                host.resolved()
            ),
            Mismatch::Kind { guest, host: host_kind } => format!(
                "{side}: {guest_says} is {}; host listener is {}: {fix}",
                guest.socket_type(),
                host_kind.socket_type()
            ),
            Mismatch::Address { guest, host: host_address } => format!(
                "{side}: {guest_says} parses to {guest}; host listener is {host_address}: {fix}"
            ),
            Mismatch::NoGuestIpv6 => format!(
                "{side}: {guest_says} is IPv6, which the guest lacks (guest_ipv6: false), so systemd drops it: {fix}"
            ),
            Mismatch::Invalid => format!("{side}: {guest_says} is not an address systemd can compare"),
        }
    }

    fn notes(&self) -> Vec<String> {
        let at = format!("unit {:?}", self.unit.name);
        let mut notes = Vec::new();
        for unit in self.guest.units.iter().filter(|u| u.masked && u.enabled) {
            notes.push(format!(
                "{at}: guest {} is enabled but masked: the guest's systemd adopts nothing for it",
                unit.name
            ));
        }
        for unit in self.guest.active() {
            if unit.accept {
                notes.push(format!(
                    "{at}: guest {} has Accept=yes: the guest's systemd spawns {} for each connection",
                    unit.name,
                    unit.service_name()
                ));
            }
            for u in &unit.unsupported {
                notes.push(format!(
                    "{at}: guest {}:{} {}={} is not served by portwake: {}",
                    u.file.display(),
                    u.line,
                    u.key,
                    u.value,
                    u.reason
                ));
            }
        }
        notes
    }

    /// `host.ron:3:20: unit "ssh": listen[0] Stream 127.0.0.1:2222`.
    fn host_side(&self, i: usize) -> String {
        let listener = &self.unit.listen[i];
        let position = listener
            .position
            .map(|(line, col)| format!(":{line}:{col}"))
            .unwrap_or_default();
        format!(
            "{}{position}: unit {:?}: listen[{i}] {}",
            self.config_path.display(),
            self.unit.name,
            listener.describe()
        )
    }

    /// `[::]:2222 (AF_INET6)`: what a guest line parses to in this guest.
    fn parsed(&self, line: &ListenLine) -> String {
        format!(
            "{} ({})",
            self.parsed_address(line),
            line.address.family(self.ipv6)
        )
    }

    fn parsed_address(&self, line: &ListenLine) -> GuestAddress {
        line.address.resolve(self.ipv6)
    }

    /// What to write as the host's `address` so the guest line adopts it.
    fn host_literal(&self, line: &ListenLine) -> String {
        match (&line.address, self.ipv6) {
            (GuestAddress::Port(p), true) => p.to_string(),
            (other, _) => other.resolve(self.ipv6).to_string(),
        }
    }
}

/// `/guest/etc/systemd/system/sshd.socket:5`.
fn place(line: &ListenLine) -> String {
    format!("{}:{}", line.file.display(), line.line)
}

fn same_port(a: &GuestAddress, b: &GuestAddress) -> bool {
    match (a.port(), b.port()) {
        (Some(x), Some(y)) => x == y,
        (None, None) => true,
        _ => false,
    }
}

/// The host listener as the guest's systemd will see it (`getsockname`, `SO_TYPE`).
pub fn host_socket(listener: &ListenerConfig) -> HostSocket {
    let address = match &listener.address {
        ListenAddress::Port(p) => GuestAddress::Port(*p),
        ListenAddress::Inet(std::net::SocketAddr::V4(a)) => GuestAddress::Inet4(*a),
        ListenAddress::Inet(std::net::SocketAddr::V6(a)) => GuestAddress::Inet6 {
            ip: *a.ip(),
            port: a.port(),
            scope: (a.scope_id() != 0).then(|| a.scope_id().to_string()),
        },
        ListenAddress::Path(p) => GuestAddress::Unix(p.clone()),
        ListenAddress::Abstract(n) => GuestAddress::Abstract(n.clone()),
    };
    HostSocket::new(listen_kind(listener.kind), address)
}

fn listen_kind(kind: SocketKind) -> ListenKind {
    match kind {
        SocketKind::Stream => ListenKind::Stream,
        SocketKind::Datagram => ListenKind::Datagram,
        SocketKind::SequentialPacket => ListenKind::SequentialPacket,
    }
}

/// `portwake generate`: a host config whose one unit listens exactly where the
/// guest's enabled socket units expect, in their fd order.
pub fn generate(
    guest_dir: &Path,
    unit_name: &str,
    plugin: &str,
    guest_ipv6: bool,
) -> Result<String, portwake_guest_units::GuestUnitsError> {
    let guest = GuestUnits::load(guest_dir)?;
    // Absolute: the config may be written anywhere, and resolves relative paths to itself.
    let absolute = std::path::absolute(guest_dir).unwrap_or_else(|_| guest_dir.to_owned());
    let guest_dir = absolute.as_path();
    let mut listen = String::new();
    let mut emitted: Vec<(ListenKind, String)> = Vec::new();
    for (unit, line) in guest.listen_lines() {
        let address = match (&line.address, guest_ipv6) {
            (GuestAddress::Port(p), true) => p.to_string(),
            (other, _) => other.resolve(guest_ipv6).to_string(),
        };
        if !guest_ipv6 && matches!(line.address, GuestAddress::Inet6 { .. }) {
            continue; // systemd drops IPv6 lines in a guest without IPv6
        }
        let key = (line.kind, address.clone());
        if emitted.contains(&key) {
            listen.push_str(&format!(
                "                // {} {}:{} wants {} {address} too: systemd gives the fd to one of them\n",
                unit.name,
                line.file.display(),
                line.line,
                line.kind
            ));
            continue;
        }
        emitted.push(key);
        listen.push_str(&format!(
            "                {}(address: {address:?}), // {} {}:{} {}={}\n",
            line.kind,
            unit.name,
            line.file.display(),
            line.line,
            line.kind.directive(),
            line.value
        ));
    }
    let options = match plugin {
        "nspawn" => format!("(directory: {:?})", guest.root.display().to_string()),
        "libvirt_lxc" => format!("(domain: {unit_name:?})"),
        _ => "(command: [\"/path/to/guest\"]) /* the guest's command */".to_owned(),
    };
    Ok(format!(
        "// Generated by `portwake generate` from {dir}.\n\
         (\n    units: [\n        (\n            name: {unit_name:?},\n            plugin: {plugin:?},\n            options: {options},\n            guest_units: {dir:?},\n{ipv6}            listen: [\n{listen}            ],\n        ),\n    ],\n)\n",
        dir = guest_dir.display().to_string(),
        ipv6 = if guest_ipv6 { String::new() } else { "            guest_ipv6: false,\n".to_owned() },
    ))
}
