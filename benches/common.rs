//! Bench clients shared by `fanout`, `churn` and `slow_reader`.
//!
//! [`chat_server::harness::TestClient`] reads one line per call through a
//! `BufReader`, which is right for tests and too slow to measure a server
//! that delivers millions of lines a second. The clients here use the
//! load tool's receive path from `chat_testkit`: 64 KiB reads split into
//! lines in place ([`LineReader`]), a payload decoded at a fixed offset from
//! the line's end ([`Codec`]) and per-sender order checked in a plain array
//! ([`OrderTracker`]), so a reader costs far less per line than the server
//! it measures. What is left here is the flow: rounds, windows, stalls.
//!
//! Every wait is bounded: setup steps by [`SETUP_TIMEOUT`], a message flow
//! by its `stall_after` (no progress for that long ends it as stalled).

#![allow(dead_code)] // each bench binary uses a different part

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::TestServer;
use chat_testkit::payload::{Codec, Order, OrderTracker, Payload};
use chat_testkit::LineReader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How long any one setup step (connect, greeting, draining arrivals) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of payload per chat line a bench client sends, newline excluded.
pub const PAYLOAD: usize = 64;

/// Each sender keeps at most this many of its own lines in flight (sent
/// but not yet echoed back to it), as the measurements in issue 3 did.
pub const WINDOW: usize = 16;

/// `--history` for the benches' servers, from `CHAT_BENCH_HISTORY` (lines;
/// unset or 0: off, the seed's protocol), so that a bench measures the
/// same room with and without the history:
/// `CHAT_BENCH_HISTORY=1000 cargo bench --bench fanout`.
pub fn bench_history() -> usize {
    std::env::var("CHAT_BENCH_HISTORY")
        .ok()
        .and_then(|lines| lines.parse().ok())
        .unwrap_or(0)
}

/// Read buffer per client: large reads keep the client's per-line cost low.
const READ_BUF: usize = 64 * 1024;

/// The runtime that drives the bench clients: two workers, separate from the
/// server's own two-worker runtime so clients never run on its threads.
pub fn client_runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
}

/// Raises the soft open-file limit to the hard one if `needed` descriptors
/// would not fit: client and server share this process, so n clients take
/// 2n descriptors, and the common default of 1,024 is too few for n = 512.
pub fn ensure_fd_limit(needed: u64) {
    if let Err(err) = chat_testkit::proc::ensure_open_files(needed) {
        eprintln!("warning: {err:#}");
    }
}

/// Shows the server's own log on stderr when `RUST_LOG` is set (for
/// example `RUST_LOG=chat_server=info` to see each client's skipped count
/// when it leaves); silent otherwise, so the bench output stays readable.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Stops `server`, giving up (with a warning) after `within`: a server stuck
/// in its shutdown must not hang the whole bench run.
pub fn stop_server(server: TestServer, within: Duration) {
    let (done, stopped) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        server.stop();
        let _ = done.send(());
    });
    match stopped.recv_timeout(within) {
        Ok(()) => {
            let _ = stopper.join();
        }
        Err(_) => eprintln!("warning: server did not stop within {within:?}; leaving it behind"),
    }
}

/// An error for a server that did something a bench did not expect.
pub fn unexpected(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Awaits `future`, failing with a message naming `what` after [`SETUP_TIMEOUT`].
pub async fn within<T>(
    what: &str,
    future: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    timeout(SETUP_TIMEOUT, future).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: nothing for {SETUP_TIMEOUT:?}"),
        )
    })?
}

/// The read half of a connection and its line buffer
/// ([`chat_testkit::LineReader`]).
#[derive(Debug)]
pub struct Inbox {
    half: OwnedReadHalf,
    lines: LineReader,
}

impl Inbox {
    pub fn new(half: OwnedReadHalf, capacity: usize) -> Inbox {
        Inbox {
            half,
            lines: LineReader::new(capacity),
        }
    }

