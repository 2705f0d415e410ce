//! The Grafana dashboard and the alert rules (dashboards/) query only metrics the gateway
//! really exports: a gateway in front of real Dovecot is driven until every series they use
//! exists (logins that succeed and fail, a backend that cannot be reached, a FETCH, a
//! routing table reload, a certificate rotation, ...), then every metric name in
//! dashboards/imap-gateway.json and dashboards/alerts.yml must be a sample name of the live
//! scrape, and every label they select on must be a label of that metric.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway::{self, backend_toml};
use common::http;
use common::imap::{Client, tagged_ok};
use common::tls::{self, TestCa, client_config};
use common::wait::eventually;
use imap_gateway::config::ListenerMode;

/// The files checked, as they are in the repository (a change to them rebuilds this test).
const DASHBOARD: &str = include_str!("../dashboards/imap-gateway.json");
const ALERTS: &str = include_str!("../dashboards/alerts.yml");

/// Metrics the files may use that the gateway does not export, and why.
const NOT_FROM_THE_GATEWAY: &[(&str, &str)] = &[(
    "up",
    "Prometheus' own per-target scrape health, recorded by the server for every target; \
     the gateway's readiness (no ready replica) is read from it and imapgw_draining",
)];

/// Labels Prometheus (or the Prometheus operator) attaches to every series of a target;
/// they are not in the exposition.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "job",
    "instance",
    "pod",
    "service",
    "endpoint",
    "container",
];

const MESSAGE: &str = "From: a@example.org\r\nTo: alice@example.org\r\nSubject: observability\r\n\
                       \r\nHello.\r\n";

/// One sample of the text exposition: name and labels.
type Sample = (String, BTreeMap<String, String>);

/// Parses the samples of a Prometheus text exposition (comments skipped), label values with
/// their escapes undone.
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let mut rest = &line[name_end + 1..];
            loop {
                rest = rest.trim_start_matches(',');
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let (key, r) = rest
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("bad escape in {line:?}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {line:?}"),
                    }
                };
                labels.insert(key.to_owned(), value);
                rest = &r[end + 1..];
            }
            assert!(rest.starts_with(' '), "no value in {line:?}");
        }
        out.push((name, labels));
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every identifier starting with `prefix` (at a word boundary).
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        if text[..i].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let end = text[i..]
            .find(|c: char| !is_ident(c))
            .map_or(text.len(), |n| i + n);
        out.insert(text[i..end].to_owned());
    }
    out
}

/// A label matcher of a selector: label, operator, value (as written, unescaped).
#[derive(Debug)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// Every `name{matchers}` selector in `text` (PromQL inside JSON or YAML strings; JSON's
/// `\"` is taken as `"`). A `{` right after an identifier starts a selector in PromQL; the
/// files' other braces (`{{ $labels.x }}`, `${var}`, JSON objects) never follow one.
fn selectors(text: &str) -> Vec<(String, Vec<Matcher>)> {
    let text = text.replace("\\\"", "\"");
    let mut out = Vec::new();
    for (i, _) in text.match_indices('{') {
        let before = &text[..i];
        let start = before.rfind(|c: char| !is_ident(c)).map_or(0, |n| n + 1);
        let name = &before[start..];
        if name.is_empty()
            || name.starts_with(|c: char| c.is_ascii_digit())
            || before[..start].ends_with('$')
        {
            continue;
        }
        let body_end = text[i..].find('}').map(|n| i + n).expect("selector ends");
        let body = &text[i + 1..body_end];
        let mut matchers = Vec::new();
        let mut rest = body.trim();
        while !rest.is_empty() {
            let op_at = rest
                .find(['=', '!'])
                .unwrap_or_else(|| panic!("no operator in {name}{{{body}}}"));
            let label = rest[..op_at].trim().to_owned();
            let after = &rest[op_at..];
            let op_len =
                if after.starts_with("=~") || after.starts_with("!~") || after.starts_with("!=") {
                    2
                } else {
                    1
                };
            let op = after[..op_len].to_owned();
            let after = after[op_len..].trim_start();
            let quoted = after
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("unquoted value in {name}{{{body}}}"));
            let close = quoted.find('"').expect("closing quote");
            matchers.push(Matcher {
                label,
                op,
                value: quoted[..close].to_owned(),
            });
            rest = quoted[close + 1..]
                .trim_start()
                .trim_start_matches(',')
                .trim();
        }
        out.push((name.to_owned(), matchers));
    }
    out
}

