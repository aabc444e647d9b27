//! The backplane's three tasks and everything they say to the broker.
//!
//! - The **publisher** connects (retrying forever in the background, so a
//!   node starts without its broker), then takes the oldest queued events
//!   as one batch, publishes it with the message id `NODE-BATCH` and waits
//!   for the stream's acknowledgement; on any failure it sends the same
//!   batch again, with the same id, until it is stored. One batch in
//!   flight keeps a node's events in order on the stream; batches grow
//!   while one is in flight, so throughput is not one round trip per read.
//! - The **consumer** reads the stream from the sequence after the last
//!   one it delivered, through an ephemeral pull consumer; on any error
//!   (broker restart, consumer lost, missed heartbeats) it makes a new
//!   consumer from that same sequence. A stored duplicate (a retry that
//!   outlived the de-duplication window) is skipped by batch number.
//! - The **heartbeat** task says every `heartbeat` that this node is alive
//!   and who its clients are, listens to the other nodes' heartbeats, and
//!   announces the clients of a node silent for `node_timeout` as gone.
//!   While our own connection is down nobody is declared dead.
//!
//! Every call here is one a NATS 2.9 server understands (the client is
//! built without its `server_2_10`+ features); tests/cluster.rs runs them
//! against the real server.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client as NatsClient, ConnectOptions, Event, ServerAddr};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::wire::{self, Batch, Heartbeat};
use super::Shared;
use crate::client::{Client, ClientId};
use crate::config::{ClusterCounters, Config};
use crate::hub::Hub;
use crate::protocol::Message;

/// A connected (or reconnecting) client and its JetStream context.
#[derive(Clone)]
pub(crate) struct Connection {
    pub client: NatsClient,
    pub jetstream: jetstream::Context,
}

/// The room's names on the broker.
struct Names {
    stream: String,
    events: String,
    heartbeats: String,
}

impl Names {
    fn new(room: &str) -> Names {
        Names {
            stream: format!("CHAT_{room}"),
            events: format!("chat.{room}.events"),
            heartbeats: format!("chat.{room}.heartbeat"),
        }
    }
}

/// Starts the publisher, the consumer and the heartbeat task.
pub(super) fn start<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    config: &Config,
) -> Vec<JoinHandle<()>> {
    // Remote lines enter the local hub as if said by one more participant.
    // It never joins, so no model sends it anything; it only stands for
    // "the rest of the room" where the hub wants a sender.
    let ghost = Arc::new(Client::new(
        ClientId(u64::MAX),
        "cluster".into(),
        config,
        &CancellationToken::new(),
        None,
    ));
    let (connected, connection) = watch::channel(None);
    info!(node = %shared.node, room = %shared.config.room, "joining the room through the broker");
    vec![
        tokio::spawn(publisher(Arc::clone(&shared), connected)),
        tokio::spawn(consumer(
            Arc::clone(&shared),
            Arc::clone(&hub),
            Arc::clone(&ghost),
            connection.clone(),
        )),
        tokio::spawn(heartbeats(shared, hub, ghost, connection)),
    ]
}

/// Credentials from the URL: `user:password@` or `token@`, percent-decoded.
fn connect_options(shared: &Shared, servers: &[ServerAddr]) -> ConnectOptions {
    let reconnect_max = shared.config.reconnect_max;
    let counters = Arc::clone(&shared.config.counters);
    let mut options = ConnectOptions::new()
        .name(format!("chat-server {}", shared.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        // A silent broker (network cut, not a closed socket) is noticed
        // after two missed pings.
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            let pause = Duration::from_millis(50) * 2u32.saturating_pow(attempts.min(10) as u32);
            pause.min(reconnect_max)
        })
        // The client's event task (it runs anyway) keeps the gauge: the
        // same transitions as the state the publisher and consumer wait on.
        .event_callback(move |event| {
            let counters = Arc::clone(&counters);
            async move {
                match event {
                    Event::Connected => ClusterCounters::set(&counters.connected, 1),
                    Event::Disconnected | Event::Closed => {
                        ClusterCounters::set(&counters.connected, 0);
                    }
                    _ => {}
                }
            }
        });
    if let Some(server) = servers.iter().find(|server| server.username().is_some()) {
        let user = percent_decode(server.username().unwrap_or_default());
        options = match server.password() {
            Some(password) => options.user_and_password(user, percent_decode(password)),
            None => options.token(user),
        };
    }
    options
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes the client. With `retry_on_initial_connect` this returns at once
/// and the client keeps trying in the background; only a bad URL or an
/// unreadable creds file fails, and those are retried here (the operator
/// may fix the file).
async fn connect(shared: &Shared) -> Option<Connection> {
    let mut logged = false;
    loop {
        match try_connect(shared).await {
            Ok(client) => {
                let jetstream = jetstream::ContextBuilder::new()
                    .timeout(shared.config.ack_timeout)
                    .build(client.clone());
                return Some(Connection { client, jetstream });
            }
            Err(err) => {
                if !logged {
                    warn!(cause = %err, url = %shared.config.url, "cannot set up the broker connection; retrying");
                    logged = true;
                }
                tokio::select! {
                    () = shared.stop.cancelled() => return None,
                    () = tokio::time::sleep(shared.config.reconnect_max) => {}
                }
            }
        }
    }
}

async fn try_connect(shared: &Shared) -> anyhow::Result<NatsClient> {
    let servers = shared
        .config
        .url
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = connect_options(shared, &servers);
    if let Some(creds) = &shared.config.creds {
        options = options.credentials_file(creds).await?;
    }
    Ok(async_nats::connect_with_options(servers, options).await?)
}

/// Creates the room's stream if it does not exist (the first node to reach
/// the broker does; the others find it).
async fn ensure_stream(
    connection: &Connection,
    shared: &Shared,
    names: &Names,
) -> anyhow::Result<stream::Stream> {
    let config = &shared.config;
    Ok(connection
        .jetstream
        .get_or_create_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![names.events.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: config.retention_age,
            max_bytes: i64::try_from(config.retention_bytes).unwrap_or(i64::MAX),
            duplicate_window: config.retention_age.min(Duration::from_secs(120)),
            num_replicas: 1,
            ..Default::default()
        })
        .await?)
}

