//! The host config: one RON file, parsed strictly and validated whole, so that every
//! problem is reported at once with the file, line and column (or unit and field).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portwake_plugin_api::SocketKind;
use ron::value::RawValue;
use serde::Deserialize;

use crate::address::ListenAddress;

/// Default stop timeout: SIGTERM (or the engine's polite stop), then force.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a plugin's `activate` may take before the unit fails and backs off.
const DEFAULT_ACTIVATE_TIMEOUT: Duration = Duration::from_secs(60);
/// systemd's defaults for socket units: `TriggerLimitIntervalSec=2s`, `TriggerLimitBurst=20`.
const DEFAULT_TRIGGER_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TRIGGER_BURST: u32 = 20;
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Where plugins are looked up first (relative paths: to the config's directory).
    pub plugin_dir: Option<PathBuf>,
    /// Control socket path (used by the operations commands).
    pub control_socket: Option<PathBuf>,
    /// Load plugins that fail the root trust check (`plugin_host::trust`); development only.
    pub allow_untrusted_plugins: bool,
    /// The units, in file order.
    pub units: Vec<UnitConfig>,
}

/// One unit: a guest, its plugin and its listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitConfig {
    /// Unique name.
    pub name: String,
    /// Plugin name (`libportwake_<name>.so`) or a path.
    pub plugin: String,
    /// The plugin's options, as RON text.
    pub options: String,
    /// Listeners, in the order the guest gets them.
    pub listen: Vec<ListenerConfig>,
    /// Extra environment handed to the guest.
    pub env: Vec<(String, String)>,
    /// How long a stop may take before the plugin forces it.
    pub stop_timeout: Duration,
    /// How long the plugin's `activate` may take before the unit fails (and backs off).
    pub activate_timeout: Duration,
    /// Start-loop guard.
    pub trigger_limit: TriggerLimit,
    /// How long to back off once the trigger limit is hit.
    pub backoff: BackoffPolicy,
    /// The guest's systemd units (a guest root or unit directory), to order fds by
    /// and to check listeners against.
    pub guest_units: Option<PathBuf>,
    /// Whether the guest has IPv6: a bare `ListenStream=PORT` then means `[::]:PORT`.
    pub guest_ipv6: bool,
    /// What `run` does when listeners and guest units disagree.
    pub on_guest_mismatch: MismatchPolicy,
    /// Stop a running guest once no connection on its stream listeners has been
    /// open for this long.
    pub idle_stop: Option<Duration>,
}

/// What `run` does with a unit whose listeners do not match its guest units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchPolicy {
    /// Refuse to start the daemon (the default: a mismatch fails silently in the guest).
    Refuse,
    /// Log each problem and run anyway.
    Warn,
}

/// At most `burst` starts within `interval`, as systemd's `TriggerLimit*=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerLimit {
    /// The window.
    pub interval: Duration,
    /// Starts allowed within it.
    pub burst: u32,
}

/// Backoff delays: `initial`, doubled at each further step, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

/// systemd's `BindIPv6Only=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindIpv6Only {
    /// Leave the system default (`net.ipv6.bindv6only`), except that a bare port is dual-stack.
    Default,
    /// Accept IPv4 and IPv6.
    Both,
    /// IPv6 only.
    Ipv6Only,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Socket type.
    pub kind: SocketKind,
    /// Where it listens.
    pub address: ListenAddress,
    /// Its `LISTEN_FDNAMES` entry (default: the unit's name, as systemd's default is).
    pub name: String,
    /// `listen()` backlog; `None` means as large as the kernel allows (somaxconn).
    pub backlog: Option<u32>,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// `IP_FREEBIND` / `IPV6_FREEBIND`.
    pub free_bind: bool,
    /// `IPV6_V6ONLY` policy.
    pub bind_ipv6_only: BindIpv6Only,
    /// `SO_BINDTODEVICE`.
    pub bind_to_device: Option<String>,
    /// Unix socket file mode (default 0o666, as systemd's `SocketMode=`).
    pub mode: Option<u32>,
    /// Unix socket file owner.
    pub user: Option<String>,
    /// Unix socket file group.
    pub group: Option<String>,
    /// Whether `name` was given in the config (else a guest unit may name the fd).
    pub named: bool,
    /// (line, column) of the address in the config file, when found.
    pub position: Option<(usize, usize)>,
}

