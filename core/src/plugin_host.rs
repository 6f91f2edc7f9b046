//! Loading activation plugins and calling them through ABI v1.
//!
//! This is the only module that touches plugin pointers: everything above it sees
//! [`PluginInstance`], whose methods are safe, thread-safe and never unwind.

use std::ffi::{c_void, CStr};
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portwake_plugin_api::abi::{
    self, PwActivation, PwEntryFn, PwEnvVar, PwErrorBuf, PwGuestExit, PwGuestInfo, PwHostV1,
    PwListenFd, PwPluginV1, PwStatus, PwStr,
};
use portwake_plugin_api::{GuestExit, SocketKind};

/// Where plugins are installed system-wide; searched last.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/portwake/plugins";
/// Room the host gives a plugin for an error message.
const ERROR_BUF_LEN: usize = 4096;

/// Why a plugin could not be found, loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No file for the plugin name in any search directory.
    #[error("plugin {name:?} not found: looked for {file} in {}", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound {
        /// The name from the config.
        name: String,
        /// `libportwake_<name>.so`.
        file: String,
        /// Directories searched, in order.
        dirs: Vec<PathBuf>,
    },
    /// `dlopen` failed (missing file, not a shared object, unresolved symbols…).
    #[error("{}: cannot load plugin: {source}", path.display())]
    Load {
        /// The plugin file.
        path: PathBuf,
        /// libloading's error.
        source: libloading::Error,
    },
    /// The library does not export the entry symbol.
    #[error("{}: not a portwake plugin: no `{}` symbol", path.display(), abi::ENTRY_SYMBOL)]
    NoEntry {
        /// The plugin file.
        path: PathBuf,
    },
    /// The plugin speaks another ABI version, or its table is malformed.
    #[error("{}: {message}", path.display())]
    Abi {
        /// The plugin file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// Running as root, the plugin file or a directory above it could be replaced by
    /// someone other than root (see [`trust`]).
    #[error("{}: refusing to load this plugin as root: {reason}; a plugin runs with the daemon's privileges, so the file and every directory above it must be owned by root and not writable by group or others (a sticky directory owned by root, such as /tmp, is fine). Fix the ownership and modes, or set `allow_untrusted_plugins: true` in the config for development", path.display())]
    Untrusted {
        /// The plugin file.
        path: PathBuf,
        /// Which file or directory, and what is wrong with it.
        reason: String,
    },
    /// The plugin rejected its options.
    #[error("options: {0}")]
    Options(String),
    /// A plugin call failed; the message is the plugin's own.
    #[error("plugin {plugin} {call} failed: {message}")]
    Call {
        /// Plugin name.
        plugin: String,
        /// `create`, `activate`, `stop`.
        call: &'static str,
        /// The plugin's message.
        message: String,
    },
}

/// A loaded plugin library, shared by every unit that uses it.
pub struct PluginLibrary {
    path: PathBuf,
    name: String,
    version: String,
    abi_minor: u32,
    /// A copy of the plugin's entry table (its pointers lead into the library).
    table: PwPluginV1,
    // Dropped last: the table's pointers lead into it.
    _library: libloading::Library,
}

// SAFETY: the entry table is immutable static data of the library, which stays
// loaded as long as this value; the ABI requires plugins to be callable from any thread.
unsafe impl Send for PluginLibrary {}
// SAFETY: as above; nothing here is mutated after loading.
unsafe impl Sync for PluginLibrary {}

impl fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The directories searched for a plugin by name, in order.
pub fn search_dirs(plugin_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(plugin_dir.map(Path::to_owned));
    dirs.extend(std::env::var_os("PORTWAKE_PLUGIN_DIR").map(PathBuf::from));
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        dirs.push(exe_dir);
    }
    dirs.push(PathBuf::from(SYSTEM_PLUGIN_DIR));
    dirs
}

/// Finds the file for a plugin name (`exec` → `libportwake_exec.so`), or takes a
/// value with '/' as a path relative to `base`.
pub fn resolve(name: &str, base: &Path, dirs: &[PathBuf]) -> Result<PathBuf, PluginError> {
    if name.contains('/') {
        return Ok(base.join(name));
    }
    let file = format!("libportwake_{name}.so");
    dirs.iter()
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| PluginError::NotFound {
            name: name.to_owned(),
            file,
            dirs: dirs.to_vec(),
        })
}

