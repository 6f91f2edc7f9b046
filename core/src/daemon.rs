//! The event loop: one `mio::Poll` over every listener, a waker for plugin reports,
//! and the signal pipe. Plugin calls run on worker threads and report back here, so
//! a slow start of one unit never delays another.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use portwake_plugin_api::abi;
use portwake_plugin_api::GuestExit;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::config::{Config, MismatchPolicy, UnitConfig};
use crate::guest_match;
use crate::listener::{self, BoundSocket, ListenError};
use crate::plugin_host::{
    self, ActivationFd, HostEvents, PluginError, PluginInstance, PluginLibrary,
};
use crate::start_guard::{Backoff, StartGuard};

const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Extra time granted at shutdown beyond the longest stop timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start or had to stop.
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
    /// A unit's listeners do not match its guest's socket units.
    #[error("unit {unit:?}: listeners do not match the guest's socket units (set on_guest_mismatch: \"warn\" to run anyway):\n{problems}")]
    GuestMismatch {
        /// The unit.
        unit: String,
        /// One problem per line, as `portwake check` prints them.
        problems: String,
    },
    /// The event loop itself failed.
    #[error("event loop: {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Where a unit is in its lifecycle.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Listeners registered; the next client starts the guest.
    Listening,
    /// The plugin is starting the guest; `exited` holds an exit reported meanwhile.
    Starting {
        guest: u64,
        since: Instant,
        exited: Option<GuestExit>,
    },
    /// The guest owns accept.
    Running {
        guest: u64,
        pid: Option<i64>,
        since: Instant,
    },
    /// The plugin is stopping the guest.
    Stopping { guest: u64, since: Instant },
    /// Waiting out a backoff; listeners not registered.
    Backoff { until: Instant },
}

