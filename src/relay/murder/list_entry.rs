//! The entries of a backend's LIST or LSUB answer: `* LIST (<attributes>) <delimiter>
//! <name>`, read where they lie in the answer's buffer. Servers write them all in one simple
//! shape, read here without allocating (a LIST may hold 100,000 of them); anything else goes
//! through the full tokenizer, [`args::parse`].

use std::borrow::Cow;

use crate::proto::args::{self, Value};

/// A `* LIST`/`* LSUB` response's attributes and name, read from the backend's bytes.
pub(super) struct ListEntry<'m> {
    pub(super) attrs: EntryAttrs<'m>,
    pub(super) name: Cow<'m, [u8]>,
}

pub(super) enum EntryAttrs<'m> {
    /// Plain atoms separated by single spaces: the inside of the parentheses.
    Spaced(&'m [u8]),
    /// From the full tokenizer.
    Tokenized(Vec<Vec<u8>>),
}

impl EntryAttrs<'_> {
    pub(super) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let (spaced, tokenized) = match self {
            // `()` splits into one empty piece; a plain atom is never empty.
            EntryAttrs::Spaced(s) => (
                Some(s.split(|&b| b == b' ').filter(|a| !a.is_empty())),
                None,
            ),
            EntryAttrs::Tokenized(v) => (None, Some(v.iter().map(Vec::as_slice))),
        };
        spaced
            .into_iter()
            .flatten()
            .chain(tokenized.into_iter().flatten())
    }
}

/// The attributes and name of a `* LIST`/`* LSUB` response whose arguments start at `off`.
pub(super) fn parse_list_entry(msg: &[u8], off: usize) -> Option<ListEntry<'_>> {
    simple_list_entry(msg, off).or_else(|| tokenized_list_entry(msg, off))
}

/// The shape servers write, read in place: `(\A \B) "/" name` with single spaces, plain atoms
/// for attributes, a quoted or NIL delimiter, and a name that is a plain atom, a quoted string
/// without escapes or a literal, ending the message. None for anything else, which
/// [`tokenized_list_entry`] reads: where this gives an entry, that would give the same one.
fn simple_list_entry(msg: &[u8], off: usize) -> Option<ListEntry<'_>> {
    let rest = msg.get(off..)?.strip_prefix(b"(")?;
    let close = memchr::memchr(b')', rest)?;
    let attrs = &rest[..close];
    if !attrs.is_empty() && !attrs.split(|&b| b == b' ').all(is_plain_atom) {
        return None;
    }
    let rest = rest[close + 1..].strip_prefix(b" ")?;
    // The delimiter's value is not needed, only where it ends (`"\\"` has an escape).
    let rest = match rest.first()? {
        b'"' => &rest[quoted_len(rest)?.0..],
        _ => match plain_atom_len(rest) {
            0 => return None,
            n => &rest[n..],
        },
    };
    let rest = rest.strip_prefix(b" ")?;
    let (name, rest) = match rest.first()? {
        b'"' => match quoted_len(rest)? {
            (len, false) => (&rest[1..len - 1], &rest[len..]),
            // Unescaping needs a buffer: the tokenizer's.
            (_, true) => return None,
        },
        b'{' => literal(rest)?,
        _ => match plain_atom_len(rest) {
            0 => return None,
            n => rest.split_at(n),
        },
    };
    matches!(rest, b"\r\n" | b"\n").then_some(ListEntry {
        attrs: EntryAttrs::Spaced(attrs),
        name: Cow::Borrowed(name),
    })
}

/// Any other shape, through the full tokenizer (which allocates).
fn tokenized_list_entry(msg: &[u8], off: usize) -> Option<ListEntry<'_>> {
    let items = args::parse(msg, off).ok()?;
    let Value::List(attrs) = &items.first()?.value else {
        return None;
    };
    let attrs = attrs
        .iter()
        .filter_map(|a| a.value.as_bytes().map(<[u8]>::to_vec))
        .collect();
    let name = items.get(2)?.value.as_bytes()?.to_vec();
    Some(ListEntry {
        attrs: EntryAttrs::Tokenized(attrs),
        name: Cow::Owned(name),
    })
}

/// Bytes of a plain atom: not those the tokenizer treats specially anywhere in an atom (`[`
/// opens a section) or at its start (`{`, `~{` are literals).
fn is_plain_atom_byte(b: u8) -> bool {
    !matches!(
        b,
        b' ' | b'\r' | b'\n' | b'(' | b')' | b'"' | b'[' | b'{' | b'~'
    )
}

