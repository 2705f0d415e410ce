//! The relay for a session on one backend. Both directions are framed (lines and literals,
//! no decoding) so the relay knows where each command and response starts: that is where it
//! intercepts the few commands it must (RLIST/RLSUB on backends without MAILBOX-REFERRALS,
//! COMPRESS) and the only place it may inject a response of its own. Everything else passes
//! through as the bytes that were read, from a buffer a direction holds only while data flows
//! (see `buf`).

mod buf;
mod gate;
pub mod murder;
mod pending;
pub mod quiet;
mod splice;

pub use self::splice::pooled_pipes;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use self::buf::Buf;
use self::pending::Pending;
use crate::metrics::RelayCounters;
use crate::proto::framer::{FrameError, Framer, HEAD_LEN, Piece};
use crate::proto::prescan::{CommandName, Prescan, prescan, tag_of};
use crate::proto::response;
use crate::shutdown::{Stop, StopReason};
use crate::stream::{ReadHalf, Stream, WriteHalf};

/// Responses the gateway may queue for a client before the relay stops reading its commands.
const INJECT_QUEUE: usize = 8;
/// Tag of the LOGOUT the gateway sends when the client vanished.
const LOGOUT_TAG: &[u8] = b"gwlogout";

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("client: {0}")]
    ClientFrame(FrameError),
    #[error("backend: {0}")]
    BackendFrame(FrameError),
}

/// Limits and switches for one relayed session.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub max_command_line: usize,
    pub max_literal: u64,
    pub max_backend_line: usize,
    pub backend_logout: Duration,
    /// Rewrite RLIST/RLSUB to LIST/LSUB (the backend lacks MAILBOX-REFERRALS).
    pub rewrite_referrals: bool,
    /// Move large literals with splice(2) when both legs are plain TCP.
    pub splice: bool,
    /// The client is logged out after this long without sending a byte (see
    /// [`AUTOLOGOUT_BYE`]).
    pub autologout: Duration,
    /// A client that takes none of what is sent to it for this long is gone.
    pub client_send: Duration,
}

/// What a client gets when the gateway logs it out for inactivity (RFC 3501 section 5.4).
///
/// The rule, the same for both relays: the timer runs from the last bytes the client sent
/// or the last answer it got, and not while a backend owes the answer to a command the
/// client has finished sending; so any command resets it, and an IDLE resets it when it starts (it is a command) but not
/// while it lasts: RFC 2177 has clients re-issue IDLE within 29 minutes, so an IDLE held past
/// the timer without DONE ends the session too. On expiry the session ends at its next safe
/// point, like a shutdown: a response in progress is finished first, an IDLE is ended with
/// DONE, and the backend is logged out. A client that stopped in the middle of a command
/// (a partial line, an unfinished literal) has no safe point: it is closed at once.
pub const AUTOLOGOUT_BYE: &[u8] = b"* BYE [UNAVAILABLE] Autologout; idle for too long\r\n";

/// How a relayed session ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client logged out, or the backend closed after saying BYE (its own autologout).
    BackendBye,
    /// The backend went away without BYE; the client was told.
    BackendLost,
    /// The client went away; the backend was logged out.
    ClientGone,
    /// A side broke the protocol's framing limits; both were closed.
    Error(RelayError),
    /// The session was asked to stop (shutdown or kick) and ended at a safe point with BYE.
    Stopped(StopReason),
    /// The client sent nothing for `autologout`; it was told BYE and the backend logged out.
    Autologout,
}

/// What a relay needs from the rest of the gateway besides its streams.
#[derive(Clone)]
pub struct RelayContext {
    pub stop: Stop,
    pub counters: std::sync::Arc<RelayCounters>,
}

