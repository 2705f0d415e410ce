//! imap-gateway: an IMAP4 proxy that terminates client connections, authenticates, routes
//! each user to the backend holding their mail and relays the session.
//!
//! Dependencies point one way: `net` -> `session` -> `preauth`, `route`, `backend`, `relay`
//! -> `proto`. `proto` and `route` do no I/O.

pub mod backend;
pub mod config;
pub mod net;
pub mod preauth;
pub mod proto;
pub mod relay;
pub mod route;
pub mod session;
pub mod stream;
pub mod tls;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BackendAuthMode, Config};
use crate::route::RoutingTable;
use crate::session::Shared;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Route(#[from] route::RouteError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    PassDb(#[from] backend::passdb::PassDbError),
    #[error("master password: {0}")]
    MasterPassword(std::io::Error),
}

/// A gateway with its listeners bound, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<net::Listener>,
}

impl Gateway {
    /// Validates the configuration, loads the routing table and binds every listener.
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(config::ConfigError::Invalid(problems).into());
        }
        let routes = RoutingTable::load(&config.routing_table)?;
        let passdb = match (&config.backend_auth.mode, &config.backend_auth.passdb) {
            (BackendAuthMode::Master, Some(p)) => Some(Arc::new(backend::passdb::PassDb::load(p)?)),
            _ => None,
        };
        let master_password = config
            .master_password()
            .map_err(GatewayError::MasterPassword)?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            listeners.push(net::Listener::bind(l).await?);
        }
        Ok(Self {
            shared: Arc::new(Shared::new(config, routes, passdb, master_password)),
            listeners,
        })
    }

    /// The bound address of each listener, by name (port 0 in the config picks a free one).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name().to_owned(), l.local_addr().ok()?)))
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then waits for open sessions to end, at most
    /// `timeouts.shutdown_grace`; sessions still open then are dropped with the process.
    pub async fn serve(self, shutdown: CancellationToken) {
        let grace = self.shared.config.timeouts.shutdown_grace;
        let tracker = TaskTracker::new();
        let mut accept_loops = Vec::new();
        for l in self.listeners {
            accept_loops.push(tokio::spawn(l.serve(
                Arc::clone(&self.shared),
                tracker.clone(),
                shutdown.clone(),
            )));
        }
        for handle in accept_loops {
            let _ = handle.await;
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "shutdown grace period over; closing remaining sessions"
            );
        }
    }
}
