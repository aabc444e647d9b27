//! One connection, the same for every model: its reader task and its
//! writer task.
//!
//! The **reader** (the task the accept loop spawned) joins the hub, starts
//! the writer, then turns socket bytes into lines and hands the hub one
//! message per read, holding every line that read completed. After each read
//! it charges the client's input budget ([`crate::guard::flood`]) and, when the
//! client is over it, reads nothing until the debt is paid: TCP then pushes
//! back on that client alone. When input ends (or the client is kicked,
//! idles out, sends an over-long line, floods past `--flood-grace`, or the
//! server shuts down) it leaves the hub, which announces the departure.
//! Before each wait for input it records what it holds of a partial line,
//! for `--max-client-memory`.
//!
//! Before any of that, [`lobby`] names the client (`--names`) and joins
//! it; the first thing the writer sends is what the lobby hands it. What
//! both share with the server is in [`context`]; closing without losing
//! the last line, in [`linger`](mod@linger). The lobby uses those two, never this file.
//!
//! The **writer** sends the greeting, then drains the client's [`Inbox`],
//! coalescing whatever is ready into one write of up to [`MAX_WRITE`] bytes,
//! so a client that is behind catches up with few system calls. It finishes
//! when the inbox ends (everything queued before the leave is written, the
//! client's own last echo included), then sends the client's last words if
//! it has any and closes the socket.
//!
//! Both halves stay cheap while idle: the read buffer and the write batch
//! are released whenever they are empty, so an idle connection holds no
//! buffer at all. A task's future is allocated at its largest for the
//! task's whole life, so neither task holds a large array across an
//! `.await`, and the states of rare paths (entering and leaving the room,
//! a full socket, the idle timer, lingering after an over-long line,
//! waiting for room under `block`, closing) are boxed: allocated when
//! taken, not reserved in every connection. `tests/memory.rs` guards what
//! an idle connection holds.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::client::{Client, Kick};
use crate::config::SlowClientPolicy;
use crate::guard::flood::{FloodGate, Verdict};
use crate::memory;
use crate::protocol::{ChatBatch, LineBuffer, LineTooLong, Message};
use crate::room::history::Snapshot;
use crate::room::hub::{Hub, Inbox};
use crate::room::outbox::TOO_SLOW;
use crate::transport::{SessionRead, SessionWrite, Transport};

mod context;
mod linger;
mod lobby;

pub(crate) use context::{ServerContext, SHUTTING_DOWN};
use linger::{linger, LINGER_AFTER_FLOOD};

/// The largest single write the writer assembles from queued messages.
pub(crate) const MAX_WRITE: usize = 64 * 1024;

/// A read's lines go out as one message, split at about this size, so that
/// a read of many tiny lines (8 KiB of newlines formats to ~200 KiB) does not
/// become one outsized queue entry.
const MAX_MESSAGE: usize = 16 * 1024;

/// Why the reader stopped.
enum End {
    InputEnded,
    ReadFailed(io::Error),
    TooLong(LineTooLong),
    Idle,
    /// Over its input budget for longer than `--flood-grace`.
    Flooding,
    /// Kicked, or the server is shutting down.
    Ending,
}

/// Serves one connection until it is over; this is the reader task.
///
/// Log lines are emitted in the client's span ([`Client::span`]), entered
/// only around each log call: entering a span on every poll of the tasks
/// was measurable at a few hundred thousand polls a second.
pub(crate) fn serve<H: Hub, T: Transport>(
    hub: Arc<H>,
    stream: T,
    client: Arc<Client>,
    server: Arc<ServerContext>,
) -> impl Future<Output = ()> + Send + 'static {
    // This task lives as long as the connection, and its future is
    // allocated at its largest state for all that time. So only the read
    // loop is held in it: entering (the lobby, starting the writer) and
    // leaving are boxed, allocated while they run, and the stream is
    // handed to the boxed entry here rather than kept as an argument (an
    // async fn keeps its arguments' room in every state).
    let entering = enter(hub, stream, client, server);
    async move {
        let Some(mut session) = entering.await else {
            return;
        };
        let end = read_loop(&mut session).await;
        finish(session, end).await;
    }
}

/// What the reader task holds once the client is in the room: one
/// reference to this is all the read loop's future keeps of it.
struct Session<H, R> {
    hub: Arc<H>,
    reader: R,
    /// As it entered: renamed under `--names`.
    client: Arc<Client>,
    server: Arc<ServerContext>,
}

