//! Slow reader: the throughput of 16 clients while a 17th never reads, for
//! every model and slow-client policy (`disconnect`, `drop`, `block`).
//!
//! `broadcast` + `block` is skipped (and the skip printed): the server
//! refuses that combination, since a broadcast ring never makes a sender wait.
//!
//! **Setup (not timed).** For each combination, a real server
//! ([`TestServer`], its own two-worker runtime, `127.0.0.1:0`) configured
//! with a small `max_pending` (256 KiB) and a short `write_timeout` (1 s),
//! so the policies engage within a second rather than after the defaults'
//! 32 MiB and 10 s; 16 clients, connected one after another, with every
//! greeting and arrival read; then the extra client, which connects and
//! never reads a byte. Then a fill flow: 64 rounds (as below) in which each
//! of the 16 sends 4,096 lines in all (about 5 MiB for the non-reader, more
//! than its queue and both socket buffers hold), so the policy has engaged
//! before anything is timed: under
//! `disconnect` the non-reader has been dropped, under `drop` its messages
//! are being skipped, under `block` everyone is stalled. The fill's rate and
//! the non-reader's fate are printed to stderr.
//!
//! **Under `block`** the fill stalls (that is the point of showing it): a
//! flow that delivers nothing for 3 s is abandoned, the stall is printed as
//! `STALLED` (with which clients were short of lines), and the combination
//! is not benchmarked, since there is no throughput to time. Should a stall
//! first happen during measurement, it is printed likewise, the sample is
//! charged the time until the stall was declared (at least 3 s), and the
//! server and clients are rebuilt for the next sample, so the bench always
//! terminates.
//!
//! **Timed (`iter_custom`).** As in the `fanout` bench: one iteration is a
//! round in which each of the 16 clients sends 64 lines of 64-byte payload,
//! at most 16 of its own in flight, and the next round starts when all 16
//! have received every line. The rounds keep each reader's backlog to
//! 1,024 lines (about 84 KiB), well under `max_pending`, so the policy only
//! ever applies to the non-reader. **Throughput** is `Throughput::Elements`,
//! an element being a delivery to one of the 16 (16 × 16 × 64 = 16,384 per
//! iteration; the non-reader's share is not counted), and the group is named
//! for it: `slow_reader (elements = deliveries to the 16 readers)`, every
//! model and policy side by side.
//!
//! Run only this bench with `cargo bench -p chat-benches --bench slow_reader`. Setup runs
//! for every combination even under a name filter, because whether a
//! combination is benchmarked at all depends on whether its fill stalls.
//! The group sets its own sample size and times, which take precedence
//! over `--measurement-time` on the command line.

use chat_benches as common;

use std::io;
use std::time::Duration;

use chat_server::harness::TestServer;
use chat_server::{Config, Model, SlowClientPolicy};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

use common::{within, Peer};

/// Clients that read and send.
const CLIENTS: usize = 16;

/// Lines each client sends per iteration.
const LINES: u64 = 64;

/// Rounds of [`LINES`] lines each client sends before timing starts, to
/// exhaust the non-reader's queue and socket buffers (64 × 64 × 16 lines,
/// about 5 MiB).
const FILL_ROUNDS: u64 = 64;

const POLICIES: [SlowClientPolicy; 3] = [
    SlowClientPolicy::Disconnect,
    SlowClientPolicy::Drop,
    SlowClientPolicy::Block,
];

/// Small limits so the policies engage quickly.
const MAX_PENDING: usize = 256 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// No delivery for this long means stalled: three write timeouts, so a
/// policy that waits out one write timeout before acting is not mistaken
/// for a stall.
const STALL: Duration = Duration::from_secs(3);

/// A server, its 16 clients and the one that never reads.
struct Room {
    server: TestServer,
    peers: Vec<Peer>,
    /// Connected, never read; held so it stays connected.
    silent: TcpStream,
    /// How long the fill flow ran (until it was declared stalled, if it was).
    fill_elapsed: Duration,
    /// A flow stalled: the clients may be mid-line and the server stuck, so
    /// the room cannot be measured again.
    stalled: bool,
}

fn config(model: Model, policy: SlowClientPolicy) -> Config {
    Config::with_model(model).without_abuse_limits().with(|c| {
        c.slow_client = policy;
        c.max_pending = MAX_PENDING;
        c.write_timeout = WRITE_TIMEOUT;
        c.history = common::bench_history();
        // The fill floods on purpose: no input budget, as in every bench.
    })
}

