//! `--names` and `--announce-present` across nodes (`--cluster`), through
//! a real `nats-server` 2.9 with JetStream: a name held on one node is
//! taken on every node, one of many concurrent claims on three nodes wins,
//! a killed node's names are freed, a name just freed goes to exactly one
//! of three nodes asking at once on a 3-server JetStream cluster (a
//! replicated bucket), a newcomer's `present` line lists every node's
//! clients, and while the broker is away new names are refused with a
//! clear line and the room chats on.
//!
//! Without `nats-server` installed these tests say so loudly and pass;
//! with `CI` (or `CHAT_REQUIRE_NATS`) set they fail instead.

use crate::common;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{ClusterConfig, Config, Model};
use chat_testkit::BrokerCluster;
use chat_wire::{present_of, NAMES_UNAVAILABLE, NAME_PROMPT, NAME_TAKEN};
use common::cluster::{test_cluster, wait_until, Node, JOIN_TIMEOUT};
use common::ensure;
use common::nats::Broker;
use common::process::{ServerProcess, Signal};
use tokio::sync::Barrier;
use tokio::time::Instant;

for_each_model!(
    a_name_is_taken_on_every_node,
    exactly_one_of_many_nodes_wins_a_name,
    present_lists_every_node,
    broker_away_refuses_new_names_only,
);

/// `n` nodes under `--names`, each in the room (its consumer open) before
/// it returns.
async fn nodes(model: Model, url: &str, n: usize, present: bool) -> io::Result<Vec<Node>> {
    let nodes = (0..n)
        .map(|_| named_node(model, url, present))
        .collect::<io::Result<Vec<_>>>()?;
    for node in &nodes {
        node.joined(1).await?;
    }
    Ok(nodes)
}

/// The short timers of the other cluster tests, but a longer bound on each
/// broker call: the room's first named joins make the names bucket, and a
/// file store just after other tests' brokers stopped can take more than a
/// second to create it (a bound, not a sleep: calls that succeed return at
/// once, and while the broker is away the refusal is immediate).
fn names_cluster(url: &str) -> ClusterConfig {
    test_cluster(url).with(|c| c.ack_timeout = Duration::from_secs(3))
}

/// A node under `--names` (and `--announce-present` if `present`).
fn named_node(model: Model, url: &str, present: bool) -> io::Result<Node> {
    Node::start_with(
        names_cluster(url),
        Config::with_model(model).with(|c| {
            c.names = true;
            c.announce_present = present;
        }),
    )
}

async fn unnamed(addr: SocketAddr) -> io::Result<TestClient> {
    let mut client = TestClient::connect_raw(addr).await?;
    client.expect(NAME_PROMPT).await?;
    Ok(client)
}

/// Asks for `name`; `Ok(answer)` is the server's first line in reply.
async fn ask(client: &mut TestClient, name: &str) -> io::Result<String> {
    client.send(name).await?;
    let answer = client.line().await?;
    if answer == format!("You are {name}") {
        client.who = name.to_string();
    }
    Ok(answer)
}

/// Connects as `name`, which must be free.
async fn join(addr: SocketAddr, name: &str) -> io::Result<TestClient> {
    let mut client = unnamed(addr).await?;
    let answer = ask(&mut client, name).await?;
    ensure(answer == format!("You are {name}"), || {
        format!("asked for {name}, got {answer:?}")
    })?;
    Ok(client)
}

