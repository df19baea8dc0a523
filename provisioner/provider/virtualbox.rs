//! VirtualBox, driven through `VBoxManage`. Per machine: a VM registered
//! under a name of testbed's (`tb-<id>-<machine>`) in the machine's folder;
//! an IDE disk over the image's bootable disk, converted once to a cached
//! VDI and attached `multiattach` (VirtualBox keeps a differencing image
//! per VM); the seed as the raw extent of a VMDK descriptor, rewritten at
//! each start; NAT with SSH forwarded on 127.0.0.1; an internal network
//! (`intnet`) per topology network; the serial console into the folder's
//! console log. VirtualBox boots no kernel of ours: the guest applies its
//! identity from the seed before systemd starts (`testbed-init`).
//!
//! Every call is data first ([`Call`]): `up` runs them, `plan` prints them.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::identity::Management;
use crate::image::{Cache, DiskFormat};
use crate::model::LinkShape;

use super::{
    loopback, qemu, remove_dir, Accelerator, DoctorLine, NetworkSpec, Provider, ProviderError,
    Relocation, VmSpec, VmState,
};

pub const VBOXMANAGE: &str = "VBoxManage";
const VBOXMANAGE_HINT: &str = "install VirtualBox (virtualbox.org), which brings VBoxManage";
/// The record of what testbed registered, written before anything is made:
/// the only pointer from the folder to its VM.
const MADE: &str = "virtualbox.json";
/// The seed's VMDK descriptor and the raw extent it points at.
const SEED_VMDK: &str = "seed.vmdk";
const SEED_EXTENT: &str = "seed-flat.vmdk";
/// Room for the seed archive (a few tens of KiB: keys, hosts, addresses).
const SEED_CAPACITY: u64 = 1 << 20;
/// The storage controller: PIIX4 IDE, which every VirtualBox has and the
/// cloud kernel drives (`ata_piix`; it has no AHCI).
const CONTROLLER: &str = "IDE";
/// The NAT rule that carries SSH.
const SSH_RULE: &str = "ssh";
/// How long `kill` waits for a powered-off VM to say so.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a call waits for the session lock a VM that just stopped
/// still holds (VirtualBox releases it a moment after `poweroff`).
const LOCK_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Virtualbox {
    /// Where the images, and so their VDI conversions, are cached.
    cache_root: PathBuf,
}

impl Virtualbox {
    pub fn new(cache_root: PathBuf) -> Virtualbox {
        Virtualbox { cache_root }
    }

    /// `controlvm NAME ACTION` on the machine's VM.
    fn control(&self, dir: &Path, action: &str) -> Result<(), ProviderError> {
        let made = read_made(dir).ok_or_else(|| ProviderError::NotCreated {
            machine: dir.display().to_string(),
            missing: MADE,
        })?;
        Call::new(["controlvm", made.vm.as_str(), action]).run()?;
        Ok(())
    }

    /// The cached VDI of the machine's image, made when missing.
    fn base_disk(&self, vm: &VmSpec) -> Result<PathBuf, ProviderError> {
        Cache::at(self.cache_root.clone())
            .ensure_boot_disk(&vm.image, DiskFormat::Vdi, &mut |_| {})
            .map_err(|e| Box::new(e).into())
    }
}

/// What testbed made of a machine: its VM, the base disk it attached, and
/// whether every call that makes it went through (a VM left half-made by
/// an interrupted `up` is not booted: the next `create` makes it anew).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    vm: String,
    base: PathBuf,
    complete: bool,
}

fn read_made(dir: &Path) -> Option<Made> {
    serde_json::from_slice(&fs::read(dir.join(MADE)).ok()?).ok()
}

/// The record of a VM whose create went through.
fn complete_made(dir: &Path) -> Option<Made> {
    read_made(dir).filter(|made| made.complete)
}

fn write_made(dir: &Path, made: &Made) -> Result<(), ProviderError> {
    let json = serde_json::to_vec_pretty(made).map_err(|e| ProviderError::Internal {
        what: "encoding virtualbox.json",
        detail: e.to_string(),
    })?;
    Ok(crate::state::write_atomic(&dir.join(MADE), &json, 0o644)?)
}

/// One `VBoxManage` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call(Vec<OsString>);

