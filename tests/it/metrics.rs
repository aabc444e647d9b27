//! The Prometheus endpoint, scraped during a real chat: every count is
//! checked against what the test itself did, in every model. Also the
//! abuse counters: a flooder cut off, a memory hog evicted. (The cluster's
//! metrics are scraped in `tests/cluster/cluster.rs`, against a real broker.)

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use common::scrape::{get, value, wait_for, wait_until};
use common::{connect_settled, ensure, flood_until_cut_off};

for_each_model!(
    scraped_counts_match_the_chat,
    a_flood_is_counted,
    a_memory_eviction_is_counted,
);

fn metrics_addr(server: &TestServer) -> io::Result<SocketAddr> {
    server
        .metrics_addr()
        .ok_or_else(|| io::Error::other("no metrics address"))
}

async fn scraped_counts_match_the_chat(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| {
        c.max_clients = 3;
        c.metrics_addr = Some("127.0.0.1:0".into());
    }))?;
    let metrics = metrics_addr(&server)?;
    let (status, body) = get(metrics, "/healthz").await?;
    ensure(status.contains("200") && body == "OK\n", || {
        format!("/healthz: {status} {body:?}")
    })?;

    let mut clients = connect_settled(&server, 3).await?;
    // Arrivals: the first client heard of two, the second of one.
    let mut delivered_bytes: usize = clients
        .iter()
        .skip(1)
        .map(|newcomer| chat_wire::arrived(&newcomer.who).len() + 1)
        .sum::<usize>()
        + chat_wire::arrived(&clients[2].who).len()
        + 1;
    let mut delivered_messages = 3;

    // One over the limit is refused.
    let mut refused = TestClient::connect_raw(server.addr()).await?;
    refused.expect(chat_wire::SERVER_FULL).await?;

    // Five lines, each read by all three before the next is sent, so each
    // read of the server holds one line and each write one message.
    let speaker = clients[0].who.clone();
    for n in 0..5 {
        let text = format!("line {n}");
        clients[0].send(&text).await?;
        let echo = chat_wire::chat(&speaker, &text);
        for client in &mut clients {
            client.expect(&echo).await?;
            delivered_bytes += echo.len() + 1;
            delivered_messages += 1;
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let info = format!(
        "chat_server_info{{model=\"{}\",version=\"{version}\"}}",
        model.name()
    );
    wait_for(
        metrics,
        &[
            (&info, 1.0),
            ("chat_clients_connected", 3.0),
            ("chat_connections_accepted_total", 3.0),
            (
                "chat_connections_refused_total{reason=\"server_full\"}",
                1.0,
            ),
            (
                "chat_connections_refused_total{reason=\"tls_handshake_failed\"}",
                0.0,
            ),
            ("chat_lines_received_total", 5.0),
            ("chat_messages_delivered_total", delivered_messages as f64),
            ("chat_bytes_delivered_total", delivered_bytes as f64),
            ("chat_bytes_queued", 0.0),
            ("chat_slow_client_disconnects_total", 0.0),
            ("chat_messages_dropped_total", 0.0),
            ("chat_write_timeouts_total", 0.0),
            ("chat_accept_errors_total", 0.0),
            ("chat_flood_disconnects_total", 0.0),
            ("chat_flood_holds_total", 0.0),
            ("chat_memory_evictions_total", 0.0),
            ("chat_memory_evicted_bytes_total", 0.0),
        ],
    )
    .await?;

    // One leaves: the others hear of it, and the gauge follows.
    let mut leaver = clients.pop().ok_or_else(|| io::Error::other("no client"))?;
    leaver.finish().await?;
    leaver.lines_until_closed().await?;
    let left = chat_wire::left(&leaver.who);
    for client in &mut clients {
        client.expect(&left).await?;
    }
    wait_for(
        metrics,
        &[
            ("chat_clients_connected", 2.0),
            (
                "chat_messages_delivered_total",
                (delivered_messages + 2) as f64,
            ),
        ],
    )
    .await?;
    let (status, _) = get(metrics, "/nothing").await?;
    ensure(status.contains("404"), || format!("/nothing: {status}"))
}

/// A flooder is held back (not read from) at least once, then cut off with
/// `error: flooding`: one disconnect, and the holds that came before it.
async fn a_flood_is_counted(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config::with_model(model).with(|c| {
        c.metrics_addr = Some("127.0.0.1:0".into());
        // Bytes only, 64 KiB a second after a burst of a tenth of that. One
        // read is at most 32 KiB (half a second of debt), under the grace:
        // so the first read over budget is always a hold, never at once a
        // disconnect.
        c.flood_lines = 0;
        c.flood_bytes = 64 * 1024;
        c.flood_burst = Duration::from_millis(100);
        c.flood_grace = Some(Duration::from_millis(600));
    }))?;
    let metrics = metrics_addr(&server)?;
    let flooder = TestClient::connect(server.addr()).await?;
    let last = flood_until_cut_off(flooder).await?;
    ensure(last.trim_end() == chat_wire::FLOODING, || {
        format!("{model}: the flooder's last line was {last:?}")
    })?;
    let samples = wait_until(
        metrics,
        "one flood disconnect after holds",
        "chat_flood",
        |s| {
            value(s, "chat_flood_disconnects_total") == 1.0
                && value(s, "chat_flood_holds_total") > 0.0
        },
    )
    .await?;
    println!(
        "{model}: flooder held back {} times before it was cut off",
        value(&samples, "chat_flood_holds_total")
    );
    // Nothing else was taken for abuse.
    wait_for(
        metrics,
        &[
            ("chat_memory_evictions_total", 0.0),
            ("chat_slow_client_disconnects_total", 0.0),
        ],
    )
    .await?;
    Ok(())
}

