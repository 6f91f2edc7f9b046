//! Helpers shared by portwake's container plugins (`nspawn`, `oci`, `libvirt_lxc`).
//!
//! - [`GuestTable`] / [`GuestSlot`]: the per-unit table of running guests and the
//!   record of each one's end (from the SDK, `portwake_plugin_api::table`, where
//!   `ProcessGuests` keeps its guests in them too).
//! - [`CgroupScope`]: a cgroup of a guest's own in the named `systemd` and the
//!   unified hierarchies, so that whatever an engine leaves behind there
//!   (nspawn's `payload/` and `supervisor/`) can be killed and removed.
//! - [`run`]: a short engine command (`virsh`, `crun delete`, …) with a timeout.

mod cgroup;
mod command;

pub use cgroup::CgroupScope;
pub use command::{run, CommandOutput};
pub use portwake_plugin_api::{GuestSlot, GuestTable};

/// Makes `text` safe as one path component or object name: letters, digits,
/// `-`, `_` and `.` are kept, anything else becomes `_`.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The value of `key=` in a whitespace-separated `key=value` handle.
pub fn handle_field<'a>(handle: &'a str, key: &str) -> Option<&'a str> {
    handle
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// After a live restart, a guest process that ended while no image of the daemon
/// watched it is a zombie child of the daemon: reaps it when `/proc` shows the
/// handle's pid as a zombie with the handle's start time (so it is that process,
/// not a recycled pid). Returns whether it reaped one.
pub fn reap_handle_zombie(handle: &str) -> bool {
    let (Some(pid), Some(start)) = (
        handle_field(handle, "pid").and_then(|p| p.parse::<i32>().ok()),
        handle_field(handle, "start"),
    ) else {
        return false;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    if fields.first() != Some(&"Z") || fields.get(19) != Some(&start) {
        return false;
    }
    nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    )
    .is_ok()
}
