//! portwake's plugin ABI (version 1) and the safe Rust SDK for writing plugins.
//!
//! - [`abi`]: the `#[repr(C)]` types and constants that cross the boundary; the C
//!   header under `include/` is generated from them.
//! - [`sdk`]: the [`Plugin`](sdk::Plugin) trait and the [`export_plugin!`] macro.
//! - [`guests`]: spawn, reap, report and stop guest processes for a plugin.
//! - [`table`]: the running guests of a plugin instance and the record of each end.
//! - [`spawn`]: start a guest process with exactly its listeners at fd 3, 4, … and
//!   the `LISTEN_*` environment, as systemd does.

pub mod abi;
pub mod guests;
#[cfg(feature = "ron")]
pub mod options;
mod reaper;
pub mod sdk;
pub mod spawn;
mod sys;
pub mod table;

pub use guests::ProcessGuests;
pub use sdk::{
    Activation, AdoptError, GuestExit, GuestId, GuestInfo, Host, ListenFd, LogLevel, Plugin,
    SocketKind,
};
pub use spawn::{GuestCommand, GuestProcess, SpawnError};
pub use table::{GuestSlot, GuestTable};