/// Whether a plugin file may be loaded by a daemon running as root.
///
/// When the effective uid is 0, the file and every directory on its path (as written,
/// and after resolving symlinks) must be owned by root and not writable by group or
/// others: anyone who could replace one of them could run code as root. A directory
/// that is writable by others but sticky and owned by root (`/tmp`) is accepted: in it,
/// nobody but root can rename or delete a root-owned entry. (ssh's `StrictModes`
/// refuses such directories; it checks files users own, portwake checks files root
/// owns.) As another user the daemon cannot gain privileges through a plugin, so
/// nothing is checked.
pub fn trust(path: &Path) -> Result<(), PluginError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let untrusted = |reason: String| PluginError::Untrusted {
        path: path.to_owned(),
        reason,
    };
    let absolute = std::path::absolute(path).map_err(|e| untrusted(e.to_string()))?;
    let resolved = std::fs::canonicalize(path).map_err(|e| untrusted(e.to_string()))?;
    let mut checked: Vec<&Path> = Vec::new();
    for candidate in std::iter::once(resolved.as_path())
        .chain(resolved.ancestors().skip(1))
        .chain(absolute.ancestors().skip(1))
    {
        if checked.contains(&candidate) {
            continue;
        }
        checked.push(candidate);
        check_owner_and_mode(candidate).map_err(untrusted)?;
    }
    Ok(())
}

fn check_owner_and_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // A lexical ancestor that is a symlink is checked as the directory it names; the
    // directory holding the symlink is itself an ancestor and checked too.
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let what = if meta.is_dir() { "directory" } else { "file" };
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 {
        return Err(format!(
            "{what} {} is owned by uid {}, not root",
            path.display(),
            meta.uid()
        ));
    }
    let sticky = meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        let by = if mode & 0o002 != 0 {
            "others"
        } else {
            "its group"
        };
        return Err(format!(
            "{what} {} is writable by {by} (mode {mode:04o})",
            path.display()
        ));
    }
    Ok(())
}

impl PluginLibrary {
    /// Loads a plugin file after the [`trust`] check, and checks its ABI version and
    /// entry table.
    pub fn load(path: &Path) -> Result<Arc<Self>, PluginError> {
        Self::load_with(path, false)
    }

