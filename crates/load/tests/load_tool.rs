//! The `chat-load` binary end to end, as a user runs it: its scenarios
//! against a real `chat-server` process, its JSON, its refusal of anything
//! off loopback, and `compare` starting our models and a peer and writing
//! the table, the JSON and the plot.
//!
//! Loads are tiny: these tests check that the tool counts right, not how
//! fast anything is.

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use chat_testkit::ensure;
use chat_testkit::process::ServerProcess;
use serde_json::Value;

fn chat_load(args: &[&str]) -> io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_chat-load"))
        .args(args)
        .output()
}

/// `chat-load compare` of `server_bin` into `out`, quiet, with one thread
/// for the tool and one for each server: what every comparison test
/// shares; `args` are the run's own.
fn compare_small(server_bin: &str, out: &str, args: &[&str]) -> io::Result<Output> {
    let mut all = vec!["compare", "--server-bin", server_bin];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--threads",
        "1",
        "--server-threads",
        "1",
        "--out",
        out,
        "-q",
    ]);
    chat_load(&all)
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The one JSON report a scenario run prints with `--json`.
fn json_report(output: &Output) -> io::Result<Value> {
    ensure(output.status.success(), || {
        format!("chat-load failed: {}", stderr_of(output))
    })?;
    serde_json::from_slice(&output.stdout).map_err(|err| {
        io::Error::other(format!(
            "not JSON ({err}): {}",
            String::from_utf8_lossy(&output.stdout)
        ))
    })
}

fn number(report: &Value, path: &[&str]) -> io::Result<f64> {
    let mut at = report;
    for key in path {
        at = &at[key];
    }
    at.as_f64()
        .ok_or_else(|| io::Error::other(format!("no number at {path:?} in {report}")))
}

/// Each `deliveries` field of a report has its expected value, and no
/// message arrived out of order.
fn ensure_deliveries(report: &Value, want: &[(&str, f64)]) -> io::Result<()> {
    for &(field, want) in want {
        let got = number(report, &["deliveries", field])?;
        ensure(got == want, || {
            format!("{field}: {got}, want {want}: {report}")
        })?;
    }
    ensure(
        number(report, &["deliveries", "order_violations"])? == 0.0,
        || format!("order violations: {report}"),
    )
}

