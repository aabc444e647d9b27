//! RFC 6455 framing as one more [`Transport`]: a browser's WebSocket
//! becomes the same stream of `\n`-terminated lines a netcat client sends,
//! so the session, the lobby and every limit run on it unchanged.
//!
//! - **In**: each text message is one line. The reader decodes frames
//!   straight into the session's line buffer and adds the `\n` at the end
//!   of each message, so a partial message is held where a partial TCP line
//!   is (counted by `--max-client-memory`, cut by `--max-line`). A frame
//!   whose header announces more than `--max-line` bytes (or a message whose
//!   fragments add up to more) is refused from its header, before its
//!   payload is read: close 1009. Binary frames: close 1003. Invalid UTF-8
//!   (checked as it streams, across fragments): close 1007. Anything else
//!   RFC 6455 forbids of a client (unmasked frames, reserved bits or
//!   opcodes, oversized or fragmented control frames): close 1002. After
//!   the close frame the reader reports an error, and the session ends as
//!   it does when a socket fails.
//! - **Out**: every line the writer hands over becomes one text frame
//!   (server frames are not masked). Encoded frames wait in a small queue
//!   shared with the reader, which writes its control frames (pong, close,
//!   the keepalive ping) into the same queue, so frames never interleave.
//!   The queue is released whenever it empties.
//! - **Keepalive**: while the reader waits for input it pings every
//!   `every`; a client that has sent no frame at all (a pong counts) for a
//!   whole interval after a ping is gone, and the read fails with
//!   `TimedOut`. Pongs do not count as input for `--idle-timeout`, which
//!   counts lines as it does for TCP.
//!
//! Like the TCP and TLS halves, neither half holds a buffer while idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use crate::transport::{hand_over_stash, SessionRead, SessionWrite, Transport};

/// Close codes (RFC 6455, section 7.4.1).
pub(crate) mod close {
    pub(crate) const NORMAL: u16 = 1000;
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    pub(crate) const TOO_BIG: u16 = 1009;
}

/// What one read of the transport may take.
const READ_CHUNK: usize = 4 * 1024;

/// Control frames queued behind this many unsent bytes are dropped (a
/// client flooding pings at one that does not read gets no pongs, rather
/// than an unbounded queue).
const CONTROL_BACKLOG: usize = 64 * 1024;

/// The limits of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `--max-line`: the largest message, in bytes.
    pub max_message: usize,
    /// Ping this often while waiting for input; `None`: never.
    pub ping_every: Option<Duration>,
}

/// A transport `T` after the WebSocket handshake.
pub(crate) struct WebSocket<T> {
    inner: T,
    /// What the HTTP side read past the handshake (normally nothing).
    preread: Vec<u8>,
    limits: Limits,
}

impl<T: Transport> WebSocket<T> {
    pub(super) fn new(inner: T, preread: Vec<u8>, limits: Limits) -> WebSocket<T> {
        WebSocket {
            inner,
            preread,
            limits,
        }
    }
}

impl<T: Transport> Transport for WebSocket<T> {
    type Read = WsReader<T::Read, T::Write>;
    type Write = WsWriter<T::Write>;

    fn split(self) -> (Self::Read, Self::Write) {
        let (read, write) = self.inner.split();
        let out = Arc::new(Mutex::new(Out {
            half: write,
            pending: Vec::new(),
            sent: 0,
            closing: false,
        }));
        let reader = WsReader {
            half: read,
            out: Arc::clone(&out),
            raw: self.preread,
            stash: Vec::new(),
            frame: None,
            message: None,
            utf8: Utf8Tail::default(),
            limits: self.limits,
            ended: false,
            failed: None,
            starved: false,
            keepalive: None,
        };
        let writer = WsWriter {
            out,
            partial: Vec::new(),
        };
        (reader, writer)
    }
}

/// The encoded frames not yet taken by the transport, and the transport's
/// write half: shared by the writer (text) and the reader (control frames).
struct Out<W> {
    half: W,
    pending: Vec<u8>,
    /// How much of `pending` the transport has taken.
    sent: usize,
    /// A close frame is queued: nothing more may follow it.
    closing: bool,
}

