//! Faults on purpose (`testbed fault …` and a step's `fault`): partitions
//! and link faults through the provider's networks, kill/start and
//! pause/resume through its VMs. The record lists the faults in force, for
//! `status`; `heal` undoes the network ones.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::identity;
use crate::model::{Fault, LinkFault, LinkShape, Machine};
use crate::progress::Progress;
use crate::provider::VmState;
use crate::provision::Machines;
use crate::state::{Access, Record};

use super::{Error, Result, Testbed};

impl Testbed {
    /// Injects `fault` and says what is now so, as one line.
    pub async fn inject(&self, fault: &Fault, progress: &Progress) -> Result<String> {
        match fault {
            Fault::Partition(groups) => self.partition(groups),
            Fault::Heal => self.heal(),
            Fault::Kill(name) => self.kill_machine(name).await,
            Fault::Start(name) => self.start_machine(name, progress).await,
            Fault::Pause(name) => self.pause(name).await,
            Fault::Resume(name) => self.resume(name).await,
            Fault::Link(link) => self.shape_link(link).await,
        }
    }

    /// A link fault on `machine`'s link to `network`, or to its only
    /// network when `network` is `None`.
    pub fn link_fault(
        &self,
        machine: &str,
        network: Option<&str>,
        shape: LinkShape,
    ) -> Result<LinkFault> {
        let found = self.select(&[machine.to_string()])?.remove(0);
        let on: Vec<&String> = found.ips.keys().collect();
        let network = match (network, &on[..]) {
            (Some(network), _) => network.to_string(),
            (None, [only]) => only.to_string(),
            (None, []) => return Err(Error::BadFault(format!("{machine} is on no network"))),
            (None, _) => {
                return Err(Error::BadFault(format!(
                    "{machine} is on several networks; say which with --network: {}",
                    on.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        };
        Ok(LinkFault {
            machine: machine.to_string(),
            network,
            shape,
        })
    }

    /// The faults in force, as the record says.
    pub fn faults(&self) -> Result<Vec<String>> {
        Ok(self.state.load()?.faults)
    }

    /// Partitions the machines into `groups` (a machine in no group keeps
    /// its links), replacing any partition in force.
    fn partition(&self, groups: &[Vec<String>]) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        self.check_groups(groups)?;
        let mut record = self.state.load()?;
        if record.networks.is_empty() {
            return Err(Error::BadFault(
                "no network of this testbed is up to partition: `testbed up` first".into(),
            ));
        }
        let group_of = |machine: &str| groups.iter().position(|g| g.iter().any(|m| m == machine));
        for network in record.networks.keys() {
            let on_it: Vec<_> = self
                .machines_on(network)
                .filter_map(|m| group_of(&m.name).map(|g| (g, m)))
                .collect();
            let mut pairs = Vec::new();
            for (i, (group_a, a)) in on_it.iter().enumerate() {
                for (group_b, b) in &on_it[i + 1..] {
                    if group_a != group_b {
                        pairs.push((
                            identity::mac_address(&a.name, network),
                            identity::mac_address(&b.name, network),
                        ));
                    }
                }
            }
            self.block(network, &pairs)?;
        }
        let fault = Fault::Partition(groups.to_vec()).to_string();
        set_fault(&mut record, "partition", Some(fault.clone()));
        self.state.save(&record)?;
        Ok(format!("in force: {fault}; `testbed fault heal` undoes it"))
    }

    /// Undoes every partition and link fault.
    fn heal(&self) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        let mut record = self.state.load()?;
        for network in record.networks.keys() {
            self.block(network, &[])?;
            for machine in self.machines_on(network) {
                if record.machines.contains_key(&machine.name) {
                    self.set_link(machine, network, &LinkShape::default())?;
                }
            }
        }
        let (healed, kept): (Vec<String>, Vec<String>) = std::mem::take(&mut record.faults)
            .into_iter()
            .partition(|fault| subject(fault) == "partition" || fault.starts_with("link "));
        record.faults = kept;
        self.state.save(&record)?;
        Ok(if healed.is_empty() {
            "no partition or link fault was in force".into()
        } else {
            format!("healed: {}", healed.join(", "))
        })
    }

    /// One machine's link on one network made down, slow or lossy,
    /// replacing what was wrong with it before.
    async fn shape_link(&self, link: &LinkFault) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        let machine = self.created(&link.machine)?;
        if !machine.ips.contains_key(&link.network) {
            let on: Vec<&str> = machine.ips.keys().map(String::as_str).collect();
            return Err(Error::BadFault(format!(
                "{} is not on network `{}`; it is on: {}",
                machine.name,
                link.network,
                if on.is_empty() {
                    "none".into()
                } else {
                    on.join(", ")
                }
            )));
        }
        self.set_link(&machine, &link.network, &link.shape)?;
        let fault = Fault::Link(link.clone()).to_string();
        let mut record = self.state.load()?;
        let about = format!("link {} on {}", link.machine, link.network);
        set_fault(&mut record, &about, Some(fault.clone()));
        self.state.save(&record)?;
        Ok(format!("in force: {fault}; `testbed fault heal` undoes it"))
    }

    /// `fault kill`: the machine's VM stopped at once, like a power failure.
    /// `status` then says `crashed`; `up` (or `fault start`) brings it back.
    async fn kill_machine(&self, name: &str) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        let machine = self.created(name)?;
        let provider = self.provider_of(&machine)?;
        let dir = self.state.machine_dir(name);
        super::blocking(move || provider.kill(&dir)).await?;
        let mut record = self.state.load()?;
        set_fault(&mut record, &pause_fault(name), None);
        self.state.save(&record)?;
        Ok(format!(
            "{name}: killed; `testbed fault start {name}` (or `up`) brings it back"
        ))
    }

