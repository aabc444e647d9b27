//! One room across several `chat-server` processes, through a NATS
//! JetStream broker (`--cluster`).
//!
//! [`Clustered`] wraps any [`Hub`]: the wrapped model stays the node's
//! local fan-out, unchanged, and the wrapper adds two things. Everything a
//! local client does (arrive, send a read's worth of lines, leave) is
//! queued as an event for the broker after the local hub has delivered it;
//! and what other nodes' clients do comes back from the room's stream and
//! is handed to the local hub as if one more participant had said it.
//!
//! **Order.** Local-first: a node's own clients see its lines at once,
//! through the local hub, exactly as without a cluster; other nodes see
//! them in stream order. So every client sees each sender's lines in the
//! order sent, and all clients agree on the order of remote lines among
//! themselves, but two nodes may interleave their own lines differently
//! against each other's. ARCHITECTURE.md ("Many servers") gives the
//! reasons and the measured cost of the alternative.
//!
//! **Names and presence.** Under `--names` a join first claims the name
//! room-wide in the broker's key-value bucket ([`names`]), then joins the
//! local hub; a leave frees it before the departure is published. Under
//! `--announce-present` a newcomer's list is the model's list of this
//! node's clients (with the model's guarantee) followed by the other
//! nodes' clients as this node's clients have been told of them
//! ([`Roster`]). The consumer's change of that view and its announcement,
//! and a join's local join and copy of the view, hold one lock
//! (`Shared::presence`, taken only under `--announce-present`), so every
//! client's view (its list, plus the arrivals, minus the departures it
//! hears) holds the sender of every line it receives, and it never hears
//! of an arrival already in it or a departure not in it.
//!
//! **Membership in stream order.** Every arrival, departure, roster and
//! leaving of a node is an event in its queue, numbered with its lines;
//! the consumer alone turns them, and the liveness judge's verdicts, into
//! announcements ([`roster`]). A node that returns from a partition is
//! announced by its first batch, before its backlog.
//!
//! **Ownership.** [`Shared`] holds this node's outgoing queue (bounded in
//! bytes, oldest dropped first) with its own clients, the roster of remote
//! nodes (written by the consumer, read by joins and the judge) and the
//! book of this node's names; each behind its own short `parking_lot`
//! mutex, never held across an `.await`, so the judge's thread may take
//! them too.
//! The broker side is one file per concern: [`connection`] (the NATS
//! client, the room's subjects and stream), [`publisher`] (this node's
//! events to the stream), [`consumer`] (the stream to the local hub),
//! [`replicas`] (the stream's and the names bucket's copies),
//! [`heartbeats`] (liveness, on a thread of its own), [`roster`] (who is
//! on the other nodes) and
//! [`backoff`] (the one retry policy); the wire format and its checks are
//! in [`wire`].
//!
//! **Tasks.** Three of ours (publisher, consumer, [`replicas`] keeper)
//! plus the NATS client's four (connection, event log, JetStream acker,
//! the pull consumer's request loop): a clustered node runs the model's
//! tasks plus
//! [`ClusterConfig::EXTRA_TASKS`]; under `--names`, plus one short-lived
//! task per name whose delete is being retried or dead node being tidied.
//! The liveness judge is one more OS thread with its own runtime and
//! NATS connection (not counted there).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::{Client, ClientId};
use crate::config::{ClusterConfig, ClusterCounters, Config};
use crate::protocol::Message;
use crate::room::hub::{Hub, Joined, Refused};
use tokio::sync::watch;

mod backfill;
mod backoff;
mod connection;
mod consumer;
mod heartbeats;
mod names;
mod publisher;
mod replicas;
mod roster;
pub(crate) mod wire;

use roster::Roster;
use wire::Event;

/// Any model, joined to the room on the broker. See the module documentation.
pub(crate) struct Clustered<H: Hub> {
    inner: Arc<H>,
    shared: Option<Arc<Shared>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    judge: Mutex<Option<heartbeats::Judge>>,
}

