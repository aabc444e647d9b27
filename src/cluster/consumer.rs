//! The consumer: reads the room's stream and hands other nodes' events to
//! the local hub, in stream order.
//!
//! It reads from the sequence after the last one it delivered, through an
//! ephemeral pull consumer; on any error (broker restart, consumer lost
//! with the server that held it, missed heartbeats) it makes a new consumer
//! from that same sequence: at once, not after its pause or a call's
//! timeout, when the stream elects a new leader meanwhile ([`Elections`]).
//! A consumer already reading is replaced on an election too, and its pull
//! is polled every heartbeat, so that a consumer lost with its server is
//! noticed by our timers, not async-nats's (see [`consume`]).
//! Until that consumer reads, the stream is read by sequence ([`bridge`]):
//! a consumer is made by the JetStream cluster's metadata leader, a message
//! is got from the stream's own leader, so a failover's silence ends with
//! the stream's election, not with a second one.
//!
//! **Stream identity.** A sequence number means something only in the
//! stream it was read from. The node that makes the room's stream gives it
//! a random epoch, in its description ([`epoch_of`]): part of the stream's
//! configuration, so the same on every server of a JetStream cluster and
//! after any restart, and new when a broker that lost its store gets the
//! stream made again. (The stream's `created` time is not enough: a 2.9
//! server that rejoins a cluster on an empty store reports a new one for
//! the same stream.) The consumer keeps the epoch with its position
//! ([`Position`]); facing a stream with another epoch it reads the new one
//! from its start, whether it is shorter or longer than what it had read,
//! and counts in `missed` what it knew the old one still held for it (the
//! last message's `pending`). Facing the same epoch it resumes after what
//! it delivered, even if the server that answered reports fewer messages
//! (a replica still catching up).
//!
//! It is the one place where membership is announced: each batch and each
//! verdict of the liveness judge (received between two stream messages) goes
//! through [`super::roster::Roster`], which decides what local clients are
//! told, in stream order; a stored duplicate (a retry that outlived the
//! de-duplication window) is skipped by batch number whatever the node's
//! state.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::backfill;
use super::backoff::{Backoff, JETSTREAM_RETRY_MAX};
use super::connection::{
    ensure_stream, epoch_of, until_connected, wait_for_connection, Connection, Elections,
    LeaderElected, Subjects,
};
use super::heartbeats::Verdict;
use super::roster::{Delivery, Shown, FORGET_AFTER};
use super::wire;
use super::Shared;
use crate::client::Client;
use crate::config::ClusterCounters;
use crate::room::hub::Hub;

/// The consumer's side of the liveness judge.
pub(super) struct Liveness {
    /// The judge's verdicts.
    pub verdicts: mpsc::UnboundedReceiver<Verdict>,
    /// Nodes that came into view through the stream, for the judge to watch.
    pub appeared: mpsc::UnboundedSender<String>,
}

pub(super) async fn consumer<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    ghost: Arc<Client>,
    mut connection: watch::Receiver<Option<Connection>>,
    mut liveness: Liveness,
) {
    // `--history`: what was said before this node started, read back
    // before anyone is greeted; the stream is then read from after it.
    let mut position = Position::default();
    if let Some((epoch, last)) =
        backfill::fill(&shared, shared.history.as_ref(), connection.clone()).await
    {
        position.stream = Some(epoch);
        position.delivered = Some(last);
    }
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let names = Subjects::new(&shared.config.room);
    let mut elections = Elections::subscribe(&connection, &names).await;
    let mut quick_tries = 0;
    let mut outage = Backoff::new(
        Duration::from_millis(20),
        shared.config.reconnect_max.min(JETSTREAM_RETRY_MAX),
    );
    loop {
        if !until_connected(&connection.client, &shared.stop).await {
            return;
        }
        let mut reading = Reading {
            connection: &connection,
            shared: &shared,
            names: &names,
            position: &mut position,
            outage: &mut outage,
            liveness: &mut liveness,
            elections: &mut elections,
            quick_tries: &mut quick_tries,
        };
        match consume(&mut reading, &*hub, &ghost).await {
            Ok(()) => return,
            Err(err) if err.is::<LeaderElected>() => {
                // A new consumer at once, from where we are, on the new
                // leader, its tries bounded tightly again.
                debug!("the room's stream has a new leader: reading it again");
                quick_tries = 0;
            }
            Err(err) => {
                outage.failed("reading the room's stream", &err);
                tokio::select! {
                    stopped = outage.pause(&shared.stop) => if stopped { return },
                    () = elections.next() => {}
                }
            }
        }
    }
}

