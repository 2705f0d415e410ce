//! One client connection from start to end: pre-auth dialogue, route lookup, backend login,
//! relay, close. The only module that knows all four.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::Registry;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};
use zeroize::Zeroizing;

use crate::backend::passdb::PassDb;
use crate::backend::resolve::Resolver;
use crate::backend::{self, BackendCredentials, BackendError, ClientInfo};
use crate::config::cidr::CidrError;
use crate::config::{BackendAuthMode, Config};
use crate::limits::penalty::{AuthPenalty, PenaltyConfig};
use crate::limits::{ConnLimiter, UserLimiter, UserSlot};
use crate::metrics::{Limit, Metrics, SessionEnd};
use crate::net::ActiveGuard;
use crate::preauth::{ListenerCtx, LoginAttempt, Preauth, PreauthEnd};
use crate::proto::capability::{self, Capabilities};
use crate::proto::framer::FrameError;
use crate::proto::response::status;
use crate::relay::{self, RelayContext, RelayEnd, RelayError, RelayOptions, murder};
use crate::route::{Backend, Route, Routes};
use crate::shutdown::{Lifecycle, SessionGuard, Stop};
use crate::stream::Stream;

/// What every session shares: configuration, the current routing table, credentials,
/// metrics and the lifecycle (drain, kick).
pub struct Shared {
    pub config: Config,
    pub routes: Routes,
    pub passdb: Option<Arc<PassDb>>,
    pub master_password: Option<Zeroizing<String>>,
    pub metrics: Metrics,
    /// The registry `metrics` is registered on; `/metrics` encodes it.
    pub registry: Registry,
    pub lifecycle: Arc<Lifecycle>,
    /// Bearer token for the admin endpoints.
    pub admin_token: Option<Zeroizing<String>>,
    /// Client connections, in all and per client address.
    pub connections: Arc<ConnLimiter>,
    /// Logged-in sessions per user.
    pub users: Arc<UserLimiter>,
    /// Delays for addresses that failed to log in.
    pub penalty: AuthPenalty,
    /// Backend host names to addresses, remembered for `performance.dns_ttl`.
    pub resolver: Resolver,
    next_session: AtomicU64,
    /// Distinguishes this process's session ids from other replicas'.
    nonce: u32,
}

impl Shared {
    pub fn new(
        config: Config,
        routes: Routes,
        passdb: Option<Arc<PassDb>>,
        master_password: Option<String>,
        admin_token: Option<String>,
        registry: Registry,
        metrics: Metrics,
    ) -> Result<Self, CidrError> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        let l = &config.limits;
        let exempt = l.exempt_networks()?;
        let connections = ConnLimiter::new(
            l.max_connections,
            l.max_connections_per_ip,
            exempt.clone(),
            metrics.connections_open.clone(),
        );
        let users = UserLimiter::new(l.max_sessions_per_user);
        let penalty = AuthPenalty::new(
            PenaltyConfig {
                base: l.auth_penalty_base,
                max: l.auth_penalty_max,
                expiry: l.auth_penalty_expiry,
                capacity: l.auth_penalty_table_size,
                exempt,
            },
            metrics.auth_penalty_entries.clone(),
        );
        let resolver = Resolver::new(
            config.performance.dns_ttl,
            Some(metrics.backend_dns_lookups.clone()),
        );
        Ok(Self {
            resolver,
            connections,
            users,
            penalty,
            config,
            routes,
            passdb,
            master_password: master_password.map(Zeroizing::new),
            metrics,
            registry,
            lifecycle: Arc::new(Lifecycle::default()),
            admin_token: admin_token.map(Zeroizing::new),
            next_session: AtomicU64::new(1),
            nonce: nonce ^ std::process::id(),
        })
    }

    fn session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:08x}", self.nonce, n)
    }
}

/// Where a connection is from and to. Behind a load balancer speaking the PROXY protocol
/// these are the addresses its header gave, not the socket's; everything in the session (logs,
/// the ID sent to backends) uses these.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The client.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The load balancer's own address, when a PROXY header replaced it with the client's.
    pub via: Option<SocketAddr>,
}

