//! The topology file: parsed, validated, and turned into the model the rest
//! of testbed works from. Every error names file:line:col and what is valid.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// Which VM backend runs a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Qemu,
    Libvirt,
    Virtualbox,
}

impl ProviderKind {
    pub const ALL: [&'static str; 3] = ["qemu", "libvirt", "virtualbox"];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Qemu => "qemu",
            ProviderKind::Libvirt => "libvirt",
            ProviderKind::Virtualbox => "virtualbox",
        }
    }
}

/// A validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    /// The topology file, canonicalised.
    pub path: PathBuf,
    /// `networks`, by name.
    pub networks: BTreeMap<String, Network>,
    /// `machines`, in file order.
    pub machines: Vec<Machine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub subnet: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub name: String,
    pub provider: ProviderKind,
    /// Name of a recipe in `images/` (`images/<image>.toml`).
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Static address per network name.
    pub ips: BTreeMap<String, Ipv4Addr>,
    pub forwards: Vec<Forward>,
}

/// A guest TCP port reachable on the host at 127.0.0.1:`host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub guest: u16,
    pub host: u16,
}

impl Topology {
    /// The directory holding the topology file; `.testbed/` lives here.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or_else(|| Path::new("."))
    }

    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }
}
