//! Murder mode (docs/routing.md, "Mounts"): one user's mail on three real Dovecot servers,
//! seen through the gateway as one tree.
//!
//! - `home` (delimiter `/`): INBOX (2 messages), `Sent`, `Work`, `Work/Projects`.
//! - `archive` (delimiter `.`, Maildir++): `2023` (2 messages), `2024`, `2024.Q1`; mounted
//!   at `Archive` with `path = ""` in the personal namespace.
//! - `shared` (delimiter `/`) with a public namespace `Public/`: `Public/Team` (2 messages),
//!   `Public/Team/Reports`; mounted at `Shared` with `path = "Public"` as a shared namespace.
//! - a referral mount `Remote/Sales` -> `imap://imap.partner.example/Sales` for alice.
//!
//! Every setup step is done and checked directly on the Dovecots; what the gateway must
//! answer is derived from the spec's rules and from the attributes those Dovecots emit
//! (pinned in [`HOME_LIST`], [`ARCHIVE_LIST`] and [`SHARED_LIST`]).

mod common;

use common::dovecot::{Dovecot, DovecotOptions, login_lines, wait_for_log};
use common::gateway::{self, TestGateway};
use common::imap::{Client, last_line, tagged_ok};

const USER: &str = "alice";
const PASS: &str = "alicepw";
const REFERRAL: &str = "imap://imap.partner.example/Sales";

/// What each Dovecot answers directly to `LIST "" "*"` once set up (compared sorted: Dovecot's
/// own order follows its directory listing, not the names).
const HOME_LIST: &[&str] = &[
    r#"* LIST (\HasChildren) "/" Work"#,
    r#"* LIST (\HasNoChildren) "/" Work/Projects"#,
    r#"* LIST (\HasNoChildren) "/" Sent"#,
    r#"* LIST (\HasNoChildren) "/" INBOX"#,
];
const ARCHIVE_LIST: &[&str] = &[
    r#"* LIST (\HasChildren) "." 2024"#,
    r#"* LIST (\HasNoChildren) "." 2024.Q1"#,
    r#"* LIST (\HasNoChildren) "." 2023"#,
    r#"* LIST (\HasNoChildren) "." INBOX"#,
];
const SHARED_LIST: &[&str] = &[
    r#"* LIST (\Noselect \HasChildren) "/" Public"#,
    r#"* LIST (\HasChildren) "/" Public/Team"#,
    r#"* LIST (\HasNoChildren) "/" Public/Team/Reports"#,
    r#"* LIST (\HasNoChildren) "/" INBOX"#,
];

/// The merged tree, client names and attributes, in the order the gateway must send it:
/// INBOX first, then byte order. Real mailboxes keep the attributes their Dovecot gave (the
/// archive's from its `.` names); the mount point `Archive` (`path = ""`) is added as
/// `\Noselect \HasChildren`; `Shared` is the shared server's `Public`, which Dovecot lists
/// as `\Noselect \HasChildren` too.
const TREE: &[(&str, &str)] = &[
    ("INBOX", r"\HasNoChildren"),
    ("Archive", r"\Noselect \HasChildren"),
    ("Archive/2023", r"\HasNoChildren"),
    ("Archive/2024", r"\HasChildren"),
    ("Archive/2024/Q1", r"\HasNoChildren"),
    ("Sent", r"\HasNoChildren"),
    ("Shared", r"\Noselect \HasChildren"),
    ("Shared/Team", r"\HasChildren"),
    ("Shared/Team/Reports", r"\HasNoChildren"),
    ("Work", r"\HasChildren"),
    ("Work/Projects", r"\HasNoChildren"),
];
/// What RLIST adds: the referral and the level above it.
const REFERRAL_TREE: &[(&str, &str)] =
    &[("Remote", r"\Noselect \HasChildren"), ("Remote/Sales", "")];

fn message(subject: &str, body: &str) -> String {
    format!(
        "From: bob@example.org\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\
         Message-ID: <{}@example.org>\r\n\r\n{body}\r\n",
        subject.replace(' ', ".")
    )
}

/// The routing table of the scenario: alice lives on `home`, everyone gets `Archive` and
/// `Shared`, alice also gets the referral `Remote/Sales`.
fn routing(home: &Dovecot, archive: &Dovecot, shared: &Dovecot) -> String {
    format!(
        "{}{}{}\
         [[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
         path = \"\"\nnamespace = \"personal\"\n\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"shared\"\n\
         path = \"Public\"\nnamespace = \"shared\"\n\n\
         [[mounts]]\nusers = \"alice\"\nprefix = \"Remote/Sales\"\n\
         referral = \"{REFERRAL}\"\nnamespace = \"shared\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
        gateway::backend_toml("shared", shared.addr(), ""),
    )
}

struct Setup {
    home: Dovecot,
    archive: Dovecot,
    shared: Dovecot,
    gw: TestGateway,
}

/// The scenario with a plain archive server.
async fn setup() -> Setup {
    setup_with(false, "").await
}

