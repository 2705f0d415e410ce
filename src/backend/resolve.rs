//! Backend host names to addresses. A routing table may name backends by host name (in
//! Kubernetes, a Service or a StatefulSet pod's DNS name); resolving it at every login costs
//! a blocking-pool hand-off and a `getaddrinfo` (often several DNS queries, with the
//! cluster's search domains) per login. Answers are kept for `[performance] dns_ttl`, and an
//! answer that fails to connect is dropped at once, so that a backend that moved (a pod
//! rescheduled with a new address) is looked up again on the next try rather than after the
//! lifetime runs out. IP addresses are never looked up.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio::net::TcpStream;

/// Most host names remembered. The routing table names a handful of hosts; the bound only
/// matters if tables with many different names are loaded one after another.
const MAX_ENTRIES: usize = 4096;

/// Addresses of one host name and port, and when they were looked up.
struct Entry {
    port: u16,
    addrs: Arc<[SocketAddr]>,
    at: Instant,
}

/// Entries by host name, then port: keyed by the name alone so that a lookup borrows the
/// name instead of allocating a key at every login.
type Entries = HashMap<String, Vec<Entry>>;

/// Resolved backend addresses, shared by all sessions.
pub struct Resolver {
    ttl: Duration,
    entries: Mutex<Entries>,
    /// `imapgw_backend_dns_lookups_total{result}`: `cached`, `resolved`, `failed`.
    lookups: Option<IntCounterVec>,
}

impl Resolver {
    /// Answers are kept for `ttl`; zero looks every name up at every connection.
    pub fn new(ttl: Duration, lookups: Option<IntCounterVec>) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            lookups,
        }
    }

    fn count(&self, result: &str) {
        if let Some(c) = &self.lookups {
            c.with_label_values(&[result]).inc();
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Nothing panics while holding it; a poisoned map still holds valid entries.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A remembered answer still within its lifetime.
    fn cached(&self, host: &str, port: u16) -> Option<Arc<[SocketAddr]>> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries();
        let entry = entries.get(host)?.iter().find(|e| e.port == port)?;
        (entry.at.elapsed() < self.ttl).then(|| entry.addrs.clone())
    }

    fn remember(&self, host: &str, port: u16, addrs: Arc<[SocketAddr]>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(host) {
            let ttl = self.ttl;
            entries.retain(|_, ports| {
                ports.retain(|e| e.at.elapsed() < ttl);
                !ports.is_empty()
            });
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        let ports = entries.entry(host.to_owned()).or_default();
        ports.retain(|e| e.port != port);
        ports.push(Entry {
            port,
            addrs,
            at: Instant::now(),
        });
    }

    /// Drops the answer for `host`, so the next connection looks it up again.
    pub fn forget(&self, host: &str, port: u16) {
        let mut entries = self.entries();
        if let Some(ports) = entries.get_mut(host) {
            ports.retain(|e| e.port != port);
            if ports.is_empty() {
                entries.remove(host);
            }
        }
    }

    /// The addresses of `host`, and whether they came from memory.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<(Arc<[SocketAddr]>, bool)> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok((Arc::from([SocketAddr::new(ip, port)]), false));
        }
        if let Some(addrs) = self.cached(host, port) {
            self.count("cached");
            return Ok((addrs, true));
        }
        let addrs: Arc<[SocketAddr]> = match tokio::net::lookup_host((host, port)).await {
            Ok(found) => found.collect::<Vec<_>>().into(),
            Err(e) => {
                self.count("failed");
                return Err(e);
            }
        };
        if addrs.is_empty() {
            self.count("failed");
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: no addresses"),
            ));
        }
        self.count("resolved");
        self.remember(host, port, addrs.clone());
        Ok((addrs, false))
    }

    /// Connects to the first of `host`'s addresses that answers, in the resolver's order, as
    /// `TcpStream::connect` does. A remembered answer that fails (or is abandoned by the
    /// caller's timeout) is forgotten, and a failed remembered answer is looked up afresh
    /// and tried once more when the name now has other addresses.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let (addrs, cached) = self.resolve(host, port).await?;
        if !cached {
            return connect_any(&addrs).await;
        }
        let forget = ForgetOnDrop {
            resolver: self,
            host,
            port,
        };
        match connect_any(&addrs).await {
            Ok(tcp) => {
                std::mem::forget(forget);
                Ok(tcp)
            }
            Err(e) => {
                drop(forget);
                let (fresh, _) = self.resolve(host, port).await?;
                if fresh == addrs {
                    return Err(e);
                }
                connect_any(&fresh).await
            }
        }
    }
}

