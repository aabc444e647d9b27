//! The flood-fairness acceptance test, in every model under every
//! `--slow-client` policy (but `broadcast` + `block`, which is refused at
//! start), with the default limits: one client writes 100-byte lines as
//! fast as TCP lets it, while ten ordinary clients each send one line every
//! 50 ms for a second and read at 2 MB/s. No ordinary client may be disconnected or lose
//! a line, and their end-to-end latency (send to parse, reading pace
//! included) must stay low.
//!
//! Without flood control the same room empties: the flooder fills every
//! queue within a second and the ordinary clients are dropped as too slow
//! (`disconnect`), lose most lines (`drop`), or wait seconds (`block`):
//! with `flood_lines` and `flood_bytes` set to 0, all 11 cases of this
//! file failed so (lines lost, clients dropped or stalled, `block` p99
//! 21 s; 6 December 2026). The
//! target is p99 < 100 ms, and each case prints its figures; the assertion
//! allows 250 ms, because this runs beside other tests on a shared 2-core
//! CI machine, and 250 ms still fails every unprotected policy by far.

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, SlowClientPolicy};
use common::ensure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const ORDINARY: usize = 10;
/// Lines each ordinary client sends: a second's worth, as long as the
/// flooder needs to drown an unprotected room (was 40, two seconds; the
/// eleven cases two at a time took 12 s of every `cargo test`).
const LINES_EACH: usize = 20;
const SEND_EVERY: Duration = Duration::from_millis(50);
/// How fast an ordinary client reads, in bytes per second.
const READ_RATE: f64 = 2_000_000.0;
const P99_TARGET: Duration = Duration::from_millis(100);
const P99_ASSERTED: Duration = Duration::from_millis(250);
/// Bounds the case's reads and the flooder, whatever goes wrong...
const WITHIN: Duration = Duration::from_secs(30);
/// ... and, with this, the whole case, connects and shutdown included:
/// without flood control the `broadcast` room once took 124 s to fail,
/// most of it in the ordinary clients' connects.
const CLOSING: Duration = Duration::from_secs(10);

// The cases run as many at once as the harness runs tests (eight, from
// .cargo/config.toml). They were held to two at a time on the grounds that
// each flooder writes as fast as TCP lets it; but flood control stops
// reading a flooder within its burst, so a case takes about 0.03 CPU-seconds
// (the eleven: 0.25-0.30 s of task-clock). Eight at a time gave p99s of
// 1.6-2.8 ms (one case in eleven 33-38 ms, as at two at a time) beside a
// busy build, and the file takes 1.9 s instead of 5.8 s; with flood control
// off, every case still fails.

macro_rules! cases {
    ($($name:ident: $model:ident, $policy:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> io::Result<()> {
            let case = flood_fairness(Model::$model, SlowClientPolicy::$policy);
            tokio::time::timeout(WITHIN + CLOSING, case)
                .await
                .map_err(|_| io::Error::other(format!(
                    "{}/{}: not done within {:?}",
                    Model::$model,
                    SlowClientPolicy::$policy,
                    WITHIN + CLOSING
                )))?
        }
    )*};
}

cases! {
    sharded_disconnect: Sharded, Disconnect;
    sharded_drop: Sharded, Drop;
    sharded_block: Sharded, Block;
    broadcaster_disconnect: Broadcaster, Disconnect;
    broadcaster_drop: Broadcaster, Drop;
    broadcaster_block: Broadcaster, Block;
    locked_disconnect: Locked, Disconnect;
    locked_drop: Locked, Drop;
    locked_block: Locked, Block;
    broadcast_disconnect: Broadcast, Disconnect;
    broadcast_drop: Broadcast, Drop;
}