    /// Reads once more into the buffer. End of stream is an error: a bench
    /// client never expects the server to close on it.
    pub async fn fill(&mut self) -> io::Result<usize> {
        match self.half.read(self.lines.spare()).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )),
            read => {
                self.lines.filled(read);
                Ok(read)
            }
        }
    }

    /// The next line as text, reading as needed.
    pub async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(line) = self.lines.next_line() {
                return Ok(String::from_utf8_lossy(line).into_owned());
            }
            self.fill().await?;
        }
    }

    /// Reads and discards `count` lines.
    pub async fn skip_lines(&mut self, mut count: usize) -> io::Result<()> {
        while count > 0 {
            if self.lines.next_line().is_some() {
                count -= 1;
            } else {
                self.fill().await?;
            }
        }
        Ok(())
    }

    /// Consumes whatever is buffered; returns how many newlines it held.
    pub fn discard_buffered(&mut self) -> u64 {
        self.lines.discard_buffered()
    }

    /// Feeds every complete buffered line to `tally`.
    fn tally_buffered(&mut self, tally: &mut Tally) {
        self.lines.lines(|line| tally.line(line));
    }
}

/// What one client has received during the flows so far.
#[derive(Debug, Clone)]
pub struct Tally {
    /// This client's own sender index.
    own: u32,
    /// Decodes this bench run's payloads.
    codec: Codec,
    /// The sequence number expected next from each sender.
    order: OrderTracker,
    /// Chat lines from the known senders.
    pub chat: u64,
    /// Of those, this client's own echoes.
    pub own_echoes: u64,
    /// Lines that arrived out of order (a gap, a repeat or a reordering).
    pub order_violations: u64,
    /// Lines that were not bench chat lines (arrivals, departures, notices).
    pub other_lines: u64,
    /// Of those, `... has left` announcements.
    pub departures: u64,
    /// The last of those, for error messages (a server notice, say).
    pub last_other: Option<String>,
}

impl Tally {
    fn new(own: u32, senders: usize, codec: Codec) -> Tally {
        Tally {
            own,
            codec,
            order: OrderTracker::new(senders),
            chat: 0,
            own_echoes: 0,
            order_violations: 0,
            other_lines: 0,
            departures: 0,
            last_other: None,
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(payload) = self.codec.decode(line) else {
            return self.other(line);
        };
        match self.order.observe(payload.sender, payload.seq) {
            Order::UnknownSender => self.other(line),
            order => {
                self.chat += 1;
                if payload.sender == self.own {
                    self.own_echoes += 1;
                }
                if order != Order::InOrder {
                    self.order_violations += 1;
                }
            }
        }
    }

    #[cold]
    fn other(&mut self, line: &[u8]) {
        self.other_lines += 1;
        if chat_wire::departure_of(line).is_some() {
            self.departures += 1;
        }
        self.last_other = Some(String::from_utf8_lossy(line).into_owned());
    }
}

/// The write half of a connection and the chat lines it sends.
#[derive(Debug)]
pub struct LineWriter {
    half: OwnedWriteHalf,
    codec: Codec,
    /// This client's sender index, in every payload it sends.
    sender: u32,
    next_seq: u32,
    batch: Vec<u8>,
}

impl LineWriter {
    fn new(half: OwnedWriteHalf, sender: u32, codec: Codec) -> LineWriter {
        LineWriter {
            half,
            codec,
            sender,
            next_seq: 0,
            batch: Vec::new(),
        }
    }