    /// `fault start`: the killed machine booted and re-provisioned, as `up`
    /// does (which converges every other machine too).
    async fn start_machine(&self, name: &str, progress: &Progress) -> Result<String> {
        self.select(&[name.to_string()])?;
        let report = self.up(progress, super::UpOptions::default()).await?;
        Ok(if report.changed().iter().any(|m| m == name) {
            format!("{name}: started")
        } else {
            format!("{name}: already running")
        })
    }

    /// `fault pause`: the VM frozen, its memory kept.
    async fn pause(&self, name: &str) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        self.set_paused(name, true).await?;
        Ok(format!(
            "{name}: paused; `testbed fault resume {name}` runs it again"
        ))
    }

    /// `fault resume`: the VM runs again and its clock, stopped while it
    /// was frozen, is set from the host's.
    async fn resume(&self, name: &str) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        self.set_paused(name, false).await?;
        let sessions = self.sessions()?;
        let clock = set_clocks(&sessions, &[name.to_string()]).await;
        sessions.close().await;
        clock?;
        Ok(format!("{name}: resumed, its clock set from the host's"))
    }

    /// `up` on a cluster with machines a `fault pause` froze: they run
    /// again, on the host's clock. Returns a line per machine resumed.
    pub(super) async fn resume_paused(&self, record: &Record) -> Result<Vec<String>> {
        let paused: Vec<String> = self
            .topology
            .machines
            .iter()
            .filter(|m| paused(record, &m.name))
            .map(|m| m.name.clone())
            .collect();
        if paused.is_empty() {
            return Ok(Vec::new());
        }
        for name in &paused {
            self.set_paused(name, false).await?;
        }
        let sessions = self.sessions()?;
        let clocks = set_clocks(&sessions, &paused).await;
        sessions.close().await;
        clocks?;
        Ok(paused
            .iter()
            .map(|name| {
                format!("{name}: resumed (`testbed fault pause` froze it), its clock set from the host's")
            })
            .collect())
    }

    /// Freezes (`paused`) or thaws a running machine's VM, and records it.
    async fn set_paused(&self, name: &str, paused: bool) -> Result<()> {
        let machine = self.created(name)?;
        let provider = self.provider_of(&machine)?;
        let dir = self.state.machine_dir(name);
        if provider.state(&dir) != VmState::Running {
            let verb = if paused { "pause" } else { "resume" };
            return Err(Error::BadFault(format!(
                "{name} is not running: nothing to {verb}"
            )));
        }
        super::blocking(move || {
            if paused {
                provider.pause(&dir)
            } else {
                provider.resume(&dir)
            }
        })
        .await?;
        let mut record = self.state.load()?;
        let pause = pause_fault(name);
        set_fault(&mut record, &pause, paused.then(|| pause.clone()));
        Ok(self.state.save(&record)?)
    }

    /// Has the network's provider drop the traffic between `pairs` of MACs.
    fn block(&self, network: &str, pairs: &[(String, String)]) -> Result<()> {
        let Some(machine) = self.machines_on(network).next() else {
            return Ok(());
        };
        let provider = self.provider_of(machine)?;
        Ok(provider.block(&self.network_spec(network), pairs)?)
    }

    fn set_link(&self, machine: &Machine, network: &str, shape: &LinkShape) -> Result<()> {
        let provider = self.provider_of(machine)?;
        Ok(provider.shape_link(
            &self.state.machine_dir(&machine.name),
            &self.network_spec(network),
            &identity::mac_address(&machine.name, network),
            shape,
        )?)
    }

    fn machines_on<'t>(&'t self, network: &'t str) -> impl Iterator<Item = &'t Machine> {
        self.topology
            .machines
            .iter()
            .filter(move |m| m.ips.contains_key(network))
    }

    /// The machine called `name`, which `up` must have created.
    fn created(&self, name: &str) -> Result<Machine> {
        let machine = self.select(&[name.to_string()])?.remove(0);
        if !self.state.load()?.machines.contains_key(name) {
            return Err(Error::BadFault(format!(
                "{name} has not been created: `testbed up` first"
            )));
        }
        Ok(machine)
    }

    /// At least two groups, of machines of the topology, each in one group.
    fn check_groups(&self, groups: &[Vec<String>]) -> Result<()> {
        let bad = |why: String| Err(Error::BadFault(why));
        if groups.len() < 2 || groups.iter().any(Vec::is_empty) {
            return bad(
                "a partition needs two or more groups of machines, separated by `/` \
                        (e.g. `testbed fault partition zk-1 / zk-2 zk-3`)"
                    .into(),
            );
        }
        let mut seen: Vec<&String> = Vec::new();
        for machine in groups.iter().flatten() {
            self.select(std::slice::from_ref(machine))?;
            if seen.contains(&machine) {
                return bad(format!("{machine} is in two groups of the partition"));
            }
            seen.push(machine);
        }
        Ok(())
    }
}

