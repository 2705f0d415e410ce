//! Slowloris against the gateway in front of real Dovecot: thousands of connections that
//! each dribble a byte every 100 to 500 ms and never finish a command line do not keep a
//! normal client from connecting and logging in within a second, and each of them is cut by
//! the pre-auth timeout (and counted) rather than held for as long as it keeps sending.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::dovecot::{Dovecot, DovecotOptions};
use common::gateway;
use common::imap::Client;
use common::wait::until;
use imap_gateway::metrics::Limit;
use tokio::sync::mpsc;

/// Slow connections: each costs this process one descriptor and the gateway (in this same
/// process) another, well within the 20,000 of the test machines.
const SLOW: usize = 3000;
/// Tasks driving them: a few, as an attacker's would be, not one per connection.
const DRIVERS: usize = 4;
const TICK: Duration = Duration::from_millis(100);
/// Long enough that all of them are open at once (opening them takes under a second, a few
/// on a loaded machine), short enough for a test.
const PREAUTH: Duration = Duration::from_secs(4);
const LOGIN_BUDGET: Duration = Duration::from_secs(1);

/// Raises the soft limit on open files to the hard limit.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a struct owned here.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}

/// Opens `n` connections (blocking connects on loopback, off the runtime's workers), each with
/// the time it was connected; and the longest a connect took.
async fn open(addr: SocketAddr, n: usize) -> (Vec<(std::net::TcpStream, Instant)>, Duration) {
    tokio::task::spawn_blocking(move || {
        let mut slowest = Duration::ZERO;
        let conns = (0..n)
            .map(|_| {
                let started = Instant::now();
                let s = std::net::TcpStream::connect(addr).expect("slow connection");
                slowest = slowest.max(started.elapsed());
                s.set_nonblocking(true).unwrap();
                (s, Instant::now())
            })
            .collect();
        (conns, slowest)
    })
    .await
    .unwrap()
}

/// Sends each connection it is given a byte every 1 to 5 ticks (by its number), reads and
/// drops whatever comes back, and notes when the gateway closed it. Connections arrive in
/// batches while it runs; it ends when all are closed, or at `until`. Returns how long each
/// one lived, from its connect.
async fn dribble(
    mut batches: mpsc::UnboundedReceiver<Vec<(usize, std::net::TcpStream, Instant)>>,
    until: Instant,
) -> Vec<Duration> {
    let mut conns = Vec::new();
    let mut lived = Vec::new();
    let mut sink = [0u8; 512];
    let mut more = true;
    let mut tick = 0usize;
    while Instant::now() < until && (more || !conns.is_empty()) {
        loop {
            match batches.try_recv() {
                Ok(batch) => conns.extend(batch),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    more = false;
                    break;
                }
            }
        }
        conns.retain_mut(|(i, s, opened)| {
            // Each connection is looked at only on its own ticks: the test's CPU goes to the
            // gateway, which shares this process and a loaded machine.
            if !tick.is_multiple_of(1 + *i % 5) {
                return true;
            }
            let closed = loop {
                match s.read(&mut sink) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            let closed =
                closed || matches!(s.write(b"a"), Err(e) if e.kind() != ErrorKind::WouldBlock);
            if closed {
                lived.push(opened.elapsed());
            }
            !closed
        });
        tick += 1;
        tokio::time::sleep(TICK).await;
    }
    lived.extend(conns.iter().map(|_| Duration::MAX));
    lived
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_do_not_keep_a_client_out_and_are_cut_at_the_preauth_deadline() {
    let limit = raise_nofile();
    assert!(limit >= (2 * SLOW + 500) as u64, "open files limit {limit}");
    let dovecot = Dovecot::start(DovecotOptions::default());
    let gw = gateway::start_with(&gateway::single_backend(dovecot.addr()), |c, _| {
        c.timeouts.preauth = PREAUTH;
        c.limits.max_connections = 2 * SLOW;
        // All from 127.0.0.1: the per-address limit would refuse most of them at once; this
        // test is about the ones a gateway does hold.
        c.limits.max_connections_per_ip = 0;
    })
    .await;

    let accepted = || {
        gw.shared
            .metrics
            .connections_accepted
            .with_label_values(&["plain"])
            .get() as usize
    };
    let stop_at = Instant::now() + Duration::from_secs(60);
    let mut senders = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..DRIVERS {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        drivers.push(tokio::spawn(dribble(rx, stop_at)));
    }
    // All at once, from several threads, as fast as the kernel takes them.
    let t0 = Instant::now();
    let mut opening = Vec::new();
    for _ in 0..DRIVERS {
        opening.push(tokio::spawn(open(gw.addr, SLOW / DRIVERS)));
    }
    let mut slowest = Duration::ZERO;
    for (d, o) in opening.into_iter().enumerate() {
        let (conns, slow) = o.await.unwrap();
        slowest = slowest.max(slow);
        for (j, (s, connected)) in conns.into_iter().enumerate() {
            senders[d]
                .send(vec![(d * SLOW / DRIVERS + j, s, connected)])
                .unwrap();
        }
    }
    // A SYN dropped because the listen queue overflowed is retried after a second: none
    // was, the backlog holds a burst this size however far the accept loop is behind.
    assert!(
        slowest < Duration::from_secs(1),
        "a connect took {slowest:?}"
    );
    until("every connection accepted", || accepted() >= SLOW).await;
    drop(senders);
    let opening = t0.elapsed();
    // All of them, unless opening took longer than the deadline on a loaded machine; then
    // the first are cut already, and thousands are still held.
    let held = gw.shared.connections.open();
    eprintln!("{SLOW} slow connections opened in {opening:?}; {held} held");
    assert!(held >= SLOW / 2, "{held} of {SLOW} held after {opening:?}");
    if opening < PREAUTH - Duration::from_secs(1) {
        assert_eq!(held, SLOW, "all held at once");
    }

    // While all of them are held and dribbling: a normal client, from another address.
    for _ in 0..3 {
        let started = Instant::now();
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = tcp.connect(gw.addr).await.unwrap();
        let mut client = Client::from_io(Box::new(tcp));
        client.login("alice", "alicepw").await;
        let took = started.elapsed();
        assert!(
            took < LOGIN_BUDGET,
            "login took {took:?} with {} connections open",
            gw.shared.connections.open()
        );
        drop(client);
    }

    let mut lived = Vec::new();
    for d in drivers {
        lived.extend(d.await.unwrap());
    }
    assert_eq!(lived.len(), SLOW);
    let still_open = lived.iter().filter(|l| **l == Duration::MAX).count();
    assert_eq!(still_open, 0, "slow connections never cut");
    // Each is cut at its deadline (from its accept), not when it stops sending; the slack is
    // the drivers' tick and a loaded machine.
    let longest = lived.iter().max().unwrap();
    let shortest = lived.iter().min().unwrap();
    assert!(*longest < PREAUTH + Duration::from_secs(3), "{longest:?}");
    assert!(*shortest >= PREAUTH, "{shortest:?}");
    assert_eq!(
        gw.shared.metrics.limits.get(Limit::PreauthTimeout),
        SLOW as u64
    );
    until("every place given back", || {
        gw.shared.connections.open() == 0
    })
    .await;
    gw.stop().await;
}
