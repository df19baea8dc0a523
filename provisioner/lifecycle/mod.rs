//! The machine lifecycle over any provider: `up` (image → boot → identity),
//! `status`, `halt` and `destroy`. Each machine moves through `up` on its
//! own task; the state record says how far each got, so an interrupted `up`
//! continues from there and a converged one does nothing.

mod destroy;
mod faults;
mod green;
mod halt;
mod snapshots;
mod ssh_config;
mod steps;
mod up;
mod warm;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::build;
use crate::identity;
use crate::image::{Cache, ImageError};
use crate::kit::{Kits, Secrets};
use crate::model::{Machine, ProviderKind, Topology};
use crate::plan::{Inputs, Plan, PlanError};
use crate::provider::{self, Provider, ProviderError, VmState};
use crate::provision::Machines;
use crate::settings::Settings;
use crate::ssh::{SshError, Target};
use crate::state::{Access, Desired, LockGuard, MachineRecord, Record, StateDir, StateError};
use crate::topology::{self, TopologyError};

pub use destroy::destroy;
pub use green::{green_cache_max, GreenRestored, GreenSaved};
pub use snapshots::{Restored, Saved, DEFAULT_SNAPSHOT};
pub use ssh_config::{
    configured_machines, control_path, wait_for_control_master, write_ssh_config,
};
pub use steps::StepReport;
pub use up::{GreenOutcome, UpOptions, UpReport};

use steps::check_build;

/// The topology file a folder's verbs use when none is named (`testbed
/// init` writes it).
pub const DEFAULT_TOPOLOGY: &str = "topology.toml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Kit(#[from] crate::kit::KitError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Green(#[from] crate::green::GreenError),
    #[error("{0}\n  help: write a size such as `8GiB`, or `0` to save nothing")]
    Setting(String),
    #[error("{0} has no [build]\n  help: add a [build] table with `machine`, `run`, `inputs` and `outputs`")]
    NoBuild(PathBuf),
    #[error(
        "machine `{builder}` runs the build and cannot also need its artifacts (it would wait \
         for itself)\n  help: build on another machine, or drop the artifacts from `{builder}`"
    )]
    BuilderNeedsArtifacts { builder: String },
    #[error(
        "machine `{machine}` needs artifact `{artifact}` ({wanted_by}), which [build] in {} \
         does not make\n  help: add it to the build's `outputs` (and make the script write it)",
        path.display()
    )]
    ArtifactNotBuilt {
        machine: String,
        artifact: String,
        /// Where the artifact is asked for: the topology or a kit's manifest.
        wanted_by: String,
        path: PathBuf,
    },
    #[error("the builder `{0}` is not running\n  help: `testbed up` boots it (and builds)")]
    BuilderNotRunning(String),
    #[error(
        "machine `{machine}` exists on the {from} provider, not {to}\n  help: `testbed destroy` \
         it first, or leave out --provider"
    )]
    ProviderChange {
        machine: String,
        from: &'static str,
        to: &'static str,
    },
    #[error(
        "network `{network}` was made by the {made_by} provider, but machine `{machine}` is on \
         {wanted}\n  help: run `testbed up --provider {made_by}`, or `testbed destroy` first"
    )]
    NetworkProvider {
        network: String,
        made_by: &'static str,
        machine: String,
        wanted: &'static str,
    },
    #[error(
        "step `{name}` did not finish on {machine} within {} and was stopped (its \
         `timeout`)\n  help: if it needs longer, raise the step's `timeout` (e.g. \
         `timeout = \"1h\"`)",
        humantime::format_duration(*after)
    )]
    StepTimedOut {
        name: String,
        machine: String,
        after: std::time::Duration,
    },
    #[error("{machine} runs no daemon `{daemon}`; its daemons: {known}")]
    UnknownDaemon {
        machine: String,
        daemon: String,
        known: String,
    },
    #[error("{0}")]
    BadFault(String),
    #[error("no step named `{name}`{known}")]
    UnknownStep { name: String, known: String },
    #[error("{machine}: {source}")]
    Ssh { machine: String, source: SshError },
    #[error("{machine}: no SSH: {source}; last console lines ({log}):\n{tail}")]
    NoSsh {
        machine: String,
        source: Box<SshError>,
        log: PathBuf,
        tail: String,
    },
    #[error("{machine}: the VM stopped while booting; last console lines ({log}):\n{tail}")]
    Crashed {
        machine: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{machine}: its disk is based on image {image}, which is no longer in the image cache; `testbed destroy` and `up` start over")]
    BaseImageGone { machine: String, image: String },
    #[error("{machine} runs, but this testbed has no record of it (an `up` was killed?); `testbed destroy` and `up` start over")]
    Untracked { machine: String },
    #[error("no machine named `{name}` in this testbed; machines: {known}")]
    UnknownMachine { name: String, known: String },
    #[error("{} machine(s) failed:\n{}", .0.len(), failure_lines(.0))]
    Several(Vec<MachineFailure>),
}

