//! What the models that keep a map of outboxes (`sharded`, `locked`) do to
//! each recipient of a line, written once.
//!
//! Each helper takes the recipients as an iterator, so the walk happens
//! under whatever the caller holds: each model takes and releases its own
//! lock (a `DashMap` shard's read guard, the `RwLock`'s read or write
//! guard, the membership mutex) visibly in its own file, and a fan-out that
//! may wait copies its recipients out under the lock and waits only after
//! releasing it.

use std::ops::Deref;

use crate::client::ClientId;
use crate::protocol::Message;
use crate::room::outbox::Outbox;

/// [`Outbox::offer`]s `message` to every recipient but `except`: never
/// waits, so it is safe under a lock.
pub(super) fn offer_to_all<O: Deref<Target = Outbox>>(
    outboxes: impl IntoIterator<Item = O>,
    message: &Message,
    except: Option<ClientId>,
) {
    for outbox in outboxes {
        if Some(outbox.id()) != except {
            outbox.offer(message);
        }
    }
}

/// [`Outbox::announce`]s a membership change (`--announce-present`) to
/// every recipient but the client it is about: never waits, never skipped.
pub(super) fn announce_to_all<O: Deref<Target = Outbox>>(
    outboxes: impl IntoIterator<Item = O>,
    message: &Message,
    about: ClientId,
) {
    for outbox in outboxes {
        if outbox.id() != about {
            outbox.announce(message);
        }
    }
}

/// The recipients but `except`, copied out (a reference count each) so
/// that the caller can release its lock before [`send_to_each`] waits.
pub(super) fn recipients<O: Deref<Target = Outbox>>(
    outboxes: impl IntoIterator<Item = O>,
    except: Option<ClientId>,
) -> Vec<Outbox> {
    outboxes
        .into_iter()
        .filter(|outbox| Some(outbox.id()) != except)
        .map(|outbox| Outbox::clone(&outbox))
        .collect()
}

/// `--slow-client block`: waits for room in each recipient's queue in turn.
/// Call it holding no lock. Boxed by the callers: this future is part of
/// every reader's state, and only `block` needs the room to wait.
pub(super) async fn send_to_each(recipients: Vec<Outbox>, message: &Message) {
    for recipient in &recipients {
        recipient.send(message).await;
    }
}