/// What worker threads and plugin callbacks tell the loop.
#[derive(Debug)]
enum LoopEvent {
    Activated {
        unit: usize,
        guest: u64,
        result: Result<Option<i64>, PluginError>,
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

struct Unit {
    config: Arc<UnitConfig>,
    sockets: Arc<Vec<BoundSocket>>,
    /// Token of the first listener; the others follow.
    first_token: usize,
    plugin: Arc<PluginInstance>,
    state: State,
    registered: bool,
    guard: StartGuard,
    activations: u64,
}

/// The running daemon.
pub struct Daemon {
    poll: Poll,
    units: Vec<Unit>,
    /// Token → unit index, for O(1) dispatch.
    token_unit: Vec<usize>,
    inbox: Receiver<LoopEvent>,
    notifier: Arc<Notifier>,
    signals: Signals,
    next_guest: u64,
    /// Set once a stop signal came: the time by which the daemon exits regardless.
    shutdown_deadline: Option<Instant>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("units", &self.units.len())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Loads every plugin, creates every instance and binds every listener.
    /// Nothing is started yet; any failure names its unit.
    pub fn new(config: &Config) -> Result<Self, DaemonError> {
        let io_error = |step| move |source| DaemonError::Io { step, source };
        let poll = Poll::new().map_err(io_error("creating the poll"))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(io_error("creating the waker"))?;
        let (sender, inbox) = mpsc::channel();
        let notifier = Arc::new(Notifier {
            sender: Mutex::new(sender),
            waker,
        });
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(io_error("installing signal handlers"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_error("registering signals"))?;

        let base = config.path.parent().unwrap_or(std::path::Path::new("."));
        let dirs = plugin_host::search_dirs(config.plugin_dir.as_deref());
        let mut libraries: HashMap<PathBuf, Arc<PluginLibrary>> = HashMap::new();
        let mut units = Vec::with_capacity(config.units.len());
        let mut token_unit = Vec::new();
        for (index, unit) in config.units.iter().enumerate() {
            let unit = &guest_ordered(config, unit)?;
            let plugin_error = |source| DaemonError::Plugin {
                unit: unit.name.clone(),
                source,
            };
            let path = plugin_host::resolve(&unit.plugin, base, &dirs).map_err(plugin_error)?;
            let library = match libraries.get(&path) {
                Some(l) => Arc::clone(l),
                None => {
                    let l = PluginLibrary::load(&path).map_err(plugin_error)?;
                    libraries.insert(path, Arc::clone(&l));
                    l
                }
            };
            let events = Arc::new(UnitEvents {
                unit: index,
                name: unit.name.clone(),
                notifier: Arc::clone(&notifier),
            });
            let plugin =
                PluginInstance::create(library, &unit.options, events).map_err(plugin_error)?;
            let sockets = unit
                .listen
                .iter()
                .map(listener::bind)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| DaemonError::Listen {
                    unit: unit.name.clone(),
                    source,
                })?;
            let first_token = token_unit.len();
            token_unit.extend(std::iter::repeat_n(index, sockets.len()));
            for (listener, _) in unit.listen.iter().zip(&sockets) {
                info!(unit = %unit.name, listener = %listener.describe(), name = %listener.name, "bound");
            }
            units.push(Unit {
                config: Arc::new(unit.clone()),
                sockets: Arc::new(sockets),
                first_token,
                plugin: Arc::new(plugin),
                state: State::Listening,
                registered: false,
                guard: StartGuard::new(unit.trigger_limit, unit.backoff),
                activations: 0,
            });
        }
        let mut daemon = Self {
            poll,
            units,
            token_unit,
            inbox,
            notifier,
            signals,
            next_guest: 1,
            shutdown_deadline: None,
        };
        for u in 0..daemon.units.len() {
            daemon.register(u);
        }
        Ok(daemon)
    }

    /// Runs until SIGTERM or SIGINT, then stops every guest (bounded) and returns.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let listeners: usize = self.units.iter().map(|u| u.sockets.len()).sum();
        info!(units = self.units.len(), listeners, "ready");
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(source) = self.poll.poll(&mut events, timeout) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Io {
                    step: "poll",
                    source,
                });
            }
            for event in &events {
                match event.token() {
                    WAKER => self.drain_inbox(),
                    SIGNALS => {
                        if self.handle_signals() {
                            warn!("second stop signal: exiting without waiting for guests");
                            return Ok(());
                        }
                    }
                    Token(t) => self.listener_ready(t),
                }
            }
            let now = Instant::now();
            self.expire_backoffs(now);
            if let Some(deadline) = self.shutdown_deadline {
                if self.units.iter().all(|u| !u.has_guest()) {
                    info!("all guests stopped; exiting");
                    return Ok(());
                }
                if now >= deadline {
                    for unit in self.units.iter().filter(|u| u.has_guest()) {
                        error!(unit = %unit.config.name, "guest still up at the shutdown deadline");
                    }
                    return Ok(());
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.units
            .iter()
            .filter_map(|u| match u.state {
                State::Backoff { until } => Some(until),
                _ => None,
            })
            .chain(self.shutdown_deadline)
            .min()
    }

    fn listener_ready(&mut self, token: usize) {
        let Some(&u) = self.token_unit.get(token) else {
            return;
        };
        if matches!(self.units[u].state, State::Listening) && self.shutdown_deadline.is_none() {
            let listener = &self.units[u].config.listen[token - self.units[u].first_token];
            debug!(unit = %self.units[u].config.name, listener = %listener.describe(), "client waiting");
            self.start(u, Instant::now());
        }
    }

    fn start(&mut self, u: usize, now: Instant) {
        if let Err(backoff) = self.units[u].guard.try_start(now) {
            let limit = self.units[u].config.trigger_limit;
            warn!(
                unit = %self.units[u].config.name,
                starts = limit.burst,
                interval = ?limit.interval,
                "trigger limit hit"
            );
            self.enter_backoff(u, backoff, now);
            return;
        }
        self.deregister(u);
        let guest = self.next_guest;
        self.next_guest += 1;
        let unit = &mut self.units[u];
        unit.state = State::Starting {
            guest,
            since: now,
            exited: None,
        };
        unit.activations += 1;
        info!(unit = %unit.config.name, guest, activation = unit.activations, "starting guest");
        let (config, sockets) = (Arc::clone(&unit.config), Arc::clone(&unit.sockets));
        let (plugin, notifier) = (Arc::clone(&unit.plugin), Arc::clone(&self.notifier));
        self.spawn_worker(u, "activate", move || {
            let fds: Vec<ActivationFd<'_>> = sockets
                .iter()
                .zip(&config.listen)
                .map(|(socket, listener)| ActivationFd {
                    fd: socket.fd(),
                    kind: listener.kind,
                    name: &listener.name,
                })
                .collect();
            let result = plugin.activate(&config.name, guest, &fds, &config.env);
            notifier.send(LoopEvent::Activated {
                unit: u,
                guest,
                result,
            });
        });
    }

    fn stop(&mut self, u: usize, guest: u64) {
        let unit = &mut self.units[u];
        let (since, pid) = match unit.state {
            State::Running { since, pid, .. } => (since, pid),
            _ => (Instant::now(), None),
        };
        unit.state = State::Stopping { guest, since };
        info!(unit = %unit.config.name, guest, pid = pid.unwrap_or(0), "stopping guest");
        let (plugin, notifier) = (Arc::clone(&unit.plugin), Arc::clone(&self.notifier));
        let timeout = unit.config.stop_timeout;
        self.spawn_worker(u, "stop", move || {
            let result = plugin.stop(guest, timeout);
            notifier.send(LoopEvent::Stopped {
                unit: u,
                guest,
                result,
            });
        });
    }

    /// Runs a plugin call on its own thread; calls are rare and may block for long.
    fn spawn_worker(&self, u: usize, call: &str, work: impl FnOnce() + Send + 'static) {
        let name = format!("{call}-{}", self.units[u].config.name);
        if let Err(e) = std::thread::Builder::new().name(name).spawn(work) {
            error!(unit = %self.units[u].config.name, error = %e, call, "cannot spawn a worker thread");
        }
    }

    fn drain_inbox(&mut self) {
        while let Ok(event) = self.inbox.try_recv() {
            match event {
                LoopEvent::Activated {
                    unit,
                    guest,
                    result,
                } => self.activated(unit, guest, result),
                LoopEvent::Stopped {
                    unit,
                    guest,
                    result,
                } => {
                    if let Err(e) = result {
                        error!(unit = %self.units[unit].config.name, guest, error = %e, "stop failed");
                    }
                }
                LoopEvent::GuestExited { unit, guest, exit } => {
                    self.guest_exited(unit, guest, exit)
                }
            }
        }
    }

    fn activated(&mut self, u: usize, guest: u64, result: Result<Option<i64>, PluginError>) {
        let State::Starting {
            guest: starting,
            since,
            exited,
        } = self.units[u].state
        else {
            return;
        };
        if starting != guest {
            return;
        }
        let name = Arc::clone(&self.units[u].config);
        let name = name.name.as_str();
        let took_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(pid) => {
                info!(
                    unit = %name,
                    guest,
                    pid = pid.unwrap_or(0),
                    took_ms,
                    "guest started"
                );
                self.units[u].state = State::Running {
                    guest,
                    pid,
                    since: Instant::now(),
                };
                if let Some(exit) = exited {
                    self.guest_exited(u, guest, exit);
                } else if self.shutdown_deadline.is_some() {
                    self.stop(u, guest);
                }
            }
            Err(e) => {
                error!(unit = %name, guest, error = %e, "activation failed");
                let backoff = self.units[u].guard.start_failed();
                if self.shutdown_deadline.is_some() {
                    self.units[u].state = State::Listening;
                } else {
                    self.enter_backoff(u, backoff, Instant::now());
                }
            }
        }
    }

