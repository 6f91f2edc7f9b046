//! The `libvirt_lxc` activation plugin: the libvirt LXC socket-activation recipe
//! (`virsh -c URI start --pass-fds 3,4,… DOMAIN`), plus what the recipe lacks:
//! it notices when the domain stops for any reason and reports it, so portwake
//! listens again.
//!
//! Options (RON):
//! ```ron
//! (
//!     domain: "mycontainer",        // required: the domain's name
//!     uri: "lxc:///",               // libvirt connection URI (default)
//!     stop: "shutdown",             // "shutdown" (then destroy after the stop timeout) or "destroy"
//!     xml: "/etc/portwake/mycontainer.xml", // optional: start a transient domain from this
//!                                   // definition (`virsh create --pass-fds`) instead of a defined one
//!     listen_env: true,             // with `xml`: add LISTEN_FDS, LISTEN_PID=1 and
//!                                   // LISTEN_FDNAMES to <os> as <initenv> (default true)
//!     virsh: "virsh",               // the virsh program
//!     start_timeout: "60s",         // how long `virsh start` may take
//! )
//! ```
//!
//! libvirt passes the fds (renumbered 3, 4, … in the order given) but sets no
//! `LISTEN_*` variable. A guest whose init is systemd needs none (it adopts fds by
//! address); any other init (a plain `sd_listen_fds` server as PID 1) needs them,
//! which the transient form (`xml`) provides through `<initenv>`; for a defined
//! domain, put the `<initenv>` elements in its definition yourself.
//!
//! Stop detection: a `virsh event --loop --event lifecycle` watcher per guest,
//! with a `virsh domstate` check every few seconds as a safety net (and whenever
//! the watcher itself ends).
//!
//! Live restart (`portwake restart`): libvirtd keeps the domain running with its
//! listeners; the new daemon image adopts it (ends the old image's event listener,
//! named by the guest's handle, and watches the domain again).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portwake_plugin_api::{
    export_plugin, Activation, AdoptError, GuestCommand, GuestExit, GuestId, GuestInfo,
    GuestProcess, Host, LogLevel, Plugin,
};
use portwake_plugin_support::{reap_handle_zombie, run, GuestSlot, GuestTable};
use serde::Deserialize;

/// How long a short virsh call (domstate, destroy, shutdown) may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the watcher double-checks the domain's state without an event.
const SAFETY_POLL: Duration = Duration::from_secs(2);

/// How to stop the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
enum StopMode {
    /// `virsh shutdown`, then `virsh destroy` after the stop timeout.
    Shutdown,
    /// `virsh destroy` at once.
    Destroy,
}

impl TryFrom<String> for StopMode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "shutdown" => Ok(Self::Shutdown),
            "destroy" => Ok(Self::Destroy),
            _ => Err(format!(
                "stop {text:?} is not one of \"shutdown\", \"destroy\""
            )),
        }
    }
}

fn default_uri() -> String {
    "lxc:///".into()
}

fn default_stop() -> StopMode {
    StopMode::Shutdown
}

fn default_virsh() -> String {
    "virsh".into()
}

fn default_start_timeout() -> String {
    "60s".into()
}

fn yes() -> bool {
    true
}

/// The unit's `options` for this plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LibvirtOptions {
    domain: String,
    #[serde(default = "default_uri")]
    uri: String,
    #[serde(default = "default_stop")]
    stop: StopMode,
    #[serde(default)]
    xml: Option<PathBuf>,
    #[serde(default = "yes")]
    listen_env: bool,
    #[serde(default = "default_virsh")]
    virsh: String,
    #[serde(default = "default_start_timeout")]
    start_timeout: String,
}

/// Validated options.
#[derive(Debug)]
struct Config {
    domain: String,
    uri: String,
    stop: StopMode,
    /// The transient definition's text, when `xml` is set.
    xml: Option<String>,
    listen_env: bool,
    virsh: String,
    start_timeout: Duration,
}

impl Config {
    fn from_options(o: LibvirtOptions) -> Result<Self, String> {
        if o.domain.is_empty() || o.domain.contains(['/', '\'', '\n']) {
            return Err(format!(
                "options: domain {:?} is not a usable domain name",
                o.domain
            ));
        }
        if o.uri.is_empty() {
            return Err("options: uri must not be empty".into());
        }
        let start_timeout =
            parse_duration(&o.start_timeout).map_err(|e| format!("options: start_timeout: {e}"))?;
        let xml = match &o.xml {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("options: xml {}: {e}", path.display()))?;
                if !text.contains("</os>") {
                    return Err(format!(
                        "options: xml {}: no <os> element to add <initenv> to",
                        path.display()
                    ));
                }
                let name = format!("<name>{}</name>", o.domain);
                if !text.contains(&name) {
                    return Err(format!(
                        "options: xml {}: the definition must name the domain {name}",
                        path.display()
                    ));
                }
                Some(text)
            }
        };
        Ok(Self {
            domain: o.domain,
            uri: o.uri,
            stop: o.stop,
            xml,
            listen_env: o.listen_env,
            virsh: o.virsh,
            start_timeout,
        })
    }

    fn virsh(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.virsh.clone(), "-c".into(), self.uri.clone()];
        argv.extend(args.iter().map(|&a| a.to_owned()));
        argv
    }
}