impl<H: Hub> Drop for Clustered<H> {
    fn drop(&mut self) {
        // Without `close` (a test's runtime ending): the judge's thread
        // ends by itself.
        if let Some(shared) = &self.shared {
            shared.stop.cancel();
        }
    }
}

impl<H: Hub> Hub for Clustered<H> {
    type Inbox = H::Inbox;

    fn new(config: &Config, history: Option<Arc<crate::room::history::History>>) -> Self {
        let inner = Arc::new(H::new(config, history.clone()));
        let Some(cluster) = &config.cluster else {
            return Clustered {
                inner,
                shared: None,
                tasks: Mutex::default(),
                judge: Mutex::default(),
            };
        };
        let shared = Arc::new(Shared::new(cluster.clone(), config, history));
        let (tasks, judge) = start(Arc::clone(&shared), Arc::clone(&inner), config);
        Clustered {
            inner,
            shared: Some(shared),
            tasks: Mutex::new(tasks),
            judge: Mutex::new(judge),
        }
    }

    async fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> Result<Joined<Self::Inbox>, Refused> {
        let Some(shared) = &self.shared else {
            return self.inner.join(client, arrival).await;
        };
        // Under `--history`, nobody is greeted before the node's history
        // is filled from the stream (bounded: see `backfill`).
        shared.history_filled.wait().await;
        // The room-wide claim comes first: an arrival, once announced,
        // cannot be taken back; a claim can (names.rs).
        if shared.names_on {
            names::claim(shared, &client.who).await?;
        }
        // Atomic with the consumer's announcements: the newcomer's list and
        // what it hears next are one consistent view.
        let _presence = match &shared.presence {
            Some(presence) => Some(presence.lock().await),
            None => None,
        };
        let mut joined = match self.inner.join(client, arrival).await {
            Ok(joined) => joined,
            Err(refused) => {
                if shared.names_on {
                    names::release(shared, &client.who).await;
                }
                return Err(refused);
            }
        };
        if shared.present_on {
            // The local part is the model's exact list; the other nodes'
            // clients are as the consumer has announced them so far.
            joined.present.extend(shared.roster.lock().clients());
        }
        shared.joined(client);
        Ok(joined)
    }

    async fn relay(&self, from: &Arc<Client>, message: &Message) {
        self.inner.relay(from, message).await;
    }

    async fn broadcast(&self, from: &Arc<Client>, message: &Message) {
        self.inner.broadcast(from, message).await;
        if let Some(shared) = &self.shared {
            shared.said(from, message);
        }
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        self.inner.leave(client, departure).await;
        // Announced to the other nodes even on shutdown (when the local
        // hub is told no departure): their clients are not shutting down.
        if let Some(shared) = &self.shared {
            // Freed before the departure is published, so that a node
            // that hears of it finds the name free.
            if shared.names_on {
                names::release(shared, &client.who).await;
            }
            shared.left(client);
        }
    }
}

impl<H: Hub> Clustered<H> {
    /// After the local clients are gone: gives the publisher up to `grace`
    /// to get every queued event (their departures included) to the
    /// broker, then stops the backplane's tasks, waiting for them at most
    /// [`STOP_WITHIN`] (then aborted): a node stops within
    /// `grace + STOP_WITHIN` whatever its broker does.
    pub(crate) async fn close(&self, grace: Duration) {
        let Some(shared) = &self.shared else { return };
        // After every departure: the others forget this node at once.
        shared.push(|_, seq| Event::Leaving { seq });
        let deadline = Instant::now() + grace;
        loop {
            let pending = shared.pending_events();
            if pending == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    pending,
                    "broker unreachable: these events were never published"
                );
                break;
            }
            tokio::select! {
                () = shared.published.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        shared.stop.cancel();
        // Each task ends at its next await on `stop`, but a broker call in
        // flight (a request to a cut-off broker, a publish's ack) may first
        // run to its own timeout: bounded here as a whole, then aborted.
        let deadline = Instant::now() + STOP_WITHIN;
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                warn!(
                    within = ?STOP_WITHIN,
                    "a backplane task did not stop in time; aborted"
                );
                task.abort();
            }
        }
        let judge = self.judge.lock().take();
        if let Some(judge) = judge {
            // It ends within a tick of `stop` (its broker calls are bounded
            // by half a heartbeat). Watched rather than joined on a blocking
            // task, which the runtime's own shutdown would wait for; left to
            // end by itself if it does not in time (a thread cannot be aborted).
            while !judge.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if judge.is_finished() {
                judge.join();
            } else {
                warn!(within = ?STOP_WITHIN, "the liveness thread did not stop in time; left to end");
            }
        }
    }
}

