//! A TCP connection that may or may not be wrapped in TLS, for either side of the gateway
//! (or, for fuzzing, an in-memory pipe).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, tcp};
use tokio_rustls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// One end of an in-memory pipe (`tokio::io::duplex`). The gateway never makes one: it
    /// exists so the fuzz targets can drive the pre-auth dialogue without sockets, which
    /// would cap a fuzzer at a few thousand runs a second and leave TIME_WAIT behind.
    Memory(tokio::io::DuplexStream),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Borrows the two directions separately. Plain TCP splits without a lock or an
    /// allocation, and its reading half can wait for data without a buffer; TLS shares one
    /// connection state between both directions behind a lock (see [`TlsReadHalf`]).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let shared = Arc::new(Mutex::new(s.as_mut()));
                (
                    ReadHalf::Tls(TlsReadHalf(shared.clone())),
                    WriteHalf::Tls(TlsWriteHalf(shared)),
                )
            }
            Stream::Memory(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Memory(r), WriteHalf::Memory(w))
            }
        }
    }

    /// The TCP stream underneath (for peer/local addresses); None for an in-memory stream.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Memory(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Memory(s) => s.is_write_vectored(),
        }
    }
}

/// The reading direction of a borrowed [`Stream`] (see [`Stream::split`]).
pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(TlsReadHalf<'a>),
    Memory(tokio::io::ReadHalf<&'a mut tokio::io::DuplexStream>),
}

/// The writing direction of a borrowed [`Stream`] (see [`Stream::split`]).
pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(TlsWriteHalf<'a>),
    Memory(tokio::io::WriteHalf<&'a mut tokio::io::DuplexStream>),
}

/// One TLS connection shared by its two halves. `tokio::io::split` would do the same, but
/// its reading half offers only `poll_read`, which needs the caller's buffer to wait in;
/// this one can also wait for decrypted data without one ([`TlsReadHalf::poll_ready`]).
/// The lock is held for one poll at a time, never across an await; the relay polls both
/// halves from one task, so it is not contended.
type SharedTls<'a> = Arc<Mutex<&'a mut TlsStream<TcpStream>>>;

fn lock<'g, 'a>(shared: &'g SharedTls<'a>) -> MutexGuard<'g, &'a mut TlsStream<TcpStream>> {
    // Poisoned only by a poll that panicked, which unwinds the task that holds both halves:
    // no one is left to be misled by the state it left.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reading direction of a TLS [`Stream`].
pub struct TlsReadHalf<'a>(SharedTls<'a>);

/// The writing direction of a TLS [`Stream`].
pub struct TlsWriteHalf<'a>(SharedTls<'a>);

impl TlsReadHalf<'_> {
    /// Ready once a read would not wait: decrypted data is held by rustls, or the stream
    /// ended or failed. It reads and decrypts what the socket has, but takes none of the
    /// plaintext, so the caller needs no buffer until there is something to put in it.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = lock(&self.0);
        // A read that returned data may have met an error behind it, which tokio-rustls
        // keeps for the next poll_read; poll_fill_buf does not look there, and could wait
        // on a socket that has nothing more to say. A read of nothing returns that error.
        ready!(Pin::new(&mut **tls).poll_read(cx, &mut ReadBuf::new(&mut [])))?;
        Pin::new(&mut **tls).poll_fill_buf(cx).map_ok(|_| ())
    }
}

impl AsyncRead for TlsReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut tls = lock(&self.0);
        Pin::new(&mut **tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsWriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut tls = lock(&self.0);
        Pin::new(&mut **tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = lock(&self.0);
        Pin::new(&mut **tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tls = lock(&self.0);
        Pin::new(&mut **tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut tls = lock(&self.0);
        Pin::new(&mut **tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        lock(&self.0).is_write_vectored()
    }
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(s) => s.is_write_vectored(),
            WriteHalf::Tls(s) => s.is_write_vectored(),
            WriteHalf::Memory(s) => s.is_write_vectored(),
        }
    }
}
