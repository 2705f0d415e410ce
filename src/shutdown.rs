//! How sessions are told to stop: the readiness latch, the drain signal of a shutdown, and
//! the registry of open sessions that `POST /admin/kick` searches by user.
//!
//! A session never stops mid-response: it is handed a `Stop`, and the relay checks it at its
//! safe points (between responses, or in IDLE), where it says `* BYE` and closes. Each
//! session's token is a child of the drain token, so a shutdown reaches every session with
//! one cancellation, and a kick reaches just the sessions it names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A kicked session that reaches no safe point within this time (a client that stopped
/// reading in the middle of a large FETCH) is closed anyway.
pub const KICK_DEADLINE: Duration = Duration::from_secs(10);

/// Why a session is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Shutdown,
    Kick,
}

impl StopReason {
    /// The untagged BYE the client gets at the safe point.
    pub fn bye(self) -> &'static [u8] {
        match self {
            StopReason::Shutdown => {
                b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n"
            }
            StopReason::Kick => b"* BYE [UNAVAILABLE] Session ended by the administrator\r\n",
        }
    }
}

/// One session's stop signal.
#[derive(Clone)]
pub struct Stop {
    token: CancellationToken,
    drain: CancellationToken,
    force: CancellationToken,
}

impl Stop {
    /// A signal that never fires (tools and unit tests that run a relay on their own).
    pub fn never() -> Self {
        Self {
            token: CancellationToken::new(),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
        }
    }

    /// Resolves once the session should stop at its next safe point.
    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when the session must end now, safe point or not: the shutdown grace period
    /// is over, or a kick found no safe point within [`KICK_DEADLINE`].
    pub async fn forced(&self) {
        // Both ways start with the session's token: a force drains first, and the drain
        // cancels every session's token. Waiting on the token alone until then holds one
        // waiter for the whole of an idle session, not two and a timer.
        self.token.cancelled().await;
        if self.drain.is_cancelled() {
            // A shutdown's deadline is the grace period, signalled through `force`.
            self.force.cancelled().await;
            return;
        }
        // A kick, which a shutdown may overtake. Boxed: only a kicked session pays for it.
        Box::pin(async {
            tokio::select! {
                _ = self.force.cancelled() => {}
                _ = tokio::time::sleep(KICK_DEADLINE) => {}
            }
        })
        .await;
    }

    /// Why the stop was requested (meaningful once it was).
    pub fn reason(&self) -> StopReason {
        if self.drain.is_cancelled() {
            StopReason::Shutdown
        } else {
            StopReason::Kick
        }
    }
}

struct Entry {
    /// Lower-cased, as routing compares user names; None before login.
    user: Option<String>,
    token: CancellationToken,
}

/// The process's lifecycle: ready or not, draining or not, and its open sessions.
pub struct Lifecycle {
    ready: AtomicBool,
    drain: CancellationToken,
    force: CancellationToken,
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Entry>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
            next_id: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

impl Lifecycle {
    /// Listeners are bound and a routing table is loaded (false again once draining).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.drain.is_cancelled()
    }

    /// Starts the drain: readiness turns false and every session is asked to stop.
    pub fn drain(&self) {
        self.ready.store(false, Ordering::Release);
        self.drain.cancel();
    }

    /// Ends every session now: the shutdown grace period is over.
    pub fn force(&self) {
        self.drain();
        self.force.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Resolves when the drain starts.
    pub async fn draining(&self) {
        self.drain.cancelled().await
    }

    /// Registers a new session; it is removed when the returned guard drops.
    pub fn register(self: &Arc<Self>) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = self.drain.child_token();
        if let Ok(mut map) = self.sessions.lock() {
            map.insert(
                id,
                Entry {
                    user: None,
                    token: token.clone(),
                },
            );
        }
        SessionGuard {
            lifecycle: Arc::clone(self),
            id,
            stop: Stop {
                token,
                drain: self.drain.clone(),
                force: self.force.clone(),
            },
        }
    }

