//! `--names` across the room's nodes: which node holds which name, kept
//! in a JetStream key-value bucket on the room's broker (`chat_names_ROOM`,
//! key = the name in hex, value = the holder node's id).
//!
//! **Claim.** A join first takes the name in this node's [`NameBook`] (so
//! two clients of one node never both reach the broker with one name),
//! then in the bucket by creating its key at revision 0. If the key
//! exists, a delete marker means the name is free; otherwise its holder
//! decides: a live node (heard from within `node_timeout`) has it, and the
//! name is taken; a node declared dead holds it no more, nor does one
//! never heard of once the key has stood unchanged for longer than
//! `node_timeout` while this node heard heartbeats (a node that just
//! started may claim before its first heartbeat arrives). A free name, or
//! one whose holder is gone, is written at the revision read. So names
//! held by a killed node or a whole cluster that died are freed when
//! someone asks for them, never by a sweeper racing a claim; a node that
//! hears of a death also deletes the dead node's names (again at their
//! revision) at once.
//!
//! **Exclusive writes.** The create at revision 0 the broker checks when
//! it applies the write, on every nats-server 2.9. A write at a revision
//! above 0 (over a delete marker, a takeover, a delete) goes through
//! [`swap`](swap::swap): on a replicated bucket it also expects the
//! bucket stream's last sequence, read just before. nats-server before
//! 2.9.21 checks such a revision on a replicated stream only on the leader
//! before the write is replicated (nats-server #4320), and two writes at
//! one revision could both pass; the stream's last sequence it checks when
//! each server applies the write. On every replicated bucket, whatever the
//! server's version: the version this node sees is that of the server it
//! is connected to, which in a cluster being upgraded says nothing of the
//! stream leader's; and so the path that runs on a fixed broker (2.9.21
//! and later) is the one the three-server tests run on 2.9.10 (those
//! brokers also check the revision when applying: only one check more). A
//! bucket of one copy needs no more than the revision (checked when
//! applied, on every version): the one-server tests run the same passes
//! without the stream-wide expectation. The cost, paid only by writes at
//! a revision on a replicated bucket: a stream-info request more, a node's
//! such writes one at a time, and another pass when another node's write
//! came first (measured in docs/cluster.md, names).
//!
//! **What uniqueness rests on.** A takeover trusts the liveness verdict:
//! names are unique only as long as no live node is judged dead. A node
//! whose heartbeats are late by more than `node_timeout`, or whose judge
//! itself did not run for that long (its process stalled), can be judged
//! dead while alive, and then its name is taken while its client keeps it
//! (the same verdict announces that client gone). Seen under artificial
//! load with the tests' 1 s timeout: a 4.7 s stall of the test process,
//! then every node declared the others dead and three clients got one name
//! by three correct compare-and-swaps (docs/cluster.md, names).
//!
//! **Order with the local hub.** Bucket first, then the local join: an
//! arrival, once announced, cannot be taken back, while a claim can. A
//! local join refused after the claim releases it (by revision). A leave
//! deletes the key after the local departure and before the departure is
//! published, so a node that hears `X has left` finds `X` free.
//!
//! **Failure.** Every broker call is bounded by `--cluster-ack-timeout`.
//! While the broker cannot be reached, no name can be checked across the
//! room: a new name is refused with [`Refused::NamesUnavailable`], and
//! clients already in the room chat on. A claim whose every pass lost to
//! other names' writes is refused as taken (the client chooses again). A
//! delete that fails (broker away, every pass lost, or an unknown outcome
//! of a timed-out claim) is retried in the background until it is done or
//! is no longer ours to do.
//!
//! **Ownership.** [`NameBook`] holds this node's names under a short
//! `parking_lot` mutex (never held across an `.await`), the bucket's
//! handle, and the node's turn at writing to it (a tokio mutex, held
//! across one write's broker calls); it is part of [`Shared`]. The writes
//! themselves are [`swap()`]'s.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::kv::{Operation, UpdateErrorKind};
use async_nats::jetstream::stream;
use parking_lot::Mutex;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::swap::{swap, Bucket, Change, Swapped};
use super::backoff::Backoff;
use super::connection;
use super::Shared;
use crate::config::ClusterCounters;
use crate::room::hub::Refused;

mod swap;

