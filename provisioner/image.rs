//! Base images: recipes in `images/`, built with mmdebstrap into a cached
//! qcow2 + kernel + initrd keyed by the hash of the recipe.

use std::path::{Path, PathBuf};

use crate::library::{self, Folder, Origin, Shelf};
use crate::settings::Search;

/// Folders searched for `<name>.toml` recipes, in order (see [`library`]).
pub fn recipe_dirs(start: &Path, search: &Search) -> Vec<Folder> {
    library::search(Shelf::Images, start, search)
}

/// The names of every recipe visible from `start`, sorted.
pub fn recipe_names(start: &Path, search: &Search) -> Vec<String> {
    let mut names: Vec<String> = recipe_dirs(start, search)
        .iter()
        .flat_map(Folder::entries)
        .filter_map(|entry| entry.strip_suffix(".toml").map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bump when the way images are built changes, so old caches are not reused.
const BUILDER_VERSION: &str = "testbed-image-1";
const MMDEBSTRAP_HINT: &str =
    "apt-get install --no-install-recommends mmdebstrap e2fsprogs qemu-utils genext2fs uidmap";
pub const BOOT_DISK_HINT: &str =
    "apt-get install --no-install-recommends syslinux syslinux-common mtools dosfstools fdisk";

/// The Debian package hint for a tool an image build runs.
fn install_hint(program: &str) -> &'static str {
    match program {
        "syslinux" | "mcopy" | "mkfs.fat" | "sfdisk" => BOOT_DISK_HINT,
        _ => MMDEBSTRAP_HINT,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no image recipe `{name}` (looked for {name}.toml in: {searched}); known: {known}")]
    UnknownRecipe {
        name: String,
        searched: String,
        known: String,
    },
    #[error("{path}: {message}")]
    BadRecipe { path: PathBuf, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot run {program}: {source} (install it: {hint})")]
    Missing {
        program: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("building image {name} failed: {program} exited with {status}; last lines:\n{tail}\n(full log: {log})")]
    BuildFailed {
        name: String,
        program: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error(
        "image {name}: another build of it has held {lock} for {waited} s\n  help: if no \
         testbed is building it, the holder hangs: stop it (`fuser {lock}` names it)"
    )]
    LockTimeout {
        name: String,
        lock: PathBuf,
        waited: u64,
    },
    #[error(
        "image {name} needs at least {needed} free in {dir} to build, which has {free}\n  \
         help: free some space there, or point TESTBED_CACHE at a bigger disk"
    )]
    LowDisk {
        name: String,
        dir: PathBuf,
        needed: String,
        free: String,
    },
    #[error(
        "building image {name}: {program} ran for {} and was stopped as hung; last \
         lines:\n{tail}\n(full log: {})",
        humantime::format_duration(*after),
        log.display()
    )]
    TimedOut {
        name: String,
        program: &'static str,
        after: Duration,
        tail: String,
        log: PathBuf,
    },
    #[error("interrupted while waiting for another build of image {0}")]
    Interrupted(String),
    #[error("no image named {0} in the cache")]
    NotCached(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// A file copied into the image.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Relative to the recipe's directory.
    pub source: PathBuf,
    pub dest: String,
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

fn default_variant() -> String {
    "minbase".into()
}

fn default_disk() -> String {
    "4GiB".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeSpec {
    pub suite: String,
    #[serde(default = "default_variant")]
    pub variant: String,
    #[serde(default)]
    pub mirror: Option<String>,
    pub packages: Vec<String>,
    #[serde(default)]
    pub scripts: Vec<PathBuf>,
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// Size of the root filesystem (the disk is sparse).
    #[serde(default = "default_disk")]
    pub disk: String,
}

/// A recipe found on disk or built in, with the hash that keys its cached
/// build (of its contents only: a built-in and an identical local copy
/// share one image).
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    /// The recipe file, as messages show it.
    pub path: PathBuf,
    /// The folder holding the recipe; its `files` and `scripts` are relative to it.
    folder: Folder,
    pub spec: RecipeSpec,
    pub hash: String,
}

impl Recipe {
    /// Finds `name` in the recipe folders visible from `start`.
    pub fn find(name: &str, start: &Path, search: &Search) -> Result<Recipe, ImageError> {
        let folders = recipe_dirs(start, search);
        let file = format!("{name}.toml");
        let folder = folders
            .iter()
            .find(|folder| folder.is_file(&file))
            .ok_or_else(|| ImageError::UnknownRecipe {
                name: name.into(),
                searched: library::searched_in_words(&folders),
                known: recipe_names(start, search).join(", "),
            })?;
        Recipe::load(name, folder.clone())
    }

    /// Loads the recipe `<name>.toml` in `folder`.
    pub fn load(name: &str, folder: Folder) -> Result<Recipe, ImageError> {
        let file = format!("{name}.toml");
        let path = folder.shown(&file);
        let text = folder
            .read_to_string(&file)
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        let spec: RecipeSpec = toml::from_str(&text).map_err(|e| ImageError::BadRecipe {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut recipe = Recipe {
            name: name.into(),
            path,
            folder,
            spec,
            hash: String::new(),
        };
        recipe.hash = recipe.compute_hash(&text)?;
        Ok(recipe)
    }

    /// Where the recipe was found: its folder, or built in.
    pub fn origin(&self) -> Origin {
        self.folder.origin()
    }

    /// Where the recipe was found in words: its file, or `built-in`.
    pub fn found_at(&self) -> String {
        match self.origin() {
            Origin::BuiltIn => library::BUILTIN.to_owned(),
            Origin::Local(_) => self.path.display().to_string(),
        }
    }

    /// The bytes of a file the recipe names, relative to its folder.
    fn source(&self, relative: &Path) -> Result<Vec<u8>, ImageError> {
        self.folder
            .read(relative)
            .map_err(|source| ImageError::BadRecipe {
                path: self.path.clone(),
                message: format!(
                    "cannot read {}: {source}",
                    self.folder.shown(relative).display()
                ),
            })
    }

    /// The hash of everything that goes into the image: the recipe text and
    /// the contents of every file and script it names.
    fn compute_hash(&self, text: &str) -> Result<String, ImageError> {
        let mut hasher = Sha256::new();
        hasher.update(BUILDER_VERSION);
        hasher.update(text);
        let sources = self
            .spec
            .files
            .iter()
            .map(|f| &f.source)
            .chain(&self.spec.scripts);
        for source in sources {
            let bytes = self.source(source)?;
            hasher.update(source.to_string_lossy().as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
        Ok(hex::encode(hasher.finalize())[..16].to_string())
    }

    /// This recipe with `extra` packages added (the packages a machine's
    /// kits need): one cached image per distinct package set, keyed by a
    /// hash that covers the set. Unchanged when `extra` adds nothing.
    pub fn with_packages(&self, extra: &[String]) -> Recipe {
        let mut added: Vec<String> = extra
            .iter()
            .filter(|p| !self.spec.packages.contains(p))
            .cloned()
            .collect();
        added.sort();
        added.dedup();
        if added.is_empty() {
            return self.clone();
        }
        let mut recipe = self.clone();
        let mut hasher = Sha256::new();
        hasher.update(&self.hash);
        for package in &added {
            hasher.update(package.as_bytes());
            hasher.update([0]);
        }
        recipe.hash = hex::encode(hasher.finalize())[..16].to_string();
        recipe.spec.packages.extend(added);
        recipe
    }

    /// The cache folder name of this recipe's build.
    pub fn key(&self) -> String {
        format!("{}-{}", self.name, self.hash)
    }
}

/// A built image in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    pub name: String,
    pub hash: String,
    /// The root filesystem (a whole-disk ext4 in a qcow2), booted with
    /// `kernel` and `initrd` directly.
    pub root: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl BuiltImage {
    /// `NAME-HASH`, the image's folder in the cache.
    pub fn key(&self) -> String {
        format!("{}-{}", self.name, self.hash)
    }

    /// Where the image's bootable disk is in `format`, once built
    /// ([`Cache::ensure_boot_disk`]).
    pub fn boot_disk_as(&self, format: DiskFormat) -> PathBuf {
        self.root
            .with_file_name(format!("{BOOT_DISK}.{}", format.extension()))
    }

    /// Its bootable disk (qcow2), when it has been built.
    pub fn built_boot_disk(&self) -> Option<PathBuf> {
        Some(self.boot_disk_as(DiskFormat::Qcow2)).filter(|path| path.is_file())
    }
}

/// The formats a bootable disk is kept in: qcow2 (qemu's, what it is
/// built as), VDI (VirtualBox's, converted from it once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Vdi,
}

impl DiskFormat {
    /// The file's extension, which is also qemu-img's name for the format.
    fn extension(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vdi => "vdi",
        }
    }
}

/// The bootable disk's file in an image's folder: an MBR disk whose first
/// partition (FAT) holds syslinux, the kernel and the initrd, and whose
/// second is the image's root filesystem. Bump [`BUILDER_VERSION`] when its
/// layout changes.
const BOOT_DISK: &str = "boot-disk";

/// syslinux's MBR boot code (Debian's syslinux-common): it boots the
/// partition marked active.
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";

/// How the bootable disk boots: the root by its label (IDE under
/// VirtualBox, virtio elsewhere), and identity applied before systemd
/// starts (`testbed-init`), since no command line of testbed's gives
/// systemd the machine-id.
const SYSLINUX_CFG: &str = "SERIAL 0 115200
DEFAULT testbed
PROMPT 0
TIMEOUT 0
LABEL testbed
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=root rw console=ttyS0 quiet init=/usr/local/sbin/testbed-init
";

/// The image cache: `<root>/images/<name>-<hash>/`.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn at(root: PathBuf) -> Cache {
        Cache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    fn built_at(&self, key: &str) -> BuiltImageDir {
        BuiltImageDir(self.images_dir().join(key))
    }

    /// The cached build of `recipe`, if there is one.
    pub fn lookup(&self, recipe: &Recipe) -> Option<BuiltImage> {
        self.lookup_key(&recipe.key())
    }

    /// Where the build of `recipe` is, or would be once built.
    pub fn planned(&self, recipe: &Recipe) -> BuiltImage {
        self.built_at(&recipe.key())
            .image(&recipe.name, &recipe.hash)
    }

    /// The cached image `NAME-HASH`, if it is still there.
    pub fn lookup_key(&self, key: &str) -> Option<BuiltImage> {
        self.built_at(key).load()
    }

    /// The cached build of `recipe`, building it first when missing.
    /// Concurrent builds of one recipe are serialised by a lock; each builds
    /// into a temp folder renamed into place, so the cache is never half-made.
    pub fn ensure(
        &self,
        recipe: &Recipe,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<BuiltImage, ImageError> {
        if let Some(image) = self.lookup(recipe) {
            return Ok(image);
        }
        let images = self.images_dir();
        fs::create_dir_all(&images)
            .map_err(io_err(format!("cannot create {}", images.display())))?;
        let _lock = self.lock(&recipe.key(), &recipe.name, on_line)?;
        match self.lookup(recipe) {
            Some(image) => Ok(image),
            None => {
                self.remove_stale_builds(&recipe.key());
                self.build(recipe, on_line)
            }
        }
    }

    /// Takes the build lock of the image `key`, waiting while another
    /// build holds it. The lock file stays: unlinking it would let a later
    /// builder lock a new file while an earlier one still holds the old.
    fn lock(
        &self,
        key: &str,
        name: &str,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<fs::File, ImageError> {
        let lock_path = self.images_dir().join(format!("{key}.lock"));
        let lock = fs::File::create(&lock_path)
            .map_err(io_err(format!("cannot create {}", lock_path.display())))?;
        wait_for_lock(&lock, name, &lock_path, on_line)?;
        Ok(lock)
    }

    /// The bootable disk of `image` (see [`BOOT_DISK`]) in `format`, made
    /// first when missing: for hypervisors that cannot boot a kernel
    /// directly.
    pub fn ensure_boot_disk(
        &self,
        image: &BuiltImage,
        format: DiskFormat,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let disk = image.boot_disk_as(format);
        if disk.is_file() {
            return Ok(disk);
        }
        let _lock = self.lock(&image.key(), &image.name, on_line)?;
        if disk.is_file() {
            return Ok(disk);
        }
        self.remove_stale_builds(&image.key());
        check_free_space(&image.name, &self.images_dir())?;
        let work = tempfile::Builder::new()
            .prefix(&format!(".build-{}-disk-", image.key()))
            .tempdir_in(self.images_dir())
            .map_err(io_err("cannot create a build folder"))?;
        let log = self.images_dir().join(format!("{}.log", image.key()));
        let step = BootDiskStep {
            image,
            log: BuildLog {
                image: &image.name,
                path: &log,
            },
            work: work.path(),
        };
        let qcow2 = image.boot_disk_as(DiskFormat::Qcow2);
        let move_to = |made: PathBuf, to: &Path| {
            fs::rename(&made, to)
                .map_err(io_err(format!("cannot move the disk to {}", to.display())))
        };
        if !qcow2.is_file() {
            move_to(step.build(on_line)?, &qcow2)?;
        }
        if format != DiskFormat::Qcow2 {
            move_to(step.convert(&qcow2, format, on_line)?, &disk)?;
        }
        Ok(disk)
    }

    /// The `.build-KEY-*` folders a killed build of the image `key` (or of
    /// its bootable disk) left behind: with its lock held, no build of it
    /// can be using them.
    fn remove_stale_builds(&self, key: &str) {
        let prefix = format!(".build-{key}-");
        let Ok(entries) = fs::read_dir(self.images_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    fn build(
        &self,
        recipe: &Recipe,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<BuiltImage, ImageError> {
        let images = self.images_dir();
        check_free_space(&recipe.name, &images)?;
        let work = tempfile::Builder::new()
            .prefix(&format!(".build-{}-", recipe.key()))
            .tempdir_in(&images)
            .map_err(io_err("cannot create a build folder"))?;
        let log = images.join(format!("{}.log", recipe.key()));
        let out = BuiltImageDir(work.path().join("image"));
        fs::create_dir_all(&out.0).map_err(io_err("cannot create the image folder"))?;
        let stage = work.path().join("stage");
        stage_files(recipe, &stage)?;
        let raw = work.path().join("root.raw");
        let step = Step {
            recipe,
            log: BuildLog {
                image: &recipe.name,
                path: &log,
            },
            work: work.path(),
        };
        if nix::unistd::geteuid().is_root() {
            step.root_filesystem_as_root(&stage, &raw, &out, on_line)?;
        } else {
            step.root_filesystem_unprivileged(&stage, &raw, &out, on_line)?;
        }
        on_line("converting to qcow2");
        run_logged(
            "qemu-img",
            &recipe.name,
            Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&raw)
                .arg(out.disk()),
            &log,
            on_line,
        )?;
        let meta =
            serde_json::json!({ "name": recipe.name, "hash": recipe.hash, "recipe": recipe.path });
        fs::write(out.0.join("image.json"), meta.to_string())
            .map_err(io_err("cannot write image.json"))?;
        let final_dir = self.built_at(&recipe.key());
        if let Err(e) = fs::rename(&out.0, &final_dir.0) {
            // Built meanwhile by a builder that did not share our lock: keep theirs.
            if final_dir.load().is_none() {
                let what = format!("cannot move the image to {}", final_dir.0.display());
                return Err(io_err(what)(e));
            }
        }
        final_dir
            .load()
            .ok_or_else(|| ImageError::NotCached(recipe.key()))
    }

    /// Every cached image: (folder name, size in bytes).
    pub fn list(&self) -> Vec<CachedImage> {
        let Ok(entries) = fs::read_dir(self.images_dir()) else {
            return Vec::new();
        };
        let mut images: Vec<CachedImage> = entries
            .flatten()
            .filter_map(|entry| {
                let dir = BuiltImageDir(entry.path());
                let image = dir.load()?;
                Some(CachedImage {
                    key: entry.file_name().to_string_lossy().into_owned(),
                    bytes: dir.bytes(),
                    disk: image.built_boot_disk(),
                    image,
                })
            })
            .collect();
        images.sort_by(|a, b| a.key.cmp(&b.key));
        images
    }

    /// Removes cached builds whose folder name is `name` or starts with `name-`.
    pub fn remove(&self, name: &str) -> Result<Vec<String>, ImageError> {
        let doomed: Vec<CachedImage> = self
            .list()
            .into_iter()
            .filter(|c| c.key == name || c.image.name == name)
            .collect();
        if doomed.is_empty() {
            return Err(ImageError::NotCached(name.into()));
        }
        for image in &doomed {
            let dir = self.images_dir().join(&image.key);
            fs::remove_dir_all(&dir).map_err(io_err(format!("cannot remove {}", dir.display())))?;
        }
        Ok(doomed.into_iter().map(|c| c.key).collect())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    pub key: String,
    pub bytes: u64,
    /// Its bootable disk, once built (`image build NAME --disk`).
    pub disk: Option<PathBuf>,
    pub image: BuiltImage,
}

struct BuiltImageDir(PathBuf);

impl BuiltImageDir {
    fn disk(&self) -> PathBuf {
        self.0.join("disk.qcow2")
    }

    /// The image this folder holds (or will).
    fn image(&self, name: &str, hash: &str) -> BuiltImage {
        BuiltImage {
            name: name.into(),
            hash: hash.into(),
            root: self.disk(),
            kernel: self.0.join("vmlinuz"),
            initrd: self.0.join("initrd.img"),
        }
    }

    fn load(&self) -> Option<BuiltImage> {
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(self.0.join("image.json")).ok()?).ok()?;
        let image = self.image(meta.get("name")?.as_str()?, meta.get("hash")?.as_str()?);
        [&image.root, &image.kernel, &image.initrd]
            .iter()
            .all(|p| p.is_file())
            .then_some(image)
    }

    fn bytes(&self) -> u64 {
        fs::read_dir(&self.0)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Lays out the recipe's files (and scripts, under /tmp/testbed-scripts) in a
/// staging tree that mmdebstrap copies into the image.
fn stage_files(recipe: &Recipe, stage: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut copies: BTreeMap<PathBuf, (&Path, u32)> = BTreeMap::new();
    for file in &recipe.spec.files {
        let mode = u32::from_str_radix(file.mode.trim_start_matches("0o"), 8).map_err(|_| {
            ImageError::BadRecipe {
                path: recipe.path.clone(),
                message: format!(
                    "mode {:?} of {} is not octal (e.g. \"0644\")",
                    file.mode, file.dest
                ),
            }
        })?;
        copies.insert(
            stage.join(file.dest.trim_start_matches('/')),
            (&file.source, mode),
        );
    }
    for (index, script) in recipe.spec.scripts.iter().enumerate() {
        copies.insert(
            stage.join(format!("tmp/testbed-scripts/{index:02}.sh")),
            (script, 0o755),
        );
    }
    for (dest, (source, mode)) in copies {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
        }
        fs::write(&dest, recipe.source(source)?)
            .map_err(io_err(format!("cannot write {}", dest.display())))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("cannot set the mode of {}", dest.display())))?;
    }
    Ok(())
}

/// One image build's way from recipe to a raw root filesystem, with the
/// kernel and initrd beside it.
struct Step<'a> {
    recipe: &'a Recipe,
    log: BuildLog<'a>,
    work: &'a Path,
}

/// Which image a build's tools work on, and the log they append to.
struct BuildLog<'a> {
    image: &'a str,
    path: &'a Path,
}

impl BuildLog<'_> {
    fn run(
        &self,
        program: &'static str,
        command: &mut Command,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        run_logged(program, self.image, command, self.path, on_line)
    }
}

impl Step<'_> {
    /// mmdebstrap with the recipe's packages, files and scripts, `mode`'s
    /// arguments, into `target`.
    fn mmdebstrap(
        &self,
        stage: &Path,
        mode: &[String],
        target: &Path,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let mut command = mmdebstrap_command(self.recipe, stage);
        command.args(mode).arg(&self.recipe.spec.suite).arg(target);
        if let Some(mirror) = &self.recipe.spec.mirror {
            command.arg(mirror);
        }
        self.log.run("mmdebstrap", &mut command, on_line)
    }

    /// As root: mmdebstrap writes a directory, `mkfs.ext4 -d` makes the
    /// filesystem from it.
    fn root_filesystem_as_root(
        &self,
        stage: &Path,
        raw: &Path,
        out: &BuiltImageDir,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let rootfs = self.work.join("rootfs");
        on_line("mmdebstrap: installing packages");
        self.mmdebstrap(stage, &["--mode=root".into()], &rootfs, on_line)?;
        on_line("copying kernel and initrd");
        copy_boot_files(&rootfs, out)?;
        on_line("making the ext4 root filesystem");
        self.log.run(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "root", "-d"])
                .arg(&rootfs)
                .arg(raw)
                .arg(disk_size(self.recipe)),
            on_line,
        )
    }

    /// As an ordinary user: mmdebstrap in its unshare mode (a user
    /// namespace over the subordinate ids of /etc/subuid and /etc/subgid)
    /// packs the tree as root would own it straight into an ext2 image
    /// (through genext2fs), so no file ever lands on disk owned by a
    /// subordinate id; the image is then grown to the recipe's size and
    /// given a journal and extents (ext4). Owners, modes and setuid bits
    /// come from the tar stream, as in a root build; extended attributes
    /// (file capabilities) do not survive genext2fs.
    fn root_filesystem_unprivileged(
        &self,
        stage: &Path,
        raw: &Path,
        out: &BuiltImageDir,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let boot = self.work.join("boot-files");
        fs::create_dir_all(&boot).map_err(io_err("cannot create the boot files folder"))?;
        let ext2 = self.work.join("root.ext2");
        on_line("mmdebstrap (unshare mode): installing packages");
        let mode = [
            "--mode=unshare".to_owned(),
            "--format=ext2".to_owned(),
            // Out of the namespace as the user: the kernel and initrd.
            format!(
                "--customize-hook=copy-out /boot {}",
                crate::ssh::shell_quote(&boot.to_string_lossy())
            ),
        ];
        self.mmdebstrap(stage, &mode, &ext2, on_line)?;
        on_line("copying kernel and initrd");
        copy_boot_files(&boot, out)?;
        on_line("growing the root filesystem, ext2 to ext4");
        self.log.run(
            "resize2fs",
            Command::new("resize2fs")
                .arg("-f")
                .arg(&ext2)
                .arg(disk_size(self.recipe)),
            on_line,
        )?;
        self.log.run(
            "tune2fs",
            Command::new("tune2fs")
                .args(["-j", "-O", "extent,dir_index", "-L", "root"])
                .arg(&ext2),
            on_line,
        )?;
        fs::rename(&ext2, raw).map_err(io_err("cannot move the root filesystem"))
    }
}

