//! Who is on the other nodes, as this node's clients have been told: one
//! small state machine per remote node, driven only by the consumer, in
//! stream order (its batches) and at the liveness judge's verdicts (which
//! the consumer applies between two batches). Every arrival or departure a
//! local client hears of another node's client is decided here, so it is
//! ordered with that node's lines by construction.
//!
//! Per remote node:
//! - **Syncing** (never heard of, or its events have a gap: it dropped
//!   some, or we could not read them): its events are held, at most
//!   [`HELD_MAX`], until its [`Change::Roster`] arrives; then the roster as
//!   of the first held event is rebuilt by undoing the held arrivals and
//!   departures, what local clients were told is brought to it (departures
//!   and arrivals of the difference), and the held events are delivered in
//!   order.
//! - **Visible**: arrivals and departures are applied and announced, lines
//!   delivered; a roster is applied as a difference.
//! - **Dead** (the judge's verdict): every client of it that local clients
//!   were told of is announced as gone; its next batch first announces
//!   its roster again as arrivals (it was cut off, not dead), then is
//!   delivered. Its roster is exact all along because the stream carries
//!   every change.
//! - **Left** (its [`Change::Leaving`]): it shut down after its departures.
//!
//! Batch numbers de-duplicate in every state. A node not heard of for
//! [`FORGET_AFTER`] that is not visible is forgotten, so the map is bounded
//! by the nodes of the last ten minutes.
//!
//! Plain data, no I/O, time passed in: unit-tested below.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::wire::{Change, Checked};
use crate::protocol::Message;

/// A node not visible and not heard of (no batch) for this long is
/// forgotten. Well past the stream's duplicate window (at most 2 min), so
/// a batch stored twice by a retry is still recognised.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Events held per node while its roster is awaited; past it the oldest
/// are dropped and counted as missed.
pub(crate) const HELD_MAX: usize = 4096;

/// What the consumer does after one batch or verdict: send `messages` to
/// the local clients, in order.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    pub messages: Vec<Shown>,
    /// Clients announced as gone because their node was declared dead
    /// (their names are freed under `--names`).
    pub departed: Vec<Arc<str>>,
    /// Events given up (held past [`HELD_MAX`], or cut off by a gap).
    pub missed: u64,
    /// The batch had been delivered already.
    pub duplicate: bool,
    /// Batches with something said or done in them now delivered: this
    /// one, and those held until now.
    pub batches: u64,
    /// The node came into view from nothing or from the dead: the judge
    /// should watch it (again).
    pub appeared: bool,
}

/// One message for the local clients, and whether it is a chat line (room
/// history keeps those) or an arrival or departure (history does not).
#[derive(Debug)]
pub(crate) enum Shown {
    Line(Message),
    Membership(Message),
}

impl Shown {
    #[cfg(test)]
    pub(crate) fn message(&self) -> &Message {
        match self {
            Shown::Line(message) | Shown::Membership(message) => message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Syncing,
    Visible,
    Dead,
    Left,
}

struct RemoteNode {
    state: State,
    /// The clients local clients were told are there (their view).
    announced: BTreeSet<Arc<str>>,
    /// The node's clients as of event `applied`; exact while `known`.
    tracked: BTreeSet<Arc<str>>,
    known: bool,
    applied: u64,
    /// The newest batch number delivered.
    last_batch: u64,
    held: VecDeque<Checked>,
    /// Batches with chat events among those held.
    held_batches: u64,
    last_heard: Instant,
}

/// Every remote node this node has heard of in the stream.
#[derive(Default)]
pub(crate) struct Roster {
    nodes: HashMap<String, RemoteNode>,
}

impl Roster {
    /// One stored batch of `node`'s events, in stream order.
    pub(crate) fn batch(
        &mut self,
        node: &str,
        batch: u64,
        events: Vec<Checked>,
        now: Instant,
    ) -> Delivery {
        let mut out = Delivery::default();
        let remote = self.nodes.entry(node.to_string()).or_insert_with(|| {
            out.appeared = true;
            RemoteNode {
                state: State::Syncing,
                announced: BTreeSet::new(),
                tracked: BTreeSet::new(),
                known: false,
                applied: 0,
                last_batch: 0,
                held: VecDeque::new(),
                held_batches: 0,
                last_heard: now,
            }
        });
        remote.last_heard = now;
        if batch <= remote.last_batch {
            out.duplicate = true;
            return out;
        }
        remote.last_batch = batch;
        match remote.state {
            State::Left => return out,
            State::Dead => {
                out.appeared = true;
                if remote.known {
                    // Back from the dead before anything it says.
                    for who in &remote.tracked {
                        out.messages.push(Shown::Membership(Message::arrived(who)));
                    }
                    remote.announced = remote.tracked.clone();
                    remote.state = State::Visible;
                } else {
                    remote.state = State::Syncing;
                }
            }
            State::Syncing | State::Visible => {}
        }
        let mut chat = false;
        let mut held_chat = false;
        for event in events {
            let chat_event = matches!(
                event.change,
                Change::Arrived(_) | Change::Left(_) | Change::Lines(..)
            );
            chat |= chat_event;
            held_chat |= chat_event && remote.state == State::Syncing;
            remote.event(event, &mut out);
        }
        if remote.state == State::Syncing {
            remote.held_batches += u64::from(held_chat);
        } else if chat {
            out.batches += 1;
        }
        out
    }

    /// The judge declared `node` dead: its clients in view are gone.
    pub(crate) fn dead(&mut self, node: &str, now: Instant) -> Delivery {
        let mut out = Delivery::default();
        let Some(remote) = self.nodes.get_mut(node) else {
            return out;
        };
        if matches!(remote.state, State::Visible | State::Syncing) {
            warn!(%node, clients = remote.announced.len(), "node silent: announcing its clients as gone");
            for who in std::mem::take(&mut remote.announced) {
                out.messages.push(Shown::Membership(Message::left(&who)));
                out.departed.push(who);
            }
            remote.state = State::Dead;
            remote.last_heard = now;
        }
        out
    }

    /// Forgets nodes out of view that were not heard of for `age`.
    pub(crate) fn expire(&mut self, now: Instant, age: Duration) {
        self.nodes.retain(|_, remote| {
            let visible = !remote.announced.is_empty() || remote.state == State::Visible;
            visible || now.duration_since(remote.last_heard) <= age
        });
    }

    /// Whether `node` is alive as far as the stream says.
    pub(crate) fn is_live(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|remote| matches!(remote.state, State::Visible | State::Syncing))
    }

    /// Whether `node` was declared dead or said it was leaving.
    pub(crate) fn is_gone(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|remote| matches!(remote.state, State::Dead | State::Left))
    }

