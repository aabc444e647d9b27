//! What nodes say to each other through the broker, and the checks every
//! message from the broker passes before a client sees anything of it.
//!
//! Three kinds of broker message, the first two JSON with a version number:
//! - a [`Batch`] on the room's stream: one node's events (arrivals, one
//!   read's worth of lines each, departures, its whole client list as a
//!   [`Event::Roster`] when another node asks for it, and its leaving) in
//!   the order it made them, each numbered by the node;
//! - a [`Heartbeat`] on plain NATS (not stored): "node X is alive, its last
//!   event is number N and it has C clients", a few dozen bytes whatever
//!   C is: the list itself travels only in the stream, when it changes;
//! - a sync request on plain NATS (`chat.<room>.sync.<node>`, any payload,
//!   never read): "node X, put your roster on the stream".
//!
//! Nothing from the broker is trusted: another version, a hand-published
//! message or a buggy node could send anything. [`decode_batch`] turns a
//! stored batch into [`Message`]s by the same rules the session applies
//! to a client's input: names must be `IP:PORT` (or names the lobby would
//! accept), every line must carry its
//! sender's prefix, and the text is sanitised again (a no-op on text that
//! was sanitised at its origin, so lines read exactly as they were sent).

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::protocol::{check_name, ChatBatch, Message};

/// Bumped on any change a node of the previous version would misread;
/// messages of another version count as garbage.
pub(crate) const VERSION: u32 = 2;

/// The largest broker message we publish or accept. NATS's default
/// `max_payload` is 1 MiB; staying under it leaves room for headers.
pub(crate) const MAX_PAYLOAD: usize = 1000 * 1024;

/// A batch grows to about this many bytes before it is sent: several reads
/// ride one broker message when they queue up, and a retry resends no more.
pub(crate) const BATCH_TARGET: usize = 256 * 1024;

/// One thing that happened on a node, as the other nodes need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Event {
    /// `who has arrived`.
    Arrived { seq: u64, who: Arc<str> },
    /// One read's lines, formatted (`who: text\n` each) and sanitised.
    Lines {
        seq: u64,
        who: Arc<str>,
        text: Arc<str>,
    },
    /// `who has left` (also sent when the node shuts down).
    Left { seq: u64, who: Arc<str> },
    /// Every client of the node as of this event (its event number `seq`
    /// included): sent when another node asks (it heard of this node but
    /// not its clients), when this node dropped events from a full
    /// `--cluster-buffer` (the others' copy is then wrong), and as a node's
    /// first event.
    Roster { seq: u64, clients: Vec<Arc<str>> },
    /// The node is shutting down: its departures came before this, and
    /// nothing follows. The others forget it instead of waiting for its
    /// silence.
    Leaving { seq: u64 },
}

impl Event {
    /// Whether the event is something said or done in the room (an
    /// arrival, lines, a departure), which the counters count, rather than
    /// the bookkeeping of membership (a roster, a leaving).
    pub(crate) fn is_chat(&self) -> bool {
        matches!(
            self,
            Event::Arrived { .. } | Event::Lines { .. } | Event::Left { .. }
        )
    }

    /// Bytes the event takes in a buffer, roughly as it goes on the wire.
    pub(crate) fn weight(&self) -> usize {
        match self {
            Event::Arrived { who, .. } | Event::Left { who, .. } => 48 + who.len(),
            Event::Lines { who, text, .. } => 48 + who.len() + text.len(),
            Event::Roster { clients, .. } => {
                48 + clients.iter().map(|who| who.len() + 3).sum::<usize>()
            }
            Event::Leaving { .. } => 32,
        }
    }
}

/// A stored broker message: events of one node, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Batch {
    pub v: u32,
    pub node: String,
    /// The node's batch number; with `node` it is the JetStream message id,
    /// so a batch sent twice is stored once.
    pub batch: u64,
    pub events: Vec<Event>,
}

impl Batch {
    pub(crate) fn message_id(&self) -> String {
        format!("{}-{}", self.node, self.batch)
    }
}

/// A node's liveness message (plain NATS, not stored): a few dozen bytes
/// however many clients the node has (at most [`HEARTBEAT_MAX`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Heartbeat {
    pub v: u32,
    pub node: String,
    /// The node's last event number.
    pub seq: u64,
    /// How many clients it has (for the operator and the logs; the list is
    /// on the stream).
    pub clients: u64,
}

/// The largest heartbeat: every field at its widest (a 16-digit node id,
/// two `u64`s of 20 digits) and JSON's punctuation.
pub(crate) const HEARTBEAT_MAX: usize = 96;

