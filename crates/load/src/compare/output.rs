//! What a comparison produces: its rows and cells (serialised as
//! `compare.json`), the side-by-side table (the terminal and `compare.md`)
//! and the series [`plot`](super::plot) draws as `compare.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::plot::{self, CategoryPanel, Figures, Point, Series};
use super::{cpus, CompareOptions};
use crate::report::{self, Report};
use crate::scenario::Scenario;

/// One cell of the comparison: a scenario run against one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub server: String,
    /// How it was started.
    pub command: String,
    pub cells: Vec<Cell>,
}

/// The whole comparison, as written to `compare.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub machine: Machine,
    pub rows: Vec<Row>,
}

/// Where the numbers come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub tool_threads: usize,
    /// Worker threads of each of our servers (0 in files written before
    /// it was recorded).
    #[serde(default)]
    pub server_threads: usize,
}

impl Machine {
    pub(super) fn here(opts: &CompareOptions) -> Machine {
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
    fn flooder(r: &Report) -> String {
        r.flood
            .as_ref()
            .map_or("-".into(), |f| match f.cut_off_after_s {
                Some(t) => format!("cut off after {t:.1} s"),
                None => format!(
                    "{}B/s let through",
                    report::si(f.bytes_received as f64 / f.seconds.max(1e-9))
                ),
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
        Scenario::Flood => vec![
            c("p50", p50),
            c("p99", p99),
            c("lost/viol", lost),
            c("flooder", flooder),
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
            for (k, (_, value)) in columns(scenario).into_iter().enumerate() {
                line.push(match cell {
                    Some(Cell {
                        report: Some(r), ..
                    }) if k == 0 && !r.complete => format!("{} {INCOMPLETE}", value(r)),
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

/// Marks the first figure of a run that did not complete everything it set
/// out to: cut short by its time bound, deliveries missing, announcements
/// never heard (the notes say which).
const INCOMPLETE: &str = "(incomplete)";

/// `compare.md`: the machine, the legend of the columns, the table and
/// every server's command and notes.
fn markdown(comparison: &Comparison) -> String {
    let mut md = String::new();
    let m = &comparison.machine;
    let _ = writeln!(
        md,
        "# chat-load compare\n\n{} CPUs, Linux {}, chat-load on {} worker thread(s), \
         our servers on {} each (peers as their commands say); \
         del/s = deliveries per second (one message received by one client), \
         CPU/del = server CPU time per delivery (for a cluster, summed over its broker and \
         nodes; memory likewise), lost/viol = lost deliveries / order violations, \
         KiB/conn = server RSS per idle connection, settled = as the last arrival announcement \
         was delivered, held = after holding the connections open for --hold more, \
         {INCOMPLETE} = the run did not complete (cut short, or deliveries or announcements \
         missing; the notes under Servers say which), \
         (cut) = the time bound ended the run before everything was delivered.\n",
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
    md
}

/// Writes `compare.md`, `compare.json` and `compare.svg` to `--out`.
pub(super) fn write_files(opts: &CompareOptions, comparison: &Comparison) -> anyhow::Result<()> {
    write_md_and_svg(&opts.out, comparison)?;
    let json_path = opts.out.join("compare.json");
    let json = serde_json::to_string_pretty(comparison).context("serialising the comparison")?;
    fs::write(&json_path, json).with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(())
}

fn write_md_and_svg(out: &Path, comparison: &Comparison) -> anyhow::Result<()> {
    let md_path = out.join("compare.md");
    fs::write(&md_path, markdown(comparison))
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let figures = figures(comparison);
    if !figures.is_empty() {
        plot::write_svg(&out.join("compare.svg"), &figures)?;
    }
    Ok(())
}

/// Reads a `compare.json` a comparison wrote and writes its `compare.md`
/// and `compare.svg` again, into `out`: the same results, redrawn by this
/// version of the tool, without running anything.
pub fn replot(json: &Path, out: &Path) -> anyhow::Result<Comparison> {
    let text =
        fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
    let comparison: Comparison = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a compare.json", json.display()))?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_md_and_svg(out, &comparison)?;
    Ok(comparison)
}

/// What `compare.svg` shows, from the cells: per server, fanout deliveries
/// per second and p99 (ms) against n, the first rate cell's latency
/// percentiles (ms) and the first idle cell's KiB per connection; every
/// point says whether its run completed.
fn figures(comparison: &Comparison) -> Figures {
    let mut throughput = Vec::new();
    let mut p99 = Vec::new();
    let mut rate = Vec::new();
    let mut idle = Vec::new();
    let mut rate_title = None;
    let mut idle_title = None;
    for row in &comparison.rows {
        let series = |points| Series {
            name: row.server.clone(),
            points,
        };
        let mut t = Vec::new();
        let mut l = Vec::new();
        for cell in row.cells.iter().filter(|c| c.scenario == Scenario::Fanout) {
            let Some(report) = &cell.report else { continue };
            let point = |y| Point {
                x: cell.clients as f64,
                y,
                complete: report.complete,
            };
            if let Some(d) = &report.deliveries {
                t.push(point(d.per_s));
            }
            if let Some(lat) = &report.latency_us {
                l.push(point(lat.p99 as f64 / 1000.0));
            }
        }
        throughput.push(series(t));
        p99.push(series(l));

        let first = |scenario| {
            row.cells
                .iter()
                .find(|c| c.scenario == scenario && c.report.is_some())
        };
        let mut r = Vec::new();
        if let Some(cell) = first(Scenario::Rate) {
            let report = cell.report.as_ref();
            if let Some((report, lat)) = report.and_then(|r| Some((r, r.latency_us.as_ref()?))) {
                for (i, us) in [lat.p50, lat.p99, lat.p999].into_iter().enumerate() {
                    r.push(Point {
                        x: i as f64,
                        y: us as f64 / 1000.0,
                        complete: report.complete,
                    });
                }
                let offered = report.deliveries.as_ref().and_then(|d| d.offered_per_s);
                rate_title.get_or_insert_with(|| match offered {
                    Some(offered) => format!(
                        "{}: latency, {} deliveries/s offered",
                        cell.label,
                        report::si(offered)
                    ),
                    None => format!("{}: latency", cell.label),
                });
            }
        }
        rate.push(series(r));
        let mut k = Vec::new();
        if let Some(cell) = first(Scenario::Idle) {
            if let Some(report) = &cell.report {
                let figures = report
                    .idle
                    .as_ref()
                    .map(|i| [i.per_connection_kib, i.per_connection_held_kib]);
                for (i, kib) in figures.into_iter().flatten().enumerate() {
                    if let Some(kib) = kib {
                        k.push(Point {
                            x: i as f64,
                            y: kib,
                            complete: report.complete,
                        });
                    }
                }
                idle_title.get_or_insert_with(|| {
                    format!("{}: server memory per idle connection", cell.label)
                });
            }
        }
        idle.push(series(k));
    }
    Figures {
        throughput,
        p99,
        rate: rate_title.map(|title| CategoryPanel {
            title,
            categories: vec!["p50", "p99", "p99.9"],
            y_desc: "ms",
            log_y: true,
            series: rate,
        }),
        idle: idle_title.map(|title| CategoryPanel {
            title,
            categories: vec!["settled", "held"],
            y_desc: "KiB",
            log_y: false,
            series: idle,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let figures = figures(&comparison);
        let point = Point {
            x: 10.0,
            y: 5e6,
            complete: true,
        };
        assert_eq!(figures.throughput[0].points, vec![point]);
        assert!(figures.throughput[1].points.is_empty());
        assert!(!table.contains(INCOMPLETE));
    }

    /// The seed's runs of one comparison: a fanout cut by its time bound, a
    /// rate run and an idle run that completed all they could but missed
    /// announcements; the table marks all three, the plot draws them hollow.
    fn seed_with_incomplete_runs() -> Comparison {
        let incomplete = |scenario: Scenario, label: &str, clients: usize| {
            let mut report = Report::new(scenario.name(), "seed".into(), Default::default());
            report.complete = false;
            report.notes.push("announcements settled short".into());
            Cell {
                label: label.into(),
                scenario,
                clients,
                report: Some(report),
                error: None,
            }
        };
        let mut fanout = incomplete(Scenario::Fanout, "fanout n=1000", 1000);
        if let Some(report) = fanout.report.as_mut() {
            report.deliveries = Some(report::Deliveries {
                per_s: 2.4e5,
                pending: 10,
                ..Default::default()
            });
        }
        let mut rate = incomplete(Scenario::Rate, "rate n=500", 500);
        if let Some(report) = rate.report.as_mut() {
            report.deliveries = Some(report::Deliveries {
                per_s: 2.3e5,
                offered_per_s: Some(2.5e5),
                ..Default::default()
            });
            report.latency_us = Some(report::Latency {
                p50: 272_000,
                p99: 613_000,
                p999: 626_000,
                ..Default::default()
            });
        }
        let mut idle = incomplete(Scenario::Idle, "idle n=5000", 5000);
        if let Some(report) = idle.report.as_mut() {
            report.idle = Some(report::Idle {
                per_connection_kib: Some(17.15),
                per_connection_held_kib: Some(17.1),
                ..Default::default()
            });
        }
        Comparison {
            machine: Machine {
                cpus: 2,
                kernel: "6.18".into(),
                tool_threads: 1,
                server_threads: 1,
            },
            rows: vec![Row {
                server: "seed".into(),
                command: "/tmp/gopl-chat-server".into(),
                cells: vec![fanout, rate, idle],
            }],
        }
    }

    #[test]
    fn marks_every_incomplete_run_in_the_table_and_the_plot() {
        let comparison = seed_with_incomplete_runs();
        let md = markdown(&comparison);
        let row = md
            .lines()
            .find(|line| line.starts_with("| seed"))
            .unwrap_or_default();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // server, then fanout's 4 columns, rate's 7, idle's 3.
        assert_eq!(cells[2], format!("240.0 k {INCOMPLETE}"), "{row}");
        assert!(cells[5].ends_with("(cut)"), "{row}");
        assert_eq!(cells[6], format!("250.0 k {INCOMPLETE}"), "{row}");
        assert_eq!(cells[13], format!("17.15 KiB {INCOMPLETE}"), "{row}");
        assert_eq!(row.matches(INCOMPLETE).count(), 3, "{row}");
        assert!(md.contains(&format!("{INCOMPLETE} = the run did not complete")));

        let figures = figures(&comparison);
        let all_hollow = |series: &[Series]| {
            series
                .iter()
                .all(|s| !s.points.is_empty() && s.points.iter().all(|p| !p.complete))
        };
        assert!(all_hollow(&figures.throughput));
        let rate = figures.rate.as_ref().map(|p| p.series.as_slice());
        assert!(rate.is_some_and(all_hollow), "{:?}", figures.rate);
        let idle = figures.idle.as_ref().map(|p| p.series.as_slice());
        assert!(idle.is_some_and(all_hollow), "{:?}", figures.idle);
        assert_eq!(
            figures.rate.as_ref().map(|p| p.title.as_str()),
            Some("rate n=500: latency, 250.0 k deliveries/s offered")
        );
    }

    #[test]
    fn replots_a_saved_comparison() {
        let dir = std::env::temp_dir().join(format!("chat-load-replot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let json = dir.join("saved.json");
        let comparison = seed_with_incomplete_runs();
        fs::write(&json, serde_json::to_string(&comparison).unwrap()).unwrap();
        let out = dir.join("out");
        let again = replot(&json, &out).unwrap();
        assert_eq!(table(&again), table(&comparison));
        let md = fs::read_to_string(out.join("compare.md")).unwrap();
        assert!(md.contains(INCOMPLETE));
        assert!(fs::read_to_string(out.join("compare.svg"))
            .unwrap()
            .starts_with("<svg"));
        assert!(replot(&dir.join("missing.json"), &out).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
