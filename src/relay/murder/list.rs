//! LIST, LSUB, RLIST and RLSUB across the home backend and the mounts: the pattern is asked
//! of every server whose mailboxes could match, all at once, and the answers are merged into
//! one tree in the client's names (see docs/routing.md, "LIST, LSUB, RLIST, RLSUB").

use std::collections::BTreeMap;

use super::conn::Answer;
use super::names::{self, is_inbox};
use super::{End, Murder, Slot, Step};
use crate::proto::args::{self, Item, LiteralForm, Value};
use crate::proto::pattern;
use crate::proto::prescan::CommandName;
use crate::proto::response::{Status, parse_status_line};
use crate::route::MountTarget;

/// Longest reference plus pattern. Matching costs pattern length times name length for
/// every name listed; mailbox names are at most a few hundred bytes.
const MAX_PATTERN: usize = 1024;

/// One mailbox of the merged answer.
struct Entry {
    name: Vec<u8>,
    attrs: Vec<Vec<u8>>,
}

/// A question sent to one backend for one mount (or for home, `mount` None).
struct Query {
    conn: usize,
    mount: Option<usize>,
    tag: String,
    /// Whether the mount's whole subtree was asked for (so its children are all known).
    whole: bool,
}

const NOSELECT: &[u8] = b"\\Noselect";
const HAS_CHILDREN: &[u8] = b"\\HasChildren";
const HAS_NO_CHILDREN: &[u8] = b"\\HasNoChildren";

