//! The auth penalty: failed logins from a client address (IPv6: its /64) delay that
//! address's next login attempts, `base` after the first failure and doubling with each
//! further one up to `max`. The delay is an async sleep in the attempting session's own task
//! (see `session`), so it slows password guessing from one place without holding a lock or
//! a worker, and without touching other clients.
//!
//! Memory is bounded: the table holds at most `capacity` addresses, forgetting the one whose
//! last failure is oldest when a new one comes, and an address with no failure for `expiry`
//! is forgotten. A successful login from the address clears it (a legitimate user is there,
//! perhaps behind the same NAT as the one who mistyped). Exempt networks are never penalised.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use super::IpKey;
use crate::config::cidr::Cidr;

/// Doubling stops long before this many failures matters: 2^20 seconds is twelve days.
const MAX_DOUBLINGS: u32 = 20;

/// How the penalty grows and how long it is remembered.
#[derive(Debug, Clone)]
pub struct PenaltyConfig {
    /// Delay after one failure; zero turns the penalty off.
    pub base: Duration,
    /// Longest delay, however many failures.
    pub max: Duration,
    /// An address with no failure for this long is forgotten.
    pub expiry: Duration,
    /// Addresses remembered at most.
    pub capacity: usize,
    pub exempt: Vec<Cidr>,
}

struct Entry {
    failures: u32,
    last: Instant,
    /// The entry's key in `Table::order`.
    seq: u64,
}

#[derive(Default)]
struct Table {
    entries: HashMap<IpKey, Entry>,
    /// Addresses by the order of their last failure, oldest first: for expiry and eviction
    /// without a scan of the table.
    order: BTreeMap<u64, IpKey>,
    next_seq: u64,
}

impl Table {
    fn remove(&mut self, key: &IpKey) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.seq);
        }
    }

    /// Forgets the addresses whose last failure is `expiry` or more before `now`.
    fn expire(&mut self, now: Instant, expiry: Duration) {
        while let Some((_, key)) = self.order.first_key_value() {
            let key = *key;
            match self.entries.get(&key) {
                Some(e) if now.saturating_duration_since(e.last) < expiry => break,
                _ => self.remove(&key),
            }
        }
    }
}

/// The table of penalised addresses.
pub struct AuthPenalty {
    config: PenaltyConfig,
    table: Mutex<Table>,
    /// Addresses in the table, kept current for the metrics.
    entries: IntGauge,
}

impl AuthPenalty {
    pub fn new(config: PenaltyConfig, entries: IntGauge) -> Self {
        Self {
            config,
            table: Mutex::new(Table::default()),
            entries,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding it; a poisoned table is still a consistent table.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn applies_to(&self, ip: IpAddr) -> bool {
        !self.config.base.is_zero() && !Cidr::any_contains(&self.config.exempt, ip)
    }

    /// How long a login attempt from `ip` must wait now.
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        if !self.applies_to(ip) {
            return Duration::ZERO;
        }
        let mut table = self.table();
        table.expire(now, self.config.expiry);
        let failures = table
            .entries
            .get(&IpKey::from(ip))
            .map_or(0, |e| e.failures);
        self.entries.set(table.entries.len() as i64);
        drop(table);
        self.delay_after(failures)
    }

    fn delay_after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(MAX_DOUBLINGS);
        self.config
            .base
            .saturating_mul(1 << doublings)
            .min(self.config.max)
    }

