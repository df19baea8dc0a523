//! `up` and `provision`: images, networks, boot, identity, then each machine's daemons.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::build::BuildOutcome;
use crate::check;
use crate::identity::{self, MachineKeys, Seed};
use crate::image::{BuiltImage, Cache, Recipe};
use crate::model::Topology;
use crate::plan::{
    self, Applied, BuildAction, DaemonAction, MachineAction, MachinePlan, Plan, ProvisionerAction,
};
use crate::progress::{Progress, Task};
use crate::provider::{NetworkSpec, NicSpec, Provider, ProviderError, VmSpec, VmState};
use crate::provision::{self, Gate, Machines, Outcome, Provisioned, ProvisionerOutcome, Readiness};
use crate::ssh::{self, Session, SshError, Target};
use crate::state::{Access, Desired, MachineDir, MachineRecord, Record, StateDir, StateError};

use super::green::{GreenRestored, GreenSaved};
use super::ssh_config::{start_control_masters, write_ssh_config};
use super::steps::spawn_build;
use super::warm::{warm_identity_command, Fresh, Template};
use super::{
    all_succeeded, blocking, fetch_console, first_line, join_machines, lock_record, observe, Error,
    MachineFailure, Result, Testbed,
};

/// How long a cold boot may take to reach SSH (software emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What `up` did: the plan it carried out, and what each machine and
/// daemon went through.
pub struct UpReport {
    pub plan: Arc<Plan>,
    /// What was done to each machine `up` acted on.
    pub machines: BTreeMap<String, MachineAction>,
    /// What happened to each daemon that was provisioned.
    pub daemons: Vec<Outcome>,
    /// What happened with each provisioner of the machines provisioned.
    pub provisioners: Vec<ProvisionerOutcome>,
    /// The topology's checks, run last when anything changed.
    pub checks: Option<check::Report>,
    /// What the build step did, when the topology has one.
    pub build: Option<BuildOutcome>,
    /// What the green cache did, when `up` started from nothing.
    pub green: Option<GreenOutcome>,
    /// The machines that resumed a template instead of booting cold, each
    /// with the template's description.
    pub warm: BTreeMap<String, String>,
    /// The templates this `up` made (description, seconds it took).
    pub templates_made: Vec<(String, f64)>,
}

/// How `up` goes about its work.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpOptions {
    /// How many machines boot at once (until SSH answers with their
    /// identity applied); `None` boots them all at once.
    pub boot_jobs: Option<usize>,
    /// Boot and provision even when the green cache has this cluster (and
    /// save it anew once green).
    pub fresh: bool,
    /// Boot fresh machines cold instead of from a template.
    pub cold: bool,
}

/// The green cache's part in an `up` from nothing.
#[derive(Debug)]
pub enum GreenOutcome {
    /// The cluster came from the cache instead of boots and provisioning.
    Restored(GreenRestored),
    /// The cluster was booted, provisioned, green, and saved.
    Saved(GreenSaved),
    /// It was booted, provisioned and green, but could not be saved.
    NotSaved(String),
}

impl UpReport {
    /// The report of an `up` the green cache answered: every machine made.
    fn restored(mut self, restored: GreenRestored) -> UpReport {
        for machine in &self.plan.machines {
            self.machines
                .insert(machine.name.clone(), MachineAction::Create);
        }
        self.checks = Some(restored.checks.clone());
        self.green = Some(GreenOutcome::Restored(restored));
        self
    }

    /// Machines `up` acted on, in file order.
    pub fn changed(&self) -> Vec<String> {
        self.machines_where(|action| action != MachineAction::Nothing)
    }

    /// Machines that were converged already.
    pub fn unchanged(&self) -> Vec<String> {
        self.machines_where(|action| action == MachineAction::Nothing)
    }

    fn machines_where(&self, keep: impl Fn(MachineAction) -> bool) -> Vec<String> {
        self.plan
            .machines
            .iter()
            .filter(|m| keep(self.done_to(&m.name)))
            .map(|m| m.name.clone())
            .collect()
    }

    fn done_to(&self, machine: &str) -> MachineAction {
        self.machines
            .get(machine)
            .copied()
            .unwrap_or(MachineAction::Nothing)
    }

