//! `.testbed/` beside the topology (like `.vagrant/`): one folder per machine
//! (disk, seed, QMP socket, console log, pid), the user key, the generated
//! ssh config and `state.json`, the record of how far each machine got.
//! Records are written atomically (temp file, fsync, rename, fsync of the
//! folder) and carry a version: a record from a newer testbed is refused,
//! never rewritten, and fields this version does not know are kept.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::ProviderKind;

pub const STATE_DIR: &str = ".testbed";

/// The version of `state.json` this testbed writes. Records without one
/// (written before versions) are version 1.
pub const STATE_VERSION: u32 = 1;

/// A machine's console log, in its folder: written by its VM, or fetched
/// from where the provider keeps it (its `fetch_console`).
pub const CONSOLE_LOG: &str = "console.log";
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt ({source})\n  help: `testbed destroy -f` still removes every VM, \
         network and process of this testbed; then `testbed up` starts over"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} was written by a newer testbed (state version {found}; this testbed reads up \
         to {STATE_VERSION}) and is left as it is\n  help: use that testbed, or upgrade this one \
         (`cargo install testbed` or `make build`)"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error("no testbed here: {dir} has no {STATE_DIR}/ (run `testbed up FILE`, or `testbed init` to write a topology.toml here, or pass -f FILE)")]
    NotFound { dir: PathBuf },
    #[error(
        "this testbed is locked by {holder}\n  help: wait for it to finish, or pass --wait to \
         wait here ({path})"
    )]
    Locked { path: PathBuf, holder: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the user last asked of a machine: a halted machine whose process is
/// gone is `stopped`; one that should run but has no process has `crashed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub provider: ProviderKind,
    /// The cached image (`NAME-HASH`) the machine's disk is based on.
    pub image: String,
    /// Hash of the VM's hardware (cpus, memory, NICs, forwards) it was booted with.
    #[serde(default)]
    pub spec: String,
    pub ssh_port: u16,
    pub desired: Desired,
    /// Hash of the identity seed last applied over SSH; `None` until then.
    pub identity: Option<String>,
    /// Each daemon's rendered files (hash) last pushed and started.
    #[serde(default)]
    pub daemons: BTreeMap<String, String>,
    /// Hash of the machine's own `artifacts` last pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<String>,
    /// Each provisioner (by its key) → its hash when it last ran through.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provisioned: BTreeMap<String, String>,
    /// Resumed from a warm-boot template and not yet given its identity:
    /// until then it answers with the template's host key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_boot: bool,
    /// Fields of a later testbed of the same version, kept as they are.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// [`STATE_VERSION`] when saved; 0 (none) in records from before versions.
    #[serde(default)]
    pub version: u32,
    /// The topology file this testbed was brought up from.
    pub topology: PathBuf,
    pub machines: BTreeMap<String, MachineRecord>,
    /// The networks that are up, and which provider serves each.
    #[serde(default)]
    pub networks: BTreeMap<String, ProviderKind>,
    /// The inputs hash of the last build that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The faults in force (`partition zk-1 / zk-2 zk-3`), until `heal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
    /// Fields of a later testbed of the same version, kept as they are.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// The one field read before the rest, so a newer layout is named as newer,
/// not as corrupt.
#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default)]
    version: u32,
}

