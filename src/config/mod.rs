//! Static configuration: serde types with defaults, loaded by figment from defaults, then a
//! TOML file, then `IMAP_GATEWAY_*` environment variables; `validate` reports every problem at
//! once. The routing table is a separate file (see `route`) so it can be reloaded live.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod cidr;

use cidr::Cidr;

/// Environment variables with this prefix override the file; `__` separates nested keys
/// (`IMAP_GATEWAY_LIMITS__MAX_BAD_COMMANDS=5`).
pub const ENV_PREFIX: &str = "IMAP_GATEWAY_";

/// The top-level keys of the configuration, the only ones read from the environment.
const SECTIONS: &[&str] = &[
    "routing_table",
    "listeners",
    "limits",
    "timeouts",
    "backend_auth",
    "log",
    "admin",
    "reload",
    "performance",
];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The routing table file (TOML); relative paths are resolved against the config file.
    pub routing_table: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub backend_auth: BackendAuth,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
    pub performance: PerformanceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            routing_table: PathBuf::from("routing.toml"),
            listeners: vec![ListenerConfig::default()],
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            backend_auth: BackendAuth::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            reload: ReloadConfig::default(),
            performance: PerformanceConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Cleartext IMAP (port 143 style); STARTTLS is offered when a certificate is configured.
    Plain,
    /// Implicit TLS (port 993 style).
    Tls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub mode: ListenerMode,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Give TLS clients session tickets, so that a returning client resumes its session
    /// instead of making a full handshake: no certificate signature (with an RSA 2048
    /// certificate, 0.45 ms of gateway CPU per login instead of 1.14 ms; with ECDSA P-256,
    /// 0.44 instead of 0.49). On by default, as in nginx and OpenSSL.
    pub tls_session_tickets: bool,
    /// Allow LOGIN/AUTHENTICATE without TLS (loopback, trusted networks). Off by default:
    /// passwords must not cross a network in clear.
    pub allow_plaintext_auth: bool,
    /// Every connection starts with a PROXY protocol header (HAProxy v1 or v2) from a load
    /// balancer, giving the client's real address.
    pub proxy_protocol: bool,
    /// Networks (CIDR, or bare addresses) whose connections may carry a PROXY header; a
    /// connection from anywhere else is closed unread. Kept as text so that a bad entry is
    /// reported by `problems` with the listener's name, next to every other problem.
    pub proxy_trusted_networks: Vec<String>,
}

impl ListenerConfig {
    /// The parsed `proxy_trusted_networks`, or the first entry that does not parse.
    pub fn trusted_networks(&self) -> Result<Vec<Cidr>, cidr::CidrError> {
        self.proxy_trusted_networks
            .iter()
            .map(|n| n.trim().parse())
            .collect()
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            name: "imap".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 1143)),
            mode: ListenerMode::Plain,
            tls_cert: None,
            tls_key: None,
            tls_session_tickets: true,
            allow_plaintext_auth: false,
            proxy_protocol: false,
            proxy_trusted_networks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest command line accepted before login. Pre-login commands are short; a long line
    /// is an attack or a broken client, and it is never buffered past this.
    pub max_preauth_line: usize,
    /// Largest literal accepted before login (LOGIN with literal user/password).
    pub max_preauth_literal: u64,
    /// Invalid or disallowed commands tolerated before login, then BYE.
    pub max_bad_commands: u32,
    /// Failed logins tolerated on one connection, then BYE.
    pub max_auth_failures: u32,
    /// Longest command line (excluding literals) accepted after login.
    pub max_command_line: usize,
    /// Largest literal a client may send after login (APPEND). Streams through, so this is
    /// a policy limit, not a memory bound.
    pub max_literal: u64,
    /// Longest response line (excluding literals) accepted from a backend.
    pub max_backend_line: usize,
    /// Client connections open at once, gateway-wide (every listener, logged in or not);
    /// `0`: no limit. Beyond it a connection is told BYE and closed before its greeting.
    pub max_connections: usize,
    /// Client connections open at once from one client address (IPv6: one /64); `0`: no
    /// limit. Behind a PROXY-protocol load balancer the address is the header's.
    pub max_connections_per_ip: usize,
    /// Logged-in sessions open at once for one user; `0`: no limit. A login beyond it is
    /// refused with `NO [LIMIT]`.
    pub max_sessions_per_user: usize,
    /// Client networks (CIDR, or bare addresses) exempt from `max_connections_per_ip` and from
    /// the auth penalty: webmail servers, monitoring, a NAT shared by many users. Kept as
    /// text so a bad entry is reported by `problems` next to every other problem.
    pub exempt_networks: Vec<String>,
    /// Failed logins from one client address delay its next login attempts: this long after
    /// the first failure, doubling with each further one up to `auth_penalty_max`. `"0s"`
    /// turns the penalty off.
    #[serde(with = "humantime_serde")]
    pub auth_penalty_base: Duration,
    #[serde(with = "humantime_serde")]
    pub auth_penalty_max: Duration,
    /// An address with no failed login for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub auth_penalty_expiry: Duration,
    /// Client addresses the penalty remembers at most; when full, the one that failed least
    /// recently is forgotten first. Bounds memory under a distributed attack.
    pub auth_penalty_table_size: usize,
}