/// How long [`Clustered::close`] waits for the backplane's tasks and
/// thread once it has stopped them (after `--shutdown-grace`): a broker
/// call in flight ends at its `--cluster-ack-timeout` (2 s by default),
/// and shutdown need not wait for it.
pub(crate) const STOP_WITHIN: Duration = Duration::from_secs(1);

/// Starts the publisher and the consumer tasks, and the judge's thread.
fn start<H: Hub>(
    shared: Arc<Shared>,
    hub: Arc<H>,
    config: &Config,
) -> (Vec<JoinHandle<()>>, Option<heartbeats::Judge>) {
    // Remote lines enter the local hub as if said by one more participant.
    // It never joins, so no model sends it anything; it only stands for
    // "the rest of the room" where the hub wants a sender.
    let ghost = Arc::new(Client::new(
        ClientId(u64::MAX),
        "cluster".into(),
        config,
        &CancellationToken::new(),
        None,
    ));
    let (connected, connection) = watch::channel(None);
    info!(node = %shared.node, room = %shared.config.room, "joining the room through the broker");
    let (verdicts, verdicts_heard) = mpsc::unbounded_channel();
    let (appeared, appearances) = mpsc::unbounded_channel();
    let judge = match heartbeats::Judge::start(Arc::clone(&shared), verdicts, appearances) {
        Ok(judge) => Some(judge),
        Err(err) => {
            warn!(cause = %err, "cannot start the liveness thread; dead nodes will not be noticed");
            None
        }
    };
    let tasks = vec![
        tokio::spawn(publisher::publisher(Arc::clone(&shared), connected)),
        tokio::spawn(replicas::keep(Arc::clone(&shared), connection.clone())),
        tokio::spawn(consumer::consumer(
            shared,
            hub,
            ghost,
            connection,
            consumer::Liveness {
                verdicts: verdicts_heard,
                appeared,
            },
        )),
    ];
    (tasks, judge)
}

/// What the hub wrapper and the broker tasks share.
pub(crate) struct Shared {
    pub node: String,
    pub config: ClusterConfig,
    pub outgoing: Mutex<Outgoing>,
    /// Wakes the publisher when an event is queued.
    pub queued: Notify,
    /// Signalled after each published batch (shutdown waits on it).
    pub published: Notify,
    pub roster: Mutex<Roster>,
    /// `--announce-present`: held by the consumer across a view change and
    /// its announcement, and by a join across its local join and its copy
    /// of the view (so the two never interleave).
    pub presence: Option<tokio::sync::Mutex<()>>,
    pub garbage: Mutex<GarbageLog>,
    pub stop: CancellationToken,
    /// `--names`: names are claimed room-wide, in [`names`].
    pub names_on: bool,
    /// `--announce-present`: a newcomer's list includes the other nodes'.
    pub present_on: bool,
    pub names: names::NameBook,
    /// The broker connection, once the publisher has made it.
    pub connection: std::sync::OnceLock<connection::Connection>,
    /// `--history`: the room's last lines, which the consumer fills from
    /// the stream before the first join ([`backfill`]).
    pub history: Option<Arc<crate::room::history::History>>,
    pub history_filled: backfill::Filled,
    /// Since when this node has been connected and hearing heartbeats
    /// (`None` while it is not): a node never heard of for longer than
    /// `node_timeout` of that is dead.
    pub hearing_since: Mutex<Option<Instant>>,
}