    /// The plan's shape (`plan --json`) with each machine's and daemon's
    /// action as it was carried out.
    pub fn done(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&*self.plan).unwrap_or_default();
        if let Some(build) = &self.build {
            let action = match build {
                BuildOutcome::Skipped => BuildAction::Skip,
                BuildOutcome::Built { .. } => BuildAction::Run,
            };
            value["build"]["action"] = serde_json::json!(action);
        }
        let Some(machines) = value["machines"].as_array_mut() else {
            return value;
        };
        for machine in machines {
            let name = machine["name"].as_str().unwrap_or_default().to_string();
            machine["action"] = serde_json::json!(self.done_to(&name));
            let Some(daemons) = machine["daemons"].as_array_mut() else {
                continue;
            };
            for daemon in daemons {
                let done = self
                    .daemons
                    .iter()
                    .find(|o| o.machine == name && daemon["name"] == o.daemon.as_str())
                    .map(|o| o.action)
                    .unwrap_or(DaemonAction::Nothing);
                daemon["action"] = serde_json::json!(done);
            }
            let Some(provisioners) = machine["provision"].as_array_mut() else {
                continue;
            };
            for provisioner in provisioners {
                let done = self
                    .provisioners
                    .iter()
                    .find(|o| o.machine == name && provisioner["name"] == o.provisioner.as_str())
                    .map(|o| o.action)
                    .unwrap_or(ProvisionerAction::Nothing);
                provisioner["action"] = serde_json::json!(done);
            }
        }
        value
    }
}

impl Testbed {
    /// Carries out the plan: builds missing images, boots what is not
    /// running, applies identities, provisions daemons. A converged testbed
    /// is left alone. From nothing, the green cache's copy of the cluster
    /// is restored when it has one, and saved once green when not.
    pub async fn up(&self, progress: &Progress, options: UpOptions) -> Result<UpReport> {
        let kits = self.kits()?;
        self.check_build(&kits)?;
        self.state.create()?;
        let _lock = self.lock(Access::Exclusive)?;
        let mut record = self.state.load()?;
        let resumed = self.resume_paused(&record).await?;
        if !resumed.is_empty() {
            resumed.iter().for_each(|line| progress.println(line));
            record = self.state.load()?;
        }
        let from_nothing = record.machines.is_empty();
        record.topology = self.topology.path.clone();
        ensure_user_key(&self.state)?;
        let secrets = self.state.secrets(&kits.secret_names(&self.topology))?;
        let plan = Arc::new(self.resolve(&record, &kits, &secrets)?);
        provision::check_tools(&plan, None)?;
        for warning in &plan.warnings {
            progress.println(&format!("warning: {warning}"));
        }
        let mut report = UpReport {
            plan: plan.clone(),
            machines: BTreeMap::new(),
            daemons: Vec::new(),
            provisioners: Vec::new(),
            checks: None,
            build: None,
            green: None,
            warm: BTreeMap::new(),
            templates_made: Vec::new(),
        };
        let build_current = plan
            .build
            .as_ref()
            .is_none_or(|b| b.action == BuildAction::Skip);
        if plan.converged() {
            report.build = self.topology.build.as_ref().map(|_| BuildOutcome::Skipped);
            return Ok(report);
        }
        let green_max = if from_nothing {
            self.green_max_for(&plan)?
        } else {
            None
        };
        let cached = green_max
            .filter(|_| !options.fresh)
            .and_then(|_| self.green_key_for(&plan, &kits, progress))
            .and_then(|key| self.green_cache().lookup(&key));
        if let Some(entry) = cached {
            match self.restore_green(&entry).await {
                Ok(restored) => return Ok(report.restored(restored)),
                Err(e) => {
                    progress.println(&format!(
                        "green cache: restoring {} failed, booting afresh: {}",
                        entry.info.key,
                        first_line(&e.to_string())
                    ));
                    self.undo_green().await?;
                    record = self.state.load()?;
                }
            }
        }
        let images = self.ensure_images(&plan, &record, progress).await?;
        self.accelerator(&plan, &images, progress);
        self.ensure_networks(&plan, &mut record)?;
        self.state.save(&record)?;
        let machines = self.machines(&record, &kits)?;
        let readiness = Arc::new(Readiness::new(&self.topology));
        for converged in plan
            .machines
            .iter()
            .filter(|m| m.action == MachineAction::Nothing)
        {
            readiness.set(&Gate::Daemons(converged.name.clone()), true);
            readiness.set(&Gate::Reachable(converged.name.clone()), true);
        }
        let booting = plan.machines.iter().filter(|m| m.boots()).count();
        let ctx = UpContext {
            state: self.state.clone(),
            record: Arc::new(Mutex::new(record)),
            machines: machines.clone(),
            readiness,
            topology: Arc::new(self.topology.clone()),
            boots: Arc::new(Semaphore::new(
                options
                    .boot_jobs
                    .unwrap_or_else(|| default_boot_jobs(booting))
                    .max(1),
            )),
        };
        // Everything that can fail before a machine starts is done for all
        // of them first: an error here leaves no task running.
        let mut work = Vec::new();
        for (index, machine) in plan.machines.iter().enumerate() {
            if machine.action == MachineAction::Nothing {
                continue;
            }
            let boot = match images.get(&machine.name) {
                Some(image) => Some(self.vm_spec(machine, image.clone(), &ctx)?),
                None => None,
            };
            work.push((index, boot, self.ssh_target(&machine.machine, 0)?));
        }
        let build_task = spawn_build(&ctx, build_current, progress);
        let mut templates = if options.cold {
            BTreeMap::new()
        } else {
            self.warm_templates(&fresh_machines(&plan, &work), progress)
                .await
        };
        report.templates_made = made_now(&templates);
        let mut tasks = Vec::new();
        for (index, boot, target) in work {
            let task = progress.task(&plan.machines[index].name);
            let ctx = ctx.clone();
            let plan = plan.clone();
            let warm = templates.remove(&plan.machines[index].name);
            tasks.push(tokio::spawn(async move {
                let machine = &plan.machines[index];
                let name = machine.name.clone();
                let result = up_machine(machine, boot, warm, target, &ctx, &task).await;
                ctx.readiness
                    .set(&Gate::Daemons(name.clone()), result.is_ok());
                ctx.readiness.settle(&Gate::Reachable(name.clone()), false);
                match &result {
                    Ok(_) => task.finish("ready"),
                    Err(e) => task.finish(&format!("failed: {}", first_line(&e.to_string()))),
                }
                (name, result)
            }));
        }
        let (done, mut failures) = join_machines(tasks).await;
        for (name, (action, provisioned, warm)) in done {
            if let Some(label) = warm {
                report.warm.insert(name.clone(), label);
            }
            report.machines.insert(name, action);
            report.daemons.extend(provisioned.daemons);
            report.provisioners.extend(provisioned.provisioners);
        }
        match build_task {
            Some(task) => match task.await {
                Ok(Ok(outcome)) => report.build = Some(outcome),
                Ok(Err(e)) => failures.push(MachineFailure::build(e)),
                Err(e) => failures.push(MachineFailure::build(Error::Internal(e.to_string()))),
            },
            None => report.build = self.topology.build.as_ref().map(|_| BuildOutcome::Skipped),
        }
        write_ssh_config(&self.state, &self.topology.name, &machines.endpoints())?;
        if failures.is_empty() && !self.topology.checks.is_empty() {
            let checks =
                check::run_all(&self.topology.checks, &self.topology, machines.clone()).await;
            report.checks = Some(checks);
        }
        machines.close().await;
        start_control_masters(&self.state, &report.changed());
        all_succeeded(failures)?;
        let green = report.checks.as_ref().is_none_or(|c| c.passed());
        if let Some(max_size) = green_max.filter(|_| green) {
            // The key again: the images exist now.
            if let Some(key) = self.green_key_for(&plan, &kits, progress) {
                report.green = Some(match self.save_green(&key, max_size).await {
                    Ok(saved) => GreenOutcome::Saved(saved),
                    Err(e) => GreenOutcome::NotSaved(first_line(&e.to_string()).to_string()),
                });
            }
        }
        Ok(report)
    }