impl Call {
    fn new<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Call {
        Call(args.into_iter().map(|a| a.as_ref().to_owned()).collect())
    }

    fn arg(mut self, arg: impl AsRef<OsStr>) -> Call {
        self.0.push(arg.as_ref().to_owned());
        self
    }

    /// Runs it; its standard output, or VBoxManage's complaint. A VM that
    /// has just stopped keeps its session locked for a moment: the call
    /// is tried again meanwhile.
    fn run(&self) -> Result<String, ProviderError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match self.run_once() {
                Err(ProviderError::VBoxManage { message, .. })
                    if message.contains("locked") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(250));
                }
                outcome => return outcome,
            }
        }
    }

    fn run_once(&self) -> Result<String, ProviderError> {
        let output = Command::new(VBOXMANAGE)
            .args(&self.0)
            // VirtualBox translates its messages; testbed reads them.
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| ProviderError::Missing {
                program: VBOXMANAGE.into(),
                hint: VBOXMANAGE_HINT.into(),
                source,
            })?;
        if !output.status.success() {
            return Err(ProviderError::VBoxManage {
                call: self.to_string(),
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// As a shell would take it: `VBoxManage` and each argument quoted when
/// it needs to be.
impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{VBOXMANAGE}")?;
        for arg in &self.0 {
            let arg = arg.to_string_lossy();
            // Only a NUL byte cannot be quoted, and no argument holds one.
            let quoted = shlex::try_quote(&arg).unwrap_or_default();
            write!(f, " {quoted}")?;
        }
        Ok(())
    }
}

/// `tb-<id>-<machine>`: unique among the user's VMs, and readable.
fn vm_name(vm: &VmSpec) -> String {
    super::object_name(&vm.dir, &vm.name)
}

/// A MAC as VirtualBox writes it: 12 hex digits, no separators.
fn vbox_mac(mac: &str) -> String {
    mac.replace(':', "").to_ascii_uppercase()
}

/// A NAT port-forwarding rule on 127.0.0.1: `name,tcp,127.0.0.1,host,,guest`.
fn nat_rule(name: &str, host: u16, guest: u16) -> String {
    format!("{name},tcp,{},{host},,{guest}", loopback::HOST)
}

/// The calls that register the machine's VM: created in its folder, its
/// storage controller, the base disk (`base`, a VDI) and the seed attached.
pub fn create_calls(vm: &VmSpec, base: &Path) -> Vec<Call> {
    let name = vm_name(vm);
    let create = Call::new(["createvm", "--name", &name, "--basefolder"])
        .arg(&vm.dir)
        .arg("--ostype")
        .arg("Debian_64")
        .arg("--register");
    vec![
        create,
        Call::new(["storagectl", &name, "--name", CONTROLLER, "--add", "ide"])
            .arg("--controller")
            .arg("PIIX4")
            .arg("--bootable")
            .arg("on"),
        attach_call(&name, 0, base)
            .arg("--mtype")
            .arg("multiattach"),
        attach_call(&name, 1, &vm.dir.join(SEED_VMDK)),
    ]
}

/// The calls that boot the VM (powered off): its hardware as the topology
/// says now, its NAT rules (`rules`, the ones it has, deleted first) the
/// topology's forwards and SSH on `vm.ssh_port`, then a headless start.
pub fn boot_calls(vm: &VmSpec, rules: &[String]) -> Vec<Call> {
    let name = vm_name(vm);
    vec![
        hardware_call(vm, &name, rules),
        Call::new(["startvm", &name, "--type", "headless"]),
    ]
}

/// `modifyvm` with the machine's memory, CPUs, console and NICs: NAT
/// first (the management NIC, with SSH and the topology's forwards), then
/// an internal network per topology network.
fn hardware_call(vm: &VmSpec, name: &str, rules: &[String]) -> Call {
    let mut call = Call::new(["modifyvm", name])
        .arg("--memory")
        .arg(vm.memory_mib.to_string())
        .arg("--cpus")
        .arg(vm.cpus.to_string());
    for (option, value) in [
        ("--ioapic", "on"),
        ("--firmware", "bios"),
        ("--boot1", "disk"),
        ("--boot2", "none"),
        ("--boot3", "none"),
        ("--boot4", "none"),
        ("--rtcuseutc", "on"),
    ] {
        call = call.arg(option).arg(value);
    }
    call = call
        .arg("--uart1")
        .arg("0x3F8")
        .arg("4")
        .arg("--uartmode1")
        .arg("file")
        .arg(vm.console_log());
    call = nic(call, 1, "nat", &vm.management_mac);
    for rule in rules {
        call = call.arg("--natpf1").arg("delete").arg(rule);
    }
    call = call
        .arg("--natpf1")
        .arg(nat_rule(SSH_RULE, vm.ssh_port, 22));
    for forward in &vm.forwards {
        let rule = nat_rule(
            &format!("tcp-{}", forward.host),
            forward.host,
            forward.guest,
        );
        call = call.arg("--natpf1").arg(rule);
    }
    for (index, spec) in vm.nics.iter().enumerate() {
        let slot = index + 2;
        call = nic(call, slot, "intnet", &spec.mac)
            .arg(format!("--intnet{slot}"))
            .arg(intnet_name(&spec.network));
    }
    call
}

/// The options of NIC `slot`: its kind, virtio, its MAC, its cable in.
fn nic(call: Call, slot: usize, kind: &str, mac: &str) -> Call {
    call.arg(format!("--nic{slot}"))
        .arg(kind)
        .arg(format!("--nictype{slot}"))
        .arg("virtio")
        .arg(format!("--macaddress{slot}"))
        .arg(vbox_mac(mac))
        .arg(format!("--cableconnected{slot}"))
        .arg("on")
}

/// The internal network of a topology network: one per testbed.
fn intnet_name(network: &NetworkSpec) -> String {
    super::object_name(&network.dir, &network.name)
}

fn attach_call(name: &str, port: u32, medium: &Path) -> Call {
    Call::new(["storageattach", name, "--storagectl", CONTROLLER])
        .arg("--port")
        .arg(port.to_string())
        .arg("--device")
        .arg("0")
        .arg("--type")
        .arg("hdd")
        .arg("--medium")
        .arg(medium)
}

/// `VMState` from `showvminfo --machinereadable`.
fn parse_vm_state(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("VMState="))
        .map(|value| value.trim_matches('"'))
}

