//! The `oci` activation plugin: runs an OCI container with `crun` or `podman`,
//! handing it the unit's listeners at fd 3, 4, … (`--preserve-fds N` for crun;
//! podman's own `LISTEN_FDS` support) with `LISTEN_FDS=N`, `LISTEN_PID=1` and
//! `LISTEN_FDNAMES` inside.
//!
//! Options (RON):
//! ```ron
//! (
//!     engine: "crun",              // or "podman"
//!     name: "web",                 // container name (default "portwake-<unit>")
//!     rootfs: "/srv/web/rootfs",   // a root directory; or, crun only: bundle: "/srv/web"
//!                                  // (a directory with config.json); or, podman only:
//!                                  // image: "docker.io/library/nginx"
//!     command: ["/hello-guest"],   // the container's command (required with crun + rootfs)
//!     env: {"K": "V"},             // extra environment inside
//!     engine_args: [],             // global engine arguments (podman: --root, --cgroup-manager, …)
//!     run_args: [],                // extra `run` arguments
//!     program: "crun",             // the engine binary (default: the engine's name)
//!     hide_hybrid_cgroup: false,   // see below
//!     state_dir: "/run/portwake/oci", // where generated bundles go (crun)
//! )
//! ```
//!
//! `hide_hybrid_cgroup`: crun 1.8 refuses to run on a cgroup v1 "hybrid" host
//! (`cgroups in hybrid mode not supported`) because
//! `/sys/fs/cgroup/unified/cgroup.controllers` is not empty. With this option
//! every engine command runs in a private mount namespace in which `/dev/null`
//! is bound over that file; nothing changes for the rest of the host.
//!
//! Stop: crun — `crun kill NAME TERM`, `KILL` after the stop timeout, then
//! `crun delete -f`; podman — `podman stop -t SECONDS NAME`, then `podman rm -f`.
//! A container's PID 1 ignores SIGTERM unless it handles it: expect the timeout.
//!
//! Live restart (ABI 1.1): `activate` returns a handle naming the engine's
//! foreground process (`crun run` / `podman run`: pid and start time) and the
//! container; `adopt` in the new daemon image (the same process, so that
//! process is still its child) watches and stops it as if it had started it.
//! A container that ended during the restart is reaped, removed, and reported
//! gone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use portwake_plugin_api::{
    export_plugin, Activation, AdoptError, GuestCommand, GuestId, GuestInfo, GuestProcess, Host,
    LogLevel, Plugin,
};
use portwake_plugin_support::{
    handle_field, reap_handle_zombie, run, sanitize, GuestSlot, GuestTable,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// How long a short engine command (kill, delete, stop, rm) may take, on top of
/// the stop timeout.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(30);

const HYBRID_FILE: &str = "/sys/fs/cgroup/unified/cgroup.controllers";

/// Runs `sh -c SCRIPT sh ENGINE ARGS…` inside `unshare --mount`: binds /dev/null
/// over the hybrid controllers file, then executes the engine with the same pid.
const HIDE_HYBRID: &str = r#"if [ -e /sys/fs/cgroup/unified/cgroup.controllers ]; then mount --bind /dev/null /sys/fs/cgroup/unified/cgroup.controllers || exit 125; fi; exec "$@""#;

/// The container engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
enum Engine {
    Crun,
    Podman,
}

impl TryFrom<String> for Engine {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "crun" => Ok(Self::Crun),
            "podman" => Ok(Self::Podman),
            _ => Err(format!(
                "engine {text:?} is not one of \"crun\", \"podman\""
            )),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/portwake/oci")
}

/// The unit's `options` for this plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OciOptions {
    engine: Engine,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    rootfs: Option<PathBuf>,
    #[serde(default)]
    bundle: Option<PathBuf>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    engine_args: Vec<String>,
    #[serde(default)]
    run_args: Vec<String>,
    #[serde(default)]
    program: Option<String>,
    #[serde(default)]
    hide_hybrid_cgroup: bool,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
}

