//! The admin HTTP server (hyper, its own address): the accept loop, one task per connection,
//! the limits that keep a misbehaving client from tying it up, and the graceful stop.
//! What each path does is in `endpoints`; who may call `/admin/*` is in `auth`.
//!
//! The port must answer liveness probes whatever other clients do. A client that sends
//! nothing, or asks for `/metrics` and never reads the answer (hyper has no write timeout),
//! holds its connection; so every connection has a bounded life, and when all are taken a
//! new one makes the oldest give way instead of waiting behind it.

mod auth;
mod endpoints;
mod json;
mod query;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::Shared;
use endpoints::Ctx;

/// Connections served at once. The port serves a scraper, probes and an operator; beyond
/// this a new connection makes the oldest one give way (see [`EVICT_GRACE`]).
const MAX_CONNECTIONS: usize = 64;

/// Longest life of one connection. Admin requests take milliseconds; a client that stops
/// reading an answer (nothing else times out a blocked write) is let go after this, and a
/// keep-alive scraper simply connects again.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Time the oldest connection gets to finish its answer when a new one needs its place. A
/// healthy client's answer is long written by then; a stalled one's never will be, and a
/// probe waiting for the place must be answered well within its own timeout (kubelet's
/// default is 1 s).
const EVICT_GRACE: Duration = Duration::from_millis(250);

/// Time a client has to send a request's headers, counted from when the server starts
/// waiting for them, so it also closes keep-alive connections left idle (slow-loris and
/// forgotten connections both end).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Request line plus headers. Admin requests carry a path, a query and a token; 16 KiB is
/// generous and keeps a hostile request from growing the read buffer.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Header count; a client sends a handful.
const MAX_HEADERS: usize = 32;

/// Once the gateway is finished or a connection's life is over, the time an in-flight
/// request gets to complete before its connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves admin requests on `listener` until `finished`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, finished: CancellationToken) {
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "admin server: no local address; not serving");
            return;
        }
    };
    tracing::info!(address = %bound, "admin server listening");
    let ctx = Arc::new(Ctx {
        shared,
        listener: bound,
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = Arc::new(Open::default());
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = finished.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let permit = match Arc::clone(&slots).try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        // Full: the oldest connection gives way rather than this one waiting
                        // behind clients that may never finish. One at a time, so the
                        // number of connections stays bounded.
                        open.evict_oldest();
                        tokio::select! {
                            _ = finished.cancelled() => break,
                            p = Arc::clone(&slots).acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => break,
                            },
                        }
                    }
                };
                let slot = open.enter(permit);
                tracker.spawn(connection(
                    tcp,
                    Arc::clone(&ctx),
                    Arc::clone(&builder),
                    finished.clone(),
                    slot,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin server: accept failed");
                tokio::select! {
                    _ = finished.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// The open connections, oldest first, each with the token that makes it give way.
#[derive(Default)]
struct Open {
    inner: Mutex<OpenInner>,
}

#[derive(Default)]
struct OpenInner {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenInner> {
        // A map of tokens stays usable even if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection holding `permit`.
    fn enter(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let evict = CancellationToken::new();
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.by_age.insert(id, evict.clone());
        Slot {
            open: Arc::clone(self),
            id,
            evict,
            _permit: permit,
        }
    }

    /// Tells the oldest connection to give way; it leaves the map now, so the next call
    /// picks the next one even while this one is still finishing.
    fn evict_oldest(&self) {
        let oldest = self.lock().by_age.pop_first();
        if let Some((_, evict)) = oldest {
            tracing::debug!("admin server: all connections in use; closing the oldest");
            evict.cancel();
        }
    }
}

/// One connection's place: its permit and its entry in [`Open`], both given back on drop.
struct Slot {
    open: Arc<Open>,
    id: u64,
    evict: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.lock().by_age.remove(&self.id);
    }
}

/// Serves one connection until the client closes it, a limit ends it ([`CONNECTION_LIFETIME`],
/// or a newer connection needing its place), or the gateway is finished. Then the response
/// in flight, if any, may complete within a grace period; after that the connection is
/// dropped, written out or not.
async fn connection(
    tcp: TcpStream,
    ctx: Arc<Ctx>,
    builder: Arc<http1::Builder>,
    finished: CancellationToken,
    slot: Slot,
) {
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(endpoints::handle(req, &ctx).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    let grace = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            return;
        }
        _ = finished.cancelled() => CLOSE_GRACE,
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => CLOSE_GRACE,
        _ = slot.evict.cancelled() => EVICT_GRACE,
    };
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}
