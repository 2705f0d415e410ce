//! The pre-authentication dialogue and bad input, against the in-process gateway in front of a
//! real Dovecot: exact answer lines (tag, status, response code), and that the gateway keeps
//! serving other sessions after a bad one.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway::{self, TestGateway, backend_toml};
use common::imap::{Client, WAIT, tagged_ok};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Pre-login capabilities on a cleartext listener that allows plaintext authentication.
const CAPS_PLAIN_ALLOWED: &str = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE AUTH=PLAIN AUTH=LOGIN";
/// Pre-login capabilities on a cleartext listener without certificate nor plaintext auth.
const CAPS_LOGINDISABLED: &str = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE LOGINDISABLED";
/// Pre-login capabilities on a cleartext listener with a certificate, before STARTTLS.
const CAPS_STARTTLS: &str = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE STARTTLS LOGINDISABLED";
/// Pre-login capabilities once TLS is active.
const CAPS_TLS: &str = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE AUTH=PLAIN AUTH=LOGIN";

const AUTH_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";
const PRIVACY: &str =
    "NO [PRIVACYREQUIRED] Plaintext authentication is disabled on this connection.\r\n";

fn routing(dovecot: &Dovecot) -> String {
    gateway::single_backend(dovecot.addr())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn greeting(caps: &str) -> String {
    format!("* OK [CAPABILITY {caps}] imap-gateway ready.\r\n")
}

/// Reads one response (literals inlined) as text.
async fn line(c: &mut Client) -> String {
    String::from_utf8(c.read_response().await).unwrap()
}

async fn send(c: &mut Client, text: &str) {
    c.write(text.as_bytes()).await;
}

async fn expect(c: &mut Client, expected: &str) {
    assert_eq!(line(c).await, expected);
}

/// The connection is closed by the gateway: nothing more arrives.
async fn expect_eof(c: &mut Client) {
    let rest = c.read_to_end().await;
    assert!(
        rest.is_empty(),
        "expected EOF, got {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// `<tag> OK [CAPABILITY <backend list>] Logged in`, without any pre-login capability.
fn assert_logged_in(resp: &str, tag: &str) {
    let prefix = format!("{tag} OK [CAPABILITY IMAP4rev1 ");
    assert!(
        resp.starts_with(&prefix) && resp.ends_with("] Logged in\r\n"),
        "not a login OK for {tag}: {resp:?}"
    );
    assert_eq!(resp.matches("\r\n").count(), 1, "{resp:?}");
    for pre in ["AUTH=", "LOGINDISABLED", "STARTTLS", "SASL-IR"] {
        assert!(!resp.contains(pre), "{pre} after login: {resp:?}");
    }
}

async fn expect_logged_in(c: &mut Client, tag: &str) {
    let resp = line(c).await;
    assert_logged_in(&resp, tag);
}

/// Proves the session is authenticated and relayed: SELECT INBOX works on the backend.
async fn expect_authenticated(c: &mut Client) {
    let r = c.cmd("SELECT INBOX").await;
    assert!(tagged_ok(&r) && r.contains("[READ-WRITE]"), "{r}");
}

/// The gateway still serves others: a fresh client logs in and out.
async fn another_session_logs_in(gw: &TestGateway) {
    let mut c = Client::connect(gw.addr).await;
    c.login("bob", "bobpw").await;
    expect_authenticated(&mut c).await;
    let r = c.cmd("LOGOUT").await;
    assert!(r.starts_with("* BYE") && tagged_ok(&r), "{r}");
    expect_eof(&mut c).await;
}

/// Connects and checks the greeting of a listener allowing plaintext auth.
async fn connect(gw: &TestGateway) -> Client {
    let mut c = Client::connect(gw.addr).await;
    expect(&mut c, &greeting(CAPS_PLAIN_ALLOWED)).await;
    c
}

async fn start_default() -> (Dovecot, TestGateway) {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&routing(&dovecot)).await;
    (dovecot, gw)
}

// ---------------------------------------------------------------------------------------------
// Commands of the not-authenticated state
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn greeting_capability_noop_id_logout() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a1 CAPABILITY\r\n").await;
    expect(&mut c, &format!("* CAPABILITY {CAPS_PLAIN_ALLOWED}\r\n")).await;
    expect(&mut c, "a1 OK Pre-login capabilities listed.\r\n").await;
    send(&mut c, "a2 NOOP\r\n").await;
    expect(&mut c, "a2 OK NOOP completed.\r\n").await;
    send(
        &mut c,
        "a3 ID (\"name\" \"preauth-test\" \"version\" \"1\")\r\n",
    )
    .await;
    expect(&mut c, "* ID (\"name\" \"imap-gateway\")\r\n").await;
    expect(&mut c, "a3 OK ID completed.\r\n").await;
    send(&mut c, "a4 ID NIL\r\n").await;
    expect(&mut c, "* ID (\"name\" \"imap-gateway\")\r\n").await;
    expect(&mut c, "a4 OK ID completed.\r\n").await;
    // Command names are case-insensitive.
    send(&mut c, "a5 noop\r\n").await;
    expect(&mut c, "a5 OK NOOP completed.\r\n").await;
    send(&mut c, "a6 LOGOUT\r\n").await;
    expect(&mut c, "* BYE Logging out.\r\n").await;
    expect(&mut c, "a6 OK Logout completed.\r\n").await;
    expect_eof(&mut c).await;
    drop(c);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// LOGIN and AUTHENTICATE
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn login_ok() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "a").await;
    expect_authenticated(&mut c).await;
    // Quoted strings work as well.
    let mut c2 = connect(&gw).await;
    send(&mut c2, "b LOGIN \"bob\" \"bobpw\"\r\n").await;
    expect_logged_in(&mut c2, "b").await;
    expect_authenticated(&mut c2).await;
    drop((c, c2));
    gw.stop().await;
}

