//! The relay for a session whose mailboxes live on several servers ("murder" mode): the home
//! backend plus the user's mounts. Unlike the single-backend relay, commands are read one at
//! a time, routed by the mailbox they name, and answered before the next is read; mailbox
//! names are translated both ways, LIST/LSUB/RLIST/RLSUB and NAMESPACE are merged
//! ([`list`], [`namespace`]), and COPY/MOVE between servers is done by the gateway
//! ([`copy`]). Message data (APPEND and FETCH literals) still streams through in constant
//! memory.

mod append;
mod command;
mod conn;
mod copy;
mod exec;
mod list;
mod list_entry;
mod mailbox;
mod merge;
mod names;
mod namespace;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use self::command::{CommandError, CommandReader, Incoming};
use self::conn::{BackendSlot, Conn, Slot, discover_delimiter, read_until_quiet};
use self::exec::is_bye;
use self::mailbox::{
    Place, mailbox_arg_of_extension, needs_literal, replace_args, routes_by_arguments,
};
use self::wire::{ForwardError, Wire, WireError};
use super::{RelayContext, RelayEnd, RelayError, RelayOptions};
use crate::proto::args::{self};
use crate::proto::capability::{self, Capabilities};
use crate::proto::framer::FrameError;
use crate::proto::prescan::{CommandName, prescan, tag_of};
use crate::proto::response::{Status, status};
use crate::route::{Backend, Mount, MountTarget, Route};
use crate::stream::Stream;

/// A mounted backend that could not be reached is left alone this long before the next
/// command that needs it tries again, so a dead server does not slow every command down.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Largest response the gateway holds whole to rewrite (LIST, STATUS, NAMESPACE, ...). Such
/// responses are a line of names; a bigger one is a broken or hostile server.
const MAX_REWRITTEN: usize = 1 << 20;
/// Longest client tag accepted with mounts. Responses are classified on their first
/// [`crate::proto::framer::HEAD_LEN`] bytes, which must hold the tag; real clients use a few
/// characters.
const MAX_TAG: usize = 64;
/// Capabilities remembered from ENABLE and replayed on connections opened later; there are a
/// handful of enable-able extensions, so more is a client repeating itself.
const MAX_ENABLED: usize = 16;
/// Read size for the client and the backends.
const READ: usize = 16 * 1024;

/// A backend connection, logged in, as the session gets it from its [`Connector`].
pub struct Connected {
    pub stream: Stream,
    pub leftover: Vec<u8>,
    pub capabilities: Capabilities,
}

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Connected, String>> + Send + 'a>>;

/// Opens and logs in a connection to a mounted backend with the session's credentials.
pub trait Connector: Send + Sync {
    fn connect<'a>(&'a self, backend: &'a Backend) -> ConnectFuture<'a>;
}

/// How a session with mounts ended, before it is mapped to [`RelayEnd`].
#[derive(Debug)]
enum End {
    ClientGone,
    HomeLost,
    HomeBye,
    /// A backend (home or mounted) went away in the middle of a response to the client: the
    /// client holds a cut message, so the session ends without another word to it.
    Cut,
    Client(RelayError),
    /// A stop (shutdown, kick) was asked and the session is at a safe point.
    Stopped,
    /// The client sent nothing for `autologout` (see [`super::AUTOLOGOUT_BYE`]).
    Autologout,
}

impl From<WireError> for End {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Frame(f) => End::Client(RelayError::ClientFrame(f)),
            WireError::TooLong(limit) => {
                End::Client(RelayError::ClientFrame(FrameError::MessageTooLong {
                    limit,
                }))
            }
            WireError::Closed | WireError::Io(_) => End::ClientGone,
            WireError::Quiet(_) => End::Autologout,
        }
    }
}

impl From<CommandError> for End {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Wire(w) => w.into(),
            CommandError::TooLong => {
                End::Client(RelayError::ClientFrame(FrameError::MessageTooLong {
                    limit: 0,
                }))
            }
        }
    }
}

