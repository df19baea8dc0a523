//! The plan: what `up` will do to each machine, each daemon and the build,
//! and why, resolved once from the topology, the record, what the providers
//! see, the kits (each loaded and rendered once) and the image cache.
//! `testbed plan` prints it; `up` and `provision` carry it out and decide
//! nothing of their own (cargo's resolve-then-compile shape).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build;
use crate::identity::{self, MachineKeys, Seed};
use crate::image::{ImageError, Recipe};
use crate::kit::{Kit, KitError, Kits, RenderedFile, Secrets};
use crate::model::{Forward, Machine, Topology, GUEST_ARTIFACT_ROOT};
use crate::provider::{self, NetworkSpec, Provider, ProviderError, VmState};
use crate::provisioners;
use crate::settings::Search;
use crate::ssh;
use crate::state::{Desired, MachineDir, MachineRecord, Record, StateDir};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error("{machine}: provisioner {name}: {source}")]
    Provisioner {
        machine: String,
        name: String,
        source: crate::files::ReadError,
    },
    #[error(
        "{machine}: artifact {} is missing\n  help: the build step makes it: run `testbed build` \
         (or `testbed up`), or check `outputs` in [build]",
        path.display()
    )]
    MissingArtifact {
        machine: String,
        path: std::path::PathBuf,
    },
}

type Result<T> = std::result::Result<T, PlanError>;

/// What `up` does to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineAction {
    /// No VM: a disk from the image, boot, identity, daemons.
    Create,
    /// Stopped or crashed: boot from its disk.
    Start,
    /// Running, with something to push, restart, start or stop.
    Provision,
    Nothing,
}

/// What `up` or `provision` does to a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonAction {
    Start,
    Restart,
    /// Removed from the machine's `daemons`: its unit is stopped and disabled.
    Stop,
    Nothing,
}

impl MachineAction {
    /// The action's word, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineAction::Create => "create",
            MachineAction::Start => "start",
            MachineAction::Provision => "provision",
            MachineAction::Nothing => "nothing",
        }
    }
}

impl BuildAction {
    /// The action's word, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildAction::Run => "run",
            BuildAction::Skip => "skip",
        }
    }
}

impl DaemonAction {
    /// The action's word, as in the JSON (and the systemctl verb of `start`
    /// and `restart`).
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonAction::Start => "start",
            DaemonAction::Restart => "restart",
            DaemonAction::Stop => "stop",
            DaemonAction::Nothing => "nothing",
        }
    }

    /// The word for a line of output: "started", "restarted", …
    pub fn past_tense(self) -> &'static str {
        match self {
            DaemonAction::Start => "started",
            DaemonAction::Restart => "restarted",
            DaemonAction::Stop => "stopped",
            DaemonAction::Nothing => "unchanged",
        }
    }
}

/// Whether one of a machine's provisioners runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionerAction {
    Run,
    Nothing,
}

/// Whether the build step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildAction {
    Run,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildPlan {
    pub action: BuildAction,
    pub why: String,
}

/// The whole plan; its JSON is the contract of `plan --json`.
#[derive(Serialize)]
pub struct Plan {
    pub machines: Vec<MachinePlan>,
    pub build: Option<BuildPlan>,
    pub warnings: Vec<String>,
}

/// One machine's part of the plan, with what carrying it out needs.
#[derive(Serialize)]
pub struct MachinePlan {
    pub name: String,
    pub action: MachineAction,
    pub why: String,
    /// Where the machine's image recipe was found: its file, or `built-in`.
    pub image_source: String,
    pub daemons: Vec<DaemonPlan>,
    /// The machine's `provision` entries, in the order they run.
    pub provision: Vec<ProvisionerPlan>,
    #[serde(skip)]
    pub machine: Machine,
    #[serde(skip)]
    pub provider: Arc<dyn Provider>,
    #[serde(skip)]
    pub observed: VmState,
    /// The machine's networks that were made and are down now (a switch
    /// that died): a running machine on one is rebooted to reconnect.
    #[serde(skip)]
    pub networks_down: Vec<String>,
    /// The image a new disk is made from (its recipe, with every package).
    #[serde(skip)]
    pub recipe: Recipe,
    /// The identity seed, when the machine's keys exist already.
    #[serde(skip)]
    pub seed: Option<Seed>,
    /// Whether identity is (re)applied over SSH.
    #[serde(skip)]
    pub apply_identity: bool,
    /// Hash of the machine's own artifacts; `None` while the build that
    /// makes them is still to run.
    #[serde(skip)]
    pub artifacts: Option<String>,
    /// Whether it waits for the build (it or its kits need artifacts).
    #[serde(skip)]
    pub needs_build: bool,
}

