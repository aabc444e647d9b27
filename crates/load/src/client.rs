//! One simulated chat user: its connection, its receive path and its send
//! window.
//!
//! Everything a client does per received line lives here, and it is the
//! hot path of the whole tool: a client reads 64 KiB at a time
//! ([`READ_CHUNK`]), splits lines with `memchr`, decodes payloads in place
//! ([`Codec::decode`]), checks order in a plain array indexed by sender
//! ([`OrderTracker`]) and records latency into its own HDR histogram. It
//! takes the time once per read, not once per line (all lines of one read
//! arrived together), and touches shared atomics once per read. Nothing is
//! allocated per line.
//!
//! A client is one task that both reads and sends ([`run_client`]): it waits
//! on the socket's readiness for reading and, while it has bytes queued, for
//! writing, so a server that stops reading from us can never stop us from
//! reading from it (which would deadlock a server that blocks on slow
//! readers).
//!
//! Clients that only need to stay connected and drain what they are sent
//! (idle and churn scenarios, thousands of them) use the much smaller
//! [`run_counter`] instead.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

pub use chat_testkit::LineReader;

use crate::payload::{now_ns, Codec, Order, OrderTracker, Payload};
use crate::protocol::{Framing, Protocol};
use crate::tls::{SendHalf, Stream, TlsClient, TlsSend};

/// Bytes asked for per read on the measured path: few system calls per line
/// when the server batches its writes.
pub const READ_CHUNK: usize = 64 * 1024;

/// Read buffer of the lean clients that only count lines.
pub const COUNTER_CHUNK: usize = 8 * 1024;

/// How long a new connection may take to be greeted.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected, greeted client.
#[derive(Debug)]
pub struct Conn {
    /// Plain TCP, or TLS over it (`--tls`).
    pub stream: Stream,
    /// `IP:PORT` (or our name) as the server named us in its greeting.
    pub who: String,
    /// What was read after the greeting, and room for more.
    pub reader: LineReader,
    /// Where this client publishes when that cannot be `stream` (a
    /// subscribed Redis connection cannot publish).
    pub publisher: Option<TcpStream>,
    /// `--protocol ws`: the server's frames become lines as they are read.
    pub ws: Option<crate::ws::WsIn>,
}

/// Reads what `stream` has into `reader`: through a WebSocket, into its
/// raw buffer first and from there, as lines, into the reader. `Ok(0)` at
/// the end of input.
#[inline]
pub async fn read_into(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    reader: &mut LineReader,
    ws: &mut Option<crate::ws::WsIn>,
) -> io::Result<usize> {
    match ws {
        None => {
            let read = stream.read(reader.spare()).await?;
            reader.filled(read);
            Ok(read)
        }
        Some(ws) => {
            let room = reader.spare().len();
            let read = stream.read(ws.raw(room)).await?;
            let lines = ws.lines_into(read, reader.spare());
            reader.filled(lines);
            Ok(read)
        }
    }
}

/// Answers the pings a WebSocket deframer has seen, best effort.
fn answer_ws_pings(ws: &mut Option<crate::ws::WsIn>, wr: &mut impl SendHalf) {
    if let Some(crate::ws::WsIn { deframer, .. }) = ws {
        while deframer.pings > 0
            && wr.try_send(&crate::ws::PONG).ok() == Some(crate::ws::PONG.len())
        {
            deframer.pings -= 1;
        }
    }
}

/// Connects to `addr` and reads the greeting (`You are IP:PORT`, or under
/// `--names` `You are load<pid>.<n>` after naming itself), keeping
/// anything that arrived with it. `buffer` is the read buffer's size; with
/// `tls`, the connection speaks TLS.
pub async fn connect(
    addr: SocketAddr,
    buffer: usize,
    tls: Option<&TlsClient>,
) -> anyhow::Result<Conn> {
    let stream = timeout(GREETING_TIMEOUT, crate::tls::dial(addr, tls))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??;
    let conn = Conn {
        stream,
        who: String::new(),
        reader: LineReader::new(buffer),
        publisher: None,
        ws: None,
    };
    greet(conn, addr).await
}

