//! The relay for a session whose mailboxes live on several servers ("murder" mode): the home
//! backend plus the user's mounts. Unlike the single-backend relay, commands are read one at
//! a time, routed by the mailbox they name, and answered before the next is read; mailbox
//! names are translated both ways, LIST/LSUB/RLIST/RLSUB and NAMESPACE are merged
//! ([`list`], [`namespace`]), and COPY/MOVE between servers is done by the gateway
//! ([`copy`]). Message data (APPEND and FETCH literals) still streams through in constant
//! memory.

mod command;
mod copy;
mod list;
mod names;
mod namespace;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, warn};

use self::command::{CommandError, CommandReader, Incoming};
use self::names::Untranslatable;
use self::wire::{ForwardError, Wire, WireError};
use super::{RelayEnd, RelayError, RelayOptions};
use crate::proto::args::{self, Item, LiteralForm, Value};
use crate::proto::capability;
use crate::proto::framer::{FrameError, Literal, Piece};
use crate::proto::prescan::{CommandName, prescan, tag_of};
use crate::proto::response::{Status, parse_status_line, status};
use crate::route::{Backend, Mount, MountTarget};
use crate::stream::Stream;

/// A mounted backend that could not be reached is left alone this long before the next
/// command that needs it tries again, so a dead server does not slow every command down.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Largest response the gateway holds whole to rewrite (LIST, STATUS, NAMESPACE, ...). Such
/// responses are a line of names; a bigger one is a broken or hostile server.
const MAX_REWRITTEN: usize = 1 << 20;
/// Read size for the client and the backends.
const READ: usize = 16 * 1024;

/// A backend connection, logged in, as the session gets it from its [`Connector`].
pub struct Connected {
    pub stream: Stream,
    pub leftover: Vec<u8>,
    pub capabilities: Vec<String>,
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
    Client(RelayError),
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

type Step<T = ()> = Result<T, End>;

struct Conn {
    wire: Wire,
    caps: Vec<String>,
    /// The backend's hierarchy delimiter (`LIST "" ""`), None for a flat namespace.
    delim: Option<u8>,
    next_tag: u32,
}

impl Conn {
    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("gwm{}", self.next_tag)
    }

    fn has(&self, cap: &str) -> bool {
        capability::has(&self.caps, cap)
    }
}

enum Slot {
    /// Not needed yet.
    Idle,
    Up(Box<Conn>),
    /// Failed at this time; see [`RETRY_AFTER`].
    Down(Instant),
}

struct BackendSlot {
    backend: Arc<Backend>,
    slot: Slot,
}

/// What a mailbox name in a command refers to.
enum Place {
    /// Conn index and the backend's name.
    On(usize, Vec<u8>),
    /// The mount point of a mount without a path: no mailbox on any server.
    MountPoint,
    Referral(String),
    Unavailable,
    Refused(Untranslatable),
}

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
    /// Arguments of the client's successful ENABLE commands, replayed on later connections.
    enabled: Vec<Vec<u8>>,
    caps: String,
    connector: &'a dyn Connector,
    opts: &'a RelayOptions,
}

