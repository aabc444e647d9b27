//! The six scenarios: what each one is ([`Scenario`]), its defaults, the
//! [`Options`] a run takes, and [`run`], which hands a run to the scenario's
//! own module: `fanout`, `rate`, `churn`, `slow`, `idle` and
//! `flood`, one scenario per file. What they share, connecting the clients, letting the
//! arrival announcements settle, starting everyone at once, watching
//! progress, stopping within the time bounds and turning what the clients
//! counted into a [`Report`], is the `coordinator`; the open-loop sender
//! of `rate` is the `pacer`.
//!
//! Every loop here is bounded twice: in count (messages, cycles, clients)
//! and in time. `--duration` bounds the whole measured interval of `fanout`
//! and `slow`, the sending of `rate` (whose backlog then gets at most as
//! long again) and the cycling of `churn`; and waiting gives up after
//! `--drain` seconds without a single delivery. A server that stalls
//! produces a report that says so instead of a hung tool. What the time
//! bound cut off is reported as *pending*; what never came although the
//! tool waited `--drain` without progress, as *lost*.
//!
//! The measured interval starts when the clients are told to start (after
//! the arrivals settled) and ends at the last expected delivery; if some
//! never arrive it ends when the tool gave up waiting. Server CPU is sampled
//! at both ends of that interval, so connecting and disconnecting are not
//! in it (except in `idle`, which measures exactly that).

mod churn;
mod coordinator;
mod fanout;
mod flood;
mod idle;
mod pacer;
mod rate;
mod slow;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::protocol::{Protocol, DEFAULT_SUBJECT};
use crate::report::{Params, Report};

/// The six ways of loading a server.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// n clients each send m messages, `--window` in flight; everyone receives everything.
    Fanout,
    /// Open loop: every client sends `--rate` messages a second, spread evenly.
    Rate,
    /// Join-and-leave cycles per second with n idle clients present.
    Churn,
    /// Fanout while one extra client never reads.
    Slow,
    /// n idle connections: server memory per connection.
    Idle,
    /// `rate` while one extra client writes as fast as the server takes it:
    /// the ordinary clients' latency and losses under a flood.
    Flood,
}

/// A scenario's defaults for the options left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Defaults {
    pub clients: usize,
    pub messages: u64,
    pub size: usize,
    pub window: u32,
    pub rate: f64,
    pub duration: Duration,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Rate => "rate",
            Scenario::Churn => "churn",
            Scenario::Slow => "slow",
            Scenario::Idle => "idle",
            Scenario::Flood => "flood",
        }
    }

    /// `messages` is cycles for churn (0: as many as `duration` allows);
    /// `window` is concurrent churners for churn; `duration` caps sending.
    pub(crate) fn defaults(self) -> Defaults {
        let base = Defaults {
            clients: 100,
            messages: 100,
            size: 64,
            window: 16,
            rate: 1.0,
            duration: Duration::from_secs(60),
        };
        match self {
            Scenario::Fanout => base,
            Scenario::Rate => Defaults {
                clients: 500,
                duration: Duration::from_secs(10),
                ..base
            },
            Scenario::Churn => Defaults {
                messages: 0,
                window: 1,
                duration: Duration::from_secs(5),
                ..base
            },
            Scenario::Slow => Defaults {
                clients: 20,
                messages: 25_000,
                size: 200,
                duration: Duration::from_secs(30),
                ..base
            },
            Scenario::Idle => Defaults {
                clients: 5000,
                ..base
            },
            // Ten people chatting, a line every 50 ms each, as in the
            // server's tests/fairness.rs.
            Scenario::Flood => Defaults {
                clients: 10,
                rate: 20.0,
                duration: Duration::from_secs(5),
                ..base
            },
        }
    }
}

