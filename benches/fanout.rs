//! Fan-out throughput: deliveries per second for every model at n = 2, 16,
//! 128 and 512 clients.
//!
//! **Setup (not timed).** For each model and n, a real server
//! ([`TestServer`], its own two-worker runtime, `127.0.0.1:0`, default
//! [`Config`]) and n clients, connected one after another; every greeting
//! and every arrival announcement is read before timing starts. The server's
//! live task count is then printed to stderr beside the model's designed
//! count, e.g. `tasks: model=broadcaster n=128 alive=258 (2n+2 = 258)`.
//!
//! **Timed (`iter_custom`).** Every client is a sender. One iteration is a
//! round: every client sends `k` lines of 64-byte payload (`k` = 1024, 64,
//! 4, 1 for n = 2, 16, 128, 512, so a round is 4 Ki to 256 Ki deliveries),
//! keeping at most 16 of its own lines in flight (unechoed), and the round
//! ends when every client has received every line, its own echoes
//! included; only then does anyone start the next. A sample of `iters`
//! rounds is timed from the first line sent to the last line received.
//! The rounds bound each client's backlog in the server to one round, so a
//! client descheduled for a while is never far enough behind to trip a
//! slow-client limit (the `broadcast` ring holds 16,384 messages by default).
//! Each client checks the order of every sender's lines (a sequence number
//! in the payload), so a loss or reordering is reported, and a flow with no
//! progress for 10 s fails the bench instead of hanging it. The clients run
//! on a separate two-worker runtime, made once for the whole group.
//!
//! **Throughput** is `Throughput::Elements`, and an element is a
//! *delivery*: one line received by one client, summed over the clients
//! (n² k per iteration), so criterion's `thrpt` in `elem/s` reads as
//! deliveries per second. There is one benchmark group per n, named
//! `fanout n=N (elements = deliveries)`, with the four models side by side
//! in it: criterion's summary of a group that spans several n plots time
//! per iteration against n² k "Input Size (Elements)" on a linear axis,
//! which says nothing a reader can use, while one n per group compares the
//! models at equal work. The machine is shared by the server's runtime and
//! the clients' runtime, so the figures are for comparing models with each
//! other on one machine, not absolute capacity.
//!
//! Run only this bench with `cargo bench -p chat-benches --bench fanout`;
//! one model with `... --bench fanout -- sharded`, one n with
//! `... --bench fanout -- n=128`. The groups set their own sample size
//! and times, which take precedence over `--measurement-time` on the
//! command line; `--quick` shortens the run. HTML reports (each group's
//! models side by side) are in `target/criterion/fanout n=N (elements =
//! deliveries)/`.

use chat_benches as common;

use std::io;
use std::time::Duration;

use chat_server::harness::TestServer;
use chat_server::{Config, Model};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio::runtime::Runtime;

use common::Peer;

/// Client counts, and the lines each client sends per iteration at that
/// count: enough for an iteration to dwarf timer noise at n = 2, one line
/// each at n = 512 (already 262,144 deliveries).
const SIZES: [(usize, u64); 4] = [(2, 1024), (16, 64), (128, 4), (512, 1)];

/// A flow that delivers nothing for this long has lost lines or hung.
const STALL: Duration = Duration::from_secs(10);

/// A running server with its connected clients.
struct Room {
    server: TestServer,
    peers: Vec<Peer>,
}

/// Starts a `model` server, connects `n` clients and prints the task count.
fn open_room(runtime: &Runtime, model: Model, n: usize) -> io::Result<Room> {
    // Up to 512 clients from 127.0.0.1, each sending as fast as the room
    // takes it: no per-address limit and no input budget.
    let server = TestServer::start(
        Config::with_model(model)
            .without_abuse_limits()
            .with(|c| c.history = common::bench_history()),
    )?;
    let peers = runtime.block_on(common::connect_peers(server.addr(), n))?;
    // Every task is spawned by the time its client has its greeting; the
    // short wait only covers the runtime's metrics catching up.
    let expected = model.expected_tasks(n);
    let _ = runtime.block_on(server.wait_for_tasks(expected, Duration::from_secs(2)));
    let alive = server.alive_tasks();
    let formula = if expected == 2 * n + 2 {
        "2n+2"
    } else {
        "2n+1"
    };
    let verdict = if alive == expected { "" } else { " MISMATCH" };
    eprintln!("tasks: model={model} n={n} alive={alive} ({formula} = {expected}){verdict}");
    Ok(Room { server, peers })
}

fn close_room(room: Room) {
    let violations = common::order_violations(&room.peers);
    if violations > 0 {
        eprintln!("ORDER VIOLATIONS: {violations} lines arrived out of per-sender order");
    }
    // Closing the clients first lets the server's shutdown find nothing to flush.
    drop(room.peers);
    common::stop_server(room.server, Duration::from_secs(10));
}

fn fanout(c: &mut Criterion) {
    common::ensure_fd_limit(4 * 512 + 256);
    let runtime = common::client_runtime().expect("client runtime");
    for (n, k) in SIZES {
        let mut group = c.benchmark_group(group_name(n));
        // Samples here take 5 ms to 300 ms each; flat sampling keeps the run
        // within the time budget where linear sampling would need 55 iterations.
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        let nu = n as u64;
        // Elements are deliveries: every line to every client.
        group.throughput(Throughput::Elements(nu * nu * k));
        for model in Model::ALL {
            // Set up lazily, on the first call, so that a filter on the
            // command line also skips connecting clients for benches it skips.
            let mut room: Option<Room> = None;
            group.bench_function(BenchmarkId::from_parameter(model.name()), |b| {
                let room = room.get_or_insert_with(|| {
                    open_room(&runtime, model, n)
                        .unwrap_or_else(|err| panic!("fanout {model} n={n}: setup: {err}"))
                });
                b.iter_custom(|iters| {
                    let outcome = runtime
                        .block_on(common::run_flow(&mut room.peers, iters, k, STALL))
                        .unwrap_or_else(|err| panic!("fanout {model} n={n}: {err}"));
                    assert!(
                        !outcome.stalled,
                        "fanout {model} n={n}: stalled: {} of {} deliveries, then none for {STALL:?}",
                        outcome.delivered, outcome.expected
                    );
                    outcome.elapsed
                });
            });
            if let Some(room) = room {
                close_room(room);
            }
        }
        group.finish();
    }
}

/// The group of one n, naming what its throughput counts.
fn group_name(n: usize) -> String {
    format!("fanout n={n} (elements = deliveries)")
}

criterion_group!(benches, fanout);
criterion_main!(benches);