    /// Makes the next `count` lines the batch to write.
    fn push_lines(&mut self, count: usize) {
        self.batch.clear();
        for _ in 0..count {
            // No send time: the benches time whole flows, not lines.
            let payload = Payload {
                sender: self.sender,
                seq: self.next_seq,
                sent_ns: 0,
            };
            self.codec.encode_into(&mut self.batch, payload);
            self.next_seq = self.next_seq.wrapping_add(1);
        }
    }
}

/// One bench client: it both sends chat lines and checks what it receives.
#[derive(Debug)]
pub struct Peer {
    /// `IP:PORT` as the server names this client.
    pub who: String,
    pub reader: Inbox,
    pub tally: Tally,
    writer: LineWriter,
}

impl Peer {
    /// The write half, for a client kept connected but silent.
    pub fn into_halves(self) -> (Inbox, OwnedWriteHalf) {
        (self.reader, self.writer.half)
    }
}

/// Connects one client and reads its greeting; `index` is its sender index
/// among `senders` clients, all sending `codec`'s payloads.
pub async fn connect_peer(
    addr: SocketAddr,
    index: u32,
    senders: usize,
    codec: &Codec,
) -> io::Result<Peer> {
    let stream = within("connect", TcpStream::connect(addr)).await?;
    // A client writes whole batches; Nagle would only delay them.
    stream.set_nodelay(true)?;
    let who = stream.local_addr()?.to_string();
    let (read, write) = stream.into_split();
    let mut reader = Inbox::new(read, READ_BUF);
    let greeting = within("greeting", reader.line()).await?;
    let expected = chat_wire::greeting(&who);
    if greeting != expected {
        return Err(unexpected(format!(
            "expected greeting {expected:?}, got {greeting:?}"
        )));
    }
    if bench_history() > 0 {
        // What was said before: its lines and its end, not part of a flow.
        let header = within("history", reader.line()).await?;
        let lines = chat_wire::history_of(&header)
            .ok_or_else(|| unexpected(format!("expected a history block, got {header:?}")))?;
        within("history", reader.skip_lines(lines + 1)).await?;
    }
    Ok(Peer {
        who,
        reader,
        tally: Tally::new(index, senders, codec.clone()),
        writer: LineWriter::new(write, index, codec.clone()),
    })
}

/// Connects `n` clients one after another, then reads every arrival
/// announcement, so that nothing but the flow's own lines is left to read.
/// Client `i` is told of the `n - 1 - i` clients that arrived after it.
pub async fn connect_peers(addr: SocketAddr, n: usize) -> io::Result<Vec<Peer>> {
    let codec = Codec::for_this_run(PAYLOAD).map_err(|err| unexpected(err.to_string()))?;
    let mut peers = Vec::with_capacity(n);
    for index in 0..n {
        let sender = u32::try_from(index).map_err(|_| unexpected(format!("{n} clients")))?;
        let peer = connect_peer(addr, sender, n, &codec)
            .await
            .map_err(|err| io::Error::new(err.kind(), format!("client {index} of {n}: {err}")))?;
        peers.push(peer);
    }
    for (index, peer) in peers.iter_mut().enumerate() {
        within(
            "arrival announcements",
            peer.reader.skip_lines(n - 1 - index),
        )
        .await?;
    }
    Ok(peers)
}

/// What one message flow achieved.
#[derive(Debug, Clone, Copy)]
pub struct FlowOutcome {
    /// From the first line sent until every client had every line, or until
    /// the flow was declared stalled.
    pub elapsed: Duration,
    /// Chat lines received, summed over the clients.
    pub delivered: u64,
    /// Chat lines that should have been received.
    pub expected: u64,
    /// Nothing was received for `stall_after`, so the flow was abandoned and
    /// the clients are no longer in a state to measure with.
    pub stalled: bool,
}

/// Runs `rounds` rounds of messages: in each, every client sends
/// `lines_per_round` chat lines, keeping at most [`WINDOW`] of its own
/// unechoed, and receives every client's lines (its own included); a
/// client starts the next round only once every client has received all of
/// this one. Returns once all lines have arrived everywhere, or when nothing
/// has arrived anywhere for `stall_after`.
///
/// The window alone would let a sender run arbitrarily far ahead of a
/// reader that is merely descheduled for a while (only its own echoes pace
/// it), and a backlog of thousands of lines would make the server's
/// slow-client limit hit a client that is reading. The rounds bound every
/// reader's backlog to one round, n × `lines_per_round` lines.
///
/// Each client runs as two tasks on the current runtime, a writer and a
/// reader, so that a client blocked writing never stops reading (under the
/// `block` policy that would deadlock the client with the server).
pub async fn run_flow(
    peers: &mut Vec<Peer>,
    rounds: u64,
    lines_per_round: u64,
    stall_after: Duration,
) -> io::Result<FlowOutcome> {
    let clients = peers.len() as u64;
    let barrier = Arc::new(Rounds {
        clients,
        per_reader: clients * lines_per_round,
        finished: AtomicU64::new(0),
        next: Notify::new(),
    });
    let progress = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let mut readers = Vec::with_capacity(peers.len());
    let mut writers = Vec::with_capacity(peers.len());

    let start = Instant::now();
    for peer in peers.drain(..) {
        let Peer {
            who,
            mut reader,
            mut tally,
            mut writer,
        } = peer;
        let window = Arc::new(Semaphore::new(WINDOW));
        let reader_window = Arc::clone(&window);
        let (reader_barrier, writer_barrier) = (Arc::clone(&barrier), Arc::clone(&barrier));
        let (progress, cancel_reader, cancel_writer) =
            (Arc::clone(&progress), cancel.clone(), cancel.clone());
        readers.push(tokio::spawn(async move {
            let result = receive(
                &mut reader,
                &mut tally,
                rounds,
                &reader_barrier,
                &reader_window,
                &progress,
                &cancel_reader,
            )
            .await;
            if result.is_err() {
                // One broken client would leave the others waiting for its
                // lines until the stall timeout: stop everyone now.
                cancel_reader.cancel();
            }
            (who, reader, tally, result)
        }));
        writers.push(tokio::spawn(async move {
            let result = send(
                &mut writer,
                rounds,
                lines_per_round,
                &writer_barrier,
                &window,
                &cancel_writer,
            )
            .await;
            if result.is_err() {
                cancel_writer.cancel();
            }
            (writer, result)
        }));
    }

    // Join the readers while watching for progress. A flow that stops
    // making progress is cancelled, so a stuck server ends the flow instead
    // of hanging the bench.
    let mut received = Vec::with_capacity(readers.len());
    let mut stalled_at = None;
    let mut last_progress = 0;
    let mut last_change = Instant::now();
    for mut reader in readers {
        let joined = loop {
            match timeout(Duration::from_millis(20), &mut reader).await {
                Ok(joined) => break joined,
                Err(_) => {
                    let now = progress.load(Ordering::Relaxed);
                    if now != last_progress {
                        last_progress = now;
                        last_change = Instant::now();
                    } else if stalled_at.is_none() && last_change.elapsed() >= stall_after {
                        stalled_at = Some(start.elapsed());
                        cancel.cancel();
                    }
                }
            }
        };
        received.push(joined.map_err(|err| io::Error::other(format!("reader task: {err}")))?);
    }
    let elapsed = stalled_at.unwrap_or_else(|| start.elapsed());
    let mut sent = Vec::with_capacity(writers.len());
    for writer in writers {
        sent.push(
            writer
                .await
                .map_err(|err| io::Error::other(format!("writer task: {err}")))?,
        );
    }

    let mut first_error = None;
    for ((who, reader, tally, read), (writer, wrote)) in received.into_iter().zip(sent) {
        if let Err(err) = read.and(wrote) {
            first_error.get_or_insert_with(|| io::Error::new(err.kind(), format!("{who}: {err}")));
        }
        peers.push(Peer {
            who,
            reader,
            tally,
            writer,
        });
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    Ok(FlowOutcome {
        elapsed,
        delivered: progress.load(Ordering::Relaxed),
        expected: rounds * barrier.per_reader * clients,
        stalled: stalled_at.is_some(),
    })
}

/// The barrier between rounds, shared by one flow's readers and writers.
struct Rounds {
    clients: u64,
    /// Lines each reader receives per round.
    per_reader: u64,
    /// Rounds finished, summed over the readers: round `r` is finished
    /// everywhere once this reaches `clients × (r + 1)`, since no reader can
    /// finish a round before every reader has finished the one before.
    finished: AtomicU64,
    /// Signalled when a round is finished everywhere.
    next: Notify,
}

/// A client's writer: `rounds` rounds of `lines` lines, in batches of
/// whatever its window allows.
async fn send(
    writer: &mut LineWriter,
    rounds: u64,
    lines: u64,
    barrier: &Rounds,
    window: &Semaphore,
    cancel: &CancellationToken,
) -> io::Result<()> {
    for round in 0..rounds {
        loop {
            // Registered before the check, so a round finishing between the
            // check and the wait still wakes this writer.
            let next = barrier.next.notified();
            if barrier.finished.load(Ordering::Acquire) >= barrier.clients * round {
                break;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                () = next => {}
            }
        }
        let mut sent = 0;
        while sent < lines {
            let permit = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                permit = window.acquire() => permit.map_err(io::Error::other)?,
            };
            permit.forget();
            let mut batch = 1;
            // Whatever else the window allows goes into the same write.
            let more = (window.available_permits() as u64).min(lines - sent - 1) as u32;
            if more > 0 {
                if let Ok(permits) = window.try_acquire_many(more) {
                    permits.forget();
                    batch += u64::from(more);
                }
            }
            writer.push_lines(batch as usize);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                written = writer.half.write_all(&writer.batch) => written?,
            }
            sent += batch;
        }
    }
    Ok(())
}

