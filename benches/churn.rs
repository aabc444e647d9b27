//! Churn: joins and leaves per second, for every model, with 100 idle
//! clients present.
//!
//! **Setup (not timed).** For each model, a real server ([`TestServer`],
//! its own two-worker runtime, `127.0.0.1:0`, default [`Config`]) and 100
//! idle clients, each with a background task that reads and discards
//! whatever it is sent: every join and leave is announced to all of them,
//! and without a reader their socket buffers would fill. Their write halves
//! stay open so the server never sees them leave.
//!
//! **Timed (`iter_custom`).** One element is one churn: connect, read the
//! greeting, half-close (end of input, as netcat does at the end of stdin),
//! and read until the server closes the connection, which it does only
//! after the client has left the hub. Four churning clients run at once,
//! sharing a sample's iterations; after they finish, the clock runs on
//! until the idle clients have received every announcement the sample
//! caused (one arrival and one departure per churn, to each of the 100), so
//! a model that defers its announcements is charged for them. Every step is
//! bounded by a 10 s timeout.
//!
//! **Throughput** is `Throughput::Elements(1)` per churn, and the group is
//! named for it, `churn (elements = joins+leaves)`: criterion's `elem/s`
//! reads as joins+leaves per second. The four models are side by side in
//! that one group.
//!
//! **`MODEL+present`** runs the same with `--announce-present`: each
//! newcomer also gets the list of the 100 (or more) present, and each model
//! pays for making list, announcement and insert one step (ARCHITECTURE.md,
//! "Who is here?").
//!
//! Each churn leaves one socket in TIME_WAIT on the client side (the client
//! closes first); Linux reuses those ports for loopback connections
//! (`net.ipv4.tcp_tw_reuse` = 2, the default), so the run does not run out
//! of ephemeral ports.
//!
//! Run only this bench with `cargo bench -p chat-benches --bench churn`. The group sets its
//! own sample size and times, which take precedence over
//! `--measurement-time` on the command line; `--quick` shortens the run.

use chat_benches as common;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::TestServer;
use chat_server::{Config, Model};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use common::{unexpected, within, Inbox, SETUP_TIMEOUT};

/// Clients present throughout, receiving every announcement.
const IDLE: usize = 100;

/// Churning clients running at once.
const CHURNERS: u64 = 4;

/// The idle clients and what they have received.
struct Lobby {
    server: TestServer,
    /// Held so the idle clients' input never ends.
    writers: Vec<OwnedWriteHalf>,
    readers: Vec<JoinHandle<()>>,
    /// Lines received by all idle clients together.
    lines: Arc<AtomicU64>,
    /// Signalled after every read of an idle client.
    read: Arc<Notify>,
    stop: CancellationToken,
}

fn open_lobby(runtime: &Runtime, model: Model, present: bool) -> io::Result<Lobby> {
    // More than 100 clients from 127.0.0.1: no per-address limit (and,
    // as in every bench, no input budget).
    let server = TestServer::start(Config::with_model(model).without_abuse_limits().with(|c| {
        c.announce_present = present;
        c.history = common::bench_history();
    }))?;
    let peers = runtime.block_on(common::connect_peers(server.addr(), IDLE))?;
    let lines = Arc::new(AtomicU64::new(0));
    let read = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let mut writers = Vec::with_capacity(IDLE);
    let mut readers = Vec::with_capacity(IDLE);
    for peer in peers {
        let (reader, writer) = peer.into_halves();
        writers.push(writer);
        let (lines, read, stop) = (Arc::clone(&lines), Arc::clone(&read), stop.clone());
        readers.push(runtime.spawn(discard(reader, lines, read, stop)));
    }
    if present {
        // `connect_peers` took each one's `present` line for an arrival,
        // so each has one arrival left: wait until those are counted.
        runtime.block_on(within("the last arrivals", async {
            while lines.load(Ordering::Relaxed) < IDLE as u64 {
                let _ = timeout(Duration::from_millis(50), read.notified()).await;
            }
            Ok(())
        }))?;
    }
    Ok(Lobby {
        server,
        writers,
        readers,
        lines,
        read,
        stop,
    })
}

