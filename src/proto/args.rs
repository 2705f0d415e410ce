//! Tokenizer for one complete IMAP message held in memory (a client command or a server
//! response, literals included) and the encoder for IMAP strings.
//!
//! The gateway rewrites mailbox names inside messages it intercepts, so it needs the tokens of a
//! message and their exact byte positions, not a full grammar: this module splits a message into
//! atoms, strings and nested lists and leaves their meaning to the caller. It is strict where a
//! lenient reading could make the gateway and a backend disagree about which mailbox a message
//! names (quoted escapes, token separation, trailing data) and lenient elsewhere (8-bit bytes in
//! atoms and quoted strings, bare LF line ends).

use std::borrow::Cow;
use std::ops::Range;

use super::response::push_quoted;

/// Deepest list nesting accepted. Real traffic nests a few levels (NAMESPACE, BODYSTRUCTURE of
/// nested multiparts); the bound stops a hostile peer from making us build an arbitrarily deep
/// tree out of a message full of `(`.
pub const MAX_DEPTH: usize = 64;

/// Why a message could not be tokenized. Positions are byte offsets in the whole message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// The bytes ran out before the message's final line end (including a literal with fewer
    /// bytes than announced, or a start offset past the end).
    #[error("message ends before its final line end")]
    UnexpectedEnd,
    /// A `)` without its `(`, a list or a `[` section still open at the line end.
    #[error("unbalanced parenthesis or bracket at byte {at}")]
    Unbalanced { at: usize },
    /// Lists nested deeper than [`MAX_DEPTH`].
    #[error("lists nested deeper than {MAX_DEPTH} at byte {at}")]
    TooDeep { at: usize },
    /// A `{` at a token start that is not a well-formed literal announcement followed by a line
    /// end.
    #[error("malformed literal announcement at byte {at}")]
    BadLiteral { at: usize },
    /// A quoted string broken by a line end or holding a backslash before anything but `"` or
    /// `\`.
    #[error("malformed quoted string at byte {at}")]
    BadQuoted { at: usize },
    /// A byte that cannot appear where it is: a bare CR, or a token glued to the next one
    /// (`"a"b`, `abc"d"`).
    #[error("unexpected byte at {at}")]
    Unexpected { at: usize },
    /// Bytes after the line end that ends the message: the caller passed more than one message.
    #[error("data after the message's final line end at byte {at}")]
    TrailingData { at: usize },
}

/// One token of a message and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<'a> {
    /// Byte range of the whole token in the message (for a literal: from `{`, or the `~` of a
    /// BINARY literal, through the last data byte; for a list: from `(` through `)`; for a quoted
    /// string: including both quotes).
    pub range: Range<usize>,
    pub value: Value<'a>,
}

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// An atom-like token: a run of bytes that are not SP, CR, LF, `(`, `)`, `"` (a `{` that is
    /// not at the token start is part of the atom). A `[` inside the token opens a section that
    /// runs to its matching `]` and may contain SP, `(`, `)`, quoted strings and literals (e.g.
    /// `BODY[HEADER.FIELDS (FROM TO)]`, `BODY.PEEK[]<0.100>`, or a response code such as
    /// `[UIDNEXT 5]`, which is returned whole, unparsed). NIL is returned as `Atom(b"NIL")`;
    /// backslash flags like `\Seen` and `\*` are atoms.
    Atom(&'a [u8]),
    /// A quoted string (escapes `\"` and `\\` removed) or a literal's data.
    Str(Cow<'a, [u8]>),
    /// A parenthesized list.
    List(Vec<Item<'a>>),
}

impl<'a> Value<'a> {
    /// The bytes of an astring/nstring: an atom's text or a string's content; None for lists.
    /// NIL gives `Some(b"NIL")`: whether that is a name or nothing depends on the grammar, so
    /// check [`Value::is_nil`] where the grammar allows nil.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Atom(a) => Some(a),
            Value::Str(s) => Some(s),
            Value::List(_) => None,
        }
    }

    /// Whether this is the atom NIL (case-insensitive). The quoted string `"NIL"` is not.
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Atom(a) if a.eq_ignore_ascii_case(b"NIL"))
    }
}

