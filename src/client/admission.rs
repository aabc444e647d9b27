//! A client's admission: what it holds of the server's limits while it is
//! served, and the count behind the per-address one.
//!
//! - [`Admission`]: its `--max-clients` slot and its place in its address's
//!   count, both given back when the last handle to the [`Client`](super::Client)
//!   goes (after its reader and its writer have finished, and the hub has
//!   let go of it);
//! - [`AddressLimits`]: connections per IPv4 address or IPv6 /64
//!   (`--max-clients-per-ip`), a guard against one address taking every
//!   slot, which the accept loop checks before anything else.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::config::Config;

/// What a connection holds while it is served: its `--max-clients` slot and
/// its place in its address's count. Both are given back when the last
/// handle to the client goes.
#[derive(Debug)]
pub(crate) struct Admission {
    _slot: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
}

impl Admission {
    pub(crate) fn new(slot: OwnedSemaphorePermit, address: Option<AddressPlace>) -> Admission {
        Admission {
            _slot: slot,
            _address: address,
        }
    }
}

/// The unit an address limit counts: an IPv4 address, or an IPv6 /64 (one
/// host or site usually holds a whole /64, so a per-address limit would be
/// no limit at all). IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
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
pub(crate) struct AddressLimits {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl AddressLimits {
    /// `None` when `--max-clients-per-ip` is 0 (no limit).
    pub(crate) fn new(config: &Config) -> Option<Arc<AddressLimits>> {
        (config.max_clients_per_ip > 0).then(|| {
            Arc::new(AddressLimits {
                limit: config.max_clients_per_ip,
                counts: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A place for one more connection from `ip`, or `None` if its address
    /// is at the limit.
    pub(crate) fn admit(self: &Arc<AddressLimits>, ip: IpAddr) -> Option<AddressPlace> {
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
    pub(crate) fn connections(&self, ip: IpAddr) -> usize {
        self.counts
            .lock()
            .get(&address_key(ip))
            .copied()
            .unwrap_or(0)
    }
}

/// One connection's place in its address's count.
#[derive(Debug)]
pub(crate) struct AddressPlace {
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
}
