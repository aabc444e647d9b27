//! # `sharded` (the default): a `DashMap` of outboxes, no broadcaster
//!
//! **Ownership.** The client set is a `DashMap<ClientId, Outbox>` shared by
//! every connection. Each connection's reader task registers its own outbox
//! on join, removes it on leave, and fans each of its lines out itself. No
//! task owns the set and no task relays messages.
//!
//! **Locks.** A `DashMap` is a fixed array of shards, each a small
//! `RwLock<HashMap>`. Fanning out walks the shards one after another under
//! each shard's *read* lock, so readers fan out in parallel; join and leave
//! take one shard's *write* lock for one insert or remove. While a guard is
//! held the only work is [`Outbox::offer`]: a budget check and a
//! non-blocking push onto the client's queue (the swap queue takes its own
//! lock for that one push). No guard is ever held across an `.await`, and
//! neither `offer` nor a client's writer, which holds only its queue's lock,
//! ever touches the map while holding a lock of its own: locks are always
//! taken map first, queue second, so there is no cycle and no deadlock. Under `--slow-client block`, where sending may wait, the
//! recipients are first copied out of the map and the map is not held at
//! all while waiting.
//!
//! **Names.** With `--names` a second `DashMap`, name to client id, holds
//! the names in use. A join claims its name through that map's entry API,
//! which holds the name's shard's write lock between the check and the
//! insert: of two joins with one name exactly one finds the entry vacant.
//! The name is freed after the departure is announced, before the outbox
//! is removed (which lets the leaver's connection close).
//!
//! **Presence.** `--announce-present` needs each newcomer's list, its
//! arrival announcement and its insert to happen with no other membership
//! change in between, which a map of independent shards cannot give: a
//! newcomer walking the shards could list someone whose arrival is still
//! being fanned out, or miss a leaver's departure. So joins and leaves (and
//! only they) take one `membership` mutex, and do their whole step under
//! it: walk every shard once to list the present and queue the arrival
//! (or, leaving, the departure) for each, then insert (or remove) the
//! client. Chat fan-out never takes the mutex, so the lines of the room are
//! not serialised; only membership changes are, and each holds the mutex
//! for one pass over the room. Lock order: `membership`, then a shard, then
//! a client's queue, so there is still no cycle. The mutex is a blocking
//! (`parking_lot`) one, as the shards' locks are: the walk has no `.await`,
//! so a join that waits for it blocks its worker thread for at most the
//! walks queued ahead of it.
//!
//! **History.** `--history` must not add a global lock to a model whose
//! point is to have none, so the hand-off is made by numbers instead: a
//! chat line is appended to the history (which numbers it, under the
//! history's own short mutex) before its fan-out walks the map, and a join
//! inserts its outbox first and snapshots the history after. A line
//! numbered after the snapshot began its walk after the insert, so it
//! reaches the newcomer's queue: no gap. A line numbered up to the
//! snapshot's last may reach the queue too, if its walk was still under
//! way; the newcomer's inbox drops every line numbered up to that last
//! ([`QueueInbox::seen_through`]): no duplicate. Without `--history`
//! nothing is numbered and the inbox compares one zero per message.
//!
//! **Ordering.** Each sender pushes its own lines in order into every queue,
//! so every recipient sees each sender's lines in the order sent. Two
//! senders fan out concurrently, and one may reach shard 0 first while the
//! other reaches shard 1 first, so two recipients can see two senders'
//! lines interleaved differently: there is no total order.
//!
//! **Tasks.** 2n+1: the accept loop, and a reader and a writer per client.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::client::{Client, ClientId};
use crate::config::{Config, QueueKind, SlowClientPolicy};
use crate::protocol::Message;
use crate::room::history::History;
use crate::room::hub::{fan_out, Hub, Joined, Refused};
use crate::room::outbox::{self, Outbox, QueueInbox};

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct ShardedHub {
    clients: DashMap<ClientId, Outbox>,
    /// With `--names`: who holds each name.
    names: Option<DashMap<Arc<str>, ClientId>>,
    /// With `--announce-present`: held by joins and leaves, never by a fan-out.
    membership: Option<Mutex<()>>,
    /// With `--history`: the room's last lines.
    history: Option<Arc<History>>,
    senders_wait: bool,
    queue: QueueKind,
}

impl Hub for ShardedHub {
    type Inbox = QueueInbox;

    fn new(config: &Config, history: Option<Arc<History>>) -> ShardedHub {
        ShardedHub {
            history,
            clients: DashMap::new(),
            names: config.names.then(DashMap::new),
            membership: config.announce_present.then(|| Mutex::new(())),
            senders_wait: config.slow_client == SlowClientPolicy::Block,
            queue: config.queue,
        }
    }

