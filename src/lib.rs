//! A TCP chat server, after the one in *The Go Programming Language*
//! (gopl.io, chapter 8), in four concurrency models chosen at run time.
//!
//! The seed server is built around one *broadcaster* goroutine that owns the
//! set of clients. This crate builds that design and the contrasting one, in
//! which each connection fans its own lines out through a shared `DashMap`,
//! plus two more, all behind one interface (`hub::Hub`) so that they can be
//! measured against each other on equal terms. ARCHITECTURE.md compares them.
//!
//! # Using the library
//!
//! The public surface is small, as in mini-redis: bind a listener, build a
//! [`Config`], and call [`server::run`] with a future that completes when the
//! server should stop.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use chat_server::{server, Config, Model};
//!
//! let listener = server::bind("127.0.0.1:8000").await?;
//! let config = Config::with_model(Model::Broadcaster);
//! server::run(listener, config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```
//!
//! With the `test-util` feature, [`harness`] adds an in-process server on an
//! ephemeral port for tests and benchmarks.
//!
//! # The modules, in the order a request flows through them
//!
//! - [`server`]: the accept loop, connection limit, accept-error backoff and
//!   graceful shutdown;
//! - `lobby`: naming (`--names`), joining, and the first lines a client gets;
//! - `session`: one connection's reader and writer tasks, shared by every model;
//! - `flood`: each connection's input budget (flood control);
//! - `history`: the room's recent lines a newcomer is shown (`--history`);
//! - `limits`: per-address limits, keepalive, and the clients' memory budget;
//! - `protocol`: line framing, sanitising and the seed's message texts (the
//!   texts themselves live in the `chat-wire` crate, which the load tool and
//!   the tests read them from);
//! - `hub`: the concurrency models, one file each;
//! - `outbox`: the byte-bounded per-client queue three of the models use;
//! - `queue`: the swap queue underneath it, which frees its buffers when drained;
//! - `client`: the per-connection state every part shares;
//! - `config`: models, slow-client policies and limits;
//! - `cluster`: one room across several servers through a NATS JetStream
//!   broker (`--cluster`, feature `cluster`), around any model;
//! - `memory`: returning freed memory to the OS after a burst;
//! - `password`: the room password's check and per-address throttle;
//! - `metrics`: the server's counters and the Prometheus endpoint;
//! - `tls`: loading the certificate (and reloading it on SIGHUP) and the
//!   bounded handshake;
//! - `transport`: plain TCP and TLS behind the interface a session uses;
//! - `web`: the browsers' door (`--web-addr`, feature `web`): the chat page
//!   and a WebSocket endpoint, whose framing is one more transport;
//! - `backoff`: the doubling pause every retry takes.

mod backoff;
mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod config;
mod flood;
#[cfg(feature = "test-util")]
pub mod harness;
mod history;
mod hub;
mod limits;
mod lobby;
mod memory;
mod metrics;
mod outbox;
mod password;
mod protocol;
mod queue;
pub mod server;
mod session;
mod tls;
mod transport;
#[cfg(feature = "web")]
mod web;

pub use config::{
    default_max_client_memory, ClusterConfig, ClusterCounters, ClusterStats, Config, ConfigError,
    Model, Password, QueueKind, SlowClientPolicy, TlsFiles,
};