    /// Whether this node should ask `node`, which the judge hears, for
    /// its roster: it is not in view (new, or back from the dead with
    /// nothing to say) or its events have a gap.
    pub(crate) fn needs_sync(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_none_or(|remote| remote.state != State::Visible)
    }

    /// Every remote client in local clients' view, sorted.
    pub(crate) fn clients(&self) -> Vec<Arc<str>> {
        let mut clients: Vec<Arc<str>> = self
            .nodes
            .values()
            .flat_map(|remote| remote.announced.iter().cloned())
            .collect();
        clients.sort();
        clients
    }

    /// How many nodes are remembered (bounded by [`Roster::expire`]).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.nodes.len()
    }
}

impl RemoteNode {
    fn event(&mut self, event: Checked, out: &mut Delivery) {
        match self.state {
            State::Visible => {
                if event.seq <= self.applied {
                    return;
                }
                let roster = matches!(event.change, Change::Roster(_));
                if event.seq != self.applied + 1 && !roster {
                    // A gap: what we know of its clients may be wrong
                    // until its roster comes (it pushes one after dropping
                    // events; the judge asks for one meanwhile).
                    self.state = State::Syncing;
                    self.known = false;
                    self.hold(event, out);
                    return;
                }
                self.apply(event, out);
            }
            State::Syncing => match event.change {
                Change::Roster(clients) => self.resolve(event.seq, clients, out),
                Change::Leaving => self.leave(out),
                _ => self.hold(event, out),
            },
            // A batch revives the dead first; the left say nothing more.
            State::Dead | State::Left => {}
        }
    }

    /// Applies one event in order to a visible node's roster and view.
    fn apply(&mut self, event: Checked, out: &mut Delivery) {
        self.applied = event.seq;
        match event.change {
            Change::Arrived(who) => {
                if self.tracked.insert(Arc::clone(&who)) && self.announced.insert(Arc::clone(&who))
                {
                    out.messages.push(Shown::Membership(Message::arrived(&who)));
                }
            }
            Change::Left(who) => {
                self.tracked.remove(&who);
                if self.announced.remove(&who) {
                    out.messages.push(Shown::Membership(Message::left(&who)));
                }
            }
            Change::Lines(_, message) => out.messages.push(Shown::Line(message)),
            Change::Roster(clients) => {
                let clients: BTreeSet<Arc<str>> = clients.into_iter().collect();
                self.show(&clients, out);
                self.tracked = clients;
            }
            Change::Leaving => self.leave(out),
        }
    }

    /// Brings the view to `clients`: departures of the missing, then
    /// arrivals of the new, each sorted.
    fn show(&mut self, clients: &BTreeSet<Arc<str>>, out: &mut Delivery) {
        for who in self.announced.difference(clients) {
            out.messages.push(Shown::Membership(Message::left(who)));
        }
        for who in clients.difference(&self.announced) {
            out.messages.push(Shown::Membership(Message::arrived(who)));
        }
        self.announced = clients.clone();
    }

