//! The result of one scenario run: what was measured, as one serialisable
//! [`Report`], and its rendering as a small table for people.
//!
//! Every figure a scenario produces goes through here, so the table, the
//! JSON (`--json`, one object per line) and `compare`'s side-by-side files
//! all say the same thing. Sections that a scenario does not produce are
//! `None` and left out of the JSON.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::proc::Memory;

/// One scenario's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `fanout`, `rate`, `churn`, `slow` or `idle`.
    pub scenario: String,
    /// What was measured: the address, or the server's name in `compare`.
    pub target: String,
    pub params: Params,
    /// Length of the measured interval, seconds.
    pub elapsed_s: f64,
    /// Whether everything expected happened within the time bounds.
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Deliveries>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Latency>,
    /// Open loop only: how late the tool itself sent, behind schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow: Option<Slow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Idle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<Flood>,
    /// Given the server's pid: its CPU and memory over the measured interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerUsage>,
    /// This tool's own CPU over the measured interval, seconds: if it is
    /// close to `threads × elapsed_s`, the tool was the bottleneck.
    pub tool_cpu_s: f64,
    /// Things a reader must know to trust the numbers.
    pub notes: Vec<String>,
}

/// The knobs the run used.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Params {
    pub clients: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    pub size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_client: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    pub threads: usize,
}

/// Chat lines: one delivery is one message received by one client.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Deliveries {
    /// Messages the clients sent.
    pub sent: u64,
    /// Messages that should have been sent but were not (the run's time
    /// bound ran out first).
    pub unsent: u64,
    /// Deliveries the sent messages owe: `sent × receivers`.
    pub expected: u64,
    pub delivered: u64,
    /// Expected deliveries that had not arrived when the tool gave up after
    /// `--drain` seconds without any delivery.
    pub lost: u64,
    /// Expected deliveries still on their way when the time bound
    /// (`--duration`) ended the run: late, not known to be lost.
    pub pending: u64,
    /// Lines that broke their sender's sequence at some receiver.
    pub order_violations: u64,
    /// Of those, lines earlier than the sender's next expected one: a
    /// duplicate, or a line overtaken by a later one of the same sender.
    #[serde(default)]
    pub backwards: u64,
    /// The longest any receiver went without a delivery once it had its
    /// first (an outage shows here), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_gap_ms: Option<f64>,
    pub per_s: f64,
    /// Open loop only: the deliveries per second asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_per_s: Option<f64>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    /// Summarises a histogram of microseconds (`None` if it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        // Highest equivalent values, so a percentile never understates.
        let at = |q: f64| histogram.highest_equivalent(histogram.value_at_quantile(q));
        Some(Latency {
            samples: histogram.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        })
    }
}

/// Join-and-leave cycles.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Churn {
    pub idle_clients: usize,
    pub concurrency: u32,
    pub cycles: u64,
    pub per_s: f64,
    /// Arrival and departure lines the idle clients should have seen but did not.
    pub missing_announcements: u64,
    pub failed_cycles: u64,
}

/// What happened to the client that never read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Slow {
    /// Seconds from the first send until the others saw it leave.
    pub disconnected_after_s: Option<f64>,
    /// How its connection looked when it finally read: `too slow notice`,
    /// `closed`, `reset`, or `still connected`.
    pub final_state: String,
    /// Bytes it found waiting when it finally read.
    pub bytes_buffered: u64,
}

/// What the flooder of the `flood` scenario managed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Flood {
    /// Bytes the flooder's socket took (the server's, and the kernel's buffers).
    pub bytes_written: u64,
    /// Bytes the server sent it: its own lines' echoes, mostly, so about
    /// what the server let through from it (plus `IP:PORT: ` each).
    pub bytes_received: u64,
    /// How long it flooded, seconds.
    pub seconds: f64,
    /// When it was told `error: flooding`, seconds after it started.
    pub cut_off_after_s: Option<f64>,
    /// `still connected` when the run ended, or how the server ended it.
    pub final_state: String,
}