/// What [`consume`] works with: the task's state and the broker's.
struct Reading<'a> {
    connection: &'a Connection,
    shared: &'a Arc<Shared>,
    names: &'a Subjects,
    position: &'a mut Position,
    outage: &'a mut Backoff,
    liveness: &'a mut Liveness,
    elections: &'a mut Elections,
    /// Tries of making a consumer that ran out of their bound in a row.
    quick_tries: &'a mut u32,
}

/// The bound on a first try of making a consumer; it doubles after each
/// [`QUICK_TRIES_EACH`] tries that run out of it, up to
/// `--cluster-ack-timeout` (a broker far slower than this is still
/// waited for). Measured: after a kill of the server that also led the
/// JetStream cluster's metadata, consumers could be made 2 s after the
/// stream's election, and one try sent a moment too early cost its whole bound.
const QUICK_OPEN: Duration = Duration::from_millis(500);
const QUICK_TRIES_EACH: u32 = 3;

/// Where this node is in the room's stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Position {
    /// The stream read, by its epoch ([`epoch_of`]).
    stream: Option<String>,
    /// The last sequence delivered to the local hub (`None`: nothing read
    /// yet, this node joins the room as it is now).
    delivered: Option<u64>,
    /// Messages the stream held for us after `delivered`, as last known:
    /// what a lost stream took with it, at least.
    pending: u64,
    /// The last `delivered` after which a consumer skipped sequences and
    /// was made again (see [`consume`]): a second skip there is counted.
    skipped_after: Option<u64>,
}

/// Where to start reading the stream of epoch `epoch` that holds
/// `first..=last`, and how many messages before that start are lost to us.
#[derive(Debug, PartialEq, Eq)]
struct Resume {
    start: u64,
    missed: u64,
    /// The stream is not the one we were reading.
    remade: bool,
}

fn resume(position: &Position, epoch: &str, first: u64, last: u64) -> Resume {
    let first = first.max(1);
    let Some(delivered) = position.delivered else {
        return Resume {
            start: last + 1,
            missed: 0,
            remade: false,
        };
    };
    if position.stream.as_deref() != Some(epoch) {
        return Resume {
            start: first,
            missed: position.pending,
            remade: true,
        };
    }
    Resume {
        start: (delivered + 1).max(first),
        // Expired (--cluster-retention) before we read them.
        missed: first.saturating_sub(delivered + 1),
        remade: false,
    }
}

