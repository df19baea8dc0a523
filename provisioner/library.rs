//! Where image recipes, daemon kits and example topologies come from: the
//! folders a user points at or keeps beside a topology, and the set
//! compiled into testbed from this repository's `images/`, `daemons/` and
//! `topologies/`, so an installed binary needs no checkout.
//!
//! Lookup order for recipes (kits alike): `$TESTBED_IMAGES`, then `images/`
//! in the topology's folder and each folder above it, then the built-ins.
//! The first that holds the name wins, so a local copy shadows a built-in.

use std::io;
use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};

use crate::settings::Search;

static BUILTIN_IMAGES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/images");
static BUILTIN_DAEMONS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/daemons");
static BUILTIN_TOPOLOGIES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/topologies");

/// What a built-in's paths start with in messages and in `plan`.
pub const BUILTIN: &str = "built-in";

/// The kind of thing looked up: its folder name and its search variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelf {
    Images,
    Daemons,
}

impl Shelf {
    /// The folder name looked for beside a topology.
    pub fn folder(self) -> &'static str {
        match self {
            Shelf::Images => "images",
            Shelf::Daemons => "daemons",
        }
    }

    fn builtin(self) -> &'static Dir<'static> {
        match self {
            Shelf::Images => &BUILTIN_IMAGES,
            Shelf::Daemons => &BUILTIN_DAEMONS,
        }
    }

    fn variable(self, search: &Search) -> Option<&Path> {
        match self {
            Shelf::Images => search.images.as_deref(),
            Shelf::Daemons => search.daemons.as_deref(),
        }
    }
}

/// A folder of files: on disk, or compiled in (`within` is its path inside
/// the compiled-in tree, empty for the top).
#[derive(Debug, Clone)]
pub enum Folder {
    Disk(PathBuf),
    BuiltIn {
        shelf: &'static Dir<'static>,
        /// `images`, `daemons`, `topologies`: for messages.
        name: &'static str,
        within: PathBuf,
    },
}

/// Where a recipe or kit was found, as `plan` and `kits` say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Local(PathBuf),
    BuiltIn,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Local(path) => write!(f, "{}", path.display()),
            Origin::BuiltIn => f.write_str(BUILTIN),
        }
    }
}

impl Folder {
    fn builtin(shelf: Shelf) -> Folder {
        Folder::BuiltIn {
            shelf: shelf.builtin(),
            name: shelf.folder(),
            within: PathBuf::new(),
        }
    }

    /// The sub-folder `name`.
    pub fn join(&self, name: impl AsRef<Path>) -> Folder {
        match self {
            Folder::Disk(path) => Folder::Disk(path.join(name)),
            Folder::BuiltIn {
                shelf,
                name: shelf_name,
                within,
            } => Folder::BuiltIn {
                shelf,
                name: shelf_name,
                within: within.join(name),
            },
        }
    }

    /// The bytes of the file at `relative`.
    pub fn read(&self, relative: impl AsRef<Path>) -> io::Result<Vec<u8>> {
        let relative = relative.as_ref();
        match self {
            Folder::Disk(path) => std::fs::read(path.join(relative)),
            Folder::BuiltIn { shelf, within, .. } => shelf
                .get_file(within.join(relative))
                .map(|file| file.contents().to_vec())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not built in")),
        }
    }

    /// The text of the file at `relative`.
    pub fn read_to_string(&self, relative: impl AsRef<Path>) -> io::Result<String> {
        String::from_utf8(self.read(relative)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    pub fn is_file(&self, relative: impl AsRef<Path>) -> bool {
        match self {
            Folder::Disk(path) => path.join(relative).is_file(),
            Folder::BuiltIn { shelf, within, .. } => {
                shelf.get_file(within.join(relative)).is_some()
            }
        }
    }

    /// The names of the entries directly in this folder, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Folder::Disk(path) => std::fs::read_dir(path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|entry| entry.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            Folder::BuiltIn { shelf, within, .. } => {
                let dir = if within.as_os_str().is_empty() {
                    Some(*shelf)
                } else {
                    shelf.get_dir(within)
                };
                dir.map(|dir| {
                    dir.entries()
                        .iter()
                        .filter_map(|entry| entry.path().file_name())
                        .map(|name| name.to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
            }
        };
        names.sort();
        names
    }

    /// Every file under this folder, by its path relative to it, sorted.
    pub fn files(&self) -> io::Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        self.collect_files(Path::new(""), &mut found)?;
        found.sort();
        Ok(found)
    }

    fn collect_files(&self, relative: &Path, found: &mut Vec<PathBuf>) -> io::Result<()> {
        for name in self.join(relative).entries() {
            let path = relative.join(&name);
            if self.is_file(&path) {
                found.push(path);
            } else {
                self.collect_files(&path, found)?;
            }
        }
        Ok(())
    }

    /// The path to show for `relative` in messages: the file on disk, or
    /// `built-in/daemons/zookeeper/zoo.cfg.tera`.
    pub fn shown(&self, relative: impl AsRef<Path>) -> PathBuf {
        match self {
            Folder::Disk(path) => path.join(relative),
            Folder::BuiltIn { name, within, .. } => {
                Path::new(BUILTIN).join(name).join(within).join(relative)
            }
        }
    }

    pub fn origin(&self) -> Origin {
        match self {
            Folder::Disk(path) => Origin::Local(path.clone()),
            Folder::BuiltIn { .. } => Origin::BuiltIn,
        }
    }

    /// Writes every file of this folder under `dest` (made if missing),
    /// refusing to replace a file that is already there.
    pub fn copy_to(&self, dest: &Path) -> io::Result<Vec<PathBuf>> {
        let files = self.files()?;
        for relative in &files {
            if dest.join(relative).exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists", dest.join(relative).display()),
                ));
            }
        }
        for relative in &files {
            let target = dest.join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let bytes = self.read(relative)?;
            std::fs::write(&target, &bytes)?;
            // Built-ins keep no modes; scripts must stay runnable.
            if is_script(&bytes) {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(files.into_iter().map(|f| dest.join(f)).collect())
    }
}

fn is_script(bytes: &[u8]) -> bool {
    bytes.starts_with(b"#!")
}

/// The folders searched for `shelf` from a topology in `start`, in order:
/// the variable's folder, `<shelf>/` in `start` and each folder above it,
/// then the built-ins.
pub fn search(shelf: Shelf, start: &Path, search: &Search) -> Vec<Folder> {
    let upwards = start
        .ancestors()
        .map(|ancestor| ancestor.join(shelf.folder()))
        .filter(|candidate| candidate.is_dir());
    shelf
        .variable(search)
        .map(Path::to_path_buf)
        .into_iter()
        .chain(upwards)
        .map(Folder::Disk)
        .chain(std::iter::once(Folder::builtin(shelf)))
        .collect()
}

/// The searched folders in words, for "looked in …" messages.
pub fn searched_in_words(folders: &[Folder]) -> String {
    folders
        .iter()
        .map(|folder| folder.shown("").display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text of the example topology `name`.
pub fn example(name: &str) -> Option<&'static str> {
    BUILTIN_TOPOLOGIES
        .get_file(format!("{name}.toml"))
        .and_then(|file| file.contents_utf8())
}

/// The job the slurm example builds, written beside it by `testbed init`.
pub const HELLO_WORLD_C: &str = include_str!("../examples/jobs/hello_world.c");
