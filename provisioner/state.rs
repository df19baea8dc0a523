//! `.testbed/` beside the topology (like `.vagrant/`): one folder per machine
//! (disk, seed, QMP socket, console log, pid), the user key, the generated
//! ssh config and `state.json`, the record of how far each machine got.
//! Records are written atomically (temp file + rename).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::ProviderKind;

pub const STATE_DIR: &str = ".testbed";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); `testbed destroy -f` removes it")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no testbed here: {dir} has no {STATE_DIR}/ (run `testbed up FILE`, or `testbed init` to write a topology.toml here, or pass -f FILE)")]
    NotFound { dir: PathBuf },
    #[error("another testbed command holds {path}; wait for it to finish")]
    Locked { path: PathBuf },
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// The topology file this testbed was brought up from.
    pub topology: PathBuf,
    pub machines: BTreeMap<String, MachineRecord>,
    /// The networks that are up, and which provider serves each.
    #[serde(default)]
    pub networks: BTreeMap<String, ProviderKind>,
    /// The inputs hash of the last build that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
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

    /// The whole output of the last build.
    pub fn build_log(&self) -> PathBuf {
        self.root.join("build.log")
    }

    fn secrets_path(&self) -> PathBuf {
        self.root.join("secrets.json")
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

    pub fn load(&self) -> Result<Record, StateError> {
        let path = self.record_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(record).map_err(|source| StateError::Corrupt {
            path: self.record_path(),
            source,
        })?;
        write_atomic(&self.record_path(), &json, 0o644)
    }

    /// Takes the testbed's lock for the life of the returned guard, so two
    /// commands never change the same testbed at once.
    pub fn lock(&self) -> Result<LockGuard, StateError> {
        self.create()?;
        let path = self.root.join("lock");
        let file = fs::File::create(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(LockGuard { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
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
        self.path.join("console.log")
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

/// Held while a command changes the testbed; released on drop.
pub struct LockGuard {
    _file: fs::File,
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
/// rename, so readers never see a half-written file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    tmp.write_all(data).map_err(io_err(path))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(())
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
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let _held = state.lock().expect("first lock");
        assert!(matches!(state.lock(), Err(StateError::Locked { .. })));
    }
}
