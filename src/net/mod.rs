//! Listeners and the accept loop: binds every configured listener, accepts connections,
//! does the implicit-TLS handshake inside the connection's own task (bounded by the pre-auth
//! deadline, so a slow handshake never stalls the accept loop) and hands it to a session.
//! On a `proxy_protocol` listener the PROXY header is read first, in the same task, and its
//! client address is the one the session knows (`proxy`).
//!
//! The connection limits are applied here: gateway-wide and (on a plain listener) per client
//! address in the accept loop, before a task exists; per address after the PROXY header on a
//! `proxy_protocol` listener. The connection's place ([`ConnSlot`]) lives in its task.

pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ListenerConfig, ListenerMode};
use crate::limits::{ConnSlot, LimitError};
use crate::metrics::{Limit, Metrics, TlsResult};
use crate::net::proxy::ProxyPolicy;
use crate::preauth::ListenerCtx;
use crate::proto::proxy::ProxyError;
use crate::session::{self, Shared};
use crate::stream::Stream;
use crate::tls::ReloadableCert;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("listener {name:?}: cannot bind {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name:?}: proxy_trusted_networks: {source}")]
    TrustedNetworks {
        name: String,
        source: crate::config::cidr::CidrError,
    },
    #[error("listener {name:?}: {source}")]
    Tls {
        name: String,
        source: crate::tls::TlsError,
    },
}

/// A bound listener.
pub struct Listener {
    ctx: Arc<ListenerCtx>,
    cert: Option<Arc<ReloadableCert>>,
    implicit_tls: bool,
    /// Set on a `proxy_protocol` listener.
    proxy: Option<Arc<ProxyPolicy>>,
    socket: TcpListener,
}

impl Listener {
    pub async fn bind(config: &ListenerConfig, metrics: &Metrics) -> Result<Self, NetError> {
        let tls_error = |source| NetError::Tls {
            name: config.name.clone(),
            source,
        };
        let cert = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                ReloadableCert::load(&config.name, cert, key).map_err(tls_error)?,
            )),
            _ => None,
        };
        let tls = match &cert {
            Some(c) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(Arc::clone(c), config.tls_session_tickets)
                    .map_err(tls_error)?,
            )),
            None => None,
        };
        let proxy = if config.proxy_protocol {
            let trusted =
                config
                    .trusted_networks()
                    .map_err(|source| NetError::TrustedNetworks {
                        name: config.name.clone(),
                        source,
                    })?;
            Some(Arc::new(ProxyPolicy { trusted }))
        } else {
            None
        };
        let socket = listen(config.address).map_err(|source| NetError::Bind {
            name: config.name.clone(),
            address: config.address,
            source,
        })?;
        Ok(Self {
            ctx: Arc::new(ListenerCtx {
                name: config.name.clone(),
                tls,
                allow_plaintext_auth: config.allow_plaintext_auth,
                metrics: metrics.listener(&config.name),
            }),
            implicit_tls: config.mode == ListenerMode::Tls,
            proxy,
            cert,
            socket,
        })
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    /// The listener's certificate, for reloading when its files change.
    pub fn certificate(&self) -> Option<Arc<ReloadableCert>> {
        self.cert.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accepts until `shutdown`; each connection runs in its own task on `tracker`.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        info!(listener = %self.ctx.name, address = ?self.socket.local_addr().ok(), "listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.socket.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!(listener = %self.ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let counters = &self.ctx.metrics;
            counters.accepted.inc();
            if let Some(policy) = &self.proxy {
                // Decided here, before a task or a byte read: an untrusted peer's header could
                // claim any address, so the connection is closed unread and nothing is said.
                if let Err(e) = policy.check_peer(peer) {
                    if let Some(reason) = proxy::rejected_reason(&e) {
                        counters.proxy_rejected(reason);
                    }
                    debug!(listener = %self.ctx.name, %peer, error = %e, "PROXY protocol from an untrusted peer: closed");
                    continue;
                }
            }
            // Refused here, before a task is spawned: past the limit, a connection costs no
            // more than its accept.
            let mut slot = match shared.connections.acquire() {
                Ok(slot) => slot,
                Err(e) => {
                    refuse_at_once(&tcp, self.implicit_tls, e, &shared.metrics);
                    debug!(listener = %self.ctx.name, %peer, "too many connections: closed");
                    continue;
                }
            };
            // Behind a PROXY-protocol load balancer the client's address comes with the
            // header, in the connection's task.
            if self.proxy.is_none()
                && let Err(e) = slot.claim_ip(peer.ip())
            {
                refuse_at_once(&tcp, self.implicit_tls, e, &shared.metrics);
                debug!(listener = %self.ctx.name, %peer, "too many connections from the address: closed");
                continue;
            }
            let active = ActiveGuard::new(counters.active.clone());
            let local = tcp.local_addr().unwrap_or(peer);
            let started = Instant::now();
            let deadline = started + shared.config.timeouts.preauth;
            // Registered at once, so a shutdown reaches the connection in every stage,
            // TLS handshake and backend login included.
            let registration = shared.lifecycle.register();
            let conn = Connection {
                ctx: Arc::clone(&self.ctx),
                shared: Arc::clone(&shared),
                tcp,
                peer,
                local,
                started,
                deadline,
                implicit_tls: self.implicit_tls,
                proxy: self.proxy.is_some(),
                registration,
                active,
                slot,
            };
            tracker.spawn(conn.run());
        }
    }
}

