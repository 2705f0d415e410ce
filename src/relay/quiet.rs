//! A future that is polled only when something it waits on woke it. A session is one task,
//! and a task that wakes polls every future it is made of: when the backend's answer arrives,
//! the client-to-backend direction, the shutdown and kick signals and their timers would all
//! be polled again to find that nothing changed, which is most of the gateway's own work per
//! relayed command (measured with callgrind: about 16,000 instructions a command, where
//! nginx's mail proxy spends 1,400). Wrapped in [`Quiet`], such a future gets a waker of its
//! own and is polled again only once that waker was used, the way `FuturesUnordered` does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::{ArcWake, AtomicWaker, waker_ref};

/// What the inner future's waker reaches: a flag that it was woken, and the task to wake.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for Signal {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.woken.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

/// `F`, polled only when its own waker was used since its last poll, on the first poll, and
/// after a poll that found it ready (a future polled again after that, such as a stream of
/// signals made with `poll_fn`, may have more at once).
pub struct Quiet<F> {
    inner: F,
    signal: Arc<Signal>,
}

impl<F: Future + Unpin> Quiet<F> {
    /// One allocation (the flag and the task's waker, 64 bytes), once per wrapped future.
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self { inner, signal }
    }
}

impl<F> Quiet<F> {
    /// Has the inner future polled at the next poll, for a change it reads but does not wait
    /// on (a flag set by another future of the task), and wakes the task.
    pub fn wake(&self) {
        ArcWake::wake_by_ref(&self.signal);
    }
}

impl<F: Future + Unpin> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake that comes in between sets the flag and
        // wakes this task again, so it is not lost.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // A borrowed waker: no reference count changes hands unless the inner future keeps it.
        let waker = waker_ref(&this.signal);
        let polled = Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            this.signal.woken.store(true, Ordering::Release);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;

    /// Counts its polls; ready once `notify` fired.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        notified: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    }

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.notified.as_mut().poll(cx)
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_woken() {
        let notify = Notify::new();
        let other = Notify::new();
        let polls = AtomicUsize::new(0);
        let mut quiet = Quiet::new(Counted {
            polls: &polls,
            notified: Box::pin(notify.notified()),
        });
        // The task wakes 20 times for something else; the wrapped future is polled once,
        // at the start, and once more when its own notification comes.
        let wakes = async {
            for _ in 0..20 {
                other.notify_one();
                tokio::task::yield_now().await;
            }
            notify.notify_one();
        };
        let waits = async {
            loop {
                tokio::select! {
                    biased;
                    () = &mut quiet => break,
                    () = other.notified() => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(waits, wakes) })
            .await
            .expect("the wrapped future finishes once notified");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_wake_from_another_task_reaches_the_waiting_task() {
        let notify = Arc::new(Notify::new());
        let polls = AtomicUsize::new(0);
        let quiet = Quiet::new(Counted {
            polls: &polls,
            notified: Box::pin(notify.notified()),
        });
        let notifier = Arc::clone(&notify);
        let handle = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            notifier.notify_one();
        });
        tokio::time::timeout(Duration::from_secs(5), quiet)
            .await
            .expect("woken from another task");
        handle.await.expect("notifier task");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