/// Connects as `name` to a node that may not have reached its broker yet:
/// asks again while names are unavailable, as a person would.
async fn join_when_ready(addr: SocketAddr, name: &str) -> io::Result<TestClient> {
    let mut client = unnamed(addr).await?;
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let answer = ask(&mut client, name).await?;
        if answer == format!("You are {name}") {
            return Ok(client);
        }
        ensure(
            answer == NAMES_UNAVAILABLE && Instant::now() < deadline,
            || format!("asked for {name}, got {answer:?}"),
        )?;
        // Nothing to read meanwhile: the node says nothing when it connects.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until `wanted`, skipping other lines (each read bounded).
async fn until(client: &mut TestClient, wanted: &str) -> io::Result<()> {
    until_all(client, &[wanted]).await
}

/// Reads until every one of `wanted` has come, in any order.
async fn until_all(client: &mut TestClient, wanted: &[&str]) -> io::Result<()> {
    let mut missing: Vec<&str> = wanted.to_vec();
    while !missing.is_empty() {
        let line = client.line().await?;
        missing.retain(|wanted| *wanted != line);
    }
    Ok(())
}

/// Runs `arrive` and waits until `other` has received it from the stream.
async fn crossed<T>(
    other: &Node,
    arrive: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let before = other.counters.snapshot().received;
    let arrived = arrive.await?;
    wait_until(
        &other.counters,
        |c| c.received,
        "batches received",
        |received| received > before,
    )
    .await?;
    Ok(arrived)
}

/// ann on node 1 holds her name on node 2 too; once node 2 has heard her
/// leave, the name is free there.
async fn a_name_is_taken_on_every_node(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let nodes = nodes(model, &broker.url(), 2, false).await?;
    // Crossed before node 2's client enters, or it would hear of ann's
    // arrival after its own (the backplane takes a broker round trip).
    let mut ann = crossed(&nodes[1], join(nodes[0].addr(), "ann")).await?;
    let mut other = unnamed(nodes[1].addr()).await?;
    let answer = ask(&mut other, "ann").await?;
    ensure(answer == NAME_TAKEN, || format!("got {answer:?}"))?;
    // Taken, not broken: another name works at once.
    let answer = ask(&mut other, "ann2").await?;
    ensure(answer == "You are ann2", || format!("got {answer:?}"))?;
    ann.expect("ann2 has arrived").await?;
    ann.finish().await?;
    ann.lines_until_closed().await?;
    other.expect("ann has left").await?;
    let mut heir = join(nodes[1].addr(), "ann").await?;
    other.expect("ann has arrived").await?;
    heir.send("mine now").await?;
    heir.expect("ann: mine now").await?;
    other.expect("ann: mine now").await
}

/// 8 clients over 3 nodes ask for one name at the same instant: exactly
/// one wins, the others are told it is taken and choose again; once the
/// winner's departure has reached another node, the name is free there.
async fn exactly_one_of_many_nodes_wins_a_name(model: Model) -> io::Result<()> {
    const CONTENDERS: usize = 8;
    const ROUNDS: usize = 5;
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let nodes = nodes(model, &broker.url(), 3, false).await?;
    // The room's first named joins make the names bucket; under a loaded
    // machine that can outlast one broker call, and the contenders would
    // be told names are unavailable. One named client per node first, as
    // people arriving before the race would (they stay, silent).
    let mut early = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        early.push(join_when_ready(node.addr(), &format!("early{i}")).await?);
    }
    for round in 0..ROUNDS {
        let name = format!("prize{round}");
        let start = Arc::new(Barrier::new(CONTENDERS));
        let mut tasks = Vec::new();
        for i in 0..CONTENDERS {
            let (start, name) = (Arc::clone(&start), name.clone());
            let addr = nodes[i % nodes.len()].addr();
            tasks.push(tokio::spawn(async move {
                let mut client = unnamed(addr).await?;
                start.wait().await;
                let answer = ask(&mut client, &name).await?;
                Ok::<_, io::Error>((i, client, answer))
            }));
        }
        let mut winner = None;
        let mut losers = Vec::new();
        for task in tasks {
            let (i, client, answer) = task.await.map_err(io::Error::other)??;
            if answer == format!("You are {name}") {
                ensure(winner.is_none(), || {
                    format!("{model}, round {round}: two clients won {name}")
                })?;
                winner = Some((i, client));
            } else {
                ensure(answer == NAME_TAKEN, || {
                    format!("{model}, round {round}: got {answer:?}")
                })?;
                losers.push((i, client));
            }
        }
        let (won_at, mut winner) = winner
            .ok_or_else(|| io::Error::other(format!("{model}: no winner in round {round}")))?;
        let mut room = Vec::new();
        for (i, mut client) in losers {
            let other = format!("{name}.{i}");
            let answer = ask(&mut client, &other).await?;
            ensure(answer == format!("You are {other}"), || {
                format!("{model}, round {round}: {other} got {answer:?}")
            })?;
            room.push((i, client));
        }
        // A loser on another node than the winner's waits for the
        // departure; then a newcomer on that node takes the name.
        let heir_node = (won_at + 1) % nodes.len();
        winner.finish().await?;
        winner.lines_until_closed().await?;
        let (_, witness) = room
            .iter_mut()
            .find(|(i, _)| i % nodes.len() == heir_node)
            .ok_or_else(|| io::Error::other("no client on the heir's node"))?;
        until(witness, &format!("{name} has left")).await?;
        let heir = join(nodes[heir_node].addr(), &name).await?;
        for (_, mut client) in room.into_iter().chain([(0, heir)]) {
            client.finish().await?;
            client.lines_until_closed().await?;
        }
    }
    Ok(())
}

