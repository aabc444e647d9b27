//! The publisher: gets this node's events to the room's stream, in order,
//! each exactly once.
//!
//! It connects (retrying forever in the background, so a node starts
//! without its broker), then takes the oldest queued events as one batch,
//! publishes it with the message id `NODE-BATCH` and waits for the stream's
//! acknowledgement; on any failure it sends the same batch again, with the
//! same id, until it is stored; at once when the stream elects a new
//! leader ([`super::connection::Elections`]). One batch in flight keeps a node's events
//! in order on the stream; batches grow while one is in flight, so
//! throughput is not one round trip per read.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::backoff::{Backoff, JETSTREAM_RETRY_MAX};
use super::connection::{connect, ensure_stream, until_connected, Connection, Elections, Subjects};
use super::wire::{self, Batch};
use super::Shared;
use crate::config::ClusterCounters;

pub(super) async fn publisher(shared: Arc<Shared>, connected: watch::Sender<Option<Connection>>) {
    let Some(connection) = connect(&shared).await else {
        return;
    };
    let _ = shared.connection.set(connection.clone());
    let _ = connected.send(Some(connection.clone()));
    let names = Subjects::new(&shared.config.room);
    let mut elections = Elections::subscribe(&connection, &names).await;
    let mut batch_number = 0;
    let mut in_flight: Option<(String, bytes::Bytes)> = None;
    let mut outage = Backoff::new(
        Duration::from_millis(20),
        shared.config.reconnect_max.min(JETSTREAM_RETRY_MAX),
    );
    let mut stream_ready = false;
    loop {
        if in_flight.is_none() {
            let events = shared.take_batch(wire::BATCH_TARGET);
            if events.is_empty() {
                shared.batch_done();
                tokio::select! {
                    () = shared.stop.cancelled() => return,
                    () = shared.queued.notified() => continue,
                }
            }
            batch_number += 1;
            let batch = Batch {
                v: wire::VERSION,
                node: shared.node.clone(),
                batch: batch_number,
                events,
            };
            match serde_json::to_vec(&batch) {
                Ok(payload) if payload.len() <= wire::MAX_PAYLOAD => {
                    in_flight = Some((batch.message_id(), payload.into()));
                }
                Ok(payload) => {
                    warn!(
                        bytes = payload.len(),
                        "an event too large for the broker was dropped"
                    );
                    let chat = batch.events.iter().filter(|event| event.is_chat()).count();
                    ClusterCounters::add(&shared.counters().dropped, chat as u64);
                    // The others miss these events: our roster follows.
                    shared.roster_due();
                    shared.batch_done();
                    continue;
                }
                Err(err) => {
                    warn!(cause = %err, "cannot encode events; dropped");
                    shared.batch_done();
                    continue;
                }
            }
        }
        let Some((id, payload)) = &in_flight else {
            continue;
        };
        if !until_connected(&connection.client, &shared.stop).await {
            return;
        }
        if !stream_ready {
            elections.forget();
            let made = tokio::select! {
                made = ensure_stream(&connection, &shared, &names) => made,
                () = elections.next() => continue,
            };
            match made {
                Ok(_) => stream_ready = true,
                Err(err) => {
                    outage.failed("creating the room's stream", &err);
                    tokio::select! {
                        stopped = outage.pause(&shared.stop) => if stopped { return },
                        () = elections.next() => {}
                    }
                    continue;
                }
            }
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(id.as_str());
        let storing = async {
            match connection
                .jetstream
                .send_publish(names.events.clone(), publish)
                .await
            {
                Ok(ack) => ack.await.map_err(anyhow::Error::from),
                Err(err) => Err(err.into()),
            }
        };
        elections.forget();
        let stored = tokio::select! {
            stored = storing => stored,
            // The old leader will not answer: the same batch (same id, so
            // stored once) goes to the new one now.
            () = elections.next() => {
                debug!(%id, "the room's stream has a new leader: sending the batch again");
                continue;
            }
        };
        match stored {
            Ok(ack) => {
                outage.succeeded("publishing");
                if ack.duplicate {
                    debug!(%id, "batch was already stored");
                }
                shared.count_published();
                in_flight = None;
                shared.batch_done();
            }
            Err(err) => {
                outage.failed("publishing", &err);
                // The stream may be gone (a broker with memory storage
                // restarted): make sure of it before the next try.
                stream_ready = false;
                tokio::select! {
                    stopped = outage.pause(&shared.stop) => if stopped { return },
                    () = elections.next() => {}
                }
            }
        }
    }
}
