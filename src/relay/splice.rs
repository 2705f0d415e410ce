//! Literal data moved between two plain TCP connections without passing through user space.
//! Once the framer has seen a literal's announcement it knows how many of the next bytes are
//! message data that the gateway never looks at; when both legs are plain TCP those bytes go
//! socket -> pipe -> socket with `splice(2)`, which moves page references instead of copying
//! twice through a buffer. Pipes come from a small shared pool and are held only while a
//! literal streams; when none can be had, the caller falls back to the buffered path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Smallest literal remainder worth a pipe: below it the buffered path, whose buffer is
/// already at hand, costs fewer system calls than the two splices per pipe load.
pub const MIN_SPLICE: u64 = 64 * 1024;
/// Pipe capacity asked for: room for two [`LOW_WATER`] loads. Each load costs two `splice`
/// calls. The kernel's per-user allowance (`fs.pipe-user-pages-soft`, 64 MiB) holds 64
/// such pipes; past it new pipes stay small (slower, still correct). Measured on loopback
/// with 2 MB FETCHes: 256 KiB pipes with a 128 KiB low-water mark cost 0.25-0.28 ms of
/// gateway CPU per MB, 512 KiB with 256 KiB 0.24-0.26 (2026-11); on a faster day
/// (2026-12-07), three rounds of each one after the other, 1 MiB with 512 KiB 0.123-0.125
/// against 0.141-0.145 for 512 KiB with 256 KiB.
const PIPE_SIZE: i32 = 1024 * 1024;
/// While a literal streams in, the source socket reports readable only once this much of it
/// (or its rest) has arrived (SO_RCVLOWAT): fewer wake-ups, each moving more. Without it,
/// 0.34 ms per MB in the same benchmark. Only for a backend's responses: a client's APPEND
/// may trickle, and its bytes must go on (and count as activity) as they come.
const LOW_WATER: u64 = 512 * 1024;
/// Most idle pipes kept for reuse (each is two descriptors and no memory while empty).
const MAX_FREE: usize = 32;

static FREE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
/// Cleared when the kernel refuses splice on these sockets (a seccomp filter, say): from
/// then on every literal takes the buffered path.
static USABLE: AtomicBool = AtomicBool::new(true);

/// Idle pipes in the pool (two descriptors each), for leak accounting.
pub fn pooled_pipes() -> usize {
    FREE.lock().unwrap_or_else(PoisonError::into_inner).len()
}

/// Why a splice transfer stopped early.
#[derive(Debug)]
pub enum SpliceError {
    /// The source ended or failed before the literal was complete.
    Source,
    /// The destination failed.
    Sink,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A smaller pipe (the default 64 KiB, or less once the user's allowance is used up)
        // still works, with more calls per megabyte.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(pipe)
    }
}

/// A pipe on loan, with how many bytes sit in it. An empty pipe goes back to the pool; one
/// that still holds bytes (the transfer was abandoned midway) is closed, so that stale data
/// never reaches another session.
struct Loan {
    pipe: Option<Pipe>,
    queued: usize,
}

impl Loan {
    fn take() -> Option<Loan> {
        let pooled = FREE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let pipe = match pooled {
            Some(pipe) => pipe,
            // Out of descriptors, say: the buffered path still works.
            None => Pipe::new().ok()?,
        };
        Some(Loan {
            pipe: Some(pipe),
            queued: 0,
        })
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if self.queued != 0 {
            return;
        }
        if let Some(pipe) = self.pipe.take() {
            let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
            if free.len() < MAX_FREE {
                // Reserved whole once, so giving back never allocates.
                let room = MAX_FREE - free.len();
                free.reserve_exact(room);
                free.push(pipe);
            }
        }
    }
}

/// The source socket's receive low-water mark for the length of a transfer; back to one
/// byte when dropped, however the transfer ends, so that response lines are seen at once.
struct LowWater {
    fd: RawFd,
    set: u64,
}

impl LowWater {
    fn new(fd: RawFd) -> LowWater {
        LowWater { fd, set: 1 }
    }

    /// Asks for `left` bytes or [`LOW_WATER`], whichever is less, before the next wake-up.
    fn expect(&mut self, left: u64) {
        let want = left.clamp(1, LOW_WATER);
        if want != self.set {
            // Only an optimisation: if the kernel refuses it, wake-ups stay per segment.
            if set_rcvlowat(self.fd, want) {
                self.set = want;
            }
        }
    }
}

impl Drop for LowWater {
    fn drop(&mut self) {
        if self.set != 1 {
            set_rcvlowat(self.fd, 1);
        }
    }
}

