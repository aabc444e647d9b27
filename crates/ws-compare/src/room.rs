//! The one room every implementation serves: the gopl.io chat's rules in
//! their smallest form, so that the framing is the only thing that differs
//! between `--impl`s.
//!
//! A client is greeted (`You are IP:PORT`), its arrival is announced to the
//! others, each of its lines goes to everyone (itself included) as
//! `IP:PORT: text`, and its departure is announced. Each client has a
//! bounded queue of ready-made messages (`M`, the implementation's own
//! message type, built once per line and cloned per recipient); a client
//! whose queue is full is dropped, as the server's default slow-client
//! policy does, so a stalled reader cannot grow memory without bound.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

use crate::BATCH_MESSAGES;

/// Messages a client's queue holds before the client is dropped: above
/// the largest backlog of the measured runs (an arrival storm of 5,000
/// clients, a fanout window of 16 × 100 senders).
pub const QUEUE: usize = 16 * 1024;

/// The largest message a client may send, in bytes: the server's default
/// `--max-line`.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The room; `M` is what a client's writer takes from its queue.
pub struct Room<M> {
    clients: DashMap<u64, mpsc::Sender<M>>,
    next_id: AtomicU64,
    /// Makes a message from a line without its newline.
    make: fn(String) -> M,
    /// Lines broadcast so far (the housekeeper's sign of a burst).
    pub broadcasts: AtomicU64,
}

/// A client's membership; leaving the room is dropping it.
pub struct Member<M: Clone> {
    room: Arc<Room<M>>,
    id: u64,
    who: String,
}

impl<M: Clone> Room<M> {
    pub fn new(make: fn(String) -> M) -> Room<M> {
        Room {
            clients: DashMap::new(),
            next_id: AtomicU64::new(0),
            make,
            broadcasts: AtomicU64::new(0),
        }
    }

    /// Greets `who` (first in its own queue), announces it to the others,
    /// then lets it hear the room.
    pub fn join(self: &Arc<Self>, who: String) -> (Member<M>, mpsc::Receiver<M>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        // A fresh queue has room for the greeting.
        let _ = tx.try_send((self.make)(chat_wire::greeting(&who)));
        self.broadcast(chat_wire::arrived(&who));
        let id = self.next_id.fetch_add(1, Relaxed);
        self.clients.insert(id, tx);
        (
            Member {
                room: Arc::clone(self),
                id,
                who,
            },
            rx,
        )
    }

    /// Queues `line` for everyone; drops whoever has no room for it.
    fn broadcast(&self, line: String) {
        self.broadcasts.fetch_add(1, Relaxed);
        let message = (self.make)(line);
        let mut full = Vec::new();
        for client in self.clients.iter() {
            if client.value().try_send(message.clone()).is_err() {
                full.push(*client.key());
            }
        }
        for id in full {
            // Its writer sees the queue close and ends the connection.
            self.clients.remove(&id);
        }
    }
}

impl<M: Clone> Member<M> {
    /// Sends one line the client wrote to everyone.
    pub fn say(&self, text: &str) {
        self.room.broadcast(chat_wire::chat(&self.who, text));
    }

    /// A sender into the client's own queue (for control frames its reader
    /// owes); `None` once it has been dropped.
    pub fn own_queue(&self) -> Option<mpsc::Sender<M>> {
        self.room
            .clients
            .get(&self.id)
            .map(|sender| sender.value().clone())
    }
}

impl<M: Clone> Drop for Member<M> {
    fn drop(&mut self) {
        self.room.clients.remove(&self.id);
        self.room.broadcast(chat_wire::left(&self.who));
    }
}

/// A client's writer for the crates whose socket is a `Sink` of messages
/// (tungstenite, tokio-websockets): feeds what is queued, up to
/// [`BATCH_MESSAGES`], then flushes once, so that every sink batches alike.
pub async fn write_batches<S, M>(mut sink: S, mut queue: mpsc::Receiver<M>)
where
    S: Sink<M> + Unpin,
{
    while let Some(first) = queue.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        for _ in 1..BATCH_MESSAGES {
            let Ok(message) = queue.try_recv() else {
                break;
            };
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
