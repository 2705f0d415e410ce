//! Limits against real Dovecot: connections gateway-wide and per client address (the PROXY
//! header's address on a `proxy_protocol` listener, IPv6 by /64, exempt networks), sessions
//! per user (`NO [LIMIT]`), the autologout of idle sessions (single backend and with mounts,
//! IDLE included, the backend logged out), the auth penalty (a failing address waits, another
//! does not), and that every refusal is counted in `imapgw_limits_exceeded_total`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use common::dovecot::{Dovecot, DovecotOptions, login_lines, wait_for_log};
use common::gateway::{self, TestGateway};
use common::imap::{Client, tagged_ok, tcp_from};
use common::wait::until;
use imap_gateway::config::{BackendAuthMode, Config, ListenerConfig};
use imap_gateway::metrics::Limit;

const TOO_MANY: &str = "* BYE [UNAVAILABLE] Too many connections, try again later\r\n";
const TOO_MANY_FROM_IP: &str =
    "* BYE [UNAVAILABLE] Too many connections from your address, try again later\r\n";
const AUTOLOGOUT_BYE: &str = "* BYE [UNAVAILABLE] Autologout; idle for too long\r\n";
const AUTH_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

async fn start(dovecot: &Dovecot, tweak: impl FnOnce(&mut Config)) -> TestGateway {
    gateway::start_with(&gateway::single_backend(dovecot.addr()), |c, _| tweak(c)).await
}

fn hits(gw: &TestGateway, limit: Limit) -> u64 {
    gw.shared.metrics.limits.get(limit)
}

async fn client_from(source: [u8; 4], addr: SocketAddr) -> Client {
    Client::from_io(Box::new(tcp_from(source, addr).await))
}

async fn line(c: &mut Client) -> String {
    String::from_utf8(c.read_response().await).unwrap()
}

async fn expect_greeting(c: &mut Client) {
    let g = line(c).await;
    assert!(g.starts_with("* OK "), "{g:?}");
}

/// The connection gets exactly `bye` and is closed.
async fn expect_refused(c: &mut Client, bye: &str) {
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, bye);
}