/// The client wire's own read limit is the autologout plus this, so that where the session
/// waits with a timer of its own (between commands, in IDLE: it ends IDLE with DONE first)
/// that timer fires first; the wire's limit catches the waits that have none (inside a
/// streamed APPEND literal).
const QUIET_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

type Step<T = ()> = Result<T, End>;

/// Whether an answer's untagged mailbox updates (EXISTS, FETCH, EXPUNGE, ...) reach the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Updates {
    Deliver,
    Drop,
}

struct Murder<'a> {
    client: Wire,
    reader: CommandReader,
    conns: Vec<BackendSlot>,
    mounts: Vec<Arc<Mount>>,
    /// The conn index of each mount (None for referrals).
    mount_conn: Vec<Option<usize>>,
    /// The client's (and home's) hierarchy delimiter.
    delim: u8,
    /// The conn holding the selected mailbox.
    selected: Option<usize>,
    /// The selected mailbox's server went away: commands on it fail until the client selects
    /// (or closes) a mailbox again.
    selection_lost: bool,
    /// Capabilities the client enabled, replayed on connections opened later.
    enabled: Vec<Vec<u8>>,
    caps: String,
    connector: &'a dyn Connector,
    opts: &'a RelayOptions,
    ctx: &'a RelayContext,
}

/// Relays a session with mounts until it ends. `home` is the logged-in home backend.
pub async fn run(
    client: Stream,
    client_ahead: Vec<u8>,
    route: Route,
    home: Connected,
    connector: &dyn Connector,
    opts: &RelayOptions,
    ctx: &RelayContext,
) -> RelayEnd {
    let Route {
        home: home_backend,
        mounts,
    } = route;
    let mut conns = vec![BackendSlot {
        backend: home_backend,
        slot: Slot::Idle,
    }];
    let mut mount_conn = Vec::with_capacity(mounts.len());
    // One connection per mount, even when two mounts (or a mount and home) are on the same
    // server: each connection then has one translation of names and its own selection.
    for m in &mounts {
        mount_conn.push(match &m.target {
            MountTarget::Referral(_) => None,
            MountTarget::Backend { backend, .. } => {
                conns.push(BackendSlot {
                    backend: Arc::clone(backend),
                    slot: Slot::Idle,
                });
                Some(conns.len() - 1)
            }
        });
    }
    let caps = capability::post_login_mounts(&home.capabilities);
    let mut home_conn = Conn::new(
        Wire::new(home.stream, home.leftover, opts.max_backend_line)
            .counted(ctx.counters.backend_to_client.clone()),
        home.capabilities,
    );
    let mut s = Murder {
        client: Wire::new(client, client_ahead, opts.max_command_line)
            .counted(ctx.counters.client_to_backend.clone())
            .quiet_after(opts.autologout.saturating_add(QUIET_SLACK)),
        reader: CommandReader::new(opts.max_command_line, opts.max_literal),
        conns,
        mounts,
        mount_conn,
        delim: b'/',
        selected: None,
        selection_lost: false,
        enabled: Vec::new(),
        caps,
        connector,
        opts,
        ctx,
    };
    let end = match discover_delimiter(&mut home_conn).await {
        Ok(d) => {
            // A flat home namespace has no levels to mount under; "/" keeps mounts usable.
            s.delim = d.unwrap_or(b'/');
            s.conns[0].slot = Slot::Up(Box::new(home_conn));
            s.serve().await
        }
        Err(_) => End::HomeLost,
    };
    s.finish(end).await
}