/// Reads the greeting of a connection made (line or WebSocket), naming
/// itself first under `--names`.
pub async fn greet(mut conn: Conn, addr: SocketAddr) -> anyhow::Result<Conn> {
    let greeting = timeout(GREETING_TIMEOUT, greeted_line(&mut conn))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{addr} sent no greeting within {GREETING_TIMEOUT:?} (is it a gopl.io chat server?)"
            )
        })??;
    match chat_wire::greeted(&greeting) {
        Some(who) => conn.who = who.to_owned(),
        // Every client of this tool comes from one loopback address.
        None if greeting == chat_wire::TOO_MANY_FROM_ADDRESS => bail!(
            "{addr} refused: {greeting:?}; start our server with --max-clients-per-ip 0 \
             (or at least the clients this run opens) to load it from one address"
        ),
        None => bail!(
            "{addr} greeted with {greeting:?}, expected {:?}",
            chat_wire::greeting("IP:PORT")
        ),
    }
    Ok(conn)
}

/// The greeting line. A server run with `--names` asks for a name first:
/// each connection of this process answers with one of its own
/// (`load<pid>.<n>`), so every scenario runs unchanged against it.
async fn greeted_line(conn: &mut Conn) -> anyhow::Result<String> {
    static NEXT_NAME: AtomicU64 = AtomicU64::new(0);
    let first = read_first_line(conn).await?;
    if first != chat_wire::NAME_PROMPT {
        return Ok(first);
    }
    let n = NEXT_NAME.fetch_add(1, Relaxed);
    let mut name = format!("load{}.{n}\n", std::process::id()).into_bytes();
    if conn.ws.is_some() {
        let mut framed = Vec::new();
        crate::ws::encode_text(&mut framed, &name[..name.len() - 1]);
        name = framed;
    }
    conn.stream
        .write_all(&name)
        .await
        .context("sending a name")?;
    conn.stream.flush().await.context("sending a name")?;
    read_first_line(conn).await
}

async fn read_first_line(conn: &mut Conn) -> anyhow::Result<String> {
    loop {
        if let Some(line) = conn.reader.next_line() {
            return Ok(String::from_utf8_lossy(line).into_owned());
        }
        if conn.reader.is_full() {
            bail!("greeting longer than the read buffer");
        }
        let read = read_into(&mut conn.stream, &mut conn.reader, &mut conn.ws)
            .await
            .context("reading the greeting")?;
        if read == 0 {
            bail!("connection closed before the greeting");
        }
    }
}

/// Latency histogram: microseconds, 3 significant digits, grown on demand
/// so that a thousand clients at loopback latencies cost about 30 KiB each.
pub fn new_histogram() -> Histogram<u64> {
    let mut histogram = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 digits is valid"));
    histogram.auto(true);
    histogram
}

/// Counts kept by one receiver; summed over all receivers at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecvCounts {
    /// Chat lines of this run received (own echoes included).
    pub delivered: u64,
    /// Of those, this client's own.
    pub own: u64,
    /// Lines that broke their sender's order (skips and backward steps).
    pub order_violations: u64,
    /// Of those, backward steps: duplicates or overtaken lines.
    pub backwards: u64,
    /// Chat lines with this run's tag but a sender id out of range.
    pub unknown_sender: u64,
    /// `... has arrived` lines.
    pub arrivals: u64,
    /// `... has left` lines.
    pub departures: u64,
    /// Anything else: other users' chat, server notices.
    pub other: u64,
    /// Lines of the server's `--history` block (its header, its lines and
    /// its end): what was said before the client came, never counted as
    /// deliveries of this run.
    pub history: u64,
}

impl RecvCounts {
    pub fn add(&mut self, other: &RecvCounts) {
        self.delivered += other.delivered;
        self.own += other.own;
        self.order_violations += other.order_violations;
        self.backwards += other.backwards;
        self.unknown_sender += other.unknown_sender;
        self.arrivals += other.arrivals;
        self.departures += other.departures;
        self.other += other.other;
        self.history += other.history;
    }
}

