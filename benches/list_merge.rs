//! LIST across the home backend and two mounts in a murder session, through the public entry
//! point `relay::murder::run`: the client's `LIST "" *` (or `%`) is fanned out to the three
//! backends, their answers are translated to the client's names, merged into one sorted tree
//! (mount points, `\HasChildren` fix-ups) and written back.
//!
//! Why it matters: mail clients LIST the whole tree at every start and often on every sync,
//! and the merge runs per entry (parse, name translation, pattern match; one sort at the end), so
//! it is the costliest thing a murder session does without moving message data.
//!
//! The merge is not a function of its own (it is interleaved with reading the backends'
//! answers inside `Murder::list`), so this drives a real session: the backends are minimal
//! scripted IMAP servers on loopback that answer LIST from a fixed tree (home: INBOX + 200
//! mailboxes; mount `Shared` -> 101 mailboxes under `Public`; mount `Archive` -> 100
//! mailboxes), and the client is a socket that reads to the tagged OK. Everything runs on one
//! current-thread runtime, so the time per iteration is the CPU of the gateway (framing,
//! parsing, merging, writing) plus that of the scripted backends and of loopback TCP.
//! `inbox` (`LIST "" INBOX`, one backend, one entry) is that fixed cost, to subtract.
//!
//! Cases (Throughput::Elements = merged entries the client receives):
//! - `star`: `LIST "" *`, ~403 entries from three servers.
//! - `percent`: `LIST "" %`, ~23 entries: home asked `%`, but each mount is asked for its
//!   whole subtree, so ~200 mount entries are translated and filtered out.
//! - `inbox`: `LIST "" INBOX`, the baseline.
//!
//! `pattern/*`: `proto::pattern::matches` alone over 403 names (`*`, `%`, `Shared/Team 1*`),
//! the test the merge runs on every mount entry and mount point.

mod common;
#[path = "../tests/support/murder_session.rs"]
mod murder_session;

use std::collections::HashMap;
use std::net::SocketAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use imap_gateway::proto::args::{self, LiteralForm};
use imap_gateway::proto::pattern;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The mailbox tree of one scripted backend (delimiter `/`).
fn tree(top: &[&str], children: usize) -> Vec<String> {
    let mut names = vec!["INBOX".to_owned()];
    for t in top {
        names.push((*t).to_owned());
        names.extend((0..children).map(|j| format!("{t}/Sub folder {j}")));
    }
    names
}

/// Answers of a scripted backend: `LIST "" ""` with the delimiter, any other LIST from its
/// tree (cached per pattern, so the backend costs little), anything else `OK`.
async fn serve_backend(sock: TcpStream, names: std::sync::Arc<Vec<String>>) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    let mut cache: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let Some((tag, word, off)) = args::head(&line) else {
            return;
        };
        let tag = tag.to_vec();
        let mut out = Vec::new();
        if word.eq_ignore_ascii_case(b"LIST") {
            let items = args::parse(&line, off).expect("LIST arguments");
            let pat = items[1].value.as_bytes().expect("pattern").to_vec();
            let answer = cache.entry(pat).or_insert_with_key(|pat| {
                let mut a = Vec::new();
                if pat.is_empty() {
                    a.extend_from_slice(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
                }
                for n in names.iter() {
                    if !pat.is_empty() && pattern::matches(pat, n.as_bytes(), Some(b'/')) {
                        let kids = names.iter().any(|c| {
                            c.len() > n.len()
                                && c.starts_with(n.as_str())
                                && c.as_bytes()[n.len()] == b'/'
                        });
                        a.extend_from_slice(if kids {
                            b"* LIST (\\HasChildren) \"/\" "
                        } else {
                            b"* LIST (\\HasNoChildren) \"/\" "
                        });
                        args::push_string(&mut a, n.as_bytes(), LiteralForm::Server);
                        a.extend_from_slice(b"\r\n");
                    }
                }
                a
            });
            out.extend_from_slice(answer);
        }
        let bye = word.eq_ignore_ascii_case(b"LOGOUT");
        if bye {
            out.extend_from_slice(b"* BYE logging out\r\n");
        }
        out.extend_from_slice(&tag);
        out.extend_from_slice(b" OK done\r\n");
        if w.write_all(&out).await.is_err() || bye {
            return;
        }
    }
}

