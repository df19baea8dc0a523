//! A machine's identity — SSH host key, authorized key, hostname, /etc/hosts,
//! machine-id, static addresses — packed into a small seed (a tar archive).
//! Every provider attaches it as a disk the guest applies at boot, and `up`
//! applies it again over SSH with the guest's `testbed-identity`, so a
//! machine resumed from a saved state can be given its identity afterwards.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::model::{Machine, Topology};
use crate::state::MachineDir;

/// The guest-side program that applies a seed (installed by the image).
pub const GUEST_APPLY: &str = "/usr/local/sbin/testbed-identity";
/// Where the seed is uploaded before being applied over SSH.
pub const GUEST_SEED: &str = "/run/testbed/seed.tar";
/// The seed archive's first entry. On a disk without a serial (VirtualBox
/// gives none) the guest knows the seed by the name its first bytes carry
/// (`testbed-identity`'s `find_seed_disk`).
pub const SEED_FIRST_ENTRY: &str = "etc/ssh/ssh_host_ed25519_key";
/// Inside the seed: the hash of the rest of it, so one `cat` tells whether
/// a guest already has this identity (it does after a cold boot).
pub const GUEST_SEED_ID: &str = "/etc/testbed/seed-id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] crate::ssh::SshError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IdentityError {
    let what = what.into();
    move |source| IdentityError::Io { what, source }
}

/// How the guest reaches the host on its management NIC.
#[derive(Debug, Clone)]
pub struct Management {
    pub mac: String,
    pub address: String,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
}

/// A NIC on a topology network with its static address.
#[derive(Debug, Clone)]
pub struct StaticNic {
    pub mac: String,
    pub address: String,
}

/// The seed of one machine, built in memory; `hash` keys "already applied".
#[derive(Clone)]
pub struct Seed {
    pub bytes: Vec<u8>,
    pub hash: String,
}

/// The label of the management NIC in [`mac_address`].
pub const MANAGEMENT_NIC: &str = "mgmt";

/// A stable locally administered MAC for `machine`'s NIC on `network` (or
/// [`MANAGEMENT_NIC`]): derived from the two names, so it survives machines
/// and networks being added, removed or reordered.
pub fn mac_address(machine: &str, network: &str) -> String {
    let digest = Sha256::digest(format!("{machine}/{network}"));
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

/// The machine's NICs on topology networks, in network-name order.
pub fn static_nics(topology: &Topology, machine: &Machine) -> Vec<(String, StaticNic)> {
    machine
        .ips
        .iter()
        .filter_map(|(network, ip)| {
            let subnet = topology.networks.get(network)?.subnet;
            Some((
                network.clone(),
                StaticNic {
                    mac: mac_address(&machine.name, network),
                    address: format!("{ip}/{}", subnet.prefix_len()),
                },
            ))
        })
        .collect()
}

/// The per-machine secrets, created once and kept in the machine's folder.
pub struct MachineKeys {
    pub host_key: PathBuf,
    pub host_public: String,
    pub machine_id: String,
}

impl MachineKeys {
    /// The machine's keys when they exist already (nothing is generated).
    pub fn load(layout: &MachineDir) -> Option<MachineKeys> {
        let host_key = layout.host_key();
        let host_public = std::fs::read_to_string(layout.host_public_key()).ok()?;
        let machine_id = std::fs::read_to_string(layout.machine_id()).ok()?;
        host_key.is_file().then(|| MachineKeys {
            host_key,
            host_public: host_public.trim().to_string(),
            machine_id: machine_id.trim().to_string(),
        })
    }

    /// Loads the machine's host key and machine-id, generating them the first time.
    pub fn ensure(layout: &MachineDir, machine: &str) -> Result<MachineKeys, IdentityError> {
        let host_key = layout.host_key();
        let public_path = layout.host_public_key();
        let host_public = if public_path.is_file() && host_key.is_file() {
            std::fs::read_to_string(&public_path)
                .map_err(io_err(format!("cannot read {}", public_path.display())))?
        } else {
            crate::ssh::generate_keypair(&host_key, &format!("root@{machine}"))?
        };
        let id_path = layout.machine_id();
        let machine_id = match std::fs::read_to_string(&id_path) {
            Ok(id) => id.trim().to_string(),
            Err(_) => {
                let id = random_machine_id()?;
                std::fs::write(&id_path, &id).map_err(io_err("cannot write machine-id"))?;
                id
            }
        };
        Ok(MachineKeys {
            host_key,
            host_public: host_public.trim().to_string(),
            machine_id,
        })
    }
}

fn random_machine_id() -> Result<String, IdentityError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("cannot read /dev/urandom"))?;
    Ok(hex::encode(bytes))
}

