//! The machine lifecycle over any provider: `up` (image → boot → identity),
//! `status`, `halt` and `destroy`. Each machine moves through `up` on its
//! own task; the state record says how far each got, so an interrupted `up`
//! continues from there and a converged one does nothing.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::build::{self, BuildOutcome};
use crate::check;
use crate::identity::{self, MachineKeys, Seed};
use crate::image::{BuiltImage, Cache, ImageError, Recipe};
use crate::kit::Secrets;
use crate::progress::{Progress, Task};
use crate::provider::{self, kvm, NetworkSpec, NicSpec, Provider, ProviderError, VmSpec, VmState};
use crate::provision::{self, Applied, Machines, Outcome, Readiness, BUILD_GATE};
use crate::ssh::{self, Session, SshError, Target};
use crate::state::{Desired, MachineRecord, Record, StateDir, StateError};
use crate::topology::{self, Builder, Machine, ProviderKind, Step, Topology, TopologyError};

/// How long a cold boot may take to reach SSH (software emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest gets to power off by itself before it is stopped.
const HALT_TIMEOUT: Duration = Duration::from_secs(60);

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
    Build(#[from] build::BuildError),
    #[error("{0} has no [build]\n  help: add a [build] table with `machine`, `run`, `inputs` and `outputs`")]
    NoBuild(PathBuf),
    #[error(
        "machine `{builder}` runs the build and cannot also need its artifacts (it would wait \
         for itself)\n  help: build on another machine, or drop the artifacts from `{builder}`"
    )]
    BuilderNeedsArtifacts { builder: String },
    #[error(
        "machine `{machine}` needs artifact `{artifact}`, which [build] in {} does not make\n  \
         help: add it to the build's `outputs` (and make the script write it)",
        path.display()
    )]
    ArtifactNotBuilt {
        machine: String,
        artifact: String,
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
    #[error("{count} machine(s) failed:\n{details}")]
    Several { count: usize, details: String },
}

type Result<T> = std::result::Result<T, Error>;

/// One testbed: its topology and its `.testbed/` folder.
pub struct Testbed {
    pub topology: Topology,
    pub state: StateDir,
    pub cache: Cache,
}

/// A machine as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    pub name: String,
    pub state: &'static str,
    pub provider: String,
    /// `host:port` of its SSH, when it has been created.
    pub ssh: Option<String>,
    pub ips: BTreeMap<String, Ipv4Addr>,
    /// False for a machine that still exists but is no longer in the file.
    pub in_topology: bool,
}

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

/// What `testbed run STEP` did.
#[derive(Debug)]
pub struct StepReport {
    pub step: Step,
    pub exit_status: u32,
    pub seconds: f64,
    /// The step's checks, run when its command succeeded.
    pub checks: Option<check::Report>,
}

impl StepReport {
    pub fn passed(&self) -> bool {
        self.exit_status == 0 && self.checks.as_ref().is_none_or(|c| c.passed())
    }
}

