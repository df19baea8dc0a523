//! `up` and `provision`: images, networks, boot, identity, then each machine's daemons.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::build::BuildOutcome;
use crate::check;
use crate::identity::{self, MachineKeys, Seed};
use crate::image::{BuiltImage, ImageError, Recipe};
use crate::kit::Secrets;
use crate::progress::{Progress, Task};
use crate::provider::{NetworkSpec, NicSpec, Provider, ProviderError, VmSpec, VmState};
use crate::provision::{self, Applied, Machines, Outcome, Readiness, BUILD_GATE};
use crate::ssh::{self, Session, SshError, Target};
use crate::state::{Desired, MachineRecord, Record, StateDir, StateError};
use crate::topology::{Machine, Topology};

use super::ssh_config::{start_control_masters, write_ssh_config};
use super::steps::spawn_build;
use super::{
    all_succeeded, blocking, console_tail, first_line, join_machines, lock_record, observe, Error,
    Result, Testbed,
};

/// How long a cold boot may take to reach SSH (software emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What `up` did, for the summary line.
#[derive(Debug, Default)]
pub struct UpReport {
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// What happened to each daemon that was provisioned.
    pub daemons: Vec<Outcome>,
    /// The topology's checks, run last when anything changed.
    pub checks: Option<check::Report>,
    /// What the build step did, when the topology has one.
    pub build: Option<BuildOutcome>,
}

impl Testbed {
    /// Builds missing images, boots what is not running, applies identities
    /// that are not applied yet. A converged testbed is left alone.
    pub async fn up(&self, progress: &Progress) -> Result<UpReport> {
        self.check_build()?;
        self.state.create()?;
        let _lock = self.state.lock()?;
        let mut record = self.state.load()?;
        record.topology = self.topology.path.clone();
        ensure_user_key(&self.state)?;
        let secrets = Arc::new(self.secrets()?);
        let build_current = self.build_current(&record)?;
        // Rendered before anything starts: a template error touches nothing.
        let rendered = self.applied_now(&secrets, build_current)?;
        let images = self.ensure_images(progress)?;
        let plans = self.plan_machines(&record, &images)?;
        for plan in &plans {
            let current = images
                .get(&plan.machine.name)
                .map(BuiltImage::key)
                .unwrap_or_default();
            if let Some(warning) = plan.drift(&record, &current) {
                progress.println(&format!("warning: {warning}"));
            }
        }
        let mut report = UpReport::default();
        let readiness = Arc::new(Readiness::new(&self.topology));
        let mut todo = Vec::new();
        for plan in plans {
            let name = plan.machine.name.clone();
            let provisioned = match (record.machines.get(&name), rendered.get(&name)) {
                (Some(saved), Some(Some(now))) => {
                    saved.daemons == now.daemons && saved.artifacts == now.artifacts
                }
                _ => false,
            };
            if plan.converged(&record) && provisioned {
                readiness.set(&name, true);
                readiness.set(&provision::reachable(&name), true);
                report.unchanged.push(name);
            } else {
                todo.push(plan);
            }
        }
        if todo.is_empty() && build_current {
            report.build = self.topology.build.as_ref().map(|_| BuildOutcome::Skipped);
            return Ok(report);
        }
        self.accelerator(&todo, progress);
        self.ensure_networks(&todo, &mut record)?;
        self.state.save(&record)?;
        let machines = Arc::new(Machines::new(self.state.clone(), &self.topology));
        for (name, saved) in &record.machines {
            machines.set_port(name, saved.ssh_port);
        }
        let ctx = UpContext {
            state: self.state.clone(),
            record: Arc::new(Mutex::new(record)),
            machines: machines.clone(),
            readiness: readiness.clone(),
            topology: Arc::new(self.topology.clone()),
            secrets,
        };
        let build_task = spawn_build(&ctx, build_current, progress);
        let mut tasks = Vec::new();
        for plan in todo {
            let task = progress.task(&plan.machine.name);
            let ctx = ctx.clone();
            let target = self.ssh_target(&plan.machine.name, 0);
            tasks.push(tokio::spawn(async move {
                let name = plan.machine.name.clone();
                let result = up_machine(plan, target, &ctx, &task).await;
                ctx.readiness.set(&name, result.is_ok());
                ctx.readiness.settle(&provision::reachable(&name), false);
                match &result {
                    Ok(_) => task.finish("ready"),
                    Err(e) => task.finish(&format!("failed: {}", first_line(&e.to_string()))),
                }
                (name, result)
            }));
        }
        let (done, mut failures) = join_machines(tasks).await;
        for (name, outcomes) in done {
            report.changed.push(name);
            report.daemons.extend(outcomes);
        }
        match build_task {
            Some(task) => match task.await {
                Ok(Ok(outcome)) => report.build = Some(outcome),
                Ok(Err(e)) => failures.push(format!("build: {e}")),
                Err(e) => failures.push(format!("build: {e}")),
            },
            None => report.build = self.topology.build.as_ref().map(|_| BuildOutcome::Skipped),
        }
        write_ssh_config(&self.state, &self.topology.name, &lock_record(&ctx.record))?;
        if failures.is_empty() && !self.topology.checks.is_empty() {
            let checks =
                check::run_all(&self.topology.checks, &self.topology, machines.clone()).await;
            report.checks = Some(checks);
        }
        machines.close().await;
        start_control_masters(&self.state, &report.changed);
        all_succeeded(failures).map(|()| report)
    }