/// `/etc/hosts` naming every machine of the topology on its private IPs.
fn hosts_file(topology: &Topology, machine: &Machine) -> String {
    let mut hosts = format!("127.0.0.1 localhost\n127.0.1.1 {}\n", machine.name);
    for other in &topology.machines {
        for ip in other.ips.values() {
            let _ = writeln!(hosts, "{ip} {}", other.name);
        }
    }
    hosts
}

fn interfaces_file(management: &Management, nics: &[(String, StaticNic)]) -> String {
    let mut lines = format!(
        "{} {} {}\n",
        management.mac, management.address, management.gateway
    );
    for (_, nic) in nics {
        let _ = writeln!(lines, "{} {}", nic.mac, nic.address);
    }
    lines
}

/// Builds the seed tar. Entries are in a fixed order with fixed metadata,
/// so the same identity always gives the same bytes (and hash).
pub fn build_seed(
    topology: &Topology,
    machine: &Machine,
    keys: &MachineKeys,
    authorized_key: &str,
    management: &Management,
) -> Result<Seed, IdentityError> {
    let nics = static_nics(topology, machine);
    seed_of(
        &machine.name,
        hosts_file(topology, machine),
        keys,
        authorized_key,
        management,
        &nics,
    )
}

/// The name a warm-boot template answers to: no machine of any topology.
pub const TEMPLATE_HOSTNAME: &str = "testbed-template";

/// The seed of a warm-boot template: its own keys, its management NIC
/// only (the others stay down until a machine's identity names them).
pub fn template_seed(
    keys: &MachineKeys,
    authorized_key: &str,
    management: &Management,
) -> Result<Seed, IdentityError> {
    let hosts = format!("127.0.0.1 localhost\n127.0.1.1 {TEMPLATE_HOSTNAME}\n");
    seed_of(
        TEMPLATE_HOSTNAME,
        hosts,
        keys,
        authorized_key,
        management,
        &[],
    )
}

fn seed_of(
    hostname: &str,
    hosts: String,
    keys: &MachineKeys,
    authorized_key: &str,
    management: &Management,
    nics: &[(String, StaticNic)],
) -> Result<Seed, IdentityError> {
    let private = std::fs::read(&keys.host_key)
        .map_err(io_err(format!("cannot read {}", keys.host_key.display())))?;
    // Paths relative to the guest's root: the guest extracts the archive
    // over / in one step.
    let entries: Vec<(&str, Vec<u8>, u32)> = vec![
        (SEED_FIRST_ENTRY, private, 0o600),
        (
            "etc/ssh/ssh_host_ed25519_key.pub",
            format!("{}\n", keys.host_public).into_bytes(),
            0o644,
        ),
        (
            "root/.ssh/authorized_keys",
            format!("{}\n", authorized_key.trim()).into_bytes(),
            0o600,
        ),
        ("etc/hostname", format!("{hostname}\n").into_bytes(), 0o644),
        ("etc/hosts", hosts.into_bytes(), 0o644),
        (
            "etc/machine-id",
            format!("{}\n", keys.machine_id).into_bytes(),
            0o444,
        ),
        (
            "etc/resolv.conf",
            format!("nameserver {}\n", management.dns).into_bytes(),
            0o644,
        ),
        (
            "etc/testbed/interfaces",
            interfaces_file(management, nics).into_bytes(),
            0o644,
        ),
    ];
    let hash = entries_hash(&entries);
    let mut entries = entries;
    entries.push((
        GUEST_SEED_ID.trim_start_matches('/'),
        format!("{hash}\n").into_bytes(),
        0o644,
    ));
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data, mode) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, data.as_slice())
            .map_err(io_err("cannot build the identity seed"))?;
    }
    let bytes = builder
        .into_inner()
        .map_err(io_err("cannot build the identity seed"))?;
    Ok(Seed { bytes, hash })
}

