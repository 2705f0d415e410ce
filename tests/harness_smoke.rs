//! Smoke tests of the Dovecot test harness in `tests/common`: plain and TLS
//! logins, quota, master users, and several instances side by side.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const MESSAGE: &[u8] = b"From: bob@example.org\r\nTo: alice@example.org\r\n\
Subject: seeded\r\n\r\nHello from the harness.\r\n";

/// A minimal line-based IMAP client (no literals in the responses used here).
struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Imap {
    fn connect(addr: SocketAddr) -> Imap {
        let stream = TcpStream::connect(addr).expect("connect to Dovecot");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut imap = Imap {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = imap.line();
        assert!(greeting.starts_with("* OK"), "greeting: {greeting:?}");
        imap
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from Dovecot");
        assert!(n > 0, "Dovecot closed the connection");
        line
    }

    /// Sends `tag command` and returns all lines up to and including the tagged one.
    fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        write!(self.writer, "{tag} {command}\r\n").unwrap();
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    fn ok(&mut self, tag: &str, command: &str) -> Vec<String> {
        let lines = self.cmd(tag, command);
        let last = lines.last().unwrap();
        assert!(
            last.starts_with(&format!("{tag} OK")),
            "{command} failed: {lines:?}"
        );
        lines
    }
}

fn has_line(lines: &[String], prefix: &str) -> bool {
    lines.iter().any(|l| l.starts_with(prefix))
}

#[test]
fn plain_login_select_and_quota() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    dovecot.seed_message("alice", "INBOX", MESSAGE);

    let mut imap = Imap::connect(dovecot.addr());
    imap.ok("a", "LOGIN alice alicepw");
    let select = imap.ok("b", "SELECT INBOX");
    assert!(has_line(&select, "* 1 EXISTS"), "{select:?}");
    let quota = imap.ok("c", "GETQUOTAROOT INBOX");
    assert!(has_line(&quota, "* QUOTAROOT INBOX"), "{quota:?}");
    assert!(has_line(&quota, "* QUOTA "), "{quota:?}");

    // Seeding after login into a new folder works too.
    dovecot.seed_message("alice", "Archive/2024", MESSAGE);
    dovecot.seed_message("alice", "Archive/2024", MESSAGE);
    let status = imap.ok("d", "STATUS Archive/2024 (MESSAGES)");
    assert!(
        has_line(&status, "* STATUS Archive/2024 (MESSAGES 2)"),
        "{status:?}"
    );
    let list = imap.ok("e", "LIST \"\" \"*\"");
    assert!(list.iter().any(|l| l.contains("\"/\"")), "{list:?}");
    imap.ok("f", "LOGOUT");

    // The e-mail-style user logs in too.
    let mut imap = Imap::connect(dovecot.addr());
    imap.ok("a", "LOGIN carol@example.org carolpw");
    imap.ok("b", "LOGOUT");

    let log = dovecot.log_contents();
    assert!(
        log.contains("Login: user=<alice>") && log.contains("rip=127.0.0.1"),
        "{log}"
    );
    assert!(dovecot.maildir("alice").join("cur").is_dir());
}