/// Forgets a remembered answer unless disarmed (with `mem::forget`) on success: also when
/// the connecting future is dropped by a timeout.
struct ForgetOnDrop<'r> {
    resolver: &'r Resolver,
    host: &'r str,
    port: u16,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.resolver.forget(self.host, self.port);
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no addresses")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn ip_addresses_are_not_looked_up_or_remembered() {
        let r = Resolver::new(Duration::from_secs(60), None);
        let (addrs, cached) = r.resolve("127.0.0.1", 143).await.unwrap();
        assert_eq!(&addrs[..], &["127.0.0.1:143".parse().unwrap()]);
        assert!(!cached);
        let (addrs, _) = r.resolve("::1", 993).await.unwrap();
        assert_eq!(&addrs[..], &["[::1]:993".parse().unwrap()]);
        assert!(r.entries().is_empty());
    }

    #[tokio::test]
    async fn names_are_remembered_for_the_ttl_only() {
        let r = Resolver::new(Duration::from_millis(300), None);
        let (first, cached) = r.resolve("localhost", 143).await.unwrap();
        assert!(!cached);
        assert!(
            first
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 143)
        );
        let (again, cached) = r.resolve("localhost", 143).await.unwrap();
        assert!(cached);
        assert_eq!(first, again);
        // Another port is another entry.
        assert!(!r.resolve("localhost", 993).await.unwrap().1);
        std::thread::sleep(Duration::from_millis(350));
        assert!(!r.resolve("localhost", 143).await.unwrap().1);
    }

    #[tokio::test]
    async fn a_zero_ttl_looks_up_every_time() {
        let r = Resolver::new(Duration::ZERO, None);
        assert!(!r.resolve("localhost", 143).await.unwrap().1);
        assert!(!r.resolve("localhost", 143).await.unwrap().1);
        assert!(r.entries().is_empty());
    }

    #[tokio::test]
    async fn an_unknown_name_is_an_error_and_not_remembered() {
        let r = Resolver::new(Duration::from_secs(60), None);
        assert!(r.resolve("no-such-host.invalid", 143).await.is_err());
        assert!(r.entries().is_empty());
    }

    #[tokio::test]
    async fn a_remembered_address_that_fails_is_forgotten_and_the_name_looked_up_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let r = Resolver::new(Duration::from_secs(3600), None);
        // The name "moved": what is remembered is an address where nothing listens.
        let stale: SocketAddr = "127.0.0.2:1".parse().unwrap();
        r.remember("localhost", port, Arc::from([stale]));
        let tcp = r.connect("localhost", port).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap().port(), port);
        let (addrs, cached) = r.resolve("localhost", port).await.unwrap();
        assert!(cached, "the fresh answer is remembered");
        assert!(!addrs.contains(&stale));
    }

    #[tokio::test]
    async fn a_connect_abandoned_by_a_timeout_forgets_the_answer() {
        // A listener whose accept queue is full drops new SYNs: a connect to it hangs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while queued.len() < 8 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => queued.push(tcp),
                _ => break,
            }
        }
        let r = Resolver::new(Duration::from_secs(3600), None);
        r.remember("localhost", addr.port(), Arc::from([addr]));
        let res = tokio::time::timeout(
            Duration::from_millis(300),
            r.connect("localhost", addr.port()),
        );
        assert!(res.await.is_err(), "the connect should still be pending");
        assert!(r.entries().is_empty());
    }

    #[tokio::test]
    async fn the_table_stays_bounded() {
        let r = Resolver::new(Duration::from_secs(3600), None);
        let a: Arc<[SocketAddr]> = Arc::from(["127.0.0.1:1".parse::<SocketAddr>().unwrap()]);
        for i in 0..(MAX_ENTRIES + 10) {
            r.remember(&format!("host{i}"), 143, a.clone());
        }
        assert!(r.entries().len() <= MAX_ENTRIES);
    }
}
