//! The LIST merge of a session with mounts allocates nothing per mailbox entry: a counting
//! global allocator watches the same commands merge a small tree and a tree a thousand times
//! bigger, and the difference must stay at the few reallocations of buffers that double.
//!
//! The backends are scripted loopback servers (as in benches/list_merge.rs): Dovecot is
//! another process, so it would count nothing here either, and a scripted answer is built
//! once, before counting, so the backends themselves allocate nothing per entry. Everything
//! runs on one current-thread runtime; the counter sees the gateway, the scripted backends
//! and the test's client, which allocate per command, never per entry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imap_gateway::proto::args::{self, LiteralForm};
use imap_gateway::proto::pattern;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/murder_session.rs"]
mod murder_session;
use counting_alloc::{ALLOCATIONS, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One mailbox of a scripted backend, in its own names.
struct Mailbox {
    name: String,
    children: bool,
    subscribed: bool,
}

/// A backend's tree: INBOX, `tops` top-level mailboxes under `root` (if any), each with
/// nine children; one child in three has a non-ASCII name, which travels as a literal.
fn tree(root: Option<&str>, top: &str, tops: usize, delim: char) -> Vec<Mailbox> {
    let mut out = vec![Mailbox {
        name: "INBOX".into(),
        children: false,
        subscribed: true,
    }];
    let base = match root {
        Some(r) => {
            out.push(Mailbox {
                name: r.into(),
                children: true,
                subscribed: false,
            });
            format!("{r}{delim}")
        }
        None => String::new(),
    };
    for i in 0..tops {
        let t = format!("{base}{top} {i}");
        for j in 0..9 {
            let child = if j % 3 == 0 { "Entwürfe" } else { "Sub" };
            out.push(Mailbox {
                name: format!("{t}{delim}{child} {j}"),
                children: false,
                subscribed: j % 2 == 0,
            });
        }
        out.push(Mailbox {
            name: t,
            children: true,
            subscribed: false,
        });
    }
    out
}

/// How many entries the scripted backends have sent, all together.
static ENTRIES_SENT: AtomicU64 = AtomicU64::new(0);

/// Answers `LIST "" ""` with the delimiter, LIST and LSUB from the tree (built once per
/// command and pattern, then written from the cache), anything else `OK`.
async fn serve_backend(sock: TcpStream, names: Arc<Vec<Mailbox>>, delim: u8) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    let mut cache: HashMap<Vec<u8>, (Vec<u8>, u64)> = HashMap::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let Some((tag, word, off)) = args::head(&line) else {
            return;
        };
        let lsub = word.eq_ignore_ascii_case(b"LSUB");
        if lsub || word.eq_ignore_ascii_case(b"LIST") {
            let items = args::parse(&line, off).expect("LIST arguments");
            let pat = items[1].value.as_bytes().expect("pattern");
            let mut key = word.to_ascii_uppercase();
            key.push(b' ');
            key.extend_from_slice(pat);
            let (answer, n) = cache.entry(key).or_insert_with(|| {
                let mut a = Vec::new();
                let mut n = 0;
                if pat.is_empty() {
                    a.extend_from_slice(b"* LIST (\\Noselect) ");
                    args::push_string(&mut a, &[delim], LiteralForm::Server);
                    a.extend_from_slice(b" \"\"\r\n");
                }
                for m in names.iter() {
                    if pat.is_empty()
                        || !pattern::matches(pat, m.name.as_bytes(), Some(delim))
                        || lsub && !m.subscribed
                    {
                        continue;
                    }
                    a.extend_from_slice(match (lsub, m.children) {
                        (true, _) => b"* LSUB () " as &[u8],
                        (false, true) => b"* LIST (\\HasChildren) ",
                        (false, false) => b"* LIST (\\HasNoChildren) ",
                    });
                    args::push_string(&mut a, &[delim], LiteralForm::Server);
                    a.push(b' ');
                    args::push_string(&mut a, m.name.as_bytes(), LiteralForm::Server);
                    a.extend_from_slice(b"\r\n");
                    n += 1;
                }
                (a, n)
            });
            if w.write_all(answer).await.is_err() {
                return;
            }
            ENTRIES_SENT.fetch_add(*n, Ordering::Relaxed);
        }
        let bye = word.eq_ignore_ascii_case(b"LOGOUT");
        if bye && w.write_all(b"* BYE logging out\r\n").await.is_err() {
            return;
        }
        if w.write_all(tag).await.is_err() || w.write_all(b" OK done\r\n").await.is_err() || bye {
            return;
        }
    }
}

async fn start_backend(names: Vec<Mailbox>, delim: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let names = Arc::new(names);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve_backend(sock, Arc::clone(&names), delim));
        }
    });
    addr
}