async fn start_backend(names: Vec<String>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let names = std::sync::Arc::new(names);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve_backend(sock, std::sync::Arc::clone(&names)));
        }
    });
    addr
}

/// A client connected to a murder session over three scripted backends.
struct Session {
    client: TcpStream,
    next: u32,
    buf: Vec<u8>,
}

impl Session {
    async fn start() -> Session {
        let top_home: Vec<String> = (0..20).map(|i| format!("Folder {i:02}")).collect();
        let top_home: Vec<&str> = top_home.iter().map(String::as_str).collect();
        let home = start_backend(tree(&top_home, 9)).await;
        let mut public = vec!["INBOX".to_owned(), "Public".to_owned()];
        for t in 0..10 {
            public.push(format!("Public/Team {t}"));
            public.extend((0..9).map(|j| format!("Public/Team {t}/Project {j}")));
        }
        let shared = start_backend(public).await;
        let years: Vec<String> = (2016..2026).map(|y| y.to_string()).collect();
        let years: Vec<&str> = years.iter().map(String::as_str).collect();
        let archive = start_backend(tree(&years, 9)).await;

        let text = format!(
            "default_pool = [\"home\"]\n\
             [[backends]]\nname = \"home\"\naddress = \"{home}\"\n\
             [[backends]]\nname = \"shared\"\naddress = \"{shared}\"\n\
             [[backends]]\nname = \"archive\"\naddress = \"{archive}\"\n\
             [[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"shared\"\npath = \"Public\"\n\
             [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n"
        );
        let client = murder_session::start(&text, "bench@example.org").await;
        Session {
            client,
            next: 0,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Sends `LIST "" <pattern>` and reads the whole answer; returns the number of entries.
    async fn list(&mut self, pattern: &str) -> usize {
        self.next += 1;
        let tag = format!("b{}", self.next);
        self.client
            .write_all(format!("{tag} LIST \"\" \"{pattern}\"\r\n").as_bytes())
            .await
            .unwrap();
        self.buf.clear();
        let done = format!("{tag} OK");
        loop {
            let mut chunk = [0u8; 16 * 1024];
            let n = self.client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "gateway closed");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(body) = self.buf.strip_suffix(b"\r\n") {
                let last = memchr::memrchr(b'\n', body).map_or(0, |p| p + 1);
                if body[last..].starts_with(tag.as_bytes()) {
                    assert!(body[last..].starts_with(done.as_bytes()), "LIST failed");
                    break;
                }
            }
        }
        memchr::memmem::find_iter(&self.buf, b"* LIST ").count()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut s = rt.block_on(Session::start());
    // INBOX + 200 home + Shared and its 100 + Archive and its 100.
    let star = rt.block_on(s.list("*"));
    assert_eq!(star, 1 + 200 + 101 + 101, "LIST * entries");
    // INBOX + 20 home folders + the two mount points.
    let percent = rt.block_on(s.list("%"));
    assert_eq!(percent, 1 + 20 + 2, "LIST % entries");
    assert_eq!(rt.block_on(s.list("INBOX")), 1);

    let mut g = c.benchmark_group("list_merge");
    for (name, pat, n) in [
        ("star", "*", star),
        ("percent", "%", percent),
        ("inbox", "INBOX", 1),
    ] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(name, |b| b.iter(|| rt.block_on(s.list(pat))));
    }
    g.finish();

    // The pattern test the merge runs on every translated mount entry, alone: 403 names.
    let names: Vec<String> = tree(&["Folder 00", "Folder 01"], 100)
        .into_iter()
        .chain((0..200).map(|i| format!("Shared/Team {}/Project {}", i / 10, i % 10)))
        .collect();
    let mut g = c.benchmark_group("pattern");
    g.throughput(Throughput::Elements(names.len() as u64));
    for (name, pat) in [
        ("star", "*"),
        ("percent", "%"),
        ("prefix", "Shared/Team 1*"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                names
                    .iter()
                    .filter(|n| pattern::matches(pat.as_bytes(), n.as_bytes(), Some(b'/')))
                    .count()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench
}
criterion_main!(benches);