/// Tokenizes `msg[start..]` up to the message's final line end: items separated by one or more
/// spaces (a list may touch its neighbours, as in NAMESPACE's `(...)(...)`). Parenthesized lists
/// nest up to [`MAX_DEPTH`]. Returns the top-level items, with ranges relative to `msg`.
///
/// The first line end outside a literal must be the last bytes of `msg`.
pub fn parse(msg: &[u8], start: usize) -> Result<Vec<Item<'_>>, ArgsError> {
    if start > msg.len() {
        return Err(ArgsError::UnexpectedEnd);
    }
    let mut pos = start;
    // The lists still open: where each began and the items of its parent collected so far.
    // Kept on the heap rather than on the call stack so depth costs no recursion.
    let mut open: Vec<(usize, Vec<Item<'_>>)> = Vec::new();
    let mut items: Vec<Item<'_>> = Vec::new();
    loop {
        while msg.get(pos) == Some(&b' ') {
            pos += 1;
        }
        let Some(&byte) = msg.get(pos) else {
            return Err(ArgsError::UnexpectedEnd);
        };
        let item = match byte {
            b'\r' | b'\n' => {
                let end = line_end(msg, pos).ok_or(ArgsError::Unexpected { at: pos })?;
                if let Some((at, _)) = open.last() {
                    return Err(ArgsError::Unbalanced { at: *at });
                }
                if end != msg.len() {
                    return Err(ArgsError::TrailingData { at: end });
                }
                return Ok(items);
            }
            b'(' => {
                if open.len() >= MAX_DEPTH {
                    return Err(ArgsError::TooDeep { at: pos });
                }
                open.push((pos, std::mem::take(&mut items)));
                pos += 1;
                continue;
            }
            b')' => {
                let Some((at, parent)) = open.pop() else {
                    return Err(ArgsError::Unbalanced { at: pos });
                };
                pos += 1;
                let list = std::mem::replace(&mut items, parent);
                Item {
                    range: at..pos,
                    value: Value::List(list),
                }
            }
            b'"' => quoted(msg, &mut pos)?,
            b'{' => literal(msg, &mut pos)?,
            b'~' if msg.get(pos + 1) == Some(&b'{') => literal(msg, &mut pos)?,
            _ => atom(msg, &mut pos)?,
        };
        items.push(item);
        // A token glued to the next one is read differently by different servers; refusing
        // it keeps the gateway from routing on a reading the backend does not share.
        match msg.get(pos) {
            None | Some(b' ' | b'(' | b')' | b'\r' | b'\n') => {}
            Some(_) => return Err(ArgsError::Unexpected { at: pos }),
        }
    }
}

/// Splits a message's first tokens: returns (tag, the word after it, offset just after that word
/// and the single space following it if any). For `a1 SELECT INBOX\r\n` → (`a1`, `SELECT`, 10);
/// for `* 12 FETCH (...)` → (`*`, `12`, 5); for `+ idling\r\n` → (`+`, `idling`, 8). None if
/// the message does not start with a non-empty tag followed by SP and a non-empty word.
pub fn head(msg: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let tag_len = msg
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))?;
    if tag_len == 0 || msg.get(tag_len) != Some(&b' ') {
        return None;
    }
    let (tag, rest) = msg.split_at(tag_len);
    let rest = rest.get(1..)?;
    let word_len = rest
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(rest.len());
    if word_len == 0 {
        return None;
    }
    let (word, after) = rest.split_at(word_len);
    let mut offset = tag_len + 1 + word_len;
    if after.first() == Some(&b' ') {
        offset += 1;
    }
    Some((tag, word, offset))
}

/// How a string that cannot be quoted is written as a literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteralForm {
    /// `{N+}` (LITERAL+, a command to a server that advertises it: no continuation wait)
    NonSync,
    /// `{N}` (in a response to a client: servers never wait)
    Server,
}

/// Appends `s` as an IMAP string: a quoted string when every byte is 0x01..=0x7F and not CR or LF
/// (escape `"` and `\` with a backslash; empty → `""`), otherwise a literal `{len+}\r\n<bytes>`
/// or `{len}\r\n<bytes>`. A NUL byte is not legal in a plain literal either; it is written as one
/// anyway so the peer, not the gateway, decides how to reject it.
pub fn push_string(out: &mut Vec<u8>, s: &[u8], form: LiteralForm) {
    if push_quoted(out, s) {
        return;
    }
    out.push(b'{');
    out.extend_from_slice(s.len().to_string().as_bytes());
    if form == LiteralForm::NonSync {
        out.push(b'+');
    }
    out.extend_from_slice(b"}\r\n");
    out.extend_from_slice(s);
}

/// The offset just past the line end (CRLF or bare LF) at `pos`, None if there is none.
fn line_end(msg: &[u8], pos: usize) -> Option<usize> {
    match (msg.get(pos), msg.get(pos + 1)) {
        (Some(b'\n'), _) => Some(pos + 1),
        (Some(b'\r'), Some(b'\n')) => Some(pos + 2),
        _ => None,
    }
}

