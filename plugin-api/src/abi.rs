//! The C ABI, version 1: the only types that cross between the daemon and a plugin.
//!
//! Rules that keep this boundary stable:
//! - every struct is `#[repr(C)]` and starts with (or carries) a `size` field, so a
//!   later minor version can append fields and both sides can tell what the other knows;
//! - strings are borrowed `PwStr` (pointer + length, UTF-8, not NUL-terminated) that
//!   live only for the duration of the call that passes them;
//! - fds are borrowed: the host keeps ownership of every listener it passes, a plugin
//!   that needs an fd beyond the call must `dup` it;
//! - errors are written into a `PwErrorBuf` the host owns; the plugin never allocates
//!   memory the host frees, or the other way around;
//! - status codes are plain `i32`, never a Rust enum, so a garbage value is a value
//!   the host can reject rather than undefined behaviour.

use std::ffi::{c_char, c_int, c_void};

/// ABI major version: the host refuses plugins of any other major.
pub const ABI_MAJOR: u32 = 1;
/// ABI minor version: the host refuses plugins newer than itself.
pub const ABI_MINOR: u32 = 1;
/// The one symbol a plugin exports: `const PwPluginV1 *portwake_plugin_entry(void)`.
pub const ENTRY_SYMBOL: &str = "portwake_plugin_entry";

/// Status code returned by plugin calls: one of `PW_OK` and `PW_ERR_*`. The host
/// treats any other value as a failure of the call ("unknown status N").
pub type PwStatus = i32;
/// The call succeeded.
pub const PW_OK: PwStatus = 0;
/// `create` rejected the options text; the error buffer says why.
pub const PW_ERR_OPTIONS: PwStatus = 1;
/// The call failed; the error buffer says why.
pub const PW_ERR_FAILED: PwStatus = 2;
/// The plugin panicked; the error buffer holds the panic message.
pub const PW_ERR_PANIC: PwStatus = 3;
/// `adopt`: the guest named by the handle no longer exists.
pub const PW_ERR_GONE: PwStatus = 5;
/// A pointer argument was null or a struct too small.
pub const PW_ERR_INVALID: PwStatus = 4;

/// Log levels for `PwHostV1::log`, as in `tracing`.
pub const PW_LOG_ERROR: u32 = 1;
/// Warning level.
pub const PW_LOG_WARN: u32 = 2;
/// Info level.
pub const PW_LOG_INFO: u32 = 3;
/// Debug level.
pub const PW_LOG_DEBUG: u32 = 4;
/// Trace level.
pub const PW_LOG_TRACE: u32 = 5;

/// Socket type of a passed listener, as systemd names them.
pub const PW_KIND_STREAM: u32 = 1;
/// `SOCK_DGRAM`.
pub const PW_KIND_DATAGRAM: u32 = 2;
/// `SOCK_SEQPACKET`.
pub const PW_KIND_SEQPACKET: u32 = 3;

/// How a guest ended: unknown (engine could not tell).
pub const PW_EXIT_UNKNOWN: u32 = 0;
/// The guest exited with `code`.
pub const PW_EXIT_EXITED: u32 = 1;
/// The guest was killed by signal `code`.
pub const PW_EXIT_SIGNALED: u32 = 2;

/// A borrowed UTF-8 string: pointer and length, **not** NUL-terminated.
///
/// Ownership: always borrowed. The side that passes a `PwStr` owns the bytes and keeps
/// them valid only until the call that passes them returns; copy them to keep them.
/// `ptr` may be null only when `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwStr {
    /// First byte; readable for `len` bytes until the call returns. Never freed by the receiver.
    pub ptr: *const c_char,
    /// Length in bytes, without any terminator.
    pub len: usize,
}

/// A host-owned buffer a plugin writes an error message into (truncated to `cap`).
///
/// Ownership: the host allocates and frees it; it is valid only during the call it is
/// passed to. On failure the plugin copies at most `cap` bytes of UTF-8 text (no NUL
/// needed) to `ptr` and sets `len`; it must never keep the pointer or write after
/// returning. The pointer to the buffer itself may be null: then there is nowhere to
/// write and the plugin just returns its status.
#[repr(C)]
#[derive(Debug)]
pub struct PwErrorBuf {
    /// Start of the host's buffer; writable for `cap` bytes.
    pub ptr: *mut u8,
    /// Capacity in bytes.
    pub cap: usize,
    /// Bytes written by the plugin (≤ `cap`); the host reads this back.
    pub len: usize,
}

/// How a guest ended, reported through `PwHostV1::guest_stopped`.
///
/// Ownership: owned by the plugin, borrowed by the host for the duration of the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwGuestExit {
    /// `size_of::<PwGuestExit>()` as the reporter knows it.
    pub size: usize,
    /// One of `PW_EXIT_*`.
    pub kind: u32,
    /// Exit code or signal number.
    pub code: i32,
}