impl Limits {
    /// The parsed `exempt_networks`, or the first entry that does not parse.
    pub fn exempt_networks(&self) -> Result<Vec<Cidr>, cidr::CidrError> {
        self.exempt_networks
            .iter()
            .map(|n| n.trim().parse())
            .collect()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_preauth_line: 8 * 1024,
            max_preauth_literal: 8 * 1024,
            max_bad_commands: 10,
            max_auth_failures: 3,
            max_command_line: 64 * 1024,
            max_literal: 1 << 30,
            max_backend_line: 16 * 1024 * 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
            exempt_networks: Vec::new(),
            auth_penalty_base: Duration::from_secs(1),
            auth_penalty_max: Duration::from_secs(15),
            auth_penalty_expiry: Duration::from_secs(15 * 60),
            auth_penalty_table_size: 100_000,
        }
    }
}

/// Each connection costs the gateway one file descriptor and a backend one more, plus a few
/// tens of KiB of buffers: 20,000 fits the common `nofile` limit of 65,536 with room for the
/// backend side, and a replica far beyond that should be scaled out instead.
const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Households, offices and carrier-grade NATs put many users behind one address; a mail
/// client opens up to ~5 connections per account. 100 leaves room for ~20 such clients
/// while stopping one host from taking the gateway's connections.
const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 100;
/// A user's devices (phone, laptop, desktop, webmail), each with a few connections, stay
/// well below this; more is a runaway client or shared credentials.
const DEFAULT_MAX_SESSIONS_PER_USER: usize = 50;
/// RFC 3501 section 5.4: an inactivity autologout timer must be at least 30 minutes.
pub const MIN_AUTOLOGOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// From connect until authenticated; then the connection is closed with BYE.
    #[serde(with = "humantime_serde")]
    pub preauth: Duration,
    /// TCP connect to a backend.
    #[serde(with = "humantime_serde")]
    pub backend_connect: Duration,
    /// Greeting, TLS, ID and login on a backend, all together.
    #[serde(with = "humantime_serde")]
    pub backend_login: Duration,
    /// How long to wait for a backend to answer our LOGOUT after the client went away.
    #[serde(with = "humantime_serde")]
    pub backend_logout: Duration,
    /// After SIGTERM, how long open sessions may go on before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A logged-in client that sends nothing for this long (an IDLE included) is logged
    /// out. At least [`MIN_AUTOLOGOUT`] (RFC 3501).
    #[serde(with = "humantime_serde")]
    pub autologout: Duration,
    /// Tests only: used instead of `autologout`, without the RFC 3501 minimum, so a test can
    /// see an autologout in a second. serde skips it: a file or the environment cannot set it.
    #[serde(skip)]
    pub autologout_unchecked: Option<Duration>,
    /// A logged-in client that takes none of what the gateway sends it for this long is
    /// disconnected (a client that stops reading holds its backend like one that stops
    /// writing, and the autologout does not run while an answer is owed).
    #[serde(with = "humantime_serde")]
    pub client_send: Duration,
}