/// Delivers the stream from after `position` until an error or stop
/// (while the consumer is being made, by sequence: [`bridge`]). A
/// leader elected ends it with [`LeaderElected`], and a new consumer is
/// made at once from the last delivered sequence: while the consumer is
/// being made (a call to the stream made before the election waits out its
/// timeout), and while it reads.
///
/// Why a reading consumer is replaced, and its pull polled every
/// heartbeat: measured on nats-server 2.9.10 (docs/cluster.md,
/// "Failover"), a node whose NATS connection and consumer were both on
/// the killed server, with the room idle, heard nothing for 21 s after the
/// kill. On the reconnect, async-nats's pull task asks for the consumer's
/// info six times (five retries, 0.5-10 s apart, each bounded by
/// `--cluster-ack-timeout`) before it reports an error, and sends no pull
/// meanwhile; its missed-heartbeat check runs only while the pull is
/// polled, and stops after each idle heartbeat until the next poll, so a
/// quiet room left it unarmed. Now the consumer lost with its server is
/// noticed after two missed pull heartbeats, and any consumer is made
/// again on the election (also one on a surviving server, whatever 2.9
/// does with it after the election; not seen stalling). It costs one consumer
/// (made in a millisecond, read by sequence until then); the abandoned one
/// goes away by its inactivity threshold.
async fn consume<H: Hub>(
    reading: &mut Reading<'_>,
    hub: &H,
    ghost: &Arc<Client>,
) -> anyhow::Result<()> {
    reading.elections.forget();
    // Right after an election the broker may leave a call unanswered (its
    // own metadata leader may still be being elected): the first tries
    // are bounded more tightly than `--cluster-ack-timeout`, so that the
    // one that can be answered is made soon after it can.
    let bound = Backoff::delay(
        QUICK_OPEN,
        reading.shared.config.ack_timeout.max(QUICK_OPEN),
        *reading.quick_tries / QUICK_TRIES_EACH,
    );
    let opening = tokio::time::timeout(
        bound,
        locate(
            reading.connection,
            reading.shared,
            reading.names,
            reading.position,
        ),
    );
    let stream = tokio::select! {
        found = opening => match found {
            Ok(found) => found?,
            Err(_) => {
                *reading.quick_tries = reading.quick_tries.saturating_add(1);
                anyhow::bail!("the room's stream did not answer within {bound:?}");
            }
        },
        () = reading.elections.next() => return Err(LeaderElected.into()),
    };
    let making = tokio::time::timeout(
        bound,
        subscribe(
            stream.clone(),
            reading
                .position
                .delivered
                .map_or(1, |delivered| delivered + 1),
            reading.names.events.clone(),
            reading.shared.config.heartbeat,
        ),
    );
    tokio::pin!(making);
    let mut messages = loop {
        tokio::select! {
            made = &mut making => match made {
                Ok(made) => break made?,
                Err(_) => {
                    *reading.quick_tries = reading.quick_tries.saturating_add(1);
                    anyhow::bail!("no consumer could be made within {bound:?}");
                }
            },
            () = reading.elections.next() => return Err(LeaderElected.into()),
            () = reading.shared.stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(BRIDGE_POLL) => bridge(reading, &stream, hub, ghost).await?,
        }
    };
    *reading.quick_tries = 0;
    let Reading {
        shared,
        position,
        outage,
        liveness,
        elections,
        ..
    } = reading;
    let shared: &Arc<Shared> = shared;
    ClusterCounters::add(&shared.counters().streams_opened, 1);
    let mut tidy = tokio::time::interval(FORGET_AFTER / 10);
    tidy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // async-nats checks a pull's missed heartbeats only while its stream is
    // polled, and after each idle heartbeat it stops checking until the
    // next poll: polled every heartbeat, a consumer that died silently is
    // noticed within three.
    let mut watch = tokio::time::interval(pull_heartbeat(shared.config.heartbeat));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
            () = elections.next() => return Err(LeaderElected.into()),
            _ = watch.tick() => continue,
            Some(Verdict::Dead(node)) = liveness.verdicts.recv() => {
                judged_dead(shared, hub, ghost, &node).await;
                continue;
            }
            _ = tidy.tick() => {
                shared.roster.lock().expire(Instant::now(), FORGET_AFTER);
                continue;
            }
            next = messages.next() => next,
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(err.into()),
            None => anyhow::bail!("the consumer ended"),
        };
        outage.succeeded("reading the room's stream");
        let sequence = match message.info() {
            Ok(info) => {
                show_lag(
                    shared.counters(),
                    info.pending,
                    info.published.unix_timestamp_nanos(),
                );
                position.pending = info.pending;
                info.stream_sequence
            }
            Err(err) => anyhow::bail!("a stream message without its metadata: {err}"),
        };
        if !accept(shared, position, sequence)? {
            continue;
        }
        deliver(
            shared,
            hub,
            ghost,
            liveness,
            &message.subject,
            &message.payload,
        )
        .await;
    }
}

/// Whether the message at `sequence` is the next one to deliver (and then
/// it is taken as delivered), or one already delivered (a redelivery, or
/// one read by [`bridge`] meanwhile); a jump is an error the first time
/// (see [`Step`]), counted as missed the second.
fn accept(shared: &Shared, position: &mut Position, sequence: u64) -> anyhow::Result<bool> {
    match step(position, sequence) {
        Step::Old => Ok(false),
        Step::Next => Ok(true),
        Step::Jumped { skipped, after } => anyhow::bail!(
            "the consumer skipped {skipped} messages after sequence {after}; reading again from there"
        ),
        Step::Lost { skipped, after } => {
            warn!(
                skipped,
                after, "the room's stream no longer has these messages; counted as missed"
            );
            ClusterCounters::add(&shared.counters().missed, skipped);
            Ok(true)
        }
    }
}

