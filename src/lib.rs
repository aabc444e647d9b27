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
#![cfg_attr(
    feature = "test-util",
    doc = "With the `test-util` feature, [`harness`] adds an in-process server on an"
)]
#![cfg_attr(
    not(feature = "test-util"),
    doc = "With the `test-util` feature, `harness` adds an in-process server on an"
)]
//! ephemeral port for tests and benchmarks.
//!
//! # The modules, by concern
//!
//! Each module uses only those listed before it (the concerns form a DAG;
//! `docs/scripts/module-graph.sh` prints the graph and checks it):
//!
//! - `backoff`, `memory`: the doubling pause every retry takes; returning
//!   freed memory to the OS after a burst;
//! - `config`: what the operator chose: the settings and their defaults,
//!   models, policies, the cluster's settings, and why a combination is
//!   refused;
//! - `protocol`: line framing, sanitising and the seed's message texts (the
//!   texts themselves live in the `chat-wire` crate, which the load tool and
//!   the tests read them from);
//! - `client`: one connected client as every part sees it, and its
//!   admission (its `--max-clients` slot and its address's count);
//! - `room`: the concurrency models behind one interface (`room::hub`), the
//!   per-client outbox and queue, and the room's history;
//! - `guard`: what keeps one client from hurting the others: flood control,
//!   the password, keepalive and the clients' memory budget;
//! - `metrics`: the server's counters and the Prometheus endpoint;
//! - `transport`: plain TCP and TLS behind the interface a session uses,
//!   and TLS's certificate (reloaded on SIGHUP) and bounded handshake;
//! - `session`: one connection's life: the lobby (password, naming,
//!   joining, the first lines), then its reader and writer tasks;
//! - `web`: the browsers' door (`--web-addr`, feature `web`): the chat page
//!   and a WebSocket endpoint, whose framing is one more transport;
//! - `cluster`: one room across several servers through a NATS JetStream
//!   broker (`--cluster`, feature `cluster`), around any model;
//! - [`server`]: the accept loop, connection limit, accept-error backoff and
//!   graceful shutdown.

// What is `pub` is the embedders' API; everything else says `pub(crate)`.
#![warn(unreachable_pub)]

mod backoff;
mod memory;

mod config;
mod protocol;

mod client;
mod room;

mod guard;
mod metrics;
mod transport;

mod session;
#[cfg(feature = "web")]
mod web;
/// Our WebSocket framing on a bare stream, for `crates/ws-compare` only.
#[cfg(all(feature = "web", feature = "test-util"))]
#[doc(hidden)]
pub use web::bare as ws_framing;

#[cfg(feature = "cluster")]
mod cluster;
pub mod server;

#[cfg(feature = "test-util")]
pub mod harness;

pub use config::{
    default_max_client_memory, ClusterConfig, ClusterCounters, ClusterStats, Config, ConfigError,
    Model, Password, QueueKind, SlowClientPolicy, TlsFiles,
};
