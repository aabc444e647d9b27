//! Slow consumers, in every model and under every slow-client policy: one
//! client that never reads while 4 others exchange 24,000 lines of 200
//! bytes, and one that reads slowly but steadily through a 10,000-line burst.
//!
//! A client that never reads is absorbed by kernel buffers first: on
//! loopback the server's send buffer autotunes to megabytes (about 2.8 MB
//! measured here), and only then does the server's own queue fill. So each
//! recipient is sent about 5.2 MB (24,000 lines of about 217 bytes with
//! the sender's address): more than Linux's 4 MB send-buffer ceiling plus
//! the 256 KiB `--max-pending` used here, and more than the `broadcast`
//! model's 1,024-entry ring holds (each entry is one read of 10 lines).
//! Too little would fail the tests, not pass them: the stuck client would
//! be sent everything, or `block`'s exchange would finish. (It was 40,000
//! lines, 8.7 MB a recipient, then 24,000 among 20 senders: 21 readers of
//! 5.2 MB each, where what the test needs is the stuck one's 5.2 MB.) The
//! exchange runs in lockstep rounds, so a healthy reader is never more than
//! one round (9 KB) behind and only the stuck one ever reaches a limit,
//! however the machine schedules the test.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model, SlowClientPolicy};
use common::{check_sender_order, connect_settled, ensure, exchange, Exchange, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const EXCHANGE: Exchange = Exchange {
    senders: 4,
    rounds: 600,
    lines_per_round: 10,
    line_len: 200,
    within: Duration::from_secs(60),
};

/// Under `block` the others must still be waiting after this long.
const STALL_SHOWN_AFTER: Duration = Duration::from_secs(2);

fn config(model: Model, policy: SlowClientPolicy) -> Config {
    Config::with_model(model).without_abuse_limits().with(|c| {
        c.slow_client = policy;
        c.max_pending = 256 * 1024;
        c.write_timeout = Duration::from_secs(1);
        // The senders burst far past any human's input budget on purpose;
        // flood control has its own tests (tests/fairness.rs, tests/it/limits.rs).
    })
}

macro_rules! for_each_model_and_policy {
    ($($model:ident: $variant:ident),* $(,)?) => {$(
        mod $model {
            use chat_server::Model;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn never_reading_client_under_disconnect() -> std::io::Result<()> {
                super::never_reading_under_disconnect(Model::$variant).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn never_reading_client_under_drop() -> std::io::Result<()> {
                super::never_reading_under_drop(Model::$variant).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn never_reading_client_under_block() -> std::io::Result<()> {
                super::never_reading_under_block(Model::$variant).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn slow_steady_reader_is_never_disconnected() -> std::io::Result<()> {
                super::slow_steady_reader(Model::$variant).await
            }
        }
    )*};
}

for_each_model_and_policy!(
    sharded: Sharded,
    broadcaster: Broadcaster,
    locked: Locked,
    broadcast: Broadcast,
);

/// A client that reads its greeting and then nothing, advertising a small
/// receive window.
async fn stuck_client(addr: SocketAddr) -> io::Result<(TcpStream, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    let who = stream.local_addr()?.to_string();
    let mut greeting = vec![0u8; format!("You are {who}\n").len()];
    stream.read_exact(&mut greeting).await?;
    Ok((stream, who))
}

/// The exchange's settled clients, then the stuck one.
async fn setup(
    model: Model,
    policy: SlowClientPolicy,
) -> io::Result<(TestServer, Vec<TestClient>, TcpStream, String)> {
    let server = TestServer::start(config(model, policy))?;
    let clients = connect_settled(&server, EXCHANGE.senders).await?;
    let (stuck, stuck_who) = stuck_client(server.addr()).await?;
    Ok((server, clients, stuck, stuck_who))
}

/// Everything the stuck client was sent, read until the server closes the
/// connection (`Closed`) or nothing more arrives for half a second (`Open`).
enum Backlog {
    Closed(String),
    Open(String),
}

async fn read_backlog(stream: &mut TcpStream) -> io::Result<Backlog> {
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await {
            Ok(Ok(0)) => return Ok(Backlog::Closed(text(&received))),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(Backlog::Closed(text(&received)))
            }
            Ok(Err(err)) => return Err(err),
            // Quiet is not proof of anything; callers only use it for a
            // client that must still be connected.
            Err(_) => return Ok(Backlog::Open(text(&received))),
        }
    }
}

/// The exchange's lines among what the stuck client received.
fn parse_backlog(who: &str, text: &str, senders: &[String]) -> Seen {
    let mut seen = Seen {
        who: who.to_string(),
        lines: Vec::new(),
        other: Vec::new(),
    };
    for line in text.lines() {
        let parsed = line
            .split_once(": ")
            .filter(|(from, _)| senders.iter().any(|sender| sender == from))
            .and_then(|(from, rest)| {
                Some((from.to_string(), rest.split(' ').next()?.parse().ok()?))
            });
        match parsed {
            Some(entry) => seen.lines.push(entry),
            None => seen.other.push(line.to_string()),
        }
    }
    seen
}

/// Reads `watcher`'s lines (those already seen first) until `expected`.
async fn watch_for(seen: &Seen, watcher: &mut TestClient, expected: &str) -> io::Result<()> {
    if seen.other.iter().any(|line| line == expected) {
        return Ok(());
    }
    loop {
        if watcher.line().await? == expected {
            return Ok(());
        }
    }
}

async fn never_reading_under_disconnect(model: Model) -> io::Result<()> {
    let (_server, clients, mut stuck, stuck_who) =
        setup(model, SlowClientPolicy::Disconnect).await?;
    // Nobody waits for the stuck client: the others finish and lose nothing
    // (`exchange` checks both).
    let mut results = exchange(clients, EXCHANGE).await?;
    let (seen, watcher) = &mut results[0];
    watch_for(seen, watcher, &format!("{stuck_who} has left")).await?;
    let Backlog::Closed(backlog) = read_backlog(&mut stuck).await? else {
        return Err(io::Error::other(
            "the stuck client was told it left but is still connected",
        ));
    };
    let total = EXCHANGE.total_lines();
    let senders: Vec<String> = results.iter().map(|(seen, _)| seen.who.clone()).collect();
    let stuck_seen = parse_backlog(&stuck_who, &backlog, &senders);
    check_sender_order(&stuck_seen, false, EXCHANGE.lines_per_sender())?;
    println!(
        "{model}/disconnect: the stuck client was sent {} of {total} lines, then {:?}",
        stuck_seen.lines.len(),
        stuck_seen.other.last()
    );
    ensure(stuck_seen.lines.len() < total, || {
        "the stuck client was sent everything".into()
    })
}

async fn never_reading_under_drop(model: Model) -> io::Result<()> {
    let (_server, clients, mut stuck, stuck_who) = setup(model, SlowClientPolicy::Drop).await?;
    let mut results = exchange(clients, EXCHANGE).await?;
    let Backlog::Open(backlog) = read_backlog(&mut stuck).await? else {
        return Err(io::Error::other(
            "drop policy disconnected the stuck client",
        ));
    };
    let total = EXCHANGE.total_lines();
    let senders: Vec<String> = results.iter().map(|(seen, _)| seen.who.clone()).collect();
    let stuck_seen = parse_backlog(&stuck_who, &backlog, &senders);
    // Skipped, never reordered.
    check_sender_order(&stuck_seen, false, EXCHANGE.lines_per_sender())?;
    println!(
        "{model}/drop: the stuck client received {} of {total} lines",
        stuck_seen.lines.len()
    );
    ensure(stuck_seen.lines.len() < total, || {
        "nothing was skipped for the stuck client".into()
    })?;
    // Still a member: its line reaches the others.
    stuck.write_all(b"still here\n").await?;
    let (seen, watcher) = &mut results[0];
    watch_for(seen, watcher, &format!("{stuck_who}: still here")).await
}

async fn never_reading_under_block(model: Model) -> io::Result<()> {
    if model == Model::Broadcast {
        return block_is_refused(model);
    }
    let (_server, clients, mut stuck, _stuck_who) = setup(model, SlowClientPolicy::Block).await?;
    let mut running = tokio::spawn(exchange(clients, EXCHANGE));
    // The seed's behaviour: one client that does not read stalls everyone.
    let finished = tokio::time::timeout(STALL_SHOWN_AFTER, &mut running)
        .await
        .is_ok();
    ensure(!finished, || {
        format!("{model}/block: the exchange finished despite a stuck reader")
    })?;
    // Once it reads, everything flows again and nothing was lost.
    let draining = tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if stuck.read(&mut chunk).await? == 0 {
                return Ok::<_, io::Error>(false);
            }
        }
    });
    running.await.map_err(io::Error::other)??;
    ensure(!draining.is_finished(), || {
        "block policy disconnected the stuck client".into()
    })
}

