//! Ports for the kit's servers (`nats-server`, `redis-server`) and for a
//! test's server that must come back on its port: taken from outside the
//! kernel's ephemeral range.
//!
//! **Why.** A port the kernel hands out (a bind to port 0, or a server's
//! `-p -1`) comes from its ephemeral range (`net.ipv4.ip_local_port_range`,
//! 32768-60999 by default), which is also where every outgoing
//! connection's own port comes from. Once such a port is free again (a
//! broker stopped to be restarted, or a port reserved before its server
//! runs), any connection the tests open meanwhile may take it as its own,
//! and the server's start fails with "address already in use": seen in
//! `cluster::broker_absent_at_start`, about one run in ten of
//! tests/cluster under load. The kernel never hands out a port outside
//! that range, so there only programs that ask for a port by number
//! compete, and each port is checked free when chosen.
//!
//! Within one process the ports are handed out in turn, never twice
//! before the whole span has gone round; two processes start at different
//! places in it (by process id).

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest port handed out: above the well-known ports and those
/// services commonly use (Redis 6379, NATS 4222, our 8000).
const LOWEST: u16 = 20_000;

/// The fewest ports a span below or above the ephemeral range must have to
/// be used; otherwise the kernel chooses.
const SMALLEST_SPAN: u16 = 1_000;

/// A port on 127.0.0.1 outside the ephemeral range, free when this
/// returns; the kernel's choice where the range leaves no room outside it.
pub fn unused_port() -> io::Result<u16> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let Some((first, span)) = span_outside(ephemeral_range()) else {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    };
    let start = std::process::id() as usize * 7_919;
    for _ in 0..usize::from(span) {
        let turn = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = first + (turn % usize::from(span)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no free port in {first}..{}",
            u32::from(first) + u32::from(span)
        ),
    ))
}

/// The kernel's ephemeral range, or its default where it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(str::parse::<u16>);
            Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

/// The first port and the length of the span to use: below the
/// ephemeral range if it has room, else above it, else none.
fn span_outside((low, high): (u16, u16)) -> Option<(u16, u16)> {
    let below = low.saturating_sub(LOWEST);
    let above = u16::MAX - high.max(LOWEST);
    if below >= SMALLEST_SPAN {
        Some((LOWEST, below))
    } else if above >= SMALLEST_SPAN {
        Some((high.max(LOWEST) + 1, above))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_span_avoids_the_ephemeral_range() {
        assert_eq!(span_outside((32_768, 60_999)), Some((20_000, 12_768)));
        assert_eq!(span_outside((1_024, 50_000)), Some((50_001, 15_535)));
        assert_eq!(span_outside((1_024, 65_000)), None);
    }

    #[test]
    fn ports_are_outside_the_range_and_differ() -> io::Result<()> {
        let (low, high) = ephemeral_range();
        let ports = (0..20)
            .map(|_| unused_port())
            .collect::<io::Result<Vec<_>>>()?;
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        if span_outside((low, high)).is_some() {
            assert!(ports.iter().all(|&port| port < low || port > high));
        }
        Ok(())
    }
}
