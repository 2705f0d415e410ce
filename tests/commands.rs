//! Every IMAP4 command through the gateway against a real Dovecot, compared with the same
//! commands sent directly to Dovecot.

mod common;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway;
use common::imap::{Client, tagged_ok};

/// A transcript step: the command, and whether it uses a LITERAL+ argument.
const MSG1: &str = "From: a@example.org\r\nTo: b@example.org\r\nSubject: one\r\nMessage-ID: <1@x>\r\n\r\nfirst body\r\n";
const MSG2: &str = "From: c@example.org\r\nSubject: two\r\n\r\nsecond body, longer\r\n";
const MSG3: &str = "Subject: three\r\n\r\nthird\r\n";

fn script() -> Vec<String> {
    let append = |flags: &str, date: &str, msg: &str| {
        format!(
            "APPEND INBOX ({flags}) \"{date}\" {{{}+}}\r\n{msg}",
            msg.len()
        )
    };
    vec![
        "NOOP".into(),
        "NAMESPACE".into(),
        "CREATE Work".into(),
        "CREATE Work/Sub".into(),
        "LIST \"\" \"*\"".into(),
        "LIST \"\" \"%\"".into(),
        "RLIST \"\" \"*\"".into(),
        "SUBSCRIBE Work".into(),
        "SUBSCRIBE Work/Sub".into(),
        "LSUB \"\" \"*\"".into(),
        "RLSUB \"\" \"Work*\"".into(),
        "UNSUBSCRIBE Work/Sub".into(),
        "LSUB \"\" \"*\"".into(),
        "RENAME Work/Sub Work/Renamed".into(),
        "LIST \"Work/\" \"*\"".into(),
        "STATUS INBOX (MESSAGES RECENT UNSEEN UIDNEXT)".into(),
        append("\\Seen \\Flagged", "01-Jan-2024 10:00:00 +0000", MSG1),
        append("\\Answered \\Draft", "02-Feb-2024 11:30:00 +0100", MSG2),
        append("", "03-Mar-2024 12:00:00 -0500", MSG3),
        "STATUS INBOX (MESSAGES RECENT UNSEEN UIDNEXT)".into(),
        "SELECT INBOX".into(),
        "FETCH 1:* (FLAGS UID INTERNALDATE RFC822.SIZE)".into(),
        "FETCH 1 (BODY[] ENVELOPE)".into(),
        "FETCH 2 BODY.PEEK[HEADER.FIELDS (SUBJECT)]".into(),
        "STORE 3 +FLAGS (\\Deleted)".into(),
        "STORE 2 -FLAGS.SILENT (\\Draft)".into(),
        "SEARCH ALL".into(),
        "SEARCH FLAGGED".into(),
        "SEARCH DELETED".into(),
        "SEARCH SUBJECT \"two\"".into(),
        "UID SEARCH ALL".into(),
        "UID FETCH 1:* (FLAGS)".into(),
        "UID STORE 1 +FLAGS (\\Answered)".into(),
        "COPY 1:2 Work".into(),
        "UID COPY 1 Work/Renamed".into(),
        "CHECK".into(),
        "EXPUNGE".into(),
        "UID STORE 2 +FLAGS.SILENT (\\Deleted)".into(),
        "UID EXPUNGE 2".into(),
        "FETCH 1:* (FLAGS)".into(),
        "CLOSE".into(),
        "EXAMINE Work".into(),
        "FETCH 1:* (FLAGS UID)".into(),
        "CLOSE".into(),
        "GETQUOTAROOT INBOX".into(),
        "GETQUOTA \"User quota\"".into(),
        "SETQUOTA \"User quota\" (STORAGE 100)".into(),
        "XAPPLEPUSHSERVICE".into(),
        "XNONSENSE foo".into(),
        "DELETE Work/Renamed".into(),
        "DELETE Work".into(),
        "LIST \"\" \"*\"".into(),
    ]
}

/// Removes what legitimately differs between two runs: Dovecot's timing suffix and
/// UIDVALIDITY values (they come from the mailbox creation time).
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split_inclusive("\r\n") {
        let mut line = line.to_owned();
        if let Some(i) = line.find(" (0.")
            && let Some(e) = line[i..].find("secs)")
        {
            line.replace_range(i..i + e + 5, "");
        }
        for key in ["UIDVALIDITY ", "APPENDUID ", "COPYUID "] {
            if let Some(i) = line.find(key) {
                let start = i + key.len();
                let end = line[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(line.len(), |e| start + e);
                line.replace_range(start..end, "N");
            }
        }
        out.push_str(&line);
    }
    out
}

async fn run_script(client: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    for command in script() {
        out.push(normalize(&client.cmd(&command).await));
    }
    out
}

