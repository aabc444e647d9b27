//! `--protocol ws`: the chat server's browser door (`chat-server
//! --web-addr`), spoken the way the line protocol is, so that a run
//! against the web port measures the same room through WebSocket framing.
//!
//! What this module owns: the opening handshake ([`handshake`]), framing a
//! line as a client text frame ([`encode_text`]) and turning the server's
//! frames back into lines in place ([`Deframer`]), so the receive path,
//! the payload decoder and every count stay those of the line protocol.
//!
//! The tool masks its frames with the all-zero key: RFC 6455 asks a client
//! for an unpredictable key (it protects proxies that do not understand the
//! protocol, and there are none on loopback); the server must unmask
//! whatever the key, so it does the same work, and the tool saves a pass
//! over every payload.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tls::TlsClient;

/// A pong with no payload, masked (the key is zero).
pub const PONG: [u8; 6] = [0x8A, 0x80, 0, 0, 0, 0];

/// Sends the upgrade request for `/ws` and reads the `101` answer; returns
/// whatever arrived after it (already the first frames, usually).
pub async fn handshake(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    addr: SocketAddr,
) -> anyhow::Result<Vec<u8>> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: Y2hhdC1sb2FkIGNsaWVudA==\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .context("sending the WebSocket handshake")?;
    stream
        .flush()
        .await
        .context("sending the WebSocket handshake")?;
    let mut answer = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let end = loop {
        let read = stream
            .read(&mut chunk)
            .await
            .context("reading the handshake's answer")?;
        if read == 0 {
            bail!("{addr} closed during the WebSocket handshake (is it chat-server --web-addr?)");
        }
        answer.extend_from_slice(&chunk[..read]);
        if let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        if answer.len() > 8 * 1024 {
            bail!("{addr}: the handshake's answer has no end");
        }
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or_default();
        let body = String::from_utf8_lossy(&answer[end..]);
        bail!("{addr} refused the WebSocket: {status} {}", body.trim());
    }
    Ok(answer[end..].to_vec())
}

/// Appends a masked text frame carrying `line` (without its newline).
#[inline]
pub fn encode_text(out: &mut Vec<u8>, line: &[u8]) {
    encode_header(out, line.len());
    out.extend_from_slice(line);
}

/// Appends the header of a masked text frame of `len` bytes.
#[inline]
pub fn encode_header(out: &mut Vec<u8>, len: usize) {
    out.push(0x81);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0; 4]);
}

/// The server's frames (unmasked) turned into `\n`-terminated lines. A
/// frame's `\n` takes the place of its header, so what comes out is at
/// most one byte longer than what went in (a frame whose header came in an
/// earlier read).
#[derive(Debug, Default, Clone)]
pub struct Deframer {
    /// A header split across reads.
    header: [u8; 10],
    header_len: usize,
    /// Payload bytes still to come of the current frame.
    remaining: u64,
    /// The current frame is text (its payload is kept) or control (skipped).
    text: bool,
    /// The current frame ends a message.
    fin: bool,
    /// Pings received, to be answered with [`PONG`].
    pub pings: u32,
    /// The server sent a close frame.
    pub closed: bool,
}

impl Deframer {
    /// Turns the frames in `input` into lines in `output`, which must be at
    /// least one byte longer; returns the length of the lines.
    pub fn deframe(&mut self, input: &[u8], output: &mut [u8]) -> usize {
        let mut read = 0;
        let mut written = 0;
        while read < input.len() {
            if self.remaining > 0 {
                let n = (self.remaining.min((input.len() - read) as u64)) as usize;
                if self.text {
                    output[written..written + n].copy_from_slice(&input[read..read + n]);
                    written += n;
                }
                read += n;
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    written += self.end_frame(output, written);
                }
                continue;
            }
            // A header: its first two bytes say how long it is.
            let want = |header: &[u8]| match header.get(1).map(|byte| byte & 0x7F) {
                Some(126) => 4,
                Some(127) => 10,
                _ => 2,
            };
            while self.header_len < want(&self.header[..self.header_len]) && read < input.len() {
                self.header[self.header_len] = input[read];
                self.header_len += 1;
                read += 1;
            }
            if self.header_len < want(&self.header[..self.header_len]) {
                break;
            }
            let header = &self.header[..self.header_len];
            let opcode = header[0] & 0x0F;
            self.fin = header[0] & 0x80 != 0;
            self.remaining = match header[1] & 0x7F {
                126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
                127 => u64::from_be_bytes(header[2..10].try_into().unwrap_or_default()),
                len => u64::from(len),
            };
            self.header_len = 0;
            self.text = matches!(opcode, 0x0 | 0x1);
            match opcode {
                0x9 => self.pings = self.pings.saturating_add(1),
                0x8 => self.closed = true,
                _ => {}
            }
            if self.remaining == 0 {
                written += self.end_frame(output, written);
            }
        }
        written
    }

    /// Ends a text message with `\n` at `at`; the bytes written.
    fn end_frame(&mut self, output: &mut [u8], at: usize) -> usize {
        if self.text && self.fin {
            output[at] = b'\n';
            1
        } else {
            0
        }
    }
}

