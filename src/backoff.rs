//! The one shape of every retry pause in the server: a first pause that
//! doubles with each further failure, up to a cap. The accept loop, the
//! room password's throttle and the cluster's `Backoff` all take their
//! pauses from here.

use std::time::Duration;

/// The pause after `failures` failures in a row (the first failure waits
/// `first`), doubled each time, at most `max`. Never overflows.
pub(crate) fn doubling(first: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    first.saturating_mul(1 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_the_first_failure_up_to_the_cap() {
        let first = Duration::from_millis(5);
        let max = Duration::from_secs(1);
        let pauses: Vec<_> = (0..12).map(|n| doubling(first, max, n)).collect();
        assert_eq!(pauses[0], first);
        assert_eq!(pauses[1], first);
        assert_eq!(pauses[2], first * 2);
        assert_eq!(pauses[8], first * 128);
        assert_eq!(pauses[9], max);
        assert_eq!(doubling(first, max, u32::MAX), max);
    }
}
