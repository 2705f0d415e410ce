//! Graceful shutdown: readiness turns false at once, listeners stop accepting, sessions before
//! login get BYE, logged-in sessions get `* BYE [UNAVAILABLE]` at a safe point (after the
//! response in flight, or inside IDLE) and the backend is logged out; a session that reaches
//! no safe point is closed when the grace period ends.

mod common;

use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions, wait_for_log};
use common::gateway;
use common::imap::{Client, WAIT, literal_len, tagged_ok};
use common::process::GatewayProcess;
use common::tls::{self, TestCa};
use common::wait::until;
use imap_gateway::config::ListenerMode;

const SHUTDOWN_BYE: &str = "* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n";
/// Larger than every socket buffer between Dovecot, the gateway and the client together, so
/// a client that has read only the start of it leaves the gateway in the middle of the FETCH.
const BIG: usize = 40 * 1024 * 1024;

fn big_message() -> Vec<u8> {
    let mut m = b"From: big@example.org\r\nSubject: big\r\n\r\n".to_vec();
    let mut i: u64 = 0;
    while m.len() < BIG - 80 {
        m.extend_from_slice(format!("{i:076}\r\n").as_bytes());
        i += 1;
    }
    m
}

/// Polls `f` until it holds or the test's bound passes.
#[tokio::test]
async fn fetch_in_flight_completes_then_bye_and_idle_gets_bye() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let raw = big_message();
    dovecot.seed_message("bob", "INBOX", &raw);
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    assert!(gw.shared.lifecycle.is_ready());

    let mut idler = Client::connect(gw.addr).await;
    idler.login("alice", "alicepw").await;
    assert!(tagged_ok(&idler.cmd("SELECT INBOX").await));
    idler.write(b"i1 IDLE\r\n").await;
    let cont = idler.read_response().await;
    assert!(cont.starts_with(b"+ "), "{cont:?}");

    let mut between = Client::connect(gw.addr).await;
    between.login("carol@example.org", "carolpw").await;
    assert!(tagged_ok(&between.cmd("NOOP").await));

    let mut fetcher = Client::connect(gw.addr).await;
    fetcher.login("bob", "bobpw").await;
    assert!(tagged_ok(&fetcher.cmd("SELECT INBOX").await));
    fetcher.write(b"f1 FETCH 1 BODY.PEEK[]\r\n").await;
    let head = fetcher.read_exact(64 * 1024).await;

    gw.begin_shutdown();
    until("readiness false", || !gw.shared.lifecycle.is_ready()).await;

    // IDLE and a session between commands end at once with the shutdown BYE.
    let rest = String::from_utf8(idler.read_to_end().await).unwrap();
    assert_eq!(rest, SHUTDOWN_BYE);
    let rest = String::from_utf8(between.read_to_end().await).unwrap();
    assert_eq!(rest, SHUTDOWN_BYE);

    // The FETCH in flight arrives whole, answered, then the BYE.
    let mut all = head;
    all.extend(fetcher.read_to_end().await);
    let line_end = all.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let first = &all[..line_end];
    assert!(
        first.starts_with(b"* 1 FETCH (BODY[] {"),
        "{:?}",
        String::from_utf8_lossy(first)
    );
    let len = literal_len(first).unwrap();
    assert_eq!(len, raw.len());
    assert!(
        all[line_end..line_end + len] == raw[..],
        "message bytes differ"
    );
    let tail = String::from_utf8(all[line_end + len..].to_vec()).unwrap();
    let lines: Vec<&str> = tail.split_inclusive("\r\n").collect();
    assert_eq!(lines[0], ")\r\n", "{tail:?}");
    assert!(lines[1].starts_with("f1 OK "), "{tail:?}");
    assert_eq!(lines[2..].concat(), SHUTDOWN_BYE, "{tail:?}");

    // The backends were logged out, not cut off (the IDLE was ended with DONE first).
    for user in ["alice", "bob", "carol@example.org"] {
        wait_for_log(&dovecot, "logout", |log| {
            log.lines()
                .any(|l| l.contains(&format!("imap({user})")) && l.contains("Logged out"))
        })
        .await;
    }
    tokio::time::timeout(WAIT, gw.shared.lifecycle.draining())
        .await
        .unwrap();
    let shared = gw.shared.clone();
    gw.stop().await;
    assert_eq!(ended_of(&shared, "drained"), 3);
    assert_eq!(shared.lifecycle.sessions(), 0);
}

