//! `flood`: `rate`'s ordinary clients (by default ten, a line every 50 ms
//! each) while one more client, connected first, writes 100-byte lines as
//! fast as the server takes them and drains whatever it is sent. The report
//! is `rate`'s for the ordinary clients (their latency and losses) plus
//! what the flooder managed and how its connection ended. Against a server
//! with flood control it shows the flooder held back or cut off while the
//! others chat on; without, what one client costs everyone else.

use std::io;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{rate, Options};
use crate::client::{self, Conn, READ_CHUNK};
use crate::report::{self, Report};

/// The flooder's line: 99 bytes and a newline, nothing a receiver decodes.
const FLOOD_LINE: &[u8; 100] = &{
    let mut line = [b'f'; 100];
    line[99] = b'\n';
    line
};

pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    // Connected first, so that the ordinary clients never hear it arrive;
    // it hears them, and drains whatever it is sent.
    let flooder = client::connect(opts.addr, READ_CHUNK, None)
        .await
        .context("the flooder")?;
    rate::open_loop(opts, Some(flooder)).await
}

/// Writes [`FLOOD_LINE`]s as fast as the server takes them and drains what
/// it is sent, until `stop` or until the server ends the connection. Then
/// resets the connection, so that the server does not read through
/// megabytes of kernel buffers before it sees it end.
pub(super) async fn flood(conn: Conn, stop: CancellationToken) -> report::Flood {
    // The flooder connects in plain TCP (`--tls` does not run `flood`).
    let owned = conn.stream;
    let stream = owned.tcp();
    let chunk: Vec<u8> = FLOOD_LINE.repeat(640);
    let mut offset = 0;
    let mut sink = vec![0u8; READ_CHUNK];
    // The verdict may straddle two reads: keep the tail of the previous one.
    let mut tail: Vec<u8> = Vec::new();
    let verdict = chat_wire::FLOODING.as_bytes();
    let mut result = report::Flood::default();
    let started = Instant::now();
    // Once a write fails the server has closed; what it said last may still
    // be waiting to be read, so reading goes on to the end.
    let mut writing = true;
    let state = loop {
        tokio::select! {
            () = stop.cancelled() => break "still connected",
            ready = stream.writable(), if writing => {
                if ready.is_err() {
                    writing = false;
                    continue;
                }
                match stream.try_write(&chunk[offset..]) {
                    Ok(written) => {
                        result.bytes_written += written as u64;
                        offset = (offset + written) % chunk.len();
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => writing = false,
                }
            }
            ready = stream.readable() => {
                if ready.is_err() {
                    break "read error";
                }
                match stream.try_read(&mut sink) {
                    Ok(0) => break "closed",
                    Ok(read) => {
                        result.bytes_received += read as u64;
                        tail.extend_from_slice(&sink[..read]);
                        if result.cut_off_after_s.is_none()
                            && memchr::memmem::find(&tail, verdict).is_some()
                        {
                            result.cut_off_after_s = Some(started.elapsed().as_secs_f64());
                        }
                        let keep = tail.len().min(verdict.len());
                        tail.drain(..tail.len() - keep);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) if writing => break "reset",
                    Err(_) => break "closed (writes failed)",
                }
            }
        }
    };
    let _ = stream.set_zero_linger();
    result.seconds = started.elapsed().as_secs_f64();
    result.final_state = match result.cut_off_after_s {
        Some(_) => format!("{state} after `{}`", chat_wire::FLOODING),
        None => state.to_owned(),
    };
    result
}

#[cfg(test)]
mod tests {
    use chat_server::harness::TestServer;
    use chat_server::Config;

    use super::super::test_support::small;
    use super::super::{run, Scenario};
    use std::time::Duration;

    /// A server that cuts floods off after a quarter second: the ordinary
    /// clients lose nothing and the report says the flooder was cut off
    /// (within the run's second).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_flooder_is_cut_off_and_the_others_lose_nothing() {
        let server = TestServer::start(
            Config::default().with(|c| c.flood_grace = Some(Duration::from_millis(250))),
        )
        .unwrap();
        let mut opts = small(Scenario::Flood, &server);
        opts.rate = 40.0;
        opts.duration = Duration::from_secs(1);
        let report = run(Scenario::Flood, &opts).await.unwrap();
        let d = report.deliveries.as_ref().unwrap();
        assert!(report.complete, "{}", report.to_table());
        assert_eq!(
            (d.delivered, d.lost),
            (3 * 40 * 3, 0),
            "{}",
            report.to_table()
        );
        let flood = report.flood.as_ref().unwrap();
        assert!(flood.cut_off_after_s.is_some(), "{}", report.to_table());
    }
}
