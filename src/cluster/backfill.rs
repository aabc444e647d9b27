//! `--history` across nodes: a node that starts (or restarts) fills its
//! history from the room's stream before it greets anyone.
//!
//! The consumer starts a new node at the stream's end, so without this a
//! restarted node's newcomers would see only what was said since. Here the
//! node reads the stream backwards from its last message, one stored batch
//! at a time (`STREAM.MSG.GET`, which nats-server 2.9 serves), until it
//! holds `--history` lines or `--history-bytes` bytes of chat or reaches
//! the stream's start, and appends those lines to the history in stream
//! order without delivering them to anyone. The consumer then starts right
//! after the last message read, so nothing falls between the two.
//!
//! Until the fill is done, [`Filled`] holds every join (the lobby's
//! greeting waits); the fill gives up after [`FILL_WITHIN`] (a broker that
//! cannot be reached at start), logs it, and the node starts with an empty
//! history and reads the stream from its end as without `--history`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::connection::{ensure_stream, epoch_of, wait_for_connection, Connection, Subjects};
use super::{wire, Shared};
use crate::protocol::Message;
use crate::room::history::History;

/// How long a starting node may hold its first greetings while it fills
/// its history from the broker.
pub(super) const FILL_WITHIN: Duration = Duration::from_secs(5);

/// Whether the node's history is filled (or will not be): joins wait for it.
#[derive(Debug)]
pub(crate) struct Filled(watch::Sender<bool>);

impl Filled {
    /// Filled already when there is nothing to fill.
    pub(crate) fn new(history: bool) -> Filled {
        Filled(watch::channel(!history).0)
    }

    /// Waits until the history is filled or the fill gave up.
    pub(crate) async fn wait(&self) {
        let mut filled = self.0.subscribe();
        // An error means the sender is gone, which it never is while the
        // node (which owns it) lives.
        let _ = filled.wait_for(|filled| *filled).await;
    }

    fn done(&self) {
        self.0.send_replace(true);
    }
}

/// Fills `history` from the stream, then lets joins in. Returns the last
/// stream sequence read, for the consumer to start after; `None` if there
/// was nothing to fill or the fill gave up (the consumer then starts at the
/// stream's end, as it always did).
pub(super) async fn fill(
    shared: &Shared,
    history: Option<&Arc<History>>,
    mut connection: watch::Receiver<Option<Connection>>,
) -> Option<(String, u64)> {
    let history = history?;
    let names = Subjects::new(&shared.config.room);
    let filling = async {
        let connection = wait_for_connection(&mut connection, &shared.stop).await?;
        read_back(&connection, shared, &names, history).await
    };
    let read = tokio::time::timeout(FILL_WITHIN, filling).await;
    shared.history_filled.done();
    match read {
        Ok(Some((epoch, last, lines))) => {
            info!(
                lines,
                last_sequence = last,
                "history filled from the room's stream"
            );
            Some((epoch, last))
        }
        Ok(None) => None,
        Err(_) => {
            warn!(
                within = ?FILL_WITHIN,
                "history not filled: the room's broker did not answer in time; greeting newcomers with what this node hears from now on"
            );
            None
        }
    }
}

/// Reads the stream backwards until the history is full; appends what it
/// read in stream order. Returns the stream's epoch, its last sequence and
/// the lines appended.
async fn read_back(
    connection: &Connection,
    shared: &Shared,
    names: &Subjects,
    history: &History,
) -> Option<(String, u64, usize)> {
    let mut stream = match ensure_stream(connection, shared, names).await {
        Ok(stream) => stream,
        Err(err) => {
            warn!(cause = %err, "history not filled: cannot open the room's stream");
            return None;
        }
    };
    let (epoch, state) = match stream.info().await {
        Ok(info) => (epoch_of(info), info.state.clone()),
        Err(err) => {
            warn!(cause = %err, "history not filled: cannot read the room's stream");
            return None;
        }
    };
    let (want_lines, want_bytes) = history.bounds();
    let mut newest_first: Vec<Message> = Vec::new();
    let (mut lines, mut bytes) = (0usize, 0usize);
    // A batch stored twice (a retry past the de-duplication window) counts once.
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut sequence = state.last_sequence;
    while sequence >= state.first_sequence.max(1) && lines < want_lines && bytes < want_bytes {
        // A message deleted or expired since `info` is simply not there.
        if let Ok(stored) = stream.get_raw_message(sequence).await {
            if stored.subject.as_str() == names.events {
                if let Ok(decoded) = wire::decode_batch(&stored.payload) {
                    if seen.insert((decoded.node.clone(), decoded.batch)) {
                        for event in decoded.events.into_iter().rev() {
                            if let wire::Change::Lines(_, message) = event.change {
                                lines += message.lines();
                                bytes += message.len();
                                newest_first.push(message);
                            }
                        }
                    }
                }
            }
        }
        sequence -= 1;
    }
    let appended = lines.min(want_lines);
    for message in newest_first.iter().rev() {
        history.append(message);
    }
    Some((epoch, state.last_sequence, appended))
}
