//! The commands a backend has not answered yet, by tag, so the relay can tell when it stands
//! at a safe point to stop a session (nothing outstanding, or only an accepted IDLE).
//!
//! Tags, not a count: a line the gateway does not take for a command can still get a tagged
//! answer (`foo BAD ...` to a bare `foo`), and a line it takes for one can get an untagged
//! answer (`* BAD Invalid tag`). Only a tag the backend is sure to echo is recorded, and only
//! an answer carrying a recorded tag retires it; anything else is ignored.

use std::collections::VecDeque;

use crate::proto::prescan::is_tag_char;

/// Longest tag tracked. Real clients use a few characters; a longer tag makes the session's
/// safe point unknowable (it then ends at the shutdown or kick deadline instead).
const MAX_TAG: usize = 64;
/// Most commands tracked in flight at once: far beyond any client's pipelining depth, and it
/// bounds the memory a client can make the gateway spend here (about 64 KiB).
const MAX_PENDING: usize = 1024;

#[derive(Clone, Copy)]
struct Tag {
    bytes: [u8; MAX_TAG],
    len: u8,
}

impl Tag {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Outstanding commands of one session.
#[derive(Default)]
pub struct Pending {
    tags: VecDeque<Tag>,
    /// A command went out whose answer cannot be recognized: no safe point any more.
    untracked: bool,
}

/// The tag the backend will echo for the command line `line`, if it is sure to: the word
/// before the first space or line end, made only of tag characters. `]` is allowed in tags by
/// RFC 3501 but refused by servers such as Dovecot with an untagged `* BAD`, so a tag holding
/// one is not expected back.
fn echoed_tag(line: &[u8]) -> Option<&[u8]> {
    let end = memchr::memchr3(b' ', b'\r', b'\n', line).unwrap_or(line.len());
    let word = &line[..end];
    (!word.is_empty() && word.iter().all(|&b| is_tag_char(b) && b != b']')).then_some(word)
}

/// The tag of a tagged response line (`a1 OK ...`).
fn response_tag(line: &[u8]) -> &[u8] {
    let end = memchr::memchr(b' ', line).unwrap_or(line.len());
    &line[..end]
}

impl Pending {
    /// The command line starting with `line` was sent to the backend.
    pub fn sent(&mut self, line: &[u8]) {
        let Some(tag) = echoed_tag(line) else {
            return;
        };
        if tag.len() > MAX_TAG || self.tags.len() >= MAX_PENDING {
            self.untracked = true;
            return;
        }
        let mut t = Tag {
            bytes: [0; MAX_TAG],
            len: tag.len() as u8,
        };
        t.bytes[..tag.len()].copy_from_slice(tag);
        self.tags.push_back(t);
    }

    /// The backend sent the tagged response line starting with `line`.
    pub fn answered(&mut self, line: &[u8]) {
        let tag = response_tag(line);
        if let Some(i) = self.tags.iter().position(|t| t.as_slice() == tag) {
            self.tags.remove(i);
        }
    }

    /// Every command sent has been answered.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && !self.untracked
    }

    /// Exactly one command is unanswered (with IDLE, the IDLE itself).
    pub fn only_one(&self) -> bool {
        self.tags.len() == 1 && !self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_retire_their_own_commands_only() {
        let mut p = Pending::default();
        assert!(p.is_empty());
        p.sent(b"a1 NOOP\r\n");
        p.sent(b"a2 SELECT INBOX\r\n");
        p.answered(b"a2 OK done\r\n");
        assert!(p.only_one());
        // An answer to something never sent changes nothing.
        p.answered(b"zz OK what\r\n");
        assert!(p.only_one());
        p.answered(b"a1 OK done\r\n");
        assert!(p.is_empty());
    }

    #[test]
    fn stray_lines_neither_run_ahead_nor_stick() {
        let mut p = Pending::default();
        // Dovecot answers `foo BAD ...`: tracked and retired.
        p.sent(b"foo\r\n");
        assert!(!p.is_empty());
        p.answered(b"foo BAD Error\r\n");
        assert!(p.is_empty());
        // Dovecot answers `* BAD Invalid tag`: never expected.
        p.sent(b"a] NOOP\r\n");
        p.sent(b"(x\r\n");
        p.sent(b"\r\n");
        assert!(p.is_empty());
        // The answer to a real command is not taken by an earlier stray one.
        p.sent(b"t1 APPEND INBOX {5+}\r\n");
        p.answered(b"DONE BAD Error\r\n");
        assert!(p.only_one());
    }

    #[test]
    fn too_long_or_too_many_is_never_safe() {
        let mut p = Pending::default();
        let long = [b'a'; MAX_TAG + 1];
        p.sent(&long);
        assert!(!p.is_empty() && !p.only_one());
        let mut p = Pending::default();
        for i in 0..=MAX_PENDING {
            p.sent(format!("t{i} NOOP\r\n").as_bytes());
        }
        for i in 0..=MAX_PENDING {
            p.answered(format!("t{i} OK\r\n").as_bytes());
        }
        assert!(!p.is_empty());
    }
}
