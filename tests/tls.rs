//! TLS on both sides of the gateway, with certificates from a test CA made here:
//! implicit TLS and STARTTLS towards clients, implicit TLS and STARTTLS towards a real
//! Dovecot, and a backend whose certificate does not verify.

mod common;

use std::path::Path;

use common::dovecot::{Dovecot, DovecotOptions, login_lines, wait_for_log};
use common::gateway::{self, backend_toml};
use common::imap::{Client, last_line, tagged_ok};
use common::tls::{TestCa, client_config, listener};
use imap_gateway::config::{ListenerConfig, ListenerMode};

const MESSAGE: &str = "From: bob@example.org\r\nTo: alice@example.org\r\n\
Subject: over TLS\r\n\r\nThis message crossed TLS.\r\n";

/// SELECT INBOX and FETCH the seeded message; panics unless both work.
async fn select_and_fetch(client: &mut Client) {
    let select = client.cmd("SELECT INBOX").await;
    assert!(tagged_ok(&select), "SELECT: {select}");
    assert!(select.contains("* 1 EXISTS"), "SELECT: {select}");
    let fetch = client.cmd("FETCH 1 (BODY[])").await;
    assert!(tagged_ok(&fetch), "FETCH: {fetch}");
    assert!(fetch.contains(MESSAGE), "FETCH: {fetch}");
}

