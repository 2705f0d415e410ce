//! Live reloads: the routing table on a file change (watching the directory, the way
//! Kubernetes swaps a ConfigMap), on SIGHUP and from the admin endpoint; listener
//! certificates on a file change and on SIGHUP. Every trigger goes through the functions
//! here, so each reload is logged and counted the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::route::{Reloaded, RouteError, Trigger};
use crate::session::Shared;
use crate::tls::{ReloadableCert, TlsError};
use crate::watch::DirWatcher;

/// Reloads the routing table, logs the outcome and counts it. Every trigger goes through
/// here.
pub fn reload_routes(shared: &Shared, trigger: Trigger) -> Result<Reloaded, RouteError> {
    let m = &shared.metrics;
    // Set while reloads are held off: set after, a reload overtaken between its swap and
    // these lines would set the gauge back to its older generation.
    let result = shared.routes.reload(trigger, |generation| {
        m.routing_generation.set(generation as i64);
        m.routing_last_reload.set(crate::unix_now());
    });
    match &result {
        Ok(Reloaded::Swapped(generation)) => {
            m.routing_reloads
                .with_label_values(&[trigger.label(), "ok"])
                .inc();
            tracing::info!(
                trigger = trigger.label(),
                generation,
                "routing table reloaded"
            );
        }
        Ok(Reloaded::Unchanged(_)) => {}
        Err(e) => {
            m.routing_reloads
                .with_label_values(&[trigger.label(), "failed"])
                .inc();
            m.routing_last_failure.set(crate::unix_now());
            tracing::error!(
                trigger = trigger.label(),
                error = %e,
                "routing table reload failed; keeping the table in use"
            );
        }
    }
    result
}

/// What re-reading a listener's certificate did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReloaded {
    /// A different certificate is served to new connections.
    Changed,
    /// The files hold the certificate in use.
    Unchanged,
}

/// Re-reads one listener's certificate and key; logs and counts a change or a failure. On
/// failure the pair in use stays.
pub fn reload_certificate(
    shared: &Shared,
    cert: &ReloadableCert,
) -> Result<CertReloaded, TlsError> {
    let before = cert.leaf();
    let counter = |result| {
        shared
            .metrics
            .certificate_reloads
            .with_label_values(&[cert.listener.as_str(), result])
            .inc()
    };
    match cert.reload() {
        Ok(()) if cert.leaf() == before => Ok(CertReloaded::Unchanged),
        Ok(()) => {
            counter("ok");
            tracing::info!(
                listener = %cert.listener,
                cert = %cert.cert_path.display(),
                "listener certificate reloaded"
            );
            Ok(CertReloaded::Changed)
        }
        Err(e) => {
            counter("failed");
            tracing::error!(
                listener = %cert.listener,
                error = %e,
                "listener certificate reload failed; keeping the certificate in use"
            );
            Err(e)
        }
    }
}

/// Re-reads every listener certificate (SIGHUP); each is logged and counted on its own.
pub fn reload_certificates(shared: &Shared, certs: &[Arc<ReloadableCert>]) {
    for cert in certs {
        // Already logged and counted; one bad pair does not stop the others.
        let _ = reload_certificate(shared, cert);
    }
}

/// The directory holding `file`, as the watcher must see it: the configured path's parent,
/// never a symlink's target (under a ConfigMap that target is a directory about to go).
fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// What to reload when a watched directory changes, by watch key.
struct Watches {
    table_dir: Option<PathBuf>,
    /// Each certificate with the watch keys of its certificate and key directories.
    certs: Vec<(Arc<ReloadableCert>, Vec<PathBuf>)>,
}

/// Watches the routing table's directory and every certificate's and key's directory, and
/// reloads what changed, until `finished`. Does nothing when `reload.watch` is off. A
/// directory that cannot be watched is logged and left out; SIGHUP and `POST /admin/reload`
/// still work.
pub async fn run(
    shared: Arc<Shared>,
    certs: Vec<Arc<ReloadableCert>>,
    finished: CancellationToken,
) {
    if !shared.config.reload.watch {
        return;
    }
    let mut watcher = match DirWatcher::new(shared.config.reload.debounce) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(
                error = %e,
                "not watching the routing table and certificates; reload with SIGHUP or POST /admin/reload"
            );
            return;
        }
    };
    let mut watch = |file: &Path, what: &str| match watcher.watch(&directory_of(file)) {
        Ok(key) => Some(key),
        Err(e) => {
            tracing::error!(error = %e, file = %file.display(), "not watching the {what} for changes");
            None
        }
    };
    let table_dir = watch(shared.routes.path(), "routing table");
    let certs = certs
        .into_iter()
        .map(|c| {
            let dirs = [(&c.cert_path, "certificate"), (&c.key_path, "key")]
                .into_iter()
                .filter_map(|(path, what)| watch(path, what))
                .collect();
            (c, dirs)
        })
        .collect();
    let watches = Arc::new(Watches { table_dir, certs });
    loop {
        let changed = tokio::select! {
            _ = finished.cancelled() => return,
            changed = watcher.changed() => changed,
        };
        let Some(changed) = changed else {
            tracing::error!("file watcher stopped; reload with SIGHUP or POST /admin/reload");
            return;
        };
        let shared = Arc::clone(&shared);
        let watches = Arc::clone(&watches);
        // Reading and parsing files blocks: off the async workers.
        let done = tokio::task::spawn_blocking(move || reload_changed(&shared, &watches, &changed));
        if let Err(e) = done.await {
            tracing::error!(error = %e, "reload after a file change failed");
        }
    }
}

fn reload_changed(shared: &Shared, watches: &Watches, changed: &[PathBuf]) {
    if watches
        .table_dir
        .as_ref()
        .is_some_and(|d| changed.contains(d))
    {
        // Logged and counted there; an unchanged file is skipped there.
        let _ = reload_routes(shared, Trigger::File);
    }
    for (cert, dirs) in &watches.certs {
        if dirs.iter().any(|d| changed.contains(d)) {
            let _ = reload_certificate(shared, cert);
        }
    }
}
