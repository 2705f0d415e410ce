//! Reading the client's commands in a session with mounts. A command is held whole when it
//! is small (the gateway must read its mailbox names before it knows where it goes), and the
//! gateway answers `+` to the client's synchronizing literals itself. A literal too big to
//! hold (an APPEND's message) ends the held part: the caller routes the command on what it
//! has and streams the rest.

use tokio::io::AsyncWriteExt;

use super::wire::{Wire, WireError};
use crate::proto::framer::{FrameError, Framer, Literal, Piece};

/// Literals up to this size are held in memory with their command: mailbox names, search
/// strings, flags. Anything larger is message data and is streamed.
pub const MAX_INLINE_LITERAL: u64 = 64 * 1024;

/// A held command never grows past this (a command line plus a few inline literals).
const MAX_HELD_COMMAND: usize = 256 * 1024;

const CONTINUE: &[u8] = b"+ Ready for literal data\r\n";

pub enum Incoming {
    /// A whole command. Synchronizing literal announcements are rewritten to `{N+}`, since
    /// the client already got its `+` from the gateway.
    Whole { cmd: Vec<u8>, literals: bool },
    /// The start of a command, up to and including the line that announced `literal`, whose
    /// data has not been read. The framer stands inside the literal.
    Big { head: Vec<u8>, literal: Literal },
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("client: {0}")]
    Wire(#[from] WireError),
    #[error("command over {MAX_HELD_COMMAND} bytes")]
    TooLong,
}

pub struct CommandReader {
    pub framer: Framer,
}

impl CommandReader {
    pub fn new(max_line: usize, max_literal: u64) -> Self {
        Self {
            framer: Framer::new(max_line, max_literal),
        }
    }

    pub async fn next(&mut self, client: &mut Wire) -> Result<Incoming, CommandError> {
        let mut cmd = Vec::new();
        let mut literals = false;
        loop {
            if client.buffered().is_empty() {
                client.fill(16 * 1024).await?;
            }
            let piece = self
                .framer
                .next(client.buffered())
                .map_err(|e| CommandError::Wire(WireError::Frame(e)))?;
            let len = match piece {
                Piece::Line { len, .. } | Piece::LiteralData { len, .. } => len,
            };
            if cmd.len() + len > MAX_HELD_COMMAND {
                return Err(CommandError::TooLong);
            }
            let bytes = &client.buffered()[..len];
            match piece {
                Piece::Line {
                    literal: Some(lit), ..
                } if lit.size > MAX_INLINE_LITERAL => {
                    cmd.extend_from_slice(bytes);
                    client.consume(len);
                    return Ok(Incoming::Big {
                        head: cmd,
                        literal: lit,
                    });
                }
                Piece::Line {
                    literal: Some(lit), ..
                } => {
                    literals = true;
                    if lit.sync {
                        push_nonsync(&mut cmd, bytes);
                        client.consume(len);
                        client
                            .stream
                            .write_all(CONTINUE)
                            .await
                            .map_err(WireError::Io)?;
                    } else {
                        cmd.extend_from_slice(bytes);
                        client.consume(len);
                    }
                }
                _ => {
                    cmd.extend_from_slice(bytes);
                    client.consume(len);
                }
            }
            if matches!(piece, Piece::Line { complete: true, .. }) && self.framer.at_message_start()
            {
                return Ok(Incoming::Whole { cmd, literals });
            }
        }
    }

    /// The backend refused a synchronizing literal just announced: the client will not send it.
    pub fn abandon(&mut self) {
        self.framer.abandon_literal();
    }

    /// Drops the rest of a command the gateway refused after [`Incoming::Big`]: the literal
    /// if the client is sending it (non-synchronizing), and whatever follows, up to the end
    /// of the command. A synchronizing literal was never invited, so the client sends nothing.
    pub async fn skip_rest(&mut self, client: &mut Wire, sync: bool) -> Result<(), CommandError> {
        if sync {
            self.framer.abandon_literal();
            return Ok(());
        }
        loop {
            if self.framer.at_message_start() {
                return Ok(());
            }
            if client.buffered().is_empty() {
                client.fill(16 * 1024).await?;
            }
            let piece = self
                .framer
                .next(client.buffered())
                .map_err(|e: FrameError| CommandError::Wire(WireError::Frame(e)))?;
            match piece {
                Piece::Line {
                    len,
                    literal: Some(lit),
                    ..
                } if lit.sync => {
                    client.consume(len);
                    self.framer.abandon_literal();
                }
                Piece::Line { len, .. } | Piece::LiteralData { len, .. } => client.consume(len),
            }
        }
    }
}

/// Copies a line that ends in a synchronizing literal announcement (`{N}` or `~{N}`, then
/// CRLF or LF) as its non-synchronizing form `{N+}`.
fn push_nonsync(out: &mut Vec<u8>, line: &[u8]) {
    match memchr::memrchr(b'}', line) {
        Some(close) => {
            out.extend_from_slice(&line[..close]);
            out.push(b'+');
            out.extend_from_slice(&line[close..]);
        }
        None => out.extend_from_slice(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_announcements_become_nonsync() {
        let mut out = Vec::new();
        push_nonsync(&mut out, b"a APPEND x {12}\r\n");
        push_nonsync(&mut out, b" ~{3}\n");
        assert_eq!(out, b"a APPEND x {12+}\r\n ~{3+}\n");
    }
}
