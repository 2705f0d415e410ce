//! The `user` parameter of `/admin/route` and `/admin/kick`: finding it in a query string and
//! undoing `application/x-www-form-urlencoded` escaping (`%XX`, `+` for space), which is what
//! `curl --data-urlencode` and browsers produce. Small enough not to need a crate.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("missing query parameter {0:?}")]
    Missing(&'static str),
    #[error("query parameter {0:?} is empty")]
    Empty(&'static str),
    #[error("query parameter {0:?} has a bad %-escape")]
    BadEscape(&'static str),
    #[error("query parameter {0:?} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("query parameter {0:?} holds a control character")]
    Control(&'static str),
}

/// The decoded value of the first `name` parameter in `query` (the part after `?`).
pub fn param(query: Option<&str>, name: &'static str) -> Result<String, QueryError> {
    let raw = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| decode(key).is_some_and(|k| k == name.as_bytes()))
        .map(|(_, value)| value)
        .ok_or(QueryError::Missing(name))?;
    let bytes = decode(raw).ok_or(QueryError::BadEscape(name))?;
    let value = String::from_utf8(bytes).map_err(|_| QueryError::NotUtf8(name))?;
    if value.is_empty() {
        return Err(QueryError::Empty(name));
    }
    // No user name holds one (IMAP forbids them), and they would let a value forge log lines.
    if value.chars().any(char::is_control) {
        return Err(QueryError::Control(name));
    }
    Ok(value)
}

/// Undoes form escaping; None on a `%` not followed by two hex digits.
fn decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = hex(bytes.next()?)?;
                let lo = hex(bytes.next()?)?;
                out.push(hi << 4 | lo);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    Some(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_decodes_the_parameter() {
        let p = |q: &str| param(Some(q), "user");
        assert_eq!(p("user=alice").unwrap(), "alice");
        assert_eq!(
            p("x=1&user=carol%40example.org&user=bob").unwrap(),
            "carol@example.org"
        );
        assert_eq!(p("us%65r=a+b%2Bc").unwrap(), "a b+c");
        assert_eq!(p("user=J%C3%BCrgen").unwrap(), "Jürgen");
        assert_eq!(p("user=%7e%7E").unwrap(), "~~");
    }

    #[test]
    fn rejects_what_cannot_be_a_user_name() {
        let p = |q: &str| param(Some(q), "user");
        assert_eq!(param(None, "user"), Err(QueryError::Missing("user")));
        assert_eq!(p("usr=alice"), Err(QueryError::Missing("user")));
        assert_eq!(p("user="), Err(QueryError::Empty("user")));
        assert_eq!(p("user"), Err(QueryError::Empty("user")));
        assert_eq!(p("user=a%"), Err(QueryError::BadEscape("user")));
        assert_eq!(p("user=a%4"), Err(QueryError::BadEscape("user")));
        assert_eq!(p("user=a%zz"), Err(QueryError::BadEscape("user")));
        assert_eq!(p("user=a%ff"), Err(QueryError::NotUtf8("user")));
        assert_eq!(p("user=a%0Ab"), Err(QueryError::Control("user")));
        // A multi-byte character split by the escape must not panic.
        assert_eq!(p("user=%é"), Err(QueryError::BadEscape("user")));
    }
}