/// Reads `{N}`, `{N+}` or `{N-}` at `brace` and the line end after it: returns where the data
/// starts and how long it is, or None when the bytes are not such an announcement.
fn literal_header(msg: &[u8], brace: usize) -> Option<(usize, usize)> {
    if msg.get(brace) != Some(&b'{') {
        return None;
    }
    let digits = brace + 1;
    let mut i = digits;
    let mut len: usize = 0;
    while let Some(&d) = msg.get(i).filter(|d| d.is_ascii_digit()) {
        len = len.checked_mul(10)?.checked_add(usize::from(d - b'0'))?;
        i += 1;
    }
    if i == digits {
        return None;
    }
    if matches!(msg.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    if msg.get(i) != Some(&b'}') {
        return None;
    }
    Some((line_end(msg, i + 1)?, len))
}

/// The end of a literal's data, checked against the message.
fn literal_end(msg: &[u8], data: usize, len: usize) -> Result<usize, ArgsError> {
    data.checked_add(len)
        .filter(|&end| end <= msg.len())
        .ok_or(ArgsError::UnexpectedEnd)
}

/// A literal whose `{` (or BINARY `~`) is at `*pos`.
fn literal<'a>(msg: &'a [u8], pos: &mut usize) -> Result<Item<'a>, ArgsError> {
    let start = *pos;
    let brace = if msg.get(start) == Some(&b'~') {
        start + 1
    } else {
        start
    };
    let (data, len) = literal_header(msg, brace).ok_or(ArgsError::BadLiteral { at: start })?;
    let end = literal_end(msg, data, len)?;
    let bytes = msg.get(data..end).ok_or(ArgsError::UnexpectedEnd)?;
    *pos = end;
    Ok(Item {
        range: start..end,
        value: Value::Str(Cow::Borrowed(bytes)),
    })
}

/// A quoted string whose opening `"` is at `*pos`.
fn quoted<'a>(msg: &'a [u8], pos: &mut usize) -> Result<Item<'a>, ArgsError> {
    let start = *pos;
    let body = start + 1;
    // Borrowed until the first escape: most strings have none.
    let mut unescaped: Option<Vec<u8>> = None;
    let mut i = body;
    loop {
        match msg.get(i) {
            None => return Err(ArgsError::UnexpectedEnd),
            Some(b'"') => break,
            Some(b'\r' | b'\n') => return Err(ArgsError::BadQuoted { at: start }),
            Some(b'\\') => {
                // Servers differ on other escapes (some drop the backslash, some keep it, some
                // refuse); refusing is the only reading that cannot disagree with the backend.
                let escaped = match msg.get(i + 1) {
                    Some(&c @ (b'"' | b'\\')) => c,
                    None => return Err(ArgsError::UnexpectedEnd),
                    Some(_) => return Err(ArgsError::BadQuoted { at: i }),
                };
                let buf = match unescaped.as_mut() {
                    Some(buf) => buf,
                    None => unescaped.insert(msg.get(body..i).unwrap_or_default().to_vec()),
                };
                buf.push(escaped);
                i += 2;
            }
            Some(&c) => {
                if let Some(buf) = unescaped.as_mut() {
                    buf.push(c);
                }
                i += 1;
            }
        }
    }
    let value = match unescaped {
        Some(buf) => Cow::Owned(buf),
        None => Cow::Borrowed(msg.get(body..i).unwrap_or_default()),
    };
    *pos = i + 1;
    Ok(Item {
        range: start..*pos,
        value: Value::Str(value),
    })
}

/// An atom starting at `*pos`, which holds a byte that may start one.
fn atom<'a>(msg: &'a [u8], pos: &mut usize) -> Result<Item<'a>, ArgsError> {
    let start = *pos;
    let mut i = start;
    while let Some(&b) = msg.get(i) {
        match b {
            b' ' | b'\r' | b'\n' | b'(' | b')' | b'"' => break,
            b'[' => i = section_end(msg, i)?,
            _ => i += 1,
        }
    }
    *pos = i;
    Ok(Item {
        range: start..i,
        value: Value::Atom(msg.get(start..i).unwrap_or_default()),
    })
}

