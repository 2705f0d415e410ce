//! The pre-login dialogue: greeting, CAPABILITY, NOOP, LOGOUT, STARTTLS, ID, LOGIN and
//! AUTHENTICATE (PLAIN, LOGIN; SASL-IR). It never talks to a backend: it hands the session a
//! login attempt (user and password), and the session reports back whether it succeeded.

mod sasl;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::Limits;
use crate::metrics::{Limit, ListenerCounters, TlsResult};
use crate::proto::capability;
use crate::proto::command::{DecodeFailure, Mechanism, PreauthCommand, decode_preauth};
use crate::proto::framer::FrameError;
use crate::proto::prescan::{self, CommandName};
use crate::proto::response::status;
use crate::shutdown::{Stop, StopReason};
use crate::stream::Stream;
use crate::wire::{Event, MessageBuf, ReadError};

/// What the listener tells the pre-auth dialogue.
pub struct ListenerCtx {
    pub name: String,
    /// Present when the listener can do TLS (implicit, or STARTTLS on a plain listener).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub allow_plaintext_auth: bool,
    pub metrics: ListenerCounters,
}

/// A client's login request, for the session to check against a backend.
pub struct LoginAttempt {
    pub tag: Vec<u8>,
    pub user: String,
    pub password: Zeroizing<Vec<u8>>,
    pub mechanism: &'static str,
}

impl std::fmt::Debug for LoginAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginAttempt")
            .field("user", &self.user)
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

/// Why the dialogue ended without a login.
#[derive(Debug, PartialEq, Eq)]
pub enum PreauthEnd {
    Logout,
    Closed,
    Timeout,
    TooManyBadCommands,
    TooManyAuthFailures,
    /// A command line over `max_preauth_line` (`literal: false`) or a literal over
    /// `max_preauth_literal`.
    TooBig {
        literal: bool,
    },
    TlsFailed,
    /// The gateway is shutting down, or the administrator ended the session: BYE.
    Shutdown,
}

impl PreauthEnd {
    /// The limit that ended the dialogue, if one did.
    pub fn limit(&self) -> Option<Limit> {
        match self {
            PreauthEnd::Timeout => Some(Limit::PreauthTimeout),
            PreauthEnd::TooManyBadCommands => Some(Limit::BadCommands),
            PreauthEnd::TooManyAuthFailures => Some(Limit::AuthFailures),
            PreauthEnd::TooBig { literal: false } => Some(Limit::PreauthLine),
            PreauthEnd::TooBig { literal: true } => Some(Limit::PreauthLiteral),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            PreauthEnd::Logout => "logout",
            PreauthEnd::Closed => "closed",
            PreauthEnd::Timeout => "timeout",
            PreauthEnd::TooManyBadCommands => "bad_commands",
            PreauthEnd::TooManyAuthFailures => "auth_failures",
            PreauthEnd::TooBig { .. } => "too_big",
            PreauthEnd::TlsFailed => "tls_failed",
            PreauthEnd::Shutdown => "shutdown",
        }
    }
}

/// One connection's pre-login state.
pub struct Preauth {
    stream: Option<Stream>,
    buf: MessageBuf,
    listener: Arc<ListenerCtx>,
    limits: Limits,
    deadline: Instant,
    bad_commands: u32,
    auth_failures: u32,
    stop: Stop,
}

impl Preauth {
    pub fn new(
        stream: Stream,
        listener: Arc<ListenerCtx>,
        limits: Limits,
        deadline: Instant,
        stop: Stop,
    ) -> Self {
        let buf = MessageBuf::from_client(limits.max_preauth_line, limits.max_preauth_literal);
        Self {
            stream: Some(stream),
            buf,
            listener,
            limits,
            deadline,
            bad_commands: 0,
            auth_failures: 0,
            stop,
        }
    }

    fn stream(&mut self) -> Result<&mut Stream, PreauthEnd> {
        self.stream.as_mut().ok_or(PreauthEnd::Closed)
    }

