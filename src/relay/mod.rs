//! The relay for a session on one backend. Both directions are framed (lines and literals,
//! no decoding) so the relay knows where each command and response starts: that is where it
//! intercepts the few commands it must (RLIST/RLSUB on backends without MAILBOX-REFERRALS,
//! COMPRESS) and the only place it may inject a response of its own. Everything else passes
//! through as the bytes that were read, from a buffer allocated once per direction.

mod gate;
pub mod murder;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::proto::framer::{FrameError, Framer, HEAD_LEN, Piece};
use crate::proto::prescan::{CommandName, prescan, tag_of};
use crate::proto::response;
use crate::stream::Stream;

/// Read buffer per direction. 16 KiB matches a TLS record, so one read is one record.
const BUF_SIZE: usize = 16 * 1024;
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
}

/// How a relayed session ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The backend closed after saying BYE (LOGOUT, or its own autologout).
    BackendBye,
    /// The backend went away without BYE; the client was told.
    BackendLost,
    /// The client went away; the backend was logged out.
    ClientGone,
    /// A side broke the protocol's framing limits; both were closed.
    Error(RelayError),
}

/// Relays between a logged-in client and its backend until one side ends.
/// `client_ahead` are command bytes the client pipelined behind its login; `backend_ahead`
/// are response bytes the backend sent behind its login answer.
pub async fn run(
    client: Stream,
    client_ahead: Vec<u8>,
    backend: Stream,
    backend_ahead: Vec<u8>,
    opts: &RelayOptions,
) -> RelayEnd {
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut backend_r, mut backend_w) = tokio::io::split(backend);
    let (inject_tx, inject_rx) = mpsc::channel(INJECT_QUEUE);
    let gate = gate::LiteralGate::default();
    // Whether the backend stands between two of the client's commands. Only the
    // client-to-backend side knows; it decides whether a LOGOUT may be sent for a client
    // that went away, whichever side noticed: a LOGOUT inside an APPEND literal would
    // become part of the message.
    let commands_at_boundary = AtomicBool::new(true);

    let outcome = {
        let up = upstream(
            &mut client_r,
            &mut backend_w,
            client_ahead,
            inject_tx,
            &gate,
            &commands_at_boundary,
            opts,
        );
        let down = downstream(
            &mut backend_r,
            &mut client_w,
            backend_ahead,
            inject_rx,
            &gate,
            opts,
        );
        tokio::select! {
            u = up => Outcome::Up(u),
            d = down => Outcome::Down(d),
        }
    };

    match outcome {
        Outcome::Up(UpEnd::ClientGone) | Outcome::Down(DownEnd::ClientGone) => {
            logout_backend(
                &mut backend_r,
                &mut backend_w,
                commands_at_boundary.load(Ordering::Acquire),
                opts.backend_logout,
            )
            .await;
            RelayEnd::ClientGone
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

const BACKEND_LOST: &[u8] = b"* BYE [UNAVAILABLE] Backend connection lost\r\n";

/// Says a last word to the client (when there is one) and closes its sending side.
async fn close_client<W: AsyncWrite + Unpin>(w: &mut W, last_word: Option<&[u8]>) {
    if let Some(bye) = last_word {
        let _ = w.write_all(bye).await;
    }
    let _ = w.shutdown().await;
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
}

enum DownEnd {
    BackendClosed { saw_bye: bool, at_boundary: bool },
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
async fn upstream<R, W>(
    client: &mut R,
    backend: &mut W,
    ahead: Vec<u8>,
    inject: mpsc::Sender<Vec<u8>>,
    gate: &gate::LiteralGate,
    at_boundary: &AtomicBool,
    opts: &RelayOptions,
) -> UpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = Framer::new(opts.max_command_line, opts.max_literal);
    let mut buf = vec![0u8; BUF_SIZE.max(ahead.len())];
    buf[..ahead.len()].copy_from_slice(&ahead);
    let mut filled = ahead.len();
    // The loop below runs for the whole session: do not keep the login-time buffer alive.
    drop(ahead);
    at_boundary.store(filled == 0, Ordering::Release);
    // When set, the current message is swallowed and this answer is sent once it ends.
    let mut swallow: Option<Vec<u8>> = None;
    loop {
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
                    if first
                        && swallow.is_none()
                        && let Some(action) = intercept(&buf[pos..filled], opts)
                    {
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
                    && inject.send(answer).await.is_err()
                {
                    return UpEnd::ClientGone;
                }
            } else if sync_literal {
                // The backend answers the announcing line with `+` or with a refusal; which
                // one decides whether the client's next bytes are the literal.
                // Armed before the line goes out, so the answer cannot come first.
                let armed = tag_of(framer.head()).is_some_and(|tag| gate.arm(tag));
                if write(backend, &buf[out_start..pos]).await.is_err() {
                    return UpEnd::BackendGone;
                }
                out_start = pos;
                if armed && gate.verdict().await == gate::Verdict::Refused {
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
        if buf.len() > BUF_SIZE && filled < BUF_SIZE {
            buf.truncate(BUF_SIZE);
            buf.shrink_to_fit();
        }
        at_boundary.store(framer.at_message_start() && filled == 0, Ordering::Release);
        match client.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return UpEnd::ClientGone,
            Ok(n) => filled += n,
        }
        // From here until the next read the backend may hold part of a command.
        at_boundary.store(false, Ordering::Release);
    }
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
fn intercept(line: &[u8], opts: &RelayOptions) -> Option<Action> {
    let p = prescan(line)?;
    match p.name {
        CommandName::Rlist if opts.rewrite_referrals => Some(Action::Rewrite {
            name: p.name_range,
            with: b"LIST",
        }),
        CommandName::Rlsub if opts.rewrite_referrals => Some(Action::Rewrite {
            name: p.name_range,
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
async fn downstream<R, W>(
    backend: &mut R,
    client: &mut W,
    ahead: Vec<u8>,
    mut inject: mpsc::Receiver<Vec<u8>>,
    gate: &gate::LiteralGate,
    opts: &RelayOptions,
) -> DownEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = Framer::new(opts.max_backend_line, u64::MAX);
    let mut buf = vec![0u8; BUF_SIZE.max(ahead.len())];
    buf[..ahead.len()].copy_from_slice(&ahead);
    let mut filled = ahead.len();
    // The loop below runs for the whole session: do not keep the login-time buffer alive.
    drop(ahead);
    let mut saw_bye = false;
    let mut inject_open = true;
    loop {
        if filled > 0 {
            let mut pos = 0;
            while pos < filled {
                match framer.next(&buf[pos..filled]) {
                    Ok(Piece::Line { len, complete, .. }) => {
                        pos += len;
                        if complete && framer.at_message_start() {
                            saw_bye |= is_bye(framer.head());
                            gate.observe(framer.head());
                        }
                    }
                    Ok(Piece::LiteralData { len, .. }) => pos += len,
                    Err(e) => return DownEnd::Frame(e),
                }
            }
            if client.write_all(&buf[..filled]).await.is_err() {
                return DownEnd::ClientGone;
            }
            filled = 0;
        }
        if buf.len() > BUF_SIZE {
            buf.truncate(BUF_SIZE);
            buf.shrink_to_fit();
        }
        tokio::select! {
            biased;
            answer = inject.recv(), if inject_open && framer.at_message_start() => {
                match answer {
                    Some(answer) => {
                        if client.write_all(&answer).await.is_err() {
                            return DownEnd::ClientGone;
                        }
                    }
                    None => inject_open = false,
                }
            }
            read = backend.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    return DownEnd::BackendClosed {
                        saw_bye,
                        at_boundary: framer.at_message_start(),
                    }
                }
                Ok(n) => filled = n,
            }
        }
    }
}

const BYE: &[u8] = b"* BYE";

fn is_bye(head: &[u8]) -> bool {
    head.len() >= BYE.len() && head[..BYE.len()].eq_ignore_ascii_case(BYE)
}
