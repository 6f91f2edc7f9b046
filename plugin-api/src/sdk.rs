//! The safe Rust side of the ABI: implement [`Plugin`] and call [`export_plugin!`].
//!
//! Every exported function runs the plugin's code inside `catch_unwind`, turning a
//! panic into `PW_ERR_PANIC` with the panic message, so a broken plugin fails its
//! unit and never unwinds into the host.

use std::ffi::c_void;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use crate::abi::{
    PwActivation, PwErrorBuf, PwGuestExit, PwGuestInfo, PwHostV1, PwStatus, PwStr, PW_ERR_FAILED,
    PW_ERR_GONE, PW_ERR_INVALID, PW_ERR_OPTIONS, PW_ERR_PANIC, PW_EXIT_EXITED, PW_EXIT_SIGNALED,
    PW_EXIT_UNKNOWN, PW_KIND_DATAGRAM, PW_KIND_SEQPACKET, PW_KIND_STREAM, PW_LOG_DEBUG,
    PW_LOG_ERROR, PW_LOG_INFO, PW_LOG_TRACE, PW_LOG_WARN, PW_OK,
};

/// A host-chosen id naming one started guest.
pub type GuestId = u64;

/// An activation plugin. One instance serves one unit; calls may come from any thread.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Validates the unit's RON `options` text and builds the instance.
    fn create(options: &str, host: Host) -> Result<Self, String>;
    /// Starts the guest with `activation.fds` at 3, 4, …; returns once it is started.
    fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String>;
    /// Stops the guest: politely, then by force after `timeout`. Returns when it is gone.
    fn stop(&self, guest: GuestId, timeout: Duration) -> Result<(), String>;
    /// (ABI 1.1) Takes over a guest an earlier daemon process started, named by the
    /// `handle` that `activate` returned; from now on it is `guest`. The default
    /// cannot: the daemon then stops such guests before it restarts itself.
    fn adopt(&self, guest: GuestId, handle: &str) -> Result<GuestInfo, AdoptError> {
        let _ = (guest, handle);
        Err(AdoptError::Unsupported)
    }
}

/// Why `adopt` did not take a guest over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdoptError {
    /// The guest no longer exists; the daemon listens for the next client.
    Gone,
    /// This plugin cannot adopt guests.
    Unsupported,
    /// Anything else.
    Failed(String),
}

/// What `activate` reports about the started guest.
#[derive(Debug, Clone, Default)]
pub struct GuestInfo {
    /// Host pid of the guest (or its engine process), if there is one.
    pub pid: Option<i64>,
    /// (ABI 1.1) An opaque handle that lets a later daemon process `adopt` the guest.
    pub handle: Option<String>,
}

/// Socket type of a listener, as systemd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// `ListenStream=`: `SOCK_STREAM`.
    Stream,
    /// `ListenDatagram=`: `SOCK_DGRAM`.
    Datagram,
    /// `ListenSequentialPacket=`: `SOCK_SEQPACKET`.
    SequentialPacket,
}

impl SocketKind {
    /// The ABI code of this kind.
    pub fn code(self) -> u32 {
        match self {
            Self::Stream => PW_KIND_STREAM,
            Self::Datagram => PW_KIND_DATAGRAM,
            Self::SequentialPacket => PW_KIND_SEQPACKET,
        }
    }

    /// The kind for an ABI code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            PW_KIND_STREAM => Some(Self::Stream),
            PW_KIND_DATAGRAM => Some(Self::Datagram),
            PW_KIND_SEQPACKET => Some(Self::SequentialPacket),
            _ => None,
        }
    }
}

/// One listener of an activation, borrowed from the host for the call.
#[derive(Debug, Clone, Copy)]
pub struct ListenFd<'a> {
    /// The listening socket.
    pub fd: BorrowedFd<'a>,
    /// Its socket type.
    pub kind: SocketKind,
    /// Its `LISTEN_FDNAMES` entry.
    pub name: &'a str,
}

