//! VM backends behind one trait. The orchestration (`lifecycle`) only ever
//! sees `dyn Provider`; which backend runs a machine is decided here.

pub mod kvm;
#[cfg(feature = "libvirt")]
pub mod libvirt;
mod loopback;
pub mod qemu;
mod qmp;
pub mod switch;
pub mod virtualbox;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::identity::Management;
use crate::image::BuiltImage;
use crate::model::{Forward, Host, LinkShape, Machine, ProviderKind};
use crate::ssh::Endpoint;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{program} failed to start {machine}: {message}")]
    Start {
        program: String,
        machine: String,
        message: String,
    },
    #[error("{machine}: a forwarded port is taken: {message}")]
    PortInUse { machine: String, message: String },
    #[error("{0}: still running after SIGKILL")]
    Unkillable(String),
    #[error("cannot run {program}: {source} (install it: {hint})")]
    Missing {
        program: String,
        hint: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the {0} provider is not available in this build; use provider = \"qemu\" (libvirt needs the cargo feature `libvirt`)")]
    Unavailable(&'static str),
    /// A provider's own folder or file in `.testbed/` could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "{} is {length} bytes long, too long for a Unix socket (at most {max}): move the \
         topology to a shorter path",
        path.display()
    )]
    SocketPathTooLong {
        path: PathBuf,
        length: usize,
        max: usize,
    },
    #[error("the switch of network {network} did not come up")]
    SwitchDidNotStart { network: String },
    /// Every port tried for a machine's SSH forward was taken.
    #[error("no free port")]
    NoFreePort,
    #[error(
        "cannot reach libvirt at {uri}: {message}\n  help: is libvirtd running (`systemctl \
         status libvirtd`)? Point testbed elsewhere with `[libvirt] uri = \"…\"` in the \
         topology or {env}"
    )]
    LibvirtUnreachable {
        uri: String,
        message: String,
        /// The environment variable naming the URI.
        env: &'static str,
    },
    /// A disk the provider needs from the image cache could not be made.
    #[error(transparent)]
    Image(#[from] Box<crate::image::ImageError>),
    /// A `VBoxManage` call failed: the call, and what it said.
    #[error("VBoxManage failed: {call}\n  {message}")]
    VBoxManage { call: String, message: String },
    /// A libvirt call failed; `what` says which.
    #[error("libvirt: {what}: {message}")]
    Libvirt { what: String, message: String },
    /// `start` before `create`: the folder lacks the provider's record.
    #[error("{machine}: not created (no {missing})")]
    NotCreated {
        machine: String,
        missing: &'static str,
    },
    /// Something the topology asks of a provider that it cannot do.
    #[error("the {provider} provider cannot {what}\n  help: {help}")]
    Unsupported {
        provider: &'static str,
        what: &'static str,
        help: &'static str,
    },
    /// A bug or a panic in testbed itself, not something the user did.
    #[error("internal error: {detail} ({what})")]
    Internal { what: &'static str, detail: String },
}

/// The machine as observed on the host, without asking the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// A disk exists but no VM process runs.
    Stopped,
    Running,
    /// Nothing of this machine exists.
    Absent,
}

/// One private L2 network of the topology, as a provider realises it.
#[derive(Debug, Clone)]
pub struct NetworkSpec {
    pub name: String,
    /// Where the provider keeps this network's sockets and pid (0700).
    pub dir: PathBuf,
    /// Its machines run on more than one host: the provider joins them
    /// across the hosts' link into one segment.
    pub across_hosts: bool,
}

/// A NIC on a topology network.
#[derive(Debug, Clone)]
pub struct NicSpec {
    pub network: NetworkSpec,
    pub mac: String,
}

/// How a saved VM's world changed before its restore: the testbed's state
/// folder it was saved in, and its SSH port then, against those now (the
/// green cache restores into other folders, while the saving one may run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocation {
    pub saved_root: PathBuf,
    pub root: PathBuf,
    pub saved_ssh_port: u16,
    pub ssh_port: u16,
}

