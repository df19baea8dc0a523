//! `provider = "libvirt"`: the machines as libvirt domains, through the
//! crate `virt`, so they show up in `virsh` and virt-manager and outlive
//! testbed itself.
//!
//! Per machine: a qcow2 volume in the storage pool `testbed`, backed by the
//! cached base image (copy-on-write); a domain of type `kvm` only when the
//! KVM probe passed, else `qemu`, booting our kernel directly, with the seed
//! disk, a serial console log in the machine's folder and a user-mode
//! management NIC whose SSH port is forwarded on 127.0.0.1 (qemu arguments
//! passed through: libvirt 9.0 forwards ports only with passt). Per topology
//! network: an isolated libvirt network (a bridge, no host address, no DHCP:
//! the guests' static IPs come from their seed).
//!
//! Every object is named `tb-<testbed id>-<name>`, the testbed id being a
//! hash of the testbed's `.testbed/` path, and domains carry testbed's
//! metadata. What was made is written to `libvirt.json` in the machine's or
//! network's folder before it is made, so `status` asks libvirt itself and
//! `destroy` removes exactly those objects, even after testbed was killed.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{
    kvm, loopback, qemu, Accelerator, DoctorLine, NetworkSpec, Provider, ProviderError, Relocation,
    VmSpec, VmState,
};
use crate::identity::Management;
use crate::model::LinkShape;

/// The environment variable naming the connection URI (see
/// [`super::Settings`]).
const URI_ENV: &str = "TESTBED_LIBVIRT_URI";
/// The XML namespace of testbed's domain metadata.
pub const METADATA_NS: &str = "https://testbed.dev/1";
/// The storage pool holding the machines' volumes.
pub const POOL: &str = "testbed";
/// What testbed made for a machine or network, in its folder.
const MADE: &str = super::LIBVIRT_MADE;
/// What `doctor` suggests when libvirtd cannot be reached.
const DOCTOR_FIX: &str = "apt-get install libvirt-daemon-system, start libvirtd, or set \
                          TESTBED_LIBVIRT_URI (provider libvirt only)";

#[derive(Debug, Clone)]
pub struct Libvirt {
    uri: String,
    /// testbed's cache: the KVM verdict, the storage pool's folder.
    cache_root: PathBuf,
}

/// The objects of one machine or network, as written before making them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Made {
    uri: String,
    /// The domain or network name.
    name: String,
    /// The machine's volume in [`POOL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
}

impl Libvirt {
    pub fn new(uri: impl Into<String>, cache_root: PathBuf) -> Libvirt {
        Libvirt {
            uri: uri.into(),
            cache_root,
        }
    }
}

/// A connection, or an error that says where testbed tried and what to do.
pub fn connect(uri: &str) -> Result<Connect, ProviderError> {
    // Errors come back as values; libvirt must not also print them.
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(|e| ProviderError::LibvirtUnreachable {
        uri: uri.to_string(),
        message: e.message().to_string(),
        env: URI_ENV,
    })
}

fn libvirt_error(what: impl std::fmt::Display, e: virt::error::Error) -> ProviderError {
    ProviderError::Libvirt {
        what: what.to_string(),
        message: e.message().to_string(),
    }
}

/// `tb-<id>-<name>`: `<id>` tells testbeds apart, `<name>` tells people what
/// it is. `dir` is the machine's or network's folder in `.testbed/`.
pub fn object_name(dir: &Path, name: &str) -> String {
    format!("tb-{}-{name}", testbed_id(dir))
}

/// 8 hex digits of the hash of the testbed's `.testbed/` path.
fn testbed_id(dir: &Path) -> String {
    let root = dir.parent().and_then(Path::parent).unwrap_or(dir);
    let digest = Sha256::digest(root.to_string_lossy().as_bytes());
    hex::encode(digest)[..8].to_string()
}

/// A Linux bridge name (at most 15 bytes) for a network.
fn bridge_name(network: &str) -> String {
    let digest = Sha256::digest(network.as_bytes());
    format!("tb{}", &hex::encode(digest)[..10])
}