/// Starts and fills the three Dovecots (checking each directly), then the gateway.
/// `archive_listescape`: the archive server accepts names with `/` inside a level;
/// `archive_extra`: settings added to the archive server's configuration.
async fn setup_with(archive_listescape: bool, archive_extra: &str) -> Setup {
    let home = Dovecot::start(DovecotOptions::default());
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        listescape: archive_listescape,
        extra_config: archive_extra.to_owned(),
        ..DovecotOptions::default()
    });
    let shared = Dovecot::start(DovecotOptions {
        public_namespace: true,
        ..DovecotOptions::default()
    });

    home.seed_message(USER, "INBOX", message("home 1", "first").as_bytes());
    home.seed_message(USER, "INBOX", message("home 2", "second").as_bytes());
    archive.seed_message(USER, "2023", message("archived 1", "old").as_bytes());
    archive.seed_message(USER, "2023", message("archived 2", "older").as_bytes());

    let mut d = direct(&home).await;
    for mailbox in ["Sent", "Work", "Work/Projects"] {
        ok(&mut d, &format!("CREATE {mailbox}")).await;
    }
    // The first SELECT takes the \Recent flags, so later sessions all see the same flags.
    let r = ok(&mut d, "SELECT INBOX").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    assert_list_sorted(&ok(&mut d, r#"LIST "" "*""#).await, HOME_LIST, "home");
    logout(d).await;

    let mut d = direct(&archive).await;
    for mailbox in ["2024", "2024.Q1"] {
        ok(&mut d, &format!("CREATE {mailbox}")).await;
    }
    let r = ok(&mut d, "SELECT 2023").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    assert_list_sorted(&ok(&mut d, r#"LIST "" "*""#).await, ARCHIVE_LIST, "archive");
    logout(d).await;

    let mut d = direct(&shared).await;
    for mailbox in ["Public/Team", "Public/Team/Reports"] {
        ok(&mut d, &format!("CREATE {mailbox}")).await;
    }
    for (subject, body) in [("team 1", "minutes"), ("team 2", "agenda")] {
        append(&mut d, "Public/Team", "", &message(subject, body)).await;
    }
    let r = ok(&mut d, "SELECT Public/Team").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    assert_list_sorted(&ok(&mut d, r#"LIST "" "*""#).await, SHARED_LIST, "shared");
    logout(d).await;

    let gw = gateway::start(&routing(&home, &archive, &shared)).await;
    Setup {
        home,
        archive,
        shared,
        gw,
    }
}

impl Setup {
    /// A client logged in as alice through the gateway.
    async fn client(&self) -> Client {
        let mut c = Client::connect(self.gw.addr).await;
        c.login(USER, PASS).await;
        c
    }

    /// Stops the gateway (every client must be gone) and then the Dovecots.
    async fn finish(self) {
        let Setup {
            home,
            archive,
            shared,
            gw,
        } = self;
        gw.stop().await;
        drop((home, archive, shared));
    }
}

/// A client logged in as alice directly on a Dovecot.
async fn direct(dovecot: &Dovecot) -> Client {
    let mut c = Client::connect(dovecot.addr()).await;
    c.login(USER, PASS).await;
    c
}

async fn logout(mut c: Client) {
    let r = c.cmd("LOGOUT").await;
    assert!(tagged_ok(&r), "LOGOUT: {r}");
}

/// Runs `command` and fails the test unless it ends in a tagged OK.
async fn ok(c: &mut Client, command: &str) -> String {
    let r = c.cmd(command).await;
    assert!(tagged_ok(&r), "{command}: {r}");
    r
}

/// APPENDs `msg` (non-synchronizing literal) with `extra` (flags and date, may be empty).
async fn append(c: &mut Client, mailbox: &str, extra: &str, msg: &str) -> String {
    let sp = if extra.is_empty() { "" } else { " " };
    ok(
        c,
        &format!("APPEND {mailbox}{sp}{extra} {{{}+}}\r\n{msg}", msg.len()),
    )
    .await
}

/// The untagged response lines (`* ...`) of a response without literals.
fn untagged(resp: &str) -> Vec<String> {
    resp.split("\r\n")
        .filter(|l| l.starts_with("* "))
        .map(str::to_owned)
        .collect()
}

/// Everything before the tagged line (literals included).
fn before_tagged(resp: &str) -> &str {
    let body = resp.trim_end_matches("\r\n");
    match body.rfind("\r\n") {
        Some(i) => &resp[..i + 2],
        None => "",
    }
}

/// The tagged line's status word and response code: `("NO", Some("CANNOT"))`.
fn tagged(resp: &str) -> (String, Option<String>) {
    let line = last_line(resp);
    let mut parts = line.splitn(3, ' ');
    let _tag = parts.next();
    let status = parts.next().unwrap_or("").to_owned();
    let code = parts
        .next()
        .and_then(|rest| rest.strip_prefix('['))
        .and_then(|rest| rest.split_once(']'))
        .map(|(code, _)| code.to_owned());
    (status, code)
}

/// Asserts the tagged status and response code (the text is the gateway's own).
fn assert_tagged(resp: &str, status: &str, code: Option<&str>, what: &str) {
    assert_eq!(
        tagged(resp),
        (status.to_owned(), code.map(str::to_owned)),
        "{what}: {resp}"
    );
}

fn assert_list_sorted(resp: &str, expected: &[&str], server: &str) {
    let mut got = untagged(resp);
    got.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        got, want,
        "{server} Dovecot LIST \"\" \"*\" directly: {resp}"
    );
}

/// `* <word> (<attrs>) "/" "<name>"` for each name, attributes from [`TREE`] or
/// [`REFERRAL_TREE`], in the order given.
fn entries(word: &str, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|name| {
            let attrs = TREE
                .iter()
                .chain(REFERRAL_TREE)
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name} is not in the tree"))
                .1;
            entry(word, attrs, name)
        })
        .collect()
}

fn entry(word: &str, attrs: &str, name: &str) -> String {
    format!("* {word} ({attrs}) \"/\" \"{name}\"")
}

/// Names of the whole merged tree (LIST "" "*").
fn tree_names() -> Vec<&'static str> {
    TREE.iter().map(|(n, _)| *n).collect()
}

/// Runs a LIST-like command through the gateway and asserts its exact untagged lines and a
/// tagged OK.
async fn assert_lines(c: &mut Client, command: &str, expected: &[String]) {
    let r = c.cmd(command).await;
    assert!(tagged_ok(&r), "{command}: {r}");
    assert_eq!(untagged(&r), expected, "{command}:\n{r}");
}

/// Asserts that the only untagged line of `resp` is the STATUS answer for `name`, with the
/// name quoted or as an atom (the same mailbox name in IMAP; the spec fixes the quoting of
/// LIST entries only).
fn assert_status(resp: &str, name: &str, items: &str) {
    let lines = untagged(resp);
    let quoted = format!("* STATUS \"{name}\" ({items})");
    let atom = format!("* STATUS {name} ({items})");
    assert!(
        lines.len() == 1 && (lines[0] == quoted || lines[0] == atom),
        "expected only `{quoted}`, got:\n{resp}"
    );
}

/// One message as a server reports it: flags (without \Recent, which is per session),
/// INTERNALDATE and the whole message.
#[derive(Debug, PartialEq)]
struct Stored {
    flags: Vec<String>,
    internal_date: String,
    body: String,
}

/// Parses the one FETCH response carrying `BODY[]` in `resp` (a response to
/// `FETCH n (FLAGS INTERNALDATE BODY.PEEK[])`).
fn stored(resp: &str) -> Stored {
    let at = resp
        .find("BODY[] {")
        .unwrap_or_else(|| panic!("no BODY[] in {resp}"));
    let line_start = resp[..at].rfind("\r\n").map_or(0, |i| i + 2);
    let meta = &resp[line_start..at];
    assert!(
        meta.starts_with("* ") && meta.contains(" FETCH ("),
        "{resp}"
    );
    let flags_at = meta.find("FLAGS (").expect("FLAGS in the FETCH") + "FLAGS (".len();
    let flags_end = flags_at + meta[flags_at..].find(')').expect("end of FLAGS");
    let mut flags: Vec<String> = meta[flags_at..flags_end]
        .split(' ')
        .filter(|f| !f.is_empty() && !f.eq_ignore_ascii_case(r"\Recent"))
        .map(str::to_owned)
        .collect();
    flags.sort();
    let date_at = meta
        .find("INTERNALDATE \"")
        .expect("INTERNALDATE in the FETCH")
        + "INTERNALDATE \"".len();
    let date_end = date_at + meta[date_at..].find('"').expect("end of INTERNALDATE");
    let size_at = at + "BODY[] {".len();
    let size_end = size_at + resp[size_at..].find('}').expect("end of literal size");
    let size: usize = resp[size_at..size_end].parse().expect("literal size");
    let body_at = size_end + "}\r\n".len();
    Stored {
        flags,
        internal_date: meta[date_at..date_end].to_owned(),
        body: resp[body_at..body_at + size].to_owned(),
    }
}

/// `(EXISTS, UIDVALIDITY, UIDNEXT)` from a SELECT answer.
fn select_state(resp: &str) -> (u32, u32, u32) {
    let lines = untagged(resp);
    let exists = lines
        .iter()
        .find_map(|l| l.strip_prefix("* ")?.strip_suffix(" EXISTS")?.parse().ok())
        .unwrap_or_else(|| panic!("no EXISTS in {resp}"));
    let code = |name: &str| -> u32 {
        lines
            .iter()
            .find_map(|l| {
                l.strip_prefix(&format!("* OK [{name} "))?
                    .split(']')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in {resp}"))
    };
    (exists, code("UIDVALIDITY"), code("UIDNEXT"))
}

/// A number STATUS gives for `mailbox` (`item` is MESSAGES, UIDNEXT, UIDVALIDITY, ...).
async fn status_number(c: &mut Client, mailbox: &str, item: &str) -> u32 {
    let r = ok(c, &format!("STATUS {mailbox} ({item})")).await;
    untagged(&r)
        .iter()
        .find_map(|l| {
            l.split(&format!("({item} "))
                .nth(1)?
                .trim_end_matches(')')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {item} in {r}"))
}

/// A number STATUS gives for `mailbox` on a Dovecot, asked directly.
async fn direct_status(dovecot: &Dovecot, mailbox: &str, item: &str) -> u32 {
    let mut d = direct(dovecot).await;
    let n = status_number(&mut d, mailbox, item).await;
    logout(d).await;
    n
}

/// The number of messages in `mailbox` on a Dovecot, asked directly.
async fn direct_messages(dovecot: &Dovecot, mailbox: &str) -> u32 {
    direct_status(dovecot, mailbox, "MESSAGES").await
}

/// The mailbox names a Dovecot lists directly for `LIST "" "*"` (as it writes them).
async fn direct_names(dovecot: &Dovecot) -> Vec<String> {
    let mut d = direct(dovecot).await;
    let r = ok(&mut d, r#"LIST "" "*""#).await;
    logout(d).await;
    let mut names: Vec<String> = untagged(&r)
        .iter()
        .map(|l| {
            l.rsplit_once(' ')
                .expect("a LIST line")
                .1
                .trim_matches('"')
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// LIST and RLIST: the merged tree for each kind of pattern; the referral in RLIST only.
#[tokio::test]
async fn merged_list_tree() {
    let s = setup().await;
    let mut c = s.client().await;

    assert_lines(&mut c, r#"LIST "" "*""#, &entries("LIST", &tree_names())).await;
    assert_lines(
        &mut c,
        r#"LIST "" "%""#,
        &entries("LIST", &["INBOX", "Archive", "Sent", "Shared", "Work"]),
    )
    .await;
    assert_lines(
        &mut c,
        r#"LIST "" "Archive/*""#,
        &entries("LIST", &["Archive/2023", "Archive/2024", "Archive/2024/Q1"]),
    )
    .await;
    assert_lines(
        &mut c,
        r#"LIST "" "Shared/%""#,
        &entries("LIST", &["Shared/Team"]),
    )
    .await;
    assert_lines(
        &mut c,
        r#"LIST "Work/" "%""#,
        &entries("LIST", &["Work/Projects"]),
    )
    .await;
    assert_lines(
        &mut c,
        r#"LIST "" "*Q1""#,
        &entries("LIST", &["Archive/2024/Q1"]),
    )
    .await;
    assert_lines(
        &mut c,
        r#"LIST "" """#,
        &[r#"* LIST (\Noselect) "/" """#.to_owned()],
    )
    .await;

    // RLIST adds the referral mount and the level above it (answered as LIST).
    let mut all = tree_names();
    let at = all.iter().position(|n| *n == "Sent").unwrap();
    all.splice(at..at, ["Remote", "Remote/Sales"]);
    assert_lines(&mut c, r#"RLIST "" "*""#, &entries("LIST", &all)).await;
    assert_lines(
        &mut c,
        r#"RLIST "" "%""#,
        &entries(
            "LIST",
            &["INBOX", "Archive", "Remote", "Sent", "Shared", "Work"],
        ),
    )
    .await;
    assert_lines(
        &mut c,
        r#"RLIST "" "Remote/*""#,
        &entries("LIST", &["Remote/Sales"]),
    )
    .await;
    // LIST never shows the referral, not even when asked for it by name.
    assert_lines(&mut c, r#"LIST "" "Remote/*""#, &[]).await;

    drop(c);
    s.finish().await;
}

/// Subscriptions live on the server of each mailbox; LSUB merges them, `%` lists the
/// unsubscribed levels above subscribed mailboxes as \Noselect, RLSUB adds the referral.
#[tokio::test]
async fn merged_lsub() {
    let s = setup().await;
    let mut c = s.client().await;
    for mailbox in [
        "INBOX",
        "Work/Projects",
        "Archive/2023",
        "Shared/Team/Reports",
    ] {
        ok(&mut c, &format!("SUBSCRIBE {mailbox}")).await;
    }

    // Each subscription went to the server that holds the mailbox, in its own names.
    for (dovecot, expected) in [
        (
            &s.home,
            vec![r#"* LSUB () "/" INBOX"#, r#"* LSUB () "/" Work/Projects"#],
        ),
        (&s.archive, vec![r#"* LSUB () "." 2023"#]),
        (&s.shared, vec![r#"* LSUB () "/" Public/Team/Reports"#]),
    ] {
        let mut d = direct(dovecot).await;
        let mut got = untagged(&ok(&mut d, r#"LSUB "" "*""#).await);
        got.sort();
        assert_eq!(got, expected);
        logout(d).await;
    }

    // Dovecot writes LSUB entries of subscribed mailboxes with no attributes, and an
    // unsubscribed level matched by `%` as (\Noselect).
    let sub = |name: &str| entry("LSUB", "", name);
    let noselect = |name: &str| entry("LSUB", r"\Noselect", name);
    assert_lines(
        &mut c,
        r#"LSUB "" "*""#,
        &[
            sub("INBOX"),
            sub("Archive/2023"),
            sub("Shared/Team/Reports"),
            sub("Work/Projects"),
        ],
    )
    .await;
    assert_lines(
        &mut c,
        r#"LSUB "" "%""#,
        &[
            sub("INBOX"),
            noselect("Archive"),
            noselect("Shared"),
            noselect("Work"),
        ],
    )
    .await;
    assert_lines(&mut c, r#"LSUB "" "Archive/*""#, &[sub("Archive/2023")]).await;
    assert_lines(&mut c, r#"LSUB "Shared/" "%""#, &[noselect("Shared/Team")]).await;
    // RLSUB adds the referral; with `*` only the referral itself (an unsubscribed level is
    // listed only for `%`).
    assert_lines(
        &mut c,
        r#"RLSUB "" "*""#,
        &[
            sub("INBOX"),
            sub("Archive/2023"),
            sub("Remote/Sales"),
            sub("Shared/Team/Reports"),
            sub("Work/Projects"),
        ],
    )
    .await;
    assert_lines(
        &mut c,
        r#"RLSUB "" "%""#,
        &[
            sub("INBOX"),
            noselect("Archive"),
            noselect("Remote"),
            noselect("Shared"),
            noselect("Work"),
        ],
    )
    .await;

    ok(&mut c, "UNSUBSCRIBE Archive/2023").await;
    let mut d = direct(&s.archive).await;
    assert_eq!(
        untagged(&ok(&mut d, r#"LSUB "" "*""#).await),
        Vec::<String>::new()
    );
    logout(d).await;
    assert_lines(
        &mut c,
        r#"LSUB "" "*""#,
        &[
            sub("INBOX"),
            sub("Shared/Team/Reports"),
            sub("Work/Projects"),
        ],
    )
    .await;
    assert_lines(
        &mut c,
        r#"LSUB "" "%""#,
        &[sub("INBOX"), noselect("Shared"), noselect("Work")],
    )
    .await;

    drop(c);
    s.finish().await;
}

/// NAMESPACE merges the home's personal namespace, the personal mount, and the shared
/// mount (which also stands for the shared server's `Public/` namespace).
#[tokio::test]
async fn merged_namespace() {
    let s = setup().await;
    for (dovecot, expected) in [
        (&s.home, r#"* NAMESPACE (("" "/")) NIL NIL"#),
        (&s.archive, r#"* NAMESPACE (("" ".")) NIL NIL"#),
        (&s.shared, r#"* NAMESPACE (("" "/")) NIL (("Public/" "/"))"#),
    ] {
        let mut d = direct(dovecot).await;
        assert_eq!(untagged(&ok(&mut d, "NAMESPACE").await), [expected]);
        logout(d).await;
    }

    let mut c = s.client().await;
    assert_lines(
        &mut c,
        "NAMESPACE",
        &[r#"* NAMESPACE (("" "/")("Archive/" "/")) NIL (("Shared/" "/"))"#.to_owned()],
    )
    .await;
    drop(c);
    s.finish().await;
}

/// Mailbox commands under a mount reach the archive server in its own names; what cannot be
/// translated, crosses servers, is a mount point or is a referral is refused.
#[tokio::test]
async fn mailbox_round_trip_in_mount() {
    let s = setup().await;
    let mut c = s.client().await;
    let archive_names = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["2023", "2024", "2024.Q1", "INBOX"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        v.sort();
        v
    };

    ok(&mut c, "CREATE Archive/2025").await;
    assert_eq!(direct_names(&s.archive).await, archive_names(&["2025"]));
    assert_lines(
        &mut c,
        r#"LIST "" "Archive/2025""#,
        &[entry("LIST", r"\HasNoChildren", "Archive/2025")],
    )
    .await;

    ok(&mut c, "RENAME Archive/2025 Archive/2026").await;
    assert_eq!(direct_names(&s.archive).await, archive_names(&["2026"]));

    ok(&mut c, "SUBSCRIBE Archive/2026").await;
    let mut d = direct(&s.archive).await;
    assert_eq!(
        untagged(&ok(&mut d, r#"LSUB "" "*""#).await),
        [r#"* LSUB () "." 2026"#]
    );
    assert_lines(
        &mut c,
        r#"LSUB "" "Archive/*""#,
        &[entry("LSUB", "", "Archive/2026")],
    )
    .await;
    ok(&mut c, "UNSUBSCRIBE Archive/2026").await;
    assert_eq!(
        untagged(&ok(&mut d, r#"LSUB "" "*""#).await),
        Vec::<String>::new()
    );
    logout(d).await;

    ok(&mut c, "DELETE Archive/2026").await;
    assert_eq!(direct_names(&s.archive).await, archive_names(&[]));

    // A level holding the archive's delimiter cannot be written there.
    let r = c.cmd(r#"CREATE "Archive/a.b""#).await;
    assert_tagged(&r, "NO", Some("CANNOT"), "CREATE Archive/a.b");
    assert_eq!(direct_names(&s.archive).await, archive_names(&[]));

    // Rename across servers.
    let r = c.cmd("RENAME Archive/2023 Work/X").await;
    assert_tagged(&r, "NO", Some("CANNOT"), "RENAME to another server");
    assert_eq!(direct_names(&s.archive).await, archive_names(&[]));
    let mut home_names = vec!["INBOX", "Sent", "Work", "Work/Projects"];
    home_names.sort();
    assert_eq!(direct_names(&s.home).await, home_names);

    // The mount point of a `path = ""` mount is no mailbox.
    let r = c.cmd("SELECT Archive").await;
    assert_tagged(&r, "NO", Some("NONEXISTENT"), "SELECT Archive");

    // Referrals.
    let referral = format!("REFERRAL {REFERRAL}");
    for command in [
        "SELECT Remote/Sales",
        "EXAMINE Remote/Sales",
        "STATUS Remote/Sales (MESSAGES)",
        "CREATE Remote/Sales",
        "DELETE Remote/Sales",
        "SUBSCRIBE Remote/Sales",
        "UNSUBSCRIBE Remote/Sales",
    ] {
        let r = c.cmd(command).await;
        assert_tagged(&r, "NO", Some(&referral), command);
        assert_eq!(untagged(&r), Vec::<String>::new(), "{command}: {r}");
    }
    // Under the referral: still a referral, to the server of that mailbox.
    let r = c.cmd("SELECT Remote/Sales/Q1").await;
    let (status, code) = tagged(&r);
    assert_eq!(status, "NO", "{r}");
    assert!(
        code.as_deref()
            .is_some_and(|c| c.starts_with(&format!("{referral}/"))),
        "{r}"
    );

    let r = ok(&mut c, "STATUS Archive/2023 (MESSAGES)").await;
    assert_status(&r, "Archive/2023", "MESSAGES 2");

    drop(c);
    s.finish().await;
}

/// A mailbox selected on a mounted server behaves as when selected directly there, and
/// once another server's mailbox is selected, the first server's updates stay away.
#[tokio::test]
async fn selected_state_on_mount() {
    let s = setup().await;
    let mut d = direct(&s.shared).await;
    let direct_select = ok(&mut d, "SELECT Public/Team").await;
    let mut c = s.client().await;
    let via_select = ok(&mut c, "SELECT Shared/Team").await;
    assert_eq!(select_state(&via_select), select_state(&direct_select));
    assert_eq!(select_state(&via_select).0, 2, "{via_select}");

    let fetch = "FETCH 1:* (UID FLAGS BODY.PEEK[])";
    let via = ok(&mut c, fetch).await;
    let dir = ok(&mut d, fetch).await;
    assert_eq!(before_tagged(&via), before_tagged(&dir));
    assert!(via.contains("Subject: team 1\r\n"), "{via}");

    let r = ok(&mut c, r"STORE 1 +FLAGS (\Flagged)").await;
    assert!(r.contains(r"* 1 FETCH (FLAGS (\Flagged))"), "{r}");
    let r = ok(&mut d, "FETCH 1 (FLAGS)").await;
    assert!(r.contains(r"* 1 FETCH (FLAGS (\Flagged))"), "{r}");

    // IDLE goes to the shared server: a message appended there directly is announced.
    c.write(b"i1 IDLE\r\n").await;
    let cont = c.read_response().await;
    assert!(
        cont.starts_with(b"+ "),
        "{}",
        String::from_utf8_lossy(&cont)
    );
    append(&mut d, "Public/Team", "", &message("team 3", "news")).await;
    loop {
        let r = String::from_utf8(c.read_response().await).unwrap();
        if r == "* 3 EXISTS\r\n" {
            break;
        }
        assert!(
            r == "* 1 RECENT\r\n" || r.ends_with(" FETCH (FLAGS (\\Recent))\r\n"),
            "unexpected while idling: {r:?}"
        );
    }
    c.write(b"DONE\r\n").await;
    let r = c.until_tagged("i1").await;
    assert!(tagged_ok(&r), "{r}");

    // Selecting INBOX moves to the home server; Public/Team is closed on the shared one.
    let r = ok(&mut c, "SELECT INBOX").await;
    let exists: Vec<String> = untagged(&r)
        .into_iter()
        .filter(|l| l.ends_with(" EXISTS"))
        .collect();
    assert_eq!(exists, ["* 2 EXISTS"], "{r}");
    append(&mut d, "Public/Team", "", &message("team 4", "more news")).await;
    let r = ok(&mut c, "NOOP").await;
    assert_eq!(untagged(&r), Vec::<String>::new(), "{r}");
    let r = ok(&mut c, "FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])").await;
    assert!(
        r.contains("Subject: home 1\r\n") && r.contains("Subject: home 2\r\n"),
        "{r}"
    );
    assert!(!r.contains("team"), "{r}");
    // Asking the shared server again brings no update of a mailbox still selected there
    // (Dovecot would add `* 4 EXISTS` and answer STATUS of a selected mailbox [CLIENTBUG]).
    let r = ok(&mut c, "STATUS Shared/Team (MESSAGES)").await;
    assert_status(&r, "Shared/Team", "MESSAGES 4");
    assert_ne!(tagged(&r).1.as_deref(), Some("CLIENTBUG"), "{r}");
    let r = ok(&mut c, "NOOP").await;
    assert_eq!(untagged(&r), Vec::<String>::new(), "{r}");

    logout(d).await;
    drop(c);
    s.finish().await;
}

/// COPY and UID MOVE from the home INBOX into mounted mailboxes: flags, keywords,
/// INTERNALDATE and bytes arrive intact; MOVE removes the source, COPY keeps it; a COPY to
/// a mailbox that does not exist changes nothing.
#[tokio::test]
async fn cross_backend_copy_and_move() {
    let s = setup().await;
    let to_copy = message("to copy", "copied across servers\r\nsecond line");
    let to_move = message("to move", "moved across servers");
    let mut d = direct(&s.home).await;
    // UIDs 3 and 4 (the two seeded messages have 1 and 2).
    append(
        &mut d,
        "INBOX",
        r#"(\Flagged \Seen $Label1) "14-Mar-2021 09:26:53 +0100""#,
        &to_copy,
    )
    .await;
    append(
        &mut d,
        "INBOX",
        r#"(\Answered $Label1) "02-Jan-2022 23:59:01 -0500""#,
        &to_move,
    )
    .await;
    ok(&mut d, "EXAMINE INBOX").await;
    let fetch = |uid: u32| format!("UID FETCH {uid} (FLAGS INTERNALDATE BODY.PEEK[])");
    let copied = stored(&ok(&mut d, &fetch(3)).await);
    let moved = stored(&ok(&mut d, &fetch(4)).await);
    assert_eq!(copied.flags, ["$Label1", r"\Flagged", r"\Seen"]);
    assert_eq!(copied.body, to_copy);
    assert_eq!(moved.flags, ["$Label1", r"\Answered"]);
    assert_eq!(moved.body, to_move);
    logout(d).await;

    assert_eq!(direct_status(&s.archive, "2023", "UIDNEXT").await, 3);
    let archive_validity = direct_status(&s.archive, "2023", "UIDVALIDITY").await;
    assert_eq!(direct_status(&s.shared, "Public/Team", "UIDNEXT").await, 3);
    let team_validity = direct_status(&s.shared, "Public/Team", "UIDVALIDITY").await;

    let mut c = s.client().await;
    let r = ok(&mut c, "SELECT INBOX").await;
    assert_eq!(select_state(&r).0, 4, "{r}");

    // COPY to the archive server.
    let r = ok(&mut c, r#"COPY 3 "Archive/2023""#).await;
    // COPYUID: the target's UIDVALIDITY, source UID 3, target UID 3.
    assert_eq!(
        tagged(&r).1,
        Some(format!("COPYUID {archive_validity} 3 3")),
        "{r}"
    );
    let mut d = direct(&s.archive).await;
    ok(&mut d, "EXAMINE 2023").await;
    let r = ok(&mut d, "UID SEARCH ALL").await;
    assert_eq!(untagged(&r), ["* SEARCH 1 2 3"], "{r}");
    assert_eq!(stored(&ok(&mut d, &fetch(3)).await), copied);
    logout(d).await;
    // The source still has it, unchanged.
    let mut d = direct(&s.home).await;
    ok(&mut d, "EXAMINE INBOX").await;
    assert_eq!(stored(&ok(&mut d, &fetch(3)).await), copied);
    logout(d).await;

    // UID MOVE to the shared server.
    let r = ok(&mut c, r#"UID MOVE 4 "Shared/Team""#).await;
    let expunges: Vec<String> = untagged(&r)
        .into_iter()
        .filter(|l| l.ends_with(" EXPUNGE"))
        .collect();
    assert_eq!(expunges, ["* 4 EXPUNGE"], "{r}");
    // RFC 6851 puts MOVE's COPYUID in an untagged OK; the tagged line would do too.
    assert!(r.contains(&format!("[COPYUID {team_validity} 4 3]")), "{r}");
    let r = ok(&mut c, "UID SEARCH ALL").await;
    assert_eq!(untagged(&r), ["* SEARCH 1 2 3"], "{r}");
    let mut d = direct(&s.shared).await;
    ok(&mut d, "EXAMINE Public/Team").await;
    let r = ok(&mut d, "UID SEARCH ALL").await;
    assert_eq!(untagged(&r), ["* SEARCH 1 2 3"], "{r}");
    assert_eq!(stored(&ok(&mut d, &fetch(3)).await), moved);
    logout(d).await;
    let mut d = direct(&s.home).await;
    ok(&mut d, "EXAMINE INBOX").await;
    let r = ok(&mut d, "UID SEARCH ALL").await;
    assert_eq!(untagged(&r), ["* SEARCH 1 2 3"], "{r}");
    logout(d).await;

    // Dovecot draws new UIDVALIDITYs from the clock, so INBOX and the targets above, all
    // made within the same second or two, may share one and a COPYUID with the source's
    // would pass. Into a target whose UIDVALIDITY differs from INBOX's it cannot.
    let inbox_validity = direct_status(&s.home, "INBOX", "UIDVALIDITY").await;
    let mut d = direct(&s.archive).await;
    ok(&mut d, "CREATE Copies").await;
    let mut copies_validity = status_number(&mut d, "Copies", "UIDVALIDITY").await;
    for _ in 0..3 {
        if copies_validity != inbox_validity {
            break;
        }
        // A mailbox made again gets a UIDVALIDITY above every earlier one of its server.
        ok(&mut d, "DELETE Copies").await;
        ok(&mut d, "CREATE Copies").await;
        copies_validity = status_number(&mut d, "Copies", "UIDVALIDITY").await;
    }
    assert_ne!(copies_validity, inbox_validity);
    logout(d).await;
    let r = ok(&mut c, r#"COPY 1 "Archive/Copies""#).await;
    assert_eq!(
        tagged(&r).1,
        Some(format!("COPYUID {copies_validity} 1 1")),
        "{r}"
    );
    assert_eq!(direct_messages(&s.archive, "Copies").await, 1);

    // COPY to a mailbox the archive server does not have.
    let before = ok(&mut c, "FETCH 1:* (UID FLAGS)").await;
    let r = c.cmd(r#"COPY 1 "Archive/nope""#).await;
    // Dovecot answers an APPEND to a missing mailbox with [TRYCREATE].
    assert_tagged(&r, "NO", Some("TRYCREATE"), "COPY to Archive/nope");
    let after = ok(&mut c, "FETCH 1:* (UID FLAGS)").await;
    assert_eq!(before_tagged(&after), before_tagged(&before));
    assert_eq!(direct_messages(&s.home, "INBOX").await, 3);
    assert!(
        !direct_names(&s.archive).await.contains(&"nope".to_owned()),
        "COPY created the target"
    );
    assert_eq!(direct_messages(&s.archive, "2023").await, 3);

    drop(c);
    s.finish().await;
}

/// A mounted server that goes away only takes its own mailboxes: listings go on with a
/// warning, its mailboxes answer NO [UNAVAILABLE], the rest keeps working.
#[tokio::test]
async fn mount_backend_down() {
    let mut s = setup().await;
    let mut c = s.client().await;
    // Every server connected.
    assert_lines(&mut c, r#"LIST "" "*""#, &entries("LIST", &tree_names())).await;
    ok(&mut c, "SELECT INBOX").await;

    s.archive.stop();

    let warning = r#"* NO [UNAVAILABLE] Mailboxes under "Archive" are not available now"#;
    let r = ok(&mut c, r#"LIST "" "*""#).await;
    let mut got = untagged(&r);
    // Whether the mount point itself is still listed while its server is away is left
    // open by the spec; if it is, it cannot claim children it did not see.
    if let Some(i) = got.iter().position(|l| l.ends_with(r#" "Archive""#)) {
        assert_eq!(got[i], entry("LIST", r"\Noselect", "Archive"), "{r}");
        got.remove(i);
    }
    let mut expected = entries(
        "LIST",
        &[
            "INBOX",
            "Sent",
            "Shared",
            "Shared/Team",
            "Shared/Team/Reports",
            "Work",
            "Work/Projects",
        ],
    );
    expected.push(warning.to_owned());
    assert_eq!(got, expected, "{r}");

    assert_lines(&mut c, r#"LIST "" "Archive/*""#, &[warning.to_owned()]).await;
    // A pattern the archive cannot match does not ask it, so there is nothing to warn about.
    assert_lines(
        &mut c,
        r#"LIST "" "Shared/*""#,
        &entries("LIST", &["Shared/Team", "Shared/Team/Reports"]),
    )
    .await;

    let r = c.cmd("SELECT Archive/2023").await;
    assert_tagged(&r, "NO", Some("UNAVAILABLE"), "SELECT Archive/2023");
    let r = c.cmd("STATUS Archive/2023 (MESSAGES)").await;
    assert_tagged(&r, "NO", Some("UNAVAILABLE"), "STATUS Archive/2023");
    // Both refusals are counted for operators.
    assert_eq!(s.gw.shared.metrics.relay.mount_unavailable.get(), 2);

    // The home server is untouched.
    let r = ok(&mut c, "SELECT INBOX").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    let r = ok(&mut c, "FETCH 1:* (FLAGS)").await;
    assert_eq!(
        untagged(&r)
            .iter()
            .filter(|l| l.contains(" FETCH ("))
            .count(),
        2,
        "{r}"
    );
    append(&mut c, "INBOX", "", &message("while down", "still works")).await;
    assert_eq!(direct_messages(&s.home, "INBOX").await, 3);
    let r = ok(&mut c, "STATUS Shared/Team (MESSAGES)").await;
    assert_status(&r, "Shared/Team", "MESSAGES 2");

    drop(c);
    s.finish().await;
}

/// The archive's `.` inside a client level, and a `/` inside an archive level, cannot be
/// translated: commands naming the first are refused, mailboxes with the second are not
/// listed. The home server (same delimiter as the client) takes dots as it always did.
#[tokio::test]
async fn different_delimiters() {
    let s = setup_with(true, "").await;

    // With listescape, Dovecot (delimiter `.`) holds a level `a/b`; a client using `/` could
    // not tell it from `a` > `b`.
    let mut d = direct(&s.archive).await;
    ok(&mut d, r#"CREATE "a/b""#).await;
    let r = ok(&mut d, r#"LIST "" "a*""#).await;
    assert_eq!(untagged(&r), [r#"* LIST (\HasNoChildren) "." a/b"#]);
    logout(d).await;

    let mut c = s.client().await;
    assert_lines(&mut c, r#"LIST "" "*""#, &entries("LIST", &tree_names())).await;
    assert_lines(
        &mut c,
        r#"LIST "" "Archive/%""#,
        &entries("LIST", &["Archive/2023", "Archive/2024"]),
    )
    .await;
    assert_lines(&mut c, r#"LIST "" "Archive/a*""#, &[]).await;

    let before = direct_names(&s.archive).await;
    let r = c.cmd(r#"CREATE "Archive/x.y""#).await;
    assert_tagged(&r, "NO", Some("CANNOT"), "CREATE Archive/x.y");
    // Naively translated, this would be 2024.Q1, i.e. Archive/2024/Q1.
    let r = c.cmd(r#"SELECT "Archive/2024.Q1""#).await;
    assert_tagged(&r, "NO", Some("CANNOT"), "SELECT Archive/2024.Q1");
    let r = c.cmd(r#"RENAME Archive/2023 "Archive/20.23""#).await;
    assert_tagged(&r, "NO", Some("CANNOT"), "RENAME to Archive/20.23");
    assert_eq!(direct_names(&s.archive).await, before);

    let r = ok(&mut c, r#"STATUS "Archive/2024/Q1" (MESSAGES)"#).await;
    assert_status(&r, "Archive/2024/Q1", "MESSAGES 0");

    // Outside the mount a dot is just a character of the home server's names.
    ok(&mut c, r#"CREATE "Work/v1.2""#).await;
    assert!(
        direct_names(&s.home)
            .await
            .contains(&"Work/v1.2".to_owned()),
        "not created on the home server"
    );
    assert_lines(
        &mut c,
        r#"LIST "Work/" "*""#,
        &[
            entry("LIST", r"\HasNoChildren", "Work/Projects"),
            entry("LIST", r"\HasNoChildren", "Work/v1.2"),
        ],
    )
    .await;

    drop(c);
    s.finish().await;
}

/// A cross-server COPY or MOVE that fails half-way (the target runs out of quota at the
/// second message) answers NO, removes the copy it already made on the target, and leaves
/// the source as it was.
#[tokio::test]
async fn copy_failing_half_way_leaves_both_sides_as_they_were() {
    // The archive may hold 3 messages; 2023 already has 2, so one more fits and two do not.
    let s = setup_with(false, "plugin {\n  quota_rule = *:messages=3\n}\n").await;
    let mut c = s.client().await;
    let r = ok(&mut c, "SELECT INBOX").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    let before_next = direct_status(&s.archive, "2023", "UIDNEXT").await;
    assert_eq!(before_next, 3);

    for command in [
        r#"COPY 1:2 "Archive/2023""#,
        r#"UID MOVE 1:2 "Archive/2023""#,
    ] {
        let r = c.cmd(command).await;
        assert_tagged(&r, "NO", Some("OVERQUOTA"), command);
        assert!(
            !r.contains("EXPUNGE"),
            "{command}: nothing may be expunged: {r}"
        );
        // The first message did reach the archive (its UID was used) and was removed again.
        let mut d = direct(&s.archive).await;
        ok(&mut d, "EXAMINE 2023").await;
        let r = ok(&mut d, "UID SEARCH ALL").await;
        assert_eq!(untagged(&r), ["* SEARCH 1 2"], "{command}: archive: {r}");
        logout(d).await;
        // The source still has both messages.
        let mut d = direct(&s.home).await;
        ok(&mut d, "EXAMINE INBOX").await;
        let r = ok(&mut d, "UID SEARCH ALL").await;
        assert_eq!(untagged(&r), ["* SEARCH 1 2"], "{command}: INBOX: {r}");
        let r = ok(&mut d, "UID SEARCH DELETED").await;
        assert_eq!(untagged(&r), ["* SEARCH"], "{command}: INBOX: {r}");
        logout(d).await;
    }
    assert!(direct_status(&s.archive, "2023", "UIDNEXT").await > before_next);
    let counters = &s.gw.shared.metrics.relay;
    assert_eq!(
        (
            counters.cross_server_copies(true),
            counters.cross_server_copies(false)
        ),
        (0, 2)
    );
    // The session goes on, on both servers.
    let r = ok(&mut c, "FETCH 1:* (UID)").await;
    assert_eq!(
        untagged(&r),
        ["* 1 FETCH (UID 1)", "* 2 FETCH (UID 2)"],
        "{r}"
    );
    ok(&mut c, "STATUS Archive/2023 (MESSAGES)").await;
    drop(c);
    s.finish().await;
}

/// The words after a response's mailbox name: `* MYRIGHTS "x y" lr` -> `lr`.
fn after_name(line: &str, word: &str) -> String {
    let rest = line
        .strip_prefix(&format!("* {word} "))
        .unwrap_or_else(|| panic!("not a {word} line: {line}"));
    let rest = match rest.strip_prefix('"') {
        Some(quoted) => &quoted[quoted.find('"').expect("closing quote") + 1..],
        None => rest.split_once(' ').map_or("", |(_, r)| r),
    };
    rest.trim_start().to_owned()
}

/// Quota roots of a mounted server come back as `<prefix>#<root>` and lead back to that
/// server for GETQUOTA and SETQUOTA; ACL commands on a mounted mailbox reach its server with
/// the name translated both ways. Each answer is checked against the same question asked
/// directly.
#[tokio::test]
async fn quota_and_acl_in_a_mount() {
    let s = setup().await;
    let mut d = direct(&s.archive).await;
    let direct_root = ok(&mut d, "GETQUOTAROOT 2023").await;
    let direct_quota = untagged(&direct_root)
        .into_iter()
        .find(|l| l.starts_with("* QUOTA "))
        .expect("a QUOTA line");
    let resources = after_name(&direct_quota, "QUOTA");
    let direct_set = d.cmd(r#"SETQUOTA "User quota" (STORAGE 10)"#).await;
    logout(d).await;
    assert_eq!(
        untagged(&direct_root),
        [
            r#"* QUOTAROOT 2023 "User quota""#.to_owned(),
            format!(r#"* QUOTA "User quota" {resources}"#)
        ],
        "{direct_root}"
    );

    let mut c = s.client().await;
    let r = ok(&mut c, "GETQUOTAROOT Archive/2023").await;
    assert_eq!(
        untagged(&r),
        [
            r#"* QUOTAROOT "Archive/2023" "Archive#User quota""#.to_owned(),
            format!(r#"* QUOTA "Archive#User quota" {resources}"#)
        ],
        "{r}"
    );
    let r = ok(&mut c, r#"GETQUOTA "Archive#User quota""#).await;
    assert_eq!(
        untagged(&r),
        [format!(r#"* QUOTA "Archive#User quota" {resources}"#)],
        "{r}"
    );
    let r = c.cmd(r#"SETQUOTA "Archive#User quota" (STORAGE 10)"#).await;
    assert_eq!(tagged(&r), tagged(&direct_set), "{r}");
    // Home roots are the home server's own.
    let mut d = direct(&s.home).await;
    let home_root = ok(&mut d, "GETQUOTAROOT INBOX").await;
    logout(d).await;
    let r = ok(&mut c, "GETQUOTAROOT INBOX").await;
    assert_eq!(untagged(&r), untagged(&home_root), "{r}");

    let mut d = direct(&s.shared).await;
    let direct_rights = ok(&mut d, "MYRIGHTS Public/Team").await;
    let direct_acl = ok(&mut d, "GETACL Public/Team").await;
    logout(d).await;
    let rights = after_name(&untagged(&direct_rights)[0], "MYRIGHTS");
    assert!(
        rights.contains('l') && rights.contains('r'),
        "{direct_rights}"
    );
    let r = ok(&mut c, "MYRIGHTS Shared/Team").await;
    assert_eq!(
        untagged(&r),
        [format!(r#"* MYRIGHTS "Shared/Team" {rights}"#)],
        "{r}"
    );
    let acl = after_name(&untagged(&direct_acl)[0], "ACL");
    let r = ok(&mut c, "GETACL Shared/Team").await;
    assert_eq!(
        untagged(&r),
        [format!(r#"* ACL "Shared/Team" {acl}"#)],
        "{r}"
    );
    drop(c);
    s.finish().await;
}

/// Mounted servers are logged into only when a command needs them, with the same credentials
/// mode as the home login: here the gateway's own passdb and a master user on every server.
#[tokio::test]
async fn mounts_log_in_lazily_with_the_master_user() {
    let master = Some(("gwmaster".to_owned(), "masterpw".to_owned()));
    let home = Dovecot::start(DovecotOptions {
        master_user: master.clone(),
        ..DovecotOptions::default()
    });
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        master_user: master,
        ..DovecotOptions::default()
    });
    archive.seed_message(USER, "2023", message("archived 1", "old").as_bytes());
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
         namespace = \"personal\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
    );
    let gw = gateway::start_with(&routing, |config, dir| {
        let passdb = dir.join("gateway.passwd");
        std::fs::write(&passdb, "alice:{PLAIN}gatewaypw\n").unwrap();
        config.backend_auth.mode = imap_gateway::config::BackendAuthMode::Master;
        config.backend_auth.master_user = Some("gwmaster".into());
        config.backend_auth.master_password = Some("masterpw".into());
        config.backend_auth.passdb = Some(passdb);
    })
    .await;

    let mut c = Client::connect(gw.addr).await;
    c.login(USER, "gatewaypw").await;
    ok(&mut c, "SELECT INBOX").await;
    let r = ok(&mut c, r#"LIST "" "INBOX""#).await;
    assert_eq!(
        untagged(&r),
        [entry("LIST", r"\HasNoChildren", "INBOX")],
        "{r}"
    );
    let home_log = wait_for_log(&home, "alice's home login", |log| {
        !login_lines(log, USER).is_empty()
    })
    .await;
    assert!(
        home_log.contains("Master user logging in as alice"),
        "{home_log}"
    );
    // Nothing so far needed the archive: it has not seen alice.
    assert_eq!(
        login_lines(&archive.log_contents(), USER),
        Vec::<String>::new()
    );

    let r = ok(&mut c, "STATUS Archive/2023 (MESSAGES)").await;
    assert_status(&r, "Archive/2023", "MESSAGES 1");
    let log = wait_for_log(&archive, "alice's archive login", |log| {
        !login_lines(log, USER).is_empty()
    })
    .await;
    assert!(log.contains("Master user logging in as alice"), "{log}");
    assert_eq!(login_lines(&log, USER).len(), 1, "{log}");
    // The connection is kept for the session: a second command logs in no more.
    ok(&mut c, "STATUS Archive/2023 (MESSAGES)").await;
    ok(&mut c, "NOOP").await;
    assert_eq!(login_lines(&archive.log_contents(), USER).len(), 1);
    drop(c);
    gw.stop().await;
}

/// Bad input in a session with mounts gets a clear answer and the session goes on;
/// pipelined commands are answered in order; a big APPEND into a mount streams (the gateway's
/// `+` is not needed: the archive server's comes through); an endless line ends in BYE.
#[tokio::test]
async fn bad_input_and_pipelining_with_mounts() {
    let s = setup().await;
    let mut c = s.client().await;
    for (command, status, code) in [
        ("SELECT", "BAD", None),
        (r#"SELECT "unterminated"#, "BAD", None),
        (r#"LIST """#, "BAD", None),
        (r#"LIST (SUBSCRIBED) "" "*""#, "BAD", None),
        (r#"LIST "" ("INBOX" "Archive/*")"#, "BAD", None),
        ("RENAME Archive/2023", "BAD", None),
        ("COMPRESS DEFLATE", "NO", Some("CANNOT")),
        ("XNOSUCHCOMMAND x", "BAD", None),
        // A mounted server's own INBOX is not part of the mount.
        ("STATUS Archive/INBOX (MESSAGES)", "NO", Some("NONEXISTENT")),
        ("DELETE Archive", "NO", Some("NONEXISTENT")),
    ] {
        let r = c.cmd(command).await;
        assert_tagged(&r, status, code, command);
    }
    c.write(b"garbage\r\n").await;
    let r = c.read_response().await;
    assert_eq!(r, b"garbage BAD Command not understood\r\n");

    let r = ok(&mut c, "CAPABILITY").await;
    let caps = untagged(&r);
    assert_eq!(caps.len(), 1, "{r}");
    let caps: Vec<&str> = caps[0].split(' ').collect();
    for want in ["IMAP4rev1", "MAILBOX-REFERRALS", "NAMESPACE", "LITERAL+"] {
        assert!(caps.contains(&want), "{want} missing: {r}");
    }
    for gone in [
        "LIST-EXTENDED",
        "LIST-STATUS",
        "COMPRESS=DEFLATE",
        "STARTTLS",
    ] {
        assert!(!caps.contains(&gone), "{gone} advertised: {r}");
    }

    // Three commands in one write, for three places: answered one after the other.
    c.write(b"p1 NOOP\r\np2 STATUS Archive/2023 (MESSAGES)\r\np3 LIST \"\" Shared\r\n")
        .await;
    let r = c.until_tagged("p3").await;
    let lines: Vec<&str> = r.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 5, "{r}");
    assert!(lines[0].starts_with("p1 OK"), "{r}");
    assert_eq!(lines[1], r#"* STATUS "Archive/2023" (MESSAGES 2)"#, "{r}");
    assert!(lines[2].starts_with("p2 OK"), "{r}");
    assert_eq!(lines[3], entry("LIST", r"\Noselect \HasChildren", "Shared"));
    assert!(lines[4].starts_with("p3 OK"), "{r}");

    // 200 kB: more than the gateway holds in memory for a command, so it is streamed.
    let body = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(3000)
    );
    c.write(format!("b1 APPEND Archive/2023 (\\Seen) {{{}}}\r\n", body.len()).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    c.write(body.as_bytes()).await;
    c.write(b"\r\n").await;
    let r = c.until_tagged("b1").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(r.contains("[APPENDUID "), "{r}");
    assert_eq!(direct_messages(&s.archive, "2023").await, 3);
    // A big literal where only small ones belong is refused, and the session goes on.
    c.write(b"b2 SELECT {100000}\r\n").await;
    let r = c.until_tagged("b2").await;
    assert_tagged(&r, "NO", Some("TOOBIG"), "SELECT with a 100 kB literal");
    ok(&mut c, "NOOP").await;

    // A command line longer than limits.max_command_line (64 KiB by default).
    c.write(format!("x1 NOOP {}\r\n", "x".repeat(70 * 1024)).as_bytes())
        .await;
    let rest = String::from_utf8_lossy(&c.read_to_end().await).into_owned();
    assert!(rest.starts_with("* BYE [TOOBIG]"), "{rest}");
    drop(c);
    s.finish().await;
}

/// A client that vanishes inside an APPEND literal streamed to a mounted server: nothing is
/// stored. The gateway must not log out on that connection, because its LOGOUT would be taken
/// for the rest of the literal: here exactly `gwm2 LOGOUT` is missing, so a LOGOUT would
/// complete the message and store it.
#[tokio::test]
async fn client_gone_inside_an_append_to_a_mount_stores_nothing() {
    let s = setup().await;
    let mut c = s.client().await;
    let body = format!("Subject: cut\r\n\r\n{}", "z".repeat(100 * 1024));
    c.write(format!("a1 APPEND Archive/2023 {{{}}}\r\n", body.len()).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    let missing = "gwm2 LOGOUT".len();
    c.write(&body.as_bytes()[..body.len() - missing]).await;
    drop(c);
    let log = wait_for_log(&s.archive, "alice's session on the archive to end", |log| {
        log.lines()
            .any(|l| l.contains("imap(alice)") && l.contains("Disconnected"))
    })
    .await;
    assert_eq!(
        direct_messages(&s.archive, "2023").await,
        2,
        "a partial message was stored:\n{log}"
    );
    s.finish().await;
}

/// ENABLE reaches every server, including those connected later, and a selection that moves
/// to another server still gets exactly one `[CLOSED]` (RFC 7162) under QRESYNC.
#[tokio::test]
async fn enable_reaches_every_server() {
    let s = setup().await;
    let mut c = s.client().await;
    let r = ok(&mut c, "ENABLE QRESYNC").await;
    assert_eq!(untagged(&r), ["* ENABLED QRESYNC"], "{r}");
    // `CHANGEDSINCE ... VANISHED` is valid only once QRESYNC is enabled on the server that
    // answers it (Dovecot says BAD otherwise, as the direct session below shows).
    const QRESYNC_FETCH: &str = "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)";
    let mut first = true;
    for mailbox in [
        "Shared/Team",
        "INBOX",
        "Archive/2023",
        "Shared/Team",
        "INBOX",
    ] {
        let r = ok(&mut c, &format!("SELECT {mailbox}")).await;
        let closed = r.matches("[CLOSED]").count();
        assert_eq!(closed, usize::from(!first), "{mailbox}: {r}");
        first = false;
        ok(&mut c, QRESYNC_FETCH).await;
    }
    let mut d = direct(&s.shared).await;
    ok(&mut d, "SELECT Public/Team").await;
    let r = d.cmd(QRESYNC_FETCH).await;
    assert_tagged(&r, "BAD", None, "direct, without ENABLE");
    logout(d).await;
    drop(c);
    s.finish().await;
}

/// Other users' namespaces of every server are translated into the client's names and
/// delimiter; a home namespace that a mount hides is left out.
#[tokio::test]
async fn namespace_other_users_translated_and_hidden() {
    let home = Dovecot::start(DovecotOptions {
        shared_namespace: true,
        ..DovecotOptions::default()
    });
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        shared_namespace: true,
        ..DovecotOptions::default()
    });
    let mut d = direct(&home).await;
    let r = ok(&mut d, "NAMESPACE").await;
    assert_eq!(
        untagged(&r),
        [r#"* NAMESPACE (("" "/")) (("Shared/" "/")) NIL"#],
        "{r}"
    );
    logout(d).await;
    let mut d = direct(&archive).await;
    let r = ok(&mut d, "NAMESPACE").await;
    assert_eq!(
        untagged(&r),
        [r#"* NAMESPACE (("" ".")) (("Shared." ".")) NIL"#],
        "{r}"
    );
    logout(d).await;
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
         namespace = \"personal\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nreferral = \"{REFERRAL}\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let mut c = Client::connect(gw.addr).await;
    c.login(USER, PASS).await;
    let r = ok(&mut c, "NAMESPACE").await;
    assert_eq!(
        untagged(&r),
        [r#"* NAMESPACE (("" "/")("Archive/" "/")) (("Archive/Shared/" "/")) NIL"#],
        "{r}"
    );
    drop(c);
    gw.stop().await;
}

/// METADATA (RFC 5464) on a mounted mailbox reaches its server with the name translated
/// both ways.
#[tokio::test]
async fn metadata_in_a_mount() {
    let s = setup_with(
        false,
        "mail_attribute_dict = file:%h/dovecot-attributes\n\
         protocol imap {\n  imap_metadata = yes\n}\n",
    )
    .await;
    let mut d = direct(&s.archive).await;
    ok(
        &mut d,
        r#"SETMETADATA 2023 (/private/comment "set directly")"#,
    )
    .await;
    let direct_answer = ok(&mut d, "GETMETADATA 2023 /private/comment").await;
    logout(d).await;
    // Dovecot sends the value as a literal; the gateway passes it on and translates the name.
    assert_eq!(
        before_tagged(&direct_answer),
        "* METADATA 2023 (/private/comment {12}\r\nset directly)\r\n"
    );
    let mut c = s.client().await;
    let r = ok(&mut c, "GETMETADATA Archive/2023 /private/comment").await;
    assert_eq!(
        before_tagged(&r),
        "* METADATA \"Archive/2023\" (/private/comment {12}\r\nset directly)\r\n",
        "{r}"
    );
    ok(
        &mut c,
        r#"SETMETADATA Archive/2023 (/private/comment "through the gateway")"#,
    )
    .await;
    let r = ok(
        &mut c,
        "GETMETADATA (DEPTH 0) Archive/2023 (/private/comment)",
    )
    .await;
    assert_eq!(
        before_tagged(&r),
        "* METADATA \"Archive/2023\" (/private/comment {19}\r\nthrough the gateway)\r\n",
        "{r}"
    );
    let mut d = direct(&s.archive).await;
    let r = ok(&mut d, "GETMETADATA 2023 /private/comment").await;
    assert!(r.contains("through the gateway"), "{r}");
    logout(d).await;
    drop(c);
    s.finish().await;
}

/// The other way round: a home server with `.` and a mounted one with `/`. The client sees
/// `.` everywhere, including in the mount's prefix, and names are translated level by level.
#[tokio::test]
async fn dot_home_with_a_slash_mount() {
    let home = Dovecot::start(DovecotOptions {
        separator: '.',
        ..DovecotOptions::default()
    });
    let shared = Dovecot::start(DovecotOptions {
        public_namespace: true,
        ..DovecotOptions::default()
    });
    let mut d = direct(&shared).await;
    for mailbox in ["Public/Team", "Public/Team/Reports"] {
        ok(&mut d, &format!("CREATE {mailbox}")).await;
    }
    logout(d).await;
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Shared/Teams\"\nbackend = \"shared\"\n\
         path = \"Public\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("shared", shared.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let mut c = Client::connect(gw.addr).await;
    c.login(USER, PASS).await;
    let r = ok(&mut c, r#"LIST "" "*""#).await;
    let dot = |attrs: &str, name: &str| format!("* LIST ({attrs}) \".\" \"{name}\"");
    assert_eq!(
        untagged(&r),
        [
            dot(r"\HasNoChildren", "INBOX"),
            dot(r"\Noselect \HasChildren", "Shared"),
            dot(r"\Noselect \HasChildren", "Shared.Teams"),
            dot(r"\HasChildren", "Shared.Teams.Team"),
            dot(r"\HasNoChildren", "Shared.Teams.Team.Reports"),
        ],
        "{r}"
    );
    ok(&mut c, "CREATE Shared.Teams.Team.New").await;
    let r = c.cmd("CREATE Shared.Teams.a/b").await;
    assert_tagged(
        &r,
        "NO",
        Some("CANNOT"),
        "a level with the mounted server's delimiter",
    );
    let r = ok(&mut c, r#"LIST "Shared.Teams." "%""#).await;
    assert_eq!(
        untagged(&r),
        [dot(r"\HasChildren", "Shared.Teams.Team")],
        "{r}"
    );
    let r = ok(&mut c, "NAMESPACE").await;
    assert_eq!(
        untagged(&r),
        [r#"* NAMESPACE (("" ".")) NIL (("Shared.Teams." "."))"#],
        "{r}"
    );
    let mut d = direct(&shared).await;
    let r = ok(&mut d, r#"LIST "" "Public/Team/%""#).await;
    // Dovecot lists in directory order.
    let mut got = untagged(&r);
    got.sort();
    assert_eq!(
        got,
        [
            r#"* LIST (\HasNoChildren) "/" Public/Team/New"#,
            r#"* LIST (\HasNoChildren) "/" Public/Team/Reports"#
        ],
        "{r}"
    );
    logout(d).await;
    drop(c);
    gw.stop().await;
}

/// XLIST is answered like LIST (merged), even with a mounted mailbox selected; a message set
/// that is not one is refused before it reaches any server; an overlong tag is refused.
#[tokio::test]
async fn xlist_sets_and_tags() {
    let s = setup().await;
    let mut c = s.client().await;
    ok(&mut c, "SELECT Archive/2023").await;
    let list = ok(&mut c, r#"LIST "" "*""#).await;
    let xlist = ok(&mut c, r#"XLIST "" "*""#).await;
    assert_eq!(untagged(&xlist), untagged(&list), "{xlist}");
    assert_eq!(untagged(&list), entries("LIST", &tree_names()), "{list}");

    ok(&mut c, "SELECT INBOX").await;
    c.write(b"a1 UID COPY {23+}\r\n1 (UID)\r\nzz SELECT Sent Archive/2023\r\n")
        .await;
    let r = c.until_tagged("a1").await;
    assert_tagged(&r, "BAD", None, "a literal message set");
    let r = ok(&mut c, "FETCH 1:* (UID)").await;
    assert_eq!(
        untagged(&r),
        ["* 1 FETCH (UID 1)", "* 2 FETCH (UID 2)"],
        "INBOX is still selected: {r}"
    );

    let long = "t".repeat(65);
    c.write(format!("{long} NOOP\r\n").as_bytes()).await;
    assert_eq!(c.read_response().await, b"* BAD Tag too long\r\n");
    ok(&mut c, "NOOP").await;
    drop(c);
    s.finish().await;
}

/// When the server of the selected (mounted) mailbox goes away, commands on it answer
/// `NO [UNAVAILABLE]` until the client closes it or selects another; the session goes on.
#[tokio::test]
async fn selected_mount_goes_away() {
    let mut s = setup().await;
    let mut c = s.client().await;
    let r = ok(&mut c, "SELECT Archive/2023").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    s.archive.stop();
    for command in [
        "FETCH 1 (FLAGS)",
        "UID SEARCH ALL",
        "IDLE",
        r#"COPY 1 "Work""#,
    ] {
        let r = c.cmd(command).await;
        assert_tagged(&r, "NO", Some("UNAVAILABLE"), command);
    }
    ok(&mut c, "CLOSE").await;
    let r = ok(&mut c, "SELECT INBOX").await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    ok(&mut c, "FETCH 1 (FLAGS)").await;
    drop(c);
    s.finish().await;
}

/// A mount on the user's own home server, and two mounts on one server: each name reaches
/// the right mailbox and comes back under the mount it was asked through.
#[tokio::test]
async fn mounts_on_home_and_two_on_one_server() {
    let home = Dovecot::start(DovecotOptions {
        public_namespace: true,
        ..DovecotOptions::default()
    });
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        ..DovecotOptions::default()
    });
    archive.seed_message(USER, "2023", message("archived 1", "old").as_bytes());
    archive.seed_message(USER, "2024.Q1", message("q1 1", "q1").as_bytes());
    archive.seed_message(USER, "2024.Q1", message("q1 2", "q1").as_bytes());
    let mut d = direct(&home).await;
    ok(&mut d, "CREATE Public/Team").await;
    append(&mut d, "Public/Team", "", &message("team 1", "hello")).await;
    logout(d).await;
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"home\"\npath = \"Public\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"This year\"\nbackend = \"archive\"\n\
         path = \"2024\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
    );
    let gw = gateway::start(&routing).await;
    let mut c = Client::connect(gw.addr).await;
    c.login(USER, PASS).await;
    let r = ok(&mut c, "STATUS Shared/Team (MESSAGES)").await;
    assert_status(&r, "Shared/Team", "MESSAGES 1");
    let r = ok(&mut c, r#"STATUS "This year/Q1" (MESSAGES)"#).await;
    assert_status(&r, "This year/Q1", "MESSAGES 2");
    let r = ok(&mut c, "STATUS Archive/2024/Q1 (MESSAGES)").await;
    assert_status(&r, "Archive/2024/Q1", "MESSAGES 2");
    let r = ok(&mut c, r#"SELECT "This year/Q1""#).await;
    assert_eq!(select_state(&r).0, 2, "{r}");
    let r = ok(&mut c, "SELECT Shared/Team").await;
    assert_eq!(select_state(&r).0, 1, "{r}");
    // `2024` exists only as the parent of the seeded `2024.Q1`, so the archive lists it as
    // \Noselect; the mount point is that mailbox (non-empty path) and keeps its attributes.
    let mut d = direct(&archive).await;
    let r = ok(&mut d, r#"LIST "" "2024""#).await;
    assert_eq!(
        untagged(&r),
        [r#"* LIST (\Noselect \HasChildren) "." 2024"#],
        "{r}"
    );
    logout(d).await;
    let r = ok(&mut c, r#"LIST "" "This year*""#).await;
    assert_eq!(
        untagged(&r),
        [
            entry("LIST", r"\Noselect \HasChildren", "This year"),
            entry("LIST", r"\HasNoChildren", "This year/Q1"),
        ],
        "{r}"
    );
    drop(c);
    gw.stop().await;
}

/// The selected-state commands on a mounted mailbox: EXAMINE is read-only, and SEARCH,
/// STORE, CHECK, EXPUNGE, UID EXPUNGE, CLOSE and UNSELECT reach the shared server, as a direct
/// session there confirms.
#[tokio::test]
async fn selected_state_commands_on_a_mount() {
    let s = setup().await;
    let mut c = s.client().await;
    let r = ok(&mut c, "EXAMINE Shared/Team").await;
    assert!(r.contains("[READ-ONLY]"), "{r}");
    assert_eq!(select_state(&r).0, 2, "{r}");
    // Dovecot ignores a STORE in a read-only mailbox (and says so with OK).
    let r = ok(&mut c, "STORE 1 +FLAGS (\\Deleted)").await;
    assert!(r.contains("read-only"), "{r}");
    ok(&mut c, "UNSELECT").await;
    let mut d = direct(&s.shared).await;
    ok(&mut d, "EXAMINE Public/Team").await;
    let r = ok(&mut d, "SEARCH DELETED").await;
    assert_eq!(untagged(&r), ["* SEARCH"], "{r}");
    logout(d).await;

    let r = ok(&mut c, "SELECT Shared/Team").await;
    assert!(r.contains("[READ-WRITE]"), "{r}");
    append(&mut c, "Shared/Team", "", &message("team 3", "third")).await;
    let r = ok(&mut c, "SEARCH ALL").await;
    assert!(untagged(&r).contains(&"* SEARCH 1 2 3".to_owned()), "{r}");
    let r = ok(&mut c, "SEARCH SUBJECT \"team 2\"").await;
    assert_eq!(untagged(&r), ["* SEARCH 2"], "{r}");
    ok(&mut c, "STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    ok(&mut c, "CHECK").await;
    let r = ok(&mut c, "EXPUNGE").await;
    assert_eq!(untagged(&r), ["* 1 EXPUNGE"], "{r}");
    assert_eq!(direct_messages(&s.shared, "Public/Team").await, 2);
    ok(&mut c, "UID STORE 3 +FLAGS.SILENT (\\Deleted)").await;
    // The message appended in this session was its only \Recent one.
    let r = ok(&mut c, "UID EXPUNGE 3").await;
    assert_eq!(untagged(&r), ["* 2 EXPUNGE", "* 0 RECENT"], "{r}");
    ok(&mut c, "STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    // CLOSE expunges silently.
    let r = ok(&mut c, "CLOSE").await;
    assert_eq!(untagged(&r), Vec::<String>::new(), "{r}");
    assert_eq!(direct_messages(&s.shared, "Public/Team").await, 0);
    // Nothing is selected any more: the home server says so.
    let r = c.cmd("FETCH 1 (FLAGS)").await;
    assert_tagged(&r, "BAD", None, "FETCH with nothing selected");
    drop(c);
    s.finish().await;
}
