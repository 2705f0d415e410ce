//! Polling until something the test cannot await directly has happened (a gauge, a log
//! line, a file reload), with one bound for every test.

use std::time::Duration;

use super::imap::WAIT;

/// Short enough that a test does not wait noticeably after the event, long enough not to
/// spin a core that the gateway and Dovecot need.
const POLL: Duration = Duration::from_millis(10);

/// What a poll answers: `true`/`false`, or `Some(value)` once there is one.
pub trait Outcome {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `check` until it holds; fails the test after `WAIT`.
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    eventually(what, async || check()).await
}

/// Polls `f` until it is ready; fails the test after `WAIT`.
pub async fn eventually<O: Outcome>(what: &str, mut f: impl AsyncFnMut() -> O) -> O::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await.ready() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
