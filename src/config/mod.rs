//! Server settings: which concurrency model to run and the limits that keep
//! one client from hurting the others.
//!
//! Everything here is plain data with defaults; `bin/chat-server.rs` maps
//! command-line flags onto it, taking every flag's default from
//! [`Config::default`] and [`ClusterConfig::new`], and tests build it
//! directly. The enums derive `clap::ValueEnum` under the `cli` feature
//! (their variants' doc comments are the flag values' help), so the
//! library without `cli` does not depend on `clap`.
//!
//! This file holds [`Config`] and its defaults; beside it:
//! [`choices`] (the models, slow-client policies and queues),
//! [`cluster`] (the backplane's settings and counters), [`files`] (the
//! settings read from files: the password and the TLS identity) and
//! [`validate`] (which combinations are refused, and why). The
//! configuration uses no other part of the server.

use std::time::Duration;

mod choices;
mod cluster;
mod files;
mod validate;

pub use choices::{Model, QueueKind, SlowClientPolicy};
pub use cluster::{ClusterConfig, ClusterCounters, ClusterStats};
pub(crate) use files::MAX_PASSWORD;
pub use files::{Password, TlsFiles};
pub use validate::ConfigError;

/// The longest line a client may send by default, in bytes, excluding the
/// newline. It matches Go's `bufio.Scanner` (`MaxScanTokenSize`), which is
/// what the seed server reads with.
pub(crate) const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// Default cap on the bytes queued for one client: Redis's pub/sub hard
/// limit. ARCHITECTURE.md explains the choice and the memory it implies.
const DEFAULT_MAX_PENDING: usize = 32 * 1024 * 1024;

/// The most bytes one line of `max_line` input bytes can take once formatted
/// for the others: the sender's name, `: `, the text after sanitising and the
/// newline. Sanitising at most triples a line (an invalid byte becomes the
/// three bytes of U+FFFD), and an `IP:PORT` is at most 47 bytes
/// (`[ffff:...:ffff%scope]:65535` with a short scope id); 128 covers both.
pub(crate) fn longest_message(max_line: usize) -> usize {
    max_line.saturating_mul(3).saturating_add(128)
}

/// Default bound of the room's history in bytes (`--history-bytes`): 1 MiB,
/// about 10,000 lines of 100 bytes, so that with the default `--max-line`
/// it is the lines bound that binds for ordinary chat, while a room of
/// 64 KiB lines keeps at least five of them.
pub(crate) const DEFAULT_HISTORY_BYTES: usize = 1024 * 1024;

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
///
/// `#[non_exhaustive]`, so that a new setting does not break embedders:
/// outside this crate, start from [`Config::default`] or
/// [`Config::with_model`] and change fields in place or with [`Config::with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
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

impl Config {
    /// A default configuration running `model`.
    pub fn with_model(model: Model) -> Config {
        Config {
            model,
            ..Config::default()
        }
    }

    /// This configuration changed by `change`: how code outside this crate
    /// sets a few fields in one expression, as
    /// `Config::with_model(model).with(|c| c.names = true)`, where a struct
    /// literal is refused (`Config` is `#[non_exhaustive]`).
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> Config {
        change(&mut self);
        self
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