/// Names and joins the client ([`lobby`]) and starts its writer; `None`
/// if the connection ended first. Boxed: see [`serve`].
#[allow(clippy::type_complexity)] // a boxed future cannot be named by an alias
fn enter<H: Hub, T: Transport>(
    hub: Arc<H>,
    stream: T,
    client: Arc<Client>,
    server: Arc<ServerContext>,
) -> Pin<Box<impl Future<Output = Option<Session<H, T::Read>>> + Send + 'static>> {
    Box::pin(async move {
        let (mut reader, mut writer) = stream.split();
        let entered = lobby::enter(&*hub, &mut reader, &mut writer, client, &server).await?;
        let client = entered.client;
        server.metrics.register(&client);
        client.span().in_scope(|| info!("arrived"));
        // The writer starts only now, so by the time the client reads its
        // greeting it is registered and will see everyone's next line.
        let history = entered.history.map(|history| {
            // Held by the client until written: a newcomer that does not read
            // its history holds it (`--max-client-memory`).
            client.set_held_history(history.bytes);
            Box::new(history)
        });
        spawn_writer(
            writer,
            entered.inbox,
            entered.hello,
            history,
            &client,
            &server,
        );
        Some(Session {
            hub,
            reader,
            client,
            server,
        })
    })
}

/// Leaves the hub (the others are told why, if they are) and lingers if
/// the last line needs it. Boxed: see [`serve`].
fn finish<H: Hub, R: SessionRead>(
    mut session: Session<H, R>,
    end: End,
) -> Pin<Box<impl Future<Output = ()> + Send + 'static>> {
    Box::pin(async move {
        let client = &session.client;
        let (departure, linger_for) = client.span().in_scope(|| conclude(end, client));
        session.hub.leave(client, departure).await;
        if let Some(at_most) = linger_for {
            linger(&mut session.reader, client, at_most).await;
        }
    })
}

fn spawn_writer<I: Inbox, W: SessionWrite>(
    writer: W,
    inbox: I,
    hello: Message,
    history: Option<Box<Snapshot>>,
    client: &Arc<Client>,
    server: &Arc<ServerContext>,
) {
    server.tracker.spawn(write_loop(
        writer,
        inbox,
        hello,
        history,
        Arc::clone(client),
        Arc::clone(server),
    ));
}

/// Logs why the reader stopped and decides what the others are told and
/// what the client's last words are. Returns the departure to announce and
/// whether to linger (keep discarding input, up to how many bytes) before
/// closing.
fn conclude(end: End, client: &Client) -> (Option<Message>, Option<usize>) {
    let departure = Some(Message::left(&client.who));
    match end {
        End::InputEnded => {
            info!(skipped = client.skipped(), "left");
            (departure, None)
        }
        End::ReadFailed(cause) => {
            info!(%cause, skipped = client.skipped(), "left: read failed");
            (departure, None)
        }
        End::TooLong(err) => {
            warn!(max = err.max, "disconnecting: line too long");
            client.say_last(Message::notice(&format!("error: {err}")));
            (departure, Some(usize::MAX))
        }
        End::Idle => {
            info!("disconnecting: idle timeout");
            client.say_last(Message::notice("error: idle timeout"));
            (departure, None)
        }
        End::Flooding => {
            warn!("disconnecting: flooding");
            client.say_last(Message::notice(chat_wire::FLOODING));
            // It was still sending: closing now would reset the connection
            // and destroy the error line.
            (departure, Some(LINGER_AFTER_FLOOD))
        }
        End::Ending => match client.kicked() {
            Some(Kick::TooSlow) => {
                warn!(
                    queued_bytes = client.budget.queued(),
                    "disconnected: too slow"
                );
                (departure, None)
            }
            Some(Kick::WriteFailed) => {
                info!("left: write failed");
                (departure, None)
            }
            Some(Kick::OverMemory) => {
                warn!(
                    held_bytes = client.memory_held(),
                    "disconnected: the clients' memory was over --max-client-memory and this one held the most"
                );
                (departure, Some(LINGER_AFTER_FLOOD))
            }
            None => {
                // Shutdown: everybody is leaving, so nobody is told who left.
                client.say_last(Message::notice(SHUTTING_DOWN));
                (None, None)
            }
        },
    }
}