fn is_plain_atom(a: &[u8]) -> bool {
    !a.is_empty() && a.iter().all(|&b| is_plain_atom_byte(b))
}

fn plain_atom_len(s: &[u8]) -> usize {
    s.iter()
        .position(|&b| !is_plain_atom_byte(b))
        .unwrap_or(s.len())
}

/// The length of the quoted string that starts `s` (quotes included) and whether it has
/// escapes; None where the tokenizer refuses it (a line end, an escape of anything but `"`
/// or `\`) or it does not end.
fn quoted_len(s: &[u8]) -> Option<(usize, bool)> {
    let mut i = 1;
    let mut escaped = false;
    loop {
        match s.get(i)? {
            b'"' => return Some((i + 1, escaped)),
            b'\\' if matches!(s.get(i + 1)?, b'"' | b'\\') => {
                escaped = true;
                i += 2;
            }
            b'\\' | b'\r' | b'\n' => return None,
            _ => i += 1,
        }
    }
}

/// The literal (`{N}`, `{N+}` or `{N-}`, a line end, N bytes) that starts `s`: its data and
/// what follows.
fn literal(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = s.strip_prefix(b"{")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut len = 0usize;
    for &b in &rest[..digits] {
        len = len.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    let rest = &rest[digits..];
    let rest = rest
        .strip_prefix(b"+")
        .or(rest.strip_prefix(b"-"))
        .unwrap_or(rest);
    let rest = rest.strip_prefix(b"}")?;
    let rest = rest
        .strip_prefix(b"\r\n")
        .or_else(|| rest.strip_prefix(b"\n"))?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(entry: &ListEntry<'_>) -> (Vec<Vec<u8>>, Vec<u8>) {
        let attrs = entry.attrs.iter().map(<[u8]>::to_vec).collect();
        (attrs, entry.name.to_vec())
    }

    /// Wherever the in-place reading gives an entry, the tokenizer gives the same one.
    #[test]
    fn the_simple_reading_agrees_with_the_tokenizer() {
        let attrs = [
            "()",
            "(\\HasNoChildren)",
            "(\\Noselect \\HasChildren)",
            "( \\A)",
            "(\\A  \\B)",
            "(\\A \"q\")",
            "(\\A (x))",
            "(a[b] c)",
            "(~a)",
            "(\\A)(",
        ];
        let delims = [
            "\"/\"", "\"\\\\\"", "\"\\\"\"", "\"\\x\"", "NIL", "\"\"", "{1}\r\n/", "(x)", "\"/",
        ];
        let names = [
            "INBOX",
            "\"a b\"",
            "\"a\\\\b\"",
            "\"Entwürfe\"",
            "Entwürfe",
            "{5}\r\nab cd",
            "{3+}\r\nabc",
            "{2-}\n\r\n",
            "{9}\r\nab",
            "{0}\r\n",
            "{99999999999999999999999}\r\nab",
            "a[1]",
            "a{b",
            "~{1}\r\nx",
            "\"open",
            "a(b",
            "NIL",
            "\"\"",
        ];
        let (spaces, ends) = ([" ", "  ", ""], ["\r\n", "\n", " x\r\n", "\r\nx", "", "\r"]);
        let mut simple = 0;
        for a in attrs {
            for s1 in spaces {
                for dl in delims {
                    for s2 in spaces {
                        for n in names {
                            for e in ends {
                                let msg = format!("* LIST {a}{s1}{dl}{s2}{n}{e}");
                                let msg = msg.as_bytes();
                                let Some(fast) = simple_list_entry(msg, 7) else {
                                    continue;
                                };
                                simple += 1;
                                let full = tokenized_list_entry(msg, 7);
                                assert_eq!(
                                    Some(read(&fast)),
                                    full.as_ref().map(read),
                                    "{}",
                                    msg.escape_ascii()
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(simple > 100, "{simple}");
        // What servers write is read in place.
        for msg in [
            &b"* LIST (\\HasNoChildren) \"/\" INBOX\r\n"[..],
            b"* LIST () \".\" \"a b\"\r\n",
            b"* LSUB (\\Noselect) NIL {4}\r\n\xc3\xbc b\r\n",
            b"* LIST (\\HasChildren) \"\\\\\" x\r\n",
        ] {
            assert!(
                matches!(
                    simple_list_entry(msg, 7),
                    Some(ListEntry {
                        name: Cow::Borrowed(_),
                        ..
                    })
                ),
                "{}",
                msg.escape_ascii()
            );
        }
    }
}
