//! The `nspawn` activation plugin: boots a container with `systemd-nspawn` and
//! hands it the unit's listeners.
//!
//! nspawn forwards `LISTEN_FDS` into the container (rewriting `LISTEN_PID` to 1)
//! only when `LISTEN_PID` equals nspawn's own pid, so nspawn is started directly
//! as the guest process (through a `sh` that joins the guest's cgroup scope and
//! then executes nspawn in its own place). nspawn does not forward
//! `LISTEN_FDNAMES`; it is set in the container with `--setenv`. A guest running
//! systemd adopts the fds by address and needs none of these variables.
//!
//! Options (RON), `directory` or `image` required:
//! ```ron
//! (
//!     directory: "/var/lib/machines/web",   // -D; or image: "/var/lib/machines/web.raw" (-i)
//!     machine: "web",                      // -M; nspawn's default is the directory name
//!     private_network: true,               // --private-network
//!     volatile: "overlay",                 // --volatile=no|yes|state|overlay
//!     boot: true,                          // --boot (default); false runs `command` as the payload
//!     args: ["--bind-ro=/srv/web:/srv"],   // extra nspawn arguments
//!     command: [],                         // arguments for init (boot) or the command to run
//!     program: "systemd-nspawn",           // the nspawn binary
//!     keep_unit: true,                     // --keep-unit --register=no (needed without systemd on the host)
//!     cgroup_scope: true,                  // run each guest in a cgroup of its own and remove it after
//! )
//! ```
//!
//! Stop: SIGTERM to nspawn (it shuts the guest down cleanly), then, after the
//! unit's stop timeout, SIGKILL to nspawn and everything in the guest's cgroup.
//!
//! Live restart (ABI 1.1): `activate` returns a handle naming nspawn's pid, its
//! start time and the guest's cgroup scope; `adopt` in the new daemon image
//! (the same process, so nspawn is still its child) watches and stops that
//! nspawn as if it had started it. A guest that ended during the restart is
//! reaped, its cgroup removed, and reported gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portwake_plugin_api::{
    export_plugin, Activation, AdoptError, GuestCommand, GuestId, GuestInfo, GuestProcess, Host,
    LogLevel, Plugin,
};
use portwake_plugin_support::{
    handle_field, reap_handle_zombie, sanitize, CgroupScope, GuestSlot, GuestTable,
};
use serde::Deserialize;

/// How long leftovers get to leave a cgroup once killed.
const CGROUP_DRAIN: Duration = Duration::from_secs(5);

/// `--volatile=` modes, as systemd-nspawn names them.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
enum Volatile {
    No,
    Yes,
    State,
    Overlay,
}

impl TryFrom<String> for Volatile {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "no" => Ok(Self::No),
            "yes" => Ok(Self::Yes),
            "state" => Ok(Self::State),
            "overlay" => Ok(Self::Overlay),
            _ => Err(format!(
                "volatile {text:?} is not one of \"no\", \"yes\", \"state\", \"overlay\""
            )),
        }
    }
}

impl Volatile {
    fn arg(self) -> &'static str {
        match self {
            Self::No => "--volatile=no",
            Self::Yes => "--volatile=yes",
            Self::State => "--volatile=state",
            Self::Overlay => "--volatile=overlay",
        }
    }
}

fn yes() -> bool {
    true
}

fn default_program() -> String {
    "systemd-nspawn".into()
}

/// The unit's `options` for this plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NspawnOptions {
    /// Root directory of the container (`-D`).
    #[serde(default)]
    directory: Option<PathBuf>,
    /// Disk image of the container (`-i`).
    #[serde(default)]
    image: Option<PathBuf>,
    /// Machine name (`-M`).
    #[serde(default)]
    machine: Option<String>,
    /// `--private-network`: a netns with only `lo`; the passed sockets still serve.
    #[serde(default)]
    private_network: bool,
    /// `--volatile=`.
    #[serde(default)]
    volatile: Option<Volatile>,
    /// `--boot`: run the container's init (default). When false, `command` runs.
    #[serde(default = "yes")]
    boot: bool,
    /// Extra nspawn arguments, before the container's command line.
    #[serde(default)]
    args: Vec<String>,
    /// Arguments for init (with `boot`) or the command to run (without).
    #[serde(default)]
    command: Vec<String>,
    /// The nspawn program.
    #[serde(default = "default_program")]
    program: String,
    /// `--keep-unit --register=no`: needed where the host runs no systemd.
    #[serde(default = "yes")]
    keep_unit: bool,
    /// Run each guest in a cgroup of its own and remove it when the guest ends.
    #[serde(default = "yes")]
    cgroup_scope: bool,
}

