//! Timer-driven behaviour, on paused time, as mini-redis tests it: the server
//! runs on the test's own current-thread runtime, whose clock moves only
//! when every task is waiting, and then straight to the next timer. A loaded
//! machine can make these tests slower, never early or late: each asserts
//! the virtual time at which something happened.
//!
//! The sockets are real (loopback): on loopback a write is readable on the
//! other end as soon as the system call returns, so the runtime never
//! mistakes data in flight for idleness.

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{Config, Model};
use common::ensure;
use common::in_process::InProcess;
use tokio::time::Instant;

for_each_model_paused!(
    idle_clients_time_out,
    unnamed_client_times_out,
    shutdown_abandons_a_stuck_client_after_the_grace
);

/// A silent client is cut off exactly `--idle-timeout` after it connected;
/// one that keeps talking stays, and hears the other leave.
async fn idle_clients_time_out(model: Model) -> io::Result<()> {
    let idle = Duration::from_secs(30);
    let server =
        InProcess::start(Config::with_model(model).with(|c| c.idle_timeout = Some(idle))).await?;
    let mut talker = TestClient::connect(server.addr()).await?;
    let talker_who = talker.who.clone();
    let connected = Instant::now();
    let mut silent = TestClient::connect(server.addr()).await?;
    let silent_who = silent.who.clone();
    let talking = tokio::spawn(async move {
        for i in 0..12 {
            talker.send(&format!("tick {i}")).await?;
            tokio::time::sleep(idle / 4).await;
        }
        Ok::<_, io::Error>(talker)
    });

    // It hears the ticks, but listening is not talking.
    loop {
        let line = silent.line_within(idle * 2).await?;
        if line == "error: idle timeout" {
            break;
        }
    }
    let after = connected.elapsed();
    ensure(after == idle, || {
        format!("{model}: timed out after {after:?}, not {idle:?}")
    })?;
    ensure(silent.lines_until_closed().await?.is_empty(), || {
        "more after the error".into()
    })?;

    let mut talker = talking.await.map_err(io::Error::other)??;
    let mut lines = Vec::new();
    while !lines.contains(&format!("{talker_who}: tick 11")) {
        lines.push(talker.line_within(idle * 4).await?);
    }
    ensure(lines.contains(&format!("{silent_who} has left")), || {
        format!("{model}: {lines:?}")
    })?;
    drop(talker);
    server.stop().await
}

/// Under `--names` the idle timeout runs before a client has named itself
/// too: it is cut off `--idle-timeout` after its last byte, and as it was
/// never in the room nobody hears it leave.
async fn unnamed_client_times_out(model: Model) -> io::Result<()> {
    let idle = Duration::from_secs(30);
    let server = InProcess::start(Config::with_model(model).with(|c| {
        c.idle_timeout = Some(idle);
        c.names = true;
    }))
    .await?;
    let mut watcher = TestClient::connect_raw(server.addr()).await?;
    watcher.expect("Enter your name:").await?;
    watcher.send("watcher").await?;
    watcher.expect("You are watcher").await?;
    let mut silent = TestClient::connect_raw(server.addr()).await?;
    silent.expect("Enter your name:").await?;
    tokio::time::sleep(idle / 2).await;
    // Half a name is a byte: the clock starts again.
    silent.send_raw(b"half").await?;
    let typed = Instant::now();
    // The watcher talks too, so that only the silent one times out.
    watcher.send("tick").await?;
    watcher.expect("watcher: tick").await?;
    tokio::time::sleep(idle * 3 / 4).await;
    watcher.send("tock").await?;
    watcher.expect("watcher: tock").await?;
    let line = silent.line_within(idle).await?;
    ensure(line == "error: idle timeout", || {
        format!("{model}: got {line:?}")
    })?;
    let after = typed.elapsed();
    ensure(after == idle, || {
        format!("{model}: timed out {after:?} after its last byte, not {idle:?}")
    })?;
    ensure(silent.lines_until_closed().await?.is_empty(), || {
        "more after the error".into()
    })?;
    watcher.send("alone").await?;
    watcher.expect("watcher: alone").await?;
    drop(watcher);
    server.stop().await
}

/// On shutdown a client that reads nothing keeps its writer waiting; the
/// server gives up on it when `--shutdown-grace` is over, not before and
/// not long after, and the others get `server shutting down` at once.
async fn shutdown_abandons_a_stuck_client_after_the_grace(model: Model) -> io::Result<()> {
    let grace = Duration::from_secs(5);
    let server = InProcess::start(Config::with_model(model).without_abuse_limits().with(|c| {
        c.shutdown_grace = grace;
        // Longer than the grace: only the shutdown may end the stuck client.
        c.write_timeout = Duration::from_secs(60);
        // The talker's 20 MB burst is a flood by the default input budget
        // (and on paused time its grace passes at once): what is tested
        // here is the shutdown, so flood control is off.
    }))
    .await?;
    let stuck = TestClient::connect(server.addr()).await?;
    let mut talker = TestClient::connect(server.addr()).await?;
    // Enough to fill the stuck client's socket buffers, so its writer waits.
    let line = "z".repeat(1000);
    let lines = 20_000;
    for _ in 0..lines {
        talker.send(&line).await?;
    }
    let last = format!("{}: {line}", talker.who);
    let mut seen = 0;
    while seen < lines {
        if talker.line().await? == last {
            seen += 1;
        }
    }

    let stopping = Instant::now();
    let stopped = server.stop();
    let mut rest = talker.lines_until_closed().await?;
    ensure(
        rest.pop().as_deref() == Some("server shutting down"),
        || format!("{model}: the talker's last line was not the notice"),
    )?;
    ensure(stopping.elapsed() < grace, || {
        format!("{model}: the talker waited for the stuck client")
    })?;
    stopped.await?;
    let took = stopping.elapsed();
    ensure(
        took >= grace && took < grace + Duration::from_secs(1),
        || format!("{model}: shutdown took {took:?} with a {grace:?} grace"),
    )?;
    drop(stuck);
    Ok(())
}