impl Shared {
    fn new(
        config: ClusterConfig,
        server: &Config,
        history: Option<Arc<crate::room::history::History>>,
    ) -> Shared {
        let shared = Shared {
            history_filled: backfill::Filled::new(history.is_some()),
            history,
            node: wire::new_node_id(),
            names_on: server.names,
            present_on: server.announce_present,
            names: names::NameBook::default(),
            connection: std::sync::OnceLock::new(),
            hearing_since: Mutex::new(None),
            config,
            outgoing: Mutex::default(),
            queued: Notify::new(),
            published: Notify::new(),
            roster: Mutex::default(),
            presence: server.announce_present.then(|| tokio::sync::Mutex::new(())),
            garbage: Mutex::default(),
            stop: CancellationToken::new(),
        };
        // A node's first event is its (empty) roster: whoever reads it
        // knows all its clients from then on, without asking.
        shared.push(|_, seq| Event::Roster {
            seq,
            clients: Vec::new(),
        });
        shared
    }

    pub(crate) fn counters(&self) -> &ClusterCounters {
        &self.config.counters
    }

    fn joined(&self, client: &Client) {
        self.push(|outgoing, seq| {
            outgoing.clients.insert(client.id, Arc::clone(&client.who));
            Event::Arrived {
                seq,
                who: Arc::clone(&client.who),
            }
        });
    }

    fn said(&self, from: &Client, message: &Message) {
        self.push(|_, seq| Event::Lines {
            seq,
            who: Arc::clone(&from.who),
            text: message.as_str().into(),
        });
    }

    fn left(&self, client: &Client) {
        self.push(|outgoing, seq| {
            outgoing.clients.remove(&client.id);
            Event::Left {
                seq,
                who: Arc::clone(&client.who),
            }
        });
    }

    /// Numbers and queues an event; drops the oldest past `--cluster-buffer`.
    /// The roster changes in the same critical section, so a heartbeat's
    /// snapshot (roster, last event number) is always consistent.
    fn push(&self, event: impl FnOnce(&mut Outgoing, u64) -> Event) {
        let mut outgoing = self.outgoing.lock();
        outgoing.last_seq += 1;
        let seq = outgoing.last_seq;
        let event = event(&mut outgoing, seq);
        outgoing.bytes += event.weight();
        outgoing.queue.push_back(event);
        let mut dropped = 0;
        while outgoing.bytes > self.config.buffer_bytes && outgoing.queue.len() > 1 {
            if let Some(oldest) = outgoing.queue.pop_front() {
                outgoing.bytes -= oldest.weight();
                // Membership bookkeeping is made again (roster_due below);
                // only what was said or done is lost.
                dropped += u64::from(oldest.is_chat());
                outgoing.roster_due = true;
            }
        }
        if dropped > 0 {
            if outgoing.dropping == 0 {
                warn!(
                    buffer_bytes = self.config.buffer_bytes,
                    "broker unreachable and --cluster-buffer full: dropping the oldest events"
                );
            }
            outgoing.dropping += dropped;
            ClusterCounters::add(&self.counters().dropped, dropped);
        }
        self.show_buffered(&outgoing);
        drop(outgoing);
        self.queued.notify_one();
    }

    /// Takes the oldest queued events, up to about `max_bytes` (at least one).
    pub(crate) fn take_batch(&self, max_bytes: usize) -> Vec<Event> {
        let mut outgoing = self.outgoing.lock();
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some(next) = outgoing.queue.front() {
            let weight = next.weight();
            if !events.is_empty() && bytes + weight > max_bytes {
                break;
            }
            bytes += weight;
            if let Some(event) = outgoing.queue.pop_front() {
                events.push(event);
            }
        }
        outgoing.bytes -= bytes;
        outgoing.in_flight = events.len();
        outgoing.in_flight_chat = events.iter().filter(|event| event.is_chat()).count() as u64;
        outgoing.in_flight_bytes = bytes;
        self.show_buffered(&outgoing);
        if outgoing.queue.is_empty() && outgoing.dropping > 0 {
            warn!(
                dropped = outgoing.dropping,
                "events dropped while the broker was unreachable"
            );
            outgoing.dropping = 0;
        }
        events
    }

