//! Membership across nodes under the faults of issue 18 (findings 1 and
//! 3), with a real `nats-server` per test: a node cut off from the broker
//! (the test kit's [`Relay`]) and healed, and a connect storm on one node
//! (finding 6, a stuck client under `--slow-client block`, is
//! `cluster_blocked`'s). Every client's transcript
//! goes through [`View`], the membership checker: the sender of every line
//! a client receives is in its view of the room at that moment (its
//! `present` list, plus the arrivals, minus the departures it heard), it
//! never hears an arrival of someone already in its view nor a departure
//! of someone not in it, and each sender's numbered lines come once each,
//! in order.
//!
//! Without `nats-server` installed these tests say so loudly and pass;
//! with `CI` (or `CHAT_REQUIRE_NATS`) set they fail instead. Broker time
//! is real time; every wait is a bounded read or counter wait.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{Config, Model};
use chat_testkit::Relay;
use common::cluster::{test_cluster, Node, JOIN_TIMEOUT};
use common::ensure;
use common::nats::Broker;
use tokio::time::Instant;

for_each_model_at_once!(partition_then_heal_keeps_membership_in_stream_order);
for_each_model_at_once!(connect_storm_causes_no_false_departure);

/// One client and its view of the room, checked line by line.
struct View {
    client: TestClient,
    view: HashSet<String>,
    /// Per sender, the numbers of its `n <k>` lines in arrival order.
    numbered: HashMap<String, Vec<u64>>,
    /// Every line, for the error messages.
    transcript: Vec<String>,
}

impl View {
    /// Connects; with `present`, reads the `present` line that follows
    /// the greeting and starts from it.
    async fn join(addr: SocketAddr, present: bool) -> io::Result<View> {
        let mut client = TestClient::connect(addr).await?;
        let mut view = HashSet::new();
        if present {
            let line = client.line().await?;
            let names = chat_wire::present_of(&line)
                .ok_or_else(|| io::Error::other(format!("not a present line: {line:?}")))?;
            view.extend(names.into_iter().map(str::to_string));
        }
        Ok(View {
            client,
            view,
            numbered: HashMap::new(),
            transcript: Vec::new(),
        })
    }

    fn who(&self) -> &str {
        &self.client.who
    }

    /// Checks one line against the view and applies it.
    fn take(&mut self, line: String) -> io::Result<()> {
        let who = self.client.who.clone();
        let fail = |view: &View, why: String| {
            let tail: Vec<&String> = view.transcript.iter().rev().take(8).rev().collect();
            io::Error::other(format!("{who}: {why}; last lines {tail:?}"))
        };
        if let Some(arrived) = line.strip_suffix(" has arrived") {
            if !self.view.insert(arrived.to_string()) {
                return Err(fail(self, format!("arrival of {arrived}, already in view")));
            }
        } else if let Some(left) = line.strip_suffix(" has left") {
            if !self.view.remove(left) {
                return Err(fail(self, format!("departure of {left}, not in view")));
            }
        } else if let Some((sender, text)) = line.split_once(": ") {
            if sender != who && !self.view.contains(sender) {
                return Err(fail(self, format!("{line:?} from outside the view")));
            }
            if let Some(number) = text.strip_prefix("n ").and_then(|n| n.parse::<u64>().ok()) {
                let seen = self.numbered.entry(sender.to_string()).or_default();
                let expected = seen.last().map_or(0, |last| last + 1);
                if number != expected {
                    return Err(fail(
                        self,
                        format!("{sender}'s line {number}, expected {expected} (lost, doubled or out of order)"),
                    ));
                }
                seen.push(number);
            }
        }
        self.transcript.push(line);
        Ok(())
    }

    /// Reads (and checks) lines until `done` holds, within [`JOIN_TIMEOUT`].
    async fn until(&mut self, what: &str, done: impl Fn(&View) -> bool) -> io::Result<()> {
        self.until_within(JOIN_TIMEOUT, what, done).await
    }

    async fn until_within(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + within;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.client.line_within(left).await.map_err(|err| {
                let counts: Vec<(&String, usize)> = self
                    .numbered
                    .iter()
                    .map(|(who, seen)| (who, seen.len()))
                    .collect();
                io::Error::other(format!(
                    "{}: waiting for {what}: {err}; numbered lines {counts:?}, {} in view",
                    self.client.who,
                    self.view.len()
                ))
            })?;
            self.take(line)?;
        }
        Ok(())
    }

    /// How many numbered lines of `sender` arrived.
    fn count_of(&self, sender: &str) -> usize {
        self.numbered.get(sender).map_or(0, Vec::len)
    }
}

