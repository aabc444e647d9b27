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
//! server) and to `--out` as `compare.md`, `compare.json` and `compare.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use super::plot::{self, Series};
use super::proc::{self, Proc};
use super::report::{self, Report};
use super::scenario::{self, resolve_loopback, Options, Scenario};

/// One of our server's models, by the name its `--model` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model(&'static str);

impl Model {
    pub fn name(self) -> &'static str {
        self.0
    }
}

impl FromStr for Model {
    type Err = String;

    fn from_str(name: &str) -> Result<Model, String> {
        chat_wire::banner::MODELS
            .into_iter()
            .find(|model| *model == name)
            .map(Model)
            .ok_or_else(|| {
                format!(
                    "unknown model {name:?}; expected one of {}",
                    chat_wire::banner::MODELS.join(", ")
                )
            })
    }
}

/// A server to compare that is not ours: `NAME[@ADDR]=COMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// Where it listens, if it cannot be told.
    pub addr: Option<String>,
    pub command: String,
}

impl FromStr for PeerSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<PeerSpec, String> {
        let usage = "expected NAME=COMMAND (with {port} or {addr} in COMMAND) or NAME@ADDR=COMMAND";
        let (head, command) = spec.split_once('=').ok_or_else(|| usage.to_owned())?;
        let (name, addr) = match head.split_once('@') {
            Some((name, addr)) => (name, Some(addr.to_owned())),
            None => (head, None),
        };
        if name.is_empty() || command.trim().is_empty() || addr.as_deref() == Some("") {
            return Err(usage.to_owned());
        }
        if addr.is_none() && !command.contains("{port}") && !command.contains("{addr}") {
            return Err(format!(
                "peer {name:?}: say where it listens, as {name}@HOST:PORT=COMMAND, \
                 or put {{port}} or {{addr}} in COMMAND"
            ));
        }
        Ok(PeerSpec {
            name: name.to_owned(),
            addr,
            command: command.to_owned(),
        })
    }
}

/// What `compare` runs, and where it writes.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Our server's binary.
    pub server_bin: PathBuf,
    pub models: Vec<Model>,
    /// Extra arguments for every one of our servers.
    pub server_args: Vec<String>,
    pub peers: Vec<PeerSpec>,
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

/// The messages per client of a fanout point: about `deliveries` in all,
/// at least 10 so every client really sends.
pub fn messages_for(deliveries: u64, clients: usize) -> u64 {
    let n = clients.max(1) as u64;
    (deliveries / (n * n)).max(10)
}

/// A running server, stopped when dropped.
#[derive(Debug)]
struct Running {
    name: String,
    child: Child,
    addr: SocketAddr,
    /// The process to measure (the listener, which may be the child's child).
    pid: u32,
    log: PathBuf,
}

