//! The gateway's Prometheus metrics: one `Metrics` struct registered on a registry the caller
//! owns (no global statics, so tests running side by side never share counters).
//!
//! Labels are bounded by construction: listener and backend names come from configuration,
//! mechanism, result and reason from fixed sets, command from `CommandName`. A user name or
//! an address is never a label. Counters on the relay's hot path are resolved once, at
//! start-up, so counting a command or a chunk is one atomic add and no hash lookup.

use std::sync::Arc;

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use thiserror::Error;

use crate::proto::prescan::CommandName;

/// Every metric name starts with this.
const NAMESPACE: &str = "imapgw";

/// Buckets for login and backend connect latency, in seconds: from a loopback backend
/// (sub-millisecond) to the configured timeouts (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
}

/// Why a session ended, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client logged out, or the backend said BYE.
    Logout,
    ClientGone,
    BackendLost,
    /// A protocol limit was broken (overlong line, oversized literal).
    Error,
    /// Ended with BYE because the gateway is shutting down.
    Drained,
    /// Ended with BYE by `POST /admin/kick`.
    Kicked,
    /// Dropped at the end of the shutdown grace period or the kick deadline.
    Forced,
    /// Logged out by the gateway after `timeouts.autologout` without a byte from the client.
    Autologout,
}

impl SessionEnd {
    const ALL: [SessionEnd; 8] = [
        SessionEnd::Logout,
        SessionEnd::ClientGone,
        SessionEnd::BackendLost,
        SessionEnd::Error,
        SessionEnd::Drained,
        SessionEnd::Kicked,
        SessionEnd::Forced,
        SessionEnd::Autologout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SessionEnd::Logout => "logout",
            SessionEnd::ClientGone => "client_gone",
            SessionEnd::BackendLost => "backend_lost",
            SessionEnd::Error => "error",
            SessionEnd::Drained => "drained",
            SessionEnd::Kicked => "kicked",
            SessionEnd::Forced => "forced",
            SessionEnd::Autologout => "autologout",
        }
    }
}

impl From<&crate::relay::RelayEnd> for SessionEnd {
    fn from(end: &crate::relay::RelayEnd) -> Self {
        use crate::relay::RelayEnd;
        use crate::shutdown::StopReason;
        match end {
            RelayEnd::BackendBye => SessionEnd::Logout,
            RelayEnd::BackendLost => SessionEnd::BackendLost,
            RelayEnd::ClientGone => SessionEnd::ClientGone,
            RelayEnd::Error(_) => SessionEnd::Error,
            RelayEnd::Stopped(StopReason::Shutdown) => SessionEnd::Drained,
            RelayEnd::Stopped(StopReason::Kick) => SessionEnd::Kicked,
            RelayEnd::Autologout => SessionEnd::Autologout,
        }
    }
}

/// A limit that refused a connection or a login, or ended a connection or a session: a
/// bounded label, never the address or the user it was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_connections`: a connection refused at accept.
    Connections = 0,
    /// `limits.max_connections_per_ip`.
    ConnectionsPerIp,
    /// `limits.max_sessions_per_user`: a login refused with `NO [LIMIT]`.
    SessionsPerUser,
    /// `timeouts.preauth`: not logged in in time (TLS handshake included).
    PreauthTimeout,
    /// `limits.max_preauth_line`.
    PreauthLine,
    /// `limits.max_preauth_literal`.
    PreauthLiteral,
    /// `limits.max_bad_commands`.
    BadCommands,
    /// `limits.max_auth_failures`.
    AuthFailures,
    /// `limits.max_command_line`, after login.
    CommandLine,
    /// `limits.max_literal`, after login.
    Literal,
    /// `limits.max_backend_line`.
    BackendLine,
}

impl Limit {
    const ALL: [Limit; 11] = [
        Limit::Connections,
        Limit::ConnectionsPerIp,
        Limit::SessionsPerUser,
        Limit::PreauthTimeout,
        Limit::PreauthLine,
        Limit::PreauthLiteral,
        Limit::BadCommands,
        Limit::AuthFailures,
        Limit::CommandLine,
        Limit::Literal,
        Limit::BackendLine,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::SessionsPerUser => "sessions_per_user",
            Limit::PreauthTimeout => "preauth_timeout",
            Limit::PreauthLine => "preauth_line",
            Limit::PreauthLiteral => "preauth_literal",
            Limit::BadCommands => "bad_commands",
            Limit::AuthFailures => "auth_failures",
            Limit::CommandLine => "command_line",
            Limit::Literal => "literal",
            Limit::BackendLine => "backend_line",
        }
    }
}