/// The way from a built image to its bootable disk, all as an ordinary
/// user: the root filesystem made raw, a FAT boot partition made and
/// filled with mtools (syslinux installs itself into it the same way), both
/// laid into one MBR disk after syslinux's boot code, converted to qcow2.
struct BootDiskStep<'a> {
    image: &'a BuiltImage,
    log: BuildLog<'a>,
    work: &'a Path,
}

impl BootDiskStep<'_> {
    /// Builds the disk in the work folder; returns its path.
    fn build(&self, on_line: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
        on_line("bootable disk: the root filesystem");
        let root = self.work.join("root.raw");
        self.qemu_img_convert(&self.image.root, "raw", &root, on_line)?;
        on_line("bootable disk: the boot partition");
        let boot = self.boot_partition(on_line)?;
        on_line("bootable disk: the partition table");
        let layout = DiskLayout::new(file_len(&boot)?, file_len(&root)?);
        let raw = self.work.join("disk.raw");
        self.partitioned_disk(&raw, &layout, on_line)?;
        for (part, offset) in [(&boot, layout.boot_offset), (&root, layout.root_offset)] {
            self.log.run(
                "dd",
                Command::new("dd")
                    .arg(format!("if={}", part.display()))
                    .arg(format!("of={}", raw.display()))
                    .arg("bs=1M")
                    .arg(format!("seek={}", offset >> 20))
                    .args(["conv=notrunc,sparse", "status=none"]),
                on_line,
            )?;
        }
        self.convert(&raw, DiskFormat::Qcow2, on_line)
    }

    /// The disk `from` converted to `format` in the work folder.
    fn convert(
        &self,
        from: &Path,
        format: DiskFormat,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let extension = format.extension();
        on_line(&format!("bootable disk: converting to {extension}"));
        let disk = self.work.join(format!("{BOOT_DISK}.{extension}"));
        self.qemu_img_convert(from, extension, &disk, on_line)?;
        Ok(disk)
    }

    /// `qemu-img convert -O FORMAT FROM TO`.
    fn qemu_img_convert(
        &self,
        from: &Path,
        format: &str,
        to: &Path,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        self.log.run(
            "qemu-img",
            Command::new("qemu-img")
                .args(["convert", "-O", format])
                .arg(from)
                .arg(to),
            on_line,
        )
    }

    /// A FAT filesystem holding the kernel, the initrd, syslinux and its
    /// configuration.
    fn boot_partition(&self, on_line: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
        let boot = self.work.join("boot.fat");
        let payload = file_len(&self.image.kernel)? + file_len(&self.image.initrd)?;
        let kib = boot_partition_bytes(payload) >> 10;
        self.log.run(
            "mkfs.fat",
            Command::new("mkfs.fat")
                .args(["-C", "-n", "TESTBED"])
                .arg(&boot)
                .arg(kib.to_string()),
            on_line,
        )?;
        let config = self.work.join("syslinux.cfg");
        fs::write(&config, SYSLINUX_CFG).map_err(io_err("cannot write syslinux.cfg"))?;
        self.log.run(
            "mcopy",
            Command::new("mcopy")
                .arg("-i")
                .arg(&boot)
                .arg(&self.image.kernel)
                .arg(&self.image.initrd)
                .arg(&config)
                .arg("::/"),
            on_line,
        )?;
        self.log.run(
            "syslinux",
            Command::new("syslinux").arg("--install").arg(&boot),
            on_line,
        )?;
        Ok(boot)
    }

    /// A sparse file of the disk's size with the MBR: syslinux's boot code
    /// and the two partitions, the boot one active.
    fn partitioned_disk(
        &self,
        raw: &Path,
        layout: &DiskLayout,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let file = fs::File::create(raw).map_err(io_err("cannot create the disk"))?;
        file.set_len(layout.total)
            .map_err(io_err("cannot size the disk"))?;
        let script = self.work.join("partitions.sfdisk");
        fs::write(&script, layout.sfdisk_script())
            .map_err(io_err("cannot write the partition table's script"))?;
        let input = fs::File::open(&script).map_err(io_err("cannot read the script"))?;
        run_logged_from(
            "sfdisk",
            self.log.image,
            Command::new("sfdisk").arg("--quiet").arg(raw),
            input.into(),
            self.log.path,
            on_line,
        )?;
        let mbr = fs::read(SYSLINUX_MBR).map_err(|source| ImageError::Missing {
            program: SYSLINUX_MBR.into(),
            hint: BOOT_DISK_HINT,
            source,
        })?;
        // The boot code only: the partition table starts at byte 446.
        let code = &mbr[..mbr.len().min(440)];
        use std::os::unix::fs::FileExt;
        file.write_all_at(code, 0)
            .map_err(io_err("cannot write the boot code"))
    }
}

