//! The relay after login: how each side's end reaches the other, the commands the gateway
//! intercepts, and limits on what it relays.

mod common;

use common::dovecot::{Dovecot, DovecotOptions};
use common::fake::{self, AfterLogin};
use common::gateway;
use common::imap::{Client, last_line, tagged_ok};
use common::wait::until;

/// Polls `f` until it returns true or the test's bound passes.
#[tokio::test]
async fn client_gets_bye_when_backend_dies() {
    let backend = fake::start(AfterLogin::DieOnNextCommand).await;
    let gw = gateway::start(&gateway::single_backend(backend)).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "pw").await;
    c.write(b"a NOOP\r\n").await;
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, "* BYE [UNAVAILABLE] Backend connection lost\r\n");
    gw.stop().await;
}

#[tokio::test]
async fn backend_bye_is_passed_once_when_dovecot_stops() {
    let mut dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    dovecot.stop();
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest.matches("* BYE").count(), 1, "{rest:?}");
    gw.stop().await;
}

#[tokio::test]
async fn backend_is_logged_out_when_client_vanishes() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("bob", "bobpw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    drop(c);
    // Dovecot logs "Logged out" for a LOGOUT and "Disconnected" for a dropped connection.
    until("backend logged out", || {
        dovecot.log_contents().contains("imap(bob)")
            && dovecot.log_contents().contains("Logged out")
    })
    .await;
    assert!(
        !dovecot
            .log_contents()
            .contains("Disconnected: Connection closed")
    );
    gw.stop().await;
}