impl Running {
    /// SIGTERM to the whole process group, SIGKILL after a grace period.
    fn stop(&mut self) {
        let exited = |r: &mut Running| {
            matches!(r.child.try_wait(), Ok(Some(_))) && !Proc::Pid(r.pid).alive()
        };
        if exited(self) {
            return;
        }
        // The group, not just the child: a peer's shell may have children.
        // Each server leads its own group (`process_group(0)` at spawn).
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if exited(self) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file(out: &Path, name: &str) -> anyhow::Result<(File, PathBuf)> {
    let path = out.join(format!("{name}.log"));
    // Appended to: every scenario restarts the server, and its earlier
    // runs' output is worth keeping.
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((file, path))
}

/// Flags `compare` gives each of our servers itself; passed again through
/// `--server-arg` they would make the server refuse to start.
const OWN_SERVER_FLAGS: [(&str, &str); 3] = [
    ("--addr", "each server gets a fresh port"),
    ("--model", "use --models"),
    ("--threads", "use --server-threads"),
];

/// Refuses a `--server-arg` that `compare` already passes, naming the
/// option to use instead.
pub fn check_server_args(args: &[String]) -> anyhow::Result<()> {
    for arg in args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some((_, instead)) = OWN_SERVER_FLAGS.iter().find(|(own, _)| *own == flag) {
            bail!("--server-arg={arg}: compare sets {flag} itself ({instead})");
        }
    }
    Ok(())
}

/// Servers log at warn unless the user chose a level.
fn quiet_logs(command: &mut Command) {
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
}

/// Starts our server in `model` on a fresh port.
fn start_ours(opts: &CompareOptions, model: Model) -> anyhow::Result<Running> {
    let name = model.name().to_owned();
    let (log, log_path) = log_file(&opts.out, &name)?;
    let mut command = Command::new(&opts.server_bin);
    command
        .args(["--addr", "127.0.0.1:0", "--model", model.name()])
        .args(["--threads", &opts.server_threads.to_string()])
        .args(&opts.server_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    quiet_logs(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", opts.server_bin.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no stdout from the server")?;
    // Read the first line in a thread (std has no read timeout on pipes),
    // and keep draining so the server can never block writing to us.
    let (first_line, line) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = first_line.send(lines.next());
        for _ in lines {}
    });
    let mut running = Running {
        name: name.clone(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        pid,
        log: log_path,
    };
    let first = match line.recv_timeout(opts.startup_timeout) {
        Ok(Some(Ok(first))) => first,
        _ => bail!(
            "{name}: the server printed no address within {:?}; see {}",
            opts.startup_timeout,
            running.log.display()
        ),
    };
    running.addr = parse_listening_line(&first)
        .with_context(|| format!("{name}: unexpected first line {first:?}"))?;
    Ok(running)
}

/// The address in our server's banner (see [`chat_wire::banner`]).
fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    chat_wire::banner::parse(line)?.0.parse().ok()
}

/// Starts a peer under `sh -c` and waits until it accepts connections.
fn start_peer(opts: &CompareOptions, peer: &PeerSpec) -> anyhow::Result<Running> {
    let (addr, command) = match &peer.addr {
        Some(addr) => {
            let addr = resolve_loopback(addr).with_context(|| format!("peer {}", peer.name))?;
            // Allow the previous instance (stopped a moment ago) to let go.
            let deadline = Instant::now() + Duration::from_secs(3);
            while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                let holder = proc::listener_pid(addr.port())
                    .map_or(String::new(), |pid| format!(" (pid {pid})"));
                bail!(
                    "peer {}: {addr} is already in use{holder}; stop whatever listens there first, \
                     or the tool would measure it instead",
                    peer.name
                );
            }
            (addr, peer.command.clone())
        }
        None => {
            let port = TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .context("cannot find a free port")?
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let command = peer
                .command
                .replace("{port}", &port.to_string())
                .replace("{addr}", &addr.to_string());
            (addr, command)
        }
    };
    let (log, log_path) = log_file(&opts.out, &peer.name)?;
    let log_err = log.try_clone().context("duplicating a log file")?;
    let mut sh = Command::new("sh");
    sh.args(["-c", &command])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    quiet_logs(&mut sh);
    let child = sh
        .spawn()
        .with_context(|| format!("peer {}: cannot run sh -c {command:?}", peer.name))?;
    let shell = child.id();
    let mut running = Running {
        name: peer.name.clone(),
        child,
        addr,
        pid: shell,
        log: log_path,
    };
    let deadline = Instant::now() + opts.startup_timeout;
    loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            bail!(
                "peer {}: `{command}` exited ({status}) before accepting connections on {addr}; see {}",
                peer.name,
                running.log.display()
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "peer {}: nothing accepted connections on {addr} within {:?}; see {}",
                peer.name,
                opts.startup_timeout,
                running.log.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    match proc::listener_pid(addr.port()) {
        Some(pid) if proc::descends_from(pid, shell) => running.pid = pid,
        Some(pid) => bail!(
            "peer {}: {addr} is held by pid {pid}, which is not the peer we started",
            peer.name
        ),
        None => eprintln!(
            "chat-load: peer {}: cannot see which process listens on {addr}; measuring the shell's pid {shell}",
            peer.name
        ),
    }
    Ok(running)
}