/// What a message at some sequence is to a node at `position`.
///
/// The stream holds only the room's events and loses messages only from
/// its front (retention), so its sequences are dense: a jump is a message
/// this consumer did not get. Seen after a JetStream server rejoined on an
/// empty store, and after a partition (with no acks the broker counts what
/// it sent into a silently cut connection as delivered). A new consumer
/// from the same place gets it if the stream has it; if it skips it again,
/// it is gone (retention passed it meanwhile).
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// At or before what was delivered: skipped.
    Old,
    /// The one after what was delivered: delivered now.
    Next,
    /// Past a gap, the first time after `after`: read again from there.
    Jumped { skipped: u64, after: u64 },
    /// Past a gap at the same place again: delivered, the gap counted.
    Lost { skipped: u64, after: u64 },
}

fn step(position: &mut Position, sequence: u64) -> Step {
    let last = position.delivered.unwrap_or(0);
    if sequence <= last {
        return Step::Old;
    }
    let skipped = sequence - last - 1;
    if skipped > 0 && position.skipped_after != Some(last) {
        position.skipped_after = Some(last);
        return Step::Jumped {
            skipped,
            after: last,
        };
    }
    position.delivered = Some(sequence);
    if skipped > 0 {
        Step::Lost {
            skipped,
            after: last,
        }
    } else {
        Step::Next
    }
}

/// How long a consumer may take to be made before [`bridge`] reads what
/// the stream has meanwhile; a consumer is normally made in a millisecond.
const BRIDGE_POLL: Duration = Duration::from_millis(50);

/// The bound on one read by sequence: unanswered, the next poll asks again.
const BRIDGE_GET: Duration = Duration::from_millis(250);

/// How many messages one poll of [`bridge`] reads before it lets the
/// consumer being made (or an election) be heard.
const BRIDGE_BATCH: usize = 256;

/// Reads the stream by sequence, from after `position`, while a consumer
/// is being made: a message get needs only the stream's leader, a new
/// consumer the JetStream cluster's metadata leader as well. Measured on a
/// `kill -9` of the server leading the room's stream: the first consumer
/// asked for after the stream's election often went unanswered, and when
/// the killed server also led the metadata, none could be made until that
/// second election, seconds later; the stream's messages could be read
/// meanwhile. Once the consumer reads, what this read is skipped by
/// sequence ([`accept`]).
async fn bridge<H: Hub>(
    reading: &mut Reading<'_>,
    stream: &stream::Stream,
    hub: &H,
    ghost: &Arc<Client>,
) -> anyhow::Result<()> {
    let mut read = 0;
    while read < BRIDGE_BATCH {
        let next = reading
            .position
            .delivered
            .map_or(1, |delivered| delivered + 1);
        let message = match tokio::time::timeout(BRIDGE_GET, stream.get_raw_message(next)).await {
            Ok(Ok(message)) => message,
            // Not stored yet, or gone (retention: the consumer counts it);
            // unanswered or refused: asked again at the next poll.
            Ok(Err(_)) | Err(_) => break,
        };
        if message.sequence != next || !accept(reading.shared, reading.position, next)? {
            break;
        }
        read += 1;
        reading.position.pending = reading.position.pending.saturating_sub(1);
        show_lag(
            reading.shared.counters(),
            reading.position.pending,
            message.time.unix_timestamp_nanos(),
        );
        deliver(
            reading.shared,
            hub,
            ghost,
            reading.liveness,
            &message.subject,
            &message.payload,
        )
        .await;
    }
    if read > 0 {
        reading.outage.succeeded("reading the room's stream");
        debug!(
            read,
            delivered = reading.position.delivered.unwrap_or(0),
            "read the room's stream by sequence while its consumer is being made"
        );
    }
    Ok(())
}