fn read_made(dir: &Path) -> Option<Made> {
    let bytes = fs::read(dir.join(MADE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_made(dir: &Path, made: &Made) -> Result<(), ProviderError> {
    crate::state::create_private_dir(dir)?;
    let json = serde_json::to_vec_pretty(made).map_err(|e| ProviderError::Internal {
        what: "encoding libvirt.json",
        detail: e.to_string(),
    })?;
    Ok(crate::state::write_atomic(&dir.join(MADE), &json, 0o644)?)
}

/// `text` safe inside XML text and attribute values.
fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn path_text(path: &Path) -> String {
    xml_escape(&path.to_string_lossy())
}

/// The virtual size of a qcow2 image, from its header (bytes 24..32).
fn qcow2_virtual_size(path: &Path) -> Result<u64, ProviderError> {
    use std::io::Read;
    let mut header = [0u8; 32];
    fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|source| ProviderError::Io {
            what: format!("cannot read the image {}", path.display()),
            source,
        })?;
    let size: [u8; 8] = header[24..32].try_into().unwrap_or_default();
    Ok(u64::from_be_bytes(size))
}

fn pool_xml(path: &Path) -> String {
    format!(
        "<pool type='dir'><name>{POOL}</name><target><path>{}</path></target></pool>",
        path_text(path)
    )
}

fn volume_xml(name: &str, backing: &Path, capacity: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <target><format type='qcow2'/><compat>1.1</compat></target>\
         <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
        xml_escape(name),
        path_text(backing)
    )
}

fn network_xml(name: &str, bridge: &str) -> String {
    format!(
        "<network><name>{}</name><bridge name='{bridge}' stp='off' delay='0'/>\
         <dns enable='no'/></network>",
        xml_escape(name)
    )
}

/// The domain: our kernel booted directly, the volume, the seed disk, the
/// console log, the management NIC (qemu user networking, passed through)
/// and one NIC per topology network. `<genid/>`: libvirt gives the guest a
/// new VM generation id on each start from a snapshot, so a reverted guest
/// reseeds its RNG. `kvm`: a domain of type `kvm` (only
/// when the KVM probe passed), else `qemu`.
pub fn domain_xml(vm: &VmSpec, name: &str, volume: &str, kvm: bool) -> String {
    let kind = if kvm { "kvm" } else { "qemu" };
    let cpu = if kvm {
        "<cpu mode='host-passthrough' check='none'/>"
    } else {
        "<cpu mode='maximum' check='none'/>"
    };
    let nics: String = vm
        .nics
        .iter()
        .map(|nic| {
            let network = object_name(&nic.network.dir, &nic.network.name);
            interface_xml(&network, &nic.mac, "up")
        })
        .collect();
    // 0x1e: a PCI slot libvirt does not hand out itself.
    let management = [
        "-netdev".to_string(),
        qemu::management_netdev(vm),
        "-device".to_string(),
        format!(
            "virtio-net-pci,netdev=mgmt,mac={},bus=pci.0,addr=0x1e",
            vm.management_mac
        ),
    ]
    .iter()
    .map(|arg| format!("<qemu:arg value='{}'/>", xml_escape(arg)))
    .collect::<String>();
    format!(
        "<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
         <name>{name}</name><genid/>\
         <metadata><testbed:machine xmlns:testbed='{METADATA_NS}' name='{machine}' dir='{dir}'/></metadata>\
         <memory unit='MiB'>{memory}</memory><vcpu>{cpus}</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type>\
         <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>\
         <features><acpi/></features>{cpu}<clock offset='utc'/>\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices>\
         <disk type='volume' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>\
         <source pool='{POOL}' volume='{volume}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{seed}'/><target dev='vdb' bus='virtio'/><serial>testbed-seed</serial><readonly/></disk>\
         <controller type='usb' model='none'/>\
         {nics}\
         <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>\
         <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\
         <memballoon model='none'/>\
         </devices>\
         <qemu:commandline>{management}</qemu:commandline>\
         </domain>",
        name = xml_escape(name),
        machine = xml_escape(&vm.name),
        dir = path_text(&vm.dir),
        memory = vm.memory_mib,
        cpus = vm.cpus,
        kernel = path_text(&vm.image.kernel),
        initrd = path_text(&vm.image.initrd),
        cmdline = xml_escape(&qemu::kernel_cmdline(vm)),
        volume = xml_escape(volume),
        seed = path_text(&vm.seed),
        console = path_text(&vm.console_log()),
    )
}

/// The pool `testbed`, defined and started when missing. Its folder sits in
/// testbed's cache (`cache_root`), beside the images its volumes are backed by.
fn ensure_pool(conn: &Connect, cache_root: &Path) -> Result<StoragePool, ProviderError> {
    // Machines are created in parallel; one of them defines the pool.
    static DEFINING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = DEFINING.lock().unwrap_or_else(|e| e.into_inner());
    let pool = match conn.lookup_storage_pool_by_name(POOL) {
        Ok(pool) => pool,
        Err(_) => {
            let dir = cache_root.join("libvirt-pool");
            fs::create_dir_all(&dir).map_err(|source| ProviderError::Io {
                what: format!("cannot create the pool folder {}", dir.display()),
                source,
            })?;
            // Another testbed may have defined it meanwhile.
            let pool = conn
                .define_storage_pool_xml(&pool_xml(&dir), 0)
                .or_else(|e| conn.lookup_storage_pool_by_name(POOL).map_err(|_| e))
                .map_err(|e| libvirt_error("defining the storage pool", e))?;
            let _ = pool.set_autostart(true);
            pool
        }
    };
    if !pool.is_active().unwrap_or(false) {
        pool.create(0)
            .map_err(|e| libvirt_error("starting the storage pool", e))?;
    }
    Ok(pool)
}

/// In a machine's snapshot folder: which libvirt snapshot holds it.
const SNAPSHOT_RECORD: &str = "libvirt-snapshot.json";

/// A machine's share of a testbed snapshot: a libvirt snapshot of its
/// domain (the one `libvirt.json` in the machine's folder names).
#[derive(Debug, Serialize, Deserialize)]
struct SavedSnapshot {
    snapshot: String,
}

/// A libvirt snapshot name of its own for the save into `to`: the folder
/// and the moment (a save under a name used before is another snapshot).
fn snapshot_name(to: &Path) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let digest = Sha256::digest(format!("{}\0{now}", to.display()).as_bytes());
    format!("testbed-{}", &hex::encode(digest)[..12])
}

