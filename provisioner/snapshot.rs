//! Whole-cluster snapshots on disk. `.testbed/snapshots/NAME/` holds a
//! manifest (what the snapshot was taken of, and the record then) and a
//! folder per machine that its provider fills with the VM's memory and
//! disk. A snapshot is restored only onto the machines, images and
//! networks it was taken of.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{ProviderKind, Topology};
use crate::state::{self, Record, StateError};

/// The manifest's layout; a newer one is refused, not misread.
pub const MANIFEST_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "invalid snapshot name `{0}`: 1 to 64 letters, digits, `-` and `_`, not starting with `-`"
    )]
    BadName(String),
    #[error("no snapshot named `{name}`{known}")]
    NotFound { name: String, known: String },
    #[error(
        "a snapshot named `{0}` exists; `testbed snapshot rm {0}` first, or save with --force"
    )]
    Exists(String),
    #[error("this testbed has no snapshot: `testbed snapshot save` takes one")]
    None,
    #[error("{0} is not running: a snapshot holds the whole cluster running (`testbed up` first)")]
    NotRunning(String),
    #[error(
        "{0} was never made in this testbed: a snapshot restores onto the testbed it was taken in"
    )]
    NoMachine(String),
    #[error(
        "snapshot `{name}` is unreadable ({path}): {detail}\n  help: `testbed snapshot rm {name}`"
    )]
    Corrupt {
        name: String,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "snapshot `{name}` was taken of a different cluster, so it is not restored:\n{}\n  \
         help: restore it onto the topology it was taken of, or `testbed snapshot save` anew",
        .differences.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    Mismatch {
        name: String,
        differences: Vec<String>,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// What a snapshot was taken of, and the testbed's record then.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    /// When it was saved (RFC 3339).
    pub created: String,
    pub machines: BTreeMap<String, MachineShape>,
    /// Each network's subnet.
    pub networks: BTreeMap<String, Ipv4Net>,
    pub record: Record,
}

/// What a machine must still be for its saved memory and disk to fit it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub provider: ProviderKind,
    /// The image recipe, and the cached image (`NAME-HASH`) the disk is over.
    pub recipe: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub ips: BTreeMap<String, Ipv4Addr>,
}

impl Manifest {
    /// The manifest of a snapshot called `name` of `topology`, now.
    pub fn of(name: &str, topology: &Topology, record: &Record) -> Manifest {
        let machines = topology
            .machines
            .iter()
            .map(|m| {
                let image = record
                    .machines
                    .get(&m.name)
                    .map(|r| r.image.clone())
                    .unwrap_or_default();
                let shape = MachineShape {
                    provider: m.provider,
                    recipe: m.image.clone(),
                    image,
                    cpus: m.cpus,
                    memory_mib: m.memory_mib,
                    ips: m.ips.clone(),
                };
                (m.name.clone(), shape)
            })
            .collect();
        Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            machines,
            networks: topology
                .networks
                .iter()
                .map(|(name, n)| (name.clone(), n.subnet))
                .collect(),
            record: record.clone(),
        }
    }

    /// How `topology` differs from what the snapshot was taken of, one line
    /// per difference (none: it may be restored).
    pub fn differences(&self, topology: &Topology) -> Vec<String> {
        let mut found = Vec::new();
        for machine in &topology.machines {
            let Some(saved) = self.machines.get(&machine.name) else {
                found.push(format!("{} is not in the snapshot", machine.name));
                continue;
            };
            let name = &machine.name;
            let mut differ = |what: &str, then: String, now: String| {
                if then != now {
                    found.push(format!("{name}: {what} {then} in the snapshot, {now} now"));
                }
            };
            differ(
                "provider",
                saved.provider.as_str().into(),
                machine.provider.as_str().into(),
            );
            differ("image", saved.recipe.clone(), machine.image.clone());
            differ("cpus", saved.cpus.to_string(), machine.cpus.to_string());
            differ(
                "memory",
                format!("{} MiB", saved.memory_mib),
                format!("{} MiB", machine.memory_mib),
            );
            differ("addresses", addresses(&saved.ips), addresses(&machine.ips));
        }
        for name in self.machines.keys() {
            if topology.machine(name).is_none() {
                found.push(format!("{name} is in the snapshot, not in the topology"));
            }
        }
        let now: BTreeMap<&String, &Ipv4Net> = topology
            .networks
            .iter()
            .map(|(name, n)| (name, &n.subnet))
            .collect();
        let then: BTreeMap<&String, &Ipv4Net> = self.networks.iter().collect();
        if now != then {
            found.push(format!(
                "networks {} in the snapshot, {} now",
                networks(&then),
                networks(&now)
            ));
        }
        found
    }
}