#[tokio::test]
async fn tls_login_with_dot_separator() {
    let dovecot = Dovecot::start(DovecotOptions {
        ssl: true,
        separator: '.',
        ..Default::default()
    });
    dovecot.seed_message("bob", "INBOX", MESSAGE);
    dovecot.seed_message("bob", "Lists.rust", MESSAGE);

    // STARTTLS is offered on the plain port.
    let mut plain = Imap::connect(dovecot.addr());
    let caps = plain.ok("a", "CAPABILITY");
    assert!(caps.iter().any(|l| l.contains("STARTTLS")), "{caps:?}");
    plain.ok("b", "LOGOUT");

    let ca = dovecot.ca_pem_path().expect("ssl instance has a CA");
    let connector = tokio_rustls::TlsConnector::from(common::tls::client_config(&ca));
    let tcp = tokio::net::TcpStream::connect(dovecot.tls_addr().expect("tls addr"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let (read, mut write) = tokio::io::split(tls);
    let mut read = tokio::io::BufReader::new(read);

    async fn line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
        let mut s = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut s))
            .await
            .expect("timeout reading")
            .expect("read");
        assert!(n > 0, "closed");
        s
    }
    async fn tagged<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = line(r).await;
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    let greeting = line(&mut read).await;
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    write.write_all(b"a LOGIN bob bobpw\r\n").await.unwrap();
    let login = tagged(&mut read, "a").await;
    assert!(login.last().unwrap().starts_with("a OK"), "{login:?}");
    write.write_all(b"b LIST \"\" \"*\"\r\n").await.unwrap();
    let list = tagged(&mut read, "b").await;
    assert!(list.last().unwrap().starts_with("b OK"), "{list:?}");
    assert!(
        list.iter()
            .any(|l| l.starts_with("* LIST") && l.contains("\".\"") && l.contains("Lists.rust")),
        "{list:?}"
    );
    write
        .write_all(b"c STATUS Lists.rust (MESSAGES)\r\n")
        .await
        .unwrap();
    let status = tagged(&mut read, "c").await;
    assert!(
        has_line(&status, "* STATUS Lists.rust (MESSAGES 1)"),
        "{status:?}"
    );
    write.write_all(b"d LOGOUT\r\n").await.unwrap();
    let _ = tagged(&mut read, "d").await;
}

#[test]
fn master_user_login() {
    let dovecot = Dovecot::start(DovecotOptions {
        master_user: Some(("master".into(), "masterpw".into())),
        shared_namespace: true,
        ..Default::default()
    });
    dovecot.seed_message("alice", "INBOX", MESSAGE);

    let mut imap = Imap::connect(dovecot.addr());
    imap.ok("a", "LOGIN alice*master masterpw");
    let select = imap.ok("b", "SELECT INBOX");
    assert!(has_line(&select, "* 1 EXISTS"), "{select:?}");
    let rights = imap.ok("c", "MYRIGHTS INBOX");
    assert!(has_line(&rights, "* MYRIGHTS INBOX"), "{rights:?}");
    imap.ok("d", "SETACL INBOX bob lr");
    imap.ok("e", "LOGOUT");

    // The shared namespace shows alice's INBOX to bob, with bob's rights even
    // through a master login (acl_user = %u).
    let mut imap = Imap::connect(dovecot.addr());
    imap.ok("a", "LOGIN bob*master masterpw");
    let status = imap.ok("b", "STATUS Shared/alice/INBOX (MESSAGES)");
    assert!(
        has_line(&status, "* STATUS Shared/alice/INBOX (MESSAGES 1)"),
        "{status:?}"
    );
    let rights = imap.ok("c", "MYRIGHTS Shared/alice/INBOX");
    assert!(
        has_line(&rights, "* MYRIGHTS Shared/alice/INBOX lr"),
        "{rights:?}"
    );
    imap.ok("d", "LOGOUT");

    let mut imap = Imap::connect(dovecot.addr());
    let bad = imap.cmd("a", "LOGIN alice*master wrong");
    assert!(bad.last().unwrap().starts_with("a NO"), "{bad:?}");
}

#[test]
fn parallel_instances_do_not_clash() {
    let handles: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let dovecot = Dovecot::start(DovecotOptions::default());
                for _ in 0..=i {
                    dovecot.seed_message("bob", "INBOX", MESSAGE);
                }
                let mut imap = Imap::connect(dovecot.addr());
                imap.ok("a", "LOGIN bob bobpw");
                let select = imap.ok("b", "SELECT INBOX");
                assert!(
                    has_line(&select, &format!("* {} EXISTS", i + 1)),
                    "{select:?}"
                );
                imap.ok("c", "LOGOUT");
                dovecot
            })
        })
        .collect();
    let mut instances: Vec<Dovecot> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(instances[0].addr(), instances[1].addr());
    assert_ne!(instances[0].maildir("bob"), instances[1].maildir("bob"));
    for d in &mut instances {
        d.stop();
        d.stop(); // idempotent
        assert!(
            std::net::TcpStream::connect(d.addr()).is_err(),
            "port still open after stop"
        );
    }
}