fn snapshot_xml(name: &str) -> String {
    format!(
        "<domainsnapshot><name>{}</name><description>taken by testbed</description>\
         <memory snapshot='internal'/></domainsnapshot>",
        xml_escape(name)
    )
}

fn read_saved_snapshot(from: &Path) -> Result<SavedSnapshot, ProviderError> {
    let path = from.join(SNAPSHOT_RECORD);
    let bytes = fs::read(&path).map_err(|source| ProviderError::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ProviderError::Internal {
        what: "reading a libvirt snapshot's record",
        detail: format!("{}: {e}", path.display()),
    })
}

fn snapshots_stay_home() -> ProviderError {
    ProviderError::Unsupported {
        provider: "libvirt",
        what: "restore a snapshot after `destroy`, in another folder or on another SSH port \
               (libvirt keeps it inside the machine's disk)",
        help: "restore it where it was taken; the green cache works on the qemu provider",
    }
}

/// A NIC on a topology network, its link `up` or `down`.
fn interface_xml(network: &str, mac: &str, link: &str) -> String {
    format!(
        "<interface type='network'><source network='{}'/><mac address='{}'/>\
         <model type='virtio'/><link state='{link}'/></interface>",
        xml_escape(network),
        xml_escape(mac)
    )
}

/// The domain of the machine in `dir`, which must have been made.
fn running_domain(dir: &Path) -> Result<(Made, Domain), ProviderError> {
    let not_made = || ProviderError::NotCreated {
        machine: dir.display().to_string(),
        missing: "its libvirt domain",
    };
    let made = read_made(dir).ok_or_else(not_made)?;
    let conn = connect(&made.uri)?;
    let domain = lookup_domain(&conn, &made.name).ok_or_else(not_made)?;
    Ok((made, domain))
}

