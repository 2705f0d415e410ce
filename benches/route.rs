//! Route lookup (`RoutingTable::lookup`) and the cost of parsing and validating a large
//! routing table (`RoutingTable::parse`, what every reload pays before the swap).
//!
//! Every session looks its user up once after authentication, so lookup is on the login path;
//! a reload (file change, SIGHUP, POST /admin/reload) parses the whole file again, on the
//! reload task, while sessions keep using the old table.
//!
//! The table is built from TOML text through the public parser, like a real config: 20
//! backends, 10,000 exact users, 100 domain rules, a default pool of 8 backends (rendezvous
//! hashing) and a mount for every user, so each lookup also clones the mount list.
//!
//! Cases: `lookup/exact`, `lookup/domain`, `lookup/pool` (Throughput::Elements = lookups);
//! `parse/10k_users` (one whole table per iteration).

mod common;

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use imap_gateway::route::RoutingTable;

const BACKENDS: usize = 20;
const USERS: usize = 10_000;
const DOMAINS: usize = 100;
const POOL: usize = 8;

fn table_text() -> String {
    let pool: Vec<String> = (0..POOL).map(|i| format!("\"b{i}\"")).collect();
    let mut t = format!("default_pool = [{}]\n\n", pool.join(", "));
    for i in 0..BACKENDS {
        t += &format!(
            "[[backends]]\nname = \"b{i}\"\naddress = \"imap{i}.backend.internal:143\"\n\n"
        );
    }
    for i in 0..USERS {
        t += &format!(
            "[[routes]]\nuser = \"user{i}@example.org\"\nbackend = \"b{}\"\n\n",
            i % BACKENDS
        );
    }
    for i in 0..DOMAINS {
        t += &format!(
            "[[routes]]\nuser = \"*@dept{i}.example.com\"\nbackend = \"b{}\"\n\n",
            i % BACKENDS
        );
    }
    t += "[[mounts]]\nusers = \"*\"\nprefix = \"Shared\"\nbackend = \"b19\"\npath = \"Public\"\n";
    t
}

/// Looks every name up once; the backend names' lengths keep the results alive.
fn lookup_all(table: &RoutingTable, users: &[String]) -> usize {
    users
        .iter()
        .map(|u| {
            let r = table.lookup(u).expect("routed");
            r.home.name.len() + r.mounts.len()
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let text = table_text();
    let table = RoutingTable::parse(&text, Path::new(".")).expect("valid table");

    // 1,000 names per case, spread over the table; mixed case as clients type them.
    let exact: Vec<String> = (0..1000)
        .map(|i| format!("User{}@Example.org", i * 10))
        .collect();
    let domain: Vec<String> = (0..1000)
        .map(|i| format!("someone{i}@dept{}.example.com", i % DOMAINS))
        .collect();
    let pool: Vec<String> = (0..1000)
        .map(|i| format!("person{i}@elsewhere.net"))
        .collect();
    assert_eq!(table.lookup(&exact[3]).unwrap().home.name, "b10");
    assert_eq!(table.lookup(&domain[7]).unwrap().home.name, "b7");
    let pool_homes: std::collections::HashSet<String> = pool
        .iter()
        .map(|u| table.lookup(u).unwrap().home.name.clone())
        .collect();
    assert_eq!(pool_homes.len(), POOL, "every pool member gets users");

    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("exact", |b| {
        b.iter(|| lookup_all(&table, black_box(&exact)))
    });
    g.bench_function("domain", |b| {
        b.iter(|| lookup_all(&table, black_box(&domain)))
    });
    g.bench_function("pool", |b| b.iter(|| lookup_all(&table, black_box(&pool))));
    g.finish();

    let mut g = c.benchmark_group("parse");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("10k_users", |b| {
        b.iter(|| {
            let t = RoutingTable::parse(black_box(&text), Path::new(".")).expect("valid");
            t.backends().len()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench
}
criterion_main!(benches);