impl OciOptions {
    fn validate(&self) -> Result<(), String> {
        let sources = [
            self.rootfs.is_some(),
            self.bundle.is_some(),
            self.image.is_some(),
        ];
        if sources.iter().filter(|&&s| s).count() != 1 {
            return Err("options: set exactly one of `rootfs`, `bundle`, `image`".into());
        }
        match self.engine {
            Engine::Crun if self.image.is_some() => {
                return Err("options: crun runs a `rootfs` or a `bundle`, not an `image`".into())
            }
            Engine::Podman if self.bundle.is_some() => {
                return Err("options: podman runs a `rootfs` or an `image`, not a `bundle`".into())
            }
            Engine::Crun if self.rootfs.is_some() && self.command.is_empty() => {
                return Err("options: crun with `rootfs` needs `command`".into())
            }
            _ => {}
        }
        for (what, path) in [("rootfs", &self.rootfs), ("bundle", &self.bundle)] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err(format!(
                        "options: {what} {} must be an absolute path",
                        p.display()
                    ));
                }
            }
        }
        if let Some(bundle) = &self.bundle {
            let config = bundle.join("config.json");
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("options: bundle: {}: {e}", config.display()))?;
            serde_json::from_str::<Value>(&text)
                .map_err(|e| format!("options: bundle: {}: {e}", config.display()))?;
        }
        if let Some(n) = &self.name {
            if n.is_empty() || sanitize(n) != *n {
                return Err(format!(
                    "options: name {n:?} must be a non-empty name of letters, digits, '-', '_' and '.'"
                ));
            }
        }
        if self.hide_hybrid_cgroup && !Path::new("/usr/bin/unshare").exists() {
            return Err("options: hide_hybrid_cgroup needs /usr/bin/unshare (util-linux)".into());
        }
        Ok(())
    }

    fn program(&self) -> String {
        self.program.clone().unwrap_or_else(|| {
            match self.engine {
                Engine::Crun => "crun",
                Engine::Podman => "podman",
            }
            .into()
        })
    }

    /// An engine command line (global args included), wrapped when the hybrid
    /// cgroup file must be hidden.
    fn engine_argv(&self, args: &[String]) -> Vec<String> {
        let mut argv = Vec::new();
        if self.hide_hybrid_cgroup && Path::new(HYBRID_FILE).exists() {
            argv.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "/bin/sh",
                    "-c",
                    HIDE_HYBRID,
                    "sh",
                ]
                .map(String::from),
            );
        }
        argv.push(self.program());
        argv.extend(self.engine_args.iter().cloned());
        argv.extend(args.iter().cloned());
        argv
    }
}

/// What the plugin keeps about one running container.
#[derive(Debug)]
struct Container {
    /// `crun run` / `podman run`, in the foreground.
    process: GuestProcess,
    /// The generated bundle directory (crun), removed after the container.
    bundle: Option<PathBuf>,
    /// The container's name.
    name: String,
}

/// One instance per unit.
#[derive(Debug)]
struct OciPlugin {
    options: Arc<OciOptions>,
    name: String,
    host: Host,
    guests: GuestTable<Container>,
}

