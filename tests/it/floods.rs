//! Floods and limits: `--max-clients`, accept errors under a file-descriptor
//! limit, and thousands of connections at once. (`--idle-timeout` is in
//! `timers.rs`, on paused time.)

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use chat_wire::SERVER_FULL;
use common::ensure;
use common::process::ServerProcess;
use tokio::time::Instant;

for_each_model!(over_max_clients_is_told_server_full);

async fn over_max_clients_is_told_server_full(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| c.max_clients = 3))?;
    let mut first = TestClient::connect(server.addr()).await?;
    let _second = TestClient::connect(server.addr()).await?;
    let third = TestClient::connect(server.addr()).await?;

    let mut refused = TestClient::connect_raw(server.addr()).await?;
    let told = refused.line().await?;
    ensure(told == SERVER_FULL, || format!("got {told:?}"))?;
    ensure(refused.lines_until_closed().await?.is_empty(), || {
        "refused client got more".into()
    })?;

    // The others are unaffected.
    first.send("unaffected").await?;
    loop {
        let line = first.line().await?;
        if line == format!("{}: unaffected", first.who) {
            break;
        }
    }
    // A slot frees when a client leaves. Its release follows the departure
    // asynchronously, so retry for a bounded time.
    drop(third);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TestClient::connect(server.addr()).await {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => tokio::task::yield_now().await,
            Err(err) => return Err(err),
        }
    }
}

/// 3,000 connections opened at once and then closed: all accepted, all
/// cleaned up, and the server still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_connections_at_once() -> io::Result<()> {
    const CONNECTIONS: usize = 3000;
    // The server and the clients share this process: two descriptors each.
    chat_testkit::proc::ensure_open_files(2 * CONNECTIONS as u64 + 256)
        .map_err(io::Error::other)?;
    let model = Model::Sharded;
    // All from 127.0.0.1: lift the per-address limit.
    let server = TestServer::start(Config::with_model(model).with(|c| c.max_clients_per_ip = 0))?;
    let addr = server.addr();
    let connecting: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
        .collect();
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for connect in connecting {
        streams.push(connect.await.map_err(io::Error::other)??);
    }
    server
        .wait_for_tasks(model.expected_tasks(CONNECTIONS), Duration::from_secs(60))
        .await
        .map_err(|alive| io::Error::other(format!("{alive} tasks, not all accepted")))?;
    drop(streams);
    server
        .wait_for_tasks(model.expected_tasks(0), Duration::from_secs(60))
        .await
        .map_err(|alive| io::Error::other(format!("{alive} tasks left after all closed")))?;
    let mut client = TestClient::connect(addr).await?;
    client.send("still answering").await?;
    client
        .expect(&format!("{}: still answering", client.who))
        .await
}

/// Out of file descriptors, the server logs once, backs off instead of
/// spinning, keeps serving who it has, and admits the waiting connections
/// once descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_back_off_and_recover() -> io::Result<()> {
    const FILES: u32 = 48;
    const CLIENTS: usize = 60;
    let log = std::env::temp_dir().join(format!("chat-server-emfile-{}.log", std::process::id()));
    let server = ServerProcess::start_with_ulimit(&format!("-n {FILES}"), &[], &log, "warn")?;
    let addr = server.addr.parse().map_err(io::Error::other)?;

    // More connections than the server has descriptors for. The kernel
    // completes the handshakes; the server accepts what it can.
    let mut waiting = Vec::new();
    for _ in 0..CLIENTS {
        waiting.push(TestClient::connect_raw(addr).await?);
    }
    // Each gets 300 ms for its greeting, all at once (one after the
    // other, the 300 ms of every waiting one added up to 6 s).
    let asking: Vec<_> = waiting
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let answer = client.line_within(Duration::from_millis(300)).await;
                let greeted = matches!(answer, Ok(line) if line.starts_with("You are "));
                (client, greeted)
            })
        })
        .collect();
    let mut greeted = Vec::new();
    let mut still_waiting = Vec::new();
    for asked in asking {
        match asked.await.map_err(io::Error::other)? {
            (client, true) => greeted.push(client),
            (client, false) => still_waiting.push(client),
        }
    }
    ensure(!greeted.is_empty() && !still_waiting.is_empty(), || {
        format!(
            "{} greeted, {} waiting: the limit did not bite",
            greeted.len(),
            still_waiting.len()
        )
    })?;

    // Not a hot loop: a second of EMFILE costs little CPU.
    let before = server.cpu_ns()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = Duration::from_nanos(server.cpu_ns()? - before);
    println!("{spent:?} of CPU spent in one second without file descriptors");
    ensure(spent <= Duration::from_millis(200), || {
        format!("{spent:?} of CPU in one second of accept errors")
    })?;

    // It still serves the connections it has.
    let speaker = &mut greeted[0];
    speaker.send("still serving").await?;
    let expected = format!("{}: still serving", speaker.who);
    while speaker.line().await? != expected {}

    // Free descriptors: everyone waiting gets in.
    drop(greeted);
    for client in &mut still_waiting {
        let line = client.line().await?;
        ensure(line.starts_with("You are "), || {
            format!("expected a greeting, got {line:?}")
        })?;
    }
    let log_text = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_file(&log);
    ensure(!log_text.contains('\x1b'), || {
        format!("terminal colour codes in a log file:\n{log_text:?}")
    })?;
    let warnings = log_text.matches("accept failed").count();
    ensure((1..=3).contains(&warnings), || {
        format!("{warnings} accept warnings; expected one per burst:\n{log_text}")
    })
}
