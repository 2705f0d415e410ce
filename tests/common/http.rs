//! A tiny HTTP/1.1 client for the admin server: one request per connection
//! (`Connection: close`), the response read to EOF. Hand-written and independent of hyper, so
//! the tests see the bytes a scraper or curl would.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::imap::WAIT;

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics (with the body) if it is not.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Sends one request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    let raw = tokio::time::timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect to admin");
        tcp.write_all(req.as_bytes()).await.expect("send request");
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.expect("read response");
        raw
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {target}: no response in time"));
    parse(&raw).unwrap_or_else(|| panic!("{method} {target}: bad response {raw:?}"))
}

pub async fn get(addr: SocketAddr, target: &str) -> HttpResponse {
    request(addr, "GET", target, &[]).await
}

pub async fn post(addr: SocketAddr, target: &str) -> HttpResponse {
    request(addr, "POST", target, &[]).await
}

fn parse(raw: &[u8]) -> Option<HttpResponse> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    if parts.next()? != "HTTP/1.1" {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect::<Option<_>>()?;
    let response = HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    };
    // The server always knows the length of what it sends: no chunked bodies to undo.
    let len: usize = response.header("content-length")?.parse().ok()?;
    (len == response.body.len()).then_some(response)
}

/// Sends `bytes` as they are and returns whatever comes back until the server closes.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    tokio::time::timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect to admin");
        tcp.write_all(bytes).await.expect("send");
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.expect("read");
        out
    })
    .await
    .expect("the server neither answered nor closed in time")
}