/// Everything a provider needs to create and boot one machine.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    /// The machine's own folder: disk, seed, sockets, console log.
    pub dir: PathBuf,
    pub image: BuiltImage,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The identity seed disk (a tar archive the guest reads at boot).
    pub seed: PathBuf,
    /// Given to systemd at boot too: journald and friends read it before
    /// the seed is applied.
    pub machine_id: String,
    pub management_mac: String,
    /// Host port forwarded to the guest's SSH port (see
    /// [`Provider::ssh_port`] and [`Provider::ssh_address`]).
    pub ssh_port: u16,
    pub forwards: Vec<Forward>,
    pub nics: Vec<NicSpec>,
    /// The management NIC reaches the host and the outside too; when false
    /// it carries only the forwarded ports (qemu's `restrict=on`).
    pub internet: bool,
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(crate::state::CONSOLE_LOG)
    }
}

/// Which accelerator a provider will boot machines with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accelerator {
    /// In a user's words: "KVM", "TCG (software emulation)".
    pub name: &'static str,
    /// Hardware acceleration (only when the KVM probe passed).
    pub kvm: bool,
    /// Why this one, in a user's words.
    pub reason: String,
    /// True when the probe ran just now (say it once).
    pub fresh: bool,
}

/// One line of `testbed doctor`: something this host has or lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorLine {
    pub name: String,
    pub ok: bool,
    /// What was found (a version, a verdict) or why it is missing.
    pub detail: String,
    /// What to do when it is missing.
    pub fix: String,
    /// The provider cannot run at all without it (KVM, say, is optional:
    /// TCG works). `doctor` fails when a required line of the default
    /// provider is missing.
    pub required: bool,
}

impl DoctorLine {
    /// Runs `program args` and reports its first line of output (its
    /// version), or that it cannot be run.
    pub fn version(name: &str, program: &str, args: &[&str], fix: &str) -> DoctorLine {
        let (ok, detail) = match Command::new(program).args(args).output() {
            Ok(out) => {
                let text = if out.stdout.is_empty() {
                    out.stderr
                } else {
                    out.stdout
                };
                let first = String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                (true, first)
            }
            Err(e) => (false, format!("{program}: {e}")),
        };
        DoctorLine {
            name: name.into(),
            ok,
            detail,
            fix: fix.into(),
            required: false,
        }
    }

    /// The same line, marked as one the provider cannot run without.
    pub fn required(self) -> DoctorLine {
        DoctorLine {
            required: true,
            ..self
        }
    }
}

