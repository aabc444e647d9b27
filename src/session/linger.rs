//! Closing a connection without destroying its last line: after an error
//! line the server keeps reading (and discarding) for a while, because
//! closing a socket with unread input sends a reset that can destroy what
//! was written just before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::Client;
use crate::transport::SessionRead;

/// After an over-long line the server keeps reading (and discarding) for
/// this long, so the error line is not destroyed by the reset that closing
/// a socket with unread input sends.
const LINGER: Duration = Duration::from_secs(2);

/// After a flood or an eviction, lingering stops after this many bytes as
/// well: a flooder writes hundreds of megabytes a second, and reading them
/// all for [`LINGER`] would hand it two seconds of a core.
pub(super) const LINGER_AFTER_FLOOD: usize = 1024 * 1024;

/// [`discard_input`], boxed: it is rare.
pub(super) fn linger<'a, R: SessionRead>(
    reader: &'a mut R,
    client: &'a Client,
    at_most: usize,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(discard_input(reader, client, at_most))
}

/// Reads and throws away input for up to [`LINGER`] and `at_most` bytes,
/// or until the client closes its side.
async fn discard_input<R: SessionRead>(reader: &mut R, client: &Client, at_most: usize) {
    let deadline = Instant::now() + LINGER;
    let mut sink = Vec::with_capacity(16 * 1024);
    let mut discarded = 0usize;
    loop {
        sink.clear();
        match reader.try_read_buf(&mut sink) {
            Ok(0) => return,
            Ok(read) => {
                discarded = discarded.saturating_add(read);
                if discarded >= at_most {
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    ready = std::future::poll_fn(|cx| reader.poll_read_ready(cx)) => if ready.is_err() { return },
                    () = tokio::time::sleep_until(deadline) => return,
                    () = client.ending() => return,
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}