    /// [`load`](Self::load), skipping the [`trust`] check (with a warning) when
    /// `allow_untrusted` is set (the config's `allow_untrusted_plugins`).
    pub fn load_with(path: &Path, allow_untrusted: bool) -> Result<Arc<Self>, PluginError> {
        if let Err(e) = trust(path) {
            if !allow_untrusted {
                return Err(e);
            }
            if let PluginError::Untrusted { reason, .. } = &e {
                tracing::warn!(plugin = %path.display(), %reason, "loading an untrusted plugin because allow_untrusted_plugins is set");
            }
        }
        // RTLD_NODELETE: a plugin stays mapped until the process ends, because its
        // own threads (reapers, watchers) may still run its code after `destroy`;
        // unmapping it under them would crash the daemon.
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: loading a library runs its initialisers; plugins are trusted code
        // the admin configured (and trust-checked above), the premise of a plugin system.
        let library = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
            .map(libloading::Library::from)
            .map_err(|source| PluginError::Load {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: the symbol's type is fixed by the ABI: `const PwPluginV1 *(void)`.
        let entry =
            unsafe { library.get::<PwEntryFn>(abi::ENTRY_SYMBOL.as_bytes()) }.map_err(|_| {
                PluginError::NoEntry {
                    path: path.to_owned(),
                }
            })?;
        // SAFETY: calling the entry per the ABI; it returns a pointer to static data.
        let table = unsafe { entry() };
        let abi_error = |message: String| PluginError::Abi {
            path: path.to_owned(),
            message,
        };
        if table.is_null() {
            return Err(abi_error("entry returned null".into()));
        }
        // Read the fixed header first: an older plugin's table is shorter than ours,
        // so no reference to a whole `PwPluginV1` may be made before its size is known.
        // SAFETY: every ABI version's table starts with size, major and minor.
        let (size, major, minor) = unsafe {
            (
                std::ptr::addr_of!((*table).size).read(),
                std::ptr::addr_of!((*table).abi_major).read(),
                std::ptr::addr_of!((*table).abi_minor).read(),
            )
        };
        if major != abi::ABI_MAJOR {
            return Err(abi_error(format!(
                "plugin ABI {major}.{minor} is not supported by this portwake (ABI {}.{}): rebuild the plugin against ABI {}",
                abi::ABI_MAJOR, abi::ABI_MINOR, abi::ABI_MAJOR
            )));
        }
        if minor > abi::ABI_MINOR {
            return Err(abi_error(format!(
                "plugin ABI {major}.{minor} is newer than this portwake's ABI {}.{}: upgrade portwake",
                abi::ABI_MAJOR,
                abi::ABI_MINOR
            )));
        }
        // The table as ABI major.minor defines it: 1.0 ends before `adopt`.
        let needed = if minor == 0 {
            std::mem::offset_of!(PwPluginV1, adopt)
        } else {
            std::mem::size_of::<PwPluginV1>()
        };
        if size < needed {
            return Err(abi_error(format!(
                "entry table is {size} bytes, ABI {major}.{minor} needs {needed}"
            )));
        }
        let mut t = PwPluginV1 {
            size,
            abi_major: major,
            abi_minor: minor,
            name: std::ptr::null(),
            version: std::ptr::null(),
            create: None,
            activate: None,
            stop: None,
            destroy: None,
            adopt: None,
        };
        // SAFETY: the plugin's table holds at least `needed` bytes (checked above),
        // and a prefix of a `PwPluginV1` is a valid prefix of ours; later fields stay
        // None, which an older plugin does not have.
        unsafe {
            std::ptr::copy_nonoverlapping(
                table.cast::<u8>(),
                std::ptr::from_mut(&mut t).cast::<u8>(),
                needed,
            );
        }
        if t.create.is_none() || t.activate.is_none() || t.stop.is_none() || t.destroy.is_none() {
            return Err(abi_error(
                "entry table lacks create, activate, stop or destroy".into(),
            ));
        }
        let text = |p: *const std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: non-null name/version are NUL-terminated static strings (ABI).
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        Ok(Arc::new(Self {
            path: path.to_owned(),
            name: text(t.name),
            version: text(t.version),
            abi_minor: t.abi_minor,
            table: t,
            _library: library,
        }))
    }

    /// The plugin's own name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `major.minor` of the ABI the plugin was built for.
    pub fn abi(&self) -> String {
        format!("{}.{}", abi::ABI_MAJOR, self.abi_minor)
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn table(&self) -> &PwPluginV1 {
        &self.table
    }

    /// Whether the plugin can take over guests of an earlier daemon (ABI 1.1 `adopt`).
    pub fn can_adopt(&self) -> bool {
        self.table.adopt.is_some()
    }
}

/// Receives what a plugin instance reports: log lines and guest exits. Any thread.
pub trait HostEvents: Send + Sync {
    /// A log line from the plugin.
    fn log(&self, level: u32, message: &str);
    /// A guest of this instance stopped.
    fn guest_stopped(&self, guest: u64, exit: GuestExit);
}

/// What the host table's `ctx` points to. Leaked on purpose: a plugin may report from
/// its own threads even after `destroy`, so the context must outlive every instance.
struct HostContext {
    events: Arc<dyn HostEvents>,
    alive: AtomicBool,
    table: PwHostV1,
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, message: PwStr) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the leaked `HostContext` the host created for this instance.
        let ctx = unsafe { &*ctx.cast::<HostContext>() };
        if ctx.alive.load(Ordering::Acquire) {
            // SAFETY: the plugin passes a string valid for the call.
            let bytes = unsafe { message.as_bytes() };
            ctx.events.log(level, &String::from_utf8_lossy(bytes));
        }
    });
}

unsafe extern "C" fn host_guest_stopped(ctx: *mut c_void, guest: u64, exit: *const PwGuestExit) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the leaked `HostContext` the host created for this instance.
        let ctx = unsafe { &*ctx.cast::<HostContext>() };
        // SAFETY: a non-null `exit` is valid for the call.
        let exit = unsafe { exit.as_ref() }.map_or(GuestExit::Unknown, GuestExit::from_abi);
        if ctx.alive.load(Ordering::Acquire) {
            ctx.events.guest_stopped(guest, exit);
        }
    });
}

