//! The one retry policy of the backplane: exponential pauses between tries
//! of a broker operation, capped at `--cluster-reconnect-max` (at
//! [`JETSTREAM_RETRY_MAX`] for the publisher's and consumer's calls), and the
//! logging of an outage (its first failure at `warn`, its end at `info`,
//! every retry in between at `debug`), so that a broker that is away for an
//! hour writes two log lines, not thousands.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest pause of the publisher and the consumer between tries of
/// a JetStream call (their other waits are for the connection itself, in
/// `connection::until_connected`). Such a call fails while the client is
/// connected when a stream has no leader (a JetStream cluster electing a
/// new one after losing a server): each try already waited up to
/// `--cluster-ack-timeout`, and a longer pause only adds to the silence
/// after the election. Two tries a second per task cost the broker nothing.
pub(crate) const JETSTREAM_RETRY_MAX: Duration = Duration::from_millis(500);

/// Pauses that double from `first` up to `max`, and the outage they belong to.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// The pause before try `attempt + 1` (0 after no failure yet): what
    /// the NATS client's own reconnect callback uses too.
    pub(crate) fn delay(first: Duration, max: Duration, attempt: u32) -> Duration {
        crate::backoff::doubling(first, max, attempt.saturating_add(1))
    }

    /// Records a failure of `what`; logs it if it starts an outage.
    pub(crate) fn failed(&mut self, what: &str, err: &dyn std::fmt::Display) {
        if self.failures == 0 {
            warn!(cause = %err, "{what} failed; retrying until the broker is back");
        } else {
            debug!(cause = %err, failures = self.failures, "{what} failed again");
        }
        self.failures = self.failures.saturating_add(1);
    }

    /// Records a failure that needs no log line of its own.
    pub(crate) fn failed_quietly(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// `what` worked: ends the outage (and says so, if there was one).
    pub(crate) fn succeeded(&mut self, what: &str) {
        if self.failures > 0 {
            info!(failures = self.failures, "{what}: the broker is back");
            self.failures = 0;
        }
    }

    /// Sleeps for the current pause; true if `stop` was cancelled meanwhile.
    pub(crate) async fn pause(&self, stop: &CancellationToken) -> bool {
        let pause = Backoff::delay(self.first, self.max, self.failures.saturating_sub(1));
        tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(pause) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap() {
        let first = Duration::from_millis(20);
        let max = Duration::from_secs(2);
        let pauses: Vec<_> = (0..10).map(|n| Backoff::delay(first, max, n)).collect();
        assert_eq!(pauses[0], first);
        assert_eq!(pauses[1], first * 2);
        assert_eq!(pauses[6], Duration::from_millis(1280));
        assert_eq!(pauses[7], max);
        assert_eq!(Backoff::delay(first, max, u32::MAX), max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_follows_the_failures() {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let stop = CancellationToken::new();
        let start = tokio::time::Instant::now();
        backoff.failed_quietly();
        assert!(!backoff.pause(&stop).await);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        backoff.failed_quietly();
        backoff.failed_quietly();
        assert!(!backoff.pause(&stop).await);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        stop.cancel();
        assert!(backoff.pause(&stop).await);
    }
}
