//! Liveness, judged where a busy node cannot lose it: a thread of its own
//! (the judge) with its own current-thread runtime and its own NATS
//! connection, which never waits on the hub, a client socket or the main
//! runtime. A connect storm, a slow client under `--slow-client block` or a
//! consumer far behind cannot delay this node's heartbeats nor its
//! verdicts on others.
//!
//! Every `--cluster-heartbeat` the judge sends a small [`wire::Heartbeat`]
//! (node, last event number, client count); it hears the other nodes'
//! and declares a node silent for `--cluster-node-timeout` dead (never
//! while its own connection is down: clocks restart on reconnect; nor at
//! its first tick after a stall of its own, before it has read what came
//! meanwhile). It
//! does not announce anything: it tells the consumer, whose
//! [`super::roster::Roster`] announces the dead node's clients as gone in
//! stream order. It asks a node whose clients the consumer does not know
//! (new, heard again after its death, or with a gap in its events) for
//! its roster (`chat.<room>.sync.<node>`, at once, then with a pause that
//! doubles from a second to 30 s while it does not come), and answers such
//! requests by queueing this node's roster as a stream event, at most once
//! a heartbeat, through [`Shared`]'s short locks. Once this node reads the
//! stream it asks every node at once (`chat.<room>.sync.all`), so that it
//! knows the room within a round trip rather than a heartbeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connection::{connect, Connection, Subjects};
use super::roster::FORGET_AFTER;
use super::wire;
use super::Shared;

/// How soon the judge asks a node for its roster again, at first; the
/// pause doubles while the roster does not come (our consumer may be far
/// behind), up to [`SYNC_MAX`].
const SYNC_EVERY: Duration = Duration::from_secs(1);
const SYNC_MAX: Duration = Duration::from_secs(30);

/// What the judge tells the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Silent for longer than `--cluster-node-timeout`.
    Dead(String),
}

/// The judge's book: when each node was last heard, and its verdict.
/// Plain data with time passed in, unit-tested below.
#[derive(Default)]
pub(crate) struct Liveness {
    nodes: HashMap<String, Watched>,
}

struct Watched {
    last_heard: Instant,
    dead: bool,
    asked: Option<Instant>,
    asks: u32,
}

impl Liveness {
    /// A heartbeat of `node`. True if it was unknown or dead until now.
    pub(super) fn heard(&mut self, node: &str, now: Instant) -> bool {
        match self.nodes.get_mut(node) {
            Some(watched) => {
                watched.last_heard = now;
                std::mem::replace(&mut watched.dead, false)
            }
            None => {
                self.nodes.insert(
                    node.to_string(),
                    Watched {
                        last_heard: now,
                        dead: false,
                        asked: None,
                        asks: 0,
                    },
                );
                true
            }
        }
    }

    /// The consumer saw `node` come into view (a batch): watch it from
    /// now, even if it was declared dead (a late batch of a dead node
    /// brings it back, so it must be reaped again if it stays silent).
    pub(super) fn appeared(&mut self, node: &str, now: Instant) {
        let watched = self.nodes.entry(node.to_string()).or_insert(Watched {
            last_heard: now,
            dead: false,
            asked: None,
            asks: 0,
        });
        if watched.dead {
            watched.dead = false;
            watched.last_heard = now;
        }
    }

    /// Live nodes that `unknown` says need a roster (not in view, or
    /// with a gap) and are due to be asked; marks them asked.
    pub(super) fn due_for_sync(
        &mut self,
        now: Instant,
        unknown: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut ask = Vec::new();
        for (node, watched) in &mut self.nodes {
            if watched.dead || !unknown(node) {
                watched.asks = 0;
                continue;
            }
            let pause = crate::cluster::backoff::Backoff::delay(
                SYNC_EVERY,
                SYNC_MAX,
                watched.asks.saturating_sub(1),
            );
            if watched
                .asked
                .is_none_or(|at| watched.asks == 0 || now.duration_since(at) >= pause)
            {
                watched.asked = Some(now);
                watched.asks = watched.asks.saturating_add(1);
                ask.push(node.clone());
            }
        }
        ask
    }

    /// Nodes silent for longer than `timeout`, now declared dead.
    pub(super) fn reap(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut dead = Vec::new();
        for (node, watched) in &mut self.nodes {
            if !watched.dead && now.duration_since(watched.last_heard) > timeout {
                watched.dead = true;
                dead.push(node.clone());
            }
        }
        dead.sort();
        dead
    }

    /// After our own connection was down nobody could be heard: restart
    /// every clock rather than declare them all dead.
    pub(super) fn reset_clocks(&mut self, now: Instant) {
        for watched in self.nodes.values_mut() {
            watched.last_heard = now;
        }
    }

