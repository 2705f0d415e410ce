//! The gateway's own responses: status lines and the string quoting they need.

use std::io::Write;

/// Appends `s` as an IMAP quoted string, or returns false when it cannot be one (CR, LF, NUL
/// or 8-bit bytes need a literal).
pub fn push_quoted(out: &mut Vec<u8>, s: &[u8]) -> bool {
    if s.iter()
        .any(|&b| b == b'\r' || b == b'\n' || b == 0 || b >= 0x80)
    {
        return false;
    }
    out.push(b'"');
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    true
}

/// `<tag> <status> [<code>] <text>\r\n`; an empty tag gives an untagged (`*`) line.
pub fn status(tag: &[u8], status: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + text.len() + 32);
    if tag.is_empty() {
        out.push(b'*');
    } else {
        out.extend_from_slice(tag);
    }
    // Writing to a Vec cannot fail.
    let _ = match code {
        Some(code) => write!(out, " {status} [{code}] {text}\r\n"),
        None => write!(out, " {status} {text}\r\n"),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let mut out = Vec::new();
        assert!(push_quoted(&mut out, b"a\"b\\c"));
        assert_eq!(out, b"\"a\\\"b\\\\c\"");
        assert!(!push_quoted(&mut out, "é".as_bytes()));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status(b"a1", "NO", Some("UNAVAILABLE"), "try later"),
            b"a1 NO [UNAVAILABLE] try later\r\n"
        );
        assert_eq!(status(b"", "BYE", None, "bye"), b"* BYE bye\r\n");
    }
}

/// The status of a tagged or untagged status response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

/// A status response line, split: `tag status [code] text`.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusLine<'a> {
    /// `*` for untagged responses.
    pub tag: &'a str,
    pub status: Status,
    /// The response code without brackets, e.g. `CAPABILITY IMAP4rev1 ...`.
    pub code: Option<&'a str>,
    pub text: &'a str,
}

/// Splits a status response line (with or without its CRLF); None for other responses.
pub fn parse_status_line(line: &[u8]) -> Option<StatusLine<'_>> {
    let line = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches(['\r', '\n']);
    let (tag, rest) = line.split_once(' ')?;
    let (status, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match status.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        "BYE" => Status::Bye,
        "PREAUTH" => Status::Preauth,
        _ => return None,
    };
    let (code, text) = match rest.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((code, text)) => (Some(code), text.trim_start()),
            None => (None, rest),
        },
        None => (None, rest),
    };
    Some(StatusLine {
        tag,
        status,
        code,
        text,
    })
}

/// The capability list in a `CAPABILITY ...` response code or untagged response.
pub fn capability_text(s: &str) -> Option<&str> {
    let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
    word.eq_ignore_ascii_case("CAPABILITY").then_some(rest)
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let s = parse_status_line(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n").unwrap();
        assert_eq!(s.tag, "a1");
        assert_eq!(s.status, Status::Ok);
        assert_eq!(capability_text(s.code.unwrap()), Some("IMAP4rev1 IDLE"));
        assert_eq!(s.text, "Logged in");
        let s = parse_status_line(b"* BYE\r\n").unwrap();
        assert_eq!((s.tag, s.status, s.code), ("*", Status::Bye, None));
        assert!(parse_status_line(b"* 3 EXISTS\r\n").is_none());
        assert!(parse_status_line(b"* CAPABILITY X\r\n").is_none());
    }
}
