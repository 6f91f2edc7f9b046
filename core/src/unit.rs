//! One unit as the daemon runs it: its listeners, plugin instance, lifecycle state
//! and counters. The event loop drives it; this module only holds and reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use portwake_plugin_api::GuestExit;

use crate::config::{kind_name, ListenerConfig, UnitConfig};
use crate::listener::BoundSocket;
use crate::plugin_host::PluginInstance;
use crate::start_guard::StartGuard;

/// One listener of a unit: its config, its socket (shared across reloads) and its
/// poll token while registered.
#[derive(Debug, Clone)]
pub struct Listener {
    /// As configured (in guest order, with guest names applied).
    pub config: ListenerConfig,
    /// The socket; kept open whatever the unit's state.
    pub socket: Arc<BoundSocket>,
}

/// Where a unit is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Listeners registered; the next client starts the guest.
    Listening,
    /// The plugin is starting the guest; `exited` holds an exit reported meanwhile.
    Starting {
        /// The guest being started.
        guest: u64,
        /// When the start began.
        since: Instant,
        /// An exit that overtook the activation report.
        exited: Option<GuestExit>,
    },
    /// The guest owns accept.
    Running {
        /// The guest.
        guest: u64,
        /// Its pid, if the plugin has one.
        pid: Option<i64>,
        /// When it started running.
        since: Instant,
    },
    /// The plugin is stopping the guest.
    Stopping {
        /// The guest.
        guest: u64,
        /// When it started running.
        since: Instant,
    },
    /// Waiting out a backoff; listeners not registered.
    Backoff {
        /// When it listens again.
        until: Instant,
    },
    /// Stopped by an admin and not listening until started again.
    Held,
}

impl State {
    /// The state's name in status output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Listening => "listening",
            Self::Starting { .. } => "starting",
            Self::Running { .. } => "running",
            Self::Stopping { .. } => "stopping",
            Self::Backoff { .. } => "backoff",
            Self::Held => "held",
        }
    }

    /// The guest this state is about, if any.
    pub fn guest(&self) -> Option<u64> {
        match self {
            Self::Starting { guest, .. }
            | Self::Running { guest, .. }
            | Self::Stopping { guest, .. } => Some(*guest),
            _ => None,
        }
    }
}

/// What to do once a stopping guest is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// Listen again (the normal case).
    Listen,
    /// Stay stopped and not listening (`stop --hold`).
    Hold,
    /// The unit was removed by a reload: close it.
    Remove,
}

/// Upper bounds of the activation latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the dispatch histogram (the loop's wake-up for a waiting client
/// until the plugin call begins), in seconds.
pub const DISPATCH_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1,
];

/// A Prometheus-style histogram of durations.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds of the buckets, in seconds.
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative; the exporter sums them up).
    pub counts: Vec<u64>,
    /// Sum of all observations in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Counters kept across the unit's life (and reloads).
#[derive(Debug, Clone)]
pub struct UnitStats {
    /// Guest starts begun.
    pub activations: u64,
    /// Starts that failed.
    pub failures: u64,
    /// Backoffs entered.
    pub backoffs: u64,
    /// Guests stopped for being idle.
    pub idle_stops: u64,
    /// The last failure: when, and the message.
    pub last_failure: Option<(SystemTime, String)>,
    /// First client to the plugin reporting the guest started.
    pub latency: Histogram,
    /// The loop waking for a waiting client to the plugin call beginning: the
    /// daemon's own share of an activation.
    pub dispatch: Histogram,
}

impl Default for UnitStats {
    fn default() -> Self {
        Self {
            activations: 0,
            failures: 0,
            backoffs: 0,
            idle_stops: 0,
            last_failure: None,
            latency: Histogram::new(&LATENCY_BUCKETS),
            dispatch: Histogram::new(&DISPATCH_BUCKETS),
        }
    }
}

impl UnitStats {
    /// Records a failure.
    pub fn fail(&mut self, message: String) {
        self.failures += 1;
        self.last_failure = Some((SystemTime::now(), message));
    }
}

/// A reload's version of a unit, waiting for the unit's guest to stop.
#[derive(Debug)]
pub struct Prepared {
    /// The new config.
    pub config: Arc<UnitConfig>,
    /// The new listeners (sockets shared with the old ones where unchanged).
    pub listeners: Vec<Listener>,
    /// The plugin instance (the old one if plugin and options are unchanged).
    pub plugin: Arc<PluginInstance>,
    /// Plugin file and options, to tell whether a later reload changes them.
    pub plugin_key: (PathBuf, String),
}

