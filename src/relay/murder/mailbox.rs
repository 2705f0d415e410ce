//! Commands that name mailboxes: where each name lives (home, a mount's backend, a referral,
//! or nowhere the gateway can reach), the command rewritten with the backend's names, and the
//! selection of a mailbox moving between backends.

use std::sync::Arc;

use super::conn::{Slot, read_until_quiet};
use super::names::{self, Untranslatable};
use super::{End, Murder, Step, Updates};
use crate::proto::args::{self, Item, LiteralForm, Value};
use crate::proto::prescan::CommandName;
use crate::proto::response::Status;
use crate::route::MountTarget;

/// What a mailbox name in a command refers to.
pub(super) enum Place {
    /// Conn index and the backend's name.
    On(usize, Vec<u8>),
    /// The mount point of a mount without a path: no mailbox on any server.
    MountPoint,
    Referral(String),
    Unavailable,
    Refused(Untranslatable),
}

/// Replaces the given arguments of a whole message with new strings.
pub(super) fn replace_args(msg: &[u8], edits: &[(&Item<'_>, Vec<u8>)]) -> Vec<u8> {
    let mut sorted: Vec<_> = edits.iter().collect();
    sorted.sort_by_key(|(item, _)| item.range.start);
    let mut out = Vec::with_capacity(msg.len() + 64);
    let mut at = 0;
    for (item, value) in sorted {
        out.extend_from_slice(&msg[at..item.range.start]);
        args::push_string(&mut out, value, LiteralForm::NonSync);
        at = item.range.end;
    }
    out.extend_from_slice(&msg[at..]);
    out
}

/// Whether a rewritten command carries a literal (a name that could not be quoted).
pub(super) fn needs_literal(cmd: &[u8]) -> bool {
    memchr::memmem::find(cmd, b"+}\r\n").is_some()
}

/// The index of the mailbox argument of extension commands the gateway routes by mailbox
/// (ACL, RFC 4314; METADATA, RFC 5464).
pub(super) fn mailbox_arg_of_extension(word: &[u8], items: &[Item<'_>]) -> Option<usize> {
    let upper = word.to_ascii_uppercase();
    match upper.as_slice() {
        b"GETACL" | b"SETACL" | b"DELETEACL" | b"LISTRIGHTS" | b"MYRIGHTS" | b"SETMETADATA" => {
            Some(0)
        }
        b"GETMETADATA" => items
            .iter()
            .position(|i| !matches!(i.value, Value::List(_))),
        _ => None,
    }
}

/// Whether the gateway must read a command's arguments to know where it goes (or to answer it).
pub(super) fn routes_by_arguments(name: CommandName, word: &[u8], rest: &[u8]) -> bool {
    match name {
        CommandName::Other => {
            let upper = word.to_ascii_uppercase();
            upper == b"GETMETADATA"
                || upper == b"XLIST"
                || mailbox_arg_of_extension(word, &[]).is_some()
        }
        CommandName::Uid => {
            let sub = rest.get(..5).unwrap_or(rest);
            sub.eq_ignore_ascii_case(b"COPY ") || sub.eq_ignore_ascii_case(b"MOVE ")
        }
        CommandName::Noop
        | CommandName::Check
        | CommandName::Close
        | CommandName::Unselect
        | CommandName::Expunge
        | CommandName::Search
        | CommandName::Fetch
        | CommandName::Store
        | CommandName::Id
        | CommandName::Idle => false,
        _ => true,
    }
}

impl Murder<'_> {
    /// Where a client's mailbox name lives; connects to a mounted backend when needed.
    pub(super) async fn place(&mut self, name: &[u8]) -> Place {
        let Some((m, rest)) = names::find_mount(&self.mounts, name, self.delim) else {
            return Place::On(0, name.to_vec());
        };
        let mount = Arc::clone(&self.mounts[m]);
        match (&mount.target, self.mount_conn[m]) {
            (MountTarget::Referral(url), _) => Place::Referral(names::referral_url(url, &rest)),
            (MountTarget::Backend { path, .. }, Some(i)) => {
                if path.is_empty() && rest.is_empty() {
                    return Place::MountPoint;
                }
                if !self.ensure(i).await {
                    return Place::Unavailable;
                }
                let delim = self.up(i).and_then(|c| c.delim);
                match names::to_backend(path, &rest, delim) {
                    Ok(n) => Place::On(i, n),
                    Err(e) => Place::Refused(e),
                }
            }
            (MountTarget::Backend { .. }, None) => Place::Unavailable,
        }
    }

    /// The client's name for a backend name seen on conn `i`.
    pub(super) fn client_name(&self, i: usize, name: &[u8]) -> Option<Vec<u8>> {
        if i == 0 {
            return Some(name.to_vec());
        }
        let delim = match &self.conns[i].slot {
            Slot::Up(c) => c.delim,
            _ => None,
        };
        self.mounts.iter().zip(&self.mount_conn).find_map(|(m, c)| {
            let MountTarget::Backend { path, .. } = &m.target else {
                return None;
            };
            (*c == Some(i)).then(|| {
                names::to_client(
                    &names::client_prefix(m, self.delim),
                    path,
                    name,
                    delim,
                    self.delim,
                )
            })?
        })
    }

    /// The client's name for a quota root of conn `i`: home roots as they are, a mounted
    /// backend's prefixed with its mount and `#`, so GETQUOTA can route it back.
    pub(super) fn client_quota_root(&self, i: usize, root: &[u8]) -> Vec<u8> {
        if i == 0 {
            return root.to_vec();
        }
        let prefix = self
            .mounts
            .iter()
            .zip(&self.mount_conn)
            .find(|(_, c)| **c == Some(i))
            .map(|(m, _)| names::client_prefix(m, self.delim))
            .unwrap_or_default();
        let mut out = prefix;
        out.push(b'#');
        out.extend_from_slice(root);
        out
    }

    /// Routes a quota root from the client: `<mount prefix>#root` goes to that mount's backend.
    pub(super) fn quota_root_place(&self, root: &[u8]) -> (usize, Vec<u8>) {
        if let Some(hash) = memchr::memchr(b'#', root) {
            let (prefix, rest) = (&root[..hash], &root[hash + 1..]);
            for (m, c) in self.mounts.iter().zip(&self.mount_conn) {
                if let Some(i) = c
                    && names::client_prefix(m, self.delim) == prefix
                {
                    return (*i, rest.to_vec());
                }
            }
        }
        (0, root.to_vec())
    }

    pub(super) async fn select(
        &mut self,
        tag: &[u8],
        cmd: &[u8],
        items: &[Item<'_>],
        literals: bool,
    ) -> Step {
        let Some(name) = items.first().and_then(|i| i.value.as_bytes()) else {
            return self.reply(tag, "BAD", None, "Mailbox name expected").await;
        };
        self.selection_lost = false;
        let place = self.place(name).await;
        let (i, bname) = match place {
            Place::On(i, n) => (i, n),
            other => {
                // A failed SELECT leaves no mailbox selected (RFC 3501).
                self.deselect().await?;
                return self.refuse_place(tag, other).await;
            }
        };
        if self.selected.is_some_and(|s| s != i) {
            self.deselect().await?;
            // The new backend had nothing selected, so it will not say this itself (RFC 7162).
            if self.enabled.iter().any(|e| {
                e.split(u8::is_ascii_whitespace)
                    .any(|w| w.eq_ignore_ascii_case(b"QRESYNC"))
            }) {
                self.client
                    .write(b"* OK [CLOSED] Previous mailbox closed\r\n")
                    .await
                    .map_err(|_| End::ClientGone)?;
            }
        }
        let cmd = if i == 0 {
            cmd.to_vec()
        } else {
            replace_args(cmd, &[(&items[0], bname)])
        };
        let st = self
            .exec_raw(
                i,
                &cmd,
                tag,
                literals || i != 0 && needs_literal(&cmd),
                Updates::Deliver,
            )
            .await?;
        self.selected = (st == Some(Status::Ok)).then_some(i);
        Ok(())
    }

    /// Closes the selected mailbox on its backend without expunging and without telling the
    /// client anything: its updates must not reach the client any more.
    pub(super) async fn deselect(&mut self) -> Step {
        let Some(i) = self.selected.take() else {
            return Ok(());
        };
        let Some(conn) = self.up(i) else {
            return Ok(());
        };
        let t = conn.tag();
        let line = if conn.has("UNSELECT") {
            format!("{t} UNSELECT\r\n")
        } else {
            // Without UNSELECT, a failing EXAMINE deselects without expunging (RFC 3501).
            format!("{t} EXAMINE \"\"\r\n")
        };
        if conn.wire.write(line.as_bytes()).await.is_err()
            || read_until_quiet(conn, &t).await.is_err()
        {
            self.conn_failed(i)?;
        }
        Ok(())
    }

    pub(super) async fn refuse_place(&mut self, tag: &[u8], place: Place) -> Step {
        match place {
            Place::On(..) => Ok(()),
            Place::MountPoint => {
                self.reply(
                    tag,
                    "NO",
                    Some("NONEXISTENT"),
                    "A mount point is not a mailbox",
                )
                .await
            }
            Place::Referral(url) => {
                self.reply(
                    tag,
                    "NO",
                    Some(&format!("REFERRAL {url}")),
                    "Remote mailbox",
                )
                .await
            }
            Place::Unavailable => self.unavailable(tag).await,
            Place::Refused(u) => {
                let code = match u {
                    Untranslatable::MountedInbox => "NONEXISTENT",
                    _ => "CANNOT",
                };
                self.reply(tag, "NO", Some(code), &u.text()).await
            }
        }
    }

    /// A command whose mailbox arguments (at `idx`) decide where it goes.
    pub(super) async fn mailbox_command(
        &mut self,
        tag: &[u8],
        cmd: &[u8],
        items: &[Item<'_>],
        idx: &[usize],
        literals: bool,
    ) -> Step {
        let mut target: Option<usize> = None;
        let mut edits = Vec::new();
        for &k in idx {
            let Some(item) = items.get(k) else {
                return self.reply(tag, "BAD", None, "Mailbox name expected").await;
            };
            let Some(name) = item.value.as_bytes() else {
                return self.reply(tag, "BAD", None, "Mailbox name expected").await;
            };
            match self.place(name).await {
                Place::On(i, bname) => {
                    if target.is_some_and(|t| t != i) {
                        return self
                            .reply(
                                tag,
                                "NO",
                                Some("CANNOT"),
                                "Cannot rename a mailbox to another server",
                            )
                            .await;
                    }
                    target = Some(i);
                    if i != 0 {
                        edits.push((item, bname));
                    }
                }
                other => return self.refuse_place(tag, other).await,
            }
        }
        let i = target.unwrap_or(0);
        let cmd = if edits.is_empty() {
            cmd.to_vec()
        } else {
            replace_args(cmd, &edits)
        };
        let literals = literals || needs_literal(&cmd);
        let updates = self.updates_for(i);
        self.exec_raw(i, &cmd, tag, literals, updates)
            .await
            .map(drop)
    }

    pub(super) async fn quota_command(
        &mut self,
        tag: &[u8],
        cmd: &[u8],
        items: &[Item<'_>],
        literals: bool,
    ) -> Step {
        let Some(root) = items.first().and_then(|i| i.value.as_bytes()) else {
            return self.reply(tag, "BAD", None, "Quota root expected").await;
        };
        let (i, broot) = self.quota_root_place(root);
        if i != 0 && !self.ensure(i).await {
            return self.unavailable(tag).await;
        }
        let cmd = if i == 0 {
            cmd.to_vec()
        } else {
            replace_args(cmd, &[(&items[0], broot)])
        };
        let updates = self.updates_for(i);
        self.exec_raw(i, &cmd, tag, literals || needs_literal(&cmd), updates)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_arguments_by_range() {
        let msg = b"a RENAME Shared/x \"Shared/y z\"\r\n";
        let items = args::parse(msg, 9).unwrap();
        let out = replace_args(
            msg,
            &[(&items[1], b"P.y z".to_vec()), (&items[0], b"P.x".to_vec())],
        );
        assert_eq!(out, b"a RENAME \"P.x\" \"P.y z\"\r\n");
    }
}