/// An activation request, borrowed from the host for the call.
#[derive(Debug)]
pub struct Activation<'a> {
    /// The unit's name.
    pub unit: &'a str,
    /// Id to pass to [`Host::guest_stopped`] when this guest ends.
    pub guest: GuestId,
    /// Listeners in guest order (fd 3 first).
    pub fds: Vec<ListenFd<'a>>,
    /// Extra environment for the guest.
    pub env: Vec<(&'a str, &'a str)>,
}

/// How a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
    /// The engine could not tell.
    Unknown,
}

impl GuestExit {
    /// The ABI form.
    pub fn to_abi(self) -> PwGuestExit {
        let (kind, code) = match self {
            Self::Exited(c) => (PW_EXIT_EXITED, c),
            Self::Signaled(s) => (PW_EXIT_SIGNALED, s),
            Self::Unknown => (PW_EXIT_UNKNOWN, 0),
        };
        PwGuestExit {
            size: std::mem::size_of::<PwGuestExit>(),
            kind,
            code,
        }
    }

    /// From the ABI form; unknown kinds become `Unknown`.
    pub fn from_abi(exit: &PwGuestExit) -> Self {
        match exit.kind {
            PW_EXIT_EXITED => Self::Exited(exit.code),
            PW_EXIT_SIGNALED => Self::Signaled(exit.code),
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(c) => write!(f, "exited with status {c}"),
            Self::Signaled(s) => write!(f, "killed by signal {s}"),
            Self::Unknown => f.write_str("stopped"),
        }
    }
}

/// Log levels for [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
    /// Very verbose detail.
    Trace,
}

impl LogLevel {
    /// The ABI code.
    pub fn code(self) -> u32 {
        match self {
            Self::Error => PW_LOG_ERROR,
            Self::Warn => PW_LOG_WARN,
            Self::Info => PW_LOG_INFO,
            Self::Debug => PW_LOG_DEBUG,
            Self::Trace => PW_LOG_TRACE,
        }
    }
}

/// The host's callbacks, cheap to copy into threads.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    table: PwHostV1,
}

// SAFETY: the ABI contract makes both host callbacks thread-safe and their context
// valid until process exit, so the table may be used from any thread.
unsafe impl Send for Host {}
// SAFETY: as above; the table itself is never mutated.
unsafe impl Sync for Host {}

impl Host {
    /// Wraps a host table.
    ///
    /// # Safety
    /// `table` must be a valid `PwHostV1` from the host, per the ABI contract.
    pub unsafe fn from_abi(table: &PwHostV1) -> Self {
        Self { table: *table }
    }

    /// Logs into the host's log, tagged with this unit.
    pub fn log(&self, level: LogLevel, message: &str) {
        if let Some(log) = self.table.log {
            // SAFETY: the host's callback accepts its own ctx and a string valid
            // for the call, which `message` is.
            unsafe { log(self.table.ctx, level.code(), PwStr::borrow(message)) };
        }
    }

    /// Reports that a guest this instance started has stopped. Any thread.
    pub fn guest_stopped(&self, guest: GuestId, exit: GuestExit) {
        if let Some(report) = self.table.guest_stopped {
            let exit = exit.to_abi();
            // SAFETY: the host's callback accepts its own ctx and a pointer to an
            // exit record valid for the call.
            unsafe { report(self.table.ctx, guest, &exit) };
        }
    }
}

