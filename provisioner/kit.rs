//! Daemon kits: `daemons/<name>/` holds a manifest (`daemon.toml`: the
//! packages a daemon needs, the files to render with tera, the systemd unit
//! to start, a readiness probe) and its templates.

use std::path::{Path, PathBuf};

/// Directories searched for `daemons/<name>/daemon.toml`: `$TESTBED_DAEMONS`,
/// then `daemons/` in the topology's directory and each of its ancestors.
pub fn kit_dirs(start: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("TESTBED_DAEMONS") {
        dirs.push(PathBuf::from(dir));
    }
    for ancestor in start.ancestors() {
        let candidate = ancestor.join("daemons");
        if candidate.is_dir() {
            dirs.push(candidate);
        }
    }
    dirs
}

/// The names of every kit visible from `start`, sorted.
pub fn kit_names(start: &Path) -> Vec<String> {
    let mut names: Vec<String> = kit_dirs(start)
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("daemon.toml").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}