fn with_presence(model: Model) -> Config {
    Config::with_model(model).with(|c| c.announce_present = true)
}

/// Finding 1: a node cut off from the broker for longer than the node
/// timeout while every node chats, then healed. On the other nodes the
/// returning client's `has arrived` comes before any of its lines (it was
/// announced by the heartbeat task and its backlog by the consumer,
/// unordered); nothing is lost or doubled; every transcript keeps the
/// membership invariant.
async fn partition_then_heal_keeps_membership_in_stream_order(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let relay = Relay::start(broker.addr())?;
    let url = broker.url();
    let nodes = [
        Node::start_with(test_cluster(&url), with_presence(model))?,
        Node::start_with(test_cluster(&url), with_presence(model))?,
        Node::start_with(test_cluster(&relay.nats_url()), with_presence(model))?,
    ];
    for node in &nodes {
        node.joined(1).await?;
    }
    let mut views = Vec::new();
    for node in &nodes {
        let view = View::join(node.addr(), true).await?;
        let newcomer = view.who().to_string();
        for earlier in &mut views {
            let earlier: &mut View = earlier;
            earlier
                .until("an arrival", |v| v.view.contains(&newcomer))
                .await?;
        }
        views.push(view);
    }
    let [a, b, c] = &mut views[..] else {
        return Err(io::Error::other("three views"));
    };
    let cut = c.who().to_string();
    relay.partition();
    // The others declare the cut-off node dead.
    a.until("the cut-off client's departure", |v| !v.view.contains(&cut))
        .await?;
    b.until("the cut-off client's departure", |v| !v.view.contains(&cut))
        .await?;
    // Everyone talks meanwhile; the cut-off node's lines wait in its buffer.
    let count = 30;
    for number in 0..count {
        for view in [&mut *a, &mut *b, &mut *c] {
            view.client.send(&format!("n {number}")).await?;
        }
    }
    relay.heal();
    let senders = [a.who().to_string(), b.who().to_string(), cut.clone()];
    for view in [&mut *a, &mut *b, &mut *c] {
        view.until("every line", |v| {
            senders.iter().all(|sender| v.count_of(sender) == count)
        })
        .await?;
    }
    // Back in view everywhere.
    for view in [&mut *a, &mut *b] {
        ensure(view.view.contains(&cut), || {
            format!("{}: {cut} not back in view", view.who())
        })?;
    }
    for node in &nodes[..2] {
        ensure(node.counters.snapshot().missed == 0, || {
            "a node missed events".into()
        })?;
    }
    ensure(nodes[2].counters.snapshot().dropped == 0, || {
        "the cut-off node dropped events".into()
    })
}

