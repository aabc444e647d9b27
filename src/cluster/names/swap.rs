//! Compare-and-swap on one key of the names bucket that is exclusive on
//! every nats-server 2.9: each write carries the key's revision
//! (`Nats-Expected-Last-Subject-Sequence`) and, on a replicated bucket,
//! the whole stream's last sequence (`Nats-Expected-Last-Sequence`), read
//! just before.
//!
//! **Why both.** nats-server before 2.9.21 checks a subject's revision
//! above 0 on a replicated stream only on the leader, before it proposes
//! the write (`processClusteredInboundMsg` in v2.9.10's
//! `server/jetstream_cluster.go`), so two writes at one revision in flight
//! together can both pass (nats-server #4320). The stream's last sequence
//! it checks in `processJetStreamMsg` (`server/stream.go`) when each
//! server applies the write, in the order the writes were replicated (the
//! clustered path skips only the subject check there): of writes made
//! against one last sequence exactly one is applied, on every server, also
//! across a change of leader. The key is read after the last sequence, by
//! a direct get that any replica may answer (one that lags, too); the
//! revision written with it still makes the write the one decided on: the
//! leader checks it before proposing and had applied every write up to
//! that sequence when it reported it, and anything applied after that
//! sequence fails the stream-wide check. A bucket of one copy checks the
//! revision when it applies the write: there the revision alone is
//! exclusive.
//!
//! **What it costs.** A stream-info request before each write (read each
//! pass: it also says whether the bucket is replicated, which it may have
//! become since it was opened), and on a replicated bucket a write refused
//! whenever any other key changed in between: then the key is read and
//! decided again, after a jittered pause (racers that all failed against
//! one winner must not come back in lock-step), up to [`PASSES`] passes
//! started within `--cluster-ack-timeout`. A node's writes to a replicated
//! bucket take turns: of several against one last sequence only one could
//! win, and each refused one still costs the broker a replicated proposal.
//!
//! **Not covered.** A change of the stream's leader between the stream
//! info and the write, with the new leader not yet having applied every
//! write up to the sequence the old one reported and one of those writes
//! being to this key: the revision check could then pass on a key read
//! stale (not seen; whether a 2.9.10 leader answers before applying its
//! log was not checked). The stream-wide check still lets only one of
//! several racing writes through.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use tokio::time::{timeout, Instant};
use tracing::debug;

/// The names bucket and the JetStream context to write to it with.
#[derive(Clone)]
pub(super) struct Bucket {
    pub(super) store: kv::Store,
    pub(super) jetstream: jetstream::Context,
    /// This node's turn at a write to a replicated bucket: one at a time,
    /// as only one of several against one last sequence can win (the
    /// others would only be refused and add to the next pass's race).
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
}

impl Bucket {
    /// Whether the bucket had more than one copy when it was opened: a
    /// hint for taking turns, not what the write checks (it reads the
    /// replicas afresh).
    fn replicated(&self) -> bool {
        self.store.stream.cached_info().config.num_replicas > 1
    }
}

/// A write to a key.
pub(super) enum Change {
    Put(Bytes),
    /// A delete marker, as `kv::Store::delete` writes it.
    Delete,
}

/// How a [`swap`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Swapped {
    /// The write was applied: the key's new revision.
    Written(u64),
    /// The key, as read, was not to be written.
    Declined,
    /// A read went unanswered: nothing was written.
    Unreadable,
    /// A write went unanswered, or failed oddly: it may have been applied.
    Uncertain,
    /// Every pass lost to other writes to the bucket: nothing was written.
    Contended,
}

/// Passes of a [`swap`] at most; each after the first follows a write
/// refused because the bucket changed. With 8, a storm of 30 clients
/// rejoining under their own names on a 3-server cluster had 228 of 600
/// claims of a free name refused; with 24, 0-4.
const PASSES: u32 = 24;

/// The longest jittered pause between passes: a few broker round trips
/// (one on loopback is 0.2-1 ms), so racers spread out without the
/// winner's rivals waiting long for their re-read.
const MAX_PAUSE: Duration = Duration::from_millis(40);

