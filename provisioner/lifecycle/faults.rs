//! Faults on purpose: a partition cuts the machines of different groups off
//! from each other on every network they share; `heal` undoes it. The
//! provider drops the traffic (qemu: its switch); the record says which
//! faults are in force, for `status`.

use crate::identity;
use crate::provider::{self, NetworkSpec};
use crate::state::Access;

use super::{Error, Result, Testbed};

impl Testbed {
    /// Partitions the machines into `groups` (a machine in no group keeps
    /// its links), replacing any partition in force. Returns the fault as
    /// `status` shows it.
    pub fn partition(&self, groups: &[Vec<String>]) -> Result<String> {
        let _lock = self.lock(Access::Exclusive)?;
        self.check_groups(groups)?;
        let group_of = |machine: &str| groups.iter().position(|g| g.iter().any(|m| m == machine));
        let mut record = self.state.load()?;
        if record.networks.is_empty() {
            return Err(Error::BadFault(
                "no network of this testbed is up to partition: `testbed up` first".into(),
            ));
        }
        for network in record.networks.keys() {
            let on_it: Vec<_> = self
                .topology
                .machines
                .iter()
                .filter(|m| m.ips.contains_key(network))
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
        let fault = format!(
            "partition {}",
            groups
                .iter()
                .map(|g| g.join(" "))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        record.faults = vec![fault.clone()];
        self.state.save(&record)?;
        Ok(fault)
    }

    /// Undoes every fault in force; returns what it undid.
    pub fn heal(&self) -> Result<Vec<String>> {
        let _lock = self.lock(Access::Exclusive)?;
        let mut record = self.state.load()?;
        for network in record.networks.keys() {
            self.block(network, &[])?;
        }
        let healed = std::mem::take(&mut record.faults);
        self.state.save(&record)?;
        Ok(healed)
    }

    /// `fault kill`: the machine's VM stopped at once, like a power failure.
    /// `status` then says `crashed`; `up` (or `fault start`) brings it back.
    pub async fn kill_machine(&self, name: &str) -> Result<()> {
        let _lock = self.lock(Access::Exclusive)?;
        let machine = self.select(&[name.to_string()])?.remove(0);
        if !self.state.load()?.machines.contains_key(name) {
            return Err(Error::BadFault(format!(
                "{name} has not been created: `testbed up` first"
            )));
        }
        let provider = self.provider_of(&machine)?;
        let dir = self.state.machine_dir(name);
        super::blocking(move || provider.kill(&dir)).await?;
        Ok(())
    }

    /// The faults in force, as the record says.
    pub fn faults(&self) -> Result<Vec<String>> {
        Ok(self.state.load()?.faults)
    }

    /// Has the network's provider drop the traffic between `pairs` of MACs.
    fn block(&self, network: &str, pairs: &[(String, String)]) -> Result<()> {
        let Some(machine) = self
            .topology
            .machines
            .iter()
            .find(|m| m.ips.contains_key(network))
        else {
            return Ok(());
        };
        let provider = provider::for_kind(machine.provider, &self.provider_settings())?;
        let spec = NetworkSpec {
            name: network.to_string(),
            dir: self.state.network_dir(network),
        };
        Ok(provider.block(&spec, pairs)?)
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