impl Murder<'_> {
    pub(super) async fn list(&mut self, tag: &[u8], name: CommandName, items: &[Item<'_>]) -> Step {
        let lsub = matches!(name, CommandName::Lsub | CommandName::Rlsub);
        let remote = matches!(name, CommandName::Rlist | CommandName::Rlsub);
        let word: &[u8] = if lsub { b"LSUB" } else { b"LIST" };
        let (Some(reference), Some(pat)) = (
            items.first().and_then(plain_string),
            items.get(1).and_then(plain_string),
        ) else {
            return self
                .reply(tag, "BAD", None, "Expected a reference and a mailbox pattern (LIST-EXTENDED is not supported here)")
                .await;
        };
        if reference.len() + pat.len() > MAX_PATTERN {
            return self
                .reply(tag, "BAD", None, "Mailbox pattern too long")
                .await;
        }
        if items.len() != 2 {
            return self
                .reply(tag, "BAD", None, "LIST-EXTENDED is not supported here")
                .await;
        }
        let d = self.delim;
        if pat.is_empty() && !reference.is_empty() {
            // The root of the reference: in the home's names, which are the client's.
            let mut cmd = tag.to_vec();
            cmd.push(b' ');
            cmd.extend_from_slice(word);
            cmd.push(b' ');
            args::push_string(&mut cmd, reference, LiteralForm::NonSync);
            cmd.extend_from_slice(b" \"\"\r\n");
            let literals = super::needs_literal(&cmd);
            let updates = self.updates_for(0);
            return self
                .exec_raw(0, &cmd, tag, literals, updates)
                .await
                .map(drop);
        }
        if pat.is_empty() {
            // The hierarchy delimiter and root: the same for every server, in client terms.
            if !lsub {
                let mut line = b"* LIST (\\Noselect) ".to_vec();
                args::push_string(&mut line, &[d], LiteralForm::Server);
                line.extend_from_slice(b" \"\"\r\n");
                self.client
                    .write(&line)
                    .await
                    .map_err(|_| End::ClientGone)?;
            }
            return self
                .reply(tag, "OK", None, &format!("{} completed", as_str(word)))
                .await;
        }
        let mut full = reference.to_vec();
        full.extend_from_slice(pat);
        let literal = pattern::literal_prefix(&full).to_vec();

        // Which mounts are concerned, and with which backend pattern.
        let mut wanted: Vec<(usize, usize, bool, Vec<u8>)> = Vec::new(); // (mount, conn, whole, residual)
        for (m, mount) in self.mounts.iter().enumerate() {
            let (MountTarget::Backend { .. }, Some(conn)) = (&mount.target, self.mount_conn[m])
            else {
                continue;
            };
            let pfx = names::client_prefix(mount, d);
            let mut pfx_d = pfx.clone();
            pfx_d.push(d);
            if literal.starts_with(&pfx_d) {
                wanted.push((m, conn, false, full[pfx_d.len()..].to_vec()));
            } else if pfx.starts_with(&literal) {
                wanted.push((m, conn, true, Vec::new()));
            }
        }
        let mut conns: Vec<usize> = wanted.iter().map(|w| w.1).collect();
        conns.sort_unstable();
        conns.dedup();
        self.ensure_many(&conns).await;

        // Send every question before reading any answer: the servers work in parallel.
        let mut queries = Vec::new();
        let mut warnings: Vec<Vec<u8>> = Vec::new();
        {
            let home = self.up(0).ok_or(End::HomeLost)?;
            let t = home.tag();
            let mut cmd = format!("{t} ").into_bytes();
            cmd.extend_from_slice(word);
            cmd.push(b' ');
            args::push_string(&mut cmd, reference, LiteralForm::NonSync);
            cmd.push(b' ');
            args::push_string(&mut cmd, pat, LiteralForm::NonSync);
            cmd.extend_from_slice(b"\r\n");
            if home.wire.write(&cmd).await.is_err() {
                return Err(End::HomeLost);
            }
            queries.push(Query {
                conn: 0,
                mount: None,
                tag: t,
                whole: false,
            });
        }
        for (m, conn, whole, residual) in wanted {
            let mount = std::sync::Arc::clone(&self.mounts[m]);
            let MountTarget::Backend { path, .. } = &mount.target else {
                continue;
            };
            let Some(c) = self.up(conn) else {
                warnings.push(unavailable_warning(&names::client_prefix(&mount, d)));
                continue;
            };
            let bd = c.delim;
            let mut bpat = names::join(path.iter().map(String::as_bytes), bd.unwrap_or(d));
            if whole {
                bpat.push(b'*');
            } else {
                if !path.is_empty() {
                    bpat.push(bd.unwrap_or(d));
                }
                bpat.extend(residual.iter().map(|&b| swap(b, d, bd.unwrap_or(d))));
            }
            let t = c.tag();
            let mut cmd = format!("{t} ").into_bytes();
            cmd.extend_from_slice(word);
            cmd.extend_from_slice(b" \"\" ");
            args::push_string(&mut cmd, &bpat, LiteralForm::NonSync);
            cmd.extend_from_slice(b"\r\n");
            if c.wire.write(&cmd).await.is_err() {
                self.conn_failed(conn)?;
                warnings.push(unavailable_warning(&names::client_prefix(&mount, d)));
                continue;
            }
            queries.push(Query {
                conn,
                mount: Some(m),
                tag: t,
                whole,
            });
        }

        // Collect.
        let mut entries: BTreeMap<(bool, Vec<u8>), Entry> = BTreeMap::new();
        let mut subscribed_elsewhere: Vec<Vec<u8>> = Vec::new();
        let mut children_seen = vec![false; self.mounts.len()];
        let mut whole_asked = vec![false; self.mounts.len()];
        let mut home_failed = None;
        for q in &queries {
            let answer = match self.collect(q.conn, &q.tag).await {
                Ok(a) => a,
                Err(()) => {
                    if q.conn == 0 {
                        return Err(End::HomeLost);
                    }
                    self.conn_failed(q.conn)?;
                    if let Some(m) = q.mount {
                        warnings.push(unavailable_warning(&names::client_prefix(
                            &self.mounts[m],
                            d,
                        )));
                    }
                    continue;
                }
            };
            // Anything but the entries is an update of the selected mailbox, or nothing.
            let (untagged, others): (Vec<&[u8]>, Vec<&[u8]>) = answer
                .untagged()
                .partition(|m| args::head(m).is_some_and(|(_, w, _)| w.eq_ignore_ascii_case(word)));
            self.pass_updates(q.conn, others.into_iter()).await?;
            let st = parse_status_line(&answer.tagged).map(|s| (s.status, s.text.to_owned()));
            if q.conn == 0 && !matches!(st, Some((Status::Ok, _))) {
                let (stat, text) = match st {
                    Some((Status::Bad, t)) => ("BAD", t),
                    Some((_, t)) => ("NO", t),
                    None => ("NO", "List failed".to_owned()),
                };
                // The other servers' answers are read all the same (below), so that no
                // connection is left with an answer pending.
                home_failed = Some((stat, text));
                continue;
            }
            if let Some(m) = q.mount {
                if !matches!(st, Some((Status::Ok, _))) {
                    warnings.push(unavailable_warning(&names::client_prefix(
                        &self.mounts[m],
                        d,
                    )));
                    continue;
                }
                whole_asked[m] = q.whole;
            }
            for msg in untagged {
                let Some((_, _, off)) = args::head(msg) else {
                    continue;
                };
                let Some((attrs, bname)) = parse_list_entry(msg, off) else {
                    continue;
                };
                match q.mount {
                    None => {
                        if self.under_any_mount(&bname) {
                            continue;
                        }
                        insert(&mut entries, Entry { name: bname, attrs });
                    }
                    Some(m) => {
                        let mount = &self.mounts[m];
                        let MountTarget::Backend { path, .. } = &mount.target else {
                            continue;
                        };
                        let pfx = names::client_prefix(mount, d);
                        let bd = self.up_delim(q.conn);
                        let Some(cname) = names::to_client(&pfx, path, &bname, bd, d) else {
                            continue;
                        };
                        if cname != pfx {
                            children_seen[m] = true;
                        }
                        if pattern::matches(&full, &cname, Some(d)) {
                            insert(&mut entries, Entry { name: cname, attrs });
                        } else if lsub && !attrs.iter().any(|a| a.eq_ignore_ascii_case(NOSELECT)) {
                            subscribed_elsewhere.push(cname);
                        }
                    }
                }
            }
        }

        if let Some((stat, text)) = home_failed {
            return self.reply(tag, stat, None, &text).await;
        }

        // Mount points, the levels above them, and referrals.
        for (m, mount) in self.mounts.iter().enumerate() {
            let referral = matches!(mount.target, MountTarget::Referral(_));
            if referral && !remote {
                continue;
            }
            let pfx = names::client_prefix(mount, d);
            let levels = names::levels(&pfx, Some(d));
            for k in 1..levels.len() {
                let above = names::join(levels[..k].iter().copied(), d);
                if lsub {
                    continue;
                }
                if pattern::matches(&full, &above, Some(d)) {
                    entries.entry(key(&above)).or_insert_with(|| Entry {
                        name: above.clone(),
                        attrs: vec![NOSELECT.to_vec(), HAS_CHILDREN.to_vec()],
                    });
                }
            }
            // Home mailboxes above a mount point now have children.
            for e in entries.values_mut() {
                let mut e_d = e.name.clone();
                e_d.push(d);
                if pfx.starts_with(&e_d) {
                    e.attrs.retain(|a| !a.eq_ignore_ascii_case(HAS_NO_CHILDREN));
                    if !e.attrs.iter().any(|a| a.eq_ignore_ascii_case(HAS_CHILDREN)) {
                        e.attrs.push(HAS_CHILDREN.to_vec());
                    }
                }
            }
            if referral {
                if pattern::matches(&full, &pfx, Some(d)) {
                    entries.entry(key(&pfx)).or_insert_with(|| Entry {
                        name: pfx.clone(),
                        attrs: Vec::new(),
                    });
                } else if lsub {
                    subscribed_elsewhere.push(pfx.clone());
                }
                continue;
            }
            if lsub || !pattern::matches(&full, &pfx, Some(d)) {
                continue;
            }
            let attrs = if whole_asked[m] {
                let kids = if children_seen[m] {
                    HAS_CHILDREN
                } else {
                    HAS_NO_CHILDREN
                };
                vec![NOSELECT.to_vec(), kids.to_vec()]
            } else {
                vec![NOSELECT.to_vec()]
            };
            entries.entry(key(&pfx)).or_insert_with(|| Entry {
                name: pfx.clone(),
                attrs,
            });
        }
        // LSUB with `%`: an unsubscribed level above a subscribed mailbox (RFC 3501 6.3.9).
        for name in subscribed_elsewhere {
            let levels = names::levels(&name, Some(d));
            for k in 1..levels.len() {
                let above = names::join(levels[..k].iter().copied(), d);
                if pattern::matches(&full, &above, Some(d)) {
                    entries.entry(key(&above)).or_insert_with(|| Entry {
                        name: above.clone(),
                        attrs: vec![NOSELECT.to_vec()],
                    });
                }
            }
        }

        let mut out = Vec::new();
        for e in entries.values() {
            out.extend_from_slice(b"* ");
            out.extend_from_slice(word);
            out.extend_from_slice(b" (");
            out.extend_from_slice(&names::join(e.attrs.iter().map(Vec::as_slice), b' '));
            out.extend_from_slice(b") ");
            args::push_string(&mut out, &[d], LiteralForm::Server);
            out.push(b' ');
            args::push_string(&mut out, &e.name, LiteralForm::Server);
            out.extend_from_slice(b"\r\n");
        }
        warnings.dedup();
        for w in &warnings {
            out.extend_from_slice(w);
        }
        self.client.write(&out).await.map_err(|_| End::ClientGone)?;
        let text = if warnings.is_empty() {
            format!("{} completed", as_str(word))
        } else {
            format!("{} completed, some servers are not available", as_str(word))
        };
        self.reply(tag, "OK", None, &text).await
    }

    pub(super) fn up_delim(&self, i: usize) -> Option<u8> {
        match &self.conns[i].slot {
            Slot::Up(c) => c.delim,
            _ => None,
        }
    }

    /// Whether a home name is hidden by a mount (equal to or under a mount's prefix).
    pub(super) fn under_any_mount(&self, name: &[u8]) -> bool {
        names::find_mount(&self.mounts, name, self.delim).is_some()
    }

    /// Reads conn `i`'s answer to `tag` (see [`super::conn::answer`]).
    pub(super) async fn collect(&mut self, i: usize, tag: &str) -> Result<Answer, ()> {
        let conn = self.up(i).ok_or(())?;
        super::conn::answer(conn, tag).await.map_err(drop)
    }

    /// Connects the given conns that are not up yet, all at once.
    pub(super) async fn ensure_many(&mut self, conns: &[usize]) {
        let now = tokio::time::Instant::now();
        let todo: Vec<usize> = conns
            .iter()
            .copied()
            .filter(|&i| match &self.conns[i].slot {
                Slot::Up(_) => false,
                Slot::Down(since) => now.duration_since(*since) >= super::RETRY_AFTER,
                Slot::Idle => true,
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let backends: Vec<_> = todo
            .iter()
            .map(|&i| std::sync::Arc::clone(&self.conns[i].backend))
            .collect();
        let results = {
            let this = &*self;
            futures_util::future::join_all(backends.iter().map(|b| this.open(b))).await
        };
        for ((i, backend), r) in todo.into_iter().zip(&backends).zip(results) {
            self.conns[i].slot = match r {
                Ok(c) => Slot::Up(Box::new(c)),
                Err(e) => {
                    tracing::warn!(backend = %backend.name, error = %e, "mounted backend unavailable");
                    Slot::Down(now)
                }
            };
        }
    }
}

fn as_str(word: &[u8]) -> &str {
    std::str::from_utf8(word).unwrap_or("LIST")
}

fn key(name: &[u8]) -> (bool, Vec<u8>) {
    (!is_inbox(name), name.to_vec())
}

fn insert(entries: &mut BTreeMap<(bool, Vec<u8>), Entry>, e: Entry) {
    let name = if is_inbox(&e.name) {
        b"INBOX".to_vec()
    } else {
        e.name
    };
    entries.entry(key(&name)).or_insert(Entry {
        name,
        attrs: e.attrs,
    });
}

/// An astring argument (reference or pattern), not a list.
fn plain_string<'a>(item: &'a Item<'_>) -> Option<&'a [u8]> {
    match &item.value {
        Value::List(_) => None,
        v => v.as_bytes(),
    }
}

/// The attributes and name of a `* LIST`/`* LSUB` response.
fn parse_list_entry(msg: &[u8], off: usize) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let items = args::parse(msg, off).ok()?;
    let Value::List(attrs) = &items.first()?.value else {
        return None;
    };
    let attrs = attrs
        .iter()
        .filter_map(|a| a.value.as_bytes().map(<[u8]>::to_vec))
        .collect();
    let name = items.get(2)?.value.as_bytes()?.to_vec();
    Some((attrs, name))
}

fn unavailable_warning(prefix: &[u8]) -> Vec<u8> {
    let mut w = b"* NO [UNAVAILABLE] Mailboxes under ".to_vec();
    args::push_string(&mut w, prefix, LiteralForm::Server);
    w.extend_from_slice(b" are not available now\r\n");
    w
}

/// Translates a pattern byte from the client's delimiter to a backend's (and back, so the
/// mapping stays one-to-one).
fn swap(b: u8, client: u8, backend: u8) -> u8 {
    if b == client {
        backend
    } else if b == backend {
        client
    } else {
        b
    }
}
