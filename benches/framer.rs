//! The streaming framer (`proto::framer::Framer`) over the streams the relay frames, fed the
//! way the relay feeds it: 16 KiB reads, `next()` called until each read is used up.
//!
//! Every relayed byte of a logged-in session goes through the framer (both directions), so
//! its throughput bounds the gateway's: line-heavy streams (FETCH FLAGS/ENVELOPE answers)
//! cost one `memchr` per line plus the literal-announcement check at each line end; literal
//! data (message bodies, APPEND) should cost next to nothing per byte.
//!
//! Cases (Throughput::Bytes, so criterion reports bytes per second):
//! - `fetch_envelopes`: ~1 MiB of small untagged FETCH responses (FLAGS, RFC822.SIZE, ENVELOPE).
//! - `fetch_headers`: ~1 MiB of FETCH responses each carrying a BODY[HEADER] literal of ~700 B.
//! - `body_2mib`: one FETCH with a 2 MiB BODY[] literal.
//! - `append_stream`: a client stream of APPENDs (4 KiB to 256 KiB non-sync literals) and NOOPs.

mod common;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use imap_gateway::proto::framer::{Framer, Piece};

/// The relay's read size.
const READ: usize = 16 * 1024;

/// What one pass over a stream saw: messages, literal bytes and the sum of head lengths (the
/// downstream relay looks at every message's head).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Seen {
    messages: usize,
    literal_bytes: u64,
    head_bytes: usize,
}

/// Frames `input` in `READ`-byte reads, as `relay::down` does.
fn frame(input: &[u8], max_line: usize, max_literal: u64) -> Seen {
    let mut framer = Framer::new(max_line, max_literal);
    let mut seen = Seen::default();
    for read in input.chunks(READ) {
        let mut pos = 0;
        while pos < read.len() {
            match framer.next(&read[pos..]).expect("frameable") {
                Piece::Line { len, complete, .. } => {
                    pos += len;
                    if complete && framer.at_message_start() {
                        seen.messages += 1;
                        seen.head_bytes += framer.head().len();
                    }
                }
                Piece::LiteralData { len, .. } => {
                    pos += len;
                    seen.literal_bytes += len as u64;
                }
            }
        }
    }
    seen
}

fn fetch_envelopes() -> (Vec<u8>, usize) {
    let mut s = Vec::new();
    let mut n = 0;
    while s.len() < 1 << 20 {
        n += 1;
        s.extend_from_slice(
            format!(
                "* {n} FETCH (UID {} FLAGS (\\Seen $NotJunk) RFC822.SIZE {} ENVELOPE \
                 (\"Tue, 3 Mar 2026 10:{:02}:00 +0100\" \"Re: quarterly numbers, draft {n}\" \
                 ((\"Alice Example\" NIL \"alice\" \"example.org\")) NIL NIL \
                 ((\"Bob\" NIL \"bob\" \"example.com\")) NIL NIL NIL \"<{n}@mail.example.org>\"))\r\n",
                n + 1000,
                3000 + n * 7,
                n % 60
            )
            .as_bytes(),
        );
    }
    (s, n)
}

fn fetch_headers() -> (Vec<u8>, usize, usize) {
    let header: Vec<u8> = (0..14)
        .flat_map(|i| format!("X-Header-{i:02}: some value of about forty bytes\r\n").into_bytes())
        .collect();
    let mut s = Vec::new();
    let mut n = 0;
    while s.len() < 1 << 20 {
        n += 1;
        s.extend_from_slice(
            format!(
                "* {n} FETCH (UID {} BODY[HEADER] {{{}}}\r\n",
                n + 1000,
                header.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(&header);
        s.extend_from_slice(b" FLAGS (\\Seen))\r\n");
    }
    (s, n, header.len())
}

fn body(size: usize) -> Vec<u8> {
    let mut s = format!("* 1 FETCH (UID 7 BODY[] {{{size}}}\r\n").into_bytes();
    // Message-like bytes: lines of text, so a careless framer would find many LFs in it.
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    s.extend(line.iter().copied().cycle().take(size));
    s.extend_from_slice(b")\r\n");
    s
}

fn append_stream() -> (Vec<u8>, usize) {
    let mut s = Vec::new();
    let mut n = 0;
    for (i, size) in [4 << 10, 16 << 10, 64 << 10, 256 << 10, 8 << 10, 32 << 10]
        .iter()
        .cycle()
        .take(24)
        .enumerate()
    {
        s.extend_from_slice(
            format!("a{i} APPEND INBOX (\\Seen) \"03-Mar-2026 10:00:00 +0100\" {{{size}+}}\r\n")
                .as_bytes(),
        );
        s.extend((0..*size).map(|k| b"abcdefghij\r\n"[k % 12]));
        s.extend_from_slice(b"\r\n");
        s.extend_from_slice(format!("n{i} NOOP\r\n").as_bytes());
        n += 2;
    }
    (s, n)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("framer");
    // Backend direction: the relay's limits for backend responses.
    let down = |s: &[u8]| frame(s, 16 << 20, u64::MAX);
    // Client direction: the default command line and literal limits.
    let up = |s: &[u8]| frame(s, 64 << 10, 1 << 30);

    let (env, n) = fetch_envelopes();
    assert_eq!(down(&env).messages, n);
    g.throughput(Throughput::Bytes(env.len() as u64));
    g.bench_function("fetch_envelopes", |b| b.iter(|| down(black_box(&env))));

    let (hdr, n, header_len) = fetch_headers();
    let seen = down(&hdr);
    assert_eq!(seen.messages, n);
    assert_eq!(seen.literal_bytes, (header_len * n) as u64);
    g.throughput(Throughput::Bytes(hdr.len() as u64));
    g.bench_function("fetch_headers", |b| b.iter(|| down(black_box(&hdr))));

    let big = body(2 << 20);
    let seen = down(&big);
    assert_eq!((seen.messages, seen.literal_bytes), (1, 2 << 20));
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("body_2mib", |b| b.iter(|| down(black_box(&big))));

    let (app, n) = append_stream();
    let seen = up(&app);
    assert_eq!(seen.messages, n);
    g.throughput(Throughput::Bytes(app.len() as u64));
    g.bench_function("append_stream", |b| b.iter(|| up(black_box(&app))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench
}
criterion_main!(benches);