/// What the two directions of a relay share. Where they stand is tracked for finding a safe
/// point to stop at: no command half-sent, every command answered (or the one outstanding is
/// an IDLE the backend accepted), and no response half-forwarded.
#[derive(Default)]
struct Progress {
    gate: gate::LiteralGate,
    /// Whether the backend stands between two of the client's commands. Only the
    /// client-to-backend side knows; it decides whether a LOGOUT may be sent for a client
    /// that went away, whichever side noticed: a LOGOUT inside an APPEND literal would
    /// become part of the message.
    at_boundary: AtomicBool,
    /// Commands sent to the backend and not answered yet.
    pending: Mutex<Pending>,
    /// The last command sent is an IDLE not yet ended by DONE.
    idle: AtomicBool,
    /// The client sent LOGOUT.
    logout: AtomicBool,
    /// The client-to-backend side stopped at a command boundary because a stop was asked, or
    /// the autologout timer ran out.
    parked: AtomicBool,
    /// The client-to-backend side parked for the autologout timer, not for a stop.
    autologout: AtomicBool,
    /// The session was asked to stop. One waiter on the stop, in [`run`], sets it and wakes
    /// both sides; each side reads the flag, so neither holds a waiter of its own.
    stop_asked: AtomicBool,
    /// Wakes the backend-to-client side for `parked` or a queued answer: set the flag, then
    /// wake. Unlike a `Notify`, its waiter holds no future of its own between wake-ups.
    down_signal: AtomicWaker,
    /// Answers of the gateway's own, queued by the client-to-backend side for the other side
    /// to write between two responses. Unlike a channel, it costs no allocation until used.
    inject: Mutex<VecDeque<Vec<u8>>>,
    /// Whether `inject` holds anything, readable without its lock: the backend-to-client side
    /// looks after every read, and answers are rare. Changed only under the lock; its setting
    /// is announced on `down_signal`.
    inject_waiting: AtomicBool,
    /// The queue has room again.
    inject_room: Notify,
    /// When the client last sent bytes or last got a command answered: what the autologout
    /// counts from.
    activity: Activity,
}

