//! Property tests of the byte-level parsers that face clients and load balancers: the framer
//! finds the same boundaries and errors however its input is cut into reads (and, for
//! generated well-formed streams, the boundaries the stream was built with); the pre-scanner
//! never panics and its ranges lie inside the line; the PROXY header scanner gives the same
//! answer however the header arrives.

#[path = "support/framer_events.rs"]
mod framer_events;

use framer_events::{Event, check_split_invariance, frame};
use imap_gateway::proto::framer::{FrameError, Literal};
use imap_gateway::proto::prescan::{CommandName, is_tag_char, prescan, tag_of};
use imap_gateway::proto::proxy::{self, Scan as ProxyScan};
use proptest::prelude::*;
use proptest::sample::Index;

/// Limits small enough that generated lines and literals reach them.
const MAX_LINE: usize = 200;
const MAX_LITERAL: u64 = 300;

/// How a line ends: CRLF, or a bare LF (which the framer accepts as well).
fn eol() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])]
}

/// Line text without LF: IMAP-ish atoms, quotes, parentheses, braces, digits, a stray CR.
fn line_text(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => prop::sample::select(b"aZ09 ().\\\"*%{}+-~[]<>\r\x00\xff".to_vec()),
        4 => proptest::char::range('a', 'z').prop_map(|c| c as u8),
        1 => any::<u8>().prop_filter("no LF", |&b| b != b'\n'),
    ];
    prop::collection::vec(byte, 0..max)
}

/// A literal announcement's form: `{N}`, `{N+}`, `{N-}`, `~{N}`, `~{N+}`.
fn announce(size: u64, form: u8) -> (Vec<u8>, bool) {
    match form % 5 {
        0 => (format!("{{{size}}}").into_bytes(), true),
        1 => (format!("{{{size}+}}").into_bytes(), false),
        2 => (format!("{{{size}-}}").into_bytes(), false),
        3 => (format!("~{{{size}}}").into_bytes(), true),
        _ => (format!("~{{{size}+}}").into_bytes(), false),
    }
}

/// One part of a message: a line, and when it is not the message's last, the literal it
/// announces.
#[derive(Debug, Clone)]
struct Part {
    text: Vec<u8>,
    eol: &'static [u8],
    literal: Option<(u8, Vec<u8>)>,
}

fn part(with_literal: bool) -> impl Strategy<Value = Part> {
    let lit = if with_literal {
        (
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..=MAX_LITERAL as usize),
        )
            .prop_map(Some)
            .boxed()
    } else {
        Just(None).boxed()
    };
    (line_text(120), eol(), lit).prop_map(|(text, eol, literal)| Part { text, eol, literal })
}

/// A message: up to three lines that announce a literal, then a last line that does not.
fn message() -> impl Strategy<Value = Vec<Part>> {
    (prop::collection::vec(part(true), 0..3), part(false)).prop_map(|(mut parts, last)| {
        parts.push(last);
        parts
    })
}

/// A well-formed stream within the limits, and the events it was built with.
fn stream() -> impl Strategy<Value = (Vec<u8>, Vec<Event>)> {
    prop::collection::vec(message(), 1..6).prop_map(|messages| {
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        for parts in messages {
            for p in parts {
                bytes.extend_from_slice(&p.text);
                let literal = match &p.literal {
                    Some((form, data)) => {
                        let (a, sync) = announce(data.len() as u64, *form);
                        bytes.extend_from_slice(&a);
                        Some(Literal {
                            size: data.len() as u64,
                            sync,
                        })
                    }
                    None => {
                        // The text itself must not end like an announcement.
                        if p.text.last() == Some(&b'}') {
                            bytes.push(b'x');
                        }
                        None
                    }
                };
                bytes.extend_from_slice(p.eol);
                events.push(Event::LineEnd {
                    end: bytes.len(),
                    literal,
                });
                if let Some((_, data)) = p.literal {
                    bytes.extend_from_slice(&data);
                    if !data.is_empty() {
                        events.push(Event::LiteralEnd(bytes.len()));
                    }
                }
            }
        }
        (bytes, events)
    })
}

/// Up to 16 cut points anywhere in a stream of `len` bytes.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..16)
}

fn at(cuts: &[Index], len: usize) -> Vec<usize> {
    cuts.iter().map(|i| i.index(len + 1)).collect()
}

/// Every byte on its own: the most cuts there can be.
fn every_byte(len: usize) -> Vec<usize> {
    (1..len).collect()
}