/// One daemon's part of the plan.
#[derive(Serialize)]
pub struct DaemonPlan {
    pub name: String,
    pub action: DaemonAction,
    pub why: String,
    /// Where the kit was found: its folder, or `built-in` (`None`: a
    /// removed daemon whose kit is gone).
    pub source: Option<String>,
    /// The systemd unit (re)started or stopped.
    #[serde(skip)]
    pub service: String,
    /// The kit's files rendered for this machine (empty for `stop`).
    #[serde(skip)]
    pub rendered: Option<Rendered>,
    /// What the record will hold once it is applied; `None` until the
    /// pending build has made its artifacts.
    #[serde(skip)]
    pub hash: Option<String>,
}

/// One provisioner's part of the plan.
#[derive(Serialize)]
pub struct ProvisionerPlan {
    /// Its key in the record: its label, numbered when it is repeated.
    pub name: String,
    pub action: ProvisionerAction,
    pub why: String,
    /// Its place in the machine's `provision` list.
    #[serde(skip)]
    pub index: usize,
    /// What it runs.
    #[serde(skip)]
    pub provisioner: crate::model::Provisioner,
    /// What the record holds once it has run.
    #[serde(skip)]
    pub hash: String,
}

/// A kit rendered for one machine, with the hash of its files.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub kit: Kit,
    pub files: Vec<RenderedFile>,
    pub hash: String,
}

/// What was last applied to a machine (from its record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Daemon → [`daemon_hash`].
    pub daemons: BTreeMap<String, String>,
    /// Hash of the machine's own artifacts.
    pub artifacts: Option<String>,
    /// Provisioner key → [`provisioners::hash`] when it last ran through.
    pub provisioned: BTreeMap<String, String>,
}

impl Applied {
    pub fn of(saved: Option<&MachineRecord>) -> Applied {
        saved
            .map(|saved| Applied {
                daemons: saved.daemons.clone(),
                artifacts: saved.artifacts.clone(),
                provisioned: saved.provisioned.clone(),
            })
            .unwrap_or_default()
    }

    /// Whether a daemon whose files now hash to `hash` must be pushed again.
    pub fn differs(&self, daemon: &str, hash: &str) -> bool {
        self.daemons.get(daemon).map(String::as_str) != Some(hash)
    }
}

/// Everything the plan is resolved from.
pub struct Inputs<'a> {
    pub topology: &'a Topology,
    pub record: &'a Record,
    pub state: &'a StateDir,
    pub kits: &'a Kits,
    pub secrets: &'a Secrets,
    pub providers: &'a provider::Settings,
    pub search: &'a Search,
}

