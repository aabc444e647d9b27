//! A client's own outbound queue, for the models that keep one queue per
//! client (`sharded`, `broadcaster`, `locked`).
//!
//! The queue holds shared [`Message`]s and is bounded by the bytes it holds
//! rather than by a message count: a burst of short lines is fine, a client
//! that stops reading is not. The sending half, [`Outbox`], is what a hub
//! registers; it applies the slow-client policy whenever the client's
//! [`Budget`](crate::client::Budget) is exhausted. The receiving half,
//! [`QueueInbox`], belongs to the client's writer task.
//!
//! Underneath is one of two unbounded queues (`--queue`): our
//! [swap queue](crate::room::queue) (the default), which frees its buffers when
//! drained, or tokio's unbounded `mpsc` channel, which keeps what a burst
//! grew. Both are unbounded on purpose: the byte budget is the bound, and a
//! bounded tokio channel would add a second, count-based semaphore whose
//! release takes a lock on every received message.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::client::{Client, ClientId, Kick};
use crate::config::{QueueKind, SlowClientPolicy};
use crate::protocol::Message;
use crate::room::hub::Inbox;
use crate::room::queue;

/// The notice a client gets when it is dropped for not keeping up.
pub(crate) const TOO_SLOW: &str = chat_wire::TOO_SLOW;

/// Creates the queue for `client`.
pub(crate) fn channel(client: Arc<Client>, kind: QueueKind) -> (Outbox, QueueInbox) {
    let (tx, rx) = match kind {
        QueueKind::Swap => {
            let (tx, rx) = queue::channel();
            (Sending::Swap(tx), Receiving::Swap(rx))
        }
        QueueKind::Mpsc => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Sending::Mpsc(tx), Receiving::Mpsc(rx))
        }
    };
    (
        Outbox {
            tx,
            client: Arc::clone(&client),
        },
        QueueInbox {
            rx,
            client,
            seen_through: 0,
        },
    )
}

#[derive(Debug, Clone)]
enum Sending {
    Swap(queue::Sender<Message>),
    Mpsc(mpsc::UnboundedSender<Message>),
}

impl Sending {
    /// Appends `message`; gives it back if the writer is gone.
    fn send(&self, message: Message) -> Result<(), Message> {
        match self {
            Sending::Swap(tx) => tx.send(message),
            Sending::Mpsc(tx) => tx.send(message).map_err(|closed| closed.0),
        }
    }
}

#[derive(Debug)]
enum Receiving {
    Swap(queue::Receiver<Message>),
    Mpsc(mpsc::UnboundedReceiver<Message>),
}

/// The sending half of a client's queue: what a hub keeps per client.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: Sending,
    client: Arc<Client>,
}

impl Outbox {
    pub(crate) fn id(&self) -> ClientId {
        self.client.id
    }

    /// The client's name (or `IP:PORT`), for the `present` line.
    pub(crate) fn who(&self) -> &Arc<str> {
        &self.client.who
    }

    /// Whether [`Outbox::send`] may wait; if so, never call it while holding
    /// a lock.
    pub(crate) fn waits(&self) -> bool {
        self.client.policy == SlowClientPolicy::Block
    }

    /// Queues `message` without waiting. When the client is over its budget
    /// (or stuck), the policy decides: `disconnect` kicks it, `drop` skips
    /// this message for it. Safe to call under a lock: it never waits and
    /// never touches any hub (the swap queue's own lock is held for one push).
    pub(crate) fn offer(&self, message: &Message) {
        let client = &*self.client;
        if client.is_kicked() {
            // Nothing more is worth queueing.
            return;
        }
        if client.is_stuck() || !client.budget.try_take(message.len()) {
            self.over_budget(message);
            return;
        }
        self.push(message);
    }

