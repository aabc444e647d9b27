//! The open-loop sender of the `rate` scenario: one OS thread that sends
//! every client's messages at their scheduled times and records its own
//! lateness.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{new_histogram, Shared};
use crate::payload::{now_ns, Codec, Payload};
use crate::protocol::Framing;

/// What the pacer thread did.
pub(super) struct Paced {
    pub(super) sent: u64,
    pub(super) lag: Histogram<u64>,
    pub(super) stalls: u64,
    pub(super) errors: Vec<String>,
}

/// The open-loop sender: one OS thread that sends every client's messages
/// at their scheduled times. A thread rather than tokio timers, whose 1 ms
/// granularity would add up to a millisecond of the tool's own lateness to
/// every latency measured from the schedule; `thread::sleep` is typically
/// within 0.1 ms. Its own lateness is recorded as "send lag".
#[allow(clippy::too_many_arguments)]
pub(super) fn pace(
    writers: Vec<std::net::TcpStream>,
    framings: Vec<Framing>,
    codec: Codec,
    per_client: u64,
    rate: f64,
    t0_ns: u64,
    shared: Arc<Shared>,
    abort: Arc<AtomicBool>,
) -> Paced {
    use std::io::Write;
    let n = writers.len() as u64;
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); writers.len()];
    let mut dead = vec![false; writers.len()];
    let mut paced = Paced {
        sent: 0,
        lag: new_histogram(),
        stalls: 0,
        errors: Vec::new(),
    };
    // Client i sends at t0 + (k + i/n) / rate: the whole schedule is one
    // sequence of ticks 1/(n·rate) apart, taken by the clients in turn.
    let tick_ns = 1e9 / (rate * n as f64);
    let mut line = Vec::with_capacity(codec.size() + 1);
    for tick in 0..n * per_client {
        if abort.load(Relaxed) {
            break;
        }
        let client = (tick % n) as usize;
        let due = t0_ns + (tick as f64 * tick_ns) as u64;
        let now = now_ns();
        if due > now {
            thread::sleep(Duration::from_nanos(due - now));
        }
        let _ = paced.lag.record(now_ns().saturating_sub(due) / 1000);
        if dead[client] {
            continue;
        }
        line.clear();
        framings[client].encode_into(
            &codec,
            &mut line,
            Payload {
                sender: client as u32,
                seq: (tick / n) as u32,
                sent_ns: due,
            },
        );
        let buffer = &mut pending[client];
        buffer.extend_from_slice(&line);
        match (&writers[client]).write(buffer) {
            Ok(written) => {
                buffer.drain(..written);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                dead[client] = true;
                paced.errors.push(format!("client {client}: write: {err}"));
                continue;
            }
        }
        if !buffer.is_empty() {
            // The server is not reading this client fast enough; the rest
            // goes with its next message.
            paced.stalls += 1;
        }
        paced.sent += 1;
        shared.sent.fetch_add(1, Relaxed);
    }
    // Flush what the server would not take in time, briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pending.iter().any(|p| !p.is_empty()) && Instant::now() < deadline && !abort.load(Relaxed)
    {
        for (client, buffer) in pending.iter_mut().enumerate() {
            if buffer.is_empty() || dead[client] {
                continue;
            }
            match (&writers[client]).write(buffer) {
                Ok(written) => {
                    buffer.drain(..written);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => buffer.clear(),
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    paced
}
