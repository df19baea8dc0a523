//! The model: a topology, its machines, networks, build, steps and checks
//! as plain values. Everything above reads these; this layer imports no
//! other module of testbed. Parsing and validation live in `topology`.

pub mod check;
pub mod fault;
mod libvirt_uri;
mod order;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;

pub use check::{CheckSpec, CommandProbe, HttpProbe, TcpProbe};
pub use fault::{Fault, LinkFault, LinkShape};
pub use libvirt_uri::{LibvirtUri, LIBVIRT_TRANSPORTS};
pub use order::find_cycle;

/// Which VM backend runs a machine.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The embedded default: no daemon, no root.
    #[default]
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
    /// `[[checks]]`, in file order.
    pub checks: Vec<CheckSpec>,
    /// `[build]`: the step that makes the artifacts in `dist/`.
    pub build: Option<Build>,
    /// `[[steps]]`, in file order: commands run on demand (`testbed run`).
    pub steps: Vec<Step>,
    /// `[libvirt] uri`: where the libvirt provider connects.
    pub libvirt_uri: Option<String>,
    /// `[hosts.NAME]`: the libvirt hosts machines may be placed on, by name.
    pub hosts: BTreeMap<String, Host>,
}

/// `[hosts.NAME]`: a libvirt host, the machines whose `host` names it
/// run on its libvirtd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The libvirt connection URI, e.g. `qemu+ssh://root@10.77.0.2/system`.
    pub uri: String,
}

/// `[build]`: a script run on a builder (a machine, or the host) whose
/// inputs are hashed and whose outputs are collected into `dist/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub builder: Builder,
    /// A shell script (`sh -eu`), run in the build directory.
    pub run: String,
    /// Paths relative to the topology's directory, files or directories;
    /// they may start with `../`.
    pub inputs: Vec<Input>,
    /// Paths relative to the build directory, each under `dist/`.
    pub outputs: Vec<String>,
    /// How long the script may run before it is stopped as hung.
    pub timeout: Duration,
}

/// `[build] timeout` when not given: building Mesos under emulation takes
/// most of an hour.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

/// `[[steps]] timeout` when not given (the step's command; its checks have
/// their own).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One of `[build]`'s inputs, with where the file names it: whether it
/// exists is checked when a build may run (`up`, `build`, `plan`), so a
/// missing input does not stop `status` or `destroy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: String,
    pub line: usize,
    pub col: usize,
}

/// Where `[build]` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builder {
    /// On this machine, in the topology's directory.
    Host,
    /// On the named machine of the topology.
    Machine(String),
}

/// `[[steps]]`: a named fault, command or both (the fault first), then
/// checks that must pass after them (the tutorial's `aurora create`,
/// `aurora kill`; a partition, then "the majority still serves").
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub fault: Option<Fault>,
    pub command: Option<StepCommand>,
    pub checks: Vec<CheckSpec>,
    /// How long the command may run before it is stopped as hung.
    pub timeout: Duration,
}

/// A step's `run`, on its `machine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepCommand {
    pub machine: String,
    pub run: String,
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
    /// Kits (`daemons/<name>/`) this machine runs, in the order given.
    pub daemons: Vec<String>,
    /// Per-machine template variables (`vars = { … }`).
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Machines whose daemons must be ready before this one's start.
    pub depends_on: Vec<String>,
    /// Debian packages baked into this machine's image besides its kits'.
    pub packages: Vec<String>,
    /// Files under `dist/` pushed to `/srv/testbed/dist/` on this machine.
    pub artifacts: Vec<String>,
    /// Whether the guest may reach the host and the outside through its
    /// management NIC (a builder that downloads); otherwise that NIC
    /// carries only testbed's SSH and the forwarded ports.
    pub internet: bool,
    /// The `[hosts]` entry whose libvirtd runs this machine (libvirt only;
    /// its own `host`, else `[defaults] host`). `None`: the topology's
    /// libvirt (`[libvirt] uri`, else the environment's).
    pub host: Option<String>,
    /// The user's own provisioning, run in order after the machine's kits.
    pub provision: Vec<Provisioner>,
}

