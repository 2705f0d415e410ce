//! The PROXY protocol header (HAProxy's, version 1 text and version 2 binary) that a load
//! balancer sends ahead of a client's own bytes to say whom the connection is really from.
//!
//! This module owns the header format only, without I/O: [`scan`] looks at the bytes received
//! so far and says whether they hold a whole header, how long it is and what it says. It
//! never asks for a byte beyond the header, so the I/O side (`net::proxy`) can leave the
//! client's first IMAP bytes, or a TLS ClientHello, in the socket untouched. [`encode_v2`]
//! makes the header the gateway itself sends to backends that want one. The error type
//! [`ProxyError`] covers the I/O side's failures too, so a rejected connection has one cause
//! and one metric reason.
//!
//! Reference: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use thiserror::Error;

/// Longest v1 header, CRLF included: the spec's worst case is
/// `PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n` (TCP6 with the same fields is
/// 104); a receiver may reject anything longer without looking further.
pub const V1_MAX_LEN: usize = 107;

const V1_PREFIX: &[u8] = b"PROXY ";

/// The 12 bytes every v2 header starts with. They cannot begin an IMAP command or a TLS
/// record, which is what makes the two versions and a client without a header tell apart.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version and command, family and transport, and the 2-byte payload length.
pub const V2_HEAD_LEN: usize = 16;

/// Largest v2 payload accepted (addresses plus TLVs). Addresses take at most 216 bytes (the
/// UNIX family); load balancers add a few TLVs (AWS VPC endpoint id, Azure link id, TLS
/// details with a client certificate's CN, a unique id), a few hundred bytes together.
/// The 16-bit length field would allow 64 KiB; a header that big is not one we should hold.
pub const V2_MAX_PAYLOAD: usize = 2048;

/// The longest header of either version, and so the most a reader ever buffers.
pub const MAX_HEADER_LEN: usize = V2_HEAD_LEN + V2_MAX_PAYLOAD;

/// Sizes of the v2 address blocks: two addresses, two ports.
const V2_INET_LEN: usize = 4 + 4 + 2 + 2;
const V2_INET6_LEN: usize = 16 + 16 + 2 + 2;

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The client's address and the address it connected to (the load balancer's front).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client behind it: v2 `LOCAL` (a load balancer's own health check), v1 `UNKNOWN`, or
    /// a v2 family the gateway does not serve (UNSPEC, UNIX). The socket's own addresses
    /// stand.
    Local,
}

/// What the bytes received so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The first `len` bytes are a whole header; whatever follows is the client's.
    Complete { header: ProxyHeader, len: usize },
    /// Every byte so far belongs to a header that is not finished yet: the reader may consume
    /// them all and must wait for more.
    Incomplete,
}

/// Why a connection on a PROXY-protocol listener was closed before its session began.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// The socket peer is not in the listener's `proxy_trusted_networks`: its header, whatever
    /// it says, would be a lie we cannot check.
    #[error("peer {0} is not in proxy_trusted_networks")]
    Untrusted(IpAddr),
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("PROXY header longer than {max} bytes")]
    TooLong { max: usize },
    /// The peer closed after `received` bytes of header (0: a plain TCP health check).
    #[error("connection closed after {received} bytes of PROXY header")]
    Closed { received: usize },
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Looks at the start of a connection's bytes (everything received so far, header bytes
/// consumed earlier included).
pub fn scan(buf: &[u8]) -> Result<Scan, ProxyError> {
    match buf.first() {
        None => Ok(Scan::Incomplete),
        Some(&b) if b == V1_PREFIX[0] => scan_v1(buf),
        Some(&b) if b == V2_SIGNATURE[0] => scan_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Whether `buf` starts like `expected` as far as both go.
fn agrees(buf: &[u8], expected: &[u8]) -> bool {
    let n = buf.len().min(expected.len());
    buf[..n] == expected[..n]
}

fn scan_v1(buf: &[u8]) -> Result<Scan, ProxyError> {
    if !agrees(buf, V1_PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = memchr::memchr(b'\n', window) else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::TooLong { max: V1_MAX_LEN })
        } else {
            Ok(Scan::Incomplete)
        };
    };
    if lf < V1_PREFIX.len() || buf[lf - 1] != b'\r' {
        return Err(ProxyError::V1("line does not end in CRLF"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..lf - 1])
        .map_err(|_| ProxyError::V1("not ASCII"))?;
    let header = parse_v1(line)?;
    Ok(Scan::Complete {
        header,
        len: lf + 1,
    })
}

/// `TCP4 SRC DST SPORT DPORT`, `TCP6 ...`, or `UNKNOWN` with anything after it.
fn parse_v1(line: &str) -> Result<ProxyHeader, ProxyError> {
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The spec lets the sender put anything after UNKNOWN; the receiver ignores it.
        return Ok(ProxyHeader::Local);
    }
    let parts: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = parts[..] else {
        return Err(ProxyError::V1("expected TCP4|TCP6 SRC DST SPORT DPORT"));
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::V1("bad IPv4 source"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::V1("bad IPv4 destination"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::V1("bad IPv6 source"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::V1("bad IPv6 destination"))?
                .into(),
        ),
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(src, parse_port(sport)?),
        destination: SocketAddr::new(dst, parse_port(dport)?),
    })
}

