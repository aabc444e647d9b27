//! Server settings: which concurrency model to run and the limits that keep
//! one client from hurting the others.
//!
//! Everything here is plain data with defaults; `bin/chat-server.rs` maps
//! command-line flags onto it, taking every flag's default from
//! [`Config::default`] and [`ClusterConfig::new`], and tests build it
//! directly. The enums derive `clap::ValueEnum` under the `cli` feature
//! (their variants' doc comments are the flag values' help), so the
//! library without `cli` does not depend on `clap`.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::DEFAULT_MAX_LINE;

/// The concurrency model that owns the set of connected clients.
///
/// Each is one file under `src/hub/`; see ARCHITECTURE.md for the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Model {
    /// Senders in a DashMap; each reader fans its lines out directly (no broadcaster task)
    Sharded,
    /// The seed's design: one task owns the client map; entering/leaving/messages channels
    Broadcaster,
    /// Senders in one parking_lot `RwLock<HashMap>`; each reader fans out under the read lock
    #[cfg_attr(
        feature = "cli",
        value(
            help = "Senders in one parking_lot RwLock<HashMap>; each reader fans out under the read lock"
        )
    )]
    Locked,
    /// One tokio::sync::broadcast channel; every writer holds a receiver
    Broadcast,
}

impl Model {
    /// Every model, in the order the tables in ARCHITECTURE.md use.
    pub const ALL: [Model; 4] = [
        Model::Sharded,
        Model::Broadcaster,
        Model::Locked,
        Model::Broadcast,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Model::Sharded => "sharded",
            Model::Broadcaster => "broadcaster",
            Model::Locked => "locked",
            Model::Broadcast => "broadcast",
        }
    }

    /// Whether each client has a queue of its own (`--queue` chooses which);
    /// `broadcast`'s clients share one ring instead.
    pub fn has_client_queues(self) -> bool {
        self != Model::Broadcast
    }

    /// Live tasks the model runs for `clients` connected clients, the accept
    /// loop included. The seed's broadcaster design is the 2n+2 baseline.
    pub fn expected_tasks(self, clients: usize) -> usize {
        match self {
            Model::Broadcaster => 2 * clients + 2,
            Model::Sharded | Model::Locked | Model::Broadcast => 2 * clients + 1,
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a client whose outbound queue is over `max_pending`
/// bytes, or which accepted no byte for `write_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum SlowClientPolicy {
    /// Drop that client (it gets `error: disconnected: too slow`); nobody waits for it
    Disconnect,
    /// Skip the message for that client only; the count is logged when it leaves
    Drop,
    /// Make the sender wait for room, as the seed does (one stuck reader stalls everyone)
    Block,
}

impl SlowClientPolicy {
    /// Every policy.
    pub const ALL: [SlowClientPolicy; 3] = [
        SlowClientPolicy::Disconnect,
        SlowClientPolicy::Drop,
        SlowClientPolicy::Block,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SlowClientPolicy::Disconnect => "disconnect",
            SlowClientPolicy::Drop => "drop",
            SlowClientPolicy::Block => "block",
        }
    }
}

impl fmt::Display for SlowClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The per-client queue of the models that have one (`sharded`,
/// `broadcaster`, `locked`; `broadcast` has a shared ring instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum QueueKind {
    /// A mutex-guarded VecDeque the writer swaps out whole; frees its buffers when drained
    Swap,
    /// tokio's unbounded mpsc channel; keeps the blocks a burst grew
    Mpsc,
}

