//! What the accept loop enforces across connections, so that no single
//! address, vanished peer or memory hog can take the server from everyone
//! else.
//!
//! - [`AddressLimits`]: connections per IPv4 address or IPv6 /64
//!   (`--max-clients-per-ip`). A connection's [`Admission`] holds its place
//!   and gives it back when the client is gone.
//! - [`tune_socket`]: TCP keepalive (`--keepalive`) and, on Linux,
//!   `TCP_USER_TIMEOUT` tied to `--write-timeout`, on every accepted socket.
//! - [`MemoryGuard`]: the clients' total holding of partial lines and queued
//!   bytes (`--max-client-memory`), checked by the accept loop's housekeeping
//!   tick; over budget, the largest holders are disconnected first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::client::{Client, ClientId, Kick};
use crate::config::Config;
#[cfg(any(target_os = "linux", target_os = "android"))]
use crate::config::SlowClientPolicy;
use crate::history::History;
use crate::protocol::Message;

/// What a connection holds while it is served: its `--max-clients` slot and
/// its place in its address's count. Both are given back when the last
/// handle to the client goes.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
}

impl Admission {
    pub fn new(slot: OwnedSemaphorePermit, address: Option<AddressPlace>) -> Admission {
        Admission {
            _slot: slot,
            _address: address,
        }
    }
}

/// The unit an address limit counts: an IPv4 address, or an IPv6 /64 (one
/// host or site usually holds a whole /64, so a per-address limit would be
/// no limit at all). IPv4-mapped IPv6 addresses count as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Connections per address (see [`address_key`]).
#[derive(Debug)]
pub struct AddressLimits {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl AddressLimits {
    /// `None` when `--max-clients-per-ip` is 0 (no limit).
    pub fn new(config: &Config) -> Option<Arc<AddressLimits>> {
        (config.max_clients_per_ip > 0).then(|| {
            Arc::new(AddressLimits {
                limit: config.max_clients_per_ip,
                counts: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A place for one more connection from `ip`, or `None` if its address
    /// is at the limit.
    pub fn admit(self: &Arc<AddressLimits>, ip: IpAddr) -> Option<AddressPlace> {
        let key = address_key(ip);
        let mut counts = self.counts.lock();
        let count = counts.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressPlace {
            key,
            limits: Arc::clone(self),
        })
    }

    /// Connections counted for `ip`'s address.
    #[cfg(test)]
    pub fn connections(&self, ip: IpAddr) -> usize {
        self.counts
            .lock()
            .get(&address_key(ip))
            .copied()
            .unwrap_or(0)
    }
}

/// One connection's place in its address's count.
#[derive(Debug)]
pub struct AddressPlace {
    key: IpAddr,
    limits: Arc<AddressLimits>,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            // An address with no connection keeps no entry, so a scan of
            // many addresses leaves nothing behind.
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Keepalive settings for `--keepalive` of `every`: about `every` from the
/// last packet to the peer being declared gone. Linux counts in whole
/// seconds; three unanswered probes, as many systems default to.
pub fn keepalive_for(every: Duration) -> socket2::TcpKeepalive {
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
pub fn tune_socket(stream: &TcpStream, config: &Config) -> std::io::Result<()> {
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
pub struct MemoryGuard {
    budget: usize,
    clients: Mutex<HashMap<ClientId, Weak<Client>>>,
    history: Option<Arc<History>>,
}

/// What one check of the budget found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Bytes held before evicting.
    pub held: usize,
    pub evicted: usize,
    /// Bytes the evicted clients held.
    pub freed: usize,
}

impl MemoryGuard {
    /// `None` when `--max-client-memory` is 0 (no limit).
    pub fn new(config: &Config, history: Option<Arc<History>>) -> Option<Arc<MemoryGuard>> {
        (config.max_client_memory > 0).then(|| {
            Arc::new(MemoryGuard {
                budget: config.max_client_memory,
                clients: Mutex::new(HashMap::new()),
                history,
            })
        })
    }

    pub fn watch(&self, client: &Arc<Client>) {
        self.clients
            .lock()
            .insert(client.id, Arc::downgrade(client));
    }

    pub fn forget(&self, id: ClientId) {
        self.clients.lock().remove(&id);
    }

    /// Disconnects the largest holders until the total is back under the
    /// budget. One pass over the clients when under budget; a sort only
    /// when over.
    pub fn enforce(&self) -> Eviction {
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
    use std::net::Ipv4Addr;

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(mapped), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    }

    #[test]
    fn places_are_given_back() {
        let limits = AddressLimits::new(&Config {
            max_clients_per_ip: 2,
            ..Config::default()
        })
        .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = limits.admit(ip).unwrap();
        let _second = limits.admit(ip).unwrap();
        assert!(limits.admit(ip).is_none());
        assert!(limits.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(first);
        assert_eq!(limits.connections(ip), 1);
        assert!(limits.admit(ip).is_some());
    }

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
