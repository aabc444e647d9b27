//! What the cluster tests share: nodes in their own runtimes, joined to a
//! room on a real broker, with timers short enough that failures show in a
//! second, and waits on their backplane counters (bounded, never sleeps as
//! synchronisation).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_server::harness::{TestClient, TestServer};
use chat_server::{ClusterConfig, ClusterCounters, ClusterStats, Config, Model, SlowClientPolicy};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// How long a node may take to join the room or to recover from a broker
/// restart; a bound, not a sleep.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The backplane with short timers, so failures are noticed in a second.
pub fn test_cluster(url: &str) -> ClusterConfig {
    ClusterConfig::new(url).with(|c| {
        c.heartbeat = Duration::from_millis(200);
        c.node_timeout = Duration::from_secs(1);
        c.reconnect_max = Duration::from_millis(200);
        c.ack_timeout = Duration::from_secs(1);
    })
}

/// A node whose clients, once stuck, hold whatever delivers to them for
/// the whole test: `--slow-client block` with a write timeout (also the
/// socket's TCP user timeout) of ten minutes, and `max_pending` bytes of
/// queue.
pub fn blocking_node(model: Model, max_pending: usize) -> Config {
    Config::with_model(model).with(|c| {
        c.slow_client = SlowClientPolicy::Block;
        c.max_pending = max_pending;
        c.write_timeout = Duration::from_secs(600);
    })
}

/// A node without flood control, for a talker that fills a stuck client's
/// path quickly.
pub fn unlimited_node(model: Model) -> Config {
    Config::with_model(model).with(|c| {
        c.flood_lines = 0;
        c.flood_bytes = 0;
    })
}

/// A stuck client's receive buffer: small, so that what fills its path is
/// the server's send buffer and the client's queue.
const STUCK_RECEIVE_BUFFER: u32 = 4 * 1024;

/// A client on `addr` with a small receive buffer that never reads (not
/// even its greeting).
pub async fn connect_stuck(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(STUCK_RECEIVE_BUFFER)?;
    socket.connect(addr).await
}

/// Bytes that fill a [`connect_stuck`] client's path on a node with
/// `max_pending` bytes of queue: the server's send buffer (which the kernel
/// grows up to `net.ipv4.tcp_wmem`'s largest, 4 MB by default), the queue,
/// and a megabyte to spare.
pub fn stuck_path_bytes(max_pending: usize) -> usize {
    let send_buffer = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|limits| limits.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    send_buffer + max_pending + 1024 * 1024
}

/// Lets a [`connect_stuck`] client of `blocking` read again (into a sink,
/// until the returned task is aborted) and waits until that node, its
/// delivery no longer held, has announced a node's death (`what` names it
/// in a failure).
pub async fn unstick(
    stuck: TcpStream,
    blocking: &Node,
    what: &str,
) -> io::Result<tokio::task::JoinHandle<io::Result<u64>>> {
    let draining = tokio::spawn(async move {
        let mut stuck = stuck;
        tokio::io::copy(&mut stuck, &mut tokio::io::sink()).await
    });
    wait_for(&blocking.counters, |c| c.dead_nodes, 1, what).await?;
    Ok(draining)
}

/// A node in its own runtime, and its backplane counters.
pub struct Node {
    pub server: TestServer,
    pub counters: Arc<ClusterCounters>,
}

impl Node {
    /// A node of `model` with default settings, joined to the room at `url`.
    pub fn start(model: Model, url: &str) -> io::Result<Node> {
        Node::start_with(test_cluster(url), Config::with_model(model))
    }

    /// A node with `config`, joined to the room `cluster` names.
    pub fn start_with(cluster: ClusterConfig, config: Config) -> io::Result<Node> {
        let counters = Arc::clone(&cluster.counters);
        let server = TestServer::start(config.with(|c| c.cluster = Some(cluster)))?;
        Ok(Node { server, counters })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn metrics(&self) -> io::Result<SocketAddr> {
        self.server
            .metrics_addr()
            .ok_or_else(|| io::Error::other("no metrics address"))
    }

    pub async fn client(&self) -> io::Result<TestClient> {
        TestClient::connect(self.server.addr()).await
    }

    /// Waits until the node has opened the room's stream `times` times.
    pub async fn joined(&self, times: u64) -> io::Result<()> {
        wait_for(
            &self.counters,
            |c| c.streams_opened,
            times,
            "streams opened",
        )
        .await
    }
}

/// Waits (within [`JOIN_TIMEOUT`]) until the count `read` picks from
/// `counters` is at least `at_least`.
pub async fn wait_for(
    counters: &ClusterCounters,
    read: fn(&ClusterStats) -> u64,
    at_least: u64,
    what: &str,
) -> io::Result<()> {
    let what = format!("{what}, expected at least {at_least}");
    wait_until(counters, read, &what, |now| now >= at_least).await
}

/// Waits (within [`JOIN_TIMEOUT`]) until `done` holds for the count `read`
/// picks from `counters`.
pub async fn wait_until(
    counters: &ClusterCounters,
    read: fn(&ClusterStats) -> u64,
    what: &str,
    done: impl Fn(u64) -> bool,
) -> io::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let now = read(&counters.snapshot());
        if done(now) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!("{what}: stuck at {now}")));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