    fn guest_exited(&mut self, u: usize, guest: u64, exit: GuestExit) {
        let unit = &mut self.units[u];
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
        unit.state = State::Listening;
        if self.shutdown_deadline.is_none() {
            self.listen_again(u);
        }
    }

    fn enter_backoff(&mut self, u: usize, backoff: Backoff, now: Instant) {
        self.deregister(u);
        let unit = &mut self.units[u];
        unit.state = State::Backoff {
            until: now + backoff.delay,
        };
        warn!(
            unit = %unit.config.name,
            step = backoff.step,
            delay_ms = u64::try_from(backoff.delay.as_millis()).unwrap_or(u64::MAX),
            "backing off before listening again"
        );
    }

    fn expire_backoffs(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        for u in 0..self.units.len() {
            if matches!(self.units[u].state, State::Backoff { until } if until <= now) {
                info!(unit = %self.units[u].config.name, "backoff over; listening again");
                self.listen_again(u);
            }
        }
    }

    /// Hands the sockets back to the loop: blocking mode restored, registered again.
    /// A client queued meanwhile makes the socket ready at once, starting the guest again.
    fn listen_again(&mut self, u: usize) {
        let unit = &mut self.units[u];
        for (socket, listener) in unit.sockets.iter().zip(&unit.config.listen) {
            if let Err(e) = socket.reset_flags() {
                warn!(unit = %unit.config.name, listener = %listener.describe(), error = %e, "cannot reset socket flags");
            }
        }
        unit.state = State::Listening;
        self.register(u);
        debug!(unit = %self.units[u].config.name, "listening");
    }

    fn register(&mut self, u: usize) {
        let unit = &mut self.units[u];
        if unit.registered {
            return;
        }
        for (i, socket) in unit.sockets.iter().enumerate() {
            let fd = socket.as_raw_fd();
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&fd),
                Token(unit.first_token + i),
                Interest::READABLE,
            ) {
                error!(unit = %unit.config.name, listener = %unit.config.listen[i].describe(), error = %e, "cannot register listener");
            }
        }
        unit.registered = true;
    }

    fn deregister(&mut self, u: usize) {
        let unit = &mut self.units[u];
        if !unit.registered {
            return;
        }
        for (i, socket) in unit.sockets.iter().enumerate() {
            let fd = socket.as_raw_fd();
            if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&fd)) {
                error!(unit = %unit.config.name, listener = %unit.config.listen[i].describe(), error = %e, "cannot deregister listener");
            }
        }
        unit.registered = false;
    }

    /// Handles pending signals; true when the daemon must exit at once.
    fn handle_signals(&mut self) -> bool {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGHUP => warn!("SIGHUP: reload is not supported yet; ignored"),
                _ if self.shutdown_deadline.is_some() => return true,
                _ => self.begin_shutdown(signal),
            }
        }
        false
    }

    fn begin_shutdown(&mut self, signal: i32) {
        let longest = self
            .units
            .iter()
            .map(|u| u.config.stop_timeout)
            .max()
            .unwrap_or_default();
        self.shutdown_deadline = Some(Instant::now() + longest + SHUTDOWN_GRACE);
        info!(signal, "stopping guests and exiting");
        for u in 0..self.units.len() {
            self.deregister(u);
            match self.units[u].state {
                State::Running { guest, .. } => self.stop(u, guest),
                State::Backoff { .. } => self.units[u].state = State::Listening,
                // Starting: stopped once the activation reports back.
                _ => {}
            }
        }
    }
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

impl Unit {
    fn has_guest(&self) -> bool {
        matches!(
            self.state,
            State::Starting { .. } | State::Running { .. } | State::Stopping { .. }
        )
    }
}