/// Tells the lines of a server's `--history` block (`--- history (N) ---`,
/// N lines, `--- end of history ---`) from live ones, so that what was
/// said before a client came is not counted as delivered to it.
#[derive(Debug, Default, Clone, Copy)]
pub struct HistoryBlock {
    /// Lines of the block still to come, its end line included.
    remaining: Option<usize>,
}

impl HistoryBlock {
    /// Whether the block's header came and its end has not.
    #[inline]
    pub fn is_open(&self) -> bool {
        self.remaining.is_some()
    }

    /// Whether `line` belongs to a history block.
    #[inline]
    pub fn holds(&mut self, line: &[u8]) -> bool {
        if let Some(remaining) = &mut self.remaining {
            *remaining -= 1;
            if *remaining == 0 {
                self.remaining = None;
            }
            return true;
        }
        // Cheap reject first: live lines never start with "--- ".
        if !line.starts_with(b"--- ") {
            return false;
        }
        match std::str::from_utf8(line)
            .ok()
            .and_then(chat_wire::history_of)
        {
            Some(lines) => {
                self.remaining = Some(lines + 1);
                true
            }
            None => false,
        }
    }
}

/// The receiving half of one client's bookkeeping, independent of sockets.
#[derive(Debug)]
pub struct Receiver {
    me: u32,
    codec: Codec,
    order: OrderTracker,
    pub counts: RecvCounts,
    pub latency: Histogram<u64>,
    /// A `who has left` line to watch for (the slow scenario's victim).
    watch_left: Option<Vec<u8>>,
    /// When it was seen, in ns since the origin.
    pub watched_left_ns: Option<u64>,
    /// When the last chat line of this run arrived, in ns since the origin.
    pub last_delivery_ns: u64,
    /// The longest time between two of this run's chat lines, in ns.
    pub longest_gap_ns: u64,
    /// The protocol whose frames surround the payload lines.
    protocol: Protocol,
    /// NATS `PING`s not answered yet.
    pub pings_due: u32,
    history: HistoryBlock,
}

impl Receiver {
    pub fn new(me: u32, senders: usize, codec: Codec) -> Receiver {
        Receiver {
            me,
            codec,
            order: OrderTracker::new(senders),
            counts: RecvCounts::default(),
            latency: new_histogram(),
            watch_left: None,
            watched_left_ns: None,
            last_delivery_ns: 0,
            longest_gap_ns: 0,
            protocol: Protocol::Line,
            pings_due: 0,
            history: HistoryBlock::default(),
        }
    }

    /// Lines arrive framed by `protocol` (see [`Protocol::is_frame`]).
    pub fn speaking(mut self, protocol: Protocol) -> Receiver {
        self.protocol = protocol;
        self
    }

    /// Also notice when `who` leaves.
    pub fn watch_departure_of(&mut self, who: &str) {
        self.watch_left = Some(chat_wire::left(who).into_bytes());
    }

    /// Accounts for one line that arrived at `now_ns`.
    #[inline]
    pub fn on_line(&mut self, line: &[u8], now_ns: u64) {
        if self.history.is_open() {
            self.history.holds(line);
            self.counts.history += 1;
            return;
        }
        match self.codec.decode(line) {
            Some(payload) => self.on_payload(payload, now_ns),
            None => self.on_other(line, now_ns),
        }
    }

    #[inline]
    fn on_payload(&mut self, p: Payload, now_ns: u64) {
        match self.order.observe(p.sender, p.seq) {
            Order::InOrder => {}
            Order::Skipped => self.counts.order_violations += 1,
            Order::Backwards => {
                self.counts.order_violations += 1;
                self.counts.backwards += 1;
            }
            Order::UnknownSender => {
                self.counts.unknown_sender += 1;
                return;
            }
        }
        self.counts.delivered += 1;
        if p.sender == self.me {
            self.counts.own += 1;
        }
        if self.last_delivery_ns > 0 {
            self.longest_gap_ns = self
                .longest_gap_ns
                .max(now_ns.saturating_sub(self.last_delivery_ns));
        }
        self.last_delivery_ns = now_ns;
        // Nearest microsecond; saturating because an open-loop send time
        // is scheduled, and a clock never runs backwards, but be safe.
        let micros = (now_ns.saturating_sub(p.sent_ns) + 500) / 1000;
        // With auto-resize on, recording cannot fail for a u64 value.
        let _ = self.latency.record(micros);
    }