/// A listener entry with a certificate for localhost/127.0.0.1 issued by a CA written
/// to `dir/client-ca/ca.pem`.
fn tls_listener(dir: &Path, name: &str, mode: ListenerMode) -> ListenerConfig {
    let ca_dir = dir.join("client-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let ca = TestCa::new(&ca_dir);
    let (cert, key) = ca.issue(&ca_dir, name, &["localhost", "127.0.0.1"]);
    listener(name, mode, cert, key)
}

fn started_dovecot(opts: DovecotOptions) -> Dovecot {
    let dovecot = Dovecot::start(opts);
    dovecot.seed_message("alice", "INBOX", MESSAGE.as_bytes());
    dovecot
}

#[tokio::test]
async fn client_implicit_tls() {
    let dovecot = started_dovecot(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        config
            .listeners
            .push(tls_listener(dir, "imaps", ListenerMode::Tls))
    })
    .await;
    let ca = gw.dir.path().join("client-ca/ca.pem");
    let addr = gw.addr_of("imaps");

    // By name and by address: the certificate covers both.
    for name in ["localhost", "127.0.0.1"] {
        let mut client = Client::connect_tls(addr, client_config(&ca), name).await;
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        let caps = client.cmd("CAPABILITY").await;
        assert!(tagged_ok(&caps), "{caps}");
        assert!(!caps.contains("LOGINDISABLED"), "TLS is active: {caps}");
        assert!(!caps.contains("STARTTLS"), "TLS is already active: {caps}");
        let login = client.cmd("LOGIN alice alicepw").await;
        assert!(tagged_ok(&login), "{login}");
        select_and_fetch(&mut client).await;
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    // A client trusting another CA refuses the gateway's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_ca = TestCa::new(other.path());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(client_config(&other_ca.ca_path))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "handshake must fail with an unknown CA");
    drop(refused);
    gw.stop().await;
}

#[tokio::test]
async fn client_starttls_then_login() {
    let dovecot = started_dovecot(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        config
            .listeners
            .push(tls_listener(dir, "starttls", ListenerMode::Plain))
    })
    .await;
    let ca = gw.dir.path().join("client-ca/ca.pem");
    let addr = gw.addr_of("starttls");

    let mut client = Client::connect(addr).await;
    let greeting = client.read_response().await;
    assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
    let caps = client.cmd("CAPABILITY").await;
    assert!(caps.contains("STARTTLS"), "{caps}");
    assert!(caps.contains("LOGINDISABLED"), "{caps}");
    // No password in clear on this listener.
    let login = client.cmd("LOGIN alice alicepw").await;
    assert!(
        last_line(&login).contains("NO [PRIVACYREQUIRED]"),
        "LOGIN before STARTTLS: {login}"
    );
    let auth = client.cmd("AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlcHc=").await;
    assert!(
        !tagged_ok(&auth),
        "AUTHENTICATE PLAIN before STARTTLS: {auth}"
    );
    let starttls = client.cmd("STARTTLS").await;
    assert!(tagged_ok(&starttls), "{starttls}");

    let tls = tokio_rustls::TlsConnector::from(client_config(&ca))
        .connect("localhost".try_into().unwrap(), client.into_inner())
        .await
        .expect("TLS handshake after STARTTLS");
    let mut client = Client::from_io(Box::new(tls));
    let caps = client.cmd("CAPABILITY").await;
    assert!(tagged_ok(&caps), "{caps}");
    assert!(!caps.contains("LOGINDISABLED"), "{caps}");
    assert!(!caps.contains("STARTTLS"), "{caps}");
    let again = client.cmd("STARTTLS").await;
    assert!(
        last_line(&again).contains("BAD"),
        "second STARTTLS: {again}"
    );
    let login = client.cmd("LOGIN alice alicepw").await;
    assert!(tagged_ok(&login), "LOGIN after STARTTLS: {login}");
    select_and_fetch(&mut client).await;
    assert!(tagged_ok(&client.cmd("LOGOUT").await));
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn backend_implicit_tls_and_starttls() {
    let dovecot = started_dovecot(DovecotOptions {
        ssl: true,
        ..DovecotOptions::default()
    });
    let ca = dovecot.ca_pem_path().unwrap();
    let tls_addr = dovecot.tls_addr().unwrap();
    // Users pinned to one backend each; the same Dovecot behind three entries.
    let routing = format!(
        "{}{}{}\
         [[routes]]\nuser = \"alice\"\nbackend = \"implicit\"\n\
         [[routes]]\nuser = \"bob\"\nbackend = \"starttls\"\n\
         [[routes]]\nuser = \"carol@example.org\"\nbackend = \"implicit-by-ip\"\n",
        backend_toml(
            "implicit",
            tls_addr,
            &format!(
                "tls = \"implicit\"\nca_file = \"{}\"\nserver_name = \"localhost\"",
                ca.display()
            )
        ),
        backend_toml(
            "starttls",
            dovecot.addr(),
            &format!(
                "tls = \"starttls\"\nca_file = \"{}\"\nserver_name = \"localhost\"",
                ca.display()
            )
        ),
        // No server_name: the certificate is verified against the IP of the address.
        backend_toml(
            "implicit-by-ip",
            tls_addr,
            &format!("tls = \"implicit\"\nca_file = \"{}\"", ca.display())
        ),
    );
    let gw = gateway::start(&routing).await;
    dovecot.seed_message("bob", "INBOX", MESSAGE.as_bytes());
    dovecot.seed_message("carol@example.org", "INBOX", MESSAGE.as_bytes());

    for (user, pass) in [
        ("alice", "alicepw"),
        ("bob", "bobpw"),
        ("carol@example.org", "carolpw"),
    ] {
        let mut client = Client::connect(gw.addr).await;
        let login = client.login(user, pass).await;
        // The post-login capabilities are the backend's (after TLS), not the gateway's.
        assert!(login.contains("[CAPABILITY IMAP4rev1"), "{login}");
        select_and_fetch(&mut client).await;
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    // Dovecot saw each login over TLS (%c is "TLS", not "secured" as plain loopback is).
    let log = wait_for_log(&dovecot, "three TLS logins", |log| {
        ["alice", "bob", "carol@example.org"]
            .iter()
            .all(|u| !login_lines(log, u).is_empty())
    })
    .await;
    for user in ["alice", "bob", "carol@example.org"] {
        let lines = login_lines(&log, user);
        assert!(
            lines.iter().all(|l| l.contains(", TLS")),
            "{user} did not log in over TLS: {lines:?}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn backend_certificate_that_does_not_verify() {
    let dovecot = started_dovecot(DovecotOptions {
        ssl: true,
        ..DovecotOptions::default()
    });
    let tls_addr = dovecot.tls_addr().unwrap();
    let wrong = tempfile::tempdir().unwrap();
    let wrong_ca = TestCa::new(wrong.path());
    let good_ca = dovecot.ca_pem_path().unwrap();
    let routing = format!(
        "{}{}{}\
         [[routes]]\nuser = \"alice\"\nbackend = \"wrong-ca-implicit\"\n\
         [[routes]]\nuser = \"bob\"\nbackend = \"wrong-ca-starttls\"\n\
         [[routes]]\nuser = \"carol@example.org\"\nbackend = \"wrong-name\"\n",
        backend_toml(
            "wrong-ca-implicit",
            tls_addr,
            &format!(
                "tls = \"implicit\"\nca_file = \"{}\"",
                wrong_ca.ca_path.display()
            )
        ),
        backend_toml(
            "wrong-ca-starttls",
            dovecot.addr(),
            &format!(
                "tls = \"starttls\"\nca_file = \"{}\"",
                wrong_ca.ca_path.display()
            )
        ),
        // The right CA, but a name the certificate is not for.
        backend_toml(
            "wrong-name",
            tls_addr,
            &format!(
                "tls = \"implicit\"\nca_file = \"{}\"\nserver_name = \"imap.example.net\"",
                good_ca.display()
            )
        ),
    );
    let gw = gateway::start(&routing).await;

    for (user, pass) in [
        ("alice", "alicepw"),
        ("bob", "bobpw"),
        ("carol@example.org", "carolpw"),
    ] {
        let mut client = Client::connect(gw.addr).await;
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        let login = client.cmd(&format!("LOGIN \"{user}\" \"{pass}\"")).await;
        let last = last_line(&login);
        assert!(
            last.starts_with("t1 NO [UNAVAILABLE]"),
            "{user}: login through an unverified backend: {login}"
        );
        // Backend error text (certificate details) is not shown to the client.
        assert!(
            !login.to_ascii_lowercase().contains("certificate"),
            "{login}"
        );
        // No session: the client is still not authenticated.
        let select = client.cmd("SELECT INBOX").await;
        assert!(!tagged_ok(&select), "SELECT after failed login: {select}");
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    // The unverified Dovecot never saw a login: the gateway sent no credentials to it.
    let log = dovecot.log_contents();
    assert!(
        !log.contains(" Login: user=<"),
        "credentials reached an unverified backend:\n{log}"
    );
    gw.stop().await;
}

/// Connects to `addr` as a client with `config` (and the session cache that comes with it),
/// with implicit TLS or after STARTTLS, reads the greeting (or the STARTTLS answer: the
/// server's session tickets come before what it says next), logs out; returns whether the
/// handshake resumed an earlier session.
async fn tls_visit(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    starttls: bool,
) -> bool {
    let io: Box<dyn common::imap::Io> = if starttls {
        let mut client = Client::connect(addr).await;
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        let answer = client.cmd("STARTTLS").await;
        assert!(tagged_ok(&answer), "{answer}");
        client.into_inner()
    } else {
        Box::new(tokio::net::TcpStream::connect(addr).await.unwrap())
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), io)
        .await
        .expect("TLS handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut client = Client::from_io(Box::new(tls));
    if !starttls {
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
    }
    assert!(tagged_ok(&client.cmd("LOGOUT").await));
    resumed
}

/// A returning client resumes its TLS session from a ticket, also after more other
/// clients than rustls's session cache holds (256) came in between. With
/// `tls_session_tickets = false` it resumes only while its session is still in that cache.
/// Implicit TLS and STARTTLS alike.
#[tokio::test]
async fn returning_clients_resume_from_session_tickets() {
    // Nobody logs in: the backend is never reached.
    let routing = gateway::single_backend("127.0.0.1:1".parse().unwrap());
    for (tickets, starttls) in [(true, false), (false, false), (true, true), (false, true)] {
        let (name, mode, label) = if starttls {
            ("imap", ListenerMode::Plain, "starttls")
        } else {
            ("imaps", ListenerMode::Tls, "implicit")
        };
        let gw = gateway::start_with(&routing, |config, dir| {
            let mut l = tls_listener(dir, name, mode);
            l.tls_session_tickets = tickets;
            config.listeners.push(l)
        })
        .await;
        let ca = gw.dir.path().join("client-ca/ca.pem");
        let addr = gw.addr_of(name);
        let visit = async |config| tls_visit(addr, config, starttls).await;

        let returning = client_config(&ca);
        assert!(!visit(returning.clone()).await, "first visit");
        assert!(
            visit(returning.clone()).await,
            "a visit right after the first resumes (tickets {tickets}, {label})"
        );
        // Other clients, each with a session cache of its own: each makes a full
        // handshake and takes places in the server's cache.
        for _ in 0..300 {
            assert!(!visit(client_config(&ca)).await, "a new client");
        }
        assert_eq!(
            visit(returning.clone()).await,
            tickets,
            "the returning client after 300 others (tickets {tickets}, {label})"
        );
        let metrics = &gw.shared.metrics;
        let resumed = metrics.tls_resumed.with_label_values(&[name, label]);
        assert_eq!(resumed.get(), 1 + u64::from(tickets));
        let ok = metrics
            .tls_handshakes
            .with_label_values(&[name, label, "ok"]);
        assert_eq!(ok.get(), 303);
        gw.stop().await;
    }
}