/// `broadcast` cannot make a sender wait, so it refuses `block` outright.
fn block_is_refused(model: Model) -> io::Result<()> {
    match TestServer::start(config(model, SlowClientPolicy::Block)) {
        Ok(_) => Err(io::Error::other(format!(
            "{model} accepted --slow-client block"
        ))),
        Err(err) => ensure(
            err.kind() == io::ErrorKind::InvalidInput && err.to_string().contains("cannot support"),
            || format!("unclear refusal: {err}"),
        ),
    }
}

/// A reader that is merely behind is never cut off: default queue limits, a
/// 10,000-line burst in one write, and a reader that takes 8 KiB every 2 ms.
/// (Such a burst is 20 s of the default input budget: flood control is off
/// here, since what is tested is the readers' side.)
async fn slow_steady_reader(model: Model) -> io::Result<()> {
    const BURST: usize = 10_000;
    let server = TestServer::start(Config::with_model(model).without_abuse_limits())?;
    let mut clients = connect_settled(&server, 2).await?;
    let (Some(reader), Some(mut sender)) = (clients.pop(), clients.pop()) else {
        return Err(io::Error::other("two clients expected"));
    };
    let burst: String = (0..BURST)
        .map(|i| format!("{i} {}\n", "y".repeat(190)))
        .collect();
    let sender_who = sender.who.clone();
    // The sender keeps reading its echoes: closing a socket with unread
    // input makes the kernel send a reset, and the server would lose the
    // rest of the burst.
    let sending = tokio::spawn(async move {
        sender.send_raw(burst.as_bytes()).await?;
        sender.lines_until_closed().await
    });
    let (mut stream, _writer) = reader.into_parts();
    let last_line = format!("{sender_who}: {} ", BURST - 1);
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // The sender's departure may follow its last line, so look at the tail.
    while !String::from_utf8_lossy(&received[received.len().saturating_sub(1000)..])
        .lines()
        .any(|line| line.starts_with(&last_line))
    {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .map_err(|_| io::Error::other("burst not delivered in time"))??;
        ensure(n > 0, || {
            format!(
                "{model}: slow reader disconnected after {} bytes",
                received.len()
            )
        })?;
        received.extend_from_slice(&chunk[..n]);
        // Slow but steady: this pacing is the behaviour under test, not synchronisation.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    sending.abort();
    let seen = parse_backlog("reader", &String::from_utf8_lossy(&received), &[sender_who]);
    ensure(
        seen.other.iter().all(|line| !line.starts_with("error")),
        || format!("{model}: {:?}", seen.other),
    )?;
    check_sender_order(&seen, true, BURST)
}