    /// A login from `ip` failed (wrong credentials).
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if !self.applies_to(ip) || self.config.capacity == 0 {
            return;
        }
        let key = IpKey::from(ip);
        let mut table = self.table();
        table.expire(now, self.config.expiry);
        let seq = table.next_seq;
        table.next_seq += 1;
        let failures = match table.entries.get(&key) {
            Some(e) => {
                let (old, failures) = (e.seq, e.failures.saturating_add(1));
                table.order.remove(&old);
                failures
            }
            None => {
                if table.entries.len() >= self.config.capacity
                    && let Some((_, oldest)) = table.order.pop_first()
                {
                    table.entries.remove(&oldest);
                }
                1
            }
        };
        table.entries.insert(
            key,
            Entry {
                failures,
                last: now,
                seq,
            },
        );
        table.order.insert(seq, key);
        self.entries.set(table.entries.len() as i64);
    }

    /// A login from `ip` succeeded: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        if !self.applies_to(ip) {
            return;
        }
        let mut table = self.table();
        table.remove(&IpKey::from(ip));
        self.entries.set(table.entries.len() as i64);
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn penalty(capacity: usize, exempt: &[&str]) -> AuthPenalty {
        AuthPenalty::new(
            PenaltyConfig {
                base: S,
                max: 15 * S,
                expiry: 900 * S,
                capacity,
                exempt: exempt.iter().map(|n| n.parse().unwrap()).collect(),
            },
            IntGauge::new("entries", "test").unwrap(),
        )
    }

    #[test]
    fn doubles_per_failure_up_to_the_cap() {
        let p = penalty(10, &[]);
        let t = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(p.delay(a, t), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..40 {
            p.failed(a, t);
            seen.push(p.delay(a, t).as_secs());
        }
        assert_eq!(&seen[..6], &[1, 2, 4, 8, 15, 15]);
        assert!(
            seen.iter().all(|&d| d <= 15),
            "never above the cap: {seen:?}"
        );
        assert_eq!(
            p.delay(ip("192.0.2.2"), t),
            Duration::ZERO,
            "another address"
        );
    }

    #[test]
    fn forgotten_after_expiry_and_after_success() {
        let p = penalty(10, &[]);
        let t = Instant::now();
        let a = ip("192.0.2.1");
        p.failed(a, t);
        p.failed(a, t + 100 * S);
        // The expiry counts from the last failure, not the first.
        assert_eq!(p.delay(a, t + 999 * S), 2 * S);
        assert_eq!(p.delay(a, t + 1000 * S), Duration::ZERO);
        assert!(
            p.is_empty(),
            "expired entries are removed, not just ignored"
        );
        p.failed(a, t);
        p.failed(a, t);
        p.succeeded(a);
        assert_eq!(p.delay(a, t), Duration::ZERO);
        assert_eq!(p.entries.get(), 0);
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_a_penalty() {
        let p = penalty(10, &[]);
        let t = Instant::now();
        p.failed(ip("2001:db8:1:2::1"), t);
        p.failed(ip("2001:db8:1:2::2"), t);
        assert_eq!(p.delay(ip("2001:db8:1:2:abcd::9"), t), 2 * S);
        assert_eq!(p.delay(ip("2001:db8:1:3::1"), t), Duration::ZERO);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn table_is_bounded_and_forgets_the_stalest_first() {
        let p = penalty(100, &[]);
        let t = Instant::now();
        let first = ip("10.0.0.0");
        p.failed(first, t);
        p.failed(first, t);
        for i in 1..100u32 {
            p.failed(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), t);
        }
        assert_eq!(p.len(), 100);
        // The first address failed again: now the most recent, it outlives the others.
        p.failed(first, t + S);
        for i in 0..99u32 {
            p.failed(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), t + 2 * S);
        }
        assert_eq!(p.len(), 100);
        assert_eq!(
            p.delay(ip("10.0.0.5"), t + 2 * S),
            Duration::ZERO,
            "evicted"
        );
        assert_eq!(
            p.delay(first, t + 2 * S),
            4 * S,
            "kept: failed most recently"
        );
        for i in 99..10_000u32 {
            p.failed(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), t + 2 * S);
            assert!(p.len() <= 100);
        }
        assert_eq!(p.len(), 100);
        assert_eq!(p.entries.get(), 100);
        assert_eq!(p.delay(first, t + 2 * S), Duration::ZERO, "evicted at last");
        assert_eq!(p.delay(ip("11.0.39.15"), t + 2 * S), S, "most recent kept");
        let t2 = t + 2 * S + 900 * S;
        assert_eq!(p.delay(ip("11.0.39.15"), t2), Duration::ZERO);
        assert!(p.is_empty());
    }

    #[test]
    fn exempt_networks_and_zero_base_are_never_penalised() {
        let p = penalty(10, &["127.0.0.0/8", "fd00::/8"]);
        let t = Instant::now();
        for a in ["127.0.0.1", "::ffff:127.0.0.1", "fd00::1"] {
            for _ in 0..5 {
                p.failed(ip(a), t);
            }
            assert_eq!(p.delay(ip(a), t), Duration::ZERO, "{a}");
        }
        assert!(p.is_empty());
        let off = AuthPenalty::new(
            PenaltyConfig {
                base: Duration::ZERO,
                max: Duration::ZERO,
                expiry: S,
                capacity: 10,
                exempt: Vec::new(),
            },
            IntGauge::new("entries", "test").unwrap(),
        );
        off.failed(ip("192.0.2.1"), t);
        assert_eq!(off.delay(ip("192.0.2.1"), t), Duration::ZERO);
        assert!(off.is_empty());
    }
}
