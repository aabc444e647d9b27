//! From accept to the room: the password (`--password-file`, checked in
//! `guard::password`), the naming handshake (`--names`), the join, and
//! the first lines the client is sent (`You are WHO`, and with
//! `--announce-present` the `present` line, and with `--history` the
//! room's last lines). Shared by every model; what
//! makes a name unique and a list exact is each hub's business.
//!
//! With a password, the client's first line must be it (no prompt: the
//! seed's clients see nothing new); a wrong one gets `error: wrong
//! password` and a close, after the delay its address has earned.
//! Without `--names` (and a password) this is one [`Hub::join`]. With it, the reader task
//! sends [`NAME_PROMPT`] and reads lines until one is a free, well-formed
//! name, answering each bad or taken one with an `error: ...` line. Until
//! then the client is not in the room: nobody hears of it and it hears
//! nothing, and if it goes (closes, idles out, sends an over-long line, or
//! the server shuts down) nobody is told that it left. The handshake runs in
//! the reader task alone and writes straight to the socket; the writer task
//! starts after the join, so an unnamed connection is one task.
//!
//! Reading a name never consumes past its newline (it peeks, then takes up
//! to the newline), so whatever the client typed after its name stays in
//! the socket (over TLS: in the reader's stash of decrypted bytes) for the
//! chat loop, which starts with an empty buffer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::context::{ServerContext, SHUTTING_DOWN};
use super::linger::linger;
use crate::client::Client;
use crate::config::MAX_PASSWORD;
use crate::guard::password::Gate;
use crate::protocol::{
    check_name, LineTooLong, Message, BAD_NAME, MAX_NAME, NAMES_UNAVAILABLE, NAME_PROMPT,
    NAME_TAKEN,
};
use crate::room::history::Snapshot;
use crate::room::hub::{Hub, Refused};
use crate::transport::{self, SessionRead, SessionWrite};

/// A client in the room, and what its writer sends first.
pub(crate) struct Entered<I> {
    /// Renamed under `--names`.
    pub client: Arc<Client>,
    pub inbox: I,
    /// `You are WHO`, and the `present` line under `--announce-present`.
    pub hello: Message,
    /// Under `--history`: the room's last lines, sent after `hello`.
    pub history: Option<Snapshot>,
}

/// Puts `client` in the room, naming it first under `--names`. `None` means
/// the connection ended before that; it has been told why, if anything.
/// Boxed, so that the reader task's state does not keep room for the
/// handshake for the connection's whole life.
pub(crate) fn enter<'a, H: Hub, R: SessionRead, W: SessionWrite>(
    hub: &'a H,
    reader: &'a mut R,
    writer: &'a mut W,
    client: Arc<Client>,
    server: &'a ServerContext,
) -> Pin<Box<impl Future<Output = Option<Entered<H::Inbox>>> + Send + 'a>> {
    Box::pin(async move {
        let names = server.config.names;
        let address = Arc::clone(&client.who);
        let mut client = client;
        if let Some(gate) = &server.gate {
            ask_password(gate, reader, writer, &client, server).await?;
        }
        if names {
            say(writer, NAME_PROMPT, server).await.ok()?;
        }
        loop {
            if names {
                let name = ask_name(reader, writer, &client, server).await?;
                client = match client.renamed(name) {
                    Ok(client) => client,
                    Err(client) => {
                        client
                            .span()
                            .in_scope(|| warn!("cannot rename a client already shared"));
                        return None;
                    }
                };
            }
            match hub.join(&client, Message::arrived(&client.who)).await {
                Ok(joined) => {
                    if names {
                        client.span().in_scope(|| info!(%address, "named"));
                    }
                    let present = server.config.announce_present;
                    let hello = Message::hello(&client.who, present.then_some(&joined.present[..]));
                    return Some(Entered {
                        client,
                        inbox: joined.inbox,
                        hello,
                        history: joined.history,
                    });
                }
                Err(Refused::NameTaken) if names => say(writer, NAME_TAKEN, server).await.ok()?,
                Err(Refused::NamesUnavailable) if names => {
                    say(writer, NAMES_UNAVAILABLE, server).await.ok()?;
                }
                Err(_) => {
                    // Hubs check names only under `--names`.
                    client.span().in_scope(|| warn!("join refused"));
                    return None;
                }
            }
        }
    })
}

/// Why a connection ended before it had a name.
enum Gone {
    Closed,
    Idle,
    /// The server is shutting down.
    Ending,
    TooLong(LineTooLong),
}

