//! Whole-message reading for the dialogues the gateway holds itself (pre-authentication with
//! the client, login with a backend): a buffer that yields one complete message at a time,
//! bounded by line and literal limits, keeping whatever the peer sent beyond it.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::framer::{FrameError, Scan, scan_message};

/// Read size while holding a dialogue; messages here are small.
const READ_CHUNK: usize = 4096;

#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The peer closed the connection.
    Closed,
    Frame(FrameError),
}

/// What a read produced.
pub enum Event {
    /// A complete message is at the front of the buffer (see [`MessageBuf::take`]).
    Message(usize),
    /// The peer announced a synchronizing literal and waits for `+` before sending it.
    NeedContinuation,
}

/// A buffer that collects whole messages from a peer.
pub struct MessageBuf {
    buf: Vec<u8>,
    max_line: usize,
    max_literal: u64,
    /// Bound on a whole message: lines and literals are each within their limits, but a
    /// message of endless small literals would otherwise be buffered until memory runs out.
    max_message: usize,
    /// Continuations sent for the message being collected.
    continued: usize,
    /// Whether the peer waits for `+` before a synchronizing literal: clients do; servers
    /// never wait (their `{N}` literals follow at once).
    peer_waits: bool,
}

/// The largest whole message for the given limits: a line's worth of text and two literals
/// (a LOGIN's user name and password), however it is split into lines and literals.
fn max_message(max_line: usize, max_literal: u64) -> usize {
    let literal = usize::try_from(max_literal).unwrap_or(usize::MAX);
    max_line.saturating_add(literal.saturating_mul(2))
}

impl MessageBuf {
    /// A buffer for commands from a client (which waits for `+` on synchronizing literals).
    pub fn from_client(max_line: usize, max_literal: u64) -> Self {
        Self {
            buf: Vec::new(),
            max_line,
            max_literal,
            max_message: max_message(max_line, max_literal),
            continued: 0,
            peer_waits: true,
        }
    }

    /// A buffer for responses from a server.
    pub fn from_server(max_line: usize, max_literal: u64) -> Self {
        Self {
            peer_waits: false,
            ..Self::from_client(max_line, max_literal)
        }
    }

    /// Reads until a complete message is buffered or the peer needs a continuation.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Event, ReadError> {
        loop {
            match scan_message(&self.buf, self.max_line, self.max_literal)
                .map_err(ReadError::Frame)?
            {
                Scan::Complete { len } => {
                    self.continued = 0;
                    return Ok(Event::Message(len));
                }
                // Incomplete: everything buffered belongs to the message being collected.
                Scan::Incomplete { .. } if self.buf.len() > self.max_message => {
                    return Err(ReadError::Frame(FrameError::MessageTooLong {
                        limit: self.max_message,
                    }));
                }
                Scan::Incomplete { sync_literals }
                    if self.peer_waits && sync_literals > self.continued =>
                {
                    self.continued += 1;
                    return Ok(Event::NeedContinuation);
                }
                Scan::Incomplete { .. } => {}
            }
            self.fill(r).await?;
        }
    }

    /// Reads one raw line (SASL responses are not IMAP syntax, literals do not apply).
    pub async fn next_line<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<usize, ReadError> {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf) {
                return Ok(pos + 1);
            }
            if self.buf.len() > self.max_line {
                return Err(ReadError::Frame(FrameError::LineTooLong {
                    limit: self.max_line,
                }));
            }
            self.fill(r).await?;
        }
    }

    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), ReadError> {
        let old = self.buf.len();
        self.buf.resize(old + READ_CHUNK, 0);
        let n = r.read(&mut self.buf[old..]).await;
        self.buf.truncate(old + *n.as_ref().unwrap_or(&0));
        match n {
            Ok(0) => Err(ReadError::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// The buffered bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Removes and returns the first `len` bytes.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let rest = self.buf.split_off(len);
        std::mem::replace(&mut self.buf, rest)
    }

    /// Drops everything buffered (STARTTLS: bytes sent before the handshake are untrusted).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.continued = 0;
    }

    /// Everything still buffered (bytes the peer sent ahead), leaving the buffer empty.
    pub fn into_remaining(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_literals_need_no_continuation() {
        let mut input: &[u8] = b"* ID (\"name\" {5}\r\nhello)\r\nrest";
        let mut buf = MessageBuf::from_server(1024, 1024);
        match buf.next(&mut input).await {
            Ok(Event::Message(len)) => {
                assert_eq!(buf.take(len), b"* ID (\"name\" {5}\r\nhello)\r\n")
            }
            _ => panic!("expected a whole message"),
        }
        assert_eq!(buf.bytes(), b"rest");
    }

    #[tokio::test]
    async fn client_literals_wait_for_continuation_once() {
        let mut input: &[u8] = b"a LOGIN {5}\r\n";
        let mut buf = MessageBuf::from_client(1024, 1024);
        assert!(matches!(
            buf.next(&mut input).await,
            Ok(Event::NeedContinuation)
        ));
        let mut more: &[u8] = b"alice x\r\n";
        match buf.next(&mut more).await {
            Ok(Event::Message(len)) => assert_eq!(len, 22),
            _ => panic!("expected a whole message"),
        }
    }

    #[tokio::test]
    async fn endless_message_of_small_literals_is_refused() {
        // Each literal and each line is within the limits; the message as a whole is not.
        let mut input = b"a LOGIN {100+}\r\n".to_vec();
        for _ in 0..100 {
            input.extend_from_slice(&[b'x'; 100]);
            input.extend_from_slice(b" {100+}\r\n");
        }
        let mut input = &input[..];
        let mut buf = MessageBuf::from_client(1024, 1024);
        assert!(matches!(
            buf.next(&mut input).await,
            Err(ReadError::Frame(FrameError::MessageTooLong { limit: 3072 }))
        ));
        assert!(buf.bytes().len() <= 3072 + READ_CHUNK);
    }
}