/// Relays a session with mounts until it ends. `home` is the logged-in home backend.
pub async fn run(
    client: Stream,
    client_ahead: Vec<u8>,
    home_backend: Arc<Backend>,
    home: Connected,
    mounts: Vec<Arc<Mount>>,
    connector: &dyn Connector,
    opts: &RelayOptions,
) -> RelayEnd {
    let mut conns = vec![BackendSlot {
        backend: home_backend,
        slot: Slot::Idle,
    }];
    let mut mount_conn = Vec::with_capacity(mounts.len());
    for m in &mounts {
        mount_conn.push(match &m.target {
            MountTarget::Referral(_) => None,
            MountTarget::Backend { backend, .. } => Some(
                match conns.iter().position(|c| Arc::ptr_eq(&c.backend, backend)) {
                    Some(i) => i,
                    None => {
                        conns.push(BackendSlot {
                            backend: Arc::clone(backend),
                            slot: Slot::Idle,
                        });
                        conns.len() - 1
                    }
                },
            ),
        });
    }
    let caps = capability::post_login_mounts(&home.capabilities);
    let mut home_conn = Conn {
        wire: Wire::new(home.stream, home.leftover, opts.max_backend_line),
        caps: home.capabilities,
        delim: None,
        next_tag: 0,
    };
    let mut s = Murder {
        client: Wire::new(client, client_ahead, opts.max_command_line),
        reader: CommandReader::new(opts.max_command_line, opts.max_literal),
        conns,
        mounts,
        mount_conn,
        delim: b'/',
        selected: None,
        enabled: Vec::new(),
        caps,
        connector,
        opts,
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

/// Asks a freshly logged-in backend for its hierarchy delimiter.
async fn discover_delimiter(conn: &mut Conn) -> Result<Option<u8>, WireError> {
    let tag = conn.tag();
    conn.wire
        .write(format!("{tag} LIST \"\" \"\"\r\n").as_bytes())
        .await?;
    let mut delim = None;
    loop {
        let msg = conn.wire.whole(MAX_REWRITTEN).await?;
        if let Some((t, word, off)) = args::head(&msg) {
            if t == tag.as_bytes() {
                return Ok(delim);
            }
            if t == b"*"
                && word.eq_ignore_ascii_case(b"LIST")
                && let Ok(items) = args::parse(&msg, off)
                && let Some(d) = items.get(1).and_then(|i| i.value.as_bytes())
                && !items[1].value.is_nil()
            {
                delim = d.first().copied();
            }
        }
    }
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
            if let Slot::Up(conn) = &mut slot.slot {
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
                let _ = conn.wire.stream.shutdown().await;
            }
            slot.slot = Slot::Idle;
        }
    }

    async fn serve(&mut self) -> End {
        loop {
            if let Err(end) = self.wait_for_command().await {
                return end;
            }
            let incoming = match self.reader.next(&mut self.client).await {
                Ok(i) => i,
                Err(e) => return e.into(),
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
        while self.client.buffered().is_empty() {
            let watched = self.selected.unwrap_or(0);
            let Murder { client, conns, .. } = self;
            let Slot::Up(conn) = &mut conns[watched].slot else {
                client.fill(READ).await?;
                continue;
            };
            tokio::select! {
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

    /// Passes on the complete responses a backend sent while no command was running.
    async fn pass_unsolicited(&mut self, i: usize) -> Step {
        let max_line = self.opts.max_backend_line;
        loop {
            let Some(conn) = self.up(i) else {
                return Ok(());
            };
            if !matches!(
                crate::proto::framer::scan_message(conn.wire.buffered(), max_line, u64::MAX),
                Ok(crate::proto::framer::Scan::Complete { .. })
            ) {
                return Ok(());
            }
            let msg = match conn.wire.whole(MAX_REWRITTEN).await {
                Ok(m) => m,
                Err(_) => return self.conn_failed(i),
            };
            if is_bye(&msg) {
                if i == 0 {
                    self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
                    return Err(End::HomeBye);
                }
                return self.conn_failed(i);
            }
            self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
        }
    }

    fn up(&mut self, i: usize) -> Option<&mut Conn> {
        match &mut self.conns.get_mut(i)?.slot {
            Slot::Up(c) => Some(c),
            _ => None,
        }
    }

    /// A backend connection broke: the home one ends the session, a mounted one only makes its
    /// mailboxes unavailable.
    fn conn_failed(&mut self, i: usize) -> Step {
        if i == 0 {
            return Err(End::HomeLost);
        }
        warn!(backend = %self.conns[i].backend.name, "mounted backend connection lost");
        self.conns[i].slot = Slot::Down(Instant::now());
        Ok(())
    }

    /// Makes sure conn `i` is logged in, connecting on first use. False when it is down.
    async fn ensure(&mut self, i: usize) -> bool {
        match &self.conns[i].slot {
            Slot::Up(_) => return true,
            Slot::Down(since) if since.elapsed() < RETRY_AFTER => return false,
            _ => {}
        }
        let backend = Arc::clone(&self.conns[i].backend);
        match self.open(&backend).await {
            Ok(conn) => {
                debug!(backend = %backend.name, "mounted backend connected");
                self.conns[i].slot = Slot::Up(Box::new(conn));
                true
            }
            Err(e) => {
                warn!(backend = %backend.name, error = %e, "mounted backend unavailable");
                self.conns[i].slot = Slot::Down(Instant::now());
                false
            }
        }
    }

    async fn open(&self, backend: &Backend) -> Result<Conn, String> {
        let c = self.connector.connect(backend).await?;
        let mut conn = Conn {
            wire: Wire::new(c.stream, c.leftover, self.opts.max_backend_line),
            caps: c.capabilities,
            delim: None,
            next_tag: 0,
        };
        conn.delim = discover_delimiter(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        for args in &self.enabled {
            let tag = conn.tag();
            let mut cmd = format!("{tag} ENABLE ").into_bytes();
            cmd.extend_from_slice(args);
            cmd.extend_from_slice(b"\r\n");
            conn.wire.write(&cmd).await.map_err(|e| e.to_string())?;
            read_until_quiet(&mut conn, &tag)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(conn)
    }

    async fn reply(&mut self, tag: &[u8], st: &str, code: Option<&str>, text: &str) -> Step {
        self.client
            .write(&status(tag, st, code, text))
            .await
            .map_err(|_| End::ClientGone)
    }

    async fn unavailable(&mut self, tag: &[u8]) -> Step {
        self.reply(
            tag,
            "NO",
            Some("UNAVAILABLE"),
            "The server holding this mailbox is not available now",
        )
        .await
    }

    /// Where a client's mailbox name lives; connects to a mounted backend when needed.
    async fn place(&mut self, name: &[u8]) -> Place {
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
    fn client_name(&self, i: usize, name: &[u8]) -> Option<Vec<u8>> {
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
    fn client_quota_root(&self, i: usize, root: &[u8]) -> Vec<u8> {
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
    fn quota_root_place(&self, root: &[u8]) -> (usize, Vec<u8>) {
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

    /// One whole command from the client.
    async fn command(&mut self, cmd: Vec<u8>, literals: bool) -> Step {
        let Some(p) = prescan(&cmd) else {
            // Without a readable tag no backend answer could be matched to it.
            let tag = tag_of(&cmd).map_or(b"*".to_vec(), <[u8]>::to_vec);
            return self
                .reply(&tag, "BAD", None, "Command not understood")
                .await;
        };
        let tag = p.tag.to_vec();
        let name = p.name;
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
            CommandName::Enable => self.enable(&tag, &cmd, args_at).await,
            CommandName::Namespace => self.namespace(&tag).await,
            CommandName::List | CommandName::Lsub | CommandName::Rlist | CommandName::Rlsub => {
                self.list(&tag, name, &items).await
            }
            CommandName::Idle => self.idle(&tag, &cmd).await,
            CommandName::Select | CommandName::Examine => {
                self.select(&tag, &cmd, &items, literals).await
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
                self.copy(
                    &tag,
                    &cmd,
                    &items,
                    1,
                    name == CommandName::Move,
                    false,
                    literals,
                )
                .await
            }
            CommandName::Uid => {
                let sub = items
                    .first()
                    .and_then(|i| i.value.as_bytes())
                    .unwrap_or(b"");
                if sub.eq_ignore_ascii_case(b"COPY") || sub.eq_ignore_ascii_case(b"MOVE") {
                    let mv = sub.eq_ignore_ascii_case(b"MOVE");
                    self.copy(&tag, &cmd, &items, 2, mv, true, literals).await
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

    /// Runs a command on the selected mailbox's backend (or home when none is selected).
    async fn exec_on_selected(
        &mut self,
        i: usize,
        cmd: &[u8],
        tag: &[u8],
        literals: bool,
    ) -> Step<Option<Status>> {
        if self.up(i).is_none() {
            self.unavailable(tag).await?;
            return Ok(None);
        }
        self.exec_raw(i, cmd, tag, literals, Updates::Deliver).await
    }

    /// Sends `cmd` (tagged `tag`, the client's) to conn `i` and relays the answer. Returns the
    /// tagged status, or None when the backend failed (the client was told).
    async fn exec_raw(
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
            self.conn_failed(i)?;
            self.unavailable(tag).await?;
            return Ok(None);
        }
        self.relay_answer(i, tag, updates).await
    }

    /// Relays conn `i`'s responses to the client until the one tagged `tag`.
    async fn relay_answer(
        &mut self,
        i: usize,
        tag: &[u8],
        updates: Updates,
    ) -> Step<Option<Status>> {
        loop {
            let kind = match self.next_kind(i, tag, updates).await {
                Ok(k) => k,
                Err(()) => {
                    self.conn_failed(i)?;
                    self.unavailable(tag).await?;
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
                            self.conn_failed(i)?;
                            self.unavailable(tag).await?;
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
                    self.conn_failed(i)?;
                    self.unavailable(tag).await?;
                    return Ok(None);
                }
                Kind::Rewrite => {
                    let Some(conn) = self.up(i) else {
                        return Ok(None);
                    };
                    let msg = match conn.wire.whole(MAX_REWRITTEN).await {
                        Ok(m) => m,
                        Err(_) => {
                            self.conn_failed(i)?;
                            self.unavailable(tag).await?;
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
                    match conn.wire.forward(out).await {
                        Ok(()) => {}
                        Err(ForwardError::Sink) => return Err(End::ClientGone),
                        Err(ForwardError::Source) => {
                            self.conn_failed(i)?;
                            self.unavailable(tag).await?;
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Classifies conn `i`'s next response by its head.
    async fn next_kind(&mut self, i: usize, tag: &[u8], updates: Updates) -> Result<Kind, ()> {
        let Some(conn) = self.up(i) else {
            return Err(());
        };
        let head = conn.wire.head().await.map_err(drop)?;
        Ok(classify(head, tag, i != 0, updates))
    }

    /// Translates the mailbox names in an untagged response from a mounted backend.
    fn rewrite_untagged(&self, i: usize, msg: &[u8]) -> Option<Vec<u8>> {
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
        for (range, value) in edits {
            out.extend_from_slice(&msg[at..range.start]);
            args::push_string(&mut out, &value, LiteralForm::Server);
            at = range.end;
        }
        out.extend_from_slice(&msg[at..]);
        Some(out)
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

    async fn enable(&mut self, tag: &[u8], cmd: &[u8], args_at: usize) -> Step {
        let st = self.exec_raw(0, cmd, tag, false, Updates::Deliver).await?;
        if st != Some(Status::Ok) {
            return Ok(());
        }
        let args = cmd.get(args_at..).unwrap_or(b"");
        let args = args
            .strip_suffix(b"\r\n")
            .or_else(|| args.strip_suffix(b"\n"))
            .unwrap_or(args)
            .to_vec();
        for i in 1..self.conns.len() {
            if let Slot::Up(conn) = &mut self.conns[i].slot {
                let t = conn.tag();
                let mut line = format!("{t} ENABLE ").into_bytes();
                line.extend_from_slice(&args);
                line.extend_from_slice(b"\r\n");
                if conn.wire.write(&line).await.is_err()
                    || read_until_quiet(conn, &t).await.is_err()
                {
                    self.conn_failed(i)?;
                }
            }
        }
        self.enabled.push(args);
        Ok(())
    }

    async fn idle(&mut self, tag: &[u8], cmd: &[u8]) -> Step {
        let i = self.selected.unwrap_or(0);
        let Some(conn) = self.up(i) else {
            return self.unavailable(tag).await;
        };
        if conn.wire.write(cmd).await.is_err() {
            self.conn_failed(i)?;
            return self.unavailable(tag).await;
        }
        // Until the client says DONE, pass on whatever the backend sends.
        loop {
            if let Some(pos) = memchr::memchr(b'\n', self.client.buffered()) {
                let line = self.client.buffered()[..=pos].to_vec();
                self.client.consume(pos + 1);
                let Some(conn) = self.up(i) else {
                    return self.unavailable(tag).await;
                };
                if conn.wire.write(&line).await.is_err() {
                    self.conn_failed(i)?;
                    return self.unavailable(tag).await;
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
            let Murder { client, conns, .. } = self;
            let Slot::Up(conn) = &mut conns[i].slot else {
                return self.unavailable(tag).await;
            };
            let complete = matches!(
                crate::proto::framer::scan_message(
                    conn.wire.buffered(),
                    self.opts.max_backend_line,
                    u64::MAX
                ),
                Ok(crate::proto::framer::Scan::Complete { .. })
            );
            if complete {
                let msg = match conn.wire.whole(MAX_REWRITTEN).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.conn_failed(i)?;
                        return self.unavailable(tag).await;
                    }
                };
                let is_tagged = args::head(&msg).is_some_and(|(t, _, _)| t == tag);
                if is_bye(&msg) && i != 0 {
                    self.conn_failed(i)?;
                    return self.unavailable(tag).await;
                }
                self.client.write(&msg).await.map_err(|_| End::ClientGone)?;
                if is_tagged {
                    return Ok(());
                }
                continue;
            }
            tokio::select! {
                r = client.fill(READ) => r?,
                r = conn.wire.fill(MAX_REWRITTEN) => {
                    if r.is_err() {
                        self.conn_failed(i)?;
                        return self.unavailable(tag).await;
                    }
                }
            }
        }
    }

    async fn select(&mut self, tag: &[u8], cmd: &[u8], items: &[Item<'_>], literals: bool) -> Step {
        let Some(name) = items.first().and_then(|i| i.value.as_bytes()) else {
            return self.reply(tag, "BAD", None, "Mailbox name expected").await;
        };
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
    async fn deselect(&mut self) -> Step {
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

    async fn refuse_place(&mut self, tag: &[u8], place: Place) -> Step {
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
            Place::Refused(u) => self.reply(tag, "NO", Some("CANNOT"), &u.text()).await,
        }
    }

    /// A command whose mailbox arguments (at `idx`) decide where it goes.
    async fn mailbox_command(
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
        let updates = if self.selected == Some(i) {
            Updates::Deliver
        } else {
            Updates::Drop
        };
        self.exec_raw(i, &cmd, tag, literals, updates)
            .await
            .map(drop)
    }

    async fn quota_command(
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
        let updates = if self.selected == Some(i) {
            Updates::Deliver
        } else {
            Updates::Drop
        };
        self.exec_raw(i, &cmd, tag, literals || needs_literal(&cmd), updates)
            .await
            .map(drop)
    }

    /// A command with a literal too big to hold: only APPEND may have one; its message is
    /// streamed to the backend that holds the mailbox.
    async fn big_command(&mut self, head: Vec<u8>, literal: Literal) -> Step {
        let p = prescan(&head);
        let tag = p.as_ref().map(|p| p.tag.to_vec()).unwrap_or_default();
        let is_append = p.as_ref().is_some_and(|p| p.name == CommandName::Append);
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
        let updates = if self.selected == Some(i) {
            Updates::Deliver
        } else {
            Updates::Drop
        };
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
        if literal.sync && !self.await_continuation(i, &tag, updates).await? {
            self.reader.abandon();
            return Ok(());
        }
        self.stream_rest(i, &tag, updates).await
    }

    /// After a synchronizing literal's announcement went to conn `i`: relays the backend's
    /// `+` (true) or its refusal (false; the client gets it and will not send the literal).
    async fn await_continuation(&mut self, i: usize, tag: &[u8], updates: Updates) -> Step<bool> {
        loop {
            let kind = match self.next_kind(i, tag, updates).await {
                Ok(k) => k,
                Err(()) => {
                    self.conn_failed(i)?;
                    self.unavailable(tag).await?;
                    return Ok(false);
                }
            };
            let Murder { client, conns, .. } = self;
            let Slot::Up(conn) = &mut conns[i].slot else {
                return Ok(false);
            };
            match kind {
                Kind::Continuation => {
                    conn.wire
                        .forward(Some(&mut client.stream))
                        .await
                        .map_err(|e| match e {
                            ForwardError::Sink => End::ClientGone,
                            ForwardError::Source => End::HomeLost,
                        })?;
                    return Ok(true);
                }
                Kind::Tagged | Kind::Bye => {
                    let st = self.relay_answer(i, tag, updates).await?;
                    let _ = st;
                    return Ok(false);
                }
                _ => {
                    let out = (kind == Kind::Pass).then_some(&mut client.stream);
                    if let Err(e) = conn.wire.forward(out).await {
                        if matches!(e, ForwardError::Sink) {
                            return Err(End::ClientGone);
                        }
                        self.conn_failed(i)?;
                        self.unavailable(tag).await?;
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Streams the rest of the client's command (literal data and further lines) to conn
    /// `i`, then relays the answer.
    async fn stream_rest(&mut self, i: usize, tag: &[u8], updates: Updates) -> Step {
        loop {
            if self.reader.framer.at_message_start() {
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
            let Slot::Up(conn) = &mut conns[i].slot else {
                return Err(End::HomeLost);
            };
            if conn.wire.write(&client.buffered()[..len]).await.is_err() {
                // The client's literal can no longer go anywhere; the session cannot
                // resynchronise without reading it, so it ends.
                self.conn_failed(i)?;
                return Err(End::ClientGone);
            }
            self.client.consume(len);
            if sync && !self.await_continuation(i, tag, updates).await? {
                self.reader.abandon();
                return Ok(());
            }
        }
    }
}

/// What to do with a backend response, by its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tagged,
    Continuation,
    Bye,
    Rewrite,
    Pass,
    Drop,
}

fn classify(head: &[u8], tag: &[u8], mounted: bool, updates: Updates) -> Kind {
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

fn is_bye(msg: &[u8]) -> bool {
    parse_status_line(msg).is_some_and(|s| s.tag == "*" && s.status == Status::Bye)
}

/// Reads a backend's responses up to the one tagged `tag`, dropping them all.
async fn read_until_quiet(conn: &mut Conn, tag: &str) -> Result<(), WireError> {
    loop {
        let msg = conn.wire.whole(MAX_REWRITTEN).await?;
        if args::head(&msg).is_some_and(|(t, _, _)| t == tag.as_bytes()) {
            return Ok(());
        }
    }
}

/// Replaces the given arguments of a whole message with new strings.
fn replace_args(msg: &[u8], edits: &[(&Item<'_>, Vec<u8>)]) -> Vec<u8> {
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
fn needs_literal(cmd: &[u8]) -> bool {
    memchr::memmem::find(cmd, b"+}\r\n").is_some()
}

/// Where the literal announcement at the end of a command head starts.
fn announcement_start(head: &[u8]) -> usize {
    match memchr::memrchr(b'{', head) {
        Some(p) if p > 0 && head[p - 1] == b'~' => p - 1,
        Some(p) => p,
        None => head.len(),
    }
}

/// Whether the gateway must read a command's arguments to know where it goes (or to answer it).
fn routes_by_arguments(name: CommandName, word: &[u8], rest: &[u8]) -> bool {
    match name {
        CommandName::Other => mailbox_arg_of_extension(word, &[]).is_some(),
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

/// The index of the mailbox argument of extension commands the gateway routes by mailbox
/// (ACL, RFC 4314; METADATA, RFC 5464).
fn mailbox_arg_of_extension(word: &[u8], items: &[Item<'_>]) -> Option<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_responses() {
        assert_eq!(
            classify(b"a1 OK done\r\n", b"a1", true, Updates::Drop),
            Kind::Tagged
        );
        assert_eq!(
            classify(b"+ go\r\n", b"a1", true, Updates::Drop),
            Kind::Continuation
        );
        assert_eq!(
            classify(b"* 3 EXISTS\r\n", b"a1", true, Updates::Drop),
            Kind::Drop
        );
        assert_eq!(
            classify(b"* 3 EXISTS\r\n", b"a1", true, Updates::Deliver),
            Kind::Pass
        );
        assert_eq!(
            classify(b"* STATUS x (MESSAGES 1)\r\n", b"a1", true, Updates::Drop),
            Kind::Rewrite
        );
        assert_eq!(
            classify(b"* STATUS x (MESSAGES 1)\r\n", b"a1", false, Updates::Drop),
            Kind::Pass
        );
        assert_eq!(
            classify(b"* BYE bye\r\n", b"a1", false, Updates::Drop),
            Kind::Bye
        );
        assert_eq!(
            classify(b"gw1 OK x\r\n", b"a1", false, Updates::Drop),
            Kind::Drop
        );
    }

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