/// One cell of the comparison: a scenario run against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `fanout n=100`, `rate n=500`, ...
    pub label: String,
    pub scenario: Scenario,
    pub clients: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One server's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub server: String,
    /// How it was started.
    pub command: String,
    pub cells: Vec<Cell>,
}

/// The whole comparison, as written to `compare.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub machine: Machine,
    pub rows: Vec<Row>,
}

/// Where the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub tool_threads: usize,
    /// Worker threads of each of our servers.
    pub server_threads: usize,
}

impl Machine {
    fn here(opts: &CompareOptions) -> Machine {
        Machine {
            cpus: cpus(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            tool_threads: opts.threads,
            server_threads: opts.server_threads,
        }
    }
}

/// The scenario runs `compare` makes against every server.
fn plan(opts: &CompareOptions) -> Vec<(String, Scenario, usize)> {
    let mut runs = Vec::new();
    for &scenario in &opts.scenarios {
        match scenario {
            Scenario::Fanout => {
                for &n in &opts.clients {
                    runs.push((format!("fanout n={n}"), scenario, n));
                }
            }
            Scenario::Rate => runs.push((
                format!("rate n={}", opts.rate_clients),
                scenario,
                opts.rate_clients,
            )),
            Scenario::Idle => runs.push((
                format!("idle n={}", opts.idle_clients),
                scenario,
                opts.idle_clients,
            )),
            other => {
                let n = other.defaults().clients;
                runs.push((format!("{} n={n}", other.name()), other, n));
            }
        }
    }
    runs
}

fn options_for(opts: &CompareOptions, server: &Running, scenario: Scenario, n: usize) -> Options {
    let mut o = Options::new(scenario, server.addr);
    o.target = server.name.clone();
    o.clients = n;
    o.server_pid = Some(server.pid);
    o.threads = opts.threads;
    o.progress = opts.progress;
    o.drain = opts.drain;
    match scenario {
        Scenario::Fanout => {
            o.messages = opts
                .messages
                .unwrap_or_else(|| messages_for(opts.deliveries, n));
            o.window = opts.window;
            o.size = opts.size;
            o.duration = opts.fanout_timeout;
        }
        Scenario::Rate => {
            o.rate = opts.rate;
            o.duration = opts.rate_duration;
            o.size = opts.size;
        }
        _ => {}
    }
    o
}

/// A server `compare` knows how to start.
#[derive(Debug, Clone)]
enum Spec {
    Ours(Model),
    Peer(PeerSpec),
}

impl Spec {
    fn name(&self) -> &str {
        match self {
            Spec::Ours(model) => model.name(),
            Spec::Peer(peer) => &peer.name,
        }
    }

    fn start(&self, opts: &CompareOptions) -> anyhow::Result<Running> {
        let server = match self {
            Spec::Ours(model) => start_ours(opts, *model)?,
            Spec::Peer(peer) => start_peer(opts, peer)?,
        };
        if opts.progress {
            eprintln!(
                "chat-load: started {} on {} (pid {})",
                server.name, server.addr, server.pid
            );
        }
        Ok(server)
    }