/// `imapgw_limits_exceeded_total`, one counter per limit, resolved once.
pub struct LimitCounters {
    counters: Vec<IntCounter>,
}

impl LimitCounters {
    pub fn hit(&self, limit: Limit) {
        if let Some(c) = self.counters.get(limit as usize) {
            c.inc();
        }
    }

    pub fn get(&self, limit: Limit) -> u64 {
        self.counters.get(limit as usize).map_or(0, IntCounter::get)
    }
}

/// Bytes relayed in each direction, resolved once so the relay adds without a lookup.
#[derive(Clone)]
pub struct RelayCounters {
    pub client_to_backend: IntCounter,
    pub backend_to_client: IntCounter,
    /// Of those, bytes of literals moved with splice (both legs plain TCP): `[client_to_backend,
    /// backend_to_client]`.
    pub spliced: [IntCounter; 2],
    commands: Vec<IntCounter>,
    intercepted: Vec<IntCounter>,
    /// Commands answered `NO [UNAVAILABLE]` because the server holding the mailbox is down.
    pub mount_unavailable: IntCounter,
    /// Cross-server COPY/MOVE: `[ok, failed]`.
    cross_copies: [IntCounter; 2],
}

impl RelayCounters {
    /// Counts a COPY or MOVE the gateway did between two servers.
    pub fn cross_server_copy(&self, ok: bool) {
        self.cross_copies[usize::from(!ok)].inc();
    }

    /// How many cross-server copies ended `ok` (or failed).
    pub fn cross_server_copies(&self, ok: bool) -> u64 {
        self.cross_copies[usize::from(!ok)].get()
    }
    /// Counts a command the gateway answered or rewrote itself.
    pub fn intercepted(&self, name: CommandName) {
        if let Some(c) = self.intercepted.get(name as usize) {
            c.inc();
        }
    }

    /// Counts one command sent by a logged-in client.
    pub fn command(&self, name: CommandName) {
        if let Some(c) = self.commands.get(name as usize) {
            c.inc();
        }
    }
}

/// One listener's counters, resolved once at bind.
#[derive(Clone)]
pub struct ListenerCounters {
    pub accepted: IntCounter,
    pub active: IntGauge,
    /// Indexed by `[mode][result]`: mode 0 implicit, 1 STARTTLS; result as `TlsResult`.
    tls: [[IntCounter; 3]; 2],
    /// Successful handshakes that resumed a session, indexed by mode.
    tls_resumed: [IntCounter; 2],
    /// Indexed by `ProxyRejected`.
    proxy_rejected: [IntCounter; 3],
}

/// Why a connection on a PROXY-protocol listener was closed before its session: a bounded
/// label, never the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRejected {
    /// The socket peer is not in the listener's trusted networks.
    Untrusted = 0,
    /// No header, a garbled one, or one over the size limit.
    Malformed = 1,
    /// No complete header in time.
    Timeout = 2,
}

impl ProxyRejected {
    const LABELS: [&'static str; 3] = ["untrusted", "malformed", "timeout"];
}

/// How a client TLS handshake went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsResult {
    Ok = 0,
    Failed = 1,
    Timeout = 2,
}

impl ListenerCounters {
    pub fn tls(&self, starttls: bool, result: TlsResult) {
        self.tls[usize::from(starttls)][result as usize].inc();
    }

    /// A successful handshake (already counted by `tls`) that resumed a session.
    pub fn tls_resumed(&self, starttls: bool) {
        self.tls_resumed[usize::from(starttls)].inc();
    }

    pub fn proxy_rejected(&self, reason: ProxyRejected) {
        self.proxy_rejected[reason as usize].inc();
    }
}

/// All of the gateway's metrics.
pub struct Metrics {
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_resumed: IntCounterVec,
    pub proxy_protocol_rejected: IntCounterVec,
    pub logins: IntCounterVec,
    pub login_duration: HistogramVec,
    pub backend_connect_duration: HistogramVec,
    pub backend_connect_failures: IntCounterVec,
    pub backend_dns_lookups: IntCounterVec,
    pub sessions_active: IntGaugeVec,
    pub sessions_ended: IntCounterVec,
    pub relay: Arc<RelayCounters>,
    pub routing_generation: IntGauge,
    pub routing_reloads: IntCounterVec,
    /// Timestamps in fractional seconds: a reload that fails in the same second as the load
    /// before it must still read as later.
    pub routing_last_reload: Gauge,
    pub routing_last_failure: Gauge,
    pub certificate_reloads: IntCounterVec,
    pub admin_requests: IntCounterVec,
    pub draining: IntGauge,
    pub build_info: IntGaugeVec,
    pub limits: LimitCounters,
    /// Connections open now, all listeners together (what `limits.max_connections` counts).
    pub connections_open: IntGauge,
    /// Login attempts delayed by the auth penalty.
    pub auth_penalty_delays: IntCounter,
    /// Client addresses the auth penalty remembers now.
    pub auth_penalty_entries: IntGauge,
}