/// This node's names and the bucket they are kept in.
#[derive(Default)]
pub(crate) struct NameBook {
    held: Mutex<HashMap<Arc<str>, Hold>>,
    bucket: Mutex<Option<Bucket>>,
    /// This node's turn at a write to a replicated bucket ([`Bucket`]).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Names with a background delete running (one each).
    tidying: Mutex<HashSet<Arc<str>>>,
    /// Keys naming a node never heard of: the revision, and when this node
    /// first saw it.
    suspects: Mutex<HashMap<String, (u64, Instant)>>,
}

/// Bounds [`NameBook::suspects`]: forgetting them only delays takeovers.
const MAX_SUSPECTS: usize = 10_000;

enum Hold {
    /// A join is asking the broker for it.
    Claiming,
    /// A client of this node has it, at this revision of its key.
    Held(u64),
    /// Its holder left and the key is being deleted; cancelled when done.
    Releasing(CancellationToken),
}

/// The key of `name`: hex, as a name may hold characters no key can.
fn key_of(name: &str) -> String {
    let mut key = String::with_capacity(2 * name.len());
    for byte in name.bytes() {
        let _ = write!(key, "{byte:02x}");
    }
    key
}

pub(super) fn bucket_of(room: &str) -> String {
    format!("chat_names_{room}")
}

/// Takes `name` for a client of this node, across the room. On success the
/// caller must [`release`] it when the client leaves (or its join fails).
pub(crate) async fn claim(shared: &Arc<Shared>, name: &Arc<str>) -> Result<(), Refused> {
    let book = &shared.names;
    // A sibling's departure is being published: wait for its delete (itself
    // bounded), so that whoever saw the departure can take the name.
    for _ in 0..3 {
        let releasing = {
            let mut held = book.held.lock();
            match held.get(name) {
                None => {
                    held.insert(Arc::clone(name), Hold::Claiming);
                    None
                }
                Some(Hold::Releasing(done)) => Some(done.clone()),
                Some(_) => return Err(Refused::NameTaken),
            }
        };
        let Some(done) = releasing else {
            let claimed = claim_in_bucket(shared, name).await;
            let mut held = book.held.lock();
            match claimed {
                Ok(revision) => {
                    held.insert(Arc::clone(name), Hold::Held(revision));
                    return Ok(());
                }
                Err(refused) => {
                    held.remove(name);
                    return Err(refused);
                }
            }
        };
        let _ = timeout(2 * shared.config.ack_timeout, done.cancelled()).await;
    }
    Err(Refused::NameTaken)
}

async fn claim_in_bucket(shared: &Arc<Shared>, name: &Arc<str>) -> Result<u64, Refused> {
    let Some(bucket) = bucket(shared).await else {
        return Err(Refused::NamesUnavailable);
    };
    let bound = shared.config.ack_timeout;
    let key = key_of(name);
    let mine = bytes::Bytes::from(shared.node.clone());
    // A key never written is created at revision 0, which the broker
    // checks when it applies the write, replicated or not: one round trip
    // for a fresh name, and exclusive.
    match timeout(bound, bucket.store.update(&key, mine.clone(), 0)).await {
        Ok(Ok(revision)) => {
            debug!(node = %shared.node, %key, revision, "claimed a name: created its key");
            return Ok(revision);
        }
        Ok(Err(err)) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
        Ok(Err(err)) => {
            debug!(cause = %err, "claiming a name failed");
            return Err(uncertain(shared, name));
        }
        Err(_) => {
            debug!(node = %shared.node, %key, "claim timed out: outcome unknown");
            return Err(uncertain(shared, name));
        }
    }
    // Written before: deleted (free), or held, by a node that may be gone.
    let mut from = None;
    // The verdict on the holder at the revision judged: a pass that lost to
    // a write elsewhere in the bucket finds the same key again and must not
    // judge again (a holder never heard of is judged dead once only).
    let mut judged: Option<(u64, bool)> = None;
    let swapped = swap(&bucket, &key, bound, None, |entry| {
        from = None;
        let Some(entry) = entry.filter(|entry| entry.operation == Operation::Put) else {
            return Some(Change::Put(mine.clone()));
        };
        let holder = std::str::from_utf8(&entry.value).unwrap_or_default();
        let may_hold = match judged {
            Some((revision, may_hold)) if revision == entry.revision => may_hold,
            _ => shared.may_hold(holder, &key, entry.revision),
        };
        judged = Some((entry.revision, may_hold));
        if may_hold {
            debug!(node = %shared.node, %key, %holder, revision = entry.revision, "name taken");
            return None;
        }
        from = Some((holder.to_string(), entry.revision));
        Some(Change::Put(mine.clone()))
    })
    .await;
    match swapped {
        Swapped::Written(revision) => {
            match from {
                Some((holder, from)) => info!(
                    node = %shared.node, %key, %holder, from, revision,
                    "took over a name from a node that is gone"
                ),
                None => debug!(node = %shared.node, %key, revision, "claimed a name: it was free"),
            }
            Ok(revision)
        }
        Swapped::Declined => Err(Refused::NameTaken),
        Swapped::Contended => {
            debug!(node = %shared.node, %key, "claiming a name lost every pass to other writes");
            Err(Refused::NameTaken)
        }
        Swapped::Unreadable => {
            shared.names.bucket.lock().take();
            Err(Refused::NamesUnavailable)
        }
        Swapped::Uncertain => Err(uncertain(shared, name)),
    }
}