/// One plugin instance, serving one unit.
pub struct PluginInstance {
    library: Arc<PluginLibrary>,
    instance: *mut c_void,
    context: &'static HostContext,
}

// SAFETY: the ABI requires instances to accept calls from any thread; the pointer is
// only passed back to the plugin.
unsafe impl Send for PluginInstance {}
// SAFETY: as above.
unsafe impl Sync for PluginInstance {}

impl fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginInstance")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

/// One listener as handed to `activate`.
#[derive(Debug, Clone, Copy)]
pub struct ActivationFd<'a> {
    /// The socket.
    pub fd: BorrowedFd<'a>,
    /// Its type.
    pub kind: SocketKind,
    /// Its `LISTEN_FDNAMES` entry.
    pub name: &'a str,
}

/// A host-owned error buffer for one call.
struct ErrorBuf {
    bytes: Vec<u8>,
    raw: PwErrorBuf,
}

impl ErrorBuf {
    fn new() -> Self {
        let mut bytes = vec![0u8; ERROR_BUF_LEN];
        let raw = PwErrorBuf {
            ptr: bytes.as_mut_ptr(),
            cap: bytes.len(),
            len: 0,
        };
        Self { bytes, raw }
    }

    fn message(&self) -> String {
        let len = self.raw.len.min(self.bytes.len());
        let text = String::from_utf8_lossy(&self.bytes[..len]).into_owned();
        if text.is_empty() {
            "no message".into()
        } else {
            text
        }
    }
}

impl PluginInstance {
    /// Creates an instance; the plugin validates `options` here.
    pub fn create(
        library: Arc<PluginLibrary>,
        options: &str,
        events: Arc<dyn HostEvents>,
    ) -> Result<Self, PluginError> {
        let context: &'static mut HostContext = Box::leak(Box::new(HostContext {
            events,
            alive: AtomicBool::new(true),
            table: PwHostV1 {
                size: std::mem::size_of::<PwHostV1>(),
                ctx: std::ptr::null_mut(),
                log: Some(host_log),
                guest_stopped: Some(host_guest_stopped),
            },
        }));
        context.table.ctx = std::ptr::from_mut(context).cast();
        let context: &'static HostContext = context;
        let create = library.table().create.expect("checked at load");
        let mut instance = std::ptr::null_mut();
        let mut error = ErrorBuf::new();
        // SAFETY: valid host table (static), options valid for the call, and
        // writable out-pointers, per the ABI.
        let status = unsafe {
            create(
                &context.table,
                PwStr::borrow(options),
                &mut instance,
                &mut error.raw,
            )
        };
        match status {
            abi::PW_OK if !instance.is_null() => Ok(Self {
                library,
                instance,
                context,
            }),
            abi::PW_OK => Err(call_error(
                &library,
                "create",
                "returned no instance".into(),
            )),
            abi::PW_ERR_OPTIONS => Err(PluginError::Options(error.message())),
            other => Err(call_error(
                &library,
                "create",
                status_message(other, &error),
            )),
        }
    }

    /// Starts a guest; blocks for as long as the plugin takes. Returns its pid and
    /// handle, if any.
    pub fn activate(
        &self,
        unit: &str,
        guest: u64,
        fds: &[ActivationFd<'_>],
        env: &[(String, String)],
    ) -> Result<Started, PluginError> {
        let listen: Vec<PwListenFd> = fds
            .iter()
            .map(|f| PwListenFd {
                fd: f.fd.as_raw_fd(),
                kind: f.kind.code(),
                name: PwStr::borrow(f.name),
            })
            .collect();
        let env: Vec<PwEnvVar> = env
            .iter()
            .map(|(k, v)| PwEnvVar {
                name: PwStr::borrow(k),
                value: PwStr::borrow(v),
            })
            .collect();
        let activation = PwActivation {
            size: std::mem::size_of::<PwActivation>(),
            unit: PwStr::borrow(unit),
            guest,
            fds: listen.as_ptr(),
            fd_count: listen.len(),
            env: env.as_ptr(),
            env_count: env.len(),
        };
        let mut handle = vec![0u8; HANDLE_BUF_LEN];
        let mut info = guest_info(&mut handle);
        let mut error = ErrorBuf::new();
        let activate = self.library.table().activate.expect("checked at load");
        // SAFETY: the instance is live, and every pointer is valid for the call: fds
        // stay open (borrowed for the call), strings and buffers outlive it.
        let status = unsafe { activate(self.instance, &activation, &mut info, &mut error.raw) };
        match status {
            abi::PW_OK => Ok(Started::from_info(&info, &handle)),
            other => Err(call_error(
                &self.library,
                "activate",
                status_message(other, &error),
            )),
        }
    }

    /// Whether this plugin can adopt guests of an earlier daemon process.
    pub fn can_adopt(&self) -> bool {
        self.library.can_adopt()
    }

    /// Takes over a guest an earlier daemon process started (ABI 1.1).
    pub fn adopt(&self, guest: u64, handle: &str) -> Result<Started, AdoptFailure> {
        let Some(adopt) = self.library.table().adopt else {
            return Err(AdoptFailure::Unsupported);
        };
        let mut buffer = vec![0u8; HANDLE_BUF_LEN];
        let mut info = guest_info(&mut buffer);
        let mut error = ErrorBuf::new();
        // SAFETY: the instance is live and every pointer is valid for the call.
        let status = unsafe {
            adopt(
                self.instance,
                guest,
                PwStr::borrow(handle),
                &mut info,
                &mut error.raw,
            )
        };
        match status {
            abi::PW_OK => Ok(Started::from_info(&info, &buffer)),
            abi::PW_ERR_GONE => Err(AdoptFailure::Gone),
            other => Err(AdoptFailure::Failed(call_error(
                &self.library,
                "adopt",
                status_message(other, &error),
            ))),
        }
    }

    /// Stops a guest; blocks until the plugin says it is gone.
    pub fn stop(&self, guest: u64, timeout: Duration) -> Result<(), PluginError> {
        let mut error = ErrorBuf::new();
        let stop = self.library.table().stop.expect("checked at load");
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: the instance is live and the error buffer valid for the call.
        let status = unsafe { stop(self.instance, guest, timeout_ms, &mut error.raw) };
        match status {
            abi::PW_OK => Ok(()),
            other => Err(call_error(
                &self.library,
                "stop",
                status_message(other, &error),
            )),
        }
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        self.context.alive.store(false, Ordering::Release);
        let destroy = self.library.table().destroy.expect("checked at load");
        // SAFETY: the instance came from this library's `create` and is destroyed once.
        unsafe { destroy(self.instance) };
    }
}