/// `"500ms"`, `"30s"`, `"2m"`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit (ms, s, m)"))?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: unit must be ms, s or m")),
    }
}

/// Escapes text for XML character data and attribute values.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The transient definition with the activation's `<initenv>` elements added.
fn transient_xml(template: &str, activation: &Activation<'_>, listen_env: bool) -> String {
    let mut env = Vec::new();
    if listen_env {
        let names: Vec<&str> = activation.fds.iter().map(|f| f.name).collect();
        env.push(("LISTEN_FDS".to_owned(), activation.fds.len().to_string()));
        env.push(("LISTEN_PID".to_owned(), "1".to_owned()));
        env.push(("LISTEN_FDNAMES".to_owned(), names.join(":")));
    }
    for (k, v) in &activation.env {
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    let elements: String = env
        .iter()
        .map(|(k, v)| {
            format!(
                "<initenv name='{}'>{}</initenv>\n",
                xml_escape(k),
                xml_escape(v)
            )
        })
        .collect();
    template.replacen("</os>", &format!("{elements}</os>"), 1)
}

/// What the watcher of a started domain keeps.
#[derive(Debug)]
struct Domain {
    /// The `virsh event` child, to end it when the plugin goes away.
    events: Mutex<Option<Child>>,
}

/// One instance per unit.
#[derive(Debug)]
struct LibvirtPlugin {
    config: Arc<Config>,
    host: Host,
    guests: GuestTable<Domain>,
}

impl Plugin for LibvirtPlugin {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let options: LibvirtOptions = portwake_plugin_api::options::parse_options(options)?;
        Ok(Self {
            config: Arc::new(Config::from_options(options)?),
            host,
            guests: GuestTable::default(),
        })
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        let c = &self.config;
        // Listen for lifecycle events before starting, so no stop goes unseen.
        let slot = Arc::new(GuestSlot::new(self.listen_for_events()?));
        if let Err(e) = self.start_domain(activation) {
            end_events(&slot.data);
            return Err(e);
        }
        self.host.log(
            LogLevel::Info,
            &format!("started libvirt domain {} ({})", c.domain, c.uri),
        );
        match self.watch(activation.guest, slot) {
            Ok(handle) => Ok(GuestInfo { pid: None, handle }),
            Err(e) => {
                let _ = run(&c.virsh(&["destroy", &c.domain]), VIRSH_TIMEOUT);
                Err(e)
            }
        }
    }

    /// Takes over a domain a previous image of the daemon started (libvirtd keeps it
    /// running and holding its listeners across the restart): ends that image's
    /// event listener, which the handle names, and watches the domain anew.
    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        let c = &self.config;
        if handle.split_once(" domain=").map(|(_, d)| d) != Some(c.domain.as_str()) {
            return Err(AdoptError::Failed(format!(
                "handle {handle:?} is not for domain {}",
                c.domain
            )));
        }
        // Its reader went with the old image; it is still our child: end and reap it.
        match GuestProcess::from_handle(handle) {
            Ok(Some(old)) => {
                let _ = old.signal(Signal::SIGTERM as i32);
                let _ = old.wait();
            }
            _ => {
                reap_handle_zombie(handle);
            }
        }
        let slot = Arc::new(GuestSlot::new(
            self.listen_for_events().map_err(AdoptError::Failed)?,
        ));
        if let Some(state) = stopped_state(c) {
            end_events(&slot.data);
            self.host.log(
                LogLevel::Info,
                &format!(
                    "libvirt domain {} ended during the restart ({state})",
                    c.domain
                ),
            );
            return Err(AdoptError::Gone);
        }
        self.host.log(
            LogLevel::Info,
            &format!("adopted libvirt domain {} ({})", c.domain, c.uri),
        );
        let handle = self.watch(guest, slot).map_err(AdoptError::Failed)?;
        Ok(GuestInfo { pid: None, handle })
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        let Some(slot) = self.guests.get(guest) else {
            return Ok(()); // already gone: its stop is (being) reported
        };
        let c = &self.config;
        if c.stop == StopMode::Shutdown {
            match run(&c.virsh(&["shutdown", &c.domain]), VIRSH_TIMEOUT) {
                Ok(out) if !out.success => self.host.log(
                    LogLevel::Warn,
                    &format!("virsh shutdown {}: {}", c.domain, out.stderr.trim()),
                ),
                Err(e) => self.host.log(LogLevel::Warn, &e),
                Ok(_) => {}
            }
            if slot.wait_exited(timeout) {
                return Ok(());
            }
            self.host.log(
                LogLevel::Warn,
                &format!(
                    "domain {} still running after {timeout:?}; destroying it",
                    c.domain
                ),
            );
        }
        let destroyed = run(&c.virsh(&["destroy", &c.domain]), VIRSH_TIMEOUT);
        if slot.wait_exited(VIRSH_TIMEOUT) {
            return Ok(());
        }
        match destroyed {
            Ok(out) => Err(out
                .into_result(&format!("virsh destroy {}", c.domain))
                .err()
                .unwrap_or_else(|| format!("domain {} did not stop", c.domain))),
            Err(e) => Err(e),
        }
    }
}