    fn tls_active(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::is_tls)
    }

    fn auth_allowed(&self) -> bool {
        self.tls_active() || self.listener.allow_plaintext_auth
    }

    fn capabilities(&self) -> String {
        capability::preauth(
            self.tls_active(),
            self.listener.tls.is_some(),
            self.listener.allow_plaintext_auth,
        )
    }

    /// Writes to the client within the pre-auth deadline: a client that does not read its
    /// answers must not hold the session past it. Once the deadline has passed, a write still
    /// gets one try (a BYE fits in the socket buffer of a client that reads).
    async fn send(&mut self, bytes: &[u8]) -> Result<(), PreauthEnd> {
        let deadline = self.deadline;
        let stream = self.stream()?;
        match tokio::time::timeout_at(deadline, stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(PreauthEnd::Closed),
            Err(_) => Err(PreauthEnd::Timeout),
        }
    }

    /// Closes the sending side (TLS close_notify, then FIN), within the deadline as well.
    async fn close(&mut self) {
        let deadline = self.deadline;
        if let Ok(s) = self.stream() {
            let _ = tokio::time::timeout_at(deadline, s.shutdown()).await;
        }
    }

    /// Sends BYE and ends the dialogue with `end`.
    async fn bye(&mut self, code: Option<&str>, text: &str, end: PreauthEnd) -> PreauthEnd {
        let _ = self.send(&status(b"", "BYE", code, text)).await;
        self.close().await;
        end
    }

    pub async fn greet(&mut self) -> Result<(), PreauthEnd> {
        let caps = format!("CAPABILITY {}", self.capabilities());
        let greeting = status(b"", "OK", Some(&caps), "imap-gateway ready.");
        self.send(&greeting).await
    }

    /// Counts an invalid command; BYE once there were too many.
    async fn bad(&mut self, answer: Vec<u8>) -> Result<(), PreauthEnd> {
        self.send(&answer).await?;
        self.bad_commands += 1;
        if self.bad_commands >= self.limits.max_bad_commands {
            return Err(self
                .bye(
                    None,
                    "Too many invalid commands.",
                    PreauthEnd::TooManyBadCommands,
                )
                .await);
        }
        Ok(())
    }

    /// Reads the next whole command, answering `+` to synchronizing literals within limits.
    async fn read_command(&mut self) -> Result<Vec<u8>, PreauthEnd> {
        loop {
            let stream = self.stream.as_mut().ok_or(PreauthEnd::Closed)?;
            // Waiting for a command is this dialogue's only safe point: a shutdown ends it
            // here, never in the middle of a login or a TLS handshake.
            let next = tokio::select! {
                // A command already sent does not outrun the stop: it would start a backend
                // login only to be told BYE.
                biased;
                _ = self.stop.requested() => {
                    let text = match self.stop.reason() {
                        StopReason::Shutdown => "Server shutting down, please reconnect.",
                        StopReason::Kick => "Session ended by the administrator.",
                    };
                    return Err(self.bye(Some("UNAVAILABLE"), text, PreauthEnd::Shutdown).await);
                }
                next = tokio::time::timeout_at(self.deadline, self.buf.next(stream)) => next,
            };
            match next {
                Err(_) => {
                    return Err(self
                        .bye(None, "Disconnected for inactivity.", PreauthEnd::Timeout)
                        .await);
                }
                Ok(Ok(Event::Message(len))) => return Ok(self.buf.take(len)),
                Ok(Ok(Event::NeedContinuation)) => {
                    let head = self.buf.bytes();
                    if let Some(p) = prescan::prescan(head)
                        && p.name == CommandName::Login
                    {
                        // Refuse now rather than invite a password in clear with `+`.
                        let tag = p.tag.to_vec();
                        if self.refused_in_clear(&tag).await? {
                            // The client waits for `+`: nothing more of this command comes.
                            self.buf.clear();
                            continue;
                        }
                    }
                    self.send(b"+ Ready for literal data\r\n").await?;
                }
                Ok(Err(ReadError::Frame(e))) => {
                    let tag = prescan::tag_of(self.buf.bytes()).map(<[u8]>::to_vec);
                    let text = match e {
                        FrameError::LineTooLong { .. } => "Command line too long.",
                        FrameError::LiteralTooLarge { .. } => "Literal too large.",
                        FrameError::MessageTooLong { .. } => "Command too long.",
                    };
                    let literal = matches!(e, FrameError::LiteralTooLarge { .. });
                    if let (Some(tag), true) = (tag, literal) {
                        let _ = self.send(&status(&tag, "BAD", Some("TOOBIG"), text)).await;
                    }
                    let end = PreauthEnd::TooBig { literal };
                    return Err(self.bye(Some("TOOBIG"), text, end).await);
                }
                Ok(Err(ReadError::Closed | ReadError::Io(_))) => return Err(PreauthEnd::Closed),
            }
        }
    }

    /// Runs the dialogue until the client asks to log in.
    pub async fn next_login(&mut self) -> Result<LoginAttempt, PreauthEnd> {
        loop {
            let framed = self.read_command().await?;
            let (tag, command) = match decode_preauth(&framed) {
                Ok(decoded) => decoded,
                Err(DecodeFailure::Malformed { tag }) => {
                    let answer = match tag {
                        Some(tag) => status(&tag, "BAD", None, "Syntax error."),
                        None => status(b"", "BAD", None, "Syntax error: no tag."),
                    };
                    self.bad(answer).await?;
                    continue;
                }
            };
            match command {
                PreauthCommand::Capability => {
                    let caps = format!("* CAPABILITY {}\r\n", self.capabilities());
                    let mut out = caps.into_bytes();
                    out.extend(status(&tag, "OK", None, "Pre-login capabilities listed."));
                    self.send(&out).await?;
                }
                PreauthCommand::Noop => {
                    self.send(&status(&tag, "OK", None, "NOOP completed."))
                        .await?
                }
                PreauthCommand::Logout => {
                    let mut out = status(b"", "BYE", None, "Logging out.");
                    out.extend(status(&tag, "OK", None, "Logout completed."));
                    let _ = self.send(&out).await;
                    self.close().await;
                    return Err(PreauthEnd::Logout);
                }
                PreauthCommand::Id => {
                    let mut out = b"* ID (\"name\" \"imap-gateway\")\r\n".to_vec();
                    out.extend(status(&tag, "OK", None, "ID completed."));
                    self.send(&out).await?;
                }
                PreauthCommand::StartTls => self.starttls(&tag).await?,
                PreauthCommand::Login { user, password } => {
                    if self.refused_in_clear(&tag).await? {
                        continue;
                    }
                    return Ok(LoginAttempt {
                        tag,
                        user,
                        password,
                        mechanism: "login",
                    });
                }
                PreauthCommand::Authenticate {
                    mechanism,
                    initial_response,
                } => {
                    let Some(mechanism) = mechanism else {
                        self.bad(status(
                            &tag,
                            "NO",
                            None,
                            "Unsupported authentication mechanism.",
                        ))
                        .await?;
                        continue;
                    };
                    if self.refused_in_clear(&tag).await? {
                        continue;
                    }
                    match self.sasl(&tag, mechanism, initial_response).await? {
                        Some((user, password)) => {
                            return Ok(LoginAttempt {
                                tag,
                                user,
                                password,
                                mechanism: match mechanism {
                                    Mechanism::Plain => "plain",
                                    Mechanism::Login => "sasl_login",
                                },
                            });
                        }
                        None => continue,
                    }
                }
                PreauthCommand::NotAllowed(name) => {
                    let text = match name {
                        CommandName::Other => {
                            "Unknown command or not allowed before login.".to_owned()
                        }
                        name => format!(
                            "{} is not allowed before login.",
                            name.label().to_ascii_uppercase()
                        ),
                    };
                    self.bad(status(&tag, "BAD", None, &text)).await?;
                }
            }
        }
    }

    /// Refuses authentication on a cleartext connection unless the listener allows it.
    /// Returns true when the command was refused (and answered).
    async fn refused_in_clear(&mut self, tag: &[u8]) -> Result<bool, PreauthEnd> {
        if self.auth_allowed() {
            return Ok(false);
        }
        let text = if self.listener.tls.is_some() {
            "Plaintext authentication is disabled; use STARTTLS."
        } else {
            "Plaintext authentication is disabled on this connection."
        };
        self.bad(status(tag, "NO", Some("PRIVACYREQUIRED"), text))
            .await?;
        Ok(true)
    }

    async fn starttls(&mut self, tag: &[u8]) -> Result<(), PreauthEnd> {
        let acceptor = match (&self.listener.tls, self.tls_active()) {
            (_, true) => {
                return self
                    .bad(status(tag, "BAD", None, "TLS is already active."))
                    .await;
            }
            (None, _) => {
                return self
                    .bad(status(tag, "BAD", None, "STARTTLS is not available."))
                    .await;
            }
            (Some(a), false) => a.clone(),
        };
        self.send(&status(tag, "OK", None, "Begin TLS negotiation now."))
            .await?;
        // Whatever the client sent after STARTTLS arrived in clear and could have been
        // injected by an attacker: it must not be executed after the handshake.
        self.buf.clear();
        let Some(Stream::Plain(tcp)) = self.stream.take() else {
            return Err(PreauthEnd::Closed);
        };
        let handshake = tokio::time::timeout_at(self.deadline, acceptor.accept(tcp)).await;
        let counters = &self.listener.metrics;
        match handshake {
            Ok(Ok(tls)) => {
                counters.tls(true, TlsResult::Ok);
                if crate::tls::resumed(tls.get_ref().1) {
                    counters.tls_resumed(true);
                }
                self.stream = Some(Stream::Tls(Box::new(tls.into())));
                Ok(())
            }
            Ok(Err(_)) => {
                counters.tls(true, TlsResult::Failed);
                Err(PreauthEnd::TlsFailed)
            }
            Err(_) => {
                counters.tls(true, TlsResult::Timeout);
                Err(PreauthEnd::Timeout)
            }
        }
    }

    /// Runs a SASL exchange; None when it was cancelled or malformed (already answered).
    async fn sasl(
        &mut self,
        tag: &[u8],
        mechanism: Mechanism,
        initial: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Option<(String, Zeroizing<Vec<u8>>)>, PreauthEnd> {
        let mut exchange = sasl::Exchange::new(mechanism, initial);
        loop {
            match exchange.step() {
                sasl::Step::Challenge(challenge) => {
                    self.send(challenge).await?;
                    let line = self.read_sasl_line().await?;
                    exchange.respond(&line);
                }
                sasl::Step::Done { user, password } => return Ok(Some((user, password))),
                sasl::Step::Cancelled => {
                    self.bad(status(tag, "BAD", None, "Authentication cancelled."))
                        .await?;
                    return Ok(None);
                }
                sasl::Step::Malformed => {
                    self.bad(status(tag, "BAD", None, "Invalid SASL response."))
                        .await?;
                    return Ok(None);
                }
            }
        }
    }

    async fn read_sasl_line(&mut self) -> Result<Zeroizing<Vec<u8>>, PreauthEnd> {
        let stream = self.stream.as_mut().ok_or(PreauthEnd::Closed)?;
        match tokio::time::timeout_at(self.deadline, self.buf.next_line(stream)).await {
            Err(_) => Err(self
                .bye(None, "Disconnected for inactivity.", PreauthEnd::Timeout)
                .await),
            Ok(Ok(len)) => Ok(Zeroizing::new(self.buf.take(len))),
            Ok(Err(ReadError::Frame(_))) => Err(self
                .bye(
                    Some("TOOBIG"),
                    "Line too long.",
                    PreauthEnd::TooBig { literal: false },
                )
                .await),
            Ok(Err(_)) => Err(PreauthEnd::Closed),
        }
    }

    /// Ends the dialogue at the pre-auth deadline (reached outside it: an auth penalty that
    /// would outlast it).
    pub async fn time_out(&mut self) -> PreauthEnd {
        self.bye(None, "Disconnected for inactivity.", PreauthEnd::Timeout)
            .await
    }

    /// Tells the client its login failed; BYE once there were too many failures.
    pub async fn reject_login(
        &mut self,
        tag: &[u8],
        code: &str,
        text: &str,
    ) -> Result<(), PreauthEnd> {
        self.send(&status(tag, "NO", Some(code), text)).await?;
        self.auth_failures += 1;
        if self.auth_failures >= self.limits.max_auth_failures {
            return Err(self
                .bye(
                    None,
                    "Too many authentication failures.",
                    PreauthEnd::TooManyAuthFailures,
                )
                .await);
        }
        Ok(())
    }

    /// The secured client stream and the bytes it sent ahead of the login answer.
    pub fn into_parts(self) -> Result<(Stream, Vec<u8>), PreauthEnd> {
        let stream = self.stream.ok_or(PreauthEnd::Closed)?;
        Ok((stream, self.buf.into_remaining()))
    }
}