impl Timeouts {
    /// The autologout timer in effect.
    pub fn autologout(&self) -> Duration {
        self.autologout_unchecked.unwrap_or(self.autologout)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            preauth: Duration::from_secs(60),
            backend_connect: Duration::from_secs(5),
            backend_login: Duration::from_secs(15),
            backend_logout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            autologout: MIN_AUTOLOGOUT,
            autologout_unchecked: None,
            client_send: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendAuthMode {
    /// Log in on the backend with the client's own credentials; the backend verifies them.
    Replay,
    /// Verify the client's password against `passdb`, then log in on the backend as the user
    /// with the master credentials (SASL PLAIN with authorization identity).
    Master,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendAuth {
    pub mode: BackendAuthMode,
    pub master_user: Option<String>,
    pub master_password: Option<String>,
    /// Read the master password from this file instead (a Kubernetes Secret mount).
    pub master_password_file: Option<PathBuf>,
    /// passwd-file (`user:{SCHEME}hash`) the gateway verifies client passwords against in
    /// master mode. Schemes: PLAIN, CLEARTEXT, SHA256-CRYPT, SHA512-CRYPT.
    pub passdb: Option<PathBuf>,
}

impl std::fmt::Debug for BackendAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendAuth")
            .field("mode", &self.mode)
            .field("master_user", &self.master_user)
            .field(
                "master_password",
                &self.master_password.as_ref().map(|_| "<redacted>"),
            )
            .field("master_password_file", &self.master_password_file)
            .field("passdb", &self.passdb)
            .finish()
    }
}

impl Default for BackendAuth {
    fn default() -> Self {
        Self {
            mode: BackendAuthMode::Replay,
            master_user: None,
            master_password: None,
            master_password_file: None,
            passdb: None,
        }
    }
}

/// The admin HTTP server: metrics, health, readiness and the admin endpoints.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin server listens; off the IMAP ports. `enabled = false` turns it off.
    pub address: SocketAddr,
    pub enabled: bool,
    /// Bearer token for `/admin/*`. Without one, `/admin/*` answers only when `address` is a
    /// loopback address; `/metrics`, `/healthz` and `/readyz` never need it.
    pub token: Option<String>,
    /// Read the token from this file instead (a Kubernetes Secret mount).
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 9143)),
            enabled: true,
            token: None,
            token_file: None,
        }
    }
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("address", &self.address)
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Live reloading of the routing table and listener certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadConfig {
    /// Reload the routing table and certificates when their files change.
    pub watch: bool,
    /// Changes closer together than this are taken as one: an editor's or Kubernetes'
    /// several writes, renames and symlink swaps make one reload, of the finished file.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive (`info`, `imap_gateway=debug`); RUST_LOG overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Settings that change how fast the gateway works, not what it does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerformanceConfig {
    /// Threads of the async runtime; 0: one per CPU the process may use (a container's CPU
    /// quota included). Set it to the pod's CPU limit when the quota is not visible.
    pub worker_threads: usize,
    /// Move literal data between two plain TCP connections with splice(2), inside the
    /// kernel. Off: every byte passes through the gateway's buffers (as with TLS).
    pub splice: bool,
    /// How long a backend host name's addresses are used before it is looked up again; 0
    /// looks it up at every backend connection. An address that fails to connect is dropped
    /// at once either way.
    #[serde(with = "humantime_serde")]
    pub dns_ttl: Duration,
}

impl Default for PerformanceConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            splice: true,
            dns_ttl: DEFAULT_DNS_TTL,
        }
    }
}

/// Short enough that a backend moved to a new address (a rescheduled pod) is found within
/// seconds even when its old address still answers; long enough that a login storm costs a
/// handful of lookups per backend instead of one per login.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);