#[tokio::test]
async fn total_connection_limit_refuses_with_bye_and_frees_the_place_on_close() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = start(&dovecot, |c| {
        c.limits.max_connections = 2;
        c.limits.max_connections_per_ip = 0;
    })
    .await;
    let mut a = Client::connect(gw.addr).await;
    expect_greeting(&mut a).await;
    let mut b = Client::connect(gw.addr).await;
    b.login("bob", "bobpw").await;
    for _ in 0..3 {
        let mut over = Client::connect(gw.addr).await;
        expect_refused(&mut over, TOO_MANY).await;
    }
    assert_eq!(hits(&gw, Limit::Connections), 3);
    assert_eq!(gw.shared.connections.open(), 2, "refusals hold nothing");
    assert_eq!(gw.shared.metrics.connections_open.get(), 2);
    // A pre-auth connection and a logged-in session give their places back when they end,
    // whichever way.
    drop(a);
    assert!(tagged_ok(&b.cmd("LOGOUT").await));
    drop(b);
    until("both places given back", || {
        gw.shared.connections.open() == 0
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    let mut d = Client::connect(gw.addr).await;
    expect_greeting(&mut d).await;
    assert_eq!(hits(&gw, Limit::Connections), 3);
    drop((c, d));
    until("closed", || gw.shared.metrics.connections_open.get() == 0).await;
    gw.stop().await;
}

#[tokio::test]
async fn per_address_limit_uses_the_proxy_header_address_groups_ipv6_and_spares_exempt() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let lb = ListenerConfig {
        name: "lb".into(),
        address: "127.0.0.1:0".parse().unwrap(),
        allow_plaintext_auth: true,
        proxy_protocol: true,
        proxy_trusted_networks: vec!["127.0.0.1".into()],
        ..ListenerConfig::default()
    };
    let gw = start(&dovecot, |c| {
        c.limits.max_connections_per_ip = 1;
        c.limits.exempt_networks = vec!["127.0.0.3".into(), "198.51.100.0/24".into()];
        c.listeners.push(lb);
    })
    .await;
    let mut held = vec![];
    // Plain listener: the socket's address.
    let mut a = client_from([127, 0, 0, 1], gw.addr).await;
    a.login("alice", "alicepw").await;
    held.push(a);
    let mut over = client_from([127, 0, 0, 1], gw.addr).await;
    expect_refused(&mut over, TOO_MANY_FROM_IP).await;
    let mut other = client_from([127, 0, 0, 2], gw.addr).await;
    expect_greeting(&mut other).await;
    held.push(other);
    for _ in 0..3 {
        let mut exempt = client_from([127, 0, 0, 3], gw.addr).await;
        expect_greeting(&mut exempt).await;
        held.push(exempt);
    }
    assert_eq!(hits(&gw, Limit::ConnectionsPerIp), 1);

    // PROXY listener: the header's client address, not the load balancer's (127.0.0.1,
    // which has its one connection already).
    let lb = gw.addr_of("lb");
    let proxied = |client: &str| {
        let family = if client.contains(':') { "TCP6" } else { "TCP4" };
        let front = if client.contains(':') {
            "2001:db8:ffff::1"
        } else {
            "192.0.2.1"
        };
        format!("PROXY {family} {client} {front} 40000 143\r\n")
    };
    let mut first = Client::connect(lb).await;
    first.write(proxied("203.0.113.7").as_bytes()).await;
    first.login("bob", "bobpw").await;
    held.push(first);
    let mut second = Client::connect(lb).await;
    second.write(proxied("203.0.113.7").as_bytes()).await;
    expect_refused(&mut second, TOO_MANY_FROM_IP).await;
    // IPv6: one /64 is one client.
    let mut v6 = Client::connect(lb).await;
    v6.write(proxied("2001:db8:1:2::1").as_bytes()).await;
    expect_greeting(&mut v6).await;
    held.push(v6);
    let mut same64 = Client::connect(lb).await;
    same64
        .write(proxied("2001:db8:1:2:ffff::9").as_bytes())
        .await;
    expect_refused(&mut same64, TOO_MANY_FROM_IP).await;
    let mut next64 = Client::connect(lb).await;
    next64.write(proxied("2001:db8:1:3::1").as_bytes()).await;
    expect_greeting(&mut next64).await;
    held.push(next64);
    // An exempt network behind the load balancer.
    for _ in 0..2 {
        let mut exempt = Client::connect(lb).await;
        exempt.write(proxied("198.51.100.20").as_bytes()).await;
        expect_greeting(&mut exempt).await;
        held.push(exempt);
    }
    assert_eq!(hits(&gw, Limit::ConnectionsPerIp), 3);
    assert_eq!(gw.shared.connections.open(), held.len());
    // 127.0.0.1, 127.0.0.2, 203.0.113.7 and two /64s; exempt addresses take no entry.
    assert_eq!(gw.shared.connections.addresses(), 5);
    drop(held);
    until("the per-address table empties", || {
        gw.shared.connections.addresses() == 0 && gw.shared.connections.open() == 0
    })
    .await;
    // The place is free again.
    let mut again = client_from([127, 0, 0, 1], gw.addr).await;
    again.login("alice", "alicepw").await;
    drop(again);
    gw.stop().await;
}

#[tokio::test]
async fn per_user_session_limit_refuses_the_login_with_limit_and_logs_out_the_backend() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = start(&dovecot, |c| c.limits.max_sessions_per_user = 1).await;
    let mut first = Client::connect(gw.addr).await;
    first.login("alice", "alicepw").await;
    let mut second = Client::connect(gw.addr).await;
    expect_greeting(&mut second).await;
    let r = second.cmd("LOGIN alice alicepw").await;
    assert_eq!(r, "t1 NO [LIMIT] Too many sessions for this user.\r\n");
    assert_eq!(hits(&gw, Limit::SessionsPerUser), 1);
    let limited = gw
        .shared
        .metrics
        .logins
        .with_label_values(&["login", "limit"])
        .get();
    assert_eq!(limited, 1);
    // The backend session opened for the refused login was logged out, not left open.
    wait_for_log(&dovecot, "the refused session's logout", |log| {
        log.lines()
            .any(|l| l.contains("imap(alice)") && l.contains("Logged out"))
    })
    .await;
    // Another user is not affected.
    let mut bob = Client::connect(gw.addr).await;
    bob.login("bob", "bobpw").await;
    // Once the first session ends, its place is free, on the same connection.
    assert!(tagged_ok(&first.cmd("LOGOUT").await));
    drop(first);
    until("alice's place freed", || {
        gw.shared.users.sessions_of("alice") == 0
    })
    .await;
    let r = second.cmd("LOGIN alice alicepw").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(tagged_ok(&second.cmd("SELECT INBOX").await));
    assert_eq!(gw.shared.users.sessions_of("ALICE"), 1);
    drop((second, bob));
    until("sessions gone", || gw.shared.users.users() == 0).await;
    gw.stop().await;
}

