//! Reading the PROXY protocol header off a freshly accepted connection, for listeners with
//! `proxy_protocol = true`: who may send one, how long it may take, and where the client's
//! address then comes from. The format itself is `proto::proxy`.
//!
//! Not one byte past the header is taken from the socket: the reader peeks, and consumes
//! only bytes the parser has placed inside the header. What the client sent behind it (its
//! first command, or the ClientHello of an implicit-TLS connection) stays in the socket for
//! the session or the TLS handshake, whether it came in the same packet or later.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::cidr::Cidr;
use crate::metrics::ProxyRejected;
use crate::proto::proxy::{MAX_HEADER_LEN, ProxyError, ProxyHeader, Scan, scan};

/// How long a trusted peer has to deliver its whole header, within the pre-auth deadline.
/// A load balancer writes the header at once, as its first bytes, over a fast internal
/// network; one that has not done so in this time is broken or is not a load balancer, and
/// waiting the full pre-auth period for it only holds a connection open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A listener's PROXY protocol settings, parsed at bind.
#[derive(Debug, Clone)]
pub struct ProxyPolicy {
    pub trusted: Vec<Cidr>,
}

impl ProxyPolicy {
    /// Refuses a socket peer whose header we would have to take on faith.
    pub fn check_peer(&self, peer: SocketAddr) -> Result<(), ProxyError> {
        if Cidr::any_contains(&self.trusted, peer.ip()) {
            Ok(())
        } else {
            Err(ProxyError::Untrusted(peer.ip()))
        }
    }
}

/// The metric reason for a rejected connection, or `None` when it is not worth counting: a
/// trusted peer that closes without sending a byte is a load balancer's TCP health check,
/// not a bad header.
pub fn rejected_reason(error: &ProxyError) -> Option<ProxyRejected> {
    match error {
        ProxyError::Untrusted(_) => Some(ProxyRejected::Untrusted),
        ProxyError::Timeout(_) => Some(ProxyRejected::Timeout),
        ProxyError::Closed { received: 0 } => None,
        ProxyError::NotProxy
        | ProxyError::V1(_)
        | ProxyError::V2(_)
        | ProxyError::TooLong { .. }
        | ProxyError::Closed { .. }
        | ProxyError::Io(_) => Some(ProxyRejected::Malformed),
    }
}

/// The client's and the local address of the connection: the header's when it names a
/// client, the socket's for LOCAL and unknown families.
pub fn addresses(
    header: ProxyHeader,
    peer: SocketAddr,
    local: SocketAddr,
) -> (SocketAddr, SocketAddr) {
    match header {
        ProxyHeader::Proxied {
            source,
            destination,
        } => (source, destination),
        ProxyHeader::Local => (peer, local),
    }
}

