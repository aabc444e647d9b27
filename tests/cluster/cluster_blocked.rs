//! Issue 18, finding 6, made to happen: under `--slow-client block` one
//! stuck local client holds whatever delivers to it, and another node dies
//! *while* it is stuck, so that announcing that death has to wait on it.
//! Before the judge thread (58e20aa) the heartbeat task announced deaths
//! itself through the hub and, held there, sent no more heartbeats: the
//! other nodes then declared the stuck client's live node dead and its
//! clients gone. The test checks that no such false death happens while the
//! blocking node stays held for two and a half node timeouts.
//!
//! Without `nats-server` installed this test says so loudly and passes;
//! with `CI` (or `CHAT_REQUIRE_NATS`) set it fails instead. Broker time is
//! real time (a paused clock does not reach `nats-server`); every wait is a
//! bounded read or counter wait.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{Config, Model};
use chat_testkit::Relay;
use common::cluster::{
    blocking_node, connect_stuck, stuck_path_bytes, test_cluster, unlimited_node, unstick, Node,
    JOIN_TIMEOUT,
};
use common::ensure;
use common::nats::Broker;
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

// `broadcast` is left out: its receivers lag and skip, no sender ever
// waits for one, so `--slow-client block` does not apply to it.
for_models_at_once!(
    [Sharded, Broadcaster, Locked]
    a_death_announced_while_a_client_is_stuck_kills_no_live_node
);

/// The blocking node's `--max-pending`: the stuck client's queue.
const MAX_PENDING: usize = 256 * 1024;
/// The length of the last fill lines' text (see [`fill_lines`]).
const FILL_LINE_BYTES: usize = 2 * 1024;
/// The length of the first fill lines' text, which only fill the socket:
/// half the longest line a node takes, so that 5 MB is 160 round trips
/// rather than 2,600 (2.5 s of the test's 10 with three models at once).
const BULK_LINE_BYTES: usize = 32 * 1024;
/// Fill lines past what the stuck client's path holds: more than the
/// `broadcaster` owner's channel holds (1,024 messages), so that there too
/// whoever hands the owner a message waits.
const FILL_BEYOND: usize = 1_100;
/// Clients of the node that dies. Delivery to the stuck client is held on
/// a message it has no room for, at most one fill line (2,076 bytes with
/// its sender): what room is left is less. Their departures (25 bytes
/// each, `IP:PORT has left`) add up to more, so whoever announces them
/// waits too. (With room left, a few departures slip in and nothing
/// waits: why the earlier test, one dying client and lines sent in
/// bulk, 16 KB messages, passed on the old code.)
const DOOMED: usize = 100;
/// How long the probe on the blocking node gets no line before its
/// delivery counts as held: a bounded read, not a sleep. Too short a wait
/// cannot make the test pass wrongly: a node whose delivery was not held
/// announces the death at once, which the test fails on at the end.
const QUIET: Duration = Duration::from_secs(1);
/// How long the blocking node must stay alive in the others' eyes, in
/// heartbeats of `test_cluster` (200 ms): two and a half of its node
/// timeouts (1 s). The old code's stall lasts as long as the client is
/// stuck, whatever the timeout; every wait of this test for a death, and
/// this, is a multiple of it (with a node timeout of 2 s the test took
/// 12-13 s).
const BEATS_TO_OUTLIVE: usize = 13;