impl Plan {
    /// Resolves the plan; reads, never changes anything.
    pub fn resolve(inputs: &Inputs<'_>) -> Result<Plan> {
        let build = build_plan(inputs)?;
        let build_pending = build
            .as_ref()
            .is_some_and(|plan| plan.action == BuildAction::Run);
        let authorized = std::fs::read_to_string(ssh::public_key_path(&inputs.state.user_key()))
            .ok()
            .map(|key| key.trim().to_string());
        let down = down_networks(inputs.topology, inputs.record, inputs.state, |m, spec| {
            provider::for_machine(m, inputs.providers).map_or(true, |p| p.network_up(spec))
        });
        let mut recipes: BTreeMap<String, Recipe> = BTreeMap::new();
        // One backend per provider and host.
        let mut providers: BTreeMap<(&'static str, Option<&str>), Arc<dyn Provider>> =
            BTreeMap::new();
        let mut warnings = Vec::new();
        let mut machines = Vec::new();
        for machine in &inputs.topology.machines {
            let backend = (machine.provider.as_str(), machine.host.as_deref());
            let provider = match providers.get(&backend) {
                Some(provider) => provider.clone(),
                None => {
                    let made: Arc<dyn Provider> =
                        Arc::from(provider::for_machine(machine, inputs.providers)?);
                    providers.insert(backend, made.clone());
                    made
                }
            };
            let base = match recipes.get(&machine.image) {
                Some(recipe) => recipe.clone(),
                None => {
                    let recipe =
                        Recipe::find(&machine.image, inputs.topology.dir(), inputs.search)?;
                    recipes.insert(machine.image.clone(), recipe.clone());
                    recipe
                }
            };
            let mut packages = machine.packages.clone();
            packages.extend(inputs.kits.packages(machine));
            let resolver = MachineResolver {
                inputs,
                machine,
                provider,
                recipe: base.with_packages(&packages),
                build_pending,
                authorized: authorized.as_deref(),
                down: &down,
            };
            let plan = resolver.resolve()?;
            warnings.extend(resolver.drift(&plan));
            machines.push(plan);
        }
        Ok(Plan {
            machines,
            build,
            warnings,
        })
    }

    /// Whether `up` has nothing to do.
    pub fn converged(&self) -> bool {
        self.machines
            .iter()
            .all(|m| m.action == MachineAction::Nothing)
            && self
                .build
                .as_ref()
                .is_none_or(|b| b.action == BuildAction::Skip)
    }

    pub fn machine(&self, name: &str) -> Option<&MachinePlan> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// The first provisioner to run that needs `ansible-playbook`, with its
    /// machine, among the machines named (all when `None`): checked before
    /// any machine starts.
    pub fn first_playbook(&self, names: Option<&[String]>) -> Option<(&str, &str)> {
        let chosen = |name: &String| names.is_none_or(|names| names.contains(name));
        self.machines
            .iter()
            .filter(|m| chosen(&m.name))
            .find_map(|machine| {
                machine
                    .provision
                    .iter()
                    .find(|p| {
                        p.action == ProvisionerAction::Run
                            && matches!(
                                p.provisioner.run,
                                crate::model::ProvisionRun::Ansible { .. }
                            )
                    })
                    .map(|p| (machine.name.as_str(), p.name.as_str()))
            })
    }

    /// Runs every provisioner of the machines named (`provision --force`),
    /// whatever the record says.
    pub fn force_provisioners(&mut self, names: &[String]) {
        for machine in &mut self.machines {
            if !names.contains(&machine.name) || machine.provision.is_empty() {
                continue;
            }
            for provisioner in &mut machine.provision {
                provisioner.action = ProvisionerAction::Run;
                provisioner.why = "--force".into();
            }
            if machine.action == MachineAction::Nothing {
                machine.action = MachineAction::Provision;
                machine.why = "running; its provisioners run again (--force)".into();
            }
        }
    }
}

impl MachinePlan {
    /// Whether `up` boots it (from a new disk or its own).
    pub fn boots(&self) -> bool {
        matches!(self.action, MachineAction::Create | MachineAction::Start)
    }
}

/// The plan of one machine.
struct MachineResolver<'a> {
    inputs: &'a Inputs<'a>,
    machine: &'a Machine,
    provider: Arc<dyn Provider>,
    recipe: Recipe,
    build_pending: bool,
    authorized: Option<&'a str>,
    /// The networks of the testbed that are down (their switch died).
    down: &'a BTreeSet<String>,
}

