//! What the integration tests share: running one test body against every model.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{Config, Model};
use tokio::sync::Barrier;
use tokio::time::Instant;

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod in_process;
pub mod scrape;
#[cfg(feature = "cluster")]
pub mod transcript;

/// For each `name`, a module `name` with one `#[tokio::test]` per model that
/// calls `name(model)`, so a failure names the model it failed in.
#[macro_export]
macro_rules! for_each_model {
    ($($test:ident),* $(,)?) => {
        $crate::for_models!(
            [sharded: Sharded, broadcaster: Broadcaster, locked: Locked, broadcast: Broadcast]
            $($test),*
        );
    };
}

/// For each `name`, one test, `name::all_models`, that runs `name(model)`
/// for every model listed at once (see [`at_once`]): for the bodies that
/// wait on real time (node timeouts, a broker's election) rather than
/// compute, which as a test per model each held one of the harness's
/// eight slots for all their waiting.
#[macro_export]
macro_rules! for_models_at_once {
    ($models:tt $($test:ident),* $(,)?) => {$(
        $crate::for_models_at_once!(@one $test $models);
    )*};
    (@one $test:ident [$($variant:ident),* $(,)?]) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn all_models() -> std::io::Result<()> {
                $crate::common::at_once(&[$(chat_server::Model::$variant),*], super::$test).await
            }
        }
    };
}

/// [`for_models_at_once`] for every model.
#[macro_export]
macro_rules! for_each_model_at_once {
    ($($test:ident),* $(,)?) => {
        $crate::for_models_at_once!([Sharded, Broadcaster, Locked, Broadcast] $($test),*);
    };
}

/// [`for_each_model`] on paused time: each test runs on a current-thread
/// runtime whose clock starts paused (`tests/it/timers.rs` says why).
#[macro_export]
macro_rules! for_each_model_paused {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            $crate::for_each_model_paused!(
                @tests $test [sharded: Sharded, broadcaster: Broadcaster, locked: Locked, broadcast: Broadcast]
            );
        }
    )*};
    (@tests $test:ident [$($name:ident: $variant:ident),* $(,)?]) => {$(
        #[tokio::test(start_paused = true)]
        async fn $name() -> std::io::Result<()> {
            super::$test(chat_server::Model::$variant).await
        }
    )*};
}

/// [`for_each_model`] for a chosen list of models, as `[fn_name: Variant, ...]`.
#[macro_export]
macro_rules! for_models {
    ($models:tt $($test:ident),* $(,)?) => {$(
        mod $test {
            $crate::for_models!(@tests $test $models);
        }
    )*};
    (@tests $test:ident [$($name:ident: $variant:ident),* $(,)?]) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> std::io::Result<()> {
            super::$test(chat_server::Model::$variant).await
        }
    )*};
}

/// The busy room most ordering checks use: 8 clients, 4 of them sending
/// 300 lines each in 30 lockstep rounds.
pub const BUSY_ROOM: Exchange = Exchange {
    senders: 4,
    rounds: 30,
    lines_per_round: 10,
    line_len: 16,
    within: Duration::from_secs(20),
};

/// A default server running `model`.
pub fn server(model: Model) -> io::Result<TestServer> {
    TestServer::start(Config::with_model(model))
}

/// Connects `n` clients one after another; each has read its greeting, and
/// every earlier client has been told of each later one's arrival (those
/// lines are still unread).
pub async fn connect_all(server: &TestServer, n: usize) -> io::Result<Vec<TestClient>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(TestClient::connect(server.addr()).await?);
    }
    Ok(clients)
}

/// Connects `n` clients and reads every arrival announcement, so that all
/// of them are quiet when this returns.
pub async fn connect_settled(server: &TestServer, n: usize) -> io::Result<Vec<TestClient>> {
    let mut clients = connect_all(server, n).await?;
    for (index, client) in clients.iter_mut().enumerate() {
        for _ in index + 1..n {
            client.line().await?;
        }
    }
    Ok(clients)
}

/// Many clients chatting at once, in lockstep rounds: in each round every
/// sender writes `lines_per_round` numbered lines in one write, and every
/// client reads all of the round's lines before anyone starts the next.
/// Senders' writes interleave at the server within a round, while no healthy
/// reader can ever be more than one round behind: only a client that really
/// stops reading falls far behind.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// The first `senders` clients send; all of them read.
    pub senders: usize,
    pub rounds: usize,
    pub lines_per_round: usize,
    /// Bytes of text per line (a sequence number, padded).
    pub line_len: usize,
    /// Every client must have read every line by then.
    pub within: Duration,
}

impl Exchange {
    pub fn lines_per_sender(&self) -> usize {
        self.rounds * self.lines_per_round
    }

    pub fn total_lines(&self) -> usize {
        self.senders * self.lines_per_sender()
    }
}

/// What one client saw of an exchange.
#[derive(Debug)]
pub struct Seen {
    pub who: String,
    /// `(sender, sequence number)` of each exchanged line, in arrival order.
    pub lines: Vec<(String, usize)>,
    /// Every other line (arrivals, departures, other chat).
    pub other: Vec<String>,
}