impl Murder<'_> {
    async fn finish(&mut self, end: End) -> RelayEnd {
        match end {
            End::ClientGone => {
                self.logout_all().await;
                RelayEnd::ClientGone
            }
            End::HomeBye => {
                self.logout_all().await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::BackendBye
            }
            End::HomeLost => {
                self.logout_all().await;
                let _ = self
                    .client
                    .write(b"* BYE [UNAVAILABLE] Backend connection lost\r\n")
                    .await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::BackendLost
            }
            End::Autologout => {
                self.logout_all().await;
                let _ = self.client.write(super::AUTOLOGOUT_BYE).await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::Autologout
            }
            End::Cut => {
                self.logout_all().await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::BackendLost
            }
            End::Stopped => {
                self.logout_all().await;
                let reason = self.ctx.stop.reason();
                let _ = self.client.write(reason.bye()).await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::Stopped(reason)
            }
            End::Client(e) => {
                self.logout_all().await;
                let text: &[u8] = match &e {
                    RelayError::ClientFrame(FrameError::LineTooLong { .. }) => {
                        b"* BYE [TOOBIG] Command line too long\r\n"
                    }
                    RelayError::ClientFrame(FrameError::LiteralTooLarge { .. }) => {
                        b"* BYE [TOOBIG] Literal too large\r\n"
                    }
                    _ => b"* BYE [TOOBIG] Command too long\r\n",
                };
                let _ = self.client.write(text).await;
                let _ = self.client.stream.shutdown().await;
                RelayEnd::Error(e)
            }
        }
    }

    /// Logs out of every open backend (the client is gone or done), briefly waiting for each.
    async fn logout_all(&mut self) {
        let wait = self.opts.backend_logout;
        for slot in &mut self.conns {
            if let Slot::Up(conn) = &mut slot.slot
                && !conn.mid_command
            {
                let tag = conn.tag();
                let _ = tokio::time::timeout(wait, async {
                    if conn
                        .wire
                        .write(format!("{tag} LOGOUT\r\n").as_bytes())
                        .await
                        .is_ok()
                    {
                        while conn.wire.forward::<Stream>(None).await.is_ok() {}
                    }
                })
                .await;
            }
            if let Slot::Up(conn) = &mut slot.slot {
                let _ = conn.wire.stream.shutdown().await;
            }
            slot.slot = Slot::Idle;
        }
    }

    async fn serve(&mut self) -> End {
        loop {
            // Between two commands, every answer given: a safe point to stop at.
            if self.ctx.stop.is_requested() {
                return End::Stopped;
            }
            if let Err(end) = self.wait_for_command().await {
                return end;
            }
            // A command begun and not finished within the timer: the client is as idle as
            // one that sends nothing (a large APPEND's literal is streamed later, not here).
            let next =
                tokio::time::timeout(self.opts.autologout, self.reader.next(&mut self.client));
            let incoming = match next.await {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => return e.into(),
                Err(_) => return End::Autologout,
            };
            let step = match incoming {
                Incoming::Whole { cmd, literals } => self.command(cmd, literals).await,
                Incoming::Big { head, literal } => self.big_command(head, literal).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Waits for the client's next command, passing on the selected mailbox's unsolicited
    /// updates (EXISTS, EXPUNGE, ...) in the meantime.
    async fn wait_for_command(&mut self) -> Step {
        // The previous command is answered: the client's silence counts from here.
        let due = super::after(tokio::time::Instant::now(), self.opts.autologout);
        while self.client.buffered().is_empty() {
            let watched = self.selected.unwrap_or(0);
            let Murder {
                client, conns, ctx, ..
            } = self;
            let Slot::Up(conn) = &mut conns[watched].slot else {
                tokio::select! {
                    r = client.fill(READ) => r?,
                    _ = ctx.stop.requested() => return Err(End::Stopped),
                    _ = tokio::time::sleep_until(due) => return Err(End::Autologout),
                }
                continue;
            };
            tokio::select! {
                _ = ctx.stop.requested() => return Err(End::Stopped),
                _ = tokio::time::sleep_until(due) => return Err(End::Autologout),
                r = client.fill(READ) => r?,
                r = conn.wire.fill(READ) => {
                    if r.is_err() {
                        self.conn_failed(watched)?;
                        continue;
                    }
                    self.pass_unsolicited(watched).await?;
                }
            }
        }
        Ok(())
    }

    /// Passes on what a backend sent while no command was running (mailbox updates of the
    /// selected mailbox). Streamed like any response, so its size does not matter.
    async fn pass_unsolicited(&mut self, i: usize) -> Step {
        loop {
            let Some(conn) = self.up(i) else {
                return Ok(());
            };
            if conn.wire.buffered().is_empty() {
                return Ok(());
            }
            let (bye, stray) = match conn.wire.head().await {
                // A tagged line outside any command answers nothing the client sent.
                Ok(head) => (
                    is_bye(head),
                    !head.starts_with(b"* ") && !head.starts_with(b"+"),
                ),
                Err(_) => return self.conn_failed(i),
            };
            if stray {
                if conn.wire.forward::<Stream>(None).await.is_err() {
                    return self.conn_failed(i);
                }
                continue;
            }
            if bye {
                let msg = conn.wire.whole(MAX_REWRITTEN).await.unwrap_or_default();
                if i == 0 {
                    self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
                    return Err(End::HomeBye);
                }
                return self.conn_failed(i);
            }
            let Murder { client, conns, .. } = self;
            let Slot::Up(conn) = &mut conns[i].slot else {
                return Ok(());
            };
            match conn
                .wire
                .forward_run(Some(&mut client.stream), |head| !is_bye(head))
                .await
            {
                Ok(()) => {}
                Err(ForwardError::Sink) => return Err(End::ClientGone),
                Err(ForwardError::Cut) => return Err(End::Cut),
                Err(ForwardError::Source) => return self.conn_failed(i),
            }
        }
    }

    async fn reply(&mut self, tag: &[u8], st: &str, code: Option<&str>, text: &str) -> Step {
        self.client
            .write(&status(tag, st, code, text))
            .await
            .map_err(|_| End::ClientGone)
    }

    /// Whether conn `i`'s mailbox updates reach the client: only the selected mailbox's do.
    pub(super) fn updates_for(&self, i: usize) -> Updates {
        if self.selected == Some(i) {
            Updates::Deliver
        } else {
            Updates::Drop
        }
    }

    /// Conn `i` failed during the command tagged `tag`: marks it down and tells the client.
    pub(super) async fn lost(&mut self, i: usize, tag: &[u8]) -> Step {
        self.conn_failed(i)?;
        self.unavailable(tag).await
    }

    async fn unavailable(&mut self, tag: &[u8]) -> Step {
        self.ctx.counters.mount_unavailable.inc();
        self.reply(
            tag,
            "NO",
            Some("UNAVAILABLE"),
            "The server holding this mailbox is not available now",
        )
        .await
    }

    /// One whole command from the client.
    async fn command(&mut self, cmd: Vec<u8>, literals: bool) -> Step {
        let Some(p) = prescan(&cmd) else {
            // Without a readable tag no backend answer could be matched to it.
            let tag = tag_of(&cmd).map_or(b"*".to_vec(), <[u8]>::to_vec);
            return self
                .reply(&tag, "BAD", None, "Command not understood")
                .await;
        };
        if p.tag.len() > MAX_TAG {
            return self.reply(b"*", "BAD", None, "Tag too long").await;
        }
        let tag = p.tag.to_vec();
        let name = p.name;
        self.ctx.counters.command(name);
        if matches!(
            name,
            CommandName::List
                | CommandName::Lsub
                | CommandName::Rlist
                | CommandName::Rlsub
                | CommandName::Namespace
                | CommandName::Compress
        ) {
            self.ctx.counters.intercepted(name);
        }
        let args_at = p.name_range.end + 1;
        let items = match args::parse(&cmd, args_at.min(cmd.len())) {
            Ok(items) => items,
            Err(_) if cmd.len() <= args_at => Vec::new(),
            // Commands that are only relayed do not need their arguments read: the backend
            // judges them.
            Err(_)
                if !routes_by_arguments(
                    name,
                    &cmd[p.name_range.clone()],
                    &cmd[args_at.min(cmd.len())..],
                ) =>
            {
                let i = self.selected.unwrap_or(0);
                return self
                    .exec_on_selected(i, &cmd, &tag, literals)
                    .await
                    .map(drop);
            }
            Err(_) => {
                return self.reply(&tag, "BAD", None, "Invalid arguments").await;
            }
        };
        match name {
            CommandName::Capability => {
                let line = format!("* CAPABILITY {}\r\n", self.caps);
                self.client
                    .write(line.as_bytes())
                    .await
                    .map_err(|_| End::ClientGone)?;
                self.reply(&tag, "OK", None, "Capability completed").await
            }
            CommandName::Logout => self.logout(&tag, &cmd).await,
            CommandName::Compress => {
                self.reply(
                    &tag,
                    "NO",
                    Some("CANNOT"),
                    "COMPRESS is not available through this gateway",
                )
                .await
            }
            CommandName::Enable => self.enable(&tag, &cmd, &items).await,
            CommandName::Namespace => self.namespace(&tag).await,
            CommandName::List | CommandName::Lsub | CommandName::Rlist | CommandName::Rlsub => {
                self.list(&tag, name, &items).await
            }
            CommandName::Idle => self.idle(&tag, &cmd).await,
            CommandName::Select | CommandName::Examine => {
                self.select(&tag, &cmd, &items, literals).await
            }
            CommandName::Close | CommandName::Unselect if self.selection_lost => {
                // Its server is gone, and so is the selection.
                self.selection_lost = false;
                self.reply(&tag, "OK", None, "Mailbox closed").await
            }
            CommandName::Close | CommandName::Unselect => {
                let i = self.selected.unwrap_or(0);
                let st = self.exec_on_selected(i, &cmd, &tag, literals).await?;
                if st == Some(Status::Ok) {
                    self.selected = None;
                }
                Ok(())
            }
            CommandName::Copy | CommandName::Move => {
                let mv = name == CommandName::Move;
                self.copy(&tag, &cmd, &items, mv, false, literals).await
            }
            CommandName::Uid => {
                let sub = items
                    .first()
                    .and_then(|i| i.value.as_bytes())
                    .unwrap_or(b"");
                if sub.eq_ignore_ascii_case(b"COPY") || sub.eq_ignore_ascii_case(b"MOVE") {
                    let mv = sub.eq_ignore_ascii_case(b"MOVE");
                    self.copy(&tag, &cmd, &items, mv, true, literals).await
                } else {
                    let i = self.selected.unwrap_or(0);
                    self.exec_on_selected(i, &cmd, &tag, literals)
                        .await
                        .map(drop)
                }
            }
            CommandName::Create
            | CommandName::Delete
            | CommandName::Subscribe
            | CommandName::Unsubscribe
            | CommandName::Status
            | CommandName::Append
            | CommandName::GetQuotaRoot => {
                self.mailbox_command(&tag, &cmd, &items, &[0], literals)
                    .await
            }
            CommandName::Rename => {
                self.mailbox_command(&tag, &cmd, &items, &[0, 1], literals)
                    .await
            }
            CommandName::GetQuota | CommandName::SetQuota => {
                self.quota_command(&tag, &cmd, &items, literals).await
            }
            // XLIST (an old Gmail extension some servers still answer) lists like LIST.
            CommandName::Other if cmd[p.name_range.clone()].eq_ignore_ascii_case(b"XLIST") => {
                self.list(&tag, CommandName::List, &items).await
            }
            CommandName::Other => {
                let word = &cmd[p.name_range.clone()];
                match mailbox_arg_of_extension(word, &items) {
                    Some(idx) => {
                        self.mailbox_command(&tag, &cmd, &items, &[idx], literals)
                            .await
                    }
                    None => {
                        let i = self.selected.unwrap_or(0);
                        self.exec_on_selected(i, &cmd, &tag, literals)
                            .await
                            .map(drop)
                    }
                }
            }
            _ => {
                let i = self.selected.unwrap_or(0);
                self.exec_on_selected(i, &cmd, &tag, literals)
                    .await
                    .map(drop)
            }
        }
    }

    async fn logout(&mut self, tag: &[u8], cmd: &[u8]) -> Step {
        for i in 1..self.conns.len() {
            if let Slot::Up(conn) = &mut self.conns[i].slot {
                let t = conn.tag();
                let _ = conn.wire.write(format!("{t} LOGOUT\r\n").as_bytes()).await;
                let _ = tokio::time::timeout(self.opts.backend_logout, read_until_quiet(conn, &t))
                    .await;
                let _ = conn.wire.stream.shutdown().await;
                self.conns[i].slot = Slot::Idle;
            }
        }
        self.exec_raw(0, cmd, tag, false, Updates::Deliver).await?;
        Err(End::HomeBye)
    }

    async fn enable(&mut self, tag: &[u8], cmd: &[u8], items: &[args::Item<'_>]) -> Step {
        let st = self.exec_raw(0, cmd, tag, false, Updates::Deliver).await?;
        if st != Some(Status::Ok) {
            return Ok(());
        }
        let mut fresh = Vec::new();
        for atom in items.iter().filter_map(|i| match &i.value {
            args::Value::Atom(a) => Some(*a),
            _ => None,
        }) {
            let known = self.enabled.iter().any(|e| e.eq_ignore_ascii_case(atom));
            if !known && self.enabled.len() < MAX_ENABLED {
                self.enabled.push(atom.to_vec());
                fresh.push(atom.to_vec());
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let line = names::join(fresh.iter().map(Vec::as_slice), b' ');
        for i in 1..self.conns.len() {
            if self.up(i).is_none() {
                continue;
            }
            if !self.internal(i, b"ENABLE", &line).await? {
                self.conn_failed(i)?;
            }
        }
        Ok(())
    }

    /// Runs a command of the gateway's own on conn `i`; its answer is dropped, except the
    /// selected mailbox's updates, which reach the client. False when the connection failed.
    async fn internal(&mut self, i: usize, name: &[u8], args: &[u8]) -> Step<bool> {
        let Some(conn) = self.up(i) else {
            return Ok(false);
        };
        let t = conn.tag();
        let mut line = format!("{t} ").into_bytes();
        line.extend_from_slice(name);
        if !args.is_empty() {
            line.push(b' ');
            line.extend_from_slice(args);
        }
        line.extend_from_slice(b"\r\n");
        if conn.wire.write(&line).await.is_err() {
            return Ok(false);
        }
        let Ok(answer) = self.collect(i, &t).await else {
            return Ok(false);
        };
        self.pass_updates(i, answer.untagged()).await?;
        Ok(true)
    }

    /// Writes the untagged responses of an internal command that are updates of the selected
    /// mailbox (those of any other connection are dropped).
    pub(super) async fn pass_updates<'m>(
        &mut self,
        i: usize,
        untagged: impl Iterator<Item = &'m [u8]>,
    ) -> Step {
        if self.selected != Some(i) {
            return Ok(());
        }
        for msg in untagged {
            let word = args::head(msg).map(|(_, w, _)| w.to_ascii_uppercase());
            let update = word.as_deref().is_some_and(|w| {
                w.first().is_some_and(u8::is_ascii_digit)
                    || matches!(w, b"FLAGS" | b"VANISHED" | b"OK" | b"NO")
            });
            if update {
                self.client.write(msg).await.map_err(|_| End::ClientGone)?;
            }
        }
        Ok(())
    }

    async fn idle(&mut self, tag: &[u8], cmd: &[u8]) -> Step {
        if self.selection_lost {
            return self.unavailable(tag).await;
        }
        let i = self.selected.unwrap_or(0);
        let Some(conn) = self.up(i) else {
            return self.unavailable(tag).await;
        };
        if conn.wire.write(cmd).await.is_err() {
            return self.lost(i, tag).await;
        }
        // The IDLE resets the autologout timer, and so do any bytes from the client; an IDLE
        // held past it without DONE ends the session (RFC 2177 has clients re-issue it).
        let mut due = super::after(tokio::time::Instant::now(), self.opts.autologout);
        // Until the client says DONE, pass on whatever the backend sends.
        loop {
            if let Some(pos) = memchr::memchr(b'\n', self.client.buffered()) {
                let line = self.client.buffered()[..=pos].to_vec();
                self.client.consume(pos + 1);
                let Some(conn) = self.up(i) else {
                    return self.unavailable(tag).await;
                };
                if conn.wire.write(&line).await.is_err() {
                    return self.lost(i, tag).await;
                }
                return self.relay_answer(i, tag, Updates::Deliver).await.map(drop);
            }
            if self.client.buffered().len() > self.opts.max_command_line {
                return Err(End::Client(RelayError::ClientFrame(
                    FrameError::LineTooLong {
                        limit: self.opts.max_command_line,
                    },
                )));
            }
            let Some(conn) = self.up(i) else {
                return self.unavailable(tag).await;
            };
            if !conn.wire.buffered().is_empty() {
                // A response has begun: take it whole when it is the end of IDLE (tagged) or
                // the server leaving (BYE), else stream it and whatever follows like it.
                let (tagged, bye) = match conn.wire.head().await {
                    Ok(head) => (
                        args::head(head).is_some_and(|(t, _, _)| t == tag),
                        is_bye(head),
                    ),
                    Err(_) => {
                        return self.lost(i, tag).await;
                    }
                };
                if tagged {
                    return self.relay_answer(i, tag, Updates::Deliver).await.map(drop);
                }
                if bye && i != 0 {
                    return self.lost(i, tag).await;
                }
                let Murder { client, conns, .. } = self;
                let Slot::Up(conn) = &mut conns[i].slot else {
                    return self.unavailable(tag).await;
                };
                let more = |h: &[u8]| !is_bye(h) && args::head(h).is_some_and(|(t, _, _)| t != tag);
                match conn.wire.forward_run(Some(&mut client.stream), more).await {
                    Ok(()) => continue,
                    Err(ForwardError::Sink) => return Err(End::ClientGone),
                    Err(ForwardError::Cut) => return Err(End::Cut),
                    Err(ForwardError::Source) => {
                        return self.lost(i, tag).await;
                    }
                }
            }
            let Murder {
                client, conns, ctx, ..
            } = self;
            let Slot::Up(conn) = &mut conns[i].slot else {
                return self.unavailable(tag).await;
            };
            tokio::select! {
                r = client.fill(READ) => {
                    r?;
                    due = super::after(tokio::time::Instant::now(), self.opts.autologout);
                }
                r = conn.wire.fill(READ) => {
                    if r.is_err() {
                        return self.lost(i, tag).await;
                    }
                }
                _ = tokio::time::sleep_until(due) => {
                    // As for a stop: DONE first, so the backend takes the LOGOUT.
                    if conn.wire.write(b"DONE\r\n").await.is_err() {
                        self.conn_failed(i)?;
                    }
                    return Err(End::Autologout);
                }
                _ = ctx.stop.requested() => {
                    // Ends the IDLE so the backend takes the LOGOUT that follows as a
                    // command; its answer to the IDLE is read and dropped with the logout.
                    if conn.wire.write(b"DONE\r\n").await.is_err() {
                        self.conn_failed(i)?;
                    }
                    return Err(End::Stopped);
                }
            }
        }
    }
}