/// The names of the NAT rules in `showvminfo --machinereadable`:
/// `Forwarding(0)="ssh,tcp,127.0.0.1,2222,,22"` gives `ssh`.
fn parse_nat_rules(info: &str) -> Vec<String> {
    info.lines()
        .filter(|line| line.starts_with("Forwarding("))
        .filter_map(|line| line.split_once('='))
        .filter_map(|(_, rule)| rule.trim_matches('"').split(',').next().map(str::to_owned))
        .collect()
}

/// Whether VirtualBox has a VM of this name registered.
fn registered(name: &str) -> Result<bool, ProviderError> {
    let listed = Call::new(["list", "vms"]).run()?;
    let quoted = format!("\"{name}\" ");
    Ok(listed.lines().any(|line| line.starts_with(&quoted)))
}

/// The VM's machine-readable info; `None` when VirtualBox knows no such VM.
fn vm_info(name: &str) -> Result<Option<String>, ProviderError> {
    match Call::new(["showvminfo", name, "--machinereadable"]).run() {
        Ok(info) => Ok(Some(info)),
        Err(e) => match registered(name)? {
            true => Err(e),
            false => Ok(None),
        },
    }
}

/// The VM's state as VirtualBox tells it; `None` when it knows no such VM.
fn vm_state(name: &str) -> Result<Option<VmState>, ProviderError> {
    Ok(vm_info(name)?.map(|info| match parse_vm_state(&info) {
        Some("poweroff" | "aborted" | "saved" | "aborted-saved") => VmState::Stopped,
        _ => VmState::Running,
    }))
}

/// Removes what an earlier, interrupted `create` of this VM left: the
/// name and its folder are this testbed's own.
fn clear_leftovers(vm: &VmSpec, name: &str) -> Result<(), ProviderError> {
    if registered(name)? {
        Call::new(["unregistervm", name, "--delete"]).run()?;
    }
    remove_dir(&vm.dir.join(name))
}

