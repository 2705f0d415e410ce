//! NAMESPACE (RFC 2342) merged across the home backend and the mounts: personal namespaces
//! from home plus personal mounts; other users' and shared namespaces from home, the mounts in
//! those groups, and the mounted backends' own namespaces that lie inside their mounts, all in
//! the client's names and delimiter (see docs/routing.md, "NAMESPACE").

use super::names;
use super::{End, Murder, Step};
use crate::proto::args::{self, LiteralForm, Value};
use crate::route::{MountTarget, NamespaceKind};

/// Group order in the NAMESPACE response.
const GROUPS: [NamespaceKind; 3] = [
    NamespaceKind::Personal,
    NamespaceKind::Other,
    NamespaceKind::Shared,
];

impl Murder<'_> {
    pub(super) async fn namespace(&mut self, tag: &[u8]) -> Step {
        let d = self.delim;
        let mut conns: Vec<usize> = self.mount_conn.iter().flatten().copied().collect();
        conns.sort_unstable();
        conns.dedup();
        self.ensure_many(&conns).await;

        let mut tags = Vec::new();
        for &i in std::iter::once(&0).chain(&conns) {
            let Some(c) = self.up(i) else { continue };
            let t = c.tag();
            if c.wire
                .write(format!("{t} NAMESPACE\r\n").as_bytes())
                .await
                .is_err()
            {
                self.conn_failed(i)?;
                continue;
            }
            tags.push((i, t));
        }
        // (conn, [personal, other, shared] prefixes as the backend wrote them)
        let mut answers: Vec<(usize, [Vec<Vec<u8>>; 3])> = Vec::new();
        for (i, t) in tags {
            match self.collect(i, &t).await {
                Ok(answer) => {
                    let groups = answer
                        .untagged()
                        .find_map(parse_namespace)
                        .unwrap_or_default();
                    answers.push((i, groups));
                    self.pass_updates(i, answer.untagged()).await?;
                }
                Err(()) => {
                    if i == 0 {
                        return Err(End::HomeLost);
                    }
                    self.conn_failed(i)?;
                }
            }
        }

        let mut groups: [Vec<Vec<u8>>; 3] = Default::default();
        if let Some((_, home)) = answers.iter().find(|(i, _)| *i == 0) {
            for (g, prefixes) in home.iter().enumerate() {
                for p in prefixes {
                    let stripped = p.strip_suffix(&[d]).unwrap_or(p);
                    if !stripped.is_empty() && self.under_any_mount(stripped) {
                        continue;
                    }
                    groups[g].push(p.clone());
                }
            }
        }
        for (m, mount) in self.mounts.iter().enumerate() {
            let MountTarget::Backend { path, .. } = &mount.target else {
                continue;
            };
            let pfx = names::client_prefix(mount, d);
            let g = GROUPS
                .iter()
                .position(|k| *k == mount.namespace)
                .unwrap_or(2);
            let mut own = pfx.clone();
            own.push(d);
            groups[g].push(own);
            let Some(conn) = self.mount_conn[m] else {
                continue;
            };
            let Some((_, theirs)) = answers.iter().find(|(i, _)| *i == conn) else {
                continue;
            };
            let bd = self.up_delim(conn);
            // Their personal namespaces stay theirs: the mount itself stands for them.
            for (g, prefixes) in theirs.iter().enumerate().skip(1) {
                for p in prefixes {
                    let stripped = match bd {
                        Some(b) => p.strip_suffix(&[b]).unwrap_or(p),
                        None => p,
                    };
                    let client = if stripped.is_empty() {
                        path.is_empty().then(|| pfx.clone())
                    } else {
                        names::to_client(&pfx, path, stripped, bd, d)
                    };
                    let Some(client) = client else { continue };
                    if client == pfx {
                        continue; // the mount's own entry stands for it
                    }
                    let mut c = client;
                    c.push(d);
                    groups[g].push(c);
                }
            }
        }

        let mut out = b"* NAMESPACE".to_vec();
        for g in &mut groups {
            let mut seen: Vec<Vec<u8>> = Vec::new();
            g.retain(|p| {
                let fresh = !seen.contains(p);
                seen.push(p.clone());
                fresh
            });
            out.push(b' ');
            if g.is_empty() {
                out.extend_from_slice(b"NIL");
                continue;
            }
            out.push(b'(');
            for p in g.iter() {
                out.push(b'(');
                args::push_string(&mut out, p, LiteralForm::Server);
                out.push(b' ');
                args::push_string(&mut out, &[d], LiteralForm::Server);
                out.push(b')');
            }
            out.push(b')');
        }
        out.extend_from_slice(b"\r\n");
        self.client.write(&out).await.map_err(|_| End::ClientGone)?;
        self.reply(tag, "OK", None, "Namespace completed").await
    }
}

/// The three groups of a `* NAMESPACE` response, each a list of prefixes.
fn parse_namespace(msg: &[u8]) -> Option<[Vec<Vec<u8>>; 3]> {
    let (_, word, off) = args::head(msg)?;
    if !word.eq_ignore_ascii_case(b"NAMESPACE") {
        return None;
    }
    let items = args::parse(msg, off).ok()?;
    let mut groups: [Vec<Vec<u8>>; 3] = Default::default();
    for (g, item) in items.iter().take(3).enumerate() {
        if let Value::List(entries) = &item.value {
            for e in entries {
                if let Value::List(parts) = &e.value
                    && let Some(prefix) = parts.first().and_then(|p| p.value.as_bytes())
                {
                    groups[g].push(prefix.to_vec());
                }
            }
        }
    }
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups() {
        let g = parse_namespace(
            b"* NAMESPACE ((\"\" \"/\")) NIL ((\"Public/\" \"/\")(\"Shared/\" \"/\"))\r\n",
        )
        .unwrap();
        assert_eq!(g[0], vec![b"".to_vec()]);
        assert!(g[1].is_empty());
        assert_eq!(g[2], vec![b"Public/".to_vec(), b"Shared/".to_vec()]);
    }
}