/// Runs `f` so that neither a panic nor an error escapes as anything but a status code.
fn guarded(error: *mut PwErrorBuf, f: impl FnOnce() -> Result<(), (PwStatus, String)>) -> PwStatus {
    let (status, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return PW_OK,
        Ok(Err(failure)) => failure,
        Err(panic) => (
            PW_ERR_PANIC,
            format!("plugin panicked: {}", panic_text(&*panic)),
        ),
    };
    // SAFETY: a non-null `error` points to the host's buffer for this call (ABI contract).
    if let Some(buf) = unsafe { error.as_mut() } {
        // SAFETY: the host's buffer is writable for `cap` bytes.
        unsafe { buf.write(&message) };
    }
    status
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

fn utf8<'a>(s: PwStr, what: &str) -> Result<&'a str, (PwStatus, String)> {
    // SAFETY: the host passes strings valid for the duration of the call.
    let bytes = unsafe { s.as_bytes() };
    std::str::from_utf8(bytes).map_err(|e| (PW_ERR_INVALID, format!("{what} is not UTF-8: {e}")))
}

/// `create` export. Used by [`export_plugin!`]; not for direct use.
///
/// # Safety
/// Called by the host per the ABI contract.
pub unsafe extern "C" fn create<P: Plugin>(
    host: *const PwHostV1,
    options: PwStr,
    instance: *mut *mut c_void,
    error: *mut PwErrorBuf,
) -> PwStatus {
    guarded(error, || {
        // SAFETY: the host passes a valid table or null.
        let host = unsafe { host.as_ref() }.ok_or((PW_ERR_INVALID, "null host table".into()))?;
        if instance.is_null() {
            return Err((PW_ERR_INVALID, "null instance pointer".into()));
        }
        let options = utf8(options, "options")?;
        // SAFETY: `host` is a valid host table for the life of the process.
        let host = unsafe { Host::from_abi(host) };
        let plugin = P::create(options, host).map_err(|e| (PW_ERR_OPTIONS, e))?;
        // SAFETY: checked non-null above; the host provides a writable pointer slot.
        unsafe { *instance = Box::into_raw(Box::new(plugin)).cast() };
        Ok(())
    })
}

/// `activate` export. Used by [`export_plugin!`]; not for direct use.
///
/// # Safety
/// Called by the host per the ABI contract with an instance made by [`create`].
pub unsafe extern "C" fn activate<P: Plugin>(
    instance: *mut c_void,
    activation: *const PwActivation,
    info: *mut PwGuestInfo,
    error: *mut PwErrorBuf,
) -> PwStatus {
    guarded(error, || {
        // SAFETY: `instance` came from `create::<P>` and is not yet destroyed.
        let plugin = unsafe { instance.cast::<P>().as_ref() }
            .ok_or((PW_ERR_INVALID, "null instance".into()))?;
        // SAFETY: the host passes a valid activation for the duration of the call.
        let raw =
            unsafe { activation.as_ref() }.ok_or((PW_ERR_INVALID, "null activation".into()))?;
        let activation = borrow_activation(raw)?;
        let started = plugin
            .activate(&activation)
            .map_err(|e| (PW_ERR_FAILED, e))?;
        // SAFETY: a non-null `info` is the host's record for this call.
        unsafe { fill_info(info, &started) };
        Ok(())
    })
}

/// Writes `from` into the host's `info`, within the size the host declared.
///
/// # Safety
/// `info` is null or the host's valid record for this call, per the ABI.
unsafe fn fill_info(info: *mut PwGuestInfo, from: &GuestInfo) {
    // SAFETY: per this function's contract.
    let Some(info) = (unsafe { info.as_mut() }) else {
        return;
    };
    info.pid = from.pid.unwrap_or(0);
    let handle_end = std::mem::offset_of!(PwGuestInfo, handle_len) + std::mem::size_of::<usize>();
    if info.size < handle_end || info.handle.is_null() {
        return;
    }
    let handle = from.handle.as_deref().unwrap_or("");
    let mut buf = PwErrorBuf {
        ptr: info.handle,
        cap: info.handle_cap,
        len: 0,
    };
    // SAFETY: the host's handle buffer is writable for `handle_cap` bytes.
    unsafe { buf.write(handle) };
    info.handle_len = buf.len;
}

/// `adopt` export (ABI 1.1). Used by [`export_plugin!`]; not for direct use.
///
/// # Safety
/// Called by the host per the ABI contract with an instance made by [`create`].
pub unsafe extern "C" fn adopt<P: Plugin>(
    instance: *mut c_void,
    guest: u64,
    handle: PwStr,
    info: *mut PwGuestInfo,
    error: *mut PwErrorBuf,
) -> PwStatus {
    guarded(error, || {
        // SAFETY: `instance` came from `create::<P>` and is not yet destroyed.
        let plugin = unsafe { instance.cast::<P>().as_ref() }
            .ok_or((PW_ERR_INVALID, "null instance".into()))?;
        let handle = utf8(handle, "handle")?;
        let adopted = plugin.adopt(guest, handle).map_err(|e| match e {
            AdoptError::Gone => (PW_ERR_GONE, "the guest is gone".to_owned()),
            AdoptError::Unsupported => {
                (PW_ERR_FAILED, "this plugin cannot adopt guests".to_owned())
            }
            AdoptError::Failed(message) => (PW_ERR_FAILED, message),
        })?;
        // SAFETY: a non-null `info` is the host's record for this call.
        unsafe { fill_info(info, &adopted) };
        Ok(())
    })
}

fn borrow_activation<'a>(raw: &'a PwActivation) -> Result<Activation<'a>, (PwStatus, String)> {
    let fds = if raw.fd_count == 0 {
        &[][..]
    } else {
        // SAFETY: the host passes `fd_count` valid entries for the call.
        unsafe { std::slice::from_raw_parts(raw.fds, raw.fd_count) }
    };
    let env = if raw.env_count == 0 {
        &[][..]
    } else {
        // SAFETY: the host passes `env_count` valid entries for the call.
        unsafe { std::slice::from_raw_parts(raw.env, raw.env_count) }
    };
    let fds = fds
        .iter()
        .map(|f| {
            let kind = SocketKind::from_code(f.kind)
                .ok_or((PW_ERR_INVALID, format!("unknown socket kind {}", f.kind)))?;
            if f.fd < 0 {
                return Err((PW_ERR_INVALID, format!("invalid fd {}", f.fd)));
            }
            Ok(ListenFd {
                // SAFETY: the host keeps the fd open for the whole call.
                fd: unsafe { BorrowedFd::borrow_raw(f.fd) },
                kind,
                name: utf8(f.name, "fd name")?,
            })
        })
        .collect::<Result<_, _>>()?;
    let env = env
        .iter()
        .map(|v| Ok((utf8(v.name, "env name")?, utf8(v.value, "env value")?)))
        .collect::<Result<_, _>>()?;
    Ok(Activation {
        unit: utf8(raw.unit, "unit name")?,
        guest: raw.guest,
        fds,
        env,
    })
}