fn addresses(ips: &BTreeMap<String, Ipv4Addr>) -> String {
    if ips.is_empty() {
        return "none".into();
    }
    let each: Vec<String> = ips.iter().map(|(n, ip)| format!("{n}={ip}")).collect();
    each.join(" ")
}

fn networks(nets: &BTreeMap<&String, &Ipv4Net>) -> String {
    if nets.is_empty() {
        return "none".into();
    }
    let each: Vec<String> = nets.iter().map(|(n, s)| format!("{n}={s}")).collect();
    each.join(" ")
}

/// A snapshot as `snapshot list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub name: String,
    pub created: String,
    pub machines: Vec<String>,
    /// Bytes on disk.
    pub size: u64,
}

/// The `snapshots/` folder of a testbed.
#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
}

impl Snapshots {
    pub fn in_state(state_root: &Path) -> Snapshots {
        Snapshots::at(state_root.join("snapshots"))
    }

    /// Snapshots kept in `root`, one folder each (the green cache keeps one
    /// per entry).
    pub fn at(root: PathBuf) -> Snapshots {
        Snapshots { root }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where a snapshot being saved is written, renamed to [`Self::path`]
    /// once whole: a save cut short leaves no snapshot that looks whole.
    pub fn partial_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(".{name}.partial"))
    }

    /// The folder of `machine`'s memory and disk in snapshot `dir`.
    pub fn machine_path(dir: &Path, machine: &str) -> PathBuf {
        dir.join("machines").join(machine)
    }

    /// Makes room for a snapshot called `name`: refuses one that exists
    /// unless `force`, and clears what a save cut short left.
    pub fn prepare(&self, name: &str, force: bool) -> Result<PathBuf> {
        check_name(name)?;
        if self.path(name).exists() && !force {
            return Err(SnapshotError::Exists(name.into()));
        }
        state::create_private_dir(&self.root)?;
        let partial = self.partial_path(name);
        state::remove_dir_if_present(&partial)?;
        state::create_private_dir(&partial)?;
        Ok(partial)
    }

    /// Writes the manifest into the partial folder and puts it in place of
    /// any snapshot of the same name.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let partial = self.partial_path(&manifest.name);
        write_manifest(&partial, manifest)?;
        let path = self.path(&manifest.name);
        state::remove_dir_if_present(&path)?;
        std::fs::rename(&partial, &path).map_err(|e| StateError::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(())
    }

    /// Drops a partial snapshot (a save that failed).
    pub fn abandon(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.partial_path(name));
    }

    /// The manifest of snapshot `name`.
    pub fn load(&self, name: &str) -> Result<Manifest> {
        check_name(name)?;
        let path = self.path(name).join(MANIFEST);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.not_found(name));
            }
            Err(e) => return Err(StateError::Io { path, source: e }.into()),
        };
        let corrupt = |detail: String| SnapshotError::Corrupt {
            name: name.into(),
            path: path.clone(),
            detail,
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if manifest.version > MANIFEST_VERSION {
            return Err(corrupt(format!(
                "made by a newer testbed (layout {}, this one reads {MANIFEST_VERSION})",
                manifest.version
            )));
        }
        Ok(manifest)
    }

    /// The newest snapshot's name.
    pub fn newest(&self) -> Result<String> {
        self.list()?
            .into_iter()
            .max_by(|a, b| a.created.cmp(&b.created))
            .map(|s| s.name)
            .ok_or(SnapshotError::None)
    }

    /// Every whole snapshot, by name.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let mut listed = Vec::new();
        for name in self.names() {
            let Ok(manifest) = self.load(&name) else {
                continue;
            };
            listed.push(Listed {
                size: state::disk_usage(&self.path(&name)),
                created: manifest.created,
                machines: manifest.machines.keys().cloned().collect(),
                name,
            });
        }
        Ok(listed)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let path = self.path(name);
        if !path.exists() {
            return Err(self.not_found(name));
        }
        Ok(state::remove_dir_if_present(&path)?)
    }

    fn names(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    fn not_found(&self, name: &str) -> SnapshotError {
        let names = self.names();
        SnapshotError::NotFound {
            name: name.into(),
            known: if names.is_empty() {
                String::new()
            } else {
                format!("; snapshots: {}", names.join(", "))
            },
        }
    }
}

/// Writes `manifest` into the snapshot folder `dir`.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Corrupt {
        name: manifest.name.clone(),
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(state::write_atomic(&dir.join(MANIFEST), &text, 0o600)?)
}

/// Snapshot names become folder names and are typed on the command line.
fn check_name(name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if fine {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_folder_and_command_line_safe() {
        for good in ["s1", "before-upgrade", "green_2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-s", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
