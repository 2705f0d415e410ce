//! Limits on how much of the gateway one party may hold: connections gateway-wide and per
//! client address, logged-in sessions per user, and (in [`penalty`]) the delay that failed
//! logins put on an address's next attempts.
//!
//! A held connection or session is a guard ([`ConnSlot`], [`UserSlot`]) that gives its place
//! back when dropped, whatever path the session's task ends by, so counts cannot leak. The
//! per-address and per-user tables hold only keys with a count above zero: their size is
//! bounded by the connections open.

pub mod penalty;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus::IntGauge;
use thiserror::Error;

use crate::config::cidr::Cidr;

/// Which limit refused a connection or a login.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    #[error("too many connections to the gateway")]
    Connections,
    #[error("too many connections from this client address")]
    ConnectionsPerIp,
    #[error("too many sessions for this user")]
    SessionsPerUser,
}

impl LimitError {
    /// The BYE a refused connection gets (a refused login gets a tagged `NO [LIMIT]`).
    pub fn bye(self) -> &'static [u8] {
        match self {
            LimitError::ConnectionsPerIp => {
                b"* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n"
            }
            _ => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        }
    }
}

/// A client address as the limits group them: an IPv4 address, or the /64 an IPv6 address
/// is in (one subscriber's line or one host's SLAAC addresses share a /64, and an attacker
/// given one has 2^64 addresses to rotate through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpKey {
    V4(u32),
    V6Net(u64),
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        // A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d: the same client.
        match ip.to_canonical() {
            IpAddr::V4(a) => IpKey::V4(u32::from(a)),
            IpAddr::V6(a) => IpKey::V6Net((u128::from(a) >> 64) as u64),
        }
    }
}

/// Counts of holders per key, entries removed at zero.
struct Counts<K>(Mutex<HashMap<K, usize>>);

impl<K: Eq + Hash> Counts<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        // Nothing panics while holding it; the counts in a poisoned lock are still right.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one holder of `key` unless it has `max` already (`0`: no maximum).
    fn acquire(&self, key: K, max: usize) -> bool {
        let mut map = self.lock();
        // A refusal needs a count of at least max > 0: no entry is ever left at zero.
        let n = map.entry(key).or_insert(0);
        if max != 0 && *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, key: &K) {
        let mut map = self.lock();
        if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }

    fn get(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    fn keys(&self) -> usize {
        self.lock().len()
    }
}

/// The gateway's client connections: how many are open, in all and per client address.
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    exempt: Vec<Cidr>,
    total: AtomicUsize,
    per_ip: Counts<IpKey>,
    /// Follows `total`, for the metrics.
    gauge: IntGauge,
}

impl ConnLimiter {
    /// `0` for either maximum means no limit; `exempt` networks have no per-address limit.
    pub fn new(
        max_total: usize,
        max_per_ip: usize,
        exempt: Vec<Cidr>,
        gauge: IntGauge,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            exempt,
            total: AtomicUsize::new(0),
            per_ip: Counts::new(),
            gauge,
        })
    }

    /// Takes a place among all connections; called as a connection is accepted, before its
    /// client address is known (behind a PROXY-protocol load balancer it comes later).
    pub fn acquire(self: &Arc<Self>) -> Result<ConnSlot, LimitError> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total != 0 && before >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Connections);
        }
        self.gauge.inc();
        Ok(ConnSlot {
            limiter: Arc::clone(self),
            ip: None,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections open now from `ip`'s address group (exempt ones are not counted).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&IpKey::from(ip))
    }

    /// Address groups with a connection open now: the per-address table's size.
    pub fn addresses(&self) -> usize {
        self.per_ip.keys()
    }
}

/// One connection's place, given back when dropped.
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: Option<IpKey>,
}

impl ConnSlot {
    /// Counts the connection against its client's address, once that is known.
    pub fn claim_ip(&mut self, ip: IpAddr) -> Result<(), LimitError> {
        let l = &self.limiter;
        if self.ip.is_some() || Cidr::any_contains(&l.exempt, ip) {
            return Ok(());
        }
        let key = IpKey::from(ip);
        if !l.per_ip.acquire(key, l.max_per_ip) {
            return Err(LimitError::ConnectionsPerIp);
        }
        self.ip = Some(key);
        Ok(())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(key) = self.ip {
            self.limiter.per_ip.release(&key);
        }
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        self.limiter.gauge.dec();
    }
}

