//! The green cache: a cluster as it stood the first time `up` had every
//! check green, kept in the user's cache under a hash of everything that
//! made it. `~/.cache/testbed/green/KEY/` holds a snapshot (its manifest and
//! each machine's memory and disk), the testbed files it was made with
//! (user key, host keys, machine ids, seeds, secrets) and the build's
//! outputs. A later `up` of the same key restores it instead of booting and
//! provisioning. Entries are evicted least recently used first.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{self, StateError};

/// The entry layout; another one is a miss, not a misreading.
const LAYOUT: u32 = 1;
const ENTRY: &str = "entry.json";
/// Where an entry's snapshot, carried testbed files and build outputs are.
const SNAPSHOT: &str = "snapshot";
const STATE: &str = "state";
const OUTPUTS: &str = "outputs";

/// The size the cache is pruned to after each save, unless
/// `TESTBED_GREEN_CACHE_MAX` says otherwise (`0` turns saving off).
pub const DEFAULT_MAX_SIZE: u64 = 8 << 30;

#[derive(Debug, thiserror::Error)]
pub enum GreenError {
    #[error("no green cache entry `{0}` (`testbed cache list` shows them)")]
    NotFound(String),
    #[error("green cache entry {path} is unreadable: {detail}\n  help: `testbed cache prune --max-size 0` empties the cache")]
    Corrupt { path: PathBuf, detail: String },
    #[error("green cache entry {key} came back with checks failing: {}", .failed.join(", "))]
    NotGreen { key: String, failed: Vec<String> },
    #[error(transparent)]
    State(#[from] StateError),
}

type Result<T> = std::result::Result<T, GreenError>;

/// Hashes the parts of a key, each labelled, so no two different lists of
/// parts hash alike.
#[derive(Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn part(&mut self, label: &str, bytes: &[u8]) {
        for piece in [label.as_bytes(), bytes] {
            self.0.update((piece.len() as u64).to_le_bytes());
            self.0.update(piece);
        }
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())[..32].to_string()
    }
}

/// What an entry says of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryInfo {
    pub layout: u32,
    pub key: String,
    /// The topology's name.
    pub topology: String,
    /// When it was saved (RFC 3339).
    pub created: String,
    /// The `.testbed/` it was saved from (the VMs' host paths were under it).
    pub saved_root: PathBuf,
}

/// An entry as `cache list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub key: String,
    pub topology: String,
    pub created: String,
    /// Seconds since it was last saved or restored.
    pub idle_seconds: u64,
    /// Bytes on disk.
    pub size: u64,
}

/// The folders of an entry, whole or being written.
pub trait EntryFiles {
    fn dir(&self) -> &Path;

    /// The snapshot folder (a `snapshot::Snapshots` entry's shape).
    fn snapshot(&self) -> PathBuf {
        self.dir().join(SNAPSHOT)
    }

    /// The testbed files, at their paths relative to `.testbed/`.
    fn state(&self) -> PathBuf {
        self.dir().join(STATE)
    }

    /// The build's outputs, at their paths relative to the topology's folder.
    fn outputs(&self) -> PathBuf {
        self.dir().join(OUTPUTS)
    }
}

/// One whole entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub info: EntryInfo,
    dir: PathBuf,
}

impl EntryFiles for Entry {
    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An entry being written: renamed into place by [`GreenCache::commit`].
#[derive(Debug)]
pub struct Partial {
    pub key: String,
    dir: PathBuf,
}

impl EntryFiles for Partial {
    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The `green/` folder of the user's cache.
#[derive(Debug, Clone)]
pub struct GreenCache {
    root: PathBuf,
}

impl GreenCache {
    pub fn in_cache(cache_root: &Path) -> GreenCache {
        GreenCache {
            root: cache_root.join("green"),
        }
    }

    /// The entry of `key` when it is whole and of this layout.
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let dir = self.root.join(key);
        let info = read_info(&dir).ok()?;
        (info.layout == LAYOUT && info.key == key).then_some(Entry { info, dir })
    }

