//! The two byte streams a session can run on, plain TCP and TLS, behind
//! the small interface its reader and writer tasks use.
//!
//! The session's tasks are written for readiness, not for futures that own
//! a buffer: a reader tries a read, and only when nothing is there does it
//! wait, holding no buffer while it waits, so an idle connection costs no
//! read buffer. [`SessionRead`] and [`SessionWrite`] keep that shape:
//!
//! - **TCP** maps straight onto tokio's owned halves (`try_read_buf`,
//!   `poll_read_ready`, `try_write`, `poll_write_ready`): the same calls the
//!   session made before TLS existed, no copy added, nothing buffered here.
//! - **TLS** runs on `tokio::io::split` of a `tokio_rustls` stream. A "try"
//!   is one poll with a waker that does nothing (the real waker is
//!   registered by the wait that follows a `WouldBlock`). Waiting to read
//!   has to read, since rustls only knows whether plaintext is there by
//!   decrypting a record, so the TLS reader keeps what that wait read in a
//!   small stash for the next try: one extra copy, on connections that
//!   already hold rustls's own buffers. Waiting to write is a flush of the
//!   records rustls holds. The writer's coalesced batches of up to 64 KiB
//!   become full-size (16 KiB) records.

use std::io;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub(crate) mod tls;

/// A stream the session can split into its reader's and writer's halves.
pub(crate) trait Transport: Send + 'static {
    type Read: SessionRead;
    type Write: SessionWrite;
    fn split(self) -> (Self::Read, Self::Write);
}

/// The reader task's half.
pub(crate) trait SessionRead: Send + Sync + 'static {
    /// Appends what can be read now to `buf`; `WouldBlock` if nothing can,
    /// `Ok(0)` at the end of input.
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// Ready when `try_read_buf` may have something.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Copies what can be read into `buf` without consuming it, waiting
    /// until there is something; `Ok(0)` at the end of input.
    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Reads what can be read now into `buf`; `WouldBlock` if nothing can.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Reads exactly `buf.len()` bytes (the lobby takes what it peeked).
pub(crate) async fn read_exact<R: SessionRead>(reader: &mut R, buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| reader.poll_read_ready(cx)).await?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Writes all of `bytes` and flushes them (the lobby's prompts and errors,
/// written before the writer task exists).
pub(crate) async fn write_all<W: SessionWrite>(writer: &mut W, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match writer.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| writer.poll_write_ready(cx)).await?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    loop {
        match writer.try_flush() {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| writer.poll_write_ready(cx)).await?;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// The writer task's half.
pub(crate) trait SessionWrite: Send + 'static {
    /// Writes what fits now; `WouldBlock` if nothing does.
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize>;

    /// Ready when `try_write` (or `try_flush`) may make progress.
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Sends what the transport buffered; `WouldBlock` while some remains.
    fn try_flush(&mut self) -> io::Result<()>;

    /// Ends our side of the conversation, without waiting: TLS sends its
    /// `close_notify`; TCP's FIN goes when the half is dropped.
    fn close(&mut self);
}

impl Transport for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

impl SessionRead for OwnedReadHalf {
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        OwnedReadHalf::try_read_buf(self, buf)
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket's own reader waker slot: `readable()` would add a
        // 168-byte waiter to every task.
        self.as_ref().poll_read_ready(cx)
    }

    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        OwnedReadHalf::poll_peek(self, cx, &mut tokio::io::ReadBuf::new(buf))
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        OwnedReadHalf::try_read(self, buf)
    }
}

impl SessionWrite for OwnedWriteHalf {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        OwnedWriteHalf::try_write(self, bytes)
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }

    fn try_flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn close(&mut self) {}
}

impl Transport for TlsStream<TcpStream> {
    type Read = TlsReader;
    type Write = TlsWriter;
    fn split(self) -> (TlsReader, TlsWriter) {
        let (read, write) = tokio::io::split(self);
        (
            TlsReader {
                half: read,
                stash: Vec::new(),
                ended: false,
            },
            TlsWriter(write),
        )
    }
}

/// Reads of a TLS connection; see the module documentation.
pub(crate) struct TlsReader {
    half: ReadHalf<TlsStream<TcpStream>>,
    /// Plaintext read while waiting, not yet taken by `try_read_buf`.
    stash: Vec<u8>,
    /// The wait saw the end of input.
    ended: bool,
}

/// What one wait may read ahead.
const STASH: usize = 4 * 1024;

impl TlsReader {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        let mut read = tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.half), cx, buf);
        // A peer that closes the TCP connection without `close_notify` has
        // ended its input all the same (as it would over plain TCP).
        if let Poll::Ready(Err(err)) = &read {
            if err.kind() == io::ErrorKind::UnexpectedEof {
                read = Poll::Ready(Ok(0));
            }
        }
        read
    }
}

impl SessionRead for TlsReader {
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        if let Some(n) = hand_over_stash(&mut self.stash, buf) {
            return Ok(n);
        }
        if self.ended {
            return Ok(0);
        }
        match self.poll_read_into(&mut noop_context(), buf) {
            Poll::Ready(read) => read,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.stash.is_empty() || self.ended {
            return Poll::Ready(Ok(()));
        }
        let mut stash = std::mem::take(&mut self.stash);
        stash.reserve(STASH);
        let read = self.poll_read_into(cx, &mut stash);
        self.stash = stash;
        match read {
            Poll::Ready(Ok(0)) => {
                self.ended = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                // Idle: hold no buffer while waiting.
                self.stash = Vec::new();
                Poll::Pending
            }
        }
    }

    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {
                let n = self.stash.len().min(buf.len());
                buf[..n].copy_from_slice(&self.stash[..n]);
                Poll::Ready(Ok(n))
            }
            other => other.map(|ready| ready.map(|()| 0)),
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.stash.is_empty() {
            let n = self.stash.len().min(buf.len());
            buf[..n].copy_from_slice(&self.stash[..n]);
            self.stash.drain(..n);
            return Ok(n);
        }
        if self.ended {
            return Ok(0);
        }
        let mut read_buf = tokio::io::ReadBuf::new(buf);
        match std::pin::Pin::new(&mut self.half).poll_read(&mut noop_context(), &mut read_buf) {
            Poll::Ready(Ok(())) => Ok(read_buf.filled().len()),
            Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Writes of a TLS connection; see the module documentation.
pub(crate) struct TlsWriter(WriteHalf<TlsStream<TcpStream>>);

impl SessionWrite for TlsWriter {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match std::pin::Pin::new(&mut self.0).poll_write(&mut noop_context(), bytes) {
            Poll::Ready(written) => written,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn try_flush(&mut self) -> io::Result<()> {
        match std::pin::Pin::new(&mut self.0).poll_flush(&mut noop_context()) {
            Poll::Ready(flushed) => flushed,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn close(&mut self) {
        let _ = std::pin::Pin::new(&mut self.0).poll_shutdown(&mut noop_context());
    }
}

/// Hands bytes a reader read ahead of the caller's buffer (its stash) to
/// that buffer, and frees the stash: `Some(n)` if there were any, so the
/// read returns them before touching the socket again.
pub(crate) fn hand_over_stash(stash: &mut Vec<u8>, buf: &mut Vec<u8>) -> Option<usize> {
    if stash.is_empty() {
        return None;
    }
    buf.extend_from_slice(stash);
    let n = stash.len();
    *stash = Vec::new();
    Some(n)
}

/// A context whose waker does nothing, for a poll that only tries: the
/// wait that follows a `WouldBlock` registers the task's real waker.
fn noop_context() -> Context<'static> {
    Context::from_waker(Waker::noop())
}