/// Callbacks the host gives a plugin at `create`.
///
/// Ownership: owned by the host. The table and its `ctx` stay valid until the host
/// process exits, so a plugin may keep the pointer (or a copy of the table) and use it
/// from threads of its own. Both callbacks are thread-safe, never block for long, may
/// be called from any thread (including from inside `activate` and `stop`), and do
/// nothing once the instance was destroyed. Check `size` before reading fields that a
/// later minor version appends.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwHostV1 {
    /// `size_of::<PwHostV1>()` as the host knows it.
    pub size: usize,
    /// Opaque host context, passed back as the first argument of every callback.
    pub ctx: *mut c_void,
    /// Log a message (one of `PW_LOG_*`) into the host's log, tagged with the unit.
    /// `message` is borrowed for the call; the host copies it. Invalid UTF-8 is replaced.
    pub log: Option<unsafe extern "C" fn(ctx: *mut c_void, level: u32, message: PwStr)>,
    /// Report that the guest started by `activate` with this `guest` id has stopped.
    /// Call it exactly once per successfully activated guest, from any thread, also
    /// before `activate` returned (the host then handles it once `activate` returns).
    /// `exit` is borrowed for the call and may be null (exit unknown). A report for an
    /// unknown, stale or already-stopped guest is logged and ignored by the host.
    pub guest_stopped:
        Option<unsafe extern "C" fn(ctx: *mut c_void, guest: u64, exit: *const PwGuestExit)>,
}

/// One listening socket handed to `activate`, in the order the guest gets them (fd 3, 4, …).
///
/// Ownership: the host owns `fd` and the `name` bytes; both are valid only until
/// `activate` returns. The plugin must not close the fd; to keep it past the call (for
/// example in a child process) it `dup`s it or lets `fork` inherit it. The fd is
/// close-on-exec and in blocking mode; the plugin clears close-on-exec only on its own
/// copy (e.g. through `dup2` in the child), never on the host's fd.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwListenFd {
    /// Borrowed listening socket, owned by the host; `dup` it to keep it past the call.
    pub fd: c_int,
    /// One of `PW_KIND_*`.
    pub kind: u32,
    /// Name for `LISTEN_FDNAMES`; borrowed for the call.
    pub name: PwStr,
}

/// An extra environment variable for the guest; both strings borrowed for the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwEnvVar {
    /// Variable name.
    pub name: PwStr,
    /// Variable value.
    pub value: PwStr,
}

/// Everything `activate` needs.
///
/// Ownership: owned by the host, together with the `fds` and `env` arrays and every
/// string they point to; all of it is valid only until `activate` returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwActivation {
    /// `size_of::<PwActivation>()` as the host knows it.
    pub size: usize,
    /// The unit's name from the config.
    pub unit: PwStr,
    /// Host-chosen id of this guest, unique for the host process's life; passed back to
    /// `stop` and `guest_stopped`.
    pub guest: u64,
    /// The listeners, in guest order: `fds[0]` becomes the guest's fd 3. Borrowed.
    pub fds: *const PwListenFd,
    /// Number of entries in `fds`.
    pub fd_count: usize,
    /// Extra environment for the guest. Borrowed; may be null when `env_count` is 0.
    pub env: *const PwEnvVar,
    /// Number of entries in `env`.
    pub env_count: usize,
}

/// What `activate` tells the host about the guest it started.
///
/// Ownership: owned by the host, writable by the plugin during `activate` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwGuestInfo {
    /// Set by the host to `size_of::<PwGuestInfo>()` it knows; the plugin writes only fields within it.
    pub size: usize,
    /// Host pid of the guest's main process (or engine process), 0 if none.
    pub pid: i64,
    /// (ABI 1.1) Host-owned buffer for an opaque handle naming the guest, which the
    /// host keeps across a restart of the daemon and passes back to `adopt`. The
    /// plugin writes UTF-8 text into it and sets `handle_len`; null when the host
    /// wants none. Only for the call.
    pub handle: *mut u8,
    /// (ABI 1.1) Capacity of `handle` in bytes.
    pub handle_cap: usize,
    /// (ABI 1.1) Bytes the plugin wrote into `handle`.
    pub handle_len: usize,
}

/// Creates an instance from RON options text; writes the instance to `*instance`.
///
/// Validate the options here and return `PW_ERR_OPTIONS` with a message when they are
/// wrong (`portwake check` shows it). `host` stays valid for the life of the process;
/// `options` and `error` only for the call. The instance pointer is opaque to the host
/// and owned by the plugin until `destroy`. Called on any thread; may block briefly.
pub type PwCreateFn = Option<
    unsafe extern "C" fn(
        host: *const PwHostV1,
        options: PwStr,
        instance: *mut *mut c_void,
        error: *mut PwErrorBuf,
    ) -> PwStatus,
