//! The gate for synchronizing literals. A client that announces `{N}` waits for the server's
//! `+` before sending the data; if the server answers the command instead (a refused APPEND),
//! the client sends its next command, not the literal. The client-to-backend framer must know
//! which happened before it reads on, or it would take the next commands for literal data.
//! The backend-to-client side sees the answer, so it decides; the other side waits for it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::Notify;

/// Longest tag the gate tracks; a longer tag (no real client uses one) leaves the literal
/// ungated, framed as if it were accepted.
const MAX_TAG: usize = 64;

const PENDING: u8 = 0;
const CONTINUE: u8 = 1;
const REFUSED: u8 = 2;

/// What the server said to an announced synchronizing literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `+`: the literal data follows.
    Continue,
    /// A tagged answer to the command: no literal data follows.
    Refused,
}

pub struct LiteralGate {
    /// Fast check for the response side: is a literal waiting for its verdict?
    awaiting: AtomicBool,
    verdict: AtomicU8,
    tag: Mutex<([u8; MAX_TAG], usize)>,
    notify: Notify,
}

impl Default for LiteralGate {
    fn default() -> Self {
        Self {
            awaiting: AtomicBool::new(false),
            verdict: AtomicU8::new(PENDING),
            tag: Mutex::new(([0; MAX_TAG], 0)),
            notify: Notify::new(),
        }
    }
}

impl LiteralGate {
    /// The command tagged `tag` announced a synchronizing literal. Returns false when the tag
    /// cannot be tracked (then there is no verdict to wait for).
    pub fn arm(&self, tag: &[u8]) -> bool {
        if tag.is_empty() || tag.len() > MAX_TAG {
            return false;
        }
        let Ok(mut t) = self.tag.lock() else {
            return false;
        };
        t.0[..tag.len()].copy_from_slice(tag);
        t.1 = tag.len();
        self.verdict.store(PENDING, Ordering::Release);
        self.awaiting.store(true, Ordering::Release);
        true
    }

    /// Waits for the response side to see the server's answer.
    pub async fn verdict(&self) -> Verdict {
        loop {
            match self.verdict.load(Ordering::Acquire) {
                CONTINUE => return Verdict::Continue,
                REFUSED => return Verdict::Refused,
                _ => self.notify.notified().await,
            }
        }
    }

    /// Called with the head of every complete response: settles a waiting literal when the
    /// response is a continuation request or the tagged answer to its command.
    pub fn observe(&self, head: &[u8]) {
        if !self.awaiting.load(Ordering::Acquire) {
            return;
        }
        let verdict = if head.starts_with(b"+") {
            CONTINUE
        } else {
            let Ok(t) = self.tag.lock() else {
                return;
            };
            let tag = &t.0[..t.1];
            if head.len() > tag.len() && head.starts_with(tag) && head[tag.len()] == b' ' {
                REFUSED
            } else {
                return;
            }
        };
        self.awaiting.store(false, Ordering::Release);
        self.verdict.store(verdict, Ordering::Release);
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn continuation_and_refusal() {
        let gate = LiteralGate::default();
        assert!(gate.arm(b"a1"));
        gate.observe(b"* 3 EXISTS\r\n");
        gate.observe(b"a10 OK other command\r\n");
        gate.observe(b"+ Ready\r\n");
        assert_eq!(gate.verdict().await, Verdict::Continue);
        assert!(gate.arm(b"a2"));
        gate.observe(b"a2 NO [TRYCREATE] no such mailbox\r\n");
        assert_eq!(gate.verdict().await, Verdict::Refused);
        assert!(!gate.arm(&[b'x'; MAX_TAG + 1]));
    }
}