impl QueueKind {
    /// Every queue.
    pub const ALL: [QueueKind; 2] = [QueueKind::Swap, QueueKind::Mpsc];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Swap => "swap",
            QueueKind::Mpsc => "mpsc",
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Default cap on the bytes queued for one client: Redis's pub/sub hard
/// limit. ARCHITECTURE.md explains the choice and the memory it implies.
const DEFAULT_MAX_PENDING: usize = 32 * 1024 * 1024;

/// The most bytes one line of `max_line` input bytes can take once formatted
/// for the others: the sender's name, `: `, the text after sanitising and the
/// newline. Sanitising at most triples a line (an invalid byte becomes the
/// three bytes of U+FFFD), and an `IP:PORT` is at most 47 bytes
/// (`[ffff:...:ffff%scope]:65535` with a short scope id); 128 covers both.
pub fn longest_message(max_line: usize) -> usize {
    max_line.saturating_mul(3).saturating_add(128)
}

/// Default bound of the room's history in bytes (`--history-bytes`): 1 MiB,
/// about 10,000 lines of 100 bytes, so that with the default `--max-line`
/// it is the lines bound that binds for ordinary chat, while a room of
/// 64 KiB lines keeps at least five of them.
pub const DEFAULT_HISTORY_BYTES: usize = 1024 * 1024;

/// Default input budget per client, lines per second (see [`Config::flood_lines`]).
const DEFAULT_FLOOD_LINES: u32 = 500;

/// Default input budget per client, bytes per second (see [`Config::flood_bytes`]).
const DEFAULT_FLOOD_BYTES: u32 = 64 * 1024;

/// Default connections from one address (IPv4) or one /64 (IPv6).
const DEFAULT_MAX_CLIENTS_PER_IP: usize = 100;

/// Default time to notice a peer that vanished without FIN or RST.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);

/// The default `--max-client-memory`: a quarter of the machine's physical
/// memory, or 1 GiB where that cannot be read. ARCHITECTURE.md explains
/// what is counted.
pub fn default_max_client_memory() -> usize {
    const FALLBACK: usize = 1 << 30;
    physical_memory().map_or(FALLBACK, |bytes| bytes / 4)
}

#[cfg(unix)]
fn physical_memory() -> Option<usize> {
    // SAFETY: sysconf only reads a system value.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (usize::try_from(pages), usize::try_from(page_size)) {
        (Ok(pages), Ok(page_size)) if pages > 0 && page_size > 0 => {
            Some(pages.saturating_mul(page_size))
        }
        _ => None,
    }
}

#[cfg(not(unix))]
fn physical_memory() -> Option<usize> {
    None
}

/// Everything that shapes a running server.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: Model,
    pub slow_client: SlowClientPolicy,
    /// Ignored by `broadcast`, which has no per-client queue.
    pub queue: QueueKind,
    /// Bytes that may wait in one client's outbound queue.
    pub max_pending: usize,
    /// How long a client with data pending may accept no byte before it is
    /// considered stuck.
    pub write_timeout: Duration,
    /// Longest accepted input line in bytes, excluding the newline.
    pub max_line: usize,
    /// Connections served at once; the next one is told `error: server full`.
    pub max_clients: usize,
    /// Disconnect a client that sends nothing for this long (off by default,
    /// as in the seed).
    pub idle_timeout: Option<Duration>,
    /// On shutdown, how long queued messages may take to flush.
    pub shutdown_grace: Duration,
    /// `--names`: a client's first line is its name (gopl exercise 8.14),
    /// unique in the room (across every node under `cluster`); it replaces
    /// `IP:PORT` in every message about it.
    pub names: bool,
    /// `--announce-present`: a newcomer is told who is already present,
    /// right after its greeting (gopl exercise 8.12); under `cluster`, the
    /// other nodes' clients as far as their news has arrived.
    pub announce_present: bool,
    /// `--history`: a newcomer is shown the room's last this many chat
    /// lines, in a block right after its greeting (0, the default: no
    /// history, and the protocol is the seed's).
    pub history: usize,
    /// `--history-bytes`: the history holds at most this many bytes of
    /// formatted lines, oldest out first (1 MiB by default).
    pub history_bytes: usize,
    /// Join a room shared with other nodes through a NATS JetStream broker
    /// (`--cluster`); `None` is the single-process room.
    pub cluster: Option<ClusterConfig>,
    /// Input budget per client in lines per second (0: no line budget).
    pub flood_lines: u32,
    /// Input budget per client in bytes per second (0: no byte budget).
    pub flood_bytes: u32,
    /// How much budget a quiet client saves up, in seconds of each rate:
    /// the burst it may send at once.
    pub flood_burst: Duration,
    /// A client held back by its budget for this long without a break is
    /// disconnected with `error: flooding` (`None`: only ever held back).
    pub flood_grace: Option<Duration>,
    /// Connections from one IPv4 address or one IPv6 /64 (0: no limit).
    pub max_clients_per_ip: usize,
    /// TCP keepalive: roughly how long until a peer that vanished without a
    /// FIN or RST is noticed in a quiet room (`None`: off).
    pub keepalive: Option<Duration>,
    /// Bytes all clients together may hold in partial lines and queued
    /// messages before the largest holder is disconnected (0: no limit).
    pub max_client_memory: usize,
    /// Serve Prometheus text at `/metrics` and `200 OK` at `/healthz` on
    /// this address (off by default). Needs the `metrics` feature.
    pub metrics_addr: Option<String>,
    /// Speak TLS with this certificate chain and key (plaintext by default).
    pub tls: Option<TlsFiles>,
    /// How long a TLS handshake may take; the connection holds a
    /// `max_clients` slot meanwhile.
    pub tls_handshake_timeout: Duration,
    /// `--password-file`: a client's first line must be this password
    /// before it enters the room (off by default).
    pub password: Option<Password>,
    /// `--web-addr`: serve the chat page at `/` and a WebSocket door into
    /// the same room at `/ws` on this address (off by default; with
    /// [`Config::tls`], HTTPS and WSS). Needs the `web` feature.
    pub web_addr: Option<String>,
    /// `--web-origin`: browser origins besides the page's own (for example
    /// `https://chat.example.org`) whose pages may open `/ws`.
    pub web_origins: Vec<String>,
}

