//! The text `chat-load` sends as a chat line, and the fast path that finds
//! and decodes it in what the server relays.
//!
//! A payload is printable ASCII of a fixed length (`--size`, at least
//! [`HEADER_LEN`] bytes), so every server relays it unchanged:
//!
//! ```text
//! ~cl 1f2e3d4c 0000002a 000003e7 0000bc614e00........
//! |   |        |        |        |           '- padding up to --size
//! |   |        |        |        '- send time: ns since the tool started, 12 hex digits
//! |   |        |        '- sequence number within that sender, 8 hex digits
//! |   |        '- sender id (0..n), 8 hex digits
//! |   '- run tag: tells this run's lines from any other chat user's
//! '- marker
//! ```
//!
//! The server relays it as `IP:PORT: <payload>`. Because the payload has a
//! known length, the receiver finds it at `line.len() - size` without
//! searching for the `": "` separator, checks the marker, the run tag and the
//! separators, and parses the three fixed-width hexadecimal fields with a
//! table lookup per digit: no allocation, no UTF-8 validation, no search.
//! Lines that fail any check (arrivals, departures, greetings, other users'
//! chat) are left to the caller to classify.
//!
//! This module also owns the tool's clock ([`now_ns`]) and per-sender order
//! checking ([`OrderTracker`]), the two other things every receiver does per
//! line.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

/// The fixed part of a payload: marker, run tag, three fields and their separators.
pub const HEADER_LEN: usize = 43;

/// The largest payload `--size` accepts; the seed and our server both
/// accept lines of 64 KiB, and a receive buffer must hold a few lines.
pub const MAX_SIZE: usize = 16 * 1024;

/// Send times are 12 hex digits of nanoseconds: 2^48 ns is about 78 hours,
/// far longer than any bounded run.
const TIME_DIGITS: usize = 12;

const MARKER: &[u8; 4] = b"~cl ";
const TAG_END: usize = 12; // marker (4) + run tag (8)
const SENDER_AT: usize = 13;
const SEQ_AT: usize = 22;
const TIME_AT: usize = 31;

/// The instant every send time is measured from. All clients live in one
/// process, so one monotonic origin serves senders and receivers alike.
pub fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since [`origin`].
#[inline]
pub fn now_ns() -> u64 {
    ns_since_origin(Instant::now())
}

/// Nanoseconds from [`origin`] to `at` (0 if `at` is earlier).
#[inline]
pub fn ns_since_origin(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_nanos() as u64
}

/// One decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub sender: u32,
    pub seq: u32,
    /// Nanoseconds since [`origin`] when the message was (or, open loop,
    /// was scheduled to be) sent.
    pub sent_ns: u64,
}

/// Encodes and decodes the payloads of one run: one run tag, one size.
#[derive(Debug, Clone)]
pub struct Codec {
    /// A complete payload with zeroed fields; encoding copies it and writes
    /// the three fields in place.
    template: Vec<u8>,
}

/// Why a `--size` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("--size {size} is out of range: a payload needs {min}..={max} bytes")]
pub struct BadSize {
    pub size: usize,
    pub min: usize,
    pub max: usize,
}

impl Codec {
    /// A codec for `size`-byte payloads carrying run tag `tag`.
    pub fn new(tag: u32, size: usize) -> Result<Codec, BadSize> {
        if !(HEADER_LEN..=MAX_SIZE).contains(&size) {
            return Err(BadSize {
                size,
                min: HEADER_LEN,
                max: MAX_SIZE,
            });
        }
        let mut template = Vec::with_capacity(size);
        template.extend_from_slice(MARKER);
        push_hex(&mut template, tag.into(), 8);
        for width in [8, 8, TIME_DIGITS] {
            template.push(b' ');
            push_hex(&mut template, 0, width);
        }
        debug_assert_eq!(template.len(), HEADER_LEN);
        // Dots, not spaces: a server may trim trailing whitespace.
        template.resize(size, b'.');
        Ok(Codec { template })
    }

    /// A codec with a run tag unlikely to collide with another run's.
    pub fn for_this_run(size: usize) -> Result<Codec, BadSize> {
        Codec::new(run_tag(), size)
    }

    /// Payload length in bytes, without the newline.
    pub fn size(&self) -> usize {
        self.template.len()
    }

    /// Appends one payload and its newline to `out`.
    #[inline]
    pub fn encode_into(&self, out: &mut Vec<u8>, payload: Payload) {
        let at = out.len();
        out.extend_from_slice(&self.template);
        out.push(b'\n');
        let line = &mut out[at..];
        write_hex(&mut line[SENDER_AT..SENDER_AT + 8], payload.sender.into());
        write_hex(&mut line[SEQ_AT..SEQ_AT + 8], payload.seq.into());
        write_hex(&mut line[TIME_AT..TIME_AT + TIME_DIGITS], payload.sent_ns);
    }