/// Memory of idle connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Idle {
    pub connections: usize,
    /// Connections per second while opening them (each one greeted).
    pub connect_per_s: f64,
    /// Announcement lines delivered and expected (`n(n-1)/2`).
    pub announcements: u64,
    pub announcements_expected: u64,
    /// Connections the server closed while they were idle.
    pub dropped: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_kib: Option<u64>,
    /// Once every announcement was delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_settled_kib: Option<u64>,
    /// After holding the connections open a little longer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_held_kib: Option<u64>,
    /// After closing them all again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_closed_kib: Option<u64>,
    /// `(settled - before) / connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_connection_kib: Option<f64>,
    /// `(held - before) / connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_connection_held_kib: Option<f64>,
    /// How long the connections were held open after settling, in seconds.
    pub hold_s: f64,
}

/// The server's resources over the measured interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerUsage {
    /// The (first) process measured.
    pub pid: u32,
    /// How many processes the figures sum (a cluster: its broker and nodes).
    #[serde(default = "one_process")]
    pub processes: usize,
    pub cpu_s: f64,
    /// `cpu / deliveries` (or per churn cycle in `churn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ns_per_delivery: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ns_per_cycle: Option<f64>,
    /// At the end of the interval.
    pub rss_kib: u64,
    /// The process's peak so far.
    pub hwm_kib: u64,
}

fn one_process() -> usize {
    1
}

impl ServerUsage {
    /// Usage from CPU-time samples at both ends of the interval and memory
    /// at the end, summed over the server's processes `pids`.
    pub fn new(pids: &[u32], cpu_ns: u64, memory: Memory, deliveries: Option<u64>) -> ServerUsage {
        let per = |count: u64| (count > 0 && cpu_ns > 0).then(|| cpu_ns as f64 / count as f64);
        ServerUsage {
            pid: pids.first().copied().unwrap_or_default(),
            processes: pids.len(),
            cpu_s: cpu_ns as f64 / 1e9,
            cpu_ns_per_delivery: deliveries.and_then(per),
            deliveries_per_cpu_s: deliveries.and_then(per).map(|ns_per| 1e9 / ns_per),
            cpu_ns_per_cycle: None,
            rss_kib: memory.rss_kib,
            hwm_kib: memory.hwm_kib,
        }
    }
}

