//! `provider = "libvirt"`: the machines as libvirt domains, through the
//! crate `virt`, so they show up in `virsh` and virt-manager and outlive
//! testbed itself.
//!
//! Everything libvirt's qemu reads is a volume of the storage pool
//! `testbed`, made through libvirt's API, so it works with Debian's stock
//! `qemu.conf` (qemu runs as `libvirt-qemu`, which cannot enter a user's
//! home) and with a libvirtd on another host. Per image, uploaded once per
//! libvirt host and reused: its disk, kernel and initrd (`tb-img-…`). Per
//! machine: a qcow2 volume backed by the image's disk (copy-on-write), the
//! seed uploaded at each start, and the serial console's log, which testbed
//! downloads when it shows it ([`Provider::fetch_console`]). The domain is
//! of type `kvm` only when the host has KVM (`accelerator`), else `qemu`;
//! it boots our kernel directly and has a user-mode management NIC whose SSH
//! port is forwarded on the libvirt host's 127.0.0.1 (qemu arguments passed
//! through: libvirt 9.0 forwards ports only with passt), reached through SSH
//! to that host when it is another machine. Per topology network: an
//! isolated libvirt network (a bridge, no host address, no DHCP: the guests'
//! static IPs come from their seed); a network across hosts is a multicast
//! group instead ([`interface_xml`]).
//!
//! Every object is named `tb-<testbed id>-<name>`, the testbed id being a
//! hash of the testbed's `.testbed/` path, and domains carry testbed's
//! metadata. What was made is written to `libvirt.json` in the machine's or
//! network's folder before it is made, so `status` asks libvirt itself and
//! `destroy` removes exactly those objects, even after testbed was killed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::{
    kvm, loopback, object_name, qemu, remove_dir, Accelerator, DoctorLine, NetworkSpec, Provider,
    ProviderError, Relocation, VmSpec, VmState,
};
use crate::identity::Management;
use crate::image::BuiltImage;
use crate::model::{LibvirtUri, LinkShape};
use crate::ssh::{Endpoint, Jump};

/// The environment variable naming the connection URI (see
/// [`super::Settings`]).
const URI_ENV: &str = "TESTBED_LIBVIRT_URI";
/// The XML namespace of testbed's domain metadata.
pub const METADATA_NS: &str = "https://testbed.dev/1";
/// The storage pool holding the images' and the machines' volumes.
pub const POOL: &str = "testbed";
/// Where a system libvirtd keeps [`POOL`]: its own state folder, which its
/// qemu can read whichever user it runs as.
const SYSTEM_POOL_PATH: &str = "/var/lib/libvirt/testbed";
/// The names of the images' volumes begin so; they outlive `destroy`, as
/// the images do in testbed's cache.
const IMAGE_VOLUME_PREFIX: &str = "tb-img-";
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
    /// The machine's disk volume in [`POOL`]; its seed and console volumes
    /// are named after it ([`Made::volumes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
}

impl Made {
    fn seed_volume(&self) -> String {
        format!("{}-seed.tar", self.name)
    }

    fn console_volume(&self) -> String {
        format!("{}-console.log", self.name)
    }

    /// Every volume of a machine: disk, seed, console log (none for a
    /// network).
    fn volumes(&self) -> Vec<String> {
        match &self.volume {
            Some(disk) => vec![disk.clone(), self.seed_volume(), self.console_volume()],
            None => Vec::new(),
        }
    }
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
/// One per URI for the whole process: through `qemu+ssh://` each new one
/// is an SSH login (about half a second here), and `up` polls every
/// machine's state.
pub fn connect(uri: &str) -> Result<Connect, ProviderError> {
    static OPEN: std::sync::Mutex<BTreeMap<String, Connect>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(conn) = open
        .get(uri)
        .filter(|conn| conn.is_alive().unwrap_or(false))
    {
        return Ok(conn.clone());
    }
    // Errors come back as values; libvirt must not also print them.
    virt::error::clear_error_callback();
    let conn = Connect::open(Some(uri)).map_err(|e| ProviderError::LibvirtUnreachable {
        uri: uri.to_string(),
        message: e.message().to_string(),
        env: URI_ENV,
    })?;
    open.insert(uri.to_owned(), conn.clone());
    Ok(conn)
}

fn libvirt_error(what: impl std::fmt::Display, e: virt::error::Error) -> ProviderError {
    ProviderError::Libvirt {
        what: what.to_string(),
        message: e.message().to_string(),
    }
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
        "<pool type='dir'><name>{POOL}</name><target><path>{}</path>\
         <permissions><mode>0711</mode></permissions></target></pool>",
        path_text(path)
    )
}

