//! Watching directories for changes. The platform watcher (inotify on Linux) runs on its own
//! thread and only marks which watched directory changed and wakes a tokio channel; the async
//! side waits until the changes settle (debounce) and reports every directory that changed,
//! once. Directories, not files: a file replaced by a rename (an editor's save, Kubernetes
//! swapping the `..data` link of a mounted ConfigMap or Secret) is a new inode, which a watch
//! on the old one never sees again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A directory that never goes quiet (a log written beside a certificate) is still reported
/// after this many debounce periods, so a change there is not postponed forever.
const MAX_POSTPONE: u32 = 10;

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot start the file watcher: {0}")]
    Start(notify::Error),
    #[error("cannot watch {path}: {reason}")]
    Watch { path: String, reason: String },
}

struct Watched {
    /// Absolute, as the platform watcher reports paths under it.
    dir: PathBuf,
    changed: bool,
}

/// Shared between the platform watcher's thread and the async side.
type Dirs = Arc<Mutex<Vec<Watched>>>;

/// Watches a set of directories (not their subdirectories).
pub struct DirWatcher {
    watcher: RecommendedWatcher,
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
            watcher,
            dirs,
            wake,
            debounce,
        })
    }

    /// Starts watching `dir`; returns the key under which `changed` will report it (the
    /// absolute path). Watching a directory twice is one watch.
    pub fn watch(&mut self, dir: &Path) -> Result<PathBuf, WatchError> {
        let error = |reason: String| WatchError::Watch {
            path: dir.display().to_string(),
            reason,
        };
        let dir = std::path::absolute(dir).map_err(|e| error(e.to_string()))?;
        {
            let mut dirs = lock(&self.dirs);
            if dirs.iter().any(|w| w.dir == dir) {
                return Ok(dir);
            }
            dirs.push(Watched {
                dir: dir.clone(),
                changed: false,
            });
        }
        // Not under the lock: the watcher's thread takes it to deliver events, and `watch`
        // waits for that thread.
        if let Err(e) = self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
            lock(&self.dirs).retain(|w| w.dir != dir);
            return Err(error(e.to_string()));
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

fn lock(dirs: &Mutex<Vec<Watched>>) -> MutexGuard<'_, Vec<Watched>> {
    // The flags stay meaningful even if a holder panicked.
    dirs.lock().unwrap_or_else(PoisonError::into_inner)
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
    // The kernel's queue overflowed: which directory changed is unknown.
    if event.need_rescan() || event.paths.is_empty() {
        return mark_all(dirs);
    }
    let mut marked = false;
    for w in lock(dirs).iter_mut() {
        if event
            .paths
            .iter()
            .any(|p| p == &w.dir || p.parent() == Some(w.dir.as_path()))
        {
            w.changed = true;
            marked = true;
        }
    }
    marked
}

fn mark_all(dirs: &Mutex<Vec<Watched>>) -> bool {
    let mut dirs = lock(dirs);
    for w in dirs.iter_mut() {
        w.changed = true;
    }
    !dirs.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound on waiting for a report; a missed event fails the test instead of hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    async fn next(w: &mut DirWatcher) -> Vec<PathBuf> {
        tokio::time::timeout(WAIT, w.changed())
            .await
            .expect("no change reported")
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
        assert_eq!(next(&mut w).await, vec![kb.clone()]);

        // A burst of writes, a rename over the file and a symlink swap: one report.
        for i in 0..5 {
            std::fs::write(a.join("tmp"), i.to_string()).unwrap();
        }
        std::fs::rename(a.join("tmp"), a.join("f")).unwrap();
        std::os::unix::fs::symlink("f", a.join("link_tmp")).unwrap();
        std::fs::rename(a.join("link_tmp"), a.join("link")).unwrap();
        assert_eq!(next(&mut w).await, vec![ka]);
        // Nothing of the burst is left over: the next report is the next change.
        std::fs::write(b.join("g"), "y").unwrap();
        assert_eq!(next(&mut w).await, vec![kb]);
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