/// One entry of a machine's `provision` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioner {
    pub run: ProvisionRun,
    /// Paths beside the topology (files or folders) whose contents, when
    /// they change, run it again besides its own script or playbook.
    pub inputs: Vec<String>,
}

/// What a provisioner runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionRun {
    /// A shell script copied to the guest and run there as root.
    Shell {
        script: Script,
        args: Vec<String>,
        env: BTreeMap<String, String>,
    },
    /// An Ansible playbook beside the topology, run from the host against
    /// this machine.
    Ansible { playbook: String },
}

/// Where a shell provisioner's script comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// A file, relative to the topology.
    File(String),
    /// The script's text, written in the topology.
    Inline(String),
}

impl Provisioner {
    /// How the user knows it: `shell setup.sh`, ``inline `echo hi` ``,
    /// `ansible site.yml`; the key it is recorded under.
    pub fn label(&self) -> String {
        match &self.run {
            ProvisionRun::Shell {
                script: Script::File(path),
                ..
            } => format!("shell {path}"),
            ProvisionRun::Shell {
                script: Script::Inline(text),
                ..
            } => format!("inline `{}`", first_line_of(text)),
            ProvisionRun::Ansible { playbook } => format!("ansible {playbook}"),
        }
    }
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

    /// Whether the machines on `network` run on more than one host.
    pub fn spans_hosts(&self, network: &str) -> bool {
        let hosts: std::collections::BTreeSet<Option<&str>> = self
            .machines
            .iter()
            .filter(|machine| machine.ips.contains_key(network))
            .map(|machine| machine.host.as_deref())
            .collect();
        hosts.len() > 1
    }

    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// Machine names in start order: wave 0 holds the machines without
    /// `depends_on`, wave n those whose dependencies all start in earlier
    /// waves; file order inside a wave. A validated topology places every
    /// machine; one in a cycle or depending on an unknown name is left out.
    pub fn start_waves(&self) -> Vec<Vec<String>> {
        order::wave_indices(&self.machines)
            .into_iter()
            .map(|wave| {
                wave.into_iter()
                    .filter_map(|index| self.machines.get(index))
                    .map(|machine| machine.name.clone())
                    .collect()
            })
            .collect()
    }

    /// The machines whose `daemons` include `daemon`, in file order.
    pub fn machines_running(&self, daemon: &str) -> Vec<&Machine> {
        self.machines
            .iter()
            .filter(|machine| machine.daemons.iter().any(|name| name == daemon))
            .collect()
    }
}

/// The first line of a script that says something, cut at 40 characters.
fn first_line_of(script: &str) -> String {
    let line = script
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("#!"))
        .unwrap_or_default();
    match line.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

/// Why `path` cannot be an artifact: it must name a file under `dist/`.
pub fn check_dist_path(path: &str) -> std::result::Result<(), String> {
    let Some(rest) = path.strip_prefix("dist/") else {
        return Err(format!("must start with `{DIST}/`"));
    };
    let clean = !rest.is_empty()
        && !rest.ends_with('/')
        && rest
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if clean {
        Ok(())
    } else {
        Err("must name a file below `dist/`, without `.`, `..` or empty parts".to_owned())
    }
}

/// Where artifacts live beside the topology, and on the guests under
/// [`GUEST_ARTIFACT_ROOT`].
pub const DIST: &str = "dist";
/// Artifacts `dist/X` are pushed to `<GUEST_ARTIFACT_ROOT>/dist/X`.
pub const GUEST_ARTIFACT_ROOT: &str = "/srv/testbed";

/// 1-based (line, column) of `byte_offset` in `text`; the column counts
/// characters, not bytes. Offsets past the end or inside a character are
/// clamped to the previous character boundary.
pub fn line_col(text: &str, byte_offset: usize) -> (usize, usize) {
    let mut end = byte_offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.bytes().filter(|&byte| byte == b'\n').count() + 1;
    let col = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, col)
}

/// Whether `name` is a template identifier: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