    fn hold(&mut self, event: Checked, out: &mut Delivery) {
        if self.held.back().is_some_and(|last| event.seq <= last.seq) {
            return;
        }
        if self.held.len() >= HELD_MAX {
            self.held.pop_front();
            out.missed += 1;
        }
        self.held.push_back(event);
    }

    /// The roster of a syncing node came, as of its event `seq`.
    fn resolve(&mut self, seq: u64, clients: Vec<Arc<str>>, out: &mut Delivery) {
        // Only the held events that run without a gap up to the roster
        // can be replayed against it; earlier ones are given up.
        let mut keep_from = self.held.len();
        let mut next = seq;
        for (index, held) in self.held.iter().enumerate().rev() {
            if held.seq + 1 != next {
                break;
            }
            next = held.seq;
            keep_from = index;
        }
        out.missed += keep_from as u64;
        out.batches += std::mem::take(&mut self.held_batches);
        let kept: Vec<Checked> = self.held.drain(..).skip(keep_from).collect();
        // The roster as of just before the first kept event.
        let mut before: BTreeSet<Arc<str>> = clients.iter().cloned().collect();
        for held in kept.iter().rev() {
            match &held.change {
                Change::Arrived(who) => {
                    before.remove(who);
                }
                Change::Left(who) => {
                    before.insert(Arc::clone(who));
                }
                _ => {}
            }
        }
        self.show(&before, out);
        self.tracked = before;
        self.known = true;
        self.state = State::Visible;
        self.applied = next - 1;
        for held in kept {
            self.apply(held, out);
        }
        self.apply(
            Checked {
                seq,
                change: Change::Roster(clients),
            },
            out,
        );
    }