    async fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> Result<Joined<QueueInbox>, Refused> {
        if let Some(names) = &self.names {
            match names.entry(Arc::clone(&client.who)) {
                Entry::Occupied(_) => return Err(Refused::NameTaken),
                Entry::Vacant(vacant) => {
                    vacant.insert(client.id);
                }
            }
        }
        let (outbox, mut inbox) = outbox::channel(Arc::clone(client), self.queue);
        let Some(membership) = &self.membership else {
            // Register first, then announce to everyone else: two clients
            // joining at once both end up seeing each other arrive.
            self.clients.insert(client.id, outbox);
            let history = self.snapshot_after_insert(&mut inbox);
            self.fan_out(&arrival, Some(client.id)).await;
            return Ok(Joined {
                inbox,
                present: Vec::new(),
                history,
            });
        };
        let _changing = membership.lock();
        let present = Outbox::announce_to_each(self.clients.iter(), &arrival);
        // Only after the walk: inserting takes a shard's write lock, which
        // the walk's read guard on that shard would deadlock against.
        self.clients.insert(client.id, outbox);
        let history = self.snapshot_after_insert(&mut inbox);
        Ok(Joined {
            inbox,
            present,
            history,
        })
    }

    async fn broadcast(&self, _from: &Arc<Client>, message: &Message) {
        // Numbered before the walk begins: see "History" above.
        if let Some(history) = &self.history {
            history.append(message);
        }
        self.fan_out(message, None).await;
    }

    async fn relay(&self, _from: &Arc<Client>, message: &Message) {
        self.fan_out(message, None).await;
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        // Announce first: removing our outbox lets the client's writer finish
        // and close the connection, and the departure must already be queued
        // for everyone by then (see `Hub::leave`).
        // The name is freed before the removal too, so that a client that
        // saw the leaver's connection close can take it at once.
        match &self.membership {
            None => {
                if let Some(departure) = departure {
                    self.fan_out(&departure, Some(client.id)).await;
                }
                self.release_name(client);
                self.clients.remove(&client.id);
            }
            Some(membership) => {
                let _changing = membership.lock();
                if let Some(departure) = &departure {
                    fan_out::announce_to_all(self.clients.iter(), departure, client.id);
                }
                self.release_name(client);
                self.clients.remove(&client.id);
            }
        }
    }
}

impl ShardedHub {
    /// The newcomer's history, taken after its outbox is in the map; its
    /// inbox then drops the live copies of what the snapshot holds.
    fn snapshot_after_insert(
        &self,
        inbox: &mut QueueInbox,
    ) -> Option<crate::room::history::Snapshot> {
        let snapshot = self.history.as_ref()?.snapshot();
        inbox.seen_through(snapshot.last_seq);
        Some(snapshot)
    }

    fn release_name(&self, client: &Client) {
        if let Some(names) = &self.names {
            names.remove_if(&*client.who, |_, holder| *holder == client.id);
        }
    }

    /// Queues `message` for everyone but `except`. The walk holds one
    /// `DashMap` shard's read guard at a time, never the whole map.
    async fn fan_out(&self, message: &Message, except: Option<ClientId>) {
        if self.senders_wait {
            // `--slow-client block`: copy the recipients out (the shard
            // guards are released when the copy is made), then wait.
            let recipients = fan_out::recipients(self.clients.iter(), except);
            return Box::pin(fan_out::send_to_each(recipients, message)).await;
        }
        fan_out::offer_to_all(self.clients.iter(), message, except);
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::protocol::ChatBatch;
    use crate::room::hub::Inbox;

    fn client(id: u64, config: &Config) -> Arc<Client> {
        let who: Arc<str> = format!("127.0.0.1:{id}").into();
        Arc::new(Client::new(
            ClientId(id),
            who,
            config,
            &CancellationToken::new(),
            None,
        ))
    }

    fn said(text: &str) -> Message {
        let mut batch = ChatBatch::default();
        batch.push("127.0.0.1:1", text.as_bytes());
        batch.take().unwrap_or_else(|| Message::notice(text))
    }

    /// The seam `broadcast` leaves open: a line numbered before a join's
    /// snapshot but fanned out after its insert reaches the newcomer's
    /// queue and is in its block; the inbox must drop the live copy. And a
    /// line numbered after the snapshot must reach it live.
    #[tokio::test]
    async fn a_line_in_the_block_is_not_delivered_again() {
        let config = Config {
            history: 10,
            ..Config::default()
        };
        let history = Arc::new(History::new(&config).unwrap_or_else(|| unreachable!()));
        let hub = ShardedHub::new(&config, Some(Arc::clone(&history)));
        let sender = client(1, &config);
        let mut sender_inbox = hub
            .join(&sender, Message::arrived(&sender.who))
            .await
            .unwrap_or_else(|_| unreachable!())
            .inbox;
        let before = said("before");
        history.append(&before); // broadcast's first step...
        let newcomer = client(2, &config);
        let joined = hub
            .join(&newcomer, Message::arrived(&newcomer.who))
            .await
            .unwrap_or_else(|_| unreachable!());
        hub.fan_out(&before, None).await; // ... and its second, after the join
        hub.broadcast(&sender, &said("after")).await;
        let block = joined.history.unwrap_or_default();
        assert_eq!(block.messages, vec![before.clone()]);
        let mut inbox = joined.inbox;
        assert_eq!(inbox.try_recv(), Some(said("after")));
        assert_eq!(inbox.try_recv(), None);
        // Those present before the join get everything once.
        assert_eq!(
            sender_inbox.try_recv(),
            Some(Message::arrived(&newcomer.who))
        );
        assert_eq!(sender_inbox.try_recv(), Some(before));
        assert_eq!(sender_inbox.try_recv(), Some(said("after")));
    }
}
