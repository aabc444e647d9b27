//! # `broadcaster`: the seed's design, one task owns the client set
//!
//! A port of gopl.io's `broadcaster()` goroutine. One task owns the map of
//! clients as a local variable; connections talk to it only through three
//! channels, so nothing is shared and nothing is locked:
//!
//! - `entering`: a new client's outbox and its arrival announcement, to
//!   announce and add to the map;
//! - `leaving`: a departing client, to remove (dropping its outbox, which
//!   is the seed's `close(cli)`: its writer finishes what is queued and stops),
//!   with its departure announcement;
//! - `messages`: every line for everyone, which the broadcaster copies into
//!   each client's outbox in turn.
//!
//! **Where the port has to differ.** Go's channels here are unbuffered: a
//! send completes only when the broadcaster has received it, so each client's
//! `messages <- arrival`, `entering <- ch`, its lines and `leaving <- ch`
//! reach the broadcaster in the order sent, even though they travel on three
//! channels. tokio channels are buffered, and a `select!` over three queues
//! can take a later `leaving` before an earlier message, losing the client's
//! echo of its own last line, or take `entering` before the client's own
//! arrival announcement, showing it its own arrival. Two small rules restore
//! the seed's order: `entering` and `leaving` are acknowledged (the client
//! waits, as the unbuffered send did), and before it changes the map the
//! broadcaster first delivers every message already queued, since those were
//! sent before the change. And the seed sends `has left` before it closes the
//! connection; here dropping the outbox closes it, so the departure travels
//! with `leaving` and is delivered in the same step as the removal, before
//! any line sent by someone who saw the connection close.
//!
//! **Names and presence.** Both are one more thing the owner does in the
//! step that adds a client, since nothing else can touch the map in between:
//! with `--names` it checks the name against its own set of names and
//! refuses a taken one (of two joins with one name, the one whose
//! `entering` it takes first wins); with `--announce-present` it lists the
//! clients, announces the arrival to them and adds the newcomer, and
//! answers with the list. A departure is already announced in the step that
//! removes the client. Nothing is locked for either; the cost is that the
//! owner, which every line of the room already goes through, also builds
//! each newcomer's list.
//!
//! **History.** The owner appends each chat line to the history in the
//! step that delivers it, and takes a newcomer's snapshot in the step that
//! adds it (after delivering what was queued before): the hand-off is
//! atomic by construction, and every client, newcomers included, sees one
//! total order. The history's mutex is only ever taken by the owner (and a
//! metrics scrape reads its counts without it), so it is never contended.
//!
//! **Locks.** None. The `select!` is biased towards membership changes (the
//! seed's is random), which is what makes the acknowledgements above enough.
//! Under `--slow-client block` the broadcaster waits for room in a full
//! outbox, exactly as the seed's `cli <- msg` does, and every client stalls
//! behind it; under the other policies it never waits.
//!
//! **Ordering.** One task copies every message into every outbox in the same
//! sequence, so all recipients see the same total order.
//!
//! **Tasks.** 2n+2: the accept loop, the broadcaster, and a reader and a
//! writer per client, as in the seed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::client::{Client, ClientId};
use crate::config::{Config, QueueKind};
use crate::protocol::Message;
use crate::room::history::{History, Snapshot};
use crate::room::hub::{Hub, Joined, Refused};
use crate::room::outbox::{self, Outbox, QueueInbox};

/// How many messages may wait for the broadcaster before senders wait; each
/// is one read's worth of one sender's lines, at most about 16 KiB, so the
/// channel holds at most about 16 MiB. The seed's channel holds none; 1,024
/// lets the broadcaster take a batch per wake-up without letting memory grow
/// without bound.
const MESSAGES_CAPACITY: usize = 1024;

/// Messages the broadcaster takes from its channel per wake-up.
const MESSAGES_BATCH: usize = 64;

type Ack = oneshot::Sender<()>;

/// The owner's answer to `entering`: the clients present and the history,
/// or a refusal.
type Admission = oneshot::Sender<Result<(Vec<Arc<str>>, Option<Snapshot>), Refused>>;

/// A newcomer's outbox, its arrival announcement, and who waits for the answer.
type Entering = (Outbox, Message, Admission);

/// A departing client, its departure announcement, and who waits for both.
type Leaving = (ClientId, Option<Message>, Ack);

/// What the owner task does besides relaying.
#[derive(Debug, Clone)]
struct Options {
    names: bool,
    presence: bool,
    history: Option<Arc<History>>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct BroadcasterHub {
    entering: mpsc::UnboundedSender<Entering>,
    leaving: mpsc::UnboundedSender<Leaving>,
    messages: mpsc::Sender<Said>,
    queue: QueueKind,
}

/// A message for everyone, and whether it is a chat line (history) or a
/// relayed announcement (not history).
type Said = (Message, bool);

impl Hub for BroadcasterHub {
    type Inbox = QueueInbox;