/// A unit as the daemon runs it.
#[derive(Debug)]
pub struct Unit {
    /// The config in force.
    pub config: Arc<UnitConfig>,
    /// Its listeners, in guest order.
    pub listeners: Vec<Listener>,
    /// Poll tokens of the listeners while registered.
    pub tokens: Vec<usize>,
    /// The plugin instance.
    pub plugin: Arc<PluginInstance>,
    /// Plugin file and options.
    pub plugin_key: (PathBuf, String),
    /// A reloaded version to switch to once the guest is gone.
    pub pending: Option<Prepared>,
    /// Lifecycle state.
    pub state: State,
    /// When the state last changed (for status).
    pub since: SystemTime,
    /// What to do once the stopping guest is gone.
    pub after_stop: AfterStop,
    /// An admin (or a reload) asked for a stop while the guest was starting.
    pub stop_requested: bool,
    /// Start-loop guard.
    pub guard: StartGuard,
    /// Counters.
    pub stats: UnitStats,
    /// When a connection was last seen while running (for idle stop).
    pub last_busy: Instant,
    /// Whether the last idle check saw an open connection.
    pub was_busy: bool,
    /// The plugin's handle for the running guest, to adopt it after a restart.
    pub guest_handle: Option<String>,
}

impl Unit {
    /// A new unit, listening.
    pub fn new(prepared: Prepared) -> Self {
        Self {
            guard: StartGuard::new(prepared.config.trigger_limit, prepared.config.backoff),
            config: prepared.config,
            listeners: prepared.listeners,
            tokens: Vec::new(),
            plugin: prepared.plugin,
            plugin_key: prepared.plugin_key,
            pending: None,
            state: State::Listening,
            since: SystemTime::now(),
            after_stop: AfterStop::Listen,
            stop_requested: false,
            stats: UnitStats::default(),
            last_busy: Instant::now(),
            was_busy: false,
            guest_handle: None,
        }
    }

    /// Moves to `state`, noting when.
    pub fn set_state(&mut self, state: State) {
        if std::mem::discriminant(&self.state) != std::mem::discriminant(&state) {
            self.since = SystemTime::now();
        }
        self.state = state;
    }

    /// When the loop must act on this unit next: the end of its backoff, or the
    /// activation timeout of its start.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Backoff { until } => Some(until),
            State::Starting { since, .. } => Some(since + self.config.activate_timeout),
            _ => None,
        }
    }

    /// Whether a guest is starting, running or stopping.
    pub fn has_guest(&self) -> bool {
        self.state.guest().is_some()
    }

    /// Whether a reload's version of this unit is what runs already: same config
    /// (where in the file it stands aside), plugin instance and sockets.
    pub fn is_same(&self, prepared: &Prepared) -> bool {
        let unplaced = |c: &UnitConfig| {
            let mut c = c.clone();
            c.listen.iter_mut().for_each(|l| l.position = None);
            c
        };
        Arc::ptr_eq(&self.plugin, &prepared.plugin)
            && self.listeners.len() == prepared.listeners.len()
            && self
                .listeners
                .iter()
                .zip(&prepared.listeners)
                .all(|(a, b)| Arc::ptr_eq(&a.socket, &b.socket))
            && unplaced(&self.config) == unplaced(&prepared.config)
    }

    /// Takes a reloaded version in (while no guest runs).
    pub fn switch_to(&mut self, prepared: Prepared) {
        if prepared.config.trigger_limit != self.config.trigger_limit
            || prepared.config.backoff != self.config.backoff
        {
            self.guard = StartGuard::new(prepared.config.trigger_limit, prepared.config.backoff);
        }
        self.config = prepared.config;
        self.listeners = prepared.listeners;
        self.plugin = prepared.plugin;
        self.plugin_key = prepared.plugin_key;
    }

    /// The unit's status as JSON; `queued` gives each listener's accept queue length.
    pub fn status(&self, queued: impl Fn(&BoundSocket) -> Option<u32>) -> serde_json::Value {
        let since_unix = self
            .since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let for_secs = self.since.elapsed().map_or(0, |d| d.as_secs());
        let pid = match self.state {
            State::Running { pid, .. } => pid,
            _ => None,
        };
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                serde_json::json!({
                    "fd": 3 + i,
                    "kind": kind_name(l.config.kind),
                    "address": l.config.address.to_string(),
                    "name": l.config.name,
                    "queued": queued(&l.socket),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.config.name,
            "plugin": self.config.plugin,
            "state": self.state.name(),
            "since_unix": since_unix,
            "for_secs": for_secs,
            "guest": self.state.guest(),
            "pid": pid,
            "activations": self.stats.activations,
            "failures": self.stats.failures,
            "backoffs": self.stats.backoffs,
            "idle_stops": self.stats.idle_stops,
            "activation_seconds": { "count": self.stats.latency.count, "sum": self.stats.latency.sum },
            "dispatch_seconds": { "count": self.stats.dispatch.count, "sum": self.stats.dispatch.sum },
            "last_failure": self.stats.last_failure.as_ref().map(|(at, message)| serde_json::json!({
                "at_unix": at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                "error": message,
            })),
            "reload_pending": self.pending.is_some(),
            "listeners": listeners,
        })
    }
}