/// Writes the seed archive into the seed's raw extent, zero-filled to its
/// size (VirtualBox reads the extent as a disk of exactly that size).
fn write_seed_extent(vm: &VmSpec) -> Result<(), ProviderError> {
    let io = |what: String| move |source| ProviderError::Io { what, source };
    let seed = fs::read(&vm.seed).map_err(io(format!("cannot read {}", vm.seed.display())))?;
    if seed.len() as u64 > SEED_CAPACITY {
        return Err(ProviderError::Internal {
            what: "writing the seed disk",
            detail: format!(
                "the seed is {} bytes, more than the {SEED_CAPACITY} its disk holds",
                seed.len()
            ),
        });
    }
    let path = vm.dir.join(SEED_EXTENT);
    let mut extent = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io(format!("cannot open {}", path.display())))?;
    extent
        .write_all(&seed)
        .and_then(|()| extent.write_all(&vec![0; (SEED_CAPACITY as usize) - seed.len()]))
        .map_err(io(format!("cannot write {}", path.display())))
}

/// The seed's VMDK descriptor and its raw extent, made by qemu-img.
fn create_seed_disk(vm: &VmSpec) -> Result<(), ProviderError> {
    let output = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
        ])
        .arg(vm.dir.join(SEED_VMDK))
        .arg(SEED_CAPACITY.to_string())
        .output()
        .map_err(|source| ProviderError::Missing {
            program: "qemu-img".into(),
            hint: "apt-get install --no-install-recommends qemu-utils".into(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ProviderError::Start {
        program: "qemu-img".into(),
        machine: vm.name.clone(),
        message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

fn unsupported(what: &'static str, help: &'static str) -> ProviderError {
    ProviderError::Unsupported {
        provider: "virtualbox",
        what,
        help,
    }
}

impl Provider for Virtualbox {
    fn name(&self) -> &'static str {
        "virtualbox"
    }

    /// An internal network exists while a VM uses it: nothing to make.
    fn ensure_network(&self, _network: &NetworkSpec) -> Result<(), ProviderError> {
        Ok(())
    }

    fn remove_network(&self, _network: &NetworkSpec) -> Result<(), ProviderError> {
        Ok(())
    }

    fn block(&self, _: &NetworkSpec, pairs: &[(String, String)]) -> Result<(), ProviderError> {
        if pairs.is_empty() {
            return Ok(());
        }
        Err(unsupported(
            "partition a network (an internal network has no filter between its members)",
            "use provider = \"qemu\" for partitions",
        ))
    }

    fn shape_link(
        &self,
        _dir: &Path,
        _network: &NetworkSpec,
        _mac: &str,
        shape: &LinkShape,
    ) -> Result<(), ProviderError> {
        if shape.is_healthy() {
            return Ok(());
        }
        Err(unsupported(
            "shape a link",
            "use provider = \"qemu\" for slow, lossy or cut links",
        ))
    }

    fn pause(&self, dir: &Path) -> Result<(), ProviderError> {
        self.control(dir, "pause")
    }

    fn resume(&self, dir: &Path) -> Result<(), ProviderError> {
        self.control(dir, "resume")
    }

    fn save_state(&self, _dir: &Path, _to: &Path) -> Result<(), ProviderError> {
        Err(snapshots_unsupported())
    }

    fn restore_state(
        &self,
        _dir: &Path,
        _from: &Path,
        _moved: &Relocation,
    ) -> Result<(), ProviderError> {
        Err(snapshots_unsupported())
    }

    fn check_saves_travel(&self) -> Result<(), ProviderError> {
        Err(snapshots_unsupported())
    }

    fn network_up(&self, _network: &NetworkSpec) -> bool {
        true
    }

    /// Clears what an interrupted create left, then registers the VM; the
    /// record says it is complete only once every call went through.
    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        crate::state::create_private_dir(&vm.dir)?;
        let base = self.base_disk(vm)?;
        let mut made = Made {
            vm: vm_name(vm),
            base: base.clone(),
            complete: false,
        };
        clear_leftovers(vm, &made.vm)?;
        write_made(&vm.dir, &made)?;
        create_seed_disk(vm)?;
        let registered = create_calls(vm, &base)
            .iter()
            .try_for_each(|call| call.run().map(drop));
        if let Err(e) = registered {
            // Unregistered now if it can be, else by the next create.
            let _ = clear_leftovers(vm, &made.vm);
            return Err(e);
        }
        made.complete = true;
        write_made(&vm.dir, &made)
    }

    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let made = complete_made(&vm.dir).ok_or_else(|| ProviderError::NotCreated {
            machine: vm.name.clone(),
            missing: MADE,
        })?;
        write_seed_extent(vm)?;
        let rules = vm_info(&made.vm)?
            .map(|info| parse_nat_rules(&info))
            .unwrap_or_default();
        for call in boot_calls(vm, &rules) {
            call.run()?;
        }
        Ok(())
    }

    /// A VM whose create did not complete is absent: `up` makes it anew.
    fn state(&self, dir: &Path) -> VmState {
        let Some(made) = complete_made(dir) else {
            return VmState::Absent;
        };
        match vm_state(&made.vm) {
            Ok(Some(state)) => state,
            Ok(None) => VmState::Absent,
            // VirtualBox cannot be asked: the folder still says it was made.
            Err(_) => VmState::Stopped,
        }
    }

    fn kill(&self, dir: &Path) -> Result<(), ProviderError> {
        let Some(made) = read_made(dir) else {
            return Ok(());
        };
        if vm_state(&made.vm)? != Some(VmState::Running) {
            return Ok(());
        }
        Call::new(["controlvm", &made.vm, "poweroff"]).run()?;
        let deadline = Instant::now() + POWEROFF_TIMEOUT;
        while vm_state(&made.vm)? == Some(VmState::Running) {
            if Instant::now() > deadline {
                return Err(ProviderError::Unkillable(made.vm));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Unregisters the VM with `--delete` (its settings, logs, differencing
    /// image and seed), closes the shared base once no VM uses it (so no
    /// stale entry stays in VirtualBox's media registry), then removes the
    /// folder's files.
    fn destroy(&self, dir: &Path) -> Result<(), ProviderError> {
        if let Some(made) = read_made(dir) {
            self.kill(dir)?;
            if registered(&made.vm)? {
                Call::new(["unregistervm", &made.vm, "--delete"]).run()?;
            }
            // Refused while another VM still uses the base: it closes it.
            let _ = Call::new(["closemedium", "disk"]).arg(&made.base).run();
        }
        remove_dir(dir)
    }

    /// VirtualBox's NAT has qemu's addresses: the guest is 10.0.2.15, the
    /// host 10.0.2.2, the DNS forwarder 10.0.2.3.
    fn management(&self, mac: &str) -> Management {
        qemu::user_net_management(mac)
    }

    fn made(&self, dir: &Path) -> bool {
        dir.join(MADE).exists()
    }

    fn accelerator(&self, _kernel: &Path) -> Accelerator {
        Accelerator {
            name: "VirtualBox's own",
            kvm: false,
            reason: "VirtualBox uses the host's hardware virtualisation when it has it".into(),
            fresh: false,
        }
    }

    /// SSH is forwarded on 127.0.0.1 by the NAT rule.
    fn ssh_endpoint(&self, port: u16) -> crate::ssh::Endpoint {
        loopback::ssh_endpoint(port)
    }

    fn ssh_port(&self, previous: u16, retry: bool) -> Result<u16, ProviderError> {
        loopback::ssh_port(previous, retry)
    }

    /// For a VM that exists, the NAT rules to delete are the ones it has
    /// now (asked of VirtualBox; none when it cannot be asked).
    fn planned_calls(&self, vm: &VmSpec, create: bool) -> Vec<String> {
        let mut calls = Vec::new();
        let mut rules = Vec::new();
        if create {
            calls = create_calls(vm, &vm.image.boot_disk_as(DiskFormat::Vdi));
        } else if let Ok(Some(info)) = vm_info(&vm_name(vm)) {
            rules = parse_nat_rules(&info);
        }
        calls.extend(boot_calls(vm, &rules));
        calls.iter().map(Call::to_string).collect()
    }

    /// VBoxManage, and syslinux for the bootable disk (qemu-img, which
    /// converts it to VDI, is on qemu's lines).
    fn doctor(&self) -> Vec<DoctorLine> {
        vec![
            DoctorLine::version("VBoxManage", VBOXMANAGE, &["--version"], VBOXMANAGE_HINT)
                .required(),
            DoctorLine::version(
                "syslinux",
                "syslinux",
                &["--version"],
                crate::image::BOOT_DISK_HINT,
            )
            .required(),
        ]
    }
}

fn snapshots_unsupported() -> ProviderError {
    unsupported(
        "save or restore a snapshot of a machine",
        "use provider = \"qemu\" or \"libvirt\" for snapshots and the green cache",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        crate::provider::sample_vm()
    }

    fn render(calls: Vec<Call>) -> Vec<String> {
        calls.iter().map(Call::to_string).collect()
    }

    #[test]
    fn create_registers_the_vm_with_its_disks() {
        let vm = spec();
        let calls = render(create_calls(&vm, Path::new("/cache/boot-disk.vdi")));
        let name = vm_name(&vm);
        assert!(
            name.starts_with("tb-") && name.ends_with("-alpha"),
            "{name}"
        );
        assert_eq!(
            calls,
            [
                format!(
                    "VBoxManage createvm --name {name} --basefolder \
                     /home/u/pair/.testbed/machines/alpha --ostype Debian_64 --register"
                ),
                format!(
                    "VBoxManage storagectl {name} --name IDE --add ide --controller PIIX4 \
                     --bootable on"
                ),
                format!(
                    "VBoxManage storageattach {name} --storagectl IDE --port 0 --device 0 \
                     --type hdd --medium /cache/boot-disk.vdi --mtype multiattach"
                ),
                format!(
                    "VBoxManage storageattach {name} --storagectl IDE --port 1 --device 0 \
                     --type hdd --medium /home/u/pair/.testbed/machines/alpha/seed.vmdk"
                ),
            ]
        );
    }

    #[test]
    fn each_boot_sets_the_hardware_nics_and_nat_rules_then_starts_headless() {
        let vm = spec();
        let name = vm_name(&vm);
        let calls = render(boot_calls(&vm, &[]));
        let hardware = &calls[0];
        for part in [
            "--memory 768 --cpus 2",
            "--uart1 0x3F8 4 --uartmode1 file /home/u/pair/.testbed/machines/alpha/console.log",
            "--nic1 nat --nictype1 virtio --macaddress1 525400000101 --cableconnected1 on \
             --natpf1 'ssh,tcp,127.0.0.1,40022,,22' --natpf1 'tcp-12181,tcp,127.0.0.1,12181,,2181'",
            "--nic2 intnet --nictype2 virtio --macaddress2 525400000201",
        ] {
            assert!(hardware.contains(part), "{part} missing from {hardware}");
        }
        assert!(
            !hardware.contains("delete"),
            "a new VM has no rule to delete"
        );
        let intnet = intnet_name(&vm.nics[0].network);
        assert!(hardware.ends_with(&format!("--intnet2 {intnet}")));
        assert_eq!(
            intnet.split('-').nth(1),
            name.split('-').nth(1),
            "one testbed"
        );
        assert_eq!(
            calls[1],
            format!("VBoxManage startvm {name} --type headless")
        );

        let again = render(boot_calls(&vm, &["ssh".into(), "tcp-12181".into()]));
        assert!(
            again[0].contains(
                "--natpf1 delete ssh --natpf1 delete tcp-12181 --natpf1 'ssh,tcp,127.0.0.1,40022,,22'"
            ),
            "the rules it has go before they are made again: {}",
            again[0]
        );
    }

    #[test]
    fn the_state_and_nat_rules_are_read_from_the_machine_readable_info() {
        let info = "name=\"vm\"\nVMState=\"running\"\nVMStateChangeTime=\"2026-12-04T01:00:00\"\n\
                    Forwarding(0)=\"ssh,tcp,127.0.0.1,2222,,22\"\n\
                    Forwarding(1)=\"tcp-8080,tcp,127.0.0.1,8080,,80\"\n";
        assert_eq!(parse_vm_state(info), Some("running"));
        assert_eq!(parse_vm_state("name=\"vm\"\n"), None);
        assert_eq!(parse_nat_rules(info), ["ssh", "tcp-8080"]);
    }

    #[test]
    fn calls_quote_what_a_shell_would_split() {
        let call = Call::new(["createvm", "--basefolder", "/home/me/my project"]);
        assert_eq!(
            call.to_string(),
            "VBoxManage createvm --basefolder '/home/me/my project'"
        );
    }
}