fn parse_port(text: &str) -> Result<u16, ProxyError> {
    // Digits only: `u16::from_str` would also take "+143".
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::V1("bad port"));
    }
    text.parse().map_err(|_| ProxyError::V1("bad port"))
}

fn scan_v2(buf: &[u8]) -> Result<Scan, ProxyError> {
    if !agrees(buf, &V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    let Some(head) = buf.get(..V2_HEAD_LEN) else {
        return Ok(Scan::Incomplete);
    };
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    let payload_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if version != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    if payload_len > V2_MAX_PAYLOAD {
        return Err(ProxyError::TooLong {
            max: MAX_HEADER_LEN,
        });
    }
    let len = V2_HEAD_LEN + payload_len;
    let Some(payload) = buf.get(V2_HEAD_LEN..len) else {
        return Ok(Scan::Incomplete);
    };
    const LOCAL: u8 = 0x0;
    const PROXY: u8 = 0x1;
    const UNSPEC: u8 = 0x0;
    const INET: u8 = 0x1;
    const INET6: u8 = 0x2;
    const UNIX: u8 = 0x3;
    const STREAM: u8 = 0x1;
    const DGRAM: u8 = 0x2;
    if family > UNIX || transport > DGRAM {
        return Err(ProxyError::V2("unknown address family or transport"));
    }
    let header = match command {
        // The load balancer speaking for itself (health checks): the spec says to use the
        // connection's real endpoints and ignore whatever address block there is.
        LOCAL => ProxyHeader::Local,
        PROXY => match (family, transport) {
            (UNSPEC | UNIX, _) | (INET | INET6, UNSPEC) => ProxyHeader::Local,
            (INET | INET6, STREAM) => v2_addresses(family == INET6, payload)?,
            _ => return Err(ProxyError::V2("datagram transport over a stream")),
        },
        _ => return Err(ProxyError::V2("command is neither LOCAL nor PROXY")),
    };
    // TLVs after the addresses are skipped: nothing in them changes how a session runs, and
    // their total length is already bounded by V2_MAX_PAYLOAD.
    Ok(Scan::Complete { header, len })
}

fn v2_addresses(inet6: bool, payload: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let truncated = ProxyError::V2("address block shorter than its family needs");
    let (source, destination, ports): (IpAddr, IpAddr, &[u8]) = if inet6 {
        let block = payload.get(..V2_INET6_LEN).ok_or(truncated)?;
        let ip = |range: std::ops::Range<usize>| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&block[range]);
            IpAddr::from(a)
        };
        (ip(0..16), ip(16..32), &block[32..36])
    } else {
        let block = payload.get(..V2_INET_LEN).ok_or(truncated)?;
        let ip = |at: usize| IpAddr::from([block[at], block[at + 1], block[at + 2], block[at + 3]]);
        (ip(0), ip(4), &block[8..12])
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
    })
}

