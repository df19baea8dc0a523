//! Pushes each machine's rendered kit files and starts its daemons, in
//! dependency order: a machine's daemons start once its own SSH is up and
//! the daemons of every machine it `depends_on` are ready (their readiness
//! checks pass). Independent chains run in parallel; nothing waits on a
//! fixed sleep. Also the SSH transport that checks travel through.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{watch, Mutex};

use crate::check::{self, BoxedStream, CommandOutput, Transport};
use crate::kit::{Kit, RenderedFile, Secrets};
use crate::lifecycle::console_tail;
use crate::ssh::{self, Session, SshError, Target};
use crate::state::StateDir;
use crate::topology::{Machine, Topology, GUEST_ARTIFACT_ROOT};

/// How long a machine's SSH may take to answer when provisioning.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{machine}: {source}")]
    Ssh { machine: String, source: SshError },
    #[error(transparent)]
    Kit(#[from] crate::kit::KitError),
    #[error("{machine}: {daemon} did not become ready: {detail}\n{evidence}")]
    NotReady {
        machine: String,
        daemon: String,
        detail: String,
        evidence: String,
    },
    #[error("{machine}: not started because {dependency} failed")]
    DependencyFailed { machine: String, dependency: String },
    #[error(
        "{machine}: artifact {} is missing\n  help: the build step makes it: run `testbed build` \
         (or `testbed up`), or check `outputs` in [build]",
        path.display()
    )]
    MissingArtifact { machine: String, path: PathBuf },
    #[error("{machine}: `{command}` failed ({status}): {stderr}")]
    Command {
        machine: String,
        command: String,
        status: u32,
        stderr: String,
    },
    #[error("{machine}: cannot record what was provisioned: {reason}")]
    Record { machine: String, reason: String },
    #[error("{0}: not created yet (run `testbed up`)")]
    NotCreated(String),
}

type Result<T> = std::result::Result<T, ProvisionError>;

/// What provisioning did to one daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Started,
    Restarted,
    Unchanged,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub machine: String,
    pub daemon: String,
    pub action: Action,
}

/// One SSH connection per machine, opened on first use and shared by every
/// step of a command (provisioning, readiness, checks, evidence).
pub struct Machines {
    state: StateDir,
    /// Each created machine's SSH port on 127.0.0.1.
    ports: std::sync::Mutex<BTreeMap<String, u16>>,
    /// The systemd services of each machine's kits (for evidence).
    services: BTreeMap<String, Vec<String>>,
    /// A slot per machine, so machines connect in parallel while two steps
    /// on one machine share a single connection.
    sessions: std::sync::Mutex<BTreeMap<String, Arc<Mutex<Option<Session>>>>>,
}

impl Machines {
    pub fn new(state: StateDir, topology: &Topology) -> Machines {
        let services = topology
            .machines
            .iter()
            .map(|m| {
                let services = m
                    .daemons
                    .iter()
                    .filter_map(|d| Kit::load(d, topology.dir()).ok())
                    .map(|kit| kit.manifest.service)
                    .collect();
                (m.name.clone(), services)
            })
            .collect();
        Machines {
            state,
            ports: std::sync::Mutex::new(BTreeMap::new()),
            services,
            sessions: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set_port(&self, machine: &str, port: u16) {
        self.ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(machine.to_string(), port);
    }

    /// Hands over a connection opened elsewhere (by `up`'s boot step).
    pub async fn adopt(&self, machine: &str, session: Session) {
        *self.slot(machine).lock().await = Some(session);
    }

    fn slot(&self, machine: &str) -> Arc<Mutex<Option<Session>>> {
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(machine.to_string())
            .or_default()
            .clone()
    }

    fn target(&self, machine: &str) -> Result<Target> {
        let port = self
            .ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(machine)
            .copied()
            .filter(|port| *port != 0)
            .ok_or_else(|| ProvisionError::NotCreated(machine.to_string()))?;
        Ok(Target {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            user: "root".into(),
            key_path: self.state.user_key(),
            host_key_path: ssh::public_key_path(
                &self.state.machine_dir(machine).join("ssh_host_ed25519_key"),
            ),
        })
    }

    /// The machine's session, connecting the first time.
    pub async fn session(&self, machine: &str) -> Result<Session> {
        let slot = self.slot(machine);
        let mut slot = slot.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(session.clone());
        }
        let target = self.target(machine)?;
        let session = Session::connect(&target, CONNECT_TIMEOUT)
            .await
            .map_err(|source| ProvisionError::Ssh {
                machine: machine.to_string(),
                source,
            })?;
        *slot = Some(session.clone());
        Ok(session)
    }

    pub async fn close(&self) {
        let slots: Vec<_> = self
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            if let Some(session) = slot.lock().await.take() {
                session.close().await;
            }
        }
    }

    async fn run(&self, machine: &str, command: &str) -> Result<crate::ssh::ExecOutput> {
        let session = self.session(machine).await?;
        let output = session
            .exec(command)
            .await
            .map_err(|source| ProvisionError::Ssh {
                machine: machine.to_string(),
                source,
            })?;
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

    fn console(&self, machine: &str) -> PathBuf {
        self.state.machine_dir(machine).join("console.log")
    }
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Transport for Machines {
    async fn open_tcp(&self, via: &str, host: &str, port: u16) -> std::io::Result<BoxedStream> {
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
            console_tail(&self.console(machine), 8)
        ));
        evidence
    }
}