    #[cold]
    fn on_other(&mut self, line: &[u8], now_ns: u64) {
        if self.protocol.is_chat() && self.history.holds(line) {
            self.counts.history += 1;
            return;
        }
        if !self.protocol.is_chat() {
            if self.protocol == Protocol::Nats && line == b"PING" {
                self.pings_due = self.pings_due.saturating_add(1);
            } else if !self.protocol.is_frame(line) {
                self.counts.other += 1;
            }
            return;
        }
        if chat_wire::arrival_of(line).is_some() {
            self.counts.arrivals += 1;
        } else if chat_wire::departure_of(line).is_some() {
            self.counts.departures += 1;
            if self.watched_left_ns.is_none() && self.watch_left.as_deref() == Some(line) {
                self.watched_left_ns = Some(now_ns);
            }
        } else {
            self.counts.other += 1;
        }
    }
}

/// Counters every client of a scenario shares with the coordinator, touched
/// once per read or per send batch, never per line.
#[derive(Debug, Default)]
pub struct Shared {
    pub delivered: AtomicU64,
    pub sent: AtomicU64,
    pub arrivals: AtomicU64,
    /// Clients whose task has ended.
    pub finished: AtomicUsize,
    /// Cancelled when every client should start sending.
    pub start: CancellationToken,
    /// Cancelled when clients should stop altogether.
    pub stop: CancellationToken,
}

/// What one client is to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// This client's sender id.
    pub id: u32,
    /// Messages this client sends itself (0: someone else sends for it).
    pub messages: u32,
    /// Own messages in flight at most.
    pub window: u32,
    /// Chat lines of this run it should receive before it is done.
    pub expect: u64,
    /// How its messages go on the wire.
    pub framing: Framing,
    /// Whether it answers NATS `PING`s itself; not when another writer
    /// (the rate scenario's pacer) shares its socket, whose writes a
    /// `PONG` could split.
    pub answer_pings: bool,
}

/// How a client's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Sent and received everything it should.
    Complete,
    /// Told to stop first.
    Stopped,
    /// The server closed the connection.
    Closed,
    /// A socket error.
    Failed(String),
}

/// A client task's result.
#[derive(Debug)]
pub struct ClientResult {
    pub receiver: Receiver,
    pub sent: u32,
    pub end: End,
}

/// Runs one client: counts arrivals until told to start, then sends its
/// messages (at most `window` unanswered by its own echo) while receiving
/// everything. Once it has sent everything and received `plan.expect` lines
/// it counts itself finished in [`Shared::finished`] (as it does if the
/// connection ends early), but stays connected until [`Shared::stop`].
pub async fn run_client(
    conn: Conn,
    plan: Plan,
    receiver: Receiver,
    codec: Codec,
    shared: Arc<Shared>,
) -> ClientResult {
    let Conn {
        stream,
        reader,
        publisher,
        ws,
        ..
    } = conn;
    let run = ClientRun {
        plan,
        receiver,
        codec,
        shared,
        reader,
        ws,
    };
    // `read` (not `readable` + `try_read`) because tokio clears the read
    // readiness after a short read: one system call per wake-up instead of
    // a second one that only says "would block", which matters at one line
    // per wake-up in the rate scenario.
    match stream {
        Stream::Tcp(mut tcp) => {
            let (rd, own_wr) = tcp.split();
            match &publisher {
                Some(publisher) => run.drive(rd, publisher).await,
                None => run.drive(rd, own_wr.as_ref()).await,
            }
        }
        Stream::Tls(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            run.drive(rd, TlsSend::new(wr)).await
        }
    }
}