impl<W: SessionWrite> Out<W> {
    /// Hands `pending` to the transport; `Ok(true)` once all of it is taken.
    fn push(&mut self) -> io::Result<bool> {
        while self.sent < self.pending.len() {
            match self.half.try_write(&self.pending[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        // Idle connections hold no buffer; a large one freed counts towards
        // the housekeeper's trim after a burst (src/memory.rs).
        crate::memory::note_released(self.pending.capacity());
        self.pending = Vec::new();
        self.sent = 0;
        Ok(true)
    }

    /// Queues a control frame and tries to send it at once.
    fn control(&mut self, opcode: u8, payload: &[u8]) {
        if self.closing || self.pending.len() - self.sent > CONTROL_BACKLOG {
            return;
        }
        encode_header(&mut self.pending, opcode, payload.len());
        self.pending.extend_from_slice(payload);
        if opcode == OP_CLOSE {
            self.closing = true;
        }
        let _ = self.push();
    }

    fn close_with(&mut self, code: u16, reason: &str) {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        // A control frame's payload is at most 125 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.control(OP_CLOSE, &payload);
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Appends an unmasked, final frame header.
fn encode_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// The writer task's half: lines in, text frames out.
pub(crate) struct WsWriter<W> {
    out: Arc<Mutex<Out<W>>>,
    /// A line the writer handed over without its `\n` yet (only the last
    /// words after an abandoned write do that).
    partial: Vec<u8>,
}

impl<W: SessionWrite> SessionWrite for WsWriter<W> {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut out = self.out.lock();
        if !out.push()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if out.closing {
            // The reader closed the connection; the writer is on its way out.
            return Ok(bytes.len());
        }
        // A frame's header is 2 to 4 bytes; chat lines are rarely shorter
        // than 16: one allocation for the batch, as a rule.
        out.pending.reserve(bytes.len() + bytes.len() / 4 + 16);
        let mut rest = bytes;
        while let Some(newline) = memchr::memchr(b'\n', rest) {
            let line = &rest[..newline];
            if self.partial.is_empty() {
                encode_header(&mut out.pending, OP_TEXT, line.len());
                out.pending.extend_from_slice(line);
            } else {
                self.partial.extend_from_slice(line);
                encode_header(&mut out.pending, OP_TEXT, self.partial.len());
                out.pending.extend_from_slice(&self.partial);
                self.partial = Vec::new();
            }
            rest = &rest[newline + 1..];
        }
        self.partial.extend_from_slice(rest);
        // What the transport does not take now waits in `pending`, and the
        // next write waits for it: the socket's back-pressure reaches the
        // session's write timeout as it does over TCP.
        out.push()?;
        Ok(bytes.len())
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.out.lock();
        loop {
            if out.push()? {
                return out.half.poll_write_ready(cx);
            }
            ready!(out.half.poll_write_ready(cx))?;
        }
    }

    fn try_flush(&mut self) -> io::Result<()> {
        let mut out = self.out.lock();
        if !out.push()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        out.half.try_flush()
    }

    fn close(&mut self) {
        let mut out = self.out.lock();
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            if !out.closing {
                encode_header(&mut out.pending, OP_TEXT, line.len());
                out.pending.extend_from_slice(&line);
            }
        }
        out.close_with(close::NORMAL, "");
        let _ = out.half.try_flush();
        out.half.close();
    }
}

/// The data frame being decoded.
#[derive(Debug, Clone, Copy)]
struct Frame {
    remaining: u64,
    mask: [u8; 4],
    /// Position in the mask of the next payload byte.
    phase: usize,
    fin: bool,
}

/// The bytes of an unfinished UTF-8 sequence at the end of what was decoded.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Tail {
    bytes: [u8; 4],
    len: usize,
}

impl Utf8Tail {
    /// Checks `new`, which continues what was checked before.
    fn check(&mut self, new: &[u8]) -> bool {
        let mut start = 0;
        if self.len > 0 {
            let want = match self.bytes[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return false,
            };
            while self.len < want && start < new.len() {
                self.bytes[self.len] = new[start];
                self.len += 1;
                start += 1;
            }
            if self.len < want {
                return std::str::from_utf8(&self.bytes[..self.len])
                    .err()
                    .is_some_and(|err| err.error_len().is_none());
            }
            if std::str::from_utf8(&self.bytes[..want]).is_err() {
                return false;
            }
            self.len = 0;
        }
        match std::str::from_utf8(&new[start..]) {
            Ok(_) => true,
            Err(err) if err.error_len().is_none() => {
                let rest = &new[start + err.valid_up_to()..];
                self.bytes[..rest.len()].copy_from_slice(rest);
                self.len = rest.len();
                true
            }
            Err(_) => false,
        }
    }
}

/// The keepalive's timer and what it has heard, allocated at the first
/// wait (a connection that is never idle never makes it).
struct Keepalive {
    timer: Pin<Box<Sleep>>,
    heard: bool,
}

/// The reader task's half: frames in, lines out.
pub(crate) struct WsReader<R, W> {
    half: R,
    out: Arc<Mutex<Out<W>>>,
    /// Bytes read from the transport and not yet decoded.
    raw: Vec<u8>,
    /// Decoded text for the lobby's peeks and small reads.
    stash: Vec<u8>,
    frame: Option<Frame>,
    /// Length so far of the text message being received, if one is open.
    message: Option<usize>,
    utf8: Utf8Tail,
    limits: Limits,
    /// The client closed (a close frame, or the end of the stream).
    ended: bool,
    /// The connection was failed (a close frame sent): every read says so.
    failed: Option<(io::ErrorKind, &'static str)>,
    /// The last read found nothing: wait for the transport.
    starved: bool,
    keepalive: Option<Box<Keepalive>>,
}

/// What decoding one unit of input did.
enum Step {
    /// Needs more bytes from the transport.
    More,
    /// Consumed something (a header, payload, a control frame).
    Went,
}

impl<R: SessionRead, W: SessionWrite> WsReader<R, W> {
    fn fail(&mut self, code: u16, why: &'static str) -> io::Error {
        self.out.lock().close_with(code, why);
        let kind = if code == close::TOO_BIG {
            io::ErrorKind::InvalidInput
        } else {
            io::ErrorKind::InvalidData
        };
        self.failed = Some((kind, why));
        self.raw = Vec::new();
        io::Error::new(kind, why)
    }

    /// Decodes what `raw` holds into `into`, at most `room` bytes of text.
    fn decode(&mut self, into: &mut Vec<u8>, room: usize) -> io::Result<usize> {
        let mut produced = 0;
        let mut pos = 0;
        let result = loop {
            if self.ended {
                break Ok(());
            }
            match self.step(&mut pos, into, room - produced) {
                Ok((Step::More, n)) => {
                    produced += n;
                    break Ok(());
                }
                Ok((Step::Went, n)) => produced += n,
                Err(err) => break Err(err),
            }
            if produced + 1 >= room {
                break Ok(());
            }
        };
        if self.failed.is_none() {
            self.raw.drain(..pos);
            if self.raw.is_empty() && self.raw.capacity() > 0 {
                crate::memory::note_released(self.raw.capacity());
                self.raw = Vec::new();
            }
        }
        result.map(|()| produced)
    }

    /// One unit of decoding from `raw[*pos..]`: a frame header, a run of
    /// payload, or a whole control frame.
    fn step(
        &mut self,
        pos: &mut usize,
        into: &mut Vec<u8>,
        room: usize,
    ) -> io::Result<(Step, usize)> {
        if let Some(mut frame) = self.frame {
            let mut produced = 0;
            if frame.remaining > 0 {
                let available = self.raw.len() - *pos;
                // One byte of room is kept for the `\n`.
                let n = (available as u64)
                    .min(frame.remaining)
                    .min(room.saturating_sub(1) as u64) as usize;
                if n == 0 {
                    return Ok((Step::More, 0));
                }
                let start = into.len();
                into.extend_from_slice(&self.raw[*pos..*pos + n]);
                for (i, byte) in into[start..].iter_mut().enumerate() {
                    *byte ^= frame.mask[(frame.phase + i) & 3];
                }
                if !self.utf8.check(&into[start..]) {
                    into.truncate(start);
                    return Err(
                        self.fail(close::INVALID_PAYLOAD, "invalid UTF-8 in a text message")
                    );
                }
                *pos += n;
                produced = n;
                frame.remaining -= n as u64;
                frame.phase = (frame.phase + n) & 3;
            }
            if frame.remaining > 0 {
                self.frame = Some(frame);
                return Ok((Step::Went, produced));
            }
            self.frame = None;
            if frame.fin {
                if self.utf8.len > 0 {
                    return Err(
                        self.fail(close::INVALID_PAYLOAD, "invalid UTF-8 in a text message")
                    );
                }
                self.message = None;
                into.push(b'\n');
                produced += 1;
            }
            return Ok((Step::Went, produced));
        }
        let Some((header, header_len)) = parse_header(&self.raw[*pos..]) else {
            return Ok((Step::More, 0));
        };
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.heard = true;
        }
        if header.rsv != 0 {
            return Err(self.fail(close::PROTOCOL_ERROR, "reserved bits set"));
        }
        if !header.masked {
            return Err(self.fail(close::PROTOCOL_ERROR, "a client's frames must be masked"));
        }
        let max_message = self.limits.max_message;
        let too_big = |so_far: usize| header.len > max_message.saturating_sub(so_far) as u64;
        match header.opcode {
            OP_TEXT | OP_CONTINUATION => {
                let so_far = match (header.opcode, self.message) {
                    (OP_TEXT, None) => 0,
                    (OP_CONTINUATION, Some(so_far)) => so_far,
                    (OP_TEXT, Some(_)) => {
                        return Err(self.fail(
                            close::PROTOCOL_ERROR,
                            "a new message inside a fragmented one",
                        ));
                    }
                    _ => return Err(self.fail(close::PROTOCOL_ERROR, "a continuation of nothing")),
                };
                if too_big(so_far) {
                    return Err(self.fail(close::TOO_BIG, "error: line too long"));
                }
                self.message = Some(so_far + header.len as usize);
                *pos += header_len;
                self.frame = Some(Frame {
                    remaining: header.len,
                    mask: header.mask,
                    phase: 0,
                    fin: header.fin,
                });
                Ok((Step::Went, 0))
            }
            OP_BINARY => Err(self.fail(
                close::UNSUPPORTED_DATA,
                "binary messages are not accepted; send text",
            )),
            OP_CLOSE | OP_PING | OP_PONG => {
                if !header.fin || header.len > 125 {
                    return Err(self.fail(
                        close::PROTOCOL_ERROR,
                        "a control frame over 125 bytes or fragmented",
                    ));
                }
                let len = header.len as usize;
                if self.raw.len() - *pos < header_len + len {
                    return Ok((Step::More, 0));
                }
                let mut payload = [0u8; 125];
                let payload = &mut payload[..len];
                payload.copy_from_slice(&self.raw[*pos + header_len..*pos + header_len + len]);
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= header.mask[i & 3];
                }
                *pos += header_len + len;
                match header.opcode {
                    OP_PING => self.out.lock().control(OP_PONG, payload),
                    OP_CLOSE => {
                        // Answer with the client's code (RFC 6455 5.5.1).
                        let code = match payload {
                            [high, low, ..] => u16::from_be_bytes([*high, *low]),
                            _ => close::NORMAL,
                        };
                        self.out.lock().close_with(code, "");
                        self.ended = true;
                    }
                    _ => {}
                }
                Ok((Step::Went, 0))
            }
            _ => Err(self.fail(close::PROTOCOL_ERROR, "unknown opcode")),
        }
    }

    /// Decodes into `into`, reading from the transport when nothing is
    /// buffered. `Ok(0)`: input is over; `WouldBlock`: nothing now.
    fn read_into(&mut self, into: &mut Vec<u8>, room: usize) -> io::Result<usize> {
        loop {
            if let Some((kind, why)) = self.failed {
                return Err(io::Error::new(kind, why));
            }
            let produced = self.decode(into, room.max(2))?;
            if produced > 0 {
                return Ok(produced);
            }
            if self.ended {
                return Ok(0);
            }
            if self.raw.capacity() - self.raw.len() < READ_CHUNK / 4 {
                self.raw.reserve(READ_CHUNK);
            }
            match self.half.try_read_buf(&mut self.raw) {
                Ok(0) => {
                    self.ended = true;
                    return Ok(0);
                }
                Ok(_) => {}
                Err(err) => {
                    if err.kind() == io::ErrorKind::WouldBlock {
                        self.starved = true;
                        if self.raw.is_empty() {
                            crate::memory::note_released(self.raw.capacity());
                            self.raw = Vec::new();
                        }
                    }
                    return Err(err);
                }
            }
        }
    }

    /// Pings on schedule; an error once the client has been silent for a
    /// whole interval after a ping.
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(every) = self.limits.ping_every else {
            return Poll::Pending;
        };
        let keepalive = self.keepalive.get_or_insert_with(|| {
            Box::new(Keepalive {
                timer: Box::pin(tokio::time::sleep(every)),
                heard: true,
            })
        });
        while keepalive.timer.as_mut().poll(cx).is_ready() {
            if !keepalive.heard {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer to the WebSocket ping",
                ));
            }
            keepalive.heard = false;
            keepalive.timer.as_mut().reset(Instant::now() + every);
            self.out.lock().control(OP_PING, b"");
        }
        Poll::Pending
    }
}

