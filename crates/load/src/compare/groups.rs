//! The targets `compare` runs as a group of processes: one server of ours
//! or a peer (a group of one), a routed NATS cluster (`--nats-cluster K`:
//! K `nats-server`s joined with `--cluster`/`--routes`, the clients speaking
//! NATS to them directly), and a cluster of our nodes (`--cluster-nodes`:
//! one `nats-server -js` and K `chat-server --cluster` nodes). Clients are
//! spread round-robin over a group's nodes. Every member is a [`Running`]
//! guard; a [`Group`] drops them last-started first (our nodes before their
//! broker, so their departures can still be announced), on every path out.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::spec::{Model, PeerSpec};
use super::supervise::{start_node, start_ours, start_peer, Running};
use super::CompareOptions;
use crate::protocol::Protocol;

/// The NATS server binary the groups run (from `PATH`).
const NATS_SERVER: &str = "nats-server";

/// How long routes and a cluster's room may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(15);

/// A target of one or more processes, stopped when dropped.
pub(super) struct Group {
    pub(super) name: String,
    /// Where clients connect, round-robin.
    pub(super) nodes: Vec<SocketAddr>,
    pub(super) log: PathBuf,
    pub(super) protocol: Protocol,
    members: Vec<Running>,
    /// A broker's store, removed after it stopped.
    store: Option<PathBuf>,
    /// How to start the broker again (our cluster's, the first member).
    broker: Option<PeerSpec>,
}

impl Group {
    fn one(running: Running) -> Group {
        Group {
            name: running.name.clone(),
            nodes: vec![running.addr],
            log: running.log.clone(),
            protocol: Protocol::Line,
            members: vec![running],
            store: None,
            broker: None,
        }
    }

    /// The processes whose CPU and memory the report gives, summed: the
    /// whole cost of a cluster, its broker included.
    pub(super) fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.pid).collect()
    }

    /// Whether every member is still running.
    pub(super) fn alive(&self) -> bool {
        self.members
            .iter()
            .all(|m| crate::proc::Proc::Pid(m.pid).alive())
    }

    pub(super) fn ours(opts: &CompareOptions, model: Model) -> anyhow::Result<Group> {
        Ok(Group::one(start_ours(opts, model)?))
    }

    pub(super) fn peer(opts: &CompareOptions, peer: &PeerSpec) -> anyhow::Result<Group> {
        Ok(Group::one(start_peer(opts, peer)?))
    }

    /// `k` routed `nats-server`s (plain core NATS), once every one of them
    /// delivers what is published on every other.
    pub(super) fn nats_cluster(opts: &CompareOptions, k: usize) -> anyhow::Result<Group> {
        let name = nats_cluster_name(k);
        let clients = free_ports(k)?;
        let routes = free_ports(k)?;
        let mut group = Group {
            name: name.clone(),
            nodes: Vec::new(),
            log: opts.out.join(format!("{name}.1.log")),
            protocol: Protocol::Nats,
            members: Vec::new(),
            store: None,
            broker: None,
        };
        for i in 0..k {
            let others = (0..k)
                .filter(|&j| j != i)
                .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                .collect::<Vec<_>>()
                .join(",");
            let addr = format!("127.0.0.1:{}", clients[i]);
            let mut command = format!(
                "exec {NATS_SERVER} -a 127.0.0.1 -p {} -n {name}.{} --cluster_name chatload \
                 --cluster nats://127.0.0.1:{}",
                clients[i],
                i + 1,
                routes[i]
            );
            if !others.is_empty() {
                command.push_str(&format!(" --routes {others}"));
            }
            let spec = PeerSpec {
                name: format!("{name}.{}", i + 1),
                addr: Some(addr),
                command,
            };
            let running = start_peer(opts, &spec)?;
            group.nodes.push(running.addr);
            group.members.push(running);
        }
        wait_for_routes(&group.nodes)?;
        Ok(group)
    }

    /// One `nats-server -js` with a fresh store and `k` of our nodes in
    /// `model` joined to it, once they are one room.
    pub(super) fn our_cluster(
        opts: &CompareOptions,
        model: Model,
        k: usize,
    ) -> anyhow::Result<Group> {
        let name = our_cluster_name(k);
        let store = opts.out.join(format!("{name}.store"));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store)
            .with_context(|| format!("cannot create {}", store.display()))?;
        let port = free_ports(1)?[0];
        let broker_spec = PeerSpec {
            name: format!("{name}.broker"),
            addr: Some(format!("127.0.0.1:{port}")),
            command: format!(
                "exec {NATS_SERVER} -a 127.0.0.1 -p {port} -js -sd '{}'",
                store.display()
            ),
        };
        let broker = start_peer(opts, &broker_spec)?;
        let mut group = Group {
            name: name.clone(),
            nodes: Vec::new(),
            log: broker.log.clone(),
            protocol: Protocol::Line,
            members: vec![broker],
            store: Some(store),
            broker: Some(broker_spec),
        };
        let extra = [
            "--cluster".to_owned(),
            format!("nats://127.0.0.1:{port}"),
            "--room".to_owned(),
            "chatload".to_owned(),
        ];
        for i in 0..k {
            let node = start_node(opts, model, &format!("{name}.{}", i + 1), &extra)?;
            group.nodes.push(node.addr);
            group.members.push(node);
        }
        let addrs: Vec<String> = group.nodes.iter().map(SocketAddr::to_string).collect();
        chat_testkit::nats::wait_for_room(&addrs)
            .with_context(|| format!("{name}: the nodes did not become one room"))?;
        Ok(group)
    }
}