/// A machine's disk: qcow2 over the image's disk volume at `backing`.
fn volume_xml(name: &str, backing: &str, capacity: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
         <target><format type='qcow2'/><compat>1.1</compat></target>\
         <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
        xml_escape(name),
        xml_escape(backing)
    )
}

/// A volume that holds `bytes` bytes as they are (an upload's target).
fn raw_volume_xml(name: &str, bytes: u64) -> String {
    format!(
        "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity>\
         <allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>",
        xml_escape(name)
    )
}

fn network_xml(name: &str, bridge: &str) -> String {
    format!(
        "<network><name>{}</name><bridge name='{bridge}' stp='off' delay='0'/>\
         <dns enable='no'/></network>",
        xml_escape(name)
    )
}

/// Where a domain's files are on the libvirt host: the paths of its
/// image's kernel and initrd volumes and of its console log volume, and the
/// names of its disk and seed volumes.
#[derive(Debug, Clone)]
pub struct Placed {
    pub kernel: String,
    pub initrd: String,
    pub disk_volume: String,
    pub seed_volume: String,
    pub console: String,
}

/// The domain: our kernel booted directly, the volume, the seed disk, the
/// console log, the management NIC (qemu user networking, passed through)
/// and one NIC per topology network. `<genid/>`: libvirt gives the guest a
/// new VM generation id on each start from a snapshot, so a reverted guest
/// reseeds its RNG. `kvm`: a domain of type `kvm` (only
/// when the KVM probe passed), else `qemu`.
pub fn domain_xml(vm: &VmSpec, name: &str, placed: &Placed, kvm: bool) -> String {
    let kind = if kvm { "kvm" } else { "qemu" };
    let cpu = if kvm {
        "<cpu mode='host-passthrough' check='none'/>"
    } else {
        "<cpu mode='maximum' check='none'/>"
    };
    let nics: String = vm
        .nics
        .iter()
        .map(|nic| interface_xml(&nic.network, &nic.mac, "up"))
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
         <disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
         <source pool='{POOL}' volume='{seed}'/><target dev='vdb' bus='virtio'/><serial>testbed-seed</serial><readonly/></disk>\
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
        kernel = xml_escape(&placed.kernel),
        initrd = xml_escape(&placed.initrd),
        cmdline = xml_escape(&qemu::kernel_cmdline(vm)),
        volume = xml_escape(&placed.disk_volume),
        seed = xml_escape(&placed.seed_volume),
        console = xml_escape(&placed.console),
    )
}