/// A newcomer's `present` line lists its own node's clients and, once
/// their arrivals have crossed, the other node's; a departure that has
/// crossed is no longer listed. With and without `--names`.
async fn present_lists_every_node(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    // Named clients.
    let nodes = nodes(model, &broker.url(), 2, true).await?;
    let mut bob = crossed(&nodes[0], join(nodes[1].addr(), "bob")).await?;
    bob.expect("present (0): nobody").await?;
    let mut ann = join(nodes[0].addr(), "ann").await?;
    ann.expect("present (1): bob").await?;
    bob.expect("ann has arrived").await?;
    let mut cat = join(nodes[1].addr(), "cat").await?;
    let present = cat.line().await?;
    let mut listed = present_of(&present).unwrap_or_default();
    listed.sort_unstable();
    ensure(listed == ["ann", "bob"], || format!("cat got {present:?}"))?;
    ann.expect("cat has arrived").await?;
    bob.expect("cat has arrived").await?;
    ann.finish().await?;
    ann.lines_until_closed().await?;
    bob.expect("ann has left").await?;
    cat.expect("ann has left").await?;
    let mut dan = join(nodes[1].addr(), "dan").await?;
    let present = dan.line().await?;
    let mut listed = present_of(&present).unwrap_or_default();
    listed.sort_unstable();
    ensure(listed == ["bob", "cat"], || format!("dan got {present:?}"))?;
    drop(nodes);

    // Addresses, on fresh nodes of the same broker (another room's worth
    // of clients would be listed otherwise: use a room of their own).
    let room = |url: &str| -> io::Result<Node> {
        Node::start_with(
            names_cluster(url).with(|c| c.room = "addresses".into()),
            Config::with_model(model).with(|c| c.announce_present = true),
        )
    };
    let nodes = [room(&broker.url())?, room(&broker.url())?];
    for node in &nodes {
        node.joined(1).await?;
    }
    let mut b = crossed(&nodes[0], TestClient::connect(nodes[1].addr())).await?;
    b.expect("present (0): nobody").await?;
    let mut a = TestClient::connect(nodes[0].addr()).await?;
    a.expect(&format!("present (1): {}", b.who)).await?;
    b.expect(&format!("{} has arrived", a.who)).await?;
    let mut c = TestClient::connect(nodes[1].addr()).await?;
    let present = c.line().await?;
    let mut listed = present_of(&present).unwrap_or_default();
    listed.sort_unstable();
    let mut wanted = [a.who.as_str(), b.who.as_str()];
    wanted.sort_unstable();
    ensure(listed == wanted, || format!("{} got {present:?}", c.who))?;
    c.send("hi").await?;
    c.expect(&format!("{}: hi", c.who)).await
}