/// Where the bootable disk's partitions lie, in bytes, MiB-aligned.
#[derive(Debug, PartialEq, Eq)]
struct DiskLayout {
    boot_offset: u64,
    boot_len: u64,
    root_offset: u64,
    root_len: u64,
    total: u64,
}

const MIB: u64 = 1 << 20;

impl DiskLayout {
    fn new(boot_len: u64, root_len: u64) -> DiskLayout {
        let boot_offset = MIB;
        let root_offset = boot_offset + boot_len.div_ceil(MIB) * MIB;
        DiskLayout {
            boot_offset,
            boot_len,
            root_offset,
            root_len,
            total: root_offset + root_len.div_ceil(MIB) * MIB,
        }
    }

    /// The table in sfdisk's script format (sectors of 512 bytes); type
    /// `e` is FAT16 with LBA, what mkfs.fat makes at the boot partition's
    /// size.
    fn sfdisk_script(&self) -> String {
        let sectors = |bytes: u64| bytes / 512;
        format!(
            "label: dos\nstart={}, size={}, type=e, bootable\nstart={}, size={}, type=83\n",
            sectors(self.boot_offset),
            sectors(self.boot_len),
            sectors(self.root_offset),
            sectors(self.root_len.div_ceil(MIB) * MIB),
        )
    }
}

