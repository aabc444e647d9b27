//! The one interface every concurrency model implements, and the models.
//!
//! A hub owns "who is connected" and gets each line to everyone. The rest
//! of the server (framing, sanitising, the writer's batching, limits,
//! shutdown) is shared and knows the hub only through [`Hub`] and
//! [`Inbox`], so the models differ only inside this directory and each
//! design can be read whole in one file:
//!
//! | file | who owns the client set | tasks for n clients |
//! |---|---|---|
//! | [`sharded`] | a `DashMap` of outboxes; every reader fans out itself | 2n+1 |
//! | [`broadcaster`] | one broadcaster task (the seed's design) | 2n+2 |
//! | [`locked`] | one `parking_lot::RwLock<HashMap>` of outboxes | 2n+1 |
//! | [`broadcast`] | a `tokio::sync::broadcast` channel; no set at all (a roster beside it under `--names` or `--announce-present`) | 2n+1 |
//!
//! The task counts include the accept loop and a reader and a writer task
//! per connection, which every model shares.
//!
//! Two options make a join more than an insert, and are where the models
//! really differ (ARCHITECTURE.md, "Who is here?"):
//!
//! | file | `--names`: check-and-insert of a name | `--announce-present`: list, arrival and insert in one step |
//! |---|---|---|
//! | [`sharded`] | a `DashMap` entry on a second map, name to id | a membership mutex taken by joins and leaves only, never by a fan-out |
//! | [`broadcaster`] | the owner task's name set | one step of the owner task |
//! | [`locked`] | a name set under the write lock | the write lock |
//! | [`broadcast`] | a roster (name to id) under a mutex beside the ring | the roster mutex, held while subscribing and while publishing arrivals and departures into the ring |
//!
//! A third, `--history`, makes a join's snapshot of the room's last lines
//! and its first live line one hand-off (ARCHITECTURE.md, "What was said"):
//!
//! | file | where append-and-fan-out is atomic with snapshot-and-join |
//! |---|---|
//! | [`sharded`] | nowhere: each line gets a room sequence number before its fan-out; a join inserts, then snapshots, and its inbox drops live lines the snapshot holds |
//! | [`broadcaster`] | the owner task's steps |
//! | [`locked`] | the read lock of a fan-out against the write lock of a join |
//! | [`broadcast`] | the history's mutex, held around each chat line's send into the ring and around a join's `subscribe` |

use std::future::Future;
use std::sync::Arc;

use crate::client::Client;
use crate::config::Config;
use crate::protocol::Message;
use crate::room::history::{History, Snapshot};

pub(crate) mod broadcast;
pub(crate) mod broadcaster;
mod fan_out;
pub(crate) mod locked;
pub(crate) mod sharded;

pub(crate) use broadcast::BroadcastHub;
pub(crate) use broadcaster::BroadcasterHub;
pub(crate) use locked::LockedHub;
pub(crate) use sharded::ShardedHub;

/// Why a join under `--names` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Someone in the room has that name.
    NameTaken,
    /// Under `--cluster`: the room's broker, which keeps the names of every
    /// node, could not be asked in time, so no name can be given out.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    NamesUnavailable,
}

/// What a successful [`Hub::join`] gives the session.
#[derive(Debug)]
pub(crate) struct Joined<I> {
    pub inbox: I,
    /// Under `--announce-present`: who else was in the room at the instant
    /// the client entered it (empty without the option).
    pub present: Vec<Arc<str>>,
    /// Under `--history`: the room's last lines, taken at the instant the
    /// client entered it, so that these followed by what `inbox` yields are
    /// the room's lines from the oldest shown, with no gap and no duplicate.
    pub history: Option<Snapshot>,
}