/// A fresh, empty directory under cargo's scratch space for tests.
fn scratch_dir(name: &str) -> io::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    match std::fs::remove_dir_all(&dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `--addr A,B,C` spreads the clients round-robin over the nodes of a
/// cluster (three `chat-server --cluster` processes and a real
/// `nats-server`; without it the test says so and passes, unless CI).
#[test]
fn fanout_across_the_nodes_of_a_cluster() -> io::Result<()> {
    let Some(broker) = chat_testkit::nats::Broker::start()? else {
        return Ok(());
    };
    let url = broker.url();
    let nodes = (0..3)
        .map(|_| ServerProcess::start(&["--threads", "1", "--cluster", &url]))
        .collect::<io::Result<Vec<_>>>()?;
    let addrs: Vec<String> = nodes.iter().map(|node| node.addr.clone()).collect();
    chat_testkit::nats::wait_for_room(&addrs)?;
    let joined = addrs.join(",");
    let mut args = vec![
        "fanout", "--addr", &joined, "-n", "6", "-m", "25", "--window", "4", "--json", "-q",
    ];
    // The whole cluster's CPU: the broker's and every node's.
    let pids: Vec<String> = broker
        .pid()
        .into_iter()
        .chain(nodes.iter().map(ServerProcess::pid))
        .map(|pid| pid.to_string())
        .collect();
    for pid in &pids {
        args.extend(["--server-pid", pid]);
    }
    let report = json_report(&chat_load(&args)?)?;
    // 6 senders, two on each node, × 25 lines × 6 readers.
    ensure_deliveries(
        &report,
        &[("expected", 900.0), ("delivered", 900.0), ("lost", 0.0)],
    )?;
    ensure(number(&report, &["server", "processes"])? == 4.0, || {
        format!("CPU not summed over the broker and 3 nodes: {report}")
    })?;
    ensure(number(&report, &["server", "cpu_s"])? > 0.0, || {
        format!("no CPU for the cluster: {report}")
    })
}

#[test]
fn fanout_counts_every_delivery_and_the_servers_cpu() -> io::Result<()> {
    let server = ServerProcess::start(&["--threads", "1"])?;
    let pid = server.pid().to_string();
    let output = chat_load(&[
        "fanout",
        "--addr",
        &server.addr,
        "-n",
        "6",
        "-m",
        "25",
        "--window",
        "4",
        "--server-pid",
        &pid,
        "--json",
        "-q",
    ])?;
    let report = json_report(&output)?;
    // Everyone hears everyone, its own echo included: 6 senders × 25 × 6.
    ensure_deliveries(
        &report,
        &[("expected", 900.0), ("delivered", 900.0), ("lost", 0.0)],
    )?;
    ensure(report["complete"] == Value::Bool(true), || {
        format!("incomplete: {report}")
    })?;
    ensure(
        number(&report, &["latency_us", "samples"])? == 900.0,
        || format!("one latency sample per delivery: {report}"),
    )?;
    ensure(number(&report, &["server", "cpu_s"])? > 0.0, || {
        format!("no server CPU with --server-pid: {report}")
    })
}

/// Against a server run with `--names --announce-present` the tool names
/// each connection itself and takes the `present` line in its stride.
#[test]
fn scenarios_run_against_a_server_with_names_and_presence() -> io::Result<()> {
    let server = ServerProcess::start(&["--names", "--announce-present"])?;
    let fanout = chat_load(&[
        "fanout",
        "--addr",
        &server.addr,
        "-n",
        "4",
        "-m",
        "10",
        "--json",
        "-q",
    ])?;
    let report = json_report(&fanout)?;
    ensure_deliveries(&report, &[("delivered", 160.0), ("lost", 0.0)])?;
    let churn = chat_load(&[
        "churn",
        "--addr",
        &server.addr,
        "-n",
        "5",
        "-m",
        "20",
        "--json",
        "-q",
    ])?;
    let report = json_report(&churn)?;
    ensure(number(&report, &["churn", "cycles"])? == 20.0, || {
        format!("churn: {report}")
    })?;
    ensure(report["complete"] == Value::Bool(true), || {
        format!("incomplete: {report}")
    })
}

#[test]
fn rate_reports_latency_at_the_offered_load() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let output = chat_load(&[
        "rate",
        "--addr",
        &server.addr,
        "-n",
        "8",
        "--rate",
        "20",
        "--duration",
        "0.5",
        "--json",
        "-q",
    ])?;
    let report = json_report(&output)?;
    ensure(
        number(&report, &["deliveries", "offered_per_s"])? == 8.0 * 20.0 * 8.0,
        || format!("offered: {report}"),
    )?;
    ensure(number(&report, &["deliveries", "lost"])? == 0.0, || {
        format!("lost: {report}")
    })?;
    let sent = number(&report, &["deliveries", "sent"])?;
    ensure(sent >= 8.0 * 5.0, || format!("too few sent: {report}"))?;
    ensure(
        number(&report, &["latency_us", "p99"])? >= number(&report, &["latency_us", "p50"])?,
        || format!("percentiles out of order: {report}"),
    )
}

/// With the server's default flood control, the ordinary clients lose
/// nothing while the flooder is held back; the report says what it got through.
#[test]
fn flood_reports_the_ordinary_clients_and_the_flooder() -> io::Result<()> {
    let server = ServerProcess::start(&[])?;
    let output = chat_load(&[
        "flood",
        "--addr",
        &server.addr,
        "--duration",
        "1",
        "--json",
        "-q",
    ])?;
    let report = json_report(&output)?;
    ensure(report["scenario"] == "flood", || format!("{report}"))?;
    // Ten clients at 20 lines/s for a second, everyone hears everyone.
    ensure(
        number(&report, &["deliveries", "delivered"])? == 10.0 * 20.0 * 10.0,
        || format!("ordinary clients lost lines: {report}"),
    )?;
    ensure(number(&report, &["deliveries", "lost"])? == 0.0, || {
        format!("lost: {report}")
    })?;
    let written = number(&report, &["flood", "bytes_written"])?;
    let let_through = number(&report, &["flood", "bytes_received"])?;
    // Held back: the server echoed far less than the flooder wrote.
    ensure(written > 4.0 * let_through, || {
        format!("the flooder was not held back: {report}")
    })
}

/// One address over the server's default `--max-clients-per-ip`: the tool
/// says which flag to pass.
#[test]
fn a_per_address_refusal_names_the_flag() -> io::Result<()> {
    let server = ServerProcess::start(&["--max-clients-per-ip", "5"])?;
    let output = chat_load(&["fanout", "--addr", &server.addr, "-n", "8", "-m", "1", "-q"])?;
    ensure(!output.status.success(), || "it ran".into())?;
    let stderr = stderr_of(&output);
    ensure(stderr.contains("--max-clients-per-ip"), || {
        format!("unclear refusal: {stderr}")
    })
}

