//! The build step and `[[steps]]`: `build`, `run STEP`, `verify`, and the build `up` spawns.

use std::time::Instant;

use crate::build::{self, BuildOutcome};
use crate::check;
use crate::kit::Kits;
use crate::model::{self, Builder, Step, StepCommand, Topology};
use crate::progress::{Progress, Task};
use crate::provision::{Gate, Machines};
use crate::ssh;
use crate::state::{Access, Record};

use super::up::UpContext;
use super::{first_line, lock_record, Error, Result, Testbed};

/// What `testbed run STEP` did.
#[derive(Debug)]
pub struct StepReport {
    pub step: Step,
    /// What the step's fault made so, when it has one.
    pub fault: Option<String>,
    /// The exit status of the step's command, when it has one.
    pub exit_status: Option<u32>,
    pub seconds: f64,
    /// The step's checks, run when its command succeeded.
    pub checks: Option<check::Report>,
}

impl StepReport {
    pub fn passed(&self) -> bool {
        self.command_succeeded() && self.checks.as_ref().is_none_or(|c| c.passed())
    }

    pub fn command_succeeded(&self) -> bool {
        self.exit_status.is_none_or(|status| status == 0)
    }
}

impl Testbed {
    /// Whether the build step is absent or its recorded result still holds.
    pub(super) fn build_current(&self, record: &Record) -> Result<bool> {
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
        self.check_build(&self.kits()?)?;
        self.state.create()?;
        let _lock = self.lock(Access::Exclusive)?;
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
                let machines = self.sessions()?;
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

    /// `testbed run STEP`: the step's fault, then its command on its
    /// machine (output passed to `on_output` as it comes), then its checks
    /// when the command succeeded.
    pub async fn run_step(
        &self,
        name: &str,
        progress: &Progress,
        on_output: impl FnMut(ssh::Stream, &[u8]) + Send,
    ) -> Result<StepReport> {
        let step = self.step(name)?.clone();
        let started = Instant::now();
        let fault = match &step.fault {
            Some(fault) => Some(self.inject(fault, progress).await?),
            None => None,
        };
        let _lock = self.lock(Access::Shared)?;
        let machines = self.sessions()?;
        let exit_status = match &step.command {
            Some(command) => {
                let ran = self.run_command(&step, command, &machines, on_output).await;
                if ran.is_err() {
                    machines.close().await;
                }
                Some(ran?)
            }
            None => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let checks = if exit_status.is_none_or(|s| s == 0) && !step.checks.is_empty() {
            Some(check::run_all(&step.checks, &self.topology, machines.clone()).await)
        } else {
            None
        };
        machines.close().await;
        Ok(StepReport {
            step,
            fault,
            exit_status,
            seconds,
            checks,
        })
    }

    /// A step's command within its timeout; its exit status.
    async fn run_command(
        &self,
        step: &Step,
        command: &StepCommand,
        machines: &Machines,
        on_output: impl FnMut(ssh::Stream, &[u8]) + Send,
    ) -> Result<u32> {
        let session = machines.session(&command.machine).await?;
        let output = session
            .exec_streaming_within(&command.run, step.timeout, on_output)
            .await
            .map_err(|source| Error::Ssh {
                machine: command.machine.clone(),
                source,
            })?;
        match output {
            Some(output) => Ok(output.exit_status),
            None => Err(Error::StepTimedOut {
                name: step.name.clone(),
                machine: command.machine.clone(),
                after: step.timeout,
            }),
        }
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

    /// Runs the topology's checks alone.
    pub async fn verify(&self) -> Result<check::Report> {
        let _lock = self.lock(Access::Shared)?;
        let machines = self.sessions()?;
        let report = check::run_all(&self.topology.checks, &self.topology, machines.clone()).await;
        machines.close().await;
        Ok(report)
    }
}

/// The build must be able to run and to feed every artifact: the builder
/// must not wait for its own build, and each artifact a machine or its kits
/// name must be one of the build's outputs.
pub(super) fn check_build(topology: &Topology, kits: &Kits) -> Result<()> {
    let Some(plan) = &topology.build else {
        return Ok(());
    };
    for machine in &topology.machines {
        // Each artifact with where it is asked for.
        let mut artifacts: Vec<(String, String)> = machine
            .artifacts
            .iter()
            .map(|a| {
                (
                    a.clone(),
                    format!("`artifacts` of [machines.{}]", machine.name),
                )
            })
            .collect();
        for kit in kits.of(machine) {
            let manifest = kit.manifest_path().display().to_string();
            artifacts.extend(
                kit.manifest
                    .artifacts
                    .iter()
                    .map(|a| (a.clone(), format!("`artifacts` in {manifest}"))),
            );
        }
        if let Some((missing, wanted_by)) = artifacts
            .iter()
            .find(|(artifact, _)| !plan.outputs.contains(artifact))
        {
            return Err(Error::ArtifactNotBuilt {
                machine: machine.name.clone(),
                artifact: missing.clone(),
                wanted_by: wanted_by.clone(),
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
/// dependencies, which could wait for the build). Opens [`Gate::Build`].
pub(super) fn spawn_build(
    ctx: &UpContext,
    current: bool,
    progress: &Progress,
) -> Option<tokio::task::JoinHandle<Result<BuildOutcome>>> {
    let plan = ctx.topology.build.clone()?;
    if current {
        ctx.readiness.set(&Gate::Build, true);
        return None;
    }
    let task = progress.task("build");
    let ctx = ctx.clone();
    Some(tokio::spawn(async move {
        let result = run_build(&plan, &ctx, &task).await;
        ctx.readiness.set(&Gate::Build, result.is_ok());
        task.finish(&match &result {
            Ok(outcome) => outcome.summary(),
            Err(e) => format!("failed: {}", first_line(&e.to_string())),
        });
        result
    }))
}

async fn run_build(plan: &model::Build, ctx: &UpContext, task: &Task) -> Result<BuildOutcome> {
    let hash = build::inputs_hash(plan, ctx.topology.dir())?;
    let log = ctx.state.build_log();
    let on_line = |line: &str| task.set(line);
    let outcome = match &plan.builder {
        Builder::Host => build::run_on_host(plan, &ctx.topology, &log, &on_line).await?,
        Builder::Machine(name) => {
            task.set(&format!("waiting for {name}"));
            if !ctx.readiness.wait(&Gate::Reachable(name.clone())).await {
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
