//! IMAP LIST/LSUB pattern matching (RFC 3501 section 6.3.8): deciding which mailbox names a
//! pattern selects, and the literal prefix that tells which backend a pattern can reach.
//!
//! Matching is byte-exact and case-sensitive everywhere: INBOX is case-insensitive in IMAP, but
//! folding it is the caller's job, since only the caller knows whether a name is the INBOX
//! (`inbox/child` is INBOX's child only on servers with a `/` delimiter).

/// Whether mailbox `name` matches LIST pattern `pattern`: `*` matches any sequence of bytes
/// (including the delimiter), `%` any sequence not containing `delim` (when `delim` is None,
/// `%` behaves like `*`). Everything else matches itself, case-sensitively.
///
/// Runs in O(len(pattern) * len(name)) time and O(len(pattern)) memory whatever the input: a
/// backtracking matcher is exponential on patterns like `*a*a*a*b`, and patterns come from
/// clients.
pub fn matches(pattern: &[u8], name: &[u8], delim: Option<u8>) -> bool {
    // The set of pattern positions reachable after the name bytes consumed so far (an NFA
    // simulated breadth-first): `live[j]` means `pattern[..j]` matches the consumed bytes.
    let mut live = vec![false; pattern.len() + 1];
    let mut next = vec![false; pattern.len() + 1];
    live[0] = true;
    skip_empty_wildcards(pattern, &mut live);
    for &c in name {
        next.fill(false);
        let mut any = false;
        for (j, &p) in pattern.iter().enumerate() {
            if !live[j] {
                continue;
            }
            match p {
                b'*' => next[j] = true,
                b'%' if delim != Some(c) => next[j] = true,
                b'%' => {}
                _ if p == c => next[j + 1] = true,
                _ => {}
            }
            any = true;
        }
        if !any {
            return false;
        }
        skip_empty_wildcards(pattern, &mut next);
        std::mem::swap(&mut live, &mut next);
    }
    live[pattern.len()]
}

/// A wildcard may match nothing, so a live position on a wildcard makes the one after it live
/// too; walking forwards lets runs like `*%*` propagate in one pass.
fn skip_empty_wildcards(pattern: &[u8], live: &mut [bool]) {
    for (j, &p) in pattern.iter().enumerate() {
        if live[j] && is_wildcard(p) {
            live[j + 1] = true;
        }
    }
}

fn is_wildcard(b: u8) -> bool {
    b == b'*' || b == b'%'
}

/// The bytes of `pattern` before its first wildcard (`*` or `%`); the whole pattern if it has
/// none.
pub fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = pattern
        .iter()
        .position(|&b| is_wildcard(b))
        .unwrap_or(pattern.len());
    pattern.split_at(end).0
}

