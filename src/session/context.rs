//! What every session shares with the server that spawned it, whichever
//! door (TCP, TLS, WebSocket) it came through.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::guard::flood::FloodLimits;
use crate::guard::password::Gate;
use crate::metrics::Metrics;

/// The last line of every client when the server stops.
pub(crate) const SHUTTING_DOWN: &str = chat_wire::SHUTTING_DOWN;

/// What every session shares with the server that spawned it.
#[derive(Debug)]
pub(crate) struct ServerContext {
    pub config: Config,
    /// Set when shutdown begins. Readers check it on every read; the
    /// clients' tokens say the same, but checking a token takes a lock.
    pub stopping: AtomicBool,
    /// Cancelled when the shutdown grace period is over: writers still
    /// flushing give up.
    pub force: CancellationToken,
    pub tracker: TaskTracker,
    /// Every connection's input budget; `None` when flood control is off.
    pub flood: Option<FloodLimits>,
    pub metrics: Arc<Metrics>,
    /// The room password (`--password-file`), if any.
    pub gate: Option<Gate>,
}