#[test]
fn addresses_off_loopback_are_refused_before_any_traffic() -> io::Result<()> {
    // 192.0.2.0/24 is reserved for documentation: nothing answers there.
    let output = chat_load(&["fanout", "--addr", "192.0.2.1:8000", "-q"])?;
    ensure(!output.status.success(), || "it ran".into())?;
    let stderr = stderr_of(&output);
    ensure(
        stderr.contains("only loads servers on this machine's loopback"),
        || format!("unclear refusal: {stderr}"),
    )
}

#[test]
fn a_server_that_is_not_there_is_a_clear_error() -> io::Result<()> {
    // A port that was free a moment ago: nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let output = chat_load(&["fanout", "--addr", &addr, "-n", "2", "-m", "1", "-q"])?;
    ensure(!output.status.success(), || "it ran".into())?;
    let stderr = stderr_of(&output);
    ensure(
        stderr.starts_with("chat-load: ") && stderr.contains(&addr),
        || format!("unclear error: {stderr}"),
    )
}

#[test]
fn compare_refuses_a_server_arg_it_sets_itself() -> io::Result<()> {
    let output = chat_load(&["compare", "--server-arg=--threads", "--server-arg=4", "-q"])?;
    ensure(!output.status.success(), || "it ran".into())?;
    let stderr = stderr_of(&output);
    ensure(stderr.contains("use --server-threads"), || {
        format!("unclear refusal: {stderr}")
    })
}

#[test]
fn compare_runs_models_and_a_peer_and_writes_table_json_and_plot() -> io::Result<()> {
    let out = scratch_dir("compare")?;
    let out_arg = out.to_string_lossy().into_owned();
    let server_bin = chat_testkit::process::binary("chat-server")?;
    let server_bin = server_bin.to_string_lossy();
    // Our own binary stands in for a foreign server: the peer path only
    // needs something that takes its address on the command line.
    let peer = format!("mirror={server_bin} --addr {{addr}} --model locked");
    let output = compare_small(
        &server_bin,
        &out_arg,
        &[
            "--models",
            "sharded,broadcaster",
            "--peer",
            &peer,
            "--scenarios",
            "fanout,rate,idle",
            "--clients",
            "2,5",
            "-m",
            "10",
            "--rate-clients",
            "5",
            "--rate",
            "10",
            "--duration",
            "0.5",
            "--idle-clients",
            "20",
            "--hold",
            "0.2",
        ],
    )?;
    ensure(output.status.success(), || {
        format!("compare failed: {}", stderr_of(&output))
    })?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    for server in ["sharded", "broadcaster", "mirror"] {
        ensure(stdout.contains(&format!("| {server} ")), || {
            format!("no row for {server}:\n{stdout}")
        })?;
    }
    for column in [
        "fanout n=2 del/s",
        "fanout n=5 del/s",
        "rate n=5 p99",
        "idle n=20 KiB/conn settled",
        "idle n=20 KiB/conn held",
    ] {
        ensure(stdout.contains(column), || {
            format!("no column {column}:\n{stdout}")
        })?;
    }

    let markdown = std::fs::read_to_string(out.join("compare.md"))?;
    ensure(markdown.contains("our servers on 1"), || {
        format!("compare.md does not say how many threads our servers had:\n{markdown}")
    })?;
    ensure(markdown.contains("--model sharded --threads 1"), || {
        format!("compare.md does not give our servers' command:\n{markdown}")
    })?;

    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json"))?)
        .map_err(io::Error::other)?;
    ensure(json["machine"]["server_threads"] == 1, || {
        format!("machine: {}", json["machine"])
    })?;
    let rows = json["rows"].as_array().map(Vec::len);
    ensure(rows == Some(3), || format!("rows: {rows:?}"))?;
    for row in json["rows"].as_array().into_iter().flatten() {
        for cell in row["cells"].as_array().into_iter().flatten() {
            ensure(cell["error"].is_null(), || format!("a run failed: {cell}"))?;
            let lost = &cell["report"]["deliveries"]["lost"];
            ensure(lost.is_null() || *lost == 0, || {
                format!("lost deliveries: {cell}")
            })?;
        }
    }

    let svg = std::fs::read_to_string(out.join("compare.svg"))?;
    ensure(svg.contains("<svg") && svg.contains("mirror"), || {
        "compare.svg is not a plot naming every server".into()
    })?;
    for panel in [
        "fanout: p99 latency",
        "rate n=5: latency",
        "idle n=20: server memory",
    ] {
        ensure(svg.contains(panel), || {
            format!("compare.svg has no panel {panel:?}")
        })?;
    }

    // The saved comparison redrawn, with no server to run.
    let replotted = out.join("replot");
    let replotted_arg = replotted.to_string_lossy().into_owned();
    let saved = out.join("compare.json").to_string_lossy().into_owned();
    let output = chat_load(&["compare", "--replot", &saved, "--out", &replotted_arg])?;
    ensure(output.status.success(), || {
        format!("replot failed: {}", stderr_of(&output))
    })?;
    ensure(
        std::fs::read_to_string(replotted.join("compare.md"))? == markdown,
        || "the replotted compare.md differs from the original".into(),
    )?;
    ensure(replotted.join("compare.svg").exists(), || {
        "replot wrote no compare.svg".into()
    })
}

