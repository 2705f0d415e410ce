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
    let upper = cap.to_ascii_uppercase();
    // COMPRESS would turn the stream into deflate bytes the framer cannot read; STARTTLS,
    // LOGINDISABLED, AUTH= and SASL-IR are pre-login matters the gateway answered itself;
    // channel-binding mechanisms (-PLUS) cannot work through a TLS-terminating proxy.
    upper.starts_with("COMPRESS=")
        || upper == "STARTTLS"
        || upper == "LOGINDISABLED"
        || upper.starts_with("AUTH=")
        || upper == "SASL-IR"
        || upper.ends_with("-PLUS")
}

/// Capabilities the gateway adds after login because it implements them itself (RLIST and
/// RLSUB are answered as LIST and LSUB when the backend lacks them). ID and NAMESPACE are
/// relayed to the backend, so they are advertised only when the backend has them.
const ADDED: &[&str] = &["MAILBOX-REFERRALS"];

/// The post-login list for the client: the backend's, filtered, plus the gateway's own.
pub fn post_login(backend: &[String]) -> String {
    let mut caps: Vec<&str> = backend
        .iter()
        .map(String::as_str)
        .filter(|c| !dropped(c))
        .collect();
    if !caps.iter().any(|c| c.eq_ignore_ascii_case("IMAP4rev1")) {
        caps.insert(0, "IMAP4rev1");
    }
    for add in ADDED {
        if !caps.iter().any(|c| c.eq_ignore_ascii_case(add)) {
            caps.push(add);
        }
    }
    caps.join(" ")
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
pub fn post_login_mounts(backend: &[String]) -> String {
    let kept: Vec<String> = backend
        .iter()
        .filter(|c| !NOT_ACROSS_SERVERS.iter().any(|n| c.eq_ignore_ascii_case(n)))
        .cloned()
        .collect();
    post_login(&kept)
}

/// Case-insensitive membership test.
pub fn has(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// Splits a capability list (the text after `CAPABILITY`) into atoms.
pub fn parse_list(text: &str) -> Vec<String> {
    text.split_ascii_whitespace().map(str::to_owned).collect()
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
        let backend = parse_list(
            "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT COMPRESS=DEFLATE \
             AUTH=SCRAM-SHA-256-PLUS QUOTA NAMESPACE STARTTLS LITERAL+",
        );
        assert_eq!(
            post_login(&backend),
            "IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE SORT QUOTA NAMESPACE LITERAL+ MAILBOX-REFERRALS"
        );
        assert_eq!(
            post_login(&parse_list("IMAP4rev1 IDLE")),
            "IMAP4rev1 IDLE MAILBOX-REFERRALS",
            "ID and NAMESPACE are relayed, so only advertised when the backend has them"
        );
        assert!(has(&backend, "idle"));
        assert!(!has(&backend, "MOVE"));
    }
}
