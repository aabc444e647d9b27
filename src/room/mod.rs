//! The room: who is in it and how a line reaches everyone.
//!
//! - [`hub`]: the one interface every concurrency model implements, and the
//!   four models, one file each;
//! - [`outbox`]: the byte-bounded per-client queue three of the models use;
//! - [`queue`]: the swap queue underneath it, which frees its buffers when
//!   drained, and [`backlog`], where those buffers live;
//! - [`history`]: the room's recent lines a newcomer is shown (`--history`).
//!
//! The room knows clients ([`crate::client`]), messages
//! ([`crate::protocol`]) and the settings, and nothing of sockets, sessions
//! or the accept loop: those are built on top of it.

pub(crate) mod backlog;
pub(crate) mod history;
pub(crate) mod hub;
pub(crate) mod outbox;
pub(crate) mod queue;
