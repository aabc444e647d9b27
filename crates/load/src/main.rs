//! `chat-load`: load generator for any server speaking the gopl.io chat
//! line protocol, and a side-by-side comparison of servers.
//!
//! Parses flags, builds the runtime and calls into the `chat_load`
//! library; everything else lives there.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chat_load::compare::Model;
use chat_load::compare::{self, CompareOptions, PeerSpec};
use chat_load::protocol::Protocol;
use chat_load::scenario::resolve_loopback;
use chat_load::{self as load, Options, Scenario};
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

/// Load generator for gopl.io-style line chat servers (loopback only).
///
/// A delivery is one chat message received by one client. Give the server's
/// pid (--server-pid) to also get its CPU time per delivery and its memory.
/// Progress goes to stderr, results to stdout (a table, or JSON with --json).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// n clients each send m messages with --window in flight; everyone receives everything.
    Fanout(LoadArgs),
    /// Open loop: each client sends --rate messages/s for --duration, send times spread evenly.
    Rate(LoadArgs),
    /// Join-and-leave cycles per second with n idle clients present.
    Churn(LoadArgs),
    /// Fanout among n clients while one extra client never reads.
    Slow(LoadArgs),
    /// n idle connections: server RSS per connection (needs --server-pid).
    Idle(LoadArgs),
    /// Rate, while one extra client writes as fast as it can: ordinary clients' latency and losses.
    Flood(LoadArgs),
    /// Start our server in each model (and any --peer), run the same scenarios, compare.
    Compare(Box<CompareArgs>),
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The server, HOST:PORT on loopback; several, comma-separated (the
    /// nodes of one `--cluster` room), spread the clients round-robin.
    #[arg(long)]
    addr: String,

    /// Clients [fanout 100, rate 500, churn: idle clients 100, slow 20, idle 5000, flood 10 and the flooder].
    #[arg(short = 'n', long = "clients")]
    clients: Option<usize>,

    /// Messages per client [fanout 100, slow 25000]; churn: cycles (default: as many as --duration allows).
    #[arg(short = 'm', long = "messages")]
    messages: Option<u64>,

    /// Payload bytes per chat line, at least 43 [64; slow 200].
    #[arg(long)]
    size: Option<usize>,

    /// Own messages in flight per client [16]; churn: concurrent join-leave loops [1].
    #[arg(long)]
    window: Option<u32>,

    /// Messages per second per client (rate [1], flood [20]).
    #[arg(long)]
    rate: Option<f64>,

    /// Seconds: sending stops after this (fanout 60, slow 30, rate 10, flood 5); churn runs this long [5].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// Seconds without progress after which the tool stops waiting for what is in flight.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    drain: f64,

    /// Seconds the idle scenario keeps its connections open after they
    /// settle, and waits again after closing them before its last reading.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    hold: f64,

    /// Idle: fail (exit status 1, after the report) when the server's RSS per
    /// connection after holding them is over this many KiB. The idle figure's
    /// guard against creeping back: 3 KiB for our server at -n 5000.
    #[arg(long, value_name = "KIB")]
    max_kib_per_connection: Option<f64>,

    /// The server's pid, for its CPU time (/proc/PID/task/*/schedstat) and RSS (/proc/PID/status).
    /// Repeat it for a server of several processes (a cluster's broker and
    /// nodes): their CPU and memory are summed.
    #[arg(long, value_name = "PID")]
    server_pid: Vec<u32>,

    /// What the clients speak: the chat's line protocol, NATS core (PUB/SUB)
    /// or Redis pub/sub (PUBLISH/SUBSCRIBE) on one subject (fanout and rate),
    /// or the chat through its WebSocket door, --addr being the server's
    /// --web-addr (ws: fanout, rate and idle).
    #[arg(long, value_enum, default_value_t = Protocol::Line)]
    protocol: Protocol,

    /// Speak TLS (line protocol, or wss:// with --protocol ws) to a server
    /// started with --tls-cert/--tls-key; fanout, slow and idle.
    #[arg(long, requires = "tls_ca")]
    tls: bool,

    /// The PEM certificates --tls trusts: the server's CA, or the server's
    /// own (self-signed) certificate.
    #[arg(long, value_name = "FILE", requires = "tls")]
    tls_ca: Option<PathBuf>,

    /// The NATS subject or Redis channel for --protocol nats|redis.
    #[arg(long, default_value = load::protocol::DEFAULT_SUBJECT)]
    subject: String,

    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct Common {
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,

    /// Worker threads of the tool's runtime [default: half the CPUs, leaving
    /// the other half to the server].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Our server binary [chat-server next to this executable].
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,

    /// Our models to run (comma-separated).
    #[arg(
        long,
        value_parser = clap::builder::PossibleValuesParser::new(chat_wire::banner::MODELS)
            .try_map(|name| name.parse::<Model>()),
        value_delimiter = ',',
        default_value = "sharded,broadcaster,locked,broadcast"
    )]
    models: Vec<Model>,

    /// Run only the --peer servers, none of ours.
    #[arg(long)]
    peers_only: bool,

    /// An extra argument for each of our servers (repeat it: --server-arg=--slow-client --server-arg=drop).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,

    /// Another server: NAME@HOST:PORT=COMMAND if it always listens there (the Go seed:
    /// seed@127.0.0.1:8000=/tmp/gopl-chat-server), or NAME=COMMAND with {port} or {addr}
    /// in COMMAND. Run with `sh -c COMMAND`. Repeatable.
    #[arg(long = "peer", value_name = "NAME[@ADDR]=COMMAND")]
    peers: Vec<PeerSpec>,

    /// Also run against routed NATS clusters of these sizes (comma-separated,
    /// e.g. 3): K `nats-server`s joined with --cluster/--routes on free
    /// loopback ports, the clients speaking NATS to them round-robin.
    #[arg(long, value_delimiter = ',', value_name = "K")]
    nats_cluster: Vec<usize>,

    /// Also run against clusters of our nodes of these sizes (comma-separated,
    /// e.g. 1,3): one `nats-server -js` and K `chat-server --cluster` nodes in
    /// the first of --models, the clients spread round-robin.
    #[arg(long, value_delimiter = ',', value_name = "K")]
    cluster_nodes: Vec<usize>,

    /// In rate runs against --cluster-nodes: kill the cluster's broker with
    /// SIGKILL this many seconds after sending started, and start it again
    /// on the same port and store (lost, backwards and longest gap show what
    /// the clients saw).
    #[arg(long, value_name = "SECS")]
    broker_restart: Option<f64>,

    /// Scenarios to run against each server (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fanout,rate")]
    scenarios: Vec<Scenario>,

    /// Fanout points: numbers of clients (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    clients: Vec<usize>,

    /// Deliveries per fanout point: each client sends max(DELIVERIES / n², 10) messages.
    #[arg(long, default_value_t = 10_000_000)]
    deliveries: u64,

    /// Messages per client at every fanout point, instead of --deliveries.
    #[arg(short = 'm', long = "messages")]
    messages: Option<u64>,

    /// Own messages in flight per client (fanout).
    #[arg(long, default_value_t = 16)]
    window: u32,

    /// Payload bytes per chat line.
    #[arg(long, default_value_t = 64)]
    size: usize,

    /// Seconds after which a fanout point stops sending (the Go seed is slow at n=1000).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    fanout_timeout: f64,

    /// Clients of the rate point.
    #[arg(long, default_value_t = 500)]
    rate_clients: usize,

    /// Messages per second per client at the rate point.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,

    /// Seconds of the rate point.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,

    /// Connections of the idle scenario (if in --scenarios).
    #[arg(long, default_value_t = 5000)]
    idle_clients: usize,

    /// Seconds the idle scenario keeps its connections open after they
    /// settle, and waits again after closing them before its last reading.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    hold: f64,

    /// Seconds without progress after which a run stops waiting for what is in flight.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    drain: f64,

    /// Seconds a server may take to start listening.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    startup_timeout: f64,

    /// Worker threads of each of our servers (its --threads) [default: the CPUs
    /// chat-load's --threads leaves free]. Peers run as their COMMAND says.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    server_threads: Option<u16>,

    /// Where to write compare.md, compare.json, compare.svg and the servers' logs.
    #[arg(long, value_name = "DIR", default_value = "target/chat-load")]
    out: PathBuf,

    /// Run nothing: read a compare.json an earlier run wrote and write its
    /// compare.md and compare.svg again into --out, drawn by this version.
    #[arg(long, value_name = "FILE")]
    replot: Option<PathBuf>,

    #[command(flatten)]
    common: Common,
}

