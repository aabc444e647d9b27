//! The room password (`--password-file`): the check of a client's first
//! line, and the per-address throttle on wrong guesses.
//!
//! The comparison is constant-time (`subtle`), so the time a verdict takes
//! says nothing about how much of a guess was right. Guessing is slowed
//! per IP address: after `k` wrong passwords in a row, the next verdict for
//! that address waits `250 ms * 2^(k-1)`, at most 10 s, and a client that
//! leaves meanwhile learns nothing. The table of addresses is bounded: past
//! [`MAX_TRACKED`] entries, those quiet for [`FORGET_AFTER`] are dropped,
//! and if that is not enough the table starts over (throttling fails open
//! rather than growing without bound).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::Password;

/// The first delay after a wrong password.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay.
const MAX_DELAY: Duration = Duration::from_secs(10);
/// An address that has not guessed wrong for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses tracked at most.
const MAX_TRACKED: usize = 10_000;

/// The password and the record of wrong guesses.
#[derive(Debug)]
pub(crate) struct Gate {
    password: Password,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Gate {
    pub(crate) fn new(password: Password) -> Gate {
        Gate {
            password,
            failures: Mutex::default(),
        }
    }

    /// How long the verdict for a guess from `ip` must wait.
    pub(crate) fn delay(&self, ip: Option<IpAddr>) -> Duration {
        let Some(ip) = ip else {
            return Duration::ZERO;
        };
        match self.failures.lock().get(&ip) {
            Some(failures) if failures.last.elapsed() < FORGET_AFTER => {
                crate::backoff::doubling(FIRST_DELAY, MAX_DELAY, failures.count)
            }
            _ => Duration::ZERO,
        }
    }

    /// Checks `attempt` and records the outcome for `ip`.
    pub(crate) fn check(&self, ip: Option<IpAddr>, attempt: &[u8]) -> bool {
        let right = self.password.matches(attempt);
        if let Some(ip) = ip {
            let mut failures = self.failures.lock();
            if right {
                failures.remove(&ip);
            } else {
                let now = Instant::now();
                if failures.len() >= MAX_TRACKED && !failures.contains_key(&ip) {
                    failures.retain(|_, seen| now.duration_since(seen.last) < FORGET_AFTER);
                    if failures.len() >= MAX_TRACKED {
                        failures.clear();
                    }
                }
                let entry = failures.entry(ip).or_insert(Failures {
                    count: 0,
                    last: now,
                });
                if now.duration_since(entry.last) >= FORGET_AFTER {
                    entry.count = 0;
                }
                entry.count = entry.count.saturating_add(1);
                entry.last = now;
            }
        }
        right
    }
}