impl Config {
    /// Loads defaults, then `file` (if given), then the environment. Relative paths in the
    /// file are resolved against the file's directory.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only variables naming a configuration section are read: Kubernetes injects
        // IMAP_GATEWAY_PORT, IMAP_GATEWAY_SERVICE_HOST, ... for a Service of that name, and
        // those must not stop the gateway from starting.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    let section = key.split("__").next().unwrap_or("");
                    SECTIONS.contains(&section)
                })
                .split("__"),
        );
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.routing_table);
        for l in &mut self.listeners {
            l.tls_cert.as_mut().map(fix);
            l.tls_key.as_mut().map(fix);
        }
        self.backend_auth.master_password_file.as_mut().map(fix);
        self.backend_auth.passdb.as_mut().map(fix);
        self.admin.token_file.as_mut().map(fix);
    }

    /// Every problem of the configuration, not just the first.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listeners.is_empty() {
            out.push("no listeners configured".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let who = format!("listener {:?} ({})", l.name, l.address);
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                out.push(format!("{who}: duplicate listener name"));
            }
            if self.listeners[..i].iter().any(|o| o.address == l.address) && l.address.port() != 0 {
                out.push(format!("{who}: duplicate address"));
            }
            match (&l.tls_cert, &l.tls_key) {
                (None, None) if l.mode == ListenerMode::Tls => {
                    out.push(format!("{who}: mode \"tls\" needs tls_cert and tls_key"));
                }
                (Some(_), None) | (None, Some(_)) => {
                    out.push(format!("{who}: tls_cert and tls_key go together"));
                }
                (Some(cert), Some(key)) => {
                    for p in [cert, key] {
                        if let Err(e) = std::fs::metadata(p) {
                            out.push(format!("{who}: cannot read {}: {e}", p.display()));
                        }
                    }
                }
                _ => {}
            }
            for network in &l.proxy_trusted_networks {
                if let Err(e) = network.trim().parse::<Cidr>() {
                    out.push(format!("{who}: proxy_trusted_networks: {e}"));
                }
            }
            if l.proxy_protocol && l.proxy_trusted_networks.is_empty() {
                out.push(format!(
                    "{who}: proxy_protocol = true needs proxy_trusted_networks (the load \
                     balancers' addresses)"
                ));
            }
        }
        let l = &self.limits;
        if l.max_preauth_line < 256 {
            out.push("limits.max_preauth_line must be at least 256".into());
        }
        if l.max_command_line < 1024 {
            out.push("limits.max_command_line must be at least 1024".into());
        }
        if l.max_backend_line < 1024 {
            out.push("limits.max_backend_line must be at least 1024".into());
        }
        for network in &l.exempt_networks {
            if let Err(e) = network.trim().parse::<Cidr>() {
                out.push(format!("limits.exempt_networks: {e}"));
            }
        }
        if l.auth_penalty_max < l.auth_penalty_base {
            out.push("limits.auth_penalty_max must be at least auth_penalty_base".into());
        }
        if !l.auth_penalty_base.is_zero() && l.auth_penalty_table_size == 0 {
            out.push("limits.auth_penalty_table_size must be greater than zero".into());
        }
        // Refused rather than clamped: a value below the minimum is a mistake to fix, and
        // a gateway silently doing something else than configured is worse.
        if self.timeouts.autologout < MIN_AUTOLOGOUT {
            out.push(format!(
                "timeouts.autologout must be at least {} (RFC 3501 section 5.4)",
                humantime::format_duration(MIN_AUTOLOGOUT)
            ));
        }
        for (name, d) in [
            ("timeouts.preauth", self.timeouts.preauth),
            ("timeouts.backend_connect", self.timeouts.backend_connect),
            ("timeouts.backend_login", self.timeouts.backend_login),
            ("timeouts.client_send", self.timeouts.client_send),
        ] {
            if d.is_zero() {
                out.push(format!("{name} must be greater than zero"));
            }
        }
        let a = &self.backend_auth;
        if a.mode == BackendAuthMode::Master {
            if a.master_user.is_none() {
                out.push("backend_auth.mode = \"master\" needs master_user".into());
            }
            match (&a.master_password, &a.master_password_file) {
                (None, None) => out.push(
                    "backend_auth.mode = \"master\" needs master_password or master_password_file"
                        .into(),
                ),
                (Some(_), Some(_)) => out.push(
                    "backend_auth: give master_password or master_password_file, not both".into(),
                ),
                (None, Some(p)) => {
                    if let Err(e) = std::fs::read(p) {
                        out.push(format!(
                            "backend_auth.master_password_file {}: {e}",
                            p.display()
                        ));
                    }
                }
                _ => {}
            }
            match &a.passdb {
                None => out.push(
                    "backend_auth.mode = \"master\" needs passdb to verify client passwords".into(),
                ),
                Some(p) => {
                    if let Err(e) = crate::backend::passdb::PassDb::load(p) {
                        out.push(format!("backend_auth.passdb: {e}"));
                    }
                }
            }
        }
        let admin = &self.admin;
        if admin.enabled {
            if admin.address.port() != 0
                && self.listeners.iter().any(|l| l.address == admin.address)
            {
                out.push(format!(
                    "admin.address {} is also an IMAP listener's address",
                    admin.address
                ));
            }
            match (&admin.token, &admin.token_file) {
                (Some(_), Some(_)) => out.push("admin: give token or token_file, not both".into()),
                (Some(t), None) if t.trim().is_empty() => out.push("admin.token is empty".into()),
                (None, Some(p)) => match std::fs::read_to_string(p) {
                    Ok(t) if t.trim().is_empty() => {
                        out.push(format!("admin.token_file {} is empty", p.display()))
                    }
                    Ok(_) => {}
                    Err(e) => out.push(format!("admin.token_file {}: {e}", p.display())),
                },
                _ => {}
            }
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            out.push(format!("log.level {:?}: {e}", self.log.level));
        }
        out
    }

    /// The admin bearer token, read from the file when configured that way.
    pub fn admin_token(&self) -> std::io::Result<Option<String>> {
        // Surrounding whitespace (a newline from an editor or a Secret) is never part of a
        // token a client can send.
        if let Some(t) = &self.admin.token {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.admin.token_file {
            Some(f) => Ok(Some(std::fs::read_to_string(f)?.trim().to_owned())),
            None => Ok(None),
        }
    }

    /// The master password, read from the file when configured that way.
    pub fn master_password(&self) -> std::io::Result<Option<String>> {
        if let Some(p) = &self.backend_auth.master_password {
            return Ok(Some(p.clone()));
        }
        match &self.backend_auth.master_password_file {
            Some(f) => Ok(Some(std::fs::read_to_string(f)?.trim_end().to_owned())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(
            &file,
            "routing_table = \"r.toml\"\n[timeouts]\npreauth = \"90s\"\n\
             [[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nallow_plaintext_auth = true\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("IMAP_GATEWAY_LIMITS__MAX_BAD_COMMANDS", "4");
            // What Kubernetes injects for a Service named imap-gateway: ignored.
            jail.set_env("IMAP_GATEWAY_PORT", "tcp://10.0.0.1:143");
            jail.set_env("IMAP_GATEWAY_SERVICE_HOST", "10.0.0.1");
            let c = Config::load(Some(&file)).unwrap();
            assert_eq!(c.timeouts.preauth, Duration::from_secs(90));
            assert_eq!(c.limits.max_bad_commands, 4);
            assert_eq!(c.limits.max_auth_failures, 3);
            assert_eq!(c.routing_table, dir.path().join("r.toml"));
            assert_eq!(c.listeners.len(), 1);
            assert!(c.listeners[0].allow_plaintext_auth);
            Ok(())
        });
    }

    #[test]
    fn problems_are_all_reported() {
        let mut c = Config::default();
        c.listeners.push(ListenerConfig {
            mode: ListenerMode::Tls,
            ..ListenerConfig::default()
        });
        c.timeouts.preauth = Duration::ZERO;
        c.backend_auth.mode = BackendAuthMode::Master;
        c.timeouts.autologout = Duration::from_secs(29 * 60);
        c.limits.exempt_networks = vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()];
        c.limits.auth_penalty_max = Duration::from_millis(500);
        let p = c.problems();
        assert!(
            p.iter()
                .any(|m| m.contains("timeouts.autologout must be at least 30m")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.contains("limits.exempt_networks: \"10.0.0.1/8\" has host bits")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("auth_penalty_max")), "{p:?}");
        assert!(
            p.iter().any(|m| m.contains("duplicate listener name")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("duplicate address")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("needs tls_cert")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("timeouts.preauth")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("needs master_user")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("needs passdb")), "{p:?}");
    }

    #[test]
    fn autologout_minimum_and_the_test_only_override() {
        let mut c = Config::default();
        assert_eq!(c.timeouts.autologout(), MIN_AUTOLOGOUT);
        c.timeouts.autologout = MIN_AUTOLOGOUT;
        assert!(c.problems().iter().all(|m| !m.contains("autologout")));
        // The override is not checked, and cannot come from a file or the environment.
        c.timeouts.autologout_unchecked = Some(Duration::from_secs(1));
        assert_eq!(c.timeouts.autologout(), Duration::from_secs(1));
        assert!(c.problems().iter().all(|m| !m.contains("autologout")));
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("autologout_unchecked"), "{text}");
        assert!(
            toml::from_str::<Config>("[timeouts]\nautologout_unchecked = \"1s\"\n").is_err(),
            "not a key of the file"
        );
    }

    #[test]
    fn proxy_protocol_problems_name_the_listener() {
        let mut c = Config::default();
        c.listeners[0].proxy_protocol = true;
        c.listeners.push(ListenerConfig {
            name: "lb".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 1144)),
            proxy_protocol: true,
            proxy_trusted_networks: vec!["10.0.0.0/8".into(), "10.0.0.1/8".into(), "lb".into()],
            ..ListenerConfig::default()
        });
        c.timeouts.preauth = Duration::ZERO;
        let p = c.problems();
        let about = |name: &str, what: &str| {
            p.iter()
                .any(|m| m.starts_with(&format!("listener \"{name}\"")) && m.contains(what))
        };
        assert!(about("imap", "needs proxy_trusted_networks"), "{p:?}");
        assert!(about("lb", "\"10.0.0.1/8\" has host bits set"), "{p:?}");
        assert!(about("lb", "\"lb\" is not an IP address"), "{p:?}");
        assert!(!about("lb", "needs proxy_trusted_networks"), "{p:?}");
        // Reported along with the rest, not instead of it.
        assert!(p.iter().any(|m| m.contains("timeouts.preauth")), "{p:?}");

        let mut ok = Config::default();
        ok.listeners[0].proxy_protocol = true;
        ok.listeners[0].proxy_trusted_networks = vec!["10.0.0.0/8".into(), "fd00::1".into()];
        assert!(ok.problems().iter().all(|m| !m.contains("proxy")));
        assert_eq!(ok.listeners[0].trusted_networks().unwrap().len(), 2);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn proxy_keys_from_file_and_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "[[listeners]]\nname = \"imaps\"\naddress = \"0.0.0.0:993\"\n\
                 proxy_protocol = true\nproxy_trusted_networks = [\"10.0.0.0/8\", \"fd00::/8\"]\n",
            )?;
            let c = Config::load(Some(std::path::Path::new("gw.toml"))).unwrap();
            assert!(c.listeners[0].proxy_protocol);
            assert_eq!(
                c.listeners[0].proxy_trusted_networks,
                ["10.0.0.0/8", "fd00::/8"]
            );
            // The list of listeners, given whole in the environment, as the chart does.
            jail.set_env(
                "IMAP_GATEWAY_LISTENERS",
                "[{name=\"imap\", address=\"0.0.0.0:143\", proxy_protocol=true, \
                 proxy_trusted_networks=[\"192.168.0.0/16\"]}]",
            );
            let c = Config::load(Some(std::path::Path::new("gw.toml"))).unwrap();
            assert_eq!(c.listeners.len(), 1);
            assert_eq!(c.listeners[0].name, "imap");
            assert!(c.listeners[0].proxy_protocol);
            assert_eq!(c.listeners[0].proxy_trusted_networks, ["192.168.0.0/16"]);
            assert!(c.problems().iter().all(|m| !m.contains("proxy")));
            Ok(())
        });
    }
}