/// The rendered files of a machine's kits, with a hash per daemon: what
/// `provision` compares with the record to know what changed.
pub struct Rendered {
    pub kit: Kit,
    pub files: Vec<RenderedFile>,
    pub hash: String,
}

/// Renders every kit of `machine` (touching nothing). Each hash covers the
/// rendered files only; [`daemon_hash`] adds the kit's artifacts.
pub fn render_machine(
    topology: &Topology,
    machine: &Machine,
    secrets: &Secrets,
) -> Result<Vec<Rendered>> {
    machine
        .daemons
        .iter()
        .map(|name| {
            let kit = Kit::load(name, topology.dir())?;
            let files = kit.render(topology, machine, secrets)?;
            let hash = files_hash(&kit, &files);
            Ok(Rendered { kit, files, hash })
        })
        .collect()
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
        let bytes = std::fs::read(&path).map_err(|_| ProvisionError::MissingArtifact {
            machine: machine.to_string(),
            path: path.clone(),
        })?;
        hasher.update(artifact.as_bytes());
        hasher.update(Sha256::digest(&bytes));
    }
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}

/// Whether `machine` needs anything the build step makes.
pub fn needs_artifacts(topology: &Topology, machine: &Machine) -> Result<bool> {
    if !machine.artifacts.is_empty() {
        return Ok(true);
    }
    for daemon in &machine.daemons {
        if !Kit::load(daemon, topology.dir())?
            .manifest
            .artifacts
            .is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
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

/// Readiness of each machine's daemons, shared between the machines'
/// tasks: `None` while pending, then whether they became ready.
pub struct Readiness {
    senders: BTreeMap<String, watch::Sender<Option<bool>>>,
}

/// The readiness entry of the build step: set once its outputs are in
/// `dist/` (or the build was current), false when it failed.
pub const BUILD_GATE: &str = "the build";

/// The readiness entry that opens once `machine` answers SSH with its
/// identity applied, before its own daemons and dependencies: what the build
/// step waits for on its builder.
pub fn reachable(machine: &str) -> String {
    format!("{machine} (reachable)")
}

impl Readiness {
    /// An entry per machine (its daemons are ready), per machine's SSH
    /// ([`reachable`]) and for the build ([`BUILD_GATE`]).
    pub fn new(topology: &Topology) -> Readiness {
        let mut senders: BTreeMap<String, watch::Sender<Option<bool>>> = BTreeMap::new();
        for machine in &topology.machines {
            senders.insert(machine.name.clone(), watch::channel(None).0);
            senders.insert(reachable(&machine.name), watch::channel(None).0);
        }
        if topology.build.is_some() {
            senders.insert(BUILD_GATE.to_string(), watch::channel(None).0);
        }
        Readiness { senders }
    }

    pub fn set(&self, key: &str, ready: bool) {
        if let Some(sender) = self.senders.get(key) {
            sender.send_replace(Some(ready));
        }
    }

    /// Sets `key` unless it is set already (a machine that failed after it
    /// became reachable stays reachable).
    pub fn settle(&self, key: &str, ready: bool) {
        if let Some(sender) = self.senders.get(key) {
            sender.send_if_modified(|value| {
                let pending = value.is_none();
                if pending {
                    *value = Some(ready);
                }
                pending
            });
        }
    }

    /// Waits until `key` (a machine's daemons, or another entry) is ready;
    /// false if it failed.
    pub async fn wait(&self, key: &str) -> bool {
        let Some(sender) = self.senders.get(key) else {
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
    pub secrets: &'a Secrets,
    pub machines: &'a Machines,
    pub readiness: &'a Readiness,
}

/// What was last applied to a machine (from its record).
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Daemon → [`daemon_hash`].
    pub daemons: BTreeMap<String, String>,
    /// Hash of the machine's own artifacts.
    pub artifacts: Option<String>,
}

/// Provisions one machine once its dependencies (and the build, when it
/// needs artifacts) are ready: pushes its artifacts and the rendered files
/// of each kit, (re)starts what changed or is not running, waits for
/// readiness. Returns what it did and what is now applied.
pub async fn provision_machine(
    cluster: &Cluster<'_>,
    machine: &Machine,
    applied: &Applied,
    on_step: &(dyn Fn(&str) + Send + Sync),
    on_applied: &(dyn Fn(&Applied) -> std::result::Result<(), String> + Send + Sync),
) -> Result<Vec<Outcome>> {
    let Cluster {
        topology,
        secrets,
        machines,
        readiness,
    } = *cluster;
    let mut waits: Vec<&str> = machine.depends_on.iter().map(String::as_str).collect();
    if needs_artifacts(topology, machine)? {
        waits.push(BUILD_GATE);
    }
    for dependency in waits {
        on_step(&format!("waiting for {dependency}"));
        if !readiness.wait(dependency).await {
            return Err(ProvisionError::DependencyFailed {
                machine: machine.name.clone(),
                dependency: dependency.to_string(),
            });
        }
    }
    // What is on the machine, recorded after each step that changes it, so
    // a failure part-way leaves a record that matches the guest.
    let mut now = Applied {
        daemons: applied.daemons.clone(),
        artifacts: applied.artifacts.clone(),
    };
    now.daemons
        .retain(|daemon, _| machine.daemons.contains(daemon));
    let record = |now: &Applied| {
        on_applied(now).map_err(|reason| ProvisionError::Record {
            machine: machine.name.clone(),
            reason,
        })
    };
    if machine.artifacts.is_empty() {
        now.artifacts = None;
    } else {
        let hash = artifacts_hash(topology, &machine.name, &machine.artifacts)?;
        if applied.artifacts.as_ref() != Some(&hash) {
            on_step("pushing artifacts");
            push_artifacts(topology, machines, &machine.name, &machine.artifacts).await?;
        }
        now.artifacts = Some(hash);
    }
    record(&now)?;
    let mut outcomes = Vec::new();
    for rendered in render_machine(topology, machine, secrets)? {
        let daemon = rendered.kit.name.clone();
        let hash = daemon_hash(topology, &machine.name, &rendered)?;
        let changed = applied.daemons.get(&daemon) != Some(&hash);
        if changed {
            on_step(&format!("pushing {daemon} files"));
            let artifacts = &rendered.kit.manifest.artifacts;
            push_artifacts(topology, machines, &machine.name, artifacts).await?;
            push_files(machines, &machine.name, &rendered).await?;
        }
        let action = start_or_restart(machines, &machine.name, &rendered, changed, on_step).await?;
        if let Some(check) = rendered.kit.readiness_check(&machine.name) {
            on_step(&format!("waiting for {daemon} to be ready"));
            let service = &rendered.kit.manifest.service;
            let failure = tokio::select! {
                result = check::run_one(&check, topology, machines) => {
                    (!result.passed).then(|| (result.detail, result.evidence.unwrap_or_default()))
                }
                detail = service_failure(machines, &machine.name, service) => {
                    Some((detail, machines.evidence(&machine.name).await))
                }
            };
            if let Some((detail, evidence)) = failure {
                return Err(ProvisionError::NotReady {
                    machine: machine.name.clone(),
                    daemon,
                    detail,
                    evidence,
                });
            }
        }
        now.daemons.insert(daemon.clone(), hash);
        record(&now)?;
        outcomes.push(Outcome {
            machine: machine.name.clone(),
            daemon,
            action,
        });
    }
    Ok(outcomes)
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
) -> Result<Action> {
    let daemon = &rendered.kit.name;
    let service = ssh::shell_quote(&rendered.kit.manifest.service);
    let active = machines
        .run(machine, &format!("systemctl is-active --quiet {service}"))
        .await?
        .success();
    let action = match (changed, active) {
        (true, true) => Action::Restarted,
        (_, false) => Action::Started,
        (false, true) => Action::Unchanged,
    };
    let verb = match action {
        Action::Restarted => "restart",
        Action::Started => "start",
        Action::Unchanged => return Ok(action),
    };
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
    let session = machines.session(machine).await?;
    for artifact in artifacts {
        let path = topology.dir().join(artifact);
        let missing = || ProvisionError::MissingArtifact {
            machine: machine.to_string(),
            path: path.clone(),
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
        session
            .upload(&bytes, &dest, mode)
            .await
            .map_err(|source| ProvisionError::Ssh {
                machine: machine.to_string(),
                source,
            })?;
    }
    Ok(())
}

/// Writes a kit's files on the guest (atomically, with mode and owner) and
/// reloads systemd when the kit brings its own unit.
async fn push_files(machines: &Machines, machine: &str, rendered: &Rendered) -> Result<()> {
    let session = machines.session(machine).await?;
    for file in &rendered.files {
        let dest = ssh::shell_quote(&file.dest);
        let parent = ssh::shell_quote(&parent_dir(&file.dest));
        machines
            .run_ok(machine, &format!("mkdir -p {parent}"))
            .await?;
        session
            .upload(file.contents.as_bytes(), &file.dest, file.mode)
            .await
            .map_err(|source| ProvisionError::Ssh {
                machine: machine.to_string(),
                source,
            })?;
        let owner = ssh::shell_quote(&file.owner);
        machines
            .run_ok(machine, &format!("chown {owner} {dest}"))
            .await?;
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
        };
        let mut readiness = Readiness::new(&topology);
        readiness
            .senders
            .insert("zk".into(), watch::channel(None).0);
        readiness
            .senders
            .insert("bad".into(), watch::channel(None).0);
        let readiness = Arc::new(readiness);
        let waiter = {
            let readiness = readiness.clone();
            tokio::spawn(async move { (readiness.wait("zk").await, readiness.wait("bad").await) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        readiness.set("zk", true);
        readiness.set("bad", false);
        assert_eq!(waiter.await.expect("join"), (true, false));
        assert!(
            readiness.wait("unknown").await,
            "no such machine: nothing to wait for"
        );
    }
}