fn set_rcvlowat(fd: RawFd, bytes: u64) -> bool {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a socket descriptor open for the call and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Errors that say splice cannot work here at all, as opposed to a connection failing.
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
    )
}

/// Writing into a socket the peer reset raises SIGPIPE, which Rust programs ignore (the
/// runtime sets it to SIG_IGN before `main`), so it comes back as EPIPE here.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean
    // "current position", as pipes and sockets require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves `len` bytes from `from` to `to` through a pooled pipe, calling `moved` with each
/// amount delivered to `to`; with `batch`, waits for [`LOW_WATER`] bytes per wake-up. A
/// destination that takes nothing for `stall` fails the transfer.
/// `Ok(false)`: no pipe could be had and nothing was moved; the caller relays the bytes
/// itself. Cancel-safe only in the sense that dropping it loses the
/// bytes in flight: callers drop it only when the session ends.
///
/// Boxed: a future is as large as its largest state, and this one (416 bytes) held inline
/// made every idle session's state larger by that much in each direction. One allocation
/// per spliced literal, which is at least [`MIN_SPLICE`] bytes.
pub fn transfer<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    len: u64,
    batch: bool,
    stall: std::time::Duration,
    moved: impl FnMut(usize) + 'a,
) -> Pin<Box<impl Future<Output = Result<bool, SpliceError>> + 'a>> {
    Box::pin(run_transfer(from, to, len, batch, stall, moved))
}

async fn run_transfer(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    batch: bool,
    stall: std::time::Duration,
    mut moved: impl FnMut(usize),
) -> Result<bool, SpliceError> {
    if !USABLE.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let Some(mut loan) = Loan::take() else {
        return Ok(false);
    };
    let Some(pipe) = loan.pipe.as_ref() else {
        return Ok(false);
    };
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut left = len;
    let mut first = true;
    let mut low_water = LowWater::new(from.as_raw_fd());
    while left > 0 {
        if batch {
            low_water.expect(left);
        }
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing yet.
        let want = usize::try_from(left).unwrap_or(usize::MAX);
        let filled = loop {
            from.readable().await.map_err(|_| SpliceError::Source)?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_w, want)
            }) {
                Ok(0) => return Err(SpliceError::Source),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if first && refused(&e) => {
                    // Nothing has moved yet: the caller can still relay the bytes itself.
                    USABLE.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "splice refused by the kernel; relaying literals through buffers");
                    return Ok(false);
                }
                Err(_) => return Err(SpliceError::Source),
            }
        };
        first = false;
        loan.queued = filled;
        left -= filled as u64;
        while loan.queued > 0 {
            // The pipe holds `queued` bytes, so EAGAIN can only mean the socket is full.
            // A peer that reads nothing for `stall` is treated as gone.
            match tokio::time::timeout(stall, to.writable()).await {
                Ok(Ok(())) => {}
                _ => return Err(SpliceError::Sink),
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r, to.as_raw_fd(), loan.queued)
            }) {
                Ok(0) => return Err(SpliceError::Sink),
                Ok(n) => {
                    loan.queued -= n;
                    moved(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(SpliceError::Sink),
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn moves_exactly_the_literal_and_leaves_what_follows() {
        let (mut src_w, src_r) = pair().await;
        let (dst_w, mut dst_r) = pair().await;
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let body = body.clone();
            async move {
                src_w.write_all(&body).await.unwrap();
                src_w.write_all(b")\r\nA1 OK done\r\n").await.unwrap();
                src_w
            }
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 3_000_000];
            dst_r.read_exact(&mut got).await.unwrap();
            got
        });
        let mut total = 0;
        let done = transfer(
            &src_r,
            &dst_w,
            body.len() as u64,
            true,
            std::time::Duration::from_secs(30),
            |n| total += n,
        )
        .await
        .unwrap();
        assert!(done);
        assert_eq!(total, body.len());
        assert_eq!(reader.await.unwrap(), body);
        let _src_w = writer.await.unwrap();
        // What follows the literal is still in the source socket, unread.
        let mut rest = [0u8; 15];
        let mut src_r = src_r;
        src_r.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b")\r\nA1 OK done\r\n");
    }

    #[tokio::test]
    async fn a_source_that_ends_early_is_reported() {
        let (mut src_w, src_r) = pair().await;
        let (dst_w, _dst_r) = pair().await;
        src_w.write_all(&[7u8; 1000]).await.unwrap();
        drop(src_w);
        let mut total = 0;
        let r = transfer(
            &src_r,
            &dst_w,
            5000,
            true,
            std::time::Duration::from_secs(30),
            |n| total += n,
        )
        .await;
        assert!(matches!(r, Err(SpliceError::Source)));
        assert_eq!(total, 1000);
    }
}
