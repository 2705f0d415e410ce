//! The backend leg: connect, TLS or STARTTLS (verified), ID with the client's address, login
//! with the client's credentials or master credentials, and the post-login capabilities.

pub mod passdb;
pub mod resolve;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use self::resolve::Resolver;
use crate::proto::capability::Capabilities;
use crate::proto::proxy;
use crate::proto::response::{Status, capability_text, parse_status_line, push_quoted};
use crate::route::{Backend, BackendTls};
use crate::stream::Stream;
use crate::wire::{Event, MessageBuf, ReadError};

/// Longest literal we accept from a backend while logging in (an ID response); anything
/// bigger is not a login dialogue.
const LOGIN_MAX_LITERAL: u64 = 64 * 1024;
/// Longest response line while logging in; CAPABILITY lists of real servers are ~1 KiB.
const LOGIN_MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("connect to {backend}: {source}")]
    Connect {
        backend: String,
        source: std::io::Error,
    },
    #[error("TLS with {backend}: {source}")]
    Tls {
        backend: String,
        source: std::io::Error,
    },
    #[error("{backend}: timed out")]
    Timeout { backend: String },
    #[error("{backend}: connection lost: {reason}")]
    Lost { backend: String, reason: String },
    #[error("{backend}: unexpected answer: {detail}")]
    Protocol { backend: String, detail: String },
    #[error("{backend}: refused: {detail}")]
    Refused { backend: String, detail: String },
    #[error("{backend}: authentication failed")]
    AuthFailed { backend: String },
}

impl BackendError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect { .. } => "connect",
            BackendError::Tls { .. } => "tls",
            BackendError::Timeout { .. } => "timeout",
            BackendError::Lost { .. } => "lost",
            BackendError::Protocol { .. } => "protocol",
            BackendError::Refused { .. } => "refused",
            BackendError::AuthFailed { .. } => "auth_failed",
        }
    }
}

/// How the gateway logs in on the backend.
pub enum BackendCredentials<'a> {
    /// The client's own user name and password.
    Replay { user: &'a str, password: &'a [u8] },
    /// Master login on behalf of `user`.
    Master {
        user: &'a str,
        master_user: &'a str,
        master_password: &'a [u8],
    },
}

/// What the backend is told about the client (only when the backend is trusted).
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub session_id: String,
}

/// A logged-in backend connection, ready to relay.
pub struct BackendSession {
    pub stream: Stream,
    /// Bytes the backend sent after the login answer (untagged responses, normally none).
    pub leftover: Vec<u8>,
    /// The backend's post-login capabilities.
    pub capabilities: Capabilities,
}

pub struct Timeouts {
    pub connect: Duration,
    pub login: Duration,
}

