//! Who may call `/admin/*`: the bearer-token check, and the loopback-only rule when no token
//! is configured. A pure decision, so every case is testable without a socket.

use std::net::SocketAddr;

use subtle::ConstantTimeEq;

/// The outcome of the check for one `/admin/*` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// A token is configured and the request did not carry it: 401.
    Unauthorized,
    /// No token is configured and the admin server listens beyond loopback: 403. Without a
    /// token anyone who can reach the port could reload or kick, so that is refused outright
    /// rather than trusted to a network policy.
    Forbidden,
}

/// Decides whether an `/admin/*` request may proceed.
///
/// `listener` is the address the admin server is bound to (not the connection's local
/// address: a server bound to `0.0.0.0` is exposed even to a client that happens to come in
/// over loopback). `authorization` is the raw `Authorization` header, when present.
pub fn decide(listener: SocketAddr, token: Option<&str>, authorization: Option<&[u8]>) -> Decision {
    match token {
        Some(expected) => match authorization.and_then(bearer) {
            Some(given) if bool::from(given.ct_eq(expected.as_bytes())) => Decision::Allowed,
            _ => Decision::Unauthorized,
        },
        None if listener.ip().to_canonical().is_loopback() => Decision::Allowed,
        None => Decision::Forbidden,
    }
}

/// The credentials of a `Bearer` authorization header (RFC 6750 section 2.1; the scheme name
/// is case-insensitive, RFC 9110 section 11.1).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = header.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LOOPBACK: &str = "127.0.0.1:9143";

    #[test]
    fn a_configured_token_must_be_presented_exactly() {
        let t = Some("s3cret");
        let d = |h: Option<&[u8]>| decide(addr("0.0.0.0:9143"), t, h);
        assert_eq!(d(Some(b"Bearer s3cret")), Decision::Allowed);
        assert_eq!(d(Some(b"bearer s3cret")), Decision::Allowed);
        assert_eq!(d(Some(b"BEARER  s3cret ")), Decision::Allowed);
        assert_eq!(d(None), Decision::Unauthorized);
        assert_eq!(d(Some(b"Bearer s3cre")), Decision::Unauthorized);
        assert_eq!(d(Some(b"Bearer s3cretX")), Decision::Unauthorized);
        assert_eq!(d(Some(b"Bearer ")), Decision::Unauthorized);
        assert_eq!(d(Some(b"Bearer")), Decision::Unauthorized);
        assert_eq!(d(Some(b"Bearers3cret")), Decision::Unauthorized);
        assert_eq!(d(Some(b"Basic s3cret")), Decision::Unauthorized);
        assert_eq!(d(Some(b"s3cret")), Decision::Unauthorized);
        assert_eq!(d(Some(b"")), Decision::Unauthorized);
        assert_eq!(d(Some(b"\xff\xfe")), Decision::Unauthorized);
    }

    #[test]
    fn a_token_is_needed_on_loopback_too_once_configured() {
        let d = decide(addr(LOOPBACK), Some("s3cret"), None);
        assert_eq!(d, Decision::Unauthorized);
    }

    #[test]
    fn without_a_token_only_a_loopback_listener_is_open() {
        for open in [
            LOOPBACK,
            "127.1.2.3:1",
            "[::1]:9143",
            "[::ffff:127.0.0.1]:9143",
        ] {
            assert_eq!(decide(addr(open), None, None), Decision::Allowed, "{open}");
        }
        for exposed in [
            "0.0.0.0:9143",
            "[::]:9143",
            "192.0.2.7:9143",
            "[2001:db8::1]:1",
        ] {
            assert_eq!(
                decide(addr(exposed), None, Some(b"Bearer anything")),
                Decision::Forbidden,
                "{exposed}"
            );
        }
    }
}
