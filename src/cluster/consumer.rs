//! The consumer: reads the room's stream and hands other nodes' events to
//! the local hub, in stream order.
//!
//! It reads from the sequence after the last one it delivered, through an
//! ephemeral pull consumer; on any error (broker restart, consumer lost,
//! missed heartbeats) it makes a new consumer from that same sequence.
//!
//! It is the one place where membership is announced: each batch and each
//! verdict of the liveness judge (received between two stream messages) goes
//! through [`super::roster::Roster`], which decides what local clients are
//! told, in stream order; a stored duplicate (a retry that outlived the
//! de-duplication window) is skipped by batch number whatever the node's
//! state.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::backfill;
use super::backoff::Backoff;
use super::connection::{
    ensure_stream, until_connected, wait_for_connection, Connection, Subjects,
};
use super::heartbeats::Verdict;
use super::roster::{Delivery, Shown, FORGET_AFTER};
use super::wire;
use super::Shared;
use crate::client::Client;
use crate::config::ClusterCounters;
use crate::hub::Hub;

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
    let mut delivered: Option<u64> =
        backfill::fill(&shared, shared.history.as_ref(), connection.clone()).await;
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let names = Subjects::new(&shared.config.room);
    let mut outage = Backoff::new(Duration::from_millis(20), shared.config.reconnect_max);
    loop {
        if !until_connected(&connection.client, &shared.stop).await {
            return;
        }
        match consume(
            &connection,
            &shared,
            &names,
            &*hub,
            &ghost,
            &mut delivered,
            &mut outage,
            &mut liveness,
        )
        .await
        {
            Ok(()) => return,
            Err(err) => {
                outage.failed("reading the room's stream", &err);
                if outage.pause(&shared.stop).await {
                    return;
                }
            }
        }
    }
}

/// Delivers the stream from after `delivered` until an error or stop.
// Each argument is a different owner's (the task's state, the broker's,
// the hub's, the judge's); bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn consume<H: Hub>(
    connection: &Connection,
    shared: &Arc<Shared>,
    names: &Subjects,
    hub: &H,
    ghost: &Arc<Client>,
    delivered: &mut Option<u64>,
    outage: &mut Backoff,
    liveness: &mut Liveness,
) -> anyhow::Result<()> {
    let mut stream = ensure_stream(connection, shared, names).await?;
    let state = stream.info().await?.state.clone();
    let start = match *delivered {
        // A new node joins the room as it is now: no history.
        None => state.last_sequence + 1,
        Some(last) if state.last_sequence < last => {
            // The stream is younger than what we delivered: it was lost
            // (memory storage, or deleted) and made again.
            warn!(
                delivered = last,
                stream_last = state.last_sequence,
                "the room's stream was recreated; reading it from its start"
            );
            state.first_sequence.max(1)
        }
        Some(last) => {
            if state.first_sequence > last + 1 {
                let missed = state.first_sequence - (last + 1);
                warn!(
                    missed,
                    "events expired from the stream (--cluster-retention) before this node read them"
                );
                ClusterCounters::add(&shared.counters().missed, missed);
            }
            (last + 1).max(state.first_sequence)
        }
    };
    if delivered.is_none() || start <= delivered.unwrap_or(0) {
        *delivered = Some(start - 1);
    }
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: consumer::AckPolicy::None,
            // An abandoned consumer (we crashed, or made a new one) goes
            // away by itself.
            inactive_threshold: Duration::from_secs(30),
            filter_subject: names.events.clone(),
            ..Default::default()
        })
        .await?;
    let heartbeat = shared.config.heartbeat.max(Duration::from_millis(500));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(heartbeat)
        .expires(heartbeat * 10)
        .messages()
        .await?;
    ClusterCounters::add(&shared.counters().streams_opened, 1);
    // A new consumer's first message may be past `delivered` (retention
    // passed the rest: counted above); after it, a gap is a loss.
    let mut fresh = true;
    let mut tidy = tokio::time::interval(FORGET_AFTER / 10);
    tidy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
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
                info.stream_sequence
            }
            Err(err) => anyhow::bail!("a stream message without its metadata: {err}"),
        };
        if sequence <= delivered.unwrap_or(0) {
            continue;
        }
        let expected = delivered.map_or(sequence, |last| last + 1);
        if sequence > expected && !fresh {
            // With no acks the broker counts what it sent as delivered,
            // even into a connection that was silently cut (a partition):
            // those messages never came. Read again from the first missing.
            anyhow::bail!(
                "stream messages {expected}..{sequence} were sent into a broken connection"
            );
        }
        fresh = false;
        *delivered = Some(sequence);
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
