//! `chat-server`: the gopl.io chat server, in the concurrency model of your choice.
//!
//! Parses flags into a [`Config`], fits the open-file limit to
//! `--max-clients`, binds, prints the address, and serves until SIGINT or
//! SIGTERM. Everything else lives in the library.
//!
//! Nothing here may fail because our own stdout or stderr is gone (a log
//! pipe whose reader died, `chat-server 2>&1 | tee log` after Ctrl-C): every
//! write to them goes through [`say`] or the log writer, which drop what
//! cannot be written instead of panicking as `println!` and `eprintln!` do.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_server::{
    default_max_client_memory, server, ClusterConfig, Config, Model, Password, QueueKind,
    SlowClientPolicy, TlsFiles,
};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A TCP chat server speaking the line protocol of gopl.io chapter 8.
///
/// Chat with `netcat HOST:PORT` (ours) or `nc HOST PORT`. Logs go to stderr;
/// set RUST_LOG (for example RUST_LOG=debug) to change how much is logged.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: String,

    /// Concurrency model that owns the set of clients.
    #[arg(long, value_enum, default_value_t = DEFAULTS.model)]
    model: Model,

    /// What to do with a client that cannot keep up.
    #[arg(long, value_enum, default_value_t = DEFAULTS.slow_client)]
    slow_client: SlowClientPolicy,

    /// Per-client queue of the sharded, broadcaster and locked models [default: swap].
    #[arg(long, value_enum)]
    queue: Option<QueueKind>,

    /// Bytes that may wait in one client's outbound queue before it counts as slow.
    #[arg(long, default_value_t = DEFAULTS.max_pending)]
    max_pending: usize,

    /// Seconds a client with data pending may accept no byte before it counts as stuck.
    #[arg(long, value_name = "SECS", default_value_t = secs(DEFAULTS.write_timeout))]
    write_timeout: f64,

    /// Longest line a client may send, in bytes; longer gets an error and a disconnect.
    #[arg(long, default_value_t = DEFAULTS.max_line)]
    max_line: usize,

    /// Connections served at once; one more is told `error: server full`.
    #[arg(long, default_value_t = DEFAULTS.max_clients)]
    max_clients: usize,

    /// Disconnect clients that send nothing for this many seconds (off by default).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<f64>,

    /// Seconds queued messages may take to flush on shutdown.
    #[arg(long, value_name = "SECS", default_value_t = secs(DEFAULTS.shutdown_grace))]
    shutdown_grace: f64,

    /// Ask each client for a name first (its first line: 1-32 printable ASCII
    /// characters, no spaces, unique in the room, across every node with
    /// --cluster); the name replaces IP:PORT.
    #[arg(long)]
    names: bool,

    /// Tell each newcomer who is already present, right after `You are ...`,
    /// as one line `present (N): A, B, C` (with --cluster: every node's
    /// clients, the other nodes' as far as their news has arrived).
    #[arg(long)]
    announce_present: bool,

    /// Show each newcomer the room's last N chat lines (not arrivals or
    /// departures), in a block `--- history (N) ---` ... `--- end of history ---`
    /// right after its greeting. 0 (the default) is off: the seed's protocol.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.history)]
    history: usize,

    /// The most bytes of formatted lines the history holds, oldest out first;
    /// counted against --max-client-memory.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULTS.history_bytes)]
    history_bytes: usize,

    /// Join one room with other chat-servers through a NATS JetStream broker:
    /// `nats://[USER:PASSWORD@|TOKEN@]HOST:PORT` (several, comma-separated).
    /// Without it this server is a room of its own and needs no broker.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,

    /// The room's name on the broker (stream CHAT_NAME, subjects chat.NAME.*);
    /// rooms on one broker are independent.
    #[arg(
        long,
        value_name = "NAME",
        default_value_t = CLUSTER_DEFAULTS.room.clone(),
        requires = "cluster"
    )]
    room: String,

    /// A NATS credentials file (JWT and nkey seed) for the broker.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    cluster_creds: Option<std::path::PathBuf>,

    /// Bytes of events held for the broker while it is unreachable; past
    /// it the oldest are dropped (counted and logged).
    #[arg(long, value_name = "BYTES", default_value_t = CLUSTER_DEFAULTS.buffer_bytes, requires = "cluster")]
    cluster_buffer: usize,

    /// Seconds the broker keeps the room's events (how long a node may be
    /// cut off and still catch up); created with the stream.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = secs(CLUSTER_DEFAULTS.retention_age),
        requires = "cluster"
    )]
    cluster_retention: f64,

    /// Bytes the broker keeps of the room's events; created with the stream.
    #[arg(long, value_name = "BYTES", default_value_t = CLUSTER_DEFAULTS.retention_bytes, requires = "cluster")]
    cluster_retention_bytes: u64,

    /// Seconds between a node's heartbeats.
    #[arg(long, value_name = "SECS", default_value_t = secs(CLUSTER_DEFAULTS.heartbeat), requires = "cluster")]
    cluster_heartbeat: f64,

    /// Seconds without a heartbeat after which a node counts as dead and its
    /// clients as gone (announced within this plus a quarter heartbeat).
    #[arg(long, value_name = "SECS", default_value_t = secs(CLUSTER_DEFAULTS.node_timeout), requires = "cluster")]
    cluster_node_timeout: f64,

    /// The longest pause, in seconds, between tries to reach the broker
    /// (pauses double from 20-50 ms up to it).
    #[arg(long, value_name = "SECS", default_value_t = secs(CLUSTER_DEFAULTS.reconnect_max), requires = "cluster")]
    cluster_reconnect_max: f64,

    /// Seconds a broker call (a publish's acknowledgement, a name's claim)
    /// may take before it counts as failed and is retried.
    #[arg(long, value_name = "SECS", default_value_t = secs(CLUSTER_DEFAULTS.ack_timeout), requires = "cluster")]
    cluster_ack_timeout: f64,

    /// Copies the broker keeps of the room's stream and names bucket
    /// (1 to 5). Default: min(3, servers in the broker's NATS cluster), 1
    /// on a single server; an existing stream with fewer is updated.
    #[arg(long, value_name = "N", requires = "cluster")]
    cluster_replicas: Option<usize>,

    /// Input budget per client, lines per second (0: no line budget). Over
    /// budget, the server stops reading that client until it is back within.
    #[arg(long, value_name = "LINES", default_value_t = DEFAULTS.flood_lines)]
    flood_lines: u32,

    /// Input budget per client, bytes per second (0: no byte budget; both 0
    /// turns flood control off).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULTS.flood_bytes)]
    flood_bytes: u32,

    /// Seconds of budget a quiet client saves up: the burst it may send at once.
    #[arg(long, value_name = "SECS", default_value_t = secs(DEFAULTS.flood_burst))]
    flood_burst: f64,

    /// A client held back by its budget this long without a break gets
    /// `error: flooding` and is disconnected (0: only ever held back).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULTS.flood_grace.map_or(0.0, secs))]
    flood_grace: f64,

    /// Connections from one IPv4 address or one IPv6 /64 (0: no limit);
    /// one more is told `error: too many connections from your address`.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.max_clients_per_ip)]
    max_clients_per_ip: usize,

    /// TCP keepalive: about how many seconds until a peer that vanished
    /// without a FIN or RST is freed in a quiet room (0: off).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULTS.keepalive.map_or(0, |keepalive| keepalive.as_secs()))]
    keepalive: u64,

    /// Bytes all clients together may hold in partial lines and queued
    /// messages; over it, the largest holder is disconnected first (0: no
    /// limit) [default: a quarter of physical memory].
    #[arg(long, value_name = "BYTES")]
    max_client_memory: Option<usize>,

    /// Worker threads of the runtime [default: one per CPU]. When a load
    /// generator shares the machine, give each its own cores (see README).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    /// Log line format on stderr: `text` for people, `json` (one object per
    /// line, with the same fields and the client's `peer` span) for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics and a health check
    /// at /healthz (off by default; keep it on loopback or a private network).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,

    /// Speak TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    /// SIGHUP rereads both files: new connections get the new certificate.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// Seconds a TLS handshake may take before the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = secs(DEFAULTS.tls_handshake_timeout))]
    tls_handshake_timeout: f64,

    /// Serve the chat page at http://HOST:PORT/ and a WebSocket door into the
    /// same room at /ws (off by default). With --tls-cert: HTTPS and WSS, the
    /// same certificate and SIGHUP reload. Browsers share the room, the rules
    /// and the per-address budget with line clients.
    #[arg(long, value_name = "HOST:PORT")]
    web_addr: Option<String>,

    /// A browser origin besides the page's own (e.g. https://chat.example.org)
    /// whose pages may open /ws; repeat for more. Other origins get 403.
    #[arg(long, value_name = "ORIGIN", requires = "web_addr")]
    web_origin: Vec<String>,

    /// Room password: the first line of FILE. A client's first line must be
    /// it; a wrong one gets `error: wrong password` and a close, and guesses
    /// from one address are slowed down. Use with TLS off loopback.
    #[arg(long, value_name = "FILE")]
    password_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The library's defaults, which every flag's default is read from: a
