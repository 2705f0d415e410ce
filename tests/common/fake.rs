//! A scripted fake backend, only for faults a real server will not produce on demand
//! (dying at a chosen moment, garbage). It greets, accepts any login, then follows a script.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the fake does after a successful login.
#[derive(Clone, Copy, Debug)]
pub enum AfterLogin {
    /// Close the connection when the next command arrives.
    DieOnNextCommand,
    /// Send a response line longer than any sane limit, in pieces, without a newline.
    EndlessLine,
}

/// Starts a fake backend on a free loopback port; it serves connections until the test ends.
pub async fn start(after: AfterLogin) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(sock, after));
        }
    });
    addr
}

async fn serve(sock: tokio::net::TcpStream, after: AfterLogin) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    let caps = "IMAP4rev1 SASL-IR AUTH=PLAIN ID";
    let _ = w
        .write_all(format!("* OK [CAPABILITY {caps}] fake ready\r\n").as_bytes())
        .await;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let tag = line.split(' ').next().unwrap_or("*").to_owned();
        let upper = line.to_ascii_uppercase();
        if upper.contains(" AUTHENTICATE ") || upper.contains(" LOGIN ") {
            let _ = w
                .write_all(format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n").as_bytes())
                .await;
            break;
        }
        let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
    }
    line.clear();
    let _ = r.read_line(&mut line).await;
    match after {
        AfterLogin::DieOnNextCommand => {}
        AfterLogin::EndlessLine => {
            let chunk = vec![b'x'; 64 * 1024];
            let _ = w.write_all(b"* OK ").await;
            for _ in 0..1024 {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Received command lines (with any LITERAL+ literal inlined), in order.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A backend that greets with `caps`, accepts any LOGIN, answers every other command OK, and
/// records every command it receives. For protocol paths a real server cannot be set up to
/// take (e.g. no AUTH=PLAIN at all).
pub async fn start_recording(caps: &'static str) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                let _ = w
                    .write_all(format!("* OK [CAPABILITY {caps}] fake ready\r\n").as_bytes())
                    .await;
                loop {
                    let mut command = Vec::new();
                    loop {
                        let start = command.len();
                        if r.read_until(b'\n', &mut command).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = String::from_utf8_lossy(&command[start..]).into_owned();
                        let Some(n) = line
                            .strip_suffix("+}\r\n")
                            .and_then(|l| l.rsplit_once('{'))
                            .and_then(|(_, n)| n.parse::<usize>().ok())
                        else {
                            break;
                        };
                        let mut lit = vec![0; n];
                        if r.read_exact(&mut lit).await.is_err() {
                            return;
                        }
                        command.extend_from_slice(&lit);
                    }
                    record.lock().unwrap().push(command.clone());
                    let tag = String::from_utf8_lossy(&command)
                        .split(' ')
                        .next()
                        .unwrap_or("*")
                        .to_owned();
                    let upper = String::from_utf8_lossy(&command).to_ascii_uppercase();
                    if upper.contains(" CAPABILITY") {
                        let _ = w
                            .write_all(format!("* CAPABILITY {caps}\r\n").as_bytes())
                            .await;
                    }
                    let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
                }
            });
        }
    });
    (addr, seen)
}

/// A fault a scripted backend produces on demand, at the stage a real server never would.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Accepts the connection and says nothing; closes once the gateway does.
    StallGreeting,
    /// Greets with these bytes instead of `* OK`.
    GarbageGreeting(&'static [u8]),
    /// Answers the login command with these bytes, then waits for the gateway to close.
    GarbageLogin(&'static [u8]),
    /// After login, answers the first FETCH with `* 1 FETCH (BODY[] {size}` and only `sent`
    /// bytes of the literal, then closes.
    DieMidFetch { size: usize, sent: usize },
    /// After login, answers the first APPEND with `+`, reads `read` bytes of its literal
    /// (0: none) and closes.
    DieMidAppend { read: usize },
    /// After login, answers every command with these bytes, then a tagged OK.
    GarbageAfterLogin(&'static [u8]),
    /// Accepts STARTTLS and, in the same write, adds a response of its own after the OK,
    /// as an attacker on the path would to have it read after the handshake.
    StarttlsInjection,
}

/// What the scripted backend has seen, for tests that must know the fault was reached.
#[derive(Default, Debug)]
pub struct FaultLog {
    /// Connections accepted.
    pub accepted: usize,
    /// Connections that reached the fault after a login (after-login faults only).
    pub faulted: usize,
    /// Bytes of an APPEND literal received before dying.
    pub literal_bytes: usize,
}

pub type SharedFaultLog = std::sync::Arc<std::sync::Mutex<FaultLog>>;

/// Starts a backend that logs anyone in (IMAP4rev1, LITERAL+, AUTH=PLAIN, SASL-IR, ID) and
/// produces `fault`. Every connection task ends when the gateway's side closes or after the
/// fault, so the fake's own tasks never count as the gateway's leaks.
pub async fn start_fault(fault: Fault) -> (SocketAddr, SharedFaultLog) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = SharedFaultLog::default();
    let shared = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            shared.lock().unwrap().accepted += 1;
            tokio::spawn(serve_fault(sock, fault.clone(), shared.clone()));
        }
    });
    (addr, log)
}