    /// Re-renders and pushes the kits of `names` (or all machines), as the
    /// plan says: restarts the daemons whose files changed, starts those not
    /// running, stops those removed, leaves the rest alone; runs the
    /// provisioners that changed, or all of them when `force`.
    pub async fn provision(
        &self,
        names: &[String],
        force: bool,
        progress: &Progress,
    ) -> Result<Provisioned> {
        let _lock = self.lock(Access::Exclusive)?;
        let selected = self.select(names)?;
        let kits = self.kits()?;
        let record = self.state.load()?;
        let secrets = self.state.secrets(&kits.secret_names(&self.topology))?;
        let mut plan = self.resolve(&record, &kits, &secrets)?;
        let names: Vec<String> = selected.iter().map(|m| m.name.clone()).collect();
        if force {
            plan.force_provisioners(&names);
        }
        provision::check_tools(&plan, Some(&names))?;
        let plan = Arc::new(plan);
        let machines = self.machines(&record, &kits)?;
        self.prefer_control_masters(&machines, &record);
        let readiness = Arc::new(Readiness::new(&self.topology));
        for machine in &self.topology.machines {
            if !selected.iter().any(|m| m.name == machine.name) {
                readiness.set(&Gate::Daemons(machine.name.clone()), true);
            }
        }
        // `provision` pushes `dist/` as it is; `build` or `up` remake it.
        readiness.set(&Gate::Build, true);
        let ctx = UpContext {
            state: self.state.clone(),
            record: Arc::new(Mutex::new(record)),
            machines: machines.clone(),
            readiness,
            topology: Arc::new(self.topology.clone()),
            boots: Arc::new(Semaphore::new(1)),
        };
        let mut tasks = Vec::new();
        for machine in selected {
            let Some(index) = plan.machines.iter().position(|m| m.name == machine.name) else {
                continue;
            };
            let ctx = ctx.clone();
            let task = progress.task(&machine.name);
            let plan = plan.clone();
            tasks.push(tokio::spawn(async move {
                let result = provision_and_record(&plan.machines[index], &ctx, &task).await;
                ctx.readiness
                    .set(&Gate::Daemons(machine.name.clone()), result.is_ok());
                task.finish(if result.is_ok() {
                    "provisioned"
                } else {
                    "failed"
                });
                (machine.name, result)
            }));
        }
        let (done, failures) = join_machines(tasks).await;
        machines.close().await;
        let mut all = Provisioned::default();
        for (_, provisioned) in done {
            all.daemons.extend(provisioned.daemons);
            all.provisioners.extend(provisioned.provisioners);
        }
        all_succeeded(failures).map(|()| all)
    }