/// A VM backend. `create`, `start`, `kill` and `destroy` may block for
/// seconds (they spawn and wait for processes) and run on blocking threads;
/// `state` must be cheap, it is called while polling.
///
/// Everything that differs between backends is asked here, so the
/// orchestration never asks which backend it has: what a folder holds, the
/// accelerator, how the host reaches a machine's SSH, what `doctor` checks.
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Makes sure the network exists and is up (idempotent).
    fn ensure_network(&self, network: &NetworkSpec) -> Result<(), ProviderError>;
    /// Removes the network and whatever serves it.
    fn remove_network(&self, network: &NetworkSpec) -> Result<(), ProviderError>;
    /// Drops the traffic between each pair of MACs on the network (a
    /// partition); an empty list lets everything through again.
    fn block(&self, network: &NetworkSpec, pairs: &[(String, String)])
        -> Result<(), ProviderError>;
    /// Shapes the link of the machine in `dir` whose NIC on `network` has
    /// `mac`: down, slow or lossy; a healthy shape undoes it.
    fn shape_link(
        &self,
        dir: &Path,
        network: &NetworkSpec,
        mac: &str,
        shape: &LinkShape,
    ) -> Result<(), ProviderError>;
    /// Freezes the VM (its memory kept, its clock stopped).
    fn pause(&self, dir: &Path) -> Result<(), ProviderError>;
    /// Runs a paused VM again.
    fn resume(&self, dir: &Path) -> Result<(), ProviderError>;
    /// Writes the paused VM's memory and disk into the folder `to`; the VM
    /// stays paused.
    fn save_state(&self, dir: &Path, to: &Path) -> Result<(), ProviderError>;
    /// Replaces the machine's VM (which must not run) by the one
    /// [`Provider::save_state`] wrote into `from`, loaded and paused:
    /// [`Provider::resume`] runs it. `moved`: the VM was saved in another
    /// state folder, or on another SSH port.
    fn restore_state(
        &self,
        dir: &Path,
        from: &Path,
        moved: &Relocation,
    ) -> Result<(), ProviderError>;
    /// Boots a machine (whose disk [`Provider::create`] has not made) from
    /// a warm-boot template: the memory and disk [`Provider::save_state`]
    /// wrote into `from` for a VM of the same image, cpus, memory and
    /// number of NICs. Returns once the VM runs; its guest goes on where the
    /// template stood, with the template's identity and MACs (NIC for NIC,
    /// in [`VmSpec`]'s order: management first) until `up` applies its own.
    fn start_from(&self, _vm: &VmSpec, _from: &Path) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            provider: self.name(),
            what: "boot a machine from a template",
            help: "the machine boots cold",
        })
    }
    /// Ok when what [`Provider::save_state`] writes is whole in its folder,
    /// so that it restores after `destroy` or into another folder (what the
    /// green cache needs); else why not.
    fn check_saves_travel(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Drops whatever [`Provider::save_state`] kept outside the folder
    /// `from`, before the folder goes.
    fn forget_state(&self, _dir: &Path, _from: &Path) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Whether a network that was made still carries traffic (its switch or
    /// bridge is up). True when it cannot be told: a false answer reboots
    /// the machines on it.
    fn network_up(&self, network: &NetworkSpec) -> bool;
    /// Creates the machine's disk (copy-on-write over the base image).
    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError>;
    /// Boots a created machine with [`Provider::accelerator`]; returns once
    /// the VM process runs.
    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError>;
    /// What runs of the machine whose folder is `dir`. The calls below take
    /// only the folder, so `status` and `destroy` work from the state alone.
    fn state(&self, dir: &Path) -> VmState;
    /// Stops the VM at once (the guest gets no say).
    fn kill(&self, dir: &Path) -> Result<(), ProviderError>;
    /// Removes the machine: process, disk, sockets.
    fn destroy(&self, dir: &Path) -> Result<(), ProviderError>;
    /// Brings the console log of the machine in `dir` up to date in its
    /// folder ([`crate::state::CONSOLE_LOG`]), when the provider keeps it
    /// elsewhere (libvirt: a volume on its host). qemu writes it there.
    fn fetch_console(&self, _dir: &Path) -> Result<(), ProviderError> {
        Ok(())
    }
    /// How guests reach the host on their management NIC.
    fn management(&self, mac: &str) -> Management;
    /// Whether this folder (a machine's or a network's) holds something
    /// this provider made, whatever the record says.
    fn made(&self, dir: &Path) -> bool;
    /// Which accelerator this provider will boot machines with, and why.
    /// `kernel` is one the probe may boot; the verdict is cached.
    fn accelerator(&self, kernel: &Path) -> Accelerator;
    /// Where the host reaches the SSH of a machine booted with host port
    /// `port`.
    fn ssh_endpoint(&self, port: u16) -> Endpoint;
    /// A host port for the machine's SSH forward: `previous` when it is
    /// still free, else a new free one (`retry` = the last start found it
    /// taken).
    fn ssh_port(&self, previous: u16, retry: bool) -> Result<u16, ProviderError>;
    /// What this provider needs of the host, as `testbed doctor` lines.
    fn doctor(&self) -> Vec<DoctorLine>;
    /// The commands `up` would run to boot the machine (to create it
    /// first, when `create`), as a shell would take them, for `plan` to
    /// show: for backends driven through a command-line tool. Empty when
    /// there is no such tool.
    fn planned_calls(&self, _vm: &VmSpec, _create: bool) -> Vec<String> {
        Vec::new()
    }
}

/// `tb-<id>-<name>`: `<id>` tells testbeds apart, `<name>` tells people what
/// it is; how providers that keep objects outside `.testbed/` (libvirt's
/// domains, VirtualBox's VMs) name them. `dir` is the machine's or
/// network's folder in `.testbed/`.
pub fn object_name(dir: &Path, name: &str) -> String {
    format!("tb-{}-{name}", testbed_id(dir))
}

/// 8 hex digits of the hash of the testbed's `.testbed/` path.
fn testbed_id(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let root = dir.parent().and_then(Path::parent).unwrap_or(dir);
    let digest = Sha256::digest(root.to_string_lossy().as_bytes());
    hex::encode(digest)[..8].to_string()
}

/// Removes a folder and all in it; one already gone is fine.
fn remove_dir(dir: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(dir) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(ProviderError::Io {
            what: format!("cannot remove {}", dir.display()),
            source,
        }),
        _ => Ok(()),
    }
}

