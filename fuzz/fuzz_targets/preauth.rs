//! Fuzz target: the pre-auth dialogue (greeting, CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE
//! and everything a client may send instead) driven by an arbitrary client byte stream cut
//! at arbitrary points. It runs on a current-thread tokio runtime over an in-memory pipe, no
//! sockets; every login is answered as the session would answer it (refused, backend
//! unavailable, or accepted) without a backend. It must never panic and must always end: the
//! clock is paused, so a dialogue that stalls reaches its pre-auth deadline at once, and one
//! that outlives that by far is a hang.
//!
//! Input layout: byte 0 holds flags (bit 0: plaintext auth allowed; bit 1: tiny limits;
//! bits 2-3: how logins are answered; bit 4: a 16-byte pipe, so writes block), byte 1 the
//! number of cuts (up to 31), then two bytes per cut, then the client's bytes.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imap_gateway::config::Limits;
use imap_gateway::metrics::Metrics;
use imap_gateway::preauth::{ListenerCtx, Preauth};
use imap_gateway::shutdown::Stop;
use imap_gateway::stream::Stream;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway's default pre-auth timeout.
const PREAUTH: Duration = Duration::from_secs(60);
/// Virtual time after which a dialogue counts as hung: far past its deadline.
const HUNG: Duration = Duration::from_secs(3600);

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// Without and with plaintext authentication allowed.
    listeners: [Arc<ListenerCtx>; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let metrics = Metrics::new(&prometheus::Registry::new()).expect("metrics");
        let listener = |allow_plaintext_auth| {
            Arc::new(ListenerCtx {
                name: "fuzz".into(),
                tls: None,
                allow_plaintext_auth,
                metrics: metrics.listener("fuzz"),
            })
        };
        Fixture {
            rt,
            listeners: [listener(false), listener(true)],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [flags, ncuts, rest @ ..] = data else {
        return;
    };
    let flags = *flags;
    let ncuts = usize::from(ncuts % 32).min(rest.len() / 2);
    let (cut_bytes, input) = rest.split_at(ncuts * 2);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (input.len() + 1))
        .collect();
    cuts.push(0);
    cuts.push(input.len());
    cuts.sort_unstable();
    cuts.dedup();
    let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &input[w[0]..w[1]]).collect();

    let fx = fixture();
    let listener = Arc::clone(&fx.listeners[usize::from(flags & 1)]);
    let limits = if flags & 2 != 0 {
        Limits {
            max_preauth_line: 64,
            max_preauth_literal: 32,
            max_bad_commands: 3,
            max_auth_failures: 2,
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    let answer = (flags >> 2) & 3;
    let capacity = if flags & 16 != 0 { 16 } else { 64 * 1024 };

    let out = fx.rt.block_on(async move {
        let (client, server) = tokio::io::duplex(capacity);
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let deadline = tokio::time::Instant::now() + PREAUTH;
        let gateway = async move {
            let mut p = Preauth::new(
                Stream::Memory(server),
                listener,
                limits,
                deadline,
                Stop::never(),
            );
            if p.greet().await.is_err() {
                return;
            }
            while let Ok(attempt) = p.next_login().await {
                let (code, text) = match answer {
                    0 => {
                        // Logged in: the session takes the stream and what came ahead.
                        let _ = p.into_parts();
                        return;
                    }
                    1 => ("UNAVAILABLE", "Mail server temporarily unavailable."),
                    _ => ("AUTHENTICATIONFAILED", "Authentication failed."),
                };
                if p.reject_login(&attempt.tag, code, text).await.is_err() {
                    return;
                }
            }
        };
        let writer = async move {
            for chunk in chunks {
                if client_tx.write_all(chunk).await.is_err() {
                    return;
                }
                // Lets the dialogue read this piece before the next one arrives.
                tokio::task::yield_now().await;
            }
            let _ = client_tx.shutdown().await;
        };
        let reader = async move {
            let mut out = Vec::new();
            let _ = client_rx.read_to_end(&mut out).await;
            out
        };
        let ((), (), out) =
            tokio::time::timeout(HUNG, async { tokio::join!(gateway, writer, reader) })
                .await
                .expect("the pre-auth dialogue did not end");
        out
    });
    assert!(out.starts_with(b"* OK [CAPABILITY "), "no greeting");
    assert!(out.ends_with(b"\r\n"), "output ends inside a line");
});