    fn command(&self, opts: &CompareOptions) -> String {
        match self {
            Spec::Ours(model) => format!(
                "{} --addr 127.0.0.1:0 --model {} --threads {}{}",
                opts.server_bin.display(),
                model.name(),
                opts.server_threads,
                opts.server_args
                    .iter()
                    .map(|a| format!(" {a}"))
                    .collect::<String>()
            ),
            Spec::Peer(peer) => peer.command.clone(),
        }
    }
}

/// Runs every scenario against a fresh instance of `spec`: one run's heap,
/// queues or stall must not colour the next one's figures (the idle
/// scenario's "RSS before" especially).
async fn run_all(
    opts: &CompareOptions,
    spec: &Spec,
    runs: &[(String, Scenario, usize)],
) -> Vec<Cell> {
    let mut cells = Vec::new();
    for (label, scenario, n) in runs {
        let cell = |report, error| Cell {
            label: label.clone(),
            scenario: *scenario,
            clients: *n,
            report,
            error,
        };
        let server = match spec.start(opts) {
            Ok(server) => server,
            Err(err) => {
                // It would fail the same way for the rest: say so once.
                eprintln!("chat-load: {}: cannot start: {err:#}", spec.name());
                let error = format!("cannot start: {err:#}");
                for (label, scenario, n) in &runs[cells.len()..] {
                    cells.push(Cell {
                        label: label.clone(),
                        scenario: *scenario,
                        clients: *n,
                        report: None,
                        error: Some(error.clone()),
                    });
                }
                break;
            }
        };
        eprintln!("chat-load: {}: {label}", server.name);
        let options = options_for(opts, &server, *scenario, *n);
        match scenario::run(*scenario, &options).await {
            Ok(report) => {
                eprintln!("chat-load: {}: {label}: {}", server.name, summary(&report));
                cells.push(cell(Some(report), None));
            }
            Err(err) => {
                eprintln!("chat-load: {}: {label} failed: {err:#}", server.name);
                cells.push(cell(None, Some(format!("{err:#}"))));
            }
        }
        if !Proc::Pid(server.pid).alive() {
            eprintln!(
                "chat-load: {} exited during {label}; see {}",
                server.name,
                server.log.display()
            );
        }
        // Stopped here, before the next one starts on the same port.
        drop(server);
    }
    cells
}

/// One line for the progress log.
fn summary(report: &Report) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &report.deliveries {
        parts.push(format!(
            "{} deliveries/s, lost {}, order violations {}",
            report::si(d.per_s),
            d.lost,
            d.order_violations
        ));
    }
    if let Some(c) = &report.churn {
        parts.push(format!("{} cycles/s", report::si(c.per_s)));
    }
    if let Some(l) = &report.latency_us {
        parts.push(format!("p99 {}", report::micros(l.p99)));
    }
    if let Some(idle) = &report.idle {
        if let Some(per) = idle.per_connection_kib {
            parts.push(format!("{per:.2} KiB per idle connection once settled"));
        }
        if let Some(held) = idle.per_connection_held_kib {
            parts.push(format!("{held:.2} KiB after holding"));
        }
    }
    if !report.complete {
        parts.push("INCOMPLETE".to_owned());
    }
    parts.join(", ")
}

/// Runs the comparison and writes its files; returns it for printing.
pub async fn compare(opts: &CompareOptions) -> anyhow::Result<Comparison> {
    fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    if opts.models.is_empty() && opts.peers.is_empty() {
        bail!("nothing to compare: give --models and/or --peer");
    }
    for peer in &opts.peers {
        if let Some(addr) = &peer.addr {
            eprintln!(
                "chat-load: note: peer {} needs {addr} free while it runs",
                peer.name
            );
        }
    }
    let runs = plan(opts);
    let specs = opts
        .models
        .iter()
        .map(|&model| Spec::Ours(model))
        .chain(opts.peers.iter().cloned().map(Spec::Peer));
    let mut rows = Vec::new();
    for spec in specs {
        // A fresh log per compare run (then appended to per scenario).
        let _ = fs::remove_file(opts.out.join(format!("{}.log", spec.name())));
        let cells = run_all(opts, &spec, &runs).await;
        rows.push(Row {
            server: spec.name().to_owned(),
            command: spec.command(opts),
            cells,
        });
    }
    let comparison = Comparison {
        machine: Machine::here(opts),
        rows,
    };
    write_files(opts, &comparison)?;
    Ok(comparison)
}

/// The columns a scenario contributes, and how to fill them from a report.
type Column = (String, fn(&Report) -> String);

