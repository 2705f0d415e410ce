//! TLS on both legs (a client on the gateway's implicit-TLS listener, the gateway on
//! Dovecot's imaps port) through idle periods. While a TLS direction waits, the relay holds
//! no read buffer and asks rustls, not the socket, whether there is something to read; these
//! sessions go idle, then move data both ways: mail announced during IDLE, large APPENDs
//! (many TLS records, with commands pipelined behind them) and the FETCHes of those messages,
//! byte for byte.

mod common;

use std::path::Path;
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway::{self, backend_toml};
use common::imap::{Client, tagged_ok};
use common::tls::{TestCa, client_config, listener};
use imap_gateway::config::{ListenerConfig, ListenerMode};

/// Long enough for every direction of both legs to have found nothing more to read and gone
/// back to waiting; the test passes whether or not they did, it only tests more if they did.
const QUIET: Duration = Duration::from_millis(300);

/// A listener entry with a certificate for localhost issued by a CA written to
/// `dir/client-ca/ca.pem`.
fn tls_listener(dir: &Path, name: &str) -> ListenerConfig {
    let ca_dir = dir.join("client-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let ca = TestCa::new(&ca_dir);
    let (cert, key) = ca.issue(&ca_dir, name, &["localhost", "127.0.0.1"]);
    listener(name, ListenerMode::Tls, cert, key)
}

/// A message of about `size` bytes in CRLF lines that differ from each other, so that a
/// lost, repeated or reordered piece shows.
fn message(tag: &str, size: usize) -> String {
    let mut m = format!("From: bob@example.org\r\nSubject: {tag}\r\n\r\n");
    let mut i = 0;
    while m.len() < size {
        m.push_str(&format!(
            "{tag} line {i:06} abcdefghijklmnopqrstuvwxyz 0123456789 {}\r\n",
            i * 7919 % 100_003
        ));
        i += 1;
    }
    m
}

/// Reads responses until `* n EXISTS`.
async fn until_exists(client: &mut Client, n: usize) {
    let want = format!("* {n} EXISTS\r\n");
    loop {
        let r = client.read_response().await;
        if r == want.as_bytes() {
            return;
        }
        assert!(r.starts_with(b"* "), "{}", String::from_utf8_lossy(&r));
    }
}

async fn connect(addr: std::net::SocketAddr, ca: &Path) -> Client {
    let mut c = Client::connect_tls(addr, client_config(ca), "localhost").await;
    c.login("bob", "bobpw").await;
    c
}

#[tokio::test]
async fn idle_tls_sessions_then_data_both_ways() {
    let dovecot = Dovecot::start(DovecotOptions {
        ssl: true,
        ..DovecotOptions::default()
    });
    let backend_ca = dovecot.ca_pem_path().unwrap();
    let routing = format!(
        "default_pool = [\"b\"]\n{}",
        backend_toml(
            "b",
            dovecot.tls_addr().unwrap(),
            &format!(
                "tls = \"implicit\"\nca_file = \"{}\"\nserver_name = \"localhost\"",
                backend_ca.display()
            )
        )
    );
    let gw = gateway::start_with(&routing, |config, dir| {
        config.listeners.push(tls_listener(dir, "imaps"))
    })
    .await;
    let ca = gw.dir.path().join("client-ca/ca.pem");
    let addr = gw.addr_of("imaps");

    let mut idler = connect(addr, &ca).await;
    let mut other = connect(addr, &ca).await;
    let sel = idler.cmd("SELECT INBOX").await;
    assert!(sel.contains("* 0 EXISTS"), "{sel}");

    let mut count = 0;
    for round in 1..=3 {
        idler.write(format!("i{round} IDLE\r\n").as_bytes()).await;
        let cont = idler.read_response().await;
        assert!(
            cont.starts_with(b"+ "),
            "{}",
            String::from_utf8_lossy(&cont)
        );
        tokio::time::sleep(QUIET).await;

        // Backend to client after the quiet: the other session's APPEND is announced.
        let theirs = message(&format!("theirs-{round}"), 40_000);
        let r = other
            .cmd(&format!("APPEND INBOX {{{}+}}\r\n{theirs}", theirs.len()))
            .await;
        assert!(tagged_ok(&r), "{r}");
        count += 1;
        until_exists(&mut idler, count).await;
        tokio::time::sleep(QUIET).await;
        idler.write(b"DONE\r\n").await;
        let done = idler.until_tagged(&format!("i{round}")).await;
        assert!(tagged_ok(&done), "{done}");
        tokio::time::sleep(QUIET).await;

        // Client to backend after the quiet: a large APPEND in one write (many TLS records
        // at once), with a NOOP pipelined behind it; or a synchronizing literal.
        let mine = message(&format!("mine-{round}"), 100_000 + round * 3_000);
        if round % 2 == 1 {
            let tag = idler.tag();
            let noop = idler.tag();
            let mut out = format!("{tag} APPEND INBOX {{{}+}}\r\n", mine.len()).into_bytes();
            out.extend_from_slice(mine.as_bytes());
            out.extend_from_slice(format!("\r\n{noop} NOOP\r\n").as_bytes());
            idler.write(&out).await;
            let r = idler.until_tagged(&tag).await;
            assert!(tagged_ok(&r), "{r}");
            let r = idler.until_tagged(&noop).await;
            assert!(tagged_ok(&r), "{r}");
        } else {
            let tag = idler.tag();
            idler
                .write(format!("{tag} APPEND INBOX {{{}}}\r\n", mine.len()).as_bytes())
                .await;
            let cont = idler.read_response().await;
            assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
            tokio::time::sleep(QUIET).await;
            idler.write(format!("{mine}\r\n").as_bytes()).await;
            let r = idler.until_tagged(&tag).await;
            assert!(tagged_ok(&r), "{r}");
        }
        count += 1;
        tokio::time::sleep(QUIET).await;

        // Backend to client, large: both messages come back as they went in.
        for (n, body) in [(count - 1, &theirs), (count, &mine)] {
            let f = idler.cmd(&format!("FETCH {n} BODY.PEEK[]")).await;
            assert!(
                tagged_ok(&f),
                "FETCH {n}: {}",
                &f[f.len().saturating_sub(200)..]
            );
            let literal = format!("BODY[] {{{}}}\r\n{body})", body.len());
            assert!(
                f.contains(&literal),
                "FETCH {n} differs from what was appended"
            );
        }
    }

    let bye = idler.cmd("LOGOUT").await;
    assert!(bye.starts_with("* BYE"), "{bye}");
    assert!(
        idler.try_read_response().await.is_none(),
        "closed after LOGOUT"
    );
    assert!(tagged_ok(&other.cmd("LOGOUT").await));
    gw.stop().await;
}