impl MachineResolver<'_> {
    fn saved(&self) -> Option<&MachineRecord> {
        self.inputs.record.machines.get(&self.machine.name)
    }

    fn resolve(&self) -> Result<MachinePlan> {
        let machine = self.machine;
        let layout = self.inputs.state.machine(&machine.name);
        let observed = self.provider.state(layout.path());
        let seed = self.seed(&layout)?;
        let needs_build = self.inputs.topology.build.is_some()
            && (!machine.artifacts.is_empty()
                || self
                    .inputs
                    .kits
                    .of(machine)
                    .any(|kit| !kit.manifest.artifacts.is_empty()));
        let hashes_known = !(self.build_pending && needs_build);
        let artifacts = if machine.artifacts.is_empty() || !hashes_known {
            None
        } else {
            Some(artifacts_hash(
                self.inputs.topology,
                &machine.name,
                &machine.artifacts,
            )?)
        };
        let networks_down = machine_networks_down(machine, self.down);
        let (action, why, apply_identity) = match self.machine_action(observed, seed.as_ref()) {
            _ if observed == VmState::Running
                && self.saved().is_some()
                && !networks_down.is_empty() =>
            {
                (
                    MachineAction::Start,
                    format!(
                        "network {} lost its switch: it is restarted, and the machine rebooted \
                     from its disk to reconnect",
                        networks_down.join(", ")
                    ),
                    true,
                )
            }
            decided => decided,
        };
        // A new disk has nothing on it yet, whatever the record says.
        let applied = match action {
            MachineAction::Create => Applied::default(),
            _ => Applied::of(self.saved()),
        };
        let mut daemons = self.stops(action, &applied);
        for kit in self.inputs.kits.of(machine) {
            daemons.push(self.daemon_plan(kit, action, &applied, hashes_known)?);
        }
        let provision = self.provisioner_plans(action, &applied)?;
        let mut plan = MachinePlan {
            name: machine.name.clone(),
            action,
            why,
            image_source: self.recipe.found_at(),
            daemons,
            provision,
            machine: machine.clone(),
            provider: self.provider.clone(),
            observed,
            networks_down,
            recipe: self.recipe.clone(),
            seed,
            apply_identity,
            artifacts,
            needs_build,
        };
        if plan.action == MachineAction::Nothing {
            if let Some(why) = self.provisioning_needed(&plan, &applied) {
                plan.action = MachineAction::Provision;
                plan.why = why;
            }
        }
        Ok(plan)
    }

    /// The seed when the machine's keys and the user key exist; a machine
    /// without them has never been created.
    fn seed(&self, layout: &MachineDir) -> Result<Option<Seed>> {
        let Some(authorized) = self.authorized else {
            return Ok(None);
        };
        let seed = machine_seed(
            self.inputs.topology,
            self.machine,
            &*self.provider,
            layout,
            authorized,
        )?;
        Ok(seed)
    }

    /// The machine's action from what the provider sees and the record says;
    /// `Nothing` here may still become `Provision` for its daemons.
    fn machine_action(
        &self,
        observed: VmState,
        seed: Option<&Seed>,
    ) -> (MachineAction, String, bool) {
        let saved = self.saved();
        match (saved, observed) {
            (Some(_), VmState::Absent) => (
                MachineAction::Create,
                "its VM is gone: a new disk, boot, identity".into(),
                true,
            ),
            (None, VmState::Absent) => (
                MachineAction::Create,
                "no VM yet: a new disk, boot, identity".into(),
                true,
            ),
            (Some(saved), VmState::Stopped) if saved.desired == Desired::Running => (
                MachineAction::Start,
                "crashed (no VM process runs): boots from its disk".into(),
                true,
            ),
            (_, VmState::Stopped) => (
                MachineAction::Start,
                "stopped: boots from its disk".into(),
                true,
            ),
            (None, VmState::Running) => (
                MachineAction::Provision,
                "runs, but this testbed has no record of it".into(),
                true,
            ),
            (Some(saved), VmState::Running) if saved.warm_boot => (
                MachineAction::Start,
                "running with its template's identity (an earlier up stopped during its warm \
                 boot): boots from its disk"
                    .into(),
                true,
            ),
            (Some(saved), VmState::Running) => {
                let current = seed.map(|s| s.hash.as_str());
                if saved.identity.is_none() {
                    (
                        MachineAction::Provision,
                        "running, identity not applied yet (an earlier up stopped)".into(),
                        true,
                    )
                } else if saved.identity.as_deref() != current {
                    (
                        MachineAction::Provision,
                        "running, identity changed (hostname, hosts, addresses or keys): \
                         re-applied over SSH"
                            .into(),
                        true,
                    )
                } else if saved.desired != Desired::Running {
                    (
                        MachineAction::Provision,
                        "running, though last halted".into(),
                        true,
                    )
                } else {
                    (MachineAction::Nothing, "running, converged".into(), false)
                }
            }
        }
    }

    /// Daemons the record has that the machine no longer runs.
    fn stops(&self, action: MachineAction, applied: &Applied) -> Vec<DaemonPlan> {
        if action == MachineAction::Create {
            return Vec::new();
        }
        applied
            .daemons
            .keys()
            .filter(|daemon| !self.machine.daemons.contains(daemon))
            .map(|daemon| DaemonPlan {
                name: daemon.clone(),
                action: DaemonAction::Stop,
                why: "removed from the machine's daemons: stopped and disabled".into(),
                source: self
                    .inputs
                    .kits
                    .get(daemon)
                    .map(|kit| kit.origin().to_string()),
                service: self
                    .inputs
                    .kits
                    .get(daemon)
                    .map(|kit| kit.manifest.service.clone())
                    .unwrap_or_else(|| daemon.clone()),
                rendered: None,
                hash: None,
            })
            .collect()
    }

    fn daemon_plan(
        &self,
        kit: &Kit,
        action: MachineAction,
        applied: &Applied,
        hashes_known: bool,
    ) -> Result<DaemonPlan> {
        let files = kit.render(self.inputs.topology, self.machine, self.inputs.secrets)?;
        let rendered = Rendered {
            hash: files_hash(kit, &files),
            kit: kit.clone(),
            files,
        };
        let needs_artifacts = !kit.manifest.artifacts.is_empty();
        let hash = if needs_artifacts && !hashes_known {
            None
        } else {
            Some(daemon_hash(
                self.inputs.topology,
                &self.machine.name,
                &rendered,
            )?)
        };
        let recorded = applied.daemons.contains_key(&kit.name);
        let differs = hash
            .as_deref()
            .is_none_or(|hash| applied.differs(&kit.name, hash));
        let (daemon_action, why) = match action {
            MachineAction::Create => (DaemonAction::Start, "on the new machine"),
            MachineAction::Start => (DaemonAction::Start, "starts again with the machine"),
            _ if hash.is_none() && recorded => (
                DaemonAction::Restart,
                "the build runs first: restarted if its artifacts change",
            ),
            _ if !recorded => (DaemonAction::Start, "added to the machine"),
            _ if differs => (
                DaemonAction::Restart,
                "its rendered files or artifacts changed",
            ),
            _ => (DaemonAction::Nothing, "unchanged"),
        };
        Ok(DaemonPlan {
            name: kit.name.clone(),
            action: daemon_action,
            why: why.into(),
            source: Some(kit.origin().to_string()),
            service: kit.manifest.service.clone(),
            rendered: Some(rendered),
            hash,
        })
    }

    /// Each provisioner runs on a new machine, and again when its hash
    /// differs from the one recorded when it last ran through.
    fn provisioner_plans(
        &self,
        action: MachineAction,
        applied: &Applied,
    ) -> Result<Vec<ProvisionerPlan>> {
        let machine = self.machine;
        let keys = provisioners::keys(machine);
        let mut plans = Vec::new();
        for (index, (provisioner, name)) in machine.provision.iter().zip(keys).enumerate() {
            let hash = provisioners::hash(self.inputs.topology, machine, provisioner).map_err(
                |source| PlanError::Provisioner {
                    machine: machine.name.clone(),
                    name: name.clone(),
                    source,
                },
            )?;
            let (action, why) = match applied.provisioned.get(&name) {
                _ if action == MachineAction::Create => {
                    (ProvisionerAction::Run, "on the new machine")
                }
                None => (
                    ProvisionerAction::Run,
                    "has not run through on this machine yet",
                ),
                Some(ran) if *ran != hash => (
                    ProvisionerAction::Run,
                    "its script, playbook or inputs changed since it last ran",
                ),
                Some(_) => (ProvisionerAction::Nothing, "unchanged since it last ran"),
            };
            plans.push(ProvisionerPlan {
                name,
                action,
                why: why.into(),
                index,
                provisioner: provisioner.clone(),
                hash,
            });
        }
        Ok(plans)
    }

    /// Why a running, converged machine still needs provisioning, if it does.
    fn provisioning_needed(&self, plan: &MachinePlan, applied: &Applied) -> Option<String> {
        let changed: Vec<String> = plan
            .daemons
            .iter()
            .filter(|daemon| daemon.action != DaemonAction::Nothing)
            .map(|daemon| format!("{} {}", daemon.name, daemon.action.as_str()))
            .collect();
        if !changed.is_empty() {
            return Some(format!("running; daemons: {}", changed.join(", ")));
        }
        let runs: Vec<&str> = plan
            .provision
            .iter()
            .filter(|p| p.action == ProvisionerAction::Run)
            .map(|p| p.name.as_str())
            .collect();
        if !runs.is_empty() {
            return Some(format!("running; provisioners to run: {}", runs.join(", ")));
        }
        let artifacts_current = plan.machine.artifacts.is_empty()
            || (plan.artifacts.is_some() && plan.artifacts == applied.artifacts);
        if !artifacts_current {
            return Some("running; its artifacts changed: pushed again".into());
        }
        let stale = plan.machine.artifacts.is_empty() && applied.artifacts.is_some();
        stale.then(|| "running; its artifacts were dropped from the record".into())
    }

    /// What a running machine does not get without a reboot or a rebuild,
    /// in a user's words.
    fn drift(&self, plan: &MachinePlan) -> Vec<String> {
        let Some(saved) = self.saved() else {
            return Vec::new();
        };
        let name = &self.machine.name;
        let mut warnings = Vec::new();
        if plan.observed == VmState::Running
            && saved.spec != hardware_hash(self.inputs.topology, self.machine)
        {
            warnings.push(format!(
                "{name}: cpus, memory, networks, forwards or internet changed; `testbed halt {name}` then `testbed up` applies them"
            ));
        }
        let current = self.recipe.key();
        if plan.observed != VmState::Absent && saved.image != current {
            warnings.push(format!(
                "{name}: keeps image {} (the recipe now builds {current}); `testbed destroy` and `up` to use it",
                saved.image
            ));
        }
        warnings
    }
}