/// The broker is killed: a newcomer asking for a name is told names are
/// unavailable (and may try again), clients already in the room chat on;
/// once the broker is back the newcomer gets its name.
async fn broker_away_refuses_new_names_only(model: Model) -> io::Result<()> {
    let Some(mut broker) = Broker::start()? else {
        return Ok(());
    };
    let nodes = nodes(model, &broker.url(), 2, false).await?;
    let mut ann = crossed(&nodes[1], join(nodes[0].addr(), "ann")).await?;
    let mut dan = crossed(&nodes[1], join(nodes[0].addr(), "dan")).await?;
    ann.expect("dan has arrived").await?;
    let mut bob = join(nodes[1].addr(), "bob").await?;
    ann.expect("bob has arrived").await?;
    dan.expect("bob has arrived").await?;
    tokio::task::block_in_place(|| broker.stop("KILL"))?;
    wait_until(
        &nodes[0].counters,
        |c| c.connected,
        "disconnected from the broker",
        |connected| connected == 0,
    )
    .await?;
    let mut newcomer = unnamed(nodes[0].addr()).await?;
    let answer = ask(&mut newcomer, "cat").await?;
    ensure(answer == NAMES_UNAVAILABLE, || format!("got {answer:?}"))?;
    ann.send("still here").await?;
    ann.expect("ann: still here").await?;
    dan.expect("ann: still here").await?;
    bob.send("me too").await?;
    bob.expect("bob: me too").await?;
    tokio::task::block_in_place(|| broker.run())?;
    wait_until(
        &nodes[0].counters,
        |c| c.connected,
        "connected to the broker",
        |connected| connected == 1,
    )
    .await?;
    // Connected is not yet answered: the client may be told to try again
    // while the broker's JetStream settles, as any client would be.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let answer = ask(&mut newcomer, "cat").await?;
        if answer == "You are cat" {
            break;
        }
        ensure(
            answer == NAMES_UNAVAILABLE && Instant::now() < deadline,
            || format!("got {answer:?}"),
        )?;
    }
    // What was said meanwhile crosses once the broker is back.
    until_all(&mut bob, &["ann: still here", "cat has arrived"]).await?;
    until_all(&mut ann, &["bob: me too", "cat has arrived"]).await
}

/// kill -9 of a node whose client holds `bob`: once the other node has
/// announced bob's departure, `bob` can be taken there (real processes,
/// default timers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_names_are_freed() -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let url = broker.url();
    let nodes = (0..2)
        .map(|_| ServerProcess::start(&["--cluster", &url, "--names"]))
        .collect::<io::Result<Vec<_>>>()?;
    let addrs = nodes
        .iter()
        .map(|node| node.addr.parse::<SocketAddr>().map_err(io::Error::other))
        .collect::<io::Result<Vec<_>>>()?;
    let mut watcher = join_when_ready(addrs[0], "watcher").await?;
    // Until both nodes are in the room a client of node 1 may go unheard:
    // probes talk until the watcher hears one.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    for attempt in 0.. {
        let probe_name = format!("probe{attempt}");
        let mut probe = join_when_ready(addrs[1], &probe_name).await?;
        probe.send("probe").await?;
        let heard = format!("{probe_name}: probe");
        let until = Instant::now() + Duration::from_millis(300);
        let mut met = false;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match watcher.line_within(left).await {
                Ok(line) if line == heard => {
                    met = true;
                    break;
                }
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::TimedOut => break,
                Err(err) => return Err(err),
            }
        }
        probe.finish().await?;
        if met {
            break;
        }
        ensure(Instant::now() < deadline, || "the nodes never met".into())?;
    }
    let mut bob = join(addrs[1], "bob").await?;
    until(&mut watcher, "bob has arrived").await?;
    let mut impostor = unnamed(addrs[0]).await?;
    let answer = ask(&mut impostor, "bob").await?;
    ensure(answer == NAME_TAKEN, || format!("got {answer:?}"))?;
    nodes[1].process.signal(Signal::SIGKILL)?;
    until(&mut watcher, "bob has left").await?;
    let answer = ask(&mut impostor, "bob").await?;
    ensure(answer == "You are bob", || format!("got {answer:?}"))?;
    watcher.expect("bob has arrived").await?;
    bob.lines_until_closed().await?;
    Ok(())
}

/// A whole room that died (its only node killed with SIGKILL) leaves its
/// names in the bucket, held by a node that a node started afterwards has
/// never heard of: the first request for one is refused (that node might
/// have just started), and one made more than `--cluster-node-timeout`
/// later takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_a_room_that_died_are_taken_over() -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let url = broker.url();
    let old = ServerProcess::start(&["--cluster", &url, "--names"])?;
    let old_addr = old.addr.parse::<SocketAddr>().map_err(io::Error::other)?;
    let mut zed = join_when_ready(old_addr, "zed").await?;
    old.process.signal(Signal::SIGKILL)?;
    zed.lines_until_closed().await?;
    let new = named_node(Model::Sharded, &url, false)?;
    new.joined(1).await?;
    let mut heir = unnamed(new.addr()).await?;
    let answer = ask(&mut heir, "zed").await?;
    ensure(answer == NAME_TAKEN, || format!("first ask: {answer:?}"))?;
    // The node timeout is 1 s here: ask until it is free, within a bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = Instant::now();
    loop {
        let answer = ask(&mut heir, "zed").await?;
        if answer == "You are zed" {
            break;
        }
        ensure(answer == NAME_TAKEN && Instant::now() < deadline, || {
            format!("got {answer:?}")
        })?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = started.elapsed();
    ensure(waited >= Duration::from_secs(1), || {
        format!("taken over after {waited:?}, before the node timeout")
    })?;
    drop(old);
    Ok(())
}