/// One machine's (or the build's) failure in a command that acts on several.
#[derive(Debug)]
pub struct MachineFailure {
    /// The machine, or `build` for the build step.
    pub machine: String,
    pub error: Error,
}

impl MachineFailure {
    fn build(error: Error) -> MachineFailure {
        MachineFailure {
            machine: "build".into(),
            error,
        }
    }
}

impl std::fmt::Display for MachineFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Machine errors name their machine already; the build's does not.
        if self.machine == "build" {
            write!(f, "build: {}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

fn failure_lines(failures: &[MachineFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

type Result<T> = std::result::Result<T, Error>;

/// One testbed: its topology and its `.testbed/` folder.
pub struct Testbed {
    pub topology: Topology,
    pub state: StateDir,
    pub cache: Cache,
    pub settings: Settings,
}

/// What `status` says of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    NotCreated,
    Running,
    Stopped,
    /// Should run (the last command was `up`), but no VM process runs.
    Crashed,
    /// Runs, but frozen by `fault pause`.
    Paused,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::NotCreated => "not-created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
            MachineState::Crashed => "crashed",
            MachineState::Paused => "paused",
        }
    }
}

/// A machine as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    pub name: String,
    pub state: MachineState,
    pub provider: String,
    /// The `[hosts]` entry it runs on (none: the local one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `host:port` of its SSH (`… via JUMP` on another host), when it has
    /// been created.
    pub ssh: Option<String>,
    pub ips: BTreeMap<String, Ipv4Addr>,
    /// False for a machine that still exists but is no longer in the file.
    pub in_topology: bool,
    /// For a crashed machine: the last lines of its serial console, and
    /// where the whole log is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleTail>,
    /// Its networks whose switch (or bridge) is down: it is cut off there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks_down: Vec<String>,
}

/// The end of a machine's serial console log.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleTail {
    pub log: PathBuf,
    pub lines: Vec<String>,
}

/// How many console lines `status` shows for a crashed machine.
const CRASH_TAIL_LINES: usize = 8;

impl Testbed {
    /// The testbed of a topology file (its `.testbed/` beside it).
    pub fn open(topology_path: &Path, settings: &Settings) -> Result<Testbed> {
        let topology = topology::load(topology_path, &settings.search)?;
        Testbed::with_topology(topology, settings)
    }

    /// Opens the testbed for a verb that acts on machines that exist
    /// (`ssh`, `status`, `halt`, `verify`): no recipe or kit needs to be
    /// found.
    pub fn open_existing(topology_path: &Path, settings: &Settings) -> Result<Testbed> {
        let topology = topology::load_existing(topology_path)?;
        Testbed::with_topology(topology, settings)
    }

    fn with_topology(mut topology: Topology, settings: &Settings) -> Result<Testbed> {
        let state = StateDir::beside(topology.dir());
        // A machine that exists stays on the provider it was made by (an
        // `up --provider` may have chosen it).
        if state.exists() {
            let record = state.load()?;
            for machine in &mut topology.machines {
                if let Some(saved) = record.machines.get(&machine.name) {
                    machine.provider = saved.provider;
                }
            }
        }
        Ok(Testbed {
            topology,
            state,
            cache: Cache::at(settings.cache_root.clone()),
            settings: settings.clone(),
        })
    }

