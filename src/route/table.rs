//! Parsing, validation and lookup of the routing table file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RouteError {
    #[error("cannot read routing table {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid routing table:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// How the gateway secures its connection to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendTls {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSpec {
    name: String,
    address: String,
    #[serde(default)]
    tls: BackendTls,
    ca_file: Option<std::path::PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    trusted: bool,
    #[serde(default)]
    send_proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    user: String,
    backend: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountSpec {
    users: String,
    prefix: String,
    backend: Option<String>,
    #[serde(default)]
    path: String,
    referral: Option<String>,
    #[serde(default)]
    namespace: NamespaceKind,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    backends: Vec<BackendSpec>,
    #[serde(default)]
    routes: Vec<RouteSpec>,
    #[serde(default)]
    default_pool: Vec<String>,
    #[serde(default)]
    mounts: Vec<MountSpec>,
}

/// The NAMESPACE group (RFC 2342) a mount is announced in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceKind {
    Personal,
    Other,
    #[default]
    Shared,
}

/// What a mount's prefix leads to.
#[derive(Debug)]
pub enum MountTarget {
    /// A subtree of a backend the gateway proxies: `path` (levels, possibly none) is the
    /// backend's name for the prefix.
    Backend {
        backend: Arc<Backend>,
        path: Vec<String>,
    },
    /// A mailbox on a server the gateway does not proxy (RFC 2193 referral), as an IMAP URL.
    Referral(String),
}

/// A part of another server's mailbox tree shown in a user's session under a prefix.
#[derive(Debug)]
pub struct Mount {
    /// The client-visible levels of the prefix (joined with the session's delimiter).
    pub prefix: Vec<String>,
    pub target: MountTarget,
    pub namespace: NamespaceKind,
}

/// Who a mount applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    All,
    Domain(String),
    User(String),
}

impl Scope {
    fn parse(users: &str) -> Option<Scope> {
        let users = users.to_ascii_lowercase();
        if users == "*" {
            return Some(Scope::All);
        }
        match users.strip_prefix("*@") {
            Some(d) if !d.is_empty() && !d.contains(['@', '*']) => Some(Scope::Domain(d.into())),
            _ if users.is_empty() || users.contains('*') => None,
            _ => Some(Scope::User(users)),
        }
    }

    /// Whether some user gets mounts of both scopes.
    fn meets(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::All, _) | (_, Scope::All) => true,
            (Scope::Domain(a), Scope::Domain(b)) | (Scope::User(a), Scope::User(b)) => a == b,
            (Scope::Domain(d), Scope::User(u)) | (Scope::User(u), Scope::Domain(d)) => {
                u.rsplit_once('@').is_some_and(|(_, ud)| ud == d)
            }
        }
    }
}

/// One backend server.
pub struct Backend {
    pub name: String,
    /// Host name or IP, as written; resolved at connect time.
    pub host: String,
    pub port: u16,
    pub tls: BackendTls,
    /// Name the backend's certificate is verified against.
    pub server_name: String,
    /// Whether the backend trusts the gateway to report the client's address (ID).
    pub trusted: bool,
    /// Whether each connection starts with a PROXY protocol v2 header giving the client's
    /// address (before TLS, as the backend reads it before anything else).
    pub send_proxy_protocol: bool,
    /// Present when `tls` is not `None`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("send_proxy_protocol", &self.send_proxy_protocol)
            .finish_non_exhaustive()
    }
}

/// Where one user's session goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub home: Arc<Backend>,
    /// Other servers' subtrees in this user's session; prefixes never overlap.
    pub mounts: Vec<Arc<Mount>>,
}

/// The immutable routing table.
#[derive(Debug, Default)]
pub struct RoutingTable {
    backends: Vec<Arc<Backend>>,
    exact: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    /// Pool members with the hash seed derived from their name.
    pool: Vec<(usize, u64)>,
    mounts_all: Vec<Arc<Mount>>,
    mounts_domain: HashMap<String, Vec<Arc<Mount>>>,
    mounts_user: HashMap<String, Vec<Arc<Mount>>>,
}

impl RoutingTable {
    /// Reads and validates a routing table file; relative CA paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Self, RouteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates a table, reporting every problem at once.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, RouteError> {
        let file: TableFile =
            toml::from_str(text).map_err(|e| RouteError::Invalid(vec![e.to_string()]))?;
        let mut problems = Vec::new();
        let mut table = RoutingTable::default();
        let mut by_name: HashMap<String, usize> = HashMap::new();