    fn leave(&mut self, out: &mut Delivery) {
        for who in std::mem::take(&mut self.announced) {
            out.messages.push(Shown::Membership(Message::left(&who)));
        }
        self.tracked.clear();
        self.held.clear();
        self.held_batches = 0;
        self.state = State::Left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaa";

    fn arrived(seq: u64, who: &str) -> Checked {
        Checked {
            seq,
            change: Change::Arrived(who.into()),
        }
    }

    fn left(seq: u64, who: &str) -> Checked {
        Checked {
            seq,
            change: Change::Left(who.into()),
        }
    }

    fn lines(seq: u64, who: &str) -> Checked {
        Checked {
            seq,
            change: Change::Lines(who.into(), Message::notice(&format!("{who}: {seq}"))),
        }
    }

    fn roster(seq: u64, clients: &[&str]) -> Checked {
        Checked {
            seq,
            change: Change::Roster(clients.iter().map(|&who| who.into()).collect()),
        }
    }

    fn said(delivery: &Delivery) -> Vec<String> {
        delivery
            .messages
            .iter()
            .map(|shown| shown.message().as_str().trim_end().to_string())
            .collect()
    }

    /// A node seen from its first event (its empty roster).
    fn visible(roster_of: &mut Roster, now: Instant) {
        let first = roster_of.batch(A, 1, vec![roster(1, &[])], now);
        assert!(first.messages.is_empty() && first.appeared);
    }

    #[test]
    fn arrivals_lines_departures_in_order() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, now);
        let out = rooms.batch(
            A,
            2,
            vec![arrived(2, "x"), lines(3, "x"), left(4, "x")],
            now,
        );
        assert_eq!(said(&out), ["x has arrived", "x: 3", "x has left"]);
        assert!(rooms.clients().is_empty());
    }

    #[test]
    fn a_node_heard_first_mid_stream_waits_for_its_roster() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        // x and y were there before; z arrives, x speaks, y leaves, all
        // before the roster (as of event 13) this node asked for.
        let out = rooms.batch(A, 7, vec![arrived(10, "z"), lines(11, "x")], now);
        assert!(out.messages.is_empty());
        assert!(rooms.needs_sync(A));
        let out = rooms.batch(A, 8, vec![left(12, "y"), roster(13, &["x", "z"])], now);
        assert_eq!(
            said(&out),
            [
                "x has arrived",
                "y has arrived",
                "z has arrived",
                "x: 11",
                "y has left"
            ]
        );
        assert!(!rooms.needs_sync(A));
        assert_eq!(rooms.clients(), [Arc::from("x"), Arc::from("z")]);
        let out = rooms.batch(A, 9, vec![lines(14, "z")], now);
        assert_eq!(said(&out), ["z: 14"]);
    }

    #[test]
    fn a_gap_holds_until_the_roster_then_shows_the_difference() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, now);
        let out = rooms.batch(A, 2, vec![arrived(2, "x"), arrived(3, "y")], now);
        assert_eq!(said(&out), ["x has arrived", "y has arrived"]);
        // Events 4..=6 were dropped by the node (y left, w came and went):
        let out = rooms.batch(A, 3, vec![lines(7, "x")], now);
        assert!(out.messages.is_empty());
        assert!(rooms.needs_sync(A));
        let out = rooms.batch(A, 4, vec![roster(8, &["x"])], now);
        assert_eq!(said(&out), ["y has left", "x: 7"]);
    }

    #[test]
    fn the_dead_return_before_their_backlog() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, now);
        rooms.batch(A, 2, vec![arrived(2, "x"), arrived(3, "y")], now);
        let out = rooms.dead(A, now);
        assert_eq!(said(&out), ["x has left", "y has left"]);
        assert_eq!(out.departed.len(), 2);
        assert!(rooms.is_gone(A) && rooms.clients().is_empty());
        // Declared twice: nothing more.
        assert!(rooms.dead(A, now).messages.is_empty());
        // Its backlog, said while it was cut off.
        let out = rooms.batch(A, 3, vec![lines(4, "x"), left(5, "y"), lines(6, "x")], now);
        assert!(out.appeared);
        assert_eq!(
            said(&out),
            [
                "x has arrived",
                "y has arrived",
                "x: 4",
                "y has left",
                "x: 6"
            ]
        );
        assert!(rooms.is_live(A));
    }

    /// Issue 18, finding 6: a node marked gone bypassed de-duplication.
    #[test]
    fn duplicates_are_skipped_in_every_state() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        // Syncing.
        rooms.batch(A, 5, vec![lines(5, "x")], now);
        assert!(rooms.batch(A, 5, vec![lines(5, "x")], now).duplicate);
        rooms.batch(A, 6, vec![roster(6, &["x"])], now);
        // Visible.
        assert!(rooms.batch(A, 6, vec![roster(6, &["x"])], now).duplicate);
        // Dead.
        rooms.dead(A, now);
        let out = rooms.batch(A, 6, vec![lines(7, "x")], now);
        assert!(out.duplicate && out.messages.is_empty());
        assert!(rooms.is_gone(A));
        // Left.
        let out = rooms.batch(
            A,
            7,
            vec![
                left(7, "x"),
                Checked {
                    seq: 8,
                    change: Change::Leaving,
                },
            ],
            now,
        );
        assert_eq!(said(&out), ["x has arrived", "x has left"]);
        assert!(rooms.batch(A, 7, vec![lines(9, "x")], now).duplicate);
        assert!(rooms
            .batch(A, 8, vec![lines(9, "x")], now)
            .messages
            .is_empty());
    }

    #[test]
    fn nodes_out_of_view_are_forgotten() {
        let start = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, start);
        rooms.batch(A, 2, vec![arrived(2, "x")], start);
        rooms.batch("bbbbbbbbbbbbbbbb", 1, vec![lines(3, "y")], start);
        rooms.dead(A, start);
        rooms.expire(start + FORGET_AFTER, FORGET_AFTER);
        assert_eq!(rooms.len(), 2);
        rooms.expire(start + FORGET_AFTER + Duration::from_secs(1), FORGET_AFTER);
        assert_eq!(rooms.len(), 0);
        // Heard again: a stranger to be synced.
        rooms.batch(A, 3, vec![lines(4, "x")], start);
        assert!(rooms.needs_sync(A));
    }

    #[test]
    fn visible_nodes_are_never_forgotten() {
        let start = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, start);
        rooms.batch(A, 2, vec![arrived(2, "x")], start);
        rooms.expire(start + FORGET_AFTER * 3, FORGET_AFTER);
        assert_eq!(rooms.len(), 1);
    }

    #[test]
    fn held_events_are_bounded() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        let mut missed = 0;
        for seq in 1..=(HELD_MAX as u64 + 10) {
            missed += rooms.batch(A, seq, vec![lines(seq, "x")], now).missed;
        }
        assert_eq!(missed, 10);
        let out = rooms.batch(
            A,
            HELD_MAX as u64 + 11,
            vec![roster(HELD_MAX as u64 + 11, &["x"])],
            now,
        );
        assert_eq!(out.messages.len(), 1 + HELD_MAX);
    }

    #[test]
    fn a_leaving_node_is_not_mourned_twice() {
        let now = Instant::now();
        let mut rooms = Roster::default();
        visible(&mut rooms, now);
        rooms.batch(A, 2, vec![arrived(2, "x")], now);
        let out = rooms.batch(
            A,
            3,
            vec![
                left(3, "x"),
                Checked {
                    seq: 4,
                    change: Change::Leaving,
                },
            ],
            now,
        );
        assert_eq!(said(&out), ["x has left"]);
        assert!(rooms.is_gone(A));
        assert!(rooms.dead(A, now).messages.is_empty());
    }
}