/// The `.testbed/` directory of one testbed.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory beside a topology file (not created yet).
    pub fn beside(topology_dir: &Path) -> StateDir {
        StateDir {
            root: topology_dir.join(STATE_DIR),
        }
    }

    /// The existing `.testbed/` of the current directory.
    pub fn find(cwd: &Path) -> Result<StateDir, StateError> {
        let state = StateDir::beside(cwd);
        if state.exists() {
            Ok(state)
        } else {
            Err(StateError::NotFound {
                dir: cwd.to_path_buf(),
            })
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    pub fn create(&self) -> Result<(), StateError> {
        create_private_dir(&self.root)
    }

    pub fn record_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.root.join("machines").join(name)
    }

    /// The folder of machine `name`, with the names of what testbed keeps there.
    pub fn machine(&self, name: &str) -> MachineDir {
        MachineDir {
            path: self.machine_dir(name),
        }
    }

    pub fn network_dir(&self, name: &str) -> PathBuf {
        self.root.join("networks").join(name)
    }

    pub fn user_key(&self) -> PathBuf {
        self.root.join("id_ed25519")
    }

    pub fn ssh_config(&self) -> PathBuf {
        self.root.join("ssh_config")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.root.join("known_hosts")
    }

    /// The Ansible inventory provisioners' playbooks run against.
    pub fn ansible_inventory(&self) -> PathBuf {
        self.root.join("inventory.yml")
    }

    /// The whole output of the last build.
    pub fn build_log(&self) -> PathBuf {
        self.root.join("build.log")
    }

    fn secrets_path(&self) -> PathBuf {
        self.root.join("secrets.json")
    }

    /// What a cluster was made with, relative to `.testbed/`: the user key,
    /// the secrets, and each machine's host key, machine id and seed. A VM
    /// restored elsewhere needs them all to be the same machine.
    pub fn identity_files(&self, machines: &[String]) -> Vec<PathBuf> {
        let mut files = vec![
            self.user_key(),
            self.root.join("id_ed25519.pub"),
            self.secrets_path(),
        ];
        for name in machines {
            let machine = self.machine(name);
            files.extend([
                machine.host_key(),
                machine.host_public_key(),
                machine.machine_id(),
                machine.seed(),
            ]);
        }
        files
            .into_iter()
            .filter_map(|path| path.strip_prefix(&self.root).ok().map(Path::to_path_buf))
            .collect()
    }

    /// The testbed's secrets named in `names` that exist already (nothing
    /// is generated).
    pub fn existing_secrets(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, String>, StateError> {
        let mut secrets = self.read_secrets()?;
        secrets.retain(|name, _| names.contains(name));
        Ok(secrets)
    }

    /// Every secret in `secrets.json`.
    fn read_secrets(&self) -> Result<BTreeMap<String, String>, StateError> {
        let path = self.secrets_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The testbed's secrets named in `names`, generating (and keeping, in
    /// a file only the owner can read) those it does not have yet.
    pub fn secrets(&self, names: &[String]) -> Result<BTreeMap<String, String>, StateError> {
        let path = self.secrets_path();
        let mut secrets = self.read_secrets()?;
        let missing: Vec<&String> = names.iter().filter(|n| !secrets.contains_key(*n)).collect();
        if !missing.is_empty() {
            for name in missing {
                secrets.insert(name.clone(), random_hex(&path)?);
            }
            let json =
                serde_json::to_vec_pretty(&secrets).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
            self.create()?;
            write_atomic(&path, &json, 0o600)?;
        }
        secrets.retain(|name, _| names.contains(name));
        Ok(secrets)
    }

    /// The record; empty when there is none yet.
    pub fn load(&self) -> Result<Record, StateError> {
        let path = self.record_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |source| StateError::Corrupt {
            path: path.clone(),
            source,
        };
        let VersionOnly { version } = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if version > STATE_VERSION {
            return Err(StateError::Newer {
                path,
                found: version,
            });
        }
        serde_json::from_slice(&bytes).map_err(corrupt)
    }

    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let record = Record {
            version: STATE_VERSION,
            ..record.clone()
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|source| StateError::Corrupt {
            path: self.record_path(),
            source,
        })?;
        write_atomic(&self.record_path(), &json, 0o644)
    }

    /// Takes the testbed's lock for the life of the returned guard, so that
    /// no two commands change the same testbed at once. When another
    /// command holds it: an error naming that command, or, with `on_wait`,
    /// `on_wait(holder)` and a wait until it is free.
    pub fn lock(
        &self,
        access: Access,
        on_wait: Option<&dyn Fn(&str)>,
    ) -> Result<LockGuard, StateError> {
        self.create()?;
        let path = self.root.join("lock");
        // Not truncated on open: the file names who holds the lock.
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let attempt = match access {
            Access::Exclusive => file.try_lock(),
            Access::Shared => file.try_lock_shared(),
        };
        match attempt {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = lock_holder(&path);
                let Some(on_wait) = on_wait else {
                    return Err(StateError::Locked { path, holder });
                };
                on_wait(&holder);
                match access {
                    Access::Exclusive => file.lock(),
                    Access::Shared => file.lock_shared(),
                }
                .map_err(io_err(&path))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        write_holder(&mut file).map_err(io_err(&path))?;
        Ok(LockGuard { _file: file })
    }

    /// Removes the whole directory.
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&self.root)(e)),
            _ => Ok(()),
        }
    }
}

