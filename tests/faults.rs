//! Faults on either side of a session, and what each leaves behind: the exact answer the
//! client gets, no task or file descriptor left over once the faulty session is gone, and
//! another session, logged in on a healthy backend at the same time, still working.
//!
//! Faults a real server will not produce on demand (refusing, stalling, dying at a chosen
//! byte, garbage, a bad certificate) come from a scripted fake backend; the rest, and the
//! question whether an APPEND cut by a backend restart is stored exactly once or refused,
//! are asked of real Dovecot.
//!
//! Leaks are counted in the test process, where the gateway runs: open descriptors in
//! /proc/self/fd and the runtime's live tasks. nextest runs each test in a process of its
//! own, so nothing else moves these counts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions};
use common::fake::{self, Fault};
use common::gateway::{self, TestGateway};
use common::imap::{Client, last_line, tagged_ok};
use common::tls::TestCa;
use common::wait::until;
use imap_gateway::config::Config;

/// What a client is told when its backend cannot be logged into, whatever the reason.
const LOGIN_UNAVAILABLE: &str =
    "t1 NO [UNAVAILABLE] Mail server temporarily unavailable, try again later.\r\n";
const BACKEND_LOST: &str = "* BYE [UNAVAILABLE] Backend connection lost\r\n";

/// The message the healthy session fetches, before and after the fault.
const HEALTHY_MESSAGE: &[u8] =
    b"From: a@example.org\r\nSubject: still here\r\nMessage-ID: <healthy@test>\r\n\r\nhello\r\n";

/// Short backend timeouts: a stalled backend is given up quickly.
const BACKEND_TIMEOUT: Duration = Duration::from_millis(400);

/// What could leak: descriptors and tasks of the test process, where the gateway runs.
/// Pipes are counted apart from the idle ones of the relay's splice pool, which a session
/// leaves there for the next one: reuse, not a leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    /// Open descriptors other than pipes: sockets, files, the runtime's own.
    fds: usize,
    /// Pipe descriptors other than the pooled ones.
    pipes: usize,
    tasks: usize,
}

impl Census {
    /// Whether `self`, taken after a fault, holds nothing more than `before` did.
    fn settled(&self, before: &Census) -> bool {
        self == before
    }
}

fn census() -> Census {
    let (mut fds, mut pipes) = (0usize, 0usize);
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        // An entry can vanish between listing and reading (the listing's own descriptor).
        let Ok(target) = entry.and_then(|e| std::fs::read_link(e.path())) else {
            continue;
        };
        if target.to_string_lossy().starts_with("pipe:") {
            pipes += 1;
        } else {
            fds += 1;
        }
    }
    Census {
        fds,
        pipes: pipes.saturating_sub(2 * imap_gateway::relay::pooled_pipes()),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    }
}

