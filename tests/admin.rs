//! The admin HTTP server (docs/admin.md) against a gateway in front of real Dovecot backends,
//! over real HTTP/1.1 on TCP: health and readiness through a drain, the metrics a scraper
//! sees (checked by promtool), route lookups, live reloads, kicks and who may call /admin/*.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway::{self, TestGateway, backend_toml};
use common::http::{self, HttpResponse};
use common::imap::{Client, WAIT, tagged_ok};
use common::wait::eventually;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const PROMTOOL: &str = "/usr/bin/promtool";
const KICK_BYE: &str = "* BYE [UNAVAILABLE] Session ended by the administrator\r\n";
const MESSAGE: &str = "From: a@example.org\r\nTo: alice@example.org\r\nSubject: metrics probe\r\n\
                       \r\nHello through the gateway.\r\n";

/// One sample of a Prometheus text exposition: name and labels (sorted).
type Series = (String, BTreeMap<String, String>);

/// Parses the samples of a text exposition (comments skipped). Label values here never hold
/// `,` or `"`, so a simple split is enough.
fn samples(text: &str) -> Vec<(Series, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').expect("labels end with }")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').expect("label is k=v");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            ((name.to_owned(), labels), value)
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`, if present.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples(text)
        .into_iter()
        .find(|((n, l), _)| n == name && *l == want)
        .map(|(_, v)| v)
}

/// As `value`, panicking with the exposition when the series is missing.
fn must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in the exposition:\n{text}"))
}

async fn scrape(gw: &TestGateway) -> String {
    let r = http::get(gw.admin, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

/// Waits until the gateway says it is ready (it turns ready just after it starts serving).
async fn ready(admin: SocketAddr) {
    eventually("/readyz answers 200", async || {
        (http::get(admin, "/readyz").await.status == 200).then_some(())
    })
    .await;
}

/// Runs `promtool check metrics` on `text`; panics (never skips) when promtool is missing.
async fn promtool_check(text: &str) -> (bool, String) {
    assert!(
        std::path::Path::new(PROMTOOL).exists(),
        "{PROMTOOL} not found: this test checks the exposition with promtool; \
         install it with scripts/test.sh (Debian package prometheus)"
    );
    let mut child = tokio::process::Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = child.stdin.take().expect("promtool stdin");
    stdin
        .write_all(text.as_bytes())
        .await
        .expect("feed promtool");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("promtool timed out")
        .expect("promtool ran");
    let report = format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

fn two_backends(one: &Dovecot, two: &Dovecot, rest: &str) -> String {
    format!(
        "{}{}{rest}",
        backend_toml("one", one.addr(), ""),
        backend_toml("two", two.addr(), "")
    )
}

/// Whether `user`'s session sees `mailbox` (STATUS answers OK only where it exists).
async fn has_mailbox(c: &mut Client, mailbox: &str) -> bool {
    tagged_ok(&c.cmd(&format!("STATUS {mailbox} (MESSAGES)")).await)
}

#[tokio::test]
async fn health_stays_up_and_readiness_turns_false_while_draining() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        // Longer than the test's bound: the drain must end because the client finishes.
        config.timeouts.shutdown_grace = 2 * WAIT;
    })
    .await;
    let health = http::get(gw.admin, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    ready(gw.admin).await;
    assert_eq!(http::get(gw.admin, "/readyz").await.body, "ready\n");

    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    // Half an APPEND: Dovecot waits for the literal, so the session has no safe point to
    // stop at and the drain goes on until this client finishes the command.
    c.write(b"a1 APPEND INBOX {9}\r\n").await;
    let go_ahead = String::from_utf8(c.read_response().await).unwrap();
    assert!(go_ahead.starts_with('+'), "{go_ahead:?}");

    gw.begin_shutdown();
    let not_ready = eventually("/readyz turns 503", async || {
        let r = http::get(gw.admin, "/readyz").await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(not_ready.body, "draining\n");
    // Alive, just not taking new work.
    let health = http::get(gw.admin, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let m = scrape(&gw).await;
    assert_eq!(must(&m, "imapgw_draining", &[]), 1.0);
    assert_eq!(
        gw.shared.lifecycle.sessions(),
        1,
        "the drain is still waiting"
    );

    // The command completes, then the session stops at that safe point.
    c.write(b"Subject:x\r\n").await;
    let done = c.until_tagged("a1").await;
    assert!(tagged_ok(&done), "{done}");
    let rest = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(
        rest,
        "* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n"
    );
    gw.stop().await;
}

#[tokio::test]
async fn metrics_count_logins_commands_and_bytes_without_names_and_pass_promtool() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    dovecot.seed_message("alice", "INBOX", MESSAGE.as_bytes());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;

    let mut bad = Client::connect(gw.addr).await;
    bad.read_response().await;
    let r = bad.cmd("LOGIN alice wrong-password").await;
    assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    drop(bad);

    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("SELECT INBOX").await));
    let fetched = c.cmd("FETCH 1 (BODY[])").await;
    assert!(fetched.contains("Subject: metrics probe"), "{fetched}");

    let r = http::get(gw.admin, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = r.body;
    let login = |result| [("mechanism", "login"), ("result", result)];
    assert_eq!(must(&m, "imapgw_logins_total", &login("ok")), 1.0);
    assert_eq!(
        must(&m, "imapgw_logins_total", &login("bad_credentials")),
        1.0
    );
    assert!(must(&m, "imapgw_commands_total", &[("command", "select")]) >= 1.0);
    assert!(must(&m, "imapgw_commands_total", &[("command", "fetch")]) >= 1.0);
    for direction in ["client_to_backend", "backend_to_client"] {
        let bytes = must(
            &m,
            "imapgw_relayed_bytes_total",
            &[("direction", direction)],
        );
        assert!(bytes > 0.0, "{direction}: {bytes}");
    }
    // The FETCH answer alone holds the whole message.
    assert!(
        must(
            &m,
            "imapgw_relayed_bytes_total",
            &[("direction", "backend_to_client")]
        ) >= MESSAGE.len() as f64
    );
    let plain = [("listener", "plain")];
    assert!(must(&m, "imapgw_connections_accepted_total", &plain) >= 2.0);
    assert_eq!(must(&m, "imapgw_routing_table_generation", &[]), 1.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(must(&m, "imapgw_build_info", &[("version", version)]), 1.0);
    let ok = [("result", "ok")];
    assert_eq!(must(&m, "imapgw_login_duration_seconds_count", &ok), 1.0);
    assert_eq!(
        must(
            &m,
            "imapgw_login_duration_seconds_bucket",
            &[("result", "ok"), ("le", "+Inf")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &m,
            "imapgw_login_duration_seconds_bucket",
            &[("result", "bad_credentials"), ("le", "+Inf")]
        ),
        1.0
    );
    assert!(must(&m, "imapgw_login_duration_seconds_sum", &ok) > 0.0);
    assert_eq!(must(&m, "imapgw_sessions_active", &[("backend", "b")]), 1.0);
    // One backend login made it (the refused password is not a backend failure).
    let b = [("backend", "b")];
    assert_eq!(
        must(&m, "imapgw_backend_connect_duration_seconds_count", &b),
        1.0
    );
    assert!(!m.contains("imapgw_backend_connect_failures_total{"), "{m}");
    assert!(must(&m, "process_resident_memory_bytes", &[]) > 0.0);
    // No user name, password or address anywhere, labels included.
    for secret in [
        "alice",
        "wrong-password",
        "127.0.0.1",
        &dovecot.addr().to_string(),
    ] {
        assert!(!m.contains(secret), "{secret:?} in the exposition:\n{m}");
    }
    let (passed, report) = promtool_check(&m).await;
    assert!(
        passed,
        "promtool check metrics failed:\n{report}\n--- exposition:\n{m}"
    );

    // The session's end shows up too. The client waits for the gateway to close: were it to
    // close first, the session would end as client_gone.
    assert!(tagged_ok(&c.cmd("LOGOUT").await));
    assert_eq!(c.read_to_end().await, b"");
    // The counters move as each session task finishes, just after the socket closes.
    let m = eventually("the session's end is counted", async || {
        let m = scrape(&gw).await;
        let ended = value(&m, "imapgw_sessions_ended_total", &[("reason", "logout")]);
        let active = value(&m, "imapgw_sessions_active", &[("backend", "b")]);
        let open = value(&m, "imapgw_connections_active", &plain);
        (ended == Some(1.0) && active == Some(0.0) && open == Some(0.0)).then_some(m)
    })
    .await;
    // The scrapes before this one (each is counted once it has been answered).
    assert!(
        must(
            &m,
            "imapgw_admin_requests_total",
            &[("endpoint", "metrics"), ("code", "200")]
        ) >= 1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn route_shows_the_home_backend_and_mounts_a_login_gets() {
    let one = Dovecot::start(DovecotOptions::default());
    let two = Dovecot::start(DovecotOptions::default());
    one.seed_message("alice", "OnlyOnOne", MESSAGE.as_bytes());
    two.seed_message("alice", "Projects", MESSAGE.as_bytes());
    let table = two_backends(
        &one,
        &two,
        r#"
[[routes]]
user = "alice"
backend = "one"
[[routes]]
user = "*@example.org"
backend = "two"
[[mounts]]
users = "alice"
prefix = "Team/Projects"
backend = "two"
path = "Projects"
[[mounts]]
users = "*@example.org"
prefix = "Remote/Sales"
referral = "imap://imap.partner.example/Sales"
namespace = "other"
"#,
    );
    let gw = gateway::start(&table).await;

    let r = http::get(gw.admin, "/admin/route?user=alice").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({
            "user": "alice",
            "generation": 1,
            "home": {"name": "one", "address": one.addr().to_string(), "tls": "none"},
            "mounts": [{
                "prefix": "Team/Projects",
                "namespace": "shared",
                "backend": {"name": "two", "address": two.addr().to_string(), "tls": "none"},
                "path": "Projects"
            }]
        })
    );
    // Percent-decoded, and matched without regard to case like a login.
    let r = http::get(gw.admin, "/admin/route?user=Carol%40Example.org").await;
    assert_eq!(
        r.json(),
        json!({
            "user": "Carol@Example.org",
            "generation": 1,
            "home": {"name": "two", "address": two.addr().to_string(), "tls": "none"},
            "mounts": [{
                "prefix": "Remote/Sales",
                "namespace": "other",
                "referral": "imap://imap.partner.example/Sales"
            }]
        })
    );
    assert_eq!(
        http::get(gw.admin, "/admin/route?user=ALICE").await.json()["home"]["name"],
        "one"
    );

    // What the route says is what a login gets: home on one, the mount on two.
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(has_mailbox(&mut c, "OnlyOnOne").await);
    let status = c.cmd("STATUS Team/Projects (MESSAGES)").await;
    assert!(status.contains("(MESSAGES 1)"), "{status}");
    drop(c);

    let r = http::get(gw.admin, "/admin/route?user=bob").await;
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "no route for this user"}))
    );
    let r = http::get(gw.admin, "/admin/route").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.json()["error"].as_str().unwrap().contains("user"),
        "{r:?}"
    );
    let r = http::get(gw.admin, "/admin/route?user=a%zz").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = http::post(gw.admin, "/admin/route?user=alice").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    let r = http::get(gw.admin, "/admin/kick?user=alice").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    assert_eq!(http::get(gw.admin, "/admin/nope").await.status, 404);
    assert_eq!(http::get(gw.admin, "/nope").await.status, 404);
    assert_eq!(
        http::request(gw.admin, "DELETE", "/metrics", &[])
            .await
            .status,
        405
    );

    let m = scrape(&gw).await;
    let count = |endpoint, code| {
        value(
            &m,
            "imapgw_admin_requests_total",
            &[("endpoint", endpoint), ("code", code)],
        )
    };
    assert_eq!(count("route", "200"), Some(3.0));
    assert_eq!(count("route", "404"), Some(1.0));
    assert_eq!(count("route", "400"), Some(2.0));
    assert_eq!(count("route", "405"), Some(1.0));
    assert_eq!(count("kick", "405"), Some(1.0));
    assert_eq!(count("other", "404"), Some(2.0));
    assert_eq!(count("metrics", "405"), Some(1.0));
    assert!(!m.contains("alice") && !m.contains("arol"), "{m}");
    gw.stop().await;
}

#[tokio::test]
async fn reload_moves_new_logins_and_a_bad_table_keeps_the_old_one() {
    let one = Dovecot::start(DovecotOptions::default());
    let two = Dovecot::start(DovecotOptions::default());
    one.seed_message("alice", "OnlyOnOne", MESSAGE.as_bytes());
    two.seed_message("alice", "OnlyOnTwo", MESSAGE.as_bytes());
    let pinned = |backend: &str| {
        two_backends(
            &one,
            &two,
            &format!("[[routes]]\nuser = \"alice\"\nbackend = \"{backend}\"\n"),
        )
    };
    let gw = gateway::start(&pinned("one")).await;
    let table_file = gw.shared.routes.path().to_owned();
    let home_of = async |gw: &TestGateway| {
        let r = http::get(gw.admin, "/admin/route?user=alice").await.json();
        (r["home"]["name"].clone(), r["generation"].clone())
    };
    assert_eq!(home_of(&gw).await, (json!("one"), json!(1)));
    let mut before = Client::connect(gw.addr).await;
    before.login("alice", "alicepw").await;
    assert!(has_mailbox(&mut before, "OnlyOnOne").await);

    std::fs::write(&table_file, pinned("two")).unwrap();
    let r = http::post(gw.admin, "/admin/reload").await;
    assert_eq!((r.status, r.json()), (200, json!({"generation": 2})));
    assert_eq!(home_of(&gw).await, (json!("two"), json!(2)));
    let mut after = Client::connect(gw.addr).await;
    after.login("alice", "alicepw").await;
    assert!(has_mailbox(&mut after, "OnlyOnTwo").await);
    assert!(!has_mailbox(&mut after, "OnlyOnOne").await);
    // A session keeps the route it logged in with.
    assert!(has_mailbox(&mut before, "OnlyOnOne").await);
    drop((before, after));

    std::fs::write(
        &table_file,
        pinned("two").replace("backend = \"two\"", "backend = \"nowhere\""),
    )
    .unwrap();
    let r = http::post(gw.admin, "/admin/reload").await;
    assert_eq!(r.status, 422, "{r:?}");
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("unknown backend \"nowhere\""), "{error}");
    assert_eq!(home_of(&gw).await, (json!("two"), json!(2)));
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert!(has_mailbox(&mut c, "OnlyOnTwo").await);
    drop(c);
    let m = scrape(&gw).await;
    let reloads = |result| {
        must(
            &m,
            "imapgw_routing_table_reloads_total",
            &[("trigger", "admin"), ("result", result)],
        )
    };
    assert_eq!((reloads("ok"), reloads("failed")), (1.0, 1.0));
    assert_eq!(must(&m, "imapgw_routing_table_generation", &[]), 2.0);

    // A table that cannot be read at all is a server-side failure, and changes nothing either.
    std::fs::remove_file(&table_file).unwrap();
    let r = http::post(gw.admin, "/admin/reload").await;
    assert_eq!(r.status, 500, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("cannot read routing table"),
        "{r:?}"
    );
    assert_eq!(home_of(&gw).await, (json!("two"), json!(2)));
    let m = scrape(&gw).await;
    assert_eq!(
        must(
            &m,
            "imapgw_routing_table_reloads_total",
            &[("trigger", "admin"), ("result", "failed")]
        ),
        2.0
    );
    // A GET does not reload.
    assert_eq!(http::get(gw.admin, "/admin/reload").await.status, 405);
    gw.stop().await;
}

#[tokio::test]
async fn kick_ends_every_session_of_one_user_at_a_safe_point() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut between = Client::connect(gw.addr).await;
    between.login("alice", "alicepw").await;
    assert!(tagged_ok(&between.cmd("SELECT INBOX").await));
    let mut idle = Client::connect(gw.addr).await;
    idle.login("alice", "alicepw").await;
    assert!(tagged_ok(&idle.cmd("SELECT INBOX").await));
    idle.write(b"i1 IDLE\r\n").await;
    let idling = String::from_utf8(idle.read_response().await).unwrap();
    assert!(idling.starts_with("+ "), "{idling:?}");
    let mut other = Client::connect(gw.addr).await;
    other.login("bob", "bobpw").await;
    // Not logged in yet: no user to match.
    let mut anonymous = Client::connect(gw.addr).await;
    anonymous.read_response().await;

    let r = http::post(gw.admin, "/admin/kick?user=alice").await;
    assert_eq!((r.status, r.json()), (200, json!({"sessions": 2})));
    for c in [&mut between, &mut idle] {
        let rest = String::from_utf8(c.read_to_end().await).unwrap();
        assert_eq!(rest, KICK_BYE);
    }
    assert!(tagged_ok(&other.cmd("NOOP").await));
    assert!(tagged_ok(&anonymous.cmd("NOOP").await));

    // The counters move as each session task finishes, just after its socket closes.
    let m = eventually("both kicked sessions are counted", async || {
        let m = scrape(&gw).await;
        let kicked = value(&m, "imapgw_sessions_ended_total", &[("reason", "kicked")]);
        let active = value(&m, "imapgw_sessions_active", &[("backend", "b")]);
        (kicked == Some(2.0) && active == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(
        must(&m, "imapgw_sessions_ended_total", &[("reason", "forced")]),
        0.0
    );
    // Nobody left to kick; the survivor can still be kicked by another spelling.
    let r = http::post(gw.admin, "/admin/kick?user=alice").await;
    assert_eq!(r.json(), json!({"sessions": 0}));
    let r = http::post(gw.admin, "/admin/kick?user=BOB").await;
    assert_eq!(r.json(), json!({"sessions": 1}));
    assert_eq!(
        String::from_utf8(other.read_to_end().await).unwrap(),
        KICK_BYE
    );
    assert_eq!(http::post(gw.admin, "/admin/kick").await.status, 400);
    drop(anonymous);
    gw.stop().await;
}

#[tokio::test]
async fn a_configured_token_guards_admin_endpoints_only() {
    const TOKEN: &str = "t0ken-for-tests";
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        config.admin.token = Some(TOKEN.into());
    })
    .await;
    let right = format!("Bearer {TOKEN}");
    let with = async |method: &str, target: &str, authorization: &str| -> HttpResponse {
        http::request(
            gw.admin,
            method,
            target,
            &[("Authorization", authorization)],
        )
        .await
    };

    let refused = [
        http::get(gw.admin, "/admin/route?user=alice").await,
        with("GET", "/admin/route?user=alice", "Bearer wrong").await,
        with("GET", "/admin/route?user=alice", &format!("Basic {TOKEN}")).await,
        with(
            "GET",
            "/admin/route?user=alice",
            &format!("Bearer {TOKEN}x"),
        )
        .await,
    ];
    for r in &refused {
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{r:?}");
        assert!(r.json()["error"].is_string());
    }
    let r = with("GET", "/admin/route?user=alice", &right).await;
    assert_eq!(
        (r.status, r.json()["home"]["name"].as_str()),
        (200, Some("b"))
    );
    // Unknown /admin paths are guarded too: nothing to learn without the token.
    assert_eq!(http::get(gw.admin, "/admin/nope").await.status, 401);
    assert_eq!(with("GET", "/admin/nope", &right).await.status, 404);

    // A kick without the token does nothing; with it the session ends.
    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    assert_eq!(
        http::post(gw.admin, "/admin/kick?user=alice").await.status,
        401
    );
    assert!(tagged_ok(&c.cmd("NOOP").await));
    let r = with("POST", "/admin/kick?user=alice", &right).await;
    assert_eq!(r.json(), json!({"sessions": 1}));
    assert_eq!(String::from_utf8(c.read_to_end().await).unwrap(), KICK_BYE);

    // curl, as in docs/admin.md.
    assert_eq!(http::post(gw.admin, "/admin/reload").await.status, 401);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("http://{}/admin/reload", gw.admin))
        .output()
        .await
        .expect("curl is installed (scripts/test.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"generation":2}"#);

    // Probes and scrapers need no token.
    ready(gw.admin).await;
    assert_eq!(http::get(gw.admin, "/healthz").await.status, 200);
    let m = scrape(&gw).await;
    assert!(!m.contains(TOKEN), "{m}");
    let count = |endpoint, code| {
        value(
            &m,
            "imapgw_admin_requests_total",
            &[("endpoint", endpoint), ("code", code)],
        )
    };
    assert_eq!(count("route", "401"), Some(4.0));
    assert_eq!(count("kick", "401"), Some(1.0));
    assert_eq!(count("reload", "401"), Some(1.0));
    assert_eq!(count("reload", "200"), Some(1.0));
    assert_eq!(count("other", "401"), Some(1.0));
    gw.stop().await;
}

#[tokio::test]
async fn without_a_token_admin_endpoints_refuse_a_listener_beyond_loopback() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, _| {
        // Every interface. Only loopback is connected to below: the point is that the bound
        // address, not the client's path, decides.
        config.admin.address = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    assert!(gw.admin.ip().is_unspecified(), "{}", gw.admin);
    let admin = SocketAddr::from(([127, 0, 0, 1], gw.admin.port()));

    let mut c = Client::connect(gw.addr).await;
    c.login("alice", "alicepw").await;
    for (method, target) in [
        ("POST", "/admin/kick?user=alice"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/route?user=alice"),
    ] {
        let r = http::request(admin, method, target, &[("Authorization", "Bearer x")]).await;
        assert_eq!(r.status, 403, "{method} {target}: {r:?}");
        let error = r.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("set admin.token"), "{error}");
    }
    assert!(tagged_ok(&c.cmd("NOOP").await), "the kick was refused");
    assert_eq!(gw.shared.routes.generation(), 1, "the reload was refused");
    ready(admin).await;
    assert_eq!(http::get(admin, "/healthz").await.status, 200);
    let r = http::get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        must(
            &r.body,
            "imapgw_admin_requests_total",
            &[("endpoint", "kick"), ("code", "403")]
        ),
        1.0
    );
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_and_serving_goes_on() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let status_line = |raw: &[u8]| {
        String::from_utf8_lossy(raw)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };

    let garbage = http::raw(gw.admin, b"\x00\x01\xff garbage\r\n\r\n").await;
    assert!(
        status_line(&garbage).starts_with("HTTP/1.1 400"),
        "{garbage:?}"
    );
    let long = "x".repeat(20 * 1024);
    let r = http::raw(
        gw.admin,
        format!("GET /healthz HTTP/1.1\r\nHost: a\r\nX-Long: {long}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r:?}");
    let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
    let r = http::raw(
        gw.admin,
        format!("GET /healthz HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r:?}");

    // A body nobody asked for is ignored.
    let r = http::raw(
        gw.admin,
        b"POST /admin/kick?user=nobody HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\
          Content-Length: 5\r\n\r\nhello",
    )
    .await;
    let r = String::from_utf8(r).unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with(r#"{"sessions":0}"#), "{r}");

    // Keep-alive: two requests on one connection, two answers.
    let r = http::raw(
        gw.admin,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let r = String::from_utf8(r).unwrap();
    assert_eq!(r.matches("HTTP/1.1 ").count(), 2, "{r}");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("HTTP/1.1 404"), "{r}");

    let r = http::get(gw.admin, "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    gw.stop().await;
}

/// Admin connections served at once (`MAX_CONNECTIONS` in src/admin/mod.rs).
const ADMIN_CONNECTIONS: usize = 64;

/// How soon a probe must be answered while every admin connection is held by a stalled
/// client: the server's eviction grace (250 ms) plus ample scheduling slack, and far below
/// the header read timeout (10 s), the soonest a silent client's place used to come free.
const PROBE_BOUND: Duration = Duration::from_secs(2);

/// Stalled clients that ask for `/metrics` and never read; the rest never send a byte.
const NEVER_READING: usize = 4;

/// Pipelined `GET /metrics` requests each never-reading client sends: their answers (some
/// 9 KB each) are well beyond what the socket buffers take on loopback (4 MB of send buffer
/// at most, by default), so the server's write to the client blocks for good. The requests
/// themselves (36 KB) fit in the server's receive buffer, so sending them never blocks.
const PIPELINED: usize = 1000;

/// A client with a small receive window, so that little of an answer is taken off the
/// server's hands.
async fn small_window_client(addr: SocketAddr) -> tokio::net::TcpStream {
    const WINDOW: u32 = 4096;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(WINDOW).unwrap();
    socket.connect(addr).await.expect("connect to admin")
}

/// Every admin connection held by a stalled client: the oldest ask for `/metrics` and
/// never read the answers (nothing times out that blocked write), the others never send a
/// byte. Probes, each a new connection finding the port full, are still answered at once,
/// and so is a scrape: a new connection makes the oldest give way.
#[tokio::test]
async fn stalled_clients_cannot_freeze_the_admin_port() {
    let gw = gateway::start(&gateway::single_backend("127.0.0.1:1".parse().unwrap())).await;
    ready(gw.admin).await;
    let requests = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(PIPELINED);
    let mut stalled = Vec::new();
    for n in 0..ADMIN_CONNECTIONS {
        let mut tcp = small_window_client(gw.admin).await;
        if n < NEVER_READING {
            tcp.write_all(requests.as_bytes()).await.unwrap();
        }
        stalled.push(tcp);
    }
    // Until the server has answered what it can: then every never-reading client's
    // connection is blocked in a write, the case that never ended by itself. (Only makes
    // the test harsher; what it asserts holds either way.)
    let answered = || {
        gw.shared
            .metrics
            .admin_requests
            .with_label_values(&["metrics", "200"])
            .get()
    };
    let mut last = answered();
    eventually("the never-reading clients' answers stop", async || {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = answered();
        let settled = now == last && now > 0;
        last = now;
        settled.then_some(())
    })
    .await;
    assert!(
        last < (NEVER_READING * PIPELINED) as u64,
        "all {last} pipelined requests were answered: the socket buffers are larger than \
         assumed; raise PIPELINED"
    );

    for probe in 1..=NEVER_READING + 2 {
        if probe > 1 {
            // The last probe's place, taken again: every probe finds the port full.
            stalled.push(small_window_client(gw.admin).await);
        }
        let health = tokio::time::timeout(PROBE_BOUND, http::get(gw.admin, "/healthz"))
            .await
            .unwrap_or_else(|_| panic!("probe {probe}: /healthz not answered in {PROBE_BOUND:?}"));
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    }
    let scrape = tokio::time::timeout(PROBE_BOUND, http::get(gw.admin, "/metrics"))
        .await
        .expect("/metrics not answered in time");
    assert_eq!(scrape.status, 200, "{scrape:?}");
    drop(stalled);
    gw.stop().await;
}
