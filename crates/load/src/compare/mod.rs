//! `chat-load compare`: the same scenarios against several servers in one
//! run, side by side.
//!
//! It starts our `chat-server` once per model, each on a fresh port
//! (`--addr 127.0.0.1:0`, the address read back from its first line of
//! output), and any number of peers given as `--peer NAME[@ADDR]=COMMAND`:
//!
//! - `NAME@ADDR=COMMAND`: the peer always listens on `ADDR` (the Go seed:
//!   `seed@127.0.0.1:8000=/tmp/gopl-chat-server`). `ADDR` must be free
//!   before it starts, or the tool would measure whatever holds it.
//! - `NAME=COMMAND` with `{port}` or `{addr}` in `COMMAND`: the tool picks a
//!   free loopback port and substitutes it.
//!
//! A peer runs under `sh -c COMMAND`; the tool waits (bounded) until its
//! address accepts connections, then finds the process actually holding the
//! listening socket (the shell's child, if the shell did not `exec`) so that
//! CPU and memory are the server's. Each server runs in a process group of
//! its own and the whole group is stopped (SIGTERM, then SIGKILL after a
//! grace period) as soon as its scenarios are done, when the tool fails,
//! and when it is interrupted: the guard that does it is dropped on every
//! path out. Every server, peers included (a peer may be our own server with
//! other flags), runs with `RUST_LOG=warn` unless `RUST_LOG` is set, so that
//! logging one line per connection is not part of what is measured; every
//! server's output goes to a log file in the output directory.
//!
//! Every scenario run gets a freshly started server, stopped right after,
//! so that one run's grown heap, leftover queues or stall cannot colour the
//! next run's figures. Results go to the terminal as one table (a row per
//!
//! The modules, in the order a comparison uses them: `spec` (what to
//! compare: our models, peers given on the command line), `supervise`
//! (starting and stopping the servers), `groups` (targets of several
//! processes: a routed NATS cluster, our nodes and their broker), `orchestrate` (the runs against
//! each server), `output` (the table, `compare.md`, `compare.json`) and
//! `plot` (`compare.svg`).

mod groups;
mod orchestrate;
mod output;
mod plot;
mod spec;
mod supervise;

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::scenario::Scenario;

pub use orchestrate::compare;
pub use output::{replot, table, Comparison};
pub use spec::{check_server_args, Model, PeerSpec};

/// What `compare` runs, and where it writes.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Our server's binary.
    pub server_bin: PathBuf,
    pub models: Vec<Model>,
    /// Extra arguments for every one of our servers.
    pub server_args: Vec<String>,
    pub peers: Vec<PeerSpec>,
    /// Sizes of routed NATS clusters to run as targets (clients speak NATS).
    pub nats_clusters: Vec<usize>,
    /// Sizes of clusters of our nodes (one broker and k nodes) to run.
    pub cluster_nodes: Vec<usize>,
    /// The model of the cluster nodes.
    pub cluster_model: Model,
    /// In `rate` against a cluster of ours: kill its broker (SIGKILL) this
    /// long after sending started and start it again on the same port and store.
    pub broker_restart: Option<Duration>,
    pub scenarios: Vec<Scenario>,
    /// Fanout points.
    pub clients: Vec<usize>,
    /// Deliveries per fanout point when `messages` is not fixed: m = deliveries / n².
    pub deliveries: u64,
    pub messages: Option<u64>,
    pub window: u32,
    pub size: usize,
    /// Bound on each fanout point's sending.
    pub fanout_timeout: Duration,
    pub rate_clients: usize,
    pub rate: f64,
    pub rate_duration: Duration,
    pub idle_clients: usize,
    /// The idle scenario's `--hold`.
    pub idle_hold: Duration,
    pub drain: Duration,
    pub startup_timeout: Duration,
    pub out: PathBuf,
    /// chat-load's worker threads.
    pub threads: usize,
    /// Worker threads of each of our servers; peers choose their own.
    pub server_threads: usize,
    pub progress: bool,
}

/// CPUs this process may run on (0 if unknown).
pub fn cpus() -> usize {
    thread::available_parallelism().map_or(0, |n| n.get())
}
