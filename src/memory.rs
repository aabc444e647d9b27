//! Giving memory back to the operating system after a burst.
//!
//! Two kinds of burst leave the heap far larger than what is in use:
//!
//! - **Departures.** When thousands of clients leave at once, their state is
//!   freed. Measured with `chat-load idle -n 5000`, the server stayed at
//!   48 MB resident with no client left, against 7 MB once `malloc_trim` ran.
//! - **Backlogs.** When thousands arrive at once, each arrival is announced
//!   to everyone present and the queues briefly hold millions of entries
//!   (23 MB of queue buffers at the peak of that storm, with one worker).
//!   The writers free those buffers as they catch up, but glibc keeps the
//!   pages: 34 MB resident for 10.5 MB in use, against 20 MB after a trim.
//!
//! glibc returns free pages in the middle of its heaps only when asked
//! (`malloc_trim`), and asking walks the whole heap, so it is worth doing
//! once a burst is over, not on every free. The queues and writers report
//! every large buffer they free to [`note_released`]; the accept loop calls
//! [`Trimmer::observe`] every 250 ms and trims when either kind of burst
//! has ended, and then also unmaps the idle slabs of the queues' large
//! buffers, which live outside the heap (`room::backlog`).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of large buffers freed since the housekeeper last looked.
static RELEASED: AtomicUsize = AtomicUsize::new(0);

/// Frees smaller than this are not counted: they cannot free a page on their
/// own, and counting them would put a shared atomic on the per-message path.
pub(crate) const NOTEWORTHY: usize = 1024;

/// Reports that a buffer of `bytes`, grown for a backlog, has been freed.
pub(crate) fn note_released(bytes: usize) {
    if bytes >= NOTEWORTHY {
        RELEASED.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The bytes reported to [`note_released`] since the last call.
pub(crate) fn take_released() -> usize {
    RELEASED.swap(0, Ordering::Relaxed)
}

/// A drop in connections smaller than this is not worth walking the heap for.
const MIN_DROP: usize = 256;

/// Backlog buffers freed since the last trim below this are not worth
/// walking the heap for.
const MIN_RELEASED: usize = 4 << 20;

/// Why [`Trimmer::observe`] returned memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    /// This many clients left since the peak.
    Departures(usize),
    /// This many bytes of backlog buffers were freed since the last trim.
    Backlogs(usize),
}

/// Decides, from periodic observations, when a trim is worth it.
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    peak: usize,
    /// Backlog bytes freed since the last trim.
    released: usize,
    /// The most freed in one period since the last trim.
    busiest: usize,
}

impl Trimmer {
    /// Called periodically with the current number of connections and the
    /// backlog bytes freed since the previous call; returns why it trimmed,
    /// if it did.
    pub(crate) fn observe(&mut self, connections: usize, released: usize) -> Option<Trim> {
        let trim = self.decide(connections, released);
        if trim.is_some() {
            release_free_memory();
        }
        trim
    }

    fn decide(&mut self, connections: usize, released: usize) -> Option<Trim> {
        self.peak = self.peak.max(connections);
        self.released += released;
        self.busiest = self.busiest.max(released);
        let gone = self.peak - connections;
        if gone >= MIN_DROP && connections <= self.peak / 2 {
            self.peak = connections;
            self.released = 0;
            self.busiest = 0;
            return Some(Trim::Departures(gone));
        }
        // A burst is over when freeing has fallen well below its busiest
        // period. Steady traffic frees at a steady pace and is never
        // trimmed: the memory it frees is about to be needed again, and
        // handing those pages back would only fault them in anew.
        if self.released >= MIN_RELEASED && released < self.busiest / 4 {
            self.busiest = 0;
            return Some(Trim::Backlogs(std::mem::take(&mut self.released)));
        }
        None
    }
}

/// Returns free heap pages to the operating system, where the allocator
/// supports it (glibc); elsewhere it does nothing.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases memory that
    // the allocator already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn trims_only_after_a_large_drop() {
        let mut trim = Trimmer::default();
        assert_eq!(trim.decide(100, 0), None);
        assert_eq!(
            trim.decide(0, 0),
            None,
            "a small server emptying is not worth it"
        );
        assert_eq!(trim.decide(5000, 0), None);
        assert_eq!(
            trim.decide(4000, 0),
            None,
            "a fifth leaving is churn, not a burst"
        );
        assert_eq!(trim.decide(2000, 0), Some(Trim::Departures(3000)));
        assert_eq!(trim.decide(1900, 0), None, "the peak restarts after a trim");
    }

    #[test]
    fn trims_once_a_backlog_burst_is_over() {
        let mut trim = Trimmer::default();
        assert_eq!(trim.decide(5000, 3 * MIB), None);
        assert_eq!(
            trim.decide(5000, 8 * MIB),
            None,
            "still freeing: the burst goes on"
        );
        assert_eq!(trim.decide(5000, 3 * MIB), None, "slowing, not over");
        assert_eq!(trim.decide(5000, MIB), Some(Trim::Backlogs(15 * MIB)));
        assert_eq!(
            trim.decide(5000, 0),
            None,
            "the count restarts after a trim"
        );
    }

    #[test]
    fn a_small_burst_is_not_worth_a_trim() {
        let mut trim = Trimmer::default();
        assert_eq!(trim.decide(100, 3 * MIB), None);
        assert_eq!(trim.decide(100, 0), None);
    }

    #[test]
    fn steady_freeing_is_never_trimmed() {
        let mut trim = Trimmer::default();
        for period in 0..100 {
            assert_eq!(trim.decide(500, 2 * MIB), None, "period {period}");
        }
        assert_eq!(
            trim.decide(500, 0),
            Some(Trim::Backlogs(200 * MIB)),
            "until it stops"
        );
    }

    #[test]
    fn small_frees_are_not_counted() {
        note_released(NOTEWORTHY - 1);
        // Other tests in this binary may count concurrently, so only check
        // that the small one alone did not register.
        let counted = take_released();
        assert!(counted == 0 || counted >= NOTEWORTHY);
    }
}