    /// What only matters when a build may run (`up`, `build`, `plan`), so
    /// that a missing input or kit does not stop `status` or `destroy`:
    /// every input exists, every artifact is built, the builder does not
    /// wait for itself.
    pub fn check_build(&self, kits: &Kits) -> Result<()> {
        if let Some(missing) = topology::missing_input(&self.topology) {
            return Err(missing.into());
        }
        check_build(&self.topology, kits)
    }

    /// Every kit the topology's machines run, each loaded once.
    pub fn kits(&self) -> Result<Kits> {
        Ok(Kits::load(&self.topology, &self.settings.search)?)
    }

    /// The plan: what `up` would do now, and why (reads, changes nothing).
    pub fn resolve(&self, record: &Record, kits: &Kits, secrets: &Secrets) -> Result<Plan> {
        let mut kits = kits.clone();
        // A daemon the record has and the topology dropped is stopped by
        // its kit's unit, when the kit can still be found.
        let recorded = record
            .machines
            .values()
            .flat_map(|saved| saved.daemons.keys().cloned());
        kits.load_also(recorded, self.topology.dir(), &self.settings.search);
        let settings = self.provider_settings();
        Ok(Plan::resolve(&Inputs {
            topology: &self.topology,
            record,
            state: &self.state,
            kits: &kits,
            secrets,
            providers: &settings,
            search: &self.settings.search,
        })?)
    }

    /// `testbed plan`: the plan from what exists, generating nothing (the
    /// secrets not generated yet stand as `<secret NAME>`).
    pub fn plan(&self) -> Result<(Plan, Secrets)> {
        let kits = self.kits()?;
        self.check_build(&kits)?;
        let record = self.state.load()?;
        let names = kits.secret_names(&self.topology);
        let mut secrets = self.state.existing_secrets(&names)?;
        for (name, placeholder) in crate::kit::placeholder_secrets(&names) {
            secrets.entry(name).or_insert(placeholder);
        }
        let plan = self.resolve(&record, &kits, &secrets)?;
        Ok((plan, secrets))
    }

    /// Each machine's daemon units (the journals a failed check shows),
    /// from the kits that can be found.
    fn services(&self, kits: &Kits) -> BTreeMap<String, Vec<String>> {
        self.topology
            .machines
            .iter()
            .map(|machine| (machine.name.clone(), kits.services(machine)))
            .collect()
    }

    /// The testbed's lock, for the life of the guard (see [`Access`]).
    fn lock(&self, access: Access) -> Result<LockGuard> {
        take_lock(&self.state, access, &self.settings)
    }

    /// `up --provider KIND`: every machine on `kind`. A machine that already
    /// exists on another provider must be destroyed first.
    pub fn use_provider(&mut self, kind: ProviderKind) -> Result<()> {
        let record = self.state.load()?;
        for machine in &mut self.topology.machines {
            match record.machines.get(&machine.name) {
                Some(saved) if saved.provider != kind => {
                    return Err(Error::ProviderChange {
                        machine: machine.name.clone(),
                        from: saved.provider.as_str(),
                        to: kind.as_str(),
                    })
                }
                _ => machine.provider = kind,
            }
        }
        Ok(())
    }

    /// The testbed of `-f FILE` when given (see [`Testbed::topology_file`]).
    pub fn locate(file: Option<&Path>, settings: &Settings) -> Result<Testbed> {
        Testbed::open(&Testbed::topology_file(file)?, settings)
    }

    /// [`Testbed::locate`] for a verb that acts on machines that exist.
    pub fn locate_existing(file: Option<&Path>, settings: &Settings) -> Result<Testbed> {
        Testbed::open_existing(&Testbed::topology_file(file)?, settings)
    }

