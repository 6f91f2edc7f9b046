//! The guests of one plugin instance, by the host's id, each with the record of its
//! end: what every plugin that watches its guests on threads of its own keeps.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::sdk::{GuestExit, GuestId};

/// One started guest: plugin-specific data `T` and the record of its end, filled
/// by the thread that watches it.
#[derive(Debug)]
pub struct GuestSlot<T> {
    /// What the plugin keeps about this guest.
    pub data: T,
    exit: Mutex<Option<GuestExit>>,
    exited: Condvar,
}

impl<T> GuestSlot<T> {
    /// A slot for a guest that is running.
    pub fn new(data: T) -> Self {
        Self {
            data,
            exit: Mutex::new(None),
            exited: Condvar::new(),
        }
    }

    /// Records the guest's end and wakes every [`wait_exited`](Self::wait_exited).
    pub fn set_exited(&self, exit: GuestExit) {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(exit);
        self.exited.notify_all();
    }

    /// Whether the guest's end is recorded.
    pub fn has_exited(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Waits up to `timeout` for the guest's end to be recorded.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        let (exit, _) = self
            .exited
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        exit.is_some()
    }
}

/// The guests of one plugin instance, by the host's id.
#[derive(Debug)]
pub struct GuestTable<T> {
    guests: Arc<Mutex<HashMap<GuestId, Arc<GuestSlot<T>>>>>,
}

impl<T> Default for GuestTable<T> {
    fn default() -> Self {
        Self {
            guests: Arc::default(),
        }
    }
}

impl<T> Clone for GuestTable<T> {
    fn clone(&self) -> Self {
        Self {
            guests: Arc::clone(&self.guests),
        }
    }
}

impl<T> GuestTable<T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<GuestId, Arc<GuestSlot<T>>>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a running guest.
    pub fn insert(&self, id: GuestId, slot: Arc<GuestSlot<T>>) {
        self.lock().insert(id, slot);
    }

    /// The guest with this id, if it is still known.
    pub fn get(&self, id: GuestId) -> Option<Arc<GuestSlot<T>>> {
        self.lock().get(&id).cloned()
    }

    /// Forgets a guest; returns it if it was known.
    pub fn remove(&self, id: GuestId) -> Option<Arc<GuestSlot<T>>> {
        self.lock().remove(&id)
    }

    /// Every known guest.
    pub fn all(&self) -> Vec<(GuestId, Arc<GuestSlot<T>>)> {
        self.lock()
            .iter()
            .map(|(id, slot)| (*id, Arc::clone(slot)))
            .collect()
    }
}
