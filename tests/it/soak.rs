//! A bounded soak: minutes of churn against each model, then checks that
//! the live task count is back at its baseline and memory is flat.
//!
//! Not part of the default run:
//! `cargo test --release --test it soak:: -- --ignored --nocapture`
//! (`SOAK_SECS` sets the seconds per model, 60 by default). The figures it
//! prints are the ones to quote.
//!
//! Workload, all at once: 20 chatters talking every 10 ms and reading
//! everything; clients that join, talk and leave in a loop; clients that
//! reset mid-line; slow readers; and a client that never reads (the server
//! runs with a small `--max-pending` and a 1 s `--write-timeout` so it gets
//! dropped and comes back). Server and clients share this process, so the
//! memory figure is the process's; it is sampled while the load is steady
//! and again once everyone has left.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use chat_testkit::proc::Proc;
use common::ensure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: cargo test --release --test it soak:: -- --ignored"]
async fn soak_sharded() -> io::Result<()> {
    soak(Model::Sharded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: cargo test --release --test it soak:: -- --ignored"]
async fn soak_broadcaster() -> io::Result<()> {
    soak(Model::Broadcaster).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: cargo test --release --test it soak:: -- --ignored"]
async fn soak_locked() -> io::Result<()> {
    soak(Model::Locked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: cargo test --release --test it soak:: -- --ignored"]
async fn soak_broadcast() -> io::Result<()> {
    soak(Model::Broadcast).await
}

/// This process's resident memory (server and clients together), 0 where
/// `/proc` cannot be read.
fn rss_kib() -> u64 {
    Proc::Myself.memory().map_or(0, |memory| memory.rss_kib)
}

#[derive(Default)]
struct Counts {
    chat_lines: AtomicU64,
    sessions: AtomicU64,
    resets: AtomicU64,
    kicks: AtomicU64,
}

async fn soak(model: Model) -> io::Result<()> {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(60);
    let duration = Duration::from_secs(secs);
    let server = TestServer::start(Config::with_model(model).without_abuse_limits().with(|c| {
        c.max_pending = 256 * 1024;
        c.write_timeout = Duration::from_secs(1);
        // Chatters send as fast as they can, from one address.
    }))?;
    let addr = server.addr();
    let baseline = model.expected_tasks(0);
    let deadline = Instant::now() + duration;
    let counts = Arc::new(Counts::default());

    let mut workers = Vec::new();
    for _ in 0..20 {
        workers.push(tokio::spawn(chatter(addr, deadline, Arc::clone(&counts))));
    }
    for _ in 0..4 {
        workers.push(tokio::spawn(churner(addr, deadline, Arc::clone(&counts))));
    }
    for _ in 0..2 {
        workers.push(tokio::spawn(resetter(addr, deadline, Arc::clone(&counts))));
        workers.push(tokio::spawn(slow_reader(
            addr,
            deadline,
            Arc::clone(&counts),
        )));
    }
    workers.push(tokio::spawn(stuck(addr, deadline, Arc::clone(&counts))));

    let started = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5).min(duration / 4)).await;
        samples.push((started.elapsed().as_secs(), server.alive_tasks(), rss_kib()));
    }
    for worker in workers {
        worker.await.map_err(io::Error::other)??;
    }
    let settled = server
        .wait_for_tasks(baseline, Duration::from_secs(30))
        .await;
    let rss_end = rss_kib();
    println!("{model}: {secs} s soak");
    for (at, tasks, rss) in &samples {
        println!("  t={at:>4}s  tasks={tasks:>5}  rss={rss} KiB");
    }
    println!(
        "  after: tasks={} (baseline {baseline})  rss={rss_end} KiB; {} chat lines read, {} sessions, {} resets, {} stuck-client disconnects",
        server.alive_tasks(),
        counts.chat_lines.load(Ordering::Relaxed),
        counts.sessions.load(Ordering::Relaxed),
        counts.resets.load(Ordering::Relaxed),
        counts.kicks.load(Ordering::Relaxed),
    );
    settled.map_err(|alive| {
        io::Error::other(format!("{model}: {alive} tasks left, baseline {baseline}"))
    })?;
    // Flat: once everyone has gone, no more resident than under steady load
    // early on (allowing for allocator slack).
    let steady = samples
        .get(1)
        .or(samples.first())
        .map_or(rss_end, |sample| sample.2);
    ensure(rss_end <= steady + steady / 2 + 8 * 1024, || {
        format!("{model}: RSS grew from {steady} KiB under load to {rss_end} KiB after")
    })
}

/// Talks every 10 ms and reads everything until the deadline.
async fn chatter(addr: SocketAddr, deadline: Instant, counts: Arc<Counts>) -> io::Result<()> {
    let client = TestClient::connect(addr).await?;
    let (mut reader, mut writer) = client.into_parts();
    let reading = {
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 16 * 1024];
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
                counts
                    .chat_lines
                    .fetch_add(memchr_count(&chunk[..n]), Ordering::Relaxed);
            }
        })
    };
    let mut seq = 0u64;
    let padding = "p".repeat(180);
    while Instant::now() < deadline {
        writer
            .write_all(format!("chatter line {seq} {padding}\n").as_bytes())
            .await?;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.shutdown().await?;
    let _ = reading.await;
    Ok(())
}

fn memchr_count(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Joins, says a few lines, reads its echoes, leaves; again and again.
async fn churner(addr: SocketAddr, deadline: Instant, counts: Arc<Counts>) -> io::Result<()> {
    while Instant::now() < deadline {
        let mut client = TestClient::connect(addr).await?;
        for i in 0..3 {
            client.send(&format!("churn {i}")).await?;
        }
        let mine = format!("{}: churn 2", client.who);
        while client.line().await? != mine {}
        client.finish().await?;
        client.lines_until_closed().await?;
        counts.sessions.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends half a line, then resets the connection.
async fn resetter(addr: SocketAddr, deadline: Instant, counts: Arc<Counts>) -> io::Result<()> {
    while Instant::now() < deadline {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_zero_linger()?;
        let (mut reader, mut writer) = stream.into_split();
        let mut greeting = [0u8; 8];
        reader.read_exact(&mut greeting).await?;
        writer.write_all(b"half a li").await?;
        drop((reader, writer));
        counts.resets.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Reads 1 KiB every 50 ms for 3 s, then leaves.
async fn slow_reader(addr: SocketAddr, deadline: Instant, counts: Arc<Counts>) -> io::Result<()> {
    while Instant::now() < deadline {
        let client = TestClient::connect(addr).await?;
        let (mut reader, mut writer) = client.into_parts();
        let until = Instant::now() + Duration::from_secs(3);
        let mut chunk = vec![0u8; 1024];
        while Instant::now() < until {
            if reader.read(&mut chunk).await? == 0 {
                counts.kicks.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writer.shutdown().await?;
        counts.sessions.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Never reads for 8 s at a time (long enough at the chatters' rate to
/// overflow the kernel's buffers and its queue), then counts whether the
/// server dropped it.
async fn stuck(addr: SocketAddr, deadline: Instant, counts: Arc<Counts>) -> io::Result<()> {
    while Instant::now() < deadline {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    counts.kicks.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
        counts.sessions.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
