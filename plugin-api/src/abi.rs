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
pub const ABI_MINOR: u32 = 0;
/// The one symbol a plugin exports: `const PwPluginV1 *portwake_plugin_entry(void)`.
pub const ENTRY_SYMBOL: &str = "portwake_plugin_entry";

/// Status code returned by plugin calls.
pub type PwStatus = i32;
/// The call succeeded.
pub const PW_OK: PwStatus = 0;
/// `create` rejected the options text; the error buffer says why.
pub const PW_ERR_OPTIONS: PwStatus = 1;
/// The call failed; the error buffer says why.
pub const PW_ERR_FAILED: PwStatus = 2;
/// The plugin panicked; the error buffer holds the panic message.
pub const PW_ERR_PANIC: PwStatus = 3;
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

/// A borrowed UTF-8 string: `ptr` may be null only when `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwStr {
    /// First byte; valid for `len` bytes during the call.
    pub ptr: *const c_char,
    /// Length in bytes, without any terminator.
    pub len: usize,
}

/// A host-owned buffer a plugin writes an error message into (truncated to `cap`).
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

/// Callbacks the host gives a plugin at `create`; valid until process exit.
///
/// Both callbacks are thread-safe and may be called from any thread, also after
/// `destroy` returned (they then do nothing).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwHostV1 {
    /// `size_of::<PwHostV1>()` as the host knows it.
    pub size: usize,
    /// Opaque host context, passed back as the first argument of every callback.
    pub ctx: *mut c_void,
    /// Log a message (one of `PW_LOG_*`) into the host's log, tagged with the unit.
    pub log: Option<unsafe extern "C" fn(ctx: *mut c_void, level: u32, message: PwStr)>,
    /// Report that the guest started by `activate` with this `guest` id has stopped.
    /// Call it exactly once per successfully activated guest.
    pub guest_stopped:
        Option<unsafe extern "C" fn(ctx: *mut c_void, guest: u64, exit: *const PwGuestExit)>,
}

/// One listening socket handed to `activate`, in the order the guest gets them (fd 3, 4, …).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwListenFd {
    /// Borrowed fd, owned by the host; `dup` it to keep it past the call.
    pub fd: c_int,
    /// One of `PW_KIND_*`.
    pub kind: u32,
    /// Name for `LISTEN_FDNAMES`.
    pub name: PwStr,
}

/// An extra environment variable for the guest.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwEnvVar {
    /// Variable name.
    pub name: PwStr,
    /// Variable value.
    pub value: PwStr,
}

/// Everything `activate` needs; valid only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwActivation {
    /// `size_of::<PwActivation>()` as the host knows it.
    pub size: usize,
    /// The unit's name from the config.
    pub unit: PwStr,
    /// Host-chosen id of this guest, for `stop` and `guest_stopped`.
    pub guest: u64,
    /// The listeners, in guest order.
    pub fds: *const PwListenFd,
    /// Number of entries in `fds`.
    pub fd_count: usize,
    /// Extra environment for the guest.
    pub env: *const PwEnvVar,
    /// Number of entries in `env`.
    pub env_count: usize,
}

/// What `activate` tells the host about the guest it started.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PwGuestInfo {
    /// Set by the host to `size_of::<PwGuestInfo>()` it knows; the plugin writes only fields within it.
    pub size: usize,
    /// Host pid of the guest's main process (or engine process), 0 if none.
    pub pid: i64,
}

/// Creates an instance from RON options text; writes the instance to `*instance`.
pub type PwCreateFn = unsafe extern "C" fn(
    host: *const PwHostV1,
    options: PwStr,
    instance: *mut *mut c_void,
    error: *mut PwErrorBuf,
) -> PwStatus;
/// Starts a guest with the given listeners. May block (the host calls it off its event loop).
pub type PwActivateFn = unsafe extern "C" fn(
    instance: *mut c_void,
    activation: *const PwActivation,
    info: *mut PwGuestInfo,
    error: *mut PwErrorBuf,
) -> PwStatus;
/// Stops a guest: ask it to stop, wait up to `timeout_ms`, then force it. May block.
pub type PwStopFn = unsafe extern "C" fn(
    instance: *mut c_void,
    guest: u64,
    timeout_ms: u64,
    error: *mut PwErrorBuf,
) -> PwStatus;
/// Frees an instance. Guests it started are not stopped by this.
pub type PwDestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// The plugin's entry table, returned by `portwake_plugin_entry`; static for the library's life.
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
    pub create: Option<PwCreateFn>,
    /// See [`PwActivateFn`].
    pub activate: Option<PwActivateFn>,
    /// See [`PwStopFn`].
    pub stop: Option<PwStopFn>,
    /// See [`PwDestroyFn`].
    pub destroy: Option<PwDestroyFn>,
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