/// `stop` export. Used by [`export_plugin!`]; not for direct use.
///
/// # Safety
/// Called by the host per the ABI contract with an instance made by [`create`].
pub unsafe extern "C" fn stop<P: Plugin>(
    instance: *mut c_void,
    guest: u64,
    timeout_ms: u64,
    error: *mut PwErrorBuf,
) -> PwStatus {
    guarded(error, || {
        // SAFETY: `instance` came from `create::<P>` and is not yet destroyed.
        let plugin = unsafe { instance.cast::<P>().as_ref() }
            .ok_or((PW_ERR_INVALID, "null instance".into()))?;
        plugin
            .stop(guest, Duration::from_millis(timeout_ms))
            .map_err(|e| (PW_ERR_FAILED, e))
    })
}

/// `destroy` export. Used by [`export_plugin!`]; not for direct use.
///
/// # Safety
/// Called by the host once per instance made by [`create`].
pub unsafe extern "C" fn destroy<P: Plugin>(instance: *mut c_void) {
    let _ = guarded(std::ptr::null_mut(), || {
        if !instance.is_null() {
            // SAFETY: `instance` came from `Box::into_raw` in `create::<P>` and the
            // host destroys it once.
            drop(unsafe { Box::from_raw(instance.cast::<P>()) });
        }
        Ok(())
    });
}

