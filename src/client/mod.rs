//! One connected client as every part of the server sees it.
//!
//! A [`Client`] is shared (behind an `Arc`) by the connection's reader task,
//! its writer task and whatever the hub keeps to reach it. It owns the
//! client's identity, the signal that ends its connection early (a kick or
//! server shutdown) together with the reason, the byte budget of its
//! outbound queue, and what it holds of the server's limits (its
//! `--max-clients` slot, its address's count, the memory it holds). It owns
//! no socket and no queue itself.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::config::{Config, SlowClientPolicy};
use crate::protocol::Message;

pub(crate) mod admission;

use admission::Admission;

/// A server-wide unique number for a connection; the hubs key their maps by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ClientId(pub u64);

/// Why a connection ended before its input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Over `--max-pending`, or stuck for `--write-timeout`, under `--slow-client disconnect`.
    TooSlow,
    /// Writing to the socket failed (reset, broken pipe): nobody is listening.
    WriteFailed,
    /// The largest holder of memory when all clients together held more
    /// than `--max-client-memory`.
    OverMemory,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Client {
    pub id: ClientId,
    /// `IP:PORT`, or under `--names` the name the client chose: the name
    /// everybody sees.
    pub who: Arc<str>,
    pub policy: SlowClientPolicy,
    /// Fires when the connection must end early: on a kick, or (as a child
    /// of the server's token) on shutdown.
    ending: CancellationToken,
    kick: OnceLock<Kick>,
    /// The line the writer sends just before closing, if any.
    last_words: OnceLock<Message>,
    pub budget: Budget,
    /// Set by the writer while the socket accepts no byte for longer than
    /// `--write-timeout`; the drop policy skips messages for a stuck client.
    stuck: AtomicBool,
    /// Lines not delivered to this client under the drop policy (in the
    /// `broadcast` model: ring entries, each one read's worth of lines).
    skipped: AtomicU64,
    /// Bytes the reader holds for a partial line, as of its last wait for
    /// input; counted against `--max-client-memory`.
    held_input: AtomicUsize,
    /// Bytes of the `--history` block the writer has not written yet;
    /// counted against `--max-client-memory` (not `--max-pending`: the
    /// block is the room's own text, shared with the history, and a client
    /// is not slow for being shown it).
    held_history: AtomicUsize,
    /// The `--max-clients` slot and the place in the address's count,
    /// returned when the last handle to the client goes (after both its
    /// reader and its writer have finished).
    _admission: Option<Admission>,
}

impl Client {
    pub(crate) fn new(
        id: ClientId,
        who: Arc<str>,
        config: &Config,
        shutdown: &CancellationToken,
        admission: Option<Admission>,
    ) -> Client {
        Client {
            id,
            who,
            policy: config.slow_client,
            ending: shutdown.child_token(),
            kick: OnceLock::new(),
            last_words: OnceLock::new(),
            budget: Budget::new(
                config.max_pending,
                config.slow_client == SlowClientPolicy::Block,
            ),
            stuck: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            held_input: AtomicUsize::new(0),
            held_history: AtomicUsize::new(0),
            _admission: admission,
        }
    }

    /// The same client under the name it chose (`--names`). Only a client
    /// nobody else holds yet can be renamed, so nothing ever sees its name
    /// change; a shared one is handed back as it is.
    pub(crate) fn renamed(self: Arc<Client>, who: Arc<str>) -> Result<Arc<Client>, Arc<Client>> {
        let client = Arc::try_unwrap(self)?;
        Ok(Arc::new(Client { who, ..client }))
    }

