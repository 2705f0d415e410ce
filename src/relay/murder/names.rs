//! Mailbox names in a session with mounts: which server holds a client's name, and the
//! translation of names between the client's view (the home delimiter, mount prefixes) and
//! a mounted backend's (its own delimiter, the mount's path).

use crate::route::Mount;

/// The INBOX name, which is case-insensitive (RFC 3501).
pub fn is_inbox(level: &[u8]) -> bool {
    level.eq_ignore_ascii_case(b"INBOX")
}

/// The levels of a name; a server without a delimiter has flat names.
pub fn levels(name: &[u8], delim: Option<u8>) -> Vec<&[u8]> {
    match delim {
        Some(d) => name.split(|&b| b == d).collect(),
        None => vec![name],
    }
}

/// The client's name of a mount's prefix.
pub fn client_prefix(mount: &Mount, delim: u8) -> Vec<u8> {
    join(mount.prefix.iter().map(String::as_bytes), delim)
}

pub fn join<'a>(levels: impl IntoIterator<Item = &'a [u8]>, delim: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, l) in levels.into_iter().enumerate() {
        if i > 0 {
            out.push(delim);
        }
        out.extend_from_slice(l);
    }
    out
}

/// The mount that holds `name` (a client name) and the levels of `name` below its prefix.
/// INBOX and everything under it is always the home backend's. The prefix is compared as the
/// client sees it, so a configured level that holds the home delimiter is two levels here.
pub fn find_mount<'n>(
    mounts: &[std::sync::Arc<Mount>],
    name: &'n [u8],
    delim: u8,
) -> Option<(usize, Vec<&'n [u8]>)> {
    if levels(name, Some(delim))
        .first()
        .is_some_and(|l| is_inbox(l))
    {
        return None;
    }
    mounts.iter().enumerate().find_map(|(i, m)| {
        let prefix = client_prefix(m, delim);
        let rest = name.strip_prefix(prefix.as_slice())?;
        match rest.split_first() {
            None => Some((i, Vec::new())),
            Some((&d, below)) if d == delim => Some((i, levels(below, Some(delim)))),
            Some(_) => None,
        }
    })
}

/// Why a client name cannot be given to the backend that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untranslatable {
    /// A level contains the backend's hierarchy delimiter.
    ForeignDelimiter(u8),
    /// The backend has flat names and the name has levels.
    Flat,
    /// The backend's own INBOX is not part of the mount.
    MountedInbox,
}

impl Untranslatable {
    pub fn text(self) -> String {
        match self {
            Untranslatable::ForeignDelimiter(d) => format!(
                "Mailbox name contains {:?}, the hierarchy delimiter of the server that holds it",
                d as char
            ),
            Untranslatable::Flat => "The server that holds this mailbox has no hierarchy".into(),
            Untranslatable::MountedInbox => "No such mailbox".into(),
        }
    }
}

/// The backend's name for the levels `rest` below a mount whose backend name is `path`.
pub fn to_backend(
    path: &[String],
    rest: &[&[u8]],
    delim: Option<u8>,
) -> Result<Vec<u8>, Untranslatable> {
    if path.is_empty() && rest.first().is_some_and(|l| is_inbox(l)) {
        return Err(Untranslatable::MountedInbox);
    }
    let all: Vec<&[u8]> = path
        .iter()
        .map(String::as_bytes)
        .chain(rest.iter().copied())
        .collect();
    match delim {
        Some(d) => {
            if rest.iter().any(|l| l.contains(&d)) {
                return Err(Untranslatable::ForeignDelimiter(d));
            }
            Ok(join(all, d))
        }
        None if all.len() > 1 => Err(Untranslatable::Flat),
        None => Ok(all.first().map(|l| l.to_vec()).unwrap_or_default()),
    }
}

