//! Hostile input, in every model: over-long lines are refused without
//! buffering them, and nobody else notices. (Control characters and invalid
//! UTF-8 are covered in `protocol.rs`; vanishing clients in `tasks.rs`.)

use crate::common;

use std::io;

use chat_server::harness::{TestClient, TestServer, LINE_TIMEOUT};
use chat_server::{Config, Model};
use common::ensure;
use common::process::ServerProcess;
use tokio::io::AsyncBufReadExt;
use tokio::time::timeout;

for_each_model!(
    a_64_mib_line_is_refused_in_bounded_memory,
    line_limit_is_exact
);

/// 64 MiB without a newline: the sender gets an error line and a
/// disconnect, the server's memory grows by under 1 MiB, and the others
/// keep chatting throughout.
async fn a_64_mib_line_is_refused_in_bounded_memory(model: Model) -> io::Result<()> {
    let server = ServerProcess::start(&["--model", model.name()])?;
    let addr = server.addr.parse().map_err(io::Error::other)?;
    let mut watcher = TestClient::connect(addr).await?;
    let attacker = TestClient::connect(addr).await?;
    let attacker_who = attacker.who.clone();
    watcher
        .expect(&format!("{attacker_who} has arrived"))
        .await?;
    let rss_before = server.rss_kib()?;

    let (mut reader, mut writer) = attacker.into_parts();
    let flooding = tokio::spawn(async move {
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..1024 {
            // The server hangs up part way; that is the point.
            if tokio::io::AsyncWriteExt::write_all(&mut writer, &chunk)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut line = String::new();
    timeout(LINE_TIMEOUT, reader.read_line(&mut line)).await??;
    ensure(line == "error: line too long (max 65536 bytes)\n", || {
        format!("{model}: expected the error line, got {line:?}")
    })?;
    line.clear();
    match timeout(LINE_TIMEOUT, reader.read_line(&mut line)).await? {
        Ok(0) => {}
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
        other => {
            return Err(io::Error::other(format!(
                "{model}: not closed: {other:?} {line:?}"
            )))
        }
    }

    watcher.send("still chatting").await?;
    watcher.expect(&format!("{attacker_who} has left")).await?;
    watcher
        .expect(&format!("{}: still chatting", watcher.who))
        .await?;
    let rss_after = server.rss_kib()?;
    flooding.abort();
    println!("{model}: server RSS {rss_before} KiB before, {rss_after} KiB after a 64 MiB line");
    // One line buffer (64 KiB) and one read (8 KiB) at most; allocator
    // noise aside, a buffered 64 MiB line would show as 64 MiB.
    ensure(rss_after < rss_before + 1024, || {
        format!("{model}: RSS grew from {rss_before} KiB to {rss_after} KiB")
    })
}

/// `--max-line` bytes are accepted, one more is not.
async fn line_limit_is_exact(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| c.max_line = 100))?;
    let mut client = TestClient::connect(server.addr()).await?;
    let longest = "x".repeat(100);
    client.send(&longest).await?;
    client.expect(&format!("{}: {longest}", client.who)).await?;
    client.send(&"y".repeat(101)).await?;
    client
        .expect("error: line too long (max 100 bytes)")
        .await?;
    let rest = client.lines_until_closed().await?;
    ensure(rest.is_empty(), || format!("after the error: {rest:?}"))?;
    // The limit's error goes to the offender only.
    let mut next = TestClient::connect(server.addr()).await?;
    next.send("fine").await?;
    next.expect(&format!("{}: fine", next.who)).await?;
    Ok(())
}