/// Room the host gives a plugin for a guest handle.
const HANDLE_BUF_LEN: usize = 1024;

/// What a plugin reports about a guest it started or adopted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Started {
    /// The guest's host pid, if it has one.
    pub pid: Option<i64>,
    /// The plugin's handle for adopting the guest after a restart (ABI 1.1).
    pub handle: Option<String>,
}

impl Started {
    fn from_info(info: &PwGuestInfo, handle: &[u8]) -> Self {
        let len = info.handle_len.min(handle.len());
        Self {
            pid: (info.pid > 0).then_some(info.pid),
            handle: (len > 0).then(|| String::from_utf8_lossy(&handle[..len]).into_owned()),
        }
    }
}

/// Why `adopt` did not take a guest over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptFailure {
    /// The guest is gone.
    #[error("the guest is gone")]
    Gone,
    /// The plugin cannot adopt (ABI 1.0, or it declines).
    #[error("the plugin cannot adopt guests")]
    Unsupported,
    /// The call failed.
    #[error(transparent)]
    Failed(PluginError),
}

/// A guest-info record for a call, with `handle` as its handle buffer.
fn guest_info(handle: &mut [u8]) -> PwGuestInfo {
    PwGuestInfo {
        size: std::mem::size_of::<PwGuestInfo>(),
        pid: 0,
        handle: handle.as_mut_ptr(),
        handle_cap: handle.len(),
        handle_len: 0,
    }
}

fn call_error(library: &PluginLibrary, call: &'static str, message: String) -> PluginError {
    PluginError::Call {
        plugin: library.name().to_owned(),
        call,
        message,
    }
}

fn status_message(status: PwStatus, error: &ErrorBuf) -> String {
    match status {
        abi::PW_ERR_FAILED | abi::PW_ERR_OPTIONS => error.message(),
        abi::PW_ERR_PANIC => error.message(),
        abi::PW_ERR_INVALID => format!("invalid call: {}", error.message()),
        other => format!("unknown status {other} ({})", error.message()),
    }
}
