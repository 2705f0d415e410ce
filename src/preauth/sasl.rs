//! The server side of the SASL mechanisms the gateway runs with clients (PLAIN, LOGIN): an
//! I/O-free exchange that yields challenges and finally the user and password.

use base64::Engine;
use zeroize::Zeroizing;

use crate::proto::command::Mechanism;

/// What the exchange wants next.
pub enum Step {
    /// Send this continuation line and feed the client's answer to `respond`.
    Challenge(&'static [u8]),
    Done {
        user: String,
        password: Zeroizing<Vec<u8>>,
    },
    Cancelled,
    Malformed,
}

pub struct Exchange {
    mechanism: Mechanism,
    /// Decoded client responses so far.
    responses: Vec<Zeroizing<Vec<u8>>>,
    failed: Option<Step>,
}

impl Exchange {
    pub fn new(mechanism: Mechanism, initial: Option<Zeroizing<Vec<u8>>>) -> Self {
        Self {
            mechanism,
            responses: initial.into_iter().collect(),
            failed: None,
        }
    }

    /// Feeds one client line (base64, or `*` to cancel).
    pub fn respond(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"*" {
            self.failed = Some(Step::Cancelled);
            return;
        }
        match base64::engine::general_purpose::STANDARD.decode(line) {
            Ok(bytes) => self.responses.push(Zeroizing::new(bytes)),
            Err(_) => self.failed = Some(Step::Malformed),
        }
    }

    pub fn step(&mut self) -> Step {
        if let Some(f) = self.failed.take() {
            return f;
        }
        match self.mechanism {
            Mechanism::Plain => match self.responses.first() {
                None => Step::Challenge(b"+ \r\n"),
                Some(r) => plain(r),
            },
            Mechanism::Login => match self.responses.len() {
                // "Username:" and "Password:", base64.
                0 => Step::Challenge(b"+ VXNlcm5hbWU6\r\n"),
                1 => Step::Challenge(b"+ UGFzc3dvcmQ6\r\n"),
                _ => match String::from_utf8(self.responses[0].to_vec()) {
                    Ok(user) if !user.is_empty() => Step::Done {
                        user,
                        password: self.responses[1].clone(),
                    },
                    _ => Step::Malformed,
                },
            },
        }
    }
}

/// Splits `authzid NUL authcid NUL password` (RFC 4616). An authorization identity other
/// than the user's own would be a proxy login, which clients are not allowed.
fn plain(r: &[u8]) -> Step {
    let mut parts = r.splitn(3, |&b| b == 0);
    let (Some(authz), Some(authc), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Step::Malformed;
    };
    if authc.is_empty() || (!authz.is_empty() && authz != authc) {
        return Step::Malformed;
    }
    match String::from_utf8(authc.to_vec()) {
        Ok(user) => Step::Done {
            user,
            password: Zeroizing::new(pass.to_vec()),
        },
        Err(_) => Step::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(step: Step) -> (String, Vec<u8>) {
        match step {
            Step::Done { user, password } => (user, password.to_vec()),
            _ => panic!("not done"),
        }
    }

    #[test]
    fn plain_with_and_without_initial_response() {
        let mut e = Exchange::new(Mechanism::Plain, Some(Zeroizing::new(b"\0u\0p".to_vec())));
        assert_eq!(done(e.step()), ("u".into(), b"p".to_vec()));
        let mut e = Exchange::new(Mechanism::Plain, None);
        assert!(matches!(e.step(), Step::Challenge(b"+ \r\n")));
        e.respond(b"dQB1AHA=\r\n"); // "u\0u\0p"
        assert_eq!(done(e.step()), ("u".into(), b"p".to_vec()));
    }

    #[test]
    fn login_mechanism_and_cancel() {
        let mut e = Exchange::new(Mechanism::Login, None);
        assert!(matches!(e.step(), Step::Challenge(_)));
        e.respond(b"dQ==\r\n");
        assert!(matches!(e.step(), Step::Challenge(_)));
        e.respond(b"cA==\r\n");
        assert_eq!(done(e.step()), ("u".into(), b"p".to_vec()));
        let mut e = Exchange::new(Mechanism::Login, None);
        e.step();
        e.respond(b"*\r\n");
        assert!(matches!(e.step(), Step::Cancelled));
    }

    #[test]
    fn rejects_foreign_authzid_and_garbage() {
        let mut e = Exchange::new(Mechanism::Plain, Some(Zeroizing::new(b"x\0u\0p".to_vec())));
        assert!(matches!(e.step(), Step::Malformed));
        let mut e = Exchange::new(Mechanism::Plain, None);
        e.step();
        e.respond(b"!!!\r\n");
        assert!(matches!(e.step(), Step::Malformed));
    }
}
