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
//! **Ordering.** Each recipient sees each sender's lines in the order sent;
//! concurrent senders can interleave differently at different recipients.
//!
//! **Tasks.** 2n+1: the accept loop, and a reader and a writer per client.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::client::{Client, ClientId};
use crate::config::{Config, QueueKind, SlowClientPolicy};
use crate::hub::Hub;
use crate::outbox::{self, Outbox, QueueInbox};
use crate::protocol::Message;

/// See the module documentation.
#[derive(Debug)]
pub struct LockedHub {
    clients: RwLock<HashMap<ClientId, Outbox>>,
    senders_wait: bool,
    queue: QueueKind,
}

impl Hub for LockedHub {
    type Inbox = QueueInbox;

    fn new(config: &Config) -> LockedHub {
        LockedHub {
            clients: RwLock::new(HashMap::new()),
            senders_wait: config.slow_client == SlowClientPolicy::Block,
            queue: config.queue,
        }
    }

    async fn join(&self, client: &Arc<Client>, arrival: Message) -> QueueInbox {
        let (outbox, inbox) = outbox::channel(Arc::clone(client), self.queue);
        self.clients.write().insert(client.id, outbox);
        self.fan_out(&arrival, Some(client.id)).await;
        inbox
    }

    async fn broadcast(&self, _from: &Arc<Client>, message: &Message) {
        self.fan_out(message, None).await;
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        // Announce first, as in `sharded`: the removal lets the leaver's
        // connection close (see `Hub::leave`).
        if let Some(departure) = departure {
            self.fan_out(&departure, Some(client.id)).await;
        }
        self.clients.write().remove(&client.id);
    }
}

impl LockedHub {
    async fn fan_out(&self, message: &Message, except: Option<ClientId>) {
        if self.senders_wait {
            // Boxed: this future is part of every reader's state, and only
            // `--slow-client block` needs the room to wait.
            return Box::pin(self.fan_out_waiting(message, except)).await;
        }
        let clients = self.clients.read();
        for (id, outbox) in clients.iter() {
            if Some(*id) != except {
                outbox.offer(message);
            }
        }
    }

    /// `--slow-client block`: copy the recipients out, release the lock,
    /// then wait for room in each queue in turn.
    async fn fan_out_waiting(&self, message: &Message, except: Option<ClientId>) {
        let recipients: Vec<Outbox> = self
            .clients
            .read()
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .map(|(_, outbox)| outbox.clone())
            .collect();
        for recipient in &recipients {
            recipient.send(message).await;
        }
    }
}