impl Group {
    /// Kills our cluster's broker with SIGKILL and starts it again on the
    /// same port and store; returns how long it was unreachable (kill to
    /// accepting connections again).
    pub(super) fn restart_broker(&mut self, opts: &CompareOptions) -> anyhow::Result<Duration> {
        let Some(spec) = self.broker.clone() else {
            bail!("{} has no broker to restart", self.name);
        };
        let Some(broker) = self.members.first_mut() else {
            bail!("{} has no members", self.name);
        };
        let start = Instant::now();
        broker.kill();
        *broker = start_peer(opts, &spec)?;
        Ok(start.elapsed())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        while let Some(member) = self.members.pop() {
            drop(member);
        }
        if let Some(store) = &self.store {
            let _ = std::fs::remove_dir_all(store);
        }
    }
}

pub(super) fn nats_cluster_name(k: usize) -> String {
    format!("nats-cluster-{k}")
}

pub(super) fn our_cluster_name(k: usize) -> String {
    format!("cluster-{k}")
}

/// `k` distinct loopback ports for servers that are told them before they
/// run and may be restarted on them (`--broker-restart`): from outside the
/// kernel's ephemeral range, where no connection of the run can take one
/// in between (`chat_testkit::ports`).
fn free_ports(k: usize) -> anyhow::Result<Vec<u16>> {
    (0..k)
        .map(|_| chat_testkit::ports::unused_port())
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find free ports")
}

/// Waits until a message published on any node reaches a subscriber on
/// every node: the routes are up and the subscriptions have propagated.
fn wait_for_routes(nodes: &[SocketAddr]) -> anyhow::Result<()> {
    let subject = format!("chatload.probe.{}", std::process::id());
    let mut subscribers = Vec::new();
    for addr in nodes {
        let stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))
            .with_context(|| format!("probing {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut reader = BufReader::new(stream);
        reader.get_mut().write_all(
            format!("CONNECT {{\"verbose\":false}}\r\nSUB {subject} 1\r\n").as_bytes(),
        )?;
        subscribers.push((reader, vec![false; nodes.len()]));
    }
    let deadline = Instant::now() + FORM_TIMEOUT;
    while Instant::now() < deadline {
        for (i, (reader, _)) in subscribers.iter_mut().enumerate() {
            let body = format!("from{i}");
            let publish = format!("PUB {subject} {}\r\n{body}\r\n", body.len());
            reader.get_mut().write_all(publish.as_bytes())?;
        }
        for (reader, heard) in &mut subscribers {
            let mut line = String::new();
            // What is there; the read timeout ends this node's round.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("PING") {
                    reader.get_mut().write_all(b"PONG\r\n")?;
                }
                if let Some(i) = line.trim_end().strip_prefix("from") {
                    if let Some(slot) = i.parse::<usize>().ok().and_then(|i| heard.get_mut(i)) {
                        *slot = true;
                    }
                }
                line.clear();
            }
        }
        if subscribers
            .iter()
            .all(|(_, heard)| heard.iter().all(|&h| h))
        {
            return Ok(());
        }
    }
    bail!("the NATS servers at {nodes:?} did not route to each other within {FORM_TIMEOUT:?}")
}