    /// Forgets the dead not heard of for `age`.
    pub(super) fn expire(&mut self, now: Instant, age: Duration) {
        self.nodes
            .retain(|_, watched| !watched.dead || now.duration_since(watched.last_heard) <= age);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// Whether a tick of the judge may declare anyone dead. A tick that comes
/// more than a heartbeat after the last means the judge itself did not run
/// (its process stalled: starved of CPU, stopped, swapped out), and the
/// heartbeats that arrived meanwhile are still waiting in its socket: that
/// tick only lets them be read, and the next one judges. Never two ticks
/// in a row, so that a judge late at every tick still declares the dead.
/// Seen under load: after a 4.7 s stall of a process holding three nodes,
/// each declared the other two dead at its first tick.
#[derive(Default)]
struct Ticks {
    last: Option<Instant>,
    skipped: bool,
}

impl Ticks {
    fn may_judge(&mut self, now: Instant, heartbeat: Duration) -> bool {
        let late = self
            .last
            .is_some_and(|last| now.duration_since(last) > heartbeat);
        self.last = Some(now);
        if late && !self.skipped {
            self.skipped = true;
            return false;
        }
        self.skipped = false;
        true
    }
}

/// The judge thread's handle: stop it by cancelling `Shared::stop`, then
/// join it.
pub(crate) struct Judge {
    thread: std::thread::JoinHandle<()>,
}

impl Judge {
    /// Starts the judge; `verdicts` go to the consumer, `appeared` come
    /// from it.
    pub(super) fn start(
        shared: Arc<Shared>,
        verdicts: mpsc::UnboundedSender<Verdict>,
        appeared: mpsc::UnboundedReceiver<String>,
    ) -> std::io::Result<Judge> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("cluster-judge".into())
            .spawn(move || runtime.block_on(judge(shared, verdicts, appeared)))?;
        Ok(Judge { thread })
    }

    pub(super) fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    pub(super) fn join(self) {
        if self.thread.join().is_err() {
            warn!("the liveness thread panicked");
        }
    }
}

async fn judge(
    shared: Arc<Shared>,
    verdicts: mpsc::UnboundedSender<Verdict>,
    mut appeared: mpsc::UnboundedReceiver<String>,
) {
    let Some(connection) = connect(&shared).await else {
        return;
    };
    let names = Subjects::new(&shared.config.room);
    let room = &shared.config.room;
    // Subscribing only queues the request in the client; it is sent (and
    // sent again after every reconnect) by the client itself.
    let sync_all = format!("chat.{room}.sync.all");
    let subscribed = futures_util::future::try_join3(
        connection.client.subscribe(names.heartbeats.clone()),
        connection
            .client
            .subscribe(format!("chat.{room}.sync.{}", shared.node)),
        connection.client.subscribe(sync_all.clone()),
    )
    .await;
    let (mut beats, mut syncs) = match subscribed {
        Ok((beats, ours, all)) => (beats, futures_util::stream::select(ours, all)),
        Err(err) => {
            warn!(cause = %err, "cannot subscribe to heartbeats; dead nodes will not be noticed");
            shared.stop.cancelled().await;
            return;
        }
    };
    // Silent nodes are looked for four times a heartbeat, so that noticing
    // one takes at most a quarter heartbeat past the timeout.
    let mut tick = tokio::time::interval(shared.config.heartbeat / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = Liveness::default();
    let mut ticks = Ticks::default();
    let mut last_beat: Option<Instant> = None;
    let mut last_roster: Option<Instant> = None;
    let mut was_connected = false;
    let mut asked_all = false;
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => break,
            _ = tick.tick() => {
                let connected = connection.client.connection_state() == State::Connected;
                let now = Instant::now();
                if connected && !was_connected {
                    liveness.reset_clocks(now);
                    *shared.hearing_since.lock() = Some(now);
                }
                was_connected = connected;
                if !connected {
                    *shared.hearing_since.lock() = None;
                    continue;
                }
                if last_beat.is_none_or(|at| now.duration_since(at) >= shared.config.heartbeat.mul_f64(0.9)) {
                    last_beat = Some(now);
                    let (seq, clients) = shared.counts();
                    let payload = wire::encode_heartbeat(&shared.node, seq, clients);
                    publish(&connection, &shared, names.heartbeats.clone(), payload).await;
                }
                if last_roster.is_none_or(|at| now.duration_since(at) >= shared.config.heartbeat)
                    && shared.push_roster_if_due()
                {
                    last_roster = Some(now);
                }
                if !asked_all
                    && crate::config::ClusterCounters::get(&shared.counters().streams_opened) > 0
                {
                    asked_all = true;
                    publish(&connection, &shared, sync_all.clone(), Vec::new()).await;
                }
                let ask = {
                    let roster = shared.roster.lock();
                    liveness.due_for_sync(now, |node| roster.needs_sync(node))
                };
                for node in ask {
                    debug!(%node, "asking a node for its roster");
                    publish(&connection, &shared, format!("chat.{room}.sync.{node}"), Vec::new()).await;
                }
                if ticks.may_judge(now, shared.config.heartbeat) {
                    for node in liveness.reap(now, shared.config.node_timeout) {
                        let _ = verdicts.send(Verdict::Dead(node));
                    }
                } else {
                    debug!("the judge ran late: reading what came meanwhile before judging");
                }
                liveness.expire(now, FORGET_AFTER);
            }
            next = beats.next() => {
                let Some(message) = next else { break };
                match wire::decode_heartbeat(&message.payload) {
                    Ok(heartbeat) => {
                        shared.good_message();
                        if heartbeat.node != shared.node {
                            liveness.heard(&heartbeat.node, Instant::now());
                        }
                    }
                    Err(why) => shared.garbage(&message.subject, &why),
                }
            }
            next = syncs.next() => {
                if next.is_none() { break }
                shared.roster_due();
            }
            Some(node) = appeared.recv() => liveness.appeared(&node, Instant::now()),
        }
    }
    if connection.client.connection_state() == State::Connected {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.client.flush()).await;
    }
}