/// Writes `key` as `decide` says from its latest entry (`None`: never
/// written, or its history is gone), exclusively: applied only if the key
/// (and, replicated, anything else in the bucket) did not change since it
/// was read. Refused for a change, it reads and decides again. `expected`,
/// if given, is the revision the caller knows the key at: the first pass
/// writes at it without reading the key (its revision check tells whether
/// it moved). Every broker call, and every wait for this node's turn, is
/// bounded by `bound`, and no pass starts more than `bound` after the
/// first.
pub(super) async fn swap(
    bucket: &Bucket,
    key: &str,
    bound: Duration,
    mut expected: Option<(u64, Change)>,
    mut decide: impl FnMut(Option<&kv::Entry>) -> Option<Change>,
) -> Swapped {
    let store = &bucket.store;
    let started = Instant::now();
    for pass in 0..PASSES {
        if pass > 0 {
            if started.elapsed() >= bound {
                break;
            }
            tokio::time::sleep(jitter(pass)).await;
        }
        let _turn = if bucket.replicated() {
            match timeout(bound, bucket.turn.lock()).await {
                Ok(turn) => Some(turn),
                Err(_) => return Swapped::Contended,
            }
        } else {
            None
        };
        // Fresh each pass: the bucket may have been replicated since it
        // was opened (a node wanting more copies updates it).
        let last = match timeout(bound, store.stream.get_info()).await {
            Ok(Ok(info)) => (info.config.num_replicas > 1).then_some(info.state.last_sequence),
            Ok(Err(err)) => {
                debug!(cause = %err, "reading the names bucket's last sequence failed");
                return Swapped::Unreadable;
            }
            Err(_) => return Swapped::Unreadable,
        };
        let (revision, change) = match expected.take() {
            Some(known) => known,
            None => {
                let entry = match timeout(bound, store.entry(key)).await {
                    Ok(Ok(entry)) => entry,
                    Ok(Err(err)) => {
                        debug!(cause = %err, "reading a name's key failed");
                        return Swapped::Unreadable;
                    }
                    Err(_) => return Swapped::Unreadable,
                };
                let revision = entry.as_ref().map_or(0, |entry| entry.revision);
                let Some(change) = decide(entry.as_ref()) else {
                    return Swapped::Declined;
                };
                if last.is_some_and(|last| revision > last) {
                    // Read after a write the last sequence did not count
                    // yet: the write below would be refused.
                    continue;
                }
                (revision, change)
            }
        };
        match timeout(bound, write(bucket, key, revision, last, change)).await {
            Ok(Ok(revision)) => return Swapped::Written(revision),
            Ok(Err(err)) if err.kind() == PublishErrorKind::WrongLastSequence => {
                debug!(%key, pass, "a name's write lost to another write; reading again");
            }
            Ok(Err(err)) => {
                debug!(cause = %err, "writing a name's key failed: outcome unknown");
                return Swapped::Uncertain;
            }
            Err(_) => return Swapped::Uncertain,
        }
    }
    Swapped::Contended
}

/// Publishes `change` to `key` if the key is at `revision` (0: never
/// written) and the bucket's stream at `last`, if given; the key's new
/// revision.
async fn write(
    bucket: &Bucket,
    key: &str,
    revision: u64,
    last: Option<u64>,
    change: Change,
) -> Result<u64, async_nats::jetstream::context::PublishError> {
    // The context has no API prefix or domain (connection.rs), so the
    // bucket's subjects are its own: `$KV.<bucket>.<key>`.
    let store = &bucket.store;
    let subject = format!(
        "{}{key}",
        store.put_prefix.as_deref().unwrap_or(&store.prefix)
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        HeaderValue::from(revision),
    );
    if let Some(last) = last {
        headers.insert(NATS_EXPECTED_LAST_SEQUENCE, HeaderValue::from(last));
    }
    let payload = match change {
        Change::Put(value) => value,
        Change::Delete => {
            headers.insert("KV-Operation", "DEL");
            Bytes::new()
        }
    };
    let ack = bucket
        .jetstream
        .publish_with_headers(subject, headers, payload)
        .await?
        .await?;
    Ok(ack.sequence)
}

/// A random pause before pass `pass` (1 or more): up to 5 ms, doubling
/// each pass, at most [`MAX_PAUSE`].
fn jitter(pass: u32) -> Duration {
    let ceiling = crate::backoff::doubling(Duration::from_millis(5), MAX_PAUSE, pass);
    // A fresh `RandomState` is randomly keyed: randomness enough for a
    // pause, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(random % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_random_and_bounded() {
        let pauses: Vec<_> = (0..64).map(|_| jitter(1)).collect();
        assert!(pauses.iter().all(|pause| *pause < Duration::from_millis(5)));
        assert!(pauses.iter().any(|pause| *pause != pauses[0]));
        for pass in 1..20 {
            assert!(jitter(pass) < MAX_PAUSE);
        }
    }
}
