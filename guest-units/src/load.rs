//! Finding and reading a guest's socket units with systemd's search path, drop-ins, masking and
//! `.wants/` enablement.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::address::{AddressError, GuestAddress, HostSocket, ListenKind};
use crate::error::GuestUnitsError;
use crate::root::{is_missing, GuestRoot, Resolved};
use crate::{specifier, unitfile};

/// The system manager's unit search path inside a guest, highest precedence first, as
/// `lookup_paths_init()` (systemd `path-lookup.c`) builds it for a Debian-style split-usr
/// build, where `SYSTEM_DATA_UNIT_DIR` is `/lib/systemd/system`. Generator, transient and
/// `.control`/`.attached` directories only exist while the guest runs and are not read.
pub const SEARCH_DIRS: [&str; 5] = [
    "etc/systemd/system",
    "run/systemd/system",
    "usr/local/lib/systemd/system",
    "lib/systemd/system",
    "usr/lib/systemd/system",
];

/// `BindIPv6Only=`. Adopted fds keep the options the host set, so this is informative only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BindIpv6Only {
    /// `default`: the kernel's `net.ipv6.bindv6only`.
    #[default]
    Default,
    /// `both` (or a false boolean): dual-stack.
    Both,
    /// `ipv6-only` (or a true boolean).
    Ipv6Only,
}

impl fmt::Display for BindIpv6Only {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindIpv6Only::Default => "default",
            BindIpv6Only::Both => "both",
            BindIpv6Only::Ipv6Only => "ipv6-only",
        })
    }
}

/// One `ListenStream=`, `ListenDatagram=` or `ListenSequentialPacket=` line that is in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenLine {
    /// The socket type.
    pub kind: ListenKind,
    /// The value as written, before specifier expansion.
    pub value: String,
    /// The parsed address; a bare port stays [`GuestAddress::Port`] until resolved.
    pub address: GuestAddress,
    /// The host path of the file holding the line (unit file or drop-in).
    pub file: PathBuf,
    /// The 1-based line of the key.
    pub line: usize,
}

impl ListenLine {
    /// The address systemd binds for this line, or `None` when systemd drops the line: an
    /// explicit IPv6 address on a guest without IPv6 (`socket_address_parse_and_warn()`).
    pub fn adopted_address(&self, guest_ipv6: bool) -> Option<GuestAddress> {
        if !guest_ipv6 && matches!(self.address, GuestAddress::Inet6 { .. }) {
            None
        } else {
            Some(self.address.resolve(guest_ipv6))
        }
    }

    /// Whether the guest would adopt `host` for this line.
    pub fn matches(&self, host: &HostSocket, guest_ipv6: bool) -> bool {
        crate::address::compare(self.kind, &self.address, host, guest_ipv6).is_ok()
    }
}

/// A line systemd honours but portwake cannot serve; reported so nothing is skipped silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedLine {
    /// The key, e.g. `ListenFIFO`.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// Why portwake cannot provide it.
    pub reason: String,
    /// The host path of the file holding the line.
    pub file: PathBuf,
    /// The 1-based line.
    pub line: usize,
}

/// A socket unit after its main file and all drop-ins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketUnit {
    /// The unit name, e.g. `sshd.socket`.
    pub name: String,
    /// The host path of the file read (symlinks followed inside the guest), or of the masking entry.
    pub path: PathBuf,
    /// A symlink named after the unit in some `*.wants/` or `*.requires/` directory pulls it in.
    pub enabled: bool,
    /// The host paths of those symlinks.
    pub enabled_by: Vec<PathBuf>,
    /// The unit file is a symlink to `/dev/null` or empty: systemd loads nothing from it.
    pub masked: bool,
    /// `Accept=`: the guest spawns one service instance per connection.
    pub accept: bool,
    /// `Service=`, if set.
    pub service: Option<String>,
    /// `FileDescriptorName=`, if set; see [`SocketUnit::fd_name()`] for the effective name.
    pub fd_name: Option<String>,
    /// `BindIPv6Only=`.
    pub bind_ipv6_only: BindIpv6Only,
    /// The listen lines in effect, in the order systemd passes them.
    pub listens: Vec<ListenLine>,
    /// Lines naming sockets or options portwake cannot serve.
    pub unsupported: Vec<UnsupportedLine>,
    /// The host paths of the drop-ins applied, in order.
    pub dropins: Vec<PathBuf>,
}