/// `compare` runs a routed NATS cluster, the clients speaking NATS, and
/// removes its brokers' stores when done.
#[test]
fn compare_runs_a_nats_cluster() -> io::Result<()> {
    compare_clusters(
        "compare-nats-cluster",
        &["--nats-cluster", "3"],
        &["nats-cluster-3"],
    )
    .map(drop)
}

/// `compare` runs a cluster of our nodes with its broker as a target, and
/// cleans up after it (its broker's store is removed once the broker
/// stopped). One node, as a group of its own: the two sizes as one
/// `--cluster-nodes 1,3` run one after the other took 5 s, the longest
/// test of this file.
#[test]
fn compare_runs_a_cluster_of_ours() -> io::Result<()> {
    compare_clusters(
        "compare-our-cluster",
        &["--cluster-nodes", "1"],
        &["cluster-1"],
    )
    .map(drop)
}

/// The same with three nodes, whose broker `compare` restarts during
/// `rate` when asked.
#[test]
fn compare_runs_a_cluster_of_ours_through_a_broker_restart() -> io::Result<()> {
    let Some(rows) = compare_clusters(
        "compare-our-cluster-restart",
        &["--cluster-nodes", "3", "--broker-restart", "0.5"],
        &["cluster-3"],
    )?
    else {
        return Ok(());
    };
    let rate_of_3 = &rows[0]["cells"][1]["report"];
    let notes = rate_of_3["notes"].to_string();
    ensure(notes.contains("broker killed (SIGKILL)"), || {
        format!("no broker restart in cluster-3's rate run: {rate_of_3}")
    })
}

/// `compare --peers-only` of the cluster groups `groups` asks for, fanout
/// and a 1 s rate point each: checks that the rows are `want`, in order,
/// each delivered something and lost nothing, and that no broker store was
/// left behind; returns the rows, or `None` without a `nats-server` (the
/// test says so and passes, unless CI).
fn compare_clusters(
    scratch: &str,
    groups: &[&str],
    want: &[&str],
) -> io::Result<Option<Vec<Value>>> {
    if chat_testkit::nats::nats_server_binary()?.is_none() {
        return Ok(None);
    }
    let out = scratch_dir(scratch)?;
    let out_arg = out.to_string_lossy().into_owned();
    let server_bin = chat_testkit::process::binary("chat-server")?;
    let mut args = vec!["--peers-only"];
    args.extend_from_slice(groups);
    args.extend_from_slice(&[
        "--scenarios",
        "fanout,rate",
        "--clients",
        "6",
        "-m",
        "10",
        "--rate-clients",
        "6",
        "--rate",
        "20",
        "--duration",
        "1",
        "--drain",
        "5",
    ]);
    let output = compare_small(&server_bin.to_string_lossy(), &out_arg, &args)?;
    ensure(output.status.success(), || {
        format!("compare failed: {}", stderr_of(&output))
    })?;
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json"))?)
        .map_err(io::Error::other)?;
    let rows = json["rows"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = rows.iter().filter_map(|r| r["server"].as_str()).collect();
    ensure(names == want, || format!("rows: {names:?}, want {want:?}"))?;
    for row in &rows {
        for cell in row["cells"].as_array().cloned().unwrap_or_default() {
            let d = &cell["report"]["deliveries"];
            let what = format!("{} {}", row["server"], cell["label"]);
            ensure(d["delivered"].as_f64().is_some_and(|n| n > 0.0), || {
                format!("{what}: nothing delivered: {cell}")
            })?;
            for field in ["lost", "backwards"] {
                ensure(d[field] == 0, || format!("{what}: {field}: {cell}"))?;
            }
        }
    }
    let leftovers = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".store"))
        .count();
    ensure(leftovers == 0, || format!("{leftovers} broker stores left"))?;
    Ok(Some(rows))
}