/// Finds the stream and works out where to read it from ([`resume`]).
async fn locate(
    connection: &Connection,
    shared: &Arc<Shared>,
    names: &Subjects,
    position: &mut Position,
) -> anyhow::Result<stream::Stream> {
    let stream = ensure_stream(connection, shared, names).await?;
    // The answer that found (or made) the stream: one round trip fewer
    // while the stream's new leader is settling.
    let info = stream.cached_info();
    let epoch = epoch_of(info);
    let state = info.state.clone();
    let Resume {
        start,
        missed,
        remade,
    } = resume(position, &epoch, state.first_sequence, state.last_sequence);
    if remade {
        warn!(
            delivered = position.delivered.unwrap_or(0),
            stream_last = state.last_sequence,
            missed,
            "the room's stream is not the one this node was reading (the broker lost it and \
             it was made again): reading the new one from its start; `missed` counts what \
             the old one still held for this node, as far as it knew"
        );
        ClusterCounters::add(&shared.counters().streams_remade, 1);
    } else if missed > 0 {
        warn!(
            missed,
            "events expired from the stream (--cluster-retention) before this node read them"
        );
    }
    ClusterCounters::add(&shared.counters().missed, missed);
    *position = Position {
        stream: Some(epoch),
        delivered: Some(start - 1),
        pending: state.last_sequence.saturating_sub(start - 1),
        skipped_after: position.skipped_after.filter(|_| !remade),
    };
    Ok(stream)
}

/// Makes a consumer of `stream` from `start` and starts pulling.
async fn subscribe(
    stream: stream::Stream,
    start: u64,
    events: String,
    heartbeat: Duration,
) -> anyhow::Result<consumer::pull::Stream> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: consumer::AckPolicy::None,
            // An abandoned consumer (we crashed, or made a new one) goes
            // away by itself.
            inactive_threshold: Duration::from_secs(30),
            filter_subject: events,
            ..Default::default()
        })
        .await?;
    let heartbeat = pull_heartbeat(heartbeat);
    let messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(heartbeat)
        .expires(heartbeat * 10)
        .messages()
        .await?;
    Ok(messages)
}

/// The idle heartbeat asked of the broker with each pull (`--cluster-heartbeat`,
/// at least half a second: a pull's heartbeats are the broker's work).
fn pull_heartbeat(heartbeat: Duration) -> Duration {
    heartbeat.max(Duration::from_millis(500))
}

/// Sets the lag gauges from one stream message's metadata: what the broker
/// still holds for us, and how long this message waited in the stream.
fn show_lag(counters: &ClusterCounters, pending: u64, stored_nanos: i128) {
    let now_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let stored = u128::try_from(stored_nanos).unwrap_or(0);
    let lag = now_nanos.saturating_sub(stored);
    ClusterCounters::set(&counters.consumer_pending, pending);
    ClusterCounters::set(&counters.lag_nanos, u64::try_from(lag).unwrap_or(u64::MAX));
    ClusterCounters::set(
        &counters.last_stored_nanos,
        u64::try_from(stored).unwrap_or(u64::MAX),
    );
}

/// Checks one stored batch and hands what it means to local clients.
async fn deliver<H: Hub>(
    shared: &Shared,
    hub: &H,
    ghost: &Arc<Client>,
    liveness: &Liveness,
    subject: &str,
    payload: &[u8],
) {
    let wire::Decoded {
        node,
        batch,
        events,
    } = match wire::decode_batch(payload) {
        Ok(decoded) => decoded,
        Err(why) => {
            shared.garbage(subject, &why);
            return;
        }
    };
    shared.good_message();
    if node == shared.node {
        // Our own clients had these at once (local-first).
        return;
    }
    let _presence = match &shared.presence {
        Some(presence) => Some(presence.lock().await),
        None => None,
    };
    let delivery = shared
        .roster
        .lock()
        .batch(&node, batch, events, Instant::now());
    if delivery.duplicate {
        debug!(%node, batch, "skipped a batch stored twice");
        return;
    }
    ClusterCounters::add(&shared.counters().received, delivery.batches);
    if delivery.appeared {
        let _ = liveness.appeared.send(node);
    }
    if delivery.missed > 0 {
        warn!(
            missed = delivery.missed,
            "events of another node could not be shown in order (a gap before its roster)"
        );
        ClusterCounters::add(&shared.counters().missed, delivery.missed);
    }
    hand_over(hub, ghost, &delivery).await;
}