impl Common {
    /// A server and this tool on one machine, each with a thread per CPU,
    /// take turns on the cores, and the turns show up as milliseconds of
    /// latency (docs/results.md, "Sharing two cores"), so the tool takes half.
    fn threads(&self) -> usize {
        self.threads
            .map_or_else(|| (compare::cpus() / 2).max(1), usize::from)
    }
}

fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs).with_context(|| format!("--{flag} {secs}: not a duration"))
}

fn scenario_options(scenario: Scenario, args: &LoadArgs) -> anyhow::Result<Options> {
    let nodes = args
        .addr
        .split(',')
        .map(|addr| resolve_loopback(addr.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = *nodes.first().context("--addr: no address")?;
    let mut o = Options::new(scenario, first).with_nodes(nodes);
    if let Some(n) = args.clients {
        o.clients = n;
    }
    if let Some(m) = args.messages {
        o.messages = m;
    }
    if let Some(size) = args.size {
        o.size = size;
    }
    if let Some(window) = args.window {
        o.window = window;
    }
    if let Some(rate) = args.rate {
        o.rate = rate;
    }
    if let Some(duration) = args.duration {
        o.duration = seconds("duration", duration)?;
    }
    o.drain = seconds("drain", args.drain)?;
    o.hold = seconds("hold", args.hold)?;
    o.server_pids = args.server_pid.clone();
    o.protocol = args.protocol;
    o.subject = args.subject.clone();
    if args.tls {
        let ca = args.tls_ca.as_ref().context("--tls needs --tls-ca")?;
        o.tls = Some(load::tls::TlsClient::from_ca_file(ca)?);
    }
    o.threads = args.common.threads();
    o.progress = !args.common.quiet;
    Ok(o)
}

fn compare_options(args: &CompareArgs) -> anyhow::Result<CompareOptions> {
    let server_bin = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .parent()
            .context("this executable has no parent directory")?
            .join("chat-server"),
    };
    if args.nats_cluster.contains(&0) || args.cluster_nodes.contains(&0) {
        anyhow::bail!("--nats-cluster and --cluster-nodes take sizes of at least 1");
    }
    let models = if args.peers_only {
        Vec::new()
    } else {
        args.models.clone()
    };
    if (!models.is_empty() || !args.cluster_nodes.is_empty()) && !server_bin.exists() {
        anyhow::bail!(
            "{} does not exist: build it (cargo build --release --bin chat-server) or pass --server-bin",
            server_bin.display()
        );
    }
    compare::check_server_args(&args.server_args)?;
    Ok(CompareOptions {
        server_bin,
        models,
        server_args: args.server_args.clone(),
        peers: args.peers.clone(),
        nats_clusters: args.nats_cluster.clone(),
        cluster_nodes: args.cluster_nodes.clone(),
        broker_restart: args
            .broker_restart
            .map(|secs| seconds("broker-restart", secs))
            .transpose()?,
        cluster_model: *args
            .models
            .first()
            .context("--models: give at least one (the cluster nodes run the first)")?,
        scenarios: args.scenarios.clone(),
        clients: args.clients.clone(),
        deliveries: args.deliveries,
        messages: args.messages,
        window: args.window,
        size: args.size,
        fanout_timeout: seconds("fanout-timeout", args.fanout_timeout)?,
        rate_clients: args.rate_clients,
        rate: args.rate,
        rate_duration: seconds("duration", args.duration)?,
        idle_clients: args.idle_clients,
        idle_hold: seconds("hold", args.hold)?,
        drain: seconds("drain", args.drain)?,
        startup_timeout: seconds("startup-timeout", args.startup_timeout)?,
        out: args.out.clone(),
        threads: args.common.threads(),
        server_threads: args.server_threads.map_or_else(
            || compare::cpus().saturating_sub(args.common.threads()).max(1),
            usize::from,
        ),
        progress: !args.common.quiet,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            chat_load::note!("chat-load: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match &cli.command {
        Command::Compare(args) => args.common.threads(),
        Command::Fanout(a)
        | Command::Rate(a)
        | Command::Churn(a)
        | Command::Slow(a)
        | Command::Idle(a)
        | Command::Flood(a) => a.common.threads(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("chat-load")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    // Start the clock before any client exists.
    load::payload::origin();
    runtime.block_on(async move {
        tokio::select! {
            result = dispatch(cli) => result,
            signal = interrupted() => {
                // Returning drops the running scenario: its clients stop and
                // any servers `compare` started are stopped by their guards.
                anyhow::bail!("interrupted by {signal}")
            }
        }
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let (scenario, args) = match cli.command {
        Command::Compare(args) => {
            if let Some(json) = &args.replot {
                let comparison = compare::replot(json, &args.out)?;
                results(&compare::table(&comparison))?;
                chat_load::note!(
                    "chat-load: wrote compare.md and compare.svg to {}",
                    args.out.display()
                );
                return Ok(());
            }
            let options = compare_options(&args)?;
            let comparison = compare::compare(&options).await?;
            if args.common.json {
                let json =
                    serde_json::to_string(&comparison).context("serialising the comparison")?;
                results(&format!("{json}\n"))?;
            } else {
                results(&compare::table(&comparison))?;
                chat_load::note!(
                    "chat-load: wrote compare.md, compare.json and compare.svg to {}",
                    options.out.display()
                );
            }
            return Ok(());
        }
        Command::Fanout(args) => (Scenario::Fanout, args),
        Command::Rate(args) => (Scenario::Rate, args),
        Command::Churn(args) => (Scenario::Churn, args),
        Command::Slow(args) => (Scenario::Slow, args),
        Command::Idle(args) => (Scenario::Idle, args),
        Command::Flood(args) => (Scenario::Flood, args),
    };
    let options = scenario_options(scenario, &args)?;
    if scenario == Scenario::Idle && options.server_pids.is_empty() {
        chat_load::note!(
            "chat-load: note: without --server-pid the idle scenario cannot report server memory"
        );
    }
    let report = load::run(scenario, &options).await?;
    if args.common.json {
        results(&format!("{}\n", report.to_json()))?;
    } else {
        results(&report.to_table())?;
    }
    match args.max_kib_per_connection {
        Some(max) => over_memory_budget(&report, max),
        None => Ok(()),
    }
}

/// `--max-kib-per-connection`: the held figure, or an error saying why it
/// cannot be checked.
fn over_memory_budget(report: &load::report::Report, max: f64) -> anyhow::Result<()> {
    let held = report
        .idle
        .as_ref()
        .and_then(|idle| idle.per_connection_held_kib)
        .context("--max-kib-per-connection needs the idle scenario and --server-pid")?;
    if held > max {
        anyhow::bail!("{held:.2} KiB per idle connection, over --max-kib-per-connection {max}");
    }
    Ok(())
}

/// Writes the results to stdout. Unlike `print!`, a closed stdout is an
/// error the run reports (its results are lost), not a panic.
fn results(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the results to stdout")
}

/// Completes on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
