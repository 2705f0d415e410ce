//! Running one command on one backend and relaying its answer: untagged responses are
//! passed on, translated (mailbox names of a mounted backend) or dropped (another backend's
//! mailbox updates), and the tagged answer ends it.

use super::conn::Slot;
use super::wire::ForwardError;
use super::{End, MAX_REWRITTEN, Murder, Step, Updates};
use crate::proto::args::{self, LiteralForm};
use crate::proto::response::{Status, parse_status_line};

/// What to do with a backend response, by its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Tagged,
    Continuation,
    Bye,
    Rewrite,
    Pass,
    Drop,
}

pub(super) fn classify(head: &[u8], tag: &[u8], mounted: bool, updates: Updates) -> Kind {
    if head.starts_with(b"+") {
        return Kind::Continuation;
    }
    let Some((t, word, _)) = args::head(head) else {
        return Kind::Pass;
    };
    if t != b"*" {
        return if t == tag { Kind::Tagged } else { Kind::Drop };
    }
    let upper = word.to_ascii_uppercase();
    match upper.as_slice() {
        b"BYE" => Kind::Bye,
        b"FLAGS" | b"VANISHED" if updates == Updates::Drop => Kind::Drop,
        w if w.first().is_some_and(u8::is_ascii_digit) && updates == Updates::Drop => Kind::Drop,
        b"STATUS" | b"QUOTAROOT" | b"QUOTA" | b"ACL" | b"LISTRIGHTS" | b"MYRIGHTS"
        | b"METADATA" | b"LIST" | b"LSUB"
            if mounted =>
        {
            Kind::Rewrite
        }
        _ => Kind::Pass,
    }
}

pub(super) fn is_bye(msg: &[u8]) -> bool {
    parse_status_line(msg).is_some_and(|s| s.tag == "*" && s.status == Status::Bye)
}