impl NspawnOptions {
    fn validate(&self) -> Result<(), String> {
        match (&self.directory, &self.image) {
            (None, None) => return Err("options: set `directory` or `image`".into()),
            (Some(_), Some(_)) => {
                return Err("options: `directory` and `image` exclude each other".into())
            }
            (Some(d), None) if !d.is_absolute() => {
                return Err(format!(
                    "options: directory {} must be an absolute path",
                    d.display()
                ))
            }
            (None, Some(i)) if !i.is_absolute() => {
                return Err(format!(
                    "options: image {} must be an absolute path",
                    i.display()
                ))
            }
            _ => {}
        }
        if let Some(m) = &self.machine {
            if m.is_empty() || sanitize(m) != *m {
                return Err(format!(
                    "options: machine {m:?} must be a non-empty name of letters, digits, '-', '_' and '.'"
                ));
            }
        }
        if !self.boot && self.command.is_empty() {
            return Err("options: with `boot: false`, `command` must name what to run".into());
        }
        if self.program.is_empty() {
            return Err("options: program must not be empty".into());
        }
        Ok(())
    }

    /// The machine name nspawn uses: `machine`, else the directory's or image's
    /// file name (for an image, without its extension).
    fn machine_name(&self) -> Option<String> {
        if let Some(m) = &self.machine {
            return Some(m.clone());
        }
        let path = self.directory.as_ref().or(self.image.as_ref())?;
        let name = if self.image.is_some() {
            path.file_stem()
        } else {
            path.file_name()
        }?;
        let name = name.to_str()?;
        (sanitize(name) == name).then(|| name.to_owned())
    }

    /// nspawn's command line for one activation.
    fn argv(&self, activation: &Activation<'_>) -> Vec<String> {
        let mut argv = vec![self.program.clone()];
        if let Some(d) = &self.directory {
            argv.push(format!("--directory={}", d.display()));
        }
        if let Some(i) = &self.image {
            argv.push(format!("--image={}", i.display()));
        }
        if let Some(m) = &self.machine {
            argv.push(format!("--machine={m}"));
        }
        if self.boot {
            argv.push("--boot".into());
        }
        if self.keep_unit {
            argv.extend(["--keep-unit".into(), "--register=no".into()]);
        }
        if self.private_network {
            argv.push("--private-network".into());
        }
        if let Some(v) = self.volatile {
            argv.push(v.arg().into());
        }
        // nspawn forwards LISTEN_FDS and LISTEN_PID (as 1) itself, but not the names.
        let names: Vec<&str> = activation.fds.iter().map(|f| f.name).collect();
        argv.push(format!("--setenv=LISTEN_FDNAMES={}", names.join(":")));
        for (k, v) in &activation.env {
            argv.push(format!("--setenv={k}={v}"));
        }
        argv.extend(self.args.iter().cloned());
        if !self.command.is_empty() {
            argv.push("--".into());
            argv.extend(self.command.iter().cloned());
        }
        argv
    }
}

/// What the plugin keeps about one running container.
#[derive(Debug)]
struct Container {
    /// nspawn itself.
    process: GuestProcess,
    /// The guest's own cgroup, when `cgroup_scope` is on.
    scope: Option<CgroupScope>,
}

/// One instance per unit.
#[derive(Debug)]
struct NspawnPlugin {
    options: NspawnOptions,
    host: Host,
    guests: GuestTable<Container>,
}

impl Plugin for NspawnPlugin {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let options: NspawnOptions = portwake_plugin_api::options::parse_options(options)?;
        options.validate()?;
        Ok(Self {
            options,
            host,
            guests: GuestTable::default(),
        })
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        let argv = self.options.argv(activation);
        let scope = if self.options.cgroup_scope {
            let name = format!(
                "portwake-nspawn.{}.{}.{}",
                std::process::id(),
                sanitize(activation.unit),
                activation.guest
            );
            Some(CgroupScope::create(&name)?)
        } else {
            None
        };
        let command = match &scope {
            Some(scope) => GuestCommand::new(scope.wrap(&argv)),
            None => GuestCommand::new(&argv),
        };
        let process = match command.spawn(&activation.fds) {
            Ok(p) => p,
            Err(e) => {
                if let Some(scope) = &scope {
                    let _ = scope.remove(CGROUP_DRAIN);
                }
                return Err(e.to_string());
            }
        };
        self.host.log(
            LogLevel::Info,
            &format!(
                "started systemd-nspawn as pid {}: {}",
                process.pid,
                argv.join(" ")
            ),
        );
        self.watch(activation.guest, Container { process, scope })
    }

    /// Takes over an nspawn started by this daemon before a live restart (same
    /// process, so nspawn is still its child): the handle names nspawn's pid and
    /// start time, and the guest's cgroup scope.
    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        let scope = match handle_field(handle, "scope") {
            Some(name) if name != "-" => Some(CgroupScope::open(name).map_err(AdoptError::Failed)?),
            _ => None,
        };
        let Some(process) = GuestProcess::from_handle(handle).map_err(AdoptError::Failed)? else {
            // Ended during the restart: reap it and clear what it left.
            reap_handle_zombie(handle);
            if let Some(scope) = &scope {
                let _ = scope.remove(CGROUP_DRAIN);
            }
            return Err(AdoptError::Gone);
        };
        self.host.log(
            LogLevel::Info,
            &format!("adopted systemd-nspawn pid {}", process.pid),
        );
        self.watch(guest, Container { process, scope })
            .map_err(AdoptError::Failed)
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        let Some(slot) = self.guests.get(guest) else {
            return Ok(()); // already gone: its exit is (being) reported
        };
        let pid = Pid::from_raw(slot.data.process.pid);
        // Only nspawn itself: it turns SIGTERM into a clean shutdown of the guest.
        // (SIGTERM to the guest's systemd directly would make it re-execute.)
        if kill(pid, Signal::SIGTERM).is_err() || slot.wait_exited(timeout) {
            return Ok(());
        }
        self.host.log(
            LogLevel::Warn,
            &format!(
                "systemd-nspawn (pid {pid}) still running after {timeout:?}; killing the container"
            ),
        );
        let _ = kill(pid, Signal::SIGKILL);
        if let Some(scope) = &slot.data.scope {
            scope.kill_all(Signal::SIGKILL);
        }
        if slot.wait_exited(CGROUP_DRAIN + Duration::from_secs(5)) {
            Ok(())
        } else {
            Err(format!(
                "systemd-nspawn (pid {pid}) did not exit after SIGKILL"
            ))
        }
    }
}