fn columns(scenario: Scenario) -> Vec<Column> {
    fn per_s(r: &Report) -> String {
        r.deliveries
            .as_ref()
            .map_or("-".into(), |d| report::si(d.per_s))
    }
    fn p50(r: &Report) -> String {
        r.latency_us
            .as_ref()
            .map_or("-".into(), |l| report::micros(l.p50))
    }
    fn p99(r: &Report) -> String {
        r.latency_us
            .as_ref()
            .map_or("-".into(), |l| report::micros(l.p99))
    }
    fn p999(r: &Report) -> String {
        r.latency_us
            .as_ref()
            .map_or("-".into(), |l| report::micros(l.p999))
    }
    fn cpu(r: &Report) -> String {
        r.server
            .as_ref()
            .and_then(|s| s.cpu_ns_per_delivery)
            .map_or("-".into(), |ns| format!("{ns:.0} ns"))
    }
    fn lost(r: &Report) -> String {
        r.deliveries.as_ref().map_or("-".into(), |d| {
            let mut cell = format!("{}/{}", d.lost, d.order_violations);
            if d.pending + d.unsent > 0 {
                // Cut by the time bound; the notes say how much was left.
                cell.push_str(" (cut)");
            }
            cell
        })
    }
    fn offered(r: &Report) -> String {
        r.deliveries
            .as_ref()
            .and_then(|d| d.offered_per_s)
            .map_or("-".into(), report::si)
    }
    fn idle_kib(r: &Report, figure: fn(&report::Idle) -> Option<f64>) -> String {
        r.idle
            .as_ref()
            .and_then(figure)
            .map_or("-".into(), |k| format!("{k:.2} KiB"))
    }
    fn kib(r: &Report) -> String {
        idle_kib(r, |i| i.per_connection_kib)
    }
    fn kib_held(r: &Report) -> String {
        idle_kib(r, |i| i.per_connection_held_kib)
    }
    fn rss(r: &Report) -> String {
        r.idle
            .as_ref()
            .and_then(|i| i.rss_settled_kib)
            .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
    }
    fn cycles(r: &Report) -> String {
        r.churn.as_ref().map_or("-".into(), |c| report::si(c.per_s))
    }
    fn cycle_cpu(r: &Report) -> String {
        r.server
            .as_ref()
            .and_then(|s| s.cpu_ns_per_cycle)
            .map_or("-".into(), |ns| format!("{:.1} µs", ns / 1000.0))
    }
    fn slow_cut(r: &Report) -> String {
        r.slow
            .as_ref()
            .map_or("-".into(), |s| match s.disconnected_after_s {
                Some(t) => format!("after {t:.2} s"),
                None => "never".into(),
            })
    }
    fn done(r: &Report) -> String {
        if r.complete {
            "yes".into()
        } else {
            let d = r.deliveries.as_ref();
            d.map_or("no".into(), |d| {
                format!("stalled at {}", report::si(d.delivered as f64))
            })
        }
    }
    let c = |name: &str, f: fn(&Report) -> String| (name.to_owned(), f);
    match scenario {
        Scenario::Fanout => vec![
            c("del/s", per_s),
            c("p99", p99),
            c("CPU/del", cpu),
            c("lost/viol", lost),
        ],
        Scenario::Rate => vec![
            c("offered/s", offered),
            c("del/s", per_s),
            c("p50", p50),
            c("p99", p99),
            c("p99.9", p999),
            c("CPU/del", cpu),
            c("lost/viol", lost),
        ],
        Scenario::Idle => vec![
            c("KiB/conn settled", kib),
            c("KiB/conn held", kib_held),
            c("RSS settled", rss),
        ],
        Scenario::Churn => vec![
            c("cycles/s", cycles),
            c("CPU/cycle", cycle_cpu),
            c("join p99", p99),
        ],
        Scenario::Slow => vec![
            c("del/s", per_s),
            c("slow cut", slow_cut),
            c("done", done),
            c("lost/viol", lost),
        ],
    }
}