/// The judge found `node` silent: its clients in view are gone.
async fn judged_dead<H: Hub>(shared: &Arc<Shared>, hub: &H, ghost: &Arc<Client>, node: &str) {
    let _presence = match &shared.presence {
        Some(presence) => Some(presence.lock().await),
        None => None,
    };
    let delivery = shared.roster.lock().dead(node, Instant::now());
    if delivery.messages.is_empty() {
        return;
    }
    ClusterCounters::add(&shared.counters().dead_nodes, 1);
    hand_over(hub, ghost, &delivery).await;
    if shared.names_on {
        super::names::free_dead(shared, vec![node.to_string()], delivery.departed);
    }
}

async fn hand_over<H: Hub>(hub: &H, ghost: &Arc<Client>, delivery: &Delivery) {
    // Lines are history; arrivals and departures are not.
    for shown in &delivery.messages {
        match shown {
            Shown::Line(message) => hub.broadcast(ghost, message).await,
            Shown::Membership(message) => hub.relay(ghost, message).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111";
    const NEW: &str = "2222";

    fn at(delivered: u64, pending: u64) -> Position {
        Position {
            stream: Some(OLD.to_string()),
            delivered: Some(delivered),
            pending,
            skipped_after: None,
        }
    }

    #[test]
    fn a_new_node_starts_after_the_end() {
        let resume = resume(&Position::default(), OLD, 1, 40);
        assert_eq!(
            resume,
            Resume {
                start: 41,
                missed: 0,
                remade: false
            }
        );
    }

    /// Also when the server that answered is a replica still catching up
    /// and reports fewer messages than were delivered.
    #[test]
    fn the_same_stream_resumes_after_what_was_delivered() {
        assert_eq!(resume(&at(30, 5), OLD, 1, 40).start, 31);
        assert_eq!(resume(&at(30, 5), OLD, 1, 30).start, 31);
        let behind = resume(&at(30, 5), OLD, 0, 0);
        assert_eq!((behind.start, behind.missed, behind.remade), (31, 0, false));
    }

    #[test]
    fn expired_events_are_missed() {
        let resume = resume(&at(30, 5), OLD, 36, 50);
        assert_eq!((resume.start, resume.missed, resume.remade), (36, 5, false));
    }

    /// A consumer made from where the node was when it was asked for
    /// delivers again what the gets delivered meanwhile: skipped.
    #[test]
    fn what_was_delivered_is_skipped() {
        let mut position = at(30, 0);
        assert_eq!(step(&mut position, 31), Step::Next);
        assert_eq!(step(&mut position, 32), Step::Next);
        for again in [29, 31, 32] {
            assert_eq!(step(&mut position, again), Step::Old);
        }
        assert_eq!(step(&mut position, 33), Step::Next);
        assert_eq!(position.delivered, Some(33));
    }

    /// A jump is read again from before it once; at the same place again
    /// it is counted and the reading goes on.
    #[test]
    fn a_jump_is_read_again_then_counted() {
        let mut position = at(30, 0);
        assert_eq!(
            step(&mut position, 34),
            Step::Jumped {
                skipped: 3,
                after: 30
            }
        );
        assert_eq!(position.delivered, Some(30));
        // The new consumer got them.
        assert_eq!(step(&mut position, 31), Step::Next);
        assert_eq!(
            step(&mut position, 40),
            Step::Jumped {
                skipped: 8,
                after: 31
            }
        );
        // It did not: gone.
        assert_eq!(
            step(&mut position, 40),
            Step::Lost {
                skipped: 8,
                after: 31
            }
        );
        assert_eq!(position.delivered, Some(40));
    }

    /// The broker lost its store and another node made the stream again:
    /// longer than what we had read (the case that used to skip its start)
    /// or shorter, it is read from its start.
    #[test]
    fn a_remade_stream_is_read_from_its_start() {
        for last in [0, 3, 30, 31, 500] {
            let resume = resume(&at(30, 7), NEW, 1, last);
            assert_eq!(
                resume,
                Resume {
                    start: 1,
                    missed: 7,
                    remade: true
                },
                "new stream of {last}"
            );
        }
    }
}