/// The pool `testbed`, defined, built and started when missing. A system
/// libvirtd keeps it in [`SYSTEM_POOL_PATH`]; a session one runs qemu as the
/// user, so testbed's cache (`cache_root`) serves.
fn ensure_pool(conn: &Connect, uri: &str, cache_root: &Path) -> Result<StoragePool, ProviderError> {
    // Machines are created in parallel; one of them defines the pool.
    static DEFINING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = DEFINING.lock().unwrap_or_else(|e| e.into_inner());
    let pool = match conn.lookup_storage_pool_by_name(POOL) {
        Ok(pool) => pool,
        Err(_) => {
            let session = LibvirtUri::parse(uri).is_ok_and(|uri| uri.driver == "session");
            let path = if session {
                cache_root.join("libvirt-pool")
            } else {
                PathBuf::from(SYSTEM_POOL_PATH)
            };
            // Another testbed may have defined it meanwhile.
            let pool = conn
                .define_storage_pool_xml(&pool_xml(&path), 0)
                .or_else(|e| conn.lookup_storage_pool_by_name(POOL).map_err(|_| e))
                .map_err(|e| libvirt_error("defining the storage pool", e))?;
            let _ = pool.set_autostart(true);
            pool
        }
    };
    if !pool.is_active().unwrap_or(false) {
        // Makes the pool's folder on the libvirt host when it is missing.
        pool.build(0)
            .map_err(|e| libvirt_error("making the storage pool's folder", e))?;
        pool.create(0)
            .map_err(|e| libvirt_error("starting the storage pool", e))?;
    }
    Ok(pool)
}

/// The image's volumes in the pool, uploaded unless an earlier upload
/// finished: its last step makes the volume `…-complete`, so one killed
/// half-way is made again. A lock in testbed's cache keeps two uploads of
/// this user from crossing; one process's machines wait for the first.
fn ensure_image(
    conn: &Connect,
    pool: &StoragePool,
    image: &BuiltImage,
    cache_root: &Path,
) -> Result<ImageVolumes, ProviderError> {
    let base = format!("{IMAGE_VOLUME_PREFIX}{}-{}", image.name, image.hash);
    let files = [
        (format!("{base}.qcow2"), &image.root),
        (format!("{base}-vmlinuz"), &image.kernel),
        (format!("{base}-initrd.img"), &image.initrd),
    ];
    let complete = format!("{base}-complete");
    let _lock = upload_lock(cache_root)?;
    if pool.lookup_storage_vol_by_name(&complete).is_err() {
        for (name, file) in &files {
            if let Ok(stale) = pool.lookup_storage_vol_by_name(name) {
                stale
                    .delete(0)
                    .map_err(|e| libvirt_error(format!("removing volume {name}"), e))?;
            }
            upload(conn, pool, name, file)?;
        }
        StorageVol::create_xml(pool, &raw_volume_xml(&complete, 0), 0)
            .map_err(|e| libvirt_error(format!("creating volume {complete}"), e))?;
    }
    let [disk, kernel, initrd] = files.map(|(name, _)| volume_path(pool, &name));
    Ok(ImageVolumes {
        disk: disk?,
        kernel: kernel?,
        initrd: initrd?,
    })
}

/// The paths of an image's volumes on the libvirt host.
struct ImageVolumes {
    disk: String,
    kernel: String,
    initrd: String,
}

fn volume_path(pool: &StoragePool, name: &str) -> Result<String, ProviderError> {
    pool.lookup_storage_vol_by_name(name)
        .and_then(|volume| volume.path())
        .map_err(|e| libvirt_error(format!("finding volume {name}"), e))
}