/// The identity seed of `machine` from its keys in `layout`, `None` while
/// it has none (it was never created): what `plan` compares and `up` applies.
pub fn machine_seed(
    topology: &Topology,
    machine: &Machine,
    provider: &dyn Provider,
    layout: &MachineDir,
    authorized_key: &str,
) -> std::result::Result<Option<Seed>, identity::IdentityError> {
    let Some(keys) = MachineKeys::load(layout) else {
        return Ok(None);
    };
    let management = provider.management(&identity::mac_address(
        &machine.name,
        identity::MANAGEMENT_NIC,
    ));
    identity::build_seed(topology, machine, &keys, authorized_key, &management).map(Some)
}

fn build_plan(inputs: &Inputs<'_>) -> Result<Option<BuildPlan>> {
    let Some(build) = &inputs.topology.build else {
        return Ok(None);
    };
    let recorded = inputs.record.build.as_deref();
    let current = build::is_current(build, inputs.topology.dir(), recorded)?;
    let (action, why) = match (current, recorded) {
        (true, _) => (BuildAction::Skip, "inputs unchanged since the last build"),
        (false, None) => (BuildAction::Run, "not built yet"),
        (false, Some(_)) => (
            BuildAction::Run,
            "inputs changed, or outputs missing, since the last build",
        ),
    };
    Ok(Some(BuildPlan {
        action,
        why: why.into(),
    }))
}