/// What a file says, split in two: its PromQL (dashboard queries, variable queries and
/// annotations; alert expressions) and everything else (titles, descriptions, comments).
#[derive(Debug, Default)]
struct Uses {
    promql: Vec<String>,
    prose: Vec<String>,
}

/// Every string of the dashboard JSON, decoded: `expr` and variable `query` values as PromQL.
fn dashboard_uses(json: &str) -> Uses {
    fn walk(v: &serde_json::Value, promql_key: bool, uses: &mut Uses) {
        match v {
            serde_json::Value::String(s) if promql_key => uses.promql.push(s.clone()),
            serde_json::Value::String(s) => uses.prose.push(s.clone()),
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, false, uses)),
            serde_json::Value::Object(map) => {
                let variable =
                    map.contains_key("name") && map.get("type").is_some_and(|t| t == "query");
                for (k, v) in map {
                    uses.prose.push(k.clone());
                    let promql = k == "expr" || (k == "query" && (variable || promql_key));
                    walk(v, promql, uses);
                }
            }
            _ => {}
        }
    }
    let mut uses = Uses::default();
    let value: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    walk(&value, false, &mut uses);
    uses
}

/// The alert rules file, line by line: `expr:` values (block scalars included) as PromQL.
fn alerts_uses(yaml: &str) -> Uses {
    let mut uses = Uses::default();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            uses.prose.push(line.to_owned());
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let deeper = next.len() - next.trim_start().len() > indent;
                if !deeper && !next.trim().is_empty() {
                    break;
                }
                block.push_str(lines.next().unwrap());
                block.push('\n');
            }
            uses.promql.push(block);
        } else {
            uses.promql.push(value.trim_matches(['"', '\'']).to_owned());
        }
    }
    uses
}

/// The scrape: sample names with their labels, and the metric family names (`# TYPE`),
/// which for a histogram differ from its samples' names.
struct Scrape<'a> {
    series: BTreeMap<&'a str, Vec<&'a BTreeMap<String, String>>>,
    families: BTreeSet<&'a str>,
}

impl<'a> Scrape<'a> {
    fn new(text: &'a str, samples: &'a [Sample]) -> Self {
        let mut series: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for (name, labels) in samples {
            series.entry(name.as_str()).or_default().push(labels);
        }
        let families = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        Scrape { series, families }
    }
}

