//! Independent, real IMAP clients through the gateway against a real Dovecot: Python's
//! imaplib (plain and implicit TLS) and curl. They share nothing with the gateway or with
//! the test client in `common`, so they catch what a home-grown client would tolerate.

mod common;

use std::path::Path;
use std::process::Output;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway;
use common::imap::{Client, tagged_ok};
use common::tls::{self, TestCa};
use imap_gateway::config::ListenerMode;

const MSG1: &str = "From: bob@example.org\r\nTo: alice@example.org\r\n\
Subject: first seeded\r\nMessage-ID: <seed1@example.org>\r\n\r\nHello Alice,\r\nfirst body.\r\n";
const MSG2: &str = "From: carol@example.org\r\nTo: alice@example.org\r\n\
Subject: second seeded\r\n\r\nA second message,\r\nwith two lines.\r\n";
const ARCHIVED: &str = "Subject: archived\r\n\r\nold mail\r\n";
/// Appended by the Python client.
const APPENDED: &str = "From: alice@example.org\r\nTo: dave@example.org\r\n\
Subject: appended by imaplib\r\n\r\nWritten through the gateway.\r\n";

/// LOGIN, LIST, SELECT, SEARCH ALL, FETCH every message, APPEND, STORE, LOGOUT; one
/// `KEY value` line per result on stdout. Message bodies are printed in hex.
const IMAPLIB_SCRIPT: &str = r#"
import imaplib, ssl, sys

host, port, user, password, append_file = sys.argv[1:6]
cafile = sys.argv[6] if len(sys.argv) > 6 else None

def check(what, typ, data):
    if typ != "OK":
        print("FAILED", what, typ, data)
        sys.exit(1)

if cafile:
    ctx = ssl.create_default_context(cafile=cafile)
    M = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
else:
    M = imaplib.IMAP4(host, int(port))
print("GREETING", M.welcome.decode())
typ, data = M.login(user, password)
check("LOGIN", typ, data)
print("LOGIN", typ)
typ, data = M.list()
check("LIST", typ, data)
for line in data:
    print("LIST", line.decode())
typ, data = M.select("INBOX")
check("SELECT", typ, data)
print("EXISTS", data[0].decode())
typ, data = M.search(None, "ALL")
check("SEARCH", typ, data)
nums = data[0].split()
print("SEARCH", " ".join(n.decode() for n in nums))
for n in nums:
    typ, data = M.fetch(n, "(RFC822)")
    check("FETCH", typ, data)
    print("FETCH", n.decode(), data[0][1].hex())
with open(append_file, "rb") as f:
    message = f.read()
typ, data = M.append("INBOX", r"(\Flagged)", None, message)
check("APPEND", typ, data)
print("APPEND", typ, data[0].decode())
typ, data = M.noop()
check("NOOP", typ, data)
typ, data = M.store("1", "+FLAGS", r"(\Answered \Seen)")
check("STORE", typ, data)
for line in data:
    print("STORE", line.decode())
typ, data = M.search(None, "FLAGGED")
check("SEARCH FLAGGED", typ, data)
print("FLAGGED", data[0].decode())
typ, data = M.fetch("3", "(FLAGS RFC822)")
check("FETCH appended", typ, data)
print("APPENDED", data[0][1].hex())
typ, data = M.close()
check("CLOSE", typ, data)
typ, data = M.logout()
print("LOGOUT", typ)
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// curl fetching `url` as `user` (user:password), with a bound on its run time.
async fn curl(url: &str, user: &str) -> Output {
    run(
        "curl",
        &["-sS", "--max-time", "15", "--url", url, "--user", user],
    )
    .await
}

async fn run(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(common::imap::WAIT, child).await {
        Err(_) => panic!(
            "`{program} {args:?}` did not finish in {:?}",
            common::imap::WAIT
        ),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not installed: this test needs it (apt-get install -y {program})"
        ),
        Ok(Err(e)) => panic!("running {program}: {e}"),
        Ok(Ok(out)) => out,
    }
}

fn lines_with<'a>(stdout: &'a str, key: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .collect()
}

fn seeded_dovecot() -> Dovecot {
    let dovecot = Dovecot::start(DovecotOptions::default());
    dovecot.seed_message("alice", "INBOX", MSG1.as_bytes());
    dovecot.seed_message("alice", "INBOX", MSG2.as_bytes());
    dovecot.seed_message("alice", "Archive", ARCHIVED.as_bytes());
    dovecot
}

