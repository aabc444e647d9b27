//! `--history` across three nodes on a real `nats-server` with JetStream:
//! every node's history holds the room's lines (remote ones included, in
//! the order that node delivered them), a node that starts or restarts
//! fills its history from the room's stream before it greets anyone, and a
//! broker restart does not duplicate what a node's history holds.
//!
//! Without `nats-server` installed these tests say so loudly and pass;
//! with `CI` (or `CHAT_REQUIRE_NATS`) set they fail instead.

#![cfg(feature = "cluster")]

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{Config, Model};
use common::cluster::{test_cluster, Node};
use common::ensure;
use common::nats::Broker;

for_each_model!(
    history_holds_remote_lines,
    a_restarted_node_shows_the_history_from_the_stream,
    a_broker_restart_duplicates_nothing_in_history,
);

fn node(model: Model, url: &str, history: usize) -> io::Result<Node> {
    Node::start_with(
        test_cluster(url),
        Config::with_model(model).with(|c| c.history = history),
    )
}

async fn nodes(model: Model, url: &str, n: usize, history: usize) -> io::Result<Vec<Node>> {
    let nodes = (0..n)
        .map(|_| node(model, url, history))
        .collect::<io::Result<Vec<_>>>()?;
    for node in &nodes {
        node.joined(1).await?;
    }
    Ok(nodes)
}

/// Connects to `node` and reads the greeting and the history block.
async fn enter(node: &Node) -> io::Result<(TestClient, Vec<String>)> {
    let mut client = node.client().await?;
    let header = client.line().await?;
    let count = chat_wire::history_of(&header)
        .ok_or_else(|| io::Error::other(format!("expected a history header, got {header:?}")))?;
    let mut block = Vec::with_capacity(count);
    for _ in 0..count {
        block.push(client.line().await?);
    }
    client.expect(chat_wire::HISTORY_END).await?;
    Ok((client, block))
}

/// One client per node that reads until it sees a given line: when every
/// node's watcher has it, every node has delivered it (and, whatever the
/// model, appended it to its history first).
struct Watchers(Vec<TestClient>);

impl Watchers {
    async fn on(nodes: &[Node]) -> io::Result<Watchers> {
        let mut watchers = Vec::new();
        for node in nodes {
            watchers.push(enter(node).await?.0);
        }
        Ok(Watchers(watchers))
    }

    /// Sends `text` from `client` and waits until every watcher has it.
    async fn say(&mut self, client: &mut TestClient, text: &str) -> io::Result<String> {
        client.send(text).await?;
        let line = chat_wire::chat(&client.who, text);
        for watcher in &mut self.0 {
            // Arrivals come in between; nothing else does.
            loop {
                let heard = watcher.line().await?;
                if heard == line {
                    break;
                }
                ensure(heard.ends_with(" has arrived"), || {
                    format!("{}: waiting for {line:?}, heard {heard:?}", watcher.who)
                })?;
            }
        }
        Ok(line)
    }
}

async fn history_holds_remote_lines(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let nodes = nodes(model, &broker.url(), 3, 10).await?;
    let mut watchers = Watchers::on(&nodes).await?;
    let (mut ann, _) = enter(&nodes[0]).await?;
    let (mut bob, _) = enter(&nodes[1]).await?;
    let one = watchers.say(&mut ann, "one").await?;
    let two = watchers.say(&mut bob, "two").await?;
    for (index, node) in nodes.iter().enumerate() {
        let (_newcomer, block) = enter(node).await?;
        ensure(block == [one.clone(), two.clone()], || {
            format!("{model}: node {index} showed {block:?}")
        })?;
    }
    Ok(())
}

async fn a_restarted_node_shows_the_history_from_the_stream(model: Model) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let mut nodes = nodes(model, &broker.url(), 3, 3).await?;
    let mut watchers = Watchers::on(&nodes[..2]).await?;
    let (mut ann, _) = enter(&nodes[0]).await?;
    let mut said = Vec::new();
    for text in ["one", "two", "three", "four", "five"] {
        said.push(watchers.say(&mut ann, text).await?);
    }
    // Node 2 restarts: a new process, a new node id, an empty history. Its
    // first newcomer is greeted only after the fill.
    let restarted = node(model, &broker.url(), 3)?;
    drop(std::mem::replace(&mut nodes[2], restarted));
    let (carol, block) = enter(&nodes[2]).await?;
    ensure(block[..] == said[2..], || {
        format!(
            "{model}: the restarted node showed {block:?}, expected {:?}",
            &said[2..]
        )
    })?;
    // It reads the stream on from there: the next line once, in history too.
    watchers.0.push(carol);
    let six = watchers.say(&mut ann, "six").await?;
    let (_late, block) = enter(&nodes[2]).await?;
    ensure(block[..] == [said[3].clone(), said[4].clone(), six], || {
        format!("{model}: then {block:?}")
    })?;
    Ok(())
}

async fn a_broker_restart_duplicates_nothing_in_history(model: Model) -> io::Result<()> {
    let Some(mut broker) = Broker::start()? else {
        return Ok(());
    };
    let nodes = nodes(model, &broker.url(), 3, 100).await?;
    let mut watchers = Watchers::on(&nodes).await?;
    let (mut ann, _) = enter(&nodes[0]).await?;
    let mut said = Vec::new();
    for n in 0..5 {
        said.push(watchers.say(&mut ann, &format!("before {n}")).await?);
    }
    tokio::task::block_in_place(|| -> io::Result<()> {
        broker.stop("KILL")?;
        std::thread::sleep(Duration::from_millis(300));
        broker.run()
    })?;
    for n in 0..3 {
        said.push(watchers.say(&mut ann, &format!("after {n}")).await?);
    }
    for (index, node) in nodes.iter().enumerate() {
        let (_newcomer, block) = enter(node).await?;
        ensure(block == said, || {
            format!("{model}: node {index} showed {block:?}")
        })?;
    }
    Ok(())
}