async fn flood_fairness(model: Model, policy: SlowClientPolicy) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| c.slow_client = policy))?;
    let addr = server.addr();
    let deadline = Instant::now() + WITHIN;
    let clock = std::time::Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flooder = TestClient::connect(addr).await?;
    let flooder_who = flooder.who.clone();
    let flooding = tokio::spawn(flood(
        flooder,
        Arc::clone(&stop),
        Arc::clone(&flooded),
        deadline,
    ));

    let mut ordinary = Vec::with_capacity(ORDINARY);
    for _ in 0..ORDINARY {
        ordinary.push(TestClient::connect(addr).await?);
    }
    let senders: Arc<Vec<String>> = Arc::new(ordinary.iter().map(|c| c.who.clone()).collect());
    let mut tasks = Vec::new();
    for client in ordinary {
        tasks.push(tokio::spawn(take_part(
            client,
            Arc::clone(&senders),
            clock,
            deadline,
        )));
    }
    let mut latencies = Vec::with_capacity(ORDINARY * ORDINARY * LINES_EACH);
    let mut failures = Vec::new();
    for task in tasks {
        match task.await.map_err(io::Error::other)? {
            Ok(seen) => latencies.extend(seen),
            Err(err) => failures.push(err.to_string()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flooder_end = flooding.await.map_err(io::Error::other)?;
    ensure(failures.is_empty(), || {
        format!("{model}/{policy}: {failures:#?}")
    })?;

    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let (p50, p99, max) = (at(0.50), at(0.99), at(1.0));
    let flooded_mb = flooded.load(Ordering::Relaxed) as f64 / 1e6;
    println!(
        "{model}/{policy}: {} lines, none lost; latency p50 {p50:?} p99 {p99:?} max {max:?} \
         (target p99 < {P99_TARGET:?}); flooder {flooder_who} wrote {flooded_mb:.1} MB, {flooder_end}",
        latencies.len()
    );
    ensure(p99 < P99_ASSERTED, || {
        format!("{model}/{policy}: p99 {p99:?} (p50 {p50:?}, max {max:?}) over {P99_ASSERTED:?}")
    })
}

/// Writes 100-byte lines as fast as the socket takes them, and drains what
/// comes back, until told to stop or cut off. Then resets the connection,
/// so that the server need not read through megabytes of kernel buffers to
/// see it end. Says how it ended and how fast its own echoes came back.
async fn flood(
    client: TestClient,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    deadline: Instant,
) -> String {
    let (reader, writer) = client.into_parts();
    let Ok(stream) = reader.into_inner().reunite(writer) else {
        return "could not be reunited".into();
    };
    let chunk = format!("{}\n", "f".repeat(99)).repeat(640);
    let mut offset = 0;
    let mut sink = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    let mut tail = Vec::new();
    let started = Instant::now();
    let ended = loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break "held back throughout, never cut off";
        }
        tokio::select! {
            ready = stream.writable() => {
                if ready.is_err() {
                    break "could not write";
                }
                match stream.try_write(&chunk.as_bytes()[offset..]) {
                    Ok(n) => {
                        written.fetch_add(n as u64, Ordering::Relaxed);
                        offset = (offset + n) % chunk.len();
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break "could not write",
                }
            }
            ready = stream.readable() => {
                if ready.is_err() {
                    break "could not read";
                }
                match stream.try_read(&mut sink) {
                    Ok(0) => break "was disconnected",
                    Ok(n) => {
                        echoed += n as u64;
                        tail.clear();
                        tail.extend_from_slice(&sink[..n]);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break "was disconnected",
                }
            }
            // Wakes the loop to look at the stop flag.
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    let _ = stream.set_zero_linger();
    let cut = String::from_utf8_lossy(&tail).contains(chat_wire::FLOODING);
    let rate = echoed as f64 / started.elapsed().as_secs_f64() / 1e3;
    format!(
        "{}; its echoes came back at {rate:.0} kB/s",
        if cut {
            "was cut off for flooding"
        } else {
            ended
        }
    )
}

/// One ordinary client: sends `LINES_EACH` lines of `SEQ MICROS`, one every
/// 50 ms, and reads at 2 MB/s until it has every ordinary client's lines.
/// Returns the latency of each.
async fn take_part(
    client: TestClient,
    senders: Arc<Vec<String>>,
    clock: std::time::Instant,
    deadline: Instant,
) -> io::Result<Vec<Duration>> {
    let who = client.who.clone();
    let (mut reader, mut writer) = client.into_parts();
    let sending = tokio::spawn(async move {
        let mut every = tokio::time::interval(SEND_EVERY);
        for seq in 0..LINES_EACH {
            every.tick().await;
            let micros = clock.elapsed().as_micros();
            writer
                .write_all(format!("{seq} {micros}\n").as_bytes())
                .await?;
        }
        Ok::<_, io::Error>(writer)
    });
    let expected = senders.len() * LINES_EACH;
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut latencies = Vec::with_capacity(expected);
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    while latencies.len() < expected {
        let n = tokio::time::timeout_at(deadline, reader.read(&mut chunk))
            .await
            .map_err(|_| {
                io::Error::other(format!("{who}: stalled after {} lines", latencies.len()))
            })??;
        if n == 0 {
            let tail = String::from_utf8_lossy(&pending).into_owned();
            return Err(io::Error::other(format!(
                "{who}: disconnected after {} of {expected} lines (last words {tail:?})",
                latencies.len()
            )));
        }
        let received = clock.elapsed();
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(end) = memchr_newline(&pending[start..]) {
            let line = String::from_utf8_lossy(&pending[start..start + end]).into_owned();
            start += end + 1;
            let Some((from, text)) = line.split_once(chat_wire::CHAT_SEPARATOR) else {
                continue;
            };
            let Some(sender) = senders.iter().find(|s| s.as_str() == from) else {
                continue;
            };
            let mut fields = text.split(' ');
            let (Some(Ok(seq)), Some(Ok(sent))) = (
                fields.next().map(str::parse::<usize>),
                fields.next().map(str::parse::<u64>),
            ) else {
                return Err(io::Error::other(format!("{who}: garbled {line:?}")));
            };
            let due = next.entry(sender.as_str()).or_insert(0);
            ensure(seq == *due, || {
                format!("{who}: {from}'s line {seq} where {due} was due: a line was lost")
            })?;
            *due += 1;
            latencies.push(received.saturating_sub(Duration::from_micros(sent)));
        }
        pending.drain(..start);
        // Read no faster than 2 MB/s.
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / READ_RATE)).await;
    }
    sending.await.map_err(io::Error::other)??;
    Ok(latencies)
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}
