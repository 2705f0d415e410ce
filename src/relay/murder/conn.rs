//! The session's backend connections: the logged-in home connection and the mounted
//! backends' connections, opened when first needed (in parallel where several are needed at
//! once), marked down when they fail, and retried after a pause.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::names;
use super::wire::{Wire, WireError};
use super::{End, MAX_REWRITTEN, Murder, RETRY_AFTER, Step};
use crate::proto::args;
use crate::proto::capability::Capabilities;
use crate::route::Backend;

pub(super) struct Conn {
    pub(super) wire: Wire,
    pub(super) caps: Capabilities,
    /// The backend's hierarchy delimiter (`LIST "" ""`), None for a flat namespace.
    pub(super) delim: Option<u8>,
    pub(super) next_tag: u32,
    /// Set while a command is only partly written (a streamed literal): nothing else may be
    /// sent on this connection, not even LOGOUT, or it would become part of the literal.
    pub(super) mid_command: bool,
}

impl Conn {
    pub(super) fn new(wire: Wire, caps: Capabilities) -> Conn {
        Conn {
            wire,
            caps,
            delim: None,
            next_tag: 0,
            mid_command: false,
        }
    }

    pub(super) fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("gwm{}", self.next_tag)
    }

    pub(super) fn has(&self, cap: &str) -> bool {
        self.caps.has(cap)
    }
}

pub(super) enum Slot {
    /// Not needed yet.
    Idle,
    Up(Box<Conn>),
    /// Failed at this time; see [`RETRY_AFTER`].
    Down(Instant),
}

pub(super) struct BackendSlot {
    pub(super) backend: Arc<Backend>,
    pub(super) slot: Slot,
}

/// Most bytes of untagged responses held from one answer to a command of the gateway's own
/// (a LIST of some 100,000 mailboxes); the rest is read and dropped, and the answer fails.
const MAX_COLLECTED: usize = 16 << 20;

/// A backend's answer to a command of the gateway's own: the tagged line and the untagged
/// responses before it. The untagged ones are kept back to back in one buffer, which grows by
/// doubling: a LIST answer of 100,000 mailboxes costs a few dozen allocations, not 100,000.
#[derive(Default)]
pub(super) struct Answer {
    pub(super) tagged: Vec<u8>,
    untagged: Vec<u8>,
    /// Where each untagged response ends in `untagged`.
    ends: Vec<usize>,
}

impl Answer {
    /// The untagged responses, in the order they came.
    pub(super) fn untagged(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.untagged[start..end])
    }

    /// Empties the answer and keeps its buffers for the next one.
    fn clear(&mut self) {
        self.tagged.clear();
        self.untagged.clear();
        self.ends.clear();
    }
}

/// Reads `conn`'s answer to `tag` (see [`answer_into`]).
pub(super) async fn answer(conn: &mut Conn, tag: &str) -> Result<Answer, WireError> {
    let mut answer = Answer::default();
    answer_into(conn, tag, &mut answer).await?;
    Ok(answer)
}

/// Reads `conn`'s answer to `tag` into `into`, replacing what it held: the tagged line and
/// the untagged responses before it. Fails when the connection does, when the server says
/// BYE, or when the answer is too big to hold (it is still read to its end, so the
/// connection stays usable).
pub(super) async fn answer_into(
    conn: &mut Conn,
    tag: &str,
    into: &mut Answer,
) -> Result<(), WireError> {
    /// What to do once the message is consumed.
    enum Next {
        Read,
        Done,
        Bye,
    }
    into.clear();
    loop {
        let len = conn.wire.peek_whole(MAX_REWRITTEN).await?;
        let msg = &conn.wire.buffered()[..len];
        let held = into.untagged.len();
        // The message is copied where it is kept, straight from the read buffer.
        let next = match args::head(msg) {
            Some((t, _, _)) if t == tag.as_bytes() => {
                into.tagged.extend_from_slice(msg);
                Next::Done
            }
            Some((b"*", w, _)) if w.eq_ignore_ascii_case(b"BYE") => Next::Bye,
            Some((b"*", _, _)) if held <= MAX_COLLECTED => {
                into.untagged.extend_from_slice(msg);
                into.ends.push(into.untagged.len());
                Next::Read
            }
            _ => Next::Read,
        };
        conn.wire.consume(len);
        match next {
            Next::Read => {}
            Next::Done if held > MAX_COLLECTED => return Err(WireError::TooLong(MAX_COLLECTED)),
            Next::Done => return Ok(()),
            Next::Bye => return Err(WireError::Closed),
        }
    }
}

/// Reads `conn`'s answer to `tag` and drops it.
pub(super) async fn read_until_quiet(conn: &mut Conn, tag: &str) -> Result<(), WireError> {
    answer(conn, tag).await.map(drop)
}

/// Asks a freshly logged-in backend for its hierarchy delimiter.
pub(super) async fn discover_delimiter(conn: &mut Conn) -> Result<Option<u8>, WireError> {
    let tag = conn.tag();
    conn.wire
        .write(format!("{tag} LIST \"\" \"\"\r\n").as_bytes())
        .await?;
    let answer = answer(conn, &tag).await?;
    Ok(answer.untagged().find_map(|msg| {
        let (_, word, off) = args::head(msg)?;
        let items = args::parse(msg, off).ok()?;
        let d = items.get(1)?;
        (word.eq_ignore_ascii_case(b"LIST") && !d.value.is_nil())
            .then(|| d.value.as_bytes()?.first().copied())?
    }))
}

impl Murder<'_> {
    pub(super) fn up(&mut self, i: usize) -> Option<&mut Conn> {
        match &mut self.conns.get_mut(i)?.slot {
            Slot::Up(c) => Some(c),
            _ => None,
        }
    }

    /// A backend connection broke: the home one ends the session, a mounted one only makes its
    /// mailboxes unavailable.
    pub(super) fn conn_failed(&mut self, i: usize) -> Step {
        if i == 0 {
            return Err(End::HomeLost);
        }
        if self.selected == Some(i) {
            self.selected = None;
            self.selection_lost = true;
        }
        warn!(backend = %self.conns[i].backend.name, "mounted backend connection lost");
        self.conns[i].slot = Slot::Down(Instant::now());
        Ok(())
    }

    /// Makes sure conn `i` is logged in, connecting on first use. False when it is down.
    pub(super) async fn ensure(&mut self, i: usize) -> bool {
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

    pub(super) async fn open(&self, backend: &Backend) -> Result<Conn, String> {
        let c = self.connector.connect(backend).await?;
        let mut conn = Conn::new(
            Wire::new(c.stream, c.leftover, self.opts.max_backend_line)
                .counted(self.ctx.counters.backend_to_client.clone()),
            c.capabilities,
        );
        conn.delim = discover_delimiter(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if !self.enabled.is_empty() {
            let tag = conn.tag();
            let mut cmd = format!("{tag} ENABLE ").into_bytes();
            cmd.extend_from_slice(&names::join(self.enabled.iter().map(Vec::as_slice), b' '));
            cmd.extend_from_slice(b"\r\n");
            conn.wire.write(&cmd).await.map_err(|e| e.to_string())?;
            read_until_quiet(&mut conn, &tag)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(conn)
    }
}
