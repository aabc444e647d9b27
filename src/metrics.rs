//! What the server counts about itself, and (feature `metrics`) the
//! Prometheus endpoint that shows it.
//!
//! Counting stays off the per-delivery path. Counters are bumped where
//! work is already batched: once per read (lines received), once per socket
//! write (messages and bytes delivered), once per connection or per rare
//! event (accepts, refusals, timeouts, kicks). The per-read and per-write
//! ones are kept per worker thread (`Shard`): each thread adds to its own
//! cache line with a plain load and store, no locked instruction, and a
//! scrape sums the threads: with several workers, writers on different
//! cores never contend for one counter's cache line. The rare counters are
//! plain relaxed atomics. The gauges are not counted at all: clients
//! connected, bytes queued and messages dropped are summed over the live
//! clients when Prometheus scrapes ([`Metrics::register`] keeps a weak handle to each, once per
//! connection). The `prometheus-client` registry is touched only then, by
//! a collector that reads these atomics.
//!
//! With `--history` the scrape shows what the room's history holds
//! (`chat_history_lines`, `chat_history_bytes`), read from the history's
//! own counts; without it those families are absent.
//!
//! With `--cluster` the scrape also shows the backplane's counts and
//! gauges (`chat_cluster_*`), read from the
//! [`ClusterCounters`](crate::config::ClusterCounters) the backplane keeps
//! itself, once per broker message or batch and never per delivery;
//! without it those families are absent.
//!
//! Without the `metrics` feature every method here is empty and the
//! compiler removes the calls: embedders that leave the feature out pay
//! nothing, and neither `prometheus-client` nor `hyper` is built.

#[cfg(feature = "metrics")]
use std::cell::RefCell;
#[cfg(feature = "metrics")]
use std::collections::HashMap;
#[cfg(feature = "metrics")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(feature = "metrics")]
use std::sync::Weak;
#[cfg(feature = "metrics")]
use std::thread::ThreadId;

#[cfg(feature = "metrics")]
use parking_lot::Mutex;

use crate::client::Client;
#[cfg(feature = "metrics")]
use crate::client::{ClientId, Kick};
use crate::room::history::History;

/// A monotonic count; nothing at all without the `metrics` feature.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    #[cfg(feature = "metrics")]
    value: AtomicU64,
}

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        #[cfg(feature = "metrics")]
        self.value.fetch_add(n, Ordering::Relaxed);
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    #[cfg(feature = "metrics")]
    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// One thread's per-read and per-write counts for one server, on a cache
/// line of its own. Only its thread writes it, so an add is a relaxed load
/// and store; a scrape reads it from another thread.
#[cfg(feature = "metrics")]
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    lines_received: AtomicU64,
    messages_delivered: AtomicU64,
    bytes_delivered: AtomicU64,
}

#[cfg(feature = "metrics")]
impl Shard {
    #[inline]
    fn bump(count: &AtomicU64, n: u64) {
        count.store(
            count.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

// Hand-written rather than the `thread_local` crate's per-object
// `ThreadLocal<Shard>` (which would replace the server id, this cache and
// the map by thread): its `get_or_default` gives a thread its id through a
// thread-local with a destructor, and panics if the thread counts while
// its thread-locals are being torn down and that one is already gone. Here `try_with` fails
// instead and the count goes to `Metrics::unsharded`: counting must never
// panic. The cost is this cache and the map, about 30 lines.
#[cfg(feature = "metrics")]
thread_local! {
    /// This thread's shard of the server it last counted for, by the
    /// server's [`Metrics::id`]. A thread that serves several servers in
    /// turn (an embedder's shared runtime) finds its shard of each in that
    /// server's map, so switching never creates a new one.
    static SHARD: RefCell<Option<(u64, Arc<Shard>)>> = const { RefCell::new(None) };
}

/// Tells servers in one process apart for the per-thread shards.
#[cfg(feature = "metrics")]
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Why a connection was turned away before it joined the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over `--max-clients`.
    ServerFull,
    /// Over `--max-clients-per-ip`.
    TooManyFromAddress,
    /// The TLS handshake failed (a plaintext client, a garbage ClientHello,
    /// a certificate the client rejected).
    TlsHandshake,
    /// The TLS handshake did not finish within `--tls-handshake-timeout`.
    TlsTimeout,
}

impl Refusal {
    /// How many reasons there are: the length of the per-reason counters.
    const COUNT: usize = 4;

    #[cfg(feature = "metrics")]
    const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::ServerFull,
        Refusal::TooManyFromAddress,
        Refusal::TlsHandshake,
        Refusal::TlsTimeout,
    ];

    #[cfg(feature = "metrics")]
    fn label(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::TooManyFromAddress => "too_many_from_address",
            Refusal::TlsHandshake => "tls_handshake_failed",
            Refusal::TlsTimeout => "tls_handshake_timeout",
        }
    }
}