/// The file the libvirt provider writes into a folder before making its
/// objects (the only pointer to them). Known here too so that a build
/// without libvirt still does not take such a folder for another's.
const LIBVIRT_MADE: &str = "libvirt.json";

/// The providers to ask what made a folder, qemu last: all put a console
/// log (and lifecycle a seed) in a machine's folder, and a libvirt or
/// VirtualBox folder taken for a qemu one would lose the only pointer to
/// its domain or VM, so their markers are the evidence that wins.
const MAKERS: [ProviderKind; 3] = [
    ProviderKind::Libvirt,
    ProviderKind::Virtualbox,
    ProviderKind::Qemu,
];

/// The provider whose files are in a machine's or network's folder, when
/// they say so: `destroy` must not take a libvirt machine the record lost
/// for a qemu one (and delete the only pointer to its domain).
pub fn which_made(dir: &Path, settings: &Settings) -> Option<ProviderKind> {
    MAKERS
        .into_iter()
        .find(|kind| match for_kind(*kind, settings) {
            Ok(provider) => provider.made(dir),
            // This build cannot ask it; libvirt's marker is still known.
            Err(_) => *kind == ProviderKind::Libvirt && dir.join(LIBVIRT_MADE).exists(),
        })
}

/// A provider's `doctor` lines; for one this build lacks, a line that says so.
pub fn doctor(kind: ProviderKind, settings: &Settings) -> Vec<DoctorLine> {
    match for_kind(kind, settings) {
        Ok(provider) => provider.doctor(),
        Err(_) => vec![DoctorLine {
            name: kind.as_str().into(),
            ok: false,
            detail: format!(
                "this build has no {kind} provider (cargo feature `{kind}`)",
                kind = kind.as_str()
            ),
            fix: format!("build testbed with the cargo feature `{}`", kind.as_str()),
            required: false,
        }],
    }
}

/// `doctor -f` lines for each of a topology's `[hosts]` (in `settings`).
pub fn doctor_hosts(settings: &Settings) -> Vec<DoctorLine> {
    settings
        .hosts
        .iter()
        .flat_map(|(name, uri)| host_doctor(name, uri, settings))
        .collect()
}

#[cfg(feature = "libvirt")]
fn host_doctor(name: &str, uri: &str, settings: &Settings) -> Vec<DoctorLine> {
    libvirt::host_doctor(name, uri, &settings.cache_root)
}

#[cfg(not(feature = "libvirt"))]
fn host_doctor(name: &str, _uri: &str, _settings: &Settings) -> Vec<DoctorLine> {
    vec![DoctorLine {
        name: format!("host {name}"),
        ok: false,
        detail: "this build has no libvirt provider (cargo feature `libvirt`)".into(),
        fix: "build testbed with the cargo feature `libvirt`".into(),
        required: true,
    }]
}

/// Where the providers find what they need of the host: the daemon they
/// talk to, the cache for their verdicts and volumes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The libvirt connection URI: the topology's `[libvirt] uri`, else
    /// `$TESTBED_LIBVIRT_URI`, else `qemu:///system`.
    pub libvirt_uri: String,
    /// testbed's cache (the images' root): the KVM probe's cached verdict,
    /// libvirt's storage pool folder, the kernels `doctor` probes with.
    pub cache_root: PathBuf,
    /// The topology's `[hosts]`: each host's libvirt URI, by host name.
    pub hosts: BTreeMap<String, String>,
}

impl Settings {
    /// The settings of a topology that may name a libvirt URI (it wins over
    /// `$TESTBED_LIBVIRT_URI`), from the command's settings.
    pub fn new(topology_uri: Option<&str>, settings: &crate::settings::Settings) -> Settings {
        Settings {
            libvirt_uri: topology_uri
                .or(settings.libvirt_uri.as_deref())
                .unwrap_or(crate::settings::DEFAULT_LIBVIRT_URI)
                .to_owned(),
            cache_root: settings.cache_root.clone(),
            hosts: BTreeMap::new(),
        }
    }

