//! The pre-scanner: reads the tag and command name off the head of a command line without
//! parsing the rest, so the relay can decide in constant time whether to intercept a command.

use std::ops::Range;

/// The commands the gateway tells apart. Anything else is `Other`; the set is fixed so it can
/// be a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    Capability,
    Noop,
    Logout,
    StartTls,
    Authenticate,
    Login,
    Id,
    Enable,
    Select,
    Examine,
    Create,
    Delete,
    Rename,
    Subscribe,
    Unsubscribe,
    List,
    Lsub,
    Rlist,
    Rlsub,
    Namespace,
    Status,
    Append,
    Check,
    Close,
    Unselect,
    Expunge,
    Search,
    Fetch,
    Store,
    Copy,
    Move,
    Uid,
    Idle,
    Compress,
    GetQuota,
    SetQuota,
    GetQuotaRoot,
    Other,
}

impl CommandName {
    /// Every command name, in declaration order (`name as usize` indexes it).
    pub const ALL: [CommandName; 38] = [
        CommandName::Capability,
        CommandName::Noop,
        CommandName::Logout,
        CommandName::StartTls,
        CommandName::Authenticate,
        CommandName::Login,
        CommandName::Id,
        CommandName::Enable,
        CommandName::Select,
        CommandName::Examine,
        CommandName::Create,
        CommandName::Delete,
        CommandName::Rename,
        CommandName::Subscribe,
        CommandName::Unsubscribe,
        CommandName::List,
        CommandName::Lsub,
        CommandName::Rlist,
        CommandName::Rlsub,
        CommandName::Namespace,
        CommandName::Status,
        CommandName::Append,
        CommandName::Check,
        CommandName::Close,
        CommandName::Unselect,
        CommandName::Expunge,
        CommandName::Search,
        CommandName::Fetch,
        CommandName::Store,
        CommandName::Copy,
        CommandName::Move,
        CommandName::Uid,
        CommandName::Idle,
        CommandName::Compress,
        CommandName::GetQuota,
        CommandName::SetQuota,
        CommandName::GetQuotaRoot,
        CommandName::Other,
    ];

    /// Case-insensitive lookup of a command name.
    pub fn parse(name: &[u8]) -> Self {
        const NAMES: &[(&str, CommandName)] = &[
            ("CAPABILITY", CommandName::Capability),
            ("NOOP", CommandName::Noop),
            ("LOGOUT", CommandName::Logout),
            ("STARTTLS", CommandName::StartTls),
            ("AUTHENTICATE", CommandName::Authenticate),
            ("LOGIN", CommandName::Login),
            ("ID", CommandName::Id),
            ("ENABLE", CommandName::Enable),
            ("SELECT", CommandName::Select),
            ("EXAMINE", CommandName::Examine),
            ("CREATE", CommandName::Create),
            ("DELETE", CommandName::Delete),
            ("RENAME", CommandName::Rename),
            ("SUBSCRIBE", CommandName::Subscribe),
            ("UNSUBSCRIBE", CommandName::Unsubscribe),
            ("LIST", CommandName::List),
            ("LSUB", CommandName::Lsub),
            ("RLIST", CommandName::Rlist),
            ("RLSUB", CommandName::Rlsub),
            ("NAMESPACE", CommandName::Namespace),
            ("STATUS", CommandName::Status),
            ("APPEND", CommandName::Append),
            ("CHECK", CommandName::Check),
            ("CLOSE", CommandName::Close),
            ("UNSELECT", CommandName::Unselect),
            ("EXPUNGE", CommandName::Expunge),
            ("SEARCH", CommandName::Search),
            ("FETCH", CommandName::Fetch),
            ("STORE", CommandName::Store),
            ("COPY", CommandName::Copy),
            ("MOVE", CommandName::Move),
            ("UID", CommandName::Uid),
            ("IDLE", CommandName::Idle),
            ("COMPRESS", CommandName::Compress),
            ("GETQUOTA", CommandName::GetQuota),
            ("SETQUOTA", CommandName::SetQuota),
            ("GETQUOTAROOT", CommandName::GetQuotaRoot),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
            .map_or(CommandName::Other, |&(_, c)| c)
    }

    /// A stable lower-case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            CommandName::Capability => "capability",
            CommandName::Noop => "noop",
            CommandName::Logout => "logout",
            CommandName::StartTls => "starttls",
            CommandName::Authenticate => "authenticate",
            CommandName::Login => "login",
            CommandName::Id => "id",
            CommandName::Enable => "enable",
            CommandName::Select => "select",
            CommandName::Examine => "examine",
            CommandName::Create => "create",
            CommandName::Delete => "delete",
            CommandName::Rename => "rename",
            CommandName::Subscribe => "subscribe",
            CommandName::Unsubscribe => "unsubscribe",
            CommandName::List => "list",
            CommandName::Lsub => "lsub",
            CommandName::Rlist => "rlist",
            CommandName::Rlsub => "rlsub",
            CommandName::Namespace => "namespace",
            CommandName::Status => "status",
            CommandName::Append => "append",
            CommandName::Check => "check",
            CommandName::Close => "close",
            CommandName::Unselect => "unselect",
            CommandName::Expunge => "expunge",
            CommandName::Search => "search",
            CommandName::Fetch => "fetch",
            CommandName::Store => "store",
            CommandName::Copy => "copy",
            CommandName::Move => "move",
            CommandName::Uid => "uid",
            CommandName::Idle => "idle",
            CommandName::Compress => "compress",
            CommandName::GetQuota => "getquota",
            CommandName::SetQuota => "setquota",
            CommandName::GetQuotaRoot => "getquotaroot",
            CommandName::Other => "other",
        }
    }
}