/// The room password. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(std::sync::Arc<[u8]>);

/// The longest password accepted: it is read like a name, as one short line.
pub const MAX_PASSWORD: usize = 1024;

impl Password {
    pub fn new(password: impl Into<Vec<u8>>) -> Password {
        Password(password.into().into())
    }

    /// The first line of the file at `path`, without its line ending.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Password> {
        let text = std::fs::read(path)?;
        let line = text.split(|&byte| byte == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        Ok(Password::new(line))
    }

    /// Compares in constant time for a given length.
    pub(crate) fn matches(&self, attempt: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.ct_eq(attempt))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// The PEM files of the server's TLS identity. They are read at start and
/// again on every SIGHUP, so a renewed certificate is picked up without a
/// restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            model: Model::Sharded,
            slow_client: SlowClientPolicy::Disconnect,
            queue: QueueKind::Swap,
            max_pending: DEFAULT_MAX_PENDING,
            write_timeout: Duration::from_secs(10),
            max_line: DEFAULT_MAX_LINE,
            max_clients: 10_000,
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(2),
            names: false,
            announce_present: false,
            history: 0,
            history_bytes: DEFAULT_HISTORY_BYTES,
            cluster: None,
            flood_lines: DEFAULT_FLOOD_LINES,
            flood_bytes: DEFAULT_FLOOD_BYTES,
            flood_burst: Duration::from_secs(1),
            flood_grace: Some(Duration::from_secs(10)),
            max_clients_per_ip: DEFAULT_MAX_CLIENTS_PER_IP,
            keepalive: Some(DEFAULT_KEEPALIVE),
            max_client_memory: default_max_client_memory(),
            metrics_addr: None,
            tls: None,
            tls_handshake_timeout: Duration::from_secs(5),
            password: None,
            web_addr: None,
            web_origins: Vec::new(),
        }
    }
}

/// Default bytes of events a node holds for the broker while it is away:
/// at the ~100 bytes of a typical batch, about 160,000 reads, minutes of a
/// busy room, and still a small fraction of one slow client's
/// `--max-pending` (32 MiB).
const DEFAULT_CLUSTER_BUFFER: usize = 16 * 1024 * 1024;

/// The most copies of a stream JetStream keeps (`--cluster-replicas`).
pub const MAX_REPLICAS: usize = 5;

/// The settings of the NATS JetStream backplane. See ARCHITECTURE.md, "Many servers".
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `nats://[user:password@|token@]host:port`, several separated by commas.
    pub url: String,
    /// A NATS `.creds` file (JWT and nkey seed), if the broker wants one.
    pub creds: Option<PathBuf>,
    /// Names the JetStream stream (`CHAT_<room>`) and the subjects
    /// (`chat.<room>.*`): rooms on one broker are independent.
    pub room: String,
    /// Bytes of events waiting for the broker; past it the oldest are
    /// dropped, counted and logged.
    pub buffer_bytes: usize,
    /// The stream keeps events this long, so a node that was away this
    /// long can still catch up...
    pub retention_age: Duration,
    /// ... and at most this many bytes of them.
    pub retention_bytes: u64,
    /// How often a node says it is alive.
    pub heartbeat: Duration,
    /// A node not heard from for this long is dead: its clients are
    /// announced as having left. Detection takes at most this plus a quarter
    /// `heartbeat`.
    pub node_timeout: Duration,
    /// The longest pause between attempts to reach the broker.
    pub reconnect_max: Duration,
    /// How long a publish may wait for the broker's acknowledgement before
    /// it is sent again (with the same message id, so never stored twice).
    pub ack_timeout: Duration,
    /// Copies the broker keeps of the room's stream and names bucket
    /// (`--cluster-replicas`); `None`: min(3, servers in the broker's
    /// cluster), 1 on a single server.
    pub replicas: Option<usize>,
    /// What the backplane counts, readable while it runs (tests read it).
    pub counters: Arc<ClusterCounters>,
}

