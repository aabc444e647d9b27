//! One comparison from start to end: the scenario runs to make
//! ([`plan`]), a freshly started server for each run, the options each run
//! gets, and the cells and rows the results go into.

use std::fs;

use anyhow::{bail, Context};

use super::groups::{nats_cluster_name, our_cluster_name, Group};
use super::output::{self, Cell, Comparison, Machine, Row};
use super::spec::{Model, PeerSpec};
use super::CompareOptions;
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

fn options_for(opts: &CompareOptions, server: &Group, scenario: Scenario, n: usize) -> Options {
    let mut o = Options::new(scenario, server.nodes[0]).with_nodes(server.nodes.clone());
    o.target = server.name.clone();
    o.clients = n;
    o.server_pids = server.pids();
    o.protocol = server.protocol;
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
        Scenario::Idle => o.hold = opts.idle_hold,
        _ => {}
    }
    o
}

/// A server `compare` knows how to start.
#[derive(Debug, Clone)]
enum Spec {
    Ours(Model),
    Peer(PeerSpec),
    /// K routed `nats-server`s, the clients speaking NATS.
    NatsCluster(usize),
    /// One `nats-server -js` and K of our nodes in this model.
    Cluster(Model, usize),
}

impl Spec {
    fn name(&self) -> String {
        match self {
            Spec::Ours(model) => model.name().to_owned(),
            Spec::Peer(peer) => peer.name.clone(),
            Spec::NatsCluster(k) => nats_cluster_name(*k),
            Spec::Cluster(_, k) => our_cluster_name(*k),
        }
    }

    fn start(&self, opts: &CompareOptions) -> anyhow::Result<Group> {
        let server = match self {
            Spec::Ours(model) => Group::ours(opts, *model)?,
            Spec::Peer(peer) => Group::peer(opts, peer)?,
            Spec::NatsCluster(k) => Group::nats_cluster(opts, *k)?,
            Spec::Cluster(model, k) => Group::our_cluster(opts, *model, *k)?,
        };
        if opts.progress {
            crate::note!(
                "chat-load: started {} on {} (pid {})",
                server.name,
                server
                    .nodes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                server
                    .pids()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
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
            Spec::NatsCluster(k) => format!(
                "{k} x nats-server --cluster nats://127.0.0.1:PORT_i --routes (the others); \
                 clients speak NATS"
            ),
            Spec::Cluster(model, k) => format!(
                "nats-server -js -sd STORE; {k} x {} --addr 127.0.0.1:0 --model {} --threads {} \
                 --cluster nats://127.0.0.1:PORT --room chatload",
                opts.server_bin.display(),
                model.name(),
                opts.server_threads
            ),
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
        let mut server = server;
        let mut options = options_for(opts, &server, *scenario, *n);
        let restart = match (spec, scenario, opts.broker_restart) {
            (Spec::Cluster(..), Scenario::Rate, Some(after)) => Some(after),
            _ => None,
        };
        let result = match restart {
            None => scenario::run(*scenario, &options).await,
            Some(after) => {
                let started = tokio_util::sync::CancellationToken::new();
                options.sending_started = Some(started.clone());
                run_with_broker_restart(opts, &mut server, &options, *scenario, &started, after)
                    .await
            }
        };
        match result {
            Ok(report) => {
                crate::note!("chat-load: {}: {label}: {}", server.name, summary(&report));
                cells.push(cell(Some(report), None));
            }
            Err(err) => {
                crate::note!("chat-load: {}: {label} failed: {err:#}", server.name);
                cells.push(cell(None, Some(format!("{err:#}"))));
            }
        }
        if !server.alive() {
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

/// Runs `scenario` and, `after` its sending started, restarts the
/// cluster's broker; the report says when and for how long.
async fn run_with_broker_restart(
    opts: &CompareOptions,
    server: &mut Group,
    options: &Options,
    scenario: Scenario,
    started: &tokio_util::sync::CancellationToken,
    after: std::time::Duration,
) -> anyhow::Result<Report> {
    let run = scenario::run(scenario, options);
    tokio::pin!(run);
    let cue = async {
        started.cancelled().await;
        tokio::time::sleep(after).await;
    };
    tokio::select! {
        result = &mut run => {
            let mut report = result?;
            report.notes.push(format!(
                "the run ended before the broker restart was due ({after:?} after sending started)"
            ));
            Ok(report)
        }
        () = cue => {
            // Blocking on purpose: the clients and the pacer run on their
            // own; only this run's coordinator waits meanwhile.
            let restarted = tokio::task::block_in_place(|| server.restart_broker(opts));
            let mut report = run.await?;
            report.notes.push(match restarted {
                Ok(down) => format!(
                    "broker killed (SIGKILL) {:.1} s after sending started and restarted on \
                     the same port and store: unreachable for {:.0} ms",
                    after.as_secs_f64(),
                    down.as_secs_f64() * 1e3
                ),
                Err(err) => format!("broker restart failed: {err:#}"),
            });
            Ok(report)
        }
    }
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
    if opts.models.is_empty()
        && opts.peers.is_empty()
        && opts.nats_clusters.is_empty()
        && opts.cluster_nodes.is_empty()
    {
        bail!("nothing to compare: give --models, --peer, --nats-cluster and/or --cluster-nodes");
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
        .chain(opts.peers.iter().cloned().map(Spec::Peer))
        .chain(opts.nats_clusters.iter().map(|&k| Spec::NatsCluster(k)))
        .chain(
            opts.cluster_nodes
                .iter()
                .map(|&k| Spec::Cluster(opts.cluster_model, k)),
        );
    let mut rows = Vec::new();
    for spec in specs {
        // A fresh log per compare run (then appended to per scenario).
        let _ = fs::remove_file(opts.out.join(format!("{}.log", spec.name())));
        let name = spec.name();
        let cells = run_all(opts, &spec, &runs).await;
        rows.push(Row {
            server: name,
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