/// The VM hardware that needs a reboot to change: cpus, memory, NICs,
/// forwards. Recorded at boot; a running machine whose hash differs drifts.
pub fn hardware_hash(topology: &Topology, machine: &Machine) -> String {
    let nics: Vec<(String, String)> = identity::static_nics(topology, machine)
        .into_iter()
        .map(|(network, nic)| (network, nic.mac))
        .collect();
    hardware_hash_of(
        machine.cpus,
        machine.memory_mib,
        &nics,
        &machine.forwards,
        machine.internet,
    )
}

/// The networks of the record that are down now, each asked once of the
/// provider of a machine on it (`up`).
pub fn down_networks(
    topology: &Topology,
    record: &Record,
    state: &StateDir,
    up: impl Fn(&Machine, &NetworkSpec) -> bool,
) -> BTreeSet<String> {
    record
        .networks
        .keys()
        .filter(|network| {
            let Some(machine) = topology
                .machines
                .iter()
                .find(|m| m.ips.contains_key(*network))
            else {
                return false;
            };
            let spec = NetworkSpec {
                name: network.to_string(),
                dir: state.network_dir(network),
                across_hosts: topology.spans_hosts(network),
            };
            !up(machine, &spec)
        })
        .cloned()
        .collect()
}

/// Which of `down` the machine is on.
pub fn machine_networks_down(machine: &Machine, down: &BTreeSet<String>) -> Vec<String> {
    machine
        .ips
        .keys()
        .filter(|n| down.contains(*n))
        .cloned()
        .collect()
}