impl SocketUnit {
    /// The name the guest's service sees in `$LISTEN_FDNAMES` for each of this unit's fds:
    /// `FileDescriptorName=`, else the full unit name including `.socket`. This is systemd's
    /// `socket_fdname()` in `src/core/socket.c`: `return s->fdname ?: UNIT(s)->id;`.
    pub fn fd_name(&self) -> &str {
        self.fd_name.as_deref().unwrap_or(&self.name)
    }

    /// The service the guest starts: `Service=`, else `NAME.service`, or the template
    /// `NAME@.service` for `Accept=yes`.
    pub fn service_name(&self) -> String {
        if let Some(service) = &self.service {
            return service.clone();
        }
        let stem = self.name.strip_suffix(".socket").unwrap_or(&self.name);
        if self.accept {
            format!("{stem}@.service")
        } else {
            format!("{stem}.service")
        }
    }

    /// Enabled and not masked: the guest's systemd loads it at boot and can adopt its sockets.
    pub fn is_active(&self) -> bool {
        self.enabled && !self.masked
    }
}

/// The socket units of one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestUnits {
    /// The directory treated as the guest's `/` when following symlinks.
    pub root: PathBuf,
    /// The host directories searched, highest precedence first.
    pub search_dirs: Vec<PathBuf>,
    /// Every socket unit found, sorted by name.
    pub units: Vec<SocketUnit>,
}

impl GuestUnits {
    /// Reads the socket units under `path`.
    ///
    /// - A guest root (it has `etc/systemd/system`, `lib/systemd/system`, ... below it): the
    ///   search directories of [`SEARCH_DIRS`] are read with systemd's precedence.
    /// - A path ending in one of those directories (`/var/lib/machines/x/etc/systemd/system`): the
    ///   guest root is taken from it and read as above, because a unit enabled there usually lives
    ///   in `/lib/systemd/system`.
    /// - Any other directory: a plain unit directory, read alone; its symlinks resolve inside it.
    ///
    /// Template units (`foo@.socket`) and their instances are skipped.
    pub fn load(path: &Path) -> Result<GuestUnits, GuestUnitsError> {
        let (root, guest_dirs) = layout(path)?;
        let root = GuestRoot::new(root);
        let mut dirs: Vec<PathBuf> = Vec::new();
        for dir in guest_dirs {
            if let Resolved::Path(resolved) = root.resolve(&dir)? {
                if root.host(&resolved).is_dir() && !dirs.contains(&resolved) {
                    dirs.push(resolved);
                }
            }
        }
        let loader = Loader { root, dirs };
        let units = loader.load_all()?;
        Ok(GuestUnits {
            root: loader.root.path().to_path_buf(),
            search_dirs: loader.dirs.iter().map(|d| loader.root.host(d)).collect(),
            units,
        })
    }

    /// The unit called `name`, e.g. `sshd.socket`.
    pub fn unit(&self, name: &str) -> Option<&SocketUnit> {
        self.units.iter().find(|u| u.name == name)
    }

    /// The units a booting guest loads: enabled and not masked, sorted by name.
    pub fn active(&self) -> impl Iterator<Item = &SocketUnit> {
        self.units.iter().filter(|u| u.is_active())
    }