/// The checks, on one scrape and what the files use: every problem, one per line.
fn problems(scrape: &Scrape, files: &[(&str, Uses)]) -> Vec<String> {
    let exempt: BTreeMap<&str, &str> = NOT_FROM_THE_GATEWAY.iter().copied().collect();
    let mut problems = Vec::new();
    let mut report = |p: String| {
        if !problems.contains(&p) {
            problems.push(p);
        }
    };
    for (file, uses) in files {
        // In PromQL a name must be that of a sample: `imapgw_login_duration_seconds` alone
        // selects nothing, its `_bucket` does.
        for text in &uses.promql {
            let mut names = names_with_prefix(text, "imapgw_");
            names.extend(names_with_prefix(text, "process_"));
            for name in &names {
                if !scrape.series.contains_key(name.as_str()) {
                    report(format!("{file}: {name} is not in the scrape"));
                }
            }
            for (name, matchers) in selectors(text) {
                let Some(series) = scrape.series.get(name.as_str()) else {
                    if !exempt.contains_key(name.as_str()) && !names.contains(&name) {
                        report(format!(
                            "{file}: {name}{{...}} is neither in the scrape nor listed in \
                             NOT_FROM_THE_GATEWAY"
                        ));
                    }
                    continue;
                };
                for m in matchers {
                    if TARGET_LABELS.contains(&m.label.as_str()) {
                        continue;
                    }
                    if !series.iter().any(|l| l.contains_key(&m.label)) {
                        report(format!("{file}: {name} has no label {:?}", m.label));
                    } else if m.op == "="
                        && !m.value.contains('$')
                        && !series.iter().any(|l| l.get(&m.label) == Some(&m.value))
                    {
                        report(format!(
                            "{file}: no {name} sample with {}=\"{}\"",
                            m.label, m.value
                        ));
                    }
                }
            }
        }
        // In descriptions and comments a family name (a histogram's) is fine too; a bare
        // prefix (`imapgw_*`) names no metric.
        for text in &uses.prose {
            let mut names = names_with_prefix(text, "imapgw_");
            names.extend(names_with_prefix(text, "process_"));
            for name in names {
                let known = scrape.series.contains_key(name.as_str())
                    || scrape.families.contains(name.as_str());
                if !known && name != "imapgw_" && name != "process_" {
                    report(format!(
                        "{file}: {name} (in a description or comment) is not in the scrape"
                    ));
                }
            }
        }
    }
    problems
}

fn files() -> Vec<(&'static str, Uses)> {
    let dashboard = dashboard_uses(DASHBOARD);
    let alerts = alerts_uses(ALERTS);
    // Guards against an extraction that silently finds nothing.
    assert!(dashboard.promql.len() >= 40, "{dashboard:?}");
    assert_eq!(
        alerts.promql.len(),
        ALERTS.matches("- alert: ").count(),
        "{alerts:?}"
    );
    vec![
        ("dashboards/imap-gateway.json", dashboard),
        ("dashboards/alerts.yml", alerts),
    ]
}

