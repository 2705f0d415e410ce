//! Where the accept loops and the sessions run: on worker threads of their own, each with a
//! single-threaded runtime (`runtime = "thread-per-core"`, the default), or as tasks of the
//! caller's work-stealing runtime (`"work-stealing"`).
//!
//! A worker accepts on every listener and runs each session it accepted to its end, so a
//! session's readiness events, timers and wake-ups never leave the thread that owns it. In a
//! work-stealing runtime each event is taken by whichever worker polls the I/O driver, which
//! then wakes another worker to share the queue: a futex and a context switch per command,
//! measured at 10-40 % of the gateway's CPU per login and per command (docs/benchmarks.md).
//! The listening socket is shared: the kernel hands each connection to the first worker
//! that accepts it, and a worker busy with its sessions comes late, so load evens out.
//!
//! The control plane (admin server, reloads, signals) stays on the caller's runtime.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::config::RuntimeKind;
use crate::net::Listener;
use crate::session::Shared;

/// The worker threads `configured` asks for: itself, or with 0 one per CPU the process may
/// use (the standard library counts a cgroup CPU quota and the affinity mask).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
    }
}

/// The runtimes of the worker threads, for counting their live tasks (a session is one
/// task): leak checks in tests.
#[derive(Default)]
pub struct WorkerHandles(Mutex<Vec<Handle>>);