/// See the module documentation. One per server, shared by every task.
#[derive(Debug)]
pub(crate) struct Metrics {
    #[cfg(feature = "metrics")]
    id: u64,
    /// Each thread's shard, by thread.
    #[cfg(feature = "metrics")]
    shards: Mutex<HashMap<ThreadId, Arc<Shard>>>,
    /// Where a thread that can no longer reach its thread-locals (it is
    /// being torn down) counts instead.
    #[cfg(feature = "metrics")]
    unsharded: Mutex<Shard>,
    pub accepted: Counter,
    refused: [Counter; Refusal::COUNT],
    pub accept_errors: Counter,
    pub write_timeouts: Counter,
    /// Clients told `error: flooding` and disconnected (`--flood-grace`).
    pub flood_disconnects: Counter,
    /// Times a reader stopped reading a client that was over its input
    /// budget. A counter of holds rather than a gauge of clients held: a
    /// hold lasts one read's debt (milliseconds), so a gauge would mostly
    /// read 0 between scrapes and would cost an increment and a decrement
    /// around every hold; the counter's rate shows how often the budget bites.
    pub flood_holds: Counter,
    /// Clients disconnected by `--max-client-memory`...
    pub memory_evictions: Counter,
    /// ... and the bytes they held when evicted.
    pub memory_evicted_bytes: Counter,
    /// The clients in the room, for the gauges.
    #[cfg(feature = "metrics")]
    clients: Mutex<Clients>,
    /// Whether anyone will read the gauges (`--metrics-addr`): without an
    /// endpoint the clients are not listed, which saves every connection
    /// its entry (about 30 bytes with the table's slack).
    #[cfg(feature = "metrics")]
    gauges: bool,
    /// The room's history (`--history`), for its gauges.
    #[cfg(feature = "metrics")]
    history: Option<Arc<History>>,
}

/// The live clients, and what the departed ones counted.
#[cfg(feature = "metrics")]
#[derive(Debug, Default)]
struct Clients {
    live: HashMap<ClientId, Weak<Client>>,
    /// Messages the departed skipped under `--slow-client drop`.
    departed_skipped: u64,
    /// Clients disconnected for being too slow.
    slow_disconnects: u64,
}

// Without `metrics` every field left is a plain default and clippy would
// derive it; with it, `id` takes the next number, so the impl stays by hand.
#[cfg_attr(not(feature = "metrics"), allow(clippy::derivable_impls))]
impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            #[cfg(feature = "metrics")]
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            #[cfg(feature = "metrics")]
            shards: Mutex::default(),
            #[cfg(feature = "metrics")]
            unsharded: Mutex::default(),
            accepted: Counter::default(),
            refused: Default::default(),
            accept_errors: Counter::default(),
            write_timeouts: Counter::default(),
            flood_disconnects: Counter::default(),
            flood_holds: Counter::default(),
            memory_evictions: Counter::default(),
            memory_evicted_bytes: Counter::default(),
            #[cfg(feature = "metrics")]
            clients: Mutex::default(),
            #[cfg(feature = "metrics")]
            gauges: true,
            #[cfg(feature = "metrics")]
            history: None,
        }
    }
}