    /// Builds what `up` would build of the topology's images (kits'
    /// packages included), without booting: each recipe once, a cached one
    /// not at all. Returns every image the topology's machines boot.
    pub async fn build_images(&self, progress: &Progress) -> Result<Vec<BuiltImage>> {
        let (plan, _) = self.plan()?;
        let mut images: BTreeMap<String, BuiltImage> = BTreeMap::new();
        for recipe in plan.machines.iter().map(|machine| &machine.recipe) {
            if images.contains_key(&recipe.key()) {
                continue;
            }
            let image = match self.cache.lookup(recipe) {
                Some(image) => image,
                None => {
                    let task = progress.task(&format!("image {}", recipe.key()));
                    build_image(&self.cache, recipe, task).await?
                }
            };
            images.insert(recipe.key(), image);
        }
        Ok(images.into_values().collect())
    }

    /// The image each booting machine boots, by machine name: a new disk's
    /// from its recipe (built once per distinct recipe), a resumed disk's
    /// the one it was made from (an overlay must keep its base).
    async fn ensure_images(
        &self,
        plan: &Plan,
        record: &Record,
        progress: &Progress,
    ) -> Result<BTreeMap<String, BuiltImage>> {
        let mut built: BTreeMap<String, BuiltImage> = BTreeMap::new();
        let mut images = BTreeMap::new();
        for machine in plan.machines.iter().filter(|m| m.boots()) {
            let recipe = &machine.recipe;
            let saved = record.machines.get(&machine.name);
            if let Some(saved) =
                saved.filter(|s| machine.observed != VmState::Absent && s.image != recipe.key())
            {
                let image =
                    self.cache
                        .lookup_key(&saved.image)
                        .ok_or_else(|| Error::BaseImageGone {
                            machine: machine.name.clone(),
                            image: saved.image.clone(),
                        })?;
                images.insert(machine.name.clone(), image);
                continue;
            }
            let image = match built
                .get(&recipe.key())
                .cloned()
                .or_else(|| self.cache.lookup(recipe))
            {
                Some(image) => image,
                None => {
                    let task = progress.task(&format!("image {}", recipe.key()));
                    build_image(&self.cache, recipe, task).await?
                }
            };
            built.insert(recipe.key(), image.clone());
            images.insert(machine.name.clone(), image);
        }
        Ok(images)
    }

    /// The accelerator the machines will boot with (each provider decides
    /// at `start`); said once, when the provider's probe runs.
    fn accelerator(&self, plan: &Plan, images: &BTreeMap<String, BuiltImage>, progress: &Progress) {
        let Some((machine, image)) = plan
            .machines
            .iter()
            .find_map(|m| images.get(&m.name).map(|image| (m, image)))
        else {
            return;
        };
        let accelerator = machine.provider.accelerator(&image.kernel);
        if accelerator.fresh {
            progress.println(&format!(
                "accelerator: {}: {}",
                accelerator.name, accelerator.reason
            ));
        }
    }

    /// Brings up every network of the machines `up` acts on.
    fn ensure_networks(&self, plan: &Plan, record: &mut Record) -> Result<()> {
        let mut done = std::collections::BTreeSet::new();
        for machine in plan
            .machines
            .iter()
            .filter(|m| m.action != MachineAction::Nothing)
        {
            for network in machine.machine.ips.keys() {
                if !done.insert(network.clone()) {
                    continue;
                }
                let kind = machine.machine.provider;
                match record.networks.get(network) {
                    Some(made_by) if *made_by != kind => {
                        return Err(Error::NetworkProvider {
                            network: network.clone(),
                            made_by: made_by.as_str(),
                            machine: machine.name.clone(),
                            wanted: kind.as_str(),
                        })
                    }
                    _ => {}
                }
                // Recorded first: a killed `up` leaves nothing `destroy`
                // does not know of.
                record.networks.insert(network.clone(), kind);
                self.state.save(record)?;
                machine
                    .provider
                    .ensure_network(&self.network_spec(network))?;
            }
        }
        Ok(())
    }

    /// What the provider needs to create and boot a machine of the plan.
    fn vm_spec(&self, machine: &MachinePlan, image: BuiltImage, ctx: &UpContext) -> Result<VmSpec> {
        let layout = self.state.machine(&machine.name);
        crate::state::create_private_dir(layout.path())?;
        let keys = MachineKeys::ensure(&layout, &machine.name)?;
        let ssh_port = lock_record(&ctx.record)
            .machines
            .get(&machine.name)
            .map(|r| r.ssh_port)
            .unwrap_or(0);
        Ok(self.spec_of(machine, image, keys.machine_id, ssh_port))
    }

