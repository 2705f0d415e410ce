//! Just enough IMAP for a load generator: send pre-built command bytes, then scan the
//! responses for the tagged completion with memchr, skipping literals (`{n}`) by length.
//! Nothing is parsed beyond that, so the client costs far less than the server it measures.

use anyhow::{Result, bail};
use memchr::memchr;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};

use crate::net::Stream;

/// The longest response line (literals excluded) accepted before giving up.
const MAX_LINE: usize = 1 << 20;

/// The successful end of one command: how many literal bytes its responses carried.
#[derive(Debug)]
pub struct Done {
    pub literal_bytes: u64,
}

/// One IMAP connection with a reusable read buffer.
pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The next line continues a response whose previous line announced a literal.
    continued: bool,
}

impl Conn {
    pub fn new(stream: Stream, buf_size: usize) -> Conn {
        Conn {
            stream,
            buf: vec![0; buf_size.max(256)],
            start: 0,
            end: 0,
            continued: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads more bytes into the buffer, making room first.
    async fn fill(&mut self) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_LINE {
                let len = (self.buf.len() * 2).min(MAX_LINE);
                self.buf.resize(len, 0);
            } else {
                bail!("response line longer than {MAX_LINE} bytes");
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        self.end += n;
        Ok(())
    }

    /// The next line, as a range of the buffer without its CRLF; consumed from the buffer.
    /// Cancel-safe: nothing is consumed until a whole line is there.
    async fn next_line(&mut self) -> Result<(usize, usize)> {
        // Bytes after `start` already scanned without finding a newline; fill() may move the
        // data to the front of the buffer but keeps it in order, so this stays valid.
        let mut offset = 0;
        loop {
            if let Some(i) = memchr(b'\n', &self.buf[self.start + offset..self.end]) {
                let nl = self.start + offset + i;
                let line_start = self.start;
                let mut line_end = nl;
                if line_end > line_start && self.buf[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
                self.start = nl + 1;
                return Ok((line_start, line_end));
            }
            offset = self.end - self.start;
            self.fill().await?;
        }
    }

    /// Skips `n` literal bytes, reading and discarding them.
    async fn skip(&mut self, n: u64) -> Result<()> {
        let mut left = n;
        let buffered = (self.end - self.start) as u64;
        let take = buffered.min(left);
        self.start += take as usize;
        left -= take;
        if let Stream::Plain(tcp) = &self.stream {
            // Discard in the kernel, without copying: the client's cost stays small next
            // to the server's. Whatever follows the literal is read normally.
            while left > 0 {
                let want = left.min(1 << 30) as usize;
                tcp.readable().await?;
                match tcp.try_io(Interest::READABLE, || discard(tcp.as_raw_fd(), want)) {
                    Ok(0) => bail!("connection closed by the server inside a literal"),
                    Ok(n) => left -= n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(());
        }
        while left > 0 {
            self.start = 0;
            self.end = 0;
            let got = self.stream.read(&mut self.buf[..]).await?;
            if got == 0 {
                bail!("connection closed by the server inside a literal");
            }
            let got64 = got as u64;
            if got64 > left {
                self.start = left as usize;
                self.end = got;
                left = 0;
            } else {
                left -= got64;
            }
        }
        Ok(())
    }

    /// Reads responses up to the tagged completion of `tag`, skipping literals by length and
    /// showing every untagged line (without literals) to `on_line`.
    pub async fn read_tagged(
        &mut self,
        tag: &[u8],
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<Done> {
        let mut literal_bytes = 0u64;
        loop {
            let (s, e) = self.next_line().await?;
            let continued = std::mem::replace(&mut self.continued, false);
            let line = &self.buf[s..e];
            if let Some(n) = literal_len(line) {
                on_line(line);
                self.continued = true;
                literal_bytes += n;
                self.skip(n).await?;
                continue;
            }
            if !continued
                && line.len() > tag.len()
                && line.starts_with(tag)
                && line[tag.len()] == b' '
            {
                // Only OK is success; NO, BAD and anything else is an error to report.
                if !starts_with_ci(&line[tag.len() + 1..], b"OK") {
                    bail!("{}", lossy(line));
                }
                return Ok(Done { literal_bytes });
            }
            on_line(line);
        }
    }

    /// Reads up to a continuation request (`+ ...`), e.g. the answer to IDLE.
    pub async fn read_continuation(&mut self, tag: &[u8]) -> Result<()> {
        loop {
            let (s, e) = self.next_line().await?;
            let line = &self.buf[s..e];
            if line.first() == Some(&b'+') {
                return Ok(());
            }
            if line.starts_with(tag) && line.get(tag.len()) == Some(&b' ') {
                bail!("{}", lossy(line));
            }
            if let Some(n) = literal_len(line) {
                self.skip(n).await?;
            }
        }
    }

    /// Reads the greeting line; fails unless it is `* OK`.
    pub async fn read_greeting(&mut self) -> Result<()> {
        let (s, e) = self.next_line().await?;
        let line = &self.buf[s..e];
        if !starts_with_ci(line, b"* OK") {
            bail!("greeting: {}", lossy(line));
        }
        Ok(())
    }

    /// Reads untagged lines forever (while idling): returns only with an error, when the
    /// server says BYE or closes. Cancel-safe.
    pub async fn watch_idle(&mut self) -> Result<()> {
        loop {
            let (s, e) = self.next_line().await?;
            let line = &self.buf[s..e];
            if starts_with_ci(line, b"* BYE") {
                bail!("server ended the IDLE: {}", lossy(line));
            }
        }
    }

    /// Sends LOGOUT and reads its completion; the server may close right after.
    pub async fn logout(&mut self) -> Result<()> {
        self.send(b"Z LOGOUT\r\n").await?;
        self.read_tagged(b"Z", |_| {}).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// Reads and drops up to `len` bytes of a TCP socket without copying them
/// (`recv(MSG_TRUNC)`, which TCP sockets support since Linux 2.4.4).
fn discard(fd: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: with MSG_TRUNC and a null buffer the kernel writes nothing to user memory.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::null_mut(),
            len,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The length of the literal a line announces at its end (`{123}` or `{123+}`).
pub fn literal_len(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"}")?;
    let open = memchr::memrchr(b'{', body)?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `* 12 EXISTS` gives 12.
pub fn exists_count(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"* ")?;
    let sp = memchr(b' ', rest)?;
    if !starts_with_ci(&rest[sp + 1..], b"EXISTS") {
        return None;
    }
    std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()
}

pub fn lossy(line: &[u8]) -> String {
    let shown = &line[..line.len().min(200)];
    String::from_utf8_lossy(shown).into_owned()
}

/// Quotes a LOGIN argument (user names and passwords of the benchmark are plain ASCII).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_lengths() {
        assert_eq!(literal_len(b"* 1 FETCH (BODY[] {2097152}"), Some(2_097_152));
        assert_eq!(literal_len(b"a APPEND x {12+}"), Some(12));
        assert_eq!(literal_len(b"* OK {x}"), None);
        assert_eq!(literal_len(b"* OK done"), None);
        assert_eq!(literal_len(b"{}"), None);
    }

    #[test]
    fn exists() {
        assert_eq!(exists_count(b"* 17 EXISTS"), Some(17));
        assert_eq!(exists_count(b"* 0 RECENT"), None);
        assert_eq!(exists_count(b"* OK [UIDNEXT 3]"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