    /// What provisioning each machine now would apply; `None` for a machine
    /// whose artifacts the pending build is about to change.
    fn applied_now(
        &self,
        secrets: &Secrets,
        build_current: bool,
    ) -> Result<BTreeMap<String, Option<Applied>>> {
        let topology = &self.topology;
        topology
            .machines
            .iter()
            .map(|machine| {
                let rendered = provision::render_machine(topology, machine, secrets)?;
                if !build_current && provision::needs_artifacts(topology, machine)? {
                    return Ok((machine.name.clone(), None));
                }
                let mut applied = Applied::default();
                for r in &rendered {
                    let hash = provision::daemon_hash(topology, &machine.name, r)?;
                    applied.daemons.insert(r.kit.name.clone(), hash);
                }
                if !machine.artifacts.is_empty() {
                    applied.artifacts = Some(provision::artifacts_hash(
                        topology,
                        &machine.name,
                        &machine.artifacts,
                    )?);
                }
                Ok((machine.name.clone(), Some(applied)))
            })
            .collect()
    }

    /// The testbed's generated secrets that its kits use.
    fn secrets(&self) -> Result<Secrets> {
        let names = crate::kit::secret_names(&self.topology)?;
        Ok(self.state.secrets(&names)?)
    }

    /// Re-renders and pushes the kits of `names` (or all machines): restarts
    /// the daemons whose files changed, starts those not running, leaves the
    /// rest alone.
    pub async fn provision(&self, names: &[String], progress: &Progress) -> Result<Vec<Outcome>> {
        let _lock = self.state.lock()?;
        let selected = self.select(names)?;
        let secrets = Arc::new(self.secrets()?);
        let machines = self.machines()?;
        let readiness = Arc::new(Readiness::new(&self.topology));
        for machine in &self.topology.machines {
            if !selected.iter().any(|m| m.name == machine.name) {
                readiness.set(&machine.name, true);
            }
        }
        // `provision` pushes `dist/` as it is; `build` or `up` remake it.
        readiness.set(BUILD_GATE, true);
        let ctx = UpContext {
            state: self.state.clone(),
            record: Arc::new(Mutex::new(self.state.load()?)),
            machines: machines.clone(),
            readiness,
            topology: Arc::new(self.topology.clone()),
            secrets,
        };
        let mut tasks = Vec::new();
        for machine in selected {
            let ctx = ctx.clone();
            let task = progress.task(&machine.name);
            tasks.push(tokio::spawn(async move {
                let result = provision_and_record(&machine, &ctx, &task).await;
                ctx.readiness.set(&machine.name, result.is_ok());
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
        let outcomes = done
            .into_iter()
            .flat_map(|(_, outcomes)| outcomes)
            .collect();
        all_succeeded(failures).map(|()| outcomes)
    }

    /// The image each machine boots, by machine name: its recipe plus the
    /// packages its kits need, built once per distinct package set.
    fn ensure_images(&self, progress: &Progress) -> Result<BTreeMap<String, BuiltImage>> {
        let mut built: BTreeMap<String, BuiltImage> = BTreeMap::new();
        let mut images = BTreeMap::new();
        for machine in &self.topology.machines {
            let recipe = self.recipe_for(machine)?;
            let image = match built
                .get(&recipe.key())
                .cloned()
                .or_else(|| self.cache.lookup(&recipe))
            {
                Some(image) => image,
                None => {
                    let task = progress.task(&format!("image {}", recipe.key()));
                    let image = self.cache.ensure(&recipe, &mut |line| task.set(line))?;
                    task.finish("built");
                    image
                }
            };
            built.insert(recipe.key(), image.clone());
            images.insert(machine.name.clone(), image);
        }
        Ok(images)
    }

    /// The machine's image recipe, with its own and its kits' packages added.
    pub fn recipe_for(&self, machine: &Machine) -> Result<Recipe> {
        let recipe = Recipe::find(&machine.image, self.topology.dir())?;
        let mut packages = machine.packages.clone();
        for daemon in &machine.daemons {
            let kit = crate::kit::Kit::load(daemon, self.topology.dir())?;
            packages.extend(kit.manifest.packages.iter().cloned());
        }
        Ok(recipe.with_packages(&packages))
    }

    /// The accelerator the machines will boot with (each provider decides
    /// at `start`); said once, when the provider's probe runs.
    fn accelerator(&self, plans: &[MachinePlan], progress: &Progress) {
        let Some(plan) = plans.first() else {
            return;
        };
        let accelerator = plan.provider.accelerator(&plan.spec.image.kernel);
        if accelerator.fresh {
            progress.println(&format!(
                "accelerator: {}: {}",
                accelerator.name, accelerator.reason
            ));
        }
    }

    /// Brings up every network the machines to boot are on.
    fn ensure_networks(&self, plans: &[MachinePlan], record: &mut Record) -> Result<()> {
        let mut done = std::collections::BTreeSet::new();
        for plan in plans {
            for nic in &plan.spec.nics {
                if done.insert(nic.network.name.clone()) {
                    let kind = plan.machine.provider;
                    match record.networks.get(&nic.network.name) {
                        Some(made_by) if *made_by != kind => {
                            return Err(Error::NetworkProvider {
                                network: nic.network.name.clone(),
                                made_by: made_by.as_str(),
                                machine: plan.machine.name.clone(),
                                wanted: kind.as_str(),
                            })
                        }
                        _ => {}
                    }
                    // Recorded first: a killed `up` leaves nothing `destroy`
                    // does not know of.
                    record
                        .networks
                        .insert(nic.network.name.clone(), plan.machine.provider);
                    self.state.save(record)?;
                    plan.provider.ensure_network(&nic.network)?;
                }
            }
        }
        Ok(())
    }

    fn plan_machines(
        &self,
        record: &Record,
        images: &BTreeMap<String, BuiltImage>,
    ) -> Result<Vec<MachinePlan>> {
        let authorized = std::fs::read_to_string(ssh::public_key_path(&self.state.user_key()))
            .map_err(|source| StateError::Io {
                path: self.state.user_key(),
                source,
            })?;
        self.topology
            .machines
            .iter()
            .map(|machine| {
                let provider = self.provider_of(machine)?;
                let dir = self.state.machine_dir(&machine.name);
                crate::state::create_private_dir(&dir)?;
                let keys = MachineKeys::ensure(&dir, &machine.name)?;
                let management = provider.management(&identity::mac_address(
                    &machine.name,
                    identity::MANAGEMENT_NIC,
                ));
                let seed =
                    identity::build_seed(&self.topology, machine, &keys, &authorized, &management)?;
                let saved = record.machines.get(&machine.name);
                let observed = provider.state(&dir);
                let image = self.image_for(machine, saved, observed, images)?;
                let nics = identity::static_nics(&self.topology, machine)
                    .into_iter()
                    .map(|(network, nic)| NicSpec {
                        network: self.network_spec(&network),
                        mac: nic.mac,
                    })
                    .collect();
                let spec = VmSpec {
                    name: machine.name.clone(),
                    dir: dir.clone(),
                    image,
                    cpus: machine.cpus,
                    memory_mib: machine.memory_mib,
                    seed: dir.join("seed.tar"),
                    machine_id: keys.machine_id.clone(),
                    management_mac: management.mac.clone(),
                    ssh_port: saved.map(|r| r.ssh_port).unwrap_or(0),
                    forwards: machine.forwards.clone(),
                    nics,
                };
                Ok(MachinePlan {
                    machine: machine.clone(),
                    provider,
                    spec,
                    seed,
                    observed,
                })
            })
            .collect()
    }

    /// The image a machine boots: the one its disk was made from when it has
    /// a disk (an overlay must keep its base), else the recipe's current one.
    fn image_for(
        &self,
        machine: &Machine,
        saved: Option<&MachineRecord>,
        observed: VmState,
        images: &BTreeMap<String, BuiltImage>,
    ) -> Result<BuiltImage> {
        let current = images
            .get(&machine.name)
            .cloned()
            .ok_or_else(|| ImageError::NotCached(machine.image.clone()))?;
        match saved {
            Some(saved) if observed != VmState::Absent && saved.image != current.key() => self
                .cache
                .lookup_key(&saved.image)
                .ok_or_else(|| Error::BaseImageGone {
                    machine: machine.name.clone(),
                    image: saved.image.clone(),
                }),
            _ => Ok(current),
        }
    }

    fn network_spec(&self, name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.to_string(),
            dir: self.state.network_dir(name),
        }
    }
}

/// Everything `up` knows about one machine before touching it.
struct MachinePlan {
    machine: Machine,
    provider: Box<dyn Provider>,
    spec: VmSpec,
    seed: Seed,
    observed: VmState,
}

impl MachinePlan {
    fn converged(&self, record: &Record) -> bool {
        let Some(saved) = record.machines.get(&self.machine.name) else {
            return false;
        };
        self.observed == VmState::Running
            && saved.desired == Desired::Running
            && saved.identity.as_deref() == Some(self.seed.hash.as_str())
    }

    /// What a running machine does not have yet because it needs a reboot
    /// or a rebuild, in a user's words.
    fn drift(&self, record: &Record, current_image: &str) -> Option<String> {
        let saved = record.machines.get(&self.machine.name)?;
        let name = &self.machine.name;
        if self.observed == VmState::Running && saved.spec != spec_hash(&self.spec) {
            return Some(format!(
                "{name}: cpus, memory, networks or forwards changed; `testbed halt {name}` then `testbed up` applies them"
            ));
        }
        (saved.image != current_image).then(|| {
            format!("{name}: keeps image {} (the recipe now builds {current_image}); `testbed destroy` and `up` to use it", saved.image)
        })
    }
}

/// The VM hardware that needs a reboot to change: cpus, memory, NICs, forwards.
fn spec_hash(spec: &VmSpec) -> String {
    use sha2::{Digest, Sha256};
    let nics: Vec<(&str, &str)> = spec
        .nics
        .iter()
        .map(|nic| (nic.network.name.as_str(), nic.mac.as_str()))
        .collect();
    let text = format!(
        "{}|{}|{:?}|{:?}",
        spec.cpus, spec.memory_mib, nics, spec.forwards
    );
    hex::encode(Sha256::digest(text))[..16].to_string()
}

#[derive(Clone)]
pub(super) struct UpContext {
    pub(super) state: StateDir,
    pub(super) record: Arc<Mutex<Record>>,
    pub(super) machines: Arc<Machines>,
    pub(super) readiness: Arc<Readiness>,
    pub(super) topology: Arc<Topology>,
    pub(super) secrets: Arc<Secrets>,
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
        }
        record.machines.insert(name.to_string(), saved);
        self.state.save(&record)?;
        Ok(())
    }
}

/// One machine's way through `up`: boot and identity when needed, then its
/// daemons once its dependencies are ready.
async fn up_machine(
    plan: MachinePlan,
    target: Target,
    ctx: &UpContext,
    task: &Task,
) -> Result<Vec<Outcome>> {
    let machine = plan.machine.clone();
    if !plan.converged(&lock_record(&ctx.record)) {
        bring_up(plan, target, ctx, task).await?;
    }
    ctx.readiness
        .set(&provision::reachable(&machine.name), true);
    provision_and_record(&machine, ctx, task).await
}

/// Provisions a machine's daemons and records what was pushed.
async fn provision_and_record(
    machine: &Machine,
    ctx: &UpContext,
    task: &Task,
) -> Result<Vec<Outcome>> {
    if machine.daemons.is_empty() && machine.artifacts.is_empty() {
        // Nothing to push; the record must say so too, or `up` would never
        // find a machine whose last daemon was removed converged.
        let stale = lock_record(&ctx.record)
            .machines
            .get(&machine.name)
            .is_some_and(|saved| !saved.daemons.is_empty() || saved.artifacts.is_some());
        if stale {
            ctx.update(&machine.name, |saved| {
                saved.daemons.clear();
                saved.artifacts = None;
            })?;
        }
        return Ok(Vec::new());
    }
    let applied = lock_record(&ctx.record)
        .machines
        .get(&machine.name)
        .map(|r| Applied {
            daemons: r.daemons.clone(),
            artifacts: r.artifacts.clone(),
        })
        .unwrap_or_default();
    let on_step = |step: &str| task.set(step);
    let on_applied = |now: &Applied| {
        ctx.update(&machine.name, |saved| {
            saved.daemons = now.daemons.clone();
            saved.artifacts = now.artifacts.clone();
        })
        .map_err(|e| e.to_string())
    };
    let cluster = provision::Cluster {
        topology: &ctx.topology,
        secrets: &ctx.secrets,
        machines: &ctx.machines,
        readiness: &ctx.readiness,
    };
    let outcomes =
        provision::provision_machine(&cluster, machine, &applied, &on_step, &on_applied).await?;
    Ok(outcomes)
}

/// One machine's way through `up`: create, boot, reach SSH, apply identity.
/// The record is written before each step that starts something, so a
/// killed `up` leaves a state that `status`, `up` and `destroy` can read.
async fn bring_up(
    mut plan: MachinePlan,
    mut target: Target,
    ctx: &UpContext,
    task: &Task,
) -> Result<()> {
    let name = plan.machine.name.clone();
    let provider: Arc<dyn Provider> = Arc::from(plan.provider);
    if plan.observed != VmState::Running {
        write_seed(&plan.spec.seed, &plan.seed)?;
        ctx.record_machine(
            &name,
            MachineRecord {
                provider: plan.machine.provider,
                image: plan.spec.image.key(),
                spec: spec_hash(&plan.spec),
                ssh_port: plan.spec.ssh_port,
                desired: Desired::Running,
                identity: None,
                daemons: BTreeMap::new(),
                artifacts: None,
            },
            plan.observed == VmState::Absent,
        )?;
        if plan.observed == VmState::Absent {
            task.set("creating disk");
            let spec = plan.spec.clone();
            let p = provider.clone();
            blocking(move || p.create(&spec)).await?;
        }
        task.set("booting");
        boot_with_free_port(provider.clone(), &mut plan.spec, ctx).await?;
    }
    let port = lock_record(&ctx.record)
        .machines
        .get(&name)
        .map(|r| r.ssh_port)
        .filter(|port| *port != 0)
        .ok_or_else(|| Error::Untracked {
            machine: name.clone(),
        })?;
    target.addr.set_port(port);
    ctx.machines.set_port(&name, port);
    task.set("waiting for SSH");
    let session = connect_while_running(
        &name,
        &target,
        provider.clone(),
        &plan.spec.dir,
        &plan.spec.console_log(),
    )
    .await?;
    task.set("applying identity");
    apply_identity(&session, &plan.seed)
        .await
        .map_err(|source| Error::Ssh {
            machine: name.clone(),
            source,
        })?;
    // The same connection serves the daemons' steps and the checks.
    ctx.machines.adopt(&name, session).await;
    let hash = plan.seed.hash.clone();
    ctx.update(&name, |saved| {
        saved.identity = Some(hash);
        saved.desired = Desired::Running;
    })?;
    // `testbed ssh NAME` works from here on, while the rest of `up` goes on.
    write_ssh_config(&ctx.state, &ctx.topology.name, &lock_record(&ctx.record))
}

/// Boots, retrying with another port when the chosen one was taken meanwhile.
/// Each port is recorded before qemu gets it, so the record never lags a VM.
async fn boot_with_free_port(
    provider: Arc<dyn Provider>,
    spec: &mut VmSpec,
    ctx: &UpContext,
) -> Result<()> {
    let mut last = None;
    for attempt in 0..3 {
        spec.ssh_port = provider.ssh_port(spec.ssh_port, attempt > 0)?;
        let port = spec.ssh_port;
        ctx.update(&spec.name, |saved| saved.ssh_port = port)?;
        let p = provider.clone();
        let s = spec.clone();
        match blocking(move || p.start(&s)).await {
            Ok(()) => return Ok(()),
            Err(e @ ProviderError::PortInUse { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or(ProviderError::NoFreePort).into())
}

/// Connects to the machine's SSH, failing fast (with the console's tail)
/// when the VM process dies before SSH answers.
async fn connect_while_running(
    name: &str,
    target: &Target,
    provider: Arc<dyn Provider>,
    dir: &Path,
    console: &Path,
) -> Result<Session> {
    let connecting = Session::connect(target, BOOT_TIMEOUT);
    tokio::pin!(connecting);
    loop {
        tokio::select! {
            session = &mut connecting => {
                return session.map_err(|source| Error::NoSsh {
                    machine: name.to_string(),
                    source: Box::new(source),
                    log: console.to_path_buf(),
                    tail: console_tail(console, 20),
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if observe(provider.clone(), dir).await != VmState::Running {
                    return Err(Error::Crashed {
                        machine: name.to_string(),
                        log: console.to_path_buf(),
                        tail: console_tail(console, 20),
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