impl Murder<'_> {
    /// Runs a command on the selected mailbox's backend (or home when none is selected).
    pub(super) async fn exec_on_selected(
        &mut self,
        i: usize,
        cmd: &[u8],
        tag: &[u8],
        literals: bool,
    ) -> Step<Option<Status>> {
        if self.selection_lost || self.up(i).is_none() {
            self.unavailable(tag).await?;
            return Ok(None);
        }
        self.exec_raw(i, cmd, tag, literals, Updates::Deliver).await
    }

    /// Sends `cmd` (tagged `tag`, the client's) to conn `i` and relays the answer. Returns the
    /// tagged status, or None when the backend failed (the client was told).
    pub(super) async fn exec_raw(
        &mut self,
        i: usize,
        cmd: &[u8],
        tag: &[u8],
        literals: bool,
        updates: Updates,
    ) -> Step<Option<Status>> {
        let Some(conn) = self.up(i) else {
            self.unavailable(tag).await?;
            return Ok(None);
        };
        if literals && !conn.has("LITERAL+") {
            self.reply(
                tag,
                "NO",
                Some("CANNOT"),
                "Literals are not supported for this mailbox",
            )
            .await?;
            return Ok(None);
        }
        if conn.wire.write(cmd).await.is_err() {
            self.lost(i, tag).await?;
            return Ok(None);
        }
        self.relay_answer(i, tag, updates).await
    }

    /// Relays conn `i`'s responses to the client until the one tagged `tag`.
    pub(super) async fn relay_answer(
        &mut self,
        i: usize,
        tag: &[u8],
        updates: Updates,
    ) -> Step<Option<Status>> {
        loop {
            let kind = match self.next_kind(i, tag, updates).await {
                Ok(k) => k,
                Err(()) => {
                    self.lost(i, tag).await?;
                    return Ok(None);
                }
            };
            match kind {
                Kind::Tagged => {
                    let Some(conn) = self.up(i) else {
                        return Ok(None);
                    };
                    let msg = match conn.wire.whole(MAX_REWRITTEN).await {
                        Ok(m) => m,
                        Err(_) => {
                            self.lost(i, tag).await?;
                            return Ok(None);
                        }
                    };
                    self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
                    return Ok(parse_status_line(&msg).map(|s| s.status));
                }
                Kind::Bye => {
                    let Some(conn) = self.up(i) else {
                        return Ok(None);
                    };
                    let msg = conn.wire.whole(MAX_REWRITTEN).await.unwrap_or_default();
                    if i == 0 {
                        self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
                        // The tagged answer may follow (LOGOUT); then the server closes.
                        continue;
                    }
                    self.lost(i, tag).await?;
                    return Ok(None);
                }
                Kind::Rewrite => {
                    let Some(conn) = self.up(i) else {
                        return Ok(None);
                    };
                    let msg = match conn.wire.whole(MAX_REWRITTEN).await {
                        Ok(m) => m,
                        Err(_) => {
                            self.lost(i, tag).await?;
                            return Ok(None);
                        }
                    };
                    if let Some(out) = self.rewrite_untagged(i, &msg) {
                        self.client.write(&out).await.map_err(|_| End::ClientGone)?;
                    }
                }
                Kind::Pass | Kind::Drop | Kind::Continuation => {
                    let Murder { client, conns, .. } = self;
                    let Slot::Up(conn) = &mut conns[i].slot else {
                        return Ok(None);
                    };
                    let out = (kind != Kind::Drop).then_some(&mut client.stream);
                    // Responses of the same kind that follow go out with this one.
                    let more = |head: &[u8]| {
                        kind != Kind::Continuation && classify(head, tag, i != 0, updates) == kind
                    };
                    match conn.wire.forward_run(out, more).await {
                        Ok(()) => {}
                        Err(ForwardError::Sink) => return Err(End::ClientGone),
                        Err(ForwardError::Cut) => return Err(End::Cut),
                        Err(ForwardError::Source) => {
                            self.lost(i, tag).await?;
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Classifies conn `i`'s next response by its head.
    pub(super) async fn next_kind(
        &mut self,
        i: usize,
        tag: &[u8],
        updates: Updates,
    ) -> Result<Kind, ()> {
        let Some(conn) = self.up(i) else {
            return Err(());
        };
        let head = conn.wire.head().await.map_err(drop)?;
        Ok(classify(head, tag, i != 0, updates))
    }

    /// Translates the mailbox names in an untagged response from a mounted backend.
    pub(super) fn rewrite_untagged(&self, i: usize, msg: &[u8]) -> Option<Vec<u8>> {
        let (_, word, off) = args::head(msg)?;
        let items = args::parse(msg, off).ok()?;
        let upper = word.to_ascii_uppercase();
        let mut edits: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::new();
        match upper.as_slice() {
            b"QUOTAROOT" => {
                let first = items.first()?;
                let name = self.client_name(i, first.value.as_bytes()?)?;
                edits.push((first.range.clone(), name));
                for root in &items[1..] {
                    let r = self.client_quota_root(i, root.value.as_bytes()?);
                    edits.push((root.range.clone(), r));
                }
            }
            b"QUOTA" => {
                let first = items.first()?;
                let r = self.client_quota_root(i, first.value.as_bytes()?);
                edits.push((first.range.clone(), r));
            }
            b"LIST" | b"LSUB" => {
                let item = items.get(2)?;
                let name = self.client_name(i, item.value.as_bytes()?)?;
                edits.push((item.range.clone(), name));
                if let Some(d) = items.get(1)
                    && !d.value.is_nil()
                {
                    edits.push((d.range.clone(), vec![self.delim]));
                }
            }
            _ => {
                let first = items.first()?;
                let name = self.client_name(i, first.value.as_bytes()?)?;
                edits.push((first.range.clone(), name));
            }
        }
        let mut out = Vec::with_capacity(msg.len() + 32);
        let mut at = 0;
        edits.sort_by_key(|(range, _)| range.start);
        for (range, value) in edits {
            out.extend_from_slice(&msg[at..range.start]);
            args::push_string(&mut out, &value, LiteralForm::Server);
            at = range.end;
        }
        out.extend_from_slice(&msg[at..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_responses() {
        use Updates::{Deliver, Drop};
        let cases: &[(&[u8], bool, Updates, Kind)] = &[
            (b"a1 OK done\r\n", true, Drop, Kind::Tagged),
            (b"+ go\r\n", true, Drop, Kind::Continuation),
            (b"* 3 EXISTS\r\n", true, Drop, Kind::Drop),
            (b"* 3 EXISTS\r\n", true, Deliver, Kind::Pass),
            (b"* STATUS x (MESSAGES 1)\r\n", true, Drop, Kind::Rewrite),
            (b"* STATUS x (MESSAGES 1)\r\n", false, Drop, Kind::Pass),
            (b"* BYE bye\r\n", false, Drop, Kind::Bye),
            (b"gw1 OK x\r\n", false, Drop, Kind::Drop),
        ];
        for &(head, mounted, updates, kind) in cases {
            assert_eq!(
                classify(head, b"a1", mounted, updates),
                kind,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