/// The v2 header a gateway sends ahead of its own bytes on a backend connection, saying the
/// connection is for `source` (the client) connecting to `destination` (the address the client
/// connected to). Both addresses go out in one family, as the format has no mixed block:
/// TCP4 when both are IPv4 (an IPv4-mapped IPv6 address counts as IPv4, so a dual-stack
/// listener's clients are not logged as `::ffff:a.b.c.d`), else TCP6 with any IPv4 address
/// mapped. No TLVs: a backend needs only the addresses.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    const PROXY_V2: u8 = 0x21;
    const TCP4: u8 = 0x11;
    const TCP6: u8 = 0x21;
    let (src, dst) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let mut out = Vec::with_capacity(V2_HEAD_LEN + V2_INET6_LEN);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(PROXY_V2);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP4);
            out.extend_from_slice(&(V2_INET_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.push(TCP6);
            out.extend_from_slice(&(V2_INET6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAP: &[u8] = b"a1 CAPABILITY\r\n";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: sa(source),
            destination: sa(destination),
        }
    }

    /// A v2 header: command, family/transport byte, payload.
    fn v2(command: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(fam);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn inet_payload() -> Vec<u8> {
        let mut p = vec![203, 0, 113, 7, 10, 0, 0, 1];
        p.extend_from_slice(&51234u16.to_be_bytes());
        p.extend_from_slice(&993u16.to_be_bytes());
        p
    }

    fn inet6_payload(tlvs: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut p = src.octets().to_vec();
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&143u16.to_be_bytes());
        p.extend_from_slice(tlvs);
        p
    }

    /// A few TLVs as load balancers send them: ALPN, AUTHORITY, an AWS VPC endpoint id.
    fn tlvs() -> Vec<u8> {
        let mut t = Vec::new();
        for (kind, value) in [
            (0x01u8, &b"imap"[..]),
            (0x02, b"imap.example.org"),
            (0xea, b"\x01vpce-0123456789abcdef"),
        ] {
            t.push(kind);
            t.extend_from_slice(&(value.len() as u16).to_be_bytes());
            t.extend_from_slice(value);
        }
        t
    }

    /// Every good header, with what it must parse to.
    fn good() -> Vec<(Vec<u8>, ProxyHeader)> {
        vec![
            (
                b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 993\r\n".to_vec(),
                proxied("203.0.113.7:51234", "10.0.0.1:993"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 fd00::1 40000 143\r\n".to_vec(),
                proxied("[2001:db8::7]:40000", "[fd00::1]:143"),
            ),
            (
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                  ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
                    .to_vec(),
                proxied(
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                ),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Local),
            (
                b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                  ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
                    .to_vec(),
                ProxyHeader::Local,
            ),
            (
                b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n".to_vec(),
                ProxyHeader::Local,
            ),
            (
                v2(0x1, 0x11, &inet_payload()),
                proxied("203.0.113.7:51234", "10.0.0.1:993"),
            ),
            (
                v2(0x1, 0x21, &inet6_payload(&tlvs())),
                proxied("[2001:db8::7]:40000", "[fd00::1]:143"),
            ),
            (v2(0x0, 0x00, &[]), ProxyHeader::Local),
            // LOCAL ignores whatever address block comes with it.
            (v2(0x0, 0x11, &inet_payload()), ProxyHeader::Local),
            (v2(0x1, 0x00, &[]), ProxyHeader::Local),
            (v2(0x1, 0x31, &[0; 216]), ProxyHeader::Local),
            (v2(0x1, 0x10, &inet_payload()), ProxyHeader::Local),
        ]
    }

    #[test]
    fn the_longest_v1_header_fits() {
        let good = good();
        assert_eq!(good[2].0.len(), 104, "TCP6, every field at its longest");
        assert_eq!(good[4].0.len(), V1_MAX_LEN, "UNKNOWN, likewise");
    }

    #[test]
    fn good_headers_at_every_split() {
        for (header, expected) in good() {
            let mut bytes = header.clone();
            bytes.extend_from_slice(IMAP);
            // Every proper prefix: incomplete, never an error, never complete.
            for cut in 0..header.len() {
                assert_eq!(
                    scan(&bytes[..cut]).unwrap(),
                    Scan::Incomplete,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(&header)
                );
            }
            // From the full header on, with any amount of the client's bytes behind it: the
            // same header, the same length, never a byte of the client's.
            for end in header.len()..=bytes.len() {
                assert_eq!(
                    scan(&bytes[..end]).unwrap(),
                    Scan::Complete {
                        header: expected,
                        len: header.len()
                    },
                    "{:?} up to {end}",
                    String::from_utf8_lossy(&header)
                );
            }
        }
    }

    #[test]
    fn a_tls_client_hello_behind_the_header_is_not_touched() {
        let mut bytes = v2(0x1, 0x11, &inet_payload());
        let len = bytes.len();
        // A TLS record header: handshake, TLS 1.0 record version, length.
        bytes.extend_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
        assert!(matches!(scan(&bytes), Ok(Scan::Complete { len: l, .. }) if l == len));
    }

    fn assert_rejected(bytes: &[u8], what: &str) {
        // Rejected once the bad byte is in, and at every later split: the reader must never
        // get a different answer for having received more.
        let first_bad = (0..=bytes.len())
            .find(|&n| scan(&bytes[..n]).is_err())
            .unwrap_or_else(|| panic!("{what}: never rejected"));
        for end in first_bad..=bytes.len() {
            assert!(scan(&bytes[..end]).is_err(), "{what}: accepted at {end}");
        }
        for end in 0..first_bad {
            assert_eq!(scan(&bytes[..end]).unwrap(), Scan::Incomplete, "{what}");
        }
    }

    #[test]
    fn bad_v1_headers() {
        let long = format!("PROXY TCP4 {} 10.0.0.1 1 2\r\n", "1".repeat(100));
        for (bytes, what) in [
            (
                &b"a1 LOGIN alice secret\r\n"[..],
                "IMAP instead of a header",
            ),
            (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "misspelt"),
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "lower case"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF only"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "a port missing"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "a field too many"),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "two spaces"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv6 in TCP4"),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv4 in TCP6"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port too big"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "signed port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "negative port"),
            (
                b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
                "octal-looking address",
            ),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "UDP"),
            (b"PROXY \r\n", "nothing"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n", "not ASCII"),
            (long.as_bytes(), "longer than 107 bytes"),
        ] {
            assert_rejected(bytes, what);
        }
        // A line that never ends is refused at 107 bytes, not read on for ever.
        let mut endless = V1_PREFIX.to_vec();
        endless.resize(V1_MAX_LEN - 1, b'1');
        assert_eq!(scan(&endless).unwrap(), Scan::Incomplete);
        endless.push(b'1');
        assert!(matches!(
            scan(&endless),
            Err(ProxyError::TooLong { max: 107 })
        ));
    }

    #[test]
    fn bad_v2_headers() {
        let mut version1 = v2(0x1, 0x11, &inet_payload());
        version1[12] = 0x11;
        let too_long = {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11]);
            h.extend_from_slice(&((V2_MAX_PAYLOAD + 1) as u16).to_be_bytes());
            h
        };
        let mut bad_signature = v2(0x1, 0x11, &inet_payload());
        bad_signature[11] = b'X';
        for (bytes, what) in [
            (bad_signature, "signature"),
            (version1, "version 1 in binary"),
            (v2(0x2, 0x11, &inet_payload()), "unknown command"),
            (v2(0x1, 0x41, &inet_payload()), "unknown family"),
            (v2(0x1, 0x13, &inet_payload()), "unknown transport"),
            (v2(0x1, 0x12, &inet_payload()), "UDP"),
            (v2(0x1, 0x11, &inet_payload()[..11]), "INET block cut short"),
            (v2(0x1, 0x21, &inet_payload()), "INET6 family, INET block"),
            (too_long, "payload over the limit"),
            (
                b"\x16\x03\x01\x02\x00".to_vec(),
                "a TLS ClientHello without header",
            ),
        ] {
            assert_rejected(&bytes, what);
        }
    }

    #[test]
    fn the_largest_allowed_v2_header_is_accepted() {
        let mut payload = inet_payload();
        payload.resize(V2_MAX_PAYLOAD, 0);
        let header = v2(0x1, 0x11, &payload);
        assert_eq!(header.len(), MAX_HEADER_LEN);
        assert!(matches!(
            scan(&header),
            Ok(Scan::Complete {
                len: MAX_HEADER_LEN,
                ..
            })
        ));
    }

    /// The encoder's output, read back by the parser the gateway's own listeners use.
    fn decoded(bytes: &[u8]) -> ProxyHeader {
        match scan(bytes) {
            Ok(Scan::Complete { header, len }) => {
                assert_eq!(len, bytes.len(), "the header is all of it");
                header
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encoded_v2_round_trips_through_the_parser() {
        for (source, destination) in [
            ("203.0.113.7:51234", "10.0.0.1:993"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[2001:db8::7]:40000", "[fd00::1]:143"),
            ("[::1]:1", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ] {
            let bytes = encode_v2(sa(source), sa(destination));
            assert_eq!(decoded(&bytes), proxied(source, destination), "{source}");
        }
    }

    #[test]
    fn encoded_v2_is_the_documented_layout() {
        let bytes = encode_v2(sa("203.0.113.7:51234"), sa("10.0.0.1:993"));
        assert_eq!(bytes, v2(0x1, 0x11, &inet_payload()));
        let bytes = encode_v2(sa("[2001:db8::7]:40000"), sa("[fd00::1]:143"));
        assert_eq!(bytes, v2(0x1, 0x21, &inet6_payload(&[])));
    }

    #[test]
    fn encoded_v2_uses_one_family_for_both_addresses() {
        // A dual-stack listener sees IPv4 clients as mapped addresses: they go out as TCP4.
        let bytes = encode_v2(
            sa("[::ffff:203.0.113.7]:51234"),
            sa("[::ffff:10.0.0.1]:993"),
        );
        assert_eq!(
            decoded(&bytes),
            proxied("203.0.113.7:51234", "10.0.0.1:993")
        );
        // Mixed families (not from one socket, but from a header and a socket): TCP6.
        let bytes = encode_v2(sa("203.0.113.7:51234"), sa("[fd00::1]:143"));
        assert_eq!(
            decoded(&bytes),
            proxied("[::ffff:203.0.113.7]:51234", "[fd00::1]:143")
        );
    }
}