impl Plugin for OciPlugin {
    fn create(options: &str, host: Host) -> Result<Self, String> {
        let options: OciOptions = portwake_plugin_api::options::parse_options(options)?;
        options.validate()?;
        Ok(Self {
            name: options.name.clone().unwrap_or_default(),
            options: Arc::new(options),
            host,
            guests: GuestTable::default(),
        })
    }

    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
        let name = if self.name.is_empty() {
            format!("portwake-{}", sanitize(activation.unit))
        } else {
            self.name.clone()
        };
        // A leftover of a previous run (daemon killed) would block the name.
        remove_container(&self.options, &name);
        let (argv, bundle) = match self.options.engine {
            Engine::Crun => {
                let (args, bundle) = self.crun_run(activation, &name)?;
                (self.options.engine_argv(&args), Some(bundle))
            }
            Engine::Podman => (
                self.options
                    .engine_argv(&self.podman_run(activation, &name)),
                None,
            ),
        };
        let mut command = GuestCommand::new(&argv);
        for (k, v) in &activation.env {
            command.env(k, v);
        }
        let process = match command.spawn(&activation.fds) {
            Ok(p) => p,
            Err(e) => {
                if let Some(b) = &bundle {
                    let _ = std::fs::remove_dir_all(b);
                }
                return Err(e.to_string());
            }
        };
        self.host.log(
            LogLevel::Info,
            &format!(
                "started container {name} as pid {}: {}",
                process.pid,
                argv.join(" ")
            ),
        );
        self.watch(
            activation.guest,
            Container {
                process,
                bundle,
                name,
            },
        )
    }

    /// Takes over a container started by this daemon before a live restart (the
    /// same process, so the engine's foreground process is still its child): the
    /// handle names that process (pid, start time) and the container.
    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        let name = handle_field(handle, "name")
            .filter(|n| !n.is_empty() && sanitize(n) == *n)
            .ok_or_else(|| AdoptError::Failed(format!("handle {handle:?} names no container")))?
            .to_owned();
        let bundle =
            (self.options.engine == Engine::Crun).then(|| self.options.state_dir.join(&name));
        let Some(process) = GuestProcess::from_handle(handle).map_err(AdoptError::Failed)? else {
            // Ended during the restart: reap it and remove what it left.
            reap_handle_zombie(handle);
            remove_container(&self.options, &name);
            if let Some(b) = &bundle {
                let _ = std::fs::remove_dir_all(b);
            }
            return Err(AdoptError::Gone);
        };
        self.host.log(
            LogLevel::Info,
            &format!("adopted container {name} (pid {})", process.pid),
        );
        self.watch(
            guest,
            Container {
                process,
                bundle,
                name,
            },
        )
        .map_err(AdoptError::Failed)
    }

    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String> {
        let Some(slot) = self.guests.get(guest) else {
            return Ok(());
        };
        let name = slot.data.name.clone();
        let o = &self.options;
        match o.engine {
            Engine::Crun => {
                let _ = run(
                    &o.engine_argv(&["kill".into(), name.clone(), "TERM".into()]),
                    ENGINE_TIMEOUT,
                );
                if slot.wait_exited(timeout) {
                    return Ok(());
                }
                let _ = run(
                    &o.engine_argv(&["kill".into(), name.clone(), "KILL".into()]),
                    ENGINE_TIMEOUT,
                );
            }
            Engine::Podman => {
                let secs = timeout.as_secs().max(1).to_string();
                if let Err(e) = run(
                    &o.engine_argv(&["stop".into(), "-t".into(), secs, name.clone()]),
                    timeout + ENGINE_TIMEOUT,
                ) {
                    self.host.log(LogLevel::Warn, &e);
                }
            }
        }
        if slot.wait_exited(ENGINE_TIMEOUT) {
            return Ok(());
        }
        // The engine's foreground process itself, as the last resort.
        let _ = slot.data.process.signal(Signal::SIGKILL as i32);
        if slot.wait_exited(Duration::from_secs(5)) {
            Ok(())
        } else {
            Err(format!("container {name} did not stop"))
        }
    }
}