    /// Marks `entry` used now (eviction goes by it).
    pub fn touch(&self, entry: &Entry) {
        let _ = std::fs::File::options()
            .append(true)
            .open(entry.dir.join(ENTRY))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    /// A fresh partial entry for `key`, clearing what a save of this
    /// process cut short left (another `up` may be saving the same key).
    pub fn prepare(&self, key: &str) -> Result<Partial> {
        state::create_private_dir(&self.root)?;
        let dir = self
            .root
            .join(format!(".{key}.{}.partial", std::process::id()));
        state::remove_dir_if_present(&dir)?;
        for sub in ["", SNAPSHOT, STATE, OUTPUTS] {
            state::create_private_dir(&dir.join(sub))?;
        }
        Ok(Partial {
            key: key.to_string(),
            dir,
        })
    }

    /// Writes the entry's description and puts it in place of any older
    /// entry of the key.
    pub fn commit(&self, partial: Partial, topology: &str, saved_root: &Path) -> Result<()> {
        let path = self.root.join(&partial.key);
        self.describe(&partial, topology, saved_root)?;
        state::remove_dir_if_present(&path)?;
        std::fs::rename(&partial.dir, &path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(())
    }

    /// Puts the entry in place unless another process committed one of
    /// the key meanwhile (which may be in use: it is kept, this one
    /// dropped); returns the entry in place.
    pub fn commit_or_keep(&self, partial: Partial, topology: &str) -> Result<Entry> {
        let path = self.root.join(&partial.key);
        self.describe(&partial, topology, &partial.dir)?;
        if std::fs::rename(&partial.dir, &path).is_err() {
            self.abandon_dir(&partial.dir);
        }
        self.lookup(&partial.key)
            .ok_or_else(|| GreenError::Corrupt {
                path,
                detail: "not in place after its save".into(),
            })
    }

    fn describe(&self, partial: &Partial, topology: &str, saved_root: &Path) -> Result<()> {
        let info = EntryInfo {
            layout: LAYOUT,
            key: partial.key.clone(),
            topology: topology.to_string(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            saved_root: saved_root.to_path_buf(),
        };
        let text = serde_json::to_vec_pretty(&info).map_err(|e| GreenError::Corrupt {
            path: partial.dir.clone(),
            detail: e.to_string(),
        })?;
        Ok(state::write_atomic(&partial.dir.join(ENTRY), &text, 0o600)?)
    }

    /// Drops a partial entry (a save that failed).
    pub fn abandon(&self, partial: Partial) {
        self.abandon_dir(&partial.dir);
    }

    fn abandon_dir(&self, dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Every whole entry, most recently used first.
    pub fn list(&self) -> Vec<Listed> {
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let now = SystemTime::now();
        let mut listed: Vec<Listed> = dirs
            .flatten()
            .filter(|d| !d.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|d| {
                let dir = d.path();
                let info = read_info(&dir).ok()?;
                let used = std::fs::metadata(dir.join(ENTRY)).and_then(|m| m.modified());
                let idle = used.ok().and_then(|t| now.duration_since(t).ok());
                Some(Listed {
                    key: info.key,
                    topology: info.topology,
                    created: info.created,
                    idle_seconds: idle.map_or(0, |d| d.as_secs()),
                    size: state::disk_usage(&dir),
                })
            })
            .collect();
        listed.sort_by_key(|l| l.idle_seconds);
        listed
    }

    /// Removes the least recently used entries until the cache takes at
    /// most `max_size` bytes (whatever a save cut short left goes too);
    /// returns those removed.
    pub fn prune(&self, max_size: u64) -> Result<Vec<Listed>> {
        self.remove_partials();
        let mut listed = self.list();
        let mut total: u64 = listed.iter().map(|l| l.size).sum();
        let mut removed = Vec::new();
        while total > max_size {
            let Some(oldest) = listed.pop() else { break };
            state::remove_dir_if_present(&self.root.join(&oldest.key))?;
            total -= oldest.size;
            removed.push(oldest);
        }
        Ok(removed)
    }

    /// Removes one entry.
    pub fn remove(&self, key: &str) -> Result<()> {
        if self.lookup(key).is_none() {
            return Err(GreenError::NotFound(key.to_string()));
        }
        Ok(state::remove_dir_if_present(&self.root.join(key))?)
    }

    fn remove_partials(&self) {
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return;
        };
        for dir in dirs.flatten() {
            if dir.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(dir.path());
            }
        }
    }
}

fn read_info(dir: &Path) -> Result<EntryInfo> {
    let path = dir.join(ENTRY);
    let text = std::fs::read(&path).map_err(|source| StateError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| GreenError::Corrupt {
        path,
        detail: e.to_string(),
    })
}

/// Copies each of `files` (relative paths) that exists from `from` into
/// `to`, making folders private and files owner-only, as testbed's are.
pub fn copy_files(from: &Path, to: &Path, files: &[PathBuf]) -> Result<()> {
    for file in files {
        let source = from.join(file);
        let Ok(bytes) = std::fs::read(&source) else {
            continue;
        };
        let target = to.join(file);
        if let Some(parent) = target.parent() {
            state::create_private_dir(parent)?;
        }
        state::write_atomic(&target, &bytes, mode_of(&source))?;
    }
    Ok(())
}

/// The file's permission bits, at most the owner's (an executable build
/// output stays executable).
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o700)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cache: &GreenCache, key: &str, bytes: usize) {
        let partial = cache.prepare(key).expect("prepare");
        std::fs::write(partial.snapshot().join("memory"), vec![1u8; bytes]).expect("write");
        cache
            .commit(partial, "zk", Path::new("/t/.testbed"))
            .expect("commit");
    }