/// Runs one client connection to its end. Never panics on peer input; every outcome is
/// logged once. Ends at once, whatever the stage, when the stop is forced.
///
/// The future is made here rather than by an `async fn`: what the session holds while it
/// relays is all it keeps, not also the arguments it was started with.
pub fn run(
    shared: Arc<Shared>,
    listener: Arc<ListenerCtx>,
    stream: Stream,
    addrs: Addresses,
    deadline: Instant,
    registration: SessionGuard,
) -> impl Future<Output = ()> + Send {
    let Addresses { peer, local, via } = addrs;
    let session_id = shared.session_id();
    let span = tracing::info_span!(
        "session",
        id = %session_id,
        %peer,
        via = tracing::field::Empty,
        listener = %listener.name,
        user = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    if let Some(via) = via {
        span.record("via", tracing::field::display(via));
    }
    let client = ClientInfo {
        peer,
        local,
        session_id,
    };
    let stop = registration.stop().clone();
    // The pre-auth dialogue and the backend login run in a future of their own, on the heap
    // only until the login is answered: the session then keeps only what the relay needs.
    let login = Box::pin(open(
        Arc::clone(&shared),
        listener,
        stream,
        deadline,
        registration,
        client,
    ));
    async move {
        // Made inside the pin, so that the login's result, moved into the relay, goes out of
        // scope before the relay runs: a local still in scope would keep its 392 bytes.
        let relay = std::pin::pin!({
            let open = tokio::select! {
                biased;
                open = login.instrument(span.clone()) => open,
                _ = stop.forced() => None,
            };
            let Some(open) = open else {
                return;
            };
            // The span is entered for what logs, not at every poll of a relay that does not:
            // entering and leaving it at each relayed command cost more than the framing.
            relay(open, &shared, &span)
        });
        let end = relay.await;
        shared.metrics.session_ended(end);
        span.in_scope(|| info!(end = end.label(), "session ended"));
    }
}

/// Relays a logged-in session until it ends, or until the stop is forced.
///
/// A plain function that returns the future, not an `async fn`: the future then owns each
/// part of `open` once. An `async fn` keeps its argument for its whole life beside the
/// parts taken out of it, and a future moved into another it awaits is held twice; at one
/// idle session each that was about 1 KiB (`-Zprint-type-sizes`).
fn relay<'a>(
    open: Open,
    shared: &'a Shared,
    span: &'a tracing::Span,
) -> impl Future<Output = SessionEnd> + Send + 'a {
    let Open {
        mut client_stream,
        mut client_ahead,
        backend,
        route,
        credentials,
        active,
        user_slot,
        registration,
    } = open;
    let backend::BackendSession {
        stream: mut backend_stream,
        mut leftover,
        capabilities,
    } = backend;
    let limits = &shared.config.limits;
    let opts = RelayOptions {
        max_command_line: limits.max_command_line,
        max_literal: limits.max_literal,
        max_backend_line: limits.max_backend_line,
        backend_logout: shared.config.timeouts.backend_logout,
        rewrite_referrals: !capabilities.has("MAILBOX-REFERRALS"),
        splice: shared.config.performance.splice,
        autologout: shared.config.timeouts.autologout(),
        client_send: shared.config.timeouts.client_send,
    };
    let ctx = RelayContext {
        stop: registration.stop().clone(),
        counters: Arc::clone(&shared.metrics.relay),
    };
    // A single-backend session drops the route and the capabilities here.
    let mounted = credentials.map(|connector| {
        Box::new(Mounted {
            connector,
            route,
            capabilities,
        })
    });
    async move {
        let end = match mounted {
            None => {
                let relay = std::pin::pin!(relay::run(
                    &mut client_stream,
                    &mut client_ahead,
                    &mut backend_stream,
                    &mut leftover,
                    &opts,
                    &ctx,
                ));
                unless_forced(relay, &ctx.stop).await
            }
            Some(mounted) => {
                let Mounted {
                    connector,
                    route,
                    capabilities,
                } = *mounted;
                // Mounted backends are logged into later, with the same credentials.
                let home = murder::Connected {
                    stream: backend_stream,
                    leftover,
                    capabilities,
                };
                // Boxed: the multi-backend session's state is large and only such sessions
                // pay. Its mounts log, in the session's span.
                let mut relay = Box::pin(
                    murder::run(
                        client_stream,
                        client_ahead,
                        route,
                        home,
                        &connector,
                        &opts,
                        &ctx,
                    )
                    .instrument(span.clone()),
                );
                unless_forced(relay.as_mut(), &ctx.stop).await
            }
        };
        // Held to the session's end: its places in the limits and in the registry.
        drop((active, user_slot, registration));
        let Some(end) = end else {
            return SessionEnd::Forced;
        };
        let limit = match &end {
            RelayEnd::Error(RelayError::ClientFrame(FrameError::LiteralTooLarge { .. })) => {
                Some(Limit::Literal)
            }
            RelayEnd::Error(RelayError::ClientFrame(_)) => Some(Limit::CommandLine),
            RelayEnd::Error(RelayError::BackendFrame(_)) => Some(Limit::BackendLine),
            _ => None,
        };
        if let Some(limit) = limit {
            shared.metrics.limits.hit(limit);
        }
        SessionEnd::from(&end)
    }
}