#[tokio::test]
async fn authenticate_plain_with_initial_response() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    let ir = b64(b"\0alice\0alicepw");
    send(&mut c, &format!("a AUTHENTICATE PLAIN {ir}\r\n")).await;
    expect_logged_in(&mut c, "a").await;
    expect_authenticated(&mut c).await;
    // An authorization identity equal to the user is allowed.
    let mut c2 = connect(&gw).await;
    let ir = b64(b"bob\0bob\0bobpw");
    send(&mut c2, &format!("b authenticate plain {ir}\r\n")).await;
    expect_logged_in(&mut c2, "b").await;
    drop((c, c2));
    gw.stop().await;
}

#[tokio::test]
async fn authenticate_plain_with_continuation() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a AUTHENTICATE PLAIN\r\n").await;
    expect(&mut c, "+ \r\n").await;
    send(&mut c, &format!("{}\r\n", b64(b"\0alice\0alicepw"))).await;
    expect_logged_in(&mut c, "a").await;
    expect_authenticated(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn authenticate_login_with_and_without_initial_response() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a AUTHENTICATE LOGIN\r\n").await;
    expect(&mut c, &format!("+ {}\r\n", b64(b"Username:"))).await;
    send(&mut c, &format!("{}\r\n", b64(b"alice"))).await;
    expect(&mut c, &format!("+ {}\r\n", b64(b"Password:"))).await;
    send(&mut c, &format!("{}\r\n", b64(b"alicepw"))).await;
    expect_logged_in(&mut c, "a").await;
    expect_authenticated(&mut c).await;

    let mut c2 = connect(&gw).await;
    send(
        &mut c2,
        &format!("b AUTHENTICATE LOGIN {}\r\n", b64(b"bob")),
    )
    .await;
    expect(&mut c2, &format!("+ {}\r\n", b64(b"Password:"))).await;
    send(&mut c2, &format!("{}\r\n", b64(b"bobpw"))).await;
    expect_logged_in(&mut c2, "b").await;
    expect_authenticated(&mut c2).await;
    drop((c, c2));
    gw.stop().await;
}

