//! The streaming IMAP framer: splits a byte stream into line segments and literal data
//! without buffering either, so that a 50 MB literal flows through in constant memory.
//!
//! IMAP messages (commands and responses) are lines that may announce a literal at their end
//! (`{N}`, `{N+}`, `{N-}` or the BINARY `~{N}`); the literal's bytes follow the CRLF and the
//! message's line continues after them. The framer only looks at the bytes around a line end
//! (the announcement) and at the first bytes of a message (its head, for the pre-scanner), so the
//! cost per relayed byte is one `memchr` over line bytes and nothing over literal bytes.

use thiserror::Error;

/// How many bytes of a message's first line are kept for the pre-scanner: enough for any sane
/// tag plus a command name and a UID sub-command; a longer tag is not worth recognising.
pub const HEAD_LEN: usize = 128;

/// Longest literal announcement we must recognise at a line end: `~{` + 20 digits + `+}\r\n`.
const TAIL_LEN: usize = 32;

/// Errors that make the stream unframeable: the session cannot continue after them.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("literal of {size} bytes exceeds the limit of {limit} bytes")]
    LiteralTooLarge { size: u64, limit: u64 },
    /// A whole message over the bound of a buffer that holds messages whole (see
    /// `wire::MessageBuf`); the streaming framer itself never returns this.
    #[error("message longer than {limit} bytes")]
    MessageTooLong { limit: usize },
}

/// One step of the framer over the input it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes of line text. `first` marks the segment that starts a message; `complete`
    /// marks the segment that ends with LF. When a complete segment announced a literal,
    /// `literal` carries its size and whether it is synchronizing.
    Line {
        len: usize,
        first: bool,
        complete: bool,
        literal: Option<Literal>,
    },
    /// `len` bytes of literal data; `done` is set on the literal's last bytes.
    LiteralData { len: usize, done: bool },
}

/// A literal announced at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal {
    pub size: u64,
    /// `{N}`: the sender must wait for a `+` continuation before sending the data.
    pub sync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a new message.
    MessageStart,
    /// Inside a line (of the current message) that started in an earlier call.
    InLine,
    /// At the start of a line that continues the current message after a literal.
    LineContinue,
    /// Inside literal data, `remaining` bytes to go.
    Literal { remaining: u64 },
}

/// The framer for one direction of one connection. It owns no heap memory.
#[derive(Debug, Clone)]
pub struct Framer {
    state: State,
    max_line: usize,
    max_literal: u64,
    /// Bytes of the current line seen so far (for the line limit).
    line_len: usize,
    /// The last bytes of the current line seen so far, for literal announcements split
    /// across reads.
    tail: [u8; TAIL_LEN],
    tail_len: usize,
    head: [u8; HEAD_LEN],
    head_len: usize,
    /// Whether the line being framed is the first line of its message.
    in_first_line: bool,
}

impl Framer {
    /// A framer that refuses lines longer than `max_line` bytes and literals over
    /// `max_literal` bytes.
    pub fn new(max_line: usize, max_literal: u64) -> Self {
        Self {
            state: State::MessageStart,
            max_line,
            max_literal,
            line_len: 0,
            tail: [0; TAIL_LEN],
            tail_len: 0,
            head: [0; HEAD_LEN],
            head_len: 0,
            in_first_line: false,
        }
    }

    /// Whether the framer stands between two messages (a safe point to inject a message).
    pub fn at_message_start(&self) -> bool {
        self.state == State::MessageStart
    }

    /// The receiver refused the literal just announced (a server answers the command instead
    /// of `+`): the sender will not send it, so the message ended with the announcing line.
    pub fn abandon_literal(&mut self) {
        if matches!(self.state, State::Literal { .. } | State::LineContinue) {
            self.state = State::MessageStart;
        }
    }

    /// Whether the stream is inside literal data.
    pub fn in_literal(&self) -> bool {
        matches!(self.state, State::Literal { .. })
    }

