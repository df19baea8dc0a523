//! An Ansible inventory of a testbed's machines. Each machine is reached
//! through the OpenSSH config testbed writes (its endpoint, key and pinned
//! host key; a jump for a remote libvirt host), sits in a group per kit and
//! per network, and carries its topology `vars` as host vars.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::model::Topology;

/// The formats Ansible reads an inventory in. Its YAML plugin takes a file
/// named `.yml`, `.yaml`, `.json` or without an extension, so YAML in
/// `inventory.ini` is not read; see [`PIPE_PREAMBLE`] for a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ini,
    Yaml,
    Json,
}

/// What goes before an inventory written to a pipe (`-i <(testbed
/// inventory)`): blank lines, as many as a pipe holds. Ansible opens a
/// pipe inventory once per plugin, and each open reads on from where the
/// last stopped: its script plugin's probe for `#!` reads one buffer
/// (at most a pipe's 64 KiB) and its YAML plugin the rest, which leaves
/// nothing for the INI plugin after it. So a pipe gets YAML, after enough
/// blank lines for the probe to take only those.
pub const PIPE_PREAMBLE: usize = 64 * 1024;

/// The machines, their host vars and their groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    /// Vars every machine shares: how Ansible connects.
    common: BTreeMap<String, Value>,
    hosts: BTreeMap<String, BTreeMap<String, Value>>,
    groups: BTreeMap<String, Vec<String>>,
}

/// A group name Ansible accepts without a warning: letters, digits and `_`.
fn group_name(prefix: &str, name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{safe}")
}

impl Inventory {
    /// The inventory of `machines` (those of `topology` that `ssh_config`
    /// reaches), in the topology's order.
    pub fn of(topology: &Topology, machines: &[String], ssh_config: &Path) -> Inventory {
        let common = BTreeMap::from([
            ("ansible_user".to_owned(), json!("root")),
            (
                "ansible_ssh_common_args".to_owned(),
                json!(format!(
                    "-F {}",
                    crate::ssh::shell_quote(&ssh_config.to_string_lossy())
                )),
            ),
            (
                "ansible_python_interpreter".to_owned(),
                json!("/usr/bin/python3"),
            ),
        ]);
        let mut hosts = BTreeMap::new();
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for machine in topology
            .machines
            .iter()
            .filter(|m| machines.contains(&m.name))
        {
            let mut vars = machine.vars.clone();
            // The ssh config's `Host` alias.
            vars.insert("ansible_host".into(), json!(machine.name));
            hosts.insert(machine.name.clone(), vars);
            let kits = machine.daemons.iter().map(|kit| group_name("kit", kit));
            let networks = machine.ips.keys().map(|net| group_name("net", net));
            for group in kits.chain(networks) {
                groups.entry(group).or_default().push(machine.name.clone());
            }
        }
        Inventory {
            common,
            hosts,
            groups,
        }
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Ini => self.ini(),
            Format::Yaml => self.yaml(),
            Format::Json => serde_json::to_string_pretty(&self.tree()).unwrap_or_default() + "\n",
        }
    }

    /// `all` with its vars, hosts and children, as Ansible's YAML (and
    /// JSON) inventory has it.
    fn tree(&self) -> Value {
        let children: Map<String, Value> = self
            .groups
            .iter()
            .map(|(group, members)| {
                let hosts: Map<String, Value> =
                    members.iter().map(|m| (m.clone(), json!({}))).collect();
                (group.clone(), json!({ "hosts": hosts }))
            })
            .collect();
        json!({ "all": {
            "vars": self.common,
            "hosts": self.hosts,
            "children": children,
        }})
    }

    /// Block YAML whose scalars are JSON (which YAML reads as they are), so
    /// no value of a user's needs YAML's own quoting rules.
    fn yaml(&self) -> String {
        let mut out = String::new();
        yaml_node(&self.tree(), 0, &mut out);
        out
    }

    fn ini(&self) -> String {
        let mut out = String::new();
        for (name, vars) in &self.hosts {
            out.push_str(name);
            for (key, value) in vars {
                out.push_str(&format!(" {key}={}", ini_value(value)));
            }
            out.push('\n');
        }
        out.push_str("\n[all:vars]\n");
        for (key, value) in &self.common {
            out.push_str(&format!("{key}={}\n", ini_vars_value(value)));
        }
        for (group, members) in &self.groups {
            out.push_str(&format!("\n[{group}]\n"));
            for member in members {
                out.push_str(&format!("{member}\n"));
            }
        }
        out
    }
}