    /// Every listen line of the active units, in the fd order of DESIGN.md: units by name, lines in
    /// file order.
    pub fn listen_lines(&self) -> impl Iterator<Item = (&SocketUnit, &ListenLine)> {
        self.active()
            .flat_map(|unit| unit.listens.iter().map(move |line| (unit, line)))
    }

    /// The active lines that would adopt `host`. systemd gives an fd to the first port that
    /// matches, visiting units in hash order, so more than one entry means the owner is undefined.
    pub fn adopters(&self, host: &HostSocket, guest_ipv6: bool) -> Vec<(&SocketUnit, &ListenLine)> {
        self.listen_lines()
            .filter(|(_, line)| line.matches(host, guest_ipv6))
            .collect()
    }
}

/// Decides the guest root and the guest directories to search for `path`.
fn layout(path: &Path) -> Result<(PathBuf, Vec<PathBuf>), GuestUnitsError> {
    let meta = fs::metadata(path).map_err(|source| GuestUnitsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(GuestUnitsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let all = || SEARCH_DIRS.iter().map(|d| Path::new("/").join(d)).collect();
    let probe = GuestRoot::new(path.to_path_buf());
    for dir in SEARCH_DIRS {
        if let Resolved::Path(p) = probe.resolve(&Path::new("/").join(dir))? {
            if probe.host(&p).is_dir() {
                return Ok((path.to_path_buf(), all()));
            }
        }
    }
    // Longest first: `lib/systemd/system` is also a suffix of `usr/lib/systemd/system`.
    let mut suffixes = SEARCH_DIRS;
    suffixes.sort_by_key(|d| std::cmp::Reverse(Path::new(d).components().count()));
    for dir in suffixes {
        let mut root = path.to_path_buf();
        let suffix = Path::new(dir);
        if path.ends_with(suffix) {
            for _ in suffix.components() {
                root.pop();
            }
            return Ok((root, all()));
        }
    }
    Ok((path.to_path_buf(), vec![PathBuf::from("/")]))
}

struct Loader {
    root: GuestRoot,
    /// Guest paths of the search directories, deduplicated after resolution.
    dirs: Vec<PathBuf>,
}

/// What a directory entry turns out to be.
enum Entry {
    /// A readable file: host path.
    File(PathBuf),
    /// `/dev/null` or an empty file.
    Masked,
    /// Dangling, or not a regular file.
    Skip,
}

impl Loader {
    fn load_all(&self) -> Result<Vec<SocketUnit>, GuestUnitsError> {
        let enabled = self.enablement()?;
        let mut seen = BTreeSet::new();
        let mut units = BTreeMap::new();
        for dir in &self.dirs {
            let Some((resolved_dir, names)) = self.list(dir, is_socket_unit_name)? else {
                continue;
            };
            for name in names {
                if seen.contains(&name) {
                    continue;
                }
                let guest = dir.join(&name);
                let unit = match self.entry(&guest)? {
                    Entry::Skip => continue,
                    Entry::Masked => SocketUnit {
                        masked: true,
                        ..empty_unit(&name, self.root.host(&resolved_dir.join(&name)))
                    },
                    // systemd loads an alias under its target's name; do not count it twice.
                    Entry::File(_) if self.is_alias(&guest, &name)? => {
                        seen.insert(name);
                        continue;
                    }
                    Entry::File(host) => self.read_unit(&name, host)?,
                };
                seen.insert(name.clone());
                units.insert(name, unit);
            }
        }
        let mut units: Vec<SocketUnit> = units.into_values().collect();
        for unit in &mut units {
            if let Some(by) = enabled.get(&unit.name) {
                unit.enabled = true;
                unit.enabled_by.clone_from(by);
            }
        }
        Ok(units)
    }

    /// The names in a guest directory accepted by `keep`, sorted, with the directory's resolved
    /// guest path; `None` when there is no such directory.
    fn list(
        &self,
        dir: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Option<(PathBuf, Vec<String>)>, GuestUnitsError> {
        let Resolved::Path(resolved) = self.root.resolve(dir)? else {
            return Ok(None);
        };
        let host = self.root.host(&resolved);
        let read = match fs::read_dir(&host) {
            Ok(read) => read,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(source) => return Err(GuestUnitsError::Io { path: host, source }),
        };
        let mut names = Vec::new();
        for entry in read {
            let entry = entry.map_err(|source| GuestUnitsError::Io {
                path: host.clone(),
                source,
            })?;
            if let Some(name) = entry.file_name().to_str() {
                if !name.starts_with('.') && keep(name) {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        Ok(Some((resolved, names)))
    }

    /// Classifies a unit file or drop-in the way `null_or_empty_path()` does.
    fn entry(&self, guest: &Path) -> Result<Entry, GuestUnitsError> {
        match self.root.resolve(guest)? {
            Resolved::DevNull => Ok(Entry::Masked),
            Resolved::Missing => Ok(Entry::Skip),
            Resolved::Path(resolved) => {
                let host = self.root.host(&resolved);
                let meta = fs::metadata(&host).map_err(|source| GuestUnitsError::Io {
                    path: host.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    Ok(Entry::Skip)
                } else if meta.len() == 0 {
                    Ok(Entry::Masked)
                } else {
                    Ok(Entry::File(host))
                }
            }
        }
    }

    /// A symlink in a search directory to a unit file of another name in a search directory is an
    /// alias (`unit_file_build_name_map()`), loaded under the target's name.
    fn is_alias(&self, guest: &Path, name: &str) -> Result<bool, GuestUnitsError> {
        let Resolved::Path(target) = self.root.resolve(guest)? else {
            return Ok(false);
        };
        let target_name = target.file_name().and_then(|n| n.to_str()).unwrap_or(name);
        let in_search_path = target
            .parent()
            .is_some_and(|p| self.dirs.iter().any(|d| d == p));
        Ok(target_name != name && in_search_path && is_socket_unit_name(target_name))
    }

    /// Units named by symlinks in `*.wants/` and `*.requires/` directories, with the symlinks.
    /// Per directory name the highest-precedence entry wins, so `/etc` can mask a `/lib` entry
    /// with `/dev/null`; a plain file is ignored, as PID 1's `process_deps()` does
    /// (systemd `src/core/load-dropin.c`).
    fn enablement(&self) -> Result<BTreeMap<String, Vec<PathBuf>>, GuestUnitsError> {
        let mut dep_dirs = BTreeSet::new();
        for dir in &self.dirs {
            let listed = self.list(dir, |n| n.ends_with(".wants") || n.ends_with(".requires"))?;
            dep_dirs.extend(listed.into_iter().flat_map(|(_, names)| names));
        }
        let mut enabled: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for dep_dir in dep_dirs {
            let mut seen = BTreeSet::new();
            for dir in &self.dirs {
                let guest_dir = dir.join(&dep_dir);
                let Some((resolved_dir, names)) = self.list(&guest_dir, is_socket_unit_name)?
                else {
                    continue;
                };
                for name in names {
                    if !seen.insert(name.clone()) {
                        continue;
                    }
                    let host = self.root.host(&resolved_dir.join(&name));
                    let is_link = fs::symlink_metadata(&host)
                        .map(|m| m.file_type().is_symlink())
                        .unwrap_or(false);
                    let masked = matches!(self.entry(&guest_dir.join(&name))?, Entry::Masked);
                    if is_link && !masked {
                        enabled.entry(name).or_default().push(host);
                    }
                }
            }
        }
        Ok(enabled)
    }

    /// The drop-in directories of `name` in `unit_file_find_dropin_paths()` order
    /// (systemd `src/shared/dropin.c`): per search directory `NAME.d` then the dash prefixes
    /// (`foo-bar-.socket.d`, `foo-.socket.d`), then the type-wide `socket.d` of every search
    /// directory.
    fn dropin_dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut names = vec![format!("{name}.d")];
        names.extend(dash_prefixes(name).into_iter().map(|p| format!("{p}.d")));
        let mut out = Vec::new();
        for dir in &self.dirs {
            out.extend(names.iter().map(|n| dir.join(n)));
        }
        out.extend(self.dirs.iter().map(|d| d.join("socket.d")));
        out
    }

    /// The drop-ins of `name`: by file name, the first directory wins; applied sorted by file name.
    fn dropins(&self, name: &str) -> Result<Vec<PathBuf>, GuestUnitsError> {
        let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in self.dropin_dirs(name) {
            let Some((dir, files)) = self.list(&dir, |n| n.ends_with(".conf"))? else {
                continue;
            };
            for file in files {
                chosen.entry(file.clone()).or_insert_with(|| dir.join(file));
            }
        }
        let mut out = Vec::new();
        for guest in chosen.into_values() {
            if let Entry::File(host) = self.entry(&guest)? {
                out.push(host);
            }
        }
        Ok(out)
    }

    fn read_unit(&self, name: &str, host: PathBuf) -> Result<SocketUnit, GuestUnitsError> {
        let mut state = UnitState::new(name, host.clone());
        state.apply(&host)?;
        for dropin in self.dropins(name)? {
            state.apply(&dropin)?;
            state.unit.dropins.push(dropin);
        }
        state.verify()?;
        Ok(state.unit)
    }
}

/// `foo-bar-baz.socket` → `foo-bar-.socket`, `foo-.socket`, as `unit_file_find_dirs()` walks them:
/// at most one trailing dash is chopped per step, then the name is cut after its last dash.
fn dash_prefixes(name: &str) -> Vec<String> {
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut prefix = stem;
    loop {
        let mut p = prefix;
        let mut chopped = false;
        let next = loop {
            match p.rfind('-') {
                None | Some(0) => return out,
                Some(dash) if dash + 1 < p.len() || chopped => break &p[..=dash],
                Some(dash) => {
                    p = &p[..dash];
                    chopped = true;
                }
            }
        };
        out.push(format!("{next}.{suffix}"));
        prefix = next;
    }
}

fn is_socket_unit_name(name: &str) -> bool {
    name.len() > ".socket".len()
        && name.ends_with(".socket")
        && !name.contains('@')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_' | b'.' | b'\\'))
}

fn empty_unit(name: &str, path: PathBuf) -> SocketUnit {
    SocketUnit {
        name: name.to_owned(),
        path,
        enabled: false,
        enabled_by: Vec::new(),
        masked: false,
        accept: false,
        service: None,
        fd_name: None,
        bind_ipv6_only: BindIpv6Only::Default,
        listens: Vec::new(),
        unsupported: Vec::new(),
        dropins: Vec::new(),
    }
}

/// A unit while its files are applied, with where `Accept=` and `Service=` were last set so that
/// `socket_verify()` refusals can point at them.
struct UnitState {
    unit: SocketUnit,
    accept_at: Option<(PathBuf, usize)>,
    service_at: Option<(PathBuf, usize)>,
}

const UNSUPPORTED_LISTEN: [(&str, &str); 5] = [
    ("ListenFIFO", "portwake passes sockets only, not FIFOs"),
    (
        "ListenSpecial",
        "portwake passes sockets only, not special files",
    ),
    ("ListenNetlink", "portwake does not bind netlink sockets"),
    (
        "ListenMessageQueue",
        "portwake passes sockets only, not POSIX message queues",
    ),
    (
        "ListenUSBFunction",
        "portwake passes sockets only, not USB FunctionFS endpoints",
    ),
];

impl UnitState {
    fn new(name: &str, path: PathBuf) -> UnitState {
        UnitState {
            unit: empty_unit(name, path),
            accept_at: None,
            service_at: None,
        }
    }

    fn apply(&mut self, file: &Path) -> Result<(), GuestUnitsError> {
        let bytes = fs::read(file).map_err(|source| GuestUnitsError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        for a in unitfile::parse(file, &bytes)? {
            if a.section == "Socket" {
                self.assign(file, &a)?;
            }
        }
        Ok(())
    }

    fn assign(&mut self, file: &Path, a: &unitfile::Assignment) -> Result<(), GuestUnitsError> {
        let key = a.key.as_str();
        let value = a.value.as_str();
        let value_error = |reason: &str| GuestUnitsError::Value {
            file: file.to_path_buf(),
            line: a.line,
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let is_listen = ListenKind::from_directive(key).is_some()
            || UNSUPPORTED_LISTEN.iter().any(|(k, _)| *k == key);
        if is_listen && value.is_empty() {
            // config_parse_socket_listen(): an empty assignment removes every port so far.
            self.unit.listens.clear();
            self.unit
                .unsupported
                .retain(|u| !u.key.starts_with("Listen"));
            return Ok(());
        }
        if let Some(kind) = ListenKind::from_directive(key) {
            let expanded = self.expand(file, a)?;
            let expanded = patch_var_run(&expanded);
            let address = GuestAddress::parse(&expanded).and_then(|address| {
                let is_unix = matches!(address, GuestAddress::Unix(_) | GuestAddress::Abstract(_));
                if kind == ListenKind::SequentialPacket && !is_unix {
                    Err(AddressError::SequentialPacketNeedsUnix)
                } else {
                    Ok(address)
                }
            });
            match address {
                Ok(address) => self.unit.listens.push(ListenLine {
                    kind,
                    value: value.to_owned(),
                    address,
                    file: file.to_path_buf(),
                    line: a.line,
                }),
                Err(AddressError::Vsock) => {
                    self.unsupported(file, a, "portwake does not bind AF_VSOCK sockets")
                }
                Err(source) => {
                    return Err(GuestUnitsError::Address {
                        file: file.to_path_buf(),
                        line: a.line,
                        key: key.to_owned(),
                        value: value.to_owned(),
                        source,
                    })
                }
            }
            return Ok(());
        }
        if let Some((_, reason)) = UNSUPPORTED_LISTEN.iter().find(|(k, _)| *k == key) {
            self.unsupported(file, a, reason);
            return Ok(());
        }
        match key {
            "Accept" => {
                self.unit.accept = parse_boolean(value).ok_or_else(|| {
                    value_error("expected a boolean (yes/no, true/false, on/off, 1/0)")
                })?;
                self.accept_at = Some((file.to_path_buf(), a.line));
            }
            "Service" => {
                let service = self.expand(file, a)?;
                if !service.ends_with(".service") || service.len() == ".service".len() {
                    return Err(value_error("expected a unit name ending in .service"));
                }
                self.unit.service = Some(service);
                self.service_at = Some((file.to_path_buf(), a.line));
            }
            "FileDescriptorName" => {
                if value.is_empty() {
                    self.unit.fd_name = None;
                    return Ok(());
                }
                let name = self.expand(file, a)?;
                if !fdname_is_valid(&name) {
                    return Err(value_error(
                        "expected at most 255 printable ASCII characters without ':'",
                    ));
                }
                self.unit.fd_name = Some(name);
            }
            "BindIPv6Only" => {
                self.unit.bind_ipv6_only = match value {
                    "default" => BindIpv6Only::Default,
                    "both" => BindIpv6Only::Both,
                    "ipv6-only" => BindIpv6Only::Ipv6Only,
                    other => match parse_boolean(other) {
                        Some(true) => BindIpv6Only::Ipv6Only,
                        Some(false) => BindIpv6Only::Both,
                        None => {
                            return Err(value_error(
                                "expected default, both, ipv6-only or a boolean",
                            ))
                        }
                    },
                };
            }
            "SocketProtocol" => {
                // config_parse_socket_protocol(): empty resets to the default protocol.
                self.unit.unsupported.retain(|u| u.key != "SocketProtocol");
                if !value.is_empty() {
                    self.unsupported(
                        file,
                        a,
                        "the guest adopts only sockets of this protocol (SO_PROTOCOL); portwake binds plain TCP/UDP",
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn expand(&self, file: &Path, a: &unitfile::Assignment) -> Result<String, GuestUnitsError> {
        specifier::expand(&a.value, &self.unit.name).map_err(|specifier| {
            GuestUnitsError::Specifier {
                file: file.to_path_buf(),
                line: a.line,
                key: a.key.clone(),
                value: a.value.clone(),
                specifier,
            }
        })
    }

    fn unsupported(&mut self, file: &Path, a: &unitfile::Assignment, reason: &str) {
        self.unit.unsupported.push(UnsupportedLine {
            key: a.key.clone(),
            value: a.value.clone(),
            reason: reason.to_owned(),
            file: file.to_path_buf(),
            line: a.line,
        });
    }

    /// The refusals of `socket_verify()` (systemd `src/core/socket.c`) that depend on settings
    /// read here. A unit with no listen line at all is refused too, but then adopts nothing anyway.
    fn verify(&self) -> Result<(), GuestUnitsError> {
        if !self.unit.accept {
            return Ok(());
        }
        let refused = |(file, line): &(PathBuf, usize), reason: &str| GuestUnitsError::Refused {
            file: file.clone(),
            line: *line,
            unit: self.unit.name.clone(),
            reason: reason.to_owned(),
        };
        if let (Some(at), Some(_)) = (&self.service_at, &self.unit.service) {
            return Err(refused(at, "Service= cannot be combined with Accept=yes"));
        }
        // have_non_accept_socket(): datagram sockets, FIFOs and other non-sockets cannot accept.
        let non_accepting = self
            .unit
            .listens
            .iter()
            .any(|l| l.kind == ListenKind::Datagram)
            || self.unit.unsupported.iter().any(|u| {
                u.key.starts_with("Listen")
                    && u.key != "ListenStream"
                    && u.key != "ListenSequentialPacket"
            });
        if non_accepting {
            if let Some(at) = &self.accept_at {
                return Err(refused(
                    at,
                    "Accept=yes needs stream or sequential-packet sockets only",
                ));
            }
        }
        Ok(())
    }
}

/// `parse_boolean()`: case-insensitive 1/yes/y/true/t/on and 0/no/n/false/f/off.
fn parse_boolean(s: &str) -> Option<bool> {
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Some(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Some(false),
        _ => None,
    }
}

/// `fdname_is_valid()`: printable ASCII without ':', at most 255 characters.
fn fdname_is_valid(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| (b' '..127).contains(&b) && b != b':')
}

/// `patch_var_run()`: systemd rewrites socket paths below the legacy `/var/run/` to `/run/`.
fn patch_var_run(s: &str) -> String {
    match s.strip_prefix("/var/run/") {
        Some(rest) => format!("/run/{rest}"),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_prefixes_follow_systemd() {
        assert_eq!(
            dash_prefixes("foo-bar-baz.socket"),
            vec!["foo-bar-.socket".to_owned(), "foo-.socket".to_owned()]
        );
        assert!(dash_prefixes("sshd.socket").is_empty());
        assert!(dash_prefixes("-x.socket").is_empty());
        assert_eq!(
            dash_prefixes("a--b.socket"),
            vec!["a--.socket".to_owned(), "a-.socket".to_owned()]
        );
    }

    #[test]
    fn booleans_and_fdnames() {
        assert_eq!(parse_boolean("YES"), Some(true));
        assert_eq!(parse_boolean("off"), Some(false));
        assert_eq!(parse_boolean(""), None);
        assert!(fdname_is_valid(""));
        assert!(!fdname_is_valid("a:b"));
        assert!(!fdname_is_valid(&"x".repeat(256)));
    }
}