    /// `FILE` when given; else the topology of the `.testbed/` in the
    /// current folder or above it; else `topology.toml` in the current
    /// folder (what `testbed init` writes).
    pub fn topology_file(file: Option<&Path>) -> Result<PathBuf> {
        if let Some(file) = file {
            return Ok(file.to_path_buf());
        }
        let cwd = std::env::current_dir().map_err(|source| StateError::Io {
            path: PathBuf::from("."),
            source,
        })?;
        // A `.testbed/` whose first command has not saved a record yet
        // (a build still running) names no topology.
        let recorded = match StateDir::find(&cwd) {
            Ok(state) => Some(state.load()?.topology).filter(|t| !t.as_os_str().is_empty()),
            Err(_) => None,
        };
        match recorded {
            Some(topology) => Ok(topology),
            None if cwd.join(DEFAULT_TOPOLOGY).is_file() => Ok(cwd.join(DEFAULT_TOPOLOGY)),
            None => Err(StateError::NotFound { dir: cwd }.into()),
        }
    }

    fn provider_of(&self, machine: &Machine) -> Result<Box<dyn Provider>> {
        Ok(provider::for_machine(machine, &self.provider_settings())?)
    }

    /// Where daemon-backed providers connect, for this topology.
    fn provider_settings(&self) -> provider::Settings {
        provider::Settings::new(self.topology.libvirt_uri.as_deref(), &self.settings)
            .with_cache_root(self.cache.root().to_path_buf())
            .with_hosts(&self.topology.hosts)
    }

    /// How to reach `machine`'s SSH on host port `port`.
    fn ssh_target(&self, machine: &Machine, port: u16) -> Result<Target> {
        Ok(Target::root(
            self.provider_of(machine)?.ssh_endpoint(port),
            self.state.user_key(),
            self.state.machine(&machine.name).host_public_key(),
        ))
    }

    /// Machines named on the command line, or all of them.
    pub fn select(&self, names: &[String]) -> Result<Vec<Machine>> {
        if names.is_empty() {
            return Ok(self.topology.machines.clone());
        }
        names
            .iter()
            .map(|name| {
                self.topology
                    .machine(name)
                    .cloned()
                    .ok_or_else(|| Error::UnknownMachine {
                        name: name.clone(),
                        known: self.machine_names(),
                    })
            })
            .collect()
    }

