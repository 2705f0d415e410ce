//! Secrets never reach the logs: the gateway binary runs at the most verbose level (`trace`
//! for every crate, dependencies included, JSON lines) against a real Dovecot, clients log
//! in every way the gateway takes a password (LOGIN quoted and with literals, AUTHENTICATE
//! PLAIN with and without an initial response, AUTHENTICATE LOGIN, over implicit TLS, and a
//! failed login), the admin endpoints are called with the bearer token and with a wrong one;
//! then no line of the process's stdout and stderr may hold a password, a token, or their
//! base64 or byte-list forms. The log must show every login, so the test cannot pass on a
//! log that is empty or lost.

mod common;

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::dovecot::{Dovecot, DovecotOptions, free_port};
use common::gateway;
use common::http;
use common::imap::{Client, tagged_ok};
use common::process::GatewayProcess;
use common::tls::{TestCa, client_config};

/// Every secret shares this marker, so a partial leak (a password cut short) shows too.
const MARKER: &str = "Qx7vK";
const ALICE_PW: &str = "Qx7vK-alice-pass-91";
const BOB_PW: &str = "Qx7vK-bob-pass-38";
const CAROL_PW: &str = "Qx7vK-carol-pass-55";
const WRONG_PW: &str = "Qx7vK-wrong-pass-07";
const TOKEN: &str = "Qx7vK-admin-token-d41d8cd98f";
const WRONG_TOKEN: &str = "Qx7vK-not-the-token-0451";

/// What must not appear in any log line, with a name for the failure message.
fn forbidden() -> Vec<(String, String)> {
    let mut out = vec![("marker".to_owned(), MARKER.to_owned())];
    let users = [
        ("alice", ALICE_PW),
        ("bob", BOB_PW),
        ("carol@example.org", CAROL_PW),
    ];
    for (user, pw) in users.iter().copied().chain([("alice", WRONG_PW)]) {
        out.push((format!("{user}'s password"), pw.to_owned()));
        out.push((format!("{user}'s password, base64"), B64.encode(pw)));
        // A Vec<u8> or &[u8] printed with {:?}.
        let bytes: Vec<String> = pw.bytes().take(6).map(|b| b.to_string()).collect();
        out.push((format!("{user}'s password, as bytes"), bytes.join(", ")));
        out.push((
            format!("{user}'s SASL PLAIN payload"),
            B64.encode(format!("\0{user}\0{pw}")),
        ));
        out.push((
            format!("{user}'s SASL PLAIN payload with authzid"),
            B64.encode(format!("{user}\0{user}\0{pw}")),
        ));
    }
    for (name, t) in [("admin token", TOKEN), ("wrong admin token", WRONG_TOKEN)] {
        out.push((name.to_owned(), t.to_owned()));
        out.push((format!("{name}, base64"), B64.encode(t)));
    }
    out
}

async fn greeted(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).await;
    let greeting = c.read_response().await;
    assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
    c
}

async fn logout(mut c: Client) {
    let r = c.cmd("LOGOUT").await;
    assert!(tagged_ok(&r), "{r}");
}

/// Sends `line`, which ends in a synchronizing literal, and waits for the `+`.
async fn announce(c: &mut Client, line: &str) {
    c.write(line.as_bytes()).await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{line}: {cont:?}");
}

