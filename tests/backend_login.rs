//! The backend leg against real Dovecot: ID forwarding of the client's address, master-user
//! logins with the gateway's own passdb, routing (exact, domain, pool) checked against the
//! `imap-gateway route` command, and `imap-gateway check-config`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions, login_lines, wait_for_log};
use common::gateway::{self, backend_toml};
use common::imap::{Client, last_line, tagged_ok};
use imap_gateway::config::BackendAuthMode;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_imap-gateway");

/// A client connected to `gateway` from the source address `source` (any of 127.0.0.0/8).
async fn connect_from(source: [u8; 4], gateway: SocketAddr) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("binding the client's source address");
    let tcp = tokio::time::timeout(common::imap::WAIT, socket.connect(gateway))
        .await
        .expect("connect timed out")
        .expect("connect");
    Client::from_io(Box::new(tcp))
}

/// Runs the built `imap-gateway` binary with `args`, without any IMAP_GATEWAY_* override
/// from the environment of the test run.
fn gateway_cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("IMAP_GATEWAY_") {
            cmd.env_remove(key);
        }
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {GATEWAY_BIN}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A gateway config file using `routing_table` (relative to the config's folder).
fn write_config(dir: &Path, name: &str, routing_table: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "routing_table = \"{routing_table}\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
             [[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\n\
             allow_plaintext_auth = true\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn id_forwards_client_address_only_to_trusted_backends() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    // One Dovecot (which trusts 127.0.0.0/8) behind two entries that differ in `trusted`.
    let routing = format!(
        "[[backends]]\nname = \"trusted\"\naddress = \"{addr}\"\ntrusted = true\n\
         [[backends]]\nname = \"untrusted\"\naddress = \"{addr}\"\ntrusted = false\n\
         [[routes]]\nuser = \"alice\"\nbackend = \"trusted\"\n\
         [[routes]]\nuser = \"bob\"\nbackend = \"untrusted\"\n",
        addr = dovecot.addr()
    );
    let gw = gateway::start(&routing).await;

    for (user, pass) in [("alice", "alicepw"), ("bob", "bobpw")] {
        let mut client = connect_from([127, 0, 0, 7], gw.addr).await;
        client.login(user, pass).await;
        assert!(tagged_ok(&client.cmd("SELECT INBOX").await));
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    let log = wait_for_log(&dovecot, "the logins of alice and bob", |log| {
        !login_lines(log, "alice").is_empty() && !login_lines(log, "bob").is_empty()
    })
    .await;
    let alice = login_lines(&log, "alice");
    assert!(
        alice.iter().all(|l| l.contains("rip=127.0.0.7,")),
        "trusted backend must see the client's address: {alice:?}"
    );
    let bob = login_lines(&log, "bob");
    assert!(
        bob.iter().all(|l| l.contains("rip=127.0.0.1,")),
        "untrusted backend must see the gateway's address: {bob:?}"
    );
    gw.stop().await;
}

/// `openssl passwd -6` hash of `password`.
fn sha512_crypt(password: &str) -> String {
    let out = Command::new("openssl")
        .args(["passwd", "-6", "-salt", "gwtestsalt", password])
        .output()
        .expect("running openssl passwd (package openssl)");
    assert!(out.status.success(), "openssl passwd: {out:?}");
    let hash = text(&out.stdout).trim().to_owned();
    assert!(hash.starts_with("$6$gwtestsalt$"), "{hash}");
    hash
}

#[tokio::test]
async fn master_user_login_with_gateway_passdb() {
    let dovecot = Dovecot::start(DovecotOptions {
        master_user: Some(("gwmaster".into(), "masterpw".into())),
        ..DovecotOptions::default()
    });
    dovecot.seed_message(
        "alice",
        "INBOX",
        b"Subject: for alice\r\n\r\nalice's own mail\r\n",
    );
    dovecot.seed_message(
        "bob",
        "INBOX",
        b"Subject: for bob\r\n\r\nbob's own mail\r\n",
    );
    let bob_hash = sha512_crypt("bob gateway secret");
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        let passdb = dir.join("gateway.passwd");
        std::fs::write(
            &passdb,
            format!("alice:{{PLAIN}}gatewaypw\nbob:{{SHA512-CRYPT}}{bob_hash}\n"),
        )
        .unwrap();
        config.backend_auth.mode = BackendAuthMode::Master;
        config.backend_auth.master_user = Some("gwmaster".into());
        config.backend_auth.master_password = Some("masterpw".into());
        config.backend_auth.passdb = Some(passdb);
    })
    .await;

    // The gateway's passwords, not Dovecot's, open the mailboxes.
    for (user, pass, subject) in [
        ("alice", "gatewaypw", "for alice"),
        ("bob", "bob gateway secret", "for bob"),
    ] {
        let mut client = Client::connect(gw.addr).await;
        client.login(user, pass).await;
        let select = client.cmd("SELECT INBOX").await;
        assert!(select.contains("* 1 EXISTS"), "{user}: {select}");
        let fetch = client.cmd("FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)])").await;
        assert!(
            fetch.contains(&format!("Subject: {subject}")),
            "{user}: {fetch}"
        );
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    // Wrong passwords (Dovecot's own password included), and users the passdb lacks.
    for (user, pass) in [
        ("alice", "wrong"),
        ("alice", "alicepw"),
        ("bob", "bobpw"),
        ("carol@example.org", "carolpw"),
        ("gwmaster", "masterpw"),
    ] {
        let mut client = Client::connect(gw.addr).await;
        let greeting = client.read_response().await;
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        let login = client.cmd(&format!("LOGIN \"{user}\" \"{pass}\"")).await;
        assert!(
            last_line(&login).starts_with("t1 NO [AUTHENTICATIONFAILED]"),
            "{user}/{pass}: {login}"
        );
        let select = client.cmd("SELECT INBOX").await;
        assert!(!tagged_ok(&select), "not logged in: {select}");
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }

    let log = wait_for_log(&dovecot, "the master logins", |log| {
        !login_lines(log, "alice").is_empty() && !login_lines(log, "bob").is_empty()
    })
    .await;
    for user in ["alice", "bob"] {
        assert!(
            log.contains(&format!("Master user logging in as {user}")),
            "no master login for {user} in the Dovecot log:\n{log}"
        );
    }
    // Only master logins reached Dovecot; the rejected passwords never left the gateway.
    assert!(
        login_lines(&log, "carol@example.org").is_empty()
            && !log.contains("password mismatch")
            && !log.contains("unknown user"),
        "a rejected login reached Dovecot:\n{log}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn routes_match_the_route_command() {
    let pool_users = ["bob", "dave", "erin", "frank", "grace", "heidi"];
    let mut users: Vec<(String, String)> = ["alice", "carol@example.org", "vip@example.org"]
        .iter()
        .chain(pool_users.iter())
        .map(|u| (u.to_string(), format!("{u}-pw")))
        .collect();
    users.sort();
    let names = ["exact", "domain", "pool-a", "pool-b"];
    let dovecots: Vec<Dovecot> = names
        .iter()
        .map(|_| {
            Dovecot::start(DovecotOptions {
                users: users.clone(),
                ..DovecotOptions::default()
            })
        })
        .collect();
    // Every user has a mailbox everywhere; the message says which backend holds it.
    for (name, dovecot) in names.iter().zip(&dovecots) {
        for (user, _) in &users {
            dovecot.seed_message(
                user,
                "INBOX",
                format!("Subject: stored on {name}\r\n\r\nhello {user}\r\n").as_bytes(),
            );
        }
    }
    let mut routing = String::from("default_pool = [\"pool-a\", \"pool-b\"]\n");
    for (name, dovecot) in names.iter().zip(&dovecots) {
        routing += &backend_toml(name, dovecot.addr(), "");
    }
    routing += "[[routes]]\nuser = \"alice\"\nbackend = \"exact\"\n\
                [[routes]]\nuser = \"vip@example.org\"\nbackend = \"exact\"\n\
                [[routes]]\nuser = \"*@example.org\"\nbackend = \"domain\"\n";
    let gw = gateway::start(&routing).await;
    let config = write_config(gw.dir.path(), "gateway.toml", "routing.toml");
    let addr_of = |name: &str| dovecots[names.iter().position(|n| *n == name).unwrap()].addr();

    let mut pool_hits = std::collections::BTreeSet::new();
    for (user, pass) in &users {
        let out = gateway_cli(&["--config", &config, "route", user]);
        assert!(out.status.success(), "route {user}: {out:?}");
        let stdout = text(&out.stdout);
        let (backend, address) = stdout
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("route {user}: expected `NAME HOST:PORT`, got {stdout:?}"));
        assert_eq!(address, addr_of(backend).to_string(), "route {user}");
        let expected = match user.as_str() {
            "alice" | "vip@example.org" => Some("exact"),
            "carol@example.org" => Some("domain"),
            _ => None,
        };
        match expected {
            Some(e) => assert_eq!(backend, e, "route {user}"),
            None => {
                assert!(backend.starts_with("pool-"), "route {user}: {backend}");
                pool_hits.insert(backend.to_owned());
            }
        }

        let mut client = Client::connect(gw.addr).await;
        client.login(user, pass).await;
        assert!(tagged_ok(&client.cmd("EXAMINE INBOX").await));
        let fetch = client
            .cmd("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            .await;
        assert!(
            fetch.contains(&format!("Subject: stored on {backend}\r\n")),
            "{user} should land on {backend}: {fetch}"
        );
        assert!(tagged_ok(&client.cmd("LOGOUT").await));
    }
    assert_eq!(
        pool_hits.len(),
        2,
        "the pool users should spread over both members: {pool_hits:?}"
    );

    // Logins reached only the backend each user was routed to.
    let log = wait_for_log(&dovecots[0], "alice's login", |log| {
        !login_lines(log, "alice").is_empty()
    })
    .await;
    assert!(login_lines(&log, "carol@example.org").is_empty(), "{log}");
    assert!(login_lines(&dovecots[1].log_contents(), "alice").is_empty());

    // A user no rule covers, with no pool: the command says so and fails.
    std::fs::write(
        gw.dir.path().join("nopool.toml"),
        backend_toml("exact", addr_of("exact"), "")
            + "[[routes]]\nuser = \"alice\"\nbackend = \"exact\"\n",
    )
    .unwrap();
    let nopool = write_config(gw.dir.path(), "nopool-gateway.toml", "nopool.toml");
    let out = gateway_cli(&["--config", &nopool, "route", "zed"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("no route for zed"), "{out:?}");
    gw.stop().await;
}

#[test]
fn check_config_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad-routing.toml"),
        "[[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1143\"\n\
         [[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1144\"\n\
         [[routes]]\nuser = \"alice\"\nbackend = \"nowhere\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"a\"\n\
         [[mounts]]\nusers = \"*@example.org\"\nprefix = \"Shared/Team\"\nbackend = \"a\"\n\
         [[mounts]]\nusers = \"bob\"\nprefix = \"Archive\"\nbackend = \"gone\"\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "routing_table = \"bad-routing.toml\"\n\
         [backend_auth]\nmode = \"master\"\nmaster_user = \"gwmaster\"\n\
         master_password = \"masterpw\"\n\
         [[listeners]]\nname = \"imaps\"\naddress = \"127.0.0.1:0\"\nmode = \"tls\"\n",
    )
    .unwrap();
    let out = gateway_cli(&["check-config", "--config", &bad.display().to_string()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for problem in [
        "listener \"imaps\" (127.0.0.1:0): mode \"tls\" needs tls_cert and tls_key",
        "backend \"a\": duplicate name",
        "route \"alice\": unknown backend \"nowhere\"",
        "mount \"Shared/Team\" for \"*@example.org\": prefix overlaps the mount \"Shared\" for the same users",
        "mount \"Archive\" for \"bob\": unknown backend \"gone\"",
        "backend_auth.mode = \"master\" needs passdb",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: ") && l.contains(problem)),
            "check-config should report {problem:?} on a line of its own:\n{stderr}"
        );
    }
    assert!(stderr.contains("6 problem(s) found"), "{stderr}");
    assert!(!text(&out.stdout).contains("configuration OK"), "{out:?}");

    // A file that is not even a valid configuration is an error too.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "listeners = 3\n").unwrap();
    let out = gateway_cli(&["check-config", "--config", &broken.display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // A good configuration.
    std::fs::write(
        dir.path().join("routing.toml"),
        "default_pool = [\"a\"]\n\
         [[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1143\"\n\
         [[routes]]\nuser = \"alice\"\nbackend = \"a\"\n",
    )
    .unwrap();
    let good = write_config(dir.path(), "good.toml", "routing.toml");
    let out = gateway_cli(&["check-config", "--config", &good]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains("configuration OK"), "{out:?}");

    let out = gateway_cli(&["route", "alice", "--config", &good]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "a 127.0.0.1:1143");
}

/// A backend without AUTH=PLAIN gets the client's credentials by LOGIN: quoted (a password
/// with quote and backslash) or as a LITERAL+ literal (8-bit bytes). Dovecot cannot be set
/// up without AUTH=PLAIN (its LOGIN command runs on the PLAIN mechanism), so a scripted
/// backend records what the gateway sends.
#[tokio::test]
async fn login_command_replay_when_backend_lacks_auth_plain() {
    let (addr, seen) = common::fake::start_recording("IMAP4rev1 LITERAL+ AUTH=LOGIN").await;
    let gw = gateway::start(&gateway::single_backend(addr)).await;
    let mut c = Client::connect(gw.addr).await;
    c.read_response().await;
    let r = c.cmd("LOGIN quoted \"p\\\"w\\\\x\"").await;
    assert!(tagged_ok(&r), "{r}");
    drop(c);
    let mut c = Client::connect(gw.addr).await;
    c.read_response().await;
    let pw = "pässwörd";
    c.write(format!("a LOGIN eightbit {{{}+}}\r\n{pw}\r\n", pw.len()).as_bytes())
        .await;
    let r = c.until_tagged("a").await;
    assert!(tagged_ok(&r), "{r}");
    drop(c);
    gw.stop().await;
    let seen = seen.lock().unwrap().clone();
    let logins: Vec<String> = seen
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .filter(|l| l.contains(" LOGIN "))
        .collect();
    assert_eq!(
        logins,
        [
            "gw1 LOGIN \"quoted\" \"p\\\"w\\\\x\"\r\n".to_owned(),
            format!("gw1 LOGIN \"eightbit\" {{{}+}}\r\n{pw}\r\n", pw.len()),
        ]
    );
}

/// A backend named by host name: looked up once and then remembered for
/// `performance.dns_ttl` (one lookup, then cached answers); with a zero TTL, looked up at every
/// login. Both against real Dovecot, so the remembered address is the one that works.
#[tokio::test]
async fn backend_host_names_are_looked_up_once_per_ttl() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let routing = format!(
        "default_pool = [\"b\"]\n[[backends]]\nname = \"b\"\naddress = \"localhost:{}\"\n",
        dovecot.addr().port()
    );
    for (ttl, resolved, cached) in [(Duration::from_secs(60), 1, 2), (Duration::ZERO, 3, 0)] {
        let gw = gateway::start_with(&routing, |c, _| c.performance.dns_ttl = ttl).await;
        for _ in 0..3 {
            let mut client = Client::connect(gw.addr).await;
            client.login("alice", "alicepw").await;
            assert!(tagged_ok(&client.cmd("SELECT INBOX").await));
            assert!(client.cmd("LOGOUT").await.contains("OK"));
            drop(client);
        }
        let lookups = &gw.shared.metrics.backend_dns_lookups;
        let count = |r: &str| lookups.with_label_values(&[r]).get();
        assert_eq!(
            (count("resolved"), count("cached"), count("failed")),
            (resolved, cached, 0),
            "dns_ttl {ttl:?}"
        );
        gw.stop().await;
    }
}