    /// The commands the machine's provider would run to boot it, as `plan`
    /// shows them: none when `up` would not boot it, or when the provider
    /// drives no command-line tool. Writes nothing: the image is where its
    /// build would put it, the SSH port `record`'s or one free now.
    pub fn planned_calls(&self, machine: &MachinePlan, record: &Record) -> Result<Vec<String>> {
        let create = match machine.action {
            MachineAction::Create => true,
            MachineAction::Start => false,
            MachineAction::Provision | MachineAction::Nothing => return Ok(Vec::new()),
        };
        let recorded = record.machines.get(&machine.name).map_or(0, |r| r.ssh_port);
        let ssh_port = machine.provider.ssh_port(recorded, false)?;
        let image = self.cache.planned(&machine.recipe);
        let machine_id = MachineKeys::load(&self.state.machine(&machine.name))
            .map(|keys| keys.machine_id)
            .unwrap_or_default();
        let spec = self.spec_of(machine, image, machine_id, ssh_port);
        Ok(machine.provider.planned_calls(&spec, create))
    }

    fn spec_of(
        &self,
        machine: &MachinePlan,
        image: BuiltImage,
        machine_id: String,
        ssh_port: u16,
    ) -> VmSpec {
        let layout = self.state.machine(&machine.name);
        let management = machine.provider.management(&identity::mac_address(
            &machine.name,
            identity::MANAGEMENT_NIC,
        ));
        let nics = identity::static_nics(&self.topology, &machine.machine)
            .into_iter()
            .map(|(network, nic)| NicSpec {
                network: self.network_spec(&network),
                mac: nic.mac,
            })
            .collect();
        VmSpec {
            name: machine.name.clone(),
            dir: layout.path().to_path_buf(),
            image,
            cpus: machine.machine.cpus,
            memory_mib: machine.machine.memory_mib,
            seed: layout.seed(),
            machine_id,
            management_mac: management.mac,
            ssh_port,
            forwards: machine.machine.forwards.clone(),
            nics,
            internet: machine.machine.internet,
        }
    }

    pub(super) fn network_spec(&self, name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.to_string(),
            dir: self.state.network_dir(name),
            across_hosts: self.topology.spans_hosts(name),
        }
    }
}

/// The VM hardware that needs a reboot to change, as booted.
/// Builds `recipe` into the cache off the async threads, so that an
/// interrupt is seen while the build's tools run (and stops them).
async fn build_image(cache: &Cache, recipe: &Recipe, task: Task) -> Result<BuiltImage> {
    let (cache, recipe) = (cache.clone(), recipe.clone());
    let built = tokio::task::spawn_blocking(move || {
        let image = cache.ensure(&recipe, &mut |line| task.set(line));
        task.finish(if image.is_ok() { "built" } else { "failed" });
        image
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(built?)
}

fn spec_hash(spec: &VmSpec) -> String {
    let nics: Vec<(String, String)> = spec
        .nics
        .iter()
        .map(|nic| (nic.network.name.clone(), nic.mac.clone()))
        .collect();
    plan::hardware_hash_of(
        spec.cpus,
        spec.memory_mib,
        &nics,
        &spec.forwards,
        spec.internet,
    )
}

#[derive(Clone)]
pub(super) struct UpContext {
    pub(super) state: StateDir,
    pub(super) record: Arc<Mutex<Record>>,
    pub(super) machines: Arc<Machines>,
    pub(super) readiness: Arc<Readiness>,
    pub(super) topology: Arc<Topology>,
    /// A permit per machine allowed to boot at once.
    pub(super) boots: Arc<Semaphore>,
}

impl UpContext {
    fn update(&self, name: &str, change: impl FnOnce(&mut MachineRecord)) -> Result<()> {
        let mut record = lock_record(&self.record);
        let saved = record
            .machines
            .get_mut(name)
            .ok_or_else(|| Error::Untracked {
                machine: name.to_string(),
            })?;
        change(saved);
        self.state.save(&record)?;
        Ok(())
    }

    /// Records a machine about to boot. What was pushed to its disk is kept,
    /// unless the disk is new (`fresh_disk`): then everything is pushed again.
    fn record_machine(&self, name: &str, mut saved: MachineRecord, fresh_disk: bool) -> Result<()> {
        let mut record = lock_record(&self.record);
        if let Some(previous) = record.machines.get(name).filter(|_| !fresh_disk) {
            saved.daemons = previous.daemons.clone();
            saved.artifacts = previous.artifacts.clone();
            saved.provisioned = previous.provisioned.clone();
        }
        record.machines.insert(name.to_string(), saved);
        self.state.save(&record)?;
        Ok(())
    }
}

/// The templates this `up` made, once each, with the seconds each took.
fn made_now(templates: &BTreeMap<String, Template>) -> Vec<(String, f64)> {
    let made: BTreeMap<&str, f64> = templates
        .values()
        .filter_map(|t| Some((t.label.as_str(), t.made_in?.as_secs_f64())))
        .collect();
    made.into_iter()
        .map(|(label, seconds)| (label.to_string(), seconds))
        .collect()
}

/// The machines `up` creates anew, which may warm-boot.
fn fresh_machines<'a>(
    plan: &'a Plan,
    work: &'a [(usize, Option<VmSpec>, Target)],
) -> Vec<Fresh<'a>> {
    work.iter()
        .filter_map(|(index, boot, _)| {
            let machine = &plan.machines[*index];
            let spec = boot.as_ref()?;
            (machine.action == MachineAction::Create).then(|| Fresh {
                name: &machine.name,
                provider: machine.provider.clone(),
                spec,
            })
        })
        .collect()
}