fn lookup_domain(conn: &Connect, name: &str) -> Option<Domain> {
    conn.lookup_domain_by_name(name).ok()
}

fn lookup_volume(conn: &Connect, name: &str) -> Option<StorageVol> {
    let pool = conn.lookup_storage_pool_by_name(POOL).ok()?;
    pool.lookup_storage_vol_by_name(name).ok()
}

impl Provider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn ensure_network(&self, network: &NetworkSpec) -> Result<(), ProviderError> {
        let name = object_name(&network.dir, &network.name);
        write_made(
            &network.dir,
            &Made {
                uri: self.uri.clone(),
                name: name.clone(),
                volume: None,
            },
        )?;
        let conn = connect(&self.uri)?;
        let net = match conn.lookup_network_by_name(&name) {
            Ok(net) => net,
            Err(_) => conn
                .define_network_xml(&network_xml(&name, &bridge_name(&name)))
                .map_err(|e| libvirt_error(format!("defining network {name}"), e))?,
        };
        if !net.is_active().unwrap_or(false) {
            net.create()
                .map_err(|e| libvirt_error(format!("starting network {name}"), e))?;
        }
        Ok(())
    }

    fn block(&self, _: &NetworkSpec, pairs: &[(String, String)]) -> Result<(), ProviderError> {
        if pairs.is_empty() {
            return Ok(());
        }
        Err(ProviderError::Unsupported {
            provider: "libvirt",
            what:
                "drop traffic between chosen machines of one network (its bridge has no such rule)",
            help: "run the partition on the qemu provider",
        })
    }

    /// A NIC's link state is libvirt's to set; delay and loss are not.
    fn shape_link(
        &self,
        dir: &Path,
        network: &NetworkSpec,
        mac: &str,
        shape: &LinkShape,
    ) -> Result<(), ProviderError> {
        if !shape.delay.is_zero() || shape.loss > 0.0 {
            return Err(ProviderError::Unsupported {
                provider: "libvirt",
                what: "delay or drop a share of a link's frames (its bridge has no such rule)",
                help: "run delay and loss on the qemu provider; `down = true` works here",
            });
        }
        let (made, domain) = running_domain(dir)?;
        let state = if shape.down { "down" } else { "up" };
        let xml = interface_xml(&object_name(&network.dir, &network.name), mac, state);
        domain
            .update_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| libvirt_error(format!("setting a link of {} {state}", made.name), e))
    }

    fn pause(&self, dir: &Path) -> Result<(), ProviderError> {
        let (made, domain) = running_domain(dir)?;
        domain
            .suspend()
            .map_err(|e| libvirt_error(format!("pausing domain {}", made.name), e))
    }

    fn resume(&self, dir: &Path) -> Result<(), ProviderError> {
        let (made, domain) = running_domain(dir)?;
        domain
            .resume()
            .map_err(|e| libvirt_error(format!("resuming domain {}", made.name), e))
    }

    /// A libvirt snapshot of the paused domain, memory and disk (kept
    /// inside its qcow2 volume); `to` records its name. The domain stays
    /// paused.
    fn save_state(&self, dir: &Path, to: &Path) -> Result<(), ProviderError> {
        crate::state::create_private_dir(to)?;
        let (made, domain) = running_domain(dir)?;
        let saved = SavedSnapshot {
            snapshot: snapshot_name(to),
        };
        let json = serde_json::to_vec_pretty(&saved).map_err(|e| ProviderError::Internal {
            what: "encoding a libvirt snapshot's record",
            detail: e.to_string(),
        })?;
        crate::state::write_atomic(&to.join(SNAPSHOT_RECORD), &json, 0o600)?;
        domain
            .create_snapshot_xml(&snapshot_xml(&saved.snapshot), 0)
            .map_err(|e| libvirt_error(format!("taking a snapshot of {}", made.name), e))?;
        Ok(())
    }

    /// Reverts the domain to the snapshot `from` names, paused. Only onto
    /// the machine it was taken of, in place: the snapshot lives inside
    /// that machine's volume.
    fn restore_state(
        &self,
        dir: &Path,
        from: &Path,
        moved: &Relocation,
    ) -> Result<(), ProviderError> {
        if moved.root != moved.saved_root || moved.ssh_port != moved.saved_ssh_port {
            return Err(snapshots_stay_home());
        }
        let (made, domain) = running_domain(dir)?;
        let saved = read_saved_snapshot(from)?;
        let snapshot =
            Domain::lookup_snapshot_by_name(&domain, &saved.snapshot, 0).map_err(|e| {
                libvirt_error(
                    format!("finding snapshot {} of {}", saved.snapshot, made.name),
                    e,
                )
            })?;
        snapshot
            .revert(virt::sys::VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)
            .map_err(|e| libvirt_error(format!("reverting {} to a snapshot", made.name), e))
    }

    fn check_saves_travel(&self) -> Result<(), ProviderError> {
        Err(snapshots_stay_home())
    }

    fn forget_state(&self, dir: &Path, from: &Path) -> Result<(), ProviderError> {
        let (Some(made), Ok(saved)) = (read_made(dir), read_saved_snapshot(from)) else {
            return Ok(());
        };
        let conn = connect(&made.uri)?;
        let Some(domain) = lookup_domain(&conn, &made.name) else {
            return Ok(());
        };
        match Domain::lookup_snapshot_by_name(&domain, &saved.snapshot, 0) {
            Ok(snapshot) => snapshot.delete(0).map_err(|e| {
                libvirt_error(
                    format!("removing snapshot {} of {}", saved.snapshot, made.name),
                    e,
                )
            }),
            Err(_) => Ok(()),
        }
    }

    fn network_up(&self, network: &NetworkSpec) -> bool {
        let name = object_name(&network.dir, &network.name);
        let Ok(conn) = connect(&self.uri) else {
            return true;
        };
        conn.lookup_network_by_name(&name)
            .and_then(|net| net.is_active())
            .unwrap_or(true)
    }

    fn remove_network(&self, network: &NetworkSpec) -> Result<(), ProviderError> {
        let made = read_made(&network.dir).unwrap_or_else(|| Made {
            uri: self.uri.clone(),
            name: object_name(&network.dir, &network.name),
            volume: None,
        });
        let conn = connect(&made.uri)?;
        if let Ok(net) = conn.lookup_network_by_name(&made.name) {
            if net.is_active().unwrap_or(false) {
                net.destroy()
                    .map_err(|e| libvirt_error(format!("stopping network {}", made.name), e))?;
            }
            net.undefine()
                .map_err(|e| libvirt_error(format!("removing network {}", made.name), e))?;
        }
        remove_dir(&network.dir)
    }

    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let name = object_name(&vm.dir, &vm.name);
        let volume = format!("{name}.qcow2");
        write_made(
            &vm.dir,
            &Made {
                uri: self.uri.clone(),
                name,
                volume: Some(volume.clone()),
            },
        )?;
        let conn = connect(&self.uri)?;
        let pool = ensure_pool(&conn, &self.cache_root)?;
        if pool.lookup_storage_vol_by_name(&volume).is_ok() {
            return Ok(());
        }
        let capacity = qcow2_virtual_size(&vm.image.disk)?;
        StorageVol::create_xml(&pool, &volume_xml(&volume, &vm.image.disk, capacity), 0)
            .map_err(|e| libvirt_error(format!("creating volume {volume}"), e))?;
        Ok(())
    }

    /// Defines the domain from the current spec (its SSH port may have
    /// changed since the last boot), then starts it.
    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let made = read_made(&vm.dir).ok_or_else(|| ProviderError::NotCreated {
            machine: vm.name.clone(),
            missing: MADE,
        })?;
        let volume = made.volume.clone().unwrap_or_default();
        let conn = connect(&made.uri)?;
        let kvm = self.accelerator(&vm.image.kernel).kvm;
        let mut xml = domain_xml(vm, &made.name, &volume, kvm);
        // Redefining a domain keeps its UUID, or libvirt sees a new one.
        if let Some(uuid) = lookup_domain(&conn, &made.name).and_then(|d| d.uuid_string().ok()) {
            xml = xml.replacen("<name>", &format!("<uuid>{uuid}</uuid><name>"), 1);
        }
        let domain = conn
            .define_domain_xml(&xml)
            .map_err(|e| libvirt_error(format!("defining domain {}", made.name), e))?;
        domain.create().map_err(|e| {
            let message = e.message().to_string();
            if message.contains("hostfwd") || message.contains("host forwarding") {
                ProviderError::PortInUse {
                    machine: vm.name.clone(),
                    message,
                }
            } else {
                ProviderError::Start {
                    program: "libvirt".into(),
                    machine: vm.name.clone(),
                    message,
                }
            }
        })?;
        Ok(())
    }

    fn state(&self, dir: &Path) -> VmState {
        let Some(made) = read_made(dir) else {
            return VmState::Absent;
        };
        let Ok(conn) = connect(&made.uri) else {
            // Libvirt cannot say; the machine was made, so it is not absent.
            return VmState::Stopped;
        };
        match lookup_domain(&conn, &made.name) {
            Some(domain) if domain.is_active().unwrap_or(false) => VmState::Running,
            Some(_) => VmState::Stopped,
            None => match made.volume.as_deref().and_then(|v| lookup_volume(&conn, v)) {
                Some(_) => VmState::Stopped,
                None => VmState::Absent,
            },
        }
    }

    fn kill(&self, dir: &Path) -> Result<(), ProviderError> {
        let Some(made) = read_made(dir) else {
            return Ok(());
        };
        let conn = connect(&made.uri)?;
        if let Some(domain) = lookup_domain(&conn, &made.name) {
            if domain.is_active().unwrap_or(false) {
                domain
                    .destroy()
                    .map_err(|e| libvirt_error(format!("stopping domain {}", made.name), e))?;
            }
        }
        Ok(())
    }

    fn destroy(&self, dir: &Path) -> Result<(), ProviderError> {
        let Some(made) = read_made(dir) else {
            return remove_dir(dir);
        };
        self.kill(dir)?;
        let conn = connect(&made.uri)?;
        if let Some(domain) = lookup_domain(&conn, &made.name) {
            // With its snapshots' metadata: libvirt refuses to forget a
            // domain that still has some (their data goes with the volume).
            domain
                .undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                .map_err(|e| libvirt_error(format!("removing domain {}", made.name), e))?;
        }
        if let Some(volume) = made.volume.as_deref().and_then(|v| lookup_volume(&conn, v)) {
            volume
                .delete(0)
                .map_err(|e| libvirt_error("removing the volume", e))?;
        }
        remove_dir(dir)
    }

    fn management(&self, mac: &str) -> Management {
        qemu::user_net_management(mac)
    }

    /// The folder holds what testbed wrote before making libvirt objects.
    fn made(&self, dir: &Path) -> bool {
        dir.join(MADE).exists()
    }

    /// The probe runs here, on the host testbed runs on: right for a local
    /// libvirtd, a guess for a remote URI.
    fn accelerator(&self, kernel: &Path) -> Accelerator {
        kvm::accelerator(kernel, &self.cache_root)
    }

    /// SSH is forwarded on 127.0.0.1 by qemu's user-mode network, passed
    /// through to the domain.
    fn ssh_address(&self, port: u16) -> SocketAddr {
        loopback::ssh_address(port)
    }

    fn ssh_port(&self, previous: u16, retry: bool) -> Result<u16, ProviderError> {
        loopback::ssh_port(previous, retry)
    }

    /// Whether libvirtd answers at the URI, and which libvirt it is.
    fn doctor(&self) -> Vec<DoctorLine> {
        let (ok, detail) = reachable(&self.uri);
        vec![DoctorLine {
            name: "libvirt".into(),
            ok,
            detail,
            fix: DOCTOR_FIX.into(),
            required: false,
        }]
    }
}