/// The boot partition's size for a kernel and initrd of `payload` bytes:
/// room for syslinux and a larger kernel, in whole MiB, at least 32.
fn boot_partition_bytes(payload: u64) -> u64 {
    (payload + 16 * MIB).div_ceil(MIB).max(32) * MIB
}

fn file_len(path: &Path) -> Result<u64, ImageError> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(io_err(format!("cannot stat {}", path.display())))
}

/// What a build needs free in the cache at its peak: the root tree, the raw
/// filesystem made from it and the qcow2 (about 3 × 600 MiB for a JDK
/// image), with room to spare.
const BUILD_FREE_BYTES: u64 = 2 << 30;

/// Refuses to start a build the cache's disk cannot hold, before anything
/// is written.
fn check_free_space(name: &str, images: &Path) -> Result<(), ImageError> {
    let stat = nix::sys::statvfs::statvfs(images)
        .map_err(|e| io_err(format!("cannot stat {}", images.display()))(e.into()))?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    if free >= BUILD_FREE_BYTES {
        return Ok(());
    }
    Err(ImageError::LowDisk {
        name: name.to_owned(),
        dir: images.to_path_buf(),
        needed: mebibytes(BUILD_FREE_BYTES),
        free: mebibytes(free),
    })
}

fn mebibytes(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// How long a build waits for another build of the same image: a build
/// takes minutes at most, so an hour means the holder hangs.
const IMAGE_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);