/// [`hardware_hash`] from its parts (what a booting VM is given).
pub fn hardware_hash_of(
    cpus: u32,
    memory_mib: u64,
    nics: &[(String, String)],
    forwards: &[Forward],
    internet: bool,
) -> String {
    let nics: Vec<(&str, &str)> = nics
        .iter()
        .map(|(network, mac)| (network.as_str(), mac.as_str()))
        .collect();
    let mut text = format!("{cpus}|{memory_mib}|{nics:?}|{forwards:?}");
    // Only when set, so machines made before `internet` existed keep their hash.
    if internet {
        text.push_str("|internet");
    }
    hex::encode(Sha256::digest(text))[..16].to_string()
}

/// What decides whether a daemon must restart: its rendered files and the
/// contents of its kit's artifacts in `dist/`.
pub fn daemon_hash(topology: &Topology, machine: &str, rendered: &Rendered) -> Result<String> {
    let artifacts = &rendered.kit.manifest.artifacts;
    if artifacts.is_empty() {
        return Ok(rendered.hash.clone());
    }
    Ok(format!(
        "{}-{}",
        rendered.hash,
        artifacts_hash(topology, machine, artifacts)?
    ))
}

/// A hash of the contents of `artifacts` (paths under `dist/`).
pub fn artifacts_hash(topology: &Topology, machine: &str, artifacts: &[String]) -> Result<String> {
    let mut hasher = Sha256::new();
    for artifact in artifacts {
        let path = topology.dir().join(artifact);
        let bytes = std::fs::read(&path).map_err(|_| PlanError::MissingArtifact {
            machine: machine.to_string(),
            path: path.clone(),
        })?;
        hasher.update(artifact.as_bytes());
        hasher.update(Sha256::digest(&bytes));
    }
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}

/// The guest path of artifact `dist/X`.
pub fn guest_artifact_path(artifact: &str) -> String {
    format!("{GUEST_ARTIFACT_ROOT}/{artifact}")
}

fn files_hash(kit: &Kit, files: &[RenderedFile]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kit.manifest.service.as_bytes());
    for file in files {
        hasher.update(file.dest.as_bytes());
        hasher.update(file.mode.to_le_bytes());
        hasher.update(file.owner.as_bytes());
        hasher.update(file.contents.as_bytes());
    }
    hex::encode(hasher.finalize())[..16].to_string()
}
