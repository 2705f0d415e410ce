//! The merged answer of LIST, LSUB, RLIST and RLSUB (see [`super::list`]): the entries of
//! every server in the client's names, and the ones the gateway adds, sorted (INBOX first),
//! each name once, written as one block of responses.
//!
//! Entries are held in a few shared buffers that grow by doubling (names and attributes back
//! to back, and ranges into them) and sorted once at the end: a user with 100,000 mailboxes
//! costs a few dozen allocations per LIST, not several per mailbox.

use std::io::Write as _;
use std::ops::Range;

use super::names::{self, is_inbox};
use crate::proto::args::{self, LiteralForm};
use crate::proto::response::push_quoted;

pub(super) const NOSELECT: &[u8] = b"\\Noselect";
pub(super) const HAS_CHILDREN: &[u8] = b"\\HasChildren";
pub(super) const HAS_NO_CHILDREN: &[u8] = b"\\HasNoChildren";

#[derive(Default)]
pub(super) struct Merged {
    /// The names and the listed attributes of every entry, back to back.
    bytes: Vec<u8>,
    /// Where each listed attribute is in `bytes`.
    attrs: Vec<Range<usize>>,
    /// In the order they were added; the first of two with one name is the one written.
    entries: Vec<Entry>,
}

struct Entry {
    /// In [`Merged::bytes`].
    name: Range<usize>,
    attrs: Attrs,
    /// A mount point lies below this mailbox: it is written with `\HasChildren` instead of
    /// `\HasNoChildren` (see [`Merged::mark_above`]).
    mount_below: bool,
}

enum Attrs {
    /// As a server listed them: a range of [`Merged::attrs`].
    Listed(Range<usize>),
    /// Made up by the gateway (mount points, the levels above them).
    Fixed(&'static [&'static [u8]]),
}