    /// Queues `message`, waiting for room if the policy is `block`. Under
    /// the other policies this is [`Outbox::offer`].
    pub(crate) async fn send(&self, message: &Message) {
        if !self.waits() {
            return self.offer(message);
        }
        let client = &*self.client;
        // Boxed: only `block` waits, and the wait's state would otherwise be
        // part of every fan-out future of every connection.
        if Box::pin(client.budget.take(message.len(), client)).await {
            self.push(message);
        }
    }

    /// Queues a membership announcement under `--announce-present`: never
    /// waits and is never skipped, whatever the policy. A skipped arrival or
    /// departure would make the client's picture of the room wrong for good,
    /// and waiting would stall the membership lock or task the caller holds;
    /// so a client with no room for one is disconnected as too slow.
    pub(crate) fn announce(&self, message: &Message) {
        let client = &*self.client;
        if client.is_kicked() {
            return;
        }
        if !client.budget.try_take(message.len()) {
            client.kick(Kick::TooSlow, Some(Message::notice(TOO_SLOW)));
            return;
        }
        self.push(message);
    }

    /// [`Outbox::announce`]s `arrival` to each of `outboxes` and returns
    /// their names: a newcomer's `present` list, made in the one step in
    /// which its arrival reaches them (the step each model holds its lock
    /// or membership for).
    pub(crate) fn announce_to_each<O: std::ops::Deref<Target = Outbox>>(
        outboxes: impl IntoIterator<Item = O>,
        arrival: &Message,
    ) -> Vec<Arc<str>> {
        outboxes
            .into_iter()
            .map(|outbox| {
                outbox.announce(arrival);
                Arc::clone(outbox.who())
            })
            .collect()
    }

    /// Appends a message whose bytes the budget has already granted.
    fn push(&self, message: &Message) {
        if self.tx.send(message.clone()).is_err() {
            self.client.budget.give_back(message.len());
        }
    }

    fn over_budget(&self, message: &Message) {
        match self.client.policy {
            SlowClientPolicy::Disconnect => self
                .client
                .kick(Kick::TooSlow, Some(Message::notice(TOO_SLOW))),
            // `offer` under `block` means a hub skipped the waiting path;
            // skipping is the only answer that cannot deadlock.
            SlowClientPolicy::Drop | SlowClientPolicy::Block => {
                self.client.skip(message.lines() as u64)
            }
        }
    }
}

/// The receiving half of a client's queue, drained by its writer task.
#[derive(Debug)]
pub(crate) struct QueueInbox {
    rx: Receiving,
    client: Arc<Client>,
    /// `--history` in the `sharded` model: the newest line the client's
    /// history block showed. Live lines numbered up to it are dropped: the
    /// block already held them (0: drop nothing).
    seen_through: u64,
}

impl QueueInbox {
    /// Drops, from now on, every message the history numbered `seq` or
    /// lower: a newcomer's history block already showed them.
    pub(crate) fn seen_through(&mut self, seq: u64) {
        self.seen_through = seq;
    }

    /// Whether `message` was already shown; if so its bytes are given back.
    fn shown(&self, message: &Message) -> bool {
        if self.seen_through == 0 {
            return false;
        }
        let seq = message.seq();
        let shown = seq != 0 && seq <= self.seen_through;
        if shown {
            self.client.budget.give_back(message.len());
        }
        shown
    }
}

impl Inbox for QueueInbox {
    async fn recv(&mut self) -> Option<Message> {
        loop {
            let message = match &mut self.rx {
                Receiving::Swap(rx) => rx.recv().await,
                Receiving::Mpsc(rx) => rx.recv().await,
            }?;
            if !self.shown(&message) {
                return Some(message);
            }
        }
    }

    fn try_recv(&mut self) -> Option<Message> {
        loop {
            let message = match &mut self.rx {
                Receiving::Swap(rx) => rx.try_recv(),
                Receiving::Mpsc(rx) => rx.try_recv().ok(),
            }?;
            if !self.shown(&message) {
                return Some(message);
            }
        }
    }

    fn written(&mut self, bytes: usize) {
        self.client.budget.give_back(bytes);
    }

    fn pending_bytes(&self) -> usize {
        self.client.budget.queued()
    }
}
