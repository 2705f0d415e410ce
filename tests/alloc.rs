//! The relay allocates nothing per relayed chunk nor per command: a counting global
//! allocator watches large literals, then thousands of command round trips (NOOP, UID
//! FETCH, IDLE and DONE), cross the relay after a warm-up.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use imap_gateway::metrics::Metrics;
use imap_gateway::relay::{self, RelayContext, RelayOptions};
use imap_gateway::shutdown::Stop;
use imap_gateway::stream::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{ALLOCATIONS, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    // As the gateway sets on both of its legs.
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

const CHUNK: usize = 64 * 1024;

/// Sends `header`, then `size` bytes of literal from a fixed buffer, then `trailer`.
async fn send(w: &mut TcpStream, header: &[u8], size: usize, trailer: &[u8], chunk: &[u8]) {
    w.write_all(header).await.unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        w.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    w.write_all(trailer).await.unwrap();
}

/// Reads exactly `total` bytes into a fixed buffer.
async fn drain(r: &mut TcpStream, total: usize, buf: &mut [u8]) {
    let mut left = total;
    while left > 0 {
        let n = r.read(buf).await.unwrap();
        assert!(n > 0, "early EOF");
        left -= n;
    }
}

/// The counter is process-wide: `cargo test` runs a binary's tests on parallel threads, so
/// the tests here take turns (nextest already gives each its own process).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A relay between a client socket and a backend socket, both plain TCP as in production,
/// with the options the gateway uses; returns the client end, the backend end, the metrics
/// and the relay's task.
async fn start_relay() -> (
    TcpStream,
    TcpStream,
    Metrics,
    tokio::task::JoinHandle<relay::RelayEnd>,
) {
    let (client, gw_client) = pair().await;
    let (gw_backend, backend) = pair().await;
    let opts = RelayOptions {
        max_command_line: 64 * 1024,
        max_literal: u64::MAX,
        max_backend_line: 1 << 20,
        backend_logout: Duration::from_secs(1),
        rewrite_referrals: true,
        splice: true,
        autologout: imap_gateway::config::MIN_AUTOLOGOUT,
        client_send: Duration::from_secs(60),
    };
    // Metrics and the stop signal are on the hot path too: counting must not allocate.
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let ctx = RelayContext {
        stop: Stop::never(),
        counters: metrics.relay.clone(),
    };
    let relay = tokio::spawn(async move {
        let mut client = Stream::Plain(gw_client);
        let mut backend = Stream::Plain(gw_backend);
        relay::run(
            &mut client,
            &mut Vec::new(),
            &mut backend,
            &mut Vec::new(),
            &opts,
            &ctx,
        )
        .await
    });
    (client, backend, metrics, relay)
}

#[tokio::test(flavor = "current_thread")]
async fn no_allocation_per_relayed_chunk() {
    let _turn = SERIAL.lock().await;
    let (mut client, mut backend, metrics, relay) = start_relay().await;
    let chunk = vec![b'x'; CHUNK];
    let mut sink = vec![0u8; CHUNK];
    let mut round = async |size: usize| {
        // Backend to client: a FETCH response with a large literal.
        let header = format!("* 1 FETCH (BODY[] {{{size}}}\r\n");
        let (_, _) = tokio::join!(
            send(&mut backend, header.as_bytes(), size, b")\r\n", &chunk),
            drain(&mut client, header.len() + size + 3, &mut sink)
        );
        // Client to backend: an APPEND with a large literal.
        let header = format!("a APPEND INBOX {{{size}+}}\r\n");
        let (_, _) = tokio::join!(
            send(&mut client, header.as_bytes(), size, b"\r\n", &chunk),
            drain(&mut backend, header.len() + size + 2, &mut sink)
        );
    };
    // Warm-up: lets the runtime and sockets settle their own lazily made structures.
    round(4 * 1024 * 1024).await;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let size = 64 * 1024 * 1024;
    round(size).await;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    // Two 64 MiB literals cross in 64 KiB chunks: at least 2048 chunk reads and writes.
    // A handful of allocations (format! of the headers here) is not per chunk.
    println!(
        "{allocations} allocations while relaying {} MiB",
        (2 * size) >> 20
    );
    assert!(
        allocations <= 16,
        "{allocations} allocations while relaying"
    );
    // Both legs are plain TCP, so most of those literals went by splice.
    let spliced = [0, 1].map(|i| metrics.relay.spliced[i].get());
    assert!(
        spliced.iter().all(|&n| n >= size as u64),
        "spliced {spliced:?}"
    );

    // Literals too small for splice go through the relay's buffers, read by read: 2000
    // of them, each in several reads, still without an allocation per read.
    let small = 60 * 1024;
    let fetch = format!("* 1 FETCH (BODY[] {{{small}}}\r\n");
    let append = format!("a APPEND INBOX {{{small}+}}\r\n");
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let spliced_before = spliced;
    for _ in 0..1000 {
        let (_, _) = tokio::join!(
            send(&mut backend, fetch.as_bytes(), small, b")\r\n", &chunk),
            drain(&mut client, fetch.len() + small + 3, &mut sink)
        );
        let (_, _) = tokio::join!(
            send(&mut client, append.as_bytes(), small, b"\r\n", &chunk),
            drain(&mut backend, append.len() + small + 2, &mut sink)
        );
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!("{allocations} allocations while relaying 2000 small literals");
    assert!(
        allocations <= 16,
        "{allocations} allocations while relaying"
    );
    let spliced = [0, 1].map(|i| metrics.relay.spliced[i].get());
    assert_eq!(
        spliced, spliced_before,
        "small literals must not be spliced"
    );
    drop(client);
    drop(backend);
    let _ = relay.await;
}

/// Reads from `r` until `want` has arrived whole (the relay may split or join writes).
async fn expect(r: &mut TcpStream, want: &[u8], buf: &mut [u8]) {
    let mut got = 0;
    while got < want.len() {
        let n = r.read(&mut buf[got..want.len()]).await.unwrap();
        assert!(n > 0, "early EOF");
        got += n;
    }
    assert_eq!(&buf[..want.len()], want);
}

/// One command round trip: the client's line reaches the backend unchanged, the backend's
/// answer reaches the client unchanged.
async fn round_trip(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    command: &[u8],
    answer: &[u8],
    buf: &mut [u8],
) {
    client.write_all(command).await.unwrap();
    expect(backend, command, buf).await;
    backend.write_all(answer).await.unwrap();
    expect(client, answer, buf).await;
}

#[tokio::test(flavor = "current_thread")]
async fn no_allocation_per_command() {
    let _turn = SERIAL.lock().await;
    let (mut client, mut backend, _metrics, relay) = start_relay().await;
    // Fixed buffers, written with `write!` within their capacity: the test itself must not
    // allocate per command either.
    let mut command = Vec::with_capacity(256);
    let mut answer = Vec::with_capacity(256);
    let mut buf = vec![0u8; 4096];
    let mut session = async |from: u32, to: u32| {
        for i in from..to {
            // Every tag is new, as a client's are: the relay tracks each one.
            command.clear();
            write!(command, "a{i} NOOP\r\n").unwrap();
            answer.clear();
            write!(answer, "* {i} EXISTS\r\na{i} OK NOOP completed.\r\n").unwrap();
            round_trip(&mut client, &mut backend, &command, &answer, &mut buf).await;

            command.clear();
            write!(command, "b{i} UID FETCH 1:* (FLAGS)\r\n").unwrap();
            answer.clear();
            write!(
                answer,
                "* 1 FETCH (UID {i} FLAGS (\\Seen \\Answered))\r\nb{i} OK Fetch completed.\r\n"
            )
            .unwrap();
            round_trip(&mut client, &mut backend, &command, &answer, &mut buf).await;

            command.clear();
            write!(command, "c{i} IDLE\r\n").unwrap();
            round_trip(
                &mut client,
                &mut backend,
                &command,
                b"+ idling\r\n",
                &mut buf,
            )
            .await;
            answer.clear();
            write!(answer, "c{i} OK Idle completed.\r\n").unwrap();
            round_trip(&mut client, &mut backend, b"DONE\r\n", &answer, &mut buf).await;
        }
    };
    // Warm-up: the relay's buffers and the tag queue reach their working size.
    session(0, 100).await;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let commands = 3000;
    session(100, 100 + commands).await;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "{allocations} allocations while relaying {} commands",
        3 * commands
    );
    assert!(
        allocations <= 16,
        "{allocations} allocations while relaying {} commands",
        3 * commands
    );
    drop(client);
    drop(backend);
    let _ = relay.await;
}
