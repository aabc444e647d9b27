//! The Prometheus endpoint, scraped during a real chat: every count is
//! checked against what the test itself did, in every model.

mod common;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use common::{connect_settled, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

for_each_model!(scraped_counts_match_the_chat);

/// One HTTP GET; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> io::Result<(String, String)> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    timeout(Duration::from_secs(10), conn.read_to_string(&mut response))
        .await
        .map_err(|_| io::Error::other("no HTTP response"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("not HTTP: {response:?}")))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// The samples of one scrape, by name with labels (`name{label="x"}`).
async fn scrape(addr: SocketAddr) -> io::Result<HashMap<String, f64>> {
    let (status, body) = get(addr, "/metrics").await?;
    ensure(status.contains("200"), || format!("/metrics: {status}"))?;
    Ok(body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// Scrapes until every expected sample has its value: counters are bumped
/// just after the write a client has already read, so the first scrape may
/// be a moment early.
async fn wait_for(addr: SocketAddr, expected: &[(&str, f64)]) -> io::Result<HashMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(addr).await?;
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(name, value)| samples.get(*name) != Some(value))
            .map(|(name, value)| format!("{name}: expected {value}, got {:?}", samples.get(*name)))
            .collect();
        if wrong.is_empty() {
            return Ok(samples);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!("{wrong:#?}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn scraped_counts_match_the_chat(model: Model) -> io::Result<()> {
    let server = TestServer::start(Config {
        max_clients: 3,
        metrics_addr: Some("127.0.0.1:0".into()),
        ..Config::with_model(model)
    })?;
    let metrics = server
        .metrics_addr()
        .ok_or_else(|| io::Error::other("no metrics address"))?;
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
