//! The admin HTTP server (hyper, its own address): `/metrics`, `/healthz`, `/readyz` and the
//! token-guarded `/admin/*` endpoints.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::session::Shared;

/// Serves admin requests on `listener` until `finished`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, finished: CancellationToken) {
    // Placeholder until the server lands: keeps the listener bound.
    let _ = (&listener, &shared);
    finished.cancelled().await;
}
