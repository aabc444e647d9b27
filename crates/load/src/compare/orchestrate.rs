//! One comparison from start to end: the scenario runs to make
//! ([`plan`]), a freshly started server for each run, the options each run
//! gets, and the cells and rows the results go into.

use std::fs;

use anyhow::{bail, Context};

use super::output::{self, Cell, Comparison, Machine, Row};
use super::spec::{Model, PeerSpec};
use super::supervise::{start_ours, start_peer, Running};
use super::CompareOptions;
use crate::proc::Proc;
use crate::report::{self, Report};
use crate::scenario::{self, Options, Scenario};

/// The messages per client of a fanout point: about `deliveries` in all,
/// at least 10 so every client really sends.
fn messages_for(deliveries: u64, clients: usize) -> u64 {
    let n = clients.max(1) as u64;
    (deliveries / (n * n)).max(10)
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
            o.duration_flag = "--fanout-timeout";
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
            crate::note!(
                "chat-load: started {} on {} (pid {})",
                server.name,
                server.addr,
                server.pid
            );
        }
        Ok(server)
    }

    fn command(&self, opts: &CompareOptions) -> String {
        match self {
            Spec::Ours(model) => format!(
                "{} {}",
                opts.server_bin.display(),
                super::spec::our_server_args(*model, opts.server_threads, &opts.server_args)
                    .join(" ")
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
                crate::note!("chat-load: {}: cannot start: {err:#}", spec.name());
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
        crate::note!("chat-load: {}: {label}", server.name);
        let options = options_for(opts, &server, *scenario, *n);
        match scenario::run(*scenario, &options).await {
            Ok(report) => {
                crate::note!("chat-load: {}: {label}: {}", server.name, summary(&report));
                cells.push(cell(Some(report), None));
            }
            Err(err) => {
                crate::note!("chat-load: {}: {label} failed: {err:#}", server.name);
                cells.push(cell(None, Some(format!("{err:#}"))));
            }
        }
        if !Proc::Pid(server.pid).alive() {
            crate::note!(
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
            crate::note!(
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
    output::write_files(opts, &comparison)?;
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fanout_points_to_a_delivery_budget() {
        assert_eq!(messages_for(10_000_000, 10), 100_000);
        assert_eq!(messages_for(10_000_000, 100), 1000);
        assert_eq!(messages_for(10_000_000, 1000), 10);
        assert_eq!(messages_for(10_000_000, 100_000), 10);
    }
}
