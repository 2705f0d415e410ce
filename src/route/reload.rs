//! The routing table in use and how it is replaced. A new table is read, parsed and
//! validated completely before it is swapped in with one atomic store; a bad file leaves the
//! table in use untouched. Sessions keep the `Route` they looked up at login, so a swap
//! only changes where new logins go.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::{RouteError, RoutingTable};

/// What asked for a reload, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The file (or the Kubernetes `..data` link to it) changed.
    File,
    /// SIGHUP.
    Signal,
    /// `POST /admin/reload`.
    Admin,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new table is in use, with this generation.
    Swapped(u64),
    /// A file-change trigger found the same bytes as the table in use: nothing to do.
    Unchanged(u64),
}

struct Loaded {
    /// xxh3 of the file's bytes, to tell a real change from a touch or a neighbour's change.
    digest: u64,
}

/// The current routing table, its source file and its generation.
pub struct Routes {
    path: PathBuf,
    current: ArcSwap<RoutingTable>,
    generation: AtomicU64,
    /// Serializes reloads, so two triggers at once cannot swap in an older file last.
    loaded: Mutex<Loaded>,
}

impl Routes {
    /// Loads the table at `path` (generation 1).
    pub fn load(path: &Path) -> Result<Self, RouteError> {
        let (table, digest) = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(table),
            generation: AtomicU64::new(1),
            loaded: Mutex::new(Loaded { digest }),
        })
    }

    /// The table in use. Cheap; take it once per login.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file again and swaps it in. On error the table in use stays.
    /// `swapped` is called with the new generation while reloads are still held off, so
    /// what it records (a gauge) follows the generations in order even when two triggers
    /// race; it must be quick.
    pub fn reload(
        &self,
        trigger: Trigger,
        swapped: impl FnOnce(u64),
    ) -> Result<Reloaded, RouteError> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (table, digest) = read(&self.path)?;
        if trigger == Trigger::File && digest == loaded.digest {
            return Ok(Reloaded::Unchanged(self.generation()));
        }
        self.current.store(Arc::new(table));
        loaded.digest = digest;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        swapped(generation);
        Ok(Reloaded::Swapped(generation))
    }
}

fn read(path: &Path) -> Result<(RoutingTable, u64), RouteError> {
    let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let table = RoutingTable::parse(&text, base)?;
    Ok((table, xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    const A: &str = "[[backends]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
                     [[backends]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n\
                     [[routes]]\nuser = \"u\"\nbackend = \"a\"\n";

    #[test]
    fn swaps_good_tables_and_keeps_the_old_one_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.toml");
        std::fs::write(&path, A).unwrap();
        let routes = Routes::load(&path).unwrap();
        assert_eq!(routes.generation(), 1);
        assert_eq!(routes.table().lookup("u").unwrap().home.name, "a");

        // Same bytes: a file trigger does nothing, an explicit one reloads.
        assert_eq!(
            routes.reload(Trigger::File, |_| {}).unwrap(),
            Reloaded::Unchanged(1)
        );
        assert_eq!(
            routes.reload(Trigger::Admin, |_| {}).unwrap(),
            Reloaded::Swapped(2)
        );

        std::fs::write(&path, A.replace("backend = \"a\"", "backend = \"b\"")).unwrap();
        assert_eq!(
            routes.reload(Trigger::File, |_| {}).unwrap(),
            Reloaded::Swapped(3)
        );
        assert_eq!(routes.table().lookup("u").unwrap().home.name, "b");

        std::fs::write(&path, A.replace("backend = \"a\"", "backend = \"nowhere\"")).unwrap();
        assert!(matches!(
            routes.reload(Trigger::Signal, |_| {}),
            Err(RouteError::Invalid(_))
        ));
        assert_eq!(routes.generation(), 3);
        assert_eq!(routes.table().lookup("u").unwrap().home.name, "b");

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            routes.reload(Trigger::File, |_| {}),
            Err(RouteError::Read { .. })
        ));
        assert_eq!(routes.table().lookup("u").unwrap().home.name, "b");
    }

    /// Two reloads at once: what the first records for its generation is recorded before
    /// the second's, however long the first takes to record it. (Recording after the lock
    /// was released let a slower first reload set the gauge back to its older generation.)
    #[test]
    fn what_a_reload_records_follows_the_generations_in_order() {
        /// How long the first reload's recording waits for the second to overtake it; it
        /// cannot while the recording holds reloads off, so this is the test's duration.
        const OVERTAKE: Duration = Duration::from_millis(300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.toml");
        std::fs::write(&path, A).unwrap();
        let routes = Routes::load(&path).unwrap();
        let recorded = Mutex::new(Vec::new());
        let (recording, started) = mpsc::channel();
        let (second_done, overtaken) = mpsc::channel();
        let (routes, recorded) = (&routes, &recorded);
        std::thread::scope(|s| {
            s.spawn(move || {
                routes
                    .reload(Trigger::Admin, |g| {
                        recording.send(()).unwrap();
                        // Stands for a thread descheduled between the swap and the gauge.
                        let _ = overtaken.recv_timeout(OVERTAKE);
                        recorded.lock().unwrap().push(g);
                    })
                    .unwrap();
            });
            started.recv().unwrap();
            routes
                .reload(Trigger::Signal, |g| recorded.lock().unwrap().push(g))
                .unwrap();
            let _ = second_done.send(());
        });
        assert_eq!(*recorded.lock().unwrap(), [2, 3]);
        assert_eq!(routes.generation(), 3);
    }
}