#[tokio::test]
async fn compress_is_refused_by_the_gateway_and_the_session_goes_on() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    let login = c.login("alice", "alicepw").await;
    assert!(!login.contains("COMPRESS"), "{login}");
    assert!(login.contains("MAILBOX-REFERRALS"), "{login}");
    let r = c.cmd("COMPRESS DEFLATE").await;
    assert_eq!(
        r,
        "t2 NO [CANNOT] COMPRESS is not available through this gateway\r\n"
    );
    // Pipelined: the refused COMPRESS between two relayed commands.
    c.write(b"p1 NOOP\r\np2 COMPRESS DEFLATE\r\np3 NOOP\r\n")
        .await;
    let mut tags = Vec::new();
    while tags.len() < 3 {
        let line = String::from_utf8(c.read_response().await).unwrap();
        if let Some(t) = line.split(' ').next().filter(|t| t.starts_with('p')) {
            tags.push(t.to_owned());
        }
    }
    tags.sort();
    assert_eq!(tags, ["p1", "p2", "p3"]);
    assert!(tagged_ok(&c.cmd("NOOP").await));
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn garbage_after_login_is_answered_by_the_backend() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(b"\x01\x02 garbage (((\r\n").await;
    let r = String::from_utf8(c.read_response().await).unwrap();
    assert!(r.contains("BAD"), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    assert!(tagged_ok(&r), "{r}");
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_command_line_after_login_ends_the_session() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    let mut long = b"a SEARCH SUBJECT \"".to_vec();
    long.resize(200 * 1024, b'x');
    c.write(&long).await;
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(last_line(&rest), "* BYE [TOOBIG] Command line too long");
    // The gateway still serves others.
    let mut other = Client::connect(gw.addr).await;
    other.login("alice", "alicepw").await;
    drop(other);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_backend_line_ends_the_session() {
    let backend = fake::start(AfterLogin::EndlessLine).await;
    let gw = gateway::start_with(&gateway::single_backend(backend), |c, _| {
        c.limits.max_backend_line = 1024 * 1024
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "pw").await;
    c.write(b"a NOOP\r\n").await;
    let rest = c.read_to_end().await;
    assert!(rest.len() < 2 * 1024 * 1024, "relayed {} bytes", rest.len());
    assert!(
        rest.ends_with(b"* BYE [UNAVAILABLE] Backend sent an oversized response\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rest[rest.len().saturating_sub(80)..])
    );
    gw.stop().await;
}

/// A backend that refuses a synchronizing literal answers the command instead of `+`, and
/// the client then sends its next command, not the literal. The relay must not take that
/// command for literal data.
#[tokio::test]
async fn refused_synchronizing_literal_does_not_desynchronize_the_relay() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(b"a1 APPEND NoSuchFolder {2000}\r\n").await;
    let r = String::from_utf8(c.read_response().await).unwrap();
    assert!(r.starts_with("a1 NO [TRYCREATE]"), "{r}");
    // Through a desynchronized relay this RLIST would pass as literal data, unrewritten,
    // and Dovecot would answer BAD.
    let r = c.cmd("RLIST \"\" \"*\"").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(r.contains("* LIST"), "{r}");
    drop(c);
    gw.stop().await;
}

/// A client that dies in the middle of an APPEND literal: the gateway must not end the
/// literal with a LOGOUT of its own (those bytes would become part of the message); the
/// backend stores nothing.
#[tokio::test]
async fn client_dying_mid_append_stores_nothing() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    // Exactly the length of the LOGOUT the gateway would send: a wrongly sent LOGOUT
    // would complete this literal and store a message.
    let logout = b"gwlogout LOGOUT\r\n";
    c.write(format!("a1 APPEND INBOX {{{}}}\r\n", logout.len() + 4).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(b"Sub:").await;
    drop(c);
    let mut check = Client::connect(dovecot.addr()).await;
    check.login("alice", "alicepw").await;
    // Wait for the backend to see the end of the dropped session, then count.
    until("the dropped session is over", || {
        dovecot.log_contents().contains("Disconnected")
    })
    .await;
    let status = check.cmd("STATUS INBOX (MESSAGES)").await;
    assert!(status.contains("(MESSAGES 0)"), "{status}");
    drop(check);
    gw.stop().await;
}

/// A client that sends LOGOUT and closes without waiting for the answer (as real clients
/// do) is counted as a logout, whichever side the gateway sees closing first.
#[tokio::test]
async fn a_logout_followed_by_close_is_counted_as_a_logout() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    for _ in 0..5 {
        let mut c = Client::connect(gw.addr).await;
        c.login("alice", "alicepw").await;
        c.write(b"t9 LOGOUT\r\n").await;
        drop(c);
    }
    let ended = |reason: &str| {
        gw.shared
            .metrics
            .sessions_ended
            .with_label_values(&[reason])
            .get()
    };
    until("five sessions ended", || {
        ended("logout") + ended("client_gone") == 5
    })
    .await;
    assert_eq!(ended("logout"), 5);
    gw.stop().await;
}

/// Large literals between two plain TCP legs move by splice (without passing through the
/// gateway's buffers) and arrive intact in both directions, with the responses and commands
/// around them framed as before: an APPEND, a FETCH of it, then more commands.
#[tokio::test]
async fn large_literals_on_plain_legs_are_spliced_intact() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let spliced = |i: usize| gw.shared.metrics.relay.spliced[i].get();
    let mut msg = b"From: splice@example.org\r\nSubject: splice\r\n\r\n".to_vec();
    let mut x: u32 = 7;
    while msg.len() < 1_500_000 {
        for _ in 0..70 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            msg.push(b'a' + ((x >> 16) % 26) as u8);
        }
        msg.extend_from_slice(b"\r\n");
    }
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("a1 APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    let mut io = c.into_inner();
    // The literal and the next command in one stream: what follows the literal must be
    // framed again after the spliced part.
    io.write_all(&msg).await.unwrap();
    // COMPRESS is answered by the gateway itself, only if it sees the command where it
    // starts: it shows that the framer is back in step after the spliced bytes.
    io.write_all(b"\r\na2 COMPRESS DEFLATE\r\n").await.unwrap();
    let mut c = Client::from_io(io);
    // The gateway may answer a2 before the backend has answered a1.
    let mut seen = String::new();
    while !(seen.contains("\r\na1 ") || seen.starts_with("a1 "))
        || !(seen.contains("\r\na2 ") || seen.starts_with("a2 "))
    {
        seen.push_str(&String::from_utf8_lossy(&c.read_response().await));
        seen.push_str("\r\n");
    }
    assert!(seen.contains("a1 OK"), "{seen}");
    assert!(
        seen.contains("a2 NO [CANNOT] COMPRESS is not available through this gateway"),
        "{seen}"
    );
    assert!(c.cmd("SELECT INBOX").await.contains("* 1 EXISTS"));
    c.write(b"a3 FETCH 1 BODY.PEEK[]\r\n").await;
    let mut io = c.into_inner();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        io.read_exact(&mut b).await.unwrap();
        line.push(b[0]);
    }
    assert_eq!(
        String::from_utf8_lossy(&line),
        format!("* 1 FETCH (BODY[] {{{}}}\r\n", msg.len())
    );
    let mut body = vec![0u8; msg.len()];
    io.read_exact(&mut body).await.unwrap();
    assert!(body == msg, "fetched body differs from appended body");
    let mut c = Client::from_io(io);
    assert!(tagged_ok(&c.until_tagged("a3").await));
    // The gateway writes its own answers only between two responses: this one comes only
    // if the backend-to-client framer is back in step too.
    let r = c.cmd("COMPRESS DEFLATE").await;
    assert!(r.contains("not available through this gateway"), "{r}");
    assert!(tagged_ok(&c.cmd("NOOP").await));
    // Everything but the part read with the announcing line went through the pipe.
    let least = msg.len() as u64 - 64 * 1024;
    assert!(
        spliced(0) >= least,
        "client to backend spliced {}",
        spliced(0)
    );
    assert!(
        spliced(1) >= least,
        "backend to client spliced {}",
        spliced(1)
    );
    drop(c);
    gw.stop().await;
}