/// What [`run_client`] drives, whichever its connection.
struct ClientRun {
    plan: Plan,
    receiver: Receiver,
    codec: Codec,
    shared: Arc<Shared>,
    reader: LineReader,
    ws: Option<crate::ws::WsIn>,
}

impl ClientRun {
    async fn drive(self, mut rd: impl AsyncRead + Unpin, mut wr: impl SendHalf) -> ClientResult {
        let ClientRun {
            plan,
            mut receiver,
            codec,
            shared,
            mut reader,
            mut ws,
        } = self;
        // Created once, not per loop turn: polling a fresh `cancelled()` future
        // registers a waiter under the token's lock, which every client shares.
        let stop = shared.stop.clone();
        let start = shared.start.clone();
        let mut stop = pin!(stop.cancelled());
        let mut start = pin!(start.cancelled());
        let mut out: Vec<u8> = Vec::with_capacity(plan.window as usize * (codec.size() + 1));
        let mut written = 0usize;
        let mut sent = 0u32;
        let mut started = false;
        let mut sending = plan.messages > 0;
        let mut complete = false;

        // Lines that came with the greeting.
        let mut last_arrivals = 0;
        let now = now_ns();
        reader.lines(|line| receiver.on_line(line, now));

        let end = loop {
            if receiver.counts.arrivals != last_arrivals {
                shared
                    .arrivals
                    .fetch_add(receiver.counts.arrivals - last_arrivals, Relaxed);
                last_arrivals = receiver.counts.arrivals;
            }
            // Refill only once the previous batch is fully written, so a batch
            // is one write in the common case.
            if written == out.len() && receiver.pings_due > 0 {
                out.clear();
                written = 0;
                if plan.answer_pings {
                    for _ in 0..receiver.pings_due {
                        out.extend_from_slice(b"PONG\r\n");
                    }
                }
                receiver.pings_due = 0;
            }
            if started && sending && (written == out.len() || written == 0) {
                let in_flight = u64::from(sent) - receiver.counts.own;
                let room = u64::from(plan.window).saturating_sub(in_flight);
                let batch = room.min(u64::from(plan.messages - sent)) as u32;
                if batch > 0 {
                    if written == out.len() {
                        out.clear();
                        written = 0;
                    }
                    let sent_ns = now_ns();
                    for seq in sent..sent + batch {
                        plan.framing.encode_into(
                            &codec,
                            &mut out,
                            Payload {
                                sender: plan.id,
                                seq,
                                sent_ns,
                            },
                        );
                    }
                    sent += batch;
                    shared.sent.fetch_add(batch.into(), Relaxed);
                    if sent == plan.messages {
                        sending = false;
                    }
                }
            }
            // Optimistic write: the socket almost always has room.
            if written < out.len() {
                match wr.try_send(&out[written..]) {
                    Ok(n) => written += n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => break End::Failed(format!("write: {err}")),
                }
            }
            let all_sent = !sending && written == out.len();
            if !complete && started && all_sent && receiver.counts.delivered >= plan.expect {
                // Done, but stay connected (and keep reading) until everyone is:
                // a departure now would make the server announce it to clients
                // still being measured.
                complete = true;
                shared.finished.fetch_add(1, Relaxed);
            }
            tokio::select! {
                biased;
                _ = &mut stop => break if complete { End::Complete } else { End::Stopped },
                _ = &mut start, if !started => started = true,
                read = read_into(&mut rd, &mut reader, &mut ws) => match read {
                    Ok(0) => break End::Closed,
                    Ok(_) => {
                        if written == out.len() {
                            answer_ws_pings(&mut ws, &mut wr);
                        }
                        let now = now_ns();
                        let before = receiver.counts.delivered;
                        reader.lines(|line| receiver.on_line(line, now));
                        shared.delivered.fetch_add(receiver.counts.delivered - before, Relaxed);
                    }
                    Err(err) => break End::Failed(format!("read: {err}")),
                },
                ready = wr.ready(), if written < out.len() || wr.needs_flush() => {
                    if let Err(err) = ready {
                        break End::Failed(format!("write: {err}"));
                    }
                }
            }
        };
        if !complete {
            shared.finished.fetch_add(1, Relaxed);
        }
        ClientResult {
            receiver,
            sent,
            end,
        }
    }
}

