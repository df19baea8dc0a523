//! Base images: recipes in `images/`, built with mmdebstrap into a cached
//! qcow2 + kernel + initrd keyed by the hash of the recipe.

use std::path::{Path, PathBuf};

/// Directories searched for `images/<name>.toml`: `$TESTBED_IMAGES`, then
/// `images/` in the topology's directory and each of its ancestors.
pub fn recipe_dirs(start: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("TESTBED_IMAGES") {
        dirs.push(PathBuf::from(dir));
    }
    for ancestor in start.ancestors() {
        let candidate = ancestor.join("images");
        if candidate.is_dir() {
            dirs.push(candidate);
        }
    }
    dirs
}

/// The names of every recipe visible from `start`, sorted.
pub fn recipe_names(start: &Path) -> Vec<String> {
    let mut names: Vec<String> = recipe_dirs(start)
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            (path.extension()? == "toml").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