/// An accepted connection, before its PROXY header, TLS handshake and session.
struct Connection {
    ctx: Arc<ListenerCtx>,
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    started: Instant,
    deadline: Instant,
    implicit_tls: bool,
    proxy: bool,
    registration: crate::shutdown::SessionGuard,
    active: ActiveGuard,
    slot: ConnSlot,
}

/// A connection with its PROXY header read and its TLS handshake done.
struct Accepted {
    ctx: Arc<ListenerCtx>,
    shared: Arc<Shared>,
    stream: Stream,
    addrs: session::Addresses,
    deadline: Instant,
    registration: crate::shutdown::SessionGuard,
    active: ActiveGuard,
    /// The connection's place under the connection limits, held until its task ends.
    slot: ConnSlot,
}

impl Connection {
    /// The connection's task. Whatever stage the connection is in when the grace period
    /// ends, it ends (each stage watches for that; a logged-in session records how it ended).
    ///
    /// Not an `async fn`: the task's future keeps only the stage it is in, not also the
    /// connection it was made from (the spawned future is stored once; a future captured by
    /// another and awaited there is stored twice).
    fn run(self) -> impl Future<Output = ()> + Send {
        let stop = self.registration.stop().clone();
        // Boxed: the PROXY header and TLS handshake states are freed once they are done.
        let accept = Box::pin(self.accept());
        async move {
            let accepted = tokio::select! {
                biased;
                accepted = accept => accepted,
                _ = stop.forced() => None,
            };
            let Some(a) = accepted else {
                return;
            };
            let _active = a.active;
            let _slot = a.slot;
            session::run(
                a.shared,
                a.ctx,
                a.stream,
                a.addrs,
                a.deadline,
                a.registration,
            )
            .await;
        }
    }

    async fn accept(self) -> Option<Accepted> {
        let Connection {
            ctx,
            shared,
            mut tcp,
            peer,
            local,
            started,
            deadline,
            implicit_tls,
            proxy,
            registration,
            active,
            mut slot,
        } = self;
        let counters = &ctx.metrics;
        let (client, local) = if proxy {
            let header_deadline = deadline.min(started + proxy::HEADER_TIMEOUT);
            let header = tokio::time::timeout_at(header_deadline, proxy::read_header(&mut tcp))
                .await
                .unwrap_or_else(|_| Err(ProxyError::Timeout(header_deadline - started)));
            match header {
                Ok(header) => proxy::addresses(header, peer, local),
                Err(e) => {
                    if let Some(reason) = proxy::rejected_reason(&e) {
                        counters.proxy_rejected(reason);
                    }
                    debug!(%peer, error = %e, "PROXY header refused");
                    return None;
                }
            }
        } else {
            (peer, local)
        };
        // The load balancer's address, logged next to the client's it spoke for.
        let via = (proxy && client != peer).then_some(peer);
        let peer = client;
        if proxy && let Err(e) = slot.claim_ip(peer.ip()) {
            shared.metrics.limits.hit(Limit::ConnectionsPerIp);
            debug!(%peer, "too many connections from the address: closed");
            if !implicit_tls {
                let _ = tokio::time::timeout(REFUSAL_WRITE, tcp.write_all(e.bye())).await;
                let _ = tokio::time::timeout(REFUSAL_WRITE, tcp.shutdown()).await;
            }
            return None;
        }
        let stream = if implicit_tls {
            let acceptor = ctx.tls.clone()?;
            match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    counters.tls(false, TlsResult::Ok);
                    if crate::tls::resumed(tls.get_ref().1) {
                        counters.tls_resumed(false);
                    }
                    Stream::Tls(Box::new(tls.into()))
                }
                Ok(Err(e)) => {
                    counters.tls(false, TlsResult::Failed);
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    counters.tls(false, TlsResult::Timeout);
                    shared.metrics.limits.hit(Limit::PreauthTimeout);
                    debug!(%peer, "TLS handshake timed out");
                    return None;
                }
            }
        } else {
            Stream::Plain(tcp)
        };
        Some(Accepted {
            ctx,
            shared,
            stream,
            addrs: session::Addresses { peer, local, via },
            deadline,
            registration,
            active,
            slot,
        })
    }
}

/// Connections the kernel queues for the accept loop. `TcpListener::bind` asks for 128: a
/// burst beyond that (clients reconnecting after a replica restarts, thousands of them)
/// loses SYNs, each retried by the client only after a second or more. The kernel caps it
/// at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds and listens on `address` with [`LISTEN_BACKLOG`].
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted gateway binds again at once, without waiting
    // out the old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a refused connection may take to be told so.
const REFUSAL_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Refuses a connection from the accept loop, which must never wait on a client: the BYE is
/// written only if the socket takes it at once (a new socket's buffer is empty, so it does).
/// A TLS client cannot read a cleartext BYE: it is closed without a word.
fn refuse_at_once(tcp: &tokio::net::TcpStream, implicit_tls: bool, e: LimitError, m: &Metrics) {
    m.limits.hit(match e {
        LimitError::ConnectionsPerIp => Limit::ConnectionsPerIp,
        _ => Limit::Connections,
    });
    if !implicit_tls {
        let _ = tcp.try_write(e.bye());
    }
}

/// Holds a gauge up for as long as it lives (a connection, a session).
pub struct ActiveGuard(prometheus::IntGauge);

impl ActiveGuard {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