/// Everything a scenario needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server (the first node when there are several).
    pub addr: SocketAddr,
    /// Every node of the room, `addr` first: client i connects to node
    /// i mod len, so a cluster's clients are spread round-robin.
    pub nodes: Vec<SocketAddr>,
    /// How reports name the server.
    pub target: String,
    pub clients: usize,
    pub messages: u64,
    pub size: usize,
    pub window: u32,
    /// Messages per second per client (rate).
    pub rate: f64,
    /// Bound on sending (fanout, slow, rate) or on the whole run (churn).
    pub duration: Duration,
    /// The flag that set `duration`, for the note that says the time bound
    /// cut a run short (`compare` sets it from `--fanout-timeout`).
    pub duration_flag: &'static str,
    /// Give up waiting for what is in flight after this long without progress.
    pub drain: Duration,
    /// How long idle connections stay open after settling.
    pub hold: Duration,
    /// The server's processes, for CPU and memory: one, or every process of
    /// a cluster (its broker and nodes), whose figures are summed.
    pub server_pids: Vec<u32>,
    /// Worker threads of the tool's runtime (for the report).
    pub threads: usize,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// What the clients speak: the chat's line protocol or a broker's pub/sub.
    pub protocol: Protocol,
    /// The NATS subject or Redis channel of the broker protocols.
    pub subject: String,
    /// `--tls`: the clients speak TLS (line and ws; fanout, slow and idle).
    pub tls: Option<crate::tls::TlsClient>,
    /// Cancelled when the clients start sending (`rate`, `fanout`), for
    /// whoever disturbs a run on cue (`compare`'s broker restart).
    pub sending_started: Option<tokio_util::sync::CancellationToken>,
}

impl Options {
    /// The node client `i` connects to.
    pub fn addr_for(&self, i: usize) -> SocketAddr {
        if self.nodes.is_empty() {
            self.addr
        } else {
            self.nodes[i % self.nodes.len()]
        }
    }

    /// Spreads the clients over `nodes` (the first is [`Options::addr`]).
    pub fn with_nodes(mut self, nodes: Vec<SocketAddr>) -> Options {
        if let Some(&first) = nodes.first() {
            self.addr = first;
            self.target = nodes
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(",");
            self.nodes = nodes;
        }
        self
    }

    /// Options with `scenario`'s defaults.
    pub fn new(scenario: Scenario, addr: SocketAddr) -> Options {
        let d = scenario.defaults();
        Options {
            addr,
            nodes: vec![addr],
            target: addr.to_string(),
            clients: d.clients,
            messages: d.messages,
            size: d.size,
            window: d.window,
            rate: d.rate,
            duration: d.duration,
            duration_flag: "--duration",
            drain: Duration::from_secs(2),
            hold: Duration::from_secs(1),
            server_pids: Vec::new(),
            threads: 2,
            progress: true,
            protocol: Protocol::Line,
            subject: DEFAULT_SUBJECT.to_string(),
            sending_started: None,
            tls: None,
        }
    }
}