>;
/// Starts a guest with the given listeners; returns once it is started (or failed).
///
/// May block: the host calls it on a worker thread, never on its event loop, but gives
/// up on it after the unit's `activate_timeout`. Calls for different guests of one
/// instance may overlap. `activation`, `info` and `error` are valid for the call only.
/// Returns `PW_OK` (the guest is started and `guest_stopped` will be reported for it
/// exactly once) or `PW_ERR_*` with a message (no guest, no report).
pub type PwActivateFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        activation: *const PwActivation,
        info: *mut PwGuestInfo,
        error: *mut PwErrorBuf,
    ) -> PwStatus,
>;
/// Stops a guest: ask it to stop, wait up to `timeout_ms`, then force it.
///
/// May block (worker thread). An unknown or already stopped guest is not an error.
/// The guest's end is still reported through `guest_stopped` (once), before or after
/// `stop` returns. `error` is valid for the call only.
pub type PwStopFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        guest: u64,
        timeout_ms: u64,
        error: *mut PwErrorBuf,
    ) -> PwStatus,
>;
/// Frees an instance. Guests it started are not stopped by this. Called once, when no
/// other call on the instance is running; host callbacks do nothing from then on.
pub type PwDestroyFn = Option<unsafe extern "C" fn(instance: *mut c_void)>;

/// (ABI 1.1) Takes over a guest started by an earlier daemon process (before a live
/// restart or a supervisor restart), named by the `handle` its `activate` wrote.
///
/// Return `PW_OK` when the guest still runs (fill `info` as in `activate`, and report
/// its stop through `guest_stopped` with the new `guest` id), `PW_ERR_GONE` when it
/// no longer exists, another status on failure. `handle`, `info` and `error` are
/// valid for the call only. Called on a worker thread before the guest's listeners
/// are served again; may block briefly.
pub type PwAdoptFn = Option<
    unsafe extern "C" fn(
        instance: *mut c_void,
        guest: u64,
        handle: PwStr,
        info: *mut PwGuestInfo,
        error: *mut PwErrorBuf,
    ) -> PwStatus,
>;

/// The plugin's entry table, returned by `portwake_plugin_entry`.
///
/// Ownership: owned by the plugin, static and immutable for as long as the library is
/// loaded, as are the `name` and `version` strings it points to. All four functions are
/// required.
#[repr(C)]
#[derive(Debug)]
pub struct PwPluginV1 {
    /// `size_of::<PwPluginV1>()` as the plugin knows it.
    pub size: usize,
    /// Must equal the host's `ABI_MAJOR`.
    pub abi_major: u32,
    /// Must be ≤ the host's `ABI_MINOR`.
    pub abi_minor: u32,
    /// NUL-terminated plugin name.
    pub name: *const c_char,
    /// NUL-terminated plugin version.
    pub version: *const c_char,
    /// See [`PwCreateFn`].
    pub create: PwCreateFn,
    /// See [`PwActivateFn`].
    pub activate: PwActivateFn,
    /// See [`PwStopFn`].
    pub stop: PwStopFn,
    /// See [`PwDestroyFn`].
    pub destroy: PwDestroyFn,
    /// (ABI 1.1) See [`PwAdoptFn`]; may be null when the plugin cannot adopt guests.
    pub adopt: PwAdoptFn,
}

/// Signature of the exported entry symbol.
pub type PwEntryFn = unsafe extern "C" fn() -> *const PwPluginV1;

impl PwStr {
    /// Borrows a Rust string for the duration of a call.
    pub fn borrow(s: &str) -> Self {
        Self {
            ptr: s.as_ptr().cast(),
            len: s.len(),
        }
    }

    /// Reads the string back.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` bytes for `'a` (or `len` must be 0).
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr` is valid for `len` bytes for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }
}

impl PwErrorBuf {
    /// Writes `message` into the buffer, truncated at a char boundary to fit.
    ///
    /// # Safety
    /// `self.ptr` must be valid for writes of `self.cap` bytes.
    pub unsafe fn write(&mut self, message: &str) {
        let mut n = message.len().min(self.cap);
        while !message.is_char_boundary(n) {
            n -= 1;
        }
        if self.ptr.is_null() {
            return;
        }
        // SAFETY: `ptr` is writable for `cap` bytes (caller), `n <= cap`, and the
        // source is a distinct Rust string, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), self.ptr, n) };
        self.len = n;
    }
}

/// A `PwPluginV1` that may live in a `static`: its pointers are to static data.
#[repr(transparent)]
#[derive(Debug)]
pub struct PwPluginStatic(pub PwPluginV1);

// SAFETY: the table is immutable and its pointers refer to static, immutable data
// (NUL-terminated literals and functions), so sharing it between threads is sound.
unsafe impl Sync for PwPluginStatic {}
