//! Fuzz target: the framer over an arbitrary byte stream cut at arbitrary points. It must
//! never panic, its pieces must cover the input exactly, and it must find the same boundaries
//! and errors as when the stream comes in one piece (checks in tests/support/framer_events.rs,
//! shared with the property tests).
//!
//! Input layout: byte 0 picks the limits, byte 1 the number of cuts (up to 31), then two
//! bytes per cut (offsets modulo the stream's length), then the stream.
#![no_main]

#[path = "../../tests/support/framer_events.rs"]
mod framer_events;

use libfuzzer_sys::fuzz_target;

/// Limits the fuzzer can reach with short inputs, and the gateway's real ones.
const LIMITS: [(usize, u64); 4] = [
    (16, 8),
    (64, 300),
    (8 * 1024, 8 * 1024),
    (64 * 1024, 1 << 30),
];

fuzz_target!(|data: &[u8]| {
    let [limits, ncuts, rest @ ..] = data else {
        return;
    };
    let (max_line, max_literal) = LIMITS[usize::from(*limits) % LIMITS.len()];
    let ncuts = usize::from(*ncuts % 32).min(rest.len() / 2);
    let (cut_bytes, stream) = rest.split_at(ncuts * 2);
    if stream.is_empty() {
        return;
    }
    let cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % stream.len())
        .collect();
    framer_events::check_split_invariance(stream, &cuts, max_line, max_literal);
});