/// Logs out of a session the gateway will not use after all (the user is over a limit):
/// LOGOUT, then up to `wait` for the backend to close, so it ends the session cleanly.
pub async fn logout(session: BackendSession, wait: Duration) {
    use tokio::io::AsyncReadExt;
    let mut stream = session.stream;
    let _ = tokio::time::timeout(wait, async {
        if stream.write_all(b"gwlimit LOGOUT\r\n").await.is_ok() {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Connects to `backend` (its host name resolved through `resolver`) and logs in. The whole
/// dialogue is bounded by the timeouts.
pub async fn login(
    backend: &Backend,
    creds: &BackendCredentials<'_>,
    client: &ClientInfo,
    timeouts: &Timeouts,
    resolver: &Resolver,
) -> Result<BackendSession, BackendError> {
    let timeout = |_| BackendError::Timeout {
        backend: backend.name.clone(),
    };
    let tcp = tokio::time::timeout(
        timeouts.connect,
        resolver.connect(&backend.host, backend.port),
    )
    .await
    .map_err(timeout)?
    .map_err(|source| BackendError::Connect {
        backend: backend.name.clone(),
        source,
    })?;
    // Commands and responses are small and latency-bound; Nagle would add delays.
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(
        timeouts.login,
        Dialogue::new(backend).run(tcp, creds, client),
    )
    .await
    .map_err(timeout)?
}

struct Dialogue<'b> {
    backend: &'b Backend,
    buf: MessageBuf,
    next_tag: u32,
}

impl<'b> Dialogue<'b> {
    fn new(backend: &'b Backend) -> Self {
        Self {
            backend,
            buf: MessageBuf::from_server(LOGIN_MAX_LINE, LOGIN_MAX_LITERAL),
            next_tag: 0,
        }
    }

    fn err_lost(&self, e: ReadError) -> BackendError {
        BackendError::Lost {
            backend: self.backend.name.clone(),
            reason: match e {
                ReadError::Io(e) => e.to_string(),
                ReadError::Closed => "closed by backend".into(),
                ReadError::Frame(e) => e.to_string(),
            },
        }
    }

    fn err_protocol(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            backend: self.backend.name.clone(),
            detail: detail.into(),
        }
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("gw{}", self.next_tag)
    }

    async fn tls(&self, tcp: TcpStream) -> Result<Stream, BackendError> {
        let err = |source| BackendError::Tls {
            backend: self.backend.name.clone(),
            source,
        };
        let config = self
            .backend
            .tls_config
            .clone()
            .ok_or_else(|| err(std::io::Error::other("no TLS configuration")))?;
        let name = rustls::pki_types::ServerName::try_from(self.backend.server_name.clone())
            .map_err(|e| err(std::io::Error::other(e)))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(err)?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }

    /// Reads one whole response; returns its bytes.
    async fn response(&mut self, stream: &mut Stream) -> Result<Vec<u8>, BackendError> {
        match self.buf.next(stream).await {
            Ok(Event::Message(len)) => Ok(self.buf.take(len)),
            Ok(Event::NeedContinuation) => Err(self.err_protocol("unexpected continuation")),
            Err(e) => Err(self.err_lost(e)),
        }
    }

    /// Reads responses until the one tagged `tag`; collects capabilities seen on the way.
    async fn until_tagged(
        &mut self,
        stream: &mut Stream,
        tag: &str,
        caps: &mut Option<Capabilities>,
    ) -> Result<(Status, Option<String>), BackendError> {
        loop {
            let resp = self.response(stream).await?;
            let line = resp.as_slice();
            if let Some(rest) = line.strip_prefix(b"* ") {
                if let Some(text) = std::str::from_utf8(rest).ok().and_then(capability_text) {
                    *caps = Some(Capabilities::parse(text));
                }
                if let Some(s) = parse_status_line(line)
                    && s.status == Status::Bye
                {
                    return Err(BackendError::Refused {
                        backend: self.backend.name.clone(),
                        detail: s.text.to_owned(),
                    });
                }
                continue;
            }
            if line.starts_with(b"+") {
                return Err(self.err_protocol("unexpected continuation request"));
            }
            let Some(s) = parse_status_line(line) else {
                return Err(self.err_protocol(String::from_utf8_lossy(line)));
            };
            if s.tag != tag {
                return Err(self.err_protocol(format!("unexpected tag {}", s.tag)));
            }
            if let Some(text) = s.code.and_then(capability_text) {
                *caps = Some(Capabilities::parse(text));
            }
            return Ok((s.status, s.code.map(str::to_owned)));
        }
    }

    /// Asks for the capability list (when the server did not volunteer it).
    async fn capabilities(&mut self, stream: &mut Stream) -> Result<Capabilities, BackendError> {
        let tag = self.tag();
        stream
            .write_all(format!("{tag} CAPABILITY\r\n").as_bytes())
            .await
            .map_err(|e| self.err_lost(ReadError::Io(e)))?;
        let mut caps = None;
        self.until_tagged(stream, &tag, &mut caps).await?;
        caps.ok_or_else(|| self.err_protocol("no CAPABILITY response"))
    }

    async fn run(
        mut self,
        mut tcp: TcpStream,
        creds: &BackendCredentials<'_>,
        client: &ClientInfo,
    ) -> Result<BackendSession, BackendError> {
        if self.backend.send_proxy_protocol {
            // The backend reads the header before anything else, a TLS handshake included.
            tcp.write_all(&proxy::encode_v2(client.peer, client.local))
                .await
                .map_err(|e| self.err_lost(ReadError::Io(e)))?;
        }
        let mut stream = match self.backend.tls {
            BackendTls::Implicit => self.tls(tcp).await?,
            _ => Stream::Plain(tcp),
        };
        // Greeting.
        let greeting = self.response(&mut stream).await?;
        let mut caps = None;
        match parse_status_line(&greeting) {
            Some(s) if s.tag == "*" && s.status == Status::Ok => {
                if let Some(text) = s.code.and_then(capability_text) {
                    caps = Some(Capabilities::parse(text));
                }
            }
            Some(s) if s.status == Status::Bye => {
                return Err(BackendError::Refused {
                    backend: self.backend.name.clone(),
                    detail: s.text.to_owned(),
                });
            }
            _ => return Err(self.err_protocol("bad greeting")),
        }

        if self.backend.tls == BackendTls::Starttls {
            let tag = self.tag();
            stream
                .write_all(format!("{tag} STARTTLS\r\n").as_bytes())
                .await
                .map_err(|e| self.err_lost(ReadError::Io(e)))?;
            let (status, _) = self.until_tagged(&mut stream, &tag, &mut caps).await?;
            if status != Status::Ok {
                return Err(self.err_protocol("STARTTLS refused"));
            }
            if !self.buf.bytes().is_empty() {
                return Err(self.err_protocol("data after STARTTLS response"));
            }
            let Stream::Plain(tcp) = stream else {
                return Err(self.err_protocol("STARTTLS on a TLS stream"));
            };
            stream = self.tls(tcp).await?;
            // Capabilities before TLS cannot be trusted.
            caps = None;
        }

        let caps = match caps {
            Some(c) => c,
            None => self.capabilities(&mut stream).await?,
        };

        // ID and the login command go out in one write: one round trip instead of two.
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        let id_tag = if self.backend.trusted && caps.has("ID") {
            let tag = self.tag();
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(b" ID (");
            let fields = [
                ("x-originating-ip", client.peer.ip().to_string()),
                ("x-originating-port", client.peer.port().to_string()),
                ("x-connected-ip", client.local.ip().to_string()),
                ("x-connected-port", client.local.port().to_string()),
                ("x-session-id", client.session_id.clone()),
            ];
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                push_quoted(&mut out, k.as_bytes());
                out.push(b' ');
                push_quoted(&mut out, v.as_bytes());
            }
            out.extend_from_slice(b")\r\n");
            Some(tag)
        } else {
            None
        };
        let login_tag = self.tag();
        let plain = caps.has("AUTH=PLAIN");
        let sasl_ir = caps.has("SASL-IR");
        let plain_response = |authz: &str, authc: &str, pass: &[u8]| {
            let mut raw = Zeroizing::new(Vec::with_capacity(authz.len() + authc.len() + 64));
            raw.extend_from_slice(authz.as_bytes());
            raw.push(0);
            raw.extend_from_slice(authc.as_bytes());
            raw.push(0);
            raw.extend_from_slice(pass);
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&raw[..]))
        };
        let sasl = match creds {
            BackendCredentials::Master {
                user,
                master_user,
                master_password,
            } => {
                if !plain {
                    return Err(self.err_protocol("master login needs AUTH=PLAIN"));
                }
                Some(plain_response(user, master_user, master_password))
            }
            BackendCredentials::Replay { user, password } if plain => {
                Some(plain_response("", user, password))
            }
            BackendCredentials::Replay { user, password } => {
                if caps.has("LOGINDISABLED") {
                    return Err(self.err_protocol("LOGINDISABLED and no AUTH=PLAIN"));
                }
                out.extend_from_slice(login_tag.as_bytes());
                out.extend_from_slice(b" LOGIN ");
                if !push_quoted(&mut out, user.as_bytes()) {
                    return Err(self.err_protocol("user name needs a literal"));
                }
                out.push(b' ');
                if !push_quoted(&mut out, password) {
                    if !caps.has("LITERAL+") {
                        return Err(self.err_protocol("password needs LITERAL+"));
                    }
                    out.extend_from_slice(format!("{{{}+}}\r\n", password.len()).as_bytes());
                    out.extend_from_slice(password);
                }
                out.extend_from_slice(b"\r\n");
                None
            }
        };
        let mut pending_sasl = None;
        if let Some(resp) = sasl {
            out.extend_from_slice(login_tag.as_bytes());
            out.extend_from_slice(b" AUTHENTICATE PLAIN");
            if sasl_ir {
                out.push(b' ');
                out.extend_from_slice(resp.as_bytes());
            } else {
                pending_sasl = Some(resp);
            }
            out.extend_from_slice(b"\r\n");
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| self.err_lost(ReadError::Io(e)))?;
        drop(out);

        let mut post_caps = None;
        if let Some(tag) = id_tag {
            // The ID answer does not matter: an untrusting backend just ignores the fields.
            self.until_tagged(&mut stream, &tag, &mut post_caps).await?;
        }
        if let Some(resp) = pending_sasl {
            let cont = self.response(&mut stream).await?;
            if !cont.starts_with(b"+") {
                return Err(self.err_protocol("no continuation for AUTHENTICATE"));
            }
            let mut line = Zeroizing::new(resp.as_bytes().to_vec());
            line.extend_from_slice(b"\r\n");
            stream
                .write_all(&line)
                .await
                .map_err(|e| self.err_lost(ReadError::Io(e)))?;
        }
        let mut login_caps = None;
        let (status, code) = self
            .until_tagged(&mut stream, &login_tag, &mut login_caps)
            .await?;
        match status {
            Status::Ok => {}
            Status::No
                if code.as_deref().is_none_or(|c| {
                    c.eq_ignore_ascii_case("AUTHENTICATIONFAILED")
                        || c.eq_ignore_ascii_case("AUTHORIZATIONFAILED")
                }) =>
            {
                return Err(BackendError::AuthFailed {
                    backend: self.backend.name.clone(),
                });
            }
            _ => {
                return Err(BackendError::Refused {
                    backend: self.backend.name.clone(),
                    detail: code.unwrap_or_default(),
                });
            }
        }
        let capabilities = match login_caps {
            Some(c) => c,
            None => self.capabilities(&mut stream).await?,
        };
        Ok(BackendSession {
            stream,
            leftover: self.buf.into_remaining(),
            capabilities,
        })
    }
}
