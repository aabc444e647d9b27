//! Our RFC 6455 framing (`src/web/ws.rs`) on a bare TCP stream, outside any
//! session: only for `crates/ws-compare`, which serves one minimal room
//! through it and through three WebSocket crates to compare them (feature
//! `test-util`; not part of the server's API).
//!
//! The two halves keep the session's readiness shape: [`Reader::read`]
//! tries, waits for readiness only when nothing is there, and decodes
//! straight into the caller's buffer (each text message as one
//! `\n`-terminated line); [`Writer::write_lines`] turns a batch of
//! `\n`-terminated lines into text frames. Neither half keeps a buffer
//! while idle.

use std::io;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::ws::{Limits, WebSocket, WsReader, WsWriter};
use crate::transport::{self, SessionRead, SessionWrite, Transport};

/// The reading half: text messages in, lines out.
pub struct Reader(WsReader<OwnedReadHalf, OwnedWriteHalf>);

/// The writing half: lines in, text frames out.
pub struct Writer(WsWriter<OwnedWriteHalf>);

/// Wraps a stream whose handshake is over (`preread`: what was read past
/// it); messages over `max_message` bytes close the connection with 1009.
/// No keepalive pings (the crates compared send none by themselves).
pub fn split(stream: TcpStream, preread: Vec<u8>, max_message: usize) -> (Reader, Writer) {
    let limits = Limits {
        max_message,
        ping_every: None,
    };
    let (read, write) = WebSocket::new(stream, preread, limits).split();
    (Reader(read), Writer(write))
}

impl Reader {
    /// Appends at least one byte of decoded lines to `buf`, waiting until
    /// there is some; `Ok(0)` once the client has closed. A protocol
    /// violation is an error (its close frame already queued).
    pub async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            match self.0.try_read_buf(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| self.0.poll_read_ready(cx)).await?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                read => return read,
            }
        }
    }
}

impl Writer {
    /// Sends `lines` (each ending with `\n`) as one text frame per line.
    pub async fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        transport::write_all(&mut self.0, lines).await
    }

    /// Sends a close frame (1000), without waiting.
    pub fn close(&mut self) {
        self.0.close();
    }
}

/// Hands the pages glibc keeps after a burst back to the system, as the
/// server's housekeeper does once a burst is over (`src/memory.rs`), so
/// that an idle connection's memory is measured alike in both.
pub fn release_free_memory() {
    crate::memory::release_free_memory();
}