    /// The batch taken last is stored: counted if it carried anything said
    /// or done (a batch of membership bookkeeping alone is not).
    pub(crate) fn count_published(&self) {
        let events = self.outgoing.lock().in_flight_chat;
        if events > 0 {
            ClusterCounters::add(&self.counters().published, 1);
            ClusterCounters::add(&self.counters().events_published, events);
        }
    }

    /// The batch taken last is stored (or given up).
    pub(crate) fn batch_done(&self) {
        let mut outgoing = self.outgoing.lock();
        outgoing.in_flight = 0;
        outgoing.in_flight_bytes = 0;
        self.show_buffered(&outgoing);
        drop(outgoing);
        self.published.notify_waiters();
    }

    /// Sets the buffer gauges; called under the lock that changed them, so
    /// that two changes cannot store their figures in the wrong order.
    fn show_buffered(&self, outgoing: &Outgoing) {
        let counters = self.counters();
        ClusterCounters::set(
            &counters.buffered_bytes,
            (outgoing.bytes + outgoing.in_flight_bytes) as u64,
        );
        ClusterCounters::set(
            &counters.buffered_events,
            (outgoing.queue.len() + outgoing.in_flight) as u64,
        );
    }

    /// Events not yet stored by the broker.
    fn pending_events(&self) -> usize {
        let outgoing = self.outgoing.lock();
        outgoing.queue.len() + outgoing.in_flight
    }

    /// This node's last event number and how many clients it has: what a
    /// heartbeat says.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let outgoing = self.outgoing.lock();
        (outgoing.last_seq, outgoing.clients.len() as u64)
    }

    /// Another node asked for our roster (or we dropped events, or a
    /// batch): the judge queues it at its next tick.
    pub(crate) fn roster_due(&self) {
        self.outgoing.lock().roster_due = true;
    }

    /// Queues this node's roster as an event if one is due; true if it did.
    pub(crate) fn push_roster_if_due(&self) -> bool {
        if !self.outgoing.lock().roster_due {
            return false;
        }
        self.push(|outgoing, seq| {
            outgoing.roster_due = false;
            let mut clients: Vec<Arc<str>> = outgoing.clients.values().cloned().collect();
            clients.sort();
            Event::Roster { seq, clients }
        });
        true
    }

    /// Counts a message that failed [`wire`]'s checks; logs the first of a burst.
    pub(crate) fn garbage(&self, subject: &str, why: &wire::Garbage) {
        ClusterCounters::add(&self.counters().garbage, 1);
        let mut log = self.garbage.lock();
        if log.in_burst == 0 {
            warn!(%subject, cause = %why, "dropped a message from the broker that is not ours");
        } else {
            debug!(%subject, cause = %why, "dropped another bad broker message");
        }
        log.in_burst += 1;
    }

    /// A good message ended a burst of garbage: says how much was dropped.
    pub(crate) fn good_message(&self) {
        let mut log = self.garbage.lock();
        if log.in_burst > 0 {
            if log.in_burst > 1 {
                info!(dropped = log.in_burst, "bad broker messages dropped");
            }
            log.in_burst = 0;
        }
    }
}

/// This node's side of the room: events for the broker and who is here.
#[derive(Default)]
pub(crate) struct Outgoing {
    /// The last event number given out.
    last_seq: u64,
    queue: VecDeque<Event>,
    /// Weight of `queue`.
    bytes: usize,
    /// Events taken by the publisher and not yet stored...
    in_flight: usize,
    /// ... and their weight.
    in_flight_bytes: usize,
    /// ... and how many of them are chat events ([`Event::is_chat`]).
    in_flight_chat: u64,
    /// Dropped since the queue was last empty.
    dropping: u64,
    clients: HashMap<ClientId, Arc<str>>,
    /// A [`Event::Roster`] should be queued (see [`Shared::roster_due`]).
    roster_due: bool,
}

#[derive(Default)]
pub(crate) struct GarbageLog {
    in_burst: u64,
}