/// The side-by-side table as Markdown (which also reads well in a terminal).
pub fn table(comparison: &Comparison) -> String {
    // Column order: the cells' order in the first row that has them.
    let mut headers: Vec<String> = vec!["server".into()];
    let mut grid: Vec<Vec<String>> = Vec::new();
    let mut order: Vec<String> = Vec::new();
    for row in &comparison.rows {
        for cell in &row.cells {
            if !order.contains(&cell.label) {
                order.push(cell.label.clone());
            }
        }
    }
    let mut scenario_of: BTreeMap<&str, Scenario> = BTreeMap::new();
    for row in &comparison.rows {
        for cell in &row.cells {
            scenario_of.insert(cell.label.as_str(), cell.scenario);
        }
    }
    for label in &order {
        if let Some(&scenario) = scenario_of.get(label.as_str()) {
            for (name, _) in columns(scenario) {
                headers.push(format!("{label} {name}"));
            }
        }
    }
    for row in &comparison.rows {
        let mut line = vec![row.server.clone()];
        for label in &order {
            let Some(&scenario) = scenario_of.get(label.as_str()) else {
                continue;
            };
            let cell = row.cells.iter().find(|c| &c.label == label);
            for (_, value) in columns(scenario) {
                line.push(match cell {
                    Some(Cell {
                        report: Some(r), ..
                    }) => value(r),
                    Some(Cell { error: Some(_), .. }) => "error".into(),
                    _ => "-".into(),
                });
            }
        }
        grid.push(line);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            grid.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([headers[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        out.push('|');
        for (i, cell) in cells.iter().enumerate() {
            let _ = write!(out, " {cell:<w$} |", w = widths[i]);
        }
        out.push('\n');
    };
    line(&headers, &mut out);
    out.push('|');
    for w in &widths {
        let _ = write!(out, "{}|", "-".repeat(w + 2));
    }
    out.push('\n');
    for row in &grid {
        line(row, &mut out);
    }
    out
}

fn write_files(opts: &CompareOptions, comparison: &Comparison) -> anyhow::Result<()> {
    let md_path = opts.out.join("compare.md");
    let mut md = String::new();
    let m = &comparison.machine;
    let _ = writeln!(
        md,
        "# chat-load compare\n\n{} CPUs, Linux {}, chat-load on {} worker thread(s), \
         our servers on {} each (peers as their commands say); \
         del/s = deliveries per second (one message received by one client), \
         CPU/del = server CPU time per delivery, lost/viol = lost deliveries / order violations, \
         KiB/conn = server RSS per idle connection, settled = as the last arrival announcement \
         was delivered, held = after holding the connections open for --hold more, \
         (cut) = the time bound ended the run before everything was delivered (see the notes).\n",
        m.cpus, m.kernel, m.tool_threads, m.server_threads
    );
    md.push_str(&table(comparison));
    md.push_str("\n## Servers\n\n");
    for row in &comparison.rows {
        let _ = writeln!(md, "- `{}`: `{}`", row.server, row.command);
        for cell in &row.cells {
            if let Some(err) = &cell.error {
                let _ = writeln!(md, "  - {} failed: {err}", cell.label);
            }
            if let Some(r) = &cell.report {
                for note in &r.notes {
                    let _ = writeln!(md, "  - {}: {note}", cell.label);
                }
            }
        }
    }
    fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;

    let json_path = opts.out.join("compare.json");
    let json = serde_json::to_string_pretty(comparison).context("serialising the comparison")?;
    fs::write(&json_path, json).with_context(|| format!("cannot write {}", json_path.display()))?;

    let (throughput, p99) = fanout_series(comparison);
    if throughput.iter().any(|s| !s.points.is_empty()) {
        plot::write_svg(&opts.out.join("compare.svg"), &throughput, &p99)?;
    }
    Ok(())
}

/// Deliveries/s and p99 (ms) against n, per server, from the fanout cells.
fn fanout_series(comparison: &Comparison) -> (Vec<Series>, Vec<Series>) {
    let mut throughput = Vec::new();
    let mut p99 = Vec::new();
    for row in &comparison.rows {
        let mut t = Vec::new();
        let mut l = Vec::new();
        for cell in row.cells.iter().filter(|c| c.scenario == Scenario::Fanout) {
            let Some(report) = &cell.report else { continue };
            if let Some(d) = &report.deliveries {
                t.push((cell.clients as f64, d.per_s));
            }
            if let Some(lat) = &report.latency_us {
                l.push((cell.clients as f64, lat.p99 as f64 / 1000.0));
            }
        }
        throughput.push(Series {
            name: row.server.clone(),
            points: t,
        });
        p99.push(Series {
            name: row.server.clone(),
            points: l,
        });
    }
    (throughput, p99)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_server_args_compare_sets_itself() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert!(check_server_args(&args(&["--queue", "mpsc", "--slow-client=drop"])).is_ok());
        for own in [
            &["--threads", "2"][..],
            &["--model=locked"],
            &["--addr", "x"],
        ] {
            let err = check_server_args(&args(own)).unwrap_err().to_string();
            assert!(err.contains("compare sets"), "{own:?}: {err}");
        }
        let err = check_server_args(&args(&["--threads=1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--server-threads"), "{err}");
    }

    #[test]
    fn parses_peer_specs() {
        let seed: PeerSpec = "seed@127.0.0.1:8000=/tmp/gopl-chat-server".parse().unwrap();
        assert_eq!(seed.name, "seed");
        assert_eq!(seed.addr.as_deref(), Some("127.0.0.1:8000"));
        assert_eq!(seed.command, "/tmp/gopl-chat-server");
        let ported: PeerSpec = "x=./server --listen {addr} --flag=1".parse().unwrap();
        assert_eq!(ported.addr, None);
        assert_eq!(ported.command, "./server --listen {addr} --flag=1");
        assert!(
            "x=./server".parse::<PeerSpec>().is_err(),
            "no way to find its port"
        );
        assert!("=cmd {port}".parse::<PeerSpec>().is_err());
        assert!("x@=cmd".parse::<PeerSpec>().is_err());
        assert!("nothing".parse::<PeerSpec>().is_err());
    }

    #[test]
    fn reads_our_servers_address_line() {
        assert_eq!(
            parse_listening_line("chat-server listening on 127.0.0.1:4242 (model sharded)"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4242)))
        );
        assert_eq!(parse_listening_line("hello"), None);
    }

    #[test]
    fn sizes_fanout_points_to_a_delivery_budget() {
        assert_eq!(messages_for(10_000_000, 10), 100_000);
        assert_eq!(messages_for(10_000_000, 100), 1000);
        assert_eq!(messages_for(10_000_000, 1000), 10);
        assert_eq!(messages_for(10_000_000, 100_000), 10);
    }

    #[test]
    fn tables_one_row_per_server() {
        let mut report = Report::new("fanout", "sharded".into(), Default::default());
        report.deliveries = Some(report::Deliveries {
            per_s: 5e6,
            ..Default::default()
        });
        let cell = |r: Option<Report>| Cell {
            label: "fanout n=10".into(),
            scenario: Scenario::Fanout,
            clients: 10,
            error: r.is_none().then(|| "boom".into()),
            report: r,
        };
        let comparison = Comparison {
            machine: Machine {
                cpus: 2,
                kernel: "6.18".into(),
                tool_threads: 1,
                server_threads: 1,
            },
            rows: vec![
                Row {
                    server: "sharded".into(),
                    command: "x".into(),
                    cells: vec![cell(Some(report))],
                },
                Row {
                    server: "seed".into(),
                    command: "y".into(),
                    cells: vec![cell(None)],
                },
            ],
        };
        let table = table(&comparison);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("fanout n=10 del/s"));
        assert!(lines[2].starts_with("| sharded") && lines[2].contains("5.00 M"));
        assert!(lines[3].contains("error"));
        let (throughput, _) = fanout_series(&comparison);
        assert_eq!(throughput[0].points, vec![(10.0, 5e6)]);
        assert!(throughput[1].points.is_empty());
    }
}
