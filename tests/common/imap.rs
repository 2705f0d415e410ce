//! A small, independent IMAP test client: sends raw command text and reads whole responses
//! (literals included) up to a tagged completion. It deliberately shares no code with the
//! gateway's framer, so a framing bug cannot hide in both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Generous bound on any single wait in tests; a hang fails the test instead of stalling CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `addr` from the loopback address `source` (tests that need clients from
/// several addresses: per-address limits, PROXY headers).
pub async fn tcp_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let tcp = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp
}

pub struct Client {
    io: BufReader<Box<dyn Io>>,
    next_tag: u32,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client::from_io(Box::new(tcp))
    }

    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        Client::from_io(Box::new(tls))
    }

    pub fn from_io(io: Box<dyn Io>) -> Client {
        Client {
            io: BufReader::new(io),
            next_tag: 0,
        }
    }

    /// Takes the underlying stream back (for STARTTLS).
    pub fn into_inner(self) -> Box<dyn Io> {
        assert!(self.io.buffer().is_empty(), "unread bytes before TLS");
        self.io.into_inner()
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("write");
    }

    /// Writes `bytes` where the gateway may have closed the connection already.
    pub async fn try_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(WAIT, self.io.get_mut().write_all(bytes))
            .await
            .expect("timed out writing")
    }

    /// Reads one response line, with any literals it announces inlined.
    pub async fn read_response(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, self.read_response_inner())
            .await
            .expect("timed out waiting for a response")
    }

    /// Like read_response but returns None on EOF.
    pub async fn try_read_response(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(WAIT, self.read_response_opt())
            .await
            .expect("timed out waiting for a response")
    }

    async fn read_response_inner(&mut self) -> Vec<u8> {
        self.read_response_opt().await.expect("connection closed")
    }

    async fn read_response_opt(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let start = out.len();
            let n = self.io.read_until(b'\n', &mut out).await.ok()?;
            if n == 0 {
                return if out.is_empty() { None } else { Some(out) };
            }
            let line = &out[start..];
            match literal_len(line) {
                Some(len) => {
                    let mut lit = vec![0; len];
                    self.io.read_exact(&mut lit).await.ok()?;
                    out.extend_from_slice(&lit);
                }
                None => return Some(out),
            }
        }
    }

    /// Reads exactly `n` bytes, whatever they are (part of a response).
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut out = vec![0; n];
        tokio::time::timeout(WAIT, self.io.read_exact(&mut out))
            .await
            .expect("timed out reading")
            .expect("read");
        out
    }

    /// Reads until EOF; returns everything read.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, self.io.read_to_end(&mut out))
            .await
            .expect("timed out waiting for EOF")
            .ok();
        out
    }

    pub fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("t{}", self.next_tag)
    }

    /// Sends `tag command` and returns all responses up to and including the tagged one.
    pub async fn cmd(&mut self, command: &str) -> String {
        let tag = self.tag();
        self.write(format!("{tag} {command}\r\n").as_bytes()).await;
        self.until_tagged(&tag).await
    }

    /// Reads responses until the one tagged `tag`.
    pub async fn until_tagged(&mut self, tag: &str) -> String {
        let mut all = Vec::new();
        loop {
            let resp = self.read_response().await;
            let done = resp.starts_with(format!("{tag} ").as_bytes());
            all.extend_from_slice(&resp);
            if done {
                return String::from_utf8_lossy(&all).into_owned();
            }
        }
    }

    /// Greeting, then LOGIN; panics unless it succeeds.
    pub async fn login(&mut self, user: &str, password: &str) -> String {
        let greeting = self.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        let r = self.cmd(&format!("LOGIN \"{user}\" \"{password}\"")).await;
        assert!(tagged_ok(&r), "login failed: {r}");
        r
    }
}

/// The size of a literal announced at the end of `line`.
pub fn literal_len(line: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix("\r\n")?.strip_suffix('}')?;
    let open = s.rfind('{')?;
    s[open + 1..].trim_end_matches('+').parse().ok()
}

/// Whether the last line of a response is a tagged OK.
pub fn tagged_ok(resp: &str) -> bool {
    last_line(resp).split(' ').nth(1) == Some("OK")
}

pub fn last_line(resp: &str) -> &str {
    resp.trim_end().rsplit("\r\n").next().unwrap_or("")
}