    /// Decodes the payload at the end of a relayed chat line (`who: payload`,
    /// without its newline), or `None` if the line is anything else.
    #[inline]
    pub fn decode(&self, line: &[u8]) -> Option<Payload> {
        let size = self.template.len();
        let at = line.len().checked_sub(size + 2)? + 2;
        if &line[at - 2..at] != b": " {
            return None;
        }
        let p = &line[at..];
        if p[..TAG_END] != self.template[..TAG_END]
            || p[TAG_END] != b' '
            || p[SEQ_AT - 1] != b' '
            || p[TIME_AT - 1] != b' '
        {
            return None;
        }
        let sender = parse_hex8(&p[SENDER_AT..SENDER_AT + 8])?;
        let seq = parse_hex8(&p[SEQ_AT..SEQ_AT + 8])?;
        // 12 digits as two overlapping groups of 8: the first gives the top
        // 4 digits (and 4 more, shifted out), the second the low 8.
        let high = parse_hex8(&p[TIME_AT..TIME_AT + 8])? >> 16;
        let low = parse_hex8(&p[TIME_AT + 4..TIME_AT + TIME_DIGITS])?;
        Some(Payload {
            sender,
            seq,
            sent_ns: u64::from(high) << 32 | u64::from(low),
        })
    }
}

/// A tag from the process id and the wall clock, so two runs against one
/// server (or a run and a human on netcat) do not count each other's lines.
fn run_tag() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 32) as u32
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, value: u64, width: usize) {
    let at = out.len();
    out.resize(at + width, b'0');
    write_hex(&mut out[at..], value);
}

/// Writes `value` as exactly `out.len()` lowercase hex digits (the high
/// digits are dropped if it does not fit).
#[inline]
fn write_hex(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Parses exactly 8 lowercase hex digits, all at once in one `u64` (SWAR):
/// this runs for every line received, and a digit at a time was the
/// largest cost of the receive path.
#[inline(always)]
fn parse_hex8(digits: &[u8]) -> Option<u32> {
    let bytes: [u8; 8] = digits.try_into().ok()?;
    // The first digit in the lowest byte.
    let v = u64::from_le_bytes(bytes);
    // Range checks per byte: adding 0x80 - k sets a byte's high bit iff the
    // byte is >= k. No byte carries into the next while all are < 0x80,
    // which is checked too.
    let at_least = |k: u64| v.wrapping_add((0x80 - k) * ONES) & HIGH_BITS;
    let digit = at_least(b'0'.into()) & !at_least(u64::from(b'9') + 1);
    let letter = at_least(b'a'.into()) & !at_least(u64::from(b'f') + 1);
    if v & HIGH_BITS != 0 || digit | letter != HIGH_BITS {
        return None;
    }
    // '0'..'9' are 0x30..0x39 and 'a'..'f' 0x61..0x66: the low nibble,
    // plus 9 for letters.
    let nibbles = (v & (0x0f * ONES)) + (letter >> 7) * 9;
    // Pairs of digits into bytes, bytes into 16-bit words, words into 32
    // bits, the earlier (more significant) digit always in the lower lane.
    let bytes = ((nibbles & 0x000f_000f_000f_000f) << 4) | ((nibbles >> 8) & 0x000f_000f_000f_000f);
    let words = ((bytes & 0x0000_00ff_0000_00ff) << 8) | ((bytes >> 16) & 0x0000_00ff_0000_00ff);
    Some((((words & 0xffff) << 16) | (words >> 32)) as u32)
}

/// What one line did to its sender's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The sequence number expected next.
    InOrder,
    /// Later than expected: the messages in between are missing (so far).
    Skipped,
    /// Earlier than expected: a duplicate or a late (reordered) message.
    Backwards,
    /// A sender id outside `0..n`: not one of this run's clients.
    UnknownSender,
}

/// Per-sender next-expected sequence numbers for one receiver, in a plain
/// array indexed by sender id.
#[derive(Debug, Clone)]
pub struct OrderTracker {
    next: Vec<u32>,
}

impl OrderTracker {
    pub fn new(senders: usize) -> OrderTracker {
        OrderTracker {
            next: vec![0; senders],
        }
    }