/// A write whose outcome is unknown may have left the key ours: have it
/// deleted if so, once the broker answers.
fn uncertain(shared: &Arc<Shared>, name: &Arc<str>) -> Refused {
    shared.names.bucket.lock().take();
    tidy(shared, name);
    Refused::NamesUnavailable
}

/// Frees `name` after its client left this node (or its join was refused
/// locally). Bounded; a delete that does not get through is retried in the
/// background.
pub(crate) async fn release(shared: &Arc<Shared>, name: &Arc<str>) {
    let book = &shared.names;
    let done = CancellationToken::new();
    let revision = {
        let mut held = book.held.lock();
        match held.insert(Arc::clone(name), Hold::Releasing(done.clone())) {
            Some(Hold::Held(revision)) => Some(revision),
            _ => None,
        }
    };
    let deleted = match revision {
        Some(revision) => delete_if(shared, name, revision).await,
        None => true,
    };
    book.held.lock().remove(name);
    done.cancel();
    if !deleted {
        tidy(shared, name);
    }
}

/// Deletes `name`'s key if it is still at `revision`: true if it is gone
/// or someone else's now, false if the broker did not answer (or the
/// bucket was too busy).
async fn delete_if(shared: &Arc<Shared>, name: &str, revision: u64) -> bool {
    let Some(bucket) = bucket(shared).await else {
        return false;
    };
    let swapped = swap(
        &bucket,
        &key_of(name),
        shared.config.ack_timeout,
        Some((revision, Change::Delete)),
        |entry| {
            entry
                .filter(|entry| entry.operation == Operation::Put && entry.revision == revision)
                .map(|_| Change::Delete)
        },
    )
    .await;
    matches!(swapped, Swapped::Written(_) | Swapped::Declined)
}

/// In the background: deletes `name`'s key while it says this node holds
/// it and no client of this node has it, retrying until the broker answers.
fn tidy(shared: &Arc<Shared>, name: &Arc<str>) {
    if !shared.names.tidying.lock().insert(Arc::clone(name)) {
        return;
    }
    let shared = Arc::clone(shared);
    let name = Arc::clone(name);
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(50), shared.config.reconnect_max);
        while !tidy_once(&shared, &name).await {
            backoff.failed_quietly();
            if backoff.pause(&shared.stop).await {
                break;
            }
        }
        shared.names.tidying.lock().remove(&name);
    });
}

/// One try of [`tidy`]: true when there is nothing more to do.
async fn tidy_once(shared: &Arc<Shared>, name: &str) -> bool {
    let Some(bucket) = bucket(shared).await else {
        return false;
    };
    let swapped = swap(
        &bucket,
        &key_of(name),
        shared.config.ack_timeout,
        None,
        |entry| {
            let entry = entry.filter(|entry| entry.operation == Operation::Put)?;
            // The key is read first, then our book: a claim of ours that
            // ends after this check changed the key, so the delete cannot
            // hit it.
            let ours = entry.value == shared.node.as_bytes()
                && !shared.names.held.lock().contains_key(name);
            ours.then_some(Change::Delete)
        },
    )
    .await;
    matches!(swapped, Swapped::Written(_) | Swapped::Declined)
}

/// After `dead` nodes were declared dead: deletes the keys of `names` that
/// one of them still holds, each by revision, in the background. Every
/// node that noticed does it; the revision lets one delete through.
pub(crate) fn free_dead(shared: &Arc<Shared>, dead: Vec<String>, names: Vec<Arc<str>>) {
    if dead.is_empty() || names.is_empty() {
        return;
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let Some(bucket) = bucket(&shared).await else {
            return;
        };
        for name in names {
            let mut holder = String::new();
            let swapped = swap(
                &bucket,
                &key_of(&name),
                shared.config.ack_timeout,
                None,
                |entry| {
                    let entry = entry.filter(|entry| entry.operation == Operation::Put)?;
                    holder = String::from_utf8_lossy(&entry.value).into_owned();
                    dead.contains(&holder).then_some(Change::Delete)
                },
            )
            .await;
            if let Swapped::Written(_) = swapped {
                debug!(%holder, "freed a dead node's name");
            }
        }
    });
}

