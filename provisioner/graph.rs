//! A picture of a topology: its machines (with their daemons and provider),
//! the networks they sit on with their addresses, the host they run on, and
//! the start order (`depends_on`), as Graphviz `dot` or Mermaid text.
//!
//! Names are hostnames and network names (the topology checks them), but
//! every label is quoted all the same.

use crate::model::{Machine, Topology};

/// The host every machine runs on today (one box).
const HOST: &str = "this host";

/// Graphviz: machines as boxes inside the host, networks as ellipses, an
/// undirected edge per address, a dashed arrow from each machine to the
/// ones that start after it.
pub fn dot(topology: &Topology) -> String {
    let mut out = format!("digraph {} {{\n", dot_quote(&topology.name));
    out.push_str("  rankdir=LR;\n  node [fontname=\"monospace\"];\n");
    out.push_str(&format!(
        "  subgraph cluster_host {{\n    label={};\n",
        dot_quote(HOST)
    ));
    for machine in &topology.machines {
        out.push_str(&format!(
            "    {} [shape=box, label={}];\n",
            dot_quote(&node(machine)),
            dot_quote(&machine_label(machine, "\\n"))
        ));
    }
    out.push_str("  }\n");
    for network in topology.networks.values() {
        out.push_str(&format!(
            "  {} [shape=ellipse, label={}];\n",
            dot_quote(&format!("net:{}", network.name)),
            dot_quote(&format!("{}\\n{}", network.name, network.subnet))
        ));
    }
    for machine in &topology.machines {
        for (network, ip) in &machine.ips {
            out.push_str(&format!(
                "  {} -> {} [dir=none, label={}];\n",
                dot_quote(&node(machine)),
                dot_quote(&format!("net:{network}")),
                dot_quote(&ip.to_string())
            ));
        }
    }
    for (before, after) in start_order(topology) {
        out.push_str(&format!(
            "  {} -> {} [style=dashed, label=\"starts before\"];\n",
            dot_quote(&format!("machine:{before}")),
            dot_quote(&format!("machine:{after}"))
        ));
    }
    out.push_str("}\n");
    out
}

/// Mermaid: the same picture as a flowchart (GitHub renders it).
pub fn mermaid(topology: &Topology) -> String {
    let mut out = String::from("flowchart LR\n");
    out.push_str(&format!("  subgraph host[\"{HOST}\"]\n"));
    let ids: Vec<String> = (0..topology.machines.len())
        .map(|i| format!("m{i}"))
        .collect();
    for (machine, id) in topology.machines.iter().zip(&ids) {
        out.push_str(&format!(
            "    {id}[\"{}\"]\n",
            mermaid_text(&machine_label(machine, "<br/>"))
        ));
    }
    out.push_str("  end\n");
    let nets: Vec<&String> = topology.networks.keys().collect();
    for (index, network) in topology.networks.values().enumerate() {
        out.push_str(&format!(
            "  n{index}((\"{}<br/>{}\"))\n",
            mermaid_text(&network.name),
            network.subnet
        ));
    }
    for (machine, id) in topology.machines.iter().zip(&ids) {
        for (network, ip) in &machine.ips {
            if let Some(index) = nets.iter().position(|n| *n == network) {
                out.push_str(&format!("  {id} ---|{ip}| n{index}\n"));
            }
        }
    }
    let id_of = |name: &str| {
        topology
            .machines
            .iter()
            .position(|m| m.name == name)
            .map(|i| ids[i].clone())
    };
    for (before, after) in start_order(topology) {
        if let (Some(from), Some(to)) = (id_of(&before), id_of(&after)) {
            out.push_str(&format!("  {from} -.->|starts before| {to}\n"));
        }
    }
    out
}

/// (machine, machine that depends on it), in file order.
fn start_order(topology: &Topology) -> Vec<(String, String)> {
    topology
        .machines
        .iter()
        .flat_map(|m| m.depends_on.iter().map(|d| (d.clone(), m.name.clone())))
        .collect()
}

fn node(machine: &Machine) -> String {
    format!("machine:{}", machine.name)
}

/// `name`, then `provider, N cpu, M MiB`, then its daemons, joined by `newline`.
fn machine_label(machine: &Machine, newline: &str) -> String {
    let mut label = format!(
        "{}{newline}{}, {} cpu, {} MiB",
        machine.name,
        machine.provider.as_str(),
        machine.cpus,
        machine.memory_mib
    );
    if !machine.daemons.is_empty() {
        label.push_str(newline);
        label.push_str(&machine.daemons.join(", "));
    }
    label
}

/// A Graphviz double-quoted string (`\n` escapes in `text` are kept).
fn dot_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\\\""))
}

/// Text inside a Mermaid `"…"` label.
fn mermaid_text(text: &str) -> String {
    text.replace('"', "#quot;")
}