        for spec in file.backends {
            let who = format!("backend {:?}", spec.name);
            if spec.name.is_empty() {
                problems.push("a backend has an empty name".to_owned());
            }
            if by_name.contains_key(&spec.name) {
                problems.push(format!("{who}: duplicate name"));
                continue;
            }
            let Some((host, port)) = split_host_port(&spec.address) else {
                problems.push(format!(
                    "{who}: address {:?} is not host:port",
                    spec.address
                ));
                continue;
            };
            let tls_config = match spec.tls {
                BackendTls::None => {
                    if spec.ca_file.is_some() {
                        problems.push(format!("{who}: ca_file given but tls = \"none\""));
                    }
                    None
                }
                _ => {
                    let ca = spec.ca_file.as_ref().map(|p| base_dir.join(p));
                    match crate::tls::client_config(ca.as_deref()) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            problems.push(format!("{who}: {e}"));
                            None
                        }
                    }
                }
            };
            let server_name = spec.server_name.unwrap_or_else(|| host.clone());
            if spec.tls != BackendTls::None
                && rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err()
            {
                problems.push(format!(
                    "{who}: {server_name:?} is not a valid TLS server name"
                ));
            }
            by_name.insert(spec.name.clone(), table.backends.len());
            table.backends.push(Arc::new(Backend {
                name: spec.name,
                host,
                port,
                tls: spec.tls,
                server_name,
                trusted: spec.trusted,
                send_proxy_protocol: spec.send_proxy_protocol,
                tls_config,
            }));
        }

        for r in file.routes {
            let Some(&idx) = by_name.get(&r.backend) else {
                problems.push(format!(
                    "route {:?}: unknown backend {:?}",
                    r.user, r.backend
                ));
                continue;
            };
            let key = r.user.to_ascii_lowercase();
            let (map, key) = match key.strip_prefix("*@") {
                Some(domain) if !domain.is_empty() && !domain.contains(['@', '*']) => {
                    (&mut table.domains, domain.to_owned())
                }
                _ if key.is_empty() || key.contains('*') => {
                    problems.push(format!(
                        "route {:?}: user must be a user name or *@domain",
                        r.user
                    ));
                    continue;
                }
                _ => (&mut table.exact, key),
            };
            if map.insert(key, idx).is_some() {
                problems.push(format!("route {:?}: duplicate", r.user));
            }
        }

        for name in &file.default_pool {
            match by_name.get(name) {
                Some(&idx) if table.pool.iter().any(|&(i, _)| i == idx) => {
                    problems.push(format!("default_pool: {name:?} listed twice"));
                }
                Some(&idx) => table
                    .pool
                    .push((idx, xxhash_rust::xxh3::xxh3_64(name.as_bytes()))),
                None => problems.push(format!("default_pool: unknown backend {name:?}")),
            }
        }

        table.parse_mounts(file.mounts, &by_name, &mut problems);

        if problems.is_empty() {
            Ok(table)
        } else {
            Err(RouteError::Invalid(problems))
        }
    }

    fn parse_mounts(
        &mut self,
        specs: Vec<MountSpec>,
        by_name: &HashMap<String, usize>,
        problems: &mut Vec<String>,
    ) {
        let mut accepted: Vec<(Scope, Arc<Mount>)> = Vec::new();
        for spec in specs {
            let who = format!("mount {:?} for {:?}", spec.prefix, spec.users);
            let Some(scope) = Scope::parse(&spec.users) else {
                problems.push(format!(
                    "{who}: users must be \"*\", \"*@domain\" or a user name"
                ));
                continue;
            };
            let prefix = match mailbox_levels(&spec.prefix) {
                Ok(levels) if levels.is_empty() => {
                    problems.push(format!("{who}: prefix is empty"));
                    continue;
                }
                Ok(levels) if levels[0].eq_ignore_ascii_case("INBOX") => {
                    problems.push(format!("{who}: prefix must not be INBOX or under it"));
                    continue;
                }
                Ok(levels) => levels,
                Err(e) => {
                    problems.push(format!("{who}: prefix {e}"));
                    continue;
                }
            };
            let target = match (spec.backend, spec.referral) {
                (Some(name), None) => {
                    let Some(&idx) = by_name.get(&name) else {
                        problems.push(format!("{who}: unknown backend {name:?}"));
                        continue;
                    };
                    let path = match mailbox_levels(&spec.path) {
                        Ok(p) => p,
                        Err(e) => {
                            problems.push(format!("{who}: path {e}"));
                            continue;
                        }
                    };
                    MountTarget::Backend {
                        backend: Arc::clone(&self.backends[idx]),
                        path,
                    }
                }
                (None, Some(url)) => {
                    if !spec.path.is_empty() {
                        problems.push(format!("{who}: path is for backend mounts only"));
                    }
                    let lower = url.to_ascii_lowercase();
                    if !lower.starts_with("imap://") || lower.len() <= "imap://".len() {
                        problems.push(format!("{who}: referral must be an imap:// URL"));
                        continue;
                    }
                    if url.bytes().any(|b| b <= b' ' || b == b']' || b >= 0x7f) {
                        problems.push(format!(
                            "{who}: referral URL has spaces, controls, ']' or 8-bit bytes"
                        ));
                        continue;
                    }
                    MountTarget::Referral(url)
                }
                _ => {
                    problems.push(format!("{who}: give exactly one of backend and referral"));
                    continue;
                }
            };
            let mount = Arc::new(Mount {
                prefix,
                target,
                namespace: spec.namespace,
            });
            if let Some((_, other)) = accepted
                .iter()
                .find(|(s, m)| s.meets(&scope) && levels_overlap(&m.prefix, &mount.prefix))
            {
                problems.push(format!(
                    "{who}: prefix overlaps the mount {:?} for the same users",
                    other.prefix.join("/")
                ));
                continue;
            }
            accepted.push((scope, mount));
        }
        for (scope, mount) in accepted {
            match scope {
                Scope::All => self.mounts_all.push(mount),
                Scope::Domain(d) => self.mounts_domain.entry(d).or_default().push(mount),
                Scope::User(u) => self.mounts_user.entry(u).or_default().push(mount),
            }
        }
    }

    /// The mounts that apply to `user` (already lower-cased).
    fn mounts_for(&self, user: &str) -> Vec<Arc<Mount>> {
        let mut mounts = self.mounts_all.clone();
        if let Some((_, domain)) = user.rsplit_once('@')
            && let Some(m) = self.mounts_domain.get(domain)
        {
            mounts.extend(m.iter().cloned());
        }
        if let Some(m) = self.mounts_user.get(user) {
            mounts.extend(m.iter().cloned());
        }
        mounts
    }

    /// The route for `user`: exact rule, then domain rule, then the default pool.
    /// User names match case-insensitively (ASCII).
    pub fn lookup(&self, user: &str) -> Option<Route> {
        let user = user.to_ascii_lowercase();
        let idx = self
            .exact
            .get(&user)
            .or_else(|| {
                let (_, domain) = user.rsplit_once('@')?;
                self.domains.get(domain)
            })
            .copied()
            .or_else(|| self.pool_pick(&user))?;
        Some(Route {
            home: Arc::clone(&self.backends[idx]),
            mounts: self.mounts_for(&user),
        })
    }

    /// Rendezvous (highest random weight) hashing: each member scores the user with a hash
    /// seeded by the member's name, and the highest score wins. The result depends only on
    /// the names, not on their order, and adding a member to N moves about 1/(N+1) of users.
    fn pool_pick(&self, user: &str) -> Option<usize> {
        self.pool
            .iter()
            .max_by_key(|&&(_, seed)| xxhash_rust::xxh3::xxh3_64_with_seed(user.as_bytes(), seed))
            .map(|&(idx, _)| idx)
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }
}