/// Takes the image's build lock, waiting (and saying so) while another
/// build holds it, until [`IMAGE_LOCK_TIMEOUT`] or an interrupt.
fn wait_for_lock(
    lock: &fs::File,
    name: &str,
    lock_path: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let started = Instant::now();
    let mut told = false;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_err(format!("cannot lock {}", lock_path.display()))(e))
            }
            Err(fs::TryLockError::WouldBlock) => {}
        }
        if crate::process::interrupted() {
            return Err(ImageError::Interrupted(name.to_owned()));
        }
        if started.elapsed() > IMAGE_LOCK_TIMEOUT {
            return Err(ImageError::LockTimeout {
                name: name.to_owned(),
                lock: lock_path.to_path_buf(),
                waited: started.elapsed().as_secs(),
            });
        }
        if !told {
            on_line("another build of this image is running; waiting for it");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The recipe's disk size as e2fsprogs write it: `4GiB` → `4G`.
fn disk_size(recipe: &Recipe) -> String {
    recipe.spec.disk.replace("iB", "")
}

/// mmdebstrap with the recipe's variant, packages, files and scripts; the
/// mode, suite and target come after ([`Step::mmdebstrap`]).
fn mmdebstrap_command(recipe: &Recipe, stage: &Path) -> Command {
    let spec = &recipe.spec;
    let mut command = Command::new("mmdebstrap");
    command
        .arg(format!("--variant={}", spec.variant))
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        // mmdebstrap splits hooks like a shell: quote the path.
        .arg(format!(
            "--customize-hook=sync-in {} /",
            crate::ssh::shell_quote(&stage.to_string_lossy())
        ));
    for index in 0..spec.scripts.len() {
        command.arg(format!(
            "--customize-hook=chroot \"$1\" /tmp/testbed-scripts/{index:02}.sh"
        ));
    }
    command.arg("--customize-hook=rm -rf \"$1\"/tmp/testbed-scripts");
    command
}

/// The newest kernel and initrd under `/boot` of the built tree.
fn copy_boot_files(rootfs: &Path, out: &BuiltImageDir) -> Result<(), ImageError> {
    let boot = rootfs.join("boot");
    let newest = |prefix: &str| -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(&boot)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        found.sort();
        found.pop()
    };
    for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let source = newest(prefix).ok_or_else(|| ImageError::BadRecipe {
            path: boot.clone(),
            message: format!("the image has no /boot/{prefix}*: does the recipe install a kernel (linux-image-cloud-amd64)?"),
        })?;
        fs::copy(&source, out.0.join(name))
            .map_err(io_err(format!("cannot copy {}", source.display())))?;
    }
    Ok(())
}

