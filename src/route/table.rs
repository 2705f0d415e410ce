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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    user: String,
    backend: String,
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
            .finish_non_exhaustive()
    }
}

/// Where one user's session goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub home: Arc<Backend>,
}

/// The immutable routing table.
#[derive(Debug, Default)]
pub struct RoutingTable {
    backends: Vec<Arc<Backend>>,
    exact: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    /// Pool members with the hash seed derived from their name.
    pool: Vec<(usize, u64)>,
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

        if problems.is_empty() {
            Ok(table)
        } else {
            Err(RouteError::Invalid(problems))
        }
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
}