    /// The span every log line about this connection is emitted in:
    /// `conn{peer=IP:PORT}`. ERROR level, so that it is enabled whenever any
    /// event is (`RUST_LOG=warn` must still say who it was).
    ///
    /// It is built at each log site rather than held for the connection's
    /// life: a live span costs about 420 bytes per connection in
    /// tracing-subscriber's registry, a tenth of an idle connection's whole
    /// budget, and a connection logs only a few lines.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::error_span!("conn", peer = %self.who)
    }

    /// Ends the connection early. The first reason wins; the client gets
    /// `last_words` (best effort) and everyone else sees it leave.
    pub(crate) fn kick(&self, why: Kick, last_words: Option<Message>) {
        if self.kick.set(why).is_ok() {
            if let Some(words) = last_words {
                self.say_last(words);
            }
        }
        self.ending.cancel();
    }

    /// Why the client was kicked, if it was.
    pub(crate) fn kicked(&self) -> Option<Kick> {
        self.kick.get().copied()
    }

    /// Whether the client has been kicked. One atomic load: this is on the
    /// fan-out path, once per recipient per message. (The token's own
    /// `is_cancelled` takes a mutex, which every sender would contend on.)
    pub(crate) fn is_kicked(&self) -> bool {
        self.kick.get().is_some()
    }

    /// Completes when the connection must end early.
    pub(crate) fn ending(&self) -> WaitForCancellationFuture<'_> {
        self.ending.cancelled()
    }

    /// Sets the line the writer sends just before closing. The first call wins.
    pub(crate) fn say_last(&self, words: Message) {
        let _ = self.last_words.set(words);
    }

    pub(crate) fn last_words(&self) -> Option<&Message> {
        self.last_words.get()
    }

    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::Relaxed)
    }

    pub(crate) fn set_stuck(&self, stuck: bool) {
        self.stuck.store(stuck, Ordering::Relaxed);
    }

    /// Counts lines skipped for this client (drop policy).
    pub(crate) fn skip(&self, messages: u64) {
        self.skipped.fetch_add(messages, Ordering::Relaxed);
    }

    pub(crate) fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Records the bytes held for a partial input line.
    pub(crate) fn set_held_input(&self, bytes: usize) {
        // Most waits hold nothing, as the last did: skip the shared write.
        if self.held_input.load(Ordering::Relaxed) != bytes {
            self.held_input.store(bytes, Ordering::Relaxed);
        }
    }

    /// Records the bytes of the history block still to be written.
    pub(crate) fn set_held_history(&self, bytes: usize) {
        self.held_history.store(bytes, Ordering::Relaxed);
    }

    /// Bytes this client holds on the server: its partial input line, the
    /// messages queued for it and its unwritten history block (see
    /// [`MemoryGuard`](crate::guard::limits::MemoryGuard)).
    pub(crate) fn memory_held(&self) -> usize {
        self.held_input.load(Ordering::Relaxed)
            + self.held_history.load(Ordering::Relaxed)
            + self.budget.queued()
    }
}

/// The bytes a client's outbound queue may hold.
///
/// Senders take from the budget before queueing a message and the writer
/// gives back once the bytes are on the socket. Only the block policy ever
/// waits for room, so only it pays for the wake-up machinery: for the other
/// policies taking and giving back are one atomic add each, and the
/// `Notify` is boxed so that they do not carry its 40 bytes either.
#[derive(Debug)]
pub(crate) struct Budget {
    queued: AtomicUsize,
    limit: usize,
    room: Option<Box<Notify>>,
}

impl Budget {
    fn new(limit: usize, senders_wait: bool) -> Budget {
        Budget {
            queued: AtomicUsize::new(0),
            limit,
            room: senders_wait.then(|| Box::new(Notify::new())),
        }
    }

    /// Takes `bytes` if they fit. An empty queue accepts any one message, so
    /// a message larger than the limit cannot wedge a client forever.
    pub(crate) fn try_take(&self, bytes: usize) -> bool {
        let before = self.queued.fetch_add(bytes, Ordering::AcqRel);
        if before != 0 && before + bytes > self.limit {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Takes `bytes`, waiting for the writer to make room. Returns false if
    /// the client ends first (its writer will never make room again).
    pub(crate) async fn take(&self, bytes: usize, client: &Client) -> bool {
        let Some(room) = &self.room else {
            return self.try_take(bytes);
        };
        loop {
            // Register interest before checking, so a give_back between the
            // check and the wait is not missed.
            let notified = room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.try_take(bytes) {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = client.ending() => return false,
            }
        }
    }

    /// Returns `bytes` written to the socket.
    pub(crate) fn give_back(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(room) = &self.room {
            room.notify_waiters();
        }
    }

    /// Bytes queued or being written.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}