/// On a 3-server JetStream cluster (the names bucket with three replicas),
/// a name is freed and one client on each of three nodes asks for it at
/// the same instant: exactly one gets it, the others are told it is taken.
/// Freed twice over: by its holder leaving (the key deleted: the claims
/// write over its delete marker), repeated with a fresh name held on
/// another node each time; and by its holder's death, as names of a room
/// whose nodes all died (keys naming a node none of these ever heard of,
/// written by the test): each node is refused once, and asked again more
/// than `--cluster-node-timeout` later they take the key over. nats-server
/// before 2.9.21 checks a replicated key's revision only on the stream's
/// leader before the write is replicated (nats-server #4320); with only
/// that check, two or three clients got one name in 39 of 100 trials of
/// the first kind and 13 of 40 of the second, and every run failed
/// (docs/cluster.md, names, "Exclusive writes"). One model: the bucket's
/// part is the same for all, and the models' own name checks race in
/// `exactly_one_of_many_nodes_wins_a_name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_name_goes_to_one_of_three_nodes_on_a_replicated_bucket() -> io::Result<()> {
    const TRIALS: usize = 20;
    let Some(brokers) = tokio::task::block_in_place(BrokerCluster::start)? else {
        return Ok(());
    };
    let nodes = (0..3)
        .map(|_| named_node(Model::Sharded, &brokers.urls(), false))
        .collect::<io::Result<Vec<_>>>()?;
    for node in &nodes {
        node.joined(1).await?;
    }
    // One named client a node: the first makes the bucket, and each hears
    // the departures of the others' clients.
    let mut witnesses = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        witnesses.push(join_when_ready(node.addr(), &format!("witness{i}")).await?);
    }
    // Replicated is what the race needs. Three copies is the default, but
    // a node that opens the bucket as the cluster forms may see two
    // servers, or be refused a third copy, and make two (seen once in a
    // dozen runs of this binary); either way the broker checks a write's
    // revision on the leader only.
    let replicas = bucket_replicas(&brokers).await?;
    ensure(replicas >= 2, || {
        format!("the names bucket has {replicas} replica, not 2 or 3")
    })?;
    for trial in 0..TRIALS {
        let name = format!("prize{trial}");
        let held_at = trial % nodes.len();
        let mut holder = join_when_ready(nodes[held_at].addr(), &name)
            .await
            .map_err(during(&format!("trial {trial}: the holder's join")))?;
        let contenders = contenders(&nodes)
            .await
            .map_err(during(&format!("trial {trial}: a contender's connect")))?;
        holder.finish().await?;
        holder.lines_until_closed().await?;
        // The holder's node deletes the key before it publishes the
        // departure: a client of another node that heard it finds it free.
        let witness = &mut witnesses[(held_at + 1) % nodes.len()];
        until(witness, &format!("{name} has left"))
            .await
            .map_err(during(&format!("trial {trial}: the witness")))?;
        let answers = race(contenders, &name)
            .await
            .map_err(during(&format!("trial {trial}: the race")))?;
        one_winner(&answers, &name, &nodes).map_err(during(&format!("trial {trial}")))?;
        for (mut client, answer) in answers {
            ensure(
                answer == NAME_TAKEN || answer == format!("You are {name}"),
                || format!("trial {trial}: got {answer:?}"),
            )?;
            client.finish().await?;
        }
    }

    // Names whose holder died unheard of.
    let names: Vec<String> = (0..GHOST_NAMES).map(|i| format!("ghost{i}")).collect();
    let bucket = names_bucket(&brokers).await?;
    for name in &names {
        bucket
            .put(hex(name), "a node that died unheard of".into())
            .await
            .map_err(io::Error::other)?;
    }
    for node in &nodes {
        let mut client = unnamed(node.addr()).await?;
        for name in &names {
            let answer = ask(&mut client, name)
                .await
                .map_err(during(&format!("first ask for {name}")))?;
            ensure(answer == NAME_TAKEN, || {
                format!("first ask for {name}: {answer:?}")
            })?;
        }
    }
    // The rule under test, not a synchronisation: a node takes such a key
    // over once it has seen it unchanged for longer than the node timeout.
    tokio::time::sleep(names_cluster("").node_timeout + Duration::from_millis(200)).await;
    for name in &names {
        let contenders = contenders(&nodes)
            .await
            .map_err(during(&format!("{name}: a contender's connect")))?;
        let answers = race(contenders, name)
            .await
            .map_err(during(&format!("the race for {name}")))?;
        one_winner(&answers, name, &nodes)?;
    }
    Ok(())
}