/// Splits a mailbox path written with `/` into its levels; `""` has none. Levels must not be
/// empty or hold wildcards or control characters: they become mailbox names.
fn mailbox_levels(path: &str) -> Result<Vec<String>, String> {
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let mut levels = Vec::new();
    for level in path.split('/') {
        if level.is_empty() {
            return Err(format!("{path:?} has an empty level"));
        }
        if level.contains(['*', '%']) || level.chars().any(char::is_control) {
            return Err(format!("{path:?} has a wildcard or control character"));
        }
        levels.push(level.to_owned());
    }
    Ok(levels)
}

/// Whether one list of levels equals the other or lies above it.
fn levels_overlap(a: &[String], b: &[String]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// Splits `host:port` or `[v6]:port`.
fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']']) {
        return None;
    }
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> RoutingTable {
        RoutingTable::parse(text, Path::new(".")).unwrap()
    }

    fn pool_text(n: usize) -> String {
        let mut t = String::new();
        for i in 0..n {
            t += &format!("[[backends]]\nname = \"b{i}\"\naddress = \"10.0.0.{i}:143\"\n");
        }
        t += &format!(
            "default_pool = [{}]\n",
            (0..n)
                .map(|i| format!("\"b{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        // default_pool must come before tables in TOML; move it to the top.
        let (tables, pool) = t.rsplit_once("default_pool").unwrap();
        format!("default_pool{pool}{tables}")
    }

    #[test]
    fn exact_then_domain_then_pool() {
        let t = table(
            "default_pool = [\"p\"]\n\
             [[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
             [[backends]]\nname = \"d\"\naddress = \"[::1]:2\"\n\
             [[backends]]\nname = \"p\"\naddress = \"mail.example:3\"\n\
             [[routes]]\nuser = \"Alice@Example.org\"\nbackend = \"a\"\n\
             [[routes]]\nuser = \"*@example.org\"\nbackend = \"d\"\n",
        );
        assert_eq!(t.lookup("alice@example.ORG").unwrap().home.name, "a");
        assert_eq!(t.lookup("bob@example.org").unwrap().home.name, "d");
        assert_eq!(t.lookup("bob@other.org").unwrap().home.name, "p");
        assert_eq!(t.lookup("bob").unwrap().home.name, "p");
        assert_eq!(t.lookup("bob@example.org").unwrap().home.host, "::1");
    }

    #[test]
    fn send_proxy_protocol_is_per_backend_and_off_by_default() {
        let t = table(
            "default_pool = [\"a\"]\n\
             [[backends]]\nname = \"a\"\naddress = \"h:1\"\nsend_proxy_protocol = true\n\
             [[backends]]\nname = \"b\"\naddress = \"h:2\"\n\
             [[routes]]\nuser = \"bob\"\nbackend = \"b\"\n",
        );
        assert!(t.lookup("alice").unwrap().home.send_proxy_protocol);
        assert!(!t.lookup("bob").unwrap().home.send_proxy_protocol);
        let err = RoutingTable::parse(
            "[[backends]]\nname = \"a\"\naddress = \"h:1\"\nsend_proxy_protocol = \"yes\"\n",
            Path::new("."),
        );
        assert!(err.is_err(), "a non-boolean is refused");
    }

    #[test]
    fn no_pool_no_route() {
        let t = table("[[backends]]\nname = \"a\"\naddress = \"h:1\"\n");
        assert!(t.lookup("x").is_none());
    }

    #[test]
    fn every_problem_is_reported() {
        let err = RoutingTable::parse(
            "default_pool = [\"zz\"]\n\
             [[backends]]\nname = \"a\"\naddress = \"nohost\"\n\
             [[backends]]\nname = \"b\"\naddress = \"h:1\"\n\
             [[backends]]\nname = \"b\"\naddress = \"h:2\"\n\
             [[routes]]\nuser = \"x\"\nbackend = \"nope\"\n\
             [[routes]]\nuser = \"a*b\"\nbackend = \"b\"\n",
            Path::new("."),
        )
        .unwrap_err();
        let RouteError::Invalid(p) = err else {
            panic!("{err}")
        };
        assert_eq!(p.len(), 5, "{p:?}");
    }

    #[test]
    fn pool_is_stable_and_moves_few_users_when_grown() {
        let users: Vec<String> = (0..20_000)
            .map(|i| format!("user{i}@example.org"))
            .collect();
        let t4 = table(&pool_text(4));
        let t4b = table(&pool_text(4));
        let t5 = table(&pool_text(5));
        let mut counts = [0usize; 4];
        let mut moved = 0;
        for u in &users {
            let a = t4.lookup(u).unwrap().home.name.clone();
            assert_eq!(a, t4b.lookup(u).unwrap().home.name);
            counts[a[1..].parse::<usize>().unwrap()] += 1;
            let b = t5.lookup(u).unwrap().home.name.clone();
            if a != b {
                assert_eq!(b, "b4", "a user may only move to the new backend");
                moved += 1;
            }
        }
        // Each of 4 members gets about a quarter; growing to 5 moves about a fifth.
        for c in counts {
            assert!((4_500..5_500).contains(&c), "{counts:?}");
        }
        assert!((3_600..4_400).contains(&moved), "moved {moved}");
    }

    const MOUNT_BACKENDS: &str = "default_pool = [\"h\"]\n\
        [[backends]]\nname = \"h\"\naddress = \"h:1\"\n\
        [[backends]]\nname = \"s\"\naddress = \"s:1\"\n";

    #[test]
    fn mounts_by_scope() {
        let t = table(&format!(
            "{MOUNT_BACKENDS}\
             [[mounts]]\nusers = \"*\"\nprefix = \"Shared/\"\nbackend = \"s\"\npath = \"Public\"\n\
             [[mounts]]\nusers = \"*@Example.org\"\nprefix = \"Archive\"\nbackend = \"s\"\nnamespace = \"personal\"\n\
             [[mounts]]\nusers = \"alice@example.org\"\nprefix = \"Remote/Sales\"\nreferral = \"imap://x.example/Sales\"\n"
        ));
        let prefixes = |u: &str| -> Vec<String> {
            t.lookup(u)
                .unwrap()
                .mounts
                .iter()
                .map(|m| m.prefix.join("/"))
                .collect()
        };
        assert_eq!(prefixes("bob"), ["Shared"]);
        assert_eq!(prefixes("bob@example.org"), ["Shared", "Archive"]);
        assert_eq!(
            prefixes("ALICE@example.org"),
            ["Shared", "Archive", "Remote/Sales"]
        );
        let alice = t.lookup("alice@example.org").unwrap();
        let MountTarget::Backend { backend, path } = &alice.mounts[0].target else {
            panic!("backend mount expected")
        };
        assert_eq!(
            (backend.name.as_str(), path.as_slice()),
            ("s", &["Public".to_owned()][..])
        );
        assert_eq!(alice.mounts[0].namespace, NamespaceKind::Shared);
        assert_eq!(alice.mounts[1].namespace, NamespaceKind::Personal);
        assert!(
            matches!(&alice.mounts[2].target, MountTarget::Referral(u) if u == "imap://x.example/Sales")
        );
    }

    #[test]
    fn bad_mounts_are_all_reported() {
        let err = RoutingTable::parse(
            &format!(
                "{MOUNT_BACKENDS}\
                 [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"s\"\n\
                 [[mounts]]\nusers = \"*@a.org\"\nprefix = \"Shared/Team\"\nbackend = \"h\"\n\
                 [[mounts]]\nusers = \"x@a.org\"\nprefix = \"A\"\nbackend = \"nope\"\n\
                 [[mounts]]\nusers = \"x@a.org\"\nprefix = \"INBOX/x\"\nbackend = \"s\"\n\
                 [[mounts]]\nusers = \"x@a.org\"\nprefix = \"a//b\"\nbackend = \"s\"\n\
                 [[mounts]]\nusers = \"x@a.org\"\nprefix = \"B\"\nreferral = \"http://x\"\n\
                 [[mounts]]\nusers = \"x@a.org\"\nprefix = \"C\"\nbackend = \"s\"\nreferral = \"imap://x\"\n\
                 [[mounts]]\nusers = \"a*\"\nprefix = \"D\"\nbackend = \"s\"\n\
                 [[mounts]]\nusers = \"y@a.org\"\nprefix = \"%\"\nbackend = \"s\"\n"
            ),
            Path::new("."),
        )
        .unwrap_err();
        let RouteError::Invalid(p) = err else {
            panic!("{err}")
        };
        assert_eq!(p.len(), 8, "{p:?}");
        assert!(p[0].contains("overlaps"), "{p:?}");
        assert!(p[1].contains("unknown backend"), "{p:?}");
    }

    #[test]
    fn mounts_of_users_that_never_meet_may_share_a_prefix() {
        let t = table(&format!(
            "{MOUNT_BACKENDS}\
             [[mounts]]\nusers = \"*@a.org\"\nprefix = \"Shared\"\nbackend = \"s\"\n\
             [[mounts]]\nusers = \"*@b.org\"\nprefix = \"Shared\"\nbackend = \"h\"\n\
             [[mounts]]\nusers = \"x@c.org\"\nprefix = \"Shared\"\nbackend = \"h\"\n\
             [[mounts]]\nusers = \"*@a.org\"\nprefix = \"SharedX\"\nbackend = \"h\"\n"
        ));
        assert_eq!(t.lookup("x@a.org").unwrap().mounts.len(), 2);
        assert_eq!(t.lookup("x@c.org").unwrap().mounts.len(), 1);
    }
}