/// Reads lines and broadcasts them until input ends or the connection must end.
///
/// Everything it uses of the session is reached through the one reference
/// `s` rather than bound to locals: a local held across an `.await` is
/// room in the future of every idle connection.
async fn read_loop<H: Hub, R: SessionRead>(s: &mut Session<H, R>) -> End {
    let mut lines = LineBuffer::new(s.server.config.max_line);
    let mut batch = ChatBatch::default();
    let mut idle_deadline = s
        .server
        .config
        .idle_timeout
        .map(|idle| Instant::now() + idle);
    let mut gate = s
        .server
        .flood
        .as_ref()
        .map(|limits| FloodGate::new(limits, Instant::now()));
    loop {
        if s.client.is_kicked() || s.server.stopping.load(Ordering::Relaxed) {
            return End::Ending;
        }
        // Try the read first: under load data is usually waiting, and only
        // an actual wait needs the select below.
        match s.reader.try_read_buf(lines.read_buf()) {
            Ok(0) => {
                if let Some(line) = lines.take_unterminated() {
                    batch.push(&s.client.who, line);
                    s.server.metrics.lines_received(1);
                }
                if let Some(message) = batch.take() {
                    s.hub.broadcast(&s.client, &message).await;
                }
                return End::InputEnded;
            }
            Ok(read) => {
                if let Some(idle) = s.server.config.idle_timeout {
                    idle_deadline = Some(Instant::now() + idle);
                }
                // Everything this read completed goes out as one message:
                // one allocation, and one queue push per recipient.
                let mut completed = 0;
                let framed = loop {
                    match lines.next_line() {
                        Ok(Some(line)) => {
                            completed += 1;
                            batch.push(&s.client.who, line);
                        }
                        Ok(None) => break Ok(()),
                        Err(too_long) => break Err(too_long),
                    }
                    if batch.len() >= MAX_MESSAGE {
                        if let Some(message) = batch.take() {
                            s.hub.broadcast(&s.client, &message).await;
                        }
                    }
                };
                s.server.metrics.lines_received(completed as u64);
                if let Some(message) = batch.take() {
                    s.hub.broadcast(&s.client, &message).await;
                }
                if let Err(too_long) = framed {
                    return End::TooLong(too_long);
                }
                if let (Some(gate), Some(limits)) = (gate.as_mut(), s.server.flood.as_ref()) {
                    match gate.charge(limits, Instant::now(), completed, read) {
                        Verdict::Go => {}
                        Verdict::HoldUntil(until) => {
                            s.server.metrics.flood_holds.add(1);
                            if !hold_off(until, &s.client).await {
                                return End::Ending;
                            }
                        }
                        Verdict::Flooding => {
                            s.server.metrics.flood_disconnects.add(1);
                            return End::Flooding;
                        }
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                lines.release_if_empty();
                s.client.set_held_input(lines.capacity());
                if let Some(gate) = gate.as_mut() {
                    gate.caught_up();
                }
                if let Some(end) = input_ready(&mut s.reader, &s.client, idle_deadline).await {
                    return end;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return End::ReadFailed(err),
        }
    }
}

/// Reads nothing until `until`, so that TCP pushes back on this client
/// alone. Boxed: only a client over its budget waits here. Returns false if
/// the connection must end first.
fn hold_off(until: Instant, client: &Client) -> Pin<Box<impl Future<Output = bool> + Send + '_>> {
    Box::pin(async move {
        tokio::select! {
            () = tokio::time::sleep_until(until) => true,
            () = client.ending() => false,
        }
    })
}

/// Waits until input may be there; `Some` if the connection must end
/// first (kicked or shutting down, idle for `--idle-timeout`, or the socket
/// failed).
///
/// This wait is where an idle connection spends its life, and so what its
/// reader task's future is sized by: a future of its own rather than a
/// `select!`, it holds one reference to the socket (whose own reader
/// waker slot `poll_read_ready` uses: `readable()` would add a 168-byte
/// waiter), the client's cancellation wait, and the idle timer, boxed and
/// only under `--idle-timeout`.
fn input_ready<'a, R: SessionRead>(
    reader: &'a mut R,
    client: &'a Client,
    idle_deadline: Option<Instant>,
) -> InputReady<'a, R> {
    InputReady {
        reader,
        ending: client.ending(),
        idle: idle_deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline))),
    }
}

pin_project_lite::pin_project! {
    /// See [`input_ready`].
    struct InputReady<'a, R> {
        reader: &'a mut R,
        #[pin]
        ending: tokio_util::sync::WaitForCancellationFuture<'a>,
        idle: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<R: SessionRead> Future for InputReady<'_, R> {
    type Output = Option<End>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<End>> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(ready) = this.reader.poll_read_ready(cx) {
            return Poll::Ready(ready.err().map(End::ReadFailed));
        }
        if this.ending.poll(cx).is_ready() {
            return Poll::Ready(Some(End::Ending));
        }
        if let Some(idle) = this.idle {
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(End::Idle));
            }
        }
        Poll::Pending
    }
}

