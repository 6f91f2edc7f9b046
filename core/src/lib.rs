//! portwake: socket activation of whole containers.
//!
//! Dependencies run one way: [`config`] (with [`address`]) → [`guest_match`]
//! (listeners against the guest's systemd units) → [`listener`] →
//! [`daemon`] (event loop and unit lifecycle, with [`start_guard`]) →
//! [`plugin_host`] (the only code that calls into plugins). [`check`] reuses
//! config and plugin host without binding anything.

pub mod address;
pub mod check;
pub mod config;
pub mod control;
pub mod daemon;
pub mod guest_match;
pub mod listener;
pub mod metrics;
pub mod plugin_host;
pub mod restart;
pub mod sock_diag;
pub mod start_guard;
pub mod status_view;
pub mod supervisor;
mod sys;
pub mod unit;
