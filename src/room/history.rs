//! The room's recent chat lines (`--history N`), and the snapshot a
//! newcomer gets of them.
//!
//! The history keeps the [`Message`]s the hub fanned out, as they were
//! formatted then (the sender as shown then, the text as sanitised then):
//! a kept line is one more reference to the shared text, never a copy,
//! except when a bound cuts into the oldest message (a read's worth of one
//! sender's lines), whose remaining lines are then copied once. It keeps
//! chat lines only: arrivals and departures are not history (a bare `nc`
//! user would see a screen of comings and goings, and reconnecting would
//! push the room's words out without costing any flood budget).
//!
//! It is bounded by lines (`--history`) and by bytes (`--history-bytes`),
//! oldest out first, and counts what it holds for the metrics and for
//! `--max-client-memory` ([`History::bytes`]). Each appended message gets
//! the next room sequence number ([`Message::seq`]); a [`Snapshot`] says
//! the last one it holds.
//!
//! Which lock or step makes "append and fan out" atomic with "snapshot and
//! start receiving" is each model's business (ARCHITECTURE.md, "What was
//! said"); the history's own mutex only keeps its deque whole, and
//! [`History::append_with`] and [`History::snapshot_with`] let a model run
//! its own step under it (the `broadcast` model does).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::config::Config;
use crate::protocol::Message;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct History {
    ring: Mutex<Ring>,
    max_lines: usize,
    max_bytes: usize,
    /// Copies of the ring's counts, for readers that must not take its
    /// lock (a metrics scrape, the memory housekeeping).
    lines: AtomicUsize,
    bytes: AtomicUsize,
}

#[derive(Debug, Default)]
struct Ring {
    messages: VecDeque<Message>,
    lines: usize,
    bytes: usize,
    last_seq: u64,
}

/// What a newcomer is shown: the room's last lines, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub messages: Vec<Message>,
    /// Lines in `messages`.
    pub lines: usize,
    /// Bytes in `messages`.
    pub bytes: usize,
    /// The sequence number of the newest message held (0: none ever).
    pub last_seq: u64,
}

impl History {
    /// `None` unless `--history` is on.
    pub(crate) fn new(config: &Config) -> Option<History> {
        (config.history > 0).then(|| History {
            ring: Mutex::default(),
            max_lines: config.history,
            max_bytes: config.history_bytes,
            lines: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        })
    }

    /// Appends a message of chat lines; returns its sequence number.
    pub(crate) fn append(&self, message: &Message) -> u64 {
        self.append_with(message, || ()).0
    }

    /// Appends `message` and runs `then` before anyone can snapshot.
    pub(crate) fn append_with<R>(&self, message: &Message, then: impl FnOnce() -> R) -> (u64, R) {
        let mut ring = self.ring.lock();
        ring.last_seq += 1;
        let seq = ring.last_seq;
        message.set_seq(seq);
        ring.lines += message.lines();
        ring.bytes += message.len();
        ring.messages.push_back(message.clone());
        self.trim(&mut ring);
        self.lines.store(ring.lines, Ordering::Relaxed);
        self.bytes.store(ring.bytes, Ordering::Relaxed);
        let result = then();
        (seq, result)
    }

    /// What a newcomer is shown now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        self.snapshot_with(|| ()).0
    }

    /// Takes a snapshot and runs `then` before anyone can append.
    pub(crate) fn snapshot_with<R>(&self, then: impl FnOnce() -> R) -> (Snapshot, R) {
        let ring = self.ring.lock();
        let snapshot = Snapshot {
            messages: ring.messages.iter().cloned().collect(),
            lines: ring.lines,
            bytes: ring.bytes,
            last_seq: ring.last_seq,
        };
        let result = then();
        (snapshot, result)
    }

    /// The most lines and bytes it holds (`--history`, `--history-bytes`).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn bounds(&self) -> (usize, usize) {
        (self.max_lines, self.max_bytes)
    }

    /// Lines held.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn lines(&self) -> usize {
        self.lines.load(Ordering::Relaxed)
    }

    /// Bytes of text held (the messages' allocations are a few words more
    /// each; ARCHITECTURE.md gives the measured bytes per line).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Drops the oldest lines until both bounds hold.
    fn trim(&self, ring: &mut Ring) {
        loop {
            let excess_lines = ring.lines.saturating_sub(self.max_lines);
            let excess_bytes = ring.bytes.saturating_sub(self.max_bytes);
            if excess_lines == 0 && excess_bytes == 0 {
                return;
            }
            let Some(oldest) = ring.messages.front() else {
                return;
            };
            let lines = oldest.lines();
            let skip = excess_lines.max(lines_covering(oldest, excess_bytes));
            if skip >= lines {
                ring.lines -= lines;
                ring.bytes -= oldest.len();
                ring.messages.pop_front();
                continue;
            }
            let rest = oldest.without_first_lines(skip);
            ring.lines -= skip;
            ring.bytes -= oldest.len() - rest.len();
            ring.messages[0] = rest;
        }
    }
}

/// How many of `message`'s first lines hold at least `bytes` bytes (all of
/// them if they hold fewer).
fn lines_covering(message: &Message, bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    let mut lines = 0;
    for newline in memchr::memchr_iter(b'\n', message.as_bytes()) {
        lines += 1;
        if newline + 1 >= bytes {
            return lines;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChatBatch;

    fn history(lines: usize, bytes: usize) -> History {
        History::new(&Config {
            history: lines,
            history_bytes: bytes,
            ..Config::default()
        })
        .unwrap()
    }

    fn said(who: &str, lines: &[&str]) -> Message {
        let mut batch = ChatBatch::default();
        for line in lines {
            batch.push(who, line.as_bytes());
        }
        batch.take().unwrap()
    }

    fn shown(snapshot: &Snapshot) -> String {
        snapshot.messages.iter().map(Message::as_str).collect()
    }

    #[test]
    fn keeps_the_last_lines_cutting_into_a_batch() {
        let history = history(3, 1 << 20);
        let first = said("a", &["1", "2"]);
        history.append(&first);
        history.append(&said("b", &["3", "4"]));
        let snapshot = history.snapshot();
        assert_eq!(shown(&snapshot), "a: 2\nb: 3\nb: 4\n");
        assert_eq!((snapshot.lines, snapshot.last_seq), (3, 2));
        assert_eq!(snapshot.messages[0].seq(), 1);
        assert_eq!(history.lines(), 3);
        assert_eq!(history.bytes(), snapshot.bytes);
        // The live message is untouched: only the history's copy was cut.
        assert_eq!(first.as_str(), "a: 1\na: 2\n");
    }

    #[test]
    fn keeps_at_most_the_bytes() {
        let history = history(100, 12);
        history.append(&said("a", &["1", "2", "3"]));
        assert_eq!(shown(&history.snapshot()), "a: 2\na: 3\n");
        history.append(&said("b", &["long line"]));
        assert_eq!(shown(&history.snapshot()), "");
        assert_eq!((history.lines(), history.bytes()), (0, 0));
        history.append(&said("c", &["x"]));
        assert_eq!(shown(&history.snapshot()), "c: x\n");
    }

    #[test]
    fn shares_the_text_it_keeps() {
        let history = history(10, 1 << 20);
        let message = said("a", &["hi"]);
        history.append(&message);
        let snapshot = history.snapshot();
        assert_eq!(
            snapshot.messages[0].as_bytes().as_ptr(),
            message.as_bytes().as_ptr()
        );
        assert_eq!(message.seq(), 1);
    }
}
