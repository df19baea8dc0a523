//! VM backends behind one trait. The orchestration (`lifecycle`) only ever
//! sees `dyn Provider`; which backend runs a machine is decided here.

pub mod kvm;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qemu;
mod qmp;
pub mod switch;

use std::path::{Path, PathBuf};

use crate::identity::Management;
use crate::image::BuiltImage;
use crate::state::StateError;
use crate::topology::{Forward, ProviderKind};

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
    /// A libvirt call failed; `what` says which.
    #[error("libvirt: {what}: {message}")]
    Libvirt { what: String, message: String },
    /// `start` before `create`: the folder lacks the provider's record.
    #[error("{machine}: not created (no {missing})")]
    NotCreated {
        machine: String,
        missing: &'static str,
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
}

/// A NIC on a topology network.
#[derive(Debug, Clone)]
pub struct NicSpec {
    pub network: NetworkSpec,
    pub mac: String,
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
    /// Host port on 127.0.0.1 forwarded to the guest's SSH port.
    pub ssh_port: u16,
    pub forwards: Vec<Forward>,
    pub nics: Vec<NicSpec>,
    /// Use hardware acceleration (only when the KVM probe passed).
    pub kvm: bool,
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// A VM backend. `create`, `start`, `kill` and `destroy` may block for
/// seconds (they spawn and wait for processes) and run on blocking threads;
/// `state` must be cheap, it is called while polling.
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Makes sure the network exists and is up (idempotent).
    fn ensure_network(&self, network: &NetworkSpec) -> Result<(), ProviderError>;
    /// Removes the network and whatever serves it.
    fn remove_network(&self, network: &NetworkSpec) -> Result<(), ProviderError>;
    /// Creates the machine's disk (copy-on-write over the base image).
    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError>;
    /// Boots a created machine; returns once the VM process runs.
    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError>;
    /// What runs of the machine whose folder is `dir`. The calls below take
    /// only the folder, so `status` and `destroy` work from the state alone.
    fn state(&self, dir: &Path) -> VmState;
    /// Stops the VM at once (the guest gets no say).
    fn kill(&self, dir: &Path) -> Result<(), ProviderError>;
    /// Removes the machine: process, disk, sockets.
    fn destroy(&self, dir: &Path) -> Result<(), ProviderError>;
    /// How guests reach the host on their management NIC.
    fn management(&self, mac: &str) -> Management;
}

/// What the libvirt provider writes into a folder before making its objects.
pub const LIBVIRT_MADE: &str = "libvirt.json";

/// The provider whose files are in a machine's or network's folder, when
/// they say so: `destroy` must not take a libvirt machine the record lost
/// for a qemu one (and delete the only pointer to its domain).
pub fn kind_made(dir: &Path) -> Option<ProviderKind> {
    dir.join(LIBVIRT_MADE)
        .exists()
        .then_some(ProviderKind::Libvirt)
}

/// Where the providers that talk to a daemon find it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The libvirt connection URI: the topology's `[libvirt] uri`, else
    /// `$TESTBED_LIBVIRT_URI`, else `qemu:///system`.
    pub libvirt_uri: String,
}

impl Settings {
    /// The settings for a topology that may name a libvirt URI.
    pub fn new(libvirt_uri: Option<&str>) -> Settings {
        let from_env = std::env::var("TESTBED_LIBVIRT_URI").ok();
        Settings {
            libvirt_uri: libvirt_uri
                .map(str::to_owned)
                .or(from_env)
                .unwrap_or_else(|| "qemu:///system".to_owned()),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::new(None)
    }
}

/// The backend for a provider kind.
pub fn for_kind(
    kind: ProviderKind,
    settings: &Settings,
) -> Result<Box<dyn Provider>, ProviderError> {
    match kind {
        ProviderKind::Qemu => Ok(Box::new(qemu::Qemu)),
        #[cfg(feature = "libvirt")]
        ProviderKind::Libvirt => Ok(Box::new(libvirt::Libvirt::new(&settings.libvirt_uri))),
        #[cfg(not(feature = "libvirt"))]
        ProviderKind::Libvirt => {
            let _ = settings;
            Err(ProviderError::Unavailable("libvirt"))
        }
        ProviderKind::Virtualbox => Err(ProviderError::Unavailable("virtualbox")),
    }
}
