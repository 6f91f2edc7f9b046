//! The event loop: one `mio::Poll` over every listener, a waker for plugin reports
//! and control requests, and the signal pipe. Plugin calls run on worker threads
//! and report back here, so a slow start of one unit never delays another.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use portwake_plugin_api::abi;
use portwake_plugin_api::GuestExit;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ListenerConfig, MismatchPolicy, UnitConfig};
use crate::control::{self, error_reply, Request};
use crate::guest_match;
use crate::listener::{self, BoundSocket, ListenError};
use crate::metrics;
use crate::plugin_host::{
    self, ActivationFd, AdoptFailure, HostEvents, PluginError, PluginInstance, PluginLibrary,
    Started,
};
use crate::restart::{self, RestartState, RunningGuest};
use crate::sock_diag;
use crate::start_guard::Backoff;
use crate::supervisor::{self, Inherited};
use crate::unit::{AfterStop, Listener, Prepared, State, Unit};

mod commands;
mod deadlines;
mod handover;
mod idle;
mod reload;

const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Extra time granted at shutdown beyond the longest stop timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often a pending live restart checks whether the units are settled.
const RESTART_POLL: Duration = Duration::from_millis(20);
/// How long a live restart waits for starts and stops in flight.
const RESTART_SETTLE: Duration = Duration::from_secs(30);
/// Bounds of the idle-check period (a tenth of the shortest `idle_stop`).
const IDLE_CHECK_MIN: Duration = Duration::from_millis(50);
const IDLE_CHECK_MAX: Duration = Duration::from_secs(5);

/// Why the daemon could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A unit's plugin could not be found, loaded or created.
    #[error("unit {unit:?}: {source}")]
    Plugin {
        /// The unit.
        unit: String,
        /// What went wrong.
        source: PluginError,
    },
    /// A unit's listener could not be bound.
    #[error("unit {unit:?}: {source}")]
    Listen {
        /// The unit.
        unit: String,
        /// What went wrong.
        source: ListenError,
    },
    /// A reload would need a listener bound anew where its old socket still holds the address.
    #[error("unit {unit:?}: {message}")]
    Rebind {
        /// The unit.
        unit: String,
        /// Which option of which listener.
        message: String,
    },
    /// A unit's listeners do not match its guest's socket units.
    #[error("unit {unit:?}: listeners do not match the guest's socket units (set on_guest_mismatch: \"warn\" to run anyway):\n{problems}")]
    GuestMismatch {
        /// The unit.
        unit: String,
        /// One problem per line, as `portwake check` prints them.
        problems: String,
    },
    /// The new config is invalid (reload).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The control socket could not be served.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The event loop itself failed.
    #[error("event loop: {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Sockets held by units, by socket type and address.
type HeldSockets = HashMap<
    (
        portwake_plugin_api::SocketKind,
        crate::address::ListenAddress,
    ),
    Listener,
>;

/// Command-line overrides of the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Control socket path (else the config's, else the default).
    pub control_socket: Option<PathBuf>,
}

/// What worker threads, plugin callbacks and the control thread tell the loop.
#[derive(Debug)]
enum LoopEvent {
    Activated {
        unit: usize,
        guest: u64,
        /// For a client's start: the loop's wake-up to the plugin call.
        dispatch: Option<Duration>,
        result: Result<Started, PluginError>,
    },
    Stopped {
        unit: usize,
        guest: u64,
        result: Result<(), PluginError>,
    },
    GuestExited {
        unit: usize,
        guest: u64,
        exit: GuestExit,
    },
    Control(control::Pending),
}

/// What asked for a guest to start.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// A client is waiting; the loop woke for it at `woke`. The trigger limit applies.
    Client { woke: Instant },
    /// An admin's `portwake start`; it does not count against the trigger limit.
    Admin,
}

/// Sends events to the loop from any thread.
#[derive(Debug)]
struct Notifier {
    sender: Mutex<Sender<LoopEvent>>,
    waker: Waker,
}

impl Notifier {
    fn send(&self, event: LoopEvent) {
        let sent = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(event);
        if sent.is_ok() {
            if let Err(e) = self.waker.wake() {
                error!(error = %e, "cannot wake the event loop");
            }
        }
    }
}