/// Counts shared by the lean clients of one scenario.
#[derive(Debug, Default)]
pub struct CounterShared {
    /// Lines received after the greeting, by all counters together.
    pub lines: AtomicU64,
    /// Counters whose connection was closed by the server or failed.
    pub lost: AtomicUsize,
    pub stop: CancellationToken,
}

/// A client that only stays connected and counts the lines it is sent (all
/// of them announcements in the idle and churn scenarios), until stopped.
/// Returns whether the connection was still open at the end.
pub async fn run_counter(conn: Conn, shared: Arc<CounterShared>) -> bool {
    let Conn {
        stream, reader, ws, ..
    } = conn;
    match stream {
        Stream::Tcp(mut tcp) => {
            let (rd, wr) = tcp.split();
            count(rd, wr.as_ref(), reader, ws, shared).await
        }
        Stream::Tls(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            count(rd, TlsSend::new(wr), reader, ws, shared).await
        }
    }
}

async fn count(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl SendHalf,
    mut reader: LineReader,
    mut ws: Option<crate::ws::WsIn>,
    shared: Arc<CounterShared>,
) -> bool {
    let stop = shared.stop.clone();
    let mut stop = pin!(stop.cancelled());
    // What was said before we came is not an announcement.
    let mut history = HistoryBlock::default();
    let mut live = |reader: &mut LineReader| {
        let mut live = 0;
        reader.lines(|line| {
            if !history.holds(line) {
                live += 1;
            }
        });
        live
    };
    let already = live(&mut reader);
    shared.lines.fetch_add(already, Relaxed);
    let open = loop {
        tokio::select! {
            biased;
            _ = &mut stop => break true,
            read = read_into(&mut rd, &mut reader, &mut ws) => match read {
                Ok(0) | Err(_) => break false,
                Ok(_) => {
                    answer_ws_pings(&mut ws, &mut wr);
                    let lines = live(&mut reader);
                    shared.lines.fetch_add(lines, Relaxed);
                }
            },
            flushed = wr.ready(), if wr.needs_flush() => if flushed.is_err() {
                break false;
            }
        }
    };
    if !open {
        shared.lost.fetch_add(1, Relaxed);
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(reader: &mut LineReader, mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let spare = reader.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            reader.filled(n);
            bytes = &bytes[n..];
            reader.lines(|line| lines.push(line.to_vec()));
        }
        lines
    }

    #[test]
    fn splits_lines_across_reads_and_skips_overlong_ones() {
        let mut reader = LineReader::new(256);
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend_from_slice(&[b'x'; 1000]);
        input.extend_from_slice(b"\nthree\nfour");
        let lines = feed(&mut reader, &input);
        assert_eq!(lines, [&b"one"[..], b"two", b"three"]);
        assert_eq!(feed(&mut reader, b"\n"), [b"four"]);
    }

    fn line(codec: &Codec, sender: u32, seq: u32, sent_ns: u64) -> Vec<u8> {
        let mut line = b"127.0.0.1:9: ".to_vec();
        codec.encode_into(
            &mut line,
            Payload {
                sender,
                seq,
                sent_ns,
            },
        );
        line.pop();
        line
    }

    #[test]
    fn accounts_deliveries_latency_order_and_announcements() {
        let codec = Codec::new(5, 64).unwrap();
        let mut receiver = Receiver::new(1, 2, codec.clone());
        receiver.watch_departure_of("127.0.0.1:7");
        receiver.on_line(&line(&codec, 0, 0, 1_000), 3_000);
        receiver.on_line(&line(&codec, 1, 0, 1_000), 101_000);
        receiver.on_line(&line(&codec, 0, 2, 1_000), 2_001_000); // skips 1
        receiver.on_line(&line(&codec, 9, 0, 0), 5); // not a client of ours
        receiver.on_line(&line(&Codec::new(6, 64).unwrap(), 0, 3, 0), 5);
        receiver.on_line(b"127.0.0.1:8 has arrived", 10);
        receiver.on_line(b"127.0.0.1:8 has left", 11);
        receiver.on_line(b"127.0.0.1:7 has left", 12);
        receiver.on_line(b"error: disconnected: too slow", 13);

        let counts = &receiver.counts;
        assert_eq!(counts.delivered, 3);
        assert_eq!(counts.own, 1);
        assert_eq!(counts.order_violations, 1);
        assert_eq!(counts.unknown_sender, 1);
        assert_eq!(counts.arrivals, 1);
        assert_eq!(counts.departures, 2);
        assert_eq!(counts.other, 2, "another run's chat and the notice");
        assert_eq!(receiver.watched_left_ns, Some(12));
        assert_eq!(receiver.last_delivery_ns, 2_001_000);
        let latency = &receiver.latency;
        assert_eq!(latency.len(), 3);
        assert_eq!(latency.min(), 2);
        assert!(latency.equivalent(latency.max(), 2000));
        assert!(latency.equivalent(latency.value_at_quantile(0.5), 100));
    }

    #[test]
    fn a_history_block_is_not_delivered() {
        let codec = Codec::new(5, 64).unwrap();
        let mut receiver = Receiver::new(1, 2, codec.clone());
        receiver.on_line(chat_wire::history_header(2).as_bytes(), 1);
        receiver.on_line(&line(&codec, 0, 0, 1_000), 2);
        receiver.on_line(&line(&codec, 0, 1, 1_000), 3);
        receiver.on_line(chat_wire::HISTORY_END.as_bytes(), 4);
        receiver.on_line(&line(&codec, 0, 2, 1_000), 5);
        let counts = &receiver.counts;
        assert_eq!((counts.history, counts.delivered, counts.other), (4, 1, 0));

        let mut block = HistoryBlock::default();
        let empty = chat_wire::history_header(0);
        assert!(block.holds(empty.as_bytes()));
        assert!(block.holds(chat_wire::HISTORY_END.as_bytes()));
        assert!(!block.holds(b"--- has arrived"));
    }
}