/// One machine's way through `up`: boot (from `warm` when given) and
/// identity when the plan says, then its daemons once its dependencies are
/// ready. Returns what was done to the machine and to its daemons, and the
/// template it warm-booted from.
async fn up_machine(
    machine: &MachinePlan,
    boot: Option<VmSpec>,
    warm: Option<Template>,
    target: Target,
    ctx: &UpContext,
    task: &Task,
) -> Result<(MachineAction, Provisioned, Option<String>)> {
    let (done, warm) = if machine.apply_identity {
        let _slot = if boot.is_some() {
            Some(boot_slot(ctx, task).await?)
        } else {
            None
        };
        bring_up(machine, boot, warm, target, ctx, task).await?
    } else {
        (MachineAction::Provision, None)
    };
    ctx.readiness
        .set(&Gate::Reachable(machine.name.clone()), true);
    let provisioned = provision_and_record(machine, ctx, task).await?;
    Ok((done, provisioned, warm.map(|t| t.label)))
}

/// Waits for one of the `--jobs` boot slots, saying so when it must wait.
async fn boot_slot(ctx: &UpContext, task: &Task) -> Result<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = ctx.boots.clone().try_acquire_owned() {
        return Ok(slot);
    }
    task.set("waiting for a boot slot (--jobs)");
    ctx.boots
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| Error::Internal(format!("boot slots: {e}")))
}

/// How many machines boot at once when `--jobs` is not given: all of
/// them. Measured on 2 cores (`BENCH=load`): a ZooKeeper ensemble of 5 was
/// green in 202 s booting all at once and in 251 s three at a time (it
/// needs every member up, so a later wave is a later green); an ensemble
/// of 8 took 396 s and 428 s. Five lean machines reached SSH sooner in
/// waves (31 s against 48 s), which `--jobs` gives.
fn default_boot_jobs(booting: usize) -> usize {
    booting
}

/// Provisions a machine's daemons and runs its provisioners as planned,
/// recording what was pushed and what ran.
async fn provision_and_record(
    machine: &MachinePlan,
    ctx: &UpContext,
    task: &Task,
) -> Result<Provisioned> {
    let applied = Applied::of(lock_record(&ctx.record).machines.get(&machine.name));
    if machine.daemons.is_empty()
        && machine.machine.artifacts.is_empty()
        && machine.provision.is_empty()
    {
        // Nothing to push or run; the record must say so too.
        if applied.artifacts.is_some() || !applied.provisioned.is_empty() {
            ctx.update(&machine.name, |saved| {
                saved.artifacts = None;
                saved.provisioned.clear();
            })?;
        }
        return Ok(Provisioned::default());
    }
    let on_step = |step: &str| task.set(step);
    let on_line = |line: &str| {
        if !line.trim().is_empty() {
            task.println(line);
        }
    };
    let on_applied = |now: &Applied| {
        let mut record = lock_record(&ctx.record);
        if let Some(saved) = record.machines.get_mut(&machine.name) {
            saved.daemons = now.daemons.clone();
            saved.artifacts = now.artifacts.clone();
            saved.provisioned = now.provisioned.clone();
        }
        ctx.state.save(&record)
    };
    let cluster = provision::Cluster {
        topology: &ctx.topology,
        machines: &ctx.machines,
        readiness: &ctx.readiness,
    };
    provision::provision_machine(&cluster, machine, &applied, &on_step, &on_line, &on_applied)
        .await
        .map_err(Into::into)
}

