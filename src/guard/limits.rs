//! What the accept loop enforces across connections, so that no vanished
//! peer or memory hog can take the server from everyone else (the
//! per-address count is a client's admission, in
//! [`crate::client::admission`]).
//!
//! - [`tune_socket`]: TCP keepalive (`--keepalive`) and, on Linux,
//!   `TCP_USER_TIMEOUT` tied to `--write-timeout`, on every accepted socket.
//! - [`MemoryGuard`]: the clients' total holding of partial lines and queued
//!   bytes (`--max-client-memory`), checked by the accept loop's housekeeping
//!   tick; over budget, the largest holders are disconnected first.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::client::{Client, ClientId, Kick};
use crate::config::Config;
#[cfg(any(target_os = "linux", target_os = "android"))]
use crate::config::SlowClientPolicy;
use crate::protocol::Message;
use crate::room::history::History;

/// Keepalive settings for `--keepalive` of `every`: about `every` from the
/// last packet to the peer being declared gone. Linux counts in whole
/// seconds; three unanswered probes, as many systems default to.
pub(crate) fn keepalive_for(every: Duration) -> socket2::TcpKeepalive {
    const PROBES: u32 = 3;
    let secs = every.as_secs().max(1);
    let interval = (secs / 6).max(1);
    let idle = secs.saturating_sub(u64::from(PROBES) * interval).max(1);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(idle));
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "freebsd"
    ))]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(interval))
        .with_retries(PROBES);
    keepalive
}

/// Sets TCP keepalive and (on Linux) `TCP_USER_TIMEOUT` on an accepted
/// socket. Failure is logged and ignored: the connection works without.
///
/// `TCP_USER_TIMEOUT` is how long sent data may stay unacknowledged before
/// the kernel gives up on the connection. Under `--slow-client disconnect`
/// it is `--write-timeout`: a peer that vanished while data was in flight is
/// freed as surely as one that stopped reading, even when our side of the
/// socket never fills (so our own write timeout never starts). Under `drop`
/// and `block` it is left unset: the kernel applies it to a peer that keeps
/// its window closed too, and those policies promise to keep a live reader
/// however stuck it is. With keepalive on, it also caps the probing: the
/// peer is dropped at the first unanswered probe once that much time has
/// passed.
pub(crate) fn tune_socket(stream: &TcpStream, config: &Config) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    if let Some(every) = config.keepalive {
        socket.set_tcp_keepalive(&keepalive_for(every))?;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if config.slow_client == SlowClientPolicy::Disconnect {
        socket.set_tcp_user_timeout(Some(config.write_timeout))?;
    }
    Ok(())
}

/// The clients `--max-client-memory` watches.
///
/// What a client holds is its partial input line (the read buffer's
/// allocation while it holds one) plus the bytes queued for it. A queued
/// message is counted in full for each client it is queued for, as the
/// per-client `--max-pending` budget counts it, although the clients share
/// one copy: the figure is what evicting that client would free if it were
/// the message's last holder, and an upper bound on what the clients
/// actually hold. The `broadcast` model has no per-client queue (its ring
/// is shared and bounded by `--max-pending`), so there only partial lines
/// count.
///
/// The room's history (`--history`) is room memory, not any client's: it
/// counts against the same budget (so the total is what the budget
/// bounds), but it is never evicted; its own bound, `--history-bytes`,
/// which the configuration checks fits in the budget with room for a
/// client's longest line, caps it. A newcomer's history block counts as
/// held by it until written, in full, like a queued message.
#[derive(Debug)]
pub(crate) struct MemoryGuard {
    budget: usize,
    clients: Mutex<HashMap<ClientId, Weak<Client>>>,
    history: Option<Arc<History>>,
}

/// What one check of the budget found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Eviction {
    /// Bytes held before evicting.
    pub held: usize,
    pub evicted: usize,
    /// Bytes the evicted clients held.
    pub freed: usize,
}

impl MemoryGuard {
    /// `None` when `--max-client-memory` is 0 (no limit).
    pub(crate) fn new(config: &Config, history: Option<Arc<History>>) -> Option<Arc<MemoryGuard>> {
        (config.max_client_memory > 0).then(|| {
            Arc::new(MemoryGuard {
                budget: config.max_client_memory,
                clients: Mutex::new(HashMap::new()),
                history,
            })
        })
    }

    pub(crate) fn watch(&self, client: &Arc<Client>) {
        self.clients
            .lock()
            .insert(client.id, Arc::downgrade(client));
    }

    pub(crate) fn forget(&self, id: ClientId) {
        self.clients.lock().remove(&id);
    }

    /// Disconnects the largest holders until the total is back under the
    /// budget. One pass over the clients when under budget; a sort only
    /// when over.
    pub(crate) fn enforce(&self) -> Eviction {
        let clients = self.clients.lock();
        let history = self.history.as_ref().map_or(0, |history| history.bytes());
        let held: usize = history
            + clients
                .values()
                .filter_map(Weak::upgrade)
                .filter(|client| !client.is_kicked())
                .map(|client| client.memory_held())
                .sum::<usize>();
        let mut eviction = Eviction {
            held,
            ..Eviction::default()
        };
        if held <= self.budget {
            return eviction;
        }
        let mut holders: Vec<(usize, Arc<Client>)> = clients
            .values()
            .filter_map(Weak::upgrade)
            .filter(|client| !client.is_kicked())
            .map(|client| (client.memory_held(), client))
            .collect();
        drop(clients);
        holders.sort_unstable_by_key(|(holds, _)| std::cmp::Reverse(*holds));
        let mut remaining = held;
        for (holds, client) in holders {
            if remaining <= self.budget || holds == 0 {
                break;
            }
            client.kick(
                Kick::OverMemory,
                Some(Message::notice(chat_wire::TOO_MUCH_MEMORY)),
            );
            remaining -= holds;
            eviction.evicted += 1;
            eviction.freed += holds;
        }
        eviction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn keepalive_detects_in_about_the_time_asked() {
        // idle + 3 probes × interval, in whole seconds.
        for (every, idle, interval) in [(60, 30, 10), (3, 1, 1), (1, 1, 1), (600, 300, 100)] {
            let expected = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(idle))
                .with_interval(Duration::from_secs(interval))
                .with_retries(3);
            assert_eq!(
                format!("{:?}", keepalive_for(Duration::from_secs(every))),
                format!("{expected:?}"),
                "--keepalive {every}"
            );
        }
    }
}
