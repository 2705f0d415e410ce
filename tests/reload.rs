//! Live reloads against real Dovecot backends: the routing table swapped the way Kubernetes
//! updates a mounted ConfigMap, a bad table written in place, a hundred reloads under a
//! continuous login load, SIGHUP to the gateway binary, and listener certificates rotated
//! the way a mounted Secret is.
//!
//! Which backend a session reached is read on the IMAP level: each backend holds a mailbox
//! the other does not (`OnA` / `OnB`) for every user.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::dovecot::{Dovecot, DovecotOptions, free_port};
use common::gateway::{self, backend_toml};
use common::http;
use common::imap::{Client, WAIT, tagged_ok};
use common::process::GatewayProcess;
use common::tls::{self, TestCa, client_config};
use common::wait::eventually;
use imap_gateway::config::ListenerMode;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

const PASSWORD: &str = "secret";
/// Short, so the file-watching tests do not wait long; still several events long.
const DEBOUNCE: Duration = Duration::from_millis(50);

const MESSAGE: &[u8] = b"From: a@example.org\r\nSubject: marker\r\n\r\nmarker\r\n";

/// Two Dovecots with the same `users`; each user has `OnA` on the first and `OnB` on the
/// second.
fn two_backends(users: &[&str], extra_config: &str) -> (Dovecot, Dovecot) {
    let start = |marker: &str| {
        let d = Dovecot::start(DovecotOptions {
            users: users
                .iter()
                .map(|u| (u.to_string(), PASSWORD.to_owned()))
                .collect(),
            extra_config: extra_config.to_owned(),
            ..DovecotOptions::default()
        });
        for u in users {
            d.seed_message(u, marker, MESSAGE);
        }
        d
    };
    (start("OnA"), start("OnB"))
}

/// A routing table with backends `a` and `b` and each user pinned to the one given.
fn table(a: &Dovecot, b: &Dovecot, homes: &[(&str, &str)]) -> String {
    let mut t = backend_toml("a", a.addr(), "") + &backend_toml("b", b.addr(), "");
    for (user, backend) in homes {
        t += &format!("[[routes]]\nuser = \"{user}\"\nbackend = \"{backend}\"\n");
    }
    t
}

/// Which backend this session is on, by its marker mailbox.
async fn backend_of(c: &mut Client) -> &'static str {
    let list = c.cmd("LIST \"\" On*").await;
    assert!(tagged_ok(&list), "LIST: {list}");
    assert!(!list.contains("* BYE"), "LIST: {list}");
    match (list.contains(" OnA\r\n"), list.contains(" OnB\r\n")) {
        (true, false) => "a",
        (false, true) => "b",
        _ => panic!("no single backend marker: {list}"),
    }
}

/// Logs `user` in, tells the backend, logs out; panics if any step fails.
async fn login_lands_on(addr: SocketAddr, user: &str) -> &'static str {
    let mut c = Client::connect(addr).await;
    c.login(user, PASSWORD).await;
    let backend = backend_of(&mut c).await;
    let bye = c.cmd("LOGOUT").await;
    assert!(tagged_ok(&bye), "LOGOUT: {bye}");
    backend
}

/// A directory laid out like a Kubernetes ConfigMap or Secret volume: the files live in a
/// versioned directory, `..data` links to it, and each visible name links through `..data`.
struct Projected {
    dir: PathBuf,
    version: u32,
}