/// A client's reader: reads until `rounds` rounds of lines have arrived,
/// reopening its writer's window for each of its own echoes and reporting
/// each round it finishes.
async fn receive(
    reader: &mut Inbox,
    tally: &mut Tally,
    rounds: u64,
    barrier: &Rounds,
    window: &Semaphore,
    progress: &AtomicU64,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let first = tally.chat;
    let mut finished = 0;
    loop {
        let (chat, own) = (tally.chat, tally.own_echoes);
        reader.tally_buffered(tally);
        if tally.chat > chat {
            window.add_permits((tally.own_echoes - own) as usize);
            progress.fetch_add(tally.chat - chat, Ordering::Relaxed);
            let now = ((tally.chat - first) / barrier.per_reader).min(rounds);
            for _ in finished..now {
                let all = barrier.finished.fetch_add(1, Ordering::AcqRel) + 1;
                if all % barrier.clients == 0 {
                    barrier.next.notify_waiters();
                }
            }
            finished = now;
        }
        if finished == rounds {
            return Ok(());
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            read = reader.fill() => read.map_err(|err| {
                let last = tally.last_other.as_deref().unwrap_or("none");
                io::Error::new(
                    err.kind(),
                    format!("{err} (after {} chat lines; last other line: {last:?})", tally.chat),
                )
            })?,
        };
    }
}

/// After a stall: the clients that received fewer chat lines than the
/// best-served one, with what else they saw.
pub fn stall_report(peers: &[Peer]) -> String {
    let most = peers.iter().map(|peer| peer.tally.chat).max().unwrap_or(0);
    let behind: Vec<String> = peers
        .iter()
        .filter(|peer| peer.tally.chat < most)
        .map(|peer| {
            format!(
                "{} short by {} (order violations {}, other lines {})",
                peer.who,
                most - peer.tally.chat,
                peer.tally.order_violations,
                peer.tally.other_lines
            )
        })
        .collect();
    if behind.is_empty() {
        format!(
            "all {} clients received the same number of lines",
            peers.len()
        )
    } else {
        format!(
            "{} of {} clients behind: {}",
            behind.len(),
            peers.len(),
            behind.join("; ")
        )
    }
}

/// Order violations summed over `peers`.
pub fn order_violations(peers: &[Peer]) -> u64 {
    peers.iter().map(|peer| peer.tally.order_violations).sum()
}