/// default is written once, in `Config::default` or `ClusterConfig::new`.
static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);
static CLUSTER_DEFAULTS: LazyLock<ClusterConfig> = LazyLock::new(|| ClusterConfig::new(""));

/// A default duration as the seconds a flag takes.
fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs).with_context(|| format!("--{flag} {secs}: not a duration"))
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        if let (Some(queue), false) = (self.queue, self.model.has_client_queues()) {
            bail!(
                "--queue {queue} has no effect with --model {}, whose clients share one ring \
                 instead of a queue each; leave --queue out",
                self.model
            );
        }
        let mut config = Config::default();
        config.model = self.model;
        config.slow_client = self.slow_client;
        config.queue = self.queue.unwrap_or(QueueKind::Swap);
        config.max_pending = self.max_pending;
        config.write_timeout = seconds("write-timeout", self.write_timeout)?;
        config.max_line = self.max_line;
        config.max_clients = self.max_clients;
        config.idle_timeout = self
            .idle_timeout
            .map(|secs| seconds("idle-timeout", secs))
            .transpose()?;
        config.shutdown_grace = seconds("shutdown-grace", self.shutdown_grace)?;
        config.names = self.names;
        config.announce_present = self.announce_present;
        config.history = self.history;
        config.history_bytes = self.history_bytes;
        config.cluster = self.cluster_config()?;
        config.flood_lines = self.flood_lines;
        config.flood_bytes = self.flood_bytes;
        config.flood_burst = seconds("flood-burst", self.flood_burst)?;
        config.flood_grace =
            Some(seconds("flood-grace", self.flood_grace)?).filter(|grace| !grace.is_zero());
        config.max_clients_per_ip = self.max_clients_per_ip;
        config.keepalive = (self.keepalive > 0).then(|| Duration::from_secs(self.keepalive));
        config.max_client_memory = self
            .max_client_memory
            .unwrap_or_else(default_max_client_memory);
        config.metrics_addr = self.metrics_addr.clone();
        config.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles::new(cert, key)),
            _ => None,
        };
        config.tls_handshake_timeout =
            seconds("tls-handshake-timeout", self.tls_handshake_timeout)?;
        config.web_addr = self.web_addr.clone();
        config.web_origins = self.web_origin.clone();
        config.password = self
            .password_file
            .as_ref()
            .map(|path| {
                Password::from_file(path)
                    .with_context(|| format!("--password-file {}", path.display()))
            })
            .transpose()?;
        config.validate()?;
        Ok(config)
    }
}