/// Runs `exchange` with `clients`, one task each, and checks that every
/// client got every sender's lines, complete and in the order sent. Fails
/// naming the first client that stalled. Returns what each client saw, and
/// the clients for further use.
pub async fn exchange(
    clients: Vec<TestClient>,
    exchange: Exchange,
) -> io::Result<Vec<(Seen, TestClient)>> {
    let deadline = Instant::now() + exchange.within;
    let senders: Arc<HashSet<String>> = Arc::new(
        clients
            .iter()
            .take(exchange.senders)
            .map(|client| client.who.clone())
            .collect(),
    );
    let round_done = Arc::new(Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for (index, client) in clients.into_iter().enumerate() {
        let senders = Arc::clone(&senders);
        let round_done = Arc::clone(&round_done);
        let sends = index < exchange.senders;
        tasks.push(tokio::spawn(async move {
            let (mut seen, client) =
                take_part(client, sends, &senders, &round_done, exchange, deadline).await?;
            check_sender_order(&seen, true, exchange.lines_per_sender())?;
            seen.lines.shrink_to_fit();
            Ok::<_, io::Error>((seen, client))
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.map_err(io::Error::other)??);
    }
    Ok(results)
}

async fn take_part(
    mut client: TestClient,
    sends: bool,
    senders: &HashSet<String>,
    round_done: &Barrier,
    exchange: Exchange,
    deadline: Instant,
) -> io::Result<(Seen, TestClient)> {
    let who = client.who.clone();
    let mut seen = Seen {
        who: who.clone(),
        lines: Vec::with_capacity(exchange.total_lines()),
        other: Vec::new(),
    };
    for round in 0..exchange.rounds {
        if sends {
            let mut burst = String::new();
            for i in 0..exchange.lines_per_round {
                let number = (round * exchange.lines_per_round + i).to_string();
                burst.push_str(&number);
                burst.push(' ');
                let pad = exchange.line_len.saturating_sub(number.len() + 1);
                burst.extend(std::iter::repeat_n('x', pad));
                burst.push('\n');
            }
            client.send_raw(burst.as_bytes()).await?;
        }
        let due = (round + 1) * exchange.senders * exchange.lines_per_round;
        while seen.lines.len() < due {
            let line = tokio::time::timeout_at(deadline, client.line())
                .await
                .map_err(|_| {
                    io::Error::other(format!("{who}: stalled after {} lines", seen.lines.len()))
                })?
                .map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("{who}: {err} after {} lines", seen.lines.len()),
                    )
                })?;
            let parsed = line
                .split_once(": ")
                .filter(|(from, _)| senders.contains(*from))
                .and_then(|(from, rest)| {
                    Some((from.to_string(), rest.split(' ').next()?.parse().ok()?))
                });
            match parsed {
                Some(entry) => seen.lines.push(entry),
                None => seen.other.push(line),
            }
        }
        tokio::time::timeout_at(deadline, round_done.wait())
            .await
            .map_err(|_| io::Error::other(format!("{who}: others stalled in round {round}")))?;
    }
    Ok((seen, client))
}

/// Checks that `seen` has each sender's lines in the order sent: all of
/// them (`complete`), or an increasing subsequence (messages skipped for a
/// slow client).
pub fn check_sender_order(seen: &Seen, complete: bool, per_sender: usize) -> io::Result<()> {
    let mut next: HashMap<&str, usize> = HashMap::new();
    for (from, seq) in &seen.lines {
        let due = next.entry(from).or_insert(0);
        let in_order = if complete { *seq == *due } else { *seq >= *due };
        ensure(in_order, || {
            format!("{} saw {from}'s line {seq} where {due} was due", seen.who)
        })?;
        *due = seq + 1;
    }
    if complete {
        ensure(next.values().all(|&n| n == per_sender), || {
            format!("{} lost lines: next due {next:?}", seen.who)
        })?;
    }
    Ok(())
}

pub use chat_testkit::ensure;

/// Floods the server from `flooder` (100-byte lines, 64 KiB a write) until
/// it closes the connection, or for at most 20 s; returns the last line the
/// flooder read, which should be the verdict (its echoes come before it).
#[allow(dead_code)] // only the flood tests flood
pub async fn flood_until_cut_off(flooder: TestClient) -> io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (mut reader, mut writer) = flooder.into_parts();
    let flooding = tokio::spawn(async move {
        let chunk = format!("{}\n", "f".repeat(99)).repeat(640);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut last = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
            .await
            .map_err(|_| io::Error::other("the flooder was never cut off"))?;
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => last = line,
        }
    }
    flooding.await.map_err(io::Error::other)?;
    Ok(last)
}

/// Departures are processed asynchronously; this bounds how long a task
/// count may take to settle, it is not a sleep.
pub const TASKS_SETTLE: Duration = Duration::from_secs(10);

/// Waits until `server` runs exactly the tasks `model` has for `clients`
/// connected clients, failing with the count seen `when` (for example
/// "after all left").
pub async fn expect_tasks(
    server: &TestServer,
    model: Model,
    clients: usize,
    when: &str,
) -> io::Result<()> {
    let expected = model.expected_tasks(clients);
    server
        .wait_for_tasks(expected, TASKS_SETTLE)
        .await
        .map_err(|alive| {
            io::Error::other(format!(
                "{model}: {alive} tasks {when}, expected {expected}"
            ))
        })
}

#[allow(unused_imports)] // only the cluster tests start a broker
pub use chat_testkit::nats;
#[allow(unused_imports)] // not every test starts processes
pub use chat_testkit::process;

/// Runs `body` for each of `models` at once, each on a task of its own,
/// and fails naming every model that failed (a panic included).
pub async fn at_once<F, Body>(models: &[Model], body: F) -> io::Result<()>
where
    F: Fn(Model) -> Body,
    Body: std::future::Future<Output = io::Result<()>> + Send + 'static,
{
    let running: Vec<_> = models
        .iter()
        .map(|&model| (model, tokio::spawn(body(model))))
        .collect();
    let mut failed = Vec::new();
    for (model, run) in running {
        match run.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failed.push(format!("{model}: {err}")),
            Err(err) => failed.push(format!("{model}: {err}")),
        }
    }
    ensure(failed.is_empty(), || failed.join("\n"))
}
