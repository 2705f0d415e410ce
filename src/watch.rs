//! Watching directories for changes. The platform watcher (inotify on Linux) runs on its own
//! thread and only marks which watched directory changed and wakes a tokio channel; the async
//! side waits until the changes settle (debounce) and reports every directory that changed,
//! once. Directories, not files: a file replaced by a rename (an editor's save, Kubernetes
//! swapping the `..data` link of a mounted ConfigMap or Secret) is a new inode, which a watch
//! on the old one never sees again.
//!
//! The same holds for the directory: a watch stays on the directory it was made on, not on
//! the path. When the path comes to name another directory (the directory deleted and made
//! again, or a link swapped: a ConfigMap item `gw/routing.toml` is reached through
//! `gw -> ..data/gw`, and every `..data` swap puts a new directory there), the old watch sees
//! nothing more. So each watched directory's parent is watched too, a directory that may
//! have moved is watched again (its path resolved afresh) before the change is reported,
//! and a watch that cannot be made again is logged and tried again at the next change.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A directory that never goes quiet (a log written beside a certificate) is still reported
/// after this many debounce periods, so a change there is not postponed forever.
const MAX_POSTPONE: u32 = 10;

/// Rounds of watching again before one report. A directory that moves again while it is
/// being watched again is caught by the next round; one that keeps moving is left to the
/// next report rather than holding this one up.
const REWATCH_ROUNDS: usize = 3;

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot start the file watcher: {0}")]
    Start(notify::Error),
    #[error("cannot watch {path}: {reason}")]
    Watch { path: String, reason: String },
}

/// Which directory a path resolves to (links followed), to tell when it names another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

/// `None` when the path does not resolve (yet): that too is compared.
fn identity(path: &Path) -> Option<Identity> {
    std::fs::metadata(path).ok().map(|m| Identity {
        dev: m.dev(),
        ino: m.ino(),
    })
}

struct Watched {
    /// Absolute, as the platform watcher reports paths under it; the key it is reported by.
    dir: PathBuf,
    /// `dir`'s parent, watched too: a swap there (a link renamed over, the directory
    /// deleted and made again) happens outside the directory the watch on `dir` is on.
    parent: Option<PathBuf>,
    /// What `dir` resolved to just before it was last watched.
    identity: Option<Identity>,
    changed: bool,
    /// The watch on `dir` may be gone or on a directory `dir` no longer names.
    lost: bool,
    /// The same for the watch on `parent`.
    parent_lost: bool,
}

/// Shared between the platform watcher's thread and the async side.
type Dirs = Arc<Mutex<Vec<Watched>>>;

/// The platform watcher and what it could not watch again. Behind a mutex so that watching
/// again can run on a blocking thread.
struct Platform {
    watcher: RecommendedWatcher,
    /// Paths whose watch could not be made again: warned about once, until it works again.
    failing: HashSet<PathBuf>,
}

/// Watches a set of directories (not their subdirectories).
pub struct DirWatcher {
    platform: Arc<Mutex<Platform>>,
    dirs: Dirs,
    wake: mpsc::Receiver<()>,
    debounce: Duration,
}

impl DirWatcher {
    /// A watcher that reports changes once none followed for `debounce`.
    pub fn new(debounce: Duration) -> Result<Self, WatchError> {
        let dirs: Dirs = Arc::default();
        // One pending wake-up is enough: the flags say what changed, so a full channel loses
        // nothing and the watcher thread never waits.
        let (tx, wake) = mpsc::channel(1);
        let marked = Arc::clone(&dirs);
        let watcher = notify::recommended_watcher(move |event| {
            if mark(&marked, event) {
                let _ = tx.try_send(());
            }
        })
        .map_err(WatchError::Start)?;
        Ok(Self {
            platform: Arc::new(Mutex::new(Platform {
                watcher,
                failing: HashSet::new(),
            })),
            dirs,
            wake,
            debounce,
        })
    }

