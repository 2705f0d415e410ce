//! imap-codec glue for the only commands the gateway parses in full: those it answers before
//! login. The caller frames the whole command (line and literals) first; imap-codec's failure
//! carries no tag, so the tag of a malformed command comes from the pre-scanner.

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::CommandBody;
use zeroize::Zeroizing;

use super::prescan::{self, CommandName};

/// A SASL mechanism the gateway can run with a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// A pre-authentication command, decoded into owned values.
pub enum PreauthCommand {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id,
    Login {
        user: String,
        password: Zeroizing<Vec<u8>>,
    },
    Authenticate {
        mechanism: Option<Mechanism>,
        initial_response: Option<Zeroizing<Vec<u8>>>,
    },
    /// A well-formed command that is not allowed before login.
    NotAllowed(CommandName),
}

/// Why a framed command could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeFailure {
    /// Not valid IMAP; carries the tag when the line started with one.
    Malformed { tag: Option<Vec<u8>> },
}

/// Decodes one complete framed command (its line, literals and final CRLF).
pub fn decode_preauth(framed: &[u8]) -> Result<(Vec<u8>, PreauthCommand), DecodeFailure> {
    let malformed = || DecodeFailure::Malformed {
        tag: prescan::tag_of(framed).map(<[u8]>::to_vec),
    };
    let (_, command) = CommandCodec::default()
        .decode(framed)
        .map_err(|_| malformed())?;
    let tag = command.tag.as_ref().as_bytes().to_vec();
    let body = match command.body {
        CommandBody::Capability => PreauthCommand::Capability,
        CommandBody::Noop => PreauthCommand::Noop,
        CommandBody::Logout => PreauthCommand::Logout,
        CommandBody::StartTLS => PreauthCommand::StartTls,
        CommandBody::Id { .. } => PreauthCommand::Id,
        CommandBody::Login { username, password } => {
            let user = String::from_utf8(username.as_ref().to_vec()).map_err(|_| malformed())?;
            PreauthCommand::Login {
                user,
                password: Zeroizing::new(password.declassify().as_ref().to_vec()),
            }
        }
        CommandBody::Authenticate {
            mechanism,
            initial_response,
        } => PreauthCommand::Authenticate {
            mechanism: match mechanism {
                AuthMechanism::Plain => Some(Mechanism::Plain),
                AuthMechanism::Login => Some(Mechanism::Login),
                _ => None,
            },
            initial_response: initial_response
                .map(|ir| Zeroizing::new(ir.declassify().as_ref().to_vec())),
        },
        _ => PreauthCommand::NotAllowed(
            prescan::prescan(framed).map_or(CommandName::Other, |p| p.name),
        ),
    };
    Ok((tag, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_login_with_literals() {
        let (tag, cmd) = decode_preauth(b"a1 LOGIN {5}\r\nalice \"pw\\\"x\"\r\n").unwrap();
        assert_eq!(tag, b"a1");
        match cmd {
            PreauthCommand::Login { user, password } => {
                assert_eq!(user, "alice");
                assert_eq!(&password[..], b"pw\"x");
            }
            _ => panic!("not a login"),
        }
    }

    #[test]
    fn decodes_authenticate_with_initial_response() {
        let (_, cmd) = decode_preauth(b"t AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n").unwrap();
        match cmd {
            PreauthCommand::Authenticate {
                mechanism,
                initial_response,
            } => {
                assert_eq!(mechanism, Some(Mechanism::Plain));
                assert_eq!(initial_response.unwrap().as_slice(), b"\0alice\0pw");
            }
            _ => panic!("not authenticate"),
        }
    }

    #[test]
    fn classifies_other_commands() {
        assert!(matches!(
            decode_preauth(b"x SELECT INBOX\r\n").unwrap().1,
            PreauthCommand::NotAllowed(CommandName::Select)
        ));
        assert!(matches!(
            decode_preauth(b"x ID NIL\r\n").unwrap().1,
            PreauthCommand::Id
        ));
        assert_eq!(
            decode_preauth(b"x7 LOGIN\r\n").err(),
            Some(DecodeFailure::Malformed {
                tag: Some(b"x7".to_vec())
            })
        );
        assert_eq!(
            decode_preauth(b"(( garbage\r\n").err(),
            Some(DecodeFailure::Malformed { tag: None })
        );
    }
}
