//! The test kit's brokers do what the fault-tolerance tests rely on: a
//! 3-server JetStream cluster whose replicated stream survives the kill of
//! its leader, whose servers come back on their store or an empty one and
//! catch up, and a single broker that comes back on an empty store.
//!
//! Needs `nats-server` (2.9): without it these tests say so loudly and
//! pass, unless `CI` or `CHAT_REQUIRE_NATS` is set.

use std::io;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use chat_testkit::nats::Broker;
use chat_testkit::nats_cluster::{CLUSTER_SIZE, LEADER_TIMEOUT};
use chat_testkit::{ensure, BrokerCluster};
use tokio::task::block_in_place;

const STREAM: &str = "KIT";

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

/// Creates the stream [`STREAM`] on `kit.>` with `replicas` copies.
async fn create_kit_stream(js: &jetstream::Context, replicas: usize) -> io::Result<()> {
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["kit.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map(drop)
    .map_err(other)
}

/// How long a publish waits for its ack before it is sent again: short,
/// because one sent to a leader as it is killed is never answered, and the
/// client's 5 s default made the test wait up to 5 s past the election.
const ACK_WAIT: Duration = Duration::from_secs(1);

/// Publishes `ids` to the stream, each with its message id so that a
/// publish retried after a lost ack is stored once; retries each until
/// acknowledged, within [`LEADER_TIMEOUT`] (an election in between).
async fn publish(js: &jetstream::Context, ids: std::ops::Range<u32>) -> io::Result<()> {
    let mut js = js.clone();
    js.set_timeout(ACK_WAIT);
    for id in ids {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            let message = PublishMessage::build()
                .payload(format!("message {id}").into())
                .message_id(id.to_string());
            let acked = match js.send_publish("kit.test", message).await {
                Ok(ack) => ack.await.map(drop).map_err(other),
                Err(err) => Err(other(err)),
            };
            match acked {
                Ok(()) => break,
                Err(err) if Instant::now() >= deadline => {
                    return Err(other(format!("message {id} never acknowledged: {err}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}

/// A started cluster as the tests expect it, with the stream [`STREAM`]
/// at three replicas holding messages `0..messages`.
async fn cluster_with_stream(
    messages: u32,
) -> io::Result<Option<(BrokerCluster, jetstream::Context)>> {
    let Some(cluster) = block_in_place(BrokerCluster::start)? else {
        return Ok(None);
    };
    ensure(cluster.urls().split(',').count() == CLUSTER_SIZE, || {
        format!("urls {}", cluster.urls())
    })?;
    ensure(cluster.url_list().join(",") == cluster.urls(), || {
        "url_list".into()
    })?;
    ensure(block_in_place(|| cluster.meta_leader()).is_some(), || {
        "no meta leader after start".into()
    })?;
    let client = async_nats::connect(cluster.url_list())
        .await
        .map_err(other)?;
    let js = jetstream::new(client);
    create_kit_stream(&js, 3).await?;
    publish(&js, 0..messages).await?;
    Ok(Some((cluster, js)))
}

/// Ten more messages (`from..from + 10`), then every server holds them all:
/// the cluster works on after whatever the test did to it.
async fn all_servers_take_more(
    cluster: &BrokerCluster,
    js: &jetstream::Context,
    from: u32,
) -> io::Result<()> {
    publish(js, from..from + 10).await?;
    for i in 0..CLUSTER_SIZE {
        block_in_place(|| cluster.wait_for_stream_messages(i, STREAM, u64::from(from) + 10))?;
    }
    Ok(())
}

// The kill and the store loss are two tests, each on a cluster of its
// own, so that they run at once: the kill waits for nats-server's Raft
// election (4-9 s) and each restart for the server to catch up (about
// 2.7 s), which one after the other made 11-14 s.

/// The stream's leader killed: the stream takes writes again once the
/// others elect a leader, loses none, and the killed server comes back on
/// its store and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_survives_its_leaders_kill() -> io::Result<()> {
    let Some((mut cluster, js)) = cluster_with_stream(50).await? else {
        return Ok(());
    };
    let leader = block_in_place(|| cluster.wait_for_stream_leader(STREAM))?;
    block_in_place(|| cluster.kill(leader))?;
    ensure(!cluster.is_running(leader), || "still running".into())?;
    publish(&js, 50..100).await?;
    let new_leader = block_in_place(|| cluster.wait_for_stream_leader(STREAM))?;
    ensure(new_leader != leader, || {
        format!("server {leader} was killed and still leads")
    })?;
    let mut info = js.get_stream(STREAM).await.map_err(other)?;
    let messages = info.info().await.map_err(other)?.state.messages;
    ensure(messages == 100, || format!("{messages} messages of 100"))?;

    // Back on its store: it catches up from the others.
    block_in_place(|| cluster.restart(leader))?;
    block_in_place(|| cluster.wait_for_stream_messages(leader, STREAM, 100))?;
    all_servers_take_more(&cluster, &js, 100).await
}

/// A follower restarted on an empty store, as a
/// broker in a container without a volume comes back: it gets the stream
/// and its messages from the others, on the same ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_store_catches_up() -> io::Result<()> {
    let Some((mut cluster, js)) = cluster_with_stream(100).await? else {
        return Ok(());
    };
    // Neither the stream's leader nor the meta group's: the kill of
    // either waits for an election (4-9 s), which is the other test's.
    let leader = block_in_place(|| cluster.wait_for_stream_leader(STREAM))?;
    let meta_leader = block_in_place(|| cluster.meta_leader());
    let lost_store = (0..CLUSTER_SIZE)
        .find(|&i| i != leader && Some(i) != meta_leader)
        .ok_or_else(|| other("no server leads nothing"))?;
    let before = cluster.url(lost_store);
    block_in_place(|| cluster.restart_empty(lost_store))?;
    block_in_place(|| cluster.wait_for_stream_messages(lost_store, STREAM, 100))?;
    ensure(
        cluster.url(lost_store) == before && before == cluster.url_list()[lost_store],
        || "a restart moved the server".into(),
    )?;
    all_servers_take_more(&cluster, &js, 100).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_comes_back_on_its_ports() -> io::Result<()> {
    let Some(mut cluster) = block_in_place(BrokerCluster::start)? else {
        return Ok(());
    };
    let before = cluster.url(1);
    block_in_place(|| cluster.stop(1))?;
    ensure(cluster.pid(1).is_none(), || {
        "server 1 still has a pid".into()
    })?;
    ensure(cluster.monitor(1, "/jsz").is_err(), || {
        "a stopped server answers".into()
    })?;
    block_in_place(|| cluster.restart(1))?;
    ensure(cluster.url(1) == before, || "moved".into())?;
    let client = async_nats::connect(cluster.url(1)).await.map_err(other)?;
    let js = jetstream::new(client);
    // JetStream answers through the restarted server.
    create_kit_stream(&js, 3).await?;
    publish(&js, 0..5).await?;
    let bad = cluster.kill(CLUSTER_SIZE);
    ensure(bad.is_err(), || "server 3 of 3 was killed".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_broker_comes_back_on_an_empty_store() -> io::Result<()> {
    let Some(mut broker) = block_in_place(Broker::start)? else {
        return Ok(());
    };
    let url = broker.url();
    {
        let client = async_nats::connect(&url).await.map_err(other)?;
        let js = jetstream::new(client);
        create_kit_stream(&js, 1).await?;
    }
    block_in_place(|| broker.restart_empty())?;
    ensure(broker.url() == url, || "moved".into())?;
    let client = async_nats::connect(&url).await.map_err(other)?;
    let js = jetstream::new(client);
    ensure(js.get_stream(STREAM).await.is_err(), || {
        "the stream outlived its store".into()
    })
}

/// The broker's log is drained for its whole life: a broker that logs
/// after it started (refused logins, here) keeps running. Before, the
/// reader of its log ended once it was ready, and the next lines killed
/// it (a Go program dies of SIGPIPE writing to a closed stderr).
#[test]
fn a_broker_that_logs_after_starting_keeps_running() -> io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    let Some(broker) = Broker::start_with(&["--user", "kit", "--pass", "right"])? else {
        return Ok(());
    };
    let login = |pass: &str| -> io::Result<String> {
        let stream = TcpStream::connect(("127.0.0.1", broker.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?; // INFO
        write!(
            &stream,
            "CONNECT {{\"user\":\"kit\",\"pass\":\"{pass}\",\"verbose\":false}}\r\nPING\r\n"
        )?;
        line.clear();
        reader.read_line(&mut line)?;
        Ok(line)
    };
    for _ in 0..20 {
        let answer = login("wrong")?;
        ensure(answer.starts_with("-ERR"), || {
            format!("wrong password: {answer:?}")
        })?;
    }
    let answer = login("right")?;
    ensure(answer.starts_with("PONG"), || {
        format!("right password: {answer:?}")
    })
}
