//! Watches the config file, and the files it names (certificates, keys), for edits and
//! reports them, coalesced.
//!
//! The watch is on each file's parent directory, not the file: editors and `sed -i` save by
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

/// Starts watching `paths`; each coalesced edit of any of them sends `()` on the returned
/// channel. The watcher lives as long as the returned guard.
pub fn watch(
    paths: &[PathBuf],
) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let dir_of = |path: &Path| match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // (folder, file name) pairs: an event counts when it names one of the files in its own
    // folder, or a `..data`-style entry (a Kubernetes volume swap) in one of the folders.
    let wanted: Vec<(PathBuf, Option<std::ffi::OsString>)> = paths
        .iter()
        .map(|p| (dir_of(p), p.file_name().map(|n| n.to_os_string())))
        .collect();
    let matcher = wanted.clone();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let f = p.file_name();
            f.is_some_and(|f| f.to_string_lossy().starts_with(".."))
                || matcher.iter().any(|(dir, name)| {
                    f == name.as_deref() && p.parent().is_none_or(|d| same_dir(d, dir))
                })
        });
        if relevant {
            let _ = raw_tx.send(());
        }
    })?;
    let mut dirs: Vec<&PathBuf> = wanted.iter().map(|(d, _)| d).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        // A folder that does not exist (an ACME storage that could not be made) costs its
        // own files their watch, not every other file's.
        if !dir.is_dir() && dir.as_os_str() != "." {
            tracing::warn!(folder = %dir.display(), "cannot watch a folder that does not exist; its files reload with SIGHUP or the admin API");
            continue;
        }
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }

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

/// Whether two folder paths name the same folder (events carry absolute paths; the config
/// may name relative ones).
fn same_dir(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
}
