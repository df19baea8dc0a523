//! The green cache in `up`: the key of what `up` would make, the save when
//! a fresh `up` first has every check green, and the restore that takes
//! the place of a fresh `up` whose key is cached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::build;
use crate::check;
use crate::green::{self, Entry, EntryFiles, GreenCache, GreenError, KeyHasher, Listed};
use crate::kit::Kits;
use crate::plan::{MachineAction, Plan};
use crate::progress::Progress;
use crate::provider::Relocation;
use crate::settings::Settings;
use crate::snapshot::{Manifest, SnapshotError, Snapshots};
use crate::state::{self, Record};

use super::snapshots::restored_record;
use super::{first_line, Error, Result, Testbed};

/// The snapshot's name inside an entry.
const SNAPSHOT: &str = "green";

/// What a save into the green cache did.
#[derive(Debug)]
pub struct GreenSaved {
    pub key: String,
    /// Bytes on disk.
    pub size: u64,
    pub paused_seconds: f64,
    /// Entries evicted to keep the cache under its limit.
    pub evicted: Vec<Listed>,
}

/// What a restore from the green cache did.
#[derive(Debug)]
pub struct GreenRestored {
    pub key: String,
    /// When the entry was saved (RFC 3339).
    pub created: String,
    /// From the restore's start until every machine ran again.
    pub resumed_seconds: f64,
    pub checks: check::Report,
}

/// The green cache's size limit: `$TESTBED_GREEN_CACHE_MAX`, else
/// [`green::DEFAULT_MAX_SIZE`]; 0 saves nothing.
pub fn green_cache_max(settings: &Settings) -> Result<u64> {
    let Some(text) = &settings.green_cache_max else {
        return Ok(green::DEFAULT_MAX_SIZE);
    };
    crate::topology::parse_size_mib(text, "TESTBED_GREEN_CACHE_MAX")
        .map(|mib| mib << 20)
        .map_err(Error::Setting)
}

impl Testbed {
    pub(super) fn green_cache(&self) -> GreenCache {
        GreenCache::in_cache(self.cache.root())
    }

    /// The green cache's size limit for an `up` that makes every machine
    /// of `plan`; `None` when it saves nothing or some machine exists.
    pub(super) fn green_max_for(&self, plan: &Plan) -> Result<Option<u64>> {
        let max_size = green_cache_max(&self.settings)?;
        let all_new = plan
            .machines
            .iter()
            .all(|m| m.action == MachineAction::Create);
        Ok((max_size > 0 && all_new).then_some(max_size))
    }

    /// The green cache key of `plan`; `None` while an image is not built
    /// or when the key cannot be made (said on the progress lines).
    pub(super) fn green_key_for(
        &self,
        plan: &Plan,
        kits: &Kits,
        progress: &Progress,
    ) -> Option<String> {
        self.green_key(plan, kits).unwrap_or_else(|e| {
            progress.println(&format!(
                "green cache: not used: {}",
                first_line(&e.to_string())
            ));
            None
        })
    }

    /// A hash of everything that made the cluster `plan` brings up: this
    /// testbed's version, the topology as written, each machine's provider
    /// and image, each kit's files as written, the build's inputs and any
    /// artifact the build does not make. The secrets are not in it: an
    /// entry carries its own. `None` while an image is not built: a saved
    /// disk is an overlay on the very image it was made over, so an image
    /// built again (same recipe, other bytes) gives another key.
    pub(super) fn green_key(&self, plan: &Plan, kits: &Kits) -> Result<Option<String>> {
        let mut key = KeyHasher::default();
        key.part("testbed", env!("CARGO_PKG_VERSION").as_bytes());
        let topology =
            std::fs::read(&self.topology.path).map_err(|source| state::StateError::Io {
                path: self.topology.path.clone(),
                source,
            })?;
        key.part("topology", &topology);
        for machine in &plan.machines {
            let Some(image) = self.cache.lookup(&machine.recipe) else {
                return Ok(None);
            };
            let made = format!(
                "{} {} {} {}",
                machine.name,
                machine.machine.provider.as_str(),
                image.key(),
                built_at(&image.root)
            );
            key.part("machine", made.as_bytes());
            for provisioner in &machine.provision {
                key.part(&provisioner.name, provisioner.hash.as_bytes());
            }
        }
        for (name, text) in kits.as_written() {
            key.part(name, text.as_bytes());
        }
        let outputs: &[String] = match &self.topology.build {
            Some(build) => {
                let inputs = build::inputs_hash(build, self.topology.dir())?;
                key.part("build", inputs.as_bytes());
                &build.outputs
            }
            None => &[],
        };
        for machine in &self.topology.machines {
            for artifact in machine.artifacts.iter().filter(|a| !outputs.contains(a)) {
                let bytes = std::fs::read(self.topology.dir().join(artifact)).unwrap_or_default();
                key.part(artifact, &bytes);
            }
        }
        Ok(Some(key.finish()))
    }