proptest! {
    /// A well-formed stream is framed as it was built, whole, cut anywhere, or byte by byte.
    #[test]
    fn framer_finds_the_boundaries_it_was_built_with((bytes, events) in stream(), cuts in cuts()) {
        for c in [vec![], at(&cuts, bytes.len()), every_byte(bytes.len())] {
            let framing = frame(&bytes, &c, MAX_LINE, MAX_LITERAL);
            prop_assert_eq!(&framing.events, &events, "cuts {:?}", c);
            prop_assert_eq!(framing.error, None);
            prop_assert!(framing.at_message_start);
        }
        check_split_invariance(&bytes, &at(&cuts, bytes.len()), MAX_LINE, MAX_LITERAL);
    }

    /// A well-formed stream cut short anywhere, then glued to anything: the same framing
    /// however it is cut (errors included: long lines, oversized or absurd literals).
    #[test]
    fn framer_is_split_invariant_on_damaged_streams(
        (bytes, _) in stream(),
        cut in any::<Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..300),
        cuts in cuts(),
    ) {
        let mut damaged = bytes[..cut.index(bytes.len() + 1)].to_vec();
        damaged.extend_from_slice(&tail);
        check_split_invariance(&damaged, &at(&cuts, damaged.len()), MAX_LINE, MAX_LITERAL);
    }

    /// Lines and literals right at the limits: exactly at the limit passes, one byte more is
    /// refused, whatever the cuts; huge and overflowing literal sizes are refused or ignored,
    /// never wrapped.
    #[test]
    fn framer_limits_hold_at_the_edges(
        line_delta in -2i64..=2,
        literal_delta in -2i64..=2,
        huge in prop::sample::select(vec![
            "18446744073709551615".to_owned(), // u64::MAX: refused as too large
            "18446744073709551616".to_owned(), // overflows u64: not an announcement
            "99999999999999999999999".to_owned(), // over 20 digits: not an announcement
        ]),
        crlf in any::<bool>(),
        cuts in cuts(),
    ) {
        let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        // A line of MAX_LINE + line_delta bytes, terminator included.
        let len = (MAX_LINE as i64 + line_delta) as usize;
        let mut line = vec![b'a'; len - eol.len()];
        line.extend_from_slice(eol);
        let framing = frame(&line, &at(&cuts, line.len()), MAX_LINE, MAX_LITERAL);
        if len > MAX_LINE {
            prop_assert_eq!(framing.error, Some(FrameError::LineTooLong { limit: MAX_LINE }));
        } else {
            prop_assert_eq!(framing.events, vec![Event::LineEnd { end: len, literal: None }]);
        }
        check_split_invariance(&line, &at(&cuts, line.len()), MAX_LINE, MAX_LITERAL);

        let size = (MAX_LITERAL as i64 + literal_delta) as u64;
        let mut msg = format!("a APPEND x {{{size}}}").into_bytes();
        msg.extend_from_slice(eol);
        let announce_end = msg.len();
        msg.extend(std::iter::repeat_n(b'z', size as usize));
        msg.extend_from_slice(b")\r\n");
        let framing = frame(&msg, &at(&cuts, msg.len()), MAX_LINE, MAX_LITERAL);
        if size > MAX_LITERAL {
            prop_assert_eq!(
                framing.error,
                Some(FrameError::LiteralTooLarge { size, limit: MAX_LITERAL })
            );
            prop_assert!(framing.events.is_empty());
        } else {
            prop_assert_eq!(framing.events, vec![
                Event::LineEnd { end: announce_end, literal: Some(Literal { size, sync: true }) },
                Event::LiteralEnd(announce_end + size as usize),
                Event::LineEnd { end: msg.len(), literal: None },
            ]);
        }
        check_split_invariance(&msg, &at(&cuts, msg.len()), MAX_LINE, MAX_LITERAL);

        let mut absurd = format!("a LOGIN {{{huge}+}}").into_bytes();
        absurd.extend_from_slice(eol);
        absurd.extend_from_slice(b"b NOOP\r\n");
        let framing = frame(&absurd, &at(&cuts, absurd.len()), u64::MAX as usize, u64::MAX);
        if huge == "18446744073709551615" {
            prop_assert_eq!(framing.events[0].clone(), Event::LineEnd {
                end: absurd.len() - 8,
                literal: Some(Literal { size: u64::MAX, sync: false }),
            });
            prop_assert!(framing.in_literal);
        } else {
            prop_assert_eq!(framing.events.len(), 2, "{:?}", framing.events);
        }
        check_split_invariance(&absurd, &at(&cuts, absurd.len()), MAX_LINE, MAX_LITERAL);
    }

    /// The pre-scanner never panics; what it reports is a tag at the very start, a space,
    /// and a command name inside the line that parses to the name it gave.
    #[test]
    fn prescan_ranges_lie_within_the_line(
        line in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            line_text(64),
            ("[a-zA-Z0-9.*+{]{0,8}", " {0,2}", "[a-zA-Z_.-]{0,14}", "[ \r\n\"(]{0,3}")
                .prop_map(|(t, s, n, r)| format!("{t}{s}{n}{r}").into_bytes()),
        ],
    ) {
        if let Some(p) = prescan(&line) {
            let t = p.tag.len();
            prop_assert!(t > 0 && p.tag == &line[..t]);
            prop_assert!(p.tag.iter().all(|&b| is_tag_char(b)));
            prop_assert_eq!(line[t], b' ');
            prop_assert_eq!(p.name_range.start, t + 1);
            prop_assert!(p.name_range.end > p.name_range.start && p.name_range.end <= line.len());
            prop_assert_eq!(p.name, CommandName::parse(&line[p.name_range.clone()]));
        }
        if let Some(tag) = tag_of(&line) {
            prop_assert!(!tag.is_empty() && line.starts_with(tag));
        }
    }

    /// However a PROXY header (v1 or v2, valid or not, followed by client bytes) arrives,
    /// the scanner says "incomplete" until it has the whole header and then the same thing
    /// it says with all bytes; a refusal is never taken back by more bytes.
    #[test]
    fn proxy_scan_does_not_depend_on_arrival(
        buf in prop_oneof![
            proxy_v1(),
            proxy_v2(),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
        client in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = buf;
        buf.extend_from_slice(&client);
        let full = proxy::scan(&buf);
        let mut refused = false;
        for n in 0..=buf.len() {
            let got = proxy::scan(&buf[..n]);
            match (&full, &got) {
                (Ok(ProxyScan::Complete { len, .. }), _) if n < *len => {
                    prop_assert!(matches!(got, Ok(ProxyScan::Incomplete)), "{n}: {got:?}");
                }
                (Ok(complete @ ProxyScan::Complete { .. }), Ok(g)) => prop_assert_eq!(g, complete),
                (Ok(ProxyScan::Incomplete), _) => {
                    prop_assert!(matches!(got, Ok(ProxyScan::Incomplete)), "{n}: {got:?}");
                }
                (Err(_), Ok(ProxyScan::Incomplete)) => prop_assert!(!refused, "{n}: refusal taken back"),
                (Err(_), Err(_)) => refused = true,
                _ => prop_assert!(false, "{n} bytes: {got:?}, all bytes: {full:?}"),
            }
        }
    }
}

