//! Liveness: every `--cluster-heartbeat` this node says it is alive and who
//! its clients are; it listens to the other nodes' heartbeats and announces
//! the clients of a node silent for `--cluster-node-timeout` as gone. While
//! our own connection is down nobody is declared dead.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connection::{wait_for_connection, Connection, Subjects};
use super::wire::{self, Heartbeat};
use super::Shared;
use crate::client::Client;
use crate::config::ClusterCounters;
use crate::hub::Hub;
use crate::protocol::Message;

pub(super) async fn heartbeats<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    ghost: Arc<Client>,
    mut connection: watch::Receiver<Option<Connection>>,
) {
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let names = Subjects::new(&shared.config.room);
    // Subscribing only queues the request in the client; it is sent (and
    // sent again after every reconnect) by the client itself.
    let mut beats = match connection.client.subscribe(names.heartbeats.clone()).await {
        Ok(subscriber) => subscriber,
        Err(err) => {
            warn!(cause = %err, "cannot subscribe to heartbeats; dead nodes will not be noticed");
            shared.stop.cancelled().await;
            return;
        }
    };
    // Silent nodes are looked for four times a heartbeat, so that noticing
    // one takes at most a quarter heartbeat past the timeout.
    let mut tick = tokio::time::interval(shared.config.heartbeat / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat: Option<Instant> = None;
    let mut was_connected = false;
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            _ = tick.tick() => {
                let connected = connection.client.connection_state() == State::Connected;
                let now = Instant::now();
                if connected && !was_connected {
                    shared.roster.lock().reset_clocks(now);
                    *shared.hearing_since.lock() = Some(now);
                }
                was_connected = connected;
                if !connected {
                    *shared.hearing_since.lock() = None;
                    continue;
                }
                if last_beat.is_none_or(|at| now.duration_since(at) >= shared.config.heartbeat.mul_f64(0.9)) {
                    last_beat = Some(now);
                    let (seq, clients) = shared.snapshot();
                    beat(&connection, &shared, &names, seq, Some(clients)).await;
                }
                let (dead, gone) = shared.roster.lock().reap(now, shared.config.node_timeout);
                if !gone.is_empty() {
                    ClusterCounters::add(&shared.counters().dead_nodes, 1);
                    announce(&*hub, &ghost, &gone, Message::left).await;
                    if shared.names_on {
                        super::names::free_dead(&shared, dead, gone);
                    }
                }
            }
            next = beats.next() => {
                let Some(message) = next else { break };
                match wire::decode_heartbeat(&message.payload) {
                    Ok(heartbeat) => {
                        shared.good_message();
                        if heartbeat.node == shared.node {
                            continue;
                        }
                        let back = shared.roster.lock().heartbeat(heartbeat, Instant::now());
                        announce(&*hub, &ghost, &back, Message::arrived).await;
                    }
                    Err(why) => shared.garbage(&message.subject, &why),
                }
            }
        }
    }
    // Leaving: the others can forget this node at once (its clients'
    // departures are already on the stream).
    if connection.client.connection_state() == State::Connected {
        let (seq, _) = shared.snapshot();
        beat(&connection, &shared, &names, seq, None).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.client.flush()).await;
    }
}

async fn beat(
    connection: &Connection,
    shared: &Shared,
    names: &Subjects,
    seq: u64,
    clients: Option<Vec<Arc<str>>>,
) {
    let heartbeat = Heartbeat {
        v: wire::VERSION,
        node: shared.node.clone(),
        seq,
        clients,
    };
    if let Ok(payload) = serde_json::to_vec(&heartbeat) {
        if let Err(err) = connection
            .client
            .publish(names.heartbeats.clone(), payload.into())
            .await
        {
            debug!(cause = %err, "heartbeat not sent");
        }
    }
}

/// Tells the local clients that each of `who` arrived (or left), as one message.
async fn announce<H: Hub>(
    hub: &H,
    ghost: &Arc<Client>,
    who: &[Arc<str>],
    line: fn(&str) -> Message,
) {
    for who in who {
        hub.relay(ghost, &line(who)).await;
    }
}
