//! The event loop's timers: when a unit's backoff ends or its activation times out.
//!
//! A min-heap of `(when, unit slot)`, so a wake-up costs O(log n) in the number of
//! pending timers instead of a scan over every unit. Entries are never removed
//! when a unit's state changes: an entry whose unit no longer has that deadline is
//! stale and dropped when it reaches the top.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Pending deadlines by unit slot; see the module doc.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Deadlines {
    /// Notes that the unit in `slot` has a deadline at `when`.
    pub(super) fn push(&mut self, when: Instant, slot: usize) {
        self.heap.push(Reverse((when, slot)));
    }

    /// The earliest deadline still current; `current` gives a slot's deadline now.
    pub(super) fn next(&mut self, current: impl Fn(usize) -> Option<Instant>) -> Option<Instant> {
        while let Some(&Reverse((when, slot))) = self.heap.peek() {
            if current(slot) == Some(when) {
                return Some(when);
            }
            self.heap.pop();
        }
        None
    }

    /// Takes the slots whose current deadline is at or before `now`, each once,
    /// earliest first.
    pub(super) fn take_due(
        &mut self,
        now: Instant,
        current: impl Fn(usize) -> Option<Instant>,
    ) -> Vec<usize> {
        let mut due = Vec::new();
        while let Some(&Reverse((when, slot))) = self.heap.peek() {
            if when > now {
                break;
            }
            self.heap.pop();
            if current(slot) == Some(when) && !due.contains(&slot) {
                due.push(slot);
            }
        }
        due
    }

    /// Entries held, current or stale (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_slots_come_earliest_first_and_stale_entries_are_dropped() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut current = [Some(at(30)), Some(at(10)), Some(at(20))];
        let mut d = Deadlines::default();
        d.push(at(30), 0);
        d.push(at(10), 1);
        d.push(at(20), 2);
        // Unit 1 changed state (say its start returned): its deadline is stale.
        current[1] = None;
        let now = |slot: usize| current[slot];
        assert_eq!(d.next(now), Some(at(20)));
        assert_eq!(d.len(), 2, "the stale top was dropped");
        assert_eq!(d.take_due(at(25), now), vec![2]);
        assert_eq!(d.take_due(at(25), now), Vec::<usize>::new());
        assert_eq!(d.next(now), Some(at(30)));
        assert_eq!(d.take_due(at(40), now), vec![0]);
        assert_eq!(d.next(now), None);
    }

    #[test]
    fn a_deadline_moved_later_fires_only_at_its_new_time_and_once() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = Deadlines::default();
        d.push(at(10), 0);
        d.push(at(50), 0);
        d.push(at(50), 0);
        let current = |_| Some(at(50));
        assert_eq!(d.take_due(at(20), current), Vec::<usize>::new());
        assert_eq!(d.next(current), Some(at(50)));
        assert_eq!(d.take_due(at(60), current), vec![0]);
        assert_eq!(d.len(), 0);
    }
}