/// Exports a [`Plugin`] type as a portwake plugin (`portwake_plugin_entry`).
///
/// ```ignore
/// portwake_plugin_api::export_plugin!(MyPlugin, "myplugin");
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, $name:literal) => {
        static PORTWAKE_PLUGIN_ENTRY: $crate::abi::PwPluginStatic =
            $crate::abi::PwPluginStatic($crate::abi::PwPluginV1 {
                size: ::std::mem::size_of::<$crate::abi::PwPluginV1>(),
                abi_major: $crate::abi::ABI_MAJOR,
                abi_minor: $crate::abi::ABI_MINOR,
                name: concat!($name, "\0").as_ptr().cast(),
                version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast(),
                create: Some($crate::sdk::create::<$plugin>),
                activate: Some($crate::sdk::activate::<$plugin>),
                stop: Some($crate::sdk::stop::<$plugin>),
                destroy: Some($crate::sdk::destroy::<$plugin>),
                adopt: Some($crate::sdk::adopt::<$plugin>),
            });

        /// The plugin's one exported entry point.
        #[no_mangle]
        pub extern "C" fn portwake_plugin_entry() -> *const $crate::abi::PwPluginV1 {
            &PORTWAKE_PLUGIN_ENTRY.0
        }
    };
}

#[cfg(test)]
mod tests {
    //! The export thunks driven through the raw ABI, as the host drives them; also run
    //! under Miri (`cargo +nightly miri test -p portwake-plugin-api --lib`).

    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::abi::{PwEnvVar, PwListenFd, PW_KIND_STREAM};

    struct Probe {
        host: Host,
    }

    impl Plugin for Probe {
        fn create(options: &str, host: Host) -> Result<Self, String> {
            match options {
                "panic" => panic!("probe panics"),
                "bad" => Err("options 1:2: bad value ü".into()),
                _ => Ok(Self { host }),
            }
        }
        fn activate(&self, activation: &Activation<'_>) -> Result<GuestInfo, String> {
            assert_eq!(activation.unit, "u");
            assert_eq!(activation.fds.len(), 1);
            assert_eq!(activation.fds[0].name, "http");
            assert_eq!(activation.env, [("K", "V")]);
            self.host.log(LogLevel::Info, "activating");
            self.host
                .guest_stopped(activation.guest, GuestExit::Exited(3));
            Ok(GuestInfo {
                pid: Some(42),
                handle: Some("probe-handle".into()),
            })
        }
        fn stop(&self, _guest: GuestId, _timeout: Duration) -> Result<(), String> {
            Err("cannot stop".into())
        }
    }

    static STOPPED: AtomicU64 = AtomicU64::new(0);

    unsafe extern "C" fn log(_ctx: *mut c_void, _level: u32, message: PwStr) {
        // SAFETY: the plugin passes a string valid for the call.
        assert_eq!(unsafe { message.as_bytes() }, b"activating");
    }

    unsafe extern "C" fn stopped(_ctx: *mut c_void, guest: u64, exit: *const PwGuestExit) {
        // SAFETY: the plugin passes a valid exit record for the call.
        let exit = unsafe { &*exit };
        assert_eq!(GuestExit::from_abi(exit), GuestExit::Exited(3));
        STOPPED.store(guest, Ordering::SeqCst);
    }

    fn host() -> PwHostV1 {
        PwHostV1 {
            size: std::mem::size_of::<PwHostV1>(),
            ctx: std::ptr::null_mut(),
            log: Some(log),
            guest_stopped: Some(stopped),
        }
    }

    /// An empty error buffer over `bytes`.
    fn error_buf(bytes: &mut [u8]) -> PwErrorBuf {
        PwErrorBuf {
            ptr: bytes.as_mut_ptr(),
            cap: bytes.len(),
            len: 0,
        }
    }

    fn error_text(bytes: &[u8], buf: &PwErrorBuf) -> String {
        String::from_utf8(bytes[..buf.len].to_vec()).unwrap()
    }

