//! A private libvirtd for the tests, as `notes/engines.md` describes: only the LXC
//! driver (`LIBVIRT_DRIVER_DIR` holding a link to it, so the QEMU driver's missing
//! user does not abort start-up), in a private mount namespace without
//! `/sys/fs/cgroup/unified` (libvirt cannot create its cgroup there on a hybrid
//! host) and with overlays on /etc, /var and /run (its state vanishes with it),
//! listening on a socket of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::wait_for;

/// Where Debian keeps the LXC connection driver.
pub const LXC_DRIVER: &str =
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_lxc.so";
/// libvirt's LXC controller, one per running domain.
pub const LXC_CONTROLLER: &str = "/usr/lib/libvirt/libvirt_lxc";

const START_SCRIPT: &str = r#"set -e
T=$1
umount -l /sys/fs/cgroup/unified 2>/dev/null || true
for d in etc var run; do
    mkdir -p "$T/overlay/$d/upper" "$T/overlay/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/overlay/$d/upper,workdir=$T/overlay/$d/work" "/$d"
done
export LIBVIRT_DRIVER_DIR="$T/drivers"
exec libvirtd -f "$T/libvirtd.conf"
"#;

/// A running private libvirtd; stopped, with its domains and what they left
/// (controllers, cgroups), when dropped.
#[derive(Debug)]
pub struct Libvirtd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The URI that reaches it: `lxc:///system?socket=…`.
    pub uri: String,
    cgroups_before: Vec<PathBuf>,
}

impl Libvirtd {
    /// Starts it and waits until it answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("portwake-libvirtd-")
            .tempdir()
            .expect("tempdir");
        let t = dir.path();
        std::fs::create_dir_all(t.join("drivers")).expect("mkdir");
        std::fs::create_dir_all(t.join("sock")).expect("mkdir");
        std::os::unix::fs::symlink(LXC_DRIVER, t.join("drivers/libvirt_driver_lxc.so"))
            .expect("symlink driver");
        std::fs::write(
            t.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:stderr\"\n",
                t.join("sock").display()
            ),
        )
        .expect("libvirtd.conf");
        std::fs::write(t.join("start.sh"), START_SCRIPT).expect("start.sh");
        let log = std::fs::File::create(t.join("libvirtd.log")).expect("log");
        let cgroups_before = machine_cgroups();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(t.join("start.sh"))
            .arg(t)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn unshare libvirtd");
        let uri = format!(
            "lxc:///system?socket={}",
            t.join("sock/libvirt-sock").display()
        );
        let me = Self {
            dir,
            child: Some(child),
            uri,
            cgroups_before,
        };
        let up = wait_for(Duration::from_secs(30), || {
            Command::new("virsh")
                .args(["-c", &me.uri, "list"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        });
        assert!(
            up.is_some(),
            "private libvirtd did not come up:\n{}",
            me.log()
        );
        me
    }

    /// libvirtd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("libvirtd.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `virsh -c URI ARGS…`; `(success, stdout + stderr)`.
    pub fn virsh(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("virsh")
            .args(["-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The domain's state as `virsh domstate` prints it.
    pub fn domstate(&self, domain: &str) -> String {
        self.virsh(&["domstate", domain]).1.trim().to_owned()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let (_, names) = self.virsh(&["list", "--all", "--name"]);
        let names: Vec<String> = names
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        for name in &names {
            let _ = self.virsh(&["destroy", name]);
            let _ = self.virsh(&["undefine", name]);
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Controllers of our domains that outlived libvirtd.
        for pid in controllers_of(&names) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // The `machine` cgroups libvirt created.
        for dir in machine_cgroups() {
            if !self.cgroups_before.contains(&dir) {
                crate::remove_cgroup_tree(&dir);
            }
        }
        if std::thread::panicking() {
            eprintln!("---- libvirtd log ----\n{}", self.log());
        }
    }
}

/// `/sys/fs/cgroup/*/machine` directories.
fn machine_cgroups() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("machine"))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of `libvirt_lxc --name NAME` processes for these domains.
fn controllers_of(names: &[String]) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            args.first()
                .is_some_and(|a| *a == LXC_CONTROLLER.as_bytes())
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--name" && names.iter().any(|n| w[1] == n.as_bytes()))
        })
        .collect()
}