/// Reads and drops everything until the peer closes.
async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R) {
    let mut sink = [0u8; 4096];
    while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn serve_fault(sock: tokio::net::TcpStream, fault: Fault, log: SharedFaultLog) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    match fault {
        Fault::StallGreeting => return drain(&mut r).await,
        Fault::GarbageGreeting(bytes) => {
            let _ = w.write_all(bytes).await;
            return drain(&mut r).await;
        }
        _ => {}
    }
    let caps = if matches!(fault, Fault::StarttlsInjection) {
        "IMAP4rev1 STARTTLS LITERAL+ SASL-IR AUTH=PLAIN ID"
    } else {
        "IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN ID"
    };
    let _ = w
        .write_all(format!("* OK [CAPABILITY {caps}] fake ready\r\n").as_bytes())
        .await;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let tag = line.split(' ').next().unwrap_or("*").to_owned();
        let upper = line.to_ascii_uppercase();
        if let (Fault::StarttlsInjection, true) = (&fault, upper.contains(" STARTTLS")) {
            let answer = format!("{tag} OK Begin TLS\r\n* OK [CAPABILITY IMAP4rev1] injected\r\n");
            let _ = w.write_all(answer.as_bytes()).await;
            return drain(&mut r).await;
        }
        if upper.contains(" AUTHENTICATE ") || upper.contains(" LOGIN ") {
            if let Fault::GarbageLogin(bytes) = fault {
                let _ = w.write_all(bytes).await;
                return drain(&mut r).await;
            }
            let _ = w
                .write_all(format!("{tag} OK [CAPABILITY {caps}] Logged in\r\n").as_bytes())
                .await;
            break;
        }
        let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
    }
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let tag = line.split(' ').next().unwrap_or("*").to_owned();
        let upper = line.to_ascii_uppercase();
        match &fault {
            Fault::DieMidFetch { size, sent } if upper.contains(" FETCH ") => {
                log.lock().unwrap().faulted += 1;
                let mut out = format!("* 1 FETCH (BODY[] {{{size}}}\r\n").into_bytes();
                out.resize(out.len() + sent, b'x');
                let _ = w.write_all(&out).await;
                return;
            }
            Fault::DieMidAppend { read } if upper.contains(" APPEND ") => {
                log.lock().unwrap().faulted += 1;
                let _ = w.write_all(b"+ OK\r\n").await;
                let mut got = vec![0u8; *read];
                let n = r.read_exact(&mut got).await.map_or(0, |_| *read);
                log.lock().unwrap().literal_bytes = n;
                return;
            }
            _ if upper.contains(" LOGOUT") => {
                let bye = format!("* BYE bye\r\n{tag} OK done\r\n");
                let _ = w.write_all(bye.as_bytes()).await;
                return;
            }
            Fault::GarbageAfterLogin(bytes) => {
                log.lock().unwrap().faulted += 1;
                let _ = w.write_all(bytes).await;
                let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
            }
            _ => {
                let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
            }
        }
    }
}

/// PROXY headers a backend received, one per connection, in order.
pub type Headers = std::sync::Arc<std::sync::Mutex<Vec<imap_gateway::proto::proxy::ProxyHeader>>>;

/// Like [`start_recording`] with `caps`, but every connection must start with a PROXY
/// protocol header, which is decoded with the gateway's own parser (the one its listeners
/// use) and recorded; a connection without one is closed unanswered.
pub async fn start_expecting_proxy(caps: &'static str) -> (SocketAddr, Headers) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let headers = Headers::default();
    let record = headers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let Some(header) = read_proxy_header(&mut sock).await else {
                    return;
                };
                record.lock().unwrap().push(header);
                let _ = sock
                    .write_all(format!("* OK [CAPABILITY {caps}] fake ready\r\n").as_bytes())
                    .await;
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let tag = line.split(' ').next().unwrap_or("*").to_owned();
                    if line.to_ascii_uppercase().contains(" LOGOUT") {
                        let bye = format!("* BYE bye\r\n{tag} OK done\r\n");
                        let _ = w.write_all(bye.as_bytes()).await;
                        return;
                    }
                    if line.to_ascii_uppercase().contains(" CAPABILITY") {
                        let _ = w
                            .write_all(format!("* CAPABILITY {caps}\r\n").as_bytes())
                            .await;
                    }
                    let _ = w.write_all(format!("{tag} OK done\r\n").as_bytes()).await;
                }
            });
        }
    });
    (addr, headers)
}

/// A TLS server with the certificate `cert`/`key` that greets, logs anyone in and answers
/// every command OK. With `expect_proxy`, each connection must start with a PROXY header
/// before the TLS handshake; the decoded headers are returned.
pub async fn start_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    expect_proxy: bool,
) -> (SocketAddr, Headers) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let headers = Headers::default();
    let record = headers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                if expect_proxy {
                    let Some(header) = read_proxy_header(&mut sock).await else {
                        return;
                    };
                    record.lock().unwrap().push(header);
                }
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut r = BufReader::new(r);
                let caps = "IMAP4rev1 SASL-IR AUTH=PLAIN";
                let _ = w
                    .write_all(format!("* OK [CAPABILITY {caps}] tls fake\r\n").as_bytes())
                    .await;
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let tag = line.split(' ').next().unwrap_or("*").to_owned();
                    let logout = line.to_ascii_uppercase().contains(" LOGOUT");
                    let answer = if logout {
                        format!("* BYE bye\r\n{tag} OK done\r\n")
                    } else {
                        format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n")
                    };
                    if w.write_all(answer.as_bytes()).await.is_err() || logout {
                        let _ = w.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, headers)
}

/// Reads a PROXY header a byte at a time (so nothing after it is consumed) and decodes it
/// with the gateway's own parser; None when the connection starts with anything else.
async fn read_proxy_header(
    sock: &mut tokio::net::TcpStream,
) -> Option<imap_gateway::proto::proxy::ProxyHeader> {
    use imap_gateway::proto::proxy::{Scan, scan};
    let mut got = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        got.push(byte[0]);
        match scan(&got) {
            Ok(Scan::Complete { header, .. }) => return Some(header),
            Ok(Scan::Incomplete) => {}
            Err(_) => return None,
        }
    }
}