/// The bucket, found or made; `None` while the broker cannot be asked.
async fn bucket(shared: &Arc<Shared>) -> Option<Bucket> {
    let connection = shared.connection.get()?;
    if connection.client.connection_state() != State::Connected {
        return None;
    }
    if let Some(bucket) = shared.names.bucket.lock().clone() {
        return Some(bucket);
    }
    let bound = shared.config.ack_timeout;
    let bucket = bucket_of(&shared.config.room);
    let jetstream = &connection.jetstream;
    // The bucket's stream is made here, as a KV bucket's stream, rather
    // than with `create_key_value`: that asks for the account's info first,
    // and async-nats 0.46 cannot parse a 2.9 server's answer.
    // Replicated as the room's stream is (connection.rs), so that names
    // stay unique while one server of a JetStream cluster is down.
    let replicas = connection::replicas(connection, &shared.config);
    let made = timeout(
        bound,
        connection::create_replicated(
            connection,
            stream::Config {
                name: format!("KV_{bucket}"),
                description: Some("chat-server --names: which node holds each name".into()),
                subjects: vec![format!("$KV.{bucket}.>")],
                // Only the holder matters, not who held it before.
                max_messages_per_subject: 1,
                max_bytes: 64 << 20,
                max_message_size: 1024,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            },
        ),
    )
    .await;
    match made {
        Ok(Ok(_)) => {}
        // Several nodes making the bucket at once (the room's first named
        // joins): one creates it and the others may be told its name is in
        // use. Opening it below settles whether it is there.
        Ok(Err(err)) => debug!(cause = %err, "making the names bucket failed; opening it"),
        Err(_) => return None,
    }
    let store = match timeout(bound, jetstream.get_key_value(bucket)).await {
        Ok(Ok(store)) => store,
        Ok(Err(err)) => {
            warn!(cause = %err, "cannot open the names bucket");
            return None;
        }
        Err(_) => return None,
    };
    // Shown at once: the replica keeper reads it next on its own schedule.
    ClusterCounters::set(
        &shared.counters().names_copies,
        store.stream.cached_info().config.num_replicas.max(1) as u64,
    );
    let bucket = Bucket {
        store,
        jetstream: jetstream.clone(),
        turn: Arc::clone(&shared.names.turn),
    };
    *shared.names.bucket.lock() = Some(bucket.clone());
    Some(bucket)
}

impl Shared {
    /// Whether `holder`, the node that `key` at `revision` names, may still
    /// have a client with that name.
    fn may_hold(&self, holder: &str, key: &str, revision: u64) -> bool {
        if holder == self.node {
            // Our clients' names are in our book, checked before the
            // bucket: a key of ours that is not is left over.
            return false;
        }
        let roster = self.roster.lock();
        if roster.is_live(holder) {
            return true;
        }
        if roster.is_gone(holder) {
            debug!(node = %self.node, %holder, %key, "holder declared dead or left");
            return false;
        }
        drop(roster);
        // Never heard of: a node that has just started may claim a name
        // before its first heartbeat reaches us, so it is dead only once
        // this very revision has been there, unchanged, for longer than a
        // live node can be silent, while we heard heartbeats throughout.
        let now = Instant::now();
        let hearing_since = *self.hearing_since.lock();
        let mut suspects = self.names.suspects.lock();
        if suspects.len() >= MAX_SUSPECTS {
            suspects.clear();
        }
        // The watch counts only from when we saw this revision while
        // hearing heartbeats; before that, or while not hearing them, it
        // starts again.
        let watched_since = suspects.get(key).and_then(|&(seen, at)| {
            (seen == revision && hearing_since.is_some_and(|since| since <= at)).then_some(at)
        });
        let Some(watched_since) = watched_since else {
            suspects.insert(key.to_string(), (revision, now));
            return true;
        };
        let dead = now.duration_since(watched_since) > self.config.node_timeout;
        if dead {
            debug!(
                node = %self.node, %holder, %key,
                "holder never heard of for longer than the node timeout"
            );
            suspects.remove(key);
        }
        !dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_for_any_name() {
        assert_eq!(key_of("ann"), "616e6e");
        assert_eq!(key_of("a*>.b"), "612a3e2e62");
    }
}