/// Whether the pattern has a wildcard.
pub fn has_wildcard(pattern: &[u8]) -> bool {
    pattern.iter().any(|&b| is_wildcard(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLASH: Option<u8> = Some(b'/');

    #[test]
    fn star_matches_everything() {
        for name in [&b""[..], b"INBOX", b"Work/Projects/2024", b"a.b/c", b"/"] {
            assert!(matches(b"*", name, SLASH));
            assert!(matches(b"*", name, None));
            assert!(matches(b"**", name, SLASH));
        }
    }

    #[test]
    fn percent_stops_at_the_delimiter() {
        assert!(matches(b"%", b"Work", SLASH));
        assert!(!matches(b"%", b"Work/Projects", SLASH));
        assert!(matches(b"%", b"", SLASH));
        assert!(!matches(b"%", b"/", SLASH));
        assert!(matches(b"%", b"Work/Projects", None));
    }

    #[test]
    fn children_of_a_level() {
        assert!(matches(b"Work/%", b"Work/Projects", SLASH));
        assert!(!matches(b"Work/%", b"Work", SLASH));
        assert!(!matches(b"Work/%", b"Work/a/b", SLASH));
        assert!(matches(b"Work/%", b"Work/", SLASH));
        assert!(matches(b"Work/*", b"Work/a/b", SLASH));
        assert!(!matches(b"Work/*", b"Work", SLASH));
    }

    #[test]
    fn prefix_star() {
        assert!(matches(b"Wo*", b"Work", SLASH));
        assert!(matches(b"Wo*", b"Wo", SLASH));
        assert!(matches(b"Wo*", b"Work/Projects", SLASH));
        assert!(!matches(b"Wo*", b"work", SLASH));
        assert!(!matches(b"Wo*", b"W", SLASH));
        assert!(!matches(b"Wo*", b"XWork", SLASH));
    }

    #[test]
    fn two_levels() {
        assert!(matches(b"%/%", b"a/b", SLASH));
        assert!(matches(b"%/%", b"Work/Projects", SLASH));
        assert!(matches(b"%/%", b"/", SLASH));
        assert!(!matches(b"%/%", b"a", SLASH));
        assert!(!matches(b"%/%", b"a/b/c", SLASH));
    }

    #[test]
    fn percent_with_another_delimiter() {
        assert!(matches(b"%", b"a/b", Some(b'.')));
        assert!(!matches(b"%", b"a.b", Some(b'.')));
        assert!(matches(b"%.%", b"a.b", Some(b'.')));
    }

    #[test]
    fn literal_bytes_are_exact() {
        assert!(matches(b"INBOX", b"INBOX", SLASH));
        assert!(!matches(b"INBOX", b"inbox", SLASH));
        assert!(!matches(b"INBOX", b"INBOX/x", SLASH));
        assert!(!matches(b"INBOX", b"INBO", SLASH));
        assert!(matches(b"", b"", SLASH));
        assert!(!matches(b"", b"a", SLASH));
        assert!(matches("Entw%".as_bytes(), "Entwürfe".as_bytes(), SLASH));
    }

    #[test]
    fn wildcards_in_the_middle() {
        assert!(matches(b"a*b", b"ab", SLASH));
        assert!(matches(b"a*b", b"a/x/b", SLASH));
        assert!(!matches(b"a%b", b"a/x/b", SLASH));
        assert!(matches(b"a%b", b"axxb", SLASH));
        assert!(matches(b"*a*a*b", b"xaxxab", SLASH));
        assert!(!matches(b"*a*a*b", b"xaxxb", SLASH));
        assert!(matches(b"%*%", b"a/b/c", SLASH));
        assert!(matches(b"*/%", b"a/b/c", SLASH));
        assert!(!matches(b"*/%", b"abc", SLASH));
    }

    #[test]
    fn pathological_patterns_are_fast() {
        let name = vec![b'a'; 10_000];
        let start = std::time::Instant::now();
        assert!(!matches(b"*a*a*a*a*a*a*b", &name, SLASH));
        assert!(!matches(b"*a*a*b", &name, SLASH));
        assert!(!matches(b"%a%a%a%a%a%a%b", &name, SLASH));
        assert!(matches(b"*a*a*a*a*a*a*", &name, SLASH));
        assert!(matches(b"%a%a%a%a%a%a%", &name, SLASH));
        // Seconds of slack for slow CI; exponential backtracking would take far longer.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix(b"Shared/T*"), b"Shared/T");
        assert_eq!(literal_prefix(b"%"), b"");
        assert_eq!(literal_prefix(b"abc"), b"abc");
        assert_eq!(literal_prefix(b""), b"");
        assert_eq!(literal_prefix(b"a%b*"), b"a");
    }

    #[test]
    fn wildcard_presence() {
        assert!(has_wildcard(b"Shared/T*"));
        assert!(has_wildcard(b"%"));
        assert!(has_wildcard(b"a%b"));
        assert!(!has_wildcard(b"abc"));
        assert!(!has_wildcard(b""));
    }
}