impl OciPlugin {
    /// Records a running container and starts its waiter, which removes the
    /// container (and its generated bundle) and reports its end; returns the
    /// engine process's pid and the adopt handle.
    fn watch(&self, id: GuestId, container: Container) -> Result<GuestInfo, String> {
        let process = container.process;
        let handle = process
            .handle()
            .map(|h| format!("{h} name={}", container.name));
        let slot = Arc::new(GuestSlot::new(container));
        self.guests.insert(id, Arc::clone(&slot));
        let (host, guests, options) = (self.host, self.guests.clone(), Arc::clone(&self.options));
        std::thread::Builder::new()
            .name(format!("oci-wait-{}", process.pid))
            .spawn(move || {
                let exit = slot.data.process.wait();
                remove_container(&options, &slot.data.name);
                if let Some(b) = &slot.data.bundle {
                    let _ = std::fs::remove_dir_all(b);
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
            handle,
        })
    }

    /// `crun run` arguments and the generated bundle directory (a config.json
    /// carrying `LISTEN_*`, pointing at the rootfs or the user's bundle's root).
    fn crun_run(
        &self,
        activation: &Activation<'_>,
        name: &str,
    ) -> Result<(Vec<String>, PathBuf), String> {
        let o = &self.options;
        let mut spec: Value = match &o.bundle {
            Some(bundle) => {
                let path = bundle.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => default_spec(),
        };
        if let Some(bundle) = &o.bundle {
            let root = spec["root"]["path"].as_str().unwrap_or("rootfs").to_owned();
            spec["root"]["path"] = json!(bundle.join(root).display().to_string());
        }
        if let Some(rootfs) = &o.rootfs {
            spec["root"] = json!({"path": rootfs.display().to_string(), "readonly": true});
        }
        if !o.command.is_empty() {
            spec["process"]["args"] = json!(o.command);
        }
        spec["process"]["terminal"] = json!(false);
        let names: Vec<&str> = activation.fds.iter().map(|f| f.name).collect();
        let mut env: Vec<String> = spec["process"]["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter(|v| !v.starts_with("LISTEN_"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        env.push(format!("LISTEN_FDS={}", activation.fds.len()));
        env.push("LISTEN_PID=1".into());
        env.push(format!("LISTEN_FDNAMES={}", names.join(":")));
        env.extend(o.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.extend(activation.env.iter().map(|(k, v)| format!("{k}={v}")));
        spec["process"]["env"] = json!(env);

        let dir = o.state_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&spec).map_err(|e| e.to_string())?;
        std::fs::write(&config, text).map_err(|e| format!("writing {}: {e}", config.display()))?;
        let mut args = vec!["run".to_owned()];
        args.push(format!("--preserve-fds={}", activation.fds.len()));
        args.push(format!("--bundle={}", dir.display()));
        args.extend(o.run_args.iter().cloned());
        args.push(name.to_owned());
        Ok((args, dir))
    }

    /// `podman run` arguments. podman takes the fds from `LISTEN_FDS` (with
    /// `LISTEN_PID` its own pid, as the spawn sets it) and sets `LISTEN_FDS` and
    /// `LISTEN_PID=1` inside itself; the names are added with `--env`.
    fn podman_run(&self, activation: &Activation<'_>, name: &str) -> Vec<String> {
        let o = &self.options;
        let names: Vec<&str> = activation.fds.iter().map(|f| f.name).collect();
        let mut args = vec![
            "run".to_owned(),
            "--rm".into(),
            "--name".into(),
            name.to_owned(),
            "--env".into(),
            format!("LISTEN_FDNAMES={}", names.join(":")),
        ];
        for (k, v) in &o.env {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(o.run_args.iter().cloned());
        if let Some(rootfs) = &o.rootfs {
            args.push("--rootfs".into());
            args.push(rootfs.display().to_string());
        } else if let Some(image) = &o.image {
            args.push(image.clone());
        }
        args.extend(o.command.iter().cloned());
        args
    }
}

/// Removes the container `name` if the engine still knows it.
fn remove_container(o: &OciOptions, name: &str) {
    let args: Vec<String> = match o.engine {
        Engine::Crun => vec!["delete".into(), "-f".into(), name.into()],
        Engine::Podman => vec!["rm".into(), "-f".into(), "--ignore".into(), name.into()],
    };
    let _ = run(&o.engine_argv(&args), ENGINE_TIMEOUT);
}

/// The spec `crun spec` writes, reduced to what a socket-activated guest needs:
/// its own pid, mount, ipc, uts and network namespaces (the passed sockets still
/// serve host clients from the private netns).
fn default_spec() -> Value {
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "portwake",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    })
}

impl Drop for OciPlugin {
    fn drop(&mut self) {
        for (_, slot) in self.guests.all() {
            if !slot.has_exited() {
                let _ = slot.data.process.signal(Signal::SIGKILL as i32);
            }
        }
    }
}

export_plugin!(OciPlugin, "oci");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OciOptions, String> {
        let o: OciOptions = portwake_plugin_api::options::parse_options(text)?;
        o.validate()?;
        Ok(o)
    }

    #[test]
    fn options_are_validated() {
        assert!(parse(r#"(engine: "crun", rootfs: "/r", command: ["/g"])"#).is_ok());
        assert!(parse(r#"(engine: "podman", rootfs: "/r")"#).is_ok());
        assert!(parse(r#"(engine: "podman", image: "docker.io/x")"#).is_ok());
        assert!(parse(r#"(engine: "docker", rootfs: "/r")"#)
            .unwrap_err()
            .contains("crun"));
        assert!(parse(r#"(engine: "crun", rootfs: "/r")"#)
            .unwrap_err()
            .contains("command"));
        assert!(parse(r#"(engine: "crun", image: "x")"#).is_err());
        assert!(parse(r#"(engine: "crun")"#)
            .unwrap_err()
            .contains("exactly one"));
        assert!(parse(r#"(engine: "crun", rootfs: "r", command: ["/g"])"#)
            .unwrap_err()
            .contains("absolute"));
        assert!(parse(r#"(engine: "crun", bundle: "/nonexistent")"#)
            .unwrap_err()
            .contains("config.json"));
        assert!(parse(r#"(engine: "podman", rootfs: "/r", preserve: 1)"#)
            .unwrap_err()
            .contains("preserve"));
    }
}
