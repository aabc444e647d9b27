//! The five scenarios, and the coordinator each one runs: connect the
//! clients, let the arrival announcements settle, start everyone at once,
//! watch progress, stop within the time bounds, and turn what the clients
//! counted into a [`Report`].
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

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::client::{
    self, new_histogram, run_client, run_counter, ClientResult, Conn, CounterShared, End, Plan,
    Receiver, RecvCounts, Shared, COUNTER_CHUNK, READ_CHUNK,
};
use super::payload::{now_ns, ns_since_origin, Codec, Payload};
use super::proc::{self, Proc};
use super::report::{self, Churn, Deliveries, Idle, Latency, Params, Report, ServerUsage, Slow};

/// What the server sends a client it drops for being slow (our server's wording).
const TOO_SLOW: &[u8] = b"error: disconnected: too slow";

/// How long arrival announcements may go without progress before the tool
/// stops waiting for the rest (the seed can lose some; see `settle`).
const SETTLE_QUIET: Duration = Duration::from_secs(1);

/// How often the coordinator looks at the counters.
const POLL: Duration = Duration::from_millis(2);

/// The five ways of loading a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
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
}

/// A scenario's defaults for the options left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
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
        }
    }

    /// `messages` is cycles for churn (0: as many as `duration` allows);
    /// `window` is concurrent churners for churn; `duration` caps sending.
    pub fn defaults(self) -> Defaults {
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
        }
    }
}

/// Everything a scenario needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub addr: SocketAddr,
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
    /// Give up waiting for what is in flight after this long without progress.
    pub drain: Duration,
    /// How long idle connections stay open after settling.
    pub hold: Duration,
    pub server_pid: Option<u32>,
    /// Worker threads of the tool's runtime (for the report).
    pub threads: usize,
    /// Print progress lines on stderr.
    pub progress: bool,
}

impl Options {
    /// Options with `scenario`'s defaults.
    pub fn new(scenario: Scenario, addr: SocketAddr) -> Options {
        let d = scenario.defaults();
        Options {
            addr,
            target: addr.to_string(),
            clients: d.clients,
            messages: d.messages,
            size: d.size,
            window: d.window,
            rate: d.rate,
            duration: d.duration,
            drain: Duration::from_secs(2),
            hold: Duration::from_secs(1),
            server_pid: None,
            threads: 2,
            progress: true,
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
    match scenario {
        Scenario::Fanout => exchange(opts, false).await,
        Scenario::Slow => exchange(opts, true).await,
        Scenario::Rate => rate(opts).await,
        Scenario::Churn => churn(opts).await,
        Scenario::Idle => idle(opts).await,
    }
}

fn params(opts: &Options) -> Params {
    Params {
        clients: opts.clients,
        size: opts.size,
        threads: opts.threads,
        ..Params::default()
    }
}

/// Prints a progress line on stderr every second once a run is past two seconds.
struct Progress {
    enabled: bool,
    start: Instant,
    next: Instant,
    last_value: u64,
    last_at: Instant,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            start: now,
            next: now + Duration::from_secs(2),
            last_value: 0,
            last_at: now,
        }
    }

    /// `what` is a count; the line shows it and its rate over the last second.
    fn tick(&mut self, what: &str, value: u64, extra: impl FnOnce() -> String) {
        let now = Instant::now();
        if !self.enabled || now < self.next {
            return;
        }
        let rate = (value - self.last_value.min(value)) as f64
            / now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        eprintln!(
            "chat-load: [{:6.1}s] {what} {} ({}/s){}",
            now.duration_since(self.start).as_secs_f64(),
            value,
            report::si(rate),
            extra()
        );
        self.last_value = value;
        self.last_at = now;
        self.next = now + Duration::from_secs(1);
    }
}

/// Server and tool CPU at the start of a measured interval.
struct Meter {
    start: Instant,
    server: Option<(u32, u64)>,
    tool_ns: u64,
}

/// Server and tool resources over a measured interval.
struct Measured {
    /// Pid, CPU nanoseconds used, memory at the end.
    server: Option<(u32, u64, proc::Memory)>,
    tool_cpu_s: f64,
}