/// How long one tool of an image build may run: mmdebstrap downloads and
/// installs everything in minutes, so an hour means it hangs (a stalled
/// mirror, say).
const IMAGE_TOOL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Stops a work child that outlives its time: a thread that waits for the
/// time or for the watchdog's end, whichever comes first.
struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn start(work: crate::process::Work, limit: Duration) -> Watchdog {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let timed_out = matches!(
                finished.recv_timeout(limit),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if timed_out {
                work.stop();
            }
            timed_out
        });
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }

    /// Ends the watch; whether it stopped the child.
    fn fired(mut self) -> bool {
        drop(self.done.take());
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or(false)
    }
}

/// Runs a build tool, appending its output to `log` and passing each line
/// to `on_line`; on failure the error carries the log's tail.
fn run_logged(
    program: &'static str,
    image: &str,
    command: &mut Command,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    run_logged_from(program, image, command, Stdio::null(), log, on_line)
}

/// [`run_logged`] with the tool's standard input from `stdin`.
fn run_logged_from(
    program: &'static str,
    image: &str,
    command: &mut Command,
    stdin: Stdio,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    use std::io::Write;
    let mut log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("cannot open {}", log.display())))?;
    use std::os::unix::process::CommandExt;
    // A group of its own, so an interrupt stops the tool and all it started.
    let mut child = command
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| ImageError::Missing {
            program: program.into(),
            hint: install_hint(program),
            source,
        })?;
    let work = crate::process::work(child.id());
    let watchdog = Watchdog::start(work, IMAGE_TOOL_TIMEOUT);
    let mut tail: Vec<String> = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log_file, "{line}");
            on_line(&line);
            tail.push(line);
            if tail.len() > 15 {
                tail.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(io_err(format!("waiting for {program}")))?;
    if watchdog.fired() {
        return Err(ImageError::TimedOut {
            name: image.into(),
            program,
            after: IMAGE_TOOL_TIMEOUT,
            tail: tail.join("\n"),
            log: log.into(),
        });
    }
    if status.success() {
        return Ok(());
    }
    Err(ImageError::BuildFailed {
        name: image.into(),
        program: program.into(),
        status: status.to_string(),
        tail: tail.join("\n"),
        log: log.into(),
    })
}

