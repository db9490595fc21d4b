//! Watches the config file for edits and reports them, coalesced.
//!
//! The watch is on the file's parent directory, not the file: editors and `sed -i` save by
//! writing a new file and renaming it over the old one, and Kubernetes ConfigMaps swap a
//! `..data` symlink, both of which leave a watch on the old inode deaf. Events for other
//! files in the directory are ignored; a burst of events becomes one notification after
//! [`QUIET`] without further events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long the directory must stay quiet before a burst of events counts as one edit.
pub const QUIET: Duration = Duration::from_millis(100);

/// Starts watching `path`; each coalesced edit sends `()` on the returned channel. The
/// watcher lives as long as the returned guard.
pub fn watch(path: &Path) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let f = p.file_name();
            f == name.as_deref() || f.is_some_and(|f| f.to_string_lossy().starts_with(".."))
        });
        if relevant {
            let _ = raw_tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;

    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Coalesce: wait until no event arrived for QUIET.
            while let Ok(Some(())) = tokio::time::timeout(QUIET, raw_rx.recv()).await {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, rx))
}