/// How fast the receive path is without the network: run with
/// `cargo test --release -p chat-load --lib receive_path_speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn receive_path_speed() {
        let n = 100u32;
        let codec = Codec::new(9, 64).unwrap();
        // One 64 KiB read's worth of relayed lines from n senders.
        let mut chunk = Vec::new();
        let mut seq = 0;
        while chunk.len() < READ_CHUNK - 100 {
            for sender in 0..n {
                chunk.extend_from_slice(format!("127.0.0.1:{}: ", 40000 + sender).as_bytes());
                codec.encode_into(
                    &mut chunk,
                    Payload {
                        sender,
                        seq,
                        sent_ns: 1,
                    },
                );
                if chunk.len() >= READ_CHUNK - 100 {
                    break;
                }
            }
            seq += 1;
        }
        let rounds = 2000;
        let mut receiver = Receiver::new(0, n as usize, codec);
        let mut reader = LineReader::new(READ_CHUNK);
        let start = std::time::Instant::now();
        let mut lines = 0;
        for _ in 0..rounds {
            let spare = reader.spare();
            spare[..chunk.len()].copy_from_slice(&chunk);
            reader.filled(chunk.len());
            let now = now_ns();
            lines += reader.lines(|line| receiver.on_line(line, now));
        }
        let elapsed = start.elapsed();
        let ns = elapsed.as_nanos() as f64 / lines as f64;
        println!("receive path: {lines} lines in {elapsed:?}: {ns:.1} ns/line, {:.1} M lines/s on one core", 1e3 / ns);
        assert_eq!(receiver.counts.delivered, lines);
    }
}
