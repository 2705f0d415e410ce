//! LIST, LSUB, RLIST and RLSUB across the home backend and the mounts: the pattern is asked
//! of every server whose mailboxes could match, all at once, and the answers are merged into
//! one tree in the client's names (see docs/routing.md, "LIST, LSUB, RLIST, RLSUB").

use super::conn::Answer;
use super::list_entry::parse_list_entry;
use super::merge::{HAS_CHILDREN, HAS_NO_CHILDREN, Merged, NOSELECT};
use super::names;
use super::{End, Murder, Slot, Step};
use crate::proto::args::{self, Item, LiteralForm, Value};
use crate::proto::pattern;
use crate::proto::prescan::CommandName;
use crate::proto::response::{Status, parse_status_line};
use crate::route::MountTarget;

/// Longest reference plus pattern. Matching costs pattern length times name length for
/// every name listed; mailbox names are at most a few hundred bytes.
const MAX_PATTERN: usize = 1024;

/// A question sent to one backend for one mount (or for home, `mount` None).
struct Query {
    conn: usize,
    mount: Option<usize>,
    tag: String,
    /// Whether the mount's whole subtree was asked for (so its children are all known).
    whole: bool,
}

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

        // Collect. One answer buffer serves every server in turn, and entries go from it
        // into the merged answer's buffers: nothing is allocated per entry.
        let prefixes: Vec<Vec<u8>> = self
            .mounts
            .iter()
            .map(|m| names::client_prefix(m, d))
            .collect();
        let pattern = Pattern::new(&full);
        let mut merged = Merged::default();
        let mut answer = Answer::default();
        let mut cname = Vec::new();
        let mut subscribed_elsewhere = NameList::default();
        let mut children_seen = vec![false; self.mounts.len()];
        let mut whole_asked = vec![false; self.mounts.len()];
        let mut home_failed = None;
        for q in &queries {
            if self
                .collect_into(q.conn, &q.tag, &mut answer)
                .await
                .is_err()
            {
                if q.conn == 0 {
                    return Err(End::HomeLost);
                }
                self.conn_failed(q.conn)?;
                if let Some(m) = q.mount {
                    warnings.push(unavailable_warning(&prefixes[m]));
                }
                continue;
            }
            // Anything but the entries is an update of the selected mailbox, or nothing.
            let is_entry =
                |m: &[u8]| args::head(m).is_some_and(|(_, w, _)| w.eq_ignore_ascii_case(word));
            self.pass_updates(q.conn, answer.untagged().filter(|m| !is_entry(m)))
                .await?;
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
                    warnings.push(unavailable_warning(&prefixes[m]));
                    continue;
                }
                whole_asked[m] = q.whole;
            }
            let bd = self.up_delim(q.conn);
            for msg in answer.untagged().filter(|m| is_entry(m)) {
                let Some((_, _, off)) = args::head(msg) else {
                    continue;
                };
                let Some(entry) = parse_list_entry(msg, off) else {
                    continue;
                };
                let Some(m) = q.mount else {
                    // Home's names are the client's, except those a mount hides.
                    if !names::under_any_prefix(&prefixes, &entry.name, d) {
                        merged.add_listed(&entry.name, entry.attrs.iter());
                    }
                    continue;
                };
                let MountTarget::Backend { path, .. } = &self.mounts[m].target else {
                    continue;
                };
                let pfx = &prefixes[m];
                // The client's name, in a buffer reused from entry to entry.
                cname.clear();
                if !names::to_client_into(pfx, path, &entry.name, bd, d, &mut cname) {
                    continue;
                }
                if cname != *pfx {
                    children_seen[m] = true;
                }
                if pattern.matches(&cname, d) {
                    merged.add_listed(&cname, entry.attrs.iter());
                } else if lsub && !entry.attrs.iter().any(|a| a.eq_ignore_ascii_case(NOSELECT)) {
                    subscribed_elsewhere.push(&cname);
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
            let pfx = &prefixes[m];
            if !lsub {
                for above in levels_above(pfx, d) {
                    if pattern.matches(above, d) {
                        merged.add_fixed(above, &[NOSELECT, HAS_CHILDREN]);
                    }
                }
            }
            // Home mailboxes above a mount point now have children.
            merged.mark_above(pfx, d);
            if referral {
                if pattern.matches(pfx, d) {
                    merged.add_fixed(pfx, &[]);
                } else if lsub {
                    subscribed_elsewhere.push(pfx);
                }
                continue;
            }
            if lsub || !pattern.matches(pfx, d) {
                continue;
            }
            let attrs: &'static [&'static [u8]] = match (whole_asked[m], children_seen[m]) {
                (true, true) => &[NOSELECT, HAS_CHILDREN],
                (true, false) => &[NOSELECT, HAS_NO_CHILDREN],
                (false, _) => &[NOSELECT],
            };
            merged.add_fixed(pfx, attrs);
        }
        // LSUB with `%`: an unsubscribed level above a subscribed mailbox (RFC 3501 6.3.9).
        for name in subscribed_elsewhere.iter() {
            for above in levels_above(name, d) {
                // The same levels come again and again from one server's names; an entry
                // added twice is written once anyway.
                if pattern.matches(above, d) && !merged.last_is(above) {
                    merged.add_fixed(above, &[NOSELECT]);
                }
            }
        }

        let mut out = Vec::new();
        merged.write(word, d, &mut out);
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
        let mut answer = Answer::default();
        self.collect_into(i, tag, &mut answer).await?;
        Ok(answer)
    }

    /// Reads conn `i`'s answer to `tag` into `into`, reusing its buffers.
    pub(super) async fn collect_into(
        &mut self,
        i: usize,
        tag: &str,
        into: &mut Answer,
    ) -> Result<(), ()> {
        let conn = self.up(i).ok_or(())?;
        super::conn::answer_into(conn, tag, into)
            .await
            .map_err(drop)
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

/// An astring argument (reference or pattern), not a list.
fn plain_string<'a>(item: &'a Item<'_>) -> Option<&'a [u8]> {
    match &item.value {
        Value::List(_) => None,
        v => v.as_bytes(),
    }
}

/// A command's LIST pattern, tested against many names. The shapes clients send (no
/// wildcard, or one at the end: `*`, `%`, `Shared/*`) are tested in place; the others go to
/// [`pattern::matches`], which allocates its state on every call.
struct Pattern<'p> {
    pattern: &'p [u8],
    shape: Shape,
}

