//! Pushes each machine's rendered kit files and starts its daemons, in
//! dependency order: a machine's daemons start once its own SSH is up and
//! the daemons of every machine it `depends_on` are ready (their readiness
//! checks pass). Independent chains run in parallel; nothing waits on a
//! fixed sleep. Also the SSH transport that checks travel through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, OnceCell};

use crate::check::{self, BoxedStream, CommandOutput, Transport};
use crate::files::ReadError;
use crate::inventory::{self, Inventory};
use crate::model::{ProvisionRun, Script, Topology};
use crate::plan::{
    artifacts_hash, daemon_hash, guest_artifact_path, Applied, DaemonAction, DaemonPlan,
    MachinePlan, PlanError, ProvisionerAction, ProvisionerPlan, Rendered,
};
use crate::provisioners::{self, ANSIBLE_PLAYBOOK};
use crate::ssh::mux::{Master, MuxError};
use crate::ssh::{self, Endpoint, Session, SshError, Target};
use crate::state::StateDir;

/// How long a machine's SSH may take to answer when provisioning.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{machine}: {source}")]
    Ssh { machine: String, source: SshError },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{machine}: {daemon} did not become ready: {detail}\n{evidence}")]
    NotReady {
        machine: String,
        daemon: String,
        detail: String,
        evidence: String,
    },
    #[error("{machine}: not started because {dependency} failed")]
    DependencyFailed { machine: String, dependency: Gate },
    #[error("{machine}: `{command}` failed ({status}): {stderr}")]
    Command {
        machine: String,
        command: String,
        status: u32,
        stderr: String,
    },
    #[error("{machine}: cannot record what was provisioned: {source}")]
    Record {
        machine: String,
        source: crate::state::StateError,
    },
    #[error("{0}: not created yet (run `testbed up`)")]
    NotCreated(String),
    #[error("{machine}: {provisioner} failed ({status}); its last lines:\n{tail}")]
    ProvisionerFailed {
        machine: String,
        provisioner: String,
        status: String,
        tail: String,
    },
    #[error(
        "{machine}: {provisioner} needs `{ANSIBLE_PLAYBOOK}`, which is not on PATH\n  help: \
         install ansible-core on this computer: `sudo apt-get install ansible-core` on Debian \
         and Ubuntu, or `pipx install ansible-core`"
    )]
    NoAnsible {
        machine: String,
        provisioner: String,
    },
    #[error("{machine}: {provisioner}: {source}")]
    ProvisionerFile {
        machine: String,
        provisioner: String,
        source: ReadError,
    },
    #[error("{machine}: {provisioner}: cannot start `{ANSIBLE_PLAYBOOK}`: {error}")]
    AnsibleStart {
        machine: String,
        provisioner: String,
        error: std::io::Error,
    },
    #[error("{machine}: cannot write the Ansible inventory: {source}")]
    Inventory {
        machine: String,
        source: crate::state::StateError,
    },
}

type Result<T> = std::result::Result<T, ProvisionError>;

/// What provisioning did to one daemon.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub machine: String,
    pub daemon: String,
    pub action: DaemonAction,
}

/// What provisioning did with one of a machine's provisioners.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvisionerOutcome {
    pub machine: String,
    pub provisioner: String,
    pub action: ProvisionerAction,
}

/// What provisioning a machine did: to its daemons, with its provisioners.
#[derive(Debug, Clone, Default)]
pub struct Provisioned {
    pub daemons: Vec<Outcome>,
    pub provisioners: Vec<ProvisionerOutcome>,
}

/// A machine's ControlMaster once tried: `None` when it did not answer.
type MasterSlot = OnceCell<Option<Arc<Master>>>;

/// One SSH connection per machine, opened on first use and shared by every
/// step of a command (provisioning, readiness, checks, evidence).
pub struct Machines {
    state: StateDir,
    /// Where each created machine's SSH is reached (its provider says).
    endpoints: std::sync::Mutex<BTreeMap<String, Endpoint>>,
    /// The systemd services of each machine's kits (for evidence).
    services: BTreeMap<String, Vec<String>>,
    /// A slot per machine, so machines connect in parallel while two steps
    /// on one machine share a single connection.
    sessions: std::sync::Mutex<BTreeMap<String, Arc<Mutex<Option<Session>>>>>,
    /// The ControlMaster socket to try first, by machine; a machine leaves
    /// the map when its master is gone, and then gets a connection of its own.
    control_sockets: std::sync::Mutex<BTreeMap<String, PathBuf>>,
    masters: std::sync::Mutex<BTreeMap<String, Arc<MasterSlot>>>,
}