/// Publishes on plain NATS, bounded: a stalled connection (a network cut
/// not noticed yet) must not hold the judge.
async fn publish(connection: &Connection, shared: &Shared, subject: String, payload: Vec<u8>) {
    let bound = shared.config.heartbeat / 2;
    match tokio::time::timeout(bound, connection.client.publish(subject, payload.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(cause = %err, "heartbeat or sync request not sent"),
        Err(_) => debug!("heartbeat or sync request not sent in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);

    #[test]
    fn the_silent_are_declared_dead_once() {
        let start = Instant::now();
        let mut liveness = Liveness::default();
        assert!(liveness.heard("a", start));
        assert!(!liveness.heard("a", start));
        liveness.heard("b", start + TIMEOUT);
        assert!(liveness.reap(start + TIMEOUT, TIMEOUT).is_empty());
        let later = start + TIMEOUT + Duration::from_millis(1);
        assert_eq!(liveness.reap(later, TIMEOUT), ["a"]);
        assert!(liveness.reap(later, TIMEOUT).is_empty());
        // Heard again: back, and it would be asked for its roster.
        assert!(liveness.heard("a", later));
    }

    #[test]
    fn a_late_tick_reads_before_it_judges_but_never_twice_running() {
        let heartbeat = Duration::from_secs(1);
        let quarter = heartbeat / 4;
        let start = Instant::now();
        let mut ticks = Ticks::default();
        assert!(ticks.may_judge(start, heartbeat));
        assert!(ticks.may_judge(start + quarter, heartbeat));
        // The process stalled for 5 s: that tick only reads.
        let back = start + quarter + Duration::from_secs(5);
        assert!(!ticks.may_judge(back, heartbeat));
        assert!(ticks.may_judge(back + quarter, heartbeat));
        // Late at every tick: every other tick still judges.
        let mut at = back + quarter;
        let mut judged = 0;
        for _ in 0..4 {
            at += Duration::from_secs(2);
            judged += usize::from(ticks.may_judge(at, heartbeat));
        }
        assert_eq!(judged, 2);
    }

    #[test]
    fn clocks_restart_after_our_own_outage() {
        let start = Instant::now();
        let mut liveness = Liveness::default();
        liveness.heard("a", start);
        let back = start + TIMEOUT * 10;
        liveness.reset_clocks(back);
        assert!(liveness.reap(back + TIMEOUT, TIMEOUT).is_empty());
    }

    #[test]
    fn a_late_batch_of_the_dead_is_watched_again() {
        let start = Instant::now();
        let mut liveness = Liveness::default();
        liveness.heard("a", start);
        let dead_at = start + TIMEOUT * 2;
        assert_eq!(liveness.reap(dead_at, TIMEOUT), ["a"]);
        liveness.appeared("a", dead_at);
        assert!(liveness.reap(dead_at + TIMEOUT, TIMEOUT).is_empty());
        assert_eq!(liveness.reap(dead_at + TIMEOUT * 2, TIMEOUT), ["a"]);
    }

    #[test]
    fn rosters_are_asked_for_with_backoff() {
        let start = Instant::now();
        let mut liveness = Liveness::default();
        liveness.heard("a", start);
        liveness.heard("b", start);
        assert_eq!(liveness.due_for_sync(start, |node| node == "a"), ["a"]);
        assert!(liveness.due_for_sync(start + SYNC_EVERY / 2, |_| true) == ["b"]);
        assert_eq!(
            liveness.due_for_sync(start + SYNC_EVERY, |node| node == "a"),
            ["a"]
        );
        // Still not come: the pause doubles.
        let again = start + SYNC_EVERY * 2;
        assert!(liveness.due_for_sync(again, |node| node == "a").is_empty());
        assert_eq!(
            liveness.due_for_sync(start + SYNC_EVERY * 3, |node| node == "a"),
            ["a"]
        );
        // Come: the next need is asked at once.
        assert!(liveness.due_for_sync(again, |_| false).is_empty());
        assert_eq!(liveness.due_for_sync(again, |node| node == "a"), ["a"]);
    }

    #[test]
    fn the_dead_are_forgotten() {
        let start = Instant::now();
        let mut liveness = Liveness::default();
        liveness.heard("a", start);
        liveness.heard("b", start);
        liveness.reap(start + TIMEOUT * 2, TIMEOUT);
        liveness.heard("b", start + FORGET_AFTER);
        liveness.expire(start + FORGET_AFTER + Duration::from_secs(1), FORGET_AFTER);
        assert_eq!(liveness.len(), 1);
    }
}
