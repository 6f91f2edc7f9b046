//! Helpers shared by portwake's container plugins (`nspawn`, `oci`, `libvirt_lxc`).
//!
//! - [`GuestTable`] / [`GuestSlot`]: the per-unit table of running guests and the
//!   record of each one's end, as the `exec` plugin keeps them.
//! - [`CgroupScope`]: a cgroup of a guest's own in the named `systemd` and the
//!   unified hierarchies, so that whatever an engine leaves behind there
//!   (nspawn's `payload/` and `supervisor/`) can be killed and removed.
//! - [`run`]: a short engine command (`virsh`, `crun delete`, …) with a timeout.

mod cgroup;
mod command;
mod table;

pub use cgroup::CgroupScope;
pub use command::{run, CommandOutput};
pub use table::{GuestSlot, GuestTable};

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