/// Logged-in sessions per user.
pub struct UserLimiter {
    max: usize,
    per_user: Counts<String>,
}

impl UserLimiter {
    /// `0`: no limit (sessions are still counted).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_user: Counts::new(),
        })
    }

    /// Takes a session place for `user` (compared without case, as routing does).
    pub fn acquire(self: &Arc<Self>, user: &str) -> Result<UserSlot, LimitError> {
        let key = user.to_lowercase();
        if !self.per_user.acquire(key.clone(), self.max) {
            return Err(LimitError::SessionsPerUser);
        }
        Ok(UserSlot {
            limiter: Arc::clone(self),
            key,
        })
    }

    /// Sessions open now for `user`.
    pub fn sessions_of(&self, user: &str) -> usize {
        self.per_user.get(&user.to_lowercase())
    }

    /// Users with a session open now: the table's size.
    pub fn users(&self) -> usize {
        self.per_user.keys()
    }
}

/// One logged-in session's place, given back when dropped.
pub struct UserSlot {
    limiter: Arc<UserLimiter>,
    key: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.limiter.per_user.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gauge() -> IntGauge {
        IntGauge::new("open", "test").unwrap()
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            IpKey::from(ip("2001:db8:1:2::1")),
            IpKey::from(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            IpKey::from(ip("2001:db8:1:2::1")),
            IpKey::from(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            IpKey::from(ip("::ffff:10.1.2.3")),
            IpKey::from(ip("10.1.2.3"))
        );
        assert_ne!(IpKey::from(ip("10.1.2.3")), IpKey::from(ip("10.1.2.4")));
    }

    #[test]
    fn total_limit_and_slots_give_back_on_drop() {
        let l = ConnLimiter::new(2, 0, Vec::new(), gauge());
        let a = l.acquire().unwrap();
        let b = l.acquire().unwrap();
        assert_eq!(l.acquire().err(), Some(LimitError::Connections));
        assert_eq!(l.open(), 2, "a refusal holds nothing");
        drop(a);
        let c = l.acquire().unwrap();
        assert_eq!(l.gauge.get(), 2);
        drop((b, c));
        assert_eq!(l.open(), 0);
        assert_eq!(l.gauge.get(), 0);
    }

    #[test]
    fn per_ip_limit_groups_v6_and_spares_exempt_networks() {
        let l = ConnLimiter::new(0, 2, vec!["192.0.2.0/24".parse().unwrap()], gauge());
        let mut slots = Vec::new();
        for a in ["2001:db8::1", "2001:db8::2"] {
            let mut s = l.acquire().unwrap();
            s.claim_ip(ip(a)).unwrap();
            slots.push(s);
        }
        let mut third = l.acquire().unwrap();
        assert_eq!(
            third.claim_ip(ip("2001:db8::3")),
            Err(LimitError::ConnectionsPerIp)
        );
        drop(third);
        let mut other = l.acquire().unwrap();
        other.claim_ip(ip("2001:db8:0:1::1")).unwrap();
        slots.push(other);
        for _ in 0..5 {
            let mut s = l.acquire().unwrap();
            s.claim_ip(ip("192.0.2.9")).unwrap();
            slots.push(s);
        }
        assert_eq!(l.open_from(ip("192.0.2.9")), 0, "exempt: not counted");
        assert_eq!(l.open_from(ip("2001:db8::ffff")), 2);
        assert_eq!(l.addresses(), 2);
        drop(slots);
        assert_eq!(l.open(), 0);
        assert_eq!(l.addresses(), 0, "entries are removed at zero");
    }

    #[test]
    fn per_user_limit_ignores_case_and_empties() {
        let l = UserLimiter::new(1);
        let a = l.acquire("Alice").unwrap();
        assert_eq!(l.acquire("alice").err(), Some(LimitError::SessionsPerUser));
        let b = l.acquire("bob").unwrap();
        assert_eq!(l.sessions_of("ALICE"), 1);
        drop(a);
        let a2 = l.acquire("ALICE").unwrap();
        drop((a2, b));
        assert_eq!(l.users(), 0);
        let unlimited = UserLimiter::new(0);
        let many: Vec<_> = (0..10).map(|_| unlimited.acquire("x").unwrap()).collect();
        assert_eq!(unlimited.sessions_of("x"), 10);
        drop(many);
        assert_eq!(unlimited.users(), 0);
    }
}