/// Sessions ended for `reason`. Counted as each session's task finishes, just after its
/// socket is closed, so a client that has seen the close waits for the count (`until`).
fn ended(gw: &TestGateway, reason: &str) -> u64 {
    gw.shared
        .metrics
        .sessions_ended
        .with_label_values(&[reason])
        .get()
}

/// How many times Dovecot logged `user` out after a LOGOUT.
fn logouts(dovecot: &Dovecot, user: &str) -> usize {
    dovecot
        .log_contents()
        .lines()
        .filter(|l| l.contains(&format!("imap({user})")) && l.contains("Logged out"))
        .count()
}

const AUTOLOGOUT: Duration = Duration::from_millis(500);

#[tokio::test]
async fn autologout_after_silence_and_in_idle_with_backend_logout() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = start(&dovecot, |c| {
        c.timeouts.autologout_unchecked = Some(AUTOLOGOUT);
    })
    .await;

    // Commands keep a session alive well past the timer.
    let mut busy = Client::connect(gw.addr).await;
    busy.login("alice", "alicepw").await;
    let started = Instant::now();
    let mut silent_since = started;
    while started.elapsed() < AUTOLOGOUT * 3 {
        silent_since = Instant::now();
        assert!(tagged_ok(&busy.cmd("NOOP").await));
        tokio::time::sleep(AUTOLOGOUT / 4).await;
    }
    // Then silence: BYE once the timer has run from the last command, not before, and the
    // backend is logged out.
    let rest = String::from_utf8(busy.read_to_end().await).unwrap();
    let waited = silent_since.elapsed();
    assert_eq!(rest, AUTOLOGOUT_BYE);
    assert!(
        waited >= AUTOLOGOUT - Duration::from_millis(50),
        "{waited:?}"
    );
    assert!(waited < AUTOLOGOUT * 3, "{waited:?}");
    wait_for_log(&dovecot, "alice logged out", |_| {
        logouts(&dovecot, "alice") == 1
    })
    .await;

    // IDLE starts the timer again and holds no longer than it: the IDLE is ended and the
    // backend logged out.
    let mut idler = Client::connect(gw.addr).await;
    idler.login("bob", "bobpw").await;
    assert!(tagged_ok(&idler.cmd("SELECT INBOX").await));
    idler.write(b"i1 IDLE\r\n").await;
    let cont = line(&mut idler).await;
    assert!(cont.starts_with("+ "), "{cont:?}");
    let idle_since = Instant::now();
    let rest = String::from_utf8(idler.read_to_end().await).unwrap();
    assert_eq!(rest, AUTOLOGOUT_BYE);
    assert!(idle_since.elapsed() >= AUTOLOGOUT - Duration::from_millis(50));
    wait_for_log(&dovecot, "bob logged out", |_| {
        logouts(&dovecot, "bob") == 1
    })
    .await;

    // A client gone quiet in the middle of a command has no safe point: closed at once,
    // with the BYE, and the backend is not sent a LOGOUT inside the literal.
    let mut stuck = Client::connect(gw.addr).await;
    stuck.login("carol@example.org", "carolpw").await;
    stuck.write(b"a1 APPEND INBOX {20}\r\n").await;
    let cont = line(&mut stuck).await;
    assert!(cont.starts_with("+ "), "{cont:?}");
    stuck.write(b"From: x").await;
    let rest = String::from_utf8(stuck.read_to_end().await).unwrap();
    assert_eq!(rest, AUTOLOGOUT_BYE);

    until("three sessions ended by autologout", || {
        ended(&gw, "autologout") == 3
    })
    .await;
    assert_eq!(logouts(&dovecot, "carol@example.org"), 0);
    gw.stop().await;
}