impl Projected {
    fn new(dir: &Path, files: &[(&str, &[u8])]) -> Projected {
        std::fs::create_dir_all(dir).unwrap();
        let p = Projected {
            dir: dir.to_owned(),
            version: 0,
        };
        p.write_version(files);
        std::os::unix::fs::symlink(p.version_name(), dir.join("..data")).unwrap();
        // As kubelet does, one link per top-level name: an item `gw/routing.toml` is
        // reached through the directory link `gw -> ..data/gw`.
        let mut top: Vec<&str> = files
            .iter()
            .map(|(name, _)| name.split('/').next().unwrap())
            .collect();
        top.sort_unstable();
        top.dedup();
        for name in top {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn version_name(&self) -> String {
        format!("..2026_{}", self.version)
    }

    fn write_version(&self, files: &[(&str, &[u8])]) {
        let version = self.dir.join(self.version_name());
        std::fs::create_dir(&version).unwrap();
        for (name, bytes) in files {
            let file = version.join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, bytes).unwrap();
        }
    }

    /// Publishes new contents as kubelet does: a new version directory, a `..data_tmp` link
    /// to it renamed over `..data` (atomic), then the old version removed.
    fn update(&mut self, files: &[(&str, &[u8])]) {
        let old = self.dir.join(self.version_name());
        self.version += 1;
        self.write_version(files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(self.version_name(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(old).unwrap();
    }
}

fn routing_reloads(gw: &gateway::TestGateway, trigger: &str, result: &str) -> u64 {
    gw.shared
        .metrics
        .routing_reloads
        .with_label_values(&[trigger, result])
        .get()
}

/// The last successful load and the last failed reload, in Unix seconds.
fn reload_timestamps(gw: &gateway::TestGateway) -> (f64, f64) {
    let m = &gw.shared.metrics;
    (m.routing_last_reload.get(), m.routing_last_failure.get())
}

fn cert_reloads(gw: &gateway::TestGateway, listener: &str, result: &str) -> u64 {
    gw.shared
        .metrics
        .certificate_reloads
        .with_label_values(&[listener, result])
        .get()
}

/// The ConfigMap swap: the table's `..data` link is renamed over while a session is open.
/// The watcher sees it (a watch on the old file's inode would not), new logins go to the new
/// backend and the open session stays where it was.
#[tokio::test]
async fn configmap_symlink_swap_moves_new_logins_and_keeps_open_sessions() {
    let (a, b) = two_backends(&["alice"], "");
    let on_a = table(&a, &b, &[("alice", "a")]);
    let on_b = table(&a, &b, &[("alice", "b")]);
    let mut configmap = None;
    let gw = gateway::start_with("", |config, dir| {
        let p = Projected::new(&dir.join("configmap"), &[("routing.toml", on_a.as_bytes())]);
        config.routing_table = p.path("routing.toml");
        config.reload.debounce = DEBOUNCE;
        configmap = Some(p);
    })
    .await;
    let mut configmap = configmap.unwrap();

    let mut before = Client::connect(gw.addr).await;
    before.login("alice", PASSWORD).await;
    assert_eq!(backend_of(&mut before).await, "a");
    assert!(tagged_ok(&before.cmd("SELECT OnA").await));

    configmap.update(&[("routing.toml", on_b.as_bytes())]);
    eventually("generation 2 after the ..data swap", async || {
        gw.shared.routes.generation() == 2
    })
    .await;
    assert_eq!(login_lands_on(gw.addr, "alice").await, "b");

    let noop = before.cmd("NOOP").await;
    assert!(tagged_ok(&noop) && !noop.contains("* BYE"), "NOOP: {noop}");
    assert_eq!(backend_of(&mut before).await, "a", "the open session moved");
    assert!(tagged_ok(&before.cmd("LOGOUT").await));

    // Back again: the watch survived its directory's churn (the old version removed).
    configmap.update(&[("routing.toml", on_a.as_bytes())]);
    eventually("generation 3 after the second swap", async || {
        gw.shared.routes.generation() == 3
    })
    .await;
    assert_eq!(login_lands_on(gw.addr, "alice").await, "a");
    assert_eq!(routing_reloads(&gw, "file", "ok"), 2);
    assert_eq!(routing_reloads(&gw, "file", "failed"), 0);
    gw.stop().await;
}

/// A ConfigMap item under a sub-directory (`gw/routing.toml`): the watched directory `gw` is
/// a link to `..data/gw`, so every `..data` swap puts a new directory there and removes the
/// one the last watch was on. Each of several swaps is seen and moves new logins.
#[tokio::test]
async fn configmap_item_in_a_sub_directory_is_followed_through_every_swap() {
    const SWAPS: u64 = 3;
    let (a, b) = two_backends(&["alice"], "");
    let tables = [
        table(&a, &b, &[("alice", "a")]),
        table(&a, &b, &[("alice", "b")]),
    ];
    let mut configmap = None;
    let gw = gateway::start_with("", |config, dir| {
        let p = Projected::new(
            &dir.join("configmap"),
            &[("gw/routing.toml", tables[0].as_bytes())],
        );
        config.routing_table = p.path("gw/routing.toml");
        config.reload.debounce = DEBOUNCE;
        configmap = Some(p);
    })
    .await;
    let mut configmap = configmap.unwrap();
    assert_eq!(login_lands_on(gw.addr, "alice").await, "a");

    for swap in 1..=SWAPS {
        let table = &tables[usize::from(swap % 2 == 1)];
        configmap.update(&[("gw/routing.toml", table.as_bytes())]);
        eventually(
            &format!("generation {} after swap {swap}", swap + 1),
            async || gw.shared.routes.generation() == swap + 1,
        )
        .await;
        let want = if swap % 2 == 1 { "b" } else { "a" };
        assert_eq!(login_lands_on(gw.addr, "alice").await, want, "swap {swap}");
    }
    assert_eq!(routing_reloads(&gw, "file", "ok"), SWAPS);
    assert_eq!(routing_reloads(&gw, "file", "failed"), 0);
    gw.stop().await;
}

/// Invalid TOML, then a table naming an unknown backend, written over the file in place:
/// each is refused and counted, the table in use stays; then a good file is taken.
#[tokio::test]
async fn a_bad_table_written_in_place_is_refused_and_the_old_one_kept() {
    let (a, b) = two_backends(&["alice"], "");
    let on_a = table(&a, &b, &[("alice", "a")]);
    let gw = gateway::start_with(&on_a, |config, _| config.reload.debounce = DEBOUNCE).await;
    let path = gw.shared.routes.path().to_owned();
    assert_eq!(login_lands_on(gw.addr, "alice").await, "a");

    let bad = [
        on_a.replace("[[routes]]", "[[routes]"),
        on_a.replace("backend = \"a\"", "backend = \"nowhere\""),
    ];
    for (n, text) in (1..).zip(bad) {
        std::fs::write(&path, text).unwrap();
        eventually("a failed file reload counted", async || {
            routing_reloads(&gw, "file", "failed") >= n
        })
        .await;
        assert_eq!(gw.shared.routes.generation(), 1);
        assert_eq!(login_lands_on(gw.addr, "alice").await, "a");
        // What the reload-failing alert compares: the failure is later than the last load.
        let (success, failure) = reload_timestamps(&gw);
        assert!(
            failure > success,
            "failure {failure} not after success {success}"
        );
    }

    std::fs::write(&path, table(&a, &b, &[("alice", "b")])).unwrap();
    eventually("the good file taken", async || {
        gw.shared.routes.generation() == 2
    })
    .await;
    assert_eq!(login_lands_on(gw.addr, "alice").await, "b");
    let (success, failure) = reload_timestamps(&gw);
    assert!(
        success > failure,
        "success {success} not after failure {failure}"
    );
    assert_eq!(routing_reloads(&gw, "file", "ok"), 1);
    gw.stop().await;
}

const LOAD_USERS: [&str; 6] = ["u1", "u2", "u3", "u4", "u5", "u6"];
/// Users moved between the backends on every reload (in opposite directions).
const MOVED: [&str; 2] = ["u1", "u2"];
const RELOADS: u64 = 100;
/// Client tasks logging in and out without pause during the reloads.
const LOGIN_LOOPS: usize = 4;

/// Where `user` lives in the table of generation `generation`.
fn home(user: &str, generation: u64) -> &'static str {
    let flip = generation.is_multiple_of(2);
    match user {
        "u1" => ["a", "b"][usize::from(flip)],
        "u2" => ["b", "a"][usize::from(flip)],
        "u3" | "u4" => "a",
        _ => "b",
    }
}

fn load_table(a: &Dovecot, b: &Dovecot, generation: u64) -> String {
    let homes: Vec<_> = LOAD_USERS
        .iter()
        .map(|u| (*u, home(u, generation)))
        .collect();
    table(a, b, &homes)
}

/// The issue's load test: the table is reloaded 100 times (`POST /admin/reload`) while
/// clients log in without pause. No login fails, no session is dropped (sessions opened at the start, one of them
/// in IDLE, answer at the end on their first backend and never saw BYE), and after every
/// reload the moved users' next logins reach their new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_reloads_under_continuous_logins() {
    let started = Instant::now();
    // Every session comes from 127.0.0.1 (forwarded by ID): above Dovecot's default of 10
    // connections per user and address.
    let (a, b) = two_backends(&LOAD_USERS, "mail_max_userip_connections = 1000\n");
    let gw = gateway::start_with(&load_table(&a, &b, 1), |config, _| {
        // Only this test reloads: the count of generations is exact.
        config.reload.watch = false;
    })
    .await;
    let path = gw.shared.routes.path().to_owned();
    let addr = gw.addr;

    // Long-lived sessions, each with its marker mailbox selected.
    let mut long_lived = Vec::new();
    for user in ["u1", "u2", "u3", "u5"] {
        let mut c = Client::connect(addr).await;
        c.login(user, PASSWORD).await;
        let backend = backend_of(&mut c).await;
        assert_eq!(backend, home(user, 1));
        let mailbox = if backend == "a" { "OnA" } else { "OnB" };
        assert!(tagged_ok(&c.cmd(&format!("SELECT {mailbox}")).await));
        long_lived.push((user, backend, mailbox, c));
    }
    let (_, _, _, idler) = &mut long_lived[2];
    idler.write(b"idle IDLE\r\n").await;
    let cont = idler.read_response().await;
    assert!(
        cont.starts_with(b"+ "),
        "{}",
        String::from_utf8_lossy(&cont)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let logins = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..LOGIN_LOOPS)
        .map(|k| {
            let (stop, logins) = (Arc::clone(&stop), Arc::clone(&logins));
            tokio::spawn(async move {
                let mut n = k;
                while !stop.load(Ordering::Relaxed) {
                    let user = LOAD_USERS[n % LOAD_USERS.len()];
                    let backend = login_lands_on(addr, user).await;
                    if !MOVED.contains(&user) {
                        assert_eq!(backend, home(user, 1), "{user} never moves");
                    }
                    logins.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();

    let mut checked = 0;
    for generation in 2..=RELOADS + 1 {
        std::fs::write(&path, load_table(&a, &b, generation)).unwrap();
        // Through the admin endpoint, as an operator or a deploy job would.
        let r = http::post(gw.admin, "/admin/reload").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["generation"], generation, "{r:?}");
        for user in MOVED {
            assert_eq!(
                login_lands_on(addr, user).await,
                home(user, generation),
                "{user}'s first login after reload to generation {generation}"
            );
            checked += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("a login loop failed");
    }
    assert_eq!(gw.shared.routes.generation(), RELOADS + 1);
    assert_eq!(routing_reloads(&gw, "admin", "ok"), RELOADS);

    let (_, _, _, idler) = &mut long_lived[2];
    idler.write(b"DONE\r\n").await;
    let done = idler.until_tagged("idle").await;
    assert!(tagged_ok(&done) && !done.contains("* BYE"), "IDLE: {done}");
    for (user, backend, mailbox, mut c) in long_lived {
        let noop = c.cmd("NOOP").await;
        assert!(
            tagged_ok(&noop) && !noop.contains("* BYE"),
            "{user}: {noop}"
        );
        let select = c.cmd(&format!("SELECT {mailbox}")).await;
        assert!(tagged_ok(&select), "{user}: {select}");
        assert_eq!(backend_of(&mut c).await, backend, "{user}'s session moved");
        assert!(tagged_ok(&c.cmd("LOGOUT").await));
    }
    for reason in ["backend_lost", "error", "drained", "kicked", "forced"] {
        let ended = gw
            .shared
            .metrics
            .sessions_ended
            .with_label_values(&[reason])
            .get();
        assert_eq!(ended, 0, "sessions ended as {reason}");
    }
    let total = logins.load(Ordering::Relaxed);
    println!(
        "{RELOADS} reloads, {total} logins by {LOGIN_LOOPS} loops, {checked} moved-user \
         logins checked, in {:?}",
        started.elapsed()
    );
    assert!(total >= LOGIN_LOOPS, "the login loops hardly ran: {total}");
    gw.stop().await;
}

/// Opens a TLS connection to `addr` trusting `ca`; returns it with the server's leaf
/// certificate.
async fn connect_tls(addr: SocketAddr, ca: &Path) -> (Client, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(client_config(ca))
            .connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
    (Client::from_io(Box::new(tls)), leaf)
}

/// The first certificate of a PEM file, DER.
fn leaf_of(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .unwrap()
        .to_vec()
}

/// A fresh certificate for localhost from `ca`: (certificate PEM, key PEM).
fn issue(ca: &TestCa) -> (Vec<u8>, Vec<u8>) {
    let scratch = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue(scratch.path(), "leaf", &["localhost", "127.0.0.1"]);
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

/// SIGHUP to the binary, with file watching off: the routing table (new logins move) and
/// the TLS listener's certificate (new handshakes present the new one) are read again, and
/// the process keeps running.
#[tokio::test]
async fn sighup_reloads_the_table_and_certificates_of_the_binary() {
    let (a, b) = two_backends(&["alice"], "");
    let scratch = tempfile::tempdir().unwrap();
    let ca = TestCa::new(scratch.path());
    let (cert, key) = issue(&ca);
    let tls = free_port().port();
    let mut gw = GatewayProcess::start_with(
        &table(&a, &b, &[("alice", "a")]),
        &format!(
            "[log]\nlevel = \"warn\"\n[reload]\nwatch = false\n\
             [[listeners]]\nname = \"imaps\"\naddress = \"127.0.0.1:{tls}\"\nmode = \"tls\"\n\
             tls_cert = \"tls.crt\"\ntls_key = \"tls.key\""
        ),
        |dir| {
            std::fs::write(dir.join("tls.crt"), &cert).unwrap();
            std::fs::write(dir.join("tls.key"), &key).unwrap();
        },
    )
    .await;
    let dir = gw.dir.path().to_owned();
    let routing = dir.join("routing.toml");
    let addr = gw.addr;
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls}").parse().unwrap();
    assert_eq!(login_lands_on(addr, "alice").await, "a");
    let (mut old_tls, served) = connect_tls(tls_addr, &ca.ca_path).await;
    assert_eq!(served, leaf_of(&cert));
    old_tls.login("alice", PASSWORD).await;

    std::fs::write(&routing, table(&a, &b, &[("alice", "b")])).unwrap();
    let (new_cert, new_key) = issue(&ca);
    std::fs::write(dir.join("tls.crt"), &new_cert).unwrap();
    std::fs::write(dir.join("tls.key"), &new_key).unwrap();
    // Nothing watches the files.
    assert_eq!(login_lands_on(addr, "alice").await, "a");

    gw.signal("HUP");
    eventually("a login on b after SIGHUP", async || {
        login_lands_on(addr, "alice").await == "b"
    })
    .await;
    eventually("the new certificate after SIGHUP", async || {
        connect_tls(tls_addr, &ca.ca_path).await.1 == leaf_of(&new_cert)
    })
    .await;
    assert!(gw.is_running(), "SIGHUP ended the gateway");
    let noop = old_tls.cmd("NOOP").await;
    assert!(tagged_ok(&noop), "NOOP on the old connection: {noop}");
    assert_eq!(backend_of(&mut old_tls).await, "a");
}

/// Certificate rotation the way a mounted Secret is updated (`..data` swap): new handshakes
/// get the new certificate, a connection made before keeps working, the reload is counted.
/// Then a pair whose key belongs to another certificate: refused, counted, the previous
/// certificate still served.
#[tokio::test]
async fn certificate_rotation_and_a_mismatched_pair() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(ca_dir.path());
    let (first_cert, first_key) = issue(&ca);
    let mut secret = None;
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        let p = Projected::new(
            &dir.join("tls"),
            &[("tls.crt", &first_cert), ("tls.key", &first_key)],
        );
        config.listeners.push(tls::listener(
            "imaps",
            ListenerMode::Tls,
            p.path("tls.crt"),
            p.path("tls.key"),
        ));
        config.reload.debounce = DEBOUNCE;
        secret = Some(p);
    })
    .await;
    let mut secret = secret.unwrap();
    let addr = gw.addr_of("imaps");

    let (mut old, served) = connect_tls(addr, &ca.ca_path).await;
    assert_eq!(served, leaf_of(&first_cert));
    old.login("alice", "alicepw").await;

    let (cert, key) = issue(&ca);
    secret.update(&[("tls.crt", &cert), ("tls.key", &key)]);
    eventually("a new handshake presents the new certificate", async || {
        connect_tls(addr, &ca.ca_path).await.1 == leaf_of(&cert)
    })
    .await;
    assert!(cert_reloads(&gw, "imaps", "ok") >= 1);
    let noop = old.cmd("NOOP").await;
    assert!(tagged_ok(&noop), "NOOP on the old connection: {noop}");

    // The key of another certificate.
    let (other_cert, _) = issue(&ca);
    let (_, other_key) = issue(&ca);
    let ok = cert_reloads(&gw, "imaps", "ok");
    secret.update(&[("tls.crt", &other_cert), ("tls.key", &other_key)]);
    eventually("the mismatched pair refused", async || {
        cert_reloads(&gw, "imaps", "failed") >= 1
    })
    .await;
    let (mut after, served) = connect_tls(addr, &ca.ca_path).await;
    assert_eq!(served, leaf_of(&cert), "the certificate in use stays");
    after.login("alice", "alicepw").await;
    assert!(tagged_ok(&after.cmd("LOGOUT").await));
    assert_eq!(cert_reloads(&gw, "imaps", "ok"), ok);
    assert!(tagged_ok(&old.cmd("LOGOUT").await));
    gw.stop().await;
}
