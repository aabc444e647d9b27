//! # `broadcast`: one `tokio::sync::broadcast` channel, no client set
//!
//! **Ownership.** Nobody keeps a set of clients. Every line goes into one
//! fixed-size ring (`tokio::sync::broadcast`), and each client's writer task
//! holds a receiver with its own read position in that ring. Joining is
//! subscribing; leaving is publishing a departure that the leaver's own
//! writer recognises as its end.
//!
//! Because there is no per-client queue, what would be addressing becomes
//! filtering: each entry carries its sender, and a writer skips its own
//! arrival announcement and stops at its own departure. Everything the
//! client sent before leaving precedes its departure in the ring, so its
//! writer has written its last echo before it stops.
//!
//! **Locks.** The ring is tokio's: a sender takes the ring's tail lock for
//! one slot write and wakes every receiver waiting for it; a receiver takes
//! a slot's read lock to clone the entry. No lock is held across an `.await`
//! here, and the hub holds none of its own.
//!
//! **Slow clients.** The ring never makes a sender wait: it overwrites the
//! oldest entry, and a receiver that falls behind by more than the ring
//! learns how many entries it missed (`Lagged`). That is the slow-client
//! limit in this model, counted in messages rather than bytes:
//! `--slow-client drop` counts the missed messages as skipped, `disconnect`
//! drops the client, and `block` cannot be offered at all. The ring's
//! capacity is derived from `--max-pending` (see [`ring_capacity`]).
//!
//! **Names and presence: a roster beside the ring.** The ring knows only
//! read positions, not who is behind them, so with `--names` or
//! `--announce-present` the hub keeps a roster, name (or `IP:PORT`) to id,
//! under a `parking_lot::Mutex`. A join holds the roster lock while it
//! checks the name, copies the roster as its list, subscribes to the ring,
//! publishes its arrival and adds itself; a leave holds it while it
//! publishes its departure and removes itself. Membership changes thus go
//! through the ring in the roster's order, and a newcomer's receiver starts
//! exactly after the last change its list contains: the ring itself lines
//! the two up. Chat lines never take the roster lock.
//!
//! The guarantee needs every membership entry to reach every receiver, and
//! the ring drops entries for a receiver that falls behind. So with
//! `--announce-present` a receiver that lags is disconnected as too slow
//! under every policy: `--slow-client drop`, which here means "skip what
//! the ring overwrote", cannot be kept together with the guarantee.
//!
//! **History.** The ring cannot be read from an older position, so the
//! history is kept beside it, and its mutex makes the hand-off: each chat
//! line is appended and sent into the ring under it, and a join takes its
//! snapshot and subscribes under it. A line is thus in the snapshot or
//! after the newcomer's read position, never both and never neither. The
//! cost: with `--history`, concurrent senders serialise on that mutex for
//! the length of an append and a ring send (the ring's own tail lock
//! already serialised the send). Lock order: roster, then history.
//!
//! **Ordering.** One ring, one sequence: all recipients see the same total
//! order.
//!
//! **Tasks.** 2n+1: the accept loop, and a reader and a writer per client.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::client::{Client, ClientId, Kick};
use crate::config::{Config, SlowClientPolicy};
use crate::protocol::Message;
use crate::room::history::History;
use crate::room::hub::{Hub, Inbox, Joined, Refused};
use crate::room::outbox::TOO_SLOW;