fn name(n: &str) -> String {
    format!("{NAMESPACE}_{n}")
}

fn counter_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name(n), help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name(n), help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn timestamp_gauge(r: &Registry, n: &str, help: &str) -> Result<Gauge, MetricsError> {
    let g = Gauge::new(name(n), help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(r: &Registry, n: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::new(name(n), help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, n: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::new(name(n), help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram_vec(
    r: &Registry,
    n: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(
        HistogramOpts::new(name(n), help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Creates every metric and registers it on `registry`, with the process collector
    /// (memory, CPU, file descriptors) alongside.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let r = registry;
        let relayed = counter_vec(
            r,
            "relayed_bytes_total",
            "Bytes relayed between logged-in clients and backends, by direction.",
            &["direction"],
        )?;
        let spliced = counter_vec(
            r,
            "relayed_spliced_bytes_total",
            "Of the relayed bytes, literal data moved between two plain TCP connections inside \
             the kernel (splice), by direction.",
            &["direction"],
        )?;
        let commands = counter_vec(
            r,
            "commands_total",
            "Commands sent by logged-in clients, by command name (a fixed set plus \"other\").",
            &["command"],
        )?;
        let commands = CommandName::ALL
            .iter()
            .map(|c| commands.with_label_values(&[c.label()]))
            .collect();
        let intercepted = counter_vec(
            r,
            "intercepted_commands_total",
            "Commands the gateway answered or rewrote itself (merged LIST/LSUB/RLIST/RLSUB, \
             NAMESPACE, refused COMPRESS, ...), by command.",
            &["command"],
        )?;
        let intercepted = CommandName::ALL
            .iter()
            .map(|c| intercepted.with_label_values(&[c.label()]))
            .collect();
        let copies = counter_vec(
            r,
            "cross_server_copies_total",
            "COPY or MOVE between two backends done by the gateway, by result.",
            &["result"],
        )?;
        let login_duration = histogram_vec(
            r,
            "login_duration_seconds",
            "From the client's LOGIN or AUTHENTICATE to the gateway's answer, by result.",
            &["result"],
        )?;
        let limits = counter_vec(
            r,
            "limits_exceeded_total",
            "Connections, logins and sessions refused or ended because a limit was reached, by \
             limit (connections, connections_per_ip, sessions_per_user, preauth_timeout, \
             preauth_line, preauth_literal, bad_commands, auth_failures, command_line, literal, \
             backend_line).",
            &["limit"],
        )?;
        let limits = LimitCounters {
            counters: Limit::ALL
                .iter()
                .map(|l| limits.with_label_values(&[l.label()]))
                .collect(),
        };
        let m = Self {
            limits,
            connections_open: gauge(
                r,
                "connections_open",
                "Client connections open now, all listeners together (the count \
                 limits.max_connections applies to).",
            )?,
            auth_penalty_delays: counter(
                r,
                "auth_penalty_delays_total",
                "Login attempts delayed because of earlier failed logins from the same client \
                 address.",
            )?,
            auth_penalty_entries: gauge(
                r,
                "auth_penalty_table_entries",
                "Client addresses the auth penalty remembers failed logins of now.",
            )?,
            connections_accepted: counter_vec(
                r,
                "connections_accepted_total",
                "Client connections accepted, by listener.",
                &["listener"],
            )?,
            connections_active: gauge_vec(
                r,
                "connections_active",
                "Client connections open now, by listener.",
                &["listener"],
            )?,
            tls_handshakes: counter_vec(
                r,
                "tls_handshakes_total",
                "Client TLS handshakes (implicit or STARTTLS), by listener, mode and result.",
                &["listener", "mode", "result"],
            )?,
            tls_resumed: counter_vec(
                r,
                "tls_resumed_total",
                "Client TLS handshakes that resumed a session from a ticket or the session \
                 cache (also counted as ok in tls_handshakes_total), by listener and mode.",
                &["listener", "mode"],
            )?,
            proxy_protocol_rejected: counter_vec(
                r,
                "proxy_protocol_rejected_total",
                "Connections on PROXY-protocol listeners closed before their session: peer not \
                 in the trusted networks, no or a malformed header, or none in time; by listener \
                 and reason.",
                &["listener", "reason"],
            )?,
            logins: counter_vec(
                r,
                "logins_total",
                "Client logins, by SASL mechanism (or \"login\") and result.",
                &["mechanism", "result"],
            )?,
            login_duration,
            backend_connect_duration: histogram_vec(
                r,
                "backend_connect_duration_seconds",
                "Connect, greeting, TLS and login on a backend, by backend.",
                &["backend"],
            )?,
            backend_connect_failures: counter_vec(
                r,
                "backend_connect_failures_total",
                "Failed backend connections or logins, by backend and reason.",
                &["backend", "reason"],
            )?,
            backend_dns_lookups: counter_vec(
                r,
                "backend_dns_lookups_total",
                "Backend host names needed for a connection, by result: cached (remembered answer), resolved (looked up), failed.",
                &["result"],
            )?,
            sessions_active: gauge_vec(
                r,
                "sessions_active",
                "Logged-in sessions open now, by home backend.",
                &["backend"],
            )?,
            sessions_ended: counter_vec(
                r,
                "sessions_ended_total",
                "Logged-in sessions ended, by reason.",
                &["reason"],
            )?,
            relay: Arc::new(RelayCounters {
                client_to_backend: relayed.with_label_values(&["client_to_backend"]),
                backend_to_client: relayed.with_label_values(&["backend_to_client"]),
                spliced: ["client_to_backend", "backend_to_client"]
                    .map(|direction| spliced.with_label_values(&[direction])),
                commands,
                intercepted,
                mount_unavailable: counter(
                    r,
                    "mount_unavailable_total",
                    "Commands answered NO [UNAVAILABLE] because the server holding the mailbox \
                     could not be reached.",
                )?,
                cross_copies: ["ok", "failed"].map(|result| copies.with_label_values(&[result])),
            }),
            routing_generation: gauge(
                r,
                "routing_table_generation",
                "Generation of the routing table in use: 1 at start, one more per successful reload.",
            )?,
            routing_reloads: counter_vec(
                r,
                "routing_table_reloads_total",
                "Routing table reloads, by trigger (file, signal, admin) and result.",
                &["trigger", "result"],
            )?,
            routing_last_reload: timestamp_gauge(
                r,
                "routing_table_last_success_timestamp_seconds",
                "Unix time of the last successful routing table load.",
            )?,
            routing_last_failure: timestamp_gauge(
                r,
                "routing_table_last_failure_timestamp_seconds",
                "Unix time of the last failed routing table reload; 0 if none failed. Later \
                 than the last success: the table in use is not the one on disk.",
            )?,
            certificate_reloads: counter_vec(
                r,
                "tls_certificate_reloads_total",
                "Listener certificate reloads after a file change, by listener and result.",
                &["listener", "result"],
            )?,
            admin_requests: counter_vec(
                r,
                "admin_requests_total",
                "Requests to the admin HTTP server, by endpoint and status code.",
                &["endpoint", "code"],
            )?,
            draining: gauge(
                r,
                "draining",
                "1 while the gateway is shutting down and draining sessions.",
            )?,
            build_info: gauge_vec(
                r,
                "build_info",
                "Always 1; the labels give the gateway's version.",
                &["version"],
            )?,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Reasons are created at zero so that rate() and alerts see them before the first.
        for end in SessionEnd::ALL {
            m.sessions_ended.with_label_values(&[end.label()]);
        }
        for result in ["ok", "failed"] {
            for trigger in ["file", "signal", "admin"] {
                m.routing_reloads.with_label_values(&[trigger, result]);
            }
        }
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// The counters of the listener called `name`.
    pub fn listener(&self, name: &str) -> ListenerCounters {
        let tls = |mode: &str| {
            ["ok", "failed", "timeout"]
                .map(|result| self.tls_handshakes.with_label_values(&[name, mode, result]))
        };
        ListenerCounters {
            accepted: self.connections_accepted.with_label_values(&[name]),
            active: self.connections_active.with_label_values(&[name]),
            tls: [tls("implicit"), tls("starttls")],
            tls_resumed: ["implicit", "starttls"]
                .map(|mode| self.tls_resumed.with_label_values(&[name, mode])),
            // Created at zero, so that rate() and alerts see them before the first.
            proxy_rejected: ProxyRejected::LABELS.map(|reason| {
                self.proxy_protocol_rejected
                    .with_label_values(&[name, reason])
            }),
        }
    }

    pub fn session_ended(&self, end: SessionEnd) {
        self.sessions_ended.with_label_values(&[end.label()]).inc();
    }
}