/// Starts the server, connects everyone and runs the fill flow. The room
/// comes back stalled if the fill did.
fn open_room(runtime: &Runtime, config: Config, name: &str) -> io::Result<Room> {
    let server = TestServer::start(config)?;
    let addr = server.addr();
    let (peers, silent, fill) = runtime.block_on(async {
        let mut peers = common::connect_peers(addr, CLIENTS).await?;
        let silent = within("connect the non-reader", TcpStream::connect(addr)).await?;
        for peer in &mut peers {
            within("the non-reader's arrival", peer.reader.skip_lines(1)).await?;
        }
        let fill = common::run_flow(&mut peers, FILL_ROUNDS, LINES, STALL).await?;
        io::Result::Ok((peers, silent, fill))
    })?;
    if fill.stalled {
        eprintln!(
            "slow_reader/{name}: STALLED: the {CLIENTS} readers got {} of {} deliveries \
             in the fill, then none for {STALL:?}; {}",
            fill.delivered,
            fill.expected,
            common::stall_report(&peers)
        );
    } else {
        let rate = fill.delivered as f64 / fill.elapsed.as_secs_f64();
        let fate = if peers[0].tally.departures > 0 {
            "disconnected"
        } else {
            "still connected"
        };
        eprintln!(
            "slow_reader/{name}: fill: {} deliveries in {:.2?} ({:.2} M/s); the non-reader is {fate}",
            fill.delivered,
            fill.elapsed,
            rate / 1e6
        );
    }
    Ok(Room {
        server,
        peers,
        silent,
        fill_elapsed: fill.elapsed,
        stalled: fill.stalled,
    })
}

fn close_room(room: Room, name: &str) {
    let violations = common::order_violations(&room.peers);
    if violations > 0 {
        eprintln!(
            "slow_reader/{name}: ORDER VIOLATIONS: {violations} lines out of per-sender order"
        );
    }
    // The non-reader goes first: its closing unblocks a server stuck on it,
    // so the shutdown below need not wait out its grace period.
    drop(room.silent);
    drop(room.peers);
    common::stop_server(room.server, Duration::from_secs(10));
}

/// One combination being benchmarked.
struct Bench<'a> {
    runtime: &'a Runtime,
    config: Config,
    name: String,
    room: Option<Room>,
}

impl Bench<'_> {
    fn room(&mut self) -> &mut Room {
        self.room.get_or_insert_with(|| {
            open_room(self.runtime, self.config.clone(), &self.name)
                .unwrap_or_else(|err| panic!("slow_reader/{}: setup: {err}", self.name))
        })
    }

    /// One sample: `iters` iterations of the flow. A room that stalled is
    /// replaced first; if the replacement stalls in its fill, the sample
    /// is charged that fill's time (at least the stall timeout).
    fn measure(&mut self, iters: u64) -> Duration {
        if self.room().stalled {
            if let Some(stalled) = self.room.take() {
                close_room(stalled, &self.name);
            }
            let room = self.room();
            if room.stalled {
                return room.fill_elapsed;
            }
        }
        let Bench {
            runtime,
            name,
            room,
            ..
        } = self;
        let room = room.as_mut().expect("the room was opened above");
        let outcome = runtime
            .block_on(common::run_flow(&mut room.peers, iters, LINES, STALL))
            .unwrap_or_else(|err| panic!("slow_reader/{name}: {err}"));
        if outcome.stalled {
            room.stalled = true;
            eprintln!(
                "slow_reader/{name}: STALLED during measurement: {} of {} deliveries, then \
                 none for {STALL:?}; {}; the room will be rebuilt for the next sample",
                outcome.delivered,
                outcome.expected,
                common::stall_report(&room.peers)
            );
        }
        outcome.elapsed
    }

    fn close(self) {
        if let Some(room) = self.room {
            close_room(room, &self.name);
        }
    }
}

fn slow_reader(c: &mut Criterion) {
    common::init_logging();
    let runtime = common::client_runtime().expect("client runtime");
    let mut group = c.benchmark_group("slow_reader (elements = deliveries to the 16 readers)");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements((CLIENTS * CLIENTS) as u64 * LINES));

    for model in Model::ALL {
        for policy in POLICIES {
            let name = format!("{model}/{policy}");
            let config = config(model, policy);
            if let Err(refused) = config.validate() {
                eprintln!("slow_reader/{name}: skipped: the server refuses it: {refused}");
                continue;
            }
            let mut bench = Bench {
                runtime: &runtime,
                config,
                name,
                room: None,
            };
            // Whether there is anything to time depends on the fill.
            if bench.room().stalled {
                eprintln!(
                    "slow_reader/{}: not benchmarked: nothing is delivered while the \
                     non-reader holds everyone up",
                    bench.name
                );
            } else {
                group.bench_function(BenchmarkId::new(model.name(), policy.name()), |b| {
                    b.iter_custom(|iters| bench.measure(iters));
                });
            }
            bench.close();
        }
    }
    group.finish();
}

criterion_group!(benches, slow_reader);
criterion_main!(benches);