impl Testbed {
    /// The testbed of a topology file (its `.testbed/` beside it).
    pub fn open(topology_path: &Path) -> Result<Testbed> {
        let mut topology = topology::load(topology_path)?;
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
            cache: Cache::default(),
        })
    }

    /// What only matters when a build may run (`up`, `build`, `plan`), so
    /// that a missing input or kit does not stop `status` or `destroy`:
    /// every input exists, every artifact is built, the builder does not
    /// wait for itself.
    pub fn check_build(&self) -> Result<()> {
        if let Some(missing) = self.topology.missing_input() {
            return Err(missing.into());
        }
        check_build(&self.topology)
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

    /// `-f FILE` when given, else the `.testbed/` of the current directory.
    pub fn locate(file: Option<&Path>) -> Result<Testbed> {
        if let Some(file) = file {
            return Testbed::open(file);
        }
        let cwd = std::env::current_dir().map_err(|source| StateError::Io {
            path: PathBuf::from("."),
            source,
        })?;
        let state = StateDir::find(&cwd)?;
        let record = state.load()?;
        Testbed::open(&record.topology)
    }

    fn provider_of(&self, machine: &Machine) -> Result<Box<dyn Provider>> {
        Ok(provider::for_kind(
            machine.provider,
            &self.provider_settings(),
        )?)
    }

    /// Where daemon-backed providers connect, for this topology.
    fn provider_settings(&self) -> provider::Settings {
        provider::Settings::new(self.topology.libvirt_uri.as_deref())
    }

    fn ssh_target(&self, name: &str, port: u16) -> Target {
        Target {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            user: "root".into(),
            key_path: self.state.user_key(),
            host_key_path: ssh::public_key_path(
                &self.state.machine_dir(name).join("ssh_host_ed25519_key"),
            ),
        }
    }

    fn network_spec(&self, name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.to_string(),
            dir: self.state.network_dir(name),
        }
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
        let mut statuses = self
            .topology
            .machines
            .iter()
            .map(|machine| {
                let provider = self.provider_of(machine)?;
                let saved = record.machines.get(&machine.name);
                let observed = provider.state(&self.state.machine_dir(&machine.name));
                Ok(MachineStatus {
                    name: machine.name.clone(),
                    state: state_word(saved, observed),
                    provider: machine.provider.as_str().into(),
                    ssh: saved.map(|r| format!("127.0.0.1:{}", r.ssh_port)),
                    ips: machine.ips.clone(),
                    in_topology: true,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (name, saved) in &record.machines {
            if self.topology.machine(name).is_some() {
                continue;
            }
            let provider = provider::for_kind(saved.provider, &self.provider_settings())?;
            let observed = provider.state(&self.state.machine_dir(name));
            statuses.push(MachineStatus {
                name: name.clone(),
                state: state_word(Some(saved), observed),
                provider: saved.provider.as_str().into(),
                ssh: Some(format!("127.0.0.1:{}", saved.ssh_port)),
                ips: BTreeMap::new(),
                in_topology: false,
            });
        }
        Ok(statuses)
    }

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
        let kvm = self.accelerator(&images, progress);
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
        for mut plan in todo {
            plan.kvm = kvm;
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

    /// Whether the build step is absent or its recorded result still holds.
    fn build_current(&self, record: &Record) -> Result<bool> {
        match &self.topology.build {
            Some(plan) => Ok(build::is_current(
                plan,
                self.topology.dir(),
                record.build.as_deref(),
            )?),
            None => Ok(true),
        }
    }

    /// `testbed build`: runs the build step alone (when its inputs changed,
    /// or always with `force`), on a builder that is already up.
    pub async fn build(&self, force: bool, progress: &Progress) -> Result<BuildOutcome> {
        let plan = self
            .topology
            .build
            .as_ref()
            .ok_or_else(|| Error::NoBuild(self.topology.path.clone()))?;
        self.check_build()?;
        self.state.create()?;
        let _lock = self.state.lock()?;
        let mut record = self.state.load()?;
        if !force && self.build_current(&record)? {
            return Ok(BuildOutcome::Skipped);
        }
        let hash = build::inputs_hash(plan, self.topology.dir())?;
        let task = progress.task("build");
        let on_line = |line: &str| task.set(line);
        let log = self.state.build_log();
        let outcome = match &plan.builder {
            Builder::Host => build::run_on_host(plan, &self.topology, &log, &on_line).await,
            Builder::Machine(name) => {
                if !record.machines.contains_key(name) {
                    return Err(Error::BuilderNotRunning(name.clone()));
                }
                let machines = self.machines()?;
                let session = machines
                    .session(name)
                    .await
                    .map_err(|_| Error::BuilderNotRunning(name.clone()))?;
                let outcome =
                    build::run_on_machine(plan, &self.topology, &session, &log, &on_line).await;
                machines.close().await;
                outcome
            }
        };
        task.finish(&match &outcome {
            Ok(done) => done.summary(),
            Err(_) => "failed".to_string(),
        });
        let outcome = outcome?;
        record.build = Some(hash);
        self.state.save(&record)?;
        Ok(outcome)
    }

    /// `testbed run STEP`: the step's command on its machine (output passed
    /// to `on_output` as it comes), then its checks when the command succeeded.
    pub async fn run_step(
        &self,
        name: &str,
        on_output: impl FnMut(ssh::Stream, &[u8]) + Send,
    ) -> Result<StepReport> {
        let step = self.step(name)?.clone();
        let machines = self.machines()?;
        let started = Instant::now();
        let session = machines.session(&step.machine).await?;
        let output = session
            .exec_streaming(&step.run, on_output)
            .await
            .map_err(|source| Error::Ssh {
                machine: step.machine.clone(),
                source,
            })?;
        let seconds = started.elapsed().as_secs_f64();
        let checks = if output.success() && !step.checks.is_empty() {
            Some(check::run_all(&step.checks, &self.topology, machines.clone()).await)
        } else {
            None
        };
        machines.close().await;
        Ok(StepReport {
            step,
            exit_status: output.exit_status,
            seconds,
            checks,
        })
    }

    fn step(&self, name: &str) -> Result<&Step> {
        let steps = &self.topology.steps;
        steps
            .iter()
            .find(|step| step.name == name)
            .ok_or_else(|| Error::UnknownStep {
                name: name.to_string(),
                known: if steps.is_empty() {
                    format!(
                        "\n  help: {} has no [[steps]]",
                        self.topology.path.display()
                    )
                } else {
                    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                    format!("\n  help: steps: {}", names.join(", "))
                },
            })
    }

    /// A session per machine for the checks of `verify`, from the record.
    fn machines(&self) -> Result<Arc<Machines>> {
        let record = self.state.load()?;
        let machines = Machines::new(self.state.clone(), &self.topology);
        for (name, saved) in &record.machines {
            machines.set_port(name, saved.ssh_port);
        }
        Ok(Arc::new(machines))
    }

    /// Runs the topology's checks alone.
    pub async fn verify(&self) -> Result<check::Report> {
        let machines = self.machines()?;
        let report = check::run_all(&self.topology.checks, &self.topology, machines.clone()).await;
        machines.close().await;
        Ok(report)
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

    /// KVM when the bounded probe showed it boots a kernel here, else TCG;
    /// said once, when the probe runs.
    fn accelerator(&self, images: &BTreeMap<String, BuiltImage>, progress: &Progress) -> bool {
        let Some(image) = images.values().next() else {
            return false;
        };
        let (verdict, fresh) = kvm::verdict(&image.kernel, self.cache.root());
        if fresh {
            let engine = if verdict.kvm {
                "KVM"
            } else {
                "TCG (software emulation)"
            };
            progress.println(&format!("accelerator: {engine}: {}", verdict.reason));
        }
        verdict.kvm
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
                    kvm: false,
                };
                Ok(MachinePlan {
                    machine: machine.clone(),
                    provider,
                    spec,
                    seed,
                    observed,
                    kvm: false,
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

    /// Powers machines off: the guest shuts down by itself when it can,
    /// and is stopped after `HALT_TIMEOUT` when it does not.
    pub async fn halt(&self, names: &[String], progress: &Progress) -> Result<Vec<String>> {
        let _lock = self.state.lock()?;
        let machines = self.select(names)?;
        let mut record = self.state.load()?;
        let mut halted = Vec::new();
        let mut tasks = Vec::new();
        for machine in machines {
            let provider = self.provider_of(&machine)?;
            let dir = self.state.machine_dir(&machine.name);
            if let Some(saved) = record.machines.get_mut(&machine.name) {
                saved.desired = Desired::Stopped;
            }
            if provider.state(&dir) != VmState::Running {
                continue;
            }
            let port = record
                .machines
                .get(&machine.name)
                .map(|r| r.ssh_port)
                .unwrap_or(0);
            let target = self.ssh_target(&machine.name, port);
            let task = progress.task(&machine.name);
            let state = self.state.clone();
            tasks.push(tokio::spawn(async move {
                task.set("powering off");
                stop_control_master(&state, &machine.name).await;
                let result = power_off(provider, dir, target).await;
                task.finish(if result.is_ok() {
                    "stopped"
                } else {
                    "stop failed"
                });
                (machine.name, result)
            }));
        }
        self.state.save(&record)?;
        let (done, failures) = join_machines(tasks).await;
        halted.extend(done.into_iter().map(|(name, ())| name));
        if !self.any_running() {
            remove_networks(&self.state, &mut record)?;
            self.state.save(&record)?;
        }
        all_succeeded(failures).map(|()| halted)
    }

    fn any_running(&self) -> bool {
        self.topology.machines.iter().any(|machine| {
            self.provider_of(machine)
                .map(|p| p.state(&self.state.machine_dir(&machine.name)) == VmState::Running)
                .unwrap_or(false)
        })
    }
}

/// Waits for every machine's task: what succeeded, by machine, and a line
/// per failure (a machine's failure never cuts the others short).
async fn join_machines<T>(
    tasks: Vec<tokio::task::JoinHandle<(String, Result<T>)>>,
) -> (Vec<(String, T)>, Vec<String>) {
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok((name, Ok(value))) => done.push((name, value)),
            Ok((_, Err(e))) => failures.push(e.to_string()),
            Err(join) => failures.push(format!("internal error: {join}")),
        }
    }
    (done, failures)
}

fn all_succeeded(failures: Vec<String>) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    Err(Error::Several {
        count: failures.len(),
        details: failures.join("\n"),
    })
}

/// Takes down every network the record says is up (once no machine runs),
/// and any network folder the record missed (an `up` killed mid-way), with
/// the default provider.
fn remove_networks(state: &StateDir, record: &mut Record) -> Result<()> {
    let mut networks = std::mem::take(&mut record.networks);
    if let Ok(entries) = std::fs::read_dir(state.root().join("networks")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            networks.entry(name).or_default();
        }
    }
    for (name, recorded) in networks {
        let dir = state.network_dir(&name);
        let kind = provider::kind_made(&dir).unwrap_or(recorded);
        provider::for_kind(kind, &provider::Settings::default())?
            .remove_network(&NetworkSpec { dir, name })?;
    }
    Ok(())
}

/// Everything `up` knows about one machine before touching it.
struct MachinePlan {
    machine: Machine,
    provider: Box<dyn Provider>,
    spec: VmSpec,
    seed: Seed,
    observed: VmState,
    kvm: bool,
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
struct UpContext {
    state: StateDir,
    record: Arc<Mutex<Record>>,
    machines: Arc<Machines>,
    readiness: Arc<Readiness>,
    topology: Arc<Topology>,
    secrets: Arc<Secrets>,
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

/// The build must be able to run and to feed every artifact: the builder
/// must not wait for its own build, and each artifact a machine or its kits
/// name must be one of the build's outputs.
fn check_build(topology: &Topology) -> Result<()> {
    let Some(plan) = &topology.build else {
        return Ok(());
    };
    for machine in &topology.machines {
        let mut artifacts = machine.artifacts.clone();
        for daemon in &machine.daemons {
            artifacts.extend(
                crate::kit::Kit::load(daemon, topology.dir())?
                    .manifest
                    .artifacts,
            );
        }
        if let Some(missing) = artifacts.iter().find(|a| !plan.outputs.contains(a)) {
            return Err(Error::ArtifactNotBuilt {
                machine: machine.name.clone(),
                artifact: missing.clone(),
                path: topology.path.clone(),
            });
        }
        let builds_here = plan.builder == Builder::Machine(machine.name.clone());
        if builds_here && !artifacts.is_empty() {
            return Err(Error::BuilderNeedsArtifacts {
                builder: machine.name.clone(),
            });
        }
    }
    Ok(())
}

/// Starts the build step of `up` unless it is current: on the host at once,
/// on a machine as soon as it answers SSH (not waiting for its daemons or
/// dependencies, which could wait for the build). Opens [`BUILD_GATE`].
fn spawn_build(
    ctx: &UpContext,
    current: bool,
    progress: &Progress,
) -> Option<tokio::task::JoinHandle<Result<BuildOutcome>>> {
    let plan = ctx.topology.build.clone()?;
    if current {
        ctx.readiness.set(BUILD_GATE, true);
        return None;
    }
    let task = progress.task("build");
    let ctx = ctx.clone();
    Some(tokio::spawn(async move {
        let result = run_build(&plan, &ctx, &task).await;
        ctx.readiness.set(BUILD_GATE, result.is_ok());
        task.finish(&match &result {
            Ok(outcome) => outcome.summary(),
            Err(e) => format!("failed: {}", first_line(&e.to_string())),
        });
        result
    }))
}

async fn run_build(plan: &topology::Build, ctx: &UpContext, task: &Task) -> Result<BuildOutcome> {
    let hash = build::inputs_hash(plan, ctx.topology.dir())?;
    let log = ctx.state.build_log();
    let on_line = |line: &str| task.set(line);
    let outcome = match &plan.builder {
        Builder::Host => build::run_on_host(plan, &ctx.topology, &log, &on_line).await?,
        Builder::Machine(name) => {
            task.set(&format!("waiting for {name}"));
            if !ctx.readiness.wait(&provision::reachable(name)).await {
                return Err(Error::BuilderNotRunning(name.clone()));
            }
            let session = ctx.machines.session(name).await?;
            build::run_on_machine(plan, &ctx.topology, &session, &log, &on_line).await?
        }
    };
    let mut record = lock_record(&ctx.record);
    record.build = Some(hash);
    ctx.state.save(&record)?;
    Ok(outcome)
}

fn lock_record(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        plan.spec.kvm = plan.kvm;
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
        if attempt > 0 || spec.ssh_port == 0 || !port_is_free(spec.ssh_port) {
            spec.ssh_port = free_port()?;
        }
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
    Err(last
        .unwrap_or_else(|| ProviderError::Other("no free port".into()))
        .into())
}

fn free_port() -> std::result::Result<u16, ProviderError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| ProviderError::Io {
            what: "cannot find a free port on 127.0.0.1".into(),
            source,
        })
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, ProviderError> + Send + 'static,
) -> std::result::Result<T, ProviderError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ProviderError::Other(format!("internal error: {e}")))?
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

/// The last `lines` lines of a console log, or a note that there is none.
pub fn console_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no console log: {e})"),
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

/// Asks the guest to power off over SSH; stops the VM when it has not gone
/// within the timeout, or at once when SSH does not answer.
async fn power_off(provider: Box<dyn Provider>, dir: PathBuf, target: Target) -> Result<()> {
    let provider: Arc<dyn Provider> = Arc::from(provider);
    if let Ok(session) = Session::connect(&target, Duration::from_secs(10)).await {
        // The connection drops as the guest goes down: the result is moot.
        let _ = session.exec("systemctl poweroff --no-block").await;
        session.close().await;
        let deadline = Instant::now() + HALT_TIMEOUT;
        while Instant::now() < deadline && observe(provider.clone(), &dir).await == VmState::Running
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    blocking(move || provider.kill(&dir)).await?;
    Ok(())
}

/// `status` words: not-created, running, stopped, crashed.
fn state_word(saved: Option<&MachineRecord>, observed: VmState) -> &'static str {
    match (saved, observed) {
        (_, VmState::Running) => "running",
        (None, _) | (_, VmState::Absent) => "not-created",
        (Some(saved), VmState::Stopped) if saved.desired == Desired::Running => "crashed",
        (Some(_), VmState::Stopped) => "stopped",
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// Removes every machine, network and process of the testbed, from what is
/// on disk (so it works even when the topology file is gone or broken).
pub async fn destroy(state: &StateDir, progress: &Progress) -> Result<Vec<String>> {
    let _lock = state.lock()?;
    // A corrupt record must not stand in the way of removing what is there.
    let mut record = state.load().unwrap_or_default();
    let mut removed = Vec::new();
    let machines_dir = state.root().join("machines");
    let names: Vec<String> = std::fs::read_dir(&machines_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        let dir = state.machine_dir(&name);
        let recorded = record.machines.get(&name).map(|r| r.provider);
        let kind = provider::kind_made(&dir).or(recorded).unwrap_or_default();
        let provider = provider::for_kind(kind, &provider::Settings::default())?;
        let task = progress.task(&name);
        task.set("destroying");
        stop_control_master(state, &name).await;
        blocking(move || provider.destroy(&dir)).await?;
        task.finish("destroyed");
        removed.push(name);
    }
    remove_networks(state, &mut record)?;
    // Removed while the lock is held (the lock file goes with the folder).
    state.remove()?;
    Ok(removed)
}

/// Closes the OpenSSH ControlMaster that `testbed ssh` keeps per machine,
/// and the one `up` started if it is still authenticating.
async fn stop_control_master(state: &StateDir, name: &str) {
    let pid_file = master_pid_path(state, name);
    if provider::qemu::process_alive(&pid_file, CONTROL_MASTER_MARKER) {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let config = state.ssh_config();
    if !config.is_file() {
        return;
    }
    let _ = tokio::process::Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-O", "exit", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// Starts each machine's OpenSSH ControlMaster in the background, so the
/// first `testbed ssh` after `up` skips the key exchange like the next ones.
/// `up` does not wait for it (a handshake costs the guest about a second
/// under emulation); the pid of the authenticating `ssh -fN` is kept so that
/// `testbed ssh` can wait for the master instead of racing it.
fn start_control_masters(state: &StateDir, names: &[String]) {
    for name in names {
        let spawned = std::process::Command::new("ssh")
            .arg("-F")
            .arg(state.ssh_config())
            .args([
                "-o",
                CONTROL_MASTER_MARKER,
                "-o",
                "BatchMode=yes",
                "-fN",
                name,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(child) = spawned {
            let _ = std::fs::write(master_pid_path(state, name), child.id().to_string());
        }
    }
}

const CONTROL_MASTER_MARKER: &str = "ControlMaster=yes";

fn master_pid_path(state: &StateDir, name: &str) -> PathBuf {
    state.machine_dir(name).join("ssh-master.pid")
}

/// Waits (a few seconds at most) while the ControlMaster that `up` started
/// for `name` is still authenticating.
pub fn wait_for_control_master(state: &StateDir, name: &str) {
    let pid_file = master_pid_path(state, name);
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider::qemu::process_alive(&pid_file, CONTROL_MASTER_MARKER)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of a machine's ControlMaster socket.
pub fn control_path(state: &StateDir, name: &str) -> PathBuf {
    state.machine_dir(name).join("ssh.ctl")
}

/// Writes `ssh_config` and `known_hosts` for the system `ssh`: every host key
/// pinned under an alias (ports change across boots; the key does not), and
/// a ControlMaster per machine so repeated `testbed ssh` skip the handshake.
pub fn write_ssh_config(state: &StateDir, topology_name: &str, record: &Record) -> Result<()> {
    let mut config = String::new();
    let mut known_hosts = String::new();
    for (name, saved) in &record.machines {
        let dir = state.machine_dir(name);
        let public =
            std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).unwrap_or_default();
        let alias = format!("testbed-{topology_name}-{name}");
        if let Some(key) = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .get(..2)
        {
            known_hosts.push_str(&format!("{alias} {} {}\n", key[0], key[1]));
        }
        config.push_str(&ssh_config_block(state, name, saved.ssh_port, &alias));
    }
    crate::state::write_atomic(&state.known_hosts(), known_hosts.as_bytes(), 0o644)?;
    crate::state::write_atomic(&state.ssh_config(), config.as_bytes(), 0o644)?;
    Ok(())
}

fn ssh_config_block(state: &StateDir, name: &str, port: u16, alias: &str) -> String {
    format!(
        "Host {name}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  HostKeyAlias {alias}\n  \
         ControlMaster auto\n  ControlPath {control}\n  ControlPersist 10m\n  LogLevel ERROR\n\n",
        key = quote_ssh(&state.user_key()),
        known = quote_ssh(&state.known_hosts()),
        control = quote_ssh(&control_path(state, name)),
    )
}

/// ssh_config values with spaces must be double-quoted.
fn quote_ssh(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(desired: Desired) -> MachineRecord {
        MachineRecord {
            provider: crate::topology::ProviderKind::Qemu,
            image: "debian-12-h".into(),
            spec: "s".into(),
            ssh_port: 2222,
            desired,
            identity: None,
            daemons: BTreeMap::new(),
            artifacts: None,
        }
    }

    #[test]
    fn status_words_follow_record_and_observation() {
        let running = record(Desired::Running);
        let halted = record(Desired::Stopped);
        assert_eq!(state_word(None, VmState::Absent), "not-created");
        assert_eq!(state_word(Some(&running), VmState::Running), "running");
        assert_eq!(state_word(Some(&running), VmState::Stopped), "crashed");
        assert_eq!(state_word(Some(&halted), VmState::Stopped), "stopped");
        assert_eq!(state_word(Some(&halted), VmState::Absent), "not-created");
    }

    #[test]
    fn ssh_config_pins_the_host_key_and_shares_one_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let machine_dir = state.machine_dir("alpha");
        std::fs::create_dir_all(&machine_dir).expect("dir");
        std::fs::write(
            machine_dir.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3Nz root@alpha\n",
        )
        .expect("key");
        let mut rec = Record::default();
        rec.machines
            .insert("alpha".into(), record(Desired::Running));
        write_ssh_config(&state, "pair", &rec).expect("write");
        let config = std::fs::read_to_string(state.ssh_config()).expect("config");
        assert!(config.contains("Host alpha\n"));
        assert!(config.contains("Port 2222"));
        assert!(config.contains("StrictHostKeyChecking yes"));
        assert!(config.contains("HostKeyAlias testbed-pair-alpha"));
        assert!(config.contains("ControlMaster auto"));
        let known = std::fs::read_to_string(state.known_hosts()).expect("known_hosts");
        assert_eq!(known, "testbed-pair-alpha ssh-ed25519 AAAAC3Nz\n");
    }
}