    #[test]
    fn create_activate_stop_destroy_through_the_abi() {
        let host = host();
        let mut bytes = vec![0u8; 64];
        let mut error = error_buf(&mut bytes);
        let mut instance = std::ptr::null_mut();
        // SAFETY: valid host table, options and out-pointers for the call.
        let status =
            unsafe { create::<Probe>(&host, PwStr::borrow("()"), &mut instance, &mut error) };
        assert_eq!(status, PW_OK);
        let fds = [PwListenFd {
            fd: 0,
            kind: PW_KIND_STREAM,
            name: PwStr::borrow("http"),
        }];
        let env = [PwEnvVar {
            name: PwStr::borrow("K"),
            value: PwStr::borrow("V"),
        }];
        let activation = PwActivation {
            size: std::mem::size_of::<PwActivation>(),
            unit: PwStr::borrow("u"),
            guest: 7,
            fds: fds.as_ptr(),
            fd_count: fds.len(),
            env: env.as_ptr(),
            env_count: env.len(),
        };
        let mut handle = [0u8; 8];
        let mut info = PwGuestInfo {
            size: std::mem::size_of::<PwGuestInfo>(),
            pid: 0,
            handle: handle.as_mut_ptr(),
            handle_cap: handle.len(),
            handle_len: 0,
        };
        // SAFETY: a live instance and pointers valid for the call.
        let status = unsafe { activate::<Probe>(instance, &activation, &mut info, &mut error) };
        assert_eq!(
            (status, info.pid, STOPPED.load(Ordering::SeqCst)),
            (PW_OK, 42, 7)
        );
        // The handle is cut to the host's buffer, never past it.
        assert_eq!(&handle[..info.handle_len], b"probe-ha");
        // A plugin without `adopt` says so through the 1.1 export.
        // SAFETY: a live instance and pointers valid for the call.
        let status = unsafe {
            adopt::<Probe>(
                instance,
                8,
                PwStr::borrow("probe-handle"),
                &mut info,
                &mut error,
            )
        };
        assert_eq!(status, PW_ERR_FAILED);
        assert_eq!(
            error_text(&bytes, &error),
            "this plugin cannot adopt guests"
        );
        // SAFETY: as above.
        let status = unsafe { stop::<Probe>(instance, 7, 1000, &mut error) };
        assert_eq!(status, PW_ERR_FAILED);
        assert_eq!(error_text(&bytes, &error), "cannot stop");
        // SAFETY: the instance came from `create` and is destroyed once.
        unsafe { destroy::<Probe>(instance) };
    }

    #[test]
    fn errors_and_panics_become_status_codes_and_truncated_messages() {
        let host = host();
        let mut bytes = vec![0u8; 20];
        let mut error = error_buf(&mut bytes);
        let mut instance = std::ptr::null_mut();
        // SAFETY: valid pointers for the call.
        let status =
            unsafe { create::<Probe>(&host, PwStr::borrow("bad"), &mut instance, &mut error) };
        assert_eq!(status, PW_ERR_OPTIONS);
        // 20 bytes would split the 'ü': cut at the char boundary before it.
        assert_eq!(error_text(&bytes, &error), "options 1:2: bad val");
        // SAFETY: valid pointers for the call.
        let status =
            unsafe { create::<Probe>(&host, PwStr::borrow("panic"), &mut instance, &mut error) };
        assert_eq!(status, PW_ERR_PANIC);
        assert_eq!(error_text(&bytes, &error), "plugin panicked: pro");
        // Null pointers are refused, not dereferenced.
        // SAFETY: null pointers are part of what the thunks must survive.
        let status = unsafe {
            create::<Probe>(
                std::ptr::null(),
                PwStr::borrow("()"),
                &mut instance,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(status, PW_ERR_INVALID);
        // SAFETY: as above.
        let status = unsafe {
            activate::<Probe>(
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null_mut(),
                &mut error,
            )
        };
        assert_eq!(status, PW_ERR_INVALID);
    }
}