enum Shape {
    Exact,
    /// The literal prefix, then `*`.
    AnyBelow(usize),
    /// The literal prefix, then `%`.
    LevelBelow(usize),
    General,
}

impl<'p> Pattern<'p> {
    fn new(pattern: &'p [u8]) -> Self {
        let literal = pattern::literal_prefix(pattern).len();
        let shape = match &pattern[literal..] {
            [] => Shape::Exact,
            [b'*'] => Shape::AnyBelow(literal),
            [b'%'] => Shape::LevelBelow(literal),
            _ => Shape::General,
        };
        Pattern { pattern, shape }
    }

    /// `pattern::matches(pattern, name, Some(delim))`.
    fn matches(&self, name: &[u8], delim: u8) -> bool {
        match self.shape {
            Shape::Exact => name == self.pattern,
            Shape::AnyBelow(n) => name.starts_with(&self.pattern[..n]),
            Shape::LevelBelow(n) => name
                .strip_prefix(&self.pattern[..n])
                .is_some_and(|rest| !rest.contains(&delim)),
            Shape::General => pattern::matches(self.pattern, name, Some(delim)),
        }
    }
}

/// Names back to back in one buffer.
#[derive(Default)]
struct NameList {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl NameList {
    fn push(&mut self, name: &[u8]) {
        self.bytes.extend_from_slice(name);
        self.ends.push(self.bytes.len());
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bytes[start..end])
    }
}

/// The levels above a name, highest first: `a`, `a/b` for `a/b/c`.
fn levels_above(name: &[u8], delim: u8) -> impl Iterator<Item = &[u8]> {
    memchr::memchr_iter(delim, name).map(move |end| &name[..end])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_agree_with_the_general_matcher() {
        let names = [
            &b""[..],
            b"INBOX",
            b"Shared",
            b"Shared/",
            b"Shared/Team",
            b"Shared/Team/x",
            b"SharedX",
            b"S",
            b"a.b",
        ];
        for p in [
            &b"*"[..],
            b"%",
            b"",
            b"Shared",
            b"Shared/*",
            b"Shared/%",
            b"Shared*",
            b"S%",
            b"%/%",
            b"*/%",
            b"Sh*d",
            b"**",
            b"%*",
        ] {
            let pattern = Pattern::new(p);
            for n in names {
                for d in [b'/', b'.'] {
                    assert_eq!(
                        pattern.matches(n, d),
                        pattern::matches(p, n, Some(d)),
                        "{} {}",
                        p.escape_ascii(),
                        n.escape_ascii()
                    );
                }
            }
        }
    }

    #[test]
    fn levels_above_a_name() {
        let above: Vec<&[u8]> = levels_above(b"a/b//c", b'/').collect();
        assert_eq!(above, [&b"a"[..], b"a/b", b"a/b/"]);
        assert_eq!(levels_above(b"abc", b'/').count(), 0);
    }
}