impl Metrics {
    /// The metrics of a server whose room keeps `history`. `gauges`: whether
    /// anyone reads the gauges (`--metrics-addr`); without an endpoint the
    /// counters still count (tests read them) but the clients are not listed.
    pub(crate) fn new(gauges: bool, history: Option<Arc<History>>) -> Metrics {
        #[cfg(feature = "metrics")]
        return Metrics {
            gauges,
            history,
            ..Metrics::default()
        };
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (gauges, history);
            Metrics::default()
        }
    }

    /// Runs `count` on this thread's shard.
    #[cfg(feature = "metrics")]
    #[inline]
    fn count(&self, count: impl Fn(&Shard)) {
        let counted = SHARD.try_with(|cell| {
            let mut cached = cell.borrow_mut();
            match &*cached {
                Some((id, shard)) if *id == self.id => count(shard),
                _ => {
                    let shard = Arc::clone(
                        self.shards
                            .lock()
                            .entry(std::thread::current().id())
                            .or_default(),
                    );
                    count(&shard);
                    *cached = Some((self.id, shard));
                }
            }
        });
        if counted.is_err() {
            // Several such threads may count at once: one at a time.
            count(&self.unsharded.lock());
        }
    }

    /// One read's complete lines.
    #[inline]
    pub(crate) fn lines_received(&self, lines: u64) {
        #[cfg(feature = "metrics")]
        self.count(|shard| Shard::bump(&shard.lines_received, lines));
        #[cfg(not(feature = "metrics"))]
        let _ = lines;
    }

    /// One socket write's messages and bytes.
    #[inline]
    pub(crate) fn delivered(&self, messages: u64, bytes: u64) {
        #[cfg(feature = "metrics")]
        self.count(|shard| {
            Shard::bump(&shard.messages_delivered, messages);
            Shard::bump(&shard.bytes_delivered, bytes);
        });
        #[cfg(not(feature = "metrics"))]
        let _ = (messages, bytes);
    }

    /// The shards' sums: lines received, messages and bytes delivered.
    #[cfg(feature = "metrics")]
    fn sharded_totals(&self) -> (u64, u64, u64) {
        let unsharded = self.unsharded.lock();
        let shards = self.shards.lock();
        std::iter::once(&*unsharded)
            .chain(shards.values().map(|shard| &**shard))
            .fold((0, 0, 0), |(lines, messages, bytes), shard| {
                (
                    lines + shard.lines_received.load(Ordering::Relaxed),
                    messages + shard.messages_delivered.load(Ordering::Relaxed),
                    bytes + shard.bytes_delivered.load(Ordering::Relaxed),
                )
            })
    }

    pub(crate) fn refused(&self, why: Refusal) {
        self.refused[why as usize].add(1);
    }

    /// Counts `client` as in the room until [`Metrics::unregister`].
    pub(crate) fn register(&self, client: &Arc<Client>) {
        #[cfg(feature = "metrics")]
        if self.gauges {
            self.clients
                .lock()
                .live
                .insert(client.id, Arc::downgrade(client));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = client;
    }

    /// The client's writer is done: nothing more will be queued or written.
    pub(crate) fn unregister(&self, client: &Client) {
        #[cfg(feature = "metrics")]
        if self.gauges {
            // Under the lock, so that a scrape sees the client either live
            // or departed, never both or neither, and the counters never dip.
            let mut clients = self.clients.lock();
            if clients.live.remove(&client.id).is_some() {
                clients.departed_skipped += client.skipped();
                if client.kicked() == Some(Kick::TooSlow) {
                    clients.slow_disconnects += 1;
                }
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = client;
    }
}

#[cfg(feature = "metrics")]
pub(crate) use exporter::serve;

/// The `/metrics` and `/healthz` endpoint.
#[cfg(feature = "metrics")]
mod exporter {
    use std::convert::Infallible;
    use std::fmt;
    use std::sync::Arc;

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::header::CONTENT_TYPE;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::registry::Registry;
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;
    use tracing::{debug, info, warn};

    use super::{Metrics, Refusal};
    use crate::config::{ClusterCounters, Model};

    /// How long one scrape may take, so an idle or stalled HTTP client cannot
    /// hold a connection (and its task) forever.
    const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Serves `listener` until `stop` fires: Prometheus text at `/metrics`,
    /// `200 OK` at `/healthz`.
    pub(crate) async fn serve(
        listener: TcpListener,
        metrics: Arc<Metrics>,
        model: Model,
        cluster: Option<Arc<ClusterCounters>>,
        stop: CancellationToken,
    ) {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot {
            metrics,
            model,
            cluster,
        }));
        let registry = Arc::new(registry);
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving metrics at /metrics");
        }
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        warn!(cause = %err, "metrics: accept failed");
                        // An accept error (out of descriptors) repeats at once.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let registry = Arc::clone(&registry);
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, Arc::clone(&registry)));
                let connection = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    () = stop.cancelled() => {}
                    served = tokio::time::timeout(SCRAPE_TIMEOUT, connection) => {
                        if let Ok(Err(err)) = served {
                            debug!(cause = %err, "metrics: connection failed");
                        }
                    }
                }
            });
        }
    }

    async fn respond(
        request: Request<Incoming>,
        registry: Arc<Registry>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let reply = |status: StatusCode, content_type: &'static str, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            Ok(response)
        };
        if request.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match request.uri().path() {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(fmt::Error) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "cannot encode metrics\n".into(),
                    ),
                }
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "OK\n".into()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics or /healthz\n".into(),
            ),
        }
    }

    /// Reads the server's atomics when Prometheus scrapes.
    #[derive(Debug)]
    struct Snapshot {
        metrics: Arc<Metrics>,
        model: Model,
        /// The backplane's counts; `None` without `--cluster`, and then no
        /// `chat_cluster_*` family is shown at all (rather than zeros that
        /// would read as a cluster with nothing to do).
        cluster: Option<Arc<ClusterCounters>>,
    }

    fn counter(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        value: u64,
    ) -> fmt::Result {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
    }

    fn gauge(
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        value: i64,
    ) -> fmt::Result {
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
    }

    impl Collector for Snapshot {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
            let m = &*self.metrics;
            let (lines_received, messages_delivered, bytes_delivered) = m.sharded_totals();
            let (connected, queued, skipped, slow_disconnects) = {
                let clients = m.clients.lock();
                let mut connected = 0i64;
                let mut queued = 0u64;
                let mut skipped = clients.departed_skipped;
                for client in clients.live.values().filter_map(std::sync::Weak::upgrade) {
                    connected += 1;
                    queued += client.budget.queued() as u64;
                    skipped += client.skipped();
                }
                (connected, queued, skipped, clients.slow_disconnects)
            };

            let info = ConstGauge::new(1i64);
            info.encode(
                encoder
                    .encode_descriptor(
                        "chat_server_info",
                        "The server's version and concurrency model (always 1)",
                        None,
                        info.metric_type(),
                    )?
                    .encode_family(&[
                        ("model", self.model.name()),
                        ("version", env!("CARGO_PKG_VERSION")),
                    ])?,
            )?;
            gauge(
                &mut encoder,
                "chat_clients_connected",
                "Clients in the room",
                connected,
            )?;
            gauge(
                &mut encoder,
                "chat_bytes_queued",
                "Bytes waiting in the clients' outbound queues (the broadcast model has none)",
                i64::try_from(queued).unwrap_or(i64::MAX),
            )?;
            counter(
                &mut encoder,
                "chat_connections_accepted",
                "Connections admitted (TLS ones before their handshake)",
                m.accepted.get(),
            )?;
            {
                let mut refused = encoder.encode_descriptor(
                    "chat_connections_refused",
                    "Connections turned away before joining, by reason",
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for why in Refusal::ALL {
                    let count = ConstCounter::new(m.refused[why as usize].get());
                    count.encode(refused.encode_family(&[("reason", why.label())])?)?;
                }
            }
            counter(
                &mut encoder,
                "chat_accept_errors",
                "Failed accept calls (out of file descriptors, aborted connections)",
                m.accept_errors.get(),
            )?;
            counter(
                &mut encoder,
                "chat_lines_received",
                "Chat lines received from clients",
                lines_received,
            )?;
            counter(
                &mut encoder,
                "chat_messages_delivered",
                "Queued messages written to clients (one message holds the lines of one read)",
                messages_delivered,
            )?;
            counter(
                &mut encoder,
                "chat_bytes_delivered",
                "Bytes written to clients (plaintext, before TLS)",
                bytes_delivered,
            )?;
            counter(
                &mut encoder,
                "chat_slow_client_disconnects",
                "Clients disconnected for not keeping up (--slow-client disconnect)",
                slow_disconnects,
            )?;
            counter(
                &mut encoder,
                "chat_messages_dropped",
                "Messages skipped for clients that could not keep up (--slow-client drop)",
                skipped,
            )?;
            counter(
                &mut encoder,
                "chat_write_timeouts",
                "Times a client accepted no byte for --write-timeout",
                m.write_timeouts.get(),
            )?;
            counter(
                &mut encoder,
                "chat_flood_disconnects",
                "Clients told `error: flooding` and disconnected (over budget for --flood-grace)",
                m.flood_disconnects.get(),
            )?;
            counter(
                &mut encoder,
                "chat_flood_holds",
                "Times a client over its --flood-lines/--flood-bytes budget was not read from until it caught up",
                m.flood_holds.get(),
            )?;
            counter(
                &mut encoder,
                "chat_memory_evictions",
                "Clients disconnected for holding the most when all held more than --max-client-memory",
                m.memory_evictions.get(),
            )?;
            counter(
                &mut encoder,
                "chat_memory_evicted_bytes",
                "Bytes (partial lines and queued messages) the evicted clients held",
                m.memory_evicted_bytes.get(),
            )?;
            if let Some(history) = &m.history {
                let as_gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
                gauge(
                    &mut encoder,
                    "chat_history_lines",
                    "Chat lines the room's history holds for newcomers (--history)",
                    as_gauge(history.lines()),
                )?;
                gauge(
                    &mut encoder,
                    "chat_history_bytes",
                    "Bytes of text the room's history holds (--history-bytes; counted against --max-client-memory)",
                    as_gauge(history.bytes()),
                )?;
            }
            if let Some(cluster) = &self.cluster {
                encode_cluster(&mut encoder, cluster)?;
            }
            Ok(())
        }
    }

    /// The `chat_cluster_*` families (`--cluster`).
    fn encode_cluster(
        encoder: &mut DescriptorEncoder<'_>,
        cluster: &ClusterCounters,
    ) -> fmt::Result {
        let cluster = cluster.snapshot();
        let as_gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "chat_cluster_messages_published",
                "Broker messages (batches of events) this node stored in the room's stream",
                &cluster.published,
            ),
            (
                "chat_cluster_events_published",
                "Events (arrivals, reads' worth of lines, departures) inside them",
                &cluster.events_published,
            ),
            (
                "chat_cluster_messages_received",
                "Broker messages from other nodes delivered to this node's clients",
                &cluster.received,
            ),
            (
                "chat_cluster_garbage_messages",
                "Messages on the room's subjects that did not decode or failed validation",
                &cluster.garbage,
            ),
            (
                "chat_cluster_events_dropped",
                "Events dropped from a full --cluster-buffer (or too large for the broker)",
                &cluster.dropped,
            ),
            (
                "chat_cluster_messages_missed",
                "Stream messages this node could not read: expired (--cluster-retention) first, or lost with a broker's store",
                &cluster.missed,
            ),
            (
                "chat_cluster_streams_remade",
                "Times this node found the room's stream made again (a broker lost its store) and read the new one from its start",
                &cluster.streams_remade,
            ),
            (
                "chat_cluster_dead_nodes",
                "Times other nodes were declared dead for missing their heartbeats",
                &cluster.dead_nodes,
            ),
            (
                "chat_cluster_streams_opened",
                "Times this node started reading the room's stream (once, then once per new consumer after a stream error)",
                &cluster.streams_opened,
            ),
        ] {
            counter(encoder, name, help, *value)?;
        }
        for (name, help, value) in [
            (
                "chat_cluster_broker_connected",
                "1 while this node's connection to the broker is up, else 0",
                &cluster.connected,
            ),
            (
                "chat_cluster_buffered_bytes",
                "Bytes of events not yet stored by the broker (--cluster-buffer and the batch in flight)",
                &cluster.buffered_bytes,
            ),
            (
                "chat_cluster_buffered_events",
                "Events not yet stored by the broker",
                &cluster.buffered_events,
            ),
            (
                "chat_cluster_consumer_pending",
                "Stream messages the broker still held for this node when it read the last one",
                &cluster.consumer_pending,
            ),
            (
                "chat_cluster_stream_copies",
                "Copies of the room's stream the broker keeps, as this node last read them (0: not yet)",
                &cluster.stream_copies,
            ),
            (
                "chat_cluster_names_copies",
                "Copies of the names bucket the broker keeps, as this node last read them (0: not yet, or no --names)",
                &cluster.names_copies,
            ),
        ] {
            gauge(encoder, name, help, as_gauge(*value))?;
        }
        let seconds = |nanos: u64| nanos as f64 / 1e9;
        let lag = ConstGauge::new(seconds(cluster.lag_nanos));
        lag.encode(encoder.encode_descriptor(
            "chat_cluster_delivery_lag_seconds",
            "How long the last stream message read had been stored when this node read it",
            None,
            lag.metric_type(),
        )?)?;
        let stored = ConstGauge::new(seconds(cluster.last_stored_nanos));
        stored.encode(encoder.encode_descriptor(
            "chat_cluster_last_delivered_timestamp_seconds",
            "When the broker stored the last stream message this node read (Unix time; 0: none yet)",
            None,
            stored.metric_type(),
        )?)
    }
}