/// Reads one header from `tcp`, leaving every byte after it in the socket. Unbounded in
/// time: the caller puts a deadline on it.
pub async fn read_header(tcp: &mut TcpStream) -> Result<ProxyHeader, ProxyError> {
    // Header bytes consumed so far, then the bytes peeked behind them.
    let mut seen: Vec<u8> = Vec::with_capacity(MAX_HEADER_LEN);
    let mut peeked = vec![0u8; MAX_HEADER_LEN];
    loop {
        let consumed = seen.len();
        let room = MAX_HEADER_LEN - consumed;
        if room == 0 {
            // `scan` refuses a header before it grows this long; this only keeps the loop
            // bounded should that ever change.
            return Err(ProxyError::TooLong {
                max: MAX_HEADER_LEN,
            });
        }
        let n = match tcp.peek(&mut peeked[..room]).await {
            Ok(0) => return Err(ProxyError::Closed { received: consumed }),
            Ok(n) => n,
            // A reset is a close too: HAProxy ends its plain TCP health checks with an RST
            // (to spare its own ports TIME_WAIT), and such a check is no bad header.
            Err(e) if is_reset(&e) => return Err(ProxyError::Closed { received: consumed }),
            Err(e) => return Err(e.into()),
        };
        seen.extend_from_slice(&peeked[..n]);
        // Consume the header's bytes among those peeked, no more. Incomplete means all of
        // them are header; taking them is what makes the next peek wait for new bytes
        // instead of returning the same ones at once.
        let (result, take) = match scan(&seen)? {
            Scan::Complete { header, len } => (Some(header), len - consumed),
            Scan::Incomplete => (None, n),
        };
        // The bytes are in the socket already (just peeked), so this does not wait.
        tcp.read_exact(&mut peeked[..take]).await?;
        if let Some(header) = result {
            return Ok(header);
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    /// Writes `bytes` in pieces of `size`, each its own segment, while the server reads.
    async fn header_in_pieces(bytes: &[u8], size: usize) -> (ProxyHeader, Vec<u8>) {
        let (mut client, mut server) = pair().await;
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(size) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let header = read_header(&mut server).await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        writer.await.unwrap();
        (header, rest)
    }

    #[tokio::test]
    async fn bytes_after_the_header_stay_in_the_socket() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 143\r\n".to_vec();
        let mut v2 = crate::proto::proxy::V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1]);
        v2.extend_from_slice(&[0xc8, 0x22, 0, 143]);
        let after = b"a1 CAPABILITY\r\n";
        for header in [v1, v2] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(after);
            for size in [1, 2, 7, 16, header.len(), bytes.len()] {
                let (got, rest) = header_in_pieces(&bytes, size).await;
                assert_eq!(
                    got,
                    ProxyHeader::Proxied {
                        source: "203.0.113.7:51234".parse().unwrap(),
                        destination: "10.0.0.1:143".parse().unwrap(),
                    }
                );
                assert_eq!(rest, after, "pieces of {size}");
            }
        }
    }

    #[tokio::test]
    async fn garbage_and_early_close_are_errors() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"a1 LOGIN alice pw\r\n").await.unwrap();
        assert!(matches!(
            read_header(&mut server).await,
            Err(ProxyError::NotProxy)
        ));
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(ProxyError::Closed { received: 14 })
        ));
        let (client, mut server) = pair().await;
        drop(client);
        let e = read_header(&mut server).await.unwrap_err();
        assert!(matches!(e, ProxyError::Closed { received: 0 }));
        assert_eq!(rejected_reason(&e), None);
    }

    /// HAProxy closes its TCP health checks with an RST (SO_LINGER 0), not a FIN: the same
    /// silent health check, not a malformed header.
    #[tokio::test]
    async fn a_health_check_closed_by_reset_is_not_counted() {
        let (client, mut server) = pair().await;
        client.set_zero_linger().unwrap();
        drop(client);
        let e = read_header(&mut server).await.unwrap_err();
        assert!(matches!(e, ProxyError::Closed { received: 0 }), "{e:?}");
        assert_eq!(rejected_reason(&e), None);
        // A reset half way through a header is a header cut short: counted.
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), async {
            // Once the server has the bytes, the reset follows them.
            while server.peek(&mut [0u8; 14]).await.unwrap() < 14 {}
            client.set_zero_linger().unwrap();
            drop(client);
            read_header(&mut server).await.unwrap_err()
        })
        .await
        .unwrap();
        assert!(matches!(e, ProxyError::Closed { received: 14 }), "{e:?}");
        assert_eq!(rejected_reason(&e), Some(ProxyRejected::Malformed));
    }

    /// CPU time this process has used (user and system), from /proc/self/stat.
    fn cpu_time() -> Duration {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ, 100 on every Linux architecture the gateway runs on.
        Duration::from_millis(ticks * 10)
    }

    /// A peer that sends part of a header and then nothing must cost nothing while it is
    /// waited for. `peek` returns at once while unread bytes are in the socket, so a reader
    /// that peeks without consuming what it has seen spins a core until the deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_the_rest_of_a_header_does_not_spin() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 203.0.113.7 ").await.unwrap();
        let reader = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), read_header(&mut server)).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (cpu, wall) = (cpu_time(), std::time::Instant::now());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let used = cpu_time() - cpu;
        let elapsed = wall.elapsed();
        assert!(
            used < elapsed / 4,
            "{used:?} of CPU in {elapsed:?} while waiting for the rest of a header"
        );
        // The header still completes once the rest arrives.
        client.write_all(b"10.0.0.1 51234 143\r\n").await.unwrap();
        let header = reader.await.unwrap().expect("no timeout").unwrap();
        assert!(matches!(header, ProxyHeader::Proxied { .. }));
    }

    #[test]
    fn trust_is_by_socket_peer() {
        let policy = ProxyPolicy {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(policy.check_peer("10.1.2.3:5000".parse().unwrap()).is_ok());
        assert!(
            policy
                .check_peer("[::ffff:10.1.2.3]:5000".parse().unwrap())
                .is_ok()
        );
        let e = policy
            .check_peer("127.0.0.1:5000".parse().unwrap())
            .unwrap_err();
        assert_eq!(rejected_reason(&e), Some(ProxyRejected::Untrusted));
    }
}