impl LibvirtPlugin {
    /// Starts `virsh event --loop` for the domain's lifecycle events.
    fn listen_for_events(&self) -> Result<Domain, String> {
        let c = &self.config;
        let events = Command::new(&c.virsh)
            .args(["-c", &c.uri, "event", "--loop", "--event", "lifecycle"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{} event: {e}", c.virsh))?;
        Ok(Domain {
            events: Mutex::new(Some(events)),
        })
    }

    /// Records the running domain as `guest` and watches it on a thread of its own
    /// until it stops, then reports that. Returns the guest's handle for `adopt`:
    /// the event listener (a child of the daemon) and the domain's name.
    fn watch(
        &self,
        guest: GuestId,
        slot: Arc<GuestSlot<Domain>>,
    ) -> Result<Option<String>, String> {
        let events_pid = slot
            .data
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|child| i32::try_from(child.id()).ok());
        let handle = events_pid
            .and_then(|pid| GuestProcess::of_child(pid).handle())
            .map(|events| format!("{events} domain={}", self.config.domain));
        self.guests.insert(guest, Arc::clone(&slot));
        let (host, guests, config) = (self.host, self.guests.clone(), Arc::clone(&self.config));
        let spawned = std::thread::Builder::new()
            .name(format!("libvirt-watch-{}", config.domain))
            .spawn(move || {
                let (exit, how) = watch(&config, &slot.data);
                end_events(&slot.data);
                host.log(
                    LogLevel::Info,
                    &format!("libvirt domain {} stopped: {how}", config.domain),
                );
                slot.set_exited(exit);
                guests.remove(guest);
                host.guest_stopped(guest, exit);
            });
        if let Err(e) = spawned {
            if let Some(slot) = self.guests.remove(guest) {
                end_events(&slot.data);
            }
            return Err(format!("spawning the watcher thread: {e}"));
        }
        Ok(handle)
    }

    /// `virsh start --pass-fds` (or `create --pass-fds` from the transient
    /// definition), run as the guest command so the fds are 3, 4, … in virsh.
    fn start_domain(&self, activation: &Activation<'_>) -> Result<(), String> {
        let c = &self.config;
        let fds: Vec<String> = (0..activation.fds.len())
            .map(|i| (i + 3).to_string())
            .collect();
        let fds = fds.join(",");
        let mut _definition = None;
        let mut argv: Vec<OsString> =
            vec![c.virsh.clone().into(), "-c".into(), c.uri.clone().into()];
        match &c.xml {
            None => argv.push("start".into()),
            Some(template) => {
                let file = write_temp(&transient_xml(template, activation, c.listen_env))?;
                argv.push("create".into());
                argv.push(file.path().into());
                _definition = Some(file);
            }
        }
        if !activation.fds.is_empty() {
            argv.push("--pass-fds".into());
            argv.push(fds.into());
        }
        if c.xml.is_none() {
            argv.push(c.domain.clone().into());
        }
        // virsh's stderr (its error message) is captured for the error; its
        // stdout ("Domain … started") goes to the daemon's, as before.
        let (err_read, err_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let mut command = GuestCommand::new(&argv);
        command.stderr_to(err_write);
        let process = command.spawn(&activation.fds).map_err(|e| e.to_string())?;
        // The command holds the write end: drop it so the reader sees EOF.
        drop(command);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("virsh-start".into())
            .spawn(move || {
                let mut stderr = Vec::new();
                let _ = std::fs::File::from(err_read).read_to_end(&mut stderr);
                let _ = tx.send((process.wait(), stderr));
            })
            .map_err(|e| format!("spawning a thread: {e}"))?;
        let verb = if c.xml.is_some() { "create" } else { "start" };
        match rx.recv_timeout(c.start_timeout) {
            Ok((GuestExit::Exited(0), stderr)) => {
                let stderr = String::from_utf8_lossy(&stderr);
                if !stderr.trim().is_empty() {
                    self.host.log(
                        LogLevel::Warn,
                        &format!("virsh {verb} {}: {}", c.domain, stderr.trim()),
                    );
                }
                Ok(())
            }
            Ok((exit, stderr)) => {
                let stderr = String::from_utf8_lossy(&stderr);
                let message: Vec<&str> = stderr
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect();
                Err(format!(
                    "virsh {verb} {} {exit}: {}",
                    c.domain,
                    if message.is_empty() {
                        "(no message)".to_owned()
                    } else {
                        message.join("; ")
                    }
                ))
            }
            Err(_) => {
                let _ = process.signal(Signal::SIGKILL as i32);
                let _ = run(&c.virsh(&["destroy", &c.domain]), VIRSH_TIMEOUT);
                Err(format!(
                    "virsh {verb} {} did not finish within {:?}",
                    c.domain, c.start_timeout
                ))
            }
        }
    }
}

fn write_temp(text: &str) -> Result<TempFile, String> {
    let path = std::env::temp_dir().join(format!(
        "portwake-libvirt-{}-{}.xml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(TempFile(path))
}

/// A file removed when dropped.
#[derive(Debug)]
struct TempFile(PathBuf);

impl TempFile {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Blocks until the domain is no longer running; returns how it ended.
fn watch(config: &Config, domain: &Domain) -> (GuestExit, String) {
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = domain
        .events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .and_then(|c| c.stdout.take());
    if let Some(stdout) = stdout {
        let prefix = format!("for domain '{}': ", config.domain);
        let _ = std::thread::Builder::new()
            .name("virsh-events".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some((_, event)) = line.split_once(&prefix) {
                        if tx.send(event.to_owned()).is_err() {
                            break;
                        }
                    }
                }
            });
    }
    let mut events_alive = true;
    loop {
        let wait = if events_alive {
            SAFETY_POLL
        } else {
            Duration::from_millis(500)
        };
        match rx.recv_timeout(wait) {
            Ok(event) => {
                if let Some(detail) = event.strip_prefix("Stopped") {
                    let detail = detail.trim();
                    let exit = match detail {
                        "Shutdown" => GuestExit::Exited(0),
                        "Destroyed" => GuestExit::Signaled(Signal::SIGKILL as i32),
                        "Crashed" | "Failed" => GuestExit::Exited(1),
                        _ => GuestExit::Unknown,
                    };
                    return (exit, format!("event: Stopped {detail}"));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(state) = stopped_state(config) {
                    return (GuestExit::Unknown, format!("state: {state}"));
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if events_alive {
                    events_alive = false;
                }
                if let Some(state) = stopped_state(config) {
                    return (GuestExit::Unknown, format!("state: {state}"));
                }
            }
        }
    }
}

/// `Some(state)` when `virsh domstate` says the domain is not running (or is
/// gone, for a transient one); `None` while it runs or when virsh cannot tell.
fn stopped_state(config: &Config) -> Option<String> {
    let out = run(&config.virsh(&["domstate", &config.domain]), VIRSH_TIMEOUT).ok()?;
    if out.success {
        let state = out.stdout.trim().to_owned();
        let running = ["running", "paused", "pmsuspended", "in shutdown", "blocked"]
            .iter()
            .any(|s| state.starts_with(s));
        (!running).then_some(state)
    } else if out.stderr.contains("failed to get domain") || out.stderr.contains("Domain not found")
    {
        Some("no such domain".into())
    } else {
        None
    }
}

fn end_events(domain: &Domain) {
    if let Some(mut child) = domain
        .events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = child.wait();
    }
}

impl Drop for LibvirtPlugin {
    fn drop(&mut self) {
        for (_, slot) in self.guests.all() {
            end_events(&slot.data);
        }
    }
}

export_plugin!(LibvirtPlugin, "libvirt_lxc");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_options(portwake_plugin_api::options::parse_options(text)?)
    }

    #[test]
    fn options_are_validated() {
        let c = parse(r#"(domain: "web")"#).expect("minimal");
        assert_eq!(c.uri, "lxc:///");
        assert_eq!(c.stop, StopMode::Shutdown);
        assert!(parse(r#"(domain: "web", stop: "destroy", uri: "lxc:///system")"#).is_ok());
        assert!(parse(r#"(domain: "web", stop: "halt")"#)
            .unwrap_err()
            .contains("shutdown"));
        assert!(parse("()").unwrap_err().contains("domain"));
        assert!(parse(r#"(domain: "web", port: 1)"#)
            .unwrap_err()
            .contains("port"));
        assert!(parse(r#"(domain: "web", xml: "/nonexistent.xml")"#)
            .unwrap_err()
            .contains("/nonexistent.xml"));
        assert!(parse(r#"(domain: "web", start_timeout: "soon")"#).is_err());
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(xml_escape("a<b&'c'"), "a&lt;b&amp;&apos;c&apos;");
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    }
}