/// Sets each machine's wall clock from the host's over SSH (after it stood
/// still: a pause, a restored snapshot), all at once.
/// How long a guest just resumed may take to answer SSH. Measured: five
/// ZooKeeper guests restored at once on 2 cores under TCG took more than
/// 60 s, the guests' load average at 15, before the first answered.
const RESUMED_CONNECT: Duration = Duration::from_secs(300);

pub(super) async fn set_clocks(sessions: &Arc<Machines>, names: &[String]) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        let sessions = sessions.clone();
        let name = name.clone();
        tasks.spawn(async move {
            let session = sessions.resumed_session(&name, RESUMED_CONNECT).await?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let command = format!(
                "date -u -s @{}.{:09} >/dev/null",
                now.as_secs(),
                now.subsec_nanos()
            );
            session
                .exec(&command)
                .await
                .and_then(|output| output.ensure_success(&command))
                .map(drop)
                .map_err(|source| Error::Ssh {
                    machine: name.clone(),
                    source,
                })
        });
    }
    super::first_error(tasks, "setting a guest's clock").await
}

/// Whether `fault pause` froze the machine called `name`.
pub(super) fn paused(record: &Record, name: &str) -> bool {
    let pause = pause_fault(name);
    record.faults.contains(&pause)
}

fn pause_fault(name: &str) -> String {
    Fault::Pause(name.to_string()).to_string()
}

/// What a fault in force is about: one partition at a time, one shape
/// per link (`link zk-1 on lan`), one pause per machine.
fn subject(fault: &str) -> &str {
    if fault.starts_with("partition ") {
        "partition"
    } else {
        fault.split(':').next().unwrap_or(fault)
    }
}

/// Replaces the fault in force about `about` by `fault`, or removes it.
fn set_fault(record: &mut Record, about: &str, fault: Option<String>) {
    record.faults.retain(|f| subject(f) != about);
    record.faults.extend(fault);
}