    /// The same settings, knowing the topology's `[hosts]`.
    pub fn with_hosts(self, hosts: &BTreeMap<String, Host>) -> Settings {
        let hosts = hosts
            .iter()
            .map(|(name, host)| (name.clone(), host.uri.clone()))
            .collect();
        Settings { hosts, ..self }
    }

    /// The settings of one machine: the libvirt of its `host`, when it has
    /// one.
    fn for_machine(&self, machine: &Machine) -> Settings {
        match machine.host.as_ref().and_then(|host| self.hosts.get(host)) {
            Some(uri) => Settings {
                libvirt_uri: uri.clone(),
                ..self.clone()
            },
            None => self.clone(),
        }
    }

    /// The same settings with another cache (the one a `Cache` was opened at).
    pub fn with_cache_root(self, cache_root: PathBuf) -> Settings {
        Settings { cache_root, ..self }
    }
}

/// The backend of a machine: its provider, connected to its host's libvirt
/// when it has a `host`.
pub fn for_machine(
    machine: &Machine,
    settings: &Settings,
) -> Result<Box<dyn Provider>, ProviderError> {
    for_kind(machine.provider, &settings.for_machine(machine))
}

/// The backend for a provider kind.
pub fn for_kind(
    kind: ProviderKind,
    settings: &Settings,
) -> Result<Box<dyn Provider>, ProviderError> {
    match kind {
        ProviderKind::Qemu => Ok(Box::new(qemu::Qemu::new(settings.cache_root.clone()))),
        #[cfg(feature = "libvirt")]
        ProviderKind::Libvirt => Ok(Box::new(libvirt::Libvirt::new(
            &settings.libvirt_uri,
            settings.cache_root.clone(),
        ))),
        #[cfg(not(feature = "libvirt"))]
        ProviderKind::Libvirt => Err(ProviderError::Unavailable("libvirt")),
        ProviderKind::Virtualbox => Ok(Box::new(virtualbox::Virtualbox::new(
            settings.cache_root.clone(),
        ))),
    }
}

/// A machine as the providers' unit tests describe it: `alpha` of the
/// testbed in `/home/u/pair`, on `lan`, with one forward.
#[cfg(test)]
pub(crate) fn sample_vm() -> VmSpec {
    let dir = PathBuf::from("/home/u/pair/.testbed/machines/alpha");
    VmSpec {
        name: "alpha".into(),
        dir: dir.clone(),
        image: BuiltImage {
            name: "debian-12".into(),
            hash: "abc".into(),
            root: "/cache/images/debian-12-abc/disk.qcow2".into(),
            kernel: "/cache/images/debian-12-abc/vmlinuz".into(),
            initrd: "/cache/images/debian-12-abc/initrd.img".into(),
        },
        cpus: 2,
        memory_mib: 768,
        seed: dir.join("seed.tar"),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        management_mac: "52:54:00:00:01:01".into(),
        ssh_port: 40022,
        forwards: vec![Forward {
            guest: 2181,
            host: 12181,
        }],
        nics: vec![NicSpec {
            network: NetworkSpec {
                name: "lan".into(),
                dir: PathBuf::from("/home/u/pair/.testbed/networks/lan"),
                across_hosts: false,
            },
            mac: "52:54:00:00:02:01".into(),
        }],
        internet: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_says_which_provider_made_it_libvirt_first() {
        let settings = Settings {
            libvirt_uri: "qemu:///system".into(),
            cache_root: "/nonexistent-cache".into(),
            hosts: BTreeMap::new(),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(which_made(dir.path(), &settings), None);
        std::fs::write(dir.path().join("disk.qcow2"), "").expect("disk");
        assert_eq!(which_made(dir.path(), &settings), Some(ProviderKind::Qemu));
        std::fs::write(dir.path().join(LIBVIRT_MADE), "{}").expect("made");
        assert_eq!(
            which_made(dir.path(), &settings),
            Some(ProviderKind::Libvirt)
        );
    }
}
