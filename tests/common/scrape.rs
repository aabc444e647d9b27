//! Scraping the Prometheus endpoint (`--metrics-addr`) in tests.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use chat_testkit::ensure;

/// One HTTP GET; returns the status line and the body.
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<(String, String)> {
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
pub async fn scrape(addr: SocketAddr) -> io::Result<HashMap<String, f64>> {
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
pub async fn wait_for(
    addr: SocketAddr,
    expected: &[(&str, f64)],
) -> io::Result<HashMap<String, f64>> {
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

/// Scrapes until `holds` is true of a scrape (for bounds rather than exact
/// values), for at most 20 s; fails naming `what` and the last samples of
/// names starting with `prefix`.
pub async fn wait_until(
    addr: SocketAddr,
    what: &str,
    prefix: &str,
    holds: impl Fn(&HashMap<String, f64>) -> bool,
) -> io::Result<HashMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples = scrape(addr).await?;
        if holds(&samples) {
            return Ok(samples);
        }
        if Instant::now() >= deadline {
            let mut seen: Vec<_> = samples
                .iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .collect();
            seen.sort_by(|a, b| a.0.cmp(b.0));
            return Err(io::Error::other(format!(
                "{what}: never; last scrape {seen:#?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A sample's value, 0 if absent (for use in [`wait_until`]'s predicates).
pub fn value(samples: &HashMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}