/// Finding 6: a node's death is announced while a local client is stuck.
async fn a_death_announced_while_a_client_is_stuck_kills_no_live_node(
    model: Model,
) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let relay = Relay::start(broker.addr())?;
    let url = broker.url();
    // The write timeout is 300 node timeouts: whatever delivers to the
    // stuck client waits all the test.
    let blocking = blocking_node(model, MAX_PENDING);
    let unlimited = unlimited_node(model);
    let doomed_node =
        Config::with_model(model).with(|c| c.shutdown_grace = Duration::from_millis(100));
    let nodes = [
        Node::start_with(test_cluster(&url), blocking)?,
        Node::start_with(test_cluster(&url), unlimited)?,
        // Cut off at the end, it cannot drain: it would wait out its grace.
        Node::start_with(test_cluster(&relay.nats_url()), doomed_node)?,
    ];
    for node in &nodes {
        node.joined(1).await?;
    }
    let (watcher_who, mut watcher) = watch(TestClient::connect(nodes[1].addr()).await?);
    let stuck = connect_stuck(nodes[0].addr()).await?;
    let stuck_who = stuck.local_addr()?.to_string();
    watcher.role(&watcher_who, "the watcher, second node");
    watcher.role(&stuck_who, "the stuck client, blocking node");
    watcher
        .until_line(&format!("{stuck_who} has arrived"))
        .await?;
    // A client on the blocking node that reads: when it stops getting
    // lines, delivery there is held.
    let probe = TestClient::connect(nodes[0].addr()).await?;
    watcher
        .until_line(&format!("{} has arrived", probe.who))
        .await?;
    let (probe_who, mut probe) = watch(probe);
    watcher.role(&probe_who, "the probe, blocking node");
    let talker = TestClient::connect(nodes[1].addr()).await?;
    watcher
        .until_line(&format!("{} has arrived", talker.who))
        .await?;
    // The talker reads too (and throws away): its own node's write
    // timeout would otherwise drop it, a departure in the middle.
    let talker_who = talker.who.clone();
    watcher.role(&talker_who, "the talker, second node");
    let (mut talker_reader, mut talker) = talker.into_parts();
    let talker_reading =
        tokio::spawn(
            async move { tokio::io::copy(&mut talker_reader, &mut tokio::io::sink()).await },
        );
    // Fill the stuck client's socket and queue, and the queues in front
    // of them, one line a message: each line is sent once the last one
    // reached the watcher, so each is one read on the talker's node.
    let bulk = "x".repeat(BULK_LINE_BYTES);
    let chunk = "x".repeat(FILL_LINE_BYTES);
    let fill = fill_lines();
    let mut last_fill = String::new();
    for (number, short) in fill.enumerate() {
        let line = format!("fill {number} {}", if short { &chunk } else { &bulk });
        talker.write_all(format!("{line}\n").as_bytes()).await?;
        last_fill = format!("{talker_who}: {line}");
        watcher
            .until_line(&last_fill)
            .await
            .map_err(|err| io::Error::other(format!("fill line {number}: {err}")))?;
    }
    // The blocking node's delivery is held (not merely behind) before a
    // death is there to announce: otherwise the announcement could slip
    // in first, and nothing would wait.
    probe.until_quiet(&last_fill).await?;

    // The clients of the node that will die join after the fill, so that
    // its queues stay small (they never read).
    let mut doomed = Vec::with_capacity(DOOMED);
    for _ in 0..DOOMED {
        let client = TestClient::connect(nodes[2].addr()).await?;
        watcher.role(&client.who, "a doomed client, cut-off node");
        watcher
            .until_line(&format!("{} has arrived", client.who))
            .await?;
        doomed.push(client);
    }

    // Every node has heard of all of them (from their heartbeats if not
    // from the held stream) before the node dies: the blocking node then
    // has their departures to announce while its delivery is held.
    let mut beats = heartbeats_on_the_wire(&url).await?;
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let beat = tokio::time::timeout(left, beats.next())
            .await
            .map_err(|_| io::Error::other("no heartbeat counting the doomed clients"))?
            .ok_or_else(|| io::Error::other("heartbeats ended"))?;
        if clients_in(&beat.payload) == Some(DOOMED) {
            break;
        }
    }
    relay.partition();
    let mut leaving: HashSet<String> = doomed.iter().map(|client| client.who.clone()).collect();
    watcher.until_departed(&mut leaving).await?;
    // Heard from here on only: what the blocking node sends after the death.
    beats = heartbeats_on_the_wire(&url).await?;
    // Both live nodes keep beating (the cut-off one cannot reach the
    // broker, so two node ids at the count are those two), and nobody
    // declares the blocking node dead, for 2.5 node timeouts; any other
    // departure the watcher hears is false.
    let mut heard: HashMap<String, usize> = HashMap::new();
    let outlived = |heard: &HashMap<String, usize>| {
        heard
            .values()
            .filter(|&&beats| beats >= BEATS_TO_OUTLIVE)
            .count()
            >= 2
    };
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while !outlived(&heard) {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            beat = beats.next() => {
                let beat = beat.ok_or_else(|| io::Error::other("heartbeats ended"))?;
                if let Some(node) = node_in(&beat.payload) {
                    *heard.entry(node).or_default() += 1;
                }
            }
            line = watcher.lines.recv() => {
                let line = line.ok_or_else(|| io::Error::other("the watcher's reader ended"))??;
                ensure(!line.ends_with(" has left"), || {
                    format!(
                        "{model}: {watcher_who} heard {line:?} (heartbeats per node since \
                         the death: {heard:?}): a live client announced gone, the stuck one \
                         is {stuck_who}; the second node declared {} nodes dead",
                        nodes[1].counters.snapshot().dead_nodes
                    )
                })?;
            }
            () = tokio::time::sleep(left) => {
                return Err(io::Error::other(format!(
                    "{model}: heartbeats per node in {JOIN_TIMEOUT:?} after the death: \
                     {heard:?}, two live nodes with {BEATS_TO_OUTLIVE} each expected"
                )));
            }
        }
        let dead = nodes[1].counters.snapshot().dead_nodes;
        ensure(dead <= 1, || {
            format!("{model}: the second node declared {dead} nodes dead, only one died")
        })?;
    }
    // The case of finding 6, not a lucky timing: the blocking node has not
    // yet announced the death (its delivery was held all along).
    let announced = nodes[0].counters.snapshot().dead_nodes;
    ensure(announced == 0, || {
        format!(
            "{model}: the blocking node announced {announced} deaths while its client was \
             stuck: its delivery was not held"
        )
    })?;

    // The stuck client reads again: the blocking node delivers the rest,
    // the death included, and goes on.
    let draining = unstick(stuck, &nodes[0], "the blocking node announced the death").await?;
    probe.send("hello").await?;
    watcher.until_line(&format!("{probe_who}: hello")).await?;
    let dead = nodes[1].counters.snapshot().dead_nodes;
    ensure(dead == 1, || {
        format!("{model}: the second node declared {dead} nodes dead, expected 1")
    })?;
    draining.abort();
    talker_reading.abort();
    Ok(())
}

