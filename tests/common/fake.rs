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