/// What the pre-scanner read off a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prescan<'a> {
    pub tag: &'a [u8],
    pub name: CommandName,
    /// Where the command name stands in the line (for rewriting it).
    pub name_range: Range<usize>,
}

/// A tag character: an ASTRING-CHAR other than `+` (RFC 3501 formal syntax).
pub fn is_tag_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
}

/// Reads `tag SP name` from the head of a line. Returns None when the line does not start
/// with a valid tag followed by a space and an atom (an IDLE `DONE`, a SASL response line, or
/// garbage: the backend answers those).
pub fn prescan(line: &[u8]) -> Option<Prescan<'_>> {
    let tag_end = line.iter().position(|&b| !is_tag_char(b))?;
    if tag_end == 0 || line[tag_end] != b' ' {
        return None;
    }
    let name_start = tag_end + 1;
    let name_len = line[name_start..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
        .unwrap_or(line.len() - name_start);
    if name_len == 0 {
        return None;
    }
    let name_range = name_start..name_start + name_len;
    Some(Prescan {
        tag: &line[..tag_end],
        name: CommandName::parse(&line[name_range.clone()]),
        name_range,
    })
}

/// The tag of a line if it starts with one (for answering malformed commands).
pub fn tag_of(line: &[u8]) -> Option<&[u8]> {
    let end = line
        .iter()
        .position(|&b| !is_tag_char(b))
        .unwrap_or(line.len());
    (end > 0).then(|| &line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tag_and_name() {
        let p = prescan(b"A001 rlist \"\" *\r\n").unwrap();
        assert_eq!(p.tag, b"A001");
        assert_eq!(p.name, CommandName::Rlist);
        assert_eq!(p.name_range, 5..10);
        assert_eq!(prescan(b"x LOGOUT\r\n").unwrap().name, CommandName::Logout);
        assert_eq!(prescan(b"x XFOO bar\r\n").unwrap().name, CommandName::Other);
        assert_eq!(
            prescan(b"x UID FETCH 1 FLAGS").unwrap().name,
            CommandName::Uid
        );
    }

    #[test]
    fn all_is_in_declaration_order() {
        for (i, c) in CommandName::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert_eq!(CommandName::ALL.last(), Some(&CommandName::Other));
    }

    #[test]
    fn rejects_non_commands() {
        assert_eq!(prescan(b"DONE\r\n"), None);
        assert_eq!(prescan(b"+ abc\r\n"), None);
        assert_eq!(prescan(b" NOOP\r\n"), None);
        assert_eq!(prescan(b"a  NOOP\r\n"), None);
        assert_eq!(prescan(b"a{ NOOP\r\n"), None);
        assert_eq!(tag_of(b"a{ NOOP"), Some(&b"a"[..]));
        assert_eq!(tag_of(b"*x"), None);
    }
}