/// The lines that fill the stuck client's path, each its own event (one
/// read on the talker's node, one message for the blocking node's hub),
/// as whether each is a short one: [`stuck_path_bytes`] in long lines,
/// then [`FILL_BEYOND`] short ones. The short ones last, so that the
/// message delivery is held on, and the room it leaves, is at most one
/// short line (see [`DOOMED`]); 1,100 of them, 2.2 MB, also more than
/// the stuck client's queue holds. About 1,270 lines, 7.5 MB, with the
/// default.
fn fill_lines() -> impl Iterator<Item = bool> {
    let bulk = stuck_path_bytes(MAX_PENDING).div_ceil(BULK_LINE_BYTES);
    std::iter::repeat_n(false, bulk).chain(std::iter::repeat_n(true, FILL_BEYOND))
}

/// A client whose lines are read by a task of their own, so that a test
/// can wait for a line and for something else at once.
struct Watched {
    lines: mpsc::UnboundedReceiver<io::Result<String>>,
    writer: OwnedWriteHalf,
    /// Who the test's clients are, for the error messages.
    roles: HashMap<String, String>,
}

fn watch(client: TestClient) -> (String, Watched) {
    let who = client.who.clone();
    let (mut reader, writer) = client.into_parts();
    let (tx, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let line = next_line(&mut reader).await;
            let failed = line.is_err();
            if tx.send(line).is_err() || failed {
                break;
            }
        }
    });
    let roles = HashMap::new();
    (
        who,
        Watched {
            lines,
            writer,
            roles,
        },
    )
}