impl Meter {
    fn start(pid: Option<u32>) -> anyhow::Result<Meter> {
        let server = match pid {
            Some(pid) => Some((
                pid,
                Proc::Pid(pid)
                    .cpu_ns()
                    .with_context(|| format!("--server-pid {pid}"))?,
            )),
            None => None,
        };
        Ok(Meter {
            start: Instant::now(),
            server,
            tool_ns: Proc::Myself.cpu_ns().unwrap_or(0),
        })
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Samples the end of the interval; a server that cannot be read any
    /// more (it exited) becomes a note rather than an error.
    fn finish(&self, notes: &mut Vec<String>) -> Measured {
        let tool_ns = Proc::Myself
            .cpu_ns()
            .unwrap_or(0)
            .saturating_sub(self.tool_ns);
        let server = self.server.and_then(|(pid, before)| {
            let p = Proc::Pid(pid);
            match (p.cpu_ns(), p.memory()) {
                (Ok(after), Ok(memory)) => Some((pid, after.saturating_sub(before), memory)),
                (Err(err), _) | (_, Err(err)) => {
                    notes.push(format!("server pid {pid} could not be measured: {err:#}"));
                    None
                }
            }
        });
        Measured {
            server,
            tool_cpu_s: tool_ns as f64 / 1e9,
        }
    }
}

impl Measured {
    /// The server's usage, with per-delivery figures for `deliveries`.
    fn usage(&self, deliveries: Option<u64>) -> Option<ServerUsage> {
        self.server
            .map(|(pid, cpu_ns, memory)| ServerUsage::new(pid, cpu_ns, memory, deliveries))
    }
}

/// Waits until `current()` reaches `expected`, or stops changing for
/// `quiet`. Returns `None` once reached, or the count it settled at.
///
/// The stall rule exists for the Go seed, where a newcomer's arrival can be
/// broadcast before the previous client has joined the broadcaster's set,
/// so that client never hears of it: the total then stops just short.
async fn settle(current: impl Fn() -> u64, expected: u64, quiet: Duration) -> Option<u64> {
    let mut last = current();
    let mut last_change = Instant::now();
    loop {
        let now = current();
        if now >= expected {
            return None;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= quiet {
            return Some(now);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Arrival announcements `n` clients connected one after another are due:
/// client i hears of the n-1-i that come after it.
fn arrivals_due(n: usize) -> u64 {
    n as u64 * (n as u64).saturating_sub(1) / 2
}

/// Waits until the clients have heard every arrival announcement (`heard`
/// counts them), noting in the report if the count stopped short.
async fn settle_arrivals(report: &mut Report, n: usize, heard: impl Fn() -> u64) {
    let due = arrivals_due(n);
    if let Some(got) = settle(heard, due, SETTLE_QUIET).await {
        report.notes.push(format!(
            "arrival announcements settled at {got} of {due}: some clients never heard of some arrivals"
        ));
    }
}

/// [`settle_arrivals`], then a short pause that lets a server whose
/// greeting precedes its join (the seed) finish joining the last client
/// before anyone sends.
async fn settle_before_sending(report: &mut Report, n: usize, heard: impl Fn() -> u64) {
    settle_arrivals(report, n, heard).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Connects client `i` of `n` with context for the error.
async fn connect_one(addr: SocketAddr, i: usize, n: usize, buffer: usize) -> anyhow::Result<Conn> {
    client::connect(addr, buffer)
        .await
        .with_context(|| format!("client {} of {n}", i + 1))
}

/// Merged results of a set of clients.
#[derive(Default)]
struct Merged {
    counts: RecvCounts,
    sent: u64,
    latency: Option<Histogram<u64>>,
    closed: usize,
    failed: Vec<String>,
    last_delivery_ns: u64,
    watched_left_ns: Option<u64>,
}

async fn collect(handles: Vec<JoinHandle<ClientResult>>) -> Merged {
    let mut merged = Merged {
        latency: Some(new_histogram()),
        ..Merged::default()
    };
    for handle in handles {
        let result = match handle.await {
            Ok(result) => result,
            Err(err) => {
                merged.failed.push(format!("client task: {err}"));
                continue;
            }
        };
        let r = &result.receiver;
        merged.counts.add(&r.counts);
        merged.sent += u64::from(result.sent);
        if let Some(latency) = merged.latency.as_mut() {
            // Both auto-resize, so adding cannot run out of range.
            let _ = latency.add(&r.latency);
        }
        merged.last_delivery_ns = merged.last_delivery_ns.max(r.last_delivery_ns);
        merged.watched_left_ns = match (merged.watched_left_ns, r.watched_left_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match result.end {
            End::Complete | End::Stopped => {}
            End::Closed => merged.closed += 1,
            End::Failed(err) => merged.failed.push(err),
        }
    }
    merged
}

fn connection_notes(merged: &Merged, notes: &mut Vec<String>) {
    if merged.closed > 0 {
        notes.push(format!(
            "the server closed {} client connection(s) early",
            merged.closed
        ));
    }
    if let Some(first) = merged.failed.first() {
        notes.push(format!(
            "{} client(s) failed, the first with: {first}",
            merged.failed.len()
        ));
    }
    if merged.counts.unknown_sender > 0 {
        notes.push(format!(
            "{} chat lines carried an unknown sender id",
            merged.counts.unknown_sender
        ));
    }
}

/// `fanout` and `slow`: n clients exchange m messages each with a window;
/// in `slow`, one more client connected first never reads.
async fn exchange(opts: &Options, with_slow: bool) -> anyhow::Result<Report> {
    let n = opts.clients;
    let m = u32::try_from(opts.messages).context("-m is too large")?;
    let codec = Codec::for_this_run(opts.size)?;
    let scenario = if with_slow { "slow" } else { "fanout" };
    let mut report = Report::new(
        scenario,
        opts.target.clone(),
        Params {
            messages: Some(opts.messages),
            window: Some(opts.window),
            duration_s: Some(opts.duration.as_secs_f64()),
            ..params(opts)
        },
    );
    if opts.window == 0 {
        bail!("--window must be at least 1");
    }
    proc::ensure_open_files(n as u64 + 64)?;

    // Connected before the others, so it is registered when they arrive and
    // every line they exchange is queued for it too.
    let mut slow = match with_slow {
        true => Some(
            client::connect(opts.addr, 4096)
                .await
                .context("the slow client")?,
        ),
        false => None,
    };

    let shared = Arc::new(Shared::default());
    // Whatever happens (an error, Ctrl-C), the clients stop with us.
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let mut handles = Vec::with_capacity(n);
    let expect = n as u64 * u64::from(m);
    for i in 0..n {
        let conn = connect_one(opts.addr, i, n, READ_CHUNK).await?;
        let mut receiver = Receiver::new(i as u32, n, codec.clone());
        if let Some(slow) = &slow {
            receiver.watch_departure_of(&slow.who);
        }
        let plan = Plan {
            id: i as u32,
            messages: m,
            window: opts.window,
            expect,
        };
        handles.push(tokio::spawn(run_client(
            conn,
            plan,
            receiver,
            codec.clone(),
            shared.clone(),
        )));
    }
    settle_before_sending(&mut report, n, || shared.arrivals.load(Relaxed)).await;

    let meter = Meter::start(opts.server_pid)?;
    let t0 = Instant::now();
    let t0_ns = ns_since_origin(t0);
    shared.start.cancel();

    let mut progress = Progress::new(opts.progress);
    let mut last_delivered = 0;
    let mut last_progress = Instant::now();
    let ending = loop {
        tokio::time::sleep(POLL).await;
        let delivered = shared.delivered.load(Relaxed);
        let sent = shared.sent.load(Relaxed);
        if shared.finished.load(Relaxed) >= n {
            // Everyone is done, or gone: complete unless some ended early.
            break if delivered >= sent * n as u64 {
                Ending::Complete
            } else {
                Ending::Stalled
            };
        }
        let now = Instant::now();
        progress.tick("delivered", delivered, || {
            format!(", sent {sent} of {}", n as u64 * u64::from(m))
        });
        if delivered != last_delivered {
            last_delivered = delivered;
            last_progress = now;
        }
        if now.duration_since(t0) >= opts.duration {
            break Ending::TimeBound {
                stalled: now.duration_since(last_progress) >= opts.drain,
            };
        }
        // A stall ends a fanout early; in `slow` a stall is what is being
        // measured (a server may recover when it drops the slow client), so
        // there only the time bound ends the run.
        if !with_slow && now.duration_since(last_progress) >= opts.drain {
            break Ending::Stalled;
        }
    };
    let gave_up_ns = now_ns();
    let measured = meter.finish(&mut report.notes);
    shared.stop.cancel();
    let merged = collect(handles).await;

    let end_ns = match ending {
        Ending::Complete => merged.last_delivery_ns,
        _ => gave_up_ns,
    };
    let elapsed = (end_ns.saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    // n clients send m each: the messages planned equal one receiver's `expect`.
    fill_deliveries(&mut report, &merged, n, expect, elapsed, None, ending);
    report.complete = ending == Ending::Complete;
    report.server = measured.usage(Some(merged.counts.delivered));
    report.tool_cpu_s = measured.tool_cpu_s;
    connection_notes(&merged, &mut report.notes);
    ending_note(&mut report, ending, opts, expect * n as u64);
    if let Some(slow) = slow.take() {
        report.slow = Some(slow_client_fate(slow, merged.watched_left_ns, t0_ns, opts.drain).await);
    }
    Ok(report)
}

/// How a run's measured interval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Everything expected arrived.
    Complete,
    /// Nothing arrived for `--drain`: what is missing is lost.
    Stalled,
    /// The time bound cut the run: what is missing was still pending
    /// (`stalled` if nothing had arrived for `--drain` by then either).
    TimeBound { stalled: bool },
}

/// Says how an incomplete run ended, in the words a reader needs.
fn ending_note(report: &mut Report, ending: Ending, opts: &Options, planned_deliveries: u64) {
    let Some(d) = report.deliveries.clone() else {
        return;
    };
    let elapsed = report.elapsed_s;
    let note = match ending {
        Ending::Complete => return,
        Ending::Stalled => format!(
            "nothing arrived for {:.1} s: gave up after {elapsed:.1} s with {} deliveries lost",
            opts.drain.as_secs_f64(),
            d.lost
        ),
        Ending::TimeBound { stalled } => format!(
            "{}{} of {planned_deliveries} deliveries in {elapsed:.1} s, then the time bound \
             (--duration {}) ended the run with {} deliveries pending and {} messages unsent",
            if stalled { "stalled: " } else { "" },
            d.delivered,
            opts.duration.as_secs_f64(),
            d.pending,
            d.unsent,
        ),
    };
    report.notes.push(note);
}

/// Fills the deliveries and latency sections; `planned` is the messages
/// the clients were to send in all.
fn fill_deliveries(
    report: &mut Report,
    merged: &Merged,
    receivers: usize,
    planned_messages: u64,
    elapsed: f64,
    offered_per_s: Option<f64>,
    ending: Ending,
) {
    let expected = merged.sent * receivers as u64;
    let delivered = merged.counts.delivered;
    let missing = expected.saturating_sub(delivered);
    let cut = matches!(ending, Ending::TimeBound { .. });
    report.elapsed_s = elapsed;
    report.deliveries = Some(Deliveries {
        sent: merged.sent,
        unsent: planned_messages.saturating_sub(merged.sent),
        expected,
        delivered,
        lost: if cut { 0 } else { missing },
        pending: if cut { missing } else { 0 },
        order_violations: merged.counts.order_violations,
        per_s: delivered as f64 / elapsed,
        offered_per_s,
    });
    report.latency_us = merged.latency.as_ref().and_then(Latency::of);
}

/// Reads what the never-reading client has waiting, bounded in time, to
/// see how its connection ended.
async fn slow_client_fate(conn: Conn, left_ns: Option<u64>, t0_ns: u64, within: Duration) -> Slow {
    let Conn { mut stream, .. } = conn;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut bytes = 0u64;
    let mut saw_notice = false;
    // The notice may straddle two reads: keep the tail of the previous one.
    let mut tail: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + within.max(Duration::from_secs(1));
    let state = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break "still connected",
            Ok(Ok(0)) => break "closed",
            Ok(Ok(read)) => {
                bytes += read as u64;
                tail.extend_from_slice(&buf[..read]);
                if memchr::memmem::find(&tail, TOO_SLOW).is_some() {
                    saw_notice = true;
                }
                let keep = tail.len().min(TOO_SLOW.len());
                tail.drain(..tail.len() - keep);
            }
            Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Ok(Err(_)) => break "read error",
        }
    };
    Slow {
        disconnected_after_s: left_ns.map(|ns| ns.saturating_sub(t0_ns) as f64 / 1e9),
        final_state: if saw_notice {
            format!("{state} after the too-slow notice")
        } else {
            state.to_owned()
        },
        bytes_buffered: bytes,
    }
}

/// What the pacer thread did.
struct Paced {
    sent: u64,
    lag: Histogram<u64>,
    stalls: u64,
    errors: Vec<String>,
}

/// The open-loop sender: one OS thread that sends every client's messages
/// at their scheduled times. A thread rather than tokio timers, whose 1 ms
/// granularity would add up to a millisecond of the tool's own lateness to
/// every latency measured from the schedule; `thread::sleep` is typically
/// within 0.1 ms. Its own lateness is recorded as "send lag".
fn pace(
    writers: Vec<std::net::TcpStream>,
    codec: Codec,
    per_client: u64,
    rate: f64,
    t0_ns: u64,
    shared: Arc<Shared>,
    abort: Arc<AtomicBool>,
) -> Paced {
    use std::io::Write;
    let n = writers.len() as u64;
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); writers.len()];
    let mut dead = vec![false; writers.len()];
    let mut paced = Paced {
        sent: 0,
        lag: new_histogram(),
        stalls: 0,
        errors: Vec::new(),
    };
    // Client i sends at t0 + (k + i/n) / rate: the whole schedule is one
    // sequence of ticks 1/(n·rate) apart, taken by the clients in turn.
    let tick_ns = 1e9 / (rate * n as f64);
    let mut line = Vec::with_capacity(codec.size() + 1);
    for tick in 0..n * per_client {
        if abort.load(Relaxed) {
            break;
        }
        let client = (tick % n) as usize;
        let due = t0_ns + (tick as f64 * tick_ns) as u64;
        let now = now_ns();
        if due > now {
            thread::sleep(Duration::from_nanos(due - now));
        }
        let _ = paced.lag.record(now_ns().saturating_sub(due) / 1000);
        if dead[client] {
            continue;
        }
        line.clear();
        codec.encode_into(
            &mut line,
            Payload {
                sender: client as u32,
                seq: (tick / n) as u32,
                sent_ns: due,
            },
        );
        let buffer = &mut pending[client];
        buffer.extend_from_slice(&line);
        match (&writers[client]).write(buffer) {
            Ok(written) => {
                buffer.drain(..written);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                dead[client] = true;
                paced.errors.push(format!("client {client}: write: {err}"));
                continue;
            }
        }
        if !buffer.is_empty() {
            // The server is not reading this client fast enough; the rest
            // goes with its next message.
            paced.stalls += 1;
        }
        paced.sent += 1;
        shared.sent.fetch_add(1, Relaxed);
    }
    // Flush what the server would not take in time, briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pending.iter().any(|p| !p.is_empty()) && Instant::now() < deadline && !abort.load(Relaxed)
    {
        for (client, buffer) in pending.iter_mut().enumerate() {
            if buffer.is_empty() || dead[client] {
                continue;
            }
            match (&writers[client]).write(buffer) {
                Ok(written) => {
                    buffer.drain(..written);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => buffer.clear(),
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    paced
}

/// `rate`: open loop at a fixed rate per client, spread evenly.
async fn rate(opts: &Options) -> anyhow::Result<Report> {
    let n = opts.clients;
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let per_client = ((opts.rate * opts.duration.as_secs_f64()).round() as u64).max(1);
    if per_client > u64::from(u32::MAX) {
        bail!("--rate × --duration is too many messages");
    }
    let codec = Codec::for_this_run(opts.size)?;
    let offered = n as f64 * n as f64 * opts.rate;
    let mut report = Report::new(
        "rate",
        opts.target.clone(),
        Params {
            rate_per_client: Some(opts.rate),
            duration_s: Some(opts.duration.as_secs_f64()),
            messages: Some(per_client),
            ..params(opts)
        },
    );
    proc::ensure_open_files(n as u64 + 64)?;

    let shared = Arc::new(Shared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let expect = n as u64 * per_client;
    let mut handles = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = connect_one(opts.addr, i, n, READ_CHUNK).await?;
        // A second handle on the same socket for the pacer thread; both
        // share the non-blocking flag, so the pacer's writes never block.
        let std_stream = conn.stream.into_std().context("detaching a socket")?;
        writers.push(std_stream.try_clone().context("duplicating a socket")?);
        conn.stream = TcpStream::from_std(std_stream).context("re-attaching a socket")?;
        let plan = Plan {
            id: i as u32,
            messages: 0,
            window: 0,
            expect,
        };
        let receiver = Receiver::new(i as u32, n, codec.clone());
        handles.push(tokio::spawn(run_client(
            conn,
            plan,
            receiver,
            codec.clone(),
            shared.clone(),
        )));
    }
    settle_before_sending(&mut report, n, || shared.arrivals.load(Relaxed)).await;

    let meter = Meter::start(opts.server_pid)?;
    // Start a little ahead so that the first ticks are not already late.
    let t0 = Instant::now() + Duration::from_millis(5);
    let t0_ns = ns_since_origin(t0);
    shared.start.cancel();
    let abort = Arc::new(AtomicBool::new(false));
    let pacer = {
        let (codec, shared, abort) = (codec.clone(), shared.clone(), abort.clone());
        let rate = opts.rate;
        thread::Builder::new()
            .name("chat-load-pacer".into())
            .spawn(move || pace(writers, codec, per_client, rate, t0_ns, shared, abort))
            .context("cannot start the pacer thread")?
    };
    // Make sure the pacer stops if we return early.
    struct AbortOnDrop(Arc<AtomicBool>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let _abort_on_exit = AbortOnDrop(abort.clone());

    let mut progress = Progress::new(opts.progress);
    let mut last_delivered = 0;
    let mut last_progress = Instant::now();
    let mut sending_done_at: Option<Instant> = None;
    let ending = loop {
        tokio::time::sleep(POLL).await;
        if shared.finished.load(Relaxed) >= n {
            break Ending::Complete;
        }
        let now = Instant::now();
        let delivered = shared.delivered.load(Relaxed);
        progress.tick("delivered", delivered, || {
            format!(", offered {}/s", report::si(offered))
        });
        if delivered != last_delivered {
            last_delivered = delivered;
            last_progress = now;
        }
        if sending_done_at.is_none() && pacer.is_finished() {
            sending_done_at = Some(now);
            last_progress = now;
        }
        if let Some(done) = sending_done_at {
            if delivered >= shared.sent.load(Relaxed) * n as u64 {
                break Ending::Complete;
            }
            if now.duration_since(last_progress) >= opts.drain {
                break Ending::Stalled;
            }
            // A backlog gets at most as long as the sending itself.
            if now.duration_since(done) >= opts.duration.max(opts.drain) {
                break Ending::TimeBound { stalled: false };
            }
        }
    };
    let gave_up_ns = now_ns();
    let measured = meter.finish(&mut report.notes);
    abort.store(true, Relaxed);
    let paced = match tokio::task::spawn_blocking(move || pacer.join()).await {
        Ok(Ok(paced)) => paced,
        _ => bail!("the pacer thread panicked"),
    };
    shared.stop.cancel();
    let mut merged = collect(handles).await;
    merged.sent = paced.sent;

    let end_ns = match ending {
        Ending::Complete => merged.last_delivery_ns,
        _ => gave_up_ns,
    };
    let elapsed = (end_ns.saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    fill_deliveries(
        &mut report,
        &merged,
        n,
        expect,
        elapsed,
        Some(offered),
        ending,
    );
    report.complete = ending == Ending::Complete && paced.sent == expect;
    ending_note(&mut report, ending, opts, expect * n as u64);
    report.send_lag_us = Latency::of(&paced.lag);
    report.server = measured.usage(Some(merged.counts.delivered));
    report.tool_cpu_s = measured.tool_cpu_s;
    if paced.stalls > 0 {
        report.notes.push(format!(
            "{} sends found the socket full: the server fell behind reading",
            paced.stalls
        ));
    }
    if let Some(first) = paced.errors.first() {
        report.notes.push(format!(
            "{} send error(s), the first: {first}",
            paced.errors.len()
        ));
    }
    if let Some(lag) = &report.send_lag_us {
        if lag.p99 > 1000 {
            report.notes.push(format!(
                "the tool sent late (send lag p99 {}): latency includes its lateness",
                report::micros(lag.p99)
            ));
        }
    }
    connection_notes(&merged, &mut report.notes);
    Ok(report)
}

/// Connects `n` lean clients that count what they are sent, with progress.
async fn connect_counters(
    opts: &Options,
    shared: &Arc<CounterShared>,
    expected_lines: u64,
) -> anyhow::Result<(Vec<JoinHandle<bool>>, Duration)> {
    let n = opts.clients;
    let mut handles = Vec::with_capacity(n);
    let mut progress = Progress::new(opts.progress);
    let start = Instant::now();
    for i in 0..n {
        let conn = connect_one(opts.addr, i, n, COUNTER_CHUNK).await?;
        handles.push(tokio::spawn(run_counter(conn, shared.clone())));
        progress.tick("connected", i as u64 + 1, || {
            format!(
                ", announcements {} of {expected_lines}",
                shared.lines.load(Relaxed)
            )
        });
    }
    Ok((handles, start.elapsed()))
}

/// `churn`: join-and-leave cycles with n idle clients present.
async fn churn(opts: &Options) -> anyhow::Result<Report> {
    let n = opts.clients;
    let concurrency = opts.window.max(1);
    let mut report = Report::new(
        "churn",
        opts.target.clone(),
        Params {
            messages: (opts.messages > 0).then_some(opts.messages),
            window: Some(concurrency),
            duration_s: Some(opts.duration.as_secs_f64()),
            ..params(opts)
        },
    );
    proc::ensure_open_files(n as u64 + u64::from(concurrency) + 64)?;
    let shared = Arc::new(CounterShared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let (handles, _) = connect_counters(opts, &shared, arrivals_due(n)).await?;
    settle_arrivals(&mut report, n, || shared.lines.load(Relaxed)).await;
    let baseline = shared.lines.load(Relaxed);

    let meter = Meter::start(opts.server_pid)?;
    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let budget = Arc::new(AtomicU64::new(if opts.messages > 0 {
        opts.messages
    } else {
        u64::MAX
    }));
    let cycles = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut churners = Vec::new();
    for _ in 0..concurrency {
        let (budget, cycles, failed) = (budget.clone(), cycles.clone(), failed.clone());
        let addr = opts.addr;
        churners.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut first_error = None;
            // Take one cycle from the budget, never wrapping below zero.
            let take = || {
                budget
                    .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(1))
                    .is_ok()
            };
            while Instant::now() < deadline && take() {
                let start = Instant::now();
                match client::connect(addr, 512).await {
                    Ok(conn) => {
                        let _ = latency.record(start.elapsed().as_micros() as u64);
                        drop(conn);
                        cycles.fetch_add(1, Relaxed);
                    }
                    Err(err) => {
                        first_error.get_or_insert_with(|| format!("{err:#}"));
                        // Bounded: a refusing server must not make us spin.
                        if failed.fetch_add(1, Relaxed) >= 1000 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latency, first_error)
        }));
    }
    let mut progress = Progress::new(opts.progress);
    while !churners.iter().all(|c| c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        progress.tick("cycles", cycles.load(Relaxed), String::new);
    }
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    let mut latency = new_histogram();
    for churner in churners {
        if let Ok((histogram, error)) = churner.await {
            let _ = latency.add(&histogram);
            if let Some(error) = error {
                report.notes.push(format!("a join failed: {error}"));
            }
        }
    }
    let cycles = cycles.load(Relaxed);
    // Every cycle owes each idle client an arrival and a departure.
    let expected = baseline + 2 * n as u64 * cycles;
    settle(|| shared.lines.load(Relaxed), expected, opts.drain).await;
    let got = shared.lines.load(Relaxed);
    let measured = meter.finish(&mut report.notes);
    shared.stop.cancel();
    let mut dropped = 0;
    for handle in handles {
        if !matches!(handle.await, Ok(true)) {
            dropped += 1;
        }
    }
    report.elapsed_s = elapsed;
    report.churn = Some(Churn {
        idle_clients: n,
        concurrency,
        cycles,
        per_s: cycles as f64 / elapsed,
        missing_announcements: expected.saturating_sub(got),
        failed_cycles: failed.load(Relaxed),
    });
    report.latency_us = Latency::of(&latency);
    report.server = measured.usage(None).map(|s| ServerUsage {
        cpu_ns_per_cycle: (cycles > 0).then(|| s.cpu_s * 1e9 / cycles as f64),
        ..s
    });
    report.tool_cpu_s = measured.tool_cpu_s;
    report.complete = got >= expected && failed.load(Relaxed) == 0;
    report
        .notes
        .push("latency is join latency: connect until the greeting arrives".to_owned());
    if dropped > 0 {
        report
            .notes
            .push(format!("the server closed {dropped} idle client(s)"));
    }
    Ok(report)
}

/// `idle`: n idle connections and the server memory they cost.
async fn idle(opts: &Options) -> anyhow::Result<Report> {
    let n = opts.clients;
    let mut report = Report::new("idle", opts.target.clone(), params(opts));
    proc::ensure_open_files(n as u64 + 64)?;
    let server = opts.server_pid.map(Proc::Pid);
    let rss = |p: Option<Proc>| -> anyhow::Result<Option<u64>> {
        p.map(|p| p.memory().map(|m| m.rss_kib)).transpose()
    };
    let rss_before = rss(server).context("--server-pid")?;
    let meter = Meter::start(opts.server_pid)?;

    let shared = Arc::new(CounterShared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let expected = n as u64 * (n as u64 - 1) / 2;
    let (handles, connect_time) = connect_counters(opts, &shared, expected).await?;
    if let Some(got) = settle(
        || shared.lines.load(Relaxed),
        expected,
        opts.drain.max(SETTLE_QUIET),
    )
    .await
    {
        report.complete = false;
        report.notes.push(format!(
            "announcements settled at {got} of {expected}: some clients never heard of some arrivals"
        ));
    }
    let settled = server
        .map(|p| p.memory())
        .transpose()
        .context("--server-pid")?;
    let elapsed = meter.elapsed().as_secs_f64();
    let measured = meter.finish(&mut report.notes);
    tokio::time::sleep(opts.hold).await;
    let rss_held = rss(server).context("--server-pid")?;
    let announcements = shared.lines.load(Relaxed);
    let dropped_while_idle = shared.lost.load(Relaxed);

    shared.stop.cancel();
    for handle in handles {
        let _ = handle.await;
    }
    // Closed; give the server a moment to process n departures.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_closed = rss(server).ok().flatten();

    let per = |after: Option<u64>| match (rss_before, after) {
        (Some(before), Some(after)) => Some((after as f64 - before as f64) / n as f64),
        _ => None,
    };
    let rss_settled = settled.map(|m| m.rss_kib);
    report.elapsed_s = elapsed;
    report.idle = Some(Idle {
        connections: n,
        connect_per_s: n as f64 / connect_time.as_secs_f64().max(1e-9),
        announcements,
        announcements_expected: expected,
        dropped: dropped_while_idle,
        rss_before_kib: rss_before,
        rss_settled_kib: rss_settled,
        rss_held_kib: rss_held,
        rss_closed_kib: rss_closed,
        per_connection_kib: per(rss_settled),
        per_connection_held_kib: per(rss_held),
        hold_s: opts.hold.as_secs_f64(),
    });
    report.server = measured.usage(Some(announcements));
    report.tool_cpu_s = measured.tool_cpu_s;
    if dropped_while_idle > 0 {
        report.complete = false;
        report.notes.push(format!(
            "the server closed {dropped_while_idle} idle connection(s)"
        ));
    }
    report.notes.push(
        "server CPU covers connecting and delivering the announcements; per delivery = per announcement"
            .to_owned(),
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_server::harness::TestServer;
    use chat_server::Config;

    fn small(scenario: Scenario, server: &TestServer) -> Options {
        let mut opts = Options::new(scenario, server.addr());
        opts.clients = 3;
        opts.progress = false;
        opts.duration = Duration::from_secs(10);
        opts
    }

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_fanout_loses_nothing() {
        let server = TestServer::start(Config::default()).unwrap();
        let mut opts = small(Scenario::Fanout, &server);
        opts.messages = 50;
        let report = run(Scenario::Fanout, &opts).await.unwrap();
        let d = report.deliveries.as_ref().unwrap();
        assert!(report.complete, "{}", report.to_table());
        assert_eq!(
            (d.sent, d.delivered, d.lost, d.order_violations),
            (150, 450, 0, 0)
        );
        assert_eq!(report.latency_us.as_ref().unwrap().samples, 450);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_open_loop_run_keeps_its_schedule() {
        let server = TestServer::start(Config::default()).unwrap();
        let mut opts = small(Scenario::Rate, &server);
        opts.rate = 50.0;
        opts.duration = Duration::from_millis(200);
        let report = run(Scenario::Rate, &opts).await.unwrap();
        let d = report.deliveries.as_ref().unwrap();
        assert!(report.complete, "{}", report.to_table());
        assert_eq!(
            (d.sent, d.delivered, d.lost, d.order_violations),
            (30, 90, 0, 0)
        );
        assert_eq!(d.offered_per_s, Some(450.0));
        assert!(report.elapsed_s >= 0.19, "{}", report.elapsed_s);
    }
}