impl<R: SessionRead, W: SessionWrite> SessionRead for WsReader<R, W> {
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        if let Some(n) = hand_over_stash(&mut self.stash, buf) {
            return Ok(n);
        }
        let room = buf.capacity() - buf.len();
        self.read_into(buf, room.max(READ_CHUNK / 4))
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.stash.is_empty() || self.ended || self.failed.is_some() || !self.starved {
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(err) = self.poll_keepalive(cx) {
            return Poll::Ready(Err(err));
        }
        ready!(self.half.poll_read_ready(cx))?;
        self.starved = false;
        Poll::Ready(Ok(()))
    }

    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if !self.stash.is_empty() {
                let n = self.stash.len().min(buf.len());
                buf[..n].copy_from_slice(&self.stash[..n]);
                return Poll::Ready(Ok(n));
            }
            let mut stash = std::mem::take(&mut self.stash);
            let read = self.read_into(&mut stash, READ_CHUNK);
            self.stash = stash;
            match read {
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_read_ready(cx))?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stash.is_empty() {
            let mut stash = Vec::new();
            let read = self.read_into(&mut stash, READ_CHUNK);
            self.stash = stash;
            if read? == 0 {
                return Ok(0);
            }
        }
        let n = self.stash.len().min(buf.len());
        buf[..n].copy_from_slice(&self.stash[..n]);
        self.stash.drain(..n);
        if self.stash.is_empty() {
            self.stash = Vec::new();
        }
        Ok(n)
    }
}

