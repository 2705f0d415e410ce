//! Capability lists: what the gateway advertises before login, and which of a backend's
//! capabilities survive being relayed through a framed stream.

/// Capabilities the gateway always offers before login (besides STARTTLS/LOGINDISABLED/AUTH=).
const PREAUTH_BASE: &[&str] = &["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE"];

/// The pre-login capability list for a connection in the given state.
pub fn preauth(tls_active: bool, starttls_available: bool, plaintext_allowed: bool) -> String {
    let mut caps: Vec<&str> = PREAUTH_BASE.to_vec();
    if !tls_active && starttls_available {
        caps.push("STARTTLS");
    }
    if tls_active || plaintext_allowed {
        caps.push("AUTH=PLAIN");
        caps.push("AUTH=LOGIN");
    } else {
        caps.push("LOGINDISABLED");
    }
    caps.join(" ")
}

/// Whether the backend's list would stop the gateway from relaying safely if passed on.
fn dropped(cap: &str) -> bool {
    // COMPRESS would turn the stream into deflate bytes the framer cannot read; STARTTLS,
    // LOGINDISABLED, AUTH= and SASL-IR are pre-login matters the gateway answered itself;
    // channel-binding mechanisms (-PLUS) cannot work through a TLS-terminating proxy.
    starts_with_ignore_case(cap, "COMPRESS=")
        || cap.eq_ignore_ascii_case("STARTTLS")
        || cap.eq_ignore_ascii_case("LOGINDISABLED")
        || starts_with_ignore_case(cap, "AUTH=")
        || cap.eq_ignore_ascii_case("SASL-IR")
        || ends_with_ignore_case(cap, "-PLUS")
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// Capabilities the gateway adds after login because it implements them itself (RLIST and
/// RLSUB are answered as LIST and LSUB when the backend lacks them). ID and NAMESPACE are
/// relayed to the backend, so they are advertised only when the backend has them.
const ADDED: &[&str] = &["MAILBOX-REFERRALS"];

/// The post-login list for the client: the backend's, filtered, plus the gateway's own.
pub fn post_login(backend: &Capabilities) -> String {
    post_login_without(backend, &[])
}

/// [`post_login`] without the capabilities named in `without`.
fn post_login_without(backend: &Capabilities, without: &[&str]) -> String {
    let kept = || {
        backend
            .iter()
            .filter(|c| !dropped(c) && !without.iter().any(|w| c.eq_ignore_ascii_case(w)))
    };
    let missing = |name: &str| !kept().any(|c| c.eq_ignore_ascii_case(name));
    let first = missing("IMAP4rev1").then_some("IMAP4rev1");
    let added = ADDED.iter().copied().filter(|add| missing(add));
    let mut out = String::with_capacity(backend.0.len() + 32);
    for cap in first.into_iter().chain(kept()).chain(added) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(cap);
    }
    out
}

/// Extensions a session with mounts cannot honour across servers: the merged LIST answers
/// only the base syntax, NOTIFY would need every server's events, and CATENATE/URLAUTH name
/// messages by URLs that point into one server.
const NOT_ACROSS_SERVERS: &[&str] = &[
    "LIST-EXTENDED",
    "LIST-STATUS",
    "LIST-MYRIGHTS",
    "NOTIFY",
    "CATENATE",
    "URLAUTH",
    "URL-PARTIAL",
    "MULTISEARCH",
];

/// The post-login list for a session with mounts: [`post_login`] without the extensions
/// that cannot span several servers.
pub fn post_login_mounts(backend: &Capabilities) -> String {
    post_login_without(backend, NOT_ACROSS_SERVERS)
}

/// A server's capability list, kept as the one string it came in: atoms are split off on
/// demand, so taking in Dovecot's fifty costs one allocation rather than fifty-odd, twice
/// per login (greeting and login answer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(String);

impl Capabilities {
    /// Takes the text after `CAPABILITY`.
    pub fn parse(text: &str) -> Capabilities {
        Capabilities(
            text.trim_matches(|c: char| c.is_ascii_whitespace())
                .to_owned(),
        )
    }

    /// The atoms, in the server's order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.split_ascii_whitespace()
    }

    /// Case-insensitive membership test.
    pub fn has(&self, name: &str) -> bool {
        self.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    /// Keeps only `name`, if the list has it: what a session that needs nothing else of the
    /// list holds for its lifetime.
    pub fn keep_only(&mut self, name: &str) {
        *self = if self.has(name) {
            Capabilities(name.to_owned())
        } else {
            Capabilities::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preauth_lists() {
        assert_eq!(
            preauth(false, true, false),
            "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE STARTTLS LOGINDISABLED"
        );
        assert_eq!(
            preauth(true, true, false),
            "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE AUTH=PLAIN AUTH=LOGIN"
        );
        assert_eq!(
            preauth(false, false, true),
            "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE AUTH=PLAIN AUTH=LOGIN"
        );
    }

    #[test]
    fn post_login_filters_and_adds() {
        let backend = Capabilities::parse(
            "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT COMPRESS=DEFLATE \
             AUTH=SCRAM-SHA-256-PLUS QUOTA NAMESPACE STARTTLS LITERAL+",
        );
        assert_eq!(
            post_login(&backend),
            "IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE SORT QUOTA NAMESPACE LITERAL+ MAILBOX-REFERRALS"
        );
        assert_eq!(
            post_login(&Capabilities::parse("IMAP4rev1 IDLE")),
            "IMAP4rev1 IDLE MAILBOX-REFERRALS",
            "ID and NAMESPACE are relayed, so only advertised when the backend has them"
        );
        assert!(backend.has("idle"));
        assert!(!backend.has("MOVE"));
        assert_eq!(
            post_login(&Capabilities::parse("IDLE auth=plain compress=deflate")),
            "IMAP4rev1 IDLE MAILBOX-REFERRALS",
            "IMAP4rev1 is put first when missing; dropped names match in any case"
        );
    }

    #[test]
    fn mounts_drop_what_cannot_span_servers() {
        let backend = Capabilities::parse(" IMAP4rev1 LIST-EXTENDED  idle notify MOVE\r\n");
        assert_eq!(
            post_login_mounts(&backend),
            "IMAP4rev1 idle MOVE MAILBOX-REFERRALS"
        );
        assert_eq!(backend.iter().count(), 5);
    }

    #[test]
    fn keep_only() {
        let mut caps = Capabilities::parse("IMAP4rev1 mailbox-referrals IDLE");
        caps.keep_only("MAILBOX-REFERRALS");
        assert!(caps.has("MAILBOX-REFERRALS"));
        assert_eq!(caps.iter().count(), 1);
        let mut caps = Capabilities::parse("IMAP4rev1 IDLE");
        caps.keep_only("MAILBOX-REFERRALS");
        assert_eq!(caps, Capabilities::default());
    }
}