/// `1234567.0` as `1.23 M`, for tables.
pub fn si(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e9 {
        format!("{:.2} G", value / 1e9)
    } else if magnitude >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if magnitude >= 1e3 {
        format!("{:.1} k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

/// Microseconds as `850 µs`, `12.3 ms` or `1.54 s`.
pub fn micros(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

impl Report {
    /// An empty report to fill in.
    pub fn new(scenario: &str, target: String, params: Params) -> Report {
        Report {
            scenario: scenario.to_owned(),
            target,
            params,
            elapsed_s: 0.0,
            complete: true,
            deliveries: None,
            latency_us: None,
            send_lag_us: None,
            churn: None,
            slow: None,
            flood: None,
            idle: None,
            server: None,
            tool_cpu_s: 0.0,
            notes: Vec::new(),
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
    }

    /// A two-column table for a terminal.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |key: &str, value: String| rows.push((key.to_owned(), value));
        let p = &self.params;
        let mut params = format!("n={} size={}", p.clients, p.size);
        if let Some(m) = p.messages {
            let _ = write!(params, " m={m}");
        }
        if let Some(w) = p.window {
            let _ = write!(params, " window={w}");
        }
        if let Some(r) = p.rate_per_client {
            let _ = write!(params, " rate={r}/s");
        }
        if let Some(d) = p.duration_s {
            let _ = write!(params, " duration={d}s");
        }
        let _ = write!(params, " threads={}", p.threads);
        row(
            "scenario",
            format!("{} against {}", self.scenario, self.target),
        );
        row("parameters", params);
        row(
            "measured",
            format!(
                "{:.3} s{}",
                self.elapsed_s,
                if self.complete { "" } else { " (INCOMPLETE)" }
            ),
        );
        if let Some(d) = &self.deliveries {
            row("deliveries/s", si(d.per_s));
            if let Some(offered) = d.offered_per_s {
                row("offered/s", si(offered));
            }
            row(
                "delivered",
                format!(
                    "{} of {} expected ({} sent, {} unsent)",
                    d.delivered, d.expected, d.sent, d.unsent
                ),
            );
            row("lost", d.lost.to_string());
            if d.pending > 0 {
                row("pending at the time bound", d.pending.to_string());
            }
            row(
                "order violations",
                format!("{} ({} backwards)", d.order_violations, d.backwards),
            );
            if let Some(gap) = d.longest_gap_ms {
                row("longest gap", format!("{gap:.1} ms"));
            }
        }
        if let Some(l) = &self.latency_us {
            row(
                "latency",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    micros(l.p50),
                    micros(l.p90),
                    micros(l.p99),
                    micros(l.p999),
                    micros(l.max)
                ),
            );
        }
        if let Some(l) = &self.send_lag_us {
            row(
                "send lag (tool)",
                format!(
                    "p50 {}  p99 {}  max {}",
                    micros(l.p50),
                    micros(l.p99),
                    micros(l.max)
                ),
            );
        }
        if let Some(c) = &self.churn {
            row(
                "join+leave cycles/s",
                format!(
                    "{} ({} cycles, {} idle clients, {} at once)",
                    si(c.per_s),
                    c.cycles,
                    c.idle_clients,
                    c.concurrency
                ),
            );
            row("missing announcements", c.missing_announcements.to_string());
            if c.failed_cycles > 0 {
                row("failed cycles", c.failed_cycles.to_string());
            }
        }
        if let Some(s) = &self.slow {
            row(
                "slow client",
                match s.disconnected_after_s {
                    Some(t) => format!("disconnected after {t:.3} s"),
                    None => "never disconnected".to_owned(),
                },
            );
            row(
                "slow client's end",
                format!(
                    "{} ({} bytes were waiting)",
                    s.final_state, s.bytes_buffered
                ),
            );
        }
        if let Some(f) = &self.flood {
            let secs = f.seconds.max(1e-9);
            row(
                "flooder",
                format!(
                    "wrote {}B/s, was sent {}B/s back; {}",
                    si(f.bytes_written as f64 / secs),
                    si(f.bytes_received as f64 / secs),
                    match f.cut_off_after_s {
                        Some(t) => format!("cut off after {t:.1} s ({})", f.final_state),
                        None => f.final_state.clone(),
                    }
                ),
            );
        }
        if let Some(i) = &self.idle {
            row(
                "connections",
                format!(
                    "{} ({}/s while connecting, {} dropped)",
                    i.connections,
                    si(i.connect_per_s),
                    i.dropped
                ),
            );
            row(
                "announcements",
                format!("{} of {}", i.announcements, i.announcements_expected),
            );
            let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} KiB"));
            if i.rss_before_kib.is_some() {
                row(
                    "server RSS",
                    format!(
                        "before {}  settled {}  held {}  closed {}",
                        kib(i.rss_before_kib),
                        kib(i.rss_settled_kib),
                        kib(i.rss_held_kib),
                        kib(i.rss_closed_kib)
                    ),
                );
            }
            if let Some(per) = i.per_connection_kib {
                let held = i.per_connection_held_kib.map_or(String::new(), |h| {
                    format!(
                        ", {h:.2} KiB after holding them {}",
                        micros((i.hold_s * 1e6) as u64)
                    )
                });
                row(
                    "RSS per idle connection",
                    format!("{per:.2} KiB once settled{held}"),
                );
            }
        }
        if let Some(s) = &self.server {
            let whose = match s.processes {
                1 => format!("pid {}", s.pid),
                k => format!("{k} processes, summed"),
            };
            row("server CPU", format!("{:.3} s ({whose})", s.cpu_s));
            if let Some(ns) = s.cpu_ns_per_delivery {
                row("server CPU/delivery", format!("{ns:.0} ns"));
            }
            if let Some(per) = s.deliveries_per_cpu_s {
                row("deliveries/CPU-s", si(per));
            }
            if let Some(ns) = s.cpu_ns_per_cycle {
                row("server CPU/cycle", format!("{:.1} µs", ns / 1000.0));
            }
            row(
                "server RSS",
                format!("{} KiB (peak {} KiB)", s.rss_kib, s.hwm_kib),
            );
        }
        row("tool CPU", format!("{:.3} s", self.tool_cpu_s));
        for note in &self.notes {
            row("note", note.clone());
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (key, value) in rows {
            let _ = writeln!(out, "{key:>width$}  {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut histogram = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000 {
            histogram.record(us).unwrap();
        }
        let mut report = Report::new(
            "fanout",
            "127.0.0.1:8000".into(),
            Params {
                clients: 10,
                messages: Some(100),
                size: 64,
                window: Some(16),
                threads: 2,
                ..Params::default()
            },
        );
        report.elapsed_s = 0.5;
        report.deliveries = Some(Deliveries {
            sent: 1000,
            expected: 10_000,
            delivered: 10_000,
            per_s: 20_000.0,
            ..Deliveries::default()
        });
        report.latency_us = Latency::of(&histogram);
        report.server = Some(ServerUsage::new(
            &[42],
            1_000_000,
            Memory {
                rss_kib: 100,
                hwm_kib: 200,
            },
            Some(10_000),
        ));
        report
    }

    #[test]
    fn summarises_latency() {
        let latency = sample().latency_us.unwrap();
        assert_eq!(latency.samples, 1000);
        assert_eq!(latency.p50, 500);
        assert_eq!(latency.p99, 990);
        assert_eq!(latency.max, 1000);
        assert!(Latency::of(&Histogram::<u64>::new(3).unwrap()).is_none());
    }

    #[test]
    fn derives_cpu_per_delivery() {
        let server = sample().server.unwrap();
        assert_eq!(server.cpu_ns_per_delivery, Some(100.0));
        assert_eq!(server.deliveries_per_cpu_s, Some(1e7));
        let idle = ServerUsage::new(
            &[1],
            0,
            Memory {
                rss_kib: 1,
                hwm_kib: 1,
            },
            Some(0),
        );
        assert_eq!(idle.cpu_ns_per_delivery, None);
    }

    #[test]
    fn json_has_a_stable_shape() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(json["scenario"], "fanout");
        assert_eq!(json["params"]["clients"], 10);
        assert_eq!(json["params"]["window"], 16);
        assert!(json["params"].get("rate_per_client").is_none());
        assert_eq!(json["deliveries"]["delivered"], 10_000);
        assert_eq!(json["deliveries"]["lost"], 0);
        assert_eq!(json["latency_us"]["p99"], 990);
        assert_eq!(json["server"]["cpu_ns_per_delivery"], 100.0);
        assert_eq!(json["server"]["rss_kib"], 100);
        assert!(json.get("idle").is_none(), "absent sections are left out");
        assert_eq!(json["complete"], true);
        assert!(!sample().to_json().contains('\n'), "one object per line");
    }

    #[test]
    fn renders_a_table() {
        let table = sample().to_table();
        assert!(table.contains("deliveries/s  20.0 k"), "{table}");
        assert!(table.contains("p99 990 µs"), "{table}");
        assert!(table.contains("server CPU/delivery  100 ns"), "{table}");
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(si(12_345_678.0), "12.35 M");
        assert_eq!(si(999.0), "999");
        assert_eq!(micros(850), "850 µs");
        assert_eq!(micros(1500), "1.50 ms");
        assert_eq!(micros(45_000), "45.0 ms");
        assert_eq!(micros(1_542_100), "1.54 s");
    }
}
