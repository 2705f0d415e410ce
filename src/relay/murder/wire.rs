//! Buffered reading of one side of a session with mounts: whole messages for the responses
//! the gateway rewrites, and message-at-a-time forwarding (constant memory, literals
//! included) for everything it passes through.

use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::framer::{FrameError, Framer, HEAD_LEN, Piece, Scan, scan_message};
use crate::stream::Stream;

/// Read buffer per connection: one TLS record.
const BUF_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("message over {0} bytes")]
    TooLong(usize),
    /// A read waited longer than the wire's quiet limit (the client's autologout).
    #[error("nothing received for {0:?}")]
    Quiet(std::time::Duration),
}

/// Where forwarding a message failed.
#[derive(Debug)]
pub enum ForwardError {
    /// Reading from this side failed, between two messages as far as the other side knows.
    Source,
    /// Reading from this side failed after part of a message had gone to the other side:
    /// that side holds a cut message (inside a literal, perhaps), and whatever is written to
    /// it next would be read as the rest of it.
    Cut,
    /// Writing to the other side failed.
    Sink,
}

pub struct Wire {
    pub stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_line: usize,
    /// Bytes read from `stream` are added here (relayed-bytes metrics).
    read_counter: Option<IntCounter>,
    /// Longest wait for a read before [`WireError::Quiet`].
    quiet: Option<std::time::Duration>,
}

impl Wire {
    /// `ahead` are bytes already read from the stream.
    pub fn new(stream: Stream, ahead: Vec<u8>, max_line: usize) -> Self {
        let end = ahead.len();
        let mut buf = ahead;
        buf.resize(BUF_SIZE.max(end), 0);
        Self {
            stream,
            buf,
            start: 0,
            end,
            max_line,
            read_counter: None,
            quiet: None,
        }
    }

    /// Makes every read that waits longer than `limit` fail with [`WireError::Quiet`]: on
    /// the client's wire, the autologout holds wherever the session reads from it, inside
    /// a streamed APPEND literal too.
    pub fn quiet_after(mut self, limit: std::time::Duration) -> Self {
        self.quiet = Some(limit);
        self
    }