/// What only a session with mounted backends needs while it relays. Boxed, so that a
/// single-backend session's state does not carry its 200 bytes.
struct Mounted {
    connector: MountConnector,
    route: Route,
    capabilities: Capabilities,
}

/// The relay's end, or None when the stop was forced first: a session that finds no safe
/// point in time is dropped, sockets and all. The relay is borrowed, not moved in, so that
/// its state is not held twice.
async fn unless_forced<F: Future>(relay: Pin<&mut F>, stop: &Stop) -> Option<F::Output> {
    // Polled only when the stop or its timer wakes it, not at every relayed command.
    let forced = std::pin::pin!(stop.forced());
    let forced = relay::quiet::Quiet::new(forced);
    tokio::select! {
        biased;
        end = relay => Some(end),
        _ = forced => None,
    }
}

/// A logged-in session, ready to relay.
struct Open {
    client_stream: Stream,
    client_ahead: Vec<u8>,
    backend: backend::BackendSession,
    route: Route,
    /// For logging in to mounted backends later; only for a route with mounts.
    credentials: Option<MountConnector>,
    active: ActiveGuard,
    /// The session's place under `limits.max_sessions_per_user`.
    user_slot: UserSlot,
    /// The session's entry in the registry, and its stop signal.
    registration: SessionGuard,
}

