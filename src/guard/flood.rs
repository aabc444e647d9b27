//! Flood control: one connection's input budget.
//!
//! Every line a client sends costs the room far more than it cost the
//! sender: a 1-byte line becomes about 20 bytes (`IP:PORT: ` and the text) in
//! the queue and socket of each of n clients. So each connection gets a
//! token bucket for lines and one for bytes, refilled at `--flood-lines` and
//! `--flood-bytes` per second and holding at most `--flood-burst` seconds of
//! each. The reader charges the buckets **once per read**, after the read's
//! lines have gone out (never per line, never per recipient), and when the
//! client is over budget it simply *stops reading* until the debt is paid
//! off. The socket's receive buffer fills, TCP's window closes, and the
//! flooder's own writes block: the kernel pushes back on that one client and
//! nobody else waits for anything.
//!
//! A client that stays held back for `--flood-grace` without a break (its
//! input never catches up with its budget) is a flooder, not a paste: it is
//! told `error: flooding` and disconnected, as IRC servers do. A break is a
//! read that finds nothing waiting.
//!
//! [`FloodGate`] is pure bookkeeping on instants handed to it, so that the
//! timer-driven rules are tested on tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;

/// The budget every connection gets, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FloodLimits {
    /// Lines per second; 0 for no line budget.
    lines_per_sec: f64,
    /// Bytes per second; 0 for no byte budget.
    bytes_per_sec: f64,
    /// Seconds of budget a quiet client saves up.
    burst_secs: f64,
    grace: Option<Duration>,
}

impl FloodLimits {
    /// The configured budget, or `None` when flood control is off.
    pub(crate) fn from_config(config: &Config) -> Option<FloodLimits> {
        config.flood_enabled().then(|| FloodLimits {
            lines_per_sec: f64::from(config.flood_lines),
            bytes_per_sec: f64::from(config.flood_bytes),
            burst_secs: config.flood_burst.as_secs_f64(),
            grace: config.flood_grace,
        })
    }

    fn line_cap(&self) -> f64 {
        self.lines_per_sec * self.burst_secs
    }

    fn byte_cap(&self) -> f64 {
        self.bytes_per_sec * self.burst_secs
    }
}

/// What the reader does after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within budget: read on.
    Go,
    /// Over budget: read nothing more before this instant.
    HoldUntil(Instant),
    /// Held back for longer than the grace period: disconnect.
    Flooding,
}

/// One connection's buckets. Tokens may go negative: a read is taken whole
/// and its excess is a debt the client waits off, so the budget holds on
/// average whatever the size of the reads.
///
/// 48 bytes, part of every reader task: no rate or cap is stored here.
#[derive(Debug)]
pub(crate) struct FloodGate {
    lines: f64,
    bytes: f64,
    refilled: Instant,
    /// When the client went over budget, if it has not caught up since.
    held_since: Option<Instant>,
}

impl FloodGate {
    /// A full bucket: a client may send its burst straight after connecting.
    pub(crate) fn new(limits: &FloodLimits, now: Instant) -> FloodGate {
        FloodGate {
            lines: limits.line_cap(),
            bytes: limits.byte_cap(),
            refilled: now,
            held_since: None,
        }
    }