#[tokio::test]
async fn authenticate_cancel_and_unknown_mechanism() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a AUTHENTICATE PLAIN\r\n").await;
    expect(&mut c, "+ \r\n").await;
    send(&mut c, "*\r\n").await;
    expect(&mut c, "a BAD Authentication cancelled.\r\n").await;

    send(&mut c, "b AUTHENTICATE LOGIN\r\n").await;
    expect(&mut c, &format!("+ {}\r\n", b64(b"Username:"))).await;
    send(&mut c, &format!("{}\r\n", b64(b"alice"))).await;
    expect(&mut c, &format!("+ {}\r\n", b64(b"Password:"))).await;
    send(&mut c, "*\r\n").await;
    expect(&mut c, "b BAD Authentication cancelled.\r\n").await;

    send(&mut c, "c AUTHENTICATE CRAM-MD5\r\n").await;
    expect(&mut c, "c NO Unsupported authentication mechanism.\r\n").await;
    send(
        &mut c,
        "d AUTHENTICATE XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciB4AQE=\r\n",
    )
    .await;
    expect(&mut c, "d NO Unsupported authentication mechanism.\r\n").await;

    // Not base64: a malformed SASL response.
    send(&mut c, "e AUTHENTICATE PLAIN\r\n").await;
    expect(&mut c, "+ \r\n").await;
    send(&mut c, "!!!not base64!!!\r\n").await;
    expect(&mut c, "e BAD Invalid SASL response.\r\n").await;

    // The connection is still usable after all that.
    send(&mut c, "f LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "f").await;
    expect_authenticated(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn login_with_synchronizing_and_non_synchronizing_literals() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a LOGIN {5}\r\n").await;
    expect(&mut c, "+ Ready for literal data\r\n").await;
    send(&mut c, "alice {7}\r\n").await;
    expect(&mut c, "+ Ready for literal data\r\n").await;
    send(&mut c, "alicepw\r\n").await;
    expect_logged_in(&mut c, "a").await;
    expect_authenticated(&mut c).await;

    // LITERAL+: no continuation is sent; the next thing to arrive is the login answer.
    let mut c2 = connect(&gw).await;
    send(&mut c2, "b LOGIN {3+}\r\nbob {5+}\r\nbobpw\r\n").await;
    expect_logged_in(&mut c2, "b").await;
    expect_authenticated(&mut c2).await;
    drop((c, c2));
    gw.stop().await;
}

#[tokio::test]
async fn pipelined_commands_after_login_reach_the_backend() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(
        &mut c,
        "a LOGIN alice alicepw\r\nb SELECT INBOX\r\nc LOGOUT\r\n",
    )
    .await;
    expect_logged_in(&mut c, "a").await;
    let select = c.until_tagged("b").await;
    let last = select.trim_end().rsplit("\r\n").next().unwrap();
    assert!(
        last.starts_with("b OK [READ-WRITE] Select completed"),
        "{select}"
    );
    assert!(select.contains("* 0 EXISTS\r\n"), "{select}");
    assert!(!select.contains("c "), "{select}");
    expect(&mut c, "* BYE Logging out\r\n").await;
    let logout = line(&mut c).await;
    assert!(logout.starts_with("c OK Logout completed"), "{logout}");
    expect_eof(&mut c).await;

    // The same with AUTHENTICATE and SASL-IR.
    let mut c = connect(&gw).await;
    send(
        &mut c,
        &format!(
            "a AUTHENTICATE PLAIN {}\r\nb NOOP\r\nc LOGOUT\r\n",
            b64(b"\0bob\0bobpw")
        ),
    )
    .await;
    expect_logged_in(&mut c, "a").await;
    let noop = line(&mut c).await;
    assert!(noop.starts_with("b OK NOOP completed"), "{noop}");
    expect(&mut c, "* BYE Logging out\r\n").await;
    let logout = line(&mut c).await;
    assert!(logout.starts_with("c OK Logout completed"), "{logout}");
    expect_eof(&mut c).await;

    // And behind the last SASL response of an exchange.
    let mut c = connect(&gw).await;
    send(&mut c, "a AUTHENTICATE PLAIN\r\n").await;
    expect(&mut c, "+ \r\n").await;
    send(
        &mut c,
        &format!("{}\r\nb NOOP\r\nc LOGOUT\r\n", b64(b"\0bob\0bobpw")),
    )
    .await;
    expect_logged_in(&mut c, "a").await;
    let noop = line(&mut c).await;
    assert!(noop.starts_with("b OK NOOP completed"), "{noop}");
    expect(&mut c, "* BYE Logging out\r\n").await;
    let logout = line(&mut c).await;
    assert!(logout.starts_with("c OK Logout completed"), "{logout}");
    expect_eof(&mut c).await;
    drop(c);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Failed logins and routing
// ---------------------------------------------------------------------------------------------

// Dovecot delays every authentication from a client IP after a failure from that IP (its auth
// penalty: about 4 s, then 8 s, ... up to 15 s, keyed by the x-originating-ip the gateway
// forwards). So that these tests stay fast, a client whose password Dovecot rejects connects
// from its own loopback address and is rejected by Dovecot at most once; further failures on
// the same connection are users without a route, which the gateway rejects itself.

/// A client connecting to the gateway from another loopback source address.
async fn connect_from(gw: &TestGateway, source: [u8; 4]) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let tcp = tokio::time::timeout(WAIT, socket.connect(gw.addr))
        .await
        .unwrap()
        .unwrap();
    let mut c = Client::from_io(Box::new(tcp));
    expect(&mut c, &greeting(CAPS_PLAIN_ALLOWED)).await;
    c
}