/// Boots the machine when `boot` is given (from the template `warm`, else
/// cold, creating its disk first when it has none), reaches SSH, applies
/// identity; says which of these it did, and the template it booted from.
/// The record is written before each step that starts something, so a
/// killed `up` leaves a state that `status`, `up` and `destroy` can read.
async fn bring_up(
    machine: &MachinePlan,
    boot: Option<VmSpec>,
    template: Option<Template>,
    mut target: Target,
    ctx: &UpContext,
    task: &Task,
) -> Result<(MachineAction, Option<Template>)> {
    let mut done = MachineAction::Provision;
    // The template the VM resumed, when it did.
    let mut warm = None;
    let name = machine.name.clone();
    let provider = machine.provider.clone();
    let seed = machine_seed(machine, ctx)?;
    let layout = ctx.state.machine(&name);
    let mut renames = Vec::new();
    if let Some(mut spec) = boot {
        if machine.observed == VmState::Running {
            // Booting a VM that runs: its network was lost (see the plan).
            task.set("stopping to reconnect its network");
            let (p, dir) = (provider.clone(), layout.path().to_path_buf());
            blocking(move || p.kill(&dir)).await?;
        }
        write_seed(&spec.seed, &seed)?;
        let fresh_disk = machine.action == MachineAction::Create;
        ctx.record_machine(
            &name,
            MachineRecord {
                provider: machine.machine.provider,
                image: spec.image.key(),
                spec: spec_hash(&spec),
                ssh_port: spec.ssh_port,
                desired: Desired::Running,
                identity: None,
                daemons: BTreeMap::new(),
                artifacts: None,
                provisioned: BTreeMap::new(),
                warm_boot: false,
                unknown: Default::default(),
            },
            fresh_disk,
        )?;
        done = if fresh_disk {
            MachineAction::Create
        } else {
            MachineAction::Start
        };
        let template = template.filter(|_| fresh_disk);
        warm = start_vm(provider.clone(), &mut spec, template, fresh_disk, ctx, task).await?;
        if let Some(template) = &warm {
            renames = template.renames(&spec);
        }
    }
    let port = lock_record(&ctx.record)
        .machines
        .get(&name)
        .map(|r| r.ssh_port)
        .filter(|port| *port != 0)
        .ok_or_else(|| Error::Untracked {
            machine: name.clone(),
        })?;
    let endpoint = provider.ssh_endpoint(port);
    target.reach_at(endpoint.clone());
    ctx.machines.set_endpoint(&name, endpoint);
    task.set("waiting for SSH");
    // Until its identity is applied, a warm-booted guest is the template.
    let first = match &warm {
        Some(template) => template.target(&target),
        None => target.clone(),
    };
    let session =
        connect_while_running(&name, &first, provider.clone(), &layout, warm.is_some()).await?;
    task.set("applying identity");
    let applied = match &warm {
        Some(_) => apply_warm_identity(&session, &seed, &renames).await,
        None => apply_identity(&session, &seed).await,
    };
    applied.map_err(|source| Error::Ssh {
        machine: name.clone(),
        source,
    })?;
    // The same connection serves the daemons' steps and the checks.
    ctx.machines.adopt(&name, session).await;
    let hash = seed.hash.clone();
    ctx.update(&name, |saved| {
        saved.identity = Some(hash);
        saved.desired = Desired::Running;
        saved.warm_boot = false;
    })?;
    // `testbed ssh NAME` works from here on, while the rest of `up` goes on.
    write_ssh_config(&ctx.state, &ctx.topology.name, &ctx.machines.endpoints())?;
    Ok((done, warm))
}

/// Starts the machine's VM from `warm` when given, else (or when that
/// fails) boots it cold, making its disk first when `fresh_disk`. Returns
/// the template it resumed.
async fn start_vm(
    provider: Arc<dyn Provider>,
    spec: &mut VmSpec,
    warm: Option<Template>,
    fresh_disk: bool,
    ctx: &UpContext,
    task: &Task,
) -> Result<Option<Template>> {
    if let Some(template) = warm {
        task.set("warm boot from a template");
        ctx.update(&spec.name, |saved| saved.warm_boot = true)?;
        match warm_boot(provider.clone(), spec, &template, ctx).await {
            Ok(()) => return Ok(Some(template)),
            Err(e) => {
                task.println(&format!(
                    "warm boot failed, booting cold: {}",
                    first_line(&e.to_string())
                ));
                template.discard();
                let (p, dir) = (provider.clone(), spec.dir.clone());
                blocking(move || p.kill(&dir)).await?;
            }
        }
    }
    if fresh_disk {
        task.set("creating disk");
        let (p, s) = (provider.clone(), spec.clone());
        blocking(move || p.create(&s)).await?;
    }
    task.set("booting");
    boot_with_free_port(provider, spec, record_port(ctx), |p, s| p.start(s)).await?;
    Ok(None)
}

/// Records a machine's SSH port in the state.
fn record_port(ctx: &UpContext) -> impl FnMut(&str, u16) -> Result<()> + '_ {
    move |name, port| ctx.update(name, |saved| saved.ssh_port = port)
}

/// Starts a fresh machine from `template`: the template's disk and memory
/// under the machine's own VM definition.
async fn warm_boot(
    provider: Arc<dyn Provider>,
    spec: &mut VmSpec,
    template: &Template,
    ctx: &UpContext,
) -> Result<()> {
    let saved = template.saved().to_path_buf();
    boot_with_free_port(provider, spec, record_port(ctx), move |p, s| {
        p.start_from(s, &saved)
    })
    .await
}