/// A home Dovecot, another mounted under `Other/` for everyone (alice has `Other/Box`
/// there), and a gateway with the short test autologout.
async fn with_a_mount() -> (Dovecot, Dovecot, TestGateway) {
    let home = Dovecot::start(DovecotOptions::default());
    let other = Dovecot::start(DovecotOptions::default());
    other.seed_message("alice", "Box", b"Subject: x\r\n\r\nhello\r\n");
    let routing = format!(
        "default_pool = [\"home\"]\n{}{}\
         [[mounts]]\nusers = \"*\"\nprefix = \"Other\"\nbackend = \"other\"\npath = \"\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("other", other.addr(), ""),
    );
    let gw = gateway::start_with(&routing, |c, _| {
        c.timeouts.autologout_unchecked = Some(AUTOLOGOUT);
    })
    .await;
    (home, other, gw)
}

#[tokio::test]
async fn autologout_with_mounts_between_commands_and_in_idle() {
    let (home, other, gw) = with_a_mount().await;

    let mut idler = Client::connect(gw.addr).await;
    idler.login("alice", "alicepw").await;
    let sel = idler.cmd("SELECT Other/Box").await;
    assert!(tagged_ok(&sel), "{sel}");
    idler.write(b"i1 IDLE\r\n").await;
    let cont = line(&mut idler).await;
    assert!(cont.starts_with("+ "), "{cont:?}");
    let since = Instant::now();

    let mut quiet = Client::connect(gw.addr).await;
    quiet.login("bob", "bobpw").await;
    assert!(tagged_ok(&quiet.cmd("LIST \"\" *").await));

    for c in [&mut idler, &mut quiet] {
        let rest = String::from_utf8(c.read_to_end().await).unwrap();
        assert_eq!(rest, AUTOLOGOUT_BYE);
    }
    assert!(since.elapsed() >= AUTOLOGOUT - Duration::from_millis(50));
    // The mounted server's IDLE was ended and the session logged out there.
    wait_for_log(&other, "logout on the mount", |_| {
        logouts(&other, "alice") == 1
    })
    .await;
    wait_for_log(&home, "logout on home", |_| {
        logouts(&home, "alice") == 1 && logouts(&home, "bob") == 1
    })
    .await;
    until("two sessions ended by autologout", || {
        ended(&gw, "autologout") == 2
    })
    .await;
    gw.stop().await;
}

const PENALTY_BASE: Duration = Duration::from_millis(300);
const PENALTY_MAX: Duration = Duration::from_millis(1000);
/// Slack for a loopback login against Dovecot on a busy machine.
const SLACK: Duration = Duration::from_millis(700);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Sends a login (LOGIN, or AUTHENTICATE PLAIN with SASL-IR) and returns its tagged answer
/// and how long it took.
async fn timed_login(c: &mut Client, password: &str, sasl: bool) -> (String, Duration) {
    let started = Instant::now();
    let r = if sasl {
        let ir = b64(format!("\0alice\0{password}").as_bytes());
        c.cmd(&format!("AUTHENTICATE PLAIN {ir}")).await
    } else {
        c.cmd(&format!("LOGIN alice {password}")).await
    };
    (r, started.elapsed())
}

