//! Graceful shutdown of the real binary on SIGINT and SIGTERM, in every
//! model: stop accepting, tell every client `server shutting down` after
//! what was already queued for it, close, exit 0, even with a client that
//! never reads.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::Model;
use common::ensure;
use common::process::{ServerProcess, Signal};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

for_each_model!(
    sigterm_flushes_and_exits_cleanly,
    sigint_with_a_stuck_client_exits_within_grace
);

async fn shut_down(model: Model, signal: Signal, stuck: bool) -> io::Result<()> {
    // The chatter's burst is a flood by the default input budget; what is
    // tested here is the flush, so flood control is off.
    let mut server = ServerProcess::start(&[
        "--model",
        model.name(),
        "--shutdown-grace",
        "1",
        "--flood-lines",
        "0",
        "--flood-bytes",
        "0",
    ])?;
    let addr: SocketAddr = server.addr.parse().map_err(io::Error::other)?;
    let mut chatter = TestClient::connect(addr).await?;
    let mut listener = TestClient::connect(addr).await?;
    chatter.line().await?;
    let mut stuck_client = if stuck {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut greeting = [0u8; 8];
        stream.read_exact(&mut greeting).await?;
        Some(stream)
    } else {
        None
    };
    // With a stuck client, more than the kernel's 4 MB send buffer can
    // absorb, so that some is still queued for it when the signal arrives
    // and only the grace period ends its connection.
    let lines = if stuck { 20_000 } else { 2_000 };
    let burst: String = (0..lines)
        .map(|i| format!("line {i} {}\n", "z".repeat(200)))
        .collect();
    chatter.send_raw(burst.as_bytes()).await?;
    let last = format!("{}: line {} ", chatter.who, lines - 1);
    loop {
        if listener.line().await?.starts_with(&last) {
            break;
        }
    }
    let signalled = Instant::now();
    server.process.signal(signal)?;

    // Everything before the signal was delivered: what follows for each
    // client is exactly the shutdown notice, then the close.
    ensure(
        listener.lines_until_closed().await? == ["server shutting down"],
        || "listener did not get exactly the notice".into(),
    )?;
    let chatter_rest = chatter.lines_until_closed().await?;
    ensure(
        chatter_rest.last().map(String::as_str) == Some("server shutting down"),
        || {
            format!(
                "chatter's last lines: {:?}",
                &chatter_rest[chatter_rest.len().saturating_sub(3)..]
            )
        },
    )?;
    let status = server.process.wait()?;
    ensure(status.success(), || {
        format!("{model}: exit status {status}")
    })?;
    // One second of grace for the stuck client, plus start-up slack.
    ensure(signalled.elapsed() < Duration::from_secs(5), || {
        format!("{model}: shutdown took {:?}", signalled.elapsed())
    })?;
    // Nothing listens any more.
    ensure(tokio::net::TcpStream::connect(addr).await.is_err(), || {
        "still accepting".into()
    })?;
    drop(stuck_client.take());
    Ok(())
}

async fn sigterm_flushes_and_exits_cleanly(model: Model) -> io::Result<()> {
    shut_down(model, Signal::SIGTERM, false).await
}

async fn sigint_with_a_stuck_client_exits_within_grace(model: Model) -> io::Result<()> {
    shut_down(model, Signal::SIGINT, true).await
}