/// Resolves `HOST:PORT`, refusing anything but loopback: this tool opens
/// thousands of connections and must not be pointed at someone else's server.
pub fn resolve_loopback(addr: &str) -> anyhow::Result<SocketAddr> {
    let candidates: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr:?} (expected HOST:PORT)"))?
        .collect();
    // IPv4 first: "localhost" servers (the Go seed) often listen on 127.0.0.1 only.
    let pick = candidates
        .iter()
        .filter(|a| a.ip().is_loopback())
        .min_by_key(|a| a.is_ipv6())
        .copied();
    match pick {
        Some(found) => Ok(found),
        None => bail!(
            "refusing {addr} ({}): chat-load only loads servers on this machine's loopback interface",
            candidates
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `scenario`.
pub async fn run(scenario: Scenario, opts: &Options) -> anyhow::Result<Report> {
    if opts.clients == 0 {
        bail!("-n must be at least 1");
    }
    let runs = match opts.protocol {
        Protocol::Line => true,
        Protocol::Ws => matches!(scenario, Scenario::Fanout | Scenario::Rate | Scenario::Idle),
        Protocol::Nats | Protocol::Redis => matches!(scenario, Scenario::Fanout | Scenario::Rate),
    };
    if !runs {
        bail!(
            "--protocol {} runs fanout and rate (ws: and idle) only; {} needs more of the chat than that",
            opts.protocol.name(),
            scenario.name()
        );
    }
    if opts.tls.is_some() {
        if !opts.protocol.is_chat() {
            bail!("--tls is for --protocol line and ws only");
        }
        // The rate pacer and the flooder write to the raw socket from
        // elsewhere, and churn's joins would measure handshakes.
        if !matches!(scenario, Scenario::Fanout | Scenario::Slow | Scenario::Idle) {
            bail!(
                "--tls runs fanout, slow and idle only, not {}",
                scenario.name()
            );
        }
    }
    match scenario {
        Scenario::Fanout => fanout::run(opts).await,
        Scenario::Slow => slow::run(opts).await,
        Scenario::Rate => rate::run(opts).await,
        Scenario::Churn => churn::run(opts).await,
        Scenario::Idle => idle::run(opts).await,
        Scenario::Flood => flood::run(opts).await,
    }
}

/// The parameters every report names.
fn params(opts: &Options) -> Params {
    Params {
        clients: opts.clients,
        size: opts.size,
        threads: opts.threads,
        ..Params::default()
    }
}

#[cfg(test)]
mod test_support {
    use std::net::SocketAddr;
    use std::time::Duration;

    use chat_server::harness::TestServer;
    use chat_testkit::nats::Broker;
    use chat_testkit::redis::RedisServer;

    use super::{Options, Scenario};
    use crate::protocol::Protocol;

    /// Three clients, no progress lines, a generous time bound.
    pub(super) fn small(scenario: Scenario, server: &TestServer) -> Options {
        small_at(scenario, server.addr())
    }

    fn small_at(scenario: Scenario, addr: SocketAddr) -> Options {
        let mut opts = Options::new(scenario, addr);
        opts.clients = 3;
        opts.progress = false;
        opts.duration = Duration::from_secs(10);
        opts
    }

    /// A broker speaking `protocol`, kept alive while the test runs.
    pub(super) enum BrokerProcess {
        Nats(#[allow(dead_code)] Broker),
        Redis(#[allow(dead_code)] RedisServer),
    }

    /// [`small`] against a fresh broker speaking `protocol`, or `None`
    /// (after a loud message) if its binary is not installed here.
    pub(super) fn small_broker(
        scenario: Scenario,
        protocol: Protocol,
    ) -> Option<(Options, BrokerProcess)> {
        let (port, process) = match protocol {
            Protocol::Nats => {
                let broker = Broker::start().unwrap()?;
                (broker.port, BrokerProcess::Nats(broker))
            }
            Protocol::Redis => {
                let redis = RedisServer::start().unwrap()?;
                (redis.port, BrokerProcess::Redis(redis))
            }
            Protocol::Line | Protocol::Ws => unreachable!("not a broker"),
        };
        let mut opts = small_at(scenario, SocketAddr::from(([127, 0, 0, 1], port)));
        opts.protocol = protocol;
        Some((opts, process))
    }

    /// A complete run whose (sent, delivered, lost, order violations) are
    /// `expected`.
    pub(super) fn assert_complete(report: &crate::report::Report, expected: (u64, u64, u64, u64)) {
        let d = report.deliveries.as_ref().unwrap();
        assert!(report.complete, "{}", report.to_table());
        assert_eq!((d.sent, d.delivered, d.lost, d.order_violations), expected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_loopback_addresses() {
        assert!(resolve_loopback("127.0.0.1:8000").is_ok());
        assert_eq!(
            resolve_loopback("localhost:8000").unwrap().ip().to_string(),
            "127.0.0.1"
        );
        let err = resolve_loopback("192.0.2.1:8000").unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(resolve_loopback("no port").is_err());
    }
}