impl NspawnPlugin {
    /// Records a running nspawn and starts its waiter, which cleans up its cgroup
    /// and reports its end; returns its pid and adopt handle.
    fn watch(&self, id: GuestId, container: Container) -> Result<GuestInfo, String> {
        let process = container.process;
        let scope_name = container
            .scope
            .as_ref()
            .and_then(|s| s.dirs().first())
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("-")
            .to_owned();
        let slot = Arc::new(GuestSlot::new(container));
        self.guests.insert(id, Arc::clone(&slot));
        let (host, guests) = (self.host, self.guests.clone());
        let propagate_dir = self
            .options
            .machine_name()
            .map(|m| PathBuf::from("/run/systemd/nspawn/propagate").join(m));
        std::thread::Builder::new()
            .name(format!("nspawn-wait-{}", process.pid))
            .spawn(move || {
                let exit = slot.data.process.wait();
                if let Some(scope) = &slot.data.scope {
                    let left = scope.kill_all(Signal::SIGKILL);
                    if left > 0 {
                        host.log(
                            LogLevel::Warn,
                            &format!("killed {left} processes left in the guest's cgroup"),
                        );
                    }
                    if let Err(e) = scope.remove(CGROUP_DRAIN) {
                        host.log(LogLevel::Error, &e);
                    }
                }
                // nspawn's mount-propagation directory outlives a killed nspawn.
                if let Some(dir) = &propagate_dir {
                    let _ = std::fs::remove_dir(dir);
                }
                slot.set_exited(exit);
                guests.remove(id);
                host.guest_stopped(id, exit);
            })
            .map_err(|e| {
                self.guests.remove(id);
                let _ = kill(Pid::from_raw(process.pid), Signal::SIGKILL);
                format!("spawning the waiter thread: {e}")
            })?;
        Ok(GuestInfo {
            pid: Some(i64::from(process.pid)),
            handle: process.handle().map(|h| format!("{h} scope={scope_name}")),
        })
    }
}

impl Drop for NspawnPlugin {
    fn drop(&mut self) {
        // The host stops guests before destroying an instance; anything still
        // here is killed rather than left running without a watcher.
        for (_, slot) in self.guests.all() {
            if !slot.has_exited() {
                let _ = kill(Pid::from_raw(slot.data.process.pid), Signal::SIGKILL);
                if let Some(scope) = &slot.data.scope {
                    scope.kill_all(Signal::SIGKILL);
                }
            }
        }
    }
}

export_plugin!(NspawnPlugin, "nspawn");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NspawnOptions, String> {
        let o: NspawnOptions = portwake_plugin_api::options::parse_options(text)?;
        o.validate()?;
        Ok(o)
    }

    #[test]
    fn options_are_validated() {
        assert!(parse(r#"(directory: "/var/lib/machines/a")"#).is_ok());
        assert!(parse(r#"(directory: "/a", volatile: "overlay", private_network: true)"#).is_ok());
        assert!(parse("()").unwrap_err().contains("directory"));
        assert!(parse(r#"(directory: "a")"#)
            .unwrap_err()
            .contains("absolute"));
        assert!(parse(r#"(directory: "/a", image: "/b")"#).is_err());
        assert!(parse(r#"(directory: "/a", volatile: "sometimes")"#).is_err());
        assert!(parse(r#"(directory: "/a", bogus: 1)"#)
            .unwrap_err()
            .contains("bogus"));
        assert!(parse(r#"(directory: "/a", boot: false)"#)
            .unwrap_err()
            .contains("command"));
    }
}
