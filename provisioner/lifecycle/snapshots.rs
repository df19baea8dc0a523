//! Whole-cluster snapshots, consistent across machines: every VM paused,
//! then saved, then resumed together. A restore loads every VM paused on
//! fresh networks, resumes them together, sets each guest's clock from the
//! host's (qemu's `vmgenid` makes each reseed its RNG) and runs the checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::check;
use crate::model::Machine;
use crate::provider::{Provider, ProviderError, Relocation, VmState};
use crate::snapshot::{Listed, Manifest, SnapshotError, Snapshots};
use crate::state::{Access, Desired, Record, STATE_VERSION};

use super::destroy::stop_control_master;
use super::ssh_config::{start_control_masters, write_ssh_config};
use super::{faults, Error, Result, Testbed};

/// The name `snapshot save` and `restore` use when given none.
pub const DEFAULT_SNAPSHOT: &str = "default";

/// What `snapshot save` did.
#[derive(Debug)]
pub struct Saved {
    pub name: String,
    /// Bytes on disk.
    pub size: u64,
    /// How long the machines stood paused.
    pub paused_seconds: f64,
}

/// What `snapshot restore` did.
#[derive(Debug)]
pub struct Restored {
    pub name: String,
    /// From the command's start until every machine ran again.
    pub resumed_seconds: f64,
    pub checks: check::Report,
}

impl Testbed {
    fn snapshot_dir(&self) -> Snapshots {
        Snapshots::in_state(self.state.root())
    }

