//! Literals stream through the gateway: a 50 MB APPEND and a 50 MB FETCH pass with the
//! gateway process's peak memory growing by far less than the message. The gateway runs as
//! its own process here so its memory can be read from /proc.

mod common;

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway;
use common::imap::{Client, tagged_ok};
use common::process::GatewayProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Logging the process's output would only fill the log file.
const QUIET: &str = "[log]\nlevel = \"warn\"";
const MESSAGE_SIZE: usize = 50 * 1024 * 1024;
/// Allowed growth of the gateway's peak RSS while relaying the message both ways: a tenth
/// of the message, far above the relay's fixed buffers, far below a buffered literal.
const MAX_GROWTH_KB: u64 = (MESSAGE_SIZE / 10 / 1024) as u64;

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A deterministic message body: headers, then lines of pseudo-random text.
fn message() -> Vec<u8> {
    let mut m = b"From: big@example.org\r\nSubject: big\r\n\r\n".to_vec();
    let mut x: u32 = 12345;
    while m.len() < MESSAGE_SIZE - 80 {
        for _ in 0..76 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            m.push(b'a' + ((x >> 16) % 26) as u8);
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// APPENDs `msg` with a synchronizing literal (the backend's `+` must come through).
async fn append(c: Client, tag: &str, mailbox: &str, msg: &[u8]) -> Client {
    let mut c = c;
    c.write(format!("{tag} APPEND {mailbox} {{{}}}\r\n", msg.len()).as_bytes())
        .await;
    let cont = c.read_response().await;
    assert!(cont.starts_with(b"+"), "{}", String::from_utf8_lossy(&cont));
    let mut io = c.into_inner();
    for chunk in msg.chunks(256 * 1024) {
        io.write_all(chunk).await.unwrap();
    }
    io.write_all(b"\r\n").await.unwrap();
    let mut c = Client::from_io(io);
    let r = c.until_tagged(tag).await;
    assert!(tagged_ok(&r), "{r}");
    c
}

/// FETCHes message 1's body and compares it with `msg` byte for byte; returns the head line.
async fn fetch_and_compare(c: Client, tag: &str, msg: &[u8]) -> (Client, String) {
    let mut c = c;
    c.write(format!("{tag} FETCH 1 BODY.PEEK[]\r\n").as_bytes())
        .await;
    let mut io = c.into_inner();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        io.read_exact(&mut b).await.unwrap();
        line.push(b[0]);
    }
    let mut body = vec![0u8; msg.len()];
    io.read_exact(&mut body).await.unwrap();
    assert!(body == msg, "fetched body differs from appended body");
    let mut c = Client::from_io(io);
    let r = c.until_tagged(tag).await;
    assert!(tagged_ok(&r), "{r}");
    (c, String::from_utf8(line).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_both_ways_in_bounded_memory() {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = GatewayProcess::start(&gateway::single_backend(dovecot.addr()), QUIET).await;
    let (addr, pid) = (gw.addr, gw.pid());

    // Warm up: one full session so the baseline includes the runtime and TLS-free paths.
    let mut c = Client::connect(addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("NOOP").await));
    let baseline = status_kb(pid, "VmRSS:");

    let msg = message();
    let c = append(c, "a1", "INBOX", &msg).await;
    let mut c = c;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    let (c, head) = fetch_and_compare(c, "a2", &msg).await;
    assert_eq!(head, format!("* 1 FETCH (BODY[] {{{}}}\r\n", msg.len()));

    let peak = status_kb(pid, "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    println!(
        "gateway RSS baseline {baseline} kB, peak {peak} kB, growth {growth} kB for a {} kB message",
        MESSAGE_SIZE / 1024
    );
    assert!(
        growth < MAX_GROWTH_KB,
        "gateway peak RSS grew by {growth} kB relaying a {} kB literal",
        MESSAGE_SIZE / 1024
    );
    drop(c);
}

/// With mounts the gateway reads commands itself, but message data still streams: a 50 MB
/// APPEND into a mounted mailbox, its FETCH, and a COPY of it to the home backend (FETCH from
/// one server streamed into an APPEND on the other) keep the gateway's memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_through_a_mount_and_across_servers_in_bounded_memory() {
    let home = Dovecot::start(DovecotOptions::default());
    let archive = Dovecot::start(DovecotOptions {
        separator: '.',
        ..DovecotOptions::default()
    });
    let routing = format!(
        "{}{}[[routes]]\nuser = \"alice\"\nbackend = \"home\"\n\
         [[mounts]]\nusers = \"*\"\nprefix = \"Archive\"\nbackend = \"archive\"\n",
        gateway::backend_toml("home", home.addr(), ""),
        gateway::backend_toml("archive", archive.addr(), ""),
    );
    let gw = GatewayProcess::start(&routing, QUIET).await;
    let (addr, pid) = (gw.addr, gw.pid());

    let mut c = Client::connect(addr).await;
    c.login("alice", "alicepw").await;
    assert!(tagged_ok(&c.cmd("CREATE Archive/Big").await));
    assert!(tagged_ok(&c.cmd("LIST \"\" *").await));
    let baseline = status_kb(pid, "VmRSS:");

    let msg = message();
    let c = append(c, "a1", "Archive/Big", &msg).await;
    let mut c = c;
    let r = c.cmd("SELECT Archive/Big").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    let (mut c, head) = fetch_and_compare(c, "a2", &msg).await;
    assert_eq!(head, format!("* 1 FETCH (BODY[] {{{}}}\r\n", msg.len()));
    let r = c.cmd("COPY 1 INBOX").await;
    assert!(tagged_ok(&r), "{r}");
    assert!(r.contains("[COPYUID "), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    let (c, _) = fetch_and_compare(c, "a3", &msg).await;

    let peak = status_kb(pid, "VmHWM:");
    let growth = peak.saturating_sub(baseline);
    println!(
        "gateway RSS baseline {baseline} kB, peak {peak} kB, growth {growth} kB for a {} kB \
         message appended to a mount, fetched, and copied to another server",
        MESSAGE_SIZE / 1024
    );
    assert!(
        growth < MAX_GROWTH_KB,
        "gateway peak RSS grew by {growth} kB for a {} kB message",
        MESSAGE_SIZE / 1024
    );
    drop(c);
}