fn entries_hash(entries: &[(&str, Vec<u8>, u32)]) -> String {
    let mut hasher = Sha256::new();
    for (name, data, mode) in entries {
        hasher.update(name.as_bytes());
        hasher.update(mode.to_le_bytes());
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    hex::encode(hasher.finalize())[..16].to_string()
}

/// The shell command that applies an uploaded seed on the guest.
pub fn apply_command() -> String {
    format!("{GUEST_APPLY} {GUEST_SEED}")
}

/// The MACs a warm-booted machine's NICs had in its template, each with
/// the machine's own (in the order the provider attaches them).
pub type Renames = [(String, String)];

/// The shell command that applies the seed given on its stdin, giving the
/// NICs their MACs first (after a warm boot): one command, no upload.
pub fn apply_from_stdin_command(renames: &Renames) -> String {
    let mut command = format!("{GUEST_APPLY} -");
    for (old, new) in renames {
        command.push(' ');
        command.push_str(&crate::ssh::shell_quote(&format!("{old}={new}")));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn topology() -> Topology {
        let machine = |name: &str, ip: [u8; 4]| Machine {
            name: name.into(),
            provider: crate::model::ProviderKind::Qemu,
            image: "debian-12".into(),
            cpus: 1,
            memory_mib: 768,
            ips: BTreeMap::from([("lan".to_string(), Ipv4Addr::from(ip))]),
            forwards: vec![],
            daemons: vec![],
            vars: BTreeMap::new(),
            depends_on: vec![],
            packages: vec![],
            artifacts: vec![],
            internet: false,
            host: None,
            provision: Vec::new(),
        };
        Topology {
            name: "pair".into(),
            path: "/tmp/pair.toml".into(),
            networks: BTreeMap::from([(
                "lan".to_string(),
                crate::model::Network {
                    name: "lan".into(),
                    subnet: "192.168.33.0/24".parse().expect("subnet"),
                },
            )]),
            machines: vec![
                machine("alpha", [192, 168, 33, 2]),
                machine("beta", [192, 168, 33, 3]),
            ],
            checks: vec![],
            build: None,
            steps: vec![],
            libvirt_uri: None,
            hosts: Default::default(),
        }
    }

    fn management() -> Management {
        Management {
            mac: mac_address("alpha", MANAGEMENT_NIC),
            address: "10.0.2.15/24".into(),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
        }
    }

    fn entries(seed: &Seed) -> BTreeMap<String, String> {
        let mut archive = tar::Archive::new(seed.bytes.as_slice());
        archive
            .entries()
            .expect("entries")
            .map(|entry| {
                let mut entry = entry.expect("entry");
                let path = entry.path().expect("path").to_string_lossy().into_owned();
                let mut text = String::new();
                std::io::Read::read_to_string(&mut entry, &mut text).expect("read");
                (path, text)
            })
            .collect()
    }

    #[test]
    fn seed_is_deterministic_and_carries_the_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = topology();
        let layout = crate::state::StateDir::beside(dir.path()).machine("alpha");
        std::fs::create_dir_all(layout.path()).expect("machine dir");
        let keys = MachineKeys::ensure(&layout, "alpha").expect("keys");
        let again = MachineKeys::ensure(&layout, "alpha").expect("keys again");
        assert_eq!(keys.host_public, again.host_public, "keys are made once");
        let seed = build_seed(
            &topology,
            &topology.machines[0],
            &keys,
            "ssh-ed25519 AAAA me",
            &management(),
        )
        .expect("seed");
        let same = build_seed(
            &topology,
            &topology.machines[0],
            &keys,
            "ssh-ed25519 AAAA me",
            &management(),
        )
        .expect("seed");
        assert_eq!(seed.hash, same.hash);
        assert!(
            seed.bytes.starts_with(SEED_FIRST_ENTRY.as_bytes()),
            "a guest without disk serials finds the seed by its first entry"
        );
        let files = entries(&seed);
        assert_eq!(files["etc/testbed/seed-id"], format!("{}\n", seed.hash));
        assert_eq!(files["etc/hostname"], "alpha\n");
        assert!(files["etc/hosts"].contains("192.168.33.3 beta\n"));
        assert_eq!(files["root/.ssh/authorized_keys"], "ssh-ed25519 AAAA me\n");
        let interfaces = &files["etc/testbed/interfaces"];
        assert!(interfaces.contains(&format!(
            "{} 10.0.2.15/24 10.0.2.2",
            mac_address("alpha", MANAGEMENT_NIC)
        )));
        assert!(interfaces.contains(&format!("{} 192.168.33.2/24", mac_address("alpha", "lan"))));

        let other = build_seed(
            &topology,
            &topology.machines[1],
            &keys,
            "ssh-ed25519 AAAA me",
            &management(),
        )
        .expect("seed");
        assert_ne!(seed.hash, other.hash, "another machine, another seed");
    }

    #[test]
    fn macs_are_stable_locally_administered_and_distinct() {
        assert_eq!(mac_address("alpha", "lan"), mac_address("alpha", "lan"));
        assert_ne!(mac_address("alpha", "lan"), mac_address("beta", "lan"));
        assert_ne!(
            mac_address("alpha", MANAGEMENT_NIC),
            mac_address("alpha", "lan")
        );
        assert!(mac_address("alpha", MANAGEMENT_NIC).starts_with("52:54:00:"));
    }
}
