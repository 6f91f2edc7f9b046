//! The start-loop guard: systemd's trigger limit, but with a backoff that recovers.
//!
//! systemd puts a socket unit that triggers too often into a failed state for good;
//! here the unit waits out a delay that doubles with each further hit and is
//! forgotten once a guest has stayed up for a whole trigger interval.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{BackoffPolicy, TriggerLimit};

/// Counts starts and decides when a unit must back off, and for how long.
#[derive(Debug, Clone)]
pub struct StartGuard {
    limit: TriggerLimit,
    policy: BackoffPolicy,
    starts: VecDeque<Instant>,
    /// How many backoffs in a row, without a guest that stayed up in between.
    step: u32,
}

/// A backoff the guard ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// How long to wait before listening again.
    pub delay: Duration,
    /// 1 for the first backoff in a row, 2 for the next, …
    pub step: u32,
}

impl StartGuard {
    /// A guard with the unit's limit and backoff policy.
    pub fn new(limit: TriggerLimit, policy: BackoffPolicy) -> Self {
        Self {
            limit,
            policy,
            starts: VecDeque::new(),
            step: 0,
        }
    }

    /// Records a start at `now`, or orders a backoff when the limit is reached.
    pub fn try_start(&mut self, now: Instant) -> Result<(), Backoff> {
        while self
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.limit.interval)
        {
            self.starts.pop_front();
        }
        let burst = usize::try_from(self.limit.burst).unwrap_or(usize::MAX);
        if self.starts.len() >= burst {
            self.starts.clear();
            return Err(self.next_backoff());
        }
        self.starts.push_back(now);
        Ok(())
    }

    /// A start failed outright (the plugin could not start the guest): back off.
    pub fn start_failed(&mut self) -> Backoff {
        self.next_backoff()
    }

    /// A guest stopped after running for `ran`; a long enough run ends the backoff series.
    pub fn guest_ran(&mut self, ran: Duration) {
        if ran >= self.limit.interval {
            self.step = 0;
        }
    }

    fn next_backoff(&mut self) -> Backoff {
        self.step = self.step.saturating_add(1);
        let factor = 1u32.checked_shl(self.step - 1).unwrap_or(u32::MAX);
        let delay = self
            .policy
            .initial
            .checked_mul(factor)
            .unwrap_or(self.policy.max)
            .min(self.policy.max);
        Backoff {
            delay,
            step: self.step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> StartGuard {
        StartGuard::new(
            TriggerLimit {
                interval: Duration::from_secs(2),
                burst: 3,
            },
            BackoffPolicy {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(5),
            },
        )
    }

    #[test]
    fn burst_then_growing_capped_backoff() {
        let mut g = guard();
        let t = Instant::now();
        let delays: Vec<u64> = (0..5)
            .map(|_| {
                for _ in 0..3 {
                    assert_eq!(g.try_start(t), Ok(()));
                }
                g.try_start(t).unwrap_err().delay.as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn starts_outside_the_interval_do_not_count() {
        let mut g = guard();
        let t = Instant::now();
        for i in 0..10 {
            assert_eq!(g.try_start(t + Duration::from_secs(i)), Ok(()), "start {i}");
        }
    }

    #[test]
    fn a_long_run_resets_the_series() {
        let mut g = guard();
        assert_eq!(g.start_failed().delay, Duration::from_secs(1));
        assert_eq!(g.start_failed().delay, Duration::from_secs(2));
        g.guest_ran(Duration::from_millis(500));
        assert_eq!(g.start_failed().step, 3);
        g.guest_ran(Duration::from_secs(2));
        assert_eq!(
            g.start_failed(),
            Backoff {
                delay: Duration::from_secs(1),
                step: 1
            }
        );
    }
}