/// Finding 3: many clients connect to one node at once (every arrival
/// goes to everyone there: O(n²) deliveries); the other node never
/// declares it silent, so its watcher hears every arrival and not one
/// departure, and neither node counts a dead node.
async fn connect_storm_causes_no_false_departure(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let url = broker.url();
    let storm = storm_size();
    let _turn = if storm > LARGEST_QUICK_STORM {
        Some(LARGE_STORM_TURN.acquire().await.map_err(io::Error::other)?)
    } else {
        None
    };
    let roomy = || {
        Config::with_model(model).with(|c| {
            c.max_clients = storm + 100;
            c.max_clients_per_ip = storm + 100;
        })
    };
    let nodes = [
        Node::start_with(test_cluster(&url), roomy())?,
        Node::start_with(test_cluster(&url), roomy())?,
    ];
    for node in &nodes {
        node.joined(1).await?;
    }
    let mut watcher = View::join(nodes[1].addr(), false).await?;
    // The heartbeats on the wire, captured: their size must not grow with
    // the storm (finding 4: one measured 163 KB at 8,000 clients).
    let mut beats = heartbeats_on_the_wire(&url).await?;
    let addr = nodes[0].addr();
    // The watcher reads while the storm comes (a reader that stops reading
    // would be disconnected as too slow).
    let watching = tokio::spawn(async move {
        // O(n²) deliveries on the storm's node: a bound that grows with it.
        let within = JOIN_TIMEOUT * (1 + u32::try_from(storm / 1_000).unwrap_or(u32::MAX));
        watcher
            .until_within(within, "every arrival of the storm", |v| {
                v.view.len() >= storm
            })
            .await
            .map(|()| watcher)
    });
    let started = Instant::now();
    let mut connecting = Vec::new();
    // Several hundred connects in flight at once, within the listen backlog.
    let waves = 8;
    for wave in 0..waves {
        connecting.push(tokio::spawn(async move {
            // Each storm client stays connected. The storm's arrivals (about
            // 30 bytes each) fit in a client's socket buffer up to a few
            // thousand; past that a client that does not read is dropped as
            // too slow, and its departure is real, so a larger storm reads
            // everything. Not reading halves the storm's CPU at the default
            // size, and the server's work, the point of the test, is the same.
            let mut held = Vec::new();
            for _ in (wave..storm).step_by(waves) {
                let client = TestClient::connect(addr).await?;
                let who = client.who.clone();
                let (mut reader, writer) = client.into_parts();
                let draining = (storm > LARGEST_QUICK_STORM).then(|| {
                    tokio::spawn(async move {
                        tokio::io::copy(&mut reader, &mut tokio::io::sink()).await
                    })
                });
                held.push((who, writer, draining));
            }
            io::Result::Ok(held)
        }));
    }
    let mut held = Vec::new();
    for wave in connecting {
        held.extend(wave.await.map_err(io::Error::other)??);
    }
    let connected = started.elapsed();
    let counters = |node: &Node| {
        let c = node.counters.snapshot();
        [
            ("received", c.received),
            ("missed", c.missed),
            ("dead_nodes", c.dead_nodes),
            ("garbage", c.garbage),
            ("events_published", c.events_published),
            ("dropped", c.dropped),
        ]
    };
    let watcher = watching.await.map_err(io::Error::other)?.map_err(|err| {
        io::Error::other(format!(
            "{err}; storm node {:?}, other node {:?}",
            counters(&nodes[0]),
            counters(&nodes[1])
        ))
    })?;
    ensure(
        held.iter().all(|(who, _, _)| watcher.view.contains(who)),
        || "the watcher's view is not the storm".into(),
    )?;
    eprintln!(
        "{model}: {storm} clients connected in {connected:?}; the other node heard every arrival after {:?}",
        started.elapsed()
    );
    let departures = watcher
        .transcript
        .iter()
        .filter(|line| line.ends_with(" has left"))
        .count();
    ensure(departures == 0, || format!("{departures} false departures"))?;
    for node in &nodes {
        ensure(node.counters.snapshot().dead_nodes == 0, || {
            "a node was declared dead during the storm".into()
        })?;
    }
    // A heartbeat of the storm's node saying it has them all.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut largest = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let beat = tokio::time::timeout(left, futures_util::StreamExt::next(&mut beats))
            .await
            .map_err(|_| io::Error::other("no heartbeat counting the storm"))?
            .ok_or_else(|| io::Error::other("heartbeats ended"))?;
        largest = largest.max(beat.payload.len());
        let counted: serde_json::Value =
            serde_json::from_slice(&beat.payload).map_err(io::Error::other)?;
        if counted["clients"].as_u64() == Some(storm as u64) {
            eprintln!(
                "{model}: heartbeat with {storm} clients: {} bytes ({})",
                beat.payload.len(),
                String::from_utf8_lossy(&beat.payload)
            );
            break;
        }
    }
    ensure(largest <= 96, || format!("a heartbeat of {largest} bytes"))?;
    Ok(())
}

/// Clients in the storm: `CHAT_STORM` if set (the measurement in
/// ARCHITECTURE.md is the largest the file limit allows), else 1,000:
/// finding 3 was only ever shown at 9,000, so the default storm checks the
/// path (arrivals, heartbeat size, no false verdict), not the limit.
/// The largest storm run the quick way. Its clients need not read: its
/// arrivals fit in a loopback socket's default receive buffer (128 KiB)
/// with room to spare. And the four models' storms can run at once: two
/// descriptors a client, 16,000 in all, within a limit of 20,000. A larger
/// storm (`CHAT_STORM=9000`, finding 3's size) runs a model at a time.
const LARGEST_QUICK_STORM: usize = 2_000;

/// A larger storm's turn (see [`LARGEST_QUICK_STORM`]).
static LARGE_STORM_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

fn storm_size() -> usize {
    std::env::var("CHAT_STORM")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000)
}

/// The room's heartbeats as any NATS client sees them on the broker.
async fn heartbeats_on_the_wire(url: &str) -> io::Result<async_nats::Subscriber> {
    let nats = async_nats::connect(url).await.map_err(io::Error::other)?;
    nats.subscribe("chat.chat.heartbeat")
        .await
        .map_err(io::Error::other)
}