    /// Bytes of literal data still to come, when the stream is inside a literal.
    pub fn literal_remaining(&self) -> Option<u64> {
        match self.state {
            State::Literal { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// Accounts for `n` bytes of the current literal that went past the framer (moved in the
    /// kernel without being read); `n` is at most [`Framer::literal_remaining`].
    pub fn skip_literal(&mut self, n: u64) {
        if let State::Literal { remaining } = self.state {
            let remaining = remaining.saturating_sub(n);
            self.state = if remaining == 0 {
                State::LineContinue
            } else {
                State::Literal { remaining }
            };
        }
    }

    /// The first bytes (up to [`HEAD_LEN`]) of the current message's first line.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// Frames the next piece of `input` (which must not be empty).
    pub fn next(&mut self, input: &[u8]) -> Result<Piece, FrameError> {
        debug_assert!(!input.is_empty());
        match self.state {
            State::Literal { remaining } => {
                let len = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
                let remaining = remaining - len as u64;
                self.state = if remaining == 0 {
                    State::LineContinue
                } else {
                    State::Literal { remaining }
                };
                Ok(Piece::LiteralData {
                    len,
                    done: remaining == 0,
                })
            }
            state => {
                let first = state == State::MessageStart;
                if state != State::InLine {
                    self.line_len = 0;
                    self.tail_len = 0;
                }
                if first {
                    self.head_len = 0;
                    self.in_first_line = true;
                }
                match memchr::memchr(b'\n', input) {
                    Some(pos) => {
                        let len = pos + 1;
                        self.check_line_len(len)?;
                        self.record_head(&input[..len]);
                        self.in_first_line = false;
                        let literal = self.literal_at_end(&input[..len])?;
                        self.state = match literal {
                            Some(lit) if lit.size > 0 => State::Literal {
                                remaining: lit.size,
                            },
                            Some(_) => State::LineContinue,
                            None => State::MessageStart,
                        };
                        Ok(Piece::Line {
                            len,
                            first,
                            complete: true,
                            literal,
                        })
                    }
                    None => {
                        let len = input.len();
                        self.check_line_len(len)?;
                        self.record_head(input);
                        self.record_tail(input);
                        self.state = State::InLine;
                        Ok(Piece::Line {
                            len,
                            first,
                            complete: false,
                            literal: None,
                        })
                    }
                }
            }
        }
    }

    fn check_line_len(&mut self, len: usize) -> Result<(), FrameError> {
        self.line_len = self.line_len.saturating_add(len);
        if self.line_len > self.max_line {
            return Err(FrameError::LineTooLong {
                limit: self.max_line,
            });
        }
        Ok(())
    }

    /// Keeps the start of a message's first line for the pre-scanner.
    fn record_head(&mut self, seg: &[u8]) {
        if self.in_first_line && self.head_len < HEAD_LEN {
            let take = (HEAD_LEN - self.head_len).min(seg.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&seg[..take]);
            self.head_len += take;
        }
    }

    fn record_tail(&mut self, seg: &[u8]) {
        if seg.len() >= TAIL_LEN {
            self.tail.copy_from_slice(&seg[seg.len() - TAIL_LEN..]);
            self.tail_len = TAIL_LEN;
        } else {
            let keep = (TAIL_LEN - seg.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + seg.len()].copy_from_slice(seg);
            self.tail_len = keep + seg.len();
        }
    }

    /// Parses a literal announcement at the end of the line that `seg` completes.
    fn literal_at_end(&self, seg: &[u8]) -> Result<Option<Literal>, FrameError> {
        let mut joined = [0u8; TAIL_LEN * 2];
        let end: &[u8] = if seg.len() >= TAIL_LEN || self.tail_len == 0 {
            seg
        } else {
            joined[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joined[self.tail_len..self.tail_len + seg.len()].copy_from_slice(seg);
            &joined[..self.tail_len + seg.len()]
        };
        let Some(literal) = parse_literal_suffix(end) else {
            return Ok(None);
        };
        if literal.size > self.max_literal {
            return Err(FrameError::LiteralTooLarge {
                size: literal.size,
                limit: self.max_literal,
            });
        }
        Ok(Some(literal))
    }
}

/// Recognises `{N}`, `{N+}`, `{N-}` or `~{N}` followed by CRLF (or a bare LF) at the end of
/// `line`.
pub fn parse_literal_suffix(line: &[u8]) -> Option<Literal> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let (line, sync) = match line.last() {
        Some(b'+') | Some(b'-') => (&line[..line.len() - 1], false),
        _ => (line, true),
    };
    let digits_start = line
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |p| p + 1);
    let digits = &line[digits_start..];
    if digits.is_empty() || digits.len() > 20 || line[..digits_start].last() != Some(&b'{') {
        return None;
    }
    let mut size: u64 = 0;
    for d in digits {
        size = size.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(Literal { size, sync })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_literal_bytes_end_the_literal_like_framed_ones() {
        let mut f = Framer::new(1024, 1 << 20);
        let line = b"* 1 FETCH (BODY[] {100}\r\n";
        assert!(matches!(f.next(line), Ok(Piece::Line { .. })));
        assert_eq!(f.literal_remaining(), Some(100));
        f.skip_literal(60);
        assert_eq!(f.literal_remaining(), Some(40));
        assert!(matches!(
            f.next(&[b'x'; 40]),
            Ok(Piece::LiteralData {
                len: 40,
                done: true
            })
        ));
        assert_eq!(f.literal_remaining(), None);

        let mut g = Framer::new(1024, 1 << 20);
        assert!(g.next(line).is_ok());
        g.skip_literal(100);
        assert_eq!(g.literal_remaining(), None);
        assert!(
            !g.at_message_start(),
            "the line after the literal ends the response"
        );
        assert!(matches!(
            g.next(b")\r\n"),
            Ok(Piece::Line { complete: true, .. })
        ));
        assert!(g.at_message_start());
    }

    /// Frames `input` split into chunks of `split` bytes; returns the message boundaries as
    /// (start offset, head) and the literal sizes seen.
    fn frame(input: &[u8], split: usize) -> (Vec<(usize, Vec<u8>)>, Vec<u64>) {
        let mut f = Framer::new(1 << 20, 1 << 30);
        let mut starts = Vec::new();
        let mut lits = Vec::new();
        let mut off = 0;
        for chunk in input.chunks(split) {
            let mut pos = 0;
            while pos < chunk.len() {
                let piece = f.next(&chunk[pos..]).unwrap();
                match piece {
                    Piece::Line {
                        len,
                        first,
                        complete,
                        literal,
                    } => {
                        if first {
                            starts.push((off + pos, Vec::new()));
                        }
                        if complete && let Some(l) = literal {
                            lits.push(l.size);
                        }
                        pos += len;
                        if complete
                            && (f.at_message_start() || literal.is_some())
                            && let Some(last) = starts.last_mut()
                            && last.1.is_empty()
                        {
                            last.1 = f.head().to_vec();
                        }
                    }
                    Piece::LiteralData { len, .. } => pos += len,
                }
            }
            off += chunk.len();
        }
        (starts, lits)
    }

    const STREAM: &[u8] =
        b"a1 NOOP\r\na2 APPEND INBOX (\\Seen) {12}\r\nhello\r\n{5}\r\n CRLF {0}\r\n x\r\n\
a3 LOGIN {5+}\r\nalice ~{3}\r\n\x00\x01\n\r\n* 3 FETCH (BODY[] {4}\r\nab\r\n)\r\nDONE\r\n";

    #[test]
    fn boundaries_do_not_depend_on_split() {
        let whole = frame(STREAM, STREAM.len());
        assert_eq!(
            whole.0.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![0, 9, 66, 98, 128]
        );
        assert_eq!(whole.1, vec![12, 0, 5, 3, 4]);
        for split in 1..STREAM.len() {
            assert_eq!(frame(STREAM, split), whole, "split {split}");
        }
    }

    #[test]
    fn head_holds_first_line_start() {
        let (starts, _) = frame(STREAM, 3);
        assert_eq!(starts[1].1, b"a2 APPEND INBOX (\\Seen) {12}\r\n".to_vec());
        assert_eq!(starts[0].1, b"a1 NOOP\r\n".to_vec());
    }

    #[test]
    fn literal_suffixes() {
        assert_eq!(
            parse_literal_suffix(b"a {12}\r\n"),
            Some(Literal {
                size: 12,
                sync: true
            })
        );
        assert_eq!(
            parse_literal_suffix(b"a {12+}\r\n"),
            Some(Literal {
                size: 12,
                sync: false
            })
        );
        assert_eq!(
            parse_literal_suffix(b"~{7}\n"),
            Some(Literal {
                size: 7,
                sync: true
            })
        );
        assert_eq!(parse_literal_suffix(b"a \"{12}\"\r\n"), None);
        assert_eq!(parse_literal_suffix(b"a {}\r\n"), None);
        assert_eq!(parse_literal_suffix(b"a 12}\r\n"), None);
        assert_eq!(
            parse_literal_suffix(b"a {99999999999999999999999}\r\n"),
            None
        );
    }

    #[test]
    fn abandoned_literal_ends_the_message() {
        let mut f = Framer::new(1000, 1000);
        assert!(matches!(
            f.next(b"a APPEND x {9}\r\n"),
            Ok(Piece::Line {
                literal: Some(_),
                ..
            })
        ));
        assert!(f.in_literal());
        f.abandon_literal();
        assert!(f.at_message_start());
        assert!(matches!(
            f.next(b"b NOOP\r\n"),
            Ok(Piece::Line { first: true, .. })
        ));
    }

    #[test]
    fn limits_are_enforced_without_buffering() {
        let mut f = Framer::new(16, 100);
        assert!(f.next(b"0123456789").is_ok());
        assert_eq!(
            f.next(b"0123456789"),
            Err(FrameError::LineTooLong { limit: 16 })
        );
        let mut f = Framer::new(1000, 100);
        assert_eq!(
            f.next(b"a APPEND x {101}\r\n"),
            Err(FrameError::LiteralTooLarge {
                size: 101,
                limit: 100
            })
        );
    }
}

/// The result of looking for one whole message at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The first `len` bytes are one complete message.
    Complete { len: usize },
    /// The message is not complete yet; `sync_literals` synchronizing literals have been
    /// announced so far (each needs a `+` from the receiver before its data comes).
    Incomplete { sync_literals: usize },
}

/// Looks for one complete message at the start of `buf`, for the places that must hold a
/// whole message (pre-authentication commands, backend responses during login). Bounded by
/// the limits, so an endless line or a huge literal is refused before it is buffered.
pub fn scan_message(buf: &[u8], max_line: usize, max_literal: u64) -> Result<Scan, FrameError> {
    let mut framer = Framer::new(max_line, max_literal);
    let mut pos = 0;
    let mut sync_literals = 0;
    while pos < buf.len() {
        match framer.next(&buf[pos..])? {
            Piece::Line {
                len,
                complete,
                literal,
                ..
            } => {
                pos += len;
                if complete && framer.at_message_start() {
                    return Ok(Scan::Complete { len: pos });
                }
                if literal.is_some_and(|l| l.sync) {
                    sync_literals += 1;
                }
            }
            Piece::LiteralData { len, .. } => pos += len,
        }
    }
    Ok(Scan::Incomplete { sync_literals })
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn scans_whole_messages() {
        assert_eq!(
            scan_message(b"a LOGIN {1}\r\nx {2+}\r\nyy\r\nb NOOP\r\n", 100, 100),
            Ok(Scan::Complete { len: 25 })
        );
        assert_eq!(
            scan_message(b"a LOGIN {1}\r\n", 100, 100),
            Ok(Scan::Incomplete { sync_literals: 1 })
        );
        assert_eq!(
            scan_message(b"a LOGIN {1}\r\nx {2+}\r\ny", 100, 100),
            Ok(Scan::Incomplete { sync_literals: 1 })
        );
        assert!(scan_message(b"a LOGIN {101}\r\n", 100, 100).is_err());
    }
}