impl ClusterConfig {
    /// Tasks a clustered node runs on top of its model's (2n+1+k, k = 6):
    /// the backplane's publisher and consumer tasks, and the NATS client's
    /// connection, event-log, JetStream-acker and pull-request tasks. The
    /// liveness judge runs on a thread of its own, with its own runtime.
    pub const EXTRA_TASKS: usize = 6;

    /// The defaults for a broker at `url`, room `chat`.
    pub fn new(url: &str) -> ClusterConfig {
        ClusterConfig {
            url: url.to_string(),
            creds: None,
            room: "chat".to_string(),
            buffer_bytes: DEFAULT_CLUSTER_BUFFER,
            retention_age: Duration::from_secs(3600),
            retention_bytes: 1 << 30,
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(3),
            reconnect_max: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(2),
            replicas: None,
            counters: Arc::default(),
        }
    }
}

/// Counts the backplane keeps: atomics written by the backplane only,
/// read through [`ClusterCounters::snapshot`].
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Broker messages this node stored in the stream.
    pub(crate) published: AtomicU64,
    /// Events inside them (arrivals, reads' worth of lines, departures).
    pub(crate) events_published: AtomicU64,
    /// Broker messages from other nodes delivered to local clients.
    pub(crate) received: AtomicU64,
    /// Messages on our subjects that did not decode or failed validation.
    pub(crate) garbage: AtomicU64,
    /// Events dropped from a full `--cluster-buffer`.
    pub(crate) dropped: AtomicU64,
    /// Stream messages a resume could not get back: retention passed them,
    /// or a broker lost its store while this node had not read them yet
    /// (as far as it knew: what the old stream held for it when it last read).
    pub(crate) missed: AtomicU64,
    /// Times this node found a different room's stream from the one it was
    /// reading (a broker lost its store and a node made it again) and read
    /// the new one from its start.
    pub(crate) streams_remade: AtomicU64,
    /// Nodes declared dead for missing their heartbeats.
    pub(crate) dead_nodes: AtomicU64,
    /// Consumers this node made to read the room's stream: 1 once it has
    /// joined the room, one more after each error that cost it its consumer.
    /// A short broker restart with a file store may need none (the
    /// consumer survives and the client's pull loop resumes it).
    pub(crate) streams_opened: AtomicU64,

    // Gauges: the latest value, set where it changes (never per delivery).
    /// 1 while the NATS client is connected to the broker, else 0: the
    /// state the publisher and the consumer wait on before each try.
    pub(crate) connected: AtomicU64,
    /// Bytes of events not yet stored by the broker: those queued in the
    /// `--cluster-buffer` and the batch the publisher has in flight.
    pub(crate) buffered_bytes: AtomicU64,
    /// How many events those bytes are.
    pub(crate) buffered_events: AtomicU64,
    /// Stream messages the broker still holds for this node's consumer, as
    /// the last message read said (its metadata; no extra broker call).
    pub(crate) consumer_pending: AtomicU64,
    /// How long the last message read had been in the stream when this
    /// node read it, in nanoseconds (our clock against the broker's;
    /// 0 if the broker's is ahead).
    pub(crate) lag_nanos: AtomicU64,
    /// When the broker stored the last message this node read, in
    /// nanoseconds since the Unix epoch (0: none read yet).
    pub(crate) last_stored_nanos: AtomicU64,
}