/// Why a broker message was dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Garbage {
    #[error("{0} bytes, over the limit for its kind")]
    TooLarge(usize),
    #[error("does not decode: {0}")]
    Undecodable(#[from] serde_json::Error),
    #[error("version {0}, expected {VERSION}")]
    Version(u32),
    #[error("bad node id")]
    Node,
    #[error("bad client name")]
    Who,
    #[error("a line without its sender's prefix")]
    Prefix,
}

/// A stored batch that passed every check.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub node: String,
    pub batch: u64,
    pub events: Vec<Checked>,
}

/// An event that passed every check, with its node's number for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub seq: u64,
    pub change: Change,
}

/// What a checked event is: the lines as local clients are sent them, the
/// rest as changes to the node's roster (announced by [`super::roster`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Arrived(Arc<str>),
    Left(Arc<str>),
    Lines(Arc<str>, Message),
    Roster(Vec<Arc<str>>),
    Leaving,
}

/// Node ids are what [`new_node_id`] makes: 16 hex digits.
fn valid_node(node: &str) -> bool {
    node.len() == 16 && node.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A client name must be what a node names its clients: `IP:PORT`, or
/// under `--names` a name the lobby accepts.
fn valid_who(who: &str) -> bool {
    who.len() <= 64 && (who.parse::<SocketAddr>().is_ok() || check_name(who.as_bytes()).is_some())
}

/// Decodes and checks a stored batch. All or nothing: one bad event makes
/// the whole batch garbage, so a client never sees half of a bad message.
pub(crate) fn decode_batch(payload: &[u8]) -> Result<Decoded, Garbage> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Garbage::TooLarge(payload.len()));
    }
    let batch: Batch = serde_json::from_slice(payload)?;
    if batch.v != VERSION {
        return Err(Garbage::Version(batch.v));
    }
    if !valid_node(&batch.node) {
        return Err(Garbage::Node);
    }
    let mut checked = Vec::with_capacity(batch.events.len());
    for event in batch.events {
        checked.push(check(event)?);
    }
    Ok(Decoded {
        node: batch.node,
        batch: batch.batch,
        events: checked,
    })
}

fn check(event: Event) -> Result<Checked, Garbage> {
    let (seq, who, change) = match event {
        Event::Arrived { seq, who } => (seq, Arc::clone(&who), Change::Arrived(who)),
        Event::Left { seq, who } => (seq, Arc::clone(&who), Change::Left(who)),
        Event::Roster { seq, clients } => {
            if !clients.iter().all(|who| valid_who(who)) {
                return Err(Garbage::Who);
            }
            return Ok(Checked {
                seq,
                change: Change::Roster(clients),
            });
        }
        Event::Leaving { seq } => {
            return Ok(Checked {
                seq,
                change: Change::Leaving,
            })
        }
        Event::Lines { seq, who, text } => {
            if !valid_who(&who) {
                return Err(Garbage::Who);
            }
            let prefix = format!("{who}: ");
            let mut batch = ChatBatch::default();
            for line in text.split_terminator('\n') {
                let body = line.strip_prefix(&prefix).ok_or(Garbage::Prefix)?;
                batch.push(&who, body.as_bytes());
            }
            let message = batch.take().ok_or(Garbage::Prefix)?;
            (seq, Arc::clone(&who), Change::Lines(who, message))
        }
    };
    if !valid_who(&who) {
        return Err(Garbage::Who);
    }
    Ok(Checked { seq, change })
}

/// Decodes and checks a heartbeat.
pub(crate) fn decode_heartbeat(payload: &[u8]) -> Result<Heartbeat, Garbage> {
    if payload.len() > HEARTBEAT_MAX {
        return Err(Garbage::TooLarge(payload.len()));
    }
    let heartbeat: Heartbeat = serde_json::from_slice(payload)?;
    if heartbeat.v != VERSION {
        return Err(Garbage::Version(heartbeat.v));
    }
    if !valid_node(&heartbeat.node) {
        return Err(Garbage::Node);
    }
    Ok(heartbeat)
}

/// A heartbeat as it goes on the wire.
pub(crate) fn encode_heartbeat(node: &str, seq: u64, clients: u64) -> Vec<u8> {
    serde_json::to_vec(&Heartbeat {
        v: VERSION,
        node: node.to_string(),
        seq,
        clients,
    })
    .unwrap_or_default()
}