#[tokio::test]
async fn preauth_sessions_get_bye_and_listeners_close() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    let greeting = c.read_response().await;
    assert!(greeting.starts_with(b"* OK"));
    assert!(tagged_ok(&c.cmd("CAPABILITY").await));
    gw.begin_shutdown();
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(
        rest,
        "* BYE [UNAVAILABLE] Server shutting down, please reconnect.\r\n"
    );
    let addr = gw.addr;
    until("listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_session_with_no_safe_point_is_closed_when_the_grace_period_ends() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    dovecot.seed_message("bob", "INBOX", &big_message());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        config.timeouts.shutdown_grace = Duration::from_millis(500);
    })
    .await;
    // This client asks for 40 MB and reads none of it: the FETCH never ends.
    let mut stuck = Client::connect(gw.addr).await;
    stuck.login("bob", "bobpw").await;
    assert!(tagged_ok(&stuck.cmd("SELECT INBOX").await));
    stuck.write(b"f1 FETCH 1 BODY.PEEK[]\r\n").await;
    let mut polite = Client::connect(gw.addr).await;
    polite.login("alice", "alicepw").await;
    // Wait until the gateway is blocked writing to the stuck client.
    until("the FETCH to be in flight", || {
        gw.shared.metrics.relay.backend_to_client.get() > 100_000
    })
    .await;

    gw.begin_shutdown();
    let rest = String::from_utf8(polite.read_to_end().await).unwrap();
    assert_eq!(rest, SHUTDOWN_BYE);
    let shared = gw.shared.clone();
    // Returns once the grace period has closed the stuck session.
    gw.stop().await;
    assert_eq!(ended_of(&shared, "forced"), 1);
    assert_eq!(ended_of(&shared, "drained"), 1);
    drop(stuck);
}

fn ended_of(shared: &imap_gateway::session::Shared, reason: &str) -> u64 {
    shared
        .metrics
        .sessions_ended
        .with_label_values(&[reason])
        .get()
}

#[tokio::test]
async fn sessions_with_mounts_stop_in_idle_and_between_commands() {
    let home = Dovecot::start(DovecotOptions::default());
    let other = Dovecot::start(DovecotOptions::default());
    other.seed_message("alice", "Box", b"Subject: x\r\n\r\nhello\r\n");
    let routing = format!(
        "default_pool = [\"home\"]\n{}{}\
         [[mounts]]\nusers = \"*\"\nprefix = \"Other\"\nbackend = \"other\"\npath = \"\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("other", other.addr(), ""),
    );
    let gw = gateway::start(&routing).await;

    let mut idler = Client::connect(gw.addr).await;
    idler.login("alice", "alicepw").await;
    let sel = idler.cmd("SELECT Other/Box").await;
    assert!(tagged_ok(&sel), "{sel}");
    assert!(sel.contains("* 1 EXISTS"), "{sel}");
    idler.write(b"i1 IDLE\r\n").await;
    let cont = idler.read_response().await;
    assert!(cont.starts_with(b"+ "), "{cont:?}");

    let mut between = Client::connect(gw.addr).await;
    between.login("bob", "bobpw").await;
    assert!(tagged_ok(&between.cmd("LIST \"\" *").await));

    gw.begin_shutdown();
    for c in [&mut idler, &mut between] {
        let rest = String::from_utf8(c.read_to_end().await).unwrap();
        assert_eq!(rest, SHUTDOWN_BYE);
    }
    // The mounted server's IDLE was ended and the session logged out there too.
    wait_for_log(&other, "logout on the mount", |log| {
        log.lines()
            .any(|l| l.contains("imap(alice)") && l.contains("Logged out"))
    })
    .await;
    until("both sessions counted as drained", || {
        ended_of(&gw.shared, "drained") == 2
    })
    .await;
    gw.stop().await;
}

/// The binary: SIGTERM drains (a session in IDLE gets the BYE) and the process exits 0 once
/// the sessions are gone, long before the grace period; its JSON log has one span per
/// connection with id, peer, listener, user and backend, and never the password.
#[tokio::test]
async fn sigterm_drains_and_exits_with_json_logs() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let mut gw = GatewayProcess::start(
        &gateway::single_backend(dovecot.addr()),
        "[log]\nformat = \"json\"\nlevel = \"info\"\n[timeouts]\nshutdown_grace = \"60s\"",
    )
    .await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    c.write(b"i1 IDLE\r\n").await;
    assert!(c.read_response().await.starts_with(b"+ "));

    let started = std::time::Instant::now();
    gw.signal("TERM");
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, SHUTDOWN_BYE);
    let status = gw.wait_exit().await;
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited for the grace period"
    );

    let log = gw.log_contents();
    assert!(!log.contains("alicepw"), "password in the log:\n{log}");
    let ended = log
        .lines()
        .find(|l| l.contains("\"session ended\""))
        .unwrap_or_else(|| panic!("no session end in the log:\n{log}"));
    for field in [
        "\"id\":",
        "\"peer\":\"127.0.0.1:",
        "\"listener\":\"plain\"",
        "\"user\":\"alice\"",
        "\"backend\":\"b\"",
        "\"end\":\"drained\"",
    ] {
        assert!(ended.contains(field), "{field} missing in {ended}");
    }
    assert!(log.contains("\"draining\""), "{log}");
}