/// A value as Ansible's INI inventory reads it: the line is split like a
/// shell's, then each value read as a Python literal where it is one.
fn ini_value(value: &Value) -> String {
    let literal = match value {
        Value::String(text) => return crate::ssh::shell_quote(text),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Null => "None".to_owned(),
        other => other.to_string(),
    };
    crate::ssh::shell_quote(&literal)
}

/// A value of a `[group:vars]` line, which Ansible does not split: the
/// rest of the line, read as a Python literal where it is one (a JSON
/// string is one).
fn ini_vars_value(value: &Value) -> String {
    match value {
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Null => "None".to_owned(),
        other => other.to_string(),
    }
}

fn yaml_node(value: &Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    let Value::Object(map) = value else {
        return;
    };
    for (key, child) in map {
        let key = serde_json::to_string(key).unwrap_or_default();
        match child {
            Value::Object(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                yaml_node(child, indent + 1, out);
            }
            scalar => out.push_str(&format!("{pad}{key}: {scalar}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let text = r#"
name = "inv"
[networks.lan]
subnet = "192.168.40.0/24"
[machines.zk-1]
ip = "192.168.40.2"
vars = { myid = 1, label = "it's \"one\"", debug = true }
[machines.web]
ip = "192.168.40.3"
"#;
        let search = crate::settings::Search {
            images: None,
            daemons: None,
        };
        crate::topology::parse(Path::new("/p/topology.toml"), text, &search).expect("topology")
    }

    fn inventory() -> Inventory {
        Inventory::of(
            &topology(),
            &["zk-1".into(), "web".into()],
            Path::new("/p/my dir/.testbed/ssh_config"),
        )
    }

    #[test]
    fn ini_quotes_what_ansible_would_split_and_groups_per_network() {
        let ini = inventory().render(Format::Ini);
        assert!(ini.contains("[all:vars]\nansible_python_interpreter=\"/usr/bin/python3\"\n"));
        assert!(
            ini.contains("ansible_ssh_common_args=\"-F '/p/my dir/.testbed/ssh_config'\"\n"),
            "{ini}"
        );
        assert!(ini.contains("[net_lan]\nweb\nzk-1\n") || ini.contains("[net_lan]\nzk-1\nweb\n"));
        let zk = ini.lines().find(|l| l.starts_with("zk-1 ")).expect("zk-1");
        assert!(zk.contains("ansible_host='zk-1'"), "{zk}");
        assert!(zk.contains("debug='True'"), "{zk}");
        assert!(zk.contains("myid='1'"), "{zk}");
        assert!(zk.contains(r#"label='it'\''s "one"'"#), "{zk}");
    }

    #[test]
    fn yaml_and_json_carry_the_same_tree() {
        let inventory = inventory();
        let json: Value = serde_json::from_str(&inventory.render(Format::Json)).expect("json");
        assert_eq!(json["all"]["hosts"]["zk-1"]["myid"], 1);
        assert_eq!(json["all"]["vars"]["ansible_user"], "root");
        assert!(json["all"]["children"]["net_lan"]["hosts"]["web"].is_object());
        let yaml = inventory.render(Format::Yaml);
        assert!(yaml.starts_with("\"all\":\n  \"children\":\n"), "{yaml}");
        assert!(yaml.contains("      \"myid\": 1\n"), "{yaml}");
        assert!(yaml.contains("        \"web\": {}\n"), "{yaml}");
    }

    #[test]
    fn machines_not_reached_are_left_out_and_groups_are_safe_names() {
        let only = Inventory::of(&topology(), &["web".into()], Path::new("/c"));
        assert_eq!(only.hosts.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(group_name("kit", "mesos-master"), "kit_mesos_master");
    }
}