    /// Counts every byte read from the stream on `counter`.
    pub fn counted(mut self, counter: IntCounter) -> Self {
        self.read_counter = Some(counter);
        self
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > BUF_SIZE {
                // A large message passed; do not keep its buffer for the whole session.
                self.buf.truncate(BUF_SIZE);
                self.buf.shrink_to_fit();
            }
        }
    }

    /// One read into the buffer; cancel-safe (nothing is lost if the future is dropped).
    /// Grows the buffer when it is full, up to `max` buffered bytes.
    pub async fn fill(&mut self, max: usize) -> Result<(), WireError> {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            if self.end - self.start >= max {
                return Err(WireError::TooLong(max));
            }
            let grown = (self.buf.len() * 2).min(max.max(BUF_SIZE));
            self.buf.resize(grown, 0);
        }
        let read = self.stream.read(&mut self.buf[self.end..]);
        let read = match self.quiet {
            Some(limit) => match tokio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => return Err(WireError::Quiet(limit)),
            },
            None => read.await,
        };
        match read {
            Ok(0) => Err(WireError::Closed),
            Ok(n) => {
                self.end += n;
                if let Some(c) = &self.read_counter {
                    c.inc_by(n as u64);
                }
                Ok(())
            }
            Err(e) => Err(WireError::Io(e)),
        }
    }

    /// Waits until the first line of the next message is complete or [`HEAD_LEN`] bytes of
    /// it are buffered, and returns them.
    pub async fn head(&mut self) -> Result<&[u8], WireError> {
        loop {
            let b = self.buffered();
            if let Some(pos) = memchr::memchr(b'\n', b) {
                return Ok(&self.buf[self.start..self.start + pos + 1]);
            }
            if b.len() >= HEAD_LEN {
                return Ok(&self.buf[self.start..self.start + HEAD_LEN]);
            }
            self.fill(BUF_SIZE).await?;
        }
    }

    /// Reads one whole message (line and literals) of at most `max` bytes and returns it.
    pub async fn whole(&mut self, max: usize) -> Result<Vec<u8>, WireError> {
        let len = self.peek_whole(max).await?;
        let msg = self.buffered()[..len].to_vec();
        self.consume(len);
        Ok(msg)
    }

    /// Waits until one whole message (line and literals) of at most `max` bytes is buffered
    /// and returns its length: it is the first `len` bytes of [`Wire::buffered`] until it is
    /// [`Wire::consume`]d. For callers that copy it somewhere of their own, so that a long
    /// run of messages (a LIST answer) costs no allocation per message.
    pub async fn peek_whole(&mut self, max: usize) -> Result<usize, WireError> {
        loop {
            if let Scan::Complete { len } = scan_message(self.buffered(), self.max_line, u64::MAX)?
            {
                return Ok(len);
            }
            self.fill(max).await?;
        }
    }

    /// Passes one message to `out` (or drops it when `out` is None) without holding it
    /// whole: literal data of any size flows through the fixed buffer.
    pub async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        out: Option<&mut W>,
    ) -> Result<(), ForwardError> {
        self.forward_run(out, |_| false).await
    }

    /// Like [`Wire::forward`], and then goes on with the messages after it while their
    /// first line is already buffered and `more` accepts it, so that a burst of small
    /// responses (a FETCH of many messages) leaves in one write instead of one per message.
    pub async fn forward_run<W: AsyncWrite + Unpin>(
        &mut self,
        mut out: Option<&mut W>,
        more: impl Fn(&[u8]) -> bool,
    ) -> Result<(), ForwardError> {
        let mut framer = Framer::new(self.max_line, u64::MAX);
        // Part of a message went to `out` and the rest has not.
        let mut cut = false;
        let lost = |cut: bool| {
            if cut {
                ForwardError::Cut
            } else {
                ForwardError::Source
            }
        };
        loop {
            if self.start == self.end {
                self.fill(BUF_SIZE).await.map_err(|_| lost(cut))?;
            }
            let mut pos = self.start;
            let mut done = false;
            while pos < self.end {
                match framer.next(&self.buf[pos..self.end]) {
                    Ok(Piece::Line { len, complete, .. }) => {
                        pos += len;
                        if complete && framer.at_message_start() {
                            let rest = &self.buf[pos..self.end];
                            let next_line = memchr::memchr(b'\n', rest).map(|n| &rest[..=n]);
                            if !next_line.is_some_and(&more) {
                                done = true;
                                break;
                            }
                        }
                    }
                    Ok(Piece::LiteralData { len, .. }) => pos += len,
                    Err(_) => return Err(lost(cut)),
                }
            }
            if let Some(w) = out.as_mut() {
                w.write_all(&self.buf[self.start..pos])
                    .await
                    .map_err(|_| ForwardError::Sink)?;
                cut = !framer.at_message_start();
            }
            self.consume(pos - self.start);
            if done {
                return Ok(());
            }
        }
    }

    /// Copies exactly `n` bytes of the stream (a literal's data) to `out`. If `out` fails,
    /// the rest is still read and dropped, so this side stays framed.
    pub async fn copy_exact<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: u64,
        out: &mut W,
    ) -> Result<(), ForwardError> {
        let mut sink_failed = false;
        while n > 0 {
            if self.start == self.end {
                self.fill(BUF_SIZE)
                    .await
                    .map_err(|_| ForwardError::Source)?;
            }
            let take =
                usize::try_from(n).map_or(self.end - self.start, |n| n.min(self.end - self.start));
            if !sink_failed {
                sink_failed = out
                    .write_all(&self.buf[self.start..self.start + take])
                    .await
                    .is_err();
            }
            self.consume(take);
            n -= take as u64;
        }
        if sink_failed {
            return Err(ForwardError::Sink);
        }
        Ok(())
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wire reading what `peer_sends` wrote before closing.
    async fn wire_of(peer_sends: &'static [u8]) -> Wire {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        peer.write_all(peer_sends).await.unwrap();
        drop(peer);
        Wire::new(Stream::Plain(ours), Vec::new(), 1024)
    }

    #[tokio::test]
    async fn a_source_lost_inside_a_forwarded_message_is_a_cut() {
        let mut wire = wire_of(b"* 1 FETCH (BODY[] {10}\r\nabc").await;
        let mut out = Vec::new();
        assert!(matches!(
            wire.forward(Some(&mut out)).await,
            Err(ForwardError::Cut)
        ));
        assert_eq!(out, b"* 1 FETCH (BODY[] {10}\r\nabc");
    }

    #[tokio::test]
    async fn a_source_lost_between_messages_or_while_dropping_is_not() {
        let mut wire = wire_of(b"* OK first\r\n").await;
        let mut out = Vec::new();
        assert!(wire.forward(Some(&mut out)).await.is_ok());
        assert!(matches!(
            wire.forward(Some(&mut out)).await,
            Err(ForwardError::Source)
        ));
        // Nothing of a dropped message reaches anyone: there is nothing to cut.
        let mut wire = wire_of(b"* 1 FETCH (BODY[] {10}\r\nabc").await;
        assert!(matches!(
            wire.forward::<Vec<u8>>(None).await,
            Err(ForwardError::Source)
        ));
    }
}