/// Lines the gateway and the backend read differently do not fool the safe point: a bare
/// word gets a tagged `foo BAD` (no command was counted for it), a tag with `]` gets an
/// untagged `* BAD` (a command was). Afterwards an APPEND in flight still gets its OK before
/// the BYE, the message is stored once, and an IDLE is still ended with DONE and a LOGOUT.
#[tokio::test]
async fn stray_lines_do_not_move_the_safe_point() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        // Long enough that a session that never finds its safe point is seen to miss it.
        config.timeouts.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    let stray = async |c: &mut Client, line: &str, answer: &str| {
        c.write(line.as_bytes()).await;
        let r = String::from_utf8(c.read_response().await).unwrap();
        assert!(r.starts_with(answer), "{line:?}: {r}");
    };
    // One of each per session: they must not cancel out.
    let mut appender = Client::connect(gw.addr).await;
    appender.login("alice", "alicepw").await;
    stray(&mut appender, "foo\r\n", "foo BAD ").await;
    let mut idler = Client::connect(gw.addr).await;
    idler.login("bob", "bobpw").await;
    stray(&mut idler, "a] NOOP\r\n", "* BAD ").await;
    assert!(tagged_ok(&idler.cmd("SELECT INBOX").await));
    idler.write(b"i1 IDLE\r\n").await;
    assert!(idler.read_response().await.starts_with(b"+ "));

    let mut message = b"Subject: in flight\r\n\r\n".to_vec();
    message.resize(1024 * 1024, b'x');
    appender
        .write(format!("t1 APPEND INBOX {{{}+}}\r\n", message.len()).as_bytes())
        .await;
    appender.write(&message[..1000]).await;
    // The gateway has passed the APPEND line on: the backend holds part of a command.
    let relayed = gw.shared.metrics.relay.client_to_backend.clone();
    until("the APPEND to reach the gateway", || relayed.get() > 1000).await;
    gw.begin_shutdown();
    appender.write(&message[1000..]).await;
    appender.write(b"\r\n").await;
    let rest = String::from_utf8(appender.read_to_end().await).unwrap();
    let (answer, bye) = rest.split_once("\r\n").unwrap();
    assert!(answer.starts_with("t1 OK [APPENDUID "), "{rest}");
    assert_eq!(bye, SHUTDOWN_BYE);
    let rest = String::from_utf8(idler.read_to_end().await).unwrap();
    assert_eq!(rest, SHUTDOWN_BYE);

    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    let status = direct.cmd("STATUS INBOX (MESSAGES)").await;
    assert!(status.contains("(MESSAGES 1)"), "{status}");
    wait_for_log(&dovecot, "bob logged out", |log| {
        log.lines()
            .any(|l| l.contains("imap(bob)") && l.contains("Logged out"))
    })
    .await;
    let shared = gw.shared.clone();
    gw.stop().await;
    assert_eq!(ended_of(&shared, "drained"), 2);
}

/// Connections in stages without a safe point of their own (a TLS handshake the client never
/// finishes, a SASL exchange it never answers) end with the grace period, not with their own
/// (longer) pre-auth deadline.
#[tokio::test]
async fn connections_in_any_stage_end_with_the_grace_period() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        config.timeouts.shutdown_grace = Duration::from_millis(300);
        config.timeouts.preauth = Duration::from_secs(120);
        let ca = TestCa::new(dir);
        let (cert, key) = ca.issue(dir, "imaps", &["localhost"]);
        config
            .listeners
            .push(tls::listener("imaps", ListenerMode::Tls, cert, key));
    })
    .await;
    let mut sasl = Client::connect(gw.addr).await;
    assert!(sasl.read_response().await.starts_with(b"* OK"));
    sasl.write(b"a AUTHENTICATE PLAIN\r\n").await;
    assert!(sasl.read_response().await.starts_with(b"+"));
    // TCP only: the handshake waits for a ClientHello that never comes.
    let handshake = tokio::net::TcpStream::connect(gw.addr_of("imaps"))
        .await
        .unwrap();
    until("both connections registered", || {
        gw.shared.lifecycle.sessions() == 2
    })
    .await;

    let started = std::time::Instant::now();
    gw.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    sasl.read_to_end().await;
    drop(handshake);
}
