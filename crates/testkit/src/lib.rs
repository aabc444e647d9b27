//! What the tests, the benches and the load tool share to talk to a chat
//! server and to measure it, so that each exists once:
//!
//! - [`client`]: [`TestClient`], a line client with a timeout on every read;
//! - [`lines`]: [`LineReader`], a fixed buffer split into lines in place
//!   (the receive path of the load tool and the benches);
//! - [`payload`]: the measured chat line's text (sender, sequence, send
//!   time), its decoder, the clock and per-sender order tracking;
//! - [`proc`]: CPU time, memory and the open-files limit of a process, from
//!   `/proc` (Linux; elsewhere the readers report an error);
//! - [`process`]: the workspace's binaries (`chat-server`, `netcat`) and the
//!   system's `nc` as child processes whose output is read line by line with
//!   a timeout;
//! - [`nats`]: a real `nats-server` with JetStream per test, for the
//!   cluster tests (`--cluster`), restartable on its store or an empty one;
//! - [`nats_cluster`]: [`BrokerCluster`], three `nats-server`s routed into
//!   one JetStream cluster per test, whose servers a test kills, stops and
//!   restarts (on their store or an empty one) and whose stream leader it
//!   can ask for, for the fault-tolerance tests;
//! - [`ports`]: loopback ports for servers that are restarted on theirs,
//!   from outside the range the kernel hands to connections;
//! - [`relay`]: [`Relay`], a TCP relay a test can partition (bytes stop,
//!   sockets stay open), heal and reset: a network fault between a node and
//!   its broker without root;
//! - [`redis`]: a real `redis-server` per test, for chat-load's Redis
//!   pub/sub client.
//! - `tls` (feature `tls`): certificates made at run time and a TLS line
//!   client.

pub mod client;
pub mod lines;
pub mod nats;
pub mod nats_cluster;
pub mod payload;
pub mod ports;
pub mod proc;
pub mod process;
pub mod redis;
pub mod relay;
#[cfg(feature = "tls")]
pub mod tls;

pub use client::{TestClient, LINE_TIMEOUT};
pub use lines::LineReader;
pub use nats_cluster::BrokerCluster;
pub use relay::Relay;

/// Turns an assertion into a test error with a message, for `?` in tests.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> std::io::Result<()> {
    if condition {
        Ok(())
    } else {
        Err(std::io::Error::other(message()))
    }
}

#[cfg(feature = "tls")]
fn chat_wire_greeting(who: &str) -> String {
    chat_wire::greeting(who)
}
