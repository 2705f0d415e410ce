//! A passwd-file the gateway verifies client passwords against when it logs in to backends
//! with master credentials (it must not let a user in on the master's word alone).
//! Format as Dovecot's: `user:{SCHEME}hash[:more fields ignored]`.

use std::collections::HashMap;
use std::path::Path;

use sha_crypt::{PasswordHashRef, PasswordVerifier, ShaCrypt};
use subtle::ConstantTimeEq;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PassDbError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Debug, Clone)]
enum Hash {
    Plain(Vec<u8>),
    ShaCrypt(String),
}

/// Users and their password hashes. Debug output never shows the hashes.
#[derive(Clone, Default)]
pub struct PassDb {
    users: HashMap<String, Hash>,
    /// A crypt hash of the file, checked for unknown users so that they take as long as
    /// known ones: the answer time must not tell which user names exist.
    decoy: Option<String>,
}

impl std::fmt::Debug for PassDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PassDb({} users)", self.users.len())
    }
}

impl PassDb {
    pub fn load(path: &Path) -> Result<Self, PassDbError> {
        let text = std::fs::read_to_string(path).map_err(|source| PassDbError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| PassDbError::Invalid {
            path: path.display().to_string(),
            problems,
        })
    }

    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let mut users = HashMap::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split(':');
            let (Some(user), Some(pass)) = (fields.next(), fields.next()) else {
                problems.push(format!("line {}: expected user:password", n + 1));
                continue;
            };
            let hash = match pass.strip_prefix('{').and_then(|p| p.split_once('}')) {
                Some((scheme, rest)) => match scheme.to_ascii_uppercase().as_str() {
                    "PLAIN" | "CLEARTEXT" => Hash::Plain(rest.as_bytes().to_vec()),
                    "SHA256-CRYPT" | "SHA512-CRYPT" | "CRYPT" if is_sha_crypt(rest) => {
                        Hash::ShaCrypt(rest.to_owned())
                    }
                    other => {
                        problems.push(format!("line {}: unsupported scheme {other}", n + 1));
                        continue;
                    }
                },
                None if is_sha_crypt(pass) => Hash::ShaCrypt(pass.to_owned()),
                None => {
                    problems.push(format!(
                        "line {}: password needs a {{SCHEME}} prefix",
                        n + 1
                    ));
                    continue;
                }
            };
            if let Hash::ShaCrypt(h) = &hash
                && PasswordHashRef::new(h).is_err()
            {
                problems.push(format!("line {}: malformed crypt hash", n + 1));
                continue;
            }
            users.insert(user.to_owned(), hash);
        }
        if problems.is_empty() {
            let decoy = users.values().find_map(|h| match h {
                Hash::ShaCrypt(h) => Some(h.clone()),
                Hash::Plain(_) => None,
            });
            Ok(Self { users, decoy })
        } else {
            Err(problems)
        }
    }

    /// Whether `password` is right for `user`. Crypt schemes are slow on purpose: call this
    /// off the async runtime.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(Hash::Plain(p)) => p.as_slice().ct_eq(password).into(),
            Some(Hash::ShaCrypt(h)) => verify_crypt(h, password),
            None => {
                if let Some(decoy) = &self.decoy {
                    verify_crypt(decoy, password);
                }
                false
            }
        }
    }
}

fn verify_crypt(hash: &str, password: &[u8]) -> bool {
    PasswordHashRef::new(hash)
        .map(|h| ShaCrypt::default().verify_password(password, h).is_ok())
        .unwrap_or(false)
}

fn is_sha_crypt(s: &str) -> bool {
    s.starts_with("$5$") || s.starts_with("$6$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_plain_and_crypt() {
        // "secret" hashed with SHA512-CRYPT (salt "saltsalt").
        let db = PassDb::parse(
            "alice:{PLAIN}pw1\n\
             bob:{SHA512-CRYPT}$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1::::\n",
        )
        .unwrap();
        assert!(db.verify("alice", b"pw1"));
        assert!(!db.verify("alice", b"pw2"));
        assert!(db.verify("bob", b"secret"));
        assert!(!db.verify("bob", b"Secret"));
        assert!(!db.verify("carol", b"pw1"));
        assert!(!format!("{db:?}").contains("pw1"));
    }

    #[test]
    fn reports_every_bad_line() {
        let err = PassDb::parse("a\nb:{MD5}x\nc:nohash\nd:{PLAIN}ok\n").unwrap_err();
        assert_eq!(err.len(), 3, "{err:?}");
    }
}