/// Dovecot has an auth penalty of its own, keyed by the client address the gateway forwards:
/// replayed wrong passwords would add its seconds to the gateway's. So the gateway checks
/// passwords itself here (master mode, its own passdb), and Dovecot sees only good logins.
#[tokio::test]
async fn auth_penalty_delays_the_failing_address_and_no_one_else() {
    let dovecot = Dovecot::start(DovecotOptions {
        master_user: Some(("gwmaster".into(), "masterpw".into())),
        ..DovecotOptions::default()
    });
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |c, dir| {
        let passdb = dir.join("gateway.passwd");
        std::fs::write(&passdb, "alice:{PLAIN}alicepw\n").unwrap();
        c.backend_auth.mode = BackendAuthMode::Master;
        c.backend_auth.master_user = Some("gwmaster".into());
        c.backend_auth.master_password = Some("masterpw".into());
        c.backend_auth.passdb = Some(passdb);
        c.limits.auth_penalty_base = PENALTY_BASE;
        c.limits.auth_penalty_max = PENALTY_MAX;
        c.limits.max_auth_failures = 10;
    })
    .await;
    let delays = || gw.shared.metrics.auth_penalty_delays.get();
    let entries = || gw.shared.metrics.auth_penalty_entries.get();

    let mut bad = client_from([127, 0, 0, 1], gw.addr).await;
    expect_greeting(&mut bad).await;
    // Failures by LOGIN and by AUTHENTICATE alike: 0, then base, then twice base.
    let mut took = Vec::new();
    for (i, sasl) in [false, true, false].into_iter().enumerate() {
        let (r, t) = timed_login(&mut bad, "wrong", sasl).await;
        assert!(
            r.ends_with(&format!("{AUTH_FAILED}\r\n")),
            "attempt {i}: {r}"
        );
        took.push(t);
    }
    assert!(took[0] < PENALTY_BASE, "{took:?}");
    assert!(
        took[1] >= PENALTY_BASE && took[1] < PENALTY_BASE + SLACK,
        "{took:?}"
    );
    assert!(took[2] >= PENALTY_BASE * 2, "{took:?}");
    assert_eq!(delays(), 2);
    assert_eq!(entries(), 1);

    // The fourth attempt waits the cap (four times base is over it). While it waits, a
    // client from another address logs in at once: the wait blocks no one else.
    let fourth = tokio::spawn(async move {
        let (r, t) = timed_login(&mut bad, "alicepw", false).await;
        (bad, r, t)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut good = client_from([127, 0, 0, 2], gw.addr).await;
    expect_greeting(&mut good).await;
    let (r, t) = timed_login(&mut good, "alicepw", false).await;
    assert!(tagged_ok(&r), "{r}");
    assert!(t < PENALTY_BASE, "another address waited {t:?}");
    let (mut bad, r, t) = fourth.await.unwrap();
    assert!(tagged_ok(&r), "{r}");
    assert!(t >= PENALTY_MAX && t < PENALTY_MAX + SLACK, "{t:?}");
    assert_eq!(delays(), 3);
    // The success from 127.0.0.1 cleared its entry: its next login does not wait.
    assert_eq!(entries(), 0);
    assert!(tagged_ok(&bad.cmd("LOGOUT").await));
    let mut again = client_from([127, 0, 0, 1], gw.addr).await;
    expect_greeting(&mut again).await;
    let (r, t) = timed_login(&mut again, "alicepw", true).await;
    assert!(tagged_ok(&r), "{r}");
    assert!(t < PENALTY_BASE, "{t:?}");
    assert_eq!(delays(), 3);
    drop((bad, good, again));
    gw.stop().await;
}

#[tokio::test]
async fn preauth_and_session_limits_are_counted() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = start(&dovecot, |c| {
        c.limits.max_auth_failures = 1;
        c.limits.max_bad_commands = 1;
        c.limits.max_preauth_line = 256;
        c.limits.max_preauth_literal = 64;
        c.limits.max_command_line = 1024;
        c.limits.max_literal = 100;
        c.timeouts.preauth = Duration::from_millis(500);
    })
    .await;
    let bye_then_eof = async |c: &mut Client| {
        let rest = String::from_utf8(c.read_to_end().await).unwrap();
        assert!(rest.contains("* BYE"), "{rest:?}");
    };
    let mut c = Client::connect(gw.addr).await;
    expect_greeting(&mut c).await;
    c.write(format!("a {}\r\n", "x".repeat(300)).as_bytes())
        .await;
    bye_then_eof(&mut c).await;
    let mut c = Client::connect(gw.addr).await;
    expect_greeting(&mut c).await;
    c.write(b"a LOGIN {65}\r\n").await;
    bye_then_eof(&mut c).await;
    let mut c = Client::connect(gw.addr).await;
    expect_greeting(&mut c).await;
    c.write(b"a SELECT INBOX\r\n").await;
    bye_then_eof(&mut c).await;
    // From another address: Dovecot's own auth penalty would slow alice's logins below.
    let mut c = client_from([127, 0, 0, 2], gw.addr).await;
    expect_greeting(&mut c).await;
    c.write(b"a LOGIN alice wrong\r\n").await;
    bye_then_eof(&mut c).await;
    let mut c = Client::connect(gw.addr).await;
    expect_greeting(&mut c).await;
    bye_then_eof(&mut c).await;
    for limit in [
        Limit::PreauthLine,
        Limit::PreauthLiteral,
        Limit::BadCommands,
        Limit::AuthFailures,
        Limit::PreauthTimeout,
    ] {
        // Counted as the connection ends, just after its socket is closed.
        until(&format!("{limit:?} counted"), || hits(&gw, limit) == 1).await;
    }
    // After login.
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("b NOOP {}\r\n", "x".repeat(2000)).as_bytes())
        .await;
    bye_then_eof(&mut c).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(b"b APPEND INBOX {101}\r\n").await;
    bye_then_eof(&mut c).await;
    // Counted as the session ends, just after its socket is closed.
    until("both relay limits counted", || {
        hits(&gw, Limit::CommandLine) == 1 && hits(&gw, Limit::Literal) == 1
    })
    .await;
    gw.stop().await;
}