#[tokio::test]
async fn no_secret_reaches_the_log_at_trace_level() {
    let dovecot = Dovecot::start(DovecotOptions {
        users: vec![
            ("alice".into(), ALICE_PW.into()),
            ("bob".into(), BOB_PW.into()),
            ("carol@example.org".into(), CAROL_PW.into()),
        ],
        ..DovecotOptions::default()
    });
    let tls_port = free_port().port();
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path());
    let (cert, key) = ca.issue(certs.path(), "gw", &["localhost"]);
    // No file watching: the harness writes the log into the configuration's directory, which
    // the watcher watches, and at trace level the watcher logs every event on that file, each
    // log line making another event (hundreds of thousands of lines in seconds).
    let extra = format!(
        "[[listeners]]\nname = \"imaps\"\naddress = \"127.0.0.1:{tls_port}\"\nmode = \"tls\"\n\
         tls_cert = {cert:?}\ntls_key = {key:?}\n\
         [log]\nformat = \"json\"\nlevel = \"trace\"\n\
         [reload]\nwatch = false\n"
    );
    let gw = GatewayProcess::start_with_env(
        &gateway::single_backend(dovecot.addr()),
        &extra,
        // RUST_LOG would override `[log] level`: set it, so a caller's own cannot lower it.
        &[("RUST_LOG", "trace"), ("IMAP_GATEWAY_ADMIN__TOKEN", TOKEN)],
        |_| {},
    )
    .await;

    // LOGIN, quoted.
    let mut c = greeted(gw.addr).await;
    let r = c.cmd(&format!("LOGIN alice \"{ALICE_PW}\"")).await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;

    // LOGIN with synchronizing literals for both, then a non-synchronizing one.
    let mut c = greeted(gw.addr).await;
    announce(&mut c, "l1 LOGIN {5}\r\n").await;
    announce(&mut c, &format!("alice {{{}}}\r\n", ALICE_PW.len())).await;
    c.write(format!("{ALICE_PW}\r\n").as_bytes()).await;
    let r = c.until_tagged("l1").await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;
    let mut c = greeted(gw.addr).await;
    c.write(format!("l2 LOGIN bob {{{}+}}\r\n{BOB_PW}\r\n", BOB_PW.len()).as_bytes())
        .await;
    let r = c.until_tagged("l2").await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;

    // AUTHENTICATE PLAIN with an initial response (SASL-IR), and without one.
    let plain = |user: &str, pw: &str| B64.encode(format!("\0{user}\0{pw}"));
    let mut c = greeted(gw.addr).await;
    let r = c
        .cmd(&format!(
            "AUTHENTICATE PLAIN {}",
            plain("carol@example.org", CAROL_PW)
        ))
        .await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;
    let mut c = greeted(gw.addr).await;
    announce(&mut c, "p2 AUTHENTICATE PLAIN\r\n").await;
    c.write(format!("{}\r\n", plain("bob", BOB_PW)).as_bytes())
        .await;
    let r = c.until_tagged("p2").await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;

    // AUTHENTICATE LOGIN: user and password each base64 on a line of their own.
    let mut c = greeted(gw.addr).await;
    announce(&mut c, "s1 AUTHENTICATE LOGIN\r\n").await;
    c.write(format!("{}\r\n", B64.encode("alice")).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{cont:?}");
    c.write(format!("{}\r\n", B64.encode(ALICE_PW)).as_bytes())
        .await;
    let r = c.until_tagged("s1").await;
    assert!(tagged_ok(&r), "{r}");
    logout(c).await;

    // A wrong password, quoted and as SASL PLAIN.
    let mut c = greeted(gw.addr).await;
    let r = c.cmd(&format!("LOGIN alice \"{WRONG_PW}\"")).await;
    assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = c
        .cmd(&format!("AUTHENTICATE PLAIN {}", plain("alice", WRONG_PW)))
        .await;
    assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    logout(c).await;

    // Over implicit TLS.
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let mut c = Client::connect_tls(tls_addr, client_config(&ca.ca_path), "localhost").await;
    c.login("bob", BOB_PW).await;
    logout(c).await;

    // The admin endpoints, with the token and with a wrong one.
    let admin = admin_addr(&gw);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let r = http::request(admin, "GET", "/admin/route?user=alice", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http::request(admin, "POST", "/admin/kick?user=nobody", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http::request(admin, "POST", "/admin/reload", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let wrong = format!("Bearer {WRONG_TOKEN}");
    let r = http::request(
        admin,
        "GET",
        "/admin/route?user=alice",
        &[("Authorization", &wrong)],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    let log = gw.log_contents();
    check_log(&log);
}

/// The admin server's address, from its "listening" line (it binds port 0).
fn admin_addr(gw: &GatewayProcess) -> SocketAddr {
    let log = gw.log_contents();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "admin server listening")
        .and_then(|v| v["fields"]["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no admin address in the log:\n{log}"))
}

fn check_log(log: &str) {
    // The log is the real thing: JSON lines, at trace level, dependencies included, with a
    // line for each login.
    let lines: Vec<&str> = log.lines().collect();
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        json.len() > 30,
        "expected a verbose JSON log, got {} lines:\n{log}",
        lines.len()
    );
    assert!(
        json.iter().any(|v| v["level"] == "TRACE"),
        "no TRACE line: is the level applied?\n{log}"
    );
    assert!(
        json.iter().any(|v| v["level"] == "TRACE"
            && v["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("rustls"))),
        "no TRACE line from a dependency (rustls)"
    );
    let logins = |user: &str| {
        json.iter()
            .filter(|v| v["fields"]["message"] == "logged in" && v["span"]["user"] == user)
            .count()
    };
    assert_eq!(logins("alice"), 3, "alice's logins in the log:\n{log}");
    assert_eq!(logins("bob"), 3, "bob's logins in the log:\n{log}");
    assert_eq!(
        logins("carol@example.org"),
        1,
        "carol's login in the log:\n{log}"
    );
    assert!(
        log.contains("backend rejected credentials"),
        "the failed login is not in the log:\n{log}"
    );

    let mut leaks = Vec::new();
    for (name, secret) in forbidden() {
        for (i, line) in lines.iter().enumerate() {
            if line.contains(&secret) {
                leaks.push(format!("{name} ({secret}) on line {}: {line}", i + 1));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
}
