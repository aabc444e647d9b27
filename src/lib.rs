//! A TCP chat server, after the one in *The Go Programming Language*
//! (gopl.io, chapter 8), in four concurrency models chosen at run time.
//!
//! The seed server is built around one *broadcaster* goroutine that owns the
//! set of clients. This crate builds that design and the contrasting one, in
//! which each connection fans its own lines out through a shared `DashMap`,
//! plus two more, all behind one interface ([`hub::Hub`]) so that they can be
//! measured against each other on equal terms. ARCHITECTURE.md compares them.
//!
//! The modules, in the order a request flows through them:
//!
//! - [`server`]: the accept loop, connection limit, accept-error backoff and
//!   graceful shutdown;
//! - [`session`]: one connection's reader and writer tasks, shared by every model;
//! - [`protocol`]: line framing, sanitising and the seed's message texts;
//! - [`hub`]: the concurrency models, one file each;
//! - [`outbox`]: the byte-bounded per-client queue three of the models use;
//! - [`queue`]: the swap queue underneath it, which frees its buffers when drained;
//! - [`client`]: the per-connection state every part shares;
//! - [`config`]: models, slow-client policies and limits;
//! - [`memory`]: returning freed memory to the OS after a burst;
//! - [`harness`]: an in-process server and clients for tests and benchmarks.

pub mod client;
pub mod config;
pub mod harness;
pub mod hub;
pub mod load;
pub mod memory;
pub mod outbox;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod session;

pub use config::{Config, Model, QueueKind, SlowClientPolicy};