/// `--max-client-memory` evicts exactly one client (the largest holder,
/// as in `tests/it/limits.rs`): the counters show that one and what it held.
async fn a_memory_eviction_is_counted(model: Model) -> io::Result<()> {
    // The smallest budget a 16 KiB --max-line allows is about 49 KiB.
    let server = TestServer::start(Config::with_model(model).with(|c| {
        c.max_line = 16 * 1024;
        c.max_client_memory = 50_000;
        c.metrics_addr = Some("127.0.0.1:0".into());
    }))?;
    let metrics = metrics_addr(&server)?;
    let addr = server.addr();
    // Two clients each holding a 1 KiB partial line (a 16 KiB read buffer
    // each): 32 KiB, under the budget.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut client = TestClient::connect(addr).await?;
        client.send_raw(&[b's'; 1024]).await?;
        holders.push(client);
    }
    let mut hog = TestClient::connect(addr).await?;
    for holder in &mut holders {
        hear(holder, &chat_wire::arrived(&hog.who)).await?;
    }
    // 15 KiB of one unfinished line: a 32 KiB buffer, the largest holding,
    // and 64 KiB in all. Evicting the hog alone brings the total under.
    hog.send_raw(&[b'h'; 15 * 1024]).await?;
    let lines = hog.lines_until_closed().await?;
    ensure(
        lines.last().map(String::as_str) == Some(chat_wire::TOO_MUCH_MEMORY),
        || format!("{model}: the largest holder got {lines:?}"),
    )?;
    let samples = wait_until(metrics, "one eviction", "chat_memory", |s| {
        value(s, "chat_memory_evictions_total") == 1.0
    })
    .await?;
    let freed = value(&samples, "chat_memory_evicted_bytes_total");
    ensure((15.0 * 1024.0..=50_000.0).contains(&freed), || {
        format!("{model}: the evicted client held {freed} bytes; it had 15 KiB of line buffered")
    })?;
    // The holders stay: finishing their lines, they are still in the room,
    // and nobody else was evicted.
    for holder in &mut holders {
        holder.send(" done").await?;
    }
    let done = format!("{}: {} done", holders[0].who, "s".repeat(1024));
    hear(&mut holders[0], &done).await?;
    wait_for(
        metrics,
        &[
            ("chat_memory_evictions_total", 1.0),
            ("chat_clients_connected", 2.0),
            ("chat_flood_disconnects_total", 0.0),
        ],
    )
    .await?;
    Ok(())
}

/// Reads until `wanted`, failing on anything that ends the wait.
async fn hear(client: &mut TestClient, wanted: &str) -> io::Result<()> {
    while client.line().await? != wanted {}
    Ok(())
}
