//! A step's `fault = { … }`, checked against the topology's machines and
//! their networks.

use toml::de::DeValue;

use crate::model::fault::parse_loss;
use crate::model::{Fault, LinkFault, LinkShape, Machine};

use super::{entries, Checker, Result, Span, Value};

const FAULT_KINDS: &[&str] = &[
    "partition",
    "heal",
    "kill",
    "start",
    "pause",
    "resume",
    "link",
];
const LINK_KEYS: &[&str] = &["machine", "network", "down", "delay", "jitter", "loss"];
pub(super) const FAULT_HELP: &str = "a fault is one of `{ partition = [[\"zk-1\"], [\"zk-2\", \
     \"zk-3\"]] }`, `{ heal = true }`, `{ kill = \"zk-1\" }`, `{ start = \"zk-1\" }`, \
     `{ pause = \"zk-1\" }`, `{ resume = \"zk-1\" }` or `{ link = { machine = \"zk-1\", \
     delay = \"200ms\", jitter = \"20ms\", loss = \"10%\", down = true } }`";
const PARTITION_EXAMPLE: &str = "[[\"zk-1\"], [\"zk-2\", \"zk-3\"]]";

impl Checker<'_> {
    /// `fault = { KIND = … }`: exactly one kind.
    pub(super) fn fault(&self, value: &Value<'_>, machines: &[Machine]) -> Result<Fault> {
        let table = self.table(value, "fault", "{ heal = true }")?;
        self.check_keys(table, FAULT_KINDS, "in `fault`")?;
        let kinds = entries(table);
        let [(kind, value)] = kinds[..] else {
            return Err(self
                .source
                .error(
                    value.span(),
                    format!("`fault` names {} faults; a step has one", kinds.len()),
                )
                .with_help(FAULT_HELP));
        };
        let machine = |place: &str| -> Result<String> {
            let name = self.string(value, place, "\"zk-1\"")?;
            self.known_machine(name, value.span(), &format!("in `fault.{place}`"), machines)?;
            Ok(name.to_owned())
        };
        match kind.get_ref().as_ref() {
            "partition" => self.partition(value, machines),
            "heal" => match self.boolean(value, "heal")? {
                true => Ok(Fault::Heal),
                false => Err(self
                    .source
                    .error(value.span(), "`heal = false` asks for nothing")
                    .with_help("write `fault = { heal = true }`, or leave the fault out")),
            },
            "kill" => Ok(Fault::Kill(machine("kill")?)),
            "start" => Ok(Fault::Start(machine("start")?)),
            "pause" => Ok(Fault::Pause(machine("pause")?)),
            "resume" => Ok(Fault::Resume(machine("resume")?)),
            _ => self.link(value, machines).map(Fault::Link),
        }
    }

    /// Two or more non-empty groups of known machines, each machine in one.
    fn partition(&self, value: &Value<'_>, machines: &[Machine]) -> Result<Fault> {
        let DeValue::Array(groups) = value.get_ref() else {
            return Err(self.type_error(
                value,
                "partition",
                "an array of groups",
                PARTITION_EXAMPLE,
            ));
        };
        if groups.len() < 2 {
            return Err(self
                .source
                .error(value.span(), "a partition needs two or more groups")
                .with_help(format!("for example `partition = {PARTITION_EXAMPLE}`")));
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut parsed = Vec::new();
        for group in groups {
            let members = self.string_list(group, "partition", PARTITION_EXAMPLE)?;
            if members.is_empty() {
                return Err(self
                    .source
                    .error(group.span(), "a group of the partition is empty")
                    .with_help("each group names one or more machines"));
            }
            for (name, span) in &members {
                self.known_machine(name, span.clone(), "in the partition", machines)?;
                if seen.contains(name) {
                    return Err(self
                        .source
                        .error(span.clone(), format!("`{name}` is in two groups"))
                        .with_help("a machine is on one side of a partition"));
                }
                seen.push(name);
            }
            parsed.push(members.iter().map(|(n, _)| n.to_string()).collect());
        }
        Ok(Fault::Partition(parsed))
    }

    /// `link = { machine, network, down, delay, jitter, loss }`: `network`
    /// may be left out when the machine is on one.
    fn link(&self, value: &Value<'_>, machines: &[Machine]) -> Result<LinkFault> {
        const EXAMPLE: &str = "{ machine = \"zk-1\", delay = \"200ms\" }";
        let table = self.table(value, "link", EXAMPLE)?;
        self.check_keys(table, LINK_KEYS, "in `link`")?;
        let name =
            self.required_string(table, value, "machine", "`link`", "\"zk-1\"", FAULT_HELP)?;
        let machine = self.known_machine(name.0, name.1.clone(), "in `link`", machines)?;
        let network = self.link_network(table.get("network"), machine, name.1)?;
        let mut shape = LinkShape::default();
        for (key, value) in entries(table) {
            match key.get_ref().as_ref() {
                "down" => shape.down = self.boolean(value, "down")?,
                "delay" => shape.delay = self.duration(value, "delay", "\"200ms\"")?,
                "jitter" => shape.jitter = self.duration(value, "jitter", "\"20ms\"")?,
                "loss" => shape.loss = self.loss(value)?,
                _ => {}
            }
        }
        if shape.jitter > shape.delay {
            let jitter = table.get("jitter").map(|v| v.span()).unwrap_or_default();
            return Err(self
                .source
                .error(jitter, "`jitter` is larger than `delay`")
                .with_help("jitter varies the delay: give a `delay` at least as large"));
        }
        if shape.is_healthy() {
            return Err(self
                .source
                .error(value.span(), "`link` says nothing is wrong with the link")
                .with_help("give `down = true`, a `delay`, or a `loss`"));
        }
        Ok(LinkFault {
            machine: machine.name.clone(),
            network,
            shape,
        })
    }

    /// The network of a link fault: the one named, or the machine's only one.
    fn link_network(
        &self,
        value: Option<&Value<'_>>,
        machine: &Machine,
        machine_span: Span,
    ) -> Result<String> {
        let on: Vec<&str> = machine.ips.keys().map(String::as_str).collect();
        let Some(value) = value else {
            return match on[..] {
                [only] => Ok(only.to_owned()),
                [] => Err(self
                    .source
                    .error(machine_span, format!("`{}` is on no network", machine.name))
                    .with_help("a link fault needs a machine with an `ip`")),
                _ => Err(self
                    .source
                    .error(
                        machine_span,
                        format!("`{}` is on several networks: say which", machine.name),
                    )
                    .with_help(format!("add `network = ` one of: {}", on.join(", ")))),
            };
        };
        let network = self.string(value, "network", "\"lan\"")?;
        if on.contains(&network) {
            return Ok(network.to_owned());
        }
        Err(self
            .source
            .error(
                value.span(),
                format!("`{}` is not on network `{network}`", machine.name),
            )
            .with_help(if on.is_empty() {
                format!("`{}` is on no network", machine.name)
            } else {
                format!("`{}` is on: {}", machine.name, on.join(", "))
            }))
    }

    fn loss(&self, value: &Value<'_>) -> Result<f64> {
        let Some(text) = value.get_ref().as_str() else {
            return Err(self.type_error(value, "loss", "a percentage", "\"10%\""));
        };
        parse_loss(text).ok_or_else(|| {
            self.source
                .error(value.span(), format!("`loss` `{text}` is not a percentage"))
                .with_help("write a share of frames above 0 and at most 100, e.g. `loss = \"10%\"`")
        })
    }
}