impl Merged {
    /// Adds a server's entry, already in the client's names. Any case of `INBOX` is written
    /// `INBOX`.
    pub(super) fn add_listed<'a>(&mut self, name: &[u8], attrs: impl Iterator<Item = &'a [u8]>) {
        let name = if is_inbox(name) { b"INBOX" } else { name };
        let first = self.attrs.len();
        for a in attrs {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(a);
            self.attrs.push(start..self.bytes.len());
        }
        let attrs = Attrs::Listed(first..self.attrs.len());
        self.push(name, attrs);
    }

    /// Adds an entry the gateway makes up. As for every entry, if the name was added before,
    /// this one is dropped when the answer is written.
    pub(super) fn add_fixed(&mut self, name: &[u8], attrs: &'static [&'static [u8]]) {
        self.push(name, Attrs::Fixed(attrs));
    }

    fn push(&mut self, name: &[u8], attrs: Attrs) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        self.entries.push(Entry {
            name: start..self.bytes.len(),
            attrs,
            mount_below: false,
        });
    }

    /// Whether the entry added last has this name: the levels above a run of names from one
    /// server are mostly the same, and need not be added again each time.
    pub(super) fn last_is(&self, name: &[u8]) -> bool {
        self.entries
            .last()
            .is_some_and(|e| &self.bytes[e.name.clone()] == name)
    }

    /// The mailboxes added so far above the mount point `prefix` now have children. Entries
    /// added later are left as they are made (the levels above a subscribed mailbox in LSUB
    /// are written `\Noselect` alone).
    pub(super) fn mark_above(&mut self, prefix: &[u8], delim: u8) {
        for e in &mut self.entries {
            let name = &self.bytes[e.name.clone()];
            if prefix.len() > name.len() && names::is_at_or_below(prefix, name, delim) {
                e.mount_below = true;
            }
        }
    }

    /// Writes `* <word> (<attributes>) <delimiter> <name>\r\n` for each name once (the entry
    /// added first), INBOX first and then by the bytes of the name.
    pub(super) fn write(mut self, word: &[u8], delim: u8, out: &mut Vec<u8>) {
        let bytes = &self.bytes;
        let key = |e: &Entry| {
            let name = &bytes[e.name.clone()];
            (!is_inbox(name), name)
        };
        // Stable: of two entries with one name, the one added first stays first.
        self.entries.sort_by(|a, b| key(a).cmp(&key(b)));
        self.entries
            .dedup_by(|later, first| key(later) == key(first));

        let mut delimiter = Vec::new();
        args::push_string(&mut delimiter, &[delim], LiteralForm::Server);
        out.reserve(self.bytes.len() + self.entries.len() * (word.len() + 16));
        for e in &self.entries {
            out.extend_from_slice(b"* ");
            out.extend_from_slice(word);
            out.extend_from_slice(b" (");
            self.write_attrs(e, out);
            out.extend_from_slice(b") ");
            out.extend_from_slice(&delimiter);
            out.push(b' ');
            push_name(out, &self.bytes[e.name.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The attributes separated by spaces; with a mount below, `\HasNoChildren` is left out
    /// and `\HasChildren` added at the end unless it is there.
    fn write_attrs(&self, e: &Entry, out: &mut Vec<u8>) {
        let listed = self
            .attrs_of(e)
            .filter(|a| !(e.mount_below && a.eq_ignore_ascii_case(HAS_NO_CHILDREN)));
        let added = e.mount_below
            && !self
                .attrs_of(e)
                .any(|a| a.eq_ignore_ascii_case(HAS_CHILDREN));
        for (i, a) in listed.chain(added.then_some(HAS_CHILDREN)).enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(a);
        }
    }

    /// An entry's attributes as it was added.
    fn attrs_of<'s>(&'s self, e: &'s Entry) -> impl Iterator<Item = &'s [u8]> {
        let (listed, fixed) = match &e.attrs {
            Attrs::Listed(r) => (Some(&self.attrs[r.clone()]), None),
            Attrs::Fixed(list) => (None, Some(*list)),
        };
        let listed = listed.into_iter().flatten().map(|a| &self.bytes[a.clone()]);
        listed.chain(fixed.into_iter().flatten().copied())
    }
}

/// A name as [`args::push_string`] writes it for a client, without its allocation for a
/// literal's length: names outside ASCII (UTF-8 ones) are literals.
fn push_name(out: &mut Vec<u8>, name: &[u8]) {
    if push_quoted(out, name) {
        return;
    }
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{{{}}}\r\n", name.len());
    out.extend_from_slice(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(m: Merged) -> String {
        let mut out = Vec::new();
        m.write(b"LIST", b'/', &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sorted_inbox_first_and_the_first_of_a_name_stays() {
        let mut m = Merged::default();
        m.add_listed(b"b", [&b"\\X"[..]].into_iter());
        m.add_listed(b"inbox", std::iter::empty());
        m.add_listed(b"a", [&b"\\HasNoChildren"[..], b"\\Marked"].into_iter());
        m.add_fixed(b"b", &[NOSELECT]);
        m.add_fixed(b"a/b", &[NOSELECT, HAS_CHILDREN]);
        m.add_fixed(b"A", &[]);
        assert_eq!(
            written(m),
            "* LIST () \"/\" \"INBOX\"\r\n\
             * LIST () \"/\" \"A\"\r\n\
             * LIST (\\HasNoChildren \\Marked) \"/\" \"a\"\r\n\
             * LIST (\\Noselect \\HasChildren) \"/\" \"a/b\"\r\n\
             * LIST (\\X) \"/\" \"b\"\r\n"
        );
    }

    #[test]
    fn a_mount_below_gives_children() {
        let mut m = Merged::default();
        m.add_listed(
            b"Remote",
            [&b"\\HASNOCHILDREN"[..], b"\\Marked"].into_iter(),
        );
        m.add_listed(b"Rem", [&b"\\HasNoChildren"[..]].into_iter());
        m.add_listed(b"Other", [&b"\\hasChildren"[..]].into_iter());
        m.add_fixed(b"Remote/Sales", &[NOSELECT]);
        m.mark_above(b"Remote/Sales", b'/');
        m.mark_above(b"Other/x", b'/');
        // Added after the first marks, marked by the next one.
        m.add_fixed(b"Remote/Sales/x", &[NOSELECT]);
        m.mark_above(b"Remote/Sales/x/y", b'/');
        assert_eq!(
            written(m),
            "* LIST (\\hasChildren) \"/\" \"Other\"\r\n\
             * LIST (\\HasNoChildren) \"/\" \"Rem\"\r\n\
             * LIST (\\Marked \\HasChildren) \"/\" \"Remote\"\r\n\
             * LIST (\\Noselect \\HasChildren) \"/\" \"Remote/Sales\"\r\n\
             * LIST (\\Noselect \\HasChildren) \"/\" \"Remote/Sales/x\"\r\n"
        );
    }

    #[test]
    fn names_are_written_as_push_string_writes_them() {
        for name in [
            &b"a b"[..],
            b"",
            b"q\"uote\\",
            "Entwürfe".as_bytes(),
            b"c\r\nr",
        ] {
            let mut ours = Vec::new();
            push_name(&mut ours, name);
            let mut theirs = Vec::new();
            args::push_string(&mut theirs, name, LiteralForm::Server);
            assert_eq!(ours, theirs);
        }
    }
}