/// Runs the imaplib script against `port` (TLS when `cafile` is given) and checks its output.
async fn imaplib_session(dir: &Path, port: u16, cafile: Option<&Path>) {
    let script = dir.join("imaplib_session.py");
    std::fs::write(&script, IMAPLIB_SCRIPT).unwrap();
    let append_file = dir.join("append.eml");
    std::fs::write(&append_file, APPENDED).unwrap();
    let port = port.to_string();
    let mut args = vec![
        script.to_str().unwrap(),
        "127.0.0.1",
        &port,
        "alice",
        "alicepw",
        append_file.to_str().unwrap(),
    ];
    if let Some(ca) = cafile {
        args.push(ca.to_str().unwrap());
    }
    let out = run("python3", &args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "imaplib script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    assert_eq!(lines_with(&stdout, "LOGIN"), ["OK"], "{stdout}");
    let list = lines_with(&stdout, "LIST");
    assert!(list.iter().any(|l| l.ends_with(" INBOX")), "LIST: {list:?}");
    assert!(
        list.iter().any(|l| l.ends_with(" Archive")),
        "LIST: {list:?}"
    );
    assert_eq!(lines_with(&stdout, "EXISTS"), ["2"], "{stdout}");
    assert_eq!(lines_with(&stdout, "SEARCH"), ["1 2"], "{stdout}");
    // Byte for byte what was seeded (Maildir keeps the CRLFs as written).
    assert_eq!(
        lines_with(&stdout, "FETCH"),
        [
            format!("1 {}", hex(MSG1.as_bytes())),
            format!("2 {}", hex(MSG2.as_bytes()))
        ],
        "{stdout}"
    );
    let append = lines_with(&stdout, "APPEND");
    assert!(
        append.len() == 1 && append[0].starts_with("OK [APPENDUID "),
        "APPEND: {append:?}"
    );
    let store = lines_with(&stdout, "STORE");
    assert!(
        store.len() == 1 && store[0].contains("\\Answered") && store[0].contains("\\Seen"),
        "STORE: {store:?}"
    );
    assert_eq!(lines_with(&stdout, "FLAGGED"), ["3"], "{stdout}");
    assert_eq!(
        lines_with(&stdout, "APPENDED"),
        [hex(APPENDED.as_bytes())],
        "{stdout}"
    );
    assert_eq!(lines_with(&stdout, "LOGOUT"), ["BYE"], "{stdout}");
}

/// What the client changed is really in Dovecot: asked directly, not through the gateway.
async fn assert_changes_reached_dovecot(dovecot: &Dovecot) {
    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    assert!(tagged_ok(&direct.cmd("EXAMINE INBOX").await));
    let flags = direct.cmd("FETCH 1:* (FLAGS)").await;
    // FETCH RFC822 set \\Seen on every message; STORE and APPEND added the rest.
    for expected in [
        "* 1 FETCH (FLAGS (\\Answered \\Seen))",
        "* 2 FETCH (FLAGS (\\Seen))",
        "* 3 FETCH (FLAGS (\\Flagged \\Seen))",
    ] {
        assert!(flags.contains(expected), "{expected}: {flags}");
    }
    let body = direct.cmd("FETCH 3 (BODY.PEEK[])").await;
    assert!(body.contains(APPENDED), "{body}");
    assert!(tagged_ok(&direct.cmd("LOGOUT").await));
}

#[tokio::test]
async fn python_imaplib_session() {
    let dovecot = seeded_dovecot();
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    imaplib_session(gw.dir.path(), gw.addr.port(), None).await;
    assert_changes_reached_dovecot(&dovecot).await;
    gw.stop().await;
}

#[tokio::test]
async fn python_imaplib_over_implicit_tls() {
    let dovecot = seeded_dovecot();
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |config, dir| {
        let ca = TestCa::new(dir);
        let (cert, key) = ca.issue(dir, "gateway", &["localhost", "127.0.0.1"]);
        config
            .listeners
            .push(tls::listener("imaps", ListenerMode::Tls, cert, key));
    })
    .await;
    let ca = gw.dir.path().join("ca.pem");
    imaplib_session(gw.dir.path(), gw.addr_of("imaps").port(), Some(&ca)).await;
    assert_changes_reached_dovecot(&dovecot).await;
    gw.stop().await;
}