/// Ring slots for a `--max-pending` of `max_pending` bytes: one slot per
/// 2 KiB, between 1,024 and 65,536. For the default 32 MiB that is 16,384
/// messages, enough for a reader that is merely behind by a 10,000-line burst.
pub(crate) fn ring_capacity(max_pending: usize) -> usize {
    (max_pending / 2048).clamp(1024, 1 << 16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    Everyone,
    /// Everyone but the sender: its arrival.
    Others,
    /// Everyone but the sender, and the end of the sender's own stream.
    Departure,
}

#[derive(Debug, Clone)]
struct Entry {
    from: ClientId,
    audience: Audience,
    message: Option<Message>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct BroadcastHub {
    ring: broadcast::Sender<Entry>,
    /// With `--names` or `--announce-present`: who is in the room.
    roster: Option<Mutex<HashMap<Arc<str>, ClientId>>>,
    /// `--announce-present`: a receiver may not skip anything.
    presence: bool,
    /// With `--history`: the room's last lines.
    history: Option<Arc<History>>,
}

impl Hub for BroadcastHub {
    type Inbox = RingInbox;

    fn new(config: &Config, history: Option<Arc<History>>) -> BroadcastHub {
        let (ring, _) = broadcast::channel(ring_capacity(config.max_pending));
        BroadcastHub {
            ring,
            roster: (config.names || config.announce_present).then(Mutex::default),
            presence: config.announce_present,
            history,
        }
    }

    async fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> Result<Joined<RingInbox>, Refused> {
        let mut roster = self.roster.as_ref().map(|roster| roster.lock());
        let mut present = Vec::new();
        if let Some(roster) = &mut roster {
            if roster.contains_key(&*client.who) {
                return Err(Refused::NameTaken);
            }
            if self.presence {
                present = roster.keys().cloned().collect();
            }
            roster.insert(Arc::clone(&client.who), client.id);
        }
        let (history, receiver) = match &self.history {
            Some(history) => {
                let (snapshot, receiver) = history.snapshot_with(|| self.ring.subscribe());
                (Some(snapshot), receiver)
            }
            None => (None, self.ring.subscribe()),
        };
        self.publish(client.id, Audience::Others, Some(arrival));
        drop(roster);
        let inbox = RingInbox {
            receiver,
            client: Arc::clone(client),
            ended: false,
            strict: self.presence,
        };
        Ok(Joined {
            inbox,
            present,
            history,
        })
    }

    async fn broadcast(&self, from: &Arc<Client>, message: &Message) {
        let publish = || self.publish(from.id, Audience::Everyone, Some(message.clone()));
        match &self.history {
            Some(history) => history.append_with(message, publish).1,
            None => publish(),
        }
    }

    async fn relay(&self, from: &Arc<Client>, message: &Message) {
        self.publish(from.id, Audience::Everyone, Some(message.clone()));
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        let mut roster = self.roster.as_ref().map(|roster| roster.lock());
        // Off the roster before the departure ends the leaver's stream, so
        // that whoever sees its connection close can take its name at once.
        if let Some(roster) = &mut roster {
            if roster.get(&*client.who) == Some(&client.id) {
                roster.remove(&*client.who);
            }
        }
        self.publish(client.id, Audience::Departure, departure);
        drop(roster);
    }
}

impl BroadcastHub {
    fn publish(&self, from: ClientId, audience: Audience, message: Option<Message>) {
        // An error only means nobody is subscribed: nothing to deliver.
        let _ = self.ring.send(Entry {
            from,
            audience,
            message,
        });
    }
}

/// A client's read position in the ring.
#[derive(Debug)]
pub(crate) struct RingInbox {
    receiver: broadcast::Receiver<Entry>,
    client: Arc<Client>,
    ended: bool,
    /// `--announce-present`: a lag is fatal whatever the policy, since the
    /// entries it skips may be arrivals or departures.
    strict: bool,
}

enum Step {
    Deliver(Message),
    Skip,
    End,
}

impl RingInbox {
    fn step(&mut self, entry: Entry) -> Step {
        let mine = entry.from == self.client.id;
        let step = match (entry.audience, entry.message) {
            (Audience::Departure, _) if mine => Step::End,
            (Audience::Others, _) if mine => Step::Skip,
            (_, Some(message)) => Step::Deliver(message),
            (_, None) => Step::Skip,
        };
        if let Step::End = step {
            self.ended = true;
        }
        step
    }

    /// Applies the slow-client policy to a receiver that fell `missed`
    /// entries behind. Returns false if the client must stop here.
    fn lagged(&mut self, missed: u64) -> bool {
        match self.client.policy {
            SlowClientPolicy::Drop if !self.strict => {
                self.client.skip(missed);
                true
            }
            SlowClientPolicy::Drop | SlowClientPolicy::Disconnect | SlowClientPolicy::Block => {
                self.client
                    .kick(Kick::TooSlow, Some(Message::notice(TOO_SLOW)));
                self.ended = true;
                false
            }
        }
    }
}

impl Inbox for RingInbox {
    async fn recv(&mut self) -> Option<Message> {
        while !self.ended {
            match self.receiver.recv().await {
                Ok(entry) => match self.step(entry) {
                    Step::Deliver(message) => return Some(message),
                    Step::Skip => {}
                    Step::End => return None,
                },
                Err(RecvError::Lagged(missed)) => {
                    if !self.lagged(missed) {
                        return None;
                    }
                }
                Err(RecvError::Closed) => self.ended = true,
            }
        }
        None
    }

    fn try_recv(&mut self) -> Option<Message> {
        while !self.ended {
            match self.receiver.try_recv() {
                Ok(entry) => match self.step(entry) {
                    Step::Deliver(message) => return Some(message),
                    Step::Skip => {}
                    Step::End => return None,
                },
                Err(TryRecvError::Lagged(missed)) => {
                    if !self.lagged(missed) {
                        return None;
                    }
                }
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Closed) => self.ended = true,
            }
        }
        None
    }

    fn written(&mut self, _bytes: usize) {}
}