/// Held while this user's testbeds upload images (released on drop).
fn upload_lock(cache_root: &Path) -> Result<fs::File, ProviderError> {
    let path = cache_root.join("libvirt-upload.lock");
    let io = |source| ProviderError::Io {
        what: format!("cannot lock {}", path.display()),
        source,
    };
    fs::create_dir_all(cache_root).map_err(io)?;
    let file = fs::File::create(&path).map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

/// A new volume `name` in the pool with the bytes of `file`, sent through
/// libvirt (over the URI's own transport for a remote host).
fn upload(
    conn: &Connect,
    pool: &StoragePool,
    name: &str,
    file: &Path,
) -> Result<StorageVol, ProviderError> {
    let read_error = |source| ProviderError::Io {
        what: format!("cannot read {}", file.display()),
        source,
    };
    let mut source = fs::File::open(file).map_err(read_error)?;
    let bytes = source.metadata().map_err(read_error)?.len();
    let volume = StorageVol::create_xml(pool, &raw_volume_xml(name, bytes), 0)
        .map_err(|e| libvirt_error(format!("creating volume {name}"), e))?;
    let sent = send_file(conn, &volume, &mut source, bytes);
    if sent.is_err() {
        let _ = volume.delete(0);
    }
    sent.map_err(|e| match e {
        Sent::Read(source) => read_error(source),
        Sent::Libvirt(e) => libvirt_error(
            format!("uploading {} into volume {name}", file.display()),
            e,
        ),
    })?;
    Ok(volume)
}

enum Sent {
    Read(std::io::Error),
    Libvirt(virt::error::Error),
}

fn send_file(
    conn: &Connect,
    volume: &StorageVol,
    source: &mut fs::File,
    bytes: u64,
) -> Result<(), Sent> {
    use std::io::Read;
    let stream = Stream::new(conn, 0).map_err(Sent::Libvirt)?;
    volume.upload(&stream, 0, bytes, 0).map_err(Sent::Libvirt)?;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let read = match source.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) => {
                let _ = stream.abort();
                return Err(Sent::Read(e));
            }
        };
        let mut at = 0;
        while at < read {
            match stream.send(&chunk[at..read]) {
                Ok(sent) if sent > 0 => at += sent as usize,
                Ok(_) => continue,
                Err(e) => {
                    let _ = stream.abort();
                    return Err(Sent::Libvirt(e));
                }
            }
        }
    }
    stream.finish().map_err(Sent::Libvirt)
}

/// The whole of volume `name`, read through libvirt.
fn download(conn: &Connect, volume: &StorageVol) -> Result<Vec<u8>, virt::error::Error> {
    // Asking for its info has libvirt look at the file's size again.
    let bytes = volume.info()?.capacity;
    let mut data = Vec::with_capacity(bytes as usize);
    if bytes == 0 {
        return Ok(data);
    }
    let stream = Stream::new(conn, 0)?;
    volume.download(&stream, 0, bytes, 0)?;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match stream.recv(&mut chunk)? {
            0 => break,
            read if read > 0 => data.extend_from_slice(&chunk[..read as usize]),
            _ => continue,
        }
    }
    stream.finish()?;
    Ok(data)
}

/// Replaces the volume `name` by one holding `file` (the seed, made anew
/// for each boot).
fn replace_volume(
    conn: &Connect,
    pool: &StoragePool,
    name: &str,
    file: &Path,
) -> Result<(), ProviderError> {
    if let Ok(old) = pool.lookup_storage_vol_by_name(name) {
        old.delete(0)
            .map_err(|e| libvirt_error(format!("removing volume {name}"), e))?;
    }
    upload(conn, pool, name, file).map(drop)
}

