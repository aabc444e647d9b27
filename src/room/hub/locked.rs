//! # `locked`: one `RwLock<HashMap>` of outboxes, the classic shared state
//!
//! **Ownership.** The client set is one `parking_lot::RwLock<HashMap<ClientId,
//! Outbox>>`, as in tokio's `examples/chat.rs` (which uses a `Mutex`). Each
//! reader task registers its outbox, fans its own lines out, and removes
//! its outbox when it leaves.
//!
//! **Locks.** Fanning out holds the *read* lock for one pass over the map,
//! so readers fan out in parallel; join and leave take the *write* lock for
//! one insert or remove, and wait for every fan-out in progress to finish.
//! That is the difference from [`sharded`](super::sharded): one lock word
//! shared by every reader and writer of the map instead of one per shard.
//! Under the lock the only work is [`Outbox::offer`] (a budget check and a
//! non-blocking push); no guard is held across an `.await`, and `offer`
//! never takes the lock again, so there is no deadlock. Under
//! `--slow-client block` the recipients are copied out first and the lock
//! is released before any wait.
//!
//! **Names and presence.** The lock that guards the map is also what makes
//! the two options atomic. With `--names` the write lock that inserts a
//! client first checks a set of names beside the map, so of two joins with
//! one name the first to get the lock wins. With `--announce-present` the
//! join takes the list of who is present, queues its arrival for each of
//! them and inserts itself under one write lock, and a leave queues its
//! departure and removes itself under another: no membership change can fall
//! between a newcomer's list and its first announcement. The cost is that a
//! join or a leave holds the write lock for one pass over the room instead
//! of for one insert, and every fan-out waits for it.
//!
//! **History.** The same lock makes `--history`'s hand-off: a chat line is
//! appended to the history (under the history's own short mutex) while its
//! fan-out holds the read lock, and a join takes its snapshot under the
//! write lock that inserts it, when no fan-out is in progress. A line is
//! thus either appended and fanned out wholly before the join (in the
//! snapshot, not in the newcomer's queue) or wholly after (in its queue,
//! not in the snapshot). The cost is the history's mutex, taken once per
//! read's worth of lines inside the read lock, where concurrent fan-outs
//! now queue for it for the length of one append.
//!
//! **Ordering.** Each recipient sees each sender's lines in the order sent;
//! concurrent senders can interleave differently at different recipients.
//!
//! **Tasks.** 2n+1: the accept loop, and a reader and a writer per client.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::client::{Client, ClientId};
use crate::config::{Config, QueueKind, SlowClientPolicy};
use crate::protocol::Message;
use crate::room::history::History;
use crate::room::hub::{fan_out, Hub, Joined, Refused};
use crate::room::outbox::{self, Outbox, QueueInbox};

/// What the lock guards.
#[derive(Debug, Default)]
struct Room {
    clients: HashMap<ClientId, Outbox>,
    /// With `--names`: the names of everyone in `clients`.
    names: HashSet<Arc<str>>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct LockedHub {
    room: RwLock<Room>,
    names: bool,
    presence: bool,
    /// With `--history`: the room's last lines.
    history: Option<Arc<History>>,
    senders_wait: bool,
    queue: QueueKind,
}

impl Hub for LockedHub {
    type Inbox = QueueInbox;

    fn new(config: &Config, history: Option<Arc<History>>) -> LockedHub {
        LockedHub {
            history,
            room: RwLock::new(Room::default()),
            names: config.names,
            presence: config.announce_present,
            senders_wait: config.slow_client == SlowClientPolicy::Block,
            queue: config.queue,
        }
    }

    async fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> Result<Joined<QueueInbox>, Refused> {
        let (outbox, inbox) = outbox::channel(Arc::clone(client), self.queue);
        let (present, history) = {
            let mut room = self.room.write();
            if self.names && !room.names.insert(Arc::clone(&client.who)) {
                return Err(Refused::NameTaken);
            }
            let present = if self.presence {
                Outbox::announce_to_each(room.clients.values(), &arrival)
            } else {
                Vec::new()
            };
            room.clients.insert(client.id, outbox);
            // Under the write lock: no fan-out is between its append and
            // its last offer.
            let history = self.history.as_ref().map(|history| history.snapshot());
            (present, history)
        };
        if !self.presence {
            self.fan_out(&arrival, Some(client.id), false).await;
        }
        Ok(Joined {
            inbox,
            present,
            history,
        })
    }

    async fn broadcast(&self, _from: &Arc<Client>, message: &Message) {
        self.fan_out(message, None, true).await;
    }

    async fn relay(&self, _from: &Arc<Client>, message: &Message) {
        self.fan_out(message, None, false).await;
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        // Announce first, as in `sharded`: the removal lets the leaver's
        // connection close (see `Hub::leave`).
        if !self.presence {
            if let Some(departure) = &departure {
                self.fan_out(departure, Some(client.id), false).await;
            }
        }
        let mut room = self.room.write();
        if self.presence {
            if let Some(departure) = &departure {
                fan_out::announce_to_all(room.clients.values(), departure, client.id);
            }
        }
        room.clients.remove(&client.id);
        if self.names {
            room.names.remove(&*client.who);
        }
    }
}

impl LockedHub {
    /// Queues `message` for everyone but `except`; a chat line (`said`)
    /// goes into the history under the same read lock.
    async fn fan_out(&self, message: &Message, except: Option<ClientId>, said: bool) {
        if self.senders_wait {
            // `--slow-client block`: copy the recipients out under the read
            // lock, release it, then wait for room in each queue. The line
            // is appended with the recipients copied under one read lock:
            // whoever joins later finds it in its snapshot.
            let recipients = {
                let room = self.room.read();
                self.remember(message, said);
                fan_out::recipients(room.clients.values(), except)
            };
            return Box::pin(fan_out::send_to_each(recipients, message)).await;
        }
        let room = self.room.read();
        self.remember(message, said);
        fan_out::offer_to_all(room.clients.values(), message, except);
    }

    fn remember(&self, message: &Message, said: bool) {
        if let (true, Some(history)) = (said, &self.history) {
            history.append(message);
        }
    }
}
