//! The admin HTTP server (hyper, its own address): the accept loop, one task per connection,
//! the limits that keep a misbehaving client from tying it up, and the graceful stop.
//! What each path does is in `endpoints`; who may call `/admin/*` is in `auth`.

mod auth;
mod endpoints;
mod json;
mod query;

use std::convert::Infallible;
use std::sync::Arc;
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
/// this the accept loop waits and the kernel's backlog holds new connections.
const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a request's headers, counted from when the server starts
/// waiting for them, so it also closes keep-alive connections left idle (slow-loris and
/// forgotten connections both end).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Request line plus headers. Admin requests carry a path, a query and a token; 16 KiB is
/// generous and keeps a hostile request from growing the read buffer.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Header count; a client sends a handful.
const MAX_HEADERS: usize = 32;

/// Once the gateway is finished, the time an in-flight request gets to complete before its
/// connection is dropped: the process is about to exit.
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
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = finished.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = finished.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                tracker.spawn(connection(
                    tcp,
                    Arc::clone(&ctx),
                    Arc::clone(&builder),
                    finished.clone(),
                    permit,
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

/// Serves one connection until the client closes it, a limit ends it, or the gateway is
/// finished (then the response in flight, if any, may complete within [`CLOSE_GRACE`]).
async fn connection(
    tcp: TcpStream,
    ctx: Arc<Ctx>,
    builder: Arc<http1::Builder>,
    finished: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(endpoints::handle(req, &ctx).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            return;
        }
        _ = finished.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}
