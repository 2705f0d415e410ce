//! Feeds a byte stream to the framer cut into pieces and records what it found in a form
//! that does not depend on the cuts, checking every piece on the way. Shared by
//! `tests/proptest_framer.rs` and the fuzz target `fuzz/fuzz_targets/framer.rs` (included by
//! path: it is test code, not part of the library).

use imap_gateway::proto::framer::{
    FrameError, Framer, HEAD_LEN, Literal, Piece, Scan, parse_literal_suffix, scan_message,
};

/// A boundary the framer found, by its offset in the whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A line ends here (just after its LF), announcing `literal`. When it announces none,
    /// the message ends here too.
    LineEnd {
        end: usize,
        literal: Option<Literal>,
    },
    /// A literal's data ends here.
    LiteralEnd(usize),
}

/// What the framer made of a whole stream. Message starts are not listed: they follow from
/// the events (and every piece's `first` flag is checked against them as it comes).
#[derive(Debug, PartialEq, Eq)]
pub struct Framing {
    pub events: Vec<Event>,
    /// The error that stopped the framer. Where it is noticed depends on the cuts (a long
    /// line is refused once its pieces add up past the limit); which line it belongs to does
    /// not, and that is what `events` before it pins down.
    pub error: Option<FrameError>,
    /// The framer's state after the last byte (when there was no error).
    pub at_message_start: bool,
    pub in_literal: bool,
    pub head: Vec<u8>,
}

impl Framing {
    /// Where the first message ends, if it is complete.
    pub fn first_message_end(&self) -> Option<usize> {
        self.events.iter().find_map(|e| match e {
            Event::LineEnd { end, literal: None } => Some(*end),
            _ => None,
        })
    }
}

/// Frames `stream` cut at `cuts` (offsets, any order, out-of-range ones ignored). Panics when
/// a piece breaks the framer's contract: the pieces must cover the input exactly, line
/// segments end at the first LF, literal data is exactly as long as announced, `first` marks
/// exactly the segments that start a message, the head is the start of the message's first
/// line, and the literal announced is what the whole line ends with.
pub fn frame(stream: &[u8], cuts: &[usize], max_line: usize, max_literal: u64) -> Framing {
    let mut cuts: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < stream.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(stream.len());

    let mut f = Framer::new(max_line, max_literal);
    let mut events = Vec::new();
    let mut pos = 0;
    // Where the current message and line started, and the literal bytes still due.
    let mut message_start = 0;
    let mut line_start = 0;
    let mut first_line = true;
    let mut literal_due: Option<u64> = None;
    for &cut in &cuts {
        while pos < cut {
            let chunk = &stream[pos..cut];
            let was_at_start = f.at_message_start();
            let piece = match f.next(chunk) {
                Ok(p) => p,
                Err(e) => {
                    return Framing {
                        events,
                        error: Some(e),
                        at_message_start: false,
                        in_literal: false,
                        head: Vec::new(),
                    };
                }
            };
            match piece {
                Piece::Line {
                    len,
                    first,
                    complete,
                    literal,
                } => {
                    assert!(literal_due.is_none(), "line piece inside literal data");
                    assert!(len >= 1 && len <= chunk.len(), "line piece of {len} bytes");
                    assert_eq!(first, was_at_start, "`first` at offset {pos}");
                    if first {
                        message_start = pos;
                        line_start = pos;
                        first_line = true;
                    }
                    let seg = &chunk[..len];
                    let lf = memchr_lf(seg);
                    if complete {
                        assert_eq!(
                            lf,
                            Some(len - 1),
                            "complete segment must end at its first LF"
                        );
                        let end = pos + len;
                        assert_eq!(
                            literal,
                            parse_literal_suffix(&stream[line_start..end]),
                            "literal announced by the line {line_start}..{end}"
                        );
                        if first_line {
                            let head_end = end.min(message_start + HEAD_LEN);
                            assert_eq!(f.head(), &stream[message_start..head_end], "head");
                        }
                        events.push(Event::LineEnd { end, literal });
                        first_line = false;
                        line_start = end;
                        match literal {
                            Some(l) if l.size > 0 => literal_due = Some(l.size),
                            Some(_) => {}
                            None => assert!(f.at_message_start(), "message must end at {end}"),
                        }
                    } else {
                        assert_eq!(lf, None, "incomplete segment holds an LF");
                        assert_eq!(len, chunk.len(), "incomplete segment must take the input");
                        assert!(literal.is_none(), "incomplete segment announces a literal");
                    }
                    pos += len;
                }
                Piece::LiteralData { len, done } => {
                    let due = literal_due.expect("literal data without an announcement");
                    assert!(
                        len >= 1 && len <= chunk.len(),
                        "literal piece of {len} bytes"
                    );
                    assert!(len as u64 <= due, "literal piece longer than announced");
                    let left = due - len as u64;
                    assert_eq!(done, left == 0, "`done` at offset {pos}");
                    pos += len;
                    if done {
                        literal_due = None;
                        line_start = pos;
                        events.push(Event::LiteralEnd(pos));
                    } else {
                        literal_due = Some(left);
                    }
                }
            }
        }
    }
    assert_eq!(pos, stream.len(), "pieces must cover the input exactly");
    Framing {
        events,
        error: None,
        at_message_start: f.at_message_start(),
        in_literal: f.in_literal(),
        head: f.head().to_vec(),
    }
}

fn memchr_lf(seg: &[u8]) -> Option<usize> {
    seg.iter().position(|&b| b == b'\n')
}

/// Frames `stream` whole and cut at `cuts`, and checks both agree, and that `scan_message`
/// (which holds whole messages) finds the same first message.
pub fn check_split_invariance(stream: &[u8], cuts: &[usize], max_line: usize, max_literal: u64) {
    let whole = frame(stream, &[], max_line, max_literal);
    let split = frame(stream, cuts, max_line, max_literal);
    assert_eq!(whole, split, "cuts {cuts:?} changed the framing");
    match scan_message(stream, max_line, max_literal) {
        Ok(Scan::Complete { len }) => assert_eq!(Some(len), whole.first_message_end()),
        Ok(Scan::Incomplete { .. }) => {
            assert_eq!(whole.first_message_end(), None);
            assert_eq!(whole.error, None);
        }
        Err(e) => {
            assert_eq!(whole.first_message_end(), None, "scan_message: {e}");
            assert_eq!(whole.error, Some(e));
        }
    }
}