/// Routes for alice and bob only: any other user has no route.
fn routing_alice_bob(dovecot: &Dovecot) -> String {
    format!(
        "{}\n[[routes]]\nuser = \"alice\"\nbackend = \"dc\"\n\n\
         [[routes]]\nuser = \"bob\"\nbackend = \"dc\"\n",
        backend_toml("dc", dovecot.addr(), "")
    )
}

#[tokio::test]
async fn wrong_password_is_an_authentication_failure() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect_from(&gw, [127, 0, 0, 2]).await;
    send(&mut c, "a LOGIN alice wrongpw\r\n").await;
    expect(&mut c, &format!("a {AUTH_FAILED}")).await;
    // The dialogue goes on.
    send(&mut c, "b NOOP\r\n").await;
    expect(&mut c, "b OK NOOP completed.\r\n").await;
    let mut c2 = connect_from(&gw, [127, 0, 0, 3]).await;
    send(
        &mut c2,
        &format!("a AUTHENTICATE PLAIN {}\r\n", b64(b"\0alice\0nope")),
    )
    .await;
    expect(&mut c2, &format!("a {AUTH_FAILED}")).await;
    let mut c3 = connect_from(&gw, [127, 0, 0, 4]).await;
    send(
        &mut c3,
        &format!("a AUTHENTICATE LOGIN {}\r\n", b64(b"alice")),
    )
    .await;
    expect(&mut c3, &format!("+ {}\r\n", b64(b"Password:"))).await;
    send(&mut c3, &format!("{}\r\n", b64(b"nope"))).await;
    expect(&mut c3, &format!("a {AUTH_FAILED}")).await;
    // alice herself, from another address, gets in.
    let mut ok = connect(&gw).await;
    send(&mut ok, "a LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut ok, "a").await;
    drop((c, c2, c3, ok));
    gw.stop().await;
}