/// A large APPEND literal is spliced socket to socket, outside the relay's read loop: a slow
/// upload that keeps flowing for longer than the timer is activity, and the timer runs from
/// its end; an upload that stops flowing is cut like any client quiet mid-command.
/// A message over the splice threshold (64 KiB), for uploads that trickle.
fn slow_upload() -> Vec<u8> {
    let mut msg = b"From: slow@example.org\r\nSubject: slow upload\r\n\r\n".to_vec();
    while msg.len() < 256 * 1024 {
        msg.extend_from_slice(&[b'x'; 78]);
        msg.extend_from_slice(b"\r\n");
    }
    msg
}

/// Sends an APPEND announcing `len` bytes and waits for the invitation to send them.
async fn start_append(c: &mut Client, tag: &str, mailbox: &str, len: usize) {
    c.write(format!("{tag} APPEND {mailbox} {{{len}}}\r\n").as_bytes())
        .await;
    let cont = line(c).await;
    assert!(cont.starts_with("+ "), "{cont:?}");
}

/// APPENDs `msg` in twelve pieces a quarter timer period apart (three periods in all) and
/// returns the answer.
async fn upload_slowly(c: &mut Client, tag: &str, mailbox: &str, msg: &[u8]) -> String {
    start_append(c, tag, mailbox, msg.len()).await;
    for chunk in msg.chunks(msg.len().div_ceil(12)) {
        c.write(chunk).await;
        tokio::time::sleep(AUTOLOGOUT / 4).await;
    }
    c.write(b"\r\n").await;
    c.until_tagged(tag).await
}

#[tokio::test]
async fn autologout_and_spliced_literals() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = start(&dovecot, |c| {
        c.timeouts.autologout_unchecked = Some(AUTOLOGOUT);
    })
    .await;
    let msg = slow_upload();
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    let r = upload_slowly(&mut c, "a1", "INBOX", &msg).await;
    assert!(tagged_ok(&r), "{r}");
    assert!(gw.shared.metrics.relay.spliced[0].get() > 0, "not spliced");
    // Right after the upload the session is alive: the timer restarted with it.
    assert!(tagged_ok(&c.cmd("NOOP").await));

    // An upload that stalls inside the spliced literal.
    start_append(&mut c, "a3", "INBOX", msg.len()).await;
    c.write(&msg[..msg.len() / 2]).await;
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, AUTOLOGOUT_BYE);
    until("the session ended by autologout", || {
        ended(&gw, "autologout") == 1
    })
    .await;
    gw.stop().await;
}

/// With mounts, a streamed APPEND literal is under the autologout too: an upload that keeps
/// sending, however slowly, goes through; one that stalls is cut.
#[tokio::test]
async fn autologout_in_an_append_literal_to_a_mount() {
    let (_home, _other, gw) = with_a_mount().await;
    let msg = slow_upload();
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    let r = upload_slowly(&mut c, "a1", "Other/Box", &msg).await;
    assert!(tagged_ok(&r), "{r}");
    assert!(tagged_ok(&c.cmd("NOOP").await));

    start_append(&mut c, "a3", "Other/Box", msg.len()).await;
    c.write(&msg[..msg.len() / 2]).await;
    let since = Instant::now();
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert!(rest.ends_with(AUTOLOGOUT_BYE), "{rest:?}");
    assert!(since.elapsed() >= AUTOLOGOUT - Duration::from_millis(50));
    until("the session ended by autologout", || {
        ended(&gw, "autologout") == 1
    })
    .await;
    gw.stop().await;
}

