//! The pre-scanner (`proto::prescan::prescan`): tag and command name read off the head of a
//! client command line, case-insensitively, without parsing the rest.
//!
//! The single-backend relay runs it on the first line of every client command to decide
//! whether to intercept it (RLIST, NAMESPACE, COMPRESS, LOGOUT, ...) and to count it by name,
//! so it is paid once per command on the hot path.
//!
//! Cases (Throughput::Elements = command lines, so criterion reports lines per second):
//! - `mix`: a session-like mix (UID FETCH/STORE, SELECT, IDLE/DONE, NOOP, LIST, APPEND,
//!   STATUS, an X-command, lower case), one line per element.
//! - `fetch`: `UID FETCH` alone (the most common command of a syncing client).
//! - `other`: an unknown X-command, the worst case of the name lookup (no name matches).

mod common;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use imap_gateway::proto::prescan::{CommandName, prescan};

const MIX: &[&[u8]] = &[
    b"A0001 UID FETCH 1:* (UID FLAGS MODSEQ) (CHANGEDSINCE 123456)\r\n",
    b"A0002 SELECT \"INBOX\" (CONDSTORE)\r\n",
    b"A0003 UID FETCH 4711 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])\r\n",
    b"A0004 IDLE\r\n",
    b"DONE\r\n",
    b"A0005 NOOP\r\n",
    b"A0006 UID STORE 4711 +FLAGS.SILENT (\\Seen)\r\n",
    b"A0007 LIST \"\" \"*\"\r\n",
    b"a0008 status \"Sent Items\" (MESSAGES UIDNEXT UNSEEN)\r\n",
    b"A0009 APPEND \"Sent Items\" (\\Seen) {2048+}\r\n",
    b"A0010 XAPPLEPUSHSERVICE aps-version 2 aps-account-id 1234\r\n",
    b"A0011 UID SEARCH SINCE 1-Mar-2026\r\n",
    b"A0012 EXAMINE Archive/2025\r\n",
    b"A0013 GETQUOTAROOT INBOX\r\n",
    b"A0014 UID MOVE 1:5 Trash\r\n",
    b"A0015 LOGOUT\r\n",
];

/// Scans every line; returns a value depending on every result so nothing is skipped.
fn scan_all(lines: &[&[u8]]) -> usize {
    lines
        .iter()
        .map(|l| match prescan(l) {
            Some(p) => p.name as usize + p.tag.len() + p.name_range.end,
            None => 1000,
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("prescan");
    // The results the relay would see: checked once, so the benchmark scans what it should.
    let names: Vec<_> = MIX.iter().map(|l| prescan(l).map(|p| p.name)).collect();
    assert_eq!(names[0], Some(CommandName::Uid));
    assert_eq!(names[4], None);
    assert_eq!(names[8], Some(CommandName::Status));
    assert_eq!(names[10], Some(CommandName::Other));
    assert_eq!(names[13], Some(CommandName::GetQuotaRoot));

    g.throughput(Throughput::Elements(MIX.len() as u64));
    g.bench_function("mix", |b| b.iter(|| scan_all(black_box(MIX))));

    let fetch: &[&[u8]] = &[MIX[0]];
    g.throughput(Throughput::Elements(1));
    g.bench_function("fetch", |b| b.iter(|| scan_all(black_box(fetch))));

    let other: &[&[u8]] = &[MIX[10]];
    g.bench_function("other", |b| b.iter(|| scan_all(black_box(other))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench
}
criterion_main!(benches);