/// Exactly one of a race's `answers` (the client, what it was told) is
/// `You are NAME`; the failure says every answer and each node's verdicts.
fn one_winner(answers: &[(TestClient, String)], name: &str, nodes: &[Node]) -> io::Result<()> {
    let won = format!("You are {name}");
    let winners = answers.iter().filter(|(_, answer)| *answer == won).count();
    ensure(winners == 1, || {
        let answers: Vec<_> = answers.iter().map(|(_, answer)| answer).collect();
        format!(
            "{winners} clients got {name}: {answers:?}; {}",
            verdicts(nodes)
        )
    })
}

/// How many names of dead holders [`a_freed_name_goes_to_one_of_three_nodes_on_a_replicated_bucket`]
/// races for.
const GHOST_NAMES: usize = 8;

/// A name's key in the bucket, as the server writes it: the name in hex.
fn hex(name: &str) -> String {
    name.bytes().map(|byte| format!("{byte:02x}")).collect()
}

/// The names bucket (room `chat`), opened by a client of its own.
async fn names_bucket(brokers: &BrokerCluster) -> io::Result<async_nats::jetstream::kv::Store> {
    let client = async_nats::connect(brokers.url(0))
        .await
        .map_err(io::Error::other)?;
    async_nats::jetstream::new(client)
        .get_key_value("chat_names_chat")
        .await
        .map_err(io::Error::other)
}

/// Says which step of a long test an error comes from.
fn during(step: &str) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |err| io::Error::new(err.kind(), format!("{step}: {err}"))
}

/// How many nodes each node declared dead: none, unless a node was judged
/// dead while alive (a stalled machine), which also lets its names be taken.
fn verdicts(nodes: &[Node]) -> String {
    let dead: Vec<u64> = nodes
        .iter()
        .map(|node| node.counters.snapshot().dead_nodes)
        .collect();
    format!("nodes declared dead, by node: {dead:?}")
}