/// Why the writer stopped writing before its inbox ended.
enum WriteEnd {
    /// The client was kicked, or the shutdown grace period ran out: what is
    /// queued will never be written.
    Abandoned,
    Failed(io::Error),
}

/// The writer task.
///
/// A plain function around an `async` block, not an `async fn`: the block
/// works on what it captured in place, where an `async fn` would move its
/// arguments into locals and keep room for both in every state, and this
/// task's future is allocated at its largest for the connection's life.
fn write_loop<I: Inbox, W: SessionWrite>(
    half: W,
    mut inbox: I,
    hello: Message,
    history: Option<Box<Snapshot>>,
    client: Arc<Client>,
    server: Arc<ServerContext>,
) -> impl Future<Output = ()> + Send + 'static {
    let mut socket = SocketWriter {
        half,
        client,
        server,
        shutting_down: false,
        mid_line: false,
    };
    async move {
        let mut result = match history {
            None => socket.write_all(hello.as_bytes()).await,
            Some(history) => Box::pin(write_history(&mut socket, &hello, *history)).await,
        };
        drop(hello);
        let mut batch: Vec<u8> = Vec::new();
        while result.is_ok() {
            // An evicted client's queue is the memory being reclaimed: drop it
            // rather than drain it at the client's pace.
            if socket.client.kicked() == Some(Kick::OverMemory) {
                result = Err(WriteEnd::Abandoned);
                break;
            }
            let first = match inbox.try_recv() {
                Some(message) => message,
                None => {
                    // Nothing ready: give the batch memory back before waiting.
                    memory::note_released(batch.capacity());
                    batch = Vec::new();
                    // What TLS still holds goes out before we sleep.
                    result = socket.flush().await;
                    if result.is_err() {
                        break;
                    }
                    match inbox.recv().await {
                        Some(message) => message,
                        None => break,
                    }
                }
            };
            let mut bytes = first.len();
            let mut messages = 1;
            result = match inbox.try_recv() {
                // A lone message is written straight from its shared buffer.
                None => socket.write_all(first.as_bytes()).await,
                Some(second) => {
                    // One allocation of about the batch's size: growing it
                    // message by message left a trail of freed blocks of
                    // every size up to it, at every burst.
                    batch.reserve(inbox.pending_bytes().min(MAX_WRITE));
                    batch.extend_from_slice(first.as_bytes());
                    drop(first);
                    let mut next = Some(second);
                    while let Some(message) = next.take() {
                        bytes += message.len();
                        messages += 1;
                        batch.extend_from_slice(message.as_bytes());
                        if batch.len() < MAX_WRITE {
                            next = inbox.try_recv();
                        }
                    }
                    let written = socket.write_all(&batch).await;
                    batch.clear();
                    written
                }
            };
            inbox.written(bytes);
            socket.server.metrics.delivered(messages, bytes as u64);
        }
        drop(batch);
        Box::pin(close(socket, result)).await;
    }
}

/// Sends the client's last words, if any, and closes the connection.
/// Boxed: it runs once, at the end.
async fn close<W: SessionWrite>(mut socket: SocketWriter<W>, result: Result<(), WriteEnd>) {
    let client = Arc::clone(&socket.client);
    match result {
        Ok(()) => {
            if let Some(words) = client.last_words() {
                let _ = socket.write_all(words.as_bytes()).await;
            }
            let _ = socket.flush().await;
        }
        Err(WriteEnd::Abandoned) => {
            // The socket is probably full: one try, no waiting, on a line of
            // its own even if we stopped in the middle of one.
            if let Some(words) = client.last_words() {
                let mut last = Vec::with_capacity(words.len() + 1);
                if socket.mid_line {
                    last.push(b'\n');
                }
                last.extend_from_slice(words.as_bytes());
                let _ = socket.half.try_write(&last);
                let _ = socket.half.try_flush();
            }
            client.kick(Kick::WriteFailed, None);
        }
        Err(WriteEnd::Failed(cause)) => {
            client.span().in_scope(|| debug!(%cause, "write failed"));
            client.kick(Kick::WriteFailed, None);
        }
    }
    socket.half.close();
    socket.server.metrics.unregister(&client);
    // Dropping the write half sends FIN; the socket closes once the reader
    // task has dropped its half too.
}