/// The plan's seed, or for a machine whose keys were made by this `up`,
/// the seed built from them now (`vm_spec` made them).
fn machine_seed(machine: &MachinePlan, ctx: &UpContext) -> Result<Seed> {
    if let Some(seed) = &machine.seed {
        return Ok(seed.clone());
    }
    let user_key = ssh::public_key_path(&ctx.state.user_key());
    let authorized = std::fs::read_to_string(&user_key).map_err(|source| StateError::Io {
        path: user_key,
        source,
    })?;
    let layout = ctx.state.machine(&machine.name);
    plan::machine_seed(
        &ctx.topology,
        &machine.machine,
        &*machine.provider,
        &layout,
        &authorized,
    )?
    .ok_or_else(|| Error::Untracked {
        machine: machine.name.clone(),
    })
}

/// Boots with `start`, retrying with another port when the chosen one was
/// taken meanwhile. Each port goes to `record` before the provider gets it,
/// so a record never lags a VM.
pub(super) async fn boot_with_free_port(
    provider: Arc<dyn Provider>,
    spec: &mut VmSpec,
    mut record: impl FnMut(&str, u16) -> Result<()>,
    start: impl Fn(&dyn Provider, &VmSpec) -> std::result::Result<(), ProviderError>
        + Clone
        + Send
        + 'static,
) -> Result<()> {
    let mut last = None;
    for attempt in 0..3 {
        spec.ssh_port = provider.ssh_port(spec.ssh_port, attempt > 0)?;
        record(&spec.name, spec.ssh_port)?;
        let p = provider.clone();
        let s = spec.clone();
        let start = start.clone();
        match blocking(move || start(&*p, &s)).await {
            Ok(()) => return Ok(()),
            Err(e @ ProviderError::PortInUse { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or(ProviderError::NoFreePort).into())
}

/// Connects to the machine's SSH, failing fast (with the console's tail)
/// when the VM process dies before SSH answers. `resumed`: the guest runs
/// already (a warm boot), its network up.
pub(super) async fn connect_while_running(
    name: &str,
    target: &Target,
    provider: Arc<dyn Provider>,
    layout: &MachineDir,
    resumed: bool,
) -> Result<Session> {
    let connecting = async {
        if resumed {
            Session::connect_running(target, BOOT_TIMEOUT).await
        } else {
            Session::connect(target, BOOT_TIMEOUT).await
        }
    };
    tokio::pin!(connecting);
    loop {
        tokio::select! {
            session = &mut connecting => {
                let source = match session {
                    Ok(session) => return Ok(session),
                    Err(source) => source,
                };
                fetch_console(provider.clone(), layout.path()).await;
                return Err(Error::NoSsh {
                    machine: name.to_string(),
                    source: Box::new(source),
                    log: layout.console_log(),
                    tail: layout.console_tail(20),
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if observe(provider.clone(), layout.path()).await != VmState::Running {
                    fetch_console(provider.clone(), layout.path()).await;
                    return Err(Error::Crashed {
                        machine: name.to_string(),
                        log: layout.console_log(),
                        tail: layout.console_tail(20),
                    });
                }
            }
        }
    }
}

/// Applies the seed over SSH unless the guest already has it (after a cold
/// boot it does, from the seed disk: one `cat` then settles it).
async fn apply_identity(session: &Session, seed: &Seed) -> std::result::Result<(), SshError> {
    let probe = format!("cat {} 2>/dev/null || true", identity::GUEST_SEED_ID);
    if session.exec(&probe).await?.stdout_lossy().trim() == seed.hash {
        return Ok(());
    }
    session
        .exec("mkdir -p /run/testbed")
        .await?
        .ensure_success("mkdir -p /run/testbed")?;
    session
        .upload(&seed.bytes, identity::GUEST_SEED, 0o600)
        .await?;
    let command = identity::apply_command();
    session.exec(&command).await?.ensure_success(&command)?;
    Ok(())
}

/// A warm-booted guest has the template's identity: its clock, MACs and
/// seed in one command (every process costs under emulation).
async fn apply_warm_identity(
    session: &Session,
    seed: &Seed,
    renames: &identity::Renames,
) -> std::result::Result<(), SshError> {
    let command = warm_identity_command(renames);
    session
        .exec_with_input(&command, &seed.bytes)
        .await?
        .ensure_success(&command)?;
    super::warm::correct_clock(session).await
}

fn write_seed(path: &Path, seed: &Seed) -> Result<()> {
    Ok(crate::state::write_atomic(path, &seed.bytes, 0o600)?)
}

fn ensure_user_key(state: &StateDir) -> Result<()> {
    let key = state.user_key();
    if !key.is_file() || !ssh::public_key_path(&key).is_file() {
        ssh::generate_keypair(&key, "testbed").map_err(|source| Error::Ssh {
            machine: "(user key)".into(),
            source,
        })?;
    }
    Ok(())
}