    fn new(config: &Config, history: Option<Arc<History>>) -> BroadcasterHub {
        // Membership channels need no bound: each client sends at most one
        // `entering` and one `leaving`, and `--max-clients` bounds clients.
        let (entering, entering_rx) = mpsc::unbounded_channel();
        let (leaving, leaving_rx) = mpsc::unbounded_channel();
        let (messages, messages_rx) = mpsc::channel(MESSAGES_CAPACITY);
        let options = Options {
            names: config.names,
            presence: config.announce_present,
            history,
        };
        tokio::spawn(broadcaster(entering_rx, leaving_rx, messages_rx, options));
        BroadcasterHub {
            queue: config.queue,
            entering,
            leaving,
            messages,
        }
    }

    async fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> Result<Joined<QueueInbox>, Refused> {
        let (outbox, inbox) = outbox::channel(Arc::clone(client), self.queue);
        // The arrival travels with the outbox, so that the owner can refuse
        // a taken name before anyone hears of it, and announce it in the
        // step that adds the newcomer (the seed's order: announce, then
        // enter, so the newcomer does not see its own arrival).
        let (admission, admitted) = oneshot::channel();
        let mut present = Vec::new();
        let mut history = None;
        if self.entering.send((outbox, arrival, admission)).is_ok() {
            // The owner is gone only when the server is: join as nobody.
            if let Ok(answer) = admitted.await {
                (present, history) = answer?;
            }
        }
        Ok(Joined {
            inbox,
            present,
            history,
        })
    }

    async fn broadcast(&self, _from: &Arc<Client>, message: &Message) {
        self.send_message((message.clone(), true)).await;
    }

    async fn relay(&self, _from: &Arc<Client>, message: &Message) {
        self.send_message((message.clone(), false)).await;
    }

    async fn leave(&self, client: &Arc<Client>, departure: Option<Message>) {
        let (ack, left) = oneshot::channel();
        if self.leaving.send((client.id, departure, ack)).is_ok() {
            let _ = left.await;
        }
    }
}

impl BroadcasterHub {
    /// Queues a line for the broadcaster, waiting only if its queue is full
    /// (the seed's sender always waits, for the broadcaster to take it).
    async fn send_message(&self, message: Said) {
        if let Err(mpsc::error::TrySendError::Full(message)) = self.messages.try_send(message) {
            // Boxed: a full queue is rare, and the wait's state would
            // otherwise be part of every reader task.
            let _ = Box::pin(self.messages.send(message)).await;
        }
    }
}

/// The broadcaster task. It ends when every sender is gone: the hub and every
/// connection holding it have been dropped.
async fn broadcaster(
    mut entering: mpsc::UnboundedReceiver<Entering>,
    mut leaving: mpsc::UnboundedReceiver<Leaving>,
    mut messages: mpsc::Receiver<Said>,
    options: Options,
) {
    let mut clients: HashMap<ClientId, Outbox> = HashMap::new();
    // With `--names`: the names of everyone in `clients`.
    let mut names: HashSet<Arc<str>> = HashSet::new();
    let mut batch = Vec::with_capacity(MESSAGES_BATCH);
    loop {
        tokio::select! {
            biased;
            Some((outbox, arrival, admission)) = entering.recv() => {
                deliver_queued(&mut messages, &clients, &options).await;
                if options.names && !names.insert(Arc::clone(outbox.who())) {
                    // Dropped before answering, so the session holds the
                    // only handle to its client again when it hears.
                    drop(outbox);
                    let _ = admission.send(Err(Refused::NameTaken));
                    continue;
                }
                let present = if options.presence {
                    Outbox::announce_to_each(clients.values(), &arrival)
                } else {
                    deliver(&arrival, &clients).await;
                    Vec::new()
                };
                clients.insert(outbox.id(), outbox);
                let history = options.history.as_ref().map(|history| history.snapshot());
                let _ = admission.send(Ok((present, history)));
            }
            Some((id, departure, ack)) = leaving.recv() => {
                deliver_queued(&mut messages, &clients, &options).await;
                if let Some(outbox) = clients.remove(&id) {
                    if options.names {
                        names.remove(&**outbox.who());
                    }
                }
                if let Some(departure) = departure {
                    if options.presence {
                        clients.values().for_each(|outbox| outbox.announce(&departure));
                    } else {
                        deliver(&departure, &clients).await;
                    }
                }
                let _ = ack.send(());
            }
            received = messages.recv_many(&mut batch, MESSAGES_BATCH) => {
                if received == 0 {
                    return;
                }
                for said in batch.drain(..) {
                    say(said, &clients, &options).await;
                }
            }
        }
    }
}

/// Delivers the messages sent before the membership change being handled.
async fn deliver_queued(
    messages: &mut mpsc::Receiver<Said>,
    clients: &HashMap<ClientId, Outbox>,
    options: &Options,
) {
    for _ in 0..messages.len() {
        match messages.try_recv() {
            Ok(said) => say(said, clients, options).await,
            Err(_) => break,
        }
    }
}

/// A chat line: into the history, then to everyone, in one step (a
/// relayed announcement: to everyone only).
async fn say((message, chat): Said, clients: &HashMap<ClientId, Outbox>, options: &Options) {
    if let (true, Some(history)) = (chat, &options.history) {
        history.append(&message);
    }
    deliver(&message, clients).await;
}

async fn deliver(message: &Message, clients: &HashMap<ClientId, Outbox>) {
    for outbox in clients.values() {
        outbox.send(message).await;
    }
}