#[tokio::test]
async fn failed_logins_then_success_on_same_connection() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&routing_alice_bob(&dovecot)).await;
    let mut c = connect(&gw).await;
    send(&mut c, "a LOGIN nosuchuser pw\r\n").await;
    expect(&mut c, &format!("a {AUTH_FAILED}")).await;
    send(
        &mut c,
        &format!("b AUTHENTICATE PLAIN {}\r\n", b64(b"\0carol\0pw")),
    )
    .await;
    expect(&mut c, &format!("b {AUTH_FAILED}")).await;
    send(&mut c, "c LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "c").await;
    expect_authenticated(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn too_many_failed_logins() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&routing_alice_bob(&dovecot)).await;
    let mut c = connect_from(&gw, [127, 0, 0, 2]).await;
    // Rejected by Dovecot.
    send(&mut c, "a LOGIN alice wrong\r\n").await;
    expect(&mut c, &format!("a {AUTH_FAILED}")).await;
    // Rejected by the gateway (no route).
    send(&mut c, "b LOGIN nosuchuser pw\r\n").await;
    expect(&mut c, &format!("b {AUTH_FAILED}")).await;
    send(
        &mut c,
        &format!("c AUTHENTICATE PLAIN {}\r\n", b64(b"\0nobody\0pw")),
    )
    .await;
    expect(&mut c, &format!("c {AUTH_FAILED}")).await;
    expect(&mut c, "* BYE Too many authentication failures.\r\n").await;
    expect_eof(&mut c).await;
    another_session_logs_in(&gw).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn user_without_route_is_an_authentication_failure() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&format!(
        "{}\n[[routes]]\nuser = \"alice\"\nbackend = \"dc\"\n",
        backend_toml("dc", dovecot.addr(), "")
    ))
    .await;
    let mut c = connect(&gw).await;
    // bob exists on the backend but has no route: the same answer as a wrong password.
    send(&mut c, "a LOGIN bob bobpw\r\n").await;
    expect(&mut c, &format!("a {AUTH_FAILED}")).await;
    send(&mut c, "b LOGIN nosuchuser whatever\r\n").await;
    expect(&mut c, &format!("b {AUTH_FAILED}")).await;
    send(&mut c, "c LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "c").await;
    expect_authenticated(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn unreachable_backend_is_unavailable_without_details() {
    // Port 1 on loopback: nothing listens there, the connection is refused.
    let gw = gateway::start(&format!(
        "default_pool = [\"deadbackend\"]\n{}",
        backend_toml("deadbackend", "127.0.0.1:1".parse().unwrap(), "")
    ))
    .await;
    let mut c = connect(&gw).await;
    send(&mut c, "a LOGIN alice alicepw\r\n").await;
    let answer = line(&mut c).await;
    assert_eq!(
        answer,
        "a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later.\r\n"
    );
    for secret in ["refused", "127.0.0.1", "deadbackend", ":1", "onnect"] {
        assert!(!answer.contains(secret), "{secret} leaked: {answer}");
    }
    // Operators see it, per backend and reason.
    let m = &gw.shared.metrics;
    let failures = m
        .backend_connect_failures
        .with_label_values(&["deadbackend", "connect"])
        .get();
    assert_eq!(failures, 1);
    let unavailable = m.logins.with_label_values(&["login", "unavailable"]).get();
    assert_eq!(unavailable, 1);
    // The session goes on: the client may try again.
    send(&mut c, "b NOOP\r\n").await;
    expect(&mut c, "b OK NOOP completed.\r\n").await;
    drop(c);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Plaintext authentication disabled, STARTTLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn plaintext_auth_disabled_without_tls() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&routing(&dovecot), |config, _| {
        config.listeners[0].allow_plaintext_auth = false;
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    expect(&mut c, &greeting(CAPS_LOGINDISABLED)).await;
    send(&mut c, "a CAPABILITY\r\n").await;
    expect(&mut c, &format!("* CAPABILITY {CAPS_LOGINDISABLED}\r\n")).await;
    expect(&mut c, "a OK Pre-login capabilities listed.\r\n").await;
    send(&mut c, "b LOGIN alice alicepw\r\n").await;
    expect(&mut c, &format!("b {PRIVACY}")).await;
    send(
        &mut c,
        &format!("c AUTHENTICATE PLAIN {}\r\n", b64(b"\0alice\0alicepw")),
    )
    .await;
    expect(&mut c, &format!("c {PRIVACY}")).await;
    // Refused before any challenge: no password is asked for in clear.
    send(&mut c, "d AUTHENTICATE LOGIN\r\n").await;
    expect(&mut c, &format!("d {PRIVACY}")).await;
    send(&mut c, "e AUTHENTICATE PLAIN\r\n").await;
    expect(&mut c, &format!("e {PRIVACY}")).await;
    // A LOGIN with literals is refused before the `+` that would invite the password.
    send(&mut c, "e2 LOGIN {5}\r\n").await;
    expect(&mut c, &format!("e2 {PRIVACY}")).await;
    // Still not authenticated.
    send(&mut c, "f SELECT INBOX\r\n").await;
    expect(&mut c, "f BAD SELECT is not allowed before login.\r\n").await;
    // No certificate on this listener: STARTTLS is not available.
    send(&mut c, "g STARTTLS\r\n").await;
    expect(&mut c, "g BAD STARTTLS is not available.\r\n").await;
    send(&mut c, "h NOOP\r\n").await;
    expect(&mut c, "h OK NOOP completed.\r\n").await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn starttls_without_certificate_is_bad() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a STARTTLS\r\n").await;
    expect(&mut c, "a BAD STARTTLS is not available.\r\n").await;
    send(&mut c, "b LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "b").await;
    drop(c);
    gw.stop().await;
}

/// A certificate for `localhost` and 127.0.0.1 signed by a fresh test CA: (CA, cert, key) paths.
fn issue_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = common::tls::TestCa::new(dir);
    let (cert, key) = ca.issue(dir, "gateway", &["localhost", "127.0.0.1"]);
    (ca.ca_path, cert, key)
}

/// Runs the TLS handshake on a client that just got the STARTTLS OK.
async fn upgrade(c: Client, ca: &Path) -> Client {
    let io = c.into_inner();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(common::tls::client_config(ca)).connect(name, io),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake");
    Client::from_io(Box::new(tls))
}

#[tokio::test]
async fn starttls_discards_injected_commands() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issue_cert(certs.path());
    let gw = gateway::start_with(&routing(&dovecot), |config, _| {
        let l = &mut config.listeners[0];
        l.allow_plaintext_auth = false;
        l.tls_cert = Some(cert);
        l.tls_key = Some(key);
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    expect(&mut c, &greeting(CAPS_STARTTLS)).await;
    send(&mut c, "a0 CAPABILITY\r\n").await;
    expect(&mut c, &format!("* CAPABILITY {CAPS_STARTTLS}\r\n")).await;
    expect(&mut c, "a0 OK Pre-login capabilities listed.\r\n").await;

    // An attacker on the path appends a LOGIN to the STARTTLS command, in the same write.
    send(&mut c, "a STARTTLS\r\nb LOGIN alice alicepw\r\n").await;
    expect(&mut c, "a OK Begin TLS negotiation now.\r\n").await;
    let mut c = upgrade(c, &ca).await;

    // No answer for `b` ever comes: the first thing after the handshake is c's answer.
    send(&mut c, "c CAPABILITY\r\n").await;
    expect(&mut c, &format!("* CAPABILITY {CAPS_TLS}\r\n")).await;
    expect(&mut c, "c OK Pre-login capabilities listed.\r\n").await;
    send(&mut c, "d NOOP\r\n").await;
    expect(&mut c, "d OK NOOP completed.\r\n").await;
    send(&mut c, "e SELECT INBOX\r\n").await;
    expect(&mut c, "e BAD SELECT is not allowed before login.\r\n").await;
    send(&mut c, "f STARTTLS\r\n").await;
    expect(&mut c, "f BAD TLS is already active.\r\n").await;

    send(&mut c, "g LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "g").await;
    expect_authenticated(&mut c).await;

    // AUTHENTICATE over TLS too, on a second connection.
    let mut c2 = Client::connect(gw.addr).await;
    expect(&mut c2, &greeting(CAPS_STARTTLS)).await;
    send(&mut c2, "a STARTTLS\r\n").await;
    expect(&mut c2, "a OK Begin TLS negotiation now.\r\n").await;
    let mut c2 = upgrade(c2, &ca).await;
    send(
        &mut c2,
        &format!("b AUTHENTICATE PLAIN {}\r\n", b64(b"\0bob\0bobpw")),
    )
    .await;
    expect_logged_in(&mut c2, "b").await;
    expect_authenticated(&mut c2).await;
    drop((c, c2));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Commands not allowed before login, malformed input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn commands_not_allowed_before_login() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "s1 SELECT INBOX\r\n").await;
    expect(&mut c, "s1 BAD SELECT is not allowed before login.\r\n").await;
    send(&mut c, "l1 LIST \"\" \"*\"\r\n").await;
    expect(&mut c, "l1 BAD LIST is not allowed before login.\r\n").await;
    send(&mut c, "e1 ENABLE CONDSTORE\r\n").await;
    expect(&mut c, "e1 BAD ENABLE is not allowed before login.\r\n").await;

    // APPEND with a synchronizing literal: the whole command is read, then refused.
    send(&mut c, "p1 APPEND INBOX {5}\r\n").await;
    expect(&mut c, "+ Ready for literal data\r\n").await;
    send(&mut c, "hello\r\n").await;
    expect(&mut c, "p1 BAD APPEND is not allowed before login.\r\n").await;

    // APPEND with LITERAL+: the literal's bytes are data, never a command.
    let data = "z1 NOOP\r\n";
    send(
        &mut c,
        &format!("p2 APPEND INBOX {{{}+}}\r\n{data}\r\n", data.len()),
    )
    .await;
    expect(&mut c, "p2 BAD APPEND is not allowed before login.\r\n").await;
    send(&mut c, "n1 NOOP\r\n").await;
    expect(&mut c, "n1 OK NOOP completed.\r\n").await;

    send(&mut c, "a LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "a").await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_bad() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a1 LOGIN\r\n").await;
    expect(&mut c, "a1 BAD Syntax error.\r\n").await;
    send(&mut c, "a2 LOGIN alice\r\n").await;
    expect(&mut c, "a2 BAD Syntax error.\r\n").await;
    send(&mut c, "a3 FROBNICATE now\r\n").await;
    expect(&mut c, "a3 BAD Syntax error.\r\n").await;
    send(&mut c, "a4 AUTHENTICATE\r\n").await;
    expect(&mut c, "a4 BAD Syntax error.\r\n").await;
    send(&mut c, "a5\r\n").await;
    expect(&mut c, "a5 BAD Syntax error.\r\n").await;
    send(&mut c, "((( garbage )))\r\n").await;
    expect(&mut c, "* BAD Syntax error: no tag.\r\n").await;
    send(&mut c, "* LOGIN alice alicepw\r\n").await;
    expect(&mut c, "* BAD Syntax error: no tag.\r\n").await;
    send(&mut c, "\r\n").await;
    expect(&mut c, "* BAD Syntax error: no tag.\r\n").await;
    send(&mut c, "\x00\x01\x02\r\n").await;
    expect(&mut c, "* BAD Syntax error: no tag.\r\n").await;
    // Nine invalid commands so far (the limit is ten): the connection still works.
    send(&mut c, "b LOGIN alice alicepw\r\n").await;
    expect_logged_in(&mut c, "b").await;
    expect_authenticated(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn too_many_bad_commands() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    for i in 1..=9 {
        let command = match i % 3 {
            0 => "SELECT INBOX",
            1 => "LOGIN",
            _ => "NOSUCHCOMMAND",
        };
        send(&mut c, &format!("x{i} {command}\r\n")).await;
        let answer = line(&mut c).await;
        assert!(answer.starts_with(&format!("x{i} BAD ")), "{answer}");
    }
    send(&mut c, "x10 SELECT INBOX\r\n").await;
    expect(&mut c, "x10 BAD SELECT is not allowed before login.\r\n").await;
    expect(&mut c, "* BYE Too many invalid commands.\r\n").await;
    expect_eof(&mut c).await;
    another_session_logs_in(&gw).await;
    drop(c);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits and timeouts
// ---------------------------------------------------------------------------------------------

/// Streams `first` then `repeat` over and over (up to 16 MiB in all) to a fresh connection,
/// and checks that the gateway sends `answers` and closes the connection before it is all
/// sent: the gateway refused the input without buffering it.
async fn refused_while_streaming(gw: &TestGateway, first: &[u8], repeat: &[u8], answers: &[&str]) {
    const TOTAL: usize = 16 << 20;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (read, mut write) = tcp.into_split();
    let mut read = BufReader::new(read);
    let first = first.to_vec();
    let chunk = repeat.repeat((64 << 10) / repeat.len() + 1);
    let writer = tokio::spawn(async move {
        if write.write_all(&first).await.is_err() {
            return (0, true);
        }
        let mut sent = first.len();
        while sent < TOTAL {
            if write.write_all(&chunk).await.is_err() {
                return (sent, true);
            }
            sent += chunk.len();
        }
        (sent, false)
    });
    let mut text = String::new();
    tokio::time::timeout(WAIT, read.read_line(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, greeting(CAPS_PLAIN_ALLOWED));
    for answer in answers {
        text.clear();
        tokio::time::timeout(WAIT, read.read_line(&mut text))
            .await
            .expect("no answer while streaming")
            .unwrap();
        assert_eq!(&text, answer);
    }
    // Then the connection ends (EOF, or a reset because our bytes were left unread).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, read.read_to_end(&mut rest))
        .await
        .expect("no EOF");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let (sent, failed) = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the writer is stuck: the gateway neither reads nor closes")
        .unwrap();
    assert!(
        failed && sent < TOTAL,
        "the gateway took all {sent} bytes of one command"
    );
}

#[tokio::test]
async fn overlong_line_is_refused_without_buffering() {
    let (_dovecot, gw) = start_default().await;
    // A line without newline, far over limits.max_preauth_line.
    refused_while_streaming(
        &gw,
        b"a LOGIN ",
        &[b'x'; 4096],
        &["* BYE [TOOBIG] Command line too long.\r\n"],
    )
    .await;
    // The same during a SASL exchange.
    refused_while_streaming(
        &gw,
        b"a AUTHENTICATE PLAIN\r\n",
        &[b'x'; 4096],
        &["+ \r\n", "* BYE [TOOBIG] Line too long.\r\n"],
    )
    .await;
    another_session_logs_in(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn endless_command_of_small_literals_is_refused_without_buffering() {
    let (_dovecot, gw) = start_default().await;
    // Every line and every literal is within the pre-auth limits, but the command never ends.
    let mut piece = vec![b'x'; 1000];
    piece.extend_from_slice(b" {1000+}\r\n");
    refused_while_streaming(
        &gw,
        b"a LOGIN {1000+}\r\n",
        &piece,
        &["* BYE [TOOBIG] Command too long.\r\n"],
    )
    .await;
    another_session_logs_in(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_literal_is_refused_without_continuation() {
    let (_dovecot, gw) = start_default().await;
    let mut c = connect(&gw).await;
    send(&mut c, "a LOGIN {100000}\r\n").await;
    expect(&mut c, "a BAD [TOOBIG] Literal too large.\r\n").await;
    expect(&mut c, "* BYE [TOOBIG] Literal too large.\r\n").await;
    expect_eof(&mut c).await;
    another_session_logs_in(&gw).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn idle_connection_times_out_before_login() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&routing(&dovecot), |config, _| {
        config.timeouts.preauth = std::time::Duration::from_secs(1);
    })
    .await;
    let mut c = connect(&gw).await;
    send(&mut c, "a NOOP\r\n").await;
    expect(&mut c, "a OK NOOP completed.\r\n").await;
    // Then nothing: the gateway ends the connection.
    expect(&mut c, "* BYE Disconnected for inactivity.\r\n").await;
    expect_eof(&mut c).await;
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn client_that_never_reads_is_dropped_at_the_preauth_deadline() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&routing(&dovecot), |config, _| {
        config.timeouts.preauth = std::time::Duration::from_secs(1);
    })
    .await;
    // Commands whose answers are never read: the gateway's writes block once the socket
    // buffers are full. The pre-auth deadline must still end the connection.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (read, mut write) = tcp.into_split();
    const TOTAL: usize = 256 << 20;
    let chunk = b"a CAPABILITY\r\n".repeat(4096);
    let writer = async move {
        let mut sent = 0;
        while sent < TOTAL {
            if write.write_all(&chunk).await.is_err() {
                return (sent, true);
            }
            sent += chunk.len();
        }
        (sent, false)
    };
    let (sent, failed) = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the gateway neither reads nor closes after its pre-auth deadline");
    assert!(failed, "the gateway kept reading {sent} bytes of commands");
    // What was answered can still be read, then the connection ends.
    let mut read = BufReader::new(read);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, read.read_to_end(&mut rest))
        .await
        .expect("no EOF");
    assert!(rest.starts_with(greeting(CAPS_PLAIN_ALLOWED).as_bytes()));
    another_session_logs_in(&gw).await;
    gw.stop().await;
}