/// v1 headers, mostly well-formed.
fn proxy_v1() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec!["TCP4", "TCP6", "UNKNOWN", "TCP5", ""]),
        any::<[u8; 4]>(),
        any::<[u16; 8]>(),
        any::<(u16, u16)>(),
        prop::sample::select(vec!["\r\n", "\n", "\r\r\n", ""]),
    )
        .prop_map(|(family, v4, v6, (sp, dp), end)| {
            let (src, dst) = if family == "TCP6" {
                let a = std::net::Ipv6Addr::from(v6);
                (a.to_string(), "::1".to_owned())
            } else {
                let a = std::net::Ipv4Addr::from(v4);
                (a.to_string(), "10.0.0.1".to_owned())
            };
            format!("PROXY {family} {src} {dst} {sp} {dp}{end}").into_bytes()
        })
}

/// v2 headers: the signature, a version/command byte, a family/transport byte, a length and
/// a payload that may be shorter or longer than it says.
fn proxy_v2() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0x20u8, 0x21, 0x11, 0x2f]),
        prop::sample::select(vec![0x11u8, 0x21, 0x00, 0x31, 0x12]),
        prop::sample::select(vec![0u16, 12, 36, 40, 216, 2048, 2049, 65535]),
        prop::collection::vec(any::<u8>(), 0..60),
    )
        .prop_map(|(ver_cmd, fam, len, payload)| {
            let mut b = proxy::V2_SIGNATURE.to_vec();
            b.push(ver_cmd);
            b.push(fam);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&payload);
            b
        })
}