    #[test]
    fn keys_depend_on_every_part_and_its_label() {
        let key = |parts: &[(&str, &str)]| {
            let mut hasher = KeyHasher::default();
            for (label, bytes) in parts {
                hasher.part(label, bytes.as_bytes());
            }
            hasher.finish()
        };
        let base = key(&[("topology", "a"), ("kit", "b")]);
        assert_eq!(base, key(&[("topology", "a"), ("kit", "b")]));
        assert_ne!(base, key(&[("topology", "a"), ("kit", "c")]));
        assert_ne!(base, key(&[("topology", "ak"), ("it", "b")]));
    }

    #[test]
    fn a_committed_entry_is_found_and_a_partial_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = GreenCache::in_cache(dir.path());
        let partial = cache.prepare("k1").expect("prepare");
        assert!(cache.lookup("k1").is_none(), "a partial entry is no hit");
        cache
            .commit(partial, "zk", Path::new("/t/.testbed"))
            .expect("commit");
        let hit = cache.lookup("k1").expect("hit");
        assert_eq!(hit.info.topology, "zk");
        assert_eq!(hit.info.saved_root, Path::new("/t/.testbed"));
        assert!(cache.lookup("k2").is_none());
    }

    #[test]
    fn prune_evicts_the_least_recently_used_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = GreenCache::in_cache(dir.path());
        for key in ["old", "mid", "new"] {
            entry(&cache, key, 64 * 1024);
        }
        let day_ago = SystemTime::now() - std::time::Duration::from_secs(86_400);
        for (key, age) in [("old", 3), ("mid", 2), ("new", 1)] {
            let file = std::fs::File::options()
                .append(true)
                .open(dir.path().join("green").join(key).join(ENTRY))
                .expect("open");
            file.set_modified(day_ago - std::time::Duration::from_secs(age * 60))
                .expect("set mtime");
        }
        let touched = cache.lookup("old").expect("old");
        cache.touch(&touched);
        let one = cache.list().iter().map(|l| l.size).max().expect("sizes");
        let removed = cache.prune(2 * one).expect("prune");
        let names: Vec<&str> = removed.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(names, ["mid"], "the least recently used goes first");
        assert!(cache.lookup("old").is_some() && cache.lookup("new").is_some());
        assert_eq!(cache.prune(0).expect("prune").len(), 2);
        assert!(cache.list().is_empty());
    }
}