    fn machine_names(&self) -> String {
        self.topology
            .machines
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every machine's state, from the record and the provider (never the guest).
    /// Machines that were removed from the topology but still exist come
    /// last, marked `in_topology: false` (`destroy` removes them).
    pub fn status(&self) -> Result<Vec<MachineStatus>> {
        let record = self.state.load()?;
        let down = crate::plan::down_networks(&self.topology, &record, &self.state, |m, spec| {
            self.provider_of(m).map_or(true, |p| p.network_up(spec))
        });
        let mut statuses = self
            .topology
            .machines
            .iter()
            .map(|machine| {
                let provider = self.provider_of(machine)?;
                let saved = record.machines.get(&machine.name);
                let observed = provider.state(&self.state.machine_dir(&machine.name));
                let state = match state_word(saved, observed) {
                    MachineState::Running if faults::paused(&record, &machine.name) => {
                        MachineState::Paused
                    }
                    state => state,
                };
                Ok(MachineStatus {
                    name: machine.name.clone(),
                    state,
                    provider: machine.provider.as_str().into(),
                    host: machine.host.clone(),
                    ssh: saved.map(|r| provider.ssh_endpoint(r.ssh_port).to_string()),
                    ips: machine.ips.clone(),
                    in_topology: true,
                    console: self.crash_console(&*provider, &machine.name, state),
                    networks_down: crate::plan::machine_networks_down(machine, &down),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (name, saved) in &record.machines {
            if self.topology.machine(name).is_some() {
                continue;
            }
            let provider = provider::for_kind(saved.provider, &self.provider_settings())?;
            let observed = provider.state(&self.state.machine_dir(name));
            let state = state_word(Some(saved), observed);
            statuses.push(MachineStatus {
                name: name.clone(),
                state,
                provider: saved.provider.as_str().into(),
                host: None,
                ssh: Some(provider.ssh_endpoint(saved.ssh_port).to_string()),
                ips: BTreeMap::new(),
                in_topology: false,
                console: self.crash_console(&*provider, name, state),
                networks_down: Vec::new(),
            });
        }
        Ok(statuses)
    }

    /// The console's last lines of a machine that crashed (else `None`).
    fn crash_console(
        &self,
        provider: &dyn Provider,
        name: &str,
        state: MachineState,
    ) -> Option<ConsoleTail> {
        if state != MachineState::Crashed {
            return None;
        }
        let layout = self.state.machine(name);
        // Best effort: the tail says when there is no log.
        let _ = provider.fetch_console(layout.path());
        let tail = layout.console_tail(CRASH_TAIL_LINES);
        Some(ConsoleTail {
            log: layout.console_log(),
            lines: tail.lines().map(str::to_owned).collect(),
        })
    }

    /// Brings `machine`'s console log into its folder (see
    /// [`Provider::fetch_console`]).
    pub fn fetch_console(&self, machine: &Machine) -> Result<()> {
        let dir = self.state.machine_dir(&machine.name);
        Ok(self.provider_of(machine)?.fetch_console(&dir)?)
    }

    /// The systemd units of `machine`'s daemons (only `daemon`'s when
    /// given), from their kits when found, else the daemon's own name.
    pub fn daemon_units(&self, machine: &Machine, daemon: Option<&str>) -> Result<Vec<String>> {
        let names: Vec<String> = match daemon {
            Some(daemon) if !machine.daemons.iter().any(|d| d == daemon) => {
                return Err(Error::UnknownDaemon {
                    machine: machine.name.clone(),
                    daemon: daemon.to_string(),
                    known: if machine.daemons.is_empty() {
                        "none".into()
                    } else {
                        machine.daemons.join(", ")
                    },
                })
            }
            Some(daemon) => vec![daemon.to_string()],
            None => machine.daemons.clone(),
        };
        let mut kits = Kits::default();
        kits.load_also(names.clone(), self.topology.dir(), &self.settings.search);
        Ok(names
            .into_iter()
            .map(|name| match kits.get(&name) {
                Some(kit) => kit.manifest.service.clone(),
                None => name,
            })
            .collect())
    }

    /// A session per machine for the checks of `verify` or a step, from
    /// the record; the kits, when they can be found, name the journals
    /// that a failed check shows.
    fn sessions(&self) -> Result<Arc<Machines>> {
        let record = self.state.load()?;
        let mut kits = Kits::default();
        let daemons = self
            .topology
            .machines
            .iter()
            .flat_map(|m| m.daemons.clone());
        kits.load_also(daemons, self.topology.dir(), &self.settings.search);
        let machines = self.machines(&record, &kits)?;
        self.prefer_control_masters(&machines, &record);
        Ok(machines)
    }

    /// Short commands ride the ControlMasters left for `testbed ssh`, where
    /// they are alive (once those `up` just started have authenticated): a
    /// key exchange costs a guest under emulation more than most checks do.
    fn prefer_control_masters(&self, machines: &Machines, record: &Record) {
        let names: Vec<String> = record.machines.keys().cloned().collect();
        ssh_config::wait_for_control_masters(&self.state, &names);
        for name in record.machines.keys() {
            machines.prefer_control_master(name, control_path(&self.state, name));
        }
    }

    /// A session pool knowing where each recorded machine's SSH is.
    fn machines(&self, record: &Record, kits: &Kits) -> Result<Arc<Machines>> {
        let machines = Machines::new(self.state.clone(), self.services(kits));
        for (name, saved) in &record.machines {
            let provider = match self.topology.machine(name) {
                Some(machine) => self.provider_of(machine)?,
                None => provider::for_kind(saved.provider, &self.provider_settings())?,
            };
            machines.set_endpoint(name, provider.ssh_endpoint(saved.ssh_port));
        }
        Ok(Arc::new(machines))
    }
}

/// Takes the testbed's lock as `access`; with `--wait` it waits for the
/// holder, saying so on stderr.
fn take_lock(state: &StateDir, access: Access, settings: &Settings) -> Result<LockGuard> {
    let on_wait =
        |holder: &str| eprintln!("waiting for {}: locked by {holder}", state.root().display());
    let wait: Option<&dyn Fn(&str)> = if settings.wait_for_lock {
        Some(&on_wait)
    } else {
        None
    };
    Ok(state.lock(access, wait)?)
}

/// Waits for every machine's task: what succeeded, by machine, and a line
/// per failure (a machine's failure never cuts the others short).
async fn join_machines<T>(
    tasks: Vec<tokio::task::JoinHandle<(String, Result<T>)>>,
) -> (Vec<(String, T)>, Vec<MachineFailure>) {
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok((name, Ok(value))) => done.push((name, value)),
            Ok((machine, Err(error))) => failures.push(MachineFailure { machine, error }),
            Err(join) => failures.push(MachineFailure {
                machine: "(a task)".into(),
                error: Error::Internal(join.to_string()),
            }),
        }
    }
    (done, failures)
}

fn all_succeeded(failures: Vec<MachineFailure>) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    Err(Error::Several(failures))
}

fn lock_record(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for every task; the first error among them (`what`: what the
/// tasks did, should one panic).
async fn first_error(
    mut tasks: tokio::task::JoinSet<Result<()>>,
    what: &'static str,
) -> Result<()> {
    let mut first = Ok(());
    while let Some(done) = tasks.join_next().await {
        let result = done.unwrap_or_else(|e| {
            Err(Error::Provider(ProviderError::Internal {
                what,
                detail: e.to_string(),
            }))
        });
        if first.is_ok() {
            first = result;
        }
    }
    first
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, ProviderError> + Send + 'static,
) -> std::result::Result<T, ProviderError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ProviderError::Internal {
            what: "a blocking provider call",
            detail: e.to_string(),
        })?
}

/// `provider.state(dir)` off the async threads: a daemon-backed provider
/// asks over a socket. An internal failure counts as still running, so it
/// is never taken for a crash.
async fn observe(provider: Arc<dyn Provider>, dir: &Path) -> VmState {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || provider.state(&dir))
        .await
        .unwrap_or(VmState::Running)
}

/// Brings the machine's console log into its folder when its provider
/// keeps it elsewhere. Best effort: it only feeds messages, which show the
/// log's path and whatever it holds.
async fn fetch_console(provider: Arc<dyn Provider>, dir: &Path) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || provider.fetch_console(&dir)).await;
}