impl WorkerHandles {
    /// Tasks alive on all worker runtimes.
    pub fn alive_tasks(&self) -> usize {
        self.lock()
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Handle>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The accept loops of every listener, wherever they run.
pub enum Accepting {
    /// Tasks on the caller's runtime.
    Here(Vec<tokio::task::JoinHandle<()>>),
    Workers(Workers),
}

impl Accepting {
    /// Starts accepting on `listeners` until `shutdown`; sessions are spawned on `tracker`.
    /// A worker thread that runs sessions stays up until `finished`.
    pub fn start(
        shared: &Arc<Shared>,
        listeners: &[Arc<Listener>],
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        finished: &CancellationToken,
    ) -> Self {
        let perf = &shared.config.performance;
        if perf.runtime == RuntimeKind::ThreadPerCore {
            let n = worker_count(perf.worker_threads);
            match Workers::start(n, shared, listeners, tracker, shutdown, finished) {
                Ok(w) => {
                    info!(workers = n, "sessions run on thread-per-core workers");
                    return Self::Workers(w);
                }
                // Threads or runtimes refused (a tight pids limit): still serve, here.
                Err(e) => {
                    error!(error = %e, "cannot start worker threads; serving on the main runtime")
                }
            }
        }
        Self::Here(
            listeners
                .iter()
                .map(|l| {
                    tokio::spawn(Arc::clone(l).serve(
                        Arc::clone(shared),
                        tracker.clone(),
                        shutdown.clone(),
                        None,
                    ))
                })
                .collect(),
        )
    }

    /// Waits until every accept loop has stopped (after `shutdown`).
    pub async fn stopped(&mut self) {
        match self {
            Self::Here(loops) => {
                for l in loops.drain(..) {
                    let _ = l.await;
                }
            }
            Self::Workers(w) => {
                for rx in w.accepting.drain(..) {
                    // An error: the thread is gone, so it accepts nothing either.
                    let _ = rx.await;
                }
            }
        }
    }

    /// Waits for the worker threads to end (after `finished`); what a worker still holds
    /// then (a session that ignored its forced stop) is dropped with its runtime.
    pub async fn join(self) {
        if let Self::Workers(w) = self {
            let Workers {
                threads, guards, ..
            } = w;
            let joined = tokio::task::spawn_blocking(move || {
                for t in threads {
                    if t.join().is_err() {
                        error!("a worker thread panicked");
                    }
                }
            })
            .await;
            if let Err(e) = joined {
                error!(error = %e, "waiting for the worker threads failed");
            }
            drop(guards);
        }
    }
}

/// Running worker threads.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// One per thread, sent when its accept loops have all stopped.
    accepting: Vec<oneshot::Receiver<()>>,
    /// Dropped with the gateway's `serve` future (a test that stops polling it): the
    /// workers then stop accepting and end, instead of serving on without an owner.
    guards: [DropGuard; 2],
}

impl Workers {
    fn start(
        n: usize,
        shared: &Arc<Shared>,
        listeners: &[Arc<Listener>],
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        finished: &CancellationToken,
    ) -> io::Result<Self> {
        // Built here, before any thread starts, so that a failure leaves nothing running.
        let runtimes = (0..n)
            .map(|_| Builder::new_current_thread().enable_all().build())
            .collect::<io::Result<Vec<Runtime>>>()?;
        let stop_accepting = shutdown.child_token();
        let end = finished.child_token();
        let loads: Arc<[AtomicUsize]> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let (senders, mut receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let senders: Arc<[mpsc::UnboundedSender<HandOff>]> = senders.into();
        let mut handles = shared.workers.lock();
        let mut threads = Vec::with_capacity(n);
        let mut accepting = Vec::with_capacity(n);
        for (i, runtime) in runtimes.into_iter().enumerate() {
            let (done, rx) = oneshot::channel();
            let work = WorkerTask {
                shared: Arc::clone(shared),
                listeners: listeners.to_vec(),
                tracker: tracker.clone(),
                stop_accepting: stop_accepting.clone(),
                end: end.clone(),
                done,
                balance: Balance {
                    me: i,
                    loads: Arc::clone(&loads),
                    workers: Arc::clone(&senders),
                },
                handed: receivers.remove(0),
            };
            let handle = runtime.handle().clone();
            let thread = std::thread::Builder::new()
                .name(format!("imapgw-worker-{i}"))
                .spawn(move || runtime.block_on(work.run()));
            match thread {
                Ok(t) => {
                    handles.push(handle);
                    threads.push(t);
                    accepting.push(rx);
                }
                Err(e) => {
                    // The threads already started end with the guards dropped here.
                    stop_accepting.cancel();
                    end.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Self {
            threads,
            accepting,
            guards: [stop_accepting.drop_guard(), end.drop_guard()],
        })
    }
}

/// What one worker thread runs.
struct WorkerTask {
    shared: Arc<Shared>,
    listeners: Vec<Arc<Listener>>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    end: CancellationToken,
    done: oneshot::Sender<()>,
    balance: Balance,
    /// Connections other workers accepted and handed to this one.
    handed: mpsc::UnboundedReceiver<HandOff>,
}

impl WorkerTask {
    async fn run(self) {
        let WorkerTask {
            shared,
            listeners,
            tracker,
            stop_accepting,
            end,
            done,
            balance,
            mut handed,
        } = self;
        let mut loops = JoinSet::new();
        for l in listeners {
            loops.spawn(l.serve(
                Arc::clone(&shared),
                tracker.clone(),
                stop_accepting.clone(),
                Some(balance.clone()),
            ));
        }
        let me = balance.me;
        let take = |h: HandOff| match tokio::net::TcpStream::from_std(h.tcp) {
            Ok(tcp) => {
                let load = LoadGuard {
                    loads: Arc::clone(&balance.loads),
                    worker: me,
                };
                h.listener.admit(tcp, h.peer, &shared, &tracker, Some(load));
            }
            // The connection is closed; its place was counted on this worker.
            Err(_) => {
                balance.loads[me].fetch_sub(1, Ordering::Relaxed);
            }
        };
        loop {
            tokio::select! {
                Some(h) = handed.recv() => take(h),
                next = loops.join_next() => if next.is_none() { break },
            }
        }
        // Handed over just before the accept loops stopped: taken in, so that they hear the
        // shutdown's BYE like every other connection.
        while let Ok(h) = handed.try_recv() {
            take(h);
        }
        let _ = done.send(());
        // A current-thread runtime runs its tasks only while it is driven: the sessions
        // this worker accepted need it until they have ended.
        end.cancelled().await;
    }
}

/// How far above the least loaded worker a worker may be and still keep what it accepts.
/// Above it, the connection is handed over (two `epoll_ctl` calls and one wake-up of the
/// other thread); within it, no connection changes thread. One keeps a handful of long
/// sessions (the latency benchmark's 8) evenly spread without moving every other login.
const BALANCE_SLACK: usize = 1;

/// A worker's view of the others' loads, for handing a connection to the least loaded.
#[derive(Clone)]
pub struct Balance {
    me: usize,
    /// Live connections per worker.
    loads: Arc<[AtomicUsize]>,
    workers: Arc<[mpsc::UnboundedSender<HandOff>]>,
}

/// A connection on its way to another worker: the descriptor, no longer registered with
/// the accepting worker's runtime.
pub struct HandOff {
    listener: Arc<Listener>,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
}

impl Balance {
    /// Keeps `tcp` here (with its place counted) unless another worker has more than
    /// [`BALANCE_SLACK`] fewer connections; then it is handed to the least loaded one.
    pub fn place(
        &self,
        listener: &Arc<Listener>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, LoadGuard)> {
        let mine = self.loads[self.me].load(Ordering::Relaxed);
        let (least, fewest) = self
            .loads
            .iter()
            .enumerate()
            .map(|(i, l)| (i, l.load(Ordering::Relaxed)))
            .min_by_key(|&(_, l)| l)
            .unwrap_or((self.me, mine));
        if least != self.me && mine > fewest + BALANCE_SLACK {
            // Counted there at once, so that the next decisions see it.
            self.loads[least].fetch_add(1, Ordering::Relaxed);
            let handed = tcp.into_std().map(|tcp| HandOff {
                listener: Arc::clone(listener),
                tcp,
                peer,
            });
            match handed {
                Ok(h) => {
                    if self.workers[least].send(h).is_err() {
                        // That worker has ended (shutting down): the connection closes.
                        self.loads[least].fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    self.loads[least].fetch_sub(1, Ordering::Relaxed);
                }
            }
            return None;
        }
        self.loads[self.me].fetch_add(1, Ordering::Relaxed);
        Some((
            tcp,
            LoadGuard {
                loads: Arc::clone(&self.loads),
                worker: self.me,
            },
        ))
    }
}

/// A connection's place in its worker's count, given back when its task ends.
pub struct LoadGuard {
    loads: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.loads[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}
