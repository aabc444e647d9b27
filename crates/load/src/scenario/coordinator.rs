//! What every scenario's run shares: connecting clients, letting the
//! arrival announcements settle, the progress line, sampling server and tool
//! CPU over the measured interval ([`Meter`]), merging what the clients
//! counted ([`collect`]), and saying in the report how a run ended
//! ([`Ending`], [`ending_note`], [`fill_deliveries`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use super::Options;
use crate::client::{
    self, new_histogram, run_counter, ClientResult, Conn, CounterShared, End, RecvCounts,
    COUNTER_CHUNK,
};
use crate::payload::Codec;
use crate::proc::{self, Proc};
use crate::protocol::{self, Framing, Protocol};
use crate::report::{self, Deliveries, Latency, Report, ServerUsage};
use crate::tls::TlsClient;

/// How long arrival announcements may go without progress before the tool
/// stops waiting for the rest (the seed can lose some; see `settle`).
pub(super) const SETTLE_QUIET: Duration = Duration::from_secs(1);

/// How often the coordinator looks at the counters.
pub(super) const POLL: Duration = Duration::from_millis(2);

/// Prints a progress line on stderr every second once a run is past two seconds.
pub(super) struct Progress {
    enabled: bool,
    start: Instant,
    next: Instant,
    last_value: u64,
    last_at: Instant,
}