/// What `status` says from the record and what the provider sees.
fn state_word(saved: Option<&MachineRecord>, observed: VmState) -> MachineState {
    match (saved, observed) {
        (_, VmState::Running) => MachineState::Running,
        (None, _) | (_, VmState::Absent) => MachineState::NotCreated,
        (Some(saved), VmState::Stopped) if saved.desired == Desired::Running => {
            MachineState::Crashed
        }
        (Some(_), VmState::Stopped) => MachineState::Stopped,
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(desired: Desired) -> MachineRecord {
        MachineRecord {
            provider: crate::model::ProviderKind::Qemu,
            image: "debian-12-h".into(),
            spec: "s".into(),
            ssh_port: 2222,
            desired,
            identity: None,
            daemons: BTreeMap::new(),
            artifacts: None,
            provisioned: BTreeMap::new(),
            warm_boot: false,
            unknown: Default::default(),
        }
    }

    #[test]
    fn status_words_follow_record_and_observation() {
        let running = record(Desired::Running);
        let halted = record(Desired::Stopped);
        use MachineState::*;
        assert_eq!(state_word(None, VmState::Absent), NotCreated);
        assert_eq!(state_word(Some(&running), VmState::Running), Running);
        assert_eq!(state_word(Some(&running), VmState::Stopped), Crashed);
        assert_eq!(state_word(Some(&halted), VmState::Stopped), Stopped);
        assert_eq!(state_word(Some(&halted), VmState::Absent), NotCreated);
    }
}
