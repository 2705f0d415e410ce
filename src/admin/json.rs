//! The JSON bodies of the `/admin/*` endpoints: what a route looks like to an operator, and
//! the small result and error objects.

use serde::Serialize;

use crate::route::{Backend, BackendTls, Mount, MountTarget, NamespaceKind, Route};

/// `GET /admin/route`: where a user's next login goes.
#[derive(Serialize)]
pub struct RouteView<'a> {
    pub user: &'a str,
    /// The generation of the table the route comes from. Read next to the lookup, not with
    /// it: a reload in between can make it one off, which is harmless for a diagnostic.
    pub generation: u64,
    pub home: BackendView<'a>,
    pub mounts: Vec<MountView<'a>>,
}

impl<'a> RouteView<'a> {
    pub fn new(user: &'a str, generation: u64, route: &'a Route) -> Self {
        Self {
            user,
            generation,
            home: BackendView::new(&route.home),
            mounts: route.mounts.iter().map(|m| MountView::new(m)).collect(),
        }
    }
}

#[derive(Serialize)]
pub struct BackendView<'a> {
    pub name: &'a str,
    pub address: String,
    pub tls: &'static str,
}

impl<'a> BackendView<'a> {
    fn new(b: &'a Backend) -> Self {
        // An IPv6 literal needs brackets to stay parseable next to the port.
        let address = if b.host.contains(':') {
            format!("[{}]:{}", b.host, b.port)
        } else {
            format!("{}:{}", b.host, b.port)
        };
        let tls = match b.tls {
            BackendTls::None => "none",
            BackendTls::Starttls => "starttls",
            BackendTls::Implicit => "implicit",
        };
        Self {
            name: &b.name,
            address,
            tls,
        }
    }
}

#[derive(Serialize)]
pub struct MountView<'a> {
    /// The client-visible prefix, levels joined with `/` as in the routing table file.
    pub prefix: String,
    pub namespace: &'static str,
    #[serde(flatten)]
    pub target: TargetView<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum TargetView<'a> {
    Backend {
        backend: BackendView<'a>,
        /// The backend's name for the prefix, levels joined with `/` (`""`: its whole tree).
        path: String,
    },
    Referral {
        referral: &'a str,
    },
}

impl<'a> MountView<'a> {
    fn new(m: &'a Mount) -> Self {
        let namespace = match m.namespace {
            NamespaceKind::Personal => "personal",
            NamespaceKind::Other => "other",
            NamespaceKind::Shared => "shared",
        };
        let target = match &m.target {
            MountTarget::Backend { backend, path } => TargetView::Backend {
                backend: BackendView::new(backend),
                path: path.join("/"),
            },
            MountTarget::Referral(url) => TargetView::Referral { referral: url },
        };
        Self {
            prefix: m.prefix.join("/"),
            namespace,
            target,
        }
    }
}

/// `POST /admin/reload`.
#[derive(Serialize)]
pub struct Generation {
    pub generation: u64,
}

/// `POST /admin/kick`: how many sessions were asked to stop.
#[derive(Serialize)]
pub struct Kicked {
    pub sessions: usize,
}

/// Any `/admin/*` failure.
#[derive(Serialize)]
pub struct Error<'a> {
    pub error: &'a str,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::route::RoutingTable;

    #[test]
    fn a_route_with_both_kinds_of_mount() {
        let table = RoutingTable::parse(
            r#"
            [[backends]]
            name = "home"
            address = "[::1]:143"
            [[backends]]
            name = "shared"
            address = "imap.example:993"
            [[routes]]
            user = "a\"b@example.org"
            backend = "home"
            [[mounts]]
            users = "*"
            prefix = "Shared/Team"
            backend = "shared"
            path = "Public/Team"
            [[mounts]]
            users = "*@example.org"
            prefix = "Remote"
            referral = "imap://imap.partner.example/Sales"
            namespace = "other"
            "#,
            Path::new("."),
        )
        .unwrap();
        let route = table.lookup("A\"B@example.org").unwrap();
        let json = serde_json::to_value(RouteView::new("A\"B@example.org", 3, &route)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "user": "A\"B@example.org",
                "generation": 3,
                "home": {"name": "home", "address": "[::1]:143", "tls": "none"},
                "mounts": [
                    {
                        "prefix": "Shared/Team",
                        "namespace": "shared",
                        "backend": {
                            "name": "shared", "address": "imap.example:993", "tls": "none"
                        },
                        "path": "Public/Team"
                    },
                    {
                        "prefix": "Remote",
                        "namespace": "other",
                        "referral": "imap://imap.partner.example/Sales"
                    }
                ]
            })
        );
    }
}