/// `.testbed/machines/NAME/`: one machine's files. Providers keep their own
/// files here too (disk, sockets, pid), under names of their choosing.
#[derive(Debug, Clone)]
pub struct MachineDir {
    path: PathBuf,
}

impl MachineDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The serial console, as the provider writes it.
    pub fn console_log(&self) -> PathBuf {
        self.path.join(CONSOLE_LOG)
    }

    /// The identity seed the guest reads at boot (see `identity`).
    pub fn seed(&self) -> PathBuf {
        self.path.join("seed.tar")
    }

    /// The machine's SSH host key (private); `.pub` beside it.
    pub fn host_key(&self) -> PathBuf {
        self.path.join("ssh_host_ed25519_key")
    }

    pub fn host_public_key(&self) -> PathBuf {
        self.path.join("ssh_host_ed25519_key.pub")
    }

    pub fn machine_id(&self) -> PathBuf {
        self.path.join("machine-id")
    }

    /// The socket of the OpenSSH ControlMaster `testbed ssh` shares.
    pub fn control_socket(&self) -> PathBuf {
        self.path.join("ssh.ctl")
    }

    /// The pid of the ControlMaster `up` starts.
    pub fn control_master_pid(&self) -> PathBuf {
        self.path.join("ssh-master.pid")
    }

    /// The last `lines` lines of the console log, or a note that there is none.
    pub fn console_tail(&self, lines: usize) -> String {
        let path = self.console_log();
        match fs::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no console log: {e})"),
        }
    }
}

/// 32 random bytes from the OS, as 64 hex characters.
fn random_hex(path: &Path) -> Result<String, StateError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io_err(path)(std::io::Error::other(e.to_string())))?;
    Ok(hex::encode(bytes))
}

/// How a command holds the testbed's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Alone: `up`, `provision`, `build`, `halt`, `destroy` change the testbed.
    Exclusive,
    /// Beside other shared holders, never beside an exclusive one: `verify`
    /// and `run` use the machines without changing what exists.
    Shared,
}

/// Held while a command uses the testbed; released on drop (and by the
/// kernel when the process dies, however it dies).
pub struct LockGuard {
    _file: fs::File,
}

/// Writes this process into the lock file: `pid`, the time it took the
/// lock and its command line, one per line.
fn write_holder(file: &mut fs::File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let command: Vec<String> = std::env::args()
        .enumerate()
        .map(|(i, arg)| match i {
            0 => Path::new(&arg)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or(arg),
            _ => arg,
        })
        .collect();
    let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    let line = command.join(" ").replace('\n', " ");
    write!(file, "{}\n{since}\n{line}\n", std::process::id())
}

/// Who holds the lock at `path`, as its holder wrote it:
/// `pid 1234 (testbed up, since 2026-12-02T05:01:02Z)`.
fn lock_holder(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    match (lines.next(), lines.next(), lines.next()) {
        (Some(pid), Some(since), Some(command)) if pid.parse::<u32>().is_ok() => {
            format!("pid {pid} (`{command}`, since {since})")
        }
        _ => "another testbed command".to_string(),
    }
}

/// A directory only its owner can enter: sockets inside it are private.
pub fn create_private_dir(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))
}

/// Writes `data` to `path` through a temp file in the same directory and a
/// rename, so readers never see a half-written file, and a crash of the
/// host leaves either the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    tmp.write_all(data).map_err(io_err(path))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    // The rename is durable once the folder's entry is on disk too.
    fs::File::open(dir)
        .and_then(|folder| folder.sync_all())
        .map_err(io_err(dir))
}