/// A concurrency model: how clients join, leave and reach each other.
///
/// The session calls `join` once, then `broadcast` for each read's worth of
/// lines (one [`Message`] holding them all), then `leave` once, all from the
/// connection's reader task. The contract every model keeps:
/// - after `join` returns, the client receives every later `broadcast`, and
///   everyone present before it receives `arrival` (the newcomer does not);
/// - a client's own lines reach everyone in the order it sent them, the
///   sender included;
/// - everything `broadcast` queued for a client before its `leave` reaches
///   its [`Inbox`] before the inbox ends, so its last echo is not lost;
/// - `departure` reaches everyone who remains, never the leaver.
///
/// Under `--names` (`Config::names`) `client.who` is the client's chosen
/// name, and `join` refuses it ([`Refused::NameTaken`]) if someone in the room has
/// it: of any number of concurrent joins with one name, exactly one wins.
/// The name is free again once `leave` has announced the departure, and
/// before the leaver's connection can close.
/// (With `--cluster` the wrapper may also refuse a join with
/// [`Refused::NamesUnavailable`]; the models never do.)
///
/// Under `--announce-present` (`Config::announce_present`) `join` returns
/// who is present, and the model makes the list, the arrival announcement
/// and the insert one atomic step, and the departure and the removal
/// another: so for every client, its list plus the arrivals it later
/// receives minus the departures it later receives is exactly the room,
/// at every moment. Membership announcements then go through
/// [`Outbox::announce`](crate::room::outbox::Outbox::announce): never skipped, never
/// waited for; a client with no room for one is disconnected as too slow.
///
/// Under `--history` (`Config::history`) every `broadcast` is appended to
/// the room's [`History`] and `join` returns a [`Snapshot`] of it, and the
/// model makes the two hand off exactly: the snapshot followed by what the
/// inbox yields holds every line from the oldest shown once, each
/// sender's in order (ARCHITECTURE.md, "What was said").
pub(crate) trait Hub: Send + Sync + Sized + 'static {
    /// What the client's writer task drains.
    type Inbox: Inbox;

    /// Creates the hub and starts any task the model needs. Called inside
    /// the runtime, before the first connection is accepted. `history` is
    /// the room's under `--history`: the hub appends every `broadcast` to
    /// it and snapshots it in `join`, atomically with its fan-out.
    fn new(config: &Config, history: Option<Arc<History>>) -> Self;

    /// Registers `client` and announces `arrival` to everyone already present.
    fn join(
        &self,
        client: &Arc<Client>,
        arrival: Message,
    ) -> impl Future<Output = Result<Joined<Self::Inbox>, Refused>> + Send;

    /// Delivers `message` to every client, `from` included.
    fn broadcast(&self, from: &Arc<Client>, message: &Message) -> impl Future<Output = ()> + Send;

    /// Delivers an announcement made elsewhere (under `--cluster`, another
    /// node's arrival or departure) to every client as `broadcast` does,
    /// but never into the history: arrivals and departures are not history.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    fn relay(&self, from: &Arc<Client>, message: &Message) -> impl Future<Output = ()> + Send;

    /// Unregisters `client`; announces `departure` (if any) to everyone who
    /// remains. The announcement is queued for them before the leaver's
    /// connection can close (its writer stops once it is unregistered), as the
    /// seed announces before `conn.Close()`: whoever sees the leaver gone and
    /// speaks must hear of the departure before hearing its own line.
    fn leave(
        &self,
        client: &Arc<Client>,
        departure: Option<Message>,
    ) -> impl Future<Output = ()> + Send;
}

/// The receiving side of one client's messages, drained by its writer task.
pub(crate) trait Inbox: Send + 'static {
    /// The next message; `None` once the client has left and everything
    /// queued before has been returned.
    fn recv(&mut self) -> impl Future<Output = Option<Message>> + Send;

    /// The next message if one is ready now. Used to coalesce a batch into
    /// one write after `recv` woke the writer.
    fn try_recv(&mut self) -> Option<Message>;

    /// Reports that `bytes` of received messages are on the socket, so the
    /// queue may take more.
    fn written(&mut self, bytes: usize);

    /// Bytes queued for the client and not yet reported
    /// [`written`](Inbox::written), if the inbox knows (0 if not): the
    /// writer sizes a batch from it in one allocation rather than growing
    /// it message by message.
    fn pending_bytes(&self) -> usize {
        0
    }
}
