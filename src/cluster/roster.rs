//! Who is on the other nodes, as this node has heard it: from their
//! arrivals and departures on the stream and from their heartbeats.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::wire;

/// Who is on the other nodes, so that a node that dies can be mourned:
/// from their arrivals and departures on the stream and from their
/// heartbeats, whichever is newer (both carry the node's event number).
#[derive(Default)]
pub(crate) struct Roster {
    nodes: HashMap<String, RemoteNode>,
    /// Nodes declared dead or gone: late stream events do not bring them
    /// back; only a heartbeat does.
    gone: HashSet<String>,
}

struct RemoteNode {
    clients: HashSet<Arc<str>>,
    /// The newest event number reflected in `clients`.
    applied: u64,
    /// The newest batch number delivered (a stored duplicate is skipped).
    last_batch: u64,
    last_seen: Instant,
}

impl RemoteNode {
    fn new(now: Instant) -> RemoteNode {
        RemoteNode {
            clients: HashSet::new(),
            applied: 0,
            last_batch: 0,
            last_seen: now,
        }
    }
}

impl Roster {
    /// Whether batch `batch` of `node` is new (batches are published one at
    /// a time, so a node's batch numbers only grow along the stream).
    pub fn fresh_batch(&mut self, node: &str, batch: u64, now: Instant) -> bool {
        if self.gone.contains(node) {
            return true;
        }
        let remote = self
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| RemoteNode::new(now));
        if batch <= remote.last_batch {
            return false;
        }
        remote.last_batch = batch;
        true
    }

    pub fn apply(&mut self, node: &str, event: &wire::Checked) {
        if self.gone.contains(node) {
            return;
        }
        let Some(remote) = self.nodes.get_mut(node) else {
            return;
        };
        if event.seq <= remote.applied {
            return;
        }
        remote.applied = event.seq;
        match event.change {
            wire::Change::Arrived => {
                remote.clients.insert(Arc::clone(&event.who));
            }
            wire::Change::Left => {
                remote.clients.remove(&event.who);
            }
            wire::Change::None => {}
        }
    }

    /// Applies a heartbeat; returns the clients to announce as arrived
    /// again if the node had been declared dead (it was cut off, not dead).
    pub fn heartbeat(&mut self, beat: wire::Heartbeat, now: Instant) -> Vec<Arc<str>> {
        let Some(clients) = beat.clients else {
            // Leaving: its departures are on the stream.
            self.nodes.remove(&beat.node);
            self.gone.insert(beat.node);
            return Vec::new();
        };
        let revived = self.gone.remove(&beat.node);
        let remote = self
            .nodes
            .entry(beat.node)
            .or_insert_with(|| RemoteNode::new(now));
        remote.last_seen = now;
        if beat.seq >= remote.applied {
            remote.applied = beat.seq;
            remote.clients = clients.into_iter().collect();
        }
        if revived {
            let mut back: Vec<_> = remote.clients.iter().cloned().collect();
            back.sort();
            back
        } else {
            Vec::new()
        }
    }

    /// Whether `node` is alive as far as this node knows.
    pub fn is_live(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    /// Whether `node` was declared dead or said it was leaving.
    pub fn is_gone(&self, node: &str) -> bool {
        self.gone.contains(node)
    }

    /// Every live remote node's clients, sorted.
    pub fn clients(&self) -> Vec<Arc<str>> {
        let mut clients: Vec<Arc<str>> = self
            .nodes
            .values()
            .flat_map(|remote| remote.clients.iter().cloned())
            .collect();
        clients.sort();
        clients
    }

    /// Nodes silent for longer than `timeout` are dead: returns them and
    /// their clients, to be announced as having left.
    pub fn reap(&mut self, now: Instant, timeout: Duration) -> (Vec<String>, Vec<Arc<str>>) {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, remote)| now.duration_since(remote.last_seen) > timeout)
            .map(|(node, _)| node.clone())
            .collect();
        let mut gone = Vec::new();
        for node in &dead {
            if let Some(remote) = self.nodes.remove(node) {
                warn!(%node, clients = remote.clients.len(), "node silent: announcing its clients as gone");
                gone.extend(remote.clients);
            }
            self.gone.insert(node.clone());
        }
        gone.sort();
        (dead, gone)
    }

    /// After our own connection was down nobody could be heard: restart
    /// every node's clock rather than declare them all dead.
    pub fn reset_clocks(&mut self, now: Instant) {
        for remote in self.nodes.values_mut() {
            remote.last_seen = now;
        }
    }
}