    pub fn snapshots(&self) -> Result<Vec<Listed>> {
        Ok(self.snapshot_dir().list()?)
    }

    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let _lock = self.lock(Access::Exclusive)?;
        let snapshots = self.snapshot_dir();
        self.forget_saved(&snapshots.path(name))?;
        Ok(snapshots.remove(name)?)
    }

    /// Has each machine's provider drop what it keeps of the snapshot in
    /// `folder` outside that folder (libvirt: the snapshot in its volume);
    /// nothing when there is no such folder.
    fn forget_saved(&self, folder: &Path) -> Result<()> {
        for machine in &self.topology.machines {
            let from = Snapshots::machine_path(folder, &machine.name);
            if from.is_dir() {
                self.provider_of(machine)?
                    .forget_state(&self.state.machine_dir(&machine.name), &from)?;
            }
        }
        Ok(())
    }

    /// `snapshot save`: every machine's memory and disk, taken while all
    /// stand paused, so the snapshot is one moment of the whole cluster.
    pub async fn save_snapshot(&self, name: &str, force: bool) -> Result<Saved> {
        let _lock = self.lock(Access::Exclusive)?;
        let record = self.state.load()?;
        for machine in &self.topology.machines {
            self.require_running(machine, record.machines.contains_key(&machine.name))?;
        }
        let snapshots = self.snapshot_dir();
        let partial = snapshots.prepare(name, force)?;
        let paused_at = Instant::now();
        let saved = self.pause_and_save(&partial, &record).await;
        let paused_seconds = paused_at.elapsed().as_secs_f64();
        if let Err(e) = saved {
            let _ = self.forget_saved(&partial);
            snapshots.abandon(name);
            return Err(e);
        }
        // The snapshot this one replaces (`--force`), if any.
        self.forget_saved(&snapshots.path(name))?;
        snapshots.commit(&Manifest::of(name, &self.topology, &record))?;
        let size = crate::state::disk_usage(&snapshots.path(name));
        Ok(Saved {
            name: name.to_string(),
            size,
            paused_seconds,
        })
    }

    /// Pauses every machine, saves each (in parallel) into `partial`, then
    /// resumes all of them, whatever the saves did, and sets their clocks,
    /// which stood still meanwhile (measured: 1.5 s behind after the green
    /// cache saved a zk-ensemble); a machine that a fault paused stays
    /// paused.
    pub(super) async fn pause_and_save(&self, partial: &Path, record: &Record) -> Result<()> {
        let machines = &self.topology.machines;
        let mut paused = Vec::new();
        let mut outcome = Ok(());
        for machine in machines {
            if faults::paused(record, &machine.name) {
                continue;
            }
            match self
                .provider_of(machine)
                .and_then(|p| Ok(p.pause(&self.state.machine_dir(&machine.name))?))
            {
                Ok(()) => paused.push(machine),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_ok() {
            let partial = partial.to_path_buf();
            outcome = self
                .each_machine(machines, move |provider, dir, name| {
                    provider.save_state(&dir, &Snapshots::machine_path(&partial, &name))
                })
                .await;
        }
        for machine in &paused {
            let resumed = self
                .provider_of(machine)
                .and_then(|p| Ok(p.resume(&self.state.machine_dir(&machine.name))?));
            if outcome.is_ok() {
                outcome = resumed;
            }
        }
        outcome?;
        let names: Vec<String> = paused.iter().map(|m| m.name.clone()).collect();
        let sessions = self.sessions()?;
        let clocks = faults::set_clocks(&sessions, &names).await;
        sessions.close().await;
        clocks
    }

    /// `snapshot restore`: the cluster as it was when the snapshot was
    /// taken, then its checks.
    /// `name`: the snapshot, or the newest one.
    pub async fn restore_snapshot(&self, name: Option<&str>) -> Result<Restored> {
        let started = Instant::now();
        let _lock = self.lock(Access::Exclusive)?;
        let snapshots = self.snapshot_dir();
        let name = match name {
            Some(name) => name.to_string(),
            None => snapshots.newest()?,
        };
        let manifest = snapshots.load(&name)?;
        let differences = manifest.differences(&self.topology);
        if !differences.is_empty() {
            return Err(SnapshotError::Mismatch { name, differences }.into());
        }
        for machine in &self.topology.machines {
            if !self.state.machine_dir(&machine.name).is_dir() {
                return Err(SnapshotError::NoMachine(machine.name.clone()).into());
            }
        }
        let record = restored_record(&manifest, &self.topology.path);
        let moves = self.unmoved(&record);
        self.load_paused(&snapshots.path(&name), &record, &moves)
            .await?;
        let (resumed_seconds, checks) = self.resume_and_check(&record, started).await?;
        Ok(Restored {
            name,
            resumed_seconds,
            checks,
        })
    }

    /// Each machine restored where it was saved, on the port it had.
    fn unmoved(&self, record: &Record) -> BTreeMap<String, Relocation> {
        record
            .machines
            .iter()
            .map(|(name, saved)| {
                let stays = Relocation {
                    saved_root: self.state.root().to_path_buf(),
                    root: self.state.root().to_path_buf(),
                    saved_ssh_port: saved.ssh_port,
                    ssh_port: saved.ssh_port,
                };
                (name.clone(), stays)
            })
            .collect()
    }

    /// Records `record`, runs every loaded machine together, gives each its
    /// ssh config entry, sets the clocks, runs the checks and then starts
    /// each machine's ControlMaster. Returns the seconds from `started`
    /// until all ran.
    pub(super) async fn resume_and_check(
        &self,
        record: &Record,
        started: Instant,
    ) -> Result<(f64, check::Report)> {
        self.state.save(record)?;
        let machines = self.topology.machines.clone();
        self.each_machine(&machines, |provider, dir, _| provider.resume(&dir))
            .await?;
        let resumed_seconds = started.elapsed().as_secs_f64();
        let names: Vec<String> = machines.iter().map(|m| m.name.clone()).collect();
        let sessions = self.sessions()?;
        write_ssh_config(&self.state, &self.topology.name, &sessions.endpoints())?;
        let clocks = faults::set_clocks(&sessions, &names).await;
        let checks = match clocks {
            Ok(()) => {
                Ok(check::run_all(&self.topology.checks, &self.topology, sessions.clone()).await)
            }
            Err(e) => Err(e),
        };
        sessions.close().await;
        // Only now: a second key exchange per guest while the clocks are
        // set and the checks run would take their CPU.
        start_control_masters(&self.state, &names);
        Ok((resumed_seconds, checks?))
    }

    /// Every VM stopped, the networks made anew (no fault survives), and
    /// every machine loaded from `snapshot`, paused, where `moves` says.
    pub(super) async fn load_paused(
        &self,
        snapshot: &Path,
        record: &Record,
        moves: &BTreeMap<String, Relocation>,
    ) -> Result<()> {
        let machines = self.topology.machines.clone();
        for machine in &machines {
            stop_control_master(&self.state, &machine.name).await;
        }
        self.each_machine(&machines, |provider, dir, _| provider.kill(&dir))
            .await?;
        for network in record.networks.keys() {
            let Some(machine) = machines.iter().find(|m| m.ips.contains_key(network)) else {
                continue;
            };
            let provider = self.provider_of(machine)?;
            let spec = self.network_spec(network);
            provider.remove_network(&spec)?;
            provider.ensure_network(&spec)?;
        }
        let snapshot = snapshot.to_path_buf();
        let moves = moves.clone();
        self.each_machine(&machines, move |provider, dir, name| {
            let moved = moves.get(&name).ok_or_else(|| ProviderError::Internal {
                what: "restoring a snapshot",
                detail: format!("{name} has no saved record"),
            })?;
            provider.restore_state(&dir, &Snapshots::machine_path(&snapshot, &name), moved)
        })
        .await
    }

    fn require_running(&self, machine: &Machine, recorded: bool) -> Result<()> {
        let state = self
            .provider_of(machine)?
            .state(&self.state.machine_dir(&machine.name));
        if recorded && state == VmState::Running {
            return Ok(());
        }
        Err(SnapshotError::NotRunning(machine.name.clone()).into())
    }

    /// Runs `work(provider, machine folder, name)` for every machine at once
    /// on blocking threads; the first error, once all have ended.
    pub(super) async fn each_machine(
        &self,
        machines: &[Machine],
        work: impl Fn(Box<dyn Provider>, PathBuf, String) -> std::result::Result<(), ProviderError>
            + Send
            + Clone
            + 'static,
    ) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for machine in machines {
            let provider = self.provider_of(machine)?;
            let dir = self.state.machine_dir(&machine.name);
            let name = machine.name.clone();
            let work = work.clone();
            tasks.spawn_blocking(move || work(provider, dir, name).map_err(Error::from));
        }
        super::first_error(tasks, "a provider call on every machine").await
    }
}

/// The record a restore of `manifest` leaves: every machine running, no
/// fault in force, the topology where it is now.
pub(super) fn restored_record(manifest: &Manifest, topology: &Path) -> Record {
    let mut record = manifest.record.clone();
    record.version = STATE_VERSION;
    record.topology = topology.to_path_buf();
    record.faults.clear();
    for saved in record.machines.values_mut() {
        saved.desired = Desired::Running;
    }
    record
}