impl ListenerConfig {
    /// `Stream 127.0.0.1:80`: how logs and errors name a listener.
    pub fn describe(&self) -> String {
        format!("{} {}", kind_name(self.kind), self.address)
    }
}

/// systemd's word for a socket type.
pub fn kind_name(kind: SocketKind) -> &'static str {
    match kind {
        SocketKind::Stream => "Stream",
        SocketKind::Datagram => "Datagram",
        SocketKind::SequentialPacket => "SequentialPacket",
    }
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// RON syntax or schema error (unknown field, wrong type, …).
    #[error("{}:{line}:{col}: {message}", path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// Parsed, but with problems; one per line.
    #[error("{}", join_lines(problems))]
    Invalid {
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn join_lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One validation problem, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The config file.
    pub path: PathBuf,
    /// (line, column), when the offending value could be found in the text.
    pub position: Option<(usize, usize)>,
    /// The unit and field, e.g. `unit "web": listen[1].address`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

// ---- the file's schema ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    plugin_dir: Option<PathBuf>,
    #[serde(default)]
    control_socket: Option<PathBuf>,
    #[serde(default)]
    allow_untrusted_plugins: bool,
    units: Vec<RawUnit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    name: String,
    plugin: String,
    #[serde(default)]
    options: Option<Box<RawValue>>,
    listen: Vec<RawListener>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stop_timeout: Option<String>,
    #[serde(default)]
    activate_timeout: Option<String>,
    #[serde(default)]
    trigger_limit: Option<RawTriggerLimit>,
    #[serde(default)]
    backoff: Option<RawBackoff>,
    #[serde(default)]
    guest_units: Option<PathBuf>,
    #[serde(default)]
    guest_ipv6: Option<bool>,
    #[serde(default)]
    on_guest_mismatch: Option<String>,
    #[serde(default)]
    idle_stop: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTriggerLimit {
    interval: String,
    burst: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: String,
    max: String,
}

#[derive(Deserialize)]
enum RawListener {
    Stream(RawSocket),
    Datagram(RawSocket),
    SequentialPacket(RawSocket),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    address: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    backlog: Option<u32>,
    #[serde(default)]
    reuse_port: bool,
    #[serde(default)]
    free_bind: bool,
    #[serde(default)]
    bind_ipv6_only: Option<String>,
    #[serde(default)]
    bind_to_device: Option<String>,
    #[serde(default)]
    mode: Option<u32>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = portwake_plugin_api::options::ron_options()
            .from_str(text)
            .map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                line: e.span.start.line,
                col: e.span.start.col,
                message: e.code.to_string(),
            })?;
        let mut v = Validator {
            path,
            locator: Locator::new(text),
            problems: Vec::new(),
        };
        let units = v.units(raw.units);
        if !v.problems.is_empty() {
            return Err(ConfigError::Invalid {
                problems: v.problems,
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(Self {
            path: path.to_owned(),
            plugin_dir: raw.plugin_dir.map(|d| base.join(d)),
            control_socket: raw.control_socket,
            allow_untrusted_plugins: raw.allow_untrusted_plugins,
            units,
        })
    }
}

/// Collects problems while turning the raw schema into validated values.
struct Validator<'a> {
    path: &'a Path,
    locator: Locator<'a>,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    /// Records a problem at the `nth` occurrence of `literal` in the file, if found.
    fn problem(&mut self, literal: Option<(&str, usize)>, field: String, message: String) {
        let position = literal.and_then(|(lit, nth)| self.locator.locate(lit, nth));
        self.problems.push(Problem {
            path: self.path.to_owned(),
            position,
            field,
            message,
        });
    }

    fn units(&mut self, raw: Vec<RawUnit>) -> Vec<UnitConfig> {
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        let mut seen_addresses: HashMap<(SocketKind, ListenAddress), String> = HashMap::new();
        let mut address_count: HashMap<String, usize> = HashMap::new();
        let mut units = Vec::with_capacity(raw.len());
        for unit in raw {
            let count = seen_names.entry(unit.name.clone()).or_default();
            *count += 1;
            // Which occurrence of this name's literal is this unit's own.
            let nth_name = *count - 1;
            let at = format!("unit {:?}", unit.name);
            if nth_name > 0 {
                self.problem(
                    Some((&unit.name, nth_name)),
                    format!("{at}: name"),
                    "duplicate unit name".into(),
                );
            }
            if !valid_unit_name(&unit.name) {
                self.problem(
                    Some((&unit.name, nth_name)),
                    format!("{at}: name"),
                    "must be 1-255 characters of A-Z a-z 0-9 _ . @ -".into(),
                );
            }
            if unit.plugin.is_empty() {
                self.problem(None, format!("{at}: plugin"), "is empty".into());
            }
            if unit.listen.is_empty() {
                self.problem(
                    Some((&unit.name, nth_name)),
                    format!("{at}: listen"),
                    "is empty: a unit needs at least one listener".into(),
                );
            }
            let mut listen = Vec::with_capacity(unit.listen.len());
            for (i, raw_listener) in unit.listen.into_iter().enumerate() {
                let field = format!("{at}: listen[{i}]");
                let (kind, socket) = match raw_listener {
                    RawListener::Stream(s) => (SocketKind::Stream, s),
                    RawListener::Datagram(s) => (SocketKind::Datagram, s),
                    RawListener::SequentialPacket(s) => (SocketKind::SequentialPacket, s),
                };
                let raw_address = socket.address.clone();
                let nth = address_count.entry(raw_address.clone()).or_default();
                let occurrence = *nth;
                *nth += 1;
                let Some(listener) = self.listener(&field, kind, socket, &unit.name, occurrence)
                else {
                    continue;
                };
                let key = (kind, listener.address.clone());
                if let Some(other) = seen_addresses.get(&key) {
                    let message = format!(
                        "{} is already a listener of unit {other:?}",
                        listener.describe()
                    );
                    self.problem(
                        Some((&raw_address, occurrence)),
                        format!("{field}.address"),
                        message,
                    );
                } else {
                    seen_addresses.insert(key, unit.name.clone());
                }
                listen.push(listener);
            }
            let stop_timeout = self
                .duration(&at, "stop_timeout", unit.stop_timeout.as_deref())
                .unwrap_or(DEFAULT_STOP_TIMEOUT);
            let activate_timeout = self
                .duration(&at, "activate_timeout", unit.activate_timeout.as_deref())
                .unwrap_or(DEFAULT_ACTIVATE_TIMEOUT);
            let trigger_limit = match unit.trigger_limit {
                None => TriggerLimit {
                    interval: DEFAULT_TRIGGER_INTERVAL,
                    burst: DEFAULT_TRIGGER_BURST,
                },
                Some(t) => {
                    if t.burst == 0 {
                        self.problem(
                            None,
                            format!("{at}: trigger_limit.burst"),
                            "must be at least 1".into(),
                        );
                    }
                    TriggerLimit {
                        interval: self
                            .duration(&at, "trigger_limit.interval", Some(&t.interval))
                            .unwrap_or(DEFAULT_TRIGGER_INTERVAL),
                        burst: t.burst,
                    }
                }
            };
            let backoff = match unit.backoff {
                None => BackoffPolicy {
                    initial: DEFAULT_BACKOFF_INITIAL,
                    max: DEFAULT_BACKOFF_MAX,
                },
                Some(b) => BackoffPolicy {
                    initial: self
                        .duration(&at, "backoff.initial", Some(&b.initial))
                        .unwrap_or(DEFAULT_BACKOFF_INITIAL),
                    max: self
                        .duration(&at, "backoff.max", Some(&b.max))
                        .unwrap_or(DEFAULT_BACKOFF_MAX),
                },
            };
            let on_guest_mismatch = match unit.on_guest_mismatch.as_deref() {
                None | Some("refuse") => MismatchPolicy::Refuse,
                Some("warn") => MismatchPolicy::Warn,
                Some(other) => {
                    self.problem(
                        Some((other, 0)),
                        format!("{at}: on_guest_mismatch"),
                        format!("{other:?}: expected \"refuse\" or \"warn\""),
                    );
                    MismatchPolicy::Refuse
                }
            };
            let base = self.path.parent().unwrap_or(Path::new("."));
            let idle_stop = self.duration(&at, "idle_stop", unit.idle_stop.as_deref());
            if idle_stop.is_some() && !listen.iter().any(|l| l.kind != SocketKind::Datagram) {
                self.problem(
                    Some((&unit.name, nth_name)),
                    format!("{at}: idle_stop"),
                    "needs a Stream or SequentialPacket listener: connections are what keep a guest busy".into(),
                );
            }
            units.push(UnitConfig {
                idle_stop,
                guest_units: unit.guest_units.map(|g| base.join(g)),
                guest_ipv6: unit.guest_ipv6.unwrap_or(true),
                on_guest_mismatch,
                name: unit.name,
                plugin: unit.plugin,
                options: unit
                    .options
                    .map_or_else(|| "()".to_owned(), |o| o.get_ron().trim().to_owned()),
                listen,
                env: unit.env.into_iter().collect(),
                stop_timeout,
                activate_timeout,
                trigger_limit,
                backoff,
            });
        }
        units
    }

    fn duration(&mut self, at: &str, field: &str, value: Option<&str>) -> Option<Duration> {
        let value = value?;
        match humantime::parse_duration(value) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.problem(
                    Some((value, 0)),
                    format!("{at}: {field}"),
                    "must be longer than 0".into(),
                );
                None
            }
            Err(e) => {
                self.problem(
                    Some((value, 0)),
                    format!("{at}: {field}"),
                    format!("{value:?} is not a duration like \"500ms\", \"10s\" or \"15m\": {e}"),
                );
                None
            }
        }
    }

    fn listener(
        &mut self,
        field: &str,
        kind: SocketKind,
        s: RawSocket,
        unit: &str,
        occurrence: usize,
    ) -> Option<ListenerConfig> {
        let lit = Some((s.address.as_str(), occurrence));
        let address = match ListenAddress::parse(&s.address) {
            Ok(a) => a,
            Err(e) => {
                self.problem(
                    lit,
                    format!("{field}.address"),
                    format!("{:?}: {e}", s.address),
                );
                return None;
            }
        };
        let before = self.problems.len();
        if kind == SocketKind::SequentialPacket && !address.is_unix() {
            self.problem(
                lit,
                format!("{field}.address"),
                "SequentialPacket is for unix sockets only (as in systemd)".into(),
            );
        }
        if !matches!(address, ListenAddress::Path(_)) {
            for (name, set) in [
                ("mode", s.mode.is_some()),
                ("user", s.user.is_some()),
                ("group", s.group.is_some()),
            ] {
                if set {
                    self.problem(
                        lit,
                        format!("{field}.{name}"),
                        "applies only to unix socket paths".into(),
                    );
                }
            }
        }
        if s.mode.is_some_and(|m| m > 0o7777) {
            self.problem(
                lit,
                format!("{field}.mode"),
                "must be at most 0o7777".into(),
            );
        }
        if address.is_unix() && (s.reuse_port || s.free_bind || s.bind_to_device.is_some()) {
            self.problem(
                lit,
                field.to_owned(),
                "reuse_port, free_bind and bind_to_device apply only to IP sockets".into(),
            );
        }
        let bind_ipv6_only = match s.bind_ipv6_only.as_deref() {
            None | Some("default") => BindIpv6Only::Default,
            Some("both") => BindIpv6Only::Both,
            Some("ipv6-only") => BindIpv6Only::Ipv6Only,
            Some(other) => {
                self.problem(
                    Some((other, 0)),
                    format!("{field}.bind_ipv6_only"),
                    format!("{other:?}: expected \"default\", \"both\" or \"ipv6-only\""),
                );
                BindIpv6Only::Default
            }
        };
        if s.bind_ipv6_only.is_some() && !address.is_ipv6() {
            self.problem(
                lit,
                format!("{field}.bind_ipv6_only"),
                "applies only to IPv6 addresses".into(),
            );
        }
        if kind == SocketKind::Datagram && s.backlog.is_some() {
            self.problem(
                lit,
                format!("{field}.backlog"),
                "datagram sockets have no backlog".into(),
            );
        }
        if s.backlog == Some(0) {
            self.problem(lit, format!("{field}.backlog"), "must be at least 1".into());
        }
        let named = s.name.is_some();
        let name = s.name.unwrap_or_else(|| unit.to_owned());
        if !valid_fd_name(&name) {
            self.problem(
                Some((&name, 0)),
                format!("{field}.name"),
                "must be 1-255 printable ASCII characters without ':'".into(),
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(ListenerConfig {
            kind,
            address,
            name,
            backlog: s.backlog,
            reuse_port: s.reuse_port,
            free_bind: s.free_bind,
            bind_ipv6_only,
            bind_to_device: s.bind_to_device,
            mode: s.mode,
            user: s.user,
            group: s.group,
            named,
            position: lit.and_then(|(l, nth)| self.locator.locate(l, nth)),
        })
    }
}

/// Unit names end up in logs, plugin calls and file names: keep them plain.
fn valid_unit_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// systemd's `fdname_is_valid`: printable ASCII, no ':', at most 255 bytes.
fn valid_fd_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Where each string literal of the config text stands, found in one pass, so that
/// placing a value is a lookup (a config with 10,000 listeners places each one).
struct Locator<'a> {
    line_starts: Vec<usize>,
    literals: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str) -> Self {
        let bytes = text.as_bytes();
        let mut literals: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut i = 0;
        while i < bytes.len() {
            match (bytes[i], bytes.get(i + 1)) {
                (b'/', Some(b'/')) => {
                    i = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
                }
                (b'/', Some(b'*')) => {
                    i = text[i + 2..]
                        .find("*/")
                        .map_or(bytes.len(), |n| i + 2 + n + 2);
                }
                (b'"', _) => {
                    let start = i;
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    let end = (i + 1).min(bytes.len());
                    literals.entry(&text[start..end]).or_default().push(start);
                    i = end;
                }
                _ => i += 1,
            }
        }
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(n, _)| n + 1))
            .collect();
        Self {
            line_starts,
            literals,
        }
    }

    /// 1-based (line, column) of the `nth` (0-based) occurrence of the string `value`
    /// as a RON literal.
    fn locate(&self, value: &str, nth: usize) -> Option<(usize, usize)> {
        let offset = *self.literals.get(format!("{value:?}").as_str())?.get(nth)?;
        let line = self.line_starts.partition_point(|&start| start <= offset);
        Some((line, offset - self.line_starts[line - 1] + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("host.ron"), text)
    }

    #[test]
    fn reads_the_design_example() {
        let config = parse(
            r#"(
    units: [
        (
            name: "web",
            plugin: "exec",
            options: (command: ["/bin/true"], env: {"A": "B"}),
            listen: [
                Stream(address: "127.0.0.1:8080", name: "http", backlog: 16),
                Datagram(address: "127.0.0.1:5353"),
                Stream(address: "/run/web/api.sock", mode: 0o660),
                SequentialPacket(address: "@web-seq"),
                Stream(address: "8081", bind_ipv6_only: "both"),
            ],
            stop_timeout: "3s",
            trigger_limit: (interval: "1s", burst: 5),
        ),
    ],
)"#,
        )
        .unwrap();
        let unit = &config.units[0];
        assert_eq!(unit.options, r#"(command: ["/bin/true"], env: {"A": "B"})"#);
        assert_eq!(unit.listen.len(), 5);
        assert_eq!(unit.listen[0].name, "http");
        assert_eq!(unit.listen[0].backlog, Some(16));
        assert_eq!(unit.listen[1].name, "web");
        assert_eq!(unit.listen[2].mode, Some(0o660));
        assert_eq!(unit.listen[4].address, ListenAddress::Port(8081));
        assert_eq!(unit.stop_timeout, Duration::from_secs(3));
        assert_eq!(unit.trigger_limit.burst, 5);
        assert_eq!(unit.backoff.initial, DEFAULT_BACKOFF_INITIAL);
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let err = parse("(\n  units: [],\n  colour: 1,\n)")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("host.ron:3:"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let err = parse(
            r#"(units: [
  (name: "a", plugin: "exec", listen: [Stream(address: "127.0.0.1:99999")]),
  (name: "a", plugin: "exec", listen: []),
  (name: "b", plugin: "exec", listen: [Stream(address: "127.0.0.1:80"), Stream(address: "127.0.0.1:80")]),
])"#,
        )
        .unwrap_err()
        .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(
            lines,
            [
                "host.ron:2:56: unit \"a\": listen[0].address: \"127.0.0.1:99999\": port must be 1 to 65535",
                "host.ron:3:10: unit \"a\": name: duplicate unit name",
                "host.ron:3:10: unit \"a\": listen: is empty: a unit needs at least one listener",
                "host.ron:4:89: unit \"b\": listen[1].address: Stream 127.0.0.1:80 is already a listener of unit \"b\"",
            ]
        );
    }
}