    /// Records `seq` from `sender` and says whether it was in order. After a
    /// skip the tracker expects the successor of what arrived, so one lost
    /// message is one violation, not one per later message.
    #[inline]
    pub fn observe(&mut self, sender: u32, seq: u32) -> Order {
        let Some(next) = self.next.get_mut(sender as usize) else {
            return Order::UnknownSender;
        };
        if seq == *next {
            *next = seq.wrapping_add(1);
            Order::InOrder
        } else if seq > *next {
            *next = seq.wrapping_add(1);
            Order::Skipped
        } else {
            Order::Backwards
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed(codec: &Codec, who: &str, payload: Payload) -> Vec<u8> {
        let mut line = format!("{who}: ").into_bytes();
        codec.encode_into(&mut line, payload);
        assert_eq!(line.pop(), Some(b'\n'));
        line
    }

    #[test]
    fn encodes_a_fixed_size_printable_payload() {
        let codec = Codec::new(0x1f2e3d4c, 64).unwrap();
        let mut out = Vec::new();
        codec.encode_into(
            &mut out,
            Payload {
                sender: 42,
                seq: 999,
                sent_ns: 0xbc614e00,
            },
        );
        assert_eq!(out.len(), 65);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "~cl 1f2e3d4c 0000002a 000003e7 0000bc614e00.....................\n"
        );
        assert!(out[..64].iter().all(|b| (0x20..0x7f).contains(b)));
    }

    #[test]
    fn decodes_what_it_encodes_behind_any_prefix() {
        let codec = Codec::new(7, HEADER_LEN).unwrap();
        let payload = Payload {
            sender: u32::MAX,
            seq: 123_456,
            sent_ns: (1 << 48) - 1,
        };
        for who in ["127.0.0.1:54321", "[::1]:8000", "x"] {
            assert_eq!(codec.decode(&relayed(&codec, who, payload)), Some(payload));
        }
    }

    #[test]
    fn ignores_lines_that_are_not_this_runs_chat() {
        let codec = Codec::new(1, 64).unwrap();
        let other_run = Codec::new(2, 64).unwrap();
        let payload = Payload {
            sender: 1,
            seq: 2,
            sent_ns: 3,
        };
        let ours = relayed(&codec, "127.0.0.1:1", payload);
        assert!(codec
            .decode(&relayed(&other_run, "127.0.0.1:1", payload))
            .is_none());
        assert!(codec.decode(b"127.0.0.1:1 has arrived").is_none());
        assert!(codec.decode(b"You are 127.0.0.1:1").is_none());
        assert!(codec.decode(b"").is_none());
        // The payload must be exactly at the end, right after ": ".
        let mut longer = ours.clone();
        longer.push(b'.');
        assert!(codec.decode(&longer).is_none());
        assert!(codec.decode(&ours[1..]).is_some(), "prefix content is free");
        // A corrupted hex digit is refused, not misread.
        let mut bad = ours.clone();
        let at = bad.len() - 64 + SEQ_AT;
        bad[at] = b'g';
        assert!(codec.decode(&bad).is_none());
        let mut upper = ours;
        upper[at + 7] = b'A';
        assert!(codec.decode(&upper).is_none());
    }

    #[test]
    fn refuses_sizes_that_cannot_hold_a_payload() {
        assert!(Codec::new(0, HEADER_LEN - 1).is_err());
        assert!(Codec::new(0, MAX_SIZE + 1).is_err());
        assert_eq!(Codec::new(0, HEADER_LEN).unwrap().size(), HEADER_LEN);
    }

    #[test]
    fn parses_hex_strictly() {
        assert_eq!(parse_hex8(b"00000000"), Some(0));
        assert_eq!(parse_hex8(b"ffffffff"), Some(0xffff_ffff));
        assert_eq!(parse_hex8(b"01234567"), Some(0x0123_4567));
        assert_eq!(parse_hex8(b"89abcdef"), Some(0x89ab_cdef));
        assert_eq!(parse_hex8(b"a0000009"), Some(0xa000_0009));
        for bad in [
            &b"0000000G"[..],
            b"0000000A",
            b"-0000001",
            b" 0000001",
            b"0000000/",
            b"0000000:",
            b"0000000`",
            b"0000000g",
            b"0000000\xff",
            b"\xb00000000",
            b"0000000",
        ] {
            assert_eq!(parse_hex8(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // Every single-digit value in every position round-trips.
        let mut text = Vec::new();
        for value in (0..32).map(|shift| 0x9e37_79b9u32.rotate_left(shift)) {
            text.clear();
            push_hex(&mut text, value.into(), 8);
            assert_eq!(parse_hex8(&text), Some(value));
        }
    }

    #[test]
    fn tracks_per_sender_order() {
        let mut order = OrderTracker::new(2);
        assert_eq!(order.observe(0, 0), Order::InOrder);
        assert_eq!(order.observe(1, 0), Order::InOrder);
        assert_eq!(order.observe(0, 1), Order::InOrder);
        // Sender 0 skips 2: one violation, then in order again from 4.
        assert_eq!(order.observe(0, 3), Order::Skipped);
        assert_eq!(order.observe(0, 4), Order::InOrder);
        // The missing 2 arriving late, and a duplicate, go backwards.
        assert_eq!(order.observe(0, 2), Order::Backwards);
        assert_eq!(order.observe(0, 4), Order::Backwards);
        assert_eq!(order.observe(1, 1), Order::InOrder);
        assert_eq!(order.observe(2, 0), Order::UnknownSender);
    }

    #[test]
    fn clock_is_monotonic_from_the_origin() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        assert_eq!(ns_since_origin(origin()), 0);
    }
}