#[tokio::test]
async fn curl_fetches_and_lists() {
    let dovecot = seeded_dovecot();
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let port = gw.addr.port();

    let url = format!("imap://127.0.0.1:{port}/INBOX;UID=1");
    let out = curl(&url, "alice:alicepw").await;
    assert!(out.status.success(), "curl {url}: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        MSG1,
        "curl {url} should return the first seeded message"
    );

    let url = format!("imap://127.0.0.1:{port}/INBOX;UID=2;SECTION=HEADER.FIELDS%20(SUBJECT)");
    let out = curl(&url, "alice:alicepw").await;
    assert!(out.status.success(), "curl {url}: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Subject: second seeded\r\n\r\n",
        "curl {url}"
    );

    let url = format!("imap://127.0.0.1:{port}/");
    let out = curl(&url, "alice:alicepw").await;
    assert!(out.status.success(), "curl {url}: {out:?}");
    let list = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = list
        .lines()
        .filter(|l| l.starts_with("* LIST "))
        .filter_map(|l| l.rsplit(' ').next())
        .collect();
    assert!(
        names.contains(&"INBOX") && names.contains(&"Archive"),
        "curl {url} should list INBOX and Archive:\n{list}"
    );

    // A wrong password: curl reports a login failure (exit 67), nothing is fetched.
    let url = format!("imap://127.0.0.1:{port}/INBOX;UID=1");
    let out = curl(&url, "alice:wrong").await;
    assert_eq!(
        out.status.code(),
        Some(67),
        "curl with a wrong password: {out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    gw.stop().await;
}

/// Python's imaplib in a session with a mount on a server with another delimiter: it parses
/// the merged LIST and NAMESPACE, reads a mounted mailbox, and copies a message from there to
/// the home INBOX (a copy between servers).
const IMAPLIB_MOUNT_SCRIPT: &str = r#"
import imaplib, sys

host, port, user, password = sys.argv[1:5]
M = imaplib.IMAP4(host, int(port))
def check(what, typ, data):
    if typ != "OK":
        print("FAILED", what, typ, data)
        sys.exit(1)
typ, data = M.login(user, password); check("LOGIN", typ, data)
typ, data = M.list(); check("LIST", typ, data)
for line in data:
    print("LIST", line.decode())
typ, data = M.namespace(); check("NAMESPACE", typ, data)
print("NAMESPACE", data[0].decode())
typ, data = M.select('"Archive/2023"'); check("SELECT", typ, data)
print("EXISTS", data[0].decode())
typ, data = M.fetch("1", "(RFC822)"); check("FETCH", typ, data)
print("ARCHIVED", data[0][1].hex())
typ, data = M.copy("1", "INBOX"); check("COPY", typ, data)
typ, data = M.select("INBOX"); check("SELECT INBOX", typ, data)
print("INBOX", data[0].decode())
typ, data = M.fetch(data[0], "(RFC822)"); check("FETCH copy", typ, data)
print("COPIED", data[0][1].hex())
typ, data = M.logout()
print("LOGOUT", typ)
"#;

#[tokio::test]
async fn python_imaplib_with_a_mount() {
    let home = seeded_dovecot();
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        ..DovecotOptions::default()
    });
    archive.seed_message("alice", "2023", ARCHIVED.as_bytes());
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
         namespace = \"personal\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let port = gw.addr.port().to_string();
    let out = run(
        "python3",
        &[
            "-c",
            IMAPLIB_MOUNT_SCRIPT,
            "127.0.0.1",
            &port,
            "alice",
            "alicepw",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "imaplib: {out:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    let archived_hex = ARCHIVED
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(
        lines,
        [
            r#"LIST (\HasNoChildren) "/" "INBOX""#,
            r#"LIST (\Noselect \HasChildren) "/" "Archive""#,
            r#"LIST (\HasNoChildren) "/" "Archive/2023""#,
            r#"NAMESPACE (("" "/")("Archive/" "/")) NIL NIL"#,
            "EXISTS 1",
            &format!("ARCHIVED {archived_hex}"),
            "INBOX 3",
            &format!("COPIED {archived_hex}"),
            "LOGOUT BYE",
        ],
        "{stdout}"
    );
    gw.stop().await;
}