/// Whether `name` is a valid Debian package name (policy 5.6.1).
pub fn is_package_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c);
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn sleeper() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep")
    }

    #[test]
    fn the_bootable_disk_lays_its_partitions_on_whole_mib() {
        let layout = DiskLayout::new(40 * MIB, 4096 * MIB + 1);
        assert_eq!(layout.boot_offset, MIB);
        assert_eq!(layout.root_offset, 41 * MIB);
        assert_eq!(layout.total, 41 * MIB + 4097 * MIB);
        assert_eq!(
            layout.sfdisk_script(),
            "label: dos\nstart=2048, size=81920, type=e, bootable\n\
             start=83968, size=8390656, type=83\n"
        );
        assert_eq!(boot_partition_bytes(MIB), 32 * MIB);
        assert_eq!(boot_partition_bytes(30 * MIB + 1), 47 * MIB);
    }

    #[test]
    fn the_watchdog_stops_a_tool_that_outlives_its_time_and_only_that() {
        let mut hung = sleeper();
        let watchdog = Watchdog::start(crate::process::work(hung.id()), Duration::from_millis(100));
        let status = hung.wait().expect("wait");
        assert!(!status.success(), "sleep 30 ended by itself: {status}");
        assert!(watchdog.fired());

        let mut quick = Command::new("true").process_group(0).spawn().expect("true");
        let watchdog = Watchdog::start(crate::process::work(quick.id()), Duration::from_secs(30));
        assert!(quick.wait().expect("wait").success());
        assert!(!watchdog.fired(), "a tool that ends in time is left alone");
    }
}
