//! `slow`: the fanout exchange among n clients while one extra client,
//! connected first, never reads; the report says when (if ever) the server
//! cut it off, and how its connection looked once it finally read.

use std::io;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncReadExt;

use super::fanout::{self, Exchanged};
use super::Options;
use crate::client::{self, Conn, READ_CHUNK};
use crate::report::{Report, Slow};

/// The server's last line to a client it drops for being slow.
const TOO_SLOW: &[u8] = chat_wire::TOO_SLOW.as_bytes();

/// Runs `slow`.
pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    fanout::check(opts)?;
    // Connected before the others, so it is registered when they arrive and
    // every line they exchange is queued for it too.
    let slow = client::connect(opts.addr, 4096, opts.tls.as_ref())
        .await
        .context("the slow client")?;
    let Exchanged {
        mut report,
        watched_left_ns,
        t0_ns,
    } = fanout::exchange(opts, Some(&slow.who)).await?;
    report.slow = Some(slow_client_fate(slow, watched_left_ns, t0_ns, opts.drain).await);
    Ok(report)
}

/// Reads what the never-reading client has waiting, bounded in time, to
/// see how its connection ended.
async fn slow_client_fate(conn: Conn, left_ns: Option<u64>, t0_ns: u64, within: Duration) -> Slow {
    let Conn { mut stream, .. } = conn;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut bytes = 0u64;
    let mut saw_notice = false;
    // The notice may straddle two reads: keep the tail of the previous one.
    let mut tail: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + within.max(Duration::from_secs(1));
    let state = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break "still connected",
            Ok(Ok(0)) => break "closed",
            Ok(Ok(read)) => {
                bytes += read as u64;
                tail.extend_from_slice(&buf[..read]);
                if memchr::memmem::find(&tail, TOO_SLOW).is_some() {
                    saw_notice = true;
                }
                let keep = tail.len().min(TOO_SLOW.len());
                tail.drain(..tail.len() - keep);
            }
            Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Ok(Err(_)) => break "read error",
        }
    };
    Slow {
        disconnected_after_s: left_ns.map(|ns| ns.saturating_sub(t0_ns) as f64 / 1e9),
        final_state: if saw_notice {
            format!("{state} after the too-slow notice")
        } else {
            state.to_owned()
        },
        bytes_buffered: bytes,
    }
}