impl Args {
    fn cluster_config(&self) -> anyhow::Result<Option<ClusterConfig>> {
        let Some(url) = &self.cluster else {
            return Ok(None);
        };
        if let Some(creds) = &self.cluster_creds {
            // Fail now rather than retry a file that is not there.
            std::fs::metadata(creds)
                .with_context(|| format!("--cluster-creds {}", creds.display()))?;
        }
        let mut cluster = ClusterConfig::new(url);
        cluster.room = self.room.clone();
        cluster.creds = self.cluster_creds.clone();
        cluster.buffer_bytes = self.cluster_buffer;
        cluster.retention_age = seconds("cluster-retention", self.cluster_retention)?;
        cluster.retention_bytes = self.cluster_retention_bytes;
        cluster.heartbeat = seconds("cluster-heartbeat", self.cluster_heartbeat)?;
        cluster.node_timeout = seconds("cluster-node-timeout", self.cluster_node_timeout)?;
        cluster.reconnect_max = seconds("cluster-reconnect-max", self.cluster_reconnect_max)?;
        cluster.ack_timeout = seconds("cluster-ack-timeout", self.cluster_ack_timeout)?;
        cluster.replicas = self.cluster_replicas;
        Ok(Some(cluster))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            say(io::stderr(), format_args!("chat-server: {err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to `out`, dropping it if `out` is gone.
fn say(mut out: impl Write, line: std::fmt::Arguments<'_>) {
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// stderr for the log: a write that fails (the pipe's reader has gone)
/// reports success, so the line is dropped and the server carries on.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Descriptors the server needs besides one per client: stdio, the
/// listener, the runtime's epoll and wake-up descriptors, and room for
/// connections it accepts only to refuse.
#[cfg(unix)]
const SPARE_FILES: u64 = 64;

/// Raises the soft open-file limit to the hard one if `--max-clients` needs
/// more than the soft limit, and warns if even the hard limit is too low:
/// otherwise the server would silently sit in accept-error backoff at about
/// the soft limit (1,024 on many systems).
#[cfg(unix)]
fn fit_open_files(max_clients: usize) {
    let needed = max_clients as u64 + SPARE_FILES;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let cause = io::Error::last_os_error();
        tracing::warn!(%cause, "cannot read the open-file limit");
        return;
    }
    let soft = limit.rlim_cur;
    if soft >= needed {
        return;
    }
    // An unlimited hard limit cannot be the soft one (the kernel caps it at
    // fs.nr_open): ask for what is needed instead.
    let raised = if limit.rlim_max == libc::RLIM_INFINITY {
        needed
    } else {
        limit.rlim_max
    };
    limit.rlim_cur = raised;
    // SAFETY: as above.
    let now = if raised > soft && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        tracing::info!(from = soft, to = raised, "raised the open-file limit");
        raised
    } else {
        soft
    };
    if now < needed {
        let room = now.saturating_sub(SPARE_FILES);
        tracing::warn!(
            "the open-file limit is {now} (hard limit {}): room for about {room} clients, \
             but --max-clients is {max_clients}; past that, connections wait in accept-error \
             backoff. Raise the limit (`ulimit -n {needed}`, as root if the hard limit is \
             lower) or lower --max-clients",
            limit.rlim_max
        );
    }
}

#[cfg(not(unix))]
fn fit_open_files(_max_clients: usize) {}

fn init_logging(format: LogFormat) {
    let logger = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(|| LossyStderr)
        // Its fallback for a failed write is `eprintln!`, which panics.
        .log_internal_errors(false);
    match format {
        // Colour codes belong on a terminal, not in a redirected log file.
        LogFormat::Text => logger.with_ansi(io::stderr().is_terminal()).init(),
        // `span` is the innermost span's fields (`conn` with its `peer`),
        // `spans` the whole stack, as the text format prints it.
        LogFormat::Json => logger
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn serve(args: &Args) -> anyhow::Result<()> {
    let config = args.config()?;
    fit_open_files(config.max_clients);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(usize::from(threads));
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(listen_and_serve(args, config))
}

async fn listen_and_serve(args: &Args, config: Config) -> anyhow::Result<()> {
    let listener = server::bind(&args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = listener.local_addr()?;
    // Before the banner, so that whoever reads the banner has been warned.
    if config.password.is_some() && config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the room password crosses the network in clear text: anyone on the path can read it; \
             serve TLS (--tls-cert, --tls-key) or listen on loopback"
        );
    }
    // On stdout, alone on its line, so scripts can learn the port.
    say(
        io::stdout(),
        format_args!(
            "{}",
            chat_wire::banner::format(&addr.to_string(), config.model.name())
        ),
    );
    let tls = config.tls.is_some();
    if config.model.has_client_queues() {
        tracing::info!(%addr, tls, model = %config.model, slow_client = %config.slow_client, queue = %config.queue, "listening");
    } else {
        tracing::info!(%addr, tls, model = %config.model, slow_client = %config.slow_client, "listening");
    }
    // Spawned rather than run in place so that the accept loop is a runtime
    // task, as the task counts in ARCHITECTURE.md assume.
    let server = tokio::spawn(server::run(listener, config, shutdown_signal()));
    server.await.context("server task failed")??;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received");
}