/// The session up to the client's login answer: pre-auth dialogue, route lookup, backend
/// login. None when the session ended before that.
async fn open(
    shared: Arc<Shared>,
    listener: Arc<ListenerCtx>,
    stream: Stream,
    deadline: Instant,
    registration: SessionGuard,
    client: ClientInfo,
) -> Option<Open> {
    let stop = registration.stop().clone();
    let mut preauth = Preauth::new(
        stream,
        listener,
        shared.config.limits.clone(),
        deadline,
        stop,
    );
    let ended = |end: PreauthEnd| {
        if let Some(limit) = end.limit() {
            shared.metrics.limits.hit(limit);
        }
        debug!(reason = end.label(), "ended before login");
    };
    if let Err(end) = preauth.greet().await {
        ended(end);
        return None;
    }
    let ip = client.peer.ip();
    let (attempt, route, session, user_slot) = loop {
        let attempt = match preauth.next_login().await {
            Ok(a) => a,
            Err(end) => {
                ended(end);
                return None;
            }
        };
        // Only this task waits: other clients, and the address's other connections, are not
        // held up by it. Within the pre-auth deadline, which the delay does not extend.
        let delay = shared.penalty.delay(ip, std::time::Instant::now());
        if !delay.is_zero() {
            shared.metrics.auth_penalty_delays.inc();
            debug!(
                delay_ms = delay.as_millis() as u64,
                "login delayed after failed logins from the address"
            );
            let until = Instant::now().checked_add(delay).unwrap_or(deadline);
            if until >= deadline {
                // The attempt would come after the deadline: it is not made at all.
                tokio::time::sleep_until(deadline).await;
                ended(preauth.time_out().await);
                return None;
            }
            tokio::time::sleep_until(until).await;
        }
        // A kick for this user reaches the session from the login on.
        registration.set_user(&attempt.user);
        let started = std::time::Instant::now();
        let result = match login(&shared, &attempt, &client).await {
            Ok((route, session)) => match shared.users.acquire(&attempt.user) {
                Ok(slot) => Ok((route, session, slot)),
                Err(_) => {
                    info!("too many sessions for the user: login refused");
                    shared.metrics.limits.hit(Limit::SessionsPerUser);
                    let wait = shared.config.timeouts.backend_logout;
                    backend::logout(session, wait).await;
                    Err(LoginFailure::Limit)
                }
            },
            Err(failure) => Err(failure),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(LoginFailure::BadCredentials) => "bad_credentials",
            Err(LoginFailure::Unavailable) => "unavailable",
            Err(LoginFailure::Limit) => "limit",
        };
        // A backend that is down says nothing about the password; a refusal for the user's
        // session count came with a good one.
        match &result {
            Ok(_) | Err(LoginFailure::Limit) => shared.penalty.succeeded(ip),
            Err(LoginFailure::BadCredentials) => {
                shared.penalty.failed(ip, std::time::Instant::now())
            }
            Err(LoginFailure::Unavailable) => {}
        }
        let m = &shared.metrics;
        m.logins
            .with_label_values(&[attempt.mechanism, outcome])
            .inc();
        m.login_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((route, session, slot)) => break (attempt, route, session, slot),
            Err(failure) => {
                let (code, text) = match failure {
                    LoginFailure::BadCredentials => {
                        ("AUTHENTICATIONFAILED", "Authentication failed.")
                    }
                    LoginFailure::Unavailable => (
                        "UNAVAILABLE",
                        "Mail server temporarily unavailable, try again later.",
                    ),
                    LoginFailure::Limit => ("LIMIT", "Too many sessions for this user."),
                };
                if let Err(end) = preauth.reject_login(&attempt.tag, code, text).await {
                    ended(end);
                    return None;
                }
            }
        }
    };
    tracing::Span::current().record("backend", route.home.name.as_str());
    let active = ActiveGuard::new(
        shared
            .metrics
            .sessions_active
            .with_label_values(&[route.home.name.as_str()]),
    );
    let caps = if route.mounts.is_empty() {
        capability::post_login(&session.capabilities)
    } else {
        capability::post_login_mounts(&session.capabilities)
    };
    let answer = status(
        &attempt.tag,
        "OK",
        Some(&format!("CAPABILITY {caps}")),
        "Logged in",
    );
    drop(caps);
    let Ok((mut client_stream, client_ahead)) = preauth.into_parts() else {
        return None;
    };
    if client_stream.write_all(&answer).await.is_err() {
        return None;
    }
    info!(
        mechanism = attempt.mechanism,
        mounts = route.mounts.len(),
        "logged in"
    );
    let credentials = (!route.mounts.is_empty()).then(|| MountConnector {
        shared: Arc::clone(&shared),
        user: attempt.user.clone(),
        password: attempt.password.clone(),
        client,
    });
    let mut backend = session;
    if credentials.is_none() {
        // The single-backend relay needs only whether MAILBOX-REFERRALS is there.
        backend.capabilities.keep_only("MAILBOX-REFERRALS");
    }
    Some(Open {
        client_stream,
        client_ahead,
        backend,
        route,
        credentials,
        active,
        user_slot,
        registration,
    })
}