/// A client of a murder session over three scripted backends of `10 * tops` mailboxes each
/// (home `/`, `Shared` -> a `.` server under `Public`, `Archive` -> a `/` server's whole
/// tree) and a referral mount `Remote/Sales`.
struct Session {
    client: TcpStream,
    next: u32,
    buf: Vec<u8>,
}

impl Session {
    async fn start(tops: usize) -> Session {
        // Home also has a mailbox above the referral mount and one hidden by a mount.
        let mut home_tree = tree(None, "Folder", tops, '/');
        for name in ["Remote", "Shared/Hidden"] {
            home_tree.push(Mailbox {
                name: name.into(),
                children: false,
                subscribed: true,
            });
        }
        let home = start_backend(home_tree, b'/').await;
        let shared = start_backend(tree(Some("Public"), "Team", tops, '.'), b'.').await;
        let archive = start_backend(tree(None, "Year", tops, '/'), b'/').await;
        let text = format!(
            "default_pool = [\"home\"]\n\
             [[backends]]\nname = \"home\"\naddress = \"{home}\"\n\
             [[backends]]\nname = \"shared\"\naddress = \"{shared}\"\n\
             [[backends]]\nname = \"archive\"\naddress = \"{archive}\"\n\
             [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"shared\"\npath = \"Public\"\n\
             [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n\
             [[mounts]]\nusers = \"*\"\nprefix = \"Remote/Sales\"\nreferral = \"imap://remote/Sales\"\n"
        );
        let client = murder_session::start(&text, "user@example.org").await;
        Session {
            client,
            next: 0,
            // Big enough for the biggest answer, so the client does not reallocate.
            buf: Vec::with_capacity(32 << 20),
        }
    }

    /// Sends `command` and reads the whole answer, which must end in OK; returns it.
    async fn run(&mut self, command: &str) -> &[u8] {
        self.next += 1;
        let line = format!("c{} {command}\r\n", self.next);
        self.client.write_all(line.as_bytes()).await.unwrap();
        let done = format!("c{} ", self.next);
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = self.client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "gateway closed");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(body) = self.buf.strip_suffix(b"\r\n") {
                let last = memchr::memrchr(b'\n', body).map_or(0, |p| p + 1);
                if body[last..].starts_with(done.as_bytes()) {
                    let status = &body[last + done.len()..];
                    assert!(
                        status.starts_with(b"OK"),
                        "{command}: {}",
                        String::from_utf8_lossy(status)
                    );
                    return &self.buf;
                }
            }
        }
    }
}

/// What one command cost: allocations, entries the backends sent, entries the client got.
struct Cost {
    allocations: u64,
    sent: u64,
    received: u64,
}

async fn measure(s: &mut Session, command: &str) -> Cost {
    // The first run connects the mounts and fills the backends' caches.
    s.run(command).await;
    let sent_before = ENTRIES_SENT.load(Ordering::Relaxed);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let answer = s.run(command).await;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let received = memchr::memmem::find_iter(answer, b"\r\n* L").count() as u64 + 1;
    Cost {
        allocations,
        sent: ENTRIES_SENT.load(Ordering::Relaxed) - sent_before,
        received,
    }
}

/// Most allocations a big merge may make beyond a small one: the buffers that grow with the
/// answer double (a few dozen reallocations); one allocation per entry would be thousands.
const GROWTH: u64 = 200;

#[tokio::test(flavor = "current_thread")]
async fn no_allocation_per_merged_entry() {
    let mut small = Session::start(1).await;
    let mut big = Session::start(1000).await;
    let mut over = Vec::new();
    for command in [
        r#"LIST "" "*""#,
        r#"LIST "" "%""#,
        r#"LIST "" "Shared/*""#,
        r#"RLIST "" "*""#,
        r#"LSUB "" "*""#,
        r#"LSUB "" "%""#,
    ] {
        let a = measure(&mut small, command).await;
        let b = measure(&mut big, command).await;
        let extra = b.allocations.saturating_sub(a.allocations);
        let per_entry = extra as f64 / (b.sent - a.sent).max(1) as f64;
        println!(
            "{command}: {} allocations for {} entries in, {} out; {} for {} in, {} out: \
             {per_entry:.2} per entry",
            a.allocations, a.sent, a.received, b.allocations, b.sent, b.received
        );
        assert!(
            b.sent >= a.sent + 9_000,
            "{command}: the big tree is not big"
        );
        if extra > GROWTH {
            over.push(format!(
                "{command}: {extra} more allocations for {} more entries",
                b.sent - a.sent
            ));
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}