impl Progress {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned lock still holds consistent tags.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inject_queue(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.inject.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an answer for the client, waiting while [`INJECT_QUEUE`] are queued already.
    async fn inject(&self, answer: Vec<u8>) {
        loop {
            {
                let mut queue = self.inject_queue();
                if queue.len() < INJECT_QUEUE {
                    queue.push_back(answer);
                    self.inject_waiting.store(true, Ordering::Release);
                    break;
                }
            }
            self.inject_room.notified().await;
        }
        self.down_signal.wake();
    }

    /// The client-to-backend side stopped at a boundary; the other side ends the session.
    fn park(&self) {
        self.parked.store(true, Ordering::Release);
        self.down_signal.wake();
    }

    /// What the backend-to-client side should act on besides its backend: the other side
    /// parked (until that was `seen_parked`), or an answer is queued (looked at only between
    /// responses, where it can be written).
    fn poll_down_signal(
        &self,
        cx: &mut std::task::Context<'_>,
        seen_parked: bool,
        at_message_start: bool,
    ) -> Poll<DownSignal> {
        // Registered before the flags are read, so a flag set after the reads wakes it.
        self.down_signal.register(cx.waker());
        if !seen_parked && self.parked.load(Ordering::Acquire) {
            Poll::Ready(DownSignal::Parked)
        } else if at_message_start && self.inject_waiting.load(Ordering::Acquire) {
            Poll::Ready(DownSignal::Injected)
        } else {
            Poll::Pending
        }
    }

    /// The next queued answer, if any.
    fn injected(&self) -> Option<Vec<u8>> {
        // A queued answer is also announced on `down_signal`, which wakes the reader to look
        // again, so a stale `false` here only defers it to that wake-up.
        if !self.inject_waiting.load(Ordering::Acquire) {
            return None;
        }
        let mut queue = self.inject_queue();
        let answer = queue.pop_front()?;
        if queue.is_empty() {
            *queue = VecDeque::new();
            self.inject_waiting.store(false, Ordering::Release);
        }
        drop(queue);
        self.inject_room.notify_one();
        Some(answer)
    }
}

/// Relays between a logged-in client and its backend until one side ends.
/// `client_ahead` are command bytes the client pipelined behind its login; `backend_ahead`
/// are response bytes the backend sent behind its login answer.
///
/// The streams and the bytes ahead are borrowed, not owned: the caller's future holds them,
/// and a future that owned them would hold them again beside the caller's moved-from copies
/// (the bytes ahead are emptied once taken).
pub async fn run(
    client: &mut Stream,
    client_ahead: &mut Vec<u8>,
    backend: &mut Stream,
    backend_ahead: &mut Vec<u8>,
    opts: &RelayOptions,
    ctx: &RelayContext,
) -> RelayEnd {
    let (mut client_r, mut client_w) = client.split();
    let (mut backend_r, mut backend_w) = backend.split();
    let progress = Progress {
        at_boundary: AtomicBool::new(true),
        ..Progress::default()
    };

    let outcome = {
        let up = upstream(
            &mut client_r,
            &mut backend_w,
            client_ahead,
            &progress,
            opts,
            ctx,
        );
        let down = downstream(
            &mut backend_r,
            &mut client_w,
            backend_ahead,
            &progress,
            opts,
            ctx,
        );
        // Each direction is polled only when what it waits on woke it: a response arriving
        // does not poll the client's side, nor a command the backend's.
        let up = std::pin::pin!(up);
        let down = std::pin::pin!(down);
        let mut up = quiet::Quiet::new(up);
        let mut down = quiet::Quiet::new(down);
        let stop = std::pin::pin!(ctx.stop.requested());
        let mut stop = quiet::Quiet::new(stop);
        loop {
            tokio::select! {
                biased;
                u = &mut up => break Outcome::Up(u),
                d = &mut down => break Outcome::Down(d),
                _ = &mut stop, if !progress.stop_asked.load(Ordering::Acquire) => {
                    progress.stop_asked.store(true, Ordering::Release);
                    up.wake();
                    down.wake();
                }
            }
        }
    };

    match outcome {
        Outcome::Down(DownEnd::Stopped { idle }) => {
            if idle {
                // Ends the IDLE so that the backend takes the LOGOUT as a command.
                let _ = backend_w.write_all(b"DONE\r\n").await;
            }
            logout_backend(&mut backend_r, &mut backend_w, true, opts.backend_logout).await;
            if progress.autologout.load(Ordering::Acquire) {
                close_client(&mut client_w, Some(AUTOLOGOUT_BYE)).await;
                return RelayEnd::Autologout;
            }
            let reason = ctx.stop.reason();
            close_client(&mut client_w, Some(reason.bye())).await;
            RelayEnd::Stopped(reason)
        }
        Outcome::Up(UpEnd::Autologout) => {
            // Mid-command: a LOGOUT now would be part of the client's command.
            logout_backend(&mut backend_r, &mut backend_w, false, opts.backend_logout).await;
            close_client(&mut client_w, Some(AUTOLOGOUT_BYE)).await;
            RelayEnd::Autologout
        }
        Outcome::Up(UpEnd::ClientGone) | Outcome::Down(DownEnd::ClientGone) => {
            // A client that sent LOGOUT and closed before the backend did logged out: the
            // backend has the LOGOUT already and needs no second one.
            let logged_out = progress.logout.load(Ordering::Acquire);
            logout_backend(
                &mut backend_r,
                &mut backend_w,
                !logged_out && progress.at_boundary.load(Ordering::Acquire),
                opts.backend_logout,
            )
            .await;
            if logged_out {
                RelayEnd::BackendBye
            } else {
                RelayEnd::ClientGone
            }
        }
        Outcome::Up(UpEnd::BackendGone) => {
            close_client(&mut client_w, Some(BACKEND_LOST)).await;
            RelayEnd::BackendLost
        }
        Outcome::Up(UpEnd::Frame(e)) => {
            let text: &[u8] = match e {
                FrameError::LineTooLong { .. } => b"* BYE [TOOBIG] Command line too long\r\n",
                FrameError::LiteralTooLarge { .. } => b"* BYE [TOOBIG] Literal too large\r\n",
                FrameError::MessageTooLong { .. } => b"* BYE [TOOBIG] Command too long\r\n",
            };
            close_client(&mut client_w, Some(text)).await;
            RelayEnd::Error(RelayError::ClientFrame(e))
        }
        Outcome::Down(DownEnd::BackendClosed {
            saw_bye,
            at_boundary,
        }) => {
            let bye = (!saw_bye && at_boundary).then_some(BACKEND_LOST);
            close_client(&mut client_w, bye).await;
            if saw_bye {
                RelayEnd::BackendBye
            } else {
                RelayEnd::BackendLost
            }
        }
        Outcome::Down(DownEnd::Frame(e)) => {
            // The response is cut mid-line: end that line so the BYE stands on its own.
            let bye = b"\r\n* BYE [UNAVAILABLE] Backend sent an oversized response\r\n";
            close_client(&mut client_w, Some(bye)).await;
            RelayEnd::Error(RelayError::BackendFrame(e))
        }
    }
}

/// When the client last sent something or last got an answer: what the autologout counts
/// from. Atomic rather than a `Cell` only because it is borrowed across awaits in a future
/// that must be `Send`; both directions of one session, in one task, use it.
struct Activity {
    base: tokio::time::Instant,
    /// Nanoseconds from `base`.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let since = self.base.elapsed().as_nanos();
        self.last
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> tokio::time::Instant {
        after(
            self.base,
            Duration::from_nanos(self.last.load(Ordering::Relaxed)),
        )
    }
}

/// Resolves once `wait` has passed since `last` without `last` moving on, while it is the
/// client's turn: when `backends_turn` says a command the client finished sending is still
/// being answered (a long SEARCH, or a large FETCH a slow client is still reading), the
/// time does not count, so the timer runs from the answer, as with mounts. The timer is
/// moved on lazily, when it fires, rather than at every read: a read only notes the time,
/// which costs no timer-wheel update on the hot path.
///
/// A `poll_fn` rather than an `async fn`: an idle session waits in it, and the async form
/// held its arguments twice (128 bytes against about 50).
fn idle_for<'a>(
    mut timer: std::pin::Pin<&'a mut tokio::time::Sleep>,
    last: &'a Activity,
    wait: Duration,
    backends_turn: impl Fn() -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            if backends_turn() {
                last.touch();
            }
            let due = after(last.get(), wait);
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(());
            }
            // Polled again at once: registers the waker for the new deadline.
            timer.as_mut().reset(due);
        }
    })
}