    /// Saves the running, green cluster under `key`: every machine paused,
    /// saved and resumed together, as `snapshot save` does, with the files
    /// it was made with and the build's outputs; then the cache pruned to
    /// `max_size`.
    pub(super) async fn save_green(&self, key: &str, max_size: u64) -> Result<GreenSaved> {
        for machine in &self.topology.machines {
            self.provider_of(machine)?.check_saves_travel()?;
        }
        let record = self.state.load()?;
        let cache = self.green_cache();
        let partial = cache.prepare(key)?;
        let snapshot = partial.snapshot().join(SNAPSHOT);
        state::create_private_dir(&snapshot)?;
        let paused_at = Instant::now();
        let saved = self.pause_and_save(&snapshot, &record).await;
        let paused_seconds = paused_at.elapsed().as_secs_f64();
        let carried = saved.and_then(|()| {
            let manifest = Manifest::of(SNAPSHOT, &self.topology, &record);
            crate::snapshot::write_manifest(&snapshot, &manifest)?;
            green::copy_files(
                self.state.root(),
                &partial.state(),
                &self.state.identity_files(&self.machine_names_list()),
            )?;
            green::copy_files(self.topology.dir(), &partial.outputs(), &self.outputs())?;
            Ok(())
        });
        if let Err(e) = carried {
            cache.abandon(partial);
            return Err(e);
        }
        let size = state::disk_usage(partial.dir());
        cache.commit(partial, &self.topology.name, self.state.root())?;
        let evicted = cache.prune(max_size)?;
        Ok(GreenSaved {
            key: key.to_string(),
            size,
            paused_seconds,
            evicted,
        })
    }

    /// The cluster of `entry` in place of a fresh `up`: its files put back
    /// into `.testbed/` and the topology's folder, every machine loaded
    /// paused on fresh networks (each on a free SSH port), all resumed
    /// together, clocks set, the checks run.
    pub(super) async fn restore_green(&self, entry: &Entry) -> Result<GreenRestored> {
        let started = Instant::now();
        let cache = self.green_cache();
        cache.touch(entry);
        let manifest = Snapshots::at(entry.snapshot()).load(SNAPSHOT)?;
        let differences = manifest.differences(&self.topology);
        if !differences.is_empty() {
            return Err(SnapshotError::Mismatch {
                name: format!("green cache {}", entry.info.key),
                differences,
            }
            .into());
        }
        let names = self.machine_names_list();
        green::copy_files(
            &entry.state(),
            self.state.root(),
            &self.state.identity_files(&names),
        )?;
        green::copy_files(&entry.outputs(), self.topology.dir(), &self.outputs())?;
        let mut record = restored_record(&manifest, &self.topology.path);
        let moves = self.fresh_ports(&mut record, entry.info.saved_root.clone())?;
        // Recorded before any VM starts: a killed restore leaves nothing
        // `destroy` does not know of.
        self.state.save(&record)?;
        self.load_paused(&entry.snapshot().join(SNAPSHOT), &record, &moves)
            .await?;
        let (resumed_seconds, checks) = self.resume_and_check(&record, started).await?;
        // Not green is not what the cache promised: `up` boots afresh.
        if !checks.passed() {
            return Err(GreenError::NotGreen {
                key: entry.info.key.clone(),
                failed: checks
                    .results
                    .iter()
                    .filter(|r| !r.passed)
                    .map(|r| r.name.clone())
                    .collect(),
            }
            .into());
        }
        Ok(GreenRestored {
            key: entry.info.key.clone(),
            created: entry.info.created.clone(),
            resumed_seconds,
            checks,
        })
    }

    /// Gives each machine of `record` a free SSH port (the one it was saved
    /// with when free) and makes its folder; how each VM moved.
    fn fresh_ports(
        &self,
        record: &mut Record,
        saved_root: PathBuf,
    ) -> Result<BTreeMap<String, Relocation>> {
        let mut moves = BTreeMap::new();
        for machine in &self.topology.machines {
            let Some(saved) = record.machines.get_mut(&machine.name) else {
                return Err(SnapshotError::NoMachine(machine.name.clone()).into());
            };
            state::create_private_dir(&self.state.machine_dir(&machine.name))?;
            let provider = self.provider_of(machine)?;
            let ssh_port = provider.ssh_port(saved.ssh_port, false)?;
            moves.insert(
                machine.name.clone(),
                Relocation {
                    saved_root: saved_root.clone(),
                    root: self.state.root().to_path_buf(),
                    saved_ssh_port: saved.ssh_port,
                    ssh_port,
                },
            );
            saved.ssh_port = ssh_port;
        }
        Ok(moves)
    }

    /// Undoes a restore that failed half-way, so that `up` can boot afresh:
    /// every VM and network it made removed, the record emptied.
    pub(super) async fn undo_green(&self) -> Result<()> {
        let machines = self.topology.machines.clone();
        self.each_machine(&machines, |provider, dir, _| provider.destroy(&dir))
            .await?;
        let record = self.state.load()?;
        for network in record.networks.keys() {
            if let Some(machine) = machines.iter().find(|m| m.ips.contains_key(network)) {
                self.provider_of(machine)?
                    .remove_network(&self.network_spec(network))?;
            }
        }
        Ok(self.state.save(&Record {
            topology: self.topology.path.clone(),
            ..Record::default()
        })?)
    }

    /// The build's outputs, relative to the topology's folder.
    fn outputs(&self) -> Vec<PathBuf> {
        self.topology
            .build
            .iter()
            .flat_map(|b| b.outputs.iter().map(PathBuf::from))
            .collect()
    }

    fn machine_names_list(&self) -> Vec<String> {
        self.topology
            .machines
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }
}

/// When an image's disk was written, to the nanosecond: it tells one build
/// of a recipe from the next.
fn built_at(disk: &std::path::Path) -> String {
    let written = std::fs::metadata(disk).and_then(|m| m.modified());
    match written.map(|t| t.duration_since(std::time::UNIX_EPOCH)) {
        Ok(Ok(since)) => since.as_nanos().to_string(),
        _ => "unknown".into(),
    }
}