/// Whether libvirtd answers at `uri`: its version, or why not (one line).
fn reachable(uri: &str) -> (bool, String) {
    match connect(uri) {
        Ok(conn) => {
            let version = conn
                .lib_version()
                .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
                .unwrap_or_else(|_| "?".into());
            (true, format!("reachable at {uri} (libvirt {version})"))
        }
        Err(e) => (
            false,
            e.to_string().lines().next().unwrap_or_default().to_string(),
        ),
    }
}

fn remove_dir(dir: &Path) -> Result<(), ProviderError> {
    match fs::remove_dir_all(dir) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(ProviderError::Io {
            what: format!("cannot remove {}", dir.display()),
            source,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::image::BuiltImage;
    use crate::provider::NicSpec;

    fn spec() -> VmSpec {
        let dir = PathBuf::from("/home/u/pair/.testbed/machines/alpha");
        VmSpec {
            name: "alpha".into(),
            dir: dir.clone(),
            image: BuiltImage {
                name: "debian-12".into(),
                hash: "abc".into(),
                disk: "/cache/images/debian-12-abc/disk.qcow2".into(),
                kernel: "/cache/images/debian-12-abc/vmlinuz".into(),
                initrd: "/cache/images/debian-12-abc/initrd.img".into(),
            },
            cpus: 2,
            memory_mib: 768,
            seed: dir.join("seed.tar"),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            management_mac: "52:54:00:00:01:01".into(),
            ssh_port: 40022,
            forwards: vec![crate::model::Forward {
                guest: 2181,
                host: 12181,
            }],
            nics: vec![NicSpec {
                network: NetworkSpec {
                    name: "lan".into(),
                    dir: PathBuf::from("/home/u/pair/.testbed/networks/lan"),
                },
                mac: "52:54:00:00:02:01".into(),
            }],
            internet: false,
        }
    }

    #[test]
    fn names_tell_testbeds_apart_and_keep_the_machine_name() {
        let a = object_name(Path::new("/a/.testbed/machines/alpha"), "alpha");
        let b = object_name(Path::new("/b/.testbed/machines/alpha"), "alpha");
        assert!(a.starts_with("tb-") && a.ends_with("-alpha"), "{a}");
        assert_ne!(a, b);
        let net = object_name(Path::new("/a/.testbed/networks/lan"), "lan");
        assert_eq!(&net[..11], &a[..11], "one id per testbed: {net} {a}");
        assert!(bridge_name(&net).len() <= 15);
    }

    #[test]
    fn the_domain_boots_our_kernel_with_loopback_forwards_and_metadata() {
        let xml = domain_xml(
            &spec(),
            "tb-1234abcd-alpha",
            "tb-1234abcd-alpha.qcow2",
            false,
        );
        for part in [
            "<domain type='qemu'",
            "<kernel>/cache/images/debian-12-abc/vmlinuz</kernel>",
            "root=/dev/vda rw console=ttyS0",
            "<source pool='testbed' volume='tb-1234abcd-alpha.qcow2'/>",
            "<serial>testbed-seed</serial><readonly/>",
            "hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:12181-:2181",
            "<source network='tb-f1a7219c-lan'/><mac address='52:54:00:00:02:01'/>",
            "<testbed:machine xmlns:testbed='https://testbed.dev/1' name='alpha'",
            "/home/u/pair/.testbed/machines/alpha/console.log",
            "<memory unit='MiB'>768</memory><vcpu>2</vcpu>",
        ] {
            assert!(xml.contains(part), "missing {part} in\n{xml}");
        }
        assert!(!xml.contains("0.0.0.0"));
        assert!(domain_xml(&spec(), "d", "v", true).contains("<domain type='kvm'"));
    }

    #[test]
    fn a_folder_is_libvirts_when_it_holds_libvirt_json() {
        let libvirt = Libvirt::new("qemu:///system", PathBuf::from("/nonexistent-cache"));
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("console.log"), "").expect("log");
        assert!(!libvirt.made(dir.path()));
        fs::write(dir.path().join(MADE), "{}").expect("made");
        assert!(libvirt.made(dir.path()));
        let settings = crate::provider::Settings {
            libvirt_uri: "qemu:///system".into(),
            cache_root: "/nonexistent-cache".into(),
        };
        assert_eq!(
            crate::provider::which_made(dir.path(), &settings),
            Some(crate::model::ProviderKind::Libvirt)
        );
    }

    #[test]
    fn xml_values_are_escaped() {
        assert_eq!(xml_escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
    }
}
