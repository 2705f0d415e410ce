//! An APPEND whose message is too big to hold: routed on the part of the command read so far,
//! then streamed to the backend (the backend's `+` relayed for synchronizing literals).

use super::RelayError;
use super::conn::Slot;
use super::exec::Kind;
use super::mailbox::{Place, replace_args};
use super::wire::ForwardError;
use super::{End, Murder, READ, Step, Updates};
use crate::proto::args;
use crate::proto::framer::{Literal, Piece};
use crate::proto::prescan::{CommandName, prescan};

/// Where the literal announcement at the end of a command head starts.
pub(super) fn announcement_start(head: &[u8]) -> usize {
    match memchr::memrchr(b'{', head) {
        Some(p) if p > 0 && head[p - 1] == b'~' => p - 1,
        Some(p) => p,
        None => head.len(),
    }
}

impl Murder<'_> {
    /// A command with a literal too big to hold: only APPEND may have one; its message is
    /// streamed to the backend that holds the mailbox.
    pub(super) async fn big_command(&mut self, head: Vec<u8>, literal: Literal) -> Step {
        let p = prescan(&head);
        let tag = p.as_ref().map(|p| p.tag.to_vec()).unwrap_or_default();
        let is_append = p.as_ref().is_some_and(|p| p.name == CommandName::Append);
        if let Some(p) = &p {
            self.ctx.counters.command(p.name);
        }
        let args_at = p.as_ref().map_or(head.len(), |p| p.name_range.end + 1);
        // Everything before the literal's announcement, parsed as a line of its own.
        let ann = announcement_start(&head);
        let mut line = head[..ann].trim_ascii_end().to_vec();
        line.extend_from_slice(b"\r\n");
        let items = args::parse(&line, args_at.min(line.len())).unwrap_or_default();
        let name = items.first().and_then(|i| i.value.as_bytes());
        let place = match (is_append, name) {
            (true, Some(name)) => self.place(name).await,
            _ => {
                self.reader
                    .skip_rest(&mut self.client, literal.sync)
                    .await?;
                if tag.is_empty() {
                    return self
                        .reply(b"*", "BAD", None, "Command not understood")
                        .await;
                }
                return self
                    .reply(
                        &tag,
                        "NO",
                        Some("TOOBIG"),
                        "Literal too large for this command",
                    )
                    .await;
            }
        };
        let Place::On(i, bname) = place else {
            self.reader
                .skip_rest(&mut self.client, literal.sync)
                .await?;
            return self.refuse_place(&tag, place).await;
        };
        let plus = self.up(i).is_some_and(|c| c.has("LITERAL+"));
        if !literal.sync && !plus {
            self.reader.skip_rest(&mut self.client, false).await?;
            return self
                .reply(
                    &tag,
                    "NO",
                    Some("CANNOT"),
                    "Use a synchronizing literal for this mailbox",
                )
                .await;
        }
        let head = if i == 0 {
            head
        } else {
            replace_args(&head, &[(&items[0], bname)])
        };
        let updates = self.updates_for(i);
        let Some(conn) = self.up(i) else {
            self.reader
                .skip_rest(&mut self.client, literal.sync)
                .await?;
            return self.unavailable(&tag).await;
        };
        if conn.wire.write(&head).await.is_err() {
            self.conn_failed(i)?;
            self.reader
                .skip_rest(&mut self.client, literal.sync)
                .await?;
            return self.unavailable(&tag).await;
        }
        conn.mid_command = true;
        if literal.sync && !self.await_continuation(i, &tag, updates).await? {
            self.reader.abandon();
            self.command_done(i);
            return Ok(());
        }
        self.stream_rest(i, &tag, updates).await
    }

    /// The command streamed to conn `i` is complete (or was refused before its literal).
    fn command_done(&mut self, i: usize) {
        if let Some(conn) = self.up(i) {
            conn.mid_command = false;
        }
    }

    /// After a synchronizing literal's announcement went to conn `i`: relays the backend's
    /// `+` (true) or its refusal (false; the client gets it and will not send the literal).
    pub(super) async fn await_continuation(
        &mut self,
        i: usize,
        tag: &[u8],
        updates: Updates,
    ) -> Step<bool> {
        loop {
            let kind = match self.next_kind(i, tag, updates).await {
                Ok(k) => k,
                Err(()) => {
                    self.lost(i, tag).await?;
                    return Ok(false);
                }
            };
            let Murder { client, conns, .. } = self;
            let Slot::Up(conn) = &mut conns[i].slot else {
                return Ok(false);
            };
            match kind {
                Kind::Continuation => {
                    match conn.wire.forward(Some(&mut client.stream)).await {
                        Ok(()) => return Ok(true),
                        Err(ForwardError::Sink) => return Err(End::ClientGone),
                        Err(ForwardError::Cut) => return Err(End::Cut),
                        Err(ForwardError::Source) => {
                            // The client got no `+`, so it sends no literal.
                            self.lost(i, tag).await?;
                            return Ok(false);
                        }
                    }
                }
                Kind::Tagged | Kind::Bye => {
                    self.relay_answer(i, tag, updates).await?;
                    return Ok(false);
                }
                _ => {
                    let out = (kind == Kind::Pass).then_some(&mut client.stream);
                    if let Err(e) = conn.wire.forward(out).await {
                        match e {
                            ForwardError::Sink => return Err(End::ClientGone),
                            ForwardError::Cut => return Err(End::Cut),
                            ForwardError::Source => {}
                        }
                        self.lost(i, tag).await?;
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Streams the rest of the client's command (literal data and further lines) to conn
    /// `i`, then relays the answer.
    pub(super) async fn stream_rest(&mut self, i: usize, tag: &[u8], updates: Updates) -> Step {
        loop {
            if self.reader.framer.at_message_start() {
                self.command_done(i);
                return self.relay_answer(i, tag, updates).await.map(drop);
            }
            if self.client.buffered().is_empty() {
                self.client.fill(READ).await?;
            }
            let piece = self
                .reader
                .framer
                .next(self.client.buffered())
                .map_err(|e| End::Client(RelayError::ClientFrame(e)))?;
            let (len, sync) = match piece {
                Piece::Line { len, literal, .. } => (len, literal.is_some_and(|l| l.sync)),
                Piece::LiteralData { len, .. } => (len, false),
            };
            let Murder { client, conns, .. } = self;
            let written = match &mut conns[i].slot {
                Slot::Up(conn) => conn.wire.write(&client.buffered()[..len]).await.is_ok(),
                _ => false,
            };
            self.client.consume(len);
            if !written {
                // The backend is gone: the rest of the client's command is read and dropped
                // (a synchronizing literal it was not invited to send never comes), then the
                // client is told. The home backend ends the session instead.
                self.conn_failed(i)?;
                if sync {
                    self.reader.abandon();
                } else {
                    self.reader.skip_rest(&mut self.client, false).await?;
                }
                return self.unavailable(tag).await;
            }
            if sync && !self.await_continuation(i, tag, updates).await? {
                self.reader.abandon();
                self.command_done(i);
                return Ok(());
            }
        }
    }
}