impl ClusterCounters {
    /// Every count as it is now (each read on its own: two counts may be
    /// a moment apart).
    pub fn snapshot(&self) -> ClusterStats {
        ClusterStats {
            published: ClusterCounters::get(&self.published),
            events_published: ClusterCounters::get(&self.events_published),
            received: ClusterCounters::get(&self.received),
            garbage: ClusterCounters::get(&self.garbage),
            dropped: ClusterCounters::get(&self.dropped),
            missed: ClusterCounters::get(&self.missed),
            streams_remade: ClusterCounters::get(&self.streams_remade),
            dead_nodes: ClusterCounters::get(&self.dead_nodes),
            streams_opened: ClusterCounters::get(&self.streams_opened),
            connected: ClusterCounters::get(&self.connected),
            buffered_bytes: ClusterCounters::get(&self.buffered_bytes),
            buffered_events: ClusterCounters::get(&self.buffered_events),
            consumer_pending: ClusterCounters::get(&self.consumer_pending),
            lag_nanos: ClusterCounters::get(&self.lag_nanos),
            last_stored_nanos: ClusterCounters::get(&self.last_stored_nanos),
        }
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

/// What [`ClusterCounters`] counted, at one moment: plain numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Broker messages this node stored in the stream.
    pub published: u64,
    /// Events inside them (arrivals, reads' worth of lines, departures).
    pub events_published: u64,
    /// Broker messages from other nodes delivered to local clients.
    pub received: u64,
    /// Messages on our subjects that did not decode or failed validation.
    pub garbage: u64,
    /// Events dropped from a full `--cluster-buffer`.
    pub dropped: u64,
    /// Stream messages a resume could not get back: retention passed them,
    /// or a broker lost its store while this node had not read them yet
    /// (as far as it knew: what the old stream held for it when it last read).
    pub missed: u64,
    /// Times this node found a different room's stream from the one it was
    /// reading (a broker lost its store and a node made it again) and read
    /// the new one from its start.
    pub streams_remade: u64,
    /// Nodes declared dead for missing their heartbeats.
    pub dead_nodes: u64,
    /// Consumers this node made to read the room's stream: 1 once it has
    /// joined the room, one more after each error that cost it its consumer.
    /// A short broker restart with a file store may need none (the
    /// consumer survives and the client's pull loop resumes it).
    pub streams_opened: u64,

    // Gauges: the latest value, set where it changes (never per delivery).
    /// 1 while the NATS client is connected to the broker, else 0: the
    /// state the publisher and the consumer wait on before each try.
    pub connected: u64,
    /// Bytes of events not yet stored by the broker: those queued in the
    /// `--cluster-buffer` and the batch the publisher has in flight.
    pub buffered_bytes: u64,
    /// How many events those bytes are.
    pub buffered_events: u64,
    /// Stream messages the broker still holds for this node's consumer, as
    /// the last message read said (its metadata; no extra broker call).
    pub consumer_pending: u64,
    /// How long the last message read had been in the stream when this
    /// node read it, in nanoseconds (our clock against the broker's;
    /// 0 if the broker's is ahead).
    pub lag_nanos: u64,
    /// When the broker stored the last message this node read, in
    /// nanoseconds since the Unix epoch (0: none read yet).
    pub last_stored_nanos: u64,
}

/// A combination of settings the server refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "model `{model}` cannot support --slow-client {policy}: {why}; \
         choose --slow-client disconnect or drop, or another --model"
    )]
    UnsupportedPolicy {
        model: Model,
        policy: SlowClientPolicy,
        why: &'static str,
    },
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
    #[error("--{flag}: {why}")]
    Invalid { flag: &'static str, why: String },
    #[error("--{flag} must be at least {min} seconds")]
    TooShort {
        flag: &'static str,
        min: &'static str,
    },
    #[error("--metrics-addr: this server was built without the `metrics` feature")]
    MetricsNotBuilt,
    #[error("--metrics-addr {addr}: cannot listen: {cause}")]
    MetricsListen { addr: String, cause: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("--web-addr: this server was built without the `web` feature")]
    WebNotBuilt,
    #[error("--web-addr {addr}: cannot listen: {cause}")]
    WebListen { addr: String, cause: String },
    #[error("--password-file: the first line is empty")]
    EmptyPassword,
    #[error("--password-file: the first line is longer than {max} bytes")]
    LongPassword { max: usize },
}

impl Config {
    /// A default configuration running `model`.
    pub fn with_model(model: Model) -> Config {
        Config {
            model,
            ..Config::default()
        }
    }