    /// Charges one read of `bytes` bytes that completed `lines` lines.
    pub(crate) fn charge(
        &mut self,
        limits: &FloodLimits,
        now: Instant,
        lines: usize,
        bytes: usize,
    ) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let mut debt_secs: f64 = 0.0;
        if limits.lines_per_sec > 0.0 {
            self.lines =
                (self.lines + elapsed * limits.lines_per_sec).min(limits.line_cap()) - lines as f64;
            debt_secs = debt_secs.max(-self.lines / limits.lines_per_sec);
        }
        if limits.bytes_per_sec > 0.0 {
            self.bytes =
                (self.bytes + elapsed * limits.bytes_per_sec).min(limits.byte_cap()) - bytes as f64;
            debt_secs = debt_secs.max(-self.bytes / limits.bytes_per_sec);
        }
        if debt_secs <= 0.0 {
            self.held_since = None;
            return Verdict::Go;
        }
        let until = now + Duration::from_secs_f64(debt_secs);
        let since = *self.held_since.get_or_insert(now);
        match limits.grace {
            // Decided as soon as the debt makes it certain, rather than
            // after reading (and broadcasting) for the rest of the grace.
            Some(grace) if until.saturating_duration_since(since) > grace => Verdict::Flooding,
            _ => Verdict::HoldUntil(until),
        }
    }

    /// A read found nothing waiting: the client's input has caught up with
    /// its budget, so the grace period starts afresh next time.
    pub(crate) fn caught_up(&mut self) {
        self.held_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(lines: u32, bytes: u32, burst_secs: u64, grace_secs: Option<u64>) -> FloodLimits {
        FloodLimits::from_config(&Config {
            flood_lines: lines,
            flood_bytes: bytes,
            flood_burst: Duration::from_secs(burst_secs),
            flood_grace: grace_secs.map(Duration::from_secs),
            ..Config::default()
        })
        .expect("flood control is on")
    }

    /// A client that always has input waiting: reads `lines` lines of
    /// `bytes` bytes each time the gate lets it, on the paused clock, until
    /// disconnected or `limit` passes. Returns how long it lasted and how
    /// many bytes it got through.
    async fn flood(
        limits: &FloodLimits,
        lines: usize,
        bytes: usize,
        limit: Duration,
    ) -> (Duration, usize, bool) {
        let start = Instant::now();
        let mut gate = FloodGate::new(limits, start);
        let mut through = 0;
        while start.elapsed() < limit {
            through += bytes;
            match gate.charge(limits, Instant::now(), lines, bytes) {
                Verdict::Go => tokio::task::yield_now().await,
                Verdict::HoldUntil(until) => tokio::time::sleep_until(until).await,
                Verdict::Flooding => return (start.elapsed(), through, true),
            }
        }
        (start.elapsed(), through, false)
    }

    #[tokio::test(start_paused = true)]
    async fn a_typist_is_never_held() {
        let limits = limits(500, 64 * 1024, 1, Some(10));
        let mut gate = FloodGate::new(&limits, Instant::now());
        // Ten lines a second, faster than anyone types, for a minute.
        for _ in 0..600 {
            assert_eq!(gate.charge(&limits, Instant::now(), 1, 80), Verdict::Go);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_paste_within_the_burst_goes_at_once() {
        let limits = limits(500, 64 * 1024, 1, Some(10));
        let mut gate = FloodGate::new(&limits, Instant::now());
        // 190 lines of code, 60 KiB, in eight reads with no time passing.
        for _ in 0..8 {
            assert_eq!(gate.charge(&limits, Instant::now(), 24, 7_500), Verdict::Go);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_paste_is_held_back_but_not_cut_off() {
        let limits = limits(500, 64 * 1024, 1, Some(10));
        let mut gate = FloodGate::new(&limits, Instant::now());
        let start = Instant::now();
        // 512 KiB of 128-byte lines in 8 KiB reads: the burst plus about
        // 7 s of budget.
        let mut held = false;
        for _ in 0..64 {
            match gate.charge(&limits, Instant::now(), 64, 8192) {
                Verdict::Go => {}
                Verdict::HoldUntil(until) => {
                    held = true;
                    tokio::time::sleep_until(until).await;
                }
                Verdict::Flooding => panic!("a 512 KiB paste was taken for a flood"),
            }
        }
        assert!(held, "512 KiB went through without being held back");
        let took = start.elapsed();
        assert!(
            (Duration::from_secs(6)..=Duration::from_secs(8)).contains(&took),
            "took {took:?}; expected about 7 s at 500 lines and 64 KiB a second after a burst of as much"
        );
        // The paste is over: the next read finds nothing, and the next paste
        // gets a fresh grace period.
        gate.caught_up();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(gate.charge(&limits, Instant::now(), 1, 10), Verdict::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooder_is_held_to_the_rate_then_cut_off_after_the_grace() {
        let limits = limits(500, 64 * 1024, 1, Some(10));
        let (lasted, through, cut) = flood(&limits, 64, 8192, Duration::from_secs(60)).await;
        assert!(cut, "never disconnected");
        // Cut off within one read's hold of the grace period.
        assert!(
            (Duration::from_secs(9)..=Duration::from_secs(11)).contains(&lasted),
            "disconnected after {lasted:?}"
        );
        // What got through is the burst plus the rate over that time.
        let allowed = 64 * 1024 * (1 + lasted.as_secs() as usize + 1);
        assert!(
            through <= allowed,
            "{through} bytes through, at most {allowed} allowed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tiny_lines_are_held_by_the_line_budget() {
        // 8 KiB of empty lines in one read is 8,192 lines: 16 s of a
        // 500-line budget, a flood however few bytes it is.
        let limits = limits(500, 64 * 1024, 1, Some(10));
        let (lasted, _, cut) = flood(&limits, 8192, 8192, Duration::from_secs(60)).await;
        assert!(
            cut && lasted < Duration::from_secs(1),
            "cut {cut} after {lasted:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_grace_a_flooder_is_only_held_back() {
        let limits = limits(0, 64 * 1024, 1, None);
        let (lasted, through, cut) = flood(&limits, 8192, 8192, Duration::from_secs(30)).await;
        assert!(!cut, "disconnected although --flood-grace is off");
        // 30 s at 64 KiB/s after a 64 KiB burst, give or take one read.
        let expected = 64 * 1024 * 31;
        assert!(
            through.abs_diff(expected) <= 8192,
            "{through} bytes through in {lasted:?}, expected about {expected}"
        );
    }

    #[test]
    fn zero_turns_it_off() {
        let config = Config {
            flood_lines: 0,
            flood_bytes: 0,
            ..Config::default()
        };
        assert_eq!(FloodLimits::from_config(&config), None);
    }
}