    /// Asks every session of `user` to stop; returns how many were asked.
    pub fn kick(&self, user: &str) -> usize {
        let user = user.to_ascii_lowercase();
        let Ok(map) = self.sessions.lock() else {
            return 0;
        };
        let mut n = 0;
        for e in map.values() {
            if e.user.as_deref() == Some(user.as_str()) && !e.token.is_cancelled() {
                e.token.cancel();
                n += 1;
            }
        }
        n
    }

    /// Open sessions, logged in or not.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().map_or(0, |m| m.len())
    }
}

/// A registered session: its stop signal, and its entry in the registry until dropped.
pub struct SessionGuard {
    lifecycle: Arc<Lifecycle>,
    id: u64,
    stop: Stop,
}

impl SessionGuard {
    pub fn stop(&self) -> &Stop {
        &self.stop
    }

    /// The session logged in as `user`: from now on a kick for that user reaches it.
    pub fn set_user(&self, user: &str) {
        if let Ok(mut map) = self.lifecycle.sessions.lock()
            && let Some(e) = map.get_mut(&self.id)
        {
            e.user = Some(user.to_ascii_lowercase());
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.lifecycle.sessions.lock() {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_reaches_only_that_users_sessions() {
        let l = Arc::new(Lifecycle::default());
        let a = l.register();
        let b = l.register();
        let anon = l.register();
        a.set_user("Alice");
        b.set_user("bob");
        assert_eq!(l.kick("ALICE"), 1);
        assert!(a.stop().is_requested());
        assert_eq!(a.stop().reason(), StopReason::Kick);
        assert!(!b.stop().is_requested());
        assert!(!anon.stop().is_requested());
        // Already asked: not counted twice.
        assert_eq!(l.kick("alice"), 0);
        assert_eq!(l.sessions(), 3);
        drop(a);
        assert_eq!(l.sessions(), 2);
    }

    #[test]
    fn drain_reaches_every_session_and_readiness() {
        let l = Arc::new(Lifecycle::default());
        assert!(!l.is_ready());
        l.set_ready();
        assert!(l.is_ready());
        let s = l.register();
        l.drain();
        assert!(!l.is_ready());
        assert!(s.stop().is_requested());
        assert_eq!(s.stop().reason(), StopReason::Shutdown);
        // A session that starts during the drain is asked to stop at once.
        assert!(l.register().stop().is_requested());
    }

    /// Whether `forced` resolves within `d` of (paused) time.
    async fn within(d: Duration, forced: &mut std::pin::Pin<&mut impl Future>) -> bool {
        tokio::time::timeout(d, forced.as_mut()).await.is_ok()
    }

    const TICK: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_kick_is_forced_after_its_deadline() {
        let l = Arc::new(Lifecycle::default());
        let s = l.register();
        s.set_user("alice");
        let mut forced = std::pin::pin!(s.stop().forced());
        assert!(!within(Duration::from_secs(3600), &mut forced).await);
        l.kick("alice");
        assert!(!within(KICK_DEADLINE - TICK, &mut forced).await);
        assert!(within(2 * TICK, &mut forced).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_is_forced_only_by_the_force() {
        let l = Arc::new(Lifecycle::default());
        let s = l.register();
        let mut forced = std::pin::pin!(s.stop().forced());
        l.drain();
        // The grace period is the shutdown's, not the kick's deadline.
        assert!(!within(10 * KICK_DEADLINE, &mut forced).await);
        l.force();
        assert!(within(TICK, &mut forced).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_overtakes_a_kick() {
        let l = Arc::new(Lifecycle::default());
        let s = l.register();
        s.set_user("alice");
        let mut forced = std::pin::pin!(s.stop().forced());
        l.kick("alice");
        assert!(!within(KICK_DEADLINE / 2, &mut forced).await);
        l.force();
        assert!(within(TICK, &mut forced).await);
    }
}