    /// Starts watching `dir` and its parent; returns the key under which `changed` will
    /// report it (the absolute path). Watching a directory twice is one watch. Only `dir`
    /// must be watchable: a parent that is not is logged and tried again at later changes.
    pub fn watch(&mut self, dir: &Path) -> Result<PathBuf, WatchError> {
        let error = |reason: String| WatchError::Watch {
            path: dir.display().to_string(),
            reason,
        };
        let dir = std::path::absolute(dir).map_err(|e| error(e.to_string()))?;
        let parent = dir.parent().map(Path::to_owned);
        // Before the watch, as when watching again.
        let resolved = identity(&dir);
        {
            let mut dirs = lock(&self.dirs);
            if dirs.iter().any(|w| w.dir == dir) {
                return Ok(dir);
            }
            dirs.push(Watched {
                dir: dir.clone(),
                parent: parent.clone(),
                identity: resolved,
                changed: false,
                lost: false,
                parent_lost: false,
            });
        }
        // Not under the `dirs` lock: the watcher's thread takes it to deliver events, and
        // `watch` waits for that thread.
        let mut platform = lock(&self.platform);
        if let Err(e) = platform.watcher.watch(&dir, RecursiveMode::NonRecursive) {
            lock(&self.dirs).retain(|w| w.dir != dir);
            return Err(error(e.to_string()));
        }
        if let Some(parent) = parent
            && let Err(e) = platform.watcher.watch(&parent, RecursiveMode::NonRecursive)
        {
            tracing::warn!(
                dir = %parent.display(),
                error = %e,
                "cannot watch a watched directory's parent; a swap there is seen only once \
                 the old directory goes; trying again at later changes"
            );
            platform.failing.insert(parent);
            for w in lock(&self.dirs).iter_mut().filter(|w| w.dir == dir) {
                w.parent_lost = true;
            }
        }
        Ok(dir)
    }

    /// Waits for a change, then until nothing changed for the debounce period, and returns
    /// the keys of the directories that changed. `None` if the platform watcher is gone.
    pub async fn changed(&mut self) -> Option<Vec<PathBuf>> {
        loop {
            self.wake.recv().await?;
            let limit = Instant::now() + self.debounce * MAX_POSTPONE;
            loop {
                let quiet = (Instant::now() + self.debounce).min(limit);
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(quiet) => break,
                    woke = self.wake.recv() => woke?,
                }
            }
            // Before the report: a change from now on reaches the new watches, and one
            // made before is read by whoever acts on this report. Stat and watch calls
            // block: off the async workers.
            let (platform, dirs) = (Arc::clone(&self.platform), Arc::clone(&self.dirs));
            let rewatched = tokio::task::spawn_blocking(move || {
                for _ in 0..REWATCH_ROUNDS {
                    if !rewatch(&platform, &dirs) {
                        break;
                    }
                }
            });
            if let Err(e) = rewatched.await {
                tracing::error!(error = %e, "watching directories again failed");
            }
            let changed: Vec<PathBuf> = lock(&self.dirs)
                .iter_mut()
                .filter_map(|w| std::mem::take(&mut w.changed).then(|| w.dir.clone()))
                .collect();
            // Empty when a wake-up raced with the previous report: nothing new.
            if !changed.is_empty() {
                return Some(changed);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The flags stay meaningful even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks the directories `event` concerns; whether any was marked. Runs on the platform
/// watcher's thread.
fn mark(dirs: &Mutex<Vec<Watched>>, event: notify::Result<Event>) -> bool {
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            // Events may have been lost: look at everything again.
            tracing::warn!(error = %e, "file watcher error");
            return mark_all(dirs);
        }
    };
    // Opening or reading a file changes nothing; without this, reading the file after a
    // change would itself look like a change, forever.
    if let EventKind::Access(kind) = event.kind
        && kind != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    // A write into a file that stays open is not a finished change: the file's closing
    // (`Close(Write)`, above) or its replacement by a rename is. Without this, a log written
    // in a watched directory woke the gateway and postponed reloads on every line it wrote
    // (about 0.1 ms of CPU per login at `info`).
    if let EventKind::Modify(ModifyKind::Data(_)) = event.kind {
        return false;
    }
    // The kernel's queue overflowed: which directory changed is unknown.
    if event.need_rescan() || event.paths.is_empty() {
        return mark_all(dirs);
    }
    // The path was created, removed or renamed: a watch made on it, if any, no longer
    // follows it (a removed directory's watch is gone; a renamed one's is elsewhere).
    let moved = matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    );
    let mut marked = false;
    // Directories whose parent saw a change that does not name them: only resolving them
    // tells whether they moved (`..data` swapped under `gw -> ..data/gw`).
    let mut suspects = Vec::new();
    for w in lock(dirs).iter_mut() {
        let parent = w.parent.as_deref();
        for p in &event.paths {
            if p.parent() == Some(w.dir.as_path()) {
                w.changed = true;
                marked = true;
            } else if *p == w.dir {
                w.changed = true;
                w.lost |= moved;
                marked = true;
            } else if parent == Some(p.as_path()) {
                if moved {
                    // The parent went, and with it the path to `dir`.
                    w.changed = true;
                    w.lost = true;
                    w.parent_lost = true;
                    marked = true;
                }
            } else if parent.is_some() && p.parent() == parent && !suspects.contains(&w.dir) {
                suspects.push(w.dir.clone());
            }
        }
    }
    // A stat per suspect, outside the lock so the async side never waits on the disk.
    for dir in suspects {
        let now = identity(&dir);
        for w in lock(dirs).iter_mut() {
            if w.dir == dir && w.identity != now {
                w.changed = true;
                w.lost = true;
                marked = true;
            }
        }
    }
    marked
}