/// Writes the greeting and the `--history` block in writes of up to
/// [`MAX_WRITE`] bytes; then the client no longer holds the block.
async fn write_history<W: SessionWrite>(
    socket: &mut SocketWriter<W>,
    hello: &Message,
    history: Snapshot,
) -> Result<(), WriteEnd> {
    let header = Message::notice(&chat_wire::history_header(history.lines));
    let end = Message::notice(chat_wire::HISTORY_END);
    let mut batch =
        Vec::with_capacity(MAX_WRITE.min(hello.len() + header.len() + history.bytes + end.len()));
    let mut result = Ok(());
    let parts = [hello, &header]
        .into_iter()
        .chain(&history.messages)
        .chain([&end]);
    for part in parts {
        if !batch.is_empty() && batch.len() + part.len() > MAX_WRITE {
            result = socket.write_all(&batch).await;
            batch.clear();
            if result.is_err() {
                break;
            }
        }
        batch.extend_from_slice(part.as_bytes());
    }
    if result.is_ok() {
        result = socket.write_all(&batch).await;
    }
    socket.client.set_held_history(0);
    result
}

/// The write half plus what decides how long a write may wait.
struct SocketWriter<W> {
    half: W,
    client: Arc<Client>,
    /// The write timeout, the shutdown's `force` and the metrics.
    server: Arc<ServerContext>,
    /// The server is shutting down: keep flushing until forced to stop.
    shutting_down: bool,
    /// The last byte written did not end a line.
    mid_line: bool,
}

impl<W: SessionWrite> SocketWriter<W> {
    /// Writes all of `bytes`. A plain function around an `async` block, as
    /// [`write_loop`] is: the writer task's future is sized by its state
    /// while it writes, and an `async fn` would keep `bytes` twice.
    #[allow(clippy::manual_async_fn)] // the `async fn` form is 24 bytes larger
    fn write_all<'a>(
        &'a mut self,
        mut bytes: &'a [u8],
    ) -> impl Future<Output = Result<(), WriteEnd>> + 'a {
        async move {
            while !bytes.is_empty() {
                match self.half.try_write(bytes) {
                    Ok(0) => return Err(WriteEnd::Failed(io::ErrorKind::WriteZero.into())),
                    Ok(written) => {
                        self.mid_line = bytes[written - 1] != b'\n';
                        bytes = &bytes[written..];
                        if self.client.is_stuck() {
                            self.client.set_stuck(false);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        // Boxed: only a full socket gets here, and the wait's
                        // timers would otherwise sit in every writer task.
                        Box::pin(self.wait_writable()).await?;
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(WriteEnd::Failed(err)),
                }
            }
            Ok(())
        }
    }

    /// Waits until the transport has sent what it buffered (TLS records;
    /// plain TCP buffers nothing).
    async fn flush(&mut self) -> Result<(), WriteEnd> {
        loop {
            match self.half.try_flush() {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    Box::pin(self.wait_writable()).await?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(WriteEnd::Failed(err)),
            }
        }
    }

    /// Waits until the socket takes bytes again. This is the only place a
    /// writer waits with data pending, so it is where a stuck client is
    /// detected: `--write-timeout` without progress.
    async fn wait_writable(&mut self) -> Result<(), WriteEnd> {
        loop {
            let half = &mut self.half;
            let writable = std::future::poll_fn(|cx| half.poll_write_ready(cx));
            tokio::select! {
                biased;
                () = self.server.force.cancelled() => return Err(WriteEnd::Abandoned),
                () = self.client.ending(), if !self.shutting_down => {
                    if self.client.kicked().is_some() {
                        return Err(WriteEnd::Abandoned);
                    }
                    self.shutting_down = true;
                }
                ready = timeout(self.server.config.write_timeout, writable) => match ready {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(err)) => return Err(WriteEnd::Failed(err)),
                    Err(_elapsed) => {
                        self.server.metrics.write_timeouts.add(1);
                        match self.client.policy {
                        SlowClientPolicy::Disconnect => {
                            self.client.kick(Kick::TooSlow, Some(Message::notice(TOO_SLOW)));
                            return Err(WriteEnd::Abandoned);
                        }
                        SlowClientPolicy::Drop => self.client.set_stuck(true),
                        // The seed's behaviour: wait as long as it takes.
                        SlowClientPolicy::Block => {}
                        }
                    }
                },
            }
        }
    }
}
