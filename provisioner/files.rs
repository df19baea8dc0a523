//! The files a path beside the topology stands for, and their hash: what
//! decides whether the build or a provisioner runs again.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {error}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    pub error: std::io::Error,
}

/// Files below `relative` (itself when it is a file), sorted, relative to
/// `root`. Symlinks are followed only at the top. The testbed's own state
/// and `dist/` are never inputs: they change with every run (and hold keys).
pub fn below(root: &Path, relative: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let path = root.join(relative);
    let metadata = std::fs::metadata(&path).map_err(read_error(&path))?;
    if !metadata.is_dir() {
        return Ok(vec![relative.to_path_buf()]);
    }
    if is_own_folder(root, &path) {
        return Ok(Vec::new());
    }
    let mut entries: Vec<_> = std::fs::read_dir(&path)
        .map_err(read_error(&path))?
        .collect::<std::io::Result<_>>()
        .map_err(read_error(&path))?;
    entries.sort_by_key(|entry| entry.file_name());
    let mut files = Vec::new();
    for entry in entries {
        let child = relative.join(entry.file_name());
        let kind = entry.file_type().map_err(read_error(&entry.path()))?;
        if kind.is_dir() {
            files.extend(below(root, &child)?);
        } else if kind.is_file() {
            files.push(child);
        }
    }
    Ok(files)
}

/// Whether `dir` is the topology's `.testbed/` or `dist/` (by real path:
/// `../topologies/dist` is `dist` too).
fn is_own_folder(root: &Path, dir: &Path) -> bool {
    let Ok(real) = dir.canonicalize() else {
        return false;
    };
    [crate::state::STATE_DIR, crate::model::DIST]
        .iter()
        .any(|own| root.join(own).canonicalize().is_ok_and(|path| path == real))
}

/// Feeds `relative`'s path, mode and bytes to `hasher`.
pub fn hash(hasher: &mut Sha256, root: &Path, relative: &Path) -> Result<(), ReadError> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(relative);
    let mut file = std::fs::File::open(&path).map_err(read_error(&path))?;
    let mode = file
        .metadata()
        .map_err(read_error(&path))?
        .permissions()
        .mode();
    hasher.update(relative.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(mode.to_le_bytes());
    std::io::copy(&mut file, hasher).map_err(read_error(&path))?;
    Ok(())
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReadError + '_ {
    move |error| ReadError {
        path: path.to_path_buf(),
        error,
    }
}