/// Waits while the client is not connected, so that nothing is queued in
/// it during an outage (it would hold every retry until the broker is back).
async fn until_connected(client: &NatsClient, stop: &CancellationToken) -> bool {
    while client.connection_state() != State::Connected {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    true
}

/// Logs the first failure of an outage and its end, not every retry.
#[derive(Default)]
struct Outage {
    failures: u64,
}

impl Outage {
    fn failed(&mut self, what: &str, err: &dyn std::fmt::Display) {
        if self.failures == 0 {
            warn!(cause = %err, "{what} failed; retrying until the broker is back");
        } else {
            debug!(cause = %err, failures = self.failures, "{what} failed again");
        }
        self.failures += 1;
    }

    fn succeeded(&mut self, what: &str) {
        if self.failures > 0 {
            info!(failures = self.failures, "{what}: the broker is back");
            self.failures = 0;
        }
    }

    fn pause(&self, max: Duration) -> Duration {
        let pause = Duration::from_millis(20) * 2u32.saturating_pow(self.failures.min(10) as u32);
        pause.min(max)
    }
}

async fn publisher(shared: Arc<Shared>, connected: watch::Sender<Option<Connection>>) {
    let Some(connection) = connect(&shared).await else {
        return;
    };
    let _ = shared.connection.set(connection.clone());
    let _ = connected.send(Some(connection.clone()));
    let names = Names::new(&shared.config.room);
    let mut batch_number = 0;
    let mut in_flight: Option<(String, bytes::Bytes)> = None;
    let mut outage = Outage::default();
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
                    ClusterCounters::add(&shared.counters().dropped, batch.events.len() as u64);
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
            match ensure_stream(&connection, &shared, &names).await {
                Ok(_) => stream_ready = true,
                Err(err) => {
                    outage.failed("creating the room's stream", &err);
                    if pause(&shared, outage.pause(shared.config.reconnect_max)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(id.as_str());
        let stored = match connection
            .jetstream
            .send_publish(names.events.clone(), publish)
            .await
        {
            Ok(ack) => ack.await.map_err(anyhow::Error::from),
            Err(err) => Err(err.into()),
        };
        match stored {
            Ok(ack) => {
                outage.succeeded("publishing");
                if ack.duplicate {
                    debug!(%id, "batch was already stored");
                }
                let events = shared.outgoing.lock().in_flight as u64;
                ClusterCounters::add(&shared.counters().published, 1);
                ClusterCounters::add(&shared.counters().events_published, events);
                in_flight = None;
                shared.batch_done();
            }
            Err(err) => {
                outage.failed("publishing", &err);
                // The stream may be gone (a broker with memory storage
                // restarted): make sure of it before the next try.
                stream_ready = false;
                if pause(&shared, outage.pause(shared.config.reconnect_max)).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps for `how_long`; true if the backplane is stopping.
async fn pause(shared: &Shared, how_long: Duration) -> bool {
    tokio::select! {
        () = shared.stop.cancelled() => true,
        () = tokio::time::sleep(how_long) => false,
    }
}

async fn wait_for_connection(
    connection: &mut watch::Receiver<Option<Connection>>,
    stop: &CancellationToken,
) -> Option<Connection> {
    tokio::select! {
        () = stop.cancelled() => None,
        found = connection.wait_for(Option::is_some) => found.ok().and_then(|found| found.clone()),
    }
}

async fn consumer<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    ghost: Arc<Client>,
    mut connection: watch::Receiver<Option<Connection>>,
) {
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let names = Names::new(&shared.config.room);
    let mut delivered: Option<u64> = None;
    let mut outage = Outage::default();
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
        )
        .await
        {
            Ok(()) => return,
            Err(err) => {
                outage.failed("reading the room's stream", &err);
                if pause(&shared, outage.pause(shared.config.reconnect_max)).await {
                    return;
                }
            }
        }
    }
}

/// Delivers the stream from after `delivered` until an error or stop.
async fn consume<H: Hub>(
    connection: &Connection,
    shared: &Shared,
    names: &Names,
    hub: &H,
    ghost: &Arc<Client>,
    delivered: &mut Option<u64>,
    outage: &mut Outage,
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
    loop {
        let next = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
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
        *delivered = Some(sequence);
        deliver(shared, hub, ghost, &message.subject, &message.payload).await;
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

/// Checks one stored batch and hands its events to the local hub.
async fn deliver<H: Hub>(
    shared: &Shared,
    hub: &H,
    ghost: &Arc<Client>,
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
    if !shared
        .roster
        .lock()
        .fresh_batch(&node, batch, Instant::now())
    {
        debug!(%node, batch, "skipped a batch stored twice");
        return;
    }
    ClusterCounters::add(&shared.counters().received, 1);
    for event in events {
        shared.roster.lock().apply(&node, &event);
        hub.broadcast(ghost, &event.message).await;
    }
}

async fn heartbeats<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    ghost: Arc<Client>,
    mut connection: watch::Receiver<Option<Connection>>,
) {
    let Some(connection) = wait_for_connection(&mut connection, &shared.stop).await else {
        return;
    };
    let names = Names::new(&shared.config.room);
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
    names: &Names,
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
        hub.broadcast(ghost, &line(who)).await;
    }
}