/// Waits until the census is back to `before`; fails with both counts if it never is.
async fn settles_to(before: Census) {
    let deadline = tokio::time::Instant::now() + common::imap::WAIT;
    loop {
        let now = census();
        if now.settled(&before) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leak: before the fault {before:?}, long after it {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The census of a gateway that is up and serving: its accept loop and helpers start only
/// once its task first runs, so a connection is made and closed first, and the count is
/// taken when no session is left and it has stopped moving.
async fn warm_census(gw: &TestGateway) -> Census {
    let mut c = Client::connect(gw.addr).await;
    assert!(c.read_response().await.starts_with(b"* OK"));
    drop(c);
    until("the warm-up session is over", || {
        gw.shared.lifecycle.sessions() == 0
    })
    .await;
    let deadline = tokio::time::Instant::now() + common::imap::WAIT;
    let mut last = census();
    let mut same = 0;
    while same < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never still: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = census();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// A gateway in front of Dovecot (the default pool) and a faulty backend (user `victim`,
/// or whatever `routing_extra` routes there), with bob logged in on Dovecot, INBOX selected.
struct Scene {
    dovecot: Dovecot,
    gw: TestGateway,
    healthy: Client,
    before: Census,
}

impl Scene {
    async fn start(faulty: &str, routing_extra: &str) -> Scene {
        Self::start_with(faulty, routing_extra, |_| {}).await
    }

    /// `faulty`: the faulty backend's `[[backends]]` entry, named `faulty`.
    async fn start_with(
        faulty: &str,
        routing_extra: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Scene {
        let dovecot = Dovecot::start(DovecotOptions::default());
        dovecot.seed_message("bob", "INBOX", HEALTHY_MESSAGE);
        let routing = format!(
            "default_pool = [\"dovecot\"]\n{}{faulty}\n\
             [[routes]]\nuser = \"victim\"\nbackend = \"faulty\"\n{routing_extra}",
            gateway::backend_toml("dovecot", dovecot.addr(), ""),
        );
        let gw = gateway::start_with(&routing, |c, _| {
            c.timeouts.backend_connect = BACKEND_TIMEOUT;
            c.timeouts.backend_login = BACKEND_TIMEOUT;
            tweak(c);
        })
        .await;
        let mut healthy = Client::connect(gw.addr).await;
        healthy.login("bob", "bobpw").await;
        let r = healthy.cmd("SELECT INBOX").await;
        assert!(r.contains("* 1 EXISTS"), "{r}");
        let before = census();
        Scene {
            dovecot,
            gw,
            healthy,
            before,
        }
    }

    /// Once the faulty session's client is gone: everything it held is released, and the
    /// healthy session still fetches its message. Ends the gateway.
    async fn check_and_stop(mut self) {
        settles_to(self.before).await;
        assert!(tagged_ok(&self.healthy.cmd("NOOP").await));
        let r = self.healthy.cmd("FETCH 1 BODY.PEEK[]").await;
        assert!(tagged_ok(&r), "{r}");
        assert!(r.contains("Subject: still here"), "{r}");
        drop(self.healthy);
        self.gw.stop().await;
        drop(self.dovecot);
    }

    fn connect_failures(&self, kind: &str) -> u64 {
        self.gw
            .shared
            .metrics
            .backend_connect_failures
            .with_label_values(&["faulty", kind])
            .get()
    }
}

fn faulty_backend(addr: SocketAddr, extra: &str) -> String {
    format!("[[backends]]\nname = \"faulty\"\naddress = \"{addr}\"\n{extra}\n")
}

/// Logs `victim` in, expecting the answer a client gets when its backend is unavailable;
/// then the same connection can still log in as someone else (the session is not lost).
async fn victim_is_told_unavailable(scene: &Scene) {
    let mut c = Client::connect(scene.gw.addr).await;
    let greeting = c.read_response().await;
    assert!(greeting.starts_with(b"* OK"));
    assert_eq!(c.cmd("LOGIN victim pw").await, LOGIN_UNAVAILABLE);
    assert!(tagged_ok(&c.cmd("LOGIN bob bobpw").await));
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
}

#[tokio::test]
async fn backend_refusing_connections() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let scene = Scene::start(&faulty_backend(closed, ""), "").await;
    victim_is_told_unavailable(&scene).await;
    assert_eq!(scene.connect_failures("connect"), 1);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_stalling_before_its_greeting() {
    let (addr, log) = fake::start_fault(Fault::StallGreeting).await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    victim_is_told_unavailable(&scene).await;
    assert_eq!(log.lock().unwrap().accepted, 1);
    assert_eq!(scene.connect_failures("timeout"), 1);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_greeting_with_garbage() {
    let (addr, _) = fake::start_fault(Fault::GarbageGreeting(
        b"\x00\xffHTTP/1.1 400 Bad Request\r\n\r\n",
    ))
    .await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    victim_is_told_unavailable(&scene).await;
    assert_eq!(scene.connect_failures("protocol"), 1);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_answering_the_login_with_garbage() {
    // Not a tagged NO: the client must not be told its password is wrong.
    let (addr, _) = fake::start_fault(Fault::GarbageLogin(b"\x01\x02 what (((\r\n")).await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    victim_is_told_unavailable(&scene).await;
    assert_eq!(scene.connect_failures("protocol"), 1);
    scene.check_and_stop().await;
}

/// FETCHes from a backend scripted with `DieMidFetch { size: 1000, sent: 400 }`. Inside a
/// literal nothing more can be said (a BYE would read as message data): the client gets
/// what the backend sent, then the connection closes.
async fn fetch_is_cut_after_400_bytes(c: &mut Client) {
    c.write(b"f1 FETCH 1 BODY[]\r\n").await;
    let mut expected = b"* 1 FETCH (BODY[] {1000}\r\n".to_vec();
    expected.resize(expected.len() + 400, b'x');
    let got = c.read_to_end().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
}

#[tokio::test]
async fn backend_dying_mid_fetch_literal() {
    let (addr, log) = fake::start_fault(Fault::DieMidFetch {
        size: 1000,
        sent: 400,
    })
    .await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("victim", "pw").await;
    fetch_is_cut_after_400_bytes(&mut c).await;
    assert_eq!(log.lock().unwrap().faulted, 1);
    drop(c);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_dying_after_inviting_an_append_literal() {
    let (addr, log) = fake::start_fault(Fault::DieMidAppend { read: 0 }).await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("victim", "pw").await;
    c.write(b"a1 APPEND INBOX {100}\r\n").await;
    assert_eq!(c.read_response().await, b"+ OK\r\n");
    // The backend is gone between two of its responses: the client is told at once.
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, BACKEND_LOST);
    assert_eq!(log.lock().unwrap().faulted, 1);
    drop(c);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_dying_while_an_append_literal_streams() {
    let (addr, log) = fake::start_fault(Fault::DieMidAppend { read: 5000 }).await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("victim", "pw").await;
    c.write(b"a1 APPEND INBOX {100000}\r\n").await;
    assert_eq!(c.read_response().await, b"+ OK\r\n");
    c.write(&[b'm'; 5000]).await;
    until("the backend read part of the literal and died", || {
        log.lock().unwrap().literal_bytes == 5000
    })
    .await;
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(rest, BACKEND_LOST);
    // The rest of the literal has nowhere to go; the gateway may have closed already.
    let _ = c.try_write(&[b'm'; 95000]).await;
    drop(c);
    scene.check_and_stop().await;
}

/// The same on a mounted backend (a session with mounts streams big APPENDs itself): only
/// that APPEND fails, with a tagged `NO [UNAVAILABLE]`, and the session goes on.
#[tokio::test]
async fn mounted_backend_dying_while_an_append_literal_streams() {
    const SIZE: usize = 2 << 20;
    let (addr, log) = fake::start_fault(Fault::DieMidAppend { read: 64 * 1024 }).await;
    let mount = "[[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"faulty\"\n";
    let scene = Scene::start(&faulty_backend(addr, ""), mount).await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("a1 APPEND Shared/x {{{SIZE}}}\r\n").as_bytes())
        .await;
    assert_eq!(c.read_response().await, b"+ OK\r\n");
    c.write(&vec![b'm'; SIZE]).await;
    c.write(b"\r\n").await;
    let r = c.until_tagged("a1").await;
    assert_eq!(
        r,
        "a1 NO [UNAVAILABLE] The server holding this mailbox is not available now\r\n"
    );
    assert_eq!(log.lock().unwrap().literal_bytes, 64 * 1024);
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    drop(c);
    scene.check_and_stop().await;
}

#[tokio::test]
async fn backend_garbage_after_login_is_relayed_untouched() {
    // Binary bytes, an out-of-place continuation request, a literal announcement too big
    // for any number type, and a real small literal.
    const GARBAGE: &[u8] = b"\x00\xff\xfe\x07 junk\r\n+ \x01\r\n\
        * 1 FETCH {99999999999999999999999}\r\n* 2 X {5}\r\n\x00\r\n\xff\xfe)\r\n";
    let (addr, log) = fake::start_fault(Fault::GarbageAfterLogin(GARBAGE)).await;
    let scene = Scene::start(&faulty_backend(addr, ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("victim", "pw").await;
    c.write(b"g1 NOOP\r\n").await;
    let mut expected = GARBAGE.to_vec();
    expected.extend_from_slice(b"g1 OK done\r\n");
    let got = c.read_exact(expected.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    // The relay is still in step: the next answer is the next command's.
    let r = c.cmd("NOOP").await;
    assert!(r.ends_with("t2 OK done\r\n"), "{r:?}");
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    assert_eq!(log.lock().unwrap().faulted, 2);
    drop(c);
    scene.check_and_stop().await;
}

/// A backend with `tls = "implicit"` whose handshake fails: one speaks plain IMAP, one
/// presents a certificate from a CA the gateway does not trust. The same server with its CA
/// trusted (user `control`) logs in, so the failure is the certificate's.
#[tokio::test]
async fn backend_tls_handshake_failing() {
    let dir = tempfile::tempdir().unwrap();
    let their_ca = TestCa::new(dir.path());
    let (cert, key) = their_ca.issue(dir.path(), "backend", &["localhost", "127.0.0.1"]);
    let their_ca_path = dir.path().join("their-ca.pem");
    std::fs::rename(&their_ca.ca_path, &their_ca_path).unwrap();
    let our_ca = TestCa::new(dir.path());
    let (tls, _) = fake::start_tls(&cert, &key, false).await;
    let (plain, _) = fake::start_fault(Fault::GarbageAfterLogin(b"")).await;
    let (injecting, _) = fake::start_fault(Fault::StarttlsInjection).await;

    let untrusted = faulty_backend(
        tls,
        &format!(
            "tls = \"implicit\"\nca_file = \"{}\"",
            our_ca.ca_path.display()
        ),
    );
    let routing_extra = format!(
        "[[backends]]\nname = \"plaintext\"\naddress = \"{plain}\"\ntls = \"implicit\"\n\
         ca_file = \"{ours}\"\n\
         [[backends]]\nname = \"control\"\naddress = \"{tls}\"\ntls = \"implicit\"\n\
         ca_file = \"{theirs}\"\n\
         [[backends]]\nname = \"injecting\"\naddress = \"{injecting}\"\ntls = \"starttls\"\n\
         ca_file = \"{ours}\"\n\
         [[routes]]\nuser = \"plain\"\nbackend = \"plaintext\"\n\
         [[routes]]\nuser = \"injected\"\nbackend = \"injecting\"\n\
         [[routes]]\nuser = \"control\"\nbackend = \"control\"\n",
        ours = our_ca.ca_path.display(),
        theirs = their_ca_path.display(),
    );
    let scene = Scene::start(&untrusted, &routing_extra).await;
    victim_is_told_unavailable(&scene).await;
    assert_eq!(scene.connect_failures("tls"), 1);

    let mut c = Client::connect(scene.gw.addr).await;
    c.read_response().await;
    assert_eq!(c.cmd("LOGIN plain pw").await, LOGIN_UNAVAILABLE);
    let failures = scene
        .gw
        .shared
        .metrics
        .backend_connect_failures
        .with_label_values(&["plaintext", "tls"])
        .get();
    assert_eq!(failures, 1);
    // Bytes after the STARTTLS answer were sent before TLS: refused, never read after it.
    assert_eq!(
        c.cmd("LOGIN injected pw").await,
        LOGIN_UNAVAILABLE.replace("t1", "t2")
    );
    let failures = |kind| {
        scene
            .gw
            .shared
            .metrics
            .backend_connect_failures
            .with_label_values(&["injecting", kind])
            .get()
    };
    assert_eq!(failures("protocol"), 1);
    assert!(tagged_ok(&c.cmd("LOGIN control pw").await));
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    drop(c);
    scene.check_and_stop().await;
}

/// A client that dies inside its APPEND literal (real Dovecot): nothing is stored, and the
/// gateway keeps nothing of the session.
#[tokio::test]
async fn client_dying_mid_append_literal() {
    let scene = Scene::start(&faulty_backend(free_addr(), ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(b"a1 APPEND INBOX {10000}\r\n").await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(b"Subject: cut\r\n\r\nhalf a mess").await;
    drop(c);
    until("Dovecot saw alice's session end", || {
        scene.dovecot.log_contents().contains("imap(alice)")
            && scene.dovecot.log_contents().contains("Disconnected")
    })
    .await;
    let mut direct = Client::connect(scene.dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    let status = direct.cmd("STATUS INBOX (MESSAGES)").await;
    assert!(status.contains("(MESSAGES 0)"), "{status}");
    drop(direct);
    scene.check_and_stop().await;
}

/// A client that sends garbage after login (real Dovecot answers it): the session goes on,
/// and ends cleanly when the client vanishes.
#[tokio::test]
async fn client_garbage_after_login() {
    let scene = Scene::start(&faulty_backend(free_addr(), ""), "").await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("alice", "alicepw").await;
    for garbage in [
        &b"\x00\xff\xfe junk\r\n"[..],
        b")))(((\r\n",
        b"x {99999999999999999999999}\r\n",
        b"+ \r\n",
        b"\r\n",
        b"a1 NOSUCH {5}\r\n",
        b"\x01 APPEND INBOX {5}\r\n",
    ] {
        c.write(garbage).await;
        let r = String::from_utf8_lossy(&c.read_response().await).into_owned();
        assert!(r.contains(" BAD "), "{garbage:?} -> {r}");
    }
    let r = c.cmd("SELECT INBOX").await;
    assert!(tagged_ok(&r), "{r}");
    drop(c);
    scene.check_and_stop().await;
}

/// An address nobody listens on (for scenes whose faulty backend is not used).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Dovecot restarts while an APPEND literal streams through the gateway. Whatever the
/// client is told is what happened: a tagged OK means the message is stored once, a NO or
/// BYE that it is not stored at all. Never twice (the gateway does not retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_cut_by_a_backend_restart_is_stored_once_or_refused() {
    const SIZE: usize = 1 << 20;
    let mut dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let id = format!("<restart-{}@test>", std::process::id());
    let mut msg = format!("Subject: restart\r\nMessage-ID: {id}\r\n\r\n").into_bytes();
    msg.resize(SIZE, b'z');

    let before = warm_census(&gw).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("a1 APPEND INBOX {{{SIZE}}}\r\n").as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(&msg[..SIZE / 2]).await;
    tokio::task::block_in_place(|| dovecot.restart());
    // The backend may be gone before the rest arrives: the gateway then stops reading.
    let _ = c.try_write(&msg[SIZE / 2..]).await;
    let _ = c.try_write(b"\r\n").await;
    let told = String::from_utf8_lossy(&c.read_to_end().await).into_owned();
    drop(c);

    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    assert!(tagged_ok(&direct.cmd("SELECT INBOX").await));
    let stored = count_id(&mut direct, &id).await;
    let ok = told.lines().any(|l| l.starts_with("a1 OK"));
    let refused = told
        .lines()
        .any(|l| l.starts_with("a1 NO") || l.starts_with("* BYE"));
    assert!(ok != refused, "told both or neither: {told:?}");
    assert_eq!(stored, usize::from(ok), "told {told:?}");
    // Cut in the middle of its literal, the APPEND cannot have been accepted.
    assert!(refused, "{told:?}");
    assert_eq!(told.matches("* BYE").count(), 1, "{told:?}");
    assert_eq!(last_line(&told).split(' ').nth(1), Some("BYE"), "{told:?}");
    // The count is a real one: the same message appended whole is found once.
    assert_eq!(append_and_count(&mut direct, "INBOX", &msg, &id).await, 1);
    drop(direct);

    settles_to(before).await;
    // The gateway reaches the restarted backend for new sessions.
    let mut again = Client::connect(gw.addr).await;
    again.login("alice", "alicepw").await;
    assert!(tagged_ok(&again.cmd("SELECT INBOX").await));
    drop(again);
    gw.stop().await;
}

/// How many messages of the selected mailbox have Message-ID `id`.
async fn count_id(c: &mut Client, id: &str) -> usize {
    let found = c.cmd(&format!("SEARCH HEADER Message-ID \"{id}\"")).await;
    let search = found
        .lines()
        .find(|l| l.starts_with("* SEARCH"))
        .unwrap_or_else(|| panic!("{found}"));
    search.split(' ').skip(2).count()
}

/// APPENDs `msg` whole to `mailbox` (selected) and counts the messages with `id` there.
async fn append_and_count(c: &mut Client, mailbox: &str, msg: &[u8], id: &str) -> usize {
    c.write(format!("c1 APPEND {mailbox} {{{}+}}\r\n", msg.len()).as_bytes())
        .await;
    c.write(msg).await;
    c.write(b"\r\n").await;
    let r = c.until_tagged("c1").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(tagged_ok(&c.cmd("NOOP").await));
    count_id(c, id).await
}

/// The same with the APPEND going to a mounted backend (a session with mounts streams it
/// itself): the mounted Dovecot restarts mid-literal, only that APPEND is refused with
/// `NO [UNAVAILABLE]` (never the mounted server's BYE), nothing is stored there, and the
/// session goes on with its home backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_to_a_mount_cut_by_its_restart_is_refused_and_not_stored() {
    const SIZE: usize = 2 << 20;
    let home = Dovecot::start(DovecotOptions::default());
    let mut mounted = Dovecot::start(DovecotOptions::default());
    mounted.seed_message("alice", "Team", b"Subject: first\r\n\r\nhi\r\n");
    let routing = format!(
        "default_pool = [\"home\"]\n{}{}\
         [[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"mounted\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("mounted", mounted.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let id = format!("<mount-restart-{}@test>", std::process::id());
    let mut msg = format!("Subject: restart\r\nMessage-ID: {id}\r\n\r\n").into_bytes();
    msg.resize(SIZE, b'z');

    let before = warm_census(&gw).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("a1 APPEND Shared/Team {{{SIZE}}}\r\n").as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(&msg[..SIZE / 2]).await;
    tokio::task::block_in_place(|| mounted.restart());
    c.write(&msg[SIZE / 2..]).await;
    c.write(b"\r\n").await;
    let told = c.until_tagged("a1").await;
    assert_eq!(
        told,
        "a1 NO [UNAVAILABLE] The server holding this mailbox is not available now\r\n"
    );
    let r = c.cmd("SELECT INBOX").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    drop(c);

    let mut direct = Client::connect(mounted.addr()).await;
    direct.login("alice", "alicepw").await;
    assert!(tagged_ok(&direct.cmd("SELECT Team").await));
    assert_eq!(count_id(&mut direct, &id).await, 0);
    assert_eq!(append_and_count(&mut direct, "Team", &msg, &id).await, 1);
    drop(direct);
    settles_to(before).await;
    gw.stop().await;
}

/// A mounted backend that answers with garbage (a session with mounts reads and rewrites its
/// responses, unlike the byte relay): the commands on its mailboxes get an answer, the
/// session stays in step, and nothing leaks.
#[tokio::test]
async fn mounted_backend_answering_garbage() {
    const GARBAGE: &[u8] = b"\x00\xff\xfe\x07 junk\r\n+ \x01\r\n\
        * 1 FETCH {99999999999999999999999}\r\n* 2 X {5}\r\n\x00\r\n\xff\xfe)\r\n\
        * LIST (\\Noselect \"/\" {3}\r\nabc\r\n* STATUS {2}\r\nxy (MESSAGES x)\r\n";
    let (addr, log) = fake::start_fault(Fault::GarbageAfterLogin(GARBAGE)).await;
    let mount = "[[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"faulty\"\n";
    let scene = Scene::start(&faulty_backend(addr, ""), mount).await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("alice", "alicepw").await;
    // The client's tags go t2, t3, ...: each answer ends in its own command's tagged line.
    for (n, command) in (2..).zip([
        "STATUS Shared/x (MESSAGES)",
        "SELECT Shared/x",
        "FETCH 1 BODY[]",
        "LIST \"\" \"*\"",
        "CREATE Shared/y",
        "NOOP",
    ]) {
        let r = c.cmd(command).await;
        let tagged = last_line(&r);
        assert!(tagged.starts_with(&format!("t{n} OK ")), "{command}: {r:?}");
    }
    assert!(log.lock().unwrap().faulted > 0);
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    drop(c);
    scene.check_and_stop().await;
}

/// The home backend of a session with mounts dies inside a FETCH literal: as in the byte
/// relay, nothing may follow the cut literal (a BYE would read as message data).
#[tokio::test]
async fn home_backend_of_a_session_with_mounts_dying_mid_fetch_literal() {
    let (addr, log) = fake::start_fault(Fault::DieMidFetch {
        size: 1000,
        sent: 400,
    })
    .await;
    let mount = "[[mounts]]\nusers = \"victim\"\nprefix = \"Shared\"\nbackend = \"dovecot\"\n";
    let scene = Scene::start(&faulty_backend(addr, ""), mount).await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("victim", "pw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    fetch_is_cut_after_400_bytes(&mut c).await;
    assert_eq!(log.lock().unwrap().faulted, 1);
    drop(c);
    scene.check_and_stop().await;
}

/// A mounted backend dies inside a FETCH literal. Its mailboxes becoming unavailable is not
/// enough here: the client holds a cut message, and any answer after it (a tagged NO, the
/// next command's) would be read as the rest of that message. The session ends without a
/// word instead, as the byte relay does.
#[tokio::test]
async fn mounted_backend_dying_mid_fetch_literal_ends_the_session() {
    let (addr, log) = fake::start_fault(Fault::DieMidFetch {
        size: 1000,
        sent: 400,
    })
    .await;
    let mount = "[[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"faulty\"\n";
    let scene = Scene::start(&faulty_backend(addr, ""), mount).await;
    let mut c = Client::connect(scene.gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("SELECT Shared/x").await));
    fetch_is_cut_after_400_bytes(&mut c).await;
    assert_eq!(log.lock().unwrap().faulted, 1);
    drop(c);
    scene.check_and_stop().await;
}

/// A client that dies inside a big APPEND to a mounted Dovecot (streamed by the session with
/// mounts): the mounted server stores nothing, and the gateway keeps nothing of the session.
#[tokio::test]
async fn client_dying_mid_append_literal_to_a_mount() {
    const SIZE: usize = 2 << 20;
    let home = Dovecot::start(DovecotOptions::default());
    let mounted = Dovecot::start(DovecotOptions::default());
    mounted.seed_message("alice", "Team", b"Subject: first\r\n\r\nhi\r\n");
    let routing = format!(
        "default_pool = [\"home\"]\n{}{}\
         [[mounts]]\nusers = \"alice\"\nprefix = \"Shared\"\nbackend = \"mounted\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("mounted", mounted.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let id = format!("<mount-vanish-{}@test>", std::process::id());
    let mut msg = format!("Subject: vanish\r\nMessage-ID: {id}\r\n\r\n").into_bytes();
    msg.resize(SIZE, b'z');

    let before = warm_census(&gw).await;
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    c.write(format!("a1 APPEND Shared/Team {{{SIZE}}}\r\n").as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(&msg[..SIZE / 2]).await;
    drop(c);
    settles_to(before).await;
    until("the mounted Dovecot saw the session end", || {
        mounted.log_contents().contains("Disconnected")
    })
    .await;

    let mut direct = Client::connect(mounted.addr()).await;
    direct.login("alice", "alicepw").await;
    assert!(tagged_ok(&direct.cmd("SELECT Team").await));
    assert_eq!(count_id(&mut direct, &id).await, 0);
    assert_eq!(append_and_count(&mut direct, "Team", &msg, &id).await, 1);
    drop(direct);
    gw.stop().await;
}