enum LoginFailure {
    BadCredentials,
    Unavailable,
    /// Logged in, but the user has `limits.max_sessions_per_user` sessions already.
    Limit,
}

/// Finds the user's route and logs in there. Bad credentials and backend trouble are told
/// apart so the client gets the right answer, but backend error text never reaches it.
async fn login(
    shared: &Shared,
    attempt: &LoginAttempt,
    client: &ClientInfo,
) -> Result<(Route, backend::BackendSession), LoginFailure> {
    tracing::Span::current().record("user", attempt.user.as_str());
    let Some(route) = shared.routes.table().lookup(&attempt.user) else {
        // An unknown user gets the same answer as a wrong password: no user enumeration.
        info!("no route for user");
        return Err(LoginFailure::BadCredentials);
    };
    if shared.config.backend_auth.mode == BackendAuthMode::Master {
        let (Some(passdb), true) = (shared.passdb.clone(), master_credentials(shared).is_some())
        else {
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
    }
    let Some(creds) = credentials(shared, &attempt.user, &attempt.password) else {
        return Err(LoginFailure::Unavailable);
    };
    match backend_login(shared, &route.home, &creds, client).await {
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

/// Logs in on a backend, timing it and counting failures per backend. A refused password
/// is the user's failure, not the backend's: it is not counted as one.
async fn backend_login(
    shared: &Shared,
    backend: &Backend,
    creds: &BackendCredentials<'_>,
    client: &ClientInfo,
) -> Result<backend::BackendSession, BackendError> {
    let started = std::time::Instant::now();
    let result = backend::login(backend, creds, client, &timeouts(shared), &shared.resolver).await;
    let m = &shared.metrics;
    match &result {
        Ok(_) => m
            .backend_connect_duration
            .with_label_values(&[backend.name.as_str()])
            .observe(started.elapsed().as_secs_f64()),
        Err(BackendError::AuthFailed { .. }) => {}
        Err(e) => m
            .backend_connect_failures
            .with_label_values(&[backend.name.as_str(), e.kind()])
            .inc(),
    }
    result
}

fn timeouts(shared: &Shared) -> backend::Timeouts {
    backend::Timeouts {
        connect: shared.config.timeouts.backend_connect,
        login: shared.config.timeouts.backend_login,
    }
}

fn master_credentials(shared: &Shared) -> Option<(&str, &[u8])> {
    Some((
        shared.config.backend_auth.master_user.as_deref()?,
        shared.master_password.as_ref()?.as_bytes(),
    ))
}

/// How the gateway logs in on a backend for `user`: the client's own password, or the master
/// user (whose passdb check was done at the client's login).
fn credentials<'a>(
    shared: &'a Shared,
    user: &'a str,
    password: &'a [u8],
) -> Option<BackendCredentials<'a>> {
    match shared.config.backend_auth.mode {
        BackendAuthMode::Replay => Some(BackendCredentials::Replay { user, password }),
        BackendAuthMode::Master => {
            let (master_user, master_password) = master_credentials(shared)?;
            Some(BackendCredentials::Master {
                user,
                master_user,
                master_password,
            })
        }
    }
}

/// Logs in to a user's mounted backends when the session first needs them, the same way the
/// home login was done.
struct MountConnector {
    shared: Arc<Shared>,
    user: String,
    password: Zeroizing<Vec<u8>>,
    client: ClientInfo,
}

impl murder::Connector for MountConnector {
    fn connect<'a>(&'a self, backend: &'a Backend) -> murder::ConnectFuture<'a> {
        Box::pin(async move {
            let creds = credentials(&self.shared, &self.user, &self.password)
                .ok_or_else(|| "no credentials for the backend".to_owned())?;
            let session = backend_login(&self.shared, backend, &creds, &self.client)
                .await
                .map_err(|e| e.to_string())?;
            Ok(murder::Connected {
                stream: session.stream,
                leftover: session.leftover,
                capabilities: session.capabilities,
            })
        })
    }
}