fn mark_all(dirs: &Mutex<Vec<Watched>>) -> bool {
    let mut dirs = lock(dirs);
    for w in dirs.iter_mut() {
        w.changed = true;
        // Whatever was lost may have removed or moved a directory: watch everything again.
        w.lost = true;
        w.parent_lost = true;
    }
    !dirs.is_empty()
}

/// One round of watching again: every path whose watch may be lost is watched afresh
/// (resolving links again), then every directory is checked to still resolve where it did
/// when it was watched. Whether that check found one moved, so another round is due.
/// Blocks (stat, the platform watcher's round trip).
fn rewatch(platform: &Mutex<Platform>, dirs: &Mutex<Vec<Watched>>) -> bool {
    let mut platform = lock(platform);
    let mut again: Vec<PathBuf> = Vec::new();
    for w in lock(dirs).iter_mut() {
        if std::mem::take(&mut w.lost) && !again.contains(&w.dir) {
            again.push(w.dir.clone());
        }
        if std::mem::take(&mut w.parent_lost)
            && let Some(parent) = &w.parent
            && !again.contains(parent)
        {
            again.push(parent.clone());
        }
    }
    for path in again {
        // Resolved before the watch: should the path move in between, the identity
        // recorded is the older one, so the check below or a later event catches it; the
        // other order could record the new directory while watching the old one.
        let resolved = identity(&path);
        for w in lock(dirs).iter_mut().filter(|w| w.dir == path) {
            w.identity = resolved;
            // A change while the path was not watched would go unseen: report it anyway.
            w.changed = true;
        }
        // The old watch, if the platform watcher still holds it, is on a directory the path
        // may no longer name; left in place, its end would later remove the new one.
        let _ = platform.watcher.unwatch(&path);
        match platform.watcher.watch(&path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                if platform.failing.remove(&path) {
                    tracing::info!(dir = %path.display(), "watching the directory again");
                } else {
                    tracing::debug!(dir = %path.display(), "watching the directory again");
                }
            }
            Err(e) => {
                for w in lock(dirs).iter_mut() {
                    w.lost |= w.dir == path;
                    w.parent_lost |= w.parent.as_ref() == Some(&path);
                }
                if platform.failing.insert(path.clone()) {
                    tracing::warn!(
                        dir = %path.display(),
                        error = %e,
                        "lost the watch on a directory and cannot watch it again; changes \
                         there go unseen until it can be (tried again at every change)"
                    );
                } else {
                    tracing::debug!(dir = %path.display(), error = %e, "still cannot watch");
                }
            }
        }
    }
    // Also catches a parent's swap in the moment its watch was being made again.
    let settled: Vec<(PathBuf, Option<Identity>)> = lock(dirs)
        .iter()
        .filter(|w| !w.lost)
        .map(|w| (w.dir.clone(), w.identity))
        .collect();
    let mut moved = false;
    for (dir, recorded) in settled {
        if identity(&dir) != recorded {
            for w in lock(dirs).iter_mut().filter(|w| w.dir == dir) {
                w.lost = true;
                w.changed = true;
                moved = true;
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound on waiting for a report; a missed event fails the test instead of hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    async fn next(w: &mut DirWatcher, what: &str) -> Vec<PathBuf> {
        tokio::time::timeout(WAIT, w.changed())
            .await
            .unwrap_or_else(|_| panic!("no change reported: {what}"))
            .expect("watcher gone")
    }

    #[tokio::test]
    async fn reports_each_changed_directory_once_per_burst_and_ignores_reads() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("f"), "1").unwrap();
        let mut w = DirWatcher::new(Duration::from_millis(300)).unwrap();
        let ka = w.watch(&a).unwrap();
        let kb = w.watch(&b).unwrap();
        assert_eq!(w.watch(&a).unwrap(), ka, "one watch per directory");

        // A read in `a` must not count: the first report is `b` alone.
        assert_eq!(std::fs::read_to_string(a.join("f")).unwrap(), "1");
        std::fs::write(b.join("g"), "x").unwrap();
        assert_eq!(next(&mut w, "write in b").await, vec![kb.clone()]);

        // A burst of writes, a rename over the file and a symlink swap: one report.
        for i in 0..5 {
            std::fs::write(a.join("tmp"), i.to_string()).unwrap();
        }
        std::fs::rename(a.join("tmp"), a.join("f")).unwrap();
        std::os::unix::fs::symlink("f", a.join("link_tmp")).unwrap();
        std::fs::rename(a.join("link_tmp"), a.join("link")).unwrap();
        assert_eq!(next(&mut w, "burst in a").await, vec![ka]);
        // Nothing of the burst is left over: the next report is the next change.
        std::fs::write(b.join("g"), "y").unwrap();
        assert_eq!(next(&mut w, "second write in b").await, vec![kb]);
    }

    #[tokio::test]
    async fn writes_to_a_file_held_open_count_once_it_is_closed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        // A log, opened before the watch: its creation is not what this is about.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("gateway.log"))
            .unwrap();
        let mut w = DirWatcher::new(Duration::from_millis(100)).unwrap();
        let key = w.watch(dir.path()).unwrap();
        for i in 0..50 {
            writeln!(log, "line {i}").unwrap();
        }
        nothing_more(&mut w).await;
        drop(log);
        assert_eq!(next(&mut w, "the log closed").await, vec![key]);
    }

    /// Nothing more is reported within `QUIET`: the report before was the whole change.
    async fn nothing_more(w: &mut DirWatcher) {
        const QUIET: Duration = Duration::from_millis(500);
        if let Ok(more) = tokio::time::timeout(QUIET, w.changed()).await {
            panic!("an unexpected report: {more:?}");
        }
    }

    /// The watched directory deleted and made again (any tool that replaces a directory):
    /// the change is reported, and so is a change in the new directory, every time.
    #[tokio::test]
    async fn a_directory_deleted_and_made_again_is_watched_again() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("conf");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("f"), "0").unwrap();
        let mut w = DirWatcher::new(Duration::from_millis(100)).unwrap();
        let key = w.watch(&dir).unwrap();
        for round in 1..=3 {
            std::fs::remove_dir_all(&dir).unwrap();
            std::fs::create_dir(&dir).unwrap();
            assert_eq!(
                next(&mut w, &format!("round {round}: replaced")).await,
                vec![key.clone()]
            );
            std::fs::write(dir.join("f"), round.to_string()).unwrap();
            assert_eq!(
                next(&mut w, &format!("round {round}: written")).await,
                vec![key.clone()]
            );
        }
        nothing_more(&mut w).await;
    }

    /// The watched directory is a symlink through a link one level up (`sub -> ..data/sub`,
    /// a ConfigMap item under a sub-directory) and `..data` is swapped while the directory it
    /// named stays: nothing happens inside that old directory, yet each swap is reported and
    /// a change in the new directory is seen.
    #[tokio::test]
    async fn a_swap_one_level_up_is_reported_though_the_old_directory_stays() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let version = |n: u32| {
            let sub = r.join(format!("..v{n}")).join("sub");
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("f"), n.to_string()).unwrap();
            sub
        };
        let publish = |n: u32| {
            std::os::unix::fs::symlink(format!("..v{n}"), r.join("..data_tmp")).unwrap();
            std::fs::rename(r.join("..data_tmp"), r.join("..data")).unwrap();
        };
        version(0);
        publish(0);
        std::os::unix::fs::symlink("..data/sub", r.join("sub")).unwrap();
        let mut w = DirWatcher::new(Duration::from_millis(100)).unwrap();
        let key = w.watch(&r.join("sub")).unwrap();
        for n in 1..=3 {
            let sub = version(n);
            publish(n);
            assert_eq!(next(&mut w, &format!("swap {n}")).await, vec![key.clone()]);
            std::fs::write(sub.join("f"), "changed").unwrap();
            assert_eq!(
                next(&mut w, &format!("write after swap {n}")).await,
                vec![key.clone()]
            );
        }
        nothing_more(&mut w).await;
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let mut w = DirWatcher::new(Duration::from_millis(10)).unwrap();
        assert!(matches!(
            w.watch(&root.path().join("absent")),
            Err(WatchError::Watch { .. })
        ));
    }
}