/// Each client asks for `name` at the same instant (and again while told
/// names are unavailable: a broker call that outlasted its bound on a
/// loaded machine): the clients and their last answers.
async fn race(clients: Vec<TestClient>, name: &str) -> io::Result<Vec<(TestClient, String)>> {
    let start = Arc::new(Barrier::new(clients.len()));
    let asks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (start, name) = (Arc::clone(&start), name.to_string());
            tokio::spawn(async move {
                start.wait().await;
                let deadline = Instant::now() + JOIN_TIMEOUT;
                loop {
                    let answer = ask(&mut client, &name).await?;
                    if answer != NAMES_UNAVAILABLE || Instant::now() >= deadline {
                        return Ok::<_, io::Error>((client, answer));
                    }
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for asked in asks {
        answers.push(asked.await.map_err(io::Error::other)??);
    }
    Ok(answers)
}

/// How many replicas the names bucket's stream was made with (read when
/// the bucket is opened).
async fn bucket_replicas(brokers: &BrokerCluster) -> io::Result<usize> {
    let bucket = names_bucket(brokers).await?;
    Ok(bucket.stream.cached_info().config.num_replicas)
}

/// One unnamed client on each of `nodes`, for a race.
async fn contenders(nodes: &[Node]) -> io::Result<Vec<TestClient>> {
    let mut contenders = Vec::with_capacity(nodes.len());
    for node in nodes {
        contenders.push(unnamed(node.addr()).await?);
    }
    Ok(contenders)
}

/// A measurement, not a check (`#[ignore]`d; `cargo test --test cluster --
/// --ignored --nocapture cluster_names::what_a_claim_costs`): on one broker
/// and on a 3-server JetStream cluster (names bucket with 1 and 3
/// replicas), two nodes; a client of node 1 joins under a fresh name and
/// leaves, [`COST_JOINS`] times one after another, then the same names
/// again (each key now a delete marker, written over at its revision).
/// Printed per kind: the claim (name sent until `You are NAME`) and the
/// leave (connection closed until a client of node 2 hears `X has left`:
/// the delete, then the departure crossing). Then a storm: [`STORM_CLIENTS`]
/// clients spread over the nodes, each joining and leaving under a name of
/// its own [`STORM_ROUNDS`] times at once; printed, how many of those
/// claims of a free name were refused (every pass of the claim lost to
/// other names' writes) and the claims' latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints claim and leave latencies"]
async fn what_a_claim_costs() -> io::Result<()> {
    for replicated in [false, true] {
        let (single, cluster);
        let url = if replicated {
            let Some(brokers) = tokio::task::block_in_place(BrokerCluster::start)? else {
                return Ok(());
            };
            cluster = brokers;
            cluster.urls()
        } else {
            let Some(broker) = Broker::start()? else {
                return Ok(());
            };
            single = broker;
            single.url()
        };
        let nodes = nodes(Model::Sharded, &url, 2, false).await?;
        let mut witness = join_when_ready(nodes[1].addr(), "witness").await?;
        let kind = if replicated {
            "R3, 3 servers"
        } else {
            "R1, 1 server"
        };
        for round in ["fresh name", "freed name (delete marker)"] {
            let (mut claims, mut leaves) = (Vec::new(), Vec::new());
            for i in 0..COST_JOINS {
                let name = format!("cost{i}");
                let mut client = unnamed(nodes[0].addr()).await?;
                let asked = Instant::now();
                let answer = ask(&mut client, &name).await?;
                claims.push(asked.elapsed());
                ensure(answer == format!("You are {name}"), || {
                    format!("{name}: {answer:?}")
                })?;
                let left = Instant::now();
                client.finish().await?;
                client.lines_until_closed().await?;
                until(&mut witness, &format!("{name} has left")).await?;
                leaves.push(left.elapsed());
            }
            println!("{kind}, {round}: claim {}", percentiles(&mut claims));
            println!(
                "{kind}, {round}: leave until heard {}",
                percentiles(&mut leaves)
            );
        }
        let addrs: Vec<SocketAddr> = nodes.iter().map(Node::addr).collect();
        let storm: Vec<_> = (0..STORM_CLIENTS)
            .map(|i| {
                let addr = addrs[i % addrs.len()];
                tokio::spawn(async move {
                    let name = format!("storm{i}");
                    let (mut refused, mut claims) = (0, Vec::new());
                    for _ in 0..STORM_ROUNDS {
                        let mut client = unnamed(addr).await?;
                        let asked = Instant::now();
                        let answer = ask(&mut client, &name).await?;
                        claims.push(asked.elapsed());
                        if answer != format!("You are {name}") {
                            refused += 1;
                        }
                        client.finish().await?;
                        client.lines_until_closed().await?;
                    }
                    Ok::<_, io::Error>((refused, claims))
                })
            })
            .collect();
        let (mut refused, mut claims) = (0, Vec::new());
        for client in storm {
            let (more_refused, more_claims) = client.await.map_err(io::Error::other)??;
            refused += more_refused;
            claims.extend(more_claims);
        }
        println!(
            "{kind}, storm of {STORM_CLIENTS} clients x {STORM_ROUNDS}: {refused} of {} claims refused; claim {}",
            claims.len(),
            percentiles(&mut claims)
        );
    }
    Ok(())
}

/// Joins of each kind in [`what_a_claim_costs`].
const COST_JOINS: usize = 200;
/// Clients of [`what_a_claim_costs`]'s storm, and the joins of each.
const STORM_CLIENTS: usize = 30;
const STORM_ROUNDS: usize = 20;

/// p50 / p90 / p99 / max of `times`, in µs.
fn percentiles(times: &mut [Duration]) -> String {
    times.sort_unstable();
    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).map_or(0, |time| time.as_micros())
    };
    format!(
        "p50 {} / p90 {} / p99 {} / max {} µs",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}