/// An idle client's reader: counts the lines it is sent and drops them.
async fn discard(
    mut reader: Inbox,
    lines: Arc<AtomicU64>,
    read: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        lines.fetch_add(reader.discard_buffered(), Ordering::Relaxed);
        read.notify_one();
        tokio::select! {
            () = stop.cancelled() => return,
            filled = reader.fill() => if let Err(err) = filled {
                eprintln!("churn: an idle client stopped reading: {err}");
                return;
            },
        }
    }
}

fn close_lobby(runtime: &Runtime, lobby: Lobby) {
    lobby.stop.cancel();
    for reader in lobby.readers {
        let _ = runtime.block_on(reader);
    }
    drop(lobby.writers);
    common::stop_server(lobby.server, Duration::from_secs(10));
}

/// One churn: join, read the greeting, end input, wait for the server to close.
async fn churn_once(addr: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut filled = 0;
    while memchr::memchr(b'\n', &buf[..filled]).is_none() {
        if filled == buf.len() {
            return Err(unexpected("greeting longer than the buffer".into()));
        }
        match stream.read(&mut buf[filled..]).await? {
            0 => return Err(unexpected("closed before the greeting".into())),
            read => filled += read,
        }
    }
    if !buf.starts_with(chat_wire::GREETING_PREFIX.as_bytes()) {
        let line = String::from_utf8_lossy(&buf[..filled]);
        return Err(unexpected(format!("expected a greeting, got {line:?}")));
    }
    stream.shutdown().await?;
    // Other churners' arrivals and departures may come before the close.
    while stream.read(buf).await? > 0 {}
    Ok(())
}

/// Runs `count` churns one after another.
async fn churn_many(addr: SocketAddr, count: u64) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    for _ in 0..count {
        within("one churn", churn_once(addr, &mut buf)).await?;
    }
    Ok(())
}

/// `iters` churns spread over [`CHURNERS`] clients, until the idle clients
/// have had every announcement.
async fn churn_sample(lobby: &Lobby, iters: u64) -> io::Result<Duration> {
    let addr = lobby.server.addr();
    let announced_before = lobby.lines.load(Ordering::Relaxed);
    let start = Instant::now();
    let churners: Vec<_> = (0..CHURNERS)
        .map(|i| {
            let count = iters / CHURNERS + u64::from(i < iters % CHURNERS);
            tokio::spawn(churn_many(addr, count))
        })
        .collect();
    for churner in churners {
        churner.await.map_err(io::Error::other)??;
    }
    let expected = announced_before + 2 * IDLE as u64 * iters;
    let deadline = start.elapsed() + SETUP_TIMEOUT;
    loop {
        let announced = lobby.lines.load(Ordering::Relaxed);
        if announced >= expected {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= deadline {
            return Err(unexpected(format!(
                "idle clients got {} of {} announcements",
                announced - announced_before,
                expected - announced_before
            )));
        }
        // Woken by the next read of any idle client; the timeout only
        // bounds the wait if reads stop altogether.
        let _ = timeout(Duration::from_millis(50), lobby.read.notified()).await;
    }
}

fn churn(c: &mut Criterion) {
    let runtime = common::client_runtime().expect("client runtime");
    let mut group = c.benchmark_group("churn (elements = joins+leaves)");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let variants = Model::ALL
        .into_iter()
        .flat_map(|model| [(model, false), (model, true)]);
    for (model, present) in variants {
        let id = match present {
            false => model.name().to_string(),
            true => format!("{model}+present"),
        };
        // Set up lazily so that a filter on the command line skips it too.
        let mut lobby: Option<Lobby> = None;
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            let lobby = lobby.get_or_insert_with(|| {
                open_lobby(&runtime, model, present)
                    .unwrap_or_else(|err| panic!("churn {model}: setup: {err}"))
            });
            b.iter_custom(|iters| {
                runtime
                    .block_on(churn_sample(lobby, iters))
                    .unwrap_or_else(|err| panic!("churn {model}: {err}"))
            });
        });
        if let Some(lobby) = lobby {
            close_lobby(&runtime, lobby);
        }
    }
    group.finish();
}

criterion_group!(benches, churn);
criterion_main!(benches);
