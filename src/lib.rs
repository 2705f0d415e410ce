//! imap-gateway: an IMAP4 proxy that terminates client connections, authenticates, routes
//! each user to the backend holding their mail and relays the session.
//!
//! Dependencies point one way: `net` -> `session` -> `preauth`, `route`, `backend`, `relay`
//! -> `proto`. `proto` and `route` do no I/O.

pub mod admin;
pub mod backend;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod preauth;
pub mod proto;
pub mod relay;
pub mod reload;
pub mod route;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod watch;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BackendAuthMode, Config};
use prometheus::Registry;

use crate::metrics::Metrics;
use crate::route::Routes;
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
    #[error("admin token: {0}")]
    AdminToken(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("limits.exempt_networks: {0}")]
    ExemptNetworks(config::cidr::CidrError),
    #[error("admin server: cannot bind {address}: {source}")]
    AdminBind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Once the grace period is over and every session was told to end now, how long to wait
/// for their tasks to notice before giving up on them (they only need to be polled once).
const FORCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A gateway with its listeners bound, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    listeners: Vec<net::Listener>,
    admin: Option<tokio::net::TcpListener>,
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Gateway {
    /// Validates the configuration, loads the routing table and binds every listener.
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        Self::bind_with_registry(config, Registry::new()).await
    }

    /// As `bind`, with the metrics registered on `registry`.
    pub async fn bind_with_registry(
        config: Config,
        registry: Registry,
    ) -> Result<Self, GatewayError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(config::ConfigError::Invalid(problems).into());
        }
        let routes = Routes::load(&config.routing_table)?;
        let passdb = match (&config.backend_auth.mode, &config.backend_auth.passdb) {
            (BackendAuthMode::Master, Some(p)) => Some(Arc::new(backend::passdb::PassDb::load(p)?)),
            _ => None,
        };
        let master_password = config
            .master_password()
            .map_err(GatewayError::MasterPassword)?;
        let admin_token = config.admin_token().map_err(GatewayError::AdminToken)?;
        let metrics = Metrics::new(&registry)?;
        let admin = if config.admin.enabled {
            let address = config.admin.address;
            Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|source| GatewayError::AdminBind { address, source })?,
            )
        } else {
            None
        };
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            listeners.push(net::Listener::bind(l, &metrics).await?);
        }
        metrics.routing_generation.set(1);
        metrics.routing_last_reload.set(unix_now());
        let shared = Arc::new(
            Shared::new(
                config,
                routes,
                passdb,
                master_password,
                admin_token,
                registry,
                metrics,
            )
            .map_err(GatewayError::ExemptNetworks)?,
        );
        // Listeners bound (connections queue from now on) and a routing table loaded.
        shared.lifecycle.set_ready();
        Ok(Self {
            shared,
            listeners,
            admin,
        })
    }

    /// The bound address of each listener, by name (port 0 in the config picks a free one).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name().to_owned(), l.local_addr().ok()?)))
            .collect()
    }

    /// The admin HTTP server's bound address, when it is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// What the sessions share (the routing table, metrics, lifecycle), for the binary's
    /// signal handling and for tests.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The listeners' certificates, for reloading them on SIGHUP.
    pub fn certificates(&self) -> Vec<Arc<tls::ReloadableCert>> {
        self.listeners
            .iter()
            .filter_map(net::Listener::certificate)
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then drains: readiness turns false, the
    /// listeners stop accepting, every session is asked to stop at its next safe point (BYE),
    /// and sessions still open after `timeouts.shutdown_grace` are closed. The admin server
    /// answers until the end, so `/readyz` is seen turning false.
    pub async fn serve(self, shutdown: CancellationToken) {
        let certs = self.certificates();
        let shared = self.shared;
        let grace = shared.config.timeouts.shutdown_grace;
        let tracker = TaskTracker::new();
        // Stops the admin server and the watchers once every session is gone.
        let finished = CancellationToken::new();
        let mut helpers = Vec::new();
        if let Some(admin) = self.admin {
            helpers.push(tokio::spawn(admin::serve(
                admin,
                Arc::clone(&shared),
                finished.clone(),
            )));
        }
        helpers.push(tokio::spawn(reload::run(
            Arc::clone(&shared),
            certs,
            finished.clone(),
        )));
        let mut accept_loops = Vec::new();
        for l in self.listeners {
            accept_loops.push(tokio::spawn(l.serve(
                Arc::clone(&shared),
                tracker.clone(),
                shutdown.clone(),
            )));
        }
        shutdown.cancelled().await;
        shared.lifecycle.drain();
        shared.metrics.draining.set(1);
        let open = shared.lifecycle.sessions();
        tracing::info!(sessions = open, "draining");
        for handle in accept_loops {
            let _ = handle.await;
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "shutdown grace period over; closing remaining sessions"
            );
            shared.lifecycle.force();
            if tokio::time::timeout(FORCE_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    sessions = tracker.len(),
                    "sessions did not end when forced; exiting anyway"
                );
            }
        }
        finished.cancel();
        for h in helpers {
            let _ = h.await;
        }
    }
}