    /// Checks the settings fit together, with a message for the operator if not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model == Model::Broadcast && self.slow_client == SlowClientPolicy::Block {
            return Err(ConfigError::UnsupportedPolicy {
                model: self.model,
                policy: self.slow_client,
                why: "a tokio broadcast channel never makes its sender wait, \
                      it overwrites the oldest message instead",
            });
        }
        if self.max_line == 0 {
            return Err(ConfigError::TooSmall {
                flag: "max-line",
                min: 1,
            });
        }
        if self.max_clients == 0 {
            return Err(ConfigError::TooSmall {
                flag: "max-clients",
                min: 1,
            });
        }
        // A queue must hold at least one message of the longest kind, or a
        // long line would count as "too slow" for every recipient.
        let min_pending = longest_message(self.max_line) as u64;
        if (self.max_pending as u64) < min_pending {
            return Err(ConfigError::TooSmall {
                flag: "max-pending",
                min: min_pending,
            });
        }
        if self.write_timeout.is_zero() {
            return Err(ConfigError::TooSmall {
                flag: "write-timeout",
                min: 1,
            });
        }
        if self.metrics_addr.is_some() && !cfg!(feature = "metrics") {
            return Err(ConfigError::MetricsNotBuilt);
        }
        if self.web_addr.is_some() && !cfg!(feature = "web") {
            return Err(ConfigError::WebNotBuilt);
        }
        for origin in &self.web_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                return Err(ConfigError::Invalid {
                    flag: "web-origin",
                    why: format!(
                        "`{origin}` is not an origin (scheme://host[:port], as a browser sends it, e.g. https://chat.example.org)"
                    ),
                });
            }
        }
        if let Some(password) = &self.password {
            if password.len() == 0 {
                return Err(ConfigError::EmptyPassword);
            }
            if password.len() > MAX_PASSWORD {
                return Err(ConfigError::LongPassword { max: MAX_PASSWORD });
            }
        }
        if let Some(files) = &self.tls {
            if self.tls_handshake_timeout.is_zero() {
                return Err(ConfigError::TooSmall {
                    flag: "tls-handshake-timeout",
                    min: 1,
                });
            }
            // Read now, so that a bad file stops the start with its reason.
            crate::tls::load(files).map_err(ConfigError::Tls)?;
        }
        if let Some(cluster) = &self.cluster {
            // --names and --announce-present work across nodes
            // (src/cluster/names.rs, `Clustered::join`).
            cluster.validate(self.max_line)?;
        }
        // A bucket must hold at least one millisecond of budget, or no read
        // would ever fit in it.
        if self.flood_enabled() && self.flood_burst < Duration::from_millis(1) {
            return Err(ConfigError::TooShort {
                flag: "flood-burst",
                min: "0.001",
            });
        }
        // The kernel counts keepalive times in whole seconds.
        if self
            .keepalive
            .is_some_and(|every| every < Duration::from_secs(1))
        {
            return Err(ConfigError::TooShort {
                flag: "keepalive",
                min: "1",
            });
        }
        // The history must hold the longest line, or a long line would
        // silently empty it.
        if self.history > 0 && (self.history_bytes as u64) < min_pending {
            return Err(ConfigError::TooSmall {
                flag: "history-bytes",
                min: min_pending,
            });
        }
        // The budget must fit one client's longest line, or a client would
        // be evicted for an ordinary long line while alone; the room's
        // history counts against it too, so it must fit both.
        let history_bytes = if self.history > 0 {
            self.history_bytes as u64
        } else {
            0
        };
        let min_memory = min_pending.saturating_add(history_bytes);
        if self.max_client_memory != 0 && (self.max_client_memory as u64) < min_memory {
            return Err(ConfigError::TooSmall {
                flag: "max-client-memory",
                min: min_memory,
            });
        }
        Ok(())
    }

    /// This configuration with flood control and the per-address limit
    /// off, for tests and benchmarks that drive many fast clients from one
    /// loopback address on purpose.
    pub fn without_abuse_limits(self) -> Config {
        Config {
            flood_lines: 0,
            flood_bytes: 0,
            max_clients_per_ip: 0,
            ..self
        }
    }

    /// Whether clients have an input budget at all.
    pub fn flood_enabled(&self) -> bool {
        self.flood_lines != 0 || self.flood_bytes != 0
    }
}

