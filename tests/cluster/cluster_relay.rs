//! A node cut off from its broker by the test kit's relay
//! (`chat_testkit::Relay`), a network partition without root: the other
//! node notices (it declares the silent node dead and tells its clients
//! they left), and once the partition heals the cut-off node reconnects
//! and its clients are heard again.
//!
//! The cut-off node itself is not asked to notice the partition: its NATS
//! client does so only after missed pings (`ping_interval` 5 s, two
//! outstanding: some 15 s), too slow for a test here; the relay resets its
//! stalled connection on heal, as a real partition that outlived the
//! client's patience would end.
//!
//! A node cut off from its broker also stops in a bounded time: its
//! backplane's tasks get `--shutdown-grace` to publish what is queued and
//! one second more to end, whatever broker call they are waiting on.
//!
//! Needs `nats-server` (2.9): without it these tests say so loudly and
//! pass, unless `CI` or `CHAT_REQUIRE_NATS` is set.

use crate::common;

use std::io;
use std::time::Duration;

use chat_server::harness::TestClient;
use chat_server::{Config, Model};
use chat_testkit::Relay;
use common::cluster::{test_cluster, wait_for, wait_until, Node, JOIN_TIMEOUT};
use common::nats::Broker;
use tokio::time::Instant;

for_each_model_at_once!(a_partitioned_node_is_declared_dead_and_heard_again_after_heal);

/// Reads `client`'s lines until `expected`, within [`JOIN_TIMEOUT`]; the
/// lines before it (membership news around the partition) are not what
/// this test is about.
async fn read_until(client: &mut TestClient, expected: &str) -> io::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut skipped = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.line_within(left).await {
            Ok(line) if line == expected => return Ok(()),
            Ok(line) => skipped.push(line),
            Err(err) => {
                return Err(io::Error::other(format!(
                    "{}: no {expected:?} ({err}); got {skipped:?}",
                    client.who
                )))
            }
        }
    }
}

async fn a_partitioned_node_is_declared_dead_and_heard_again_after_heal(
    model: Model,
) -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let relay = Relay::start(broker.addr())?;
    let cut = Node::start(model, &relay.nats_url())?;
    let other = Node::start(model, &broker.url())?;
    cut.joined(1).await?;
    other.joined(1).await?;
    let mut far = other.client().await?;
    let mut near = cut.client().await?;
    read_until(&mut far, &format!("{} has arrived", near.who)).await?;

    relay.partition();
    wait_for(&other.counters, |c| c.dead_nodes, 1, "dead nodes").await?;
    read_until(&mut far, &format!("{} has left", near.who)).await?;

    let accepted = relay.accepted();
    relay.heal();
    // The stalled connection is reset; the node's client reconnects.
    wait_until(
        &cut.counters,
        |c| c.connected,
        "reconnected",
        |_| relay.accepted() > accepted,
    )
    .await?;
    wait_until(&cut.counters, |c| c.connected, "connected", |now| now == 1).await?;
    // A line said after the return reaches the other node's client.
    near.send("back").await?;
    read_until(&mut far, &format!("{}: back", near.who)).await
}

/// What `Clustered::close` gives its tasks after `--shutdown-grace`
/// (`STOP_WITHIN` in src/cluster/mod.rs).
const STOP_WITHIN: Duration = Duration::from_secs(1);

/// A node cut off from its broker with a publish in flight stops within
/// `--shutdown-grace` plus [`STOP_WITHIN`] (and a margin for a loaded
/// machine), although its broker calls would wait `--cluster-ack-timeout`
/// (10 s here) for an answer that never comes. Before the bound, `close`
/// awaited the publisher until its acknowledgement timed out: some 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_stops_within_its_bound() -> io::Result<()> {
    let Some(broker) = Broker::start()? else {
        return Ok(());
    };
    let relay = Relay::start(broker.addr())?;
    let grace = Duration::from_millis(500);
    let mut cluster = test_cluster(&relay.nats_url());
    cluster.ack_timeout = Duration::from_secs(10);
    let mut config = Config::with_model(Model::Sharded);
    config.shutdown_grace = grace;
    let cut = Node::start_with(cluster, config)?;
    cut.joined(1).await?;
    let mut client = cut.client().await?;
    relay.partition();
    // Queued for the broker, which will never acknowledge it.
    client.send("into the void").await?;
    let started = Instant::now();
    tokio::task::block_in_place(|| cut.server.stop());
    let took = started.elapsed();
    let bound = grace + STOP_WITHIN + Duration::from_secs(2);
    eprintln!("a node cut off from its broker stopped in {took:?} (bound {bound:?})");
    if took > bound {
        return Err(io::Error::other(format!(
            "a cut-off node took {took:?} to stop, more than {bound:?}"
        )));
    }
    Ok(())
}