/// The volume `name`, made empty when missing (the console log, which
/// qemu then writes).
fn ensure_empty_volume(pool: &StoragePool, name: &str) -> Result<String, ProviderError> {
    if pool.lookup_storage_vol_by_name(name).is_err() {
        StorageVol::create_xml(pool, &raw_volume_xml(name, 0), 0)
            .map_err(|e| libvirt_error(format!("creating volume {name}"), e))?;
    }
    volume_path(pool, name)
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

/// A NIC on a topology network, its link `up` or `down`: on the network's
/// bridge; for a network across hosts, in the network's multicast group,
/// which its machines join on every host (qemu's `mcast` socket: one L2
/// segment over the hosts' own link, which a TTL of 1 keeps it on).
fn interface_xml(network: &NetworkSpec, mac: &str, link: &str) -> String {
    let source = if network.across_hosts {
        let (group, port) = multicast_group(network);
        format!("<interface type='mcast'><source address='{group}' port='{port}'/>")
    } else {
        format!(
            "<interface type='network'><source network='{}'/>",
            xml_escape(&object_name(&network.dir, &network.name))
        )
    };
    format!(
        "{source}<mac address='{}'/><model type='virtio'/><link state='{link}'/></interface>",
        xml_escape(mac)
    )
}

/// The multicast group and UDP port of a network across hosts, from the
/// testbed's id and the network's name, so that testbeds do not share one:
/// in 239.192.0.0/14, the organization-local scope, never routed further.
fn multicast_group(network: &NetworkSpec) -> (std::net::Ipv4Addr, u16) {
    let digest = Sha256::digest(object_name(&network.dir, &network.name).as_bytes());
    let group = std::net::Ipv4Addr::new(239, 192 + digest[0] % 4, digest[1], digest[2]);
    let port = 20000 + u16::from_be_bytes([digest[3], digest[4]]) % 40000;
    (group, port)
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

    /// The network's bridge; none for a network across hosts, whose NICs
    /// meet in a multicast group ([`interface_xml`]).
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
        if network.across_hosts {
            return Ok(());
        }
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
        let xml = interface_xml(network, mac, state);
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

    /// Uploads the image when this libvirt host lacks it, then makes the
    /// machine's disk over it.
    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let name = object_name(&vm.dir, &vm.name);
        let made = Made {
            uri: self.uri.clone(),
            volume: Some(format!("{name}.qcow2")),
            name,
        };
        write_made(&vm.dir, &made)?;
        let conn = connect(&self.uri)?;
        let pool = ensure_pool(&conn, &self.uri, &self.cache_root)?;
        let image = ensure_image(&conn, &pool, &vm.image, &self.cache_root)?;
        let volume = made.volume.clone().unwrap_or_default();
        if pool.lookup_storage_vol_by_name(&volume).is_ok() {
            return Ok(());
        }
        let capacity = qcow2_virtual_size(&vm.image.root)?;
        StorageVol::create_xml(&pool, &volume_xml(&volume, &image.disk, capacity), 0)
            .map_err(|e| libvirt_error(format!("creating volume {volume}"), e))?;
        Ok(())
    }

    /// Uploads this boot's seed, defines the domain from the current spec
    /// (its SSH port may have changed since the last boot), then starts it.
    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let made = read_made(&vm.dir).ok_or_else(|| ProviderError::NotCreated {
            machine: vm.name.clone(),
            missing: MADE,
        })?;
        let conn = connect(&made.uri)?;
        let pool = ensure_pool(&conn, &made.uri, &self.cache_root)?;
        let image = ensure_image(&conn, &pool, &vm.image, &self.cache_root)?;
        replace_volume(&conn, &pool, &made.seed_volume(), &vm.seed)?;
        let placed = Placed {
            kernel: image.kernel,
            initrd: image.initrd,
            disk_volume: made.volume.clone().unwrap_or_default(),
            seed_volume: made.seed_volume(),
            console: ensure_empty_volume(&pool, &made.console_volume())?,
        };
        let kvm = self.accelerator(&vm.image.kernel).kvm;
        let mut xml = domain_xml(vm, &made.name, &placed, kvm);
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

    /// Downloads the console log from its volume into the machine's folder.
    fn fetch_console(&self, dir: &Path) -> Result<(), ProviderError> {
        let Some(made) = read_made(dir) else {
            return Ok(());
        };
        let conn = connect(&made.uri)?;
        let name = made.console_volume();
        let Some(volume) = lookup_volume(&conn, &name) else {
            return Ok(());
        };
        let log = download(&conn, &volume)
            .map_err(|e| libvirt_error(format!("downloading volume {name}"), e))?;
        Ok(crate::state::write_atomic(
            &dir.join(crate::state::CONSOLE_LOG),
            &log,
            0o644,
        )?)
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
        for name in made.volumes() {
            if let Some(volume) = lookup_volume(&conn, &name) {
                volume
                    .delete(0)
                    .map_err(|e| libvirt_error(format!("removing volume {name}"), e))?;
            }
        }
        if let Some(jump) = jump_to(&made.uri, &self.cache_root) {
            jump.release();
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

    /// For a local libvirtd, the probe runs here (it boots a kernel under
    /// KVM: libvirt's own word is not enough on hosts without udev). A
    /// remote host is asked through libvirt whether it offers KVM domains.
    fn accelerator(&self, kernel: &Path) -> Accelerator {
        if LibvirtUri::parse(&self.uri).is_ok_and(|uri| uri.is_remote()) {
            return remote_accelerator(&self.uri);
        }
        kvm::accelerator(kernel, &self.cache_root)
    }

    /// SSH is forwarded on 127.0.0.1 of the libvirt host by qemu's
    /// user-mode network, passed through to the domain; a remote host's
    /// loopback is reached through SSH to that host.
    fn ssh_endpoint(&self, port: u16) -> Endpoint {
        Endpoint {
            addr: loopback::ssh_address(port),
            jump: jump_to(&self.uri, &self.cache_root),
        }
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

/// How to reach the loopback of the host `uri` names when it is another
/// machine: SSH as the URI logs in (its user; for an SSH transport its port
/// and `keyfile=`, `known_hosts=`), one shared connection per host in
/// testbed's cache.
fn jump_to(uri: &str, cache_root: &Path) -> Option<Jump> {
    let uri = LibvirtUri::parse(uri).ok().filter(LibvirtUri::is_remote)?;
    let ssh = uri.over_ssh();
    let param = |name: &str| uri.params.get(name).filter(|_| ssh).map(PathBuf::from);
    Some(Jump {
        destination: match &uri.user {
            Some(user) => format!("{user}@{}", uri.host),
            None => uri.host.clone(),
        },
        port: uri.port.filter(|_| ssh),
        identity: param("keyfile"),
        known_hosts: param("known_hosts"),
        control: cache_root.join("ssh").join("%C"),
    })
}

/// `doctor -f` on a topology with `[hosts]`: whether the host `name`'s
/// libvirtd answers at `uri`, and whether the SSH login testbed's tunnels
/// to its guests use works. A topology's machines need both.
pub fn host_doctor(name: &str, uri: &str, cache_root: &Path) -> Vec<DoctorLine> {
    let (ok, detail) = reachable(uri);
    let mut lines = vec![DoctorLine {
        name: format!("host {name}"),
        ok,
        detail,
        fix: format!(
            "start libvirtd there, or correct [hosts.{name}] uri (try `virsh -c URI list`)"
        ),
        required: true,
    }];
    if let Some(jump) = jump_to(uri, cache_root) {
        let (ok, detail) = match jump.check() {
            Ok(()) => (
                true,
                format!("ssh {} logs in without a prompt", jump.destination),
            ),
            Err(why) => (false, why),
        };
        lines.push(DoctorLine {
            name: format!("ssh to {name}"),
            ok,
            detail,
            fix: "the host's key must be known (ssh-keyscan it into known_hosts or the URI's \
                  known_hosts=) and the URI's login must work without a password"
                .into(),
            required: true,
        });
    }
    lines
}

/// What a remote libvirt host offers: KVM when its libvirt describes
/// x86_64 domains of type `kvm`, else TCG (asked once per URI per process).
fn remote_accelerator(uri: &str) -> Accelerator {
    static KNOWN: std::sync::Mutex<BTreeMap<String, bool>> = std::sync::Mutex::new(BTreeMap::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = !known.contains_key(uri);
    let kvm = *known.entry(uri.to_owned()).or_insert_with(|| {
        connect(uri).is_ok_and(|conn| {
            conn.domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0)
                .is_ok()
        })
    });
    Accelerator {
        name: if kvm {
            "KVM"
        } else {
            "TCG (software emulation)"
        },
        kvm,
        reason: format!(
            "libvirt at {uri} {} KVM domains",
            if kvm { "offers" } else { "does not offer" }
        ),
        fresh,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        crate::provider::sample_vm()
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

    fn placed() -> Placed {
        let pool = "/var/lib/libvirt/testbed";
        Placed {
            kernel: format!("{pool}/tb-img-debian-12-abc-vmlinuz"),
            initrd: format!("{pool}/tb-img-debian-12-abc-initrd.img"),
            disk_volume: "tb-1234abcd-alpha.qcow2".into(),
            seed_volume: "tb-1234abcd-alpha-seed.tar".into(),
            console: format!("{pool}/tb-1234abcd-alpha-console.log"),
        }
    }

    #[test]
    fn the_domain_boots_our_kernel_with_loopback_forwards_and_metadata() {
        let xml = domain_xml(&spec(), "tb-1234abcd-alpha", &placed(), false);
        for part in [
            "<domain type='qemu'",
            "<kernel>/var/lib/libvirt/testbed/tb-img-debian-12-abc-vmlinuz</kernel>",
            "<initrd>/var/lib/libvirt/testbed/tb-img-debian-12-abc-initrd.img</initrd>",
            "root=/dev/vda rw console=ttyS0",
            "<source pool='testbed' volume='tb-1234abcd-alpha.qcow2'/>",
            "<source pool='testbed' volume='tb-1234abcd-alpha-seed.tar'/>",
            "<serial>testbed-seed</serial><readonly/>",
            "hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:12181-:2181",
            "<source network='tb-f1a7219c-lan'/><mac address='52:54:00:00:02:01'/>",
            "<testbed:machine xmlns:testbed='https://testbed.dev/1' name='alpha'",
            "<source path='/var/lib/libvirt/testbed/tb-1234abcd-alpha-console.log'",
            "<memory unit='MiB'>768</memory><vcpu>2</vcpu>",
        ] {
            assert!(xml.contains(part), "missing {part} in\n{xml}");
        }
        assert!(!xml.contains("0.0.0.0"));
        // Nothing libvirt's qemu reads is in the user's home or cache (the
        // metadata only names the machine's folder).
        for home in ["path='/home", "file='/home", ">/home", "/cache/images"] {
            assert!(!xml.contains(home), "{home} in\n{xml}");
        }
        assert!(domain_xml(&spec(), "d", &placed(), true).contains("<domain type='kvm'"));
    }

    #[test]
    fn a_network_across_hosts_is_a_multicast_group_of_its_own() {
        let mut vm = spec();
        vm.nics[0].network.across_hosts = true;
        let xml = domain_xml(&vm, "tb-1234abcd-alpha", &placed(), false);
        let (group, port) = multicast_group(&vm.nics[0].network);
        assert!(
            xml.contains(&format!(
                "<interface type='mcast'><source address='{group}' port='{port}'/>\
                 <mac address='52:54:00:00:02:01'/>"
            )),
            "{xml}"
        );
        assert!(
            group.is_multicast() && (192..196).contains(&group.octets()[1]),
            "{group}"
        );
        assert!(!xml.contains("<source network="), "{xml}");
        let other = NetworkSpec {
            dir: PathBuf::from("/home/u/other/.testbed/networks/lan"),
            ..vm.nics[0].network.clone()
        };
        assert_ne!(
            multicast_group(&other),
            (group, port),
            "one group per testbed"
        );
    }

    #[test]
    fn a_machine_has_three_volumes_a_network_none() {
        let machine = Made {
            uri: "qemu:///system".into(),
            name: "tb-1234abcd-alpha".into(),
            volume: Some("tb-1234abcd-alpha.qcow2".into()),
        };
        assert_eq!(
            machine.volumes(),
            [
                "tb-1234abcd-alpha.qcow2",
                "tb-1234abcd-alpha-seed.tar",
                "tb-1234abcd-alpha-console.log"
            ]
        );
        let network = Made {
            volume: None,
            ..machine
        };
        assert!(network.volumes().is_empty());
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
            hosts: Default::default(),
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