impl ClusterConfig {
    fn validate(&self, max_line: usize) -> Result<(), ConfigError> {
        if !cfg!(feature = "cluster") {
            return Err(ConfigError::Invalid {
                flag: "cluster",
                why: "this chat-server was built without the `cluster` feature".into(),
            });
        }
        // The room is part of a stream name and of subjects: no dots,
        // wildcards or spaces.
        let room_ok = !self.room.is_empty()
            && self.room.len() <= 64
            && self
                .room
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !room_ok {
            return Err(ConfigError::Invalid {
                flag: "room",
                why: format!("{:?}: use 1 to 64 letters, digits, '_' or '-'", self.room),
            });
        }
        if self.url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                flag: "cluster",
                why: "no broker address".into(),
            });
        }
        // The buffer must hold at least one event of the longest kind.
        let min_buffer = 2 * max_line as u64 + 1024;
        if (self.buffer_bytes as u64) < min_buffer {
            return Err(ConfigError::TooSmall {
                flag: "cluster-buffer",
                min: min_buffer,
            });
        }
        // JetStream refuses a de-duplication window longer than the age.
        if self.retention_age < Duration::from_secs(1) {
            return Err(ConfigError::TooSmall {
                flag: "cluster-retention",
                min: 1,
            });
        }
        if self.retention_bytes < 1024 * 1024 {
            return Err(ConfigError::TooSmall {
                flag: "cluster-retention-bytes",
                min: 1024 * 1024,
            });
        }
        for (flag, value) in [
            ("cluster-heartbeat", self.heartbeat),
            ("cluster-reconnect-max", self.reconnect_max),
            ("cluster-ack-timeout", self.ack_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::TooSmall { flag, min: 1 });
            }
        }
        // JetStream keeps at most 5 copies of a stream.
        if let Some(replicas) = self.replicas {
            if !(1..=MAX_REPLICAS).contains(&replicas) {
                return Err(ConfigError::Invalid {
                    flag: "cluster-replicas",
                    why: format!("{replicas}: use 1 to {MAX_REPLICAS}"),
                });
            }
        }
        if self.node_timeout < self.heartbeat * 2 {
            return Err(ConfigError::Invalid {
                flag: "cluster-node-timeout",
                why: "must be at least two heartbeats".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChatBatch;

    /// The smallest queue allowed must hold the largest message a legal line
    /// can become: sanitising turns each invalid byte into three.
    #[test]
    fn the_smallest_queue_holds_the_longest_formatted_line() {
        let max_line = 1000;
        let mut batch = ChatBatch::default();
        let who = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        batch.push(who, &vec![0xFF; max_line]);
        let longest = batch.take().map_or(0, |message| message.len());
        assert!(longest > max_line * 3, "the worst case is the one tested");
        assert!(longest <= longest_message(max_line), "{longest} bytes");
        let config = Config {
            max_line,
            max_pending: longest_message(max_line),
            ..Config::default()
        };
        assert_eq!(config.validate(), Ok(()));
        let config = Config {
            max_pending: longest - 1,
            ..config
        };
        assert!(config.validate().is_err());
    }

    /// The models' names are the ones the load tool and the banner use.
    #[test]
    fn model_names_match_the_banner() {
        let names: Vec<&str> = Model::ALL.iter().map(|model| model.name()).collect();
        assert_eq!(names, chat_wire::banner::MODELS);
    }

    /// The flag values clap derives are the names the library prints.
    #[cfg(feature = "cli")]
    #[test]
    fn flag_values_are_the_names() {
        use clap::ValueEnum;
        fn flag(value: impl ValueEnum) -> Option<String> {
            value
                .to_possible_value()
                .map(|possible| possible.get_name().to_owned())
        }
        for model in Model::ALL {
            assert_eq!(flag(model).as_deref(), Some(model.name()));
        }
        for policy in SlowClientPolicy::ALL {
            assert_eq!(flag(policy).as_deref(), Some(policy.name()));
        }
        for queue in QueueKind::ALL {
            assert_eq!(flag(queue).as_deref(), Some(queue.name()));
        }
        assert_eq!(Model::from_str("locked", false), Ok(Model::Locked));
    }

    /// `--cluster-replicas` takes what JetStream keeps: 1 to 5 copies.
    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_replicas_are_one_to_five() {
        let with = |replicas| Config {
            cluster: Some(ClusterConfig {
                replicas,
                ..ClusterConfig::new("nats://127.0.0.1:4222")
            }),
            ..Config::with_model(Model::Sharded)
        };
        for ok in [None, Some(1), Some(3), Some(MAX_REPLICAS)] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok:?}");
        }
        for bad in [Some(0), Some(MAX_REPLICAS + 1)] {
            assert!(
                matches!(
                    with(bad).validate(),
                    Err(ConfigError::Invalid {
                        flag: "cluster-replicas",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }
}