/// A unit's side of the plugin callbacks.
struct UnitEvents {
    unit: usize,
    name: String,
    notifier: Arc<Notifier>,
}

impl HostEvents for UnitEvents {
    fn log(&self, level: u32, message: &str) {
        let unit = self.name.as_str();
        match level {
            abi::PW_LOG_ERROR => error!(unit = %unit, "{message}"),
            abi::PW_LOG_WARN => warn!(unit = %unit, "{message}"),
            abi::PW_LOG_INFO => info!(unit = %unit, "{message}"),
            abi::PW_LOG_DEBUG => debug!(unit = %unit, "{message}"),
            _ => tracing::trace!(unit = %unit, "{message}"),
        }
    }

    fn guest_stopped(&self, guest: u64, exit: GuestExit) {
        self.notifier.send(LoopEvent::GuestExited {
            unit: self.unit,
            guest,
            exit,
        });
    }
}

/// The running daemon.
pub struct Daemon {
    poll: Poll,
    config_path: PathBuf,
    control_path: PathBuf,
    /// Units by slot; a removed unit leaves `None` so slots in flight stay valid.
    units: Vec<Option<Unit>>,
    by_name: HashMap<String, usize>,
    /// Token → (unit slot, listener index), for O(1) dispatch.
    tokens: Vec<Option<(usize, usize)>>,
    free_tokens: Vec<usize>,
    libraries: HashMap<PathBuf, Arc<PluginLibrary>>,
    inbox: Receiver<LoopEvent>,
    notifier: Arc<Notifier>,
    signals: Signals,
    next_guest: u64,
    /// Backoff ends and activation timeouts, earliest first.
    deadlines: deadlines::Deadlines,
    /// Set once a stop signal came: the time by which the daemon exits regardless.
    shutdown_deadline: Option<Instant>,
    next_idle_check: Option<Instant>,
    /// A live restart was asked for at this time; it happens once no unit is between states.
    restart_requested: Option<Instant>,
    /// Signalled when the control thread has written the restart request's reply.
    restart_reply_written: Option<mpsc::Receiver<()>>,
    /// The executable to exec for a live restart (its path at start-up, so an
    /// upgraded binary installed under the same name is what runs next).
    executable: PathBuf,
    /// When this daemon process image started (changes across a live restart).
    instance: u128,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config_path)
            .field("units", &self.by_name.len())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Loads every plugin, creates every instance, binds (or inherits) every
    /// listener and serves the control socket. Nothing is started yet; any failure
    /// names its unit.
    pub fn new(config: &Config, options: &RunOptions) -> Result<Self, DaemonError> {
        // First of all, before this process opens any fd of its own at 3, 4, ….
        if let Err(e) = crate::sys::cloexec_all_inherited() {
            warn!(error = %e, "cannot mark inherited fds close-on-exec");
        }
        match crate::sys::raise_fd_limit() {
            Ok((old, new)) if old != new => debug!(old, new, "raised the open-file limit"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
        }
        let mut inherited = Inherited::take();
        let io_error = |step| move |source| DaemonError::Io { step, source };
        let poll = Poll::new().map_err(io_error("creating the poll"))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(io_error("creating the waker"))?;
        let (sender, inbox) = mpsc::channel();
        let notifier = Arc::new(Notifier {
            sender: Mutex::new(sender),
            waker,
        });
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2])
            .map_err(io_error("installing signal handlers"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_error("registering signals"))?;
        let control_path = options
            .control_socket
            .clone()
            .or_else(|| config.control_socket.clone())
            .unwrap_or_else(control::default_path);
        let mut daemon = Self {
            poll,
            config_path: config.path.clone(),
            control_path,
            units: Vec::new(),
            by_name: HashMap::new(),
            tokens: Vec::new(),
            free_tokens: Vec::new(),
            libraries: HashMap::new(),
            inbox,
            notifier,
            signals,
            next_guest: 1,
            deadlines: deadlines::Deadlines::default(),
            shutdown_deadline: None,
            next_idle_check: None,
            restart_requested: None,
            restart_reply_written: None,
            executable: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            instance: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        };
        let none_held = HeldSockets::new();
        for unit in &config.units {
            let slot = daemon.units.len();
            let prepared = daemon.prepare(config, unit, slot, &mut inherited, &none_held)?;
            daemon.add_unit(prepared);
        }
        inherited.release_unclaimed();
        if let Some(state) = RestartState::take(&restart::state_path(&daemon.control_path)) {
            daemon.adopt_guests(state);
        }
        let notifier = Arc::clone(&daemon.notifier);
        control::serve(&daemon.control_path, move |pending| {
            notifier.send(LoopEvent::Control(pending));
        })?;
        Ok(daemon)
    }

    /// Runs until SIGTERM or SIGINT, then stops every guest (bounded) and returns.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let listeners = self.listener_count();
        info!(units = self.by_name.len(), listeners, control = %self.control_path.display(), "ready");
        self.store_all_fds();
        supervisor::notify(&[NotifyState::Ready, NotifyState::Status(&self.summary())]);
        let mut events = Events::with_capacity(256);
        let result = loop {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(source) = self.poll.poll(&mut events, timeout) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(DaemonError::Io {
                    step: "poll",
                    source,
                });
            }
            let woke = Instant::now();
            for event in &events {
                match event.token() {
                    WAKER => self.drain_inbox(),
                    SIGNALS => {
                        if self.handle_signals() {
                            warn!("second stop signal: exiting without waiting for guests");
                            return Ok(());
                        }
                    }
                    Token(t) => self.listener_ready(t, woke),
                }
            }
            let now = Instant::now();
            self.expire_deadlines(now);
            if self.next_idle_check.is_some_and(|t| t <= now) {
                self.check_idle(now);
            }
            if self.restart_requested.is_some() && self.shutdown_deadline.is_none() {
                if let Err(e) = self.try_restart(now) {
                    error!(error = %e, "live restart failed; exiting so the supervisor starts portwake afresh");
                    return Err(e);
                }
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.live_units().all(|(_, u)| !u.has_guest()) {
                    info!("all guests stopped; exiting");
                    break Ok(());
                }
                if now >= deadline {
                    for (_, unit) in self.live_units().filter(|(_, u)| u.has_guest()) {
                        error!(unit = %unit.config.name, "guest still up at the shutdown deadline");
                    }
                    break Ok(());
                }
            }
        };
        let _ = std::fs::remove_file(&self.control_path);
        result
    }

    // ---- units and their listeners ----

    fn unit(&self, u: usize) -> &Unit {
        self.units[u].as_ref().expect("live unit slot")
    }

    fn unit_mut(&mut self, u: usize) -> &mut Unit {
        self.units[u].as_mut().expect("live unit slot")
    }

    fn live_units(&self) -> impl Iterator<Item = (usize, &Unit)> + Clone {
        self.units
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.as_ref().map(|u| (i, u)))
    }

    fn listener_count(&self) -> usize {
        self.live_units().map(|(_, u)| u.listeners.len()).sum()
    }

    fn summary(&self) -> String {
        let running = self
            .live_units()
            .filter(|(_, u)| matches!(u.state, State::Running { .. }))
            .count();
        format!(
            "{} units, {running} running, {} listeners",
            self.by_name.len(),
            self.listener_count()
        )
    }

    /// Builds everything a unit needs before it may replace or join the running set:
    /// plugin instance (validating options) and sockets (reused, inherited or bound).
    fn prepare(
        &mut self,
        config: &Config,
        unit: &UnitConfig,
        slot: usize,
        inherited: &mut Inherited,
        held: &HeldSockets,
    ) -> Result<Prepared, DaemonError> {
        let unit = guest_ordered(config, unit)?;
        let plugin_error = |source| DaemonError::Plugin {
            unit: unit.name.clone(),
            source,
        };
        let base = config.path.parent().unwrap_or(Path::new("."));
        let dirs = plugin_host::search_dirs(config.plugin_dir.as_deref());
        let path = plugin_host::resolve(&unit.plugin, base, &dirs).map_err(plugin_error)?;
        let plugin_key = (path.clone(), unit.options.clone());
        let existing = self.by_name.get(&unit.name).map(|&s| self.unit(s));
        let reused = existing.and_then(|e| {
            e.pending
                .as_ref()
                .filter(|p| p.plugin_key == plugin_key)
                .map(|p| Arc::clone(&p.plugin))
                .or_else(|| (e.plugin_key == plugin_key).then(|| Arc::clone(&e.plugin)))
        });
        let plugin = match reused {
            Some(p) => p,
            None => {
                let library = match self.libraries.get(&path) {
                    Some(l) => Arc::clone(l),
                    None => {
                        let l = PluginLibrary::load_with(&path, config.allow_untrusted_plugins)
                            .map_err(plugin_error)?;
                        self.libraries.insert(path.clone(), Arc::clone(&l));
                        l
                    }
                };
                let events = Arc::new(UnitEvents {
                    unit: slot,
                    name: unit.name.clone(),
                    notifier: Arc::clone(&self.notifier),
                });
                Arc::new(
                    PluginInstance::create(library, &unit.options, events).map_err(plugin_error)?,
                )
            }
        };
        let mut listeners = Vec::with_capacity(unit.listen.len());
        for config in &unit.listen {
            let reusable = match held.get(&(config.kind, config.address.clone())) {
                Some(h) => listener::reusable(&h.config, config)
                    .map_err(|message| DaemonError::Rebind {
                        unit: unit.name.clone(),
                        message,
                    })?
                    .then(|| Arc::clone(&h.socket)),
                None => None,
            };
            let socket = match reusable {
                Some(socket) => {
                    socket
                        .adjust(config)
                        .map_err(|source| DaemonError::Listen {
                            unit: unit.name.clone(),
                            source,
                        })?;
                    socket
                }
                None => Arc::new(match inherited.claim(config) {
                    Some(socket) => socket,
                    None => listener::bind(config).map_err(|source| DaemonError::Listen {
                        unit: unit.name.clone(),
                        source,
                    })?,
                }),
            };
            listeners.push(Listener {
                config: config.clone(),
                socket,
            });
        }
        Ok(Prepared {
            config: Arc::new(unit),
            listeners,
            plugin,
            plugin_key,
        })
    }

    /// Every socket the units hold (and their pending reloads), by type and address,
    /// so that preparing a config finds reusable sockets in O(1) per listener.
    fn held_sockets(&self) -> HeldSockets {
        let mut held = HeldSockets::new();
        for (_, unit) in self.live_units() {
            let pending = unit.pending.iter().flat_map(|p| p.listeners.iter());
            for l in unit.listeners.iter().chain(pending) {
                held.insert((l.config.kind, l.config.address.clone()), l.clone());
            }
        }
        held
    }

    fn add_unit(&mut self, prepared: Prepared) {
        let slot = self.units.len();
        let name = prepared.config.name.clone();
        for l in &prepared.listeners {
            info!(unit = %name, listener = %l.config.describe(), name = %l.config.name, "bound");
        }
        self.units.push(Some(Unit::new(prepared)));
        self.by_name.insert(name, slot);
        self.register(slot);
    }

    fn store_all_fds(&self) {
        for (_, unit) in self.live_units() {
            for l in &unit.listeners {
                supervisor::store(&unit.config.name, &l.config, &l.socket);
            }
        }
    }

    /// Notes the unit's deadline (after a state change that sets one).
    fn schedule_deadline(&mut self, u: usize) {
        if let Some(when) = self.unit(u).deadline() {
            self.deadlines.push(when, u);
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        self.deadlines
            .next(current_deadline(&self.units))
            .into_iter()
            .chain(self.shutdown_deadline)
            .chain(self.next_idle_check)
            .chain(
                self.restart_requested
                    .map(|_| Instant::now() + RESTART_POLL),
            )
            .min()
    }

    /// A listener the loop woke for at `woke` is ready: a client is waiting.
    fn listener_ready(&mut self, token: usize, woke: Instant) {
        let Some(Some((u, l))) = self.tokens.get(token).copied() else {
            return;
        };
        if self.shutdown_deadline.is_none()
            && self.units[u]
                .as_ref()
                .is_some_and(|x| x.state == State::Listening)
        {
            let unit = self.unit(u);
            let listener = &unit.listeners[l];
            if !listener.socket.is_listening() {
                // Readable because it no longer listens (shut down behind our back):
                // starting a guest would not help; listening again does.
                warn!(unit = %unit.config.name, listener = %listener.config.describe(), "the listener had stopped listening; listening again");
                if let Err(e) = listener.socket.restore(&listener.config) {
                    error!(unit = %unit.config.name, error = %e, "cannot restore the listener");
                }
                return;
            }
            debug!(unit = %unit.config.name, listener = %listener.config.describe(), "client waiting");
            self.start(u, Instant::now(), Trigger::Client { woke });
        }
    }

    /// Starts the unit's guest.
    fn start(&mut self, u: usize, now: Instant, trigger: Trigger) {
        if let Trigger::Client { .. } = trigger {
            if let Err(backoff) = self.unit_mut(u).guard.try_start(now) {
                let unit = self.unit(u);
                let limit = unit.config.trigger_limit;
                warn!(unit = %unit.config.name, starts = limit.burst, interval = ?limit.interval, "trigger limit hit");
                self.enter_backoff(u, backoff, now);
                return;
            }
        }
        self.deregister(u);
        let guest = self.next_guest;
        self.next_guest += 1;
        let unit = self.unit_mut(u);
        unit.set_state(State::Starting {
            guest,
            since: now,
            exited: None,
        });
        unit.after_stop = AfterStop::Listen;
        unit.stop_requested = false;
        unit.stats.activations += 1;
        info!(unit = %unit.config.name, guest, activation = unit.stats.activations, "starting guest");
        self.schedule_deadline(u);
        let unit = self.unit(u);
        let config = Arc::clone(&unit.config);
        let sockets: Vec<(Arc<BoundSocket>, ListenerConfig)> = unit
            .listeners
            .iter()
            .map(|l| (Arc::clone(&l.socket), l.config.clone()))
            .collect();
        let (plugin, notifier) = (Arc::clone(&unit.plugin), Arc::clone(&self.notifier));
        self.spawn_worker(u, "activate", move || {
            let fds: Vec<ActivationFd<'_>> = sockets
                .iter()
                .map(|(socket, listener)| ActivationFd {
                    fd: socket.fd(),
                    kind: listener.kind,
                    name: &listener.name,
                })
                .collect();
            let dispatch = match trigger {
                Trigger::Client { woke } => Some(woke.elapsed()),
                Trigger::Admin => None,
            };
            let result = plugin.activate(&config.name, guest, &fds, &config.env);
            notifier.send(LoopEvent::Activated {
                unit: u,
                guest,
                dispatch,
                result,
            });
        });
    }

    fn stop(&mut self, u: usize, guest: u64, after: AfterStop) {
        let unit = self.unit_mut(u);
        let (since, pid) = match unit.state {
            State::Running { since, pid, .. } => (since, pid),
            _ => (Instant::now(), None),
        };
        unit.set_state(State::Stopping { guest, since });
        unit.after_stop = after;
        info!(unit = %unit.config.name, guest, pid = pid.unwrap_or(0), "stopping guest");
        let plugin = Arc::clone(&unit.plugin);
        let timeout = unit.config.stop_timeout;
        let notifier = Arc::clone(&self.notifier);
        self.spawn_worker(u, "stop", move || {
            let result = plugin.stop(guest, timeout);
            notifier.send(LoopEvent::Stopped {
                unit: u,
                guest,
                result,
            });
        });
    }

    /// Runs a plugin call on a thread of its own; calls are rare and may block for long.
    /// (A pool of idle threads was tried: dispatch fell by 40–60 µs, but a fresh
    /// guest's first byte rose by 4 %; see bench/README.md F8.)
    fn spawn_worker(&self, u: usize, call: &str, work: impl FnOnce() + Send + 'static) {
        let name = format!("{call}-{}", self.unit(u).config.name);
        if let Err(e) = std::thread::Builder::new().name(name).spawn(work) {
            error!(unit = %self.unit(u).config.name, error = %e, call, "cannot spawn a worker thread");
        }
    }

    fn drain_inbox(&mut self) {
        while let Ok(event) = self.inbox.try_recv() {
            match event {
                LoopEvent::Activated {
                    unit,
                    guest,
                    dispatch,
                    result,
                } => self.activated(unit, guest, dispatch, result),
                LoopEvent::Stopped {
                    unit,
                    guest,
                    result,
                } => {
                    if let (Err(e), Some(u)) = (result, self.units[unit].as_mut()) {
                        error!(unit = %u.config.name, guest, error = %e, "stop failed");
                        u.stats.fail(e.to_string());
                    }
                }
                LoopEvent::GuestExited { unit, guest, exit } => {
                    self.guest_exited(unit, guest, exit);
                }
                LoopEvent::Control(pending) => {
                    let is_restart = pending.request == Request::Restart;
                    let reply = self.control(pending.request);
                    let _ = pending.reply.send(reply);
                    if is_restart {
                        self.restart_reply_written = Some(pending.written);
                    }
                }
            }
        }
    }

    fn activated(
        &mut self,
        u: usize,
        guest: u64,
        dispatch: Option<Duration>,
        result: Result<Started, PluginError>,
    ) {
        let Some(unit) = self.units[u].as_mut() else {
            return;
        };
        if let Some(dispatch) = dispatch {
            unit.stats.dispatch.observe(dispatch);
        }
        let starting = match unit.state {
            State::Starting {
                guest: starting,
                since,
                exited,
            } if starting == guest => Some((since, exited)),
            _ => None,
        };
        let Some((since, exited)) = starting else {
            if let Ok(started) = result {
                // A start given up on (timed out) came through after all: stop that guest.
                warn!(unit = %unit.config.name, guest, pid = started.pid.unwrap_or(0), "a start given up on returned after all; stopping that guest");
                let plugin = Arc::clone(&unit.plugin);
                let timeout = unit.config.stop_timeout;
                self.spawn_worker(u, "stop-late", move || {
                    let _ = plugin.stop(guest, timeout);
                });
            }
            return;
        };
        let took = since.elapsed();
        let name = Arc::clone(&unit.config);
        let name = name.name.as_str();
        match result {
            Ok(started) => {
                let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                let pid = started.pid;
                let dispatch_us =
                    dispatch.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                info!(unit = %name, guest, pid = pid.unwrap_or(0), took_ms, dispatch_us, "guest started");
                unit.stats.latency.observe(took);
                unit.guest_handle = started.handle;
                unit.set_state(State::Running {
                    guest,
                    pid,
                    since: Instant::now(),
                });
                unit.last_busy = Instant::now();
                unit.was_busy = false;
                self.schedule_idle_check(u);
                if let Some(exit) = exited {
                    self.guest_exited(u, guest, exit);
                } else if self.shutdown_deadline.is_some() {
                    self.stop(u, guest, AfterStop::Listen);
                } else if self.unit(u).stop_requested {
                    let after = self.unit(u).after_stop;
                    self.stop(u, guest, after);
                }
            }
            Err(e) => {
                error!(unit = %name, guest, error = %e, "activation failed");
                unit.stats.fail(e.to_string());
                let backoff = unit.guard.start_failed();
                let stop_requested = unit.stop_requested;
                unit.set_state(State::Listening);
                if self.shutdown_deadline.is_some() {
                    return;
                }
                if stop_requested {
                    self.guest_gone(u);
                } else {
                    self.enter_backoff(u, backoff, Instant::now());
                }
            }
        }
    }

    fn guest_exited(&mut self, u: usize, guest: u64, exit: GuestExit) {
        let Some(unit) = self.units[u].as_mut() else {
            return;
        };
        let since = match unit.state {
            State::Starting {
                guest: g,
                since,
                exited: None,
            } if g == guest => {
                // The exit overtook the activation report; handled once that arrives.
                unit.state = State::Starting {
                    guest,
                    since,
                    exited: Some(exit),
                };
                return;
            }
            State::Running {
                guest: g, since, ..
            }
            | State::Stopping { guest: g, since }
                if g == guest =>
            {
                since
            }
            _ => {
                warn!(unit = %unit.config.name, guest, "plugin reported the stop of a guest that is not running; ignored");
                return;
            }
        };
        let ran_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(unit = %unit.config.name, guest, exit = %exit, ran_ms, "guest stopped");
        unit.guard.guest_ran(since.elapsed());
        unit.set_state(State::Listening);
        if self.shutdown_deadline.is_none() {
            self.guest_gone(u);
        }
    }

    /// The guest is gone: apply a pending reload, then listen, hold or close as asked.
    fn guest_gone(&mut self, u: usize) {
        let unit = self.unit_mut(u);
        let after = std::mem::replace(&mut unit.after_stop, AfterStop::Listen);
        if after == AfterStop::Remove {
            self.remove_unit(u);
            return;
        }
        if let Some(prepared) = unit.pending.take() {
            info!(unit = %prepared.config.name, "applying the reloaded config");
            self.retire_listeners(u, &prepared.listeners);
            self.unit_mut(u).switch_to(prepared);
        }
        if after == AfterStop::Hold {
            self.unit_mut(u).set_state(State::Held);
            info!(unit = %self.unit(u).config.name, "held: not listening until started");
        } else {
            self.listen_again(u);
        }
    }

    fn enter_backoff(&mut self, u: usize, backoff: Backoff, now: Instant) {
        self.deregister(u);
        let unit = self.unit_mut(u);
        unit.stats.backoffs += 1;
        unit.set_state(State::Backoff {
            until: now + backoff.delay,
        });
        warn!(
            unit = %unit.config.name,
            step = backoff.step,
            delay_ms = u64::try_from(backoff.delay.as_millis()).unwrap_or(u64::MAX),
            "backing off before listening again"
        );
        self.schedule_deadline(u);
    }

    /// Acts on every unit whose deadline has come: a backoff over listens again, a
    /// start overdue is given up.
    fn expire_deadlines(&mut self, now: Instant) {
        let due = self.deadlines.take_due(now, current_deadline(&self.units));
        for u in due {
            match self.unit(u).state {
                State::Backoff { .. } if self.shutdown_deadline.is_none() => {
                    info!(unit = %self.unit(u).config.name, "backoff over; listening again");
                    self.listen_again(u);
                }
                State::Starting { .. } => self.abandon_start(u, now),
                _ => {}
            }
        }
    }

    /// Fails a start whose plugin call has not returned within `activate_timeout`.
    /// The worker thread is abandoned; should it return after all, the guest it
    /// started is stopped (see `activated`).
    fn abandon_start(&mut self, u: usize, now: Instant) {
        let unit = self.unit_mut(u);
        let timeout = unit.config.activate_timeout;
        let guest = unit.state.guest().unwrap_or(0);
        error!(unit = %unit.config.name, guest, timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), "activation timed out: the plugin's activate call did not return; abandoning it");
        unit.stats.fail(format!(
            "activation timed out after {}",
            humantime::format_duration(timeout)
        ));
        let backoff = unit.guard.start_failed();
        unit.set_state(State::Listening);
        if self.shutdown_deadline.is_none() {
            self.enter_backoff(u, backoff, now);
        }
    }

    /// Hands the sockets back to the loop: blocking mode restored, registered again.
    /// A client queued meanwhile makes the socket ready at once, starting the guest again.
    fn listen_again(&mut self, u: usize) {
        let unit = self.unit_mut(u);
        for l in &unit.listeners {
            match l.socket.restore(&l.config) {
                Ok(false) => {}
                Ok(true) => {
                    warn!(unit = %unit.config.name, listener = %l.config.describe(), "the listener had stopped listening (a guest shut it down); listening again")
                }
                Err(e) => {
                    error!(unit = %unit.config.name, error = %e, "cannot restore the listener")
                }
            }
        }
        unit.set_state(State::Listening);
        self.register(u);
        debug!(unit = %self.unit(u).config.name, "listening");
    }

    fn register(&mut self, u: usize) {
        if !self.unit(u).tokens.is_empty() {
            return;
        }
        let count = self.unit(u).listeners.len();
        let mut tokens = Vec::with_capacity(count);
        for l in 0..count {
            let token = self.free_tokens.pop().unwrap_or_else(|| {
                self.tokens.push(None);
                self.tokens.len() - 1
            });
            self.tokens[token] = Some((u, l));
            let unit = self.unit(u);
            let fd = unit.listeners[l].socket.as_raw_fd();
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
            {
                error!(unit = %unit.config.name, listener = %unit.listeners[l].config.describe(), error = %e, "cannot register listener");
            }
            tokens.push(token);
        }
        self.unit_mut(u).tokens = tokens;
    }

    fn deregister(&mut self, u: usize) {
        let tokens = std::mem::take(&mut self.unit_mut(u).tokens);
        for (l, token) in tokens.into_iter().enumerate() {
            self.tokens[token] = None;
            self.free_tokens.push(token);
            let unit = self.unit(u);
            let fd = unit.listeners[l].socket.as_raw_fd();
            if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
                error!(unit = %unit.config.name, listener = %unit.listeners[l].config.describe(), error = %e, "cannot deregister listener");
            }
        }
    }

    /// Takes out of the supervisor's fd store the listeners of unit `u` that
    /// `keep` no longer has (their sockets close once nothing holds them).
    fn retire_listeners(&self, u: usize, keep: &[Listener]) {
        let unit = self.unit(u);
        for old in &unit.listeners {
            if !keep.iter().any(|k| Arc::ptr_eq(&k.socket, &old.socket)) {
                info!(unit = %unit.config.name, listener = %old.config.describe(), "closing listener");
                supervisor::unstore(&unit.config.name, &old.config);
            }
        }
        for new in keep {
            if !unit
                .listeners
                .iter()
                .any(|o| Arc::ptr_eq(&o.socket, &new.socket))
            {
                supervisor::store(&unit.config.name, &new.config, &new.socket);
            }
        }
    }

    fn remove_unit(&mut self, u: usize) {
        self.deregister(u);
        self.retire_listeners(u, &[]);
        let unit = self.units[u].take().expect("live unit slot");
        self.by_name.remove(&unit.config.name);
        info!(unit = %unit.config.name, "removed");
    }

    /// Handles pending signals; true when the daemon must exit at once.
    fn handle_signals(&mut self) -> bool {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGUSR2 => {
                    info!("SIGUSR2: live restart requested");
                    self.restart_requested.get_or_insert_with(Instant::now);
                }
                SIGHUP => match self.reload() {
                    Ok(summary) => info!(%summary, "SIGHUP: reloaded"),
                    Err(e) => {
                        error!(error = %e, "SIGHUP: reload refused; the old config stays in force")
                    }
                },
                _ if self.shutdown_deadline.is_some() => return true,
                _ => self.begin_shutdown(signal),
            }
        }
        false
    }

    fn begin_shutdown(&mut self, signal: i32) {
        let longest = self
            .live_units()
            .map(|(_, u)| u.config.stop_timeout)
            .max()
            .unwrap_or_default();
        self.shutdown_deadline = Some(Instant::now() + longest + SHUTDOWN_GRACE);
        info!(signal, "stopping guests and exiting");
        supervisor::notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping guests"),
        ]);
        let slots: Vec<usize> = self.live_units().map(|(i, _)| i).collect();
        for u in slots {
            self.deregister(u);
            match self.unit(u).state {
                State::Running { guest, .. } => self.stop(u, guest, AfterStop::Listen),
                State::Backoff { .. } => self.unit_mut(u).set_state(State::Listening),
                // Starting: stopped once the activation reports back.
                _ => {}
            }
        }
    }
}

/// A unit slot's deadline as of now (none once the slot is empty), for `Deadlines`.
fn current_deadline(units: &[Option<Unit>]) -> impl Fn(usize) -> Option<Instant> + '_ {
    |u| units.get(u)?.as_ref()?.deadline()
}

/// The unit with its listeners in its guest's fd order, if it names guest units;
/// refuses (or warns about) listeners the guest would not adopt.
fn guest_ordered(config: &Config, unit: &UnitConfig) -> Result<UnitConfig, DaemonError> {
    if unit.guest_units.is_none() {
        return Ok(unit.clone());
    }
    let plan = guest_match::plan(&config.path, unit);
    if !plan.problems.is_empty() {
        if unit.on_guest_mismatch == MismatchPolicy::Refuse {
            return Err(DaemonError::GuestMismatch {
                unit: unit.name.clone(),
                problems: plan.problems.join("\n"),
            });
        }
        for problem in &plan.problems {
            warn!(unit = %unit.name, problem = %problem, "listener does not match the guest's units");
        }
    }
    for note in &plan.notes {
        info!(unit = %unit.name, note = %note, "guest units");
    }
    Ok(guest_match::apply(unit, &plan))
}