impl Machines {
    /// `services`: each machine's daemon units, whose journals are the
    /// evidence of a failed check.
    pub fn new(state: StateDir, services: BTreeMap<String, Vec<String>>) -> Machines {
        Machines {
            state,
            endpoints: std::sync::Mutex::new(BTreeMap::new()),
            services,
            sessions: std::sync::Mutex::new(BTreeMap::new()),
            control_sockets: std::sync::Mutex::new(BTreeMap::new()),
            masters: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Commands, uploads and tunnels to `machine` ride the OpenSSH
    /// ControlMaster at `socket` while it is alive, instead of a connection
    /// of their own.
    pub fn prefer_control_master(&self, machine: &str, socket: PathBuf) {
        lock(&self.control_sockets).insert(machine.to_string(), socket);
    }

    /// The machine's ControlMaster, attached on first use, when it has a
    /// live one. None once interrupted: the own connection's path refuses
    /// to start anything new and says why.
    async fn master(&self, machine: &str) -> Option<Arc<Master>> {
        if crate::process::interrupted() {
            return None;
        }
        let socket = lock(&self.control_sockets).get(machine).cloned()?;
        let cell = lock(&self.masters)
            .entry(machine.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| async { Master::attach(&socket).await.map(Arc::new) })
            .await
            .clone()
    }

    /// `operation` through the machine's ControlMaster; `None` when it has
    /// none alive, or when it failed there: then the machine's commands
    /// take a connection of their own from now on.
    async fn through_master<T, F>(
        &self,
        machine: &str,
        operation: impl FnOnce(Arc<Master>) -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = std::result::Result<T, MuxError>>,
    {
        let master = self.master(machine).await?;
        match operation(master).await {
            Ok(value) => Some(value),
            Err(_) => {
                lock(&self.control_sockets).remove(machine);
                None
            }
        }
    }

    pub fn set_endpoint(&self, machine: &str, endpoint: Endpoint) {
        lock(&self.endpoints).insert(machine.to_string(), endpoint);
    }

    /// Where each machine's SSH is reached, by machine.
    pub fn endpoints(&self) -> BTreeMap<String, Endpoint> {
        lock(&self.endpoints).clone()
    }

    /// Hands over a connection opened elsewhere (by `up`'s boot step).
    pub async fn adopt(&self, machine: &str, session: Session) {
        *self.slot(machine).lock().await = Some(session);
    }

    fn slot(&self, machine: &str) -> Arc<Mutex<Option<Session>>> {
        lock(&self.sessions)
            .entry(machine.to_string())
            .or_default()
            .clone()
    }

    fn target(&self, machine: &str) -> Result<Target> {
        let endpoint = lock(&self.endpoints)
            .get(machine)
            .cloned()
            .filter(|endpoint| endpoint.addr.port() != 0)
            .ok_or_else(|| ProvisionError::NotCreated(machine.to_string()))?;
        Ok(Target::root(
            endpoint,
            self.state.user_key(),
            self.state.machine(machine).host_public_key(),
        ))
    }

    /// The machine's session, connecting the first time.
    pub async fn session(&self, machine: &str) -> Result<Session> {
        self.session_with(
            machine,
            Session::connect(&self.target(machine)?, CONNECT_TIMEOUT),
        )
        .await
    }

    /// The session of a machine just resumed (from a snapshot or a pause):
    /// its network is up, but a loaded guest may take long to answer, so a
    /// new connection may take up to `deadline` and is never one of many
    /// (see [`Session::connect_running`]).
    pub async fn resumed_session(&self, machine: &str, deadline: Duration) -> Result<Session> {
        self.session_with(
            machine,
            Session::connect_running(&self.target(machine)?, deadline),
        )
        .await
    }

    async fn session_with(
        &self,
        machine: &str,
        connecting: impl std::future::Future<
            Output = std::result::Result<Session, crate::ssh::SshError>,
        >,
    ) -> Result<Session> {
        let slot = self.slot(machine);
        let mut slot = slot.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(session.clone());
        }
        let session = connecting.await.map_err(|source| ProvisionError::Ssh {
            machine: machine.to_string(),
            source,
        })?;
        *slot = Some(session.clone());
        Ok(session)
    }

    pub async fn close(&self) {
        let slots: Vec<_> = lock(&self.sessions).values().cloned().collect();
        for slot in slots {
            if let Some(session) = slot.lock().await.take() {
                session.close().await;
            }
        }
        let masters: Vec<_> = lock(&self.masters).values().cloned().collect();
        for master in masters
            .iter()
            .filter_map(|cell| cell.get().cloned().flatten())
        {
            master.close().await;
        }
    }

    async fn run(&self, machine: &str, command: &str) -> Result<crate::ssh::ExecOutput> {
        if let Some(output) = self
            .through_master(machine, |master| async move { master.exec(command).await })
            .await
        {
            return Ok(output);
        }
        self.on_session(
            machine,
            |session| async move { session.exec(command).await },
        )
        .await
    }

    /// Writes `data` to `dest` on the machine (see [`Session::upload`]).
    async fn upload(&self, machine: &str, data: &[u8], dest: &str, mode: u32) -> Result<()> {
        let uploading = |master: Arc<Master>| async move { master.upload(data, dest, mode).await };
        match self.through_master(machine, uploading).await {
            Some(output) if output.success() => return Ok(()),
            Some(output) => {
                return Err(ProvisionError::Command {
                    machine: machine.to_string(),
                    command: format!("writing {dest}"),
                    status: output.exit_status,
                    stderr: output.stderr_lossy().trim().to_string(),
                })
            }
            None => {}
        }
        self.on_session(machine, |session| async move {
            session.upload(data, dest, mode).await
        })
        .await
    }

    /// Runs `attempt` on the machine's session and, when the connection was
    /// lost meanwhile (sshd restarted or killed under it), once more on a
    /// new connection: provisioning commands may run twice.
    async fn on_session<T, F>(&self, machine: &str, attempt: impl Fn(Session) -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, crate::ssh::SshError>>,
    {
        let ssh_error = |source| ProvisionError::Ssh {
            machine: machine.to_string(),
            source,
        };
        let session = self.session(machine).await?;
        match attempt(session.clone()).await {
            Err(error) if error.lost_connection() => {
                self.forget(machine, &session).await;
                let session = self.session(machine).await?;
                attempt(session).await.map_err(ssh_error)
            }
            done => done.map_err(ssh_error),
        }
    }

    /// Drops the machine's session when it is still `lost`, so the next
    /// use connects anew.
    async fn forget(&self, machine: &str, lost: &Session) {
        let slot = self.slot(machine);
        let mut slot = slot.lock().await;
        if slot.as_ref().is_some_and(|held| held.same_connection(lost)) {
            if let Some(session) = slot.take() {
                session.close().await;
            }
        }
    }

    /// Runs `command` on the machine's own session (not retried on a lost
    /// connection: a provisioner may not be run twice), passing its output
    /// line by line to `on_line`.
    async fn run_streaming(
        &self,
        machine: &str,
        command: &str,
        on_line: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<crate::ssh::ExecOutput> {
        let session = self.session(machine).await?;
        let mut lines = Lines::default();
        let output = session
            .exec_streaming(command, |_, bytes: &[u8]| lines.feed(bytes, on_line))
            .await
            .map_err(|source| ProvisionError::Ssh {
                machine: machine.to_string(),
                source,
            })?;
        lines.finish(on_line);
        Ok(output)
    }

    async fn run_ok(&self, machine: &str, command: &str) -> Result<()> {
        let output = self.run(machine, command).await?;
        if output.success() {
            return Ok(());
        }
        Err(ProvisionError::Command {
            machine: machine.to_string(),
            command: command.to_string(),
            status: output.exit_status,
            stderr: output.stderr_lossy().trim().to_string(),
        })
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Transport for Machines {
    async fn open_tcp(&self, via: &str, host: &str, port: u16) -> std::io::Result<BoxedStream> {
        if let Some(stream) = self
            .through_master(
                via,
                |master| async move { master.open_tcp(host, port).await },
            )
            .await
        {
            return Ok(Box::new(stream));
        }
        let session = self.session(via).await.map_err(io_error)?;
        let stream = session.open_tcp(host, port).await.map_err(io_error)?;
        Ok(Box::new(stream))
    }

    async fn exec(&self, machine: &str, command: &str) -> std::io::Result<CommandOutput> {
        let output = self.run(machine, command).await.map_err(io_error)?;
        Ok(CommandOutput {
            status: output.exit_status as i32,
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }

    /// The journal of the machine's daemons and the tail of its console.
    async fn evidence(&self, machine: &str) -> String {
        let mut evidence = String::new();
        for service in self.services.get(machine).into_iter().flatten() {
            let command = format!(
                "journalctl --no-pager -n 15 -u {}",
                ssh::shell_quote(service)
            );
            if let Ok(output) = self.run(machine, &command).await {
                evidence.push_str(&format!(
                    "--- journal of {service} on {machine}:\n{}",
                    output.stdout_lossy()
                ));
            }
        }
        evidence.push_str(&format!(
            "--- console of {machine} (last lines):\n{}\n",
            self.state.machine(machine).console_tail(8)
        ));
        evidence
    }
}

/// What a machine's provisioning may wait for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gate {
    /// Every daemon of the machine is ready.
    Daemons(String),
    /// The machine answers SSH with its identity applied (before its own
    /// daemons and dependencies): what the build waits for on its builder.
    Reachable(String),
    /// The build's outputs are in `dist/` (or the build was current).
    Build,
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gate::Daemons(machine) => f.write_str(machine),
            Gate::Reachable(machine) => write!(f, "{machine} (reachable)"),
            Gate::Build => f.write_str("the build"),
        }
    }
}

/// Readiness of each [`Gate`], shared between the machines' tasks: `None`
/// while pending, then whether it opened.
pub struct Readiness {
    senders: BTreeMap<Gate, watch::Sender<Option<bool>>>,
}

impl Readiness {
    /// A gate per machine's daemons, per machine's SSH, and for the build.
    pub fn new(topology: &Topology) -> Readiness {
        let mut senders = BTreeMap::new();
        for machine in &topology.machines {
            senders.insert(Gate::Daemons(machine.name.clone()), watch::channel(None).0);
            senders.insert(
                Gate::Reachable(machine.name.clone()),
                watch::channel(None).0,
            );
        }
        if topology.build.is_some() {
            senders.insert(Gate::Build, watch::channel(None).0);
        }
        Readiness { senders }
    }

    pub fn set(&self, gate: &Gate, ready: bool) {
        if let Some(sender) = self.senders.get(gate) {
            sender.send_replace(Some(ready));
        }
    }

    /// Sets `gate` unless it is set already (a machine that failed after it
    /// became reachable stays reachable).
    pub fn settle(&self, gate: &Gate, ready: bool) {
        if let Some(sender) = self.senders.get(gate) {
            sender.send_if_modified(|value| {
                let pending = value.is_none();
                if pending {
                    *value = Some(ready);
                }
                pending
            });
        }
    }

    /// Waits until `gate` opens; false if it failed.
    pub async fn wait(&self, gate: &Gate) -> bool {
        let Some(sender) = self.senders.get(gate) else {
            return true;
        };
        let mut receiver = sender.subscribe();
        let ready = match receiver.wait_for(Option::is_some).await {
            Ok(value) => value.unwrap_or(false),
            Err(_) => false,
        };
        ready
    }
}

/// What provisioning a machine works with besides the machine itself.
#[derive(Clone, Copy)]
pub struct Cluster<'a> {
    pub topology: &'a Topology,
    pub machines: &'a Machines,
    pub readiness: &'a Readiness,
}

/// Provisions one machine as its plan says, once its dependencies (and the
/// build, when it needs artifacts) are ready: stops the daemons it no
/// longer runs, pushes its artifacts and the rendered files of each kit
/// that changed, (re)starts what changed or is not running, waits for
/// readiness; then runs the provisioners the plan says run. `applied` is
/// what the record says is on the machine; `on_applied` records each step
/// as it is done; `on_line` gets the provisioners' output, line by line.
pub async fn provision_machine(
    cluster: &Cluster<'_>,
    plan: &MachinePlan,
    applied: &Applied,
    on_step: &(dyn Fn(&str) + Send + Sync),
    on_line: &(dyn Fn(&str) + Send + Sync),
    on_applied: &(dyn Fn(&Applied) -> std::result::Result<(), crate::state::StateError>
          + Send
          + Sync),
) -> Result<Provisioned> {
    let Cluster {
        topology,
        machines,
        readiness,
    } = *cluster;
    let machine = &plan.machine;
    let mut waits: Vec<Gate> = machine
        .depends_on
        .iter()
        .map(|name| Gate::Daemons(name.clone()))
        .collect();
    if plan.needs_build {
        waits.push(Gate::Build);
    }
    for gate in waits {
        on_step(&format!("waiting for {gate}"));
        if !readiness.wait(&gate).await {
            return Err(ProvisionError::DependencyFailed {
                machine: machine.name.clone(),
                dependency: gate,
            });
        }
    }
    // What is on the machine, recorded after each step that changes it, so
    // a failure part-way leaves a record that matches the guest.
    let mut now = applied.clone();
    let record = |now: &Applied| {
        on_applied(now).map_err(|source| ProvisionError::Record {
            machine: machine.name.clone(),
            source,
        })
    };
    let mut outcomes = Vec::new();
    for daemon in plan
        .daemons
        .iter()
        .filter(|d| d.action == DaemonAction::Stop)
    {
        on_step(&format!("stopping {}", daemon.name));
        stop_daemon(machines, &machine.name, daemon).await?;
        now.daemons.remove(&daemon.name);
        record(&now)?;
        outcomes.push(Outcome {
            machine: machine.name.clone(),
            daemon: daemon.name.clone(),
            action: DaemonAction::Stop,
        });
    }
    now.daemons
        .retain(|daemon, _| machine.daemons.contains(daemon));
    if machine.artifacts.is_empty() {
        now.artifacts = None;
    } else {
        // Known from the plan, or (after a build it waited for) now.
        let hash = match &plan.artifacts {
            Some(hash) => hash.clone(),
            None => artifacts_hash(topology, &machine.name, &machine.artifacts)?,
        };
        if applied.artifacts.as_ref() != Some(&hash) {
            on_step("pushing artifacts");
            push_artifacts(topology, machines, &machine.name, &machine.artifacts).await?;
        }
        now.artifacts = Some(hash);
    }
    record(&now)?;
    for daemon in plan
        .daemons
        .iter()
        .filter(|d| d.action != DaemonAction::Stop)
    {
        let Some(rendered) = &daemon.rendered else {
            continue;
        };
        let hash = match &daemon.hash {
            Some(hash) => hash.clone(),
            None => daemon_hash(topology, &machine.name, rendered)?,
        };
        let changed = applied.differs(&daemon.name, &hash);
        if changed {
            on_step(&format!("pushing {} files", daemon.name));
            let artifacts = &rendered.kit.manifest.artifacts;
            push_artifacts(topology, machines, &machine.name, artifacts).await?;
            push_files(machines, &machine.name, rendered).await?;
        }
        let action = start_or_restart(machines, &machine.name, rendered, changed, on_step).await?;
        wait_ready(cluster, &machine.name, rendered, on_step).await?;
        now.daemons.insert(daemon.name.clone(), hash);
        record(&now)?;
        outcomes.push(Outcome {
            machine: machine.name.clone(),
            daemon: daemon.name.clone(),
            action,
        });
    }
    let provisioners = run_provisioners(cluster, plan, &mut now, on_step, on_line, &record).await?;
    Ok(Provisioned {
        daemons: outcomes,
        provisioners,
    })
}

/// Runs the provisioners the plan says run, in order, recording each once
/// it ran through; forgets those no longer in the machine's list.
async fn run_provisioners(
    cluster: &Cluster<'_>,
    plan: &MachinePlan,
    now: &mut Applied,
    on_step: &(dyn Fn(&str) + Send + Sync),
    on_line: &(dyn Fn(&str) + Send + Sync),
    record: &(dyn Fn(&Applied) -> Result<()> + Send + Sync),
) -> Result<Vec<ProvisionerOutcome>> {
    let listed = now.provisioned.len();
    now.provisioned
        .retain(|key, _| plan.provision.iter().any(|p| &p.name == key));
    if now.provisioned.len() != listed {
        record(now)?;
    }
    let mut outcomes = Vec::new();
    for provisioner in &plan.provision {
        if provisioner.action == ProvisionerAction::Run {
            on_step(&format!("running {}", provisioner.name));
            // Until it runs through, the record says it has not run: one
            // that failed or was cut short runs again at the next `up`.
            if now.provisioned.remove(&provisioner.name).is_some() {
                record(now)?;
            }
            run_provisioner(cluster, plan, provisioner, on_line).await?;
            now.provisioned
                .insert(provisioner.name.clone(), provisioner.hash.clone());
            record(now)?;
            on_line(&format!("{} ran", provisioner.name));
        }
        outcomes.push(ProvisionerOutcome {
            machine: plan.name.clone(),
            provisioner: provisioner.name.clone(),
            action: provisioner.action,
        });
    }
    Ok(outcomes)
}

/// Fails at once, before any machine starts, when a playbook of the
/// machines named (all when `None`) is to run and `ansible-playbook` is
/// not on PATH.
pub fn check_tools(plan: &crate::plan::Plan, names: Option<&[String]>) -> Result<()> {
    match plan.first_playbook(names) {
        Some((machine, provisioner)) if crate::process::which(ANSIBLE_PLAYBOOK).is_none() => {
            Err(ProvisionError::NoAnsible {
                machine: machine.to_string(),
                provisioner: provisioner.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Runs one provisioner through, failing with its last lines when it fails.
async fn run_provisioner(
    cluster: &Cluster<'_>,
    plan: &MachinePlan,
    provisioner: &ProvisionerPlan,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    let tail = Tail::default();
    let shown = |line: &str| {
        tail.push(line);
        on_line(line);
    };
    let status = match &provisioner.provisioner.run {
        ProvisionRun::Shell { script, args, env } => {
            run_shell(cluster, plan, provisioner, script, args, env, &shown).await?
        }
        ProvisionRun::Ansible { playbook } => {
            run_playbook(cluster, plan, provisioner, playbook, &shown).await?
        }
    };
    match status {
        None => Ok(()),
        Some(status) => Err(ProvisionError::ProvisionerFailed {
            machine: plan.name.clone(),
            provisioner: provisioner.name.clone(),
            status,
            tail: tail.text(),
        }),
    }
}

/// Copies the script to the guest and runs it there as root; `Some(status)`
/// when it fails.
async fn run_shell(
    cluster: &Cluster<'_>,
    plan: &MachinePlan,
    provisioner: &ProvisionerPlan,
    script: &Script,
    args: &[String],
    env: &BTreeMap<String, String>,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<Option<String>> {
    let machine = &plan.name;
    let (path, bytes) = provisioners::guest_script(cluster.topology, provisioner.index, script)
        .map_err(|source| ProvisionError::ProvisionerFile {
            machine: machine.clone(),
            provisioner: provisioner.name.clone(),
            source,
        })?;
    let machines = cluster.machines;
    let dir = ssh::shell_quote(provisioners::GUEST_DIR);
    machines
        .run_ok(machine, &format!("mkdir -p -m 0700 {dir}"))
        .await?;
    machines.upload(machine, &bytes, &path, 0o700).await?;
    let command = provisioners::shell_command(&path, args, env);
    let output = machines.run_streaming(machine, &command, on_line).await?;
    Ok((!output.success()).then(|| format!("exit status {}", output.exit_status)))
}

/// Runs `ansible-playbook` on this computer, in the topology's folder,
/// against the machine alone of an inventory of the testbed; `Some(status)`
/// when it fails.
async fn run_playbook(
    cluster: &Cluster<'_>,
    plan: &MachinePlan,
    provisioner: &ProvisionerPlan,
    playbook: &str,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<Option<String>> {
    let machine = &plan.name;
    let start_error = |error| ProvisionError::AnsibleStart {
        machine: machine.clone(),
        provisioner: provisioner.name.clone(),
        error,
    };
    let Some(program) = crate::process::which(ANSIBLE_PLAYBOOK) else {
        return Err(ProvisionError::NoAnsible {
            machine: machine.clone(),
            provisioner: provisioner.name.clone(),
        });
    };
    let inventory = write_inventory(cluster, machine)?;
    // stderr into stdout, as on a terminal: one stream, in order.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("exec 2>&1; exec \"$0\" \"$@\"")
        .arg(&program)
        .args(provisioners::ansible_args(machine, playbook, &inventory))
        .current_dir(cluster.topology.dir())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // A group of its own, so an interrupt stops it and its ssh children.
        .process_group(0)
        .spawn()
        .map_err(start_error)?;
    let _work = child.id().map(crate::process::work);
    if let Some(mut stdout) = child.stdout.take() {
        use tokio::io::AsyncReadExt;
        let mut lines = Lines::default();
        let mut buffer = vec![0; 8192];
        loop {
            match stdout.read(&mut buffer).await {
                Ok(0) => break,
                Ok(read) => lines.feed(&buffer[..read], on_line),
                Err(e) => {
                    on_line(&format!("(its output is lost from here: {e})"));
                    break;
                }
            }
        }
        lines.finish(on_line);
    }
    let status = child.wait().await.map_err(start_error)?;
    Ok((!status.success()).then(|| match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }))
}

/// Writes the inventory a playbook runs against: every machine of the
/// topology (a playbook may read any one's host vars and groups), as YAML,
/// which keeps the vars' types.
fn write_inventory(cluster: &Cluster<'_>, machine: &str) -> Result<PathBuf> {
    let state = &cluster.machines.state;
    let names: Vec<String> = cluster
        .topology
        .machines
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let text = Inventory::of(cluster.topology, &names, &state.ssh_config())
        .render(inventory::Format::Yaml);
    let path = state.ansible_inventory();
    crate::state::write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| {
        ProvisionError::Inventory {
            machine: machine.to_string(),
            source,
        }
    })?;
    Ok(path)
}

/// The last lines of a provisioner's output, for the error when it fails.
#[derive(Default)]
struct Tail {
    lines: std::sync::Mutex<std::collections::VecDeque<String>>,
}

impl Tail {
    const KEPT: usize = 20;

    fn push(&self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        let mut lines = lock(&self.lines);
        if lines.len() == Self::KEPT {
            lines.pop_front();
        }
        lines.push_back(line.to_string());
    }

    fn text(&self) -> String {
        let lines = lock(&self.lines);
        lines
            .iter()
            .map(|line| format!("  | {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Splits streamed output into lines (a chunk may end mid-line).
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, bytes: &[u8], on_line: &(dyn Fn(&str) + Send + Sync)) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            on_line(String::from_utf8_lossy(&line).trim_end());
        }
    }

    fn finish(self, on_line: &(dyn Fn(&str) + Send + Sync)) {
        if !self.partial.is_empty() {
            on_line(String::from_utf8_lossy(&self.partial).trim_end());
        }
    }
}

/// Waits for the kit's readiness probe, failing at once when its service fails.
async fn wait_ready(
    cluster: &Cluster<'_>,
    machine: &str,
    rendered: &Rendered,
    on_step: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    let Some(check) = rendered.kit.readiness_check(machine) else {
        return Ok(());
    };
    let daemon = &rendered.kit.name;
    let machines = cluster.machines;
    on_step(&format!("waiting for {daemon} to be ready"));
    let service = &rendered.kit.manifest.service;
    let failure = tokio::select! {
        result = check::run_one(&check, cluster.topology, machines) => {
            (!result.passed).then(|| (result.detail, result.evidence.unwrap_or_default()))
        }
        detail = service_failure(machines, machine, service) => {
            Some((detail, machines.evidence(machine).await))
        }
    };
    match failure {
        Some((detail, evidence)) => Err(ProvisionError::NotReady {
            machine: machine.to_string(),
            daemon: daemon.clone(),
            detail,
            evidence,
        }),
        None => Ok(()),
    }
}

/// Stops a daemon the machine no longer runs and keeps it from starting at boot.
async fn stop_daemon(machines: &Machines, machine: &str, daemon: &DaemonPlan) -> Result<()> {
    let service = ssh::shell_quote(&daemon.service);
    machines
        .run_ok(
            machine,
            &format!("systemctl stop {service} && {{ systemctl disable -q {service} 2>/dev/null || true; }}"),
        )
        .await
}

/// Returns once `service` has failed (polling), so a daemon that dies at
/// start is reported at once rather than when its readiness times out;
/// never returns while it runs or restarts.
async fn service_failure(machines: &Machines, machine: &str, service: &str) -> String {
    let service = ssh::shell_quote(service);
    let failed = format!("systemctl is-failed --quiet {service}");
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Ok(output) = machines.run(machine, &failed).await {
            if output.success() {
                let show = format!(
                    "systemctl show -p Result -p ExecMainStatus --value {service} | paste -sd' '"
                );
                let why = match machines.run(machine, &show).await {
                    Ok(output) => output.stdout_lossy().trim().to_string(),
                    Err(_) => String::new(),
                };
                return format!("the service failed ({why}); see its journal below");
            }
        }
    }
}

/// Restarts a running daemon whose files changed, starts one that is not
/// running, leaves the rest alone.
async fn start_or_restart(
    machines: &Machines,
    machine: &str,
    rendered: &Rendered,
    changed: bool,
    on_step: &(dyn Fn(&str) + Send + Sync),
) -> Result<DaemonAction> {
    let daemon = &rendered.kit.name;
    let service = ssh::shell_quote(&rendered.kit.manifest.service);
    let active = machines
        .run(machine, &format!("systemctl is-active --quiet {service}"))
        .await?
        .success();
    let action = match (changed, active) {
        (true, true) => DaemonAction::Restart,
        (_, false) => DaemonAction::Start,
        (false, true) => DaemonAction::Nothing,
    };
    if matches!(action, DaemonAction::Stop | DaemonAction::Nothing) {
        return Ok(action);
    }
    let verb = action.as_str();
    on_step(&format!("{verb}ing {daemon}"));
    machines
        .run_ok(machine, &format!("systemctl {verb} {service}"))
        .await?;
    Ok(action)
}

/// Copies `artifacts` (paths under `dist/` beside the topology) to the
/// same paths below `/srv/testbed/` on the guest, keeping their modes.
async fn push_artifacts(
    topology: &Topology,
    machines: &Machines,
    machine: &str,
    artifacts: &[String],
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if artifacts.is_empty() {
        return Ok(());
    }
    for artifact in artifacts {
        let path = topology.dir().join(artifact);
        // The same error the plan gives when it hashes a missing artifact.
        let missing = || {
            ProvisionError::Plan(PlanError::MissingArtifact {
                machine: machine.to_string(),
                path: path.clone(),
            })
        };
        let bytes = std::fs::read(&path).map_err(|_| missing())?;
        let mode = std::fs::metadata(&path)
            .map_err(|_| missing())?
            .permissions()
            .mode()
            & 0o777;
        let dest = guest_artifact_path(artifact);
        let parent = ssh::shell_quote(&parent_dir(&dest));
        machines
            .run_ok(machine, &format!("mkdir -p {parent}"))
            .await?;
        machines.upload(machine, &bytes, &dest, mode).await?;
    }
    Ok(())
}

/// Writes a kit's files on the guest (atomically, with mode and owner) and
/// reloads systemd when the kit brings its own unit.
/// Writes the kit's rendered files: their folders in one command, each file
/// in one, their owners in one (under emulation each command costs a
/// fraction of a second: 12 became 5 for the zookeeper kit).
async fn push_files(machines: &Machines, machine: &str, rendered: &Rendered) -> Result<()> {
    let parents: std::collections::BTreeSet<String> = rendered
        .files
        .iter()
        .map(|file| ssh::shell_quote(&parent_dir(&file.dest)))
        .collect();
    if !parents.is_empty() {
        let parents: Vec<String> = parents.into_iter().collect();
        machines
            .run_ok(machine, &format!("mkdir -p {}", parents.join(" ")))
            .await?;
    }
    for file in &rendered.files {
        machines
            .upload(machine, file.contents.as_bytes(), &file.dest, file.mode)
            .await?;
    }
    // Uploaded as root, a file is root's already.
    let chowns: Vec<String> = rendered
        .files
        .iter()
        .filter(|file| file.owner != "root:root" && file.owner != "root")
        .map(|file| {
            format!(
                "chown {} {}",
                ssh::shell_quote(&file.owner),
                ssh::shell_quote(&file.dest)
            )
        })
        .collect();
    if !chowns.is_empty() {
        machines.run_ok(machine, &chowns.join(" && ")).await?;
    }
    if rendered.kit.manifest.unit.is_some() {
        machines.run_ok(machine, "systemctl daemon-reload").await?;
    }
    Ok(())
}

fn parent_dir(path: &str) -> String {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/".to_string(),
        Some((parent, _)) => parent.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_guest_paths() {
        assert_eq!(
            parent_dir("/etc/zookeeper/conf/zoo.cfg"),
            "/etc/zookeeper/conf"
        );
        assert_eq!(parent_dir("/myid"), "/");
    }

    #[tokio::test]
    async fn readiness_wakes_waiters_with_the_outcome() {
        let topology = Topology {
            name: "t".into(),
            path: "/t.toml".into(),
            networks: BTreeMap::new(),
            machines: vec![],
            checks: vec![],
            build: None,
            steps: vec![],
            libvirt_uri: None,
            hosts: Default::default(),
        };
        let mut readiness = Readiness::new(&topology);
        readiness
            .senders
            .insert(Gate::Daemons("zk".into()), watch::channel(None).0);
        readiness
            .senders
            .insert(Gate::Build, watch::channel(None).0);
        let readiness = Arc::new(readiness);
        let waiter = {
            let readiness = readiness.clone();
            tokio::spawn(async move {
                (
                    readiness.wait(&Gate::Daemons("zk".into())).await,
                    readiness.wait(&Gate::Build).await,
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        readiness.set(&Gate::Daemons("zk".into()), true);
        readiness.set(&Gate::Build, false);
        assert_eq!(waiter.await.expect("join"), (true, false));
        assert!(
            readiness.wait(&Gate::Daemons("unknown".into())).await,
            "no such machine: nothing to wait for"
        );
    }
}