/// A frame header, as far as the server needs it.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    len: u64,
    mask: [u8; 4],
}

/// Parses a header from the start of `bytes`; `None` if incomplete.
fn parse_header(bytes: &[u8]) -> Option<(Header, usize)> {
    let [first, second, ..] = *bytes else {
        return None;
    };
    let masked = second & 0x80 != 0;
    let (len, mut at) = match second & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 10),
        len => (u64::from(len), 2),
    };
    let mut mask = [0; 4];
    if masked {
        mask.copy_from_slice(bytes.get(at..at + 4)?);
        at += 4;
    }
    Some((
        Header {
            fin: first & 0x80 != 0,
            rsv: first & 0x70,
            opcode: first & 0x0F,
            masked,
            len,
            mask,
        },
        at,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_anywhere_is_accepted() {
        let text = "héllo wörld ✓ 𝄞".as_bytes();
        for cut in 0..text.len() {
            let mut tail = Utf8Tail::default();
            assert!(tail.check(&text[..cut]), "cut at {cut}");
            assert!(tail.check(&text[cut..]), "cut at {cut}");
            assert_eq!(tail.len, 0);
        }
    }

    #[test]
    fn invalid_utf8_is_caught_across_a_split() {
        let bad = [0xE2, 0x28, 0xA1];
        let mut tail = Utf8Tail::default();
        assert!(tail.check(&bad[..1]));
        assert!(!tail.check(&bad[1..]));
        assert!(!Utf8Tail::default().check(&[0xFF]));
    }

    #[test]
    fn headers_of_each_length_form() {
        let mut out = Vec::new();
        for len in [0, 125, 126, 65535, 65536] {
            out.clear();
            encode_header(&mut out, OP_TEXT, len);
            let (header, at) = parse_header(&out).unwrap_or_else(|| panic!("{len}"));
            assert_eq!(
                (header.len, at, header.opcode, header.fin),
                (len as u64, out.len(), OP_TEXT, true)
            );
            assert!(parse_header(&out[..out.len() - 1]).is_none());
        }
    }
}