/// Removes the folder `path` with everything in it; one that is not there
/// is no error.
pub fn remove_dir_if_present(path: &Path) -> Result<(), StateError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Bytes the files under `path` take on disk (holes not counted).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_usage(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_missing_record_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("create");
        assert!(state.load().expect("load").machines.is_empty());
        let mut record = Record::default();
        record.machines.insert(
            "alpha".into(),
            MachineRecord {
                provider: ProviderKind::Qemu,
                image: "debian-12-abc".into(),
                spec: "s".into(),
                ssh_port: 2222,
                desired: Desired::Running,
                identity: None,
                daemons: BTreeMap::new(),
                artifacts: None,
                provisioned: BTreeMap::new(),
                warm_boot: false,
                unknown: Default::default(),
            },
        );
        state.save(&record).expect("save");
        assert_eq!(state.load().expect("load").machines, record.machines);
    }

    #[test]
    fn corrupt_record_is_reported_not_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("create");
        fs::write(state.record_path(), b"{not json").expect("write");
        assert!(matches!(state.load(), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn secrets_are_generated_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let names = vec!["munge_key".to_string()];
        let first = state.secrets(&names).expect("secrets");
        assert_eq!(first["munge_key"].len(), 64);
        let both = state
            .secrets(&["jwt_key".to_string(), "munge_key".to_string()])
            .expect("secrets");
        assert_eq!(both["munge_key"], first["munge_key"], "kept across calls");
        assert_ne!(both["jwt_key"], both["munge_key"]);
        let mode = fs::metadata(state.secrets_path())
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_held_lock_names_its_holder_and_shared_holders_sit_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let held = state.lock(Access::Exclusive, None).expect("first lock");
        for access in [Access::Exclusive, Access::Shared] {
            match state.lock(access, None) {
                Err(StateError::Locked { holder, .. }) => {
                    let pid = format!("pid {} (`", std::process::id());
                    assert!(holder.starts_with(&pid), "{holder}");
                    assert!(holder.contains(", since 20"), "{holder}");
                }
                other => panic!("{access:?} beside an exclusive holder: {:?}", other.err()),
            }
        }
        drop(held);
        let first = state.lock(Access::Shared, None).expect("shared");
        let _second = state
            .lock(Access::Shared, None)
            .expect("shared beside shared");
        assert!(matches!(
            state.lock(Access::Exclusive, None),
            Err(StateError::Locked { .. })
        ));
        drop(first);
    }

    #[test]
    fn a_waiting_lock_is_told_the_holder_and_gets_the_lock_once_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let held = state.lock(Access::Exclusive, None).expect("first lock");
        let waiter = {
            let state = state.clone();
            std::thread::spawn(move || {
                let told = std::sync::Mutex::new(String::new());
                let on_wait = |holder: &str| *told.lock().expect("told") = holder.to_string();
                let guard = state.lock(Access::Exclusive, Some(&on_wait));
                (guard.is_ok(), told.into_inner().expect("told"))
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
        let (locked, told) = waiter.join().expect("waiter");
        assert!(locked);
        assert!(told.starts_with("pid "), "{told}");
    }

    #[test]
    fn a_record_from_a_newer_testbed_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("create");
        let newer = br#"{"version": 99, "layout": "unknown to us"}"#;
        fs::write(state.record_path(), newer).expect("write");
        match state.load() {
            Err(StateError::Newer { found: 99, .. }) => {}
            other => panic!("a version-99 record: {other:?}"),
        }
        assert_eq!(fs::read(state.record_path()).expect("read"), newer);
    }

    #[test]
    fn unknown_fields_survive_a_save_and_the_version_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("create");
        let old = r#"{"topology": "t.toml", "machines": {}, "later_field": [1, 2]}"#;
        fs::write(state.record_path(), old).expect("write");
        let record = state
            .load()
            .expect("a record without a version is version 1");
        state.save(&record).expect("save");
        let saved: serde_json::Value =
            serde_json::from_slice(&fs::read(state.record_path()).expect("read")).expect("json");
        assert_eq!(saved["version"], STATE_VERSION);
        assert_eq!(saved["later_field"], serde_json::json!([1, 2]));
    }

    #[test]
    fn a_truncated_record_says_how_to_recover() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("create");
        fs::write(state.record_path(), br#"{"topology": "t.toml", "mach"#).expect("write");
        let message = state.load().expect_err("truncated").to_string();
        assert!(message.contains("is corrupt"), "{message}");
        assert!(message.contains("testbed destroy -f"), "{message}");
    }
}