/// A WebSocket's receive side: the deframer and the raw bytes' buffer.
#[derive(Debug)]
pub struct WsIn {
    pub deframer: Deframer,
    raw: Vec<u8>,
}

impl WsIn {
    pub fn new(capacity: usize) -> WsIn {
        WsIn {
            deframer: Deframer::default(),
            raw: vec![0; capacity],
        }
    }

    /// Where to read raw bytes, when the lines may take up to `room` bytes.
    pub fn raw(&mut self, room: usize) -> &mut [u8] {
        let len = room.saturating_sub(1).clamp(1, self.raw.len());
        &mut self.raw[..len]
    }

    /// Turns the `n` raw bytes just read into lines in `output`.
    pub fn lines_into(&mut self, n: usize, output: &mut [u8]) -> usize {
        self.deframer.deframe(&self.raw[..n], output)
    }
}

/// Connects to the web door at `addr`: TCP (and TLS with `tls`:
/// `wss://`), the handshake, and a conn whose reader holds what came after
/// the handshake, as lines.
pub async fn open(
    addr: SocketAddr,
    buffer: usize,
    tls: Option<&TlsClient>,
) -> anyhow::Result<crate::client::Conn> {
    let mut stream = crate::tls::dial(addr, tls).await?;
    let after = handshake(&mut stream, addr).await?;
    let mut ws = WsIn::new(buffer);
    let mut reader = crate::client::LineReader::new(buffer);
    let spare = reader.spare();
    if after.len() + 1 > spare.len() {
        bail!("{addr}: the first frames do not fit the read buffer");
    }
    let lines = ws.deframer.deframe(&after, spare);
    reader.filled(lines);
    Ok(crate::client::Conn {
        stream,
        who: String::new(),
        reader,
        publisher: None,
        ws: Some(ws),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            frame.push(payload.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn frames_become_lines_whatever_the_reads() {
        let long = "z".repeat(300);
        let mut stream = Vec::new();
        stream.extend(server_frame(0x1, true, b"You are 127.0.0.1:5"));
        stream.extend(server_frame(0x9, true, b""));
        stream.extend(server_frame(0x1, false, b"frag"));
        stream.extend(server_frame(0x0, true, b"mented"));
        stream.extend(server_frame(0x1, true, long.as_bytes()));
        stream.extend(server_frame(0x1, true, b""));
        let expected = format!("You are 127.0.0.1:5\nfragmented\n{long}\n\n");
        for cut in 1..stream.len() {
            let mut deframer = Deframer::default();
            let mut got = vec![0u8; stream.len() + 2];
            let a = deframer.deframe(&stream[..cut], &mut got);
            let b = deframer.deframe(&stream[cut..], &mut got[a..]);
            got.truncate(a + b);
            assert_eq!(String::from_utf8_lossy(&got), expected, "cut at {cut}");
            assert_eq!(deframer.pings, 1, "cut at {cut}");
        }
    }

    #[test]
    fn text_frames_carry_the_line() {
        let mut out = Vec::new();
        encode_text(&mut out, b"hi");
        assert_eq!(out, [0x81, 0x82, 0, 0, 0, 0, b'h', b'i']);
        out.clear();
        encode_text(&mut out, &[b'x'; 200]);
        assert_eq!(&out[..4], [0x81, 0x80 | 126, 0, 200]);
        assert_eq!(out.len(), 4 + 4 + 200);
    }
}