/// A fresh node id: a restarted node is a new node, never mistaken for
/// the one before it (whose clients the others announce as gone). 64 bits
/// from the OS's randomness, through `ring` (already built for rustls).
pub(crate) fn new_node_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // No OS randomness (never seen on a supported platform): the
        // process's hash seed, pid and clock still make a collision unlikely.
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(now.as_nanos());
        }
        bytes = hasher.finish().to_be_bytes();
    }
    format!("{:016x}", u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(events: Vec<Event>) -> Vec<u8> {
        serde_json::to_vec(&Batch {
            v: VERSION,
            node: "0123456789abcdef".into(),
            batch: 1,
            events,
        })
        .unwrap_or_default()
    }

    #[test]
    fn lines_round_trip_exactly() {
        let mut lines = ChatBatch::default();
        lines.push("1.2.3.4:5", b"hello \x1b[2J world");
        lines.push("1.2.3.4:5", "caf\u{e9} \t ok".as_bytes());
        let Some(sent) = lines.take() else {
            panic!("no message")
        };
        let payload = batch(vec![Event::Lines {
            seq: 1,
            who: "1.2.3.4:5".into(),
            text: sent.as_str().into(),
        }]);
        let decoded = decode_batch(&payload).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            decoded.events[0].change,
            Change::Lines("1.2.3.4:5".into(), sent)
        );
    }

    #[test]
    fn unsanitised_or_forged_text_is_caught() {
        // Escape sequences are re-sanitised, not passed through.
        let payload = batch(vec![Event::Lines {
            seq: 1,
            who: "1.2.3.4:5".into(),
            text: "1.2.3.4:5: \u{1b}[2J\n".into(),
        }]);
        let decoded = decode_batch(&payload).unwrap_or_else(|err| panic!("{err}"));
        assert!(
            matches!(&decoded.events[0].change, Change::Lines(_, shown) if shown.as_str() == "1.2.3.4:5: ^[[2J\n")
        );
        // A line claiming another sender.
        let payload = batch(vec![Event::Lines {
            seq: 1,
            who: "1.2.3.4:5".into(),
            text: "1.2.3.4:5: ok\n6.6.6.6:6: forged\n".into(),
        }]);
        assert!(matches!(decode_batch(&payload), Err(Garbage::Prefix)));
        // A name that is not IP:PORT.
        let payload = batch(vec![Event::Arrived {
            seq: 1,
            who: "root has left\nx".into(),
        }]);
        assert!(matches!(decode_batch(&payload), Err(Garbage::Who)));
        assert!(decode_batch(b"\xff\x00garbage").is_err());
        assert!(
            decode_batch(br#"{"v":1,"node":"0123456789abcdef","batch":1,"events":[]}"#).is_err()
        );
    }

    #[test]
    fn chosen_names_pass_but_not_anything() {
        let payload = batch(vec![
            Event::Arrived {
                seq: 1,
                who: "ann".into(),
            },
            Event::Lines {
                seq: 2,
                who: "ann".into(),
                text: "ann: hi\n".into(),
            },
        ]);
        let decoded = decode_batch(&payload).unwrap_or_else(|err| panic!("{err}"));
        assert!(
            matches!(&decoded.events[1].change, Change::Lines(_, shown) if shown.as_str() == "ann: hi\n")
        );
        for bad in ["two words", "caf\u{e9}", "a,b", ""] {
            let payload = batch(vec![Event::Left {
                seq: 1,
                who: bad.into(),
            }]);
            assert!(
                matches!(decode_batch(&payload), Err(Garbage::Who)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_roster_with_a_bad_name_is_garbage() {
        let payload = batch(vec![Event::Roster {
            seq: 1,
            clients: vec!["1.2.3.4:5".into(), "bad name".into()],
        }]);
        assert!(matches!(decode_batch(&payload), Err(Garbage::Who)));
        let payload = batch(vec![
            Event::Roster {
                seq: 1,
                clients: vec!["1.2.3.4:5".into()],
            },
            Event::Leaving { seq: 2 },
        ]);
        let decoded = decode_batch(&payload).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(decoded.events[1].change, Change::Leaving);
    }

    /// Finding 4 of issue 18: a heartbeat carried the node's whole list
    /// (163 KB at 8,000 clients). Now its size does not depend on it.
    #[test]
    fn heartbeat_size_is_constant() {
        let node = new_node_id();
        let none = encode_heartbeat(&node, 0, 0);
        let many = encode_heartbeat(&node, 100_000, 100_000);
        let widest = encode_heartbeat(&node, u64::MAX, u64::MAX);
        assert!(none.len() <= many.len() && many.len() <= widest.len());
        assert!(
            many.len() - none.len() <= 10,
            "{} {}",
            none.len(),
            many.len()
        );
        assert!(widest.len() <= HEARTBEAT_MAX, "{}", widest.len());
        for payload in [none, many, widest] {
            let heartbeat = decode_heartbeat(&payload).unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(heartbeat.node, node);
        }
        // A heartbeat of the old kind, with its list, is refused.
        let old = format!(r#"{{"v":2,"node":"{node}","seq":1,"clients":["1.2.3.4:5"]}}"#);
        assert!(decode_heartbeat(old.as_bytes()).is_err());
    }

    #[test]
    fn node_ids_differ() {
        assert_ne!(new_node_id(), new_node_id());
        assert!(valid_node(&new_node_id()));
    }
}
