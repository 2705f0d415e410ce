//! One client connection from start to end: pre-auth dialogue, route lookup, backend login,
//! relay, close. The only module that knows all four.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};
use zeroize::Zeroizing;

use crate::backend::passdb::PassDb;
use crate::backend::{self, BackendCredentials, BackendError, ClientInfo};
use crate::config::{BackendAuthMode, Config};
use crate::preauth::{ListenerCtx, LoginAttempt, Preauth};
use crate::proto::capability;
use crate::proto::response::status;
use crate::relay::{self, RelayOptions};
use crate::route::{Route, RoutingTable};
use crate::stream::Stream;

/// What every session shares: configuration, the current routing table, credentials.
pub struct Shared {
    pub config: Config,
    pub routes: ArcSwap<RoutingTable>,
    pub passdb: Option<Arc<PassDb>>,
    pub master_password: Option<Zeroizing<String>>,
    next_session: AtomicU64,
    /// Distinguishes this process's session ids from other replicas'.
    nonce: u32,
}

impl Shared {
    pub fn new(
        config: Config,
        routes: RoutingTable,
        passdb: Option<Arc<PassDb>>,
        master_password: Option<String>,
    ) -> Self {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        Self {
            config,
            routes: ArcSwap::from_pointee(routes),
            passdb,
            master_password: master_password.map(Zeroizing::new),
            next_session: AtomicU64::new(1),
            nonce: nonce ^ std::process::id(),
        }
    }

    fn session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.nonce, n)
    }
}

/// Runs one client connection to its end. Never panics on peer input; every outcome is
/// logged once.
pub async fn run(
    shared: Arc<Shared>,
    listener: Arc<ListenerCtx>,
    stream: Stream,
    peer: SocketAddr,
    local: SocketAddr,
    deadline: Instant,
) {
    let session_id = shared.session_id();
    let span = tracing::info_span!(
        "session",
        id = %session_id,
        %peer,
        listener = %listener.name,
        user = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    let client = ClientInfo {
        peer,
        local,
        session_id,
    };
    async move {
        let mut preauth = Preauth::new(stream, listener, shared.config.limits.clone(), deadline);
        if preauth.greet().await.is_err() {
            return;
        }
        let (attempt, route, session) = loop {
            let attempt = match preauth.next_login().await {
                Ok(a) => a,
                Err(end) => {
                    debug!(reason = end.label(), "ended before login");
                    return;
                }
            };
            match login(&shared, &attempt, &client).await {
                Ok((route, session)) => break (attempt, route, session),
                Err(failure) => {
                    let (code, text) = match failure {
                        LoginFailure::BadCredentials => {
                            ("AUTHENTICATIONFAILED", "Authentication failed.")
                        }
                        LoginFailure::Unavailable => (
                            "UNAVAILABLE",
                            "Mail server temporarily unavailable, try again later.",
                        ),
                    };
                    if let Err(end) = preauth.reject_login(&attempt.tag, code, text).await {
                        debug!(reason = end.label(), "ended before login");
                        return;
                    }
                }
            }
        };
        tracing::Span::current().record("backend", route.home.name.as_str());
        let caps = capability::post_login(&session.capabilities);
        let answer = status(
            &attempt.tag,
            "OK",
            Some(&format!("CAPABILITY {caps}")),
            "Logged in",
        );
        let Ok((mut client_stream, client_ahead)) = preauth.into_parts() else {
            return;
        };
        if client_stream.write_all(&answer).await.is_err() {
            return;
        }
        info!(mechanism = attempt.mechanism, "logged in");
        drop(attempt);
        let limits = &shared.config.limits;
        let opts = RelayOptions {
            max_command_line: limits.max_command_line,
            max_literal: limits.max_literal,
            max_backend_line: limits.max_backend_line,
            backend_logout: shared.config.timeouts.backend_logout,
            rewrite_referrals: !capability::has(&session.capabilities, "MAILBOX-REFERRALS"),
        };
        let end = relay::run(
            client_stream,
            client_ahead,
            session.stream,
            session.leftover,
            &opts,
        )
        .await;
        info!(end = ?end, "session ended");
    }
    .instrument(span)
    .await;
}

enum LoginFailure {
    BadCredentials,
    Unavailable,
}

/// Finds the user's route and logs in there. Bad credentials and backend trouble are told
/// apart so the client gets the right answer, but backend error text never reaches it.
async fn login(
    shared: &Shared,
    attempt: &LoginAttempt,
    client: &ClientInfo,
) -> Result<(Route, backend::BackendSession), LoginFailure> {
    tracing::Span::current().record("user", attempt.user.as_str());
    let Some(route) = shared.routes.load().lookup(&attempt.user) else {
        // An unknown user gets the same answer as a wrong password: no user enumeration.
        info!("no route for user");
        return Err(LoginFailure::BadCredentials);
    };
    let auth = &shared.config.backend_auth;
    let creds = match auth.mode {
        BackendAuthMode::Replay => BackendCredentials::Replay {
            user: &attempt.user,
            password: &attempt.password,
        },
        BackendAuthMode::Master => {
            let (Some(passdb), Some(master_user), Some(master_password)) = (
                shared.passdb.clone(),
                auth.master_user.as_deref(),
                shared.master_password.as_ref(),
            ) else {
                warn!("master mode without passdb or master credentials");
                return Err(LoginFailure::Unavailable);
            };
            let user = attempt.user.clone();
            let password = attempt.password.clone();
            // Crypt schemes cost milliseconds of CPU: keep them off the async workers.
            let ok = tokio::task::spawn_blocking(move || passdb.verify(&user, &password))
                .await
                .unwrap_or(false);
            if !ok {
                info!("password rejected by passdb");
                return Err(LoginFailure::BadCredentials);
            }
            BackendCredentials::Master {
                user: &attempt.user,
                master_user,
                master_password: master_password.as_bytes(),
            }
        }
    };
    let timeouts = backend::Timeouts {
        connect: shared.config.timeouts.backend_connect,
        login: shared.config.timeouts.backend_login,
    };
    match backend::login(&route.home, &creds, client, &timeouts).await {
        Ok(session) => Ok((route, session)),
        Err(BackendError::AuthFailed { .. }) => {
            info!("backend rejected credentials");
            Err(LoginFailure::BadCredentials)
        }
        Err(e) => {
            warn!(error = %e, kind = e.kind(), "backend login failed");
            Err(LoginFailure::Unavailable)
        }
    }
}
