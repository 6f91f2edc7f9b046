//! The one error type of this crate; every variant says where (file and line, or path).

use std::io;
use std::path::{Path, PathBuf};

use crate::address::AddressError;

/// Why a guest's socket units could not be read as systemd would read them.
///
/// Paths are host paths of the files actually read, so a user can open them. Line numbers are
/// 1-based and point at the line holding the key (systemd's own warnings name the last line of a
/// continued line instead).
#[derive(Debug, thiserror::Error)]
pub enum GuestUnitsError {
    /// Reading a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The host path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A symlink chain inside the guest root does not end.
    #[error("{}: too many levels of symbolic links inside the guest root", path.display())]
    SymlinkLoop {
        /// The host path whose resolution looped.
        path: PathBuf,
    },
    /// A unit file that is not UTF-8, which systemd refuses line by line.
    #[error("{}:{line}: not valid UTF-8", file.display())]
    NotUtf8 {
        /// The unit file.
        file: PathBuf,
        /// The first bad line.
        line: usize,
    },
    /// `[Section` without `]`, or a header with control characters: systemd fails the unit.
    #[error("{}:{line}: invalid section header '{header}'", file.display())]
    SectionHeader {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// The header as written.
        header: String,
    },
    /// A line in a section that is neither a comment nor `KEY=VALUE`; systemd skips it with a
    /// warning, which hides mistakes such as `ListenStream 22`.
    #[error("{}:{line}: missing '=' in '{text}'", file.display())]
    MissingEquals {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// The line as written.
        text: String,
    },
    /// A line starting with '='.
    #[error("{}:{line}: missing key name before '='", file.display())]
    MissingKey {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
    },
    /// A `Listen*=` value that systemd would not bind (it logs and ignores the line).
    #[error("{}:{line}: {key}={value}: {source}", file.display())]
    Address {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// `ListenStream`, `ListenDatagram` or `ListenSequentialPacket`.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        #[source]
        source: AddressError,
    },
    /// A value of `Accept=`, `BindIPv6Only=`, `FileDescriptorName=` or `Service=` that systemd
    /// would ignore.
    #[error("{}:{line}: {key}={value}: {reason}", file.display())]
    Value {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// What is expected instead.
        reason: String,
    },
    /// A `%` specifier whose value only the running guest knows (hostname, machine ID, ...), an
    /// unknown one, or a lone `%` at the end; `%%` is a literal percent sign.
    #[error("{}:{line}: {key}={value}: {}", file.display(), specifier_problem(*specifier))]
    Specifier {
        /// The unit file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// The character after `%`; `None` for a `%` that ends the value.
        specifier: Option<char>,
    },
    /// A combination `socket_verify()` refuses, so the guest loads no socket from this unit.
    #[error("{}:{line}: systemd refuses to load {unit}: {reason}", file.display())]
    Refused {
        /// The file holding the offending key.
        file: PathBuf,
        /// The line of that key.
        line: usize,
        /// The unit name.
        unit: String,
        /// The rule broken.
        reason: String,
    },
}

fn specifier_problem(specifier: Option<char>) -> String {
    match specifier {
        Some(c) => format!("specifier %{c} cannot be resolved outside the guest"),
        None => "a lone '%' ends the value (write %% for a percent sign)".to_owned(),
    }
}

impl GuestUnitsError {
    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            GuestUnitsError::Io { path, .. } | GuestUnitsError::SymlinkLoop { path } => path,
            GuestUnitsError::NotUtf8 { file, .. }
            | GuestUnitsError::SectionHeader { file, .. }
            | GuestUnitsError::MissingEquals { file, .. }
            | GuestUnitsError::MissingKey { file, .. }
            | GuestUnitsError::Address { file, .. }
            | GuestUnitsError::Value { file, .. }
            | GuestUnitsError::Specifier { file, .. }
            | GuestUnitsError::Refused { file, .. } => file,
        }
    }

    /// The 1-based line, where the error is about a line.
    pub fn line(&self) -> Option<usize> {
        match self {
            GuestUnitsError::Io { .. } | GuestUnitsError::SymlinkLoop { .. } => None,
            GuestUnitsError::NotUtf8 { line, .. }
            | GuestUnitsError::SectionHeader { line, .. }
            | GuestUnitsError::MissingEquals { line, .. }
            | GuestUnitsError::MissingKey { line, .. }
            | GuestUnitsError::Address { line, .. }
            | GuestUnitsError::Value { line, .. }
            | GuestUnitsError::Specifier { line, .. }
            | GuestUnitsError::Refused { line, .. } => Some(*line),
        }
    }
}