/// The offset just past the `]` matching the `[` at `open`. Quoted strings and literals inside
/// are skipped whole so that a `]` in them does not close the section.
fn section_end(msg: &[u8], open: usize) -> Result<usize, ArgsError> {
    let mut depth = 0usize;
    let mut i = open;
    loop {
        match msg.get(i) {
            None | Some(b'\r' | b'\n') => return Err(ArgsError::Unbalanced { at: open }),
            Some(b'[') => {
                depth += 1;
                i += 1;
            }
            Some(b']') => {
                depth = depth.saturating_sub(1);
                i += 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            Some(b'"') => {
                quoted(msg, &mut i)?;
            }
            Some(b'{') => match literal_header(msg, i) {
                Some((data, len)) => i = literal_end(msg, data, len)?,
                None => i += 1,
            },
            Some(_) => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact, exact rendering of a token tree: atoms as written, strings double-quoted with
    /// Rust-style escapes, lists in parentheses.
    fn render(items: &[Item<'_>]) -> String {
        items
            .iter()
            .map(|item| match &item.value {
                Value::Atom(a) => String::from_utf8_lossy(a).into_owned(),
                Value::Str(s) => format!("\"{}\"", s.escape_ascii()),
                Value::List(l) => format!("({})", render(l)),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Tokens after the tag and first word.
    fn args(msg: &[u8]) -> Vec<Item<'_>> {
        let (_, _, offset) = head(msg).unwrap();
        parse(msg, offset).unwrap()
    }

    fn rendered(msg: &[u8]) -> String {
        render(&args(msg))
    }

    /// Every item's range, sliced from the message, as text.
    fn written<'m>(msg: &'m [u8], items: &[Item<'_>]) -> Vec<&'m [u8]> {
        items.iter().map(|i| &msg[i.range.clone()]).collect()
    }

    fn list<'a, 'b>(item: &'b Item<'a>) -> &'b [Item<'a>] {
        match &item.value {
            Value::List(l) => l,
            other => panic!("not a list: {other:?}"),
        }
    }

    #[test]
    fn select_atom() {
        let msg = b"a SELECT INBOX\r\n";
        assert_eq!(head(msg), Some((&b"a"[..], &b"SELECT"[..], 9)));
        assert_eq!(
            parse(msg, 9).unwrap(),
            vec![Item {
                range: 9..14,
                value: Value::Atom(b"INBOX")
            }]
        );
    }

    #[test]
    fn select_quoted_with_escapes() {
        let msg = b"a SELECT \"Sent \\\"x\\\"\"\r\n";
        let items = args(msg);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].value, Value::Str(Cow::Borrowed(b"Sent \"x\"")));
        assert!(matches!(&items[0].value, Value::Str(Cow::Owned(_))));
        assert_eq!(written(msg, &items), vec![&b"\"Sent \\\"x\\\"\""[..]]);
    }

    #[test]
    fn quoted_without_escapes_is_borrowed() {
        let items = args(b"a SELECT \"Sent\"\r\n");
        assert!(matches!(
            &items[0].value,
            Value::Str(Cow::Borrowed(b"Sent"))
        ));
    }

    #[test]
    fn append_with_literals() {
        let msg = b"a APPEND {5+}\r\nhello (\\Seen) \"01-Jan-2024 00:00:00 +0000\" {3}\r\nabc\r\n";
        let items = args(msg);
        assert_eq!(
            render(&items),
            r#""hello" (\Seen) "01-Jan-2024 00:00:00 +0000" "abc""#
        );
        assert_eq!(
            written(msg, &items),
            vec![
                &b"{5+}\r\nhello"[..],
                b"(\\Seen)",
                b"\"01-Jan-2024 00:00:00 +0000\"",
                b"{3}\r\nabc",
            ]
        );
        assert_eq!(items[0].range, 9..20);
        assert_eq!(written(msg, list(&items[1])), vec![&b"\\Seen"[..]]);
    }

    #[test]
    fn rename_literal_then_quoted() {
        let msg = b"a RENAME {3}\r\nabc \"d e\"\r\n";
        let items = args(msg);
        assert_eq!(render(&items), r#""abc" "d e""#);
        assert_eq!(written(msg, &items), vec![&b"{3}\r\nabc"[..], b"\"d e\""]);
    }

    #[test]
    fn uid_copy() {
        let msg = b"a UID COPY 1:* \"Archive/2023\"\r\n";
        assert_eq!(head(msg), Some((&b"a"[..], &b"UID"[..], 6)));
        let items = args(msg);
        assert_eq!(render(&items), r#"COPY 1:* "Archive/2023""#);
        assert_eq!(
            items.iter().map(|i| i.range.clone()).collect::<Vec<_>>(),
            vec![6..10, 11..14, 15..29]
        );
    }

    #[test]
    fn fetch_section_with_spaces_and_parens() {
        let msg = b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM TO)] UID)\r\n";
        let items = args(msg);
        assert_eq!(render(&items), "1 (BODY.PEEK[HEADER.FIELDS (FROM TO)] UID)");
        let inner = list(&items[1]);
        assert_eq!(inner.len(), 2);
        assert_eq!(
            inner[0].value,
            Value::Atom(b"BODY.PEEK[HEADER.FIELDS (FROM TO)]")
        );
        assert_eq!(
            written(msg, &items),
            vec![&b"1"[..], b"(BODY.PEEK[HEADER.FIELDS (FROM TO)] UID)"]
        );
        assert_eq!(items[1].range, 10..50);
    }

    #[test]
    fn fetch_partial_and_section_contents() {
        assert_eq!(
            rendered(b"a FETCH 1 BODY.PEEK[]<0.100>\r\n"),
            "1 BODY.PEEK[]<0.100>"
        );
        // A `]` inside a quoted string in a section does not close it.
        let msg = b"a FETCH 1 (BODY[HEADER.FIELDS (\"X]\" {2}\r\n]Y)] FLAGS)\r\n";
        let items = args(msg);
        let inner = list(&items[1]);
        assert_eq!(
            written(msg, inner),
            vec![&b"BODY[HEADER.FIELDS (\"X]\" {2}\r\n]Y)]"[..], b"FLAGS"]
        );
        // Nested brackets and a '{' that is not a literal announcement.
        assert_eq!(rendered(b"a X a[b[c]d]{e} z\r\n"), "a[b[c]d]{e} z");
    }

    #[test]
    fn status_command() {
        let msg = b"a STATUS x (MESSAGES UNSEEN)\r\n";
        let items = args(msg);
        assert_eq!(render(&items), "x (MESSAGES UNSEEN)");
        assert_eq!(written(msg, &items), vec![&b"x"[..], b"(MESSAGES UNSEEN)"]);
        assert_eq!(
            written(msg, list(&items[1])),
            vec![&b"MESSAGES"[..], b"UNSEEN"]
        );
    }

    #[test]
    fn list_response() {
        let msg = b"* LIST (\\HasNoChildren \\Noselect) \"/\" \"Work/Projects\"\r\n";
        assert_eq!(head(msg), Some((&b"*"[..], &b"LIST"[..], 7)));
        let items = args(msg);
        assert_eq!(
            render(&items),
            r#"(\HasNoChildren \Noselect) "/" "Work/Projects""#
        );
        assert_eq!(
            written(msg, &items),
            vec![
                &b"(\\HasNoChildren \\Noselect)"[..],
                b"\"/\"",
                b"\"Work/Projects\""
            ]
        );
        assert_eq!(
            written(msg, list(&items[0])),
            vec![&b"\\HasNoChildren"[..], b"\\Noselect"]
        );
    }

    #[test]
    fn list_response_nil_delimiter() {
        let msg = b"* LIST () NIL INBOX\r\n";
        let items = args(msg);
        assert_eq!(render(&items), "() NIL INBOX");
        assert_eq!(items[0].value, Value::List(vec![]));
        assert_eq!(items[0].range, 7..9);
        assert!(items[1].value.is_nil());
        assert_eq!(items[1].value.as_bytes(), Some(&b"NIL"[..]));
        assert!(!items[2].value.is_nil());
        assert_eq!(items[2].value.as_bytes(), Some(&b"INBOX"[..]));
        assert_eq!(items[0].value.as_bytes(), None);
    }

    #[test]
    fn is_nil_is_case_insensitive_and_atom_only() {
        assert!(Value::Atom(b"nil").is_nil());
        assert!(Value::Atom(b"Nil").is_nil());
        assert!(!Value::Str(Cow::Borrowed(b"NIL")).is_nil());
        assert!(!Value::Atom(b"NILS").is_nil());
        assert!(!Value::List(vec![]).is_nil());
    }

    #[test]
    fn list_response_literal_name() {
        let msg = b"* LIST (\\HasChildren) \".\" {5}\r\nab\"cd\r\n";
        let items = args(msg);
        assert_eq!(items.len(), 3);
        assert_eq!(items[2].value, Value::Str(Cow::Borrowed(b"ab\"cd")));
        assert_eq!(items[2].value.as_bytes(), Some(&b"ab\"cd"[..]));
        assert_eq!(written(msg, &items)[2], b"{5}\r\nab\"cd");
    }

    #[test]
    fn namespace_nested_lists() {
        let msg = b"* NAMESPACE ((\"\" \"/\")(\"Archive/\" \"/\" \"X-PARAM\" (\"a\" \"b\"))) NIL ((\"Shared/\" \"/\"))\r\n";
        let items = args(msg);
        assert_eq!(
            render(&items),
            r#"(("" "/") ("Archive/" "/" "X-PARAM" ("a" "b"))) NIL (("Shared/" "/"))"#
        );
        let personal = list(&items[0]);
        assert_eq!(
            written(msg, personal),
            vec![
                &b"(\"\" \"/\")"[..],
                b"(\"Archive/\" \"/\" \"X-PARAM\" (\"a\" \"b\"))"
            ]
        );
        let archive = list(&personal[1]);
        assert_eq!(
            written(msg, list(&archive[3])),
            vec![&b"\"a\""[..], b"\"b\""]
        );
        assert_eq!(list(&personal[0])[0].value, Value::Str(Cow::Borrowed(b"")));
        assert!(items[1].value.is_nil());
        assert_eq!(written(msg, &items)[2], b"((\"Shared/\" \"/\"))");
    }

    #[test]
    fn status_response() {
        let msg = b"* STATUS \"a b\" (MESSAGES 3 UIDNEXT 9)\r\n";
        let items = args(msg);
        assert_eq!(render(&items), r#""a b" (MESSAGES 3 UIDNEXT 9)"#);
        assert_eq!(items[0].range, 9..14);
        assert_eq!(items[1].range, 15..37);
    }

    #[test]
    fn quotaroot_response() {
        let items = args(b"* QUOTAROOT INBOX \"User quota\"\r\n");
        assert_eq!(
            items,
            vec![
                Item {
                    range: 12..17,
                    value: Value::Atom(b"INBOX")
                },
                Item {
                    range: 18..30,
                    value: Value::Str(Cow::Borrowed(b"User quota"))
                },
            ]
        );
    }

    #[test]
    fn fetch_response_with_literal() {
        let msg = b"* 3 FETCH (UID 7 BODY[] {3}\r\nxyz)\r\n";
        assert_eq!(head(msg), Some((&b"*"[..], &b"3"[..], 4)));
        let items = args(msg);
        assert_eq!(render(&items), r#"FETCH (UID 7 BODY[] "xyz")"#);
        assert_eq!(
            written(msg, list(&items[1])),
            vec![&b"UID"[..], b"7", b"BODY[]", b"{3}\r\nxyz"]
        );
    }

    #[test]
    fn literal_forms() {
        assert_eq!(rendered(b"a X {2-}\r\nab\r\n"), r#""ab""#);
        assert_eq!(rendered(b"a X {0}\r\n\r\n"), r#""""#);
        // Literal data may hold line ends and parentheses: they are data.
        assert_eq!(rendered(b"a X {4}\r\n)\r\n( y\r\n"), r#"")\r\n(" y"#);
        let msg = b"a APPEND x ~{3}\r\n\x00\x01\n\r\n";
        let items = args(msg);
        assert_eq!(items[1].value, Value::Str(Cow::Borrowed(b"\x00\x01\n")));
        assert_eq!(written(msg, &items)[1], b"~{3}\r\n\x00\x01\n");
        // A bare LF after the announcement.
        assert_eq!(rendered(b"a X {1+}\nz\n"), r#""z""#);
    }

    #[test]
    fn atoms_and_spacing() {
        assert_eq!(
            rendered(b"a STORE 1  +FLAGS   (\\Seen \\*)\r\n"),
            r"1 +FLAGS (\Seen \*)"
        );
        assert_eq!(rendered(b"a X ~tilde b{c}\n"), "~tilde b{c}");
        assert_eq!(
            rendered(b"a X caf\xc3\xa9 \"\xc3\xa9\"\r\n"),
            "caf\u{e9} \"\\xc3\\xa9\""
        );
        // Response codes come back whole.
        assert_eq!(rendered(b"* OK [UIDNEXT 5] ready\r\n"), "[UIDNEXT 5] ready");
        // A list may directly follow an atom.
        assert_eq!(rendered(b"a X a(b) c\r\n"), "a (b) c");
    }

    #[test]
    fn empty_argument_lists() {
        let msg = b"a1 NOOP\r\n";
        assert_eq!(head(msg), Some((&b"a1"[..], &b"NOOP"[..], 7)));
        assert_eq!(parse(msg, 7), Ok(vec![]));
        assert_eq!(parse(b"a1 NOOP   \r\n", 8), Ok(vec![]));
        assert_eq!(parse(b"\n", 0), Ok(vec![]));
    }

    #[test]
    fn parse_from_any_start() {
        let msg = b"a SELECT INBOX\r\n";
        assert_eq!(render(&parse(msg, 0).unwrap()), "a SELECT INBOX");
        assert_eq!(parse(msg, 14), Ok(vec![]));
        assert_eq!(parse(msg, 16), Err(ArgsError::UnexpectedEnd));
        assert_eq!(parse(msg, 17), Err(ArgsError::UnexpectedEnd));
        assert_eq!(parse(msg, usize::MAX), Err(ArgsError::UnexpectedEnd));
    }

    #[test]
    fn head_cases() {
        assert_eq!(
            head(b"a1 SELECT INBOX\r\n"),
            Some((&b"a1"[..], &b"SELECT"[..], 10))
        );
        assert_eq!(
            head(b"* 12 FETCH (UID 1)\r\n"),
            Some((&b"*"[..], &b"12"[..], 5))
        );
        assert_eq!(head(b"+ idling\r\n"), Some((&b"+"[..], &b"idling"[..], 8)));
        assert_eq!(head(b"a1 SELECT"), Some((&b"a1"[..], &b"SELECT"[..], 9)));
        assert_eq!(head(b"a1 NOOP\n"), Some((&b"a1"[..], &b"NOOP"[..], 7)));
        for bad in [
            &b""[..],
            b"a1",
            b"a1\r\n",
            b" SELECT\r\n",
            b"a1 \r\n",
            b"a1  SELECT\r\n",
            b"+ \r\n",
            b"+\r\n",
            b"a1\r\n SELECT\r\n",
        ] {
            assert_eq!(head(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn malformed_quoted() {
        assert_eq!(
            parse(b"a SELECT \"abc\r\n", 9),
            Err(ArgsError::BadQuoted { at: 9 })
        );
        assert_eq!(parse(b"a SELECT \"abc", 9), Err(ArgsError::UnexpectedEnd));
        assert_eq!(parse(b"a SELECT \"a\\", 9), Err(ArgsError::UnexpectedEnd));
        assert_eq!(
            parse(b"a SELECT \"a\\b\"\r\n", 9),
            Err(ArgsError::BadQuoted { at: 11 })
        );
        assert_eq!(
            parse(b"a SELECT \"a\\\r\n\"\r\n", 9),
            Err(ArgsError::BadQuoted { at: 11 })
        );
    }

    #[test]
    fn malformed_lists() {
        assert_eq!(
            parse(b"a X (a (b)\r\n", 4),
            Err(ArgsError::Unbalanced { at: 4 })
        );
        assert_eq!(
            parse(b"a X a)\r\n", 4),
            Err(ArgsError::Unbalanced { at: 5 })
        );
        assert_eq!(parse(b"a X (a", 4), Err(ArgsError::UnexpectedEnd));
        assert_eq!(
            parse(b"a FETCH 1 BODY[HEADER\r\n", 10),
            Err(ArgsError::Unbalanced { at: 14 })
        );
    }

    #[test]
    fn malformed_literals() {
        // Fewer bytes than announced: the final line end is swallowed as data.
        assert_eq!(
            parse(b"a X {5}\r\nab\r\n", 4),
            Err(ArgsError::UnexpectedEnd)
        );
        assert_eq!(parse(b"a X {5}\r\nab", 4), Err(ArgsError::UnexpectedEnd));
        assert_eq!(
            parse(b"a X {abc}\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        assert_eq!(
            parse(b"a X {}\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        assert_eq!(
            parse(b"a X {3} abc\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        assert_eq!(
            parse(b"a X ~{x}\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        assert_eq!(
            parse(b"a X {3\r\nabc\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        // Lengths that overflow usize, or whose end does.
        assert_eq!(
            parse(b"a X {999999999999999999999999999}\r\nx\r\n", 4),
            Err(ArgsError::BadLiteral { at: 4 })
        );
        let huge = format!("a X {{{}}}\r\nx\r\n", usize::MAX);
        assert_eq!(parse(huge.as_bytes(), 4), Err(ArgsError::UnexpectedEnd));
        let huge = format!("a X [{{{}}}\r\nx]\r\n", usize::MAX);
        assert_eq!(parse(huge.as_bytes(), 4), Err(ArgsError::UnexpectedEnd));
    }

    #[test]
    fn nesting_depth_is_bounded() {
        let nested = |n: usize| {
            let mut m = b"a X ".to_vec();
            m.extend(std::iter::repeat_n(b'(', n));
            m.extend(std::iter::repeat_n(b')', n));
            m.extend_from_slice(b"\r\n");
            m
        };
        let ok = nested(MAX_DEPTH);
        let items = parse(&ok, 4).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].range, 4..4 + 2 * MAX_DEPTH);
        assert_eq!(
            parse(&nested(MAX_DEPTH + 1), 4),
            Err(ArgsError::TooDeep { at: 4 + MAX_DEPTH })
        );
        assert_eq!(
            parse(&nested(100), 4),
            Err(ArgsError::TooDeep { at: 4 + MAX_DEPTH })
        );
    }

    #[test]
    fn framing_errors() {
        assert_eq!(
            parse(b"a X y\r\nb NOOP\r\n", 4),
            Err(ArgsError::TrailingData { at: 7 })
        );
        assert_eq!(parse(b"a X y", 4), Err(ArgsError::UnexpectedEnd));
        assert_eq!(
            parse(b"a X y\rz\r\n", 4),
            Err(ArgsError::Unexpected { at: 5 })
        );
        assert_eq!(
            parse(b"a X \"a\"b\r\n", 4),
            Err(ArgsError::Unexpected { at: 7 })
        );
        assert_eq!(
            parse(b"a X ab\"c\"\r\n", 4),
            Err(ArgsError::Unexpected { at: 6 })
        );
        assert_eq!(
            parse(b"a X {1}\r\nab\r\n", 4),
            Err(ArgsError::Unexpected { at: 10 })
        );
        assert_eq!(
            parse(b"a X (a)b\r\n", 4),
            Err(ArgsError::Unexpected { at: 7 })
        );
    }

    #[test]
    fn never_panics_on_truncation_or_corruption() {
        let samples: [&[u8]; 4] = [
            b"a APPEND {5+}\r\nhello (\\Seen) \"01-Jan-2024 00:00:00 +0000\" {3}\r\nabc\r\n",
            b"* 3 FETCH (UID 7 BODY[HEADER.FIELDS (\"X]\" {2}\r\n]Y)] {3}\r\nxyz)\r\n",
            b"* NAMESPACE ((\"\" \"/\")(\"A\\\\\" \"/\")) NIL NIL\r\n",
            b"a X ~{3}\r\n\x00\x01\n [a\"b\"c]\r\n",
        ];
        let specials = b" ()[]{}\"\\~+-\r\n0a";
        for msg in samples {
            assert!(parse(msg, 0).is_ok(), "{}", msg.escape_ascii());
            for end in 0..msg.len() {
                let _ = parse(&msg[..end], 0);
                let _ = head(&msg[..end]);
                let _ = parse(msg, end);
            }
            for at in 0..msg.len() {
                for &b in specials {
                    let mut m = msg.to_vec();
                    m[at] = b;
                    let _ = parse(&m, 0);
                    let _ = head(&m);
                }
            }
        }
    }

    #[test]
    fn push_string_quotes_when_it_can() {
        let enc = |s: &[u8], form| {
            let mut out = b"x ".to_vec();
            push_string(&mut out, s, form);
            out
        };
        for form in [LiteralForm::NonSync, LiteralForm::Server] {
            assert_eq!(enc(b"INBOX", form), b"x \"INBOX\"");
            assert_eq!(enc(b"", form), b"x \"\"");
            assert_eq!(enc(b"a\"b\\c", form), b"x \"a\\\"b\\\\c\"");
            assert_eq!(enc(b"Work/(x) {3}", form), b"x \"Work/(x) {3}\"");
        }
        assert_eq!(
            enc("café".as_bytes(), LiteralForm::NonSync),
            b"x {5+}\r\ncaf\xc3\xa9"
        );
        assert_eq!(
            enc("café".as_bytes(), LiteralForm::Server),
            b"x {5}\r\ncaf\xc3\xa9"
        );
        assert_eq!(enc(b"a\r\nb", LiteralForm::Server), b"x {4}\r\na\r\nb");
        assert_eq!(enc(b"a\nb", LiteralForm::NonSync), b"x {3+}\r\na\nb");
        assert_eq!(enc(b"a\rb", LiteralForm::Server), b"x {3}\r\na\rb");
        assert_eq!(enc(b"\0", LiteralForm::Server), b"x {1}\r\n\0");
    }

    #[test]
    fn push_string_round_trips() {
        let strings: [&[u8]; 9] = [
            b"",
            b"INBOX",
            b"Sent \"x\"",
            b"back\\slash",
            b"NIL",
            b"a b (c) [d] {1}",
            "Entwürfe".as_bytes(),
            b"line\r\nbreak",
            b"\xff\x80",
        ];
        for form in [LiteralForm::NonSync, LiteralForm::Server] {
            for s in strings {
                let mut msg = b"a SELECT ".to_vec();
                push_string(&mut msg, s, form);
                msg.extend_from_slice(b" (");
                push_string(&mut msg, s, form);
                msg.extend_from_slice(b")\r\n");
                let items = parse(&msg, 9).unwrap();
                assert_eq!(items.len(), 2, "{}", msg.escape_ascii());
                assert_eq!(items[0].value, Value::Str(Cow::Borrowed(s)));
                assert_eq!(
                    items[1].value,
                    Value::List(vec![Item {
                        range: items[0].range.end + 2..msg.len() - 3,
                        value: Value::Str(Cow::Borrowed(s)),
                    }])
                );
                assert_eq!(items[0].range.start, 9);
            }
        }
    }
}