#[tokio::test]
async fn every_command_matches_direct() {
    let dovecot = Dovecot::start(DovecotOptions {
        users: vec![
            ("direct".into(), "pw1".into()),
            ("proxied".into(), "pw2".into()),
        ],
        ..DovecotOptions::default()
    });
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;

    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("direct", "pw1").await;
    let direct_out = run_script(&mut direct).await;

    let mut proxied = Client::connect(gw.addr).await;
    proxied.login("proxied", "pw2").await;
    let proxied_out = run_script(&mut proxied).await;

    drop(direct);
    drop(proxied);
    for ((cmd, d), p) in script().iter().zip(&direct_out).zip(&proxied_out) {
        // Every step must have completed (OK, NO or BAD are all valid results to compare).
        assert!(!d.is_empty(), "{cmd}: no direct answer");
        let cmd = cmd.lines().next().unwrap();
        if cmd.starts_with("RLIST") || cmd.starts_with("RLSUB") {
            // Dovecot has no RLIST: direct it is BAD, through the gateway it is answered
            // as LIST (compared with LIST in rlist_through_gateway_equals_list_direct).
            assert!(
                d.contains("BAD"),
                "{cmd}: direct Dovecot should not know RLIST: {d}"
            );
            assert!(tagged_ok(p), "{cmd} through gateway: {p}");
            continue;
        }
        assert_eq!(p, d, "{cmd}: gateway and direct differ");
    }

    // Flags, dates and sizes arrived intact (not just "the same"): spot checks.
    let fetch = &proxied_out[script()
        .iter()
        .position(|c| c.starts_with("FETCH 1:* (FLAGS UID INTERNALDATE"))
        .unwrap()];
    assert!(
        fetch.contains("FLAGS (\\Flagged \\Seen \\Recent)"),
        "{fetch}"
    );
    assert!(
        fetch.contains("FLAGS (\\Answered \\Draft \\Recent)"),
        "{fetch}"
    );
    assert!(
        fetch.contains("INTERNALDATE \"02-Feb-2024 10:30:00 +0000\""),
        "{fetch}"
    );
    assert!(
        fetch.contains(&format!("RFC822.SIZE {}", MSG1.len())),
        "{fetch}"
    );
    let body = &proxied_out[script()
        .iter()
        .position(|c| c.starts_with("FETCH 1 (BODY[]"))
        .unwrap()];
    assert!(body.contains(MSG1), "{body}");
    let quota = &proxied_out[script()
        .iter()
        .position(|c| c.starts_with("GETQUOTAROOT"))
        .unwrap()];
    assert!(
        quota.contains("* QUOTAROOT INBOX \"User quota\""),
        "{quota}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn rlist_through_gateway_equals_list_direct() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    assert!(tagged_ok(&direct.cmd("CREATE Archive/2024").await));
    assert!(tagged_ok(&direct.cmd("SUBSCRIBE Archive/2024").await));
    let mut proxied = Client::connect(gw.addr).await;
    proxied.login("alice", "alicepw").await;
    for (r, plain) in [
        ("RLIST \"\" \"*\"", "LIST \"\" \"*\""),
        ("rlist \"Archive/\" \"%\"", "LIST \"Archive/\" \"%\""),
        ("RLSUB \"\" \"*\"", "LSUB \"\" \"*\""),
    ] {
        let via = proxied.cmd(r).await;
        let dir = direct.cmd(plain).await;
        let untagged = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| l.starts_with('*'))
                .map(str::to_owned)
                .collect()
        };
        assert!(tagged_ok(&via), "{r}: {via}");
        assert!(!untagged(&via).is_empty(), "{r}: {via}");
        assert_eq!(untagged(&via), untagged(&dir), "{r}");
    }
    drop(proxied);
    gw.stop().await;
}

#[tokio::test]
async fn uid_and_uidvalidity_are_the_backends() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    for i in 0..3 {
        dovecot.seed_message(
            "alice",
            "INBOX",
            format!("Subject: m{i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
    }
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut direct = Client::connect(dovecot.addr()).await;
    direct.login("alice", "alicepw").await;
    let d = direct.cmd("EXAMINE INBOX").await;
    let d_uids = direct.cmd("UID FETCH 1:* (UID)").await;
    let mut proxied = Client::connect(gw.addr).await;
    proxied.login("alice", "alicepw").await;
    let p = proxied.cmd("EXAMINE INBOX").await;
    let p_uids = proxied.cmd("UID FETCH 1:* (UID)").await;
    let uidvalidity = |s: &str| {
        s.lines()
            .find_map(|l| l.split("[UIDVALIDITY ").nth(1))
            .map(|r| r.split(']').next().unwrap().to_owned())
            .expect("UIDVALIDITY present")
    };
    assert_eq!(uidvalidity(&p), uidvalidity(&d));
    let fetches = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("* "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(fetches(&p_uids).len(), 3);
    assert_eq!(fetches(&p_uids), fetches(&d_uids));
    drop(proxied);
    gw.stop().await;
}

#[tokio::test]
async fn idle_sees_mail_appended_by_another_session() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start(&gateway::single_backend(dovecot.addr())).await;
    let mut idler = Client::connect(gw.addr).await;
    idler.login("bob", "bobpw").await;
    let sel = idler.cmd("SELECT INBOX").await;
    assert!(sel.contains("* 0 EXISTS"), "{sel}");
    idler.write(b"i1 IDLE\r\n").await;
    let cont = idler.read_response().await;
    assert!(
        cont.starts_with(b"+ "),
        "{}",
        String::from_utf8_lossy(&cont)
    );

    let mut other = Client::connect(gw.addr).await;
    other.login("bob", "bobpw").await;
    let msg = "Subject: hi\r\n\r\nnew mail\r\n";
    let r = other
        .cmd(&format!("APPEND INBOX {{{}+}}\r\n{msg}", msg.len()))
        .await;
    assert!(tagged_ok(&r), "{r}");

    let exists = idler.read_response().await;
    assert_eq!(exists, b"* 1 EXISTS\r\n");
    idler.write(b"DONE\r\n").await;
    let rest = idler.until_tagged("i1").await;
    assert!(tagged_ok(&rest), "{rest}");
    let bye = idler.cmd("LOGOUT").await;
    assert!(bye.starts_with("* BYE"), "{bye}");
    assert!(
        idler.try_read_response().await.is_none(),
        "closed after LOGOUT"
    );
    drop(other);
    gw.stop().await;
}