/// The next line of `reader`, without its newline, within three
/// [`JOIN_TIMEOUT`]s (the longest any step of the test waits).
async fn next_line(reader: &mut BufReader<OwnedReadHalf>) -> io::Result<String> {
    let mut line = String::new();
    let read = tokio::time::timeout(JOIN_TIMEOUT * 3, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no line from server"))??;
    if read == 0 || !line.ends_with('\n') {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    line.pop();
    Ok(line)
}

impl Watched {
    /// Sends `text` followed by a newline.
    async fn send(&mut self, text: &str) -> io::Result<()> {
        self.writer.write_all(format!("{text}\n").as_bytes()).await
    }

    /// Reads until `expected`, within [`JOIN_TIMEOUT`]; fails on any
    /// departure on the way (every departure this test expects is waited
    /// for by name).
    async fn until_line(&mut self, expected: &str) -> io::Result<()> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.recv())
                .await
                .map_err(|_| io::Error::other(format!("waiting for {expected:?}: timed out")))?
                .ok_or_else(|| io::Error::other("the watcher's reader ended"))??;
            if line == expected {
                return Ok(());
            }
            ensure(!line.ends_with(" has left"), || {
                format!(
                    "waiting for {expected:?}: unexpected {line:?} ({})",
                    self.role_in(&line)
                )
            })?;
        }
    }

    fn role(&mut self, who: &str, role: &str) {
        self.roles.insert(who.to_string(), role.to_string());
    }

    /// Which of the test's clients `line` is about.
    fn role_in(&self, line: &str) -> &str {
        let who = line.split([' ', ':']).take(2).collect::<Vec<_>>().join(":");
        self.roles
            .get(&who)
            .map_or("not one of the test's clients", String::as_str)
    }

    /// Reads until no line comes for [`QUIET`] (within [`JOIN_TIMEOUT`]);
    /// fails if `last` comes: whatever delivers here was not held before it.
    async fn until_quiet(&mut self, last: &str) -> io::Result<()> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut read = 0;
        loop {
            ensure(Instant::now() < deadline, || {
                format!("{read} lines and never {QUIET:?} without one")
            })?;
            let Ok(line) = tokio::time::timeout(QUIET, self.lines.recv()).await else {
                return Ok(());
            };
            let line = line.ok_or_else(|| io::Error::other("the probe's reader ended"))??;
            read += 1;
            ensure(line != last, || {
                format!("the blocking node delivered all {read} lines: it was never held")
            })?;
        }
    }

    /// Reads until each of `leaving` has left, within [`JOIN_TIMEOUT`];
    /// fails on any other departure.
    async fn until_departed(&mut self, leaving: &mut HashSet<String>) -> io::Result<()> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !leaving.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.recv())
                .await
                .map_err(|_| io::Error::other(format!("timed out; still to leave: {leaving:?}")))?
                .ok_or_else(|| io::Error::other("the watcher's reader ended"))??;
            if let Some(who) = line.strip_suffix(" has left") {
                ensure(leaving.remove(who), || {
                    format!(
                        "unexpected {line:?} ({}) while waiting for {} departures",
                        self.role_in(&line),
                        leaving.len()
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// The client count of a heartbeat.
fn clients_in(payload: &[u8]) -> Option<usize> {
    let beat: serde_json::Value = serde_json::from_slice(payload).ok()?;
    beat["clients"].as_u64()?.try_into().ok()
}

/// The `node` field of a heartbeat.
fn node_in(payload: &[u8]) -> Option<String> {
    let beat: serde_json::Value = serde_json::from_slice(payload).ok()?;
    beat["node"].as_str().map(str::to_string)
}

/// The room's heartbeats as any NATS client sees them on the broker.
async fn heartbeats_on_the_wire(url: &str) -> io::Result<async_nats::Subscriber> {
    let nats = async_nats::connect(url).await.map_err(io::Error::other)?;
    nats.subscribe("chat.chat.heartbeat")
        .await
        .map_err(io::Error::other)
}