/// Reads the client's first line and checks it is the password, after the
/// delay its address has earned by earlier wrong guesses. `None` if it is
/// wrong (the client is told so) or the connection ends first.
async fn ask_password<R: SessionRead, W: SessionWrite>(
    gate: &Gate,
    reader: &mut R,
    writer: &mut W,
    client: &Client,
    server: &ServerContext,
) -> Option<()> {
    let gone = match read_line(reader, client, server, MAX_PASSWORD + 2).await {
        Ok(mut line) => {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let ip = client.who.parse::<SocketAddr>().ok().map(|addr| addr.ip());
            let delay = gate.delay(ip);
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = client.ending() => return None,
                }
            }
            if gate.check(ip, &line) {
                return Some(());
            }
            client
                .span()
                .in_scope(|| warn!(throttled_for = ?delay, "wrong password"));
            let _ = say(writer, chat_wire::WRONG_PASSWORD, server).await;
            return None;
        }
        Err(gone) => gone,
    };
    farewell(gone, reader, writer, client, server).await;
    None
}

/// Reads lines until one is a well-formed name; `None` if the connection
/// ends first, after telling the client why.
async fn ask_name<R: SessionRead, W: SessionWrite>(
    reader: &mut R,
    writer: &mut W,
    client: &Client,
    server: &ServerContext,
) -> Option<Arc<str>> {
    loop {
        let gone = match read_line(reader, client, server, MAX_NAME + 2).await {
            Ok(line) => match check_name(&line) {
                Some(name) => return Some(name.into()),
                None => {
                    say(writer, BAD_NAME, server).await.ok()?;
                    continue;
                }
            },
            Err(gone) => gone,
        };
        farewell(gone, reader, writer, client, server).await;
        return None;
    }
}

/// Tells a client that goes before entering why, if anything, and logs it.
async fn farewell<R: SessionRead, W: SessionWrite>(
    gone: Gone,
    reader: &mut R,
    writer: &mut W,
    client: &Client,
    server: &ServerContext,
) {
    let last_words = client.span().in_scope(|| match &gone {
        Gone::Closed => {
            info!("left before entering the room");
            None
        }
        Gone::Idle => {
            info!("disconnecting before entering: idle timeout");
            Some("error: idle timeout".to_string())
        }
        Gone::Ending => Some(SHUTTING_DOWN.to_string()),
        Gone::TooLong(err) => {
            warn!(
                max = err.max,
                "disconnecting before entering: line too long"
            );
            Some(format!("error: {err}"))
        }
    });
    if let Some(words) = last_words {
        let _ = say(writer, &words, server).await;
    }
    if matches!(gone, Gone::TooLong(_)) {
        linger(reader, client, usize::MAX).await;
    }
}

/// The next line, without its newline, consuming nothing after it. Only
/// the first `keep` bytes are kept (a longer line is no name and no
/// password).
async fn read_line<R: SessionRead>(
    reader: &mut R,
    client: &Client,
    server: &ServerContext,
    keep: usize,
) -> Result<Vec<u8>, Gone> {
    let max_line = server.config.max_line;
    let mut line = Vec::with_capacity(keep);
    let mut length = 0;
    let mut chunk = vec![0u8; keep];
    loop {
        if server.stopping.load(Ordering::Relaxed) {
            return Err(Gone::Ending);
        }
        let peeked = tokio::select! {
            peeked = std::future::poll_fn(|cx| reader.poll_peek(cx, &mut chunk)) => peeked,
            () = client.ending() => return Err(Gone::Ending),
            () = sleep_for(server.config.idle_timeout) => return Err(Gone::Idle),
        };
        let peeked = match peeked {
            Ok(0) | Err(_) => return Err(Gone::Closed),
            Ok(peeked) => peeked,
        };
        let newline = memchr::memchr(b'\n', &chunk[..peeked]);
        let take = newline.map_or(peeked, |at| at + 1);
        // Already in the socket's buffer: this read does not wait.
        if transport::read_exact(reader, &mut chunk[..take])
            .await
            .is_err()
        {
            return Err(Gone::Closed);
        }
        length += take;
        let room = keep - line.len();
        line.extend_from_slice(&chunk[..take.min(room)]);
        let (complete, text_length) = match newline {
            Some(_) => (true, length - 1),
            None => (false, length),
        };
        if text_length > max_line {
            return Err(Gone::TooLong(LineTooLong { max: max_line }));
        }
        if complete {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            return Ok(line);
        }
    }
}

async fn sleep_for(idle: Option<Duration>) {
    match idle {
        Some(idle) => tokio::time::sleep(idle).await,
        None => std::future::pending().await,
    }
}

/// Writes `text` and a newline, giving up after `--write-timeout` or when
/// the shutdown grace period ends.
async fn say<W: SessionWrite>(
    writer: &mut W,
    text: &str,
    server: &ServerContext,
) -> io::Result<()> {
    let line = format!("{text}\n");
    tokio::select! {
        written = tokio::time::timeout(server.config.write_timeout, transport::write_all(writer, line.as_bytes())) => {
            written.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
        }
        () = server.force.cancelled() => Err(io::ErrorKind::TimedOut.into()),
    }
}