/// A penalty that would outlast the pre-auth deadline does not let the attempt through
/// after it: the client is told it timed out, and the backend never sees the attempt.
#[tokio::test]
async fn a_penalty_longer_than_the_preauth_deadline_ends_the_dialogue() {
    let dovecot = Dovecot::start(DovecotOptions {
        master_user: Some(("gwmaster".into(), "masterpw".into())),
        ..DovecotOptions::default()
    });
    let preauth = Duration::from_millis(1500);
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |c, dir| {
        let passdb = dir.join("gateway.passwd");
        std::fs::write(&passdb, "alice:{PLAIN}alicepw\n").unwrap();
        c.backend_auth.mode = BackendAuthMode::Master;
        c.backend_auth.master_user = Some("gwmaster".into());
        c.backend_auth.master_password = Some("masterpw".into());
        c.backend_auth.passdb = Some(passdb);
        c.limits.auth_penalty_base = Duration::from_secs(10);
        c.limits.auth_penalty_max = Duration::from_secs(10);
        c.limits.max_auth_failures = 10;
        c.timeouts.preauth = preauth;
    })
    .await;
    let started = Instant::now();
    let mut c = client_from([127, 0, 0, 1], gw.addr).await;
    expect_greeting(&mut c).await;
    let (r, _) = timed_login(&mut c, "wrong", false).await;
    assert!(r.ends_with(&format!("{AUTH_FAILED}\r\n")), "{r}");
    // The right password now, but after a 10 s wait that the 1.5 s deadline cuts.
    c.write(b"a2 LOGIN alice alicepw\r\n").await;
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, "* BYE Disconnected for inactivity.\r\n");
    let took = started.elapsed();
    assert!(took >= preauth && took < preauth + SLACK, "{took:?}");
    // The backend never saw a login for alice.
    assert_eq!(login_lines(&dovecot.log_contents(), "alice").len(), 0);
    until("the timeout counted", || {
        hits(&gw, Limit::PreauthTimeout) == 1
    })
    .await;
    gw.stop().await;
}

/// The autologout measures the client's silence on its own turn only: a client that is slow
/// to read a large answer (the backend still owes the end of it) is not logged out when the
/// answer completes, and its next command is served. A client that stops reading altogether
/// is cut once it has taken nothing for `timeouts.client_send`.
#[tokio::test]
async fn autologout_does_not_count_while_an_answer_is_owed() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let mut msg = b"From: big@example.org\r\nSubject: big\r\n\r\n".to_vec();
    while msg.len() < 24 << 20 {
        msg.extend_from_slice(&[b'y'; 998]);
        msg.extend_from_slice(b"\r\n");
    }
    dovecot.seed_message("alice", "INBOX", &msg);
    let client_send = Duration::from_secs(3);
    let gw = start(&dovecot, |c| {
        c.timeouts.autologout_unchecked = Some(AUTOLOGOUT);
        c.timeouts.client_send = client_send;
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    c.write(b"f1 FETCH 1 BODY.PEEK[]\r\n").await;
    // The client reads nothing for three timer periods (less than the send limit): the
    // gateway is stuck writing the answer meanwhile, far more than the socket buffers hold.
    tokio::time::sleep(AUTOLOGOUT * 3).await;
    let r = c.until_tagged("f1").await;
    assert!(r.len() > msg.len(), "{}", r.len());
    assert!(r.contains("\r\nf1 OK "), "{}", &r[r.len() - 100..]);
    let r = c.cmd("NOOP").await;
    assert!(tagged_ok(&r), "{r}");
    assert_eq!(ended(&gw, "autologout"), 0);

    // A reader that stops: the FETCH is sent, nothing is read, and the session is cut.
    c.write(b"f2 FETCH 1 BODY.PEEK[]\r\n").await;
    let since = Instant::now();
    until("the stalled reader is cut", || {
        ended(&gw, "client_gone") == 1
    })
    .await;
    assert!(since.elapsed() >= client_send, "{:?}", since.elapsed());
    assert_eq!(ended(&gw, "autologout"), 0);
    // Its backend connection is closed too (a LOGOUT queued behind the unread answer may
    // not be reached, so Dovecot sees the connection go).
    wait_for_log(&dovecot, "the backend session ends", |log| {
        log.lines().any(|l| {
            l.contains("imap(alice)") && (l.contains("Disconnected") || l.contains("Logged out"))
        })
    })
    .await;
    drop(c);
    gw.stop().await;
}
