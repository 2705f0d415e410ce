//! Read buffers of the relay, held only while data flows. A direction that waits for its peer
//! holds no buffer: it waits until there is something to read (plain TCP: the socket is
//! readable; TLS: rustls holds decrypted data), takes a buffer only then, and gives it back
//! when a read finds nothing more. Idle sessions, the common case, then cost no buffer at
//! all. Buffers go back to a small shared pool, so a busy direction that keeps running dry
//! does not allocate per read.

use std::io;
use std::sync::{Mutex, PoisonError};

use tokio::io::{AsyncReadExt, Interest};
use tokio::net::tcp;

use crate::stream::ReadHalf;

/// Size of a read buffer. 16 KiB matches a TLS record, so one read is one record.
pub const BUF_SIZE: usize = 16 * 1024;
/// Most free buffers kept for reuse (2 MiB); more are freed.
const MAX_FREE: usize = 128;

static FREE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A read buffer; a standard-size one goes back to the pool when dropped.
pub struct Buf(Box<[u8]>);

impl Buf {
    /// A standard-size buffer, from the pool when it has one.
    pub fn take() -> Buf {
        let reused = FREE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        Buf(reused.unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice()))
    }

    /// A buffer holding `bytes`, with room for a read after them when they fit a standard one.
    pub fn with(bytes: &[u8]) -> Buf {
        let mut buf = if bytes.len() < BUF_SIZE {
            Buf::take()
        } else {
            Buf(vec![0; bytes.len()].into_boxed_slice())
        };
        buf.0[..bytes.len()].copy_from_slice(bytes);
        buf
    }

    /// Whether this buffer is of the standard size (one made for a larger start is not).
    pub fn is_standard(&self) -> bool {
        self.0.len() == BUF_SIZE
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.len() != BUF_SIZE {
            return;
        }
        let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < MAX_FREE {
            // Reserved whole once, so giving back never allocates.
            let room = MAX_FREE - free.len();
            free.reserve_exact(room);
            free.push(buf);
        }
    }
}

/// Makes `slot` ready for the next read with `filled` bytes kept at its start: a buffer of a
/// size other than the standard one (made for bytes sent ahead) is replaced by a standard one.
pub fn normalize(slot: &mut Option<Buf>, filled: usize) {
    if let Some(buf) = slot
        && !buf.is_standard()
    {
        *slot = (filled > 0).then(|| Buf::with(&buf[..filled]));
    }
}

/// One read from a plain socket. A read that fills less than `buf` has drained the socket
/// (epoll is edge-triggered), so the socket's readiness is cleared with it: the next read
/// then waits for the next edge instead of making a `recv` that can only say `EAGAIN`, one
/// wasted system call per direction per command. The readiness is cleared as of before this
/// read, the way tokio's own `poll_read` does, so data that arrives meanwhile is not missed.
fn read_draining(r: &tcp::ReadHalf<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut partial = 0;
    let read = r
        .as_ref()
        .try_io(Interest::READABLE, || match r.try_read(buf) {
            Ok(n) if 0 < n && n < len => {
                partial = n;
                Err(io::ErrorKind::WouldBlock.into())
            }
            done => done,
        });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && partial > 0 => Ok(partial),
        done => done,
    }
}

/// Reads into the buffer in `slot` after its first `filled` bytes and returns how many came
/// (0 at the end of the stream). The wait for data happens without a buffer: an empty buffer
/// goes back to the pool first, and one is taken once there is data.
/// Cancel-safe: dropped while waiting, `slot` holds what it held, or nothing.
pub async fn read_into(
    r: &mut ReadHalf<'_>,
    slot: &mut Option<Buf>,
    filled: usize,
) -> io::Result<usize> {
    match r {
        ReadHalf::Plain(r) => loop {
            if let Some(buf) = slot {
                match read_draining(r, &mut buf[filled..]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    done => return done,
                }
                if filled == 0 {
                    *slot = None;
                }
            }
            // The socket's own waker slot, not `readable()`: that future holds a waiter node
            // of 168 bytes, and an idle session waits here in both directions. One task
            // reads each half, so the single slot is enough.
            std::future::poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await?;
            if slot.is_none() {
                *slot = Some(Buf::take());
            }
        },
        ReadHalf::Tls(r) => {
            // Decrypted data may wait inside rustls while the socket is not readable, so the
            // socket's readiness says nothing; rustls is asked instead. The buffer is given
            // back only when that would wait, so data that keeps coming keeps its buffer.
            if filled == 0 {
                std::future::poll_fn(|cx| {
                    let ready = r.poll_ready(cx);
                    if ready.is_pending() {
                        *slot = None;
                    }
                    ready
                })
                .await?;
            }
            let buf = slot.get_or_insert_with(Buf::take);
            r.read(&mut buf[filled..]).await
        }
        // An in-memory pipe (fuzzing only) has no readiness to wait on without a buffer.
        ReadHalf::Memory(r) => {
            let buf = slot.get_or_insert_with(Buf::take);
            r.read(&mut buf[filled..]).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// One `read_into` at the start of `slot`, which must answer within five seconds.
    async fn read_once(r: &mut ReadHalf<'_>, slot: &mut Option<Buf>) -> usize {
        tokio::time::timeout(Duration::from_secs(5), read_into(r, slot, 0))
            .await
            .unwrap()
            .unwrap()
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// A partial read clears the socket's readiness; data that comes after it, at once or
    /// later, must still wake the next read.
    #[tokio::test]
    async fn a_partial_read_does_not_lose_the_next_data() {
        let (mut writer, mut reader) = pair().await;
        let (r, _w) = reader.split();
        let mut r = ReadHalf::Plain(r);
        let mut slot = None;

        writer.write_all(b"a1 NOOP\r\n").await.unwrap();
        let n = read_once(&mut r, &mut slot).await;
        assert_eq!(&slot.as_ref().unwrap()[..n], b"a1 NOOP\r\n");

        // Sent before the next read starts: the readiness cleared above is not this data's.
        writer.write_all(b"a2 NOOP\r\n").await.unwrap();
        let n = read_once(&mut r, &mut slot).await;
        assert_eq!(&slot.as_ref().unwrap()[..n], b"a2 NOOP\r\n");

        // Sent while the read waits.
        let late = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(b"a3 NOOP\r\n").await.unwrap();
        };
        let (n, ()) = tokio::join!(read_once(&mut r, &mut slot), late);
        assert_eq!(&slot.as_ref().unwrap()[..n], b"a3 NOOP\r\n");

        drop(writer);
        let n = read_once(&mut r, &mut slot).await;
        assert_eq!(n, 0, "the end of the stream reads as 0");
    }

    /// A read that fills the buffer leaves the readiness set: the rest is read without a wait.
    #[tokio::test]
    async fn a_full_read_is_followed_by_the_rest() {
        let (mut writer, mut reader) = pair().await;
        let (r, _w) = reader.split();
        let mut r = ReadHalf::Plain(r);
        let mut slot = None;
        let data = vec![b'x'; BUF_SIZE + 100];
        writer.write_all(&data).await.unwrap();
        let mut total = 0;
        while total < data.len() {
            let n = read_once(&mut r, &mut slot).await;
            assert!(n > 0);
            total += n;
        }
        assert_eq!(total, data.len());
    }
}