/// The two sockets for the rest of the current literal when it can go by splice: splice is
/// on, both legs are plain TCP, and enough of the literal is left to be worth a pipe.
fn splice_legs<'s>(
    opts: &RelayOptions,
    framer: &Framer,
    from: &'s ReadHalf<'_>,
    to: &'s WriteHalf<'_>,
) -> Option<(&'s tokio::net::TcpStream, &'s tokio::net::TcpStream, u64)> {
    let left = framer
        .literal_remaining()
        .filter(|&left| opts.splice && left >= splice::MIN_SPLICE)?;
    match (from, to) {
        (ReadHalf::Plain(r), WriteHalf::Plain(w)) => Some((r.as_ref(), w.as_ref(), left)),
        _ => None,
    }
}

/// Resolves once [`run`] has seen the stop. A flag read and no waiter: `run` wakes this side
/// when it sets the flag.
fn stop_asked(progress: &Progress) -> impl Future<Output = ()> + Unpin + '_ {
    std::future::poll_fn(move |_| {
        if progress.stop_asked.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// Whether the backend owes an answer to a command the client has finished sending (an
/// IDLE does not count: in IDLE the client's silence is what the autologout measures).
fn backends_turn(progress: &Progress, at_message_start: bool) -> bool {
    if !at_message_start {
        return false;
    }
    let pending = progress.pending();
    let in_idle = pending.only_one() && progress.idle.load(Ordering::Acquire);
    !(pending.is_empty() || in_idle)
}

/// `from + wait`, or a year from `from` when that is past what an `Instant` can hold (a
/// configured autologout of "1000 years" means never, not a panic).
pub(crate) fn after(from: tokio::time::Instant, wait: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
    from.checked_add(wait).unwrap_or_else(|| from + FAR)
}

const BACKEND_LOST: &[u8] = b"* BYE [UNAVAILABLE] Backend connection lost\r\n";

/// How long a last word (BYE) may wait for a client to read; one that does not read is
/// closed without it.
const LAST_WORD: Duration = Duration::from_secs(5);

/// Says a last word to the client (when there is one) and closes its sending side.
async fn close_client<W: AsyncWrite + Unpin>(w: &mut W, last_word: Option<&[u8]>) {
    let _ = tokio::time::timeout(LAST_WORD, async {
        if let Some(bye) = last_word {
            w.write_all(bye).await?;
        }
        w.shutdown().await
    })
    .await;
}

/// Writes `bytes` to the client; false when it failed or the client took nothing for
/// `stall` (`timeouts.client_send`: a client that stops reading is as gone as one that
/// stops writing, and would otherwise hold the session and its backend forever).
///
/// The stall timer lives in `timer`, made at the first write that has to wait and reused
/// after it: inline, its 112 bytes would be part of every idle session's state, and made
/// per write it would be an allocation per chunk for a slow client.
async fn deliver(
    client: &mut WriteHalf<'_>,
    bytes: &[u8],
    stall: Duration,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> bool {
    let mut write = std::pin::pin!(client.write_all(bytes));
    // Almost every write completes at once (the socket has room); the stall timer, which
    // reads the clock to be set, is set only for one that has to wait.
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
    {
        return done.is_ok();
    }
    let deadline = tokio::time::Instant::now() + stall;
    let sleep = match timer {
        Some(sleep) => {
            sleep.as_mut().reset(deadline);
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    tokio::select! {
        biased;
        done = write => done.is_ok(),
        () = sleep.as_mut() => false,
    }
}

enum Outcome {
    Up(UpEnd),
    Down(DownEnd),
}

enum UpEnd {
    /// The client closed or its connection failed.
    ClientGone,
    BackendGone,
    Frame(FrameError),
    /// The autologout timer ran out in the middle of a command.
    Autologout,
}

/// What woke the backend-to-client side other than its backend or a stop.
enum DownSignal {
    Parked,
    Injected,
}

enum DownEnd {
    BackendClosed {
        saw_bye: bool,
        at_boundary: bool,
    },
    /// A stop was asked and the session reached a safe point; `idle`: inside an IDLE.
    Stopped {
        idle: bool,
    },
    ClientGone,
    Frame(FrameError),
}

/// Sends LOGOUT on behalf of a client that went away, and waits briefly for the backend to
/// finish, so the backend ends the session cleanly instead of seeing a reset.
async fn logout_backend<R, W>(r: &mut R, w: &mut W, at_boundary: bool, wait: Duration)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if at_boundary {
        let mut cmd = Vec::with_capacity(LOGOUT_TAG.len() + 9);
        cmd.extend_from_slice(LOGOUT_TAG);
        cmd.extend_from_slice(b" LOGOUT\r\n");
        if w.write_all(&cmd).await.is_ok() {
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(wait, async {
                while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    }
    let _ = w.shutdown().await;
}

/// Client to backend: forwards command bytes, rewriting or answering the intercepted ones.
async fn upstream(
    client: &mut ReadHalf<'_>,
    backend: &mut WriteHalf<'_>,
    ahead: &mut Vec<u8>,
    progress: &Progress,
    opts: &RelayOptions,
    ctx: &RelayContext,
) -> UpEnd {
    let mut framer = Framer::new(opts.max_command_line, opts.max_literal);
    let mut slot = (!ahead.is_empty()).then(|| Buf::with(ahead));
    let mut filled = ahead.len();
    // The loop below runs for the whole session: do not keep the login-time buffer alive.
    // Borrowed rather than moved in, so that no layer holds a moved-from copy of it.
    *ahead = Vec::new();
    progress.at_boundary.store(filled == 0, Ordering::Release);
    // When set, the current message is swallowed and this answer is sent once it ends.
    let mut swallow: Option<Vec<u8>> = None;
    // Shared with a spliced literal's transfer, which notes its progress from inside, and
    // with the other direction, which notes answers.
    let last_read = &progress.activity;
    let mut autologout = std::pin::pin!(tokio::time::sleep_until(after(
        last_read.get(),
        opts.autologout
    )));
    let mut stop_requested = stop_asked(progress);
    loop {
        if let Some(buf) = slot.as_deref_mut() {
            let mut pos = 0;
            let mut out_start = 0;
            while pos < filled {
                if framer.at_message_start() && !has_head(&buf[pos..filled]) {
                    break; // wait for enough of the command line to see its name
                }
                let mut sync_literal = false;
                let piece = match framer.next(&buf[pos..filled]) {
                    Ok(p) => p,
                    Err(e) => return UpEnd::Frame(e),
                };
                let len = match piece {
                    Piece::Line {
                        len,
                        first,
                        literal,
                        ..
                    } => {
                        let scanned = if first && swallow.is_none() {
                            prescan(&buf[pos..filled])
                        } else {
                            None
                        };
                        if first && swallow.is_none() {
                            count_command(scanned.as_ref(), &buf[pos..filled], progress, ctx);
                        }
                        if let Some(p) = scanned
                            && let Some(action) = intercept(&p, opts)
                        {
                            ctx.counters.intercepted(p.name);
                            match action {
                                Action::Rewrite { name, with } => {
                                    let name_start = pos + name.start;
                                    if write(backend, &buf[out_start..name_start]).await.is_err()
                                        || write(backend, with).await.is_err()
                                    {
                                        return UpEnd::BackendGone;
                                    }
                                    out_start = pos + name.end;
                                }
                                Action::Answer(answer) => {
                                    if write(backend, &buf[out_start..pos]).await.is_err() {
                                        return UpEnd::BackendGone;
                                    }
                                    // Answered here: the backend never sees it.
                                    progress.pending().answered(&buf[pos..filled]);
                                    swallow = Some(answer);
                                }
                            }
                        }
                        sync_literal = literal.is_some_and(|l| l.sync);
                        len
                    }
                    Piece::LiteralData { len, .. } => len,
                };
                pos += len;
                if swallow.is_some() {
                    out_start = pos;
                    if framer.at_message_start()
                        && let Some(answer) = swallow.take()
                    {
                        progress.inject(answer).await;
                    }
                } else if sync_literal {
                    // The backend answers the announcing line with `+` or with a refusal; which
                    // one decides whether the client's next bytes are the literal.
                    // Armed before the line goes out, so the answer cannot come first.
                    let armed = tag_of(framer.head()).is_some_and(|tag| progress.gate.arm(tag));
                    if write(backend, &buf[out_start..pos]).await.is_err() {
                        return UpEnd::BackendGone;
                    }
                    out_start = pos;
                    if armed && progress.gate.verdict().await == gate::Verdict::Refused {
                        framer.abandon_literal();
                    }
                }
            }
            if out_start < pos && write(backend, &buf[out_start..pos]).await.is_err() {
                return UpEnd::BackendGone;
            }
            // Keep the unprocessed tail (a partial command head) for the next read.
            buf.copy_within(pos..filled, 0);
            filled -= pos;
        }
        buf::normalize(&mut slot, filled);
        progress
            .at_boundary
            .store(framer.at_message_start() && filled == 0, Ordering::Release);
        if swallow.is_none()
            && filled == 0
            && let Some((from, to, left)) = splice_legs(opts, &framer, client, backend)
        {
            // The rest of an APPEND literal: the gateway has nothing to see in it.
            slot = None;
            let counters = &ctx.counters;
            let transfer = splice::transfer(from, to, left, false, opts.autologout, |n| {
                counters.client_to_backend.inc_by(n as u64);
                counters.spliced[0].inc_by(n as u64);
                last_read.touch();
            });
            // A literal that stops flowing is the client gone quiet mid-command.
            let spliced = tokio::select! {
                r = transfer => r,
                _ = idle_for(autologout.as_mut(), last_read, opts.autologout, || false) => {
                    return UpEnd::Autologout;
                }
            };
            match spliced {
                Ok(true) => {
                    framer.skip_literal(left);
                    continue;
                }
                Ok(false) => {}
                Err(splice::SpliceError::Source) => return UpEnd::ClientGone,
                Err(splice::SpliceError::Sink) => return UpEnd::BackendGone,
            }
        }
        // A stop is taken only between commands: nothing of the next one has reached the
        // backend (a partial command head still here is dropped with the session).
        let stoppable = framer.at_message_start();
        let read = tokio::select! {
            biased;
            r = buf::read_into(client, &mut slot, filled) => r,
            // Completes once; the session is parked from then on and never polls it again.
            _ = &mut stop_requested, if stoppable => {
                progress.park();
                // The other side ends the session once the backend has answered.
                return std::future::pending().await;
            }
            _ = idle_for(autologout.as_mut(), last_read, opts.autologout, || {
                backends_turn(progress, stoppable && filled == 0)
            }) => {
                if !stoppable {
                    return UpEnd::Autologout;
                }
                progress.autologout.store(true, Ordering::Release);
                progress.park();
                return std::future::pending().await;
            }
        };
        last_read.touch();
        match read {
            Ok(0) | Err(_) => return UpEnd::ClientGone,
            Ok(n) => {
                filled += n;
                ctx.counters.client_to_backend.inc_by(n as u64);
            }
        }
        // From here until the next read the backend may hold part of a command.
        progress.at_boundary.store(false, Ordering::Release);
    }
}

/// Notes a command the client sent, for metrics and for finding safe points. The line
/// after an IDLE is its `DONE` (or ends it anyway), not a command of its own.
fn count_command(
    scanned: Option<&Prescan<'_>>,
    line: &[u8],
    progress: &Progress,
    ctx: &RelayContext,
) {
    if progress.idle.swap(false, Ordering::AcqRel) && is_done(line) {
        return;
    }
    if let Some(p) = scanned {
        ctx.counters.command(p.name);
        progress
            .idle
            .store(p.name == CommandName::Idle, Ordering::Release);
        if p.name == CommandName::Logout {
            progress.logout.store(true, Ordering::Release);
        }
    }
    progress.pending().sent(line);
}

fn is_done(line: &[u8]) -> bool {
    line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"DONE")
}

/// Whether `bytes` hold enough of a command line for the pre-scanner.
fn has_head(bytes: &[u8]) -> bool {
    bytes.len() >= HEAD_LEN || memchr::memchr(b'\n', bytes).is_some()
}

enum Action {
    /// Send `with` instead of the command name at `name` in the line.
    Rewrite {
        name: std::ops::Range<usize>,
        with: &'static [u8],
    },
    /// Do not forward the command; answer the client with this.
    Answer(Vec<u8>),
}

/// Decides what to do with a command from the head of its first line.
fn intercept(p: &Prescan<'_>, opts: &RelayOptions) -> Option<Action> {
    match p.name {
        CommandName::Rlist if opts.rewrite_referrals => Some(Action::Rewrite {
            name: p.name_range.clone(),
            with: b"LIST",
        }),
        CommandName::Rlsub if opts.rewrite_referrals => Some(Action::Rewrite {
            name: p.name_range.clone(),
            with: b"LSUB",
        }),
        CommandName::Compress => Some(Action::Answer(response::status(
            p.tag,
            "NO",
            Some("CANNOT"),
            "COMPRESS is not available through this gateway",
        ))),
        _ => None,
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    w.write_all(bytes).await
}

/// Backend to client: forwards response bytes untouched, noting BYE and response boundaries,
/// and writes the gateway's own answers between responses.
async fn downstream(
    backend: &mut ReadHalf<'_>,
    client: &mut WriteHalf<'_>,
    ahead: &mut Vec<u8>,
    progress: &Progress,
    opts: &RelayOptions,
    ctx: &RelayContext,
) -> DownEnd {
    let mut framer = Framer::new(opts.max_backend_line, u64::MAX);
    let mut slot = (!ahead.is_empty()).then(|| Buf::with(ahead));
    let mut filled = ahead.len();
    // The loop below runs for the whole session: do not keep the login-time buffer alive.
    // Borrowed rather than moved in, so that no layer holds a moved-from copy of it.
    *ahead = Vec::new();
    let mut saw_bye = false;
    // Set once a stop is asked or the other side parked for the autologout; from then on
    // every boundary is checked for a safe point.
    let mut stopping = false;
    // The backend accepted the outstanding IDLE with `+`.
    let mut idling = false;
    // The other side parked, and this side has taken note (a stop asked first leaves it to
    // be noted still: it is what says the client's side is at a boundary).
    let mut seen_parked = false;
    let mut stop_requested = stop_asked(progress);
    let mut stall_timer = None;
    loop {
        if filled > 0
            && let Some(buf) = slot.as_deref()
        {
            let mut pos = 0;
            while pos < filled {
                match framer.next(&buf[pos..filled]) {
                    Ok(Piece::Line { len, complete, .. }) => {
                        pos += len;
                        if complete && framer.at_message_start() {
                            let head = framer.head();
                            saw_bye |= is_bye(head);
                            progress.gate.observe(head);
                            match head.first() {
                                Some(b'*') => {}
                                Some(b'+') => idling = progress.idle.load(Ordering::Acquire),
                                _ => {
                                    idling = false;
                                    progress.pending().answered(head);
                                    progress.activity.touch();
                                }
                            }
                        }
                    }
                    Ok(Piece::LiteralData { len, .. }) => pos += len,
                    Err(e) => return DownEnd::Frame(e),
                }
            }
            if !deliver(client, &buf[..filled], opts.client_send, &mut stall_timer).await {
                return DownEnd::ClientGone;
            }
            filled = 0;
        }
        buf::normalize(&mut slot, 0);
        if let Some((from, to, left)) = splice_legs(opts, &framer, backend, client) {
            // The rest of a message body (FETCH BODY[] and the like), not a safe point: the
            // stop and injection checks below wait for the end of the response anyway.
            slot = None;
            let counters = &ctx.counters;
            match splice::transfer(from, to, left, true, opts.client_send, |n| {
                counters.backend_to_client.inc_by(n as u64);
                counters.spliced[1].inc_by(n as u64);
            })
            .await
            {
                Ok(true) => {
                    framer.skip_literal(left);
                    continue;
                }
                Ok(false) => {}
                Err(splice::SpliceError::Source) => {
                    return DownEnd::BackendClosed {
                        saw_bye,
                        at_boundary: false,
                    };
                }
                Err(splice::SpliceError::Sink) => return DownEnd::ClientGone,
            }
        }
        if framer.at_message_start() {
            while let Some(answer) = progress.injected() {
                if !deliver(client, &answer, opts.client_send, &mut stall_timer).await {
                    return DownEnd::ClientGone;
                }
            }
        }
        // A client that sent LOGOUT is ending the session itself.
        if stopping
            && progress.parked.load(Ordering::Acquire)
            && framer.at_message_start()
            && progress.inject_queue().is_empty()
            && !progress.logout.load(Ordering::Acquire)
        {
            let pending = progress.pending();
            if pending.is_empty() {
                return DownEnd::Stopped { idle: false };
            }
            if pending.only_one() && idling && progress.idle.load(Ordering::Acquire) {
                return DownEnd::Stopped { idle: true };
            }
        }
        tokio::select! {
            biased;
            // Completes once, and `stopping` keeps it from being polled again.
            _ = &mut stop_requested, if !stopping => stopping = true,
            signal = std::future::poll_fn(|cx| {
                progress.poll_down_signal(cx, seen_parked, framer.at_message_start())
            }) => match signal {
                // The autologout parks the other side without a stop: that starts the stopping.
                DownSignal::Parked => {
                    seen_parked = true;
                    stopping = true;
                }
                // Written at the top of the loop.
                DownSignal::Injected => {}
            },
            read = buf::read_into(backend, &mut slot, 0) => match read {
                Ok(0) | Err(_) => {
                    return DownEnd::BackendClosed {
                        saw_bye,
                        at_boundary: framer.at_message_start(),
                    }
                }
                Ok(n) => {
                    filled = n;
                    ctx.counters.backend_to_client.inc_by(n as u64);
                }
            }
        }
    }
}

const BYE: &[u8] = b"* BYE";

fn is_bye(head: &[u8]) -> bool {
    head.len() >= BYE.len() && head[..BYE.len()].eq_ignore_ascii_case(BYE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_autologout_is_far_away_not_a_panic() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(300 * 24 * 3600));
    }
}