/// The client's name for a backend's mailbox `name` seen through a mount, or None when it is
/// outside the mount, is the backend's own INBOX, or has a level the client could not tell
/// from two levels (it contains the home delimiter).
pub fn to_client(
    prefix: &[u8],
    path: &[String],
    name: &[u8],
    delim: Option<u8>,
    home_delim: u8,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    to_client_into(prefix, path, name, delim, home_delim, &mut out).then_some(out)
}

/// [`to_client`] written to the end of `out`, for a caller that translates many names into
/// one buffer. False, with `out` as it was, when the name has no client name.
pub fn to_client_into(
    prefix: &[u8],
    path: &[String],
    name: &[u8],
    delim: Option<u8>,
    home_delim: u8,
    out: &mut Vec<u8>,
) -> bool {
    // The levels of `name`, as [`levels`] gives them, without collecting them.
    let mut levels = name.split(|&b| Some(b) == delim);
    if !path
        .iter()
        .all(|p| levels.next().is_some_and(|l| l == p.as_bytes()))
    {
        return false;
    }
    let mut rest = levels.peekable();
    if path.is_empty() && rest.peek().is_some_and(|l| is_inbox(l)) {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(prefix);
    for l in rest {
        if l.contains(&home_delim) || l.is_empty() {
            out.truncate(start);
            return false;
        }
        out.push(home_delim);
        out.extend_from_slice(l);
    }
    true
}

/// Whether client name `name` is `prefix` or below it.
pub fn is_at_or_below(name: &[u8], prefix: &[u8], delim: u8) -> bool {
    match name.strip_prefix(prefix) {
        Some([]) => true,
        Some([next, ..]) => *next == delim,
        None => false,
    }
}

/// Whether a client name is held by one of the mounts whose client prefixes are `prefixes`:
/// `find_mount(..).is_some()` with the prefixes made once, for a caller that asks it of many
/// names.
pub fn under_any_prefix(prefixes: &[Vec<u8>], name: &[u8], delim: u8) -> bool {
    let first_level = name.split(|&b| b == delim).next().unwrap_or_default();
    !is_inbox(first_level) && prefixes.iter().any(|p| is_at_or_below(name, p, delim))
}

/// The referral URL for `rest` below a referral mount: the levels appended as URL path
/// segments, with everything outside the unreserved characters percent-encoded.
pub fn referral_url(base: &str, rest: &[&[u8]]) -> String {
    let mut url = base.trim_end_matches('/').to_owned();
    for level in rest {
        url.push('/');
        for &b in *level {
            if b.is_ascii_alphanumeric() || b"-._~&=+,!$'()*".contains(&b) {
                url.push(b as char);
            } else {
                url.push_str(&format!("%{b:02X}"));
            }
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::route::{MountTarget, NamespaceKind};

    fn mount(prefix: &[&str]) -> Arc<Mount> {
        Arc::new(Mount {
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            target: MountTarget::Referral("imap://x/".into()),
            namespace: NamespaceKind::Shared,
        })
    }

    #[test]
    fn finds_the_mount_by_whole_levels() {
        let mounts = [mount(&["Shared"]), mount(&["Remote", "Sales"])];
        assert_eq!(find_mount(&mounts, b"Shared", b'/'), Some((0, vec![])));
        assert_eq!(
            find_mount(&mounts, b"Shared/Team/x", b'/'),
            Some((0, vec![&b"Team"[..], b"x"]))
        );
        assert_eq!(find_mount(&mounts, b"SharedX", b'/'), None);
        assert_eq!(find_mount(&mounts, b"Remote", b'/'), None);
        assert_eq!(
            find_mount(&mounts, b"Remote.Sales.a", b'.'),
            Some((1, vec![&b"a"[..]]))
        );
        assert_eq!(find_mount(&mounts, b"INBOX", b'/'), None);
        // A configured level holding the client's delimiter is two levels for the client.
        let dotted = [mount(&["a.b"])];
        assert_eq!(
            find_mount(&dotted, b"a.b.c", b'.'),
            Some((0, vec![&b"c"[..]]))
        );
        assert_eq!(find_mount(&dotted, b"a.b", b'.'), Some((0, vec![])));
        assert_eq!(find_mount(&dotted, b"a.bc", b'.'), None);
    }

    #[test]
    fn translates_both_ways() {
        let path = vec!["Public".to_string()];
        assert_eq!(
            to_backend(&path, &[b"Team", b"R"], Some(b'.')).unwrap(),
            b"Public.Team.R"
        );
        assert_eq!(
            to_backend(&path, &[b"a.b"], Some(b'.')),
            Err(Untranslatable::ForeignDelimiter(b'.'))
        );
        assert_eq!(
            to_backend(&[], &[b"inbox"], Some(b'.')),
            Err(Untranslatable::MountedInbox)
        );
        assert_eq!(to_backend(&[], &[], Some(b'.')).unwrap(), b"");
        assert_eq!(
            to_client(b"Shared", &path, b"Public.Team.R", Some(b'.'), b'/').unwrap(),
            b"Shared/Team/R"
        );
        assert_eq!(
            to_client(b"Shared", &path, b"Public", Some(b'.'), b'/').unwrap(),
            b"Shared"
        );
        assert_eq!(
            to_client(b"Shared", &path, b"Publicity", Some(b'.'), b'/'),
            None
        );
        assert_eq!(
            to_client(b"Shared", &path, b"Public.a/b", Some(b'.'), b'/'),
            None
        );
        assert_eq!(to_client(b"A", &[], b"INBOX", Some(b'.'), b'/'), None);
        assert_eq!(
            to_client(b"A", &[], b"2024.Q1", Some(b'.'), b'/').unwrap(),
            b"A/2024/Q1"
        );
    }

    #[test]
    fn a_name_is_under_a_prefix_by_whole_levels() {
        let mounts = [mount(&["Shared"]), mount(&["Remote", "Sales"])];
        let prefixes: Vec<Vec<u8>> = mounts.iter().map(|m| client_prefix(m, b'/')).collect();
        for name in [
            &b"Shared"[..],
            b"Shared/x",
            b"SharedX",
            b"Remote",
            b"Remote/Sales/a",
            b"INBOX",
            b"inbox/Shared",
            b"",
        ] {
            assert_eq!(
                under_any_prefix(&prefixes, name, b'/'),
                find_mount(&mounts, name, b'/').is_some(),
                "{}",
                name.escape_ascii()
            );
        }
    }

    #[test]
    fn translating_into_a_buffer_appends_or_leaves_it() {
        let path = vec!["Public".to_string()];
        let mut out = b"x".to_vec();
        assert!(to_client_into(
            b"Shared",
            &path,
            b"Public.Team.R",
            Some(b'.'),
            b'/',
            &mut out
        ));
        assert_eq!(out, b"xShared/Team/R");
        for refused in [&b"Public.a/b"[..], b"Public..a", b"Publicity", b"Other"] {
            assert!(!to_client_into(
                b"Shared",
                &path,
                refused,
                Some(b'.'),
                b'/',
                &mut out
            ));
            assert_eq!(out, b"xShared/Team/R");
        }
        // A flat backend: the whole name is one level.
        assert_eq!(to_client(b"F", &[], b"a.b", None, b'/').unwrap(), b"F/a.b");
        assert_eq!(to_client(b"F", &[], b"a/b", None, b'/'), None);
        assert_eq!(to_client(b"F", &[], b"", None, b'/'), None);
        assert_eq!(to_client(b"F", &path, b"Public", None, b'/').unwrap(), b"F");
    }

    #[test]
    fn referral_urls_are_encoded() {
        assert_eq!(
            referral_url("imap://h/Sales", &[b"Q 1", b"x"]),
            "imap://h/Sales/Q%201/x"
        );
        assert_eq!(referral_url("imap://h/Sales", &[]), "imap://h/Sales");
    }
}