#[test]
fn the_extraction_finds_what_the_files_use() {
    let files = files();
    let (dashboard, alerts) = (&files[0].1, &files[1].1);
    let promql = dashboard.promql.join("\n");
    assert!(
        promql.contains("imapgw_login_duration_seconds_bucket{"),
        "{promql}"
    );
    // Inside collapsed rows and variable queries too.
    assert!(promql.contains("imapgw_admin_requests_total{"), "{promql}");
    assert!(
        promql.contains("label_values(imapgw_build_info"),
        "{promql}"
    );
    // A block scalar to its last line.
    assert!(
        alerts
            .promql
            .iter()
            .any(|e| e.trim_end().ends_with("imapgw_build_info")),
        "{alerts:?}"
    );
    let s = selectors(
        r#"sum(rate(imapgw_logins_total{job=~"$job", result!="ok"}[5m])) / up{job="x"} + "${ds}""#,
    );
    let got: Vec<_> = s
        .iter()
        .map(|(n, m)| {
            let m: Vec<_> = m
                .iter()
                .map(|m| format!("{}{}{}", m.label, m.op, m.value))
                .collect();
            (n.as_str(), m)
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "imapgw_logins_total",
                vec!["job=~$job".to_owned(), "result!=ok".to_owned()]
            ),
            ("up", vec!["job=x".to_owned()]),
        ]
    );
    // And the checks catch a name, a label and a value the scrape does not have.
    let text = "# TYPE imapgw_logins_total counter\n\
                imapgw_logins_total{mechanism=\"login\",result=\"ok\"} 1\n";
    let samples = samples(text);
    let scrape = Scrape::new(text, &samples);
    let uses = Uses {
        promql: vec![
            "imapgw_login_total + imapgw_logins_total{results=\"ok\"}".to_owned(),
            "imapgw_logins_total{result=\"okay\"} + node_load1{a=\"b\"}".to_owned(),
        ],
        prose: vec!["see `imapgw_logins_total` and imapgw_logins".to_owned()],
    };
    assert_eq!(
        problems(&scrape, &[("f", uses)]),
        [
            "f: imapgw_login_total is not in the scrape",
            "f: imapgw_logins_total has no label \"results\"",
            "f: no imapgw_logins_total sample with result=\"okay\"",
            "f: node_load1{...} is neither in the scrape nor listed in NOT_FROM_THE_GATEWAY",
            "f: imapgw_logins (in a description or comment) is not in the scrape",
        ]
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    dovecot.seed_message("alice", "INBOX", MESSAGE.as_bytes());
    // bob's home is a backend nobody listens on: his login makes a backend connect failure.
    let table = format!(
        "default_pool = [\"b\"]\n{}{}[[routes]]\nuser = \"bob\"\nbackend = \"down\"\n",
        backend_toml("b", dovecot.addr(), ""),
        backend_toml("down", "127.0.0.1:1".parse().unwrap(), ""),
    );
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(ca_dir.path());
    let mut cert_dir = None;
    let gw = gateway::start_with(&table, |config, dir| {
        let (cert, key) = ca.issue(dir, "imaps", &["localhost", "127.0.0.1"]);
        config
            .listeners
            .push(tls::listener("imaps", ListenerMode::Tls, cert, key));
        cert_dir = Some(dir.to_owned());
    })
    .await;
    let cert_dir = cert_dir.unwrap();

    // A login that works, with commands and bytes relayed.
    let mut alice = Client::connect(gw.addr).await;
    alice.login("alice", "alicepw").await;
    assert!(tagged_ok(&alice.cmd("SELECT INBOX").await));
    let fetched = alice.cmd("FETCH 1 (BODY[])").await;
    assert!(fetched.contains("Subject: observability"), "{fetched}");
    assert!(tagged_ok(&alice.cmd("LIST \"\" \"*\"").await));
    // A wrong password, and a login whose backend cannot be reached.
    let mut failed = Client::connect(gw.addr).await;
    failed.read_response().await;
    let r = failed.cmd("LOGIN alice wrong-password").await;
    assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = failed.cmd("LOGIN bob bobpw").await;
    assert!(r.contains("NO [UNAVAILABLE]"), "{r}");
    drop(failed);
    // A TLS client on the implicit-TLS listener.
    let addr: SocketAddr = gw.addr_of("imaps");
    let mut tls_client = Client::connect_tls(addr, client_config(&ca.ca_path), "localhost").await;
    tls_client.login("alice", "alicepw").await;
    assert!(tagged_ok(&tls_client.cmd("LOGOUT").await));
    drop(tls_client);
    // A routing table reload, and a rotated listener certificate (the file watcher).
    let r = http::post(gw.admin, "/admin/reload").await;
    assert_eq!(r.status, 200, "{r:?}");
    ca.issue(&cert_dir, "imaps", &["localhost", "127.0.0.1"]);
    eventually("the certificate reload is counted", async || {
        let r = http::get(gw.admin, "/metrics").await;
        assert_eq!(r.status, 200, "{r:?}");
        r.body.contains("imapgw_tls_certificate_reloads_total{")
    })
    .await;
    // This scrape shows the ones before it (a scrape is counted once it is answered).
    let r = http::get(gw.admin, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    let samples = samples(&r.body);
    let problems = problems(&Scrape::new(&r.body, &samples), &files());
    assert!(
        problems.is_empty(),
        "the dashboard or the alerts use what the gateway does not export:\n{}\n\
         --- scrape:\n{}",
        problems.join("\n"),
        r.body
    );

    assert!(tagged_ok(&alice.cmd("LOGOUT").await));
    assert_eq!(alice.read_to_end().await, b"");
    gw.stop().await;
}
