//! Path resolution confined to a guest root.
//!
//! A guest's symlinks are written for the guest's own `/`: `/etc/systemd/system/x.socket ->
//! /lib/systemd/system/x.socket` must be read from the guest tree, never from the host. This walks
//! paths one component at a time the way systemd's `chase()` does with a root directory: absolute
//! targets restart at the guest root and `..` never climbs above it.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::error::GuestUnitsError;

/// Same limit as the kernel's and systemd's `CHASE_MAX`.
const MAX_SYMLINKS: usize = 40;

/// Where a guest path ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// An existing guest path, absolute, with every symlink followed.
    Path(PathBuf),
    /// The guest's `/dev/null`, the systemd way to mask; the guest tree need not contain it.
    DevNull,
    /// Nothing there, or a dangling symlink.
    Missing,
}

/// A directory that stands for a guest's `/`.
#[derive(Debug, Clone)]
pub(crate) struct GuestRoot {
    root: PathBuf,
}

impl GuestRoot {
    pub(crate) fn new(root: PathBuf) -> GuestRoot {
        GuestRoot { root }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.root
    }

    /// The host path of an absolute guest path.
    pub(crate) fn host(&self, guest: &Path) -> PathBuf {
        let mut host = self.root.clone();
        for c in guest.components() {
            if let Component::Normal(name) = c {
                host.push(name);
            }
        }
        host
    }

    /// Follows every symlink of `guest` inside the root.
    pub(crate) fn resolve(&self, guest: &Path) -> Result<Resolved, GuestUnitsError> {
        let mut todo: Vec<OsString> = Vec::new();
        push_front(&mut todo, guest);
        let mut done = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = todo.pop() {
            if name == ".." {
                done.pop();
                continue;
            }
            let candidate = done.join(&name);
            // The guest tree need not contain /dev at all, so /dev/null is recognised by name.
            let rest = todo.iter().rev().fold(candidate.clone(), |p, n| p.join(n));
            if rest == Path::new("/dev/null") {
                return Ok(Resolved::DevNull);
            }
            let host = self.host(&candidate);
            let meta = match fs::symlink_metadata(&host) {
                Ok(meta) => meta,
                Err(e) if is_missing(&e) => return Ok(Resolved::Missing),
                Err(source) => return Err(GuestUnitsError::Io { path: host, source }),
            };
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(GuestUnitsError::SymlinkLoop {
                        path: self.host(guest),
                    });
                }
                let target = fs::read_link(&host).map_err(|source| GuestUnitsError::Io {
                    path: host.clone(),
                    source,
                })?;
                if target.is_absolute() {
                    done = PathBuf::from("/");
                }
                push_front(&mut todo, &target);
            } else {
                if !todo.is_empty() && !meta.is_dir() {
                    return Ok(Resolved::Missing);
                }
                done = candidate;
            }
        }
        Ok(Resolved::Path(done))
    }
}

/// Queues the components of `path` so that they are popped first, in order.
fn push_front(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

/// ENOENT and ENOTDIR both mean "not there" for a lookup.
pub(crate) fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20)
}