impl Progress {
    pub(super) fn new(enabled: bool) -> Progress {
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
    pub(super) fn tick(&mut self, what: &str, value: u64, extra: impl FnOnce() -> String) {
        let now = Instant::now();
        if !self.enabled || now < self.next {
            return;
        }
        let rate = (value - self.last_value.min(value)) as f64
            / now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        crate::note!(
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
pub(super) struct Meter {
    start: Instant,
    /// Each server process and its CPU nanoseconds at the start.
    server: Vec<(u32, u64)>,
    tool_ns: u64,
}

/// Server and tool resources over a measured interval.
pub(super) struct Measured {
    /// Pids, CPU nanoseconds used and memory at the end, summed over them.
    pub(super) server: Option<(Vec<u32>, u64, proc::Memory)>,
    pub(super) tool_cpu_s: f64,
}

impl Meter {
    pub(super) fn start(pids: &[u32]) -> anyhow::Result<Meter> {
        let server = pids
            .iter()
            .map(|&pid| {
                let cpu = Proc::Pid(pid)
                    .cpu_ns()
                    .with_context(|| format!("--server-pid {pid}"))?;
                Ok((pid, cpu))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Meter {
            start: Instant::now(),
            server,
            tool_ns: Proc::Myself.cpu_ns().unwrap_or(0),
        })
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Samples the end of the interval; a server that cannot be read any
    /// more (it exited) becomes a note rather than an error.
    pub(super) fn finish(&self, notes: &mut Vec<String>) -> Measured {
        let tool_ns = Proc::Myself
            .cpu_ns()
            .unwrap_or(0)
            .saturating_sub(self.tool_ns);
        let server = self
            .server_usage()
            .map_err(|err| notes.push(err))
            .ok()
            .flatten();
        Measured {
            server,
            tool_cpu_s: tool_ns as f64 / 1e9,
        }
    }

    /// CPU used since the start and memory now, summed over the server's
    /// processes; an error names the one that could not be read (it exited:
    /// a group's figures are then not given at all rather than partly).
    fn server_usage(&self) -> Result<Option<(Vec<u32>, u64, proc::Memory)>, String> {
        if self.server.is_empty() {
            return Ok(None);
        }
        let mut cpu_ns = 0;
        let mut memory = proc::Memory::default();
        for &(pid, before) in &self.server {
            let p = Proc::Pid(pid);
            match (p.cpu_ns(), p.memory()) {
                (Ok(after), Ok(used)) => {
                    cpu_ns += after.saturating_sub(before);
                    memory.rss_kib += used.rss_kib;
                    memory.hwm_kib += used.hwm_kib;
                }
                (Err(err), _) | (_, Err(err)) => {
                    return Err(format!("server pid {pid} could not be measured: {err:#}"))
                }
            }
        }
        let pids = self.server.iter().map(|&(pid, _)| pid).collect();
        Ok(Some((pids, cpu_ns, memory)))
    }
}

impl Measured {
    /// The server's usage, with per-delivery figures for `deliveries`.
    pub(super) fn usage(&self, deliveries: Option<u64>) -> Option<ServerUsage> {
        self.server
            .as_ref()
            .map(|(pids, cpu_ns, memory)| ServerUsage::new(pids, *cpu_ns, *memory, deliveries))
    }
}

/// Waits until `current()` reaches `expected`, or stops changing for
/// `quiet`. Returns `None` once reached, or the count it settled at.
///
/// The stall rule exists for the Go seed, where a newcomer's arrival can be
/// broadcast before the previous client has joined the broadcaster's set,
/// so that client never hears of it: the total then stops just short.
pub(super) async fn settle(
    current: impl Fn() -> u64,
    expected: u64,
    quiet: Duration,
) -> Option<u64> {
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
pub(super) fn arrivals_due(n: usize) -> u64 {
    n as u64 * (n as u64).saturating_sub(1) / 2
}

/// Waits until the clients have heard every arrival announcement (`heard`
/// counts them), noting in the report if the count stopped short.
pub(super) async fn settle_arrivals(report: &mut Report, n: usize, heard: impl Fn() -> u64) {
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
pub(super) async fn settle_before_sending(report: &mut Report, n: usize, heard: impl Fn() -> u64) {
    settle_arrivals(report, n, heard).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Connects client `i` of `n` with context for the error.
pub(super) async fn connect_one(
    addr: SocketAddr,
    i: usize,
    n: usize,
    buffer: usize,
    tls: Option<&TlsClient>,
) -> anyhow::Result<Conn> {
    client::connect(addr, buffer, tls)
        .await
        .with_context(|| format!("client {} of {n}", i + 1))
}

/// Connects client `i` in the scenario's protocol to its node.
pub(super) async fn connect_client(
    opts: &Options,
    i: usize,
    buffer: usize,
) -> anyhow::Result<Conn> {
    protocol::connect(
        opts.protocol,
        opts.addr_for(i),
        buffer,
        &opts.subject,
        opts.tls.as_ref(),
    )
    .await
    .with_context(|| format!("client {} of {}", i + 1, opts.clients))
}

/// How long routed NATS servers get to tell each other about new
/// subscriptions: a server learns of a remote subscription asynchronously,
/// after the subscriber's own server confirmed it, and there is nothing a
/// client can wait on for it.
pub(super) const INTEREST_PROPAGATION: Duration = Duration::from_millis(500);

/// Before anyone sends: the chat's arrivals settle ([`settle_before_sending`]);
/// a broker has no arrivals, and its subscriptions are confirmed already,
/// but across several routed servers they need [`INTEREST_PROPAGATION`].
pub(super) async fn settle_for_protocol(
    opts: &Options,
    report: &mut Report,
    heard: impl Fn() -> u64,
) {
    match opts.protocol {
        Protocol::Line | Protocol::Ws => {
            settle_before_sending(report, opts.clients, heard).await;
        }
        _ if opts.nodes.len() > 1 => tokio::time::sleep(INTEREST_PROPAGATION).await,
        _ => {}
    }
}

/// The framing of client `i`, known by the server as `who`.
pub(super) fn framing_for(opts: &Options, who: &str, codec: &Codec) -> Framing {
    Framing::new(opts.protocol, who, &opts.subject, codec)
}

/// Merged results of a set of clients.
#[derive(Default)]
pub(super) struct Merged {
    pub(super) counts: RecvCounts,
    pub(super) sent: u64,
    pub(super) latency: Option<Histogram<u64>>,
    pub(super) closed: usize,
    pub(super) failed: Vec<String>,
    pub(super) last_delivery_ns: u64,
    pub(super) longest_gap_ns: u64,
    pub(super) watched_left_ns: Option<u64>,
}

pub(super) async fn collect(handles: Vec<JoinHandle<ClientResult>>) -> Merged {
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
        merged.longest_gap_ns = merged.longest_gap_ns.max(r.longest_gap_ns);
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

pub(super) fn connection_notes(merged: &Merged, notes: &mut Vec<String>) {
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

/// How a run's measured interval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Everything expected arrived.
    Complete,
    /// Nothing arrived for `--drain`: what is missing is lost.
    Stalled,
    /// The time bound cut the run: what is missing was still pending
    /// (`stalled` if nothing had arrived for `--drain` by then either).
    TimeBound { stalled: bool },
}

/// Says how an incomplete run ended, in the words a reader needs.
pub(super) fn ending_note(
    report: &mut Report,
    ending: Ending,
    opts: &Options,
    planned_deliveries: u64,
) {
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
             ({} {}) ended the run with {} deliveries pending and {} messages unsent",
            if stalled { "stalled: " } else { "" },
            d.delivered,
            opts.duration_flag,
            opts.duration.as_secs_f64(),
            d.pending,
            d.unsent,
        ),
    };
    report.notes.push(note);
}

/// Fills the deliveries and latency sections; `planned` is the messages
/// the clients were to send in all.
pub(super) fn fill_deliveries(
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
        backwards: merged.counts.backwards,
        longest_gap_ms: (merged.longest_gap_ns > 0).then(|| merged.longest_gap_ns as f64 / 1e6),
        per_s: delivered as f64 / elapsed,
        offered_per_s,
    });
    report.latency_us = merged.latency.as_ref().and_then(Latency::of);
}

/// Connects `n` lean clients that count what they are sent, with progress.
pub(super) async fn connect_counters(
    opts: &Options,
    shared: &Arc<CounterShared>,
    expected_lines: u64,
) -> anyhow::Result<(Vec<JoinHandle<bool>>, Duration)> {
    let n = opts.clients;
    let mut handles = Vec::with_capacity(n);
    let mut progress = Progress::new(opts.progress);
    let start = Instant::now();
    for i in 0..n {
        let conn = match opts.protocol {
            Protocol::Ws => connect_client(opts, i, COUNTER_CHUNK).await?,
            _ => connect_one(opts.addr_for(i), i, n, COUNTER_CHUNK, opts.tls.as_ref()).await?,
        };
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

#[cfg(test)]
mod tests {
    use super::super::Scenario;
    use super::*;

    #[test]
    fn a_cut_run_names_the_flag_that_bounded_it() {
        let mut opts = Options::new(Scenario::Fanout, SocketAddr::from(([127, 0, 0, 1], 1)));
        opts.duration = Duration::from_secs(60);
        let cut = |opts: &Options| {
            let mut report = Report::new("fanout", "seed".into(), Default::default());
            report.deliveries = Some(Deliveries {
                delivered: 5,
                pending: 3,
                unsent: 1,
                ..Default::default()
            });
            ending_note(&mut report, Ending::TimeBound { stalled: false }, opts, 9);
            ending_note(&mut report, Ending::Complete, opts, 9);
            report.notes
        };
        let notes = cut(&opts);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("(--duration 60)"), "{notes:?}");
        opts.duration_flag = "--fanout-timeout";
        let notes = cut(&opts);
        assert!(notes[0].contains("(--fanout-timeout 60)"), "{notes:?}");
        assert!(notes[0].contains("3 deliveries pending"), "{notes:?}");
    }
}
