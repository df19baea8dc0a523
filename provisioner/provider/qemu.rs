//! The embedded default: plain `qemu-system-x86_64` processes, no daemon, no
//! root. Per machine: a qcow2 overlay over the cached base, direct kernel
//! boot, a user-mode management NIC with SSH forwarded on 127.0.0.1, one NIC
//! per topology network joined to that network's switch, a QMP socket and a
//! serial console log, all inside the machine's folder.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::identity::Management;
use crate::model::LinkShape;
use crate::process::{process_alive, terminate, wait_until_dead};

use super::{
    kvm, loopback, qmp, remove_dir, switch, Accelerator, DoctorLine, NetworkSpec, Provider,
    ProviderError, Relocation, VmSpec, VmState,
};

pub const QEMU: &str = "qemu-system-x86_64";
const QEMU_HINT: &str = "apt-get install --no-install-recommends qemu-system-x86 qemu-utils";
const QEMU_IMG_HINT: &str = "apt-get install --no-install-recommends qemu-utils";

#[derive(Debug)]
pub struct Qemu {
    /// Where the KVM probe's verdict is cached (testbed's cache).
    cache_root: PathBuf,
}

impl Qemu {
    pub fn new(cache_root: PathBuf) -> Qemu {
        Qemu { cache_root }
    }
}

impl Provider for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn ensure_network(&self, network: &NetworkSpec) -> Result<(), ProviderError> {
        if process_alive(
            &switch_pid_path(&network.dir),
            &network.dir.to_string_lossy(),
        ) {
            return Ok(());
        }
        crate::state::create_private_dir(&network.dir)?;
        spawn_switch(network)
    }

    /// The switch reads the pairs from a file beside its socket.
    fn block(
        &self,
        network: &NetworkSpec,
        pairs: &[(String, String)],
    ) -> Result<(), ProviderError> {
        let path = network.dir.join(super::switch::BLOCKS_FILE);
        if pairs.is_empty() {
            return remove_file(&path);
        }
        let text: String = pairs.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        Ok(crate::state::write_atomic(&path, text.as_bytes(), 0o600)?)
    }

    /// The switch reads each link's shape from a file beside its socket.
    fn shape_link(
        &self,
        _dir: &Path,
        network: &NetworkSpec,
        mac: &str,
        shape: &LinkShape,
    ) -> Result<(), ProviderError> {
        let path = network.dir.join(switch::LINKS_FILE);
        let mut links: BTreeMap<String, LinkShape> = fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        if shape.is_healthy() {
            links.remove(mac);
        } else {
            links.insert(mac.to_string(), *shape);
        }
        if links.is_empty() {
            return remove_file(&path);
        }
        let text = serde_json::to_string_pretty(&links).map_err(|e| ProviderError::Internal {
            what: "writing the switch's links",
            detail: e.to_string(),
        })?;
        Ok(crate::state::write_atomic(&path, text.as_bytes(), 0o600)?)
    }

    fn pause(&self, dir: &Path) -> Result<(), ProviderError> {
        qmp_command(dir, "stop", "pause")
    }

    fn resume(&self, dir: &Path) -> Result<(), ProviderError> {
        qmp_command(dir, "cont", "resume")
    }

    /// Memory through QMP `migrate` into a file (the guest paused, so one
    /// pass; zero pages take a few bytes each), the disk overlay copied
    /// once the migration has flushed it, and qemu's command line.
    fn save_state(&self, dir: &Path, to: &Path) -> Result<(), ProviderError> {
        crate::state::create_private_dir(to)?;
        let args = args_path(dir);
        if !args.is_file() {
            return Err(ProviderError::NotCreated {
                machine: dir.display().to_string(),
                missing: "a record of its qemu command line (booted by an older testbed:                           `testbed halt` and `up` boot it anew)",
            });
        }
        let memory = memory_path(to);
        let qmp = qmp_path(dir);
        let io = |doing: &'static str| {
            move |source| ProviderError::Io {
                what: format!("cannot {doing} of {} through QMP", dir.display()),
                source,
            }
        };
        qmp::execute_with(
            &qmp,
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": MIGRATION_BANDWIDTH }),
        )
        .map_err(io("set the migration speed"))?;
        let uri = format!(
            "exec:umask 077 && cat > {}",
            crate::ssh::shell_quote(&memory.to_string_lossy())
        );
        qmp::execute_with(&qmp, "migrate", serde_json::json!({ "uri": uri }))
            .map_err(io("save the memory"))?;
        wait_for_migration(&qmp, dir)?;
        copy_file(&disk_path(dir), &to.join(DISK))?;
        copy_file(&args, &args_path(to))
    }

    /// A new qemu from the saved command line, told to take its memory from
    /// the saved file and to stay paused (`-S`), over a copy of the saved disk.
    /// Paths and the SSH forward are host-side only, so a moved VM gets new ones.
    fn restore_state(
        &self,
        dir: &Path,
        from: &Path,
        moved: &Relocation,
    ) -> Result<(), ProviderError> {
        let marker = dir.to_string_lossy().into_owned();
        if process_alive(&pid_path(dir), &marker) {
            return Err(ProviderError::Internal {
                what: "restoring a snapshot",
                detail: format!("{} still runs", dir.display()),
            });
        }
        let text = fs::read(args_path(from)).map_err(|source| ProviderError::Io {
            what: format!("cannot read {}", args_path(from).display()),
            source,
        })?;
        let saved: Vec<String> =
            serde_json::from_slice(&text).map_err(|e| ProviderError::Internal {
                what: "reading a snapshot's qemu command line",
                detail: e.to_string(),
            })?;
        let args = relocated(&saved, moved);
        let name = machine_name(dir);
        boot_incoming(dir, &name, args, from)
    }

    /// The machine's own command line, as a cold boot would have it, with
    /// the template's memory and disk: qemu checks only what the guest sees
    /// (devices, memory size), and those are the same by the template's key.
    fn start_from(&self, vm: &VmSpec, from: &Path) -> Result<(), ProviderError> {
        let kvm = self.accelerator(&vm.image.kernel).kvm;
        boot_incoming(&vm.dir, &vm.name, qemu_args(vm, kvm), from).map_err(port_in_use)?;
        self.resume(&vm.dir)
    }

    fn network_up(&self, network: &NetworkSpec) -> bool {
        process_alive(
            &switch_pid_path(&network.dir),
            &network.dir.to_string_lossy(),
        )
    }

    fn remove_network(&self, network: &NetworkSpec) -> Result<(), ProviderError> {
        terminate(
            &switch_pid_path(&network.dir),
            &network.dir.to_string_lossy(),
        );
        remove_dir(&network.dir)
    }

    fn create(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        let disk = disk_path(&vm.dir);
        if disk.exists() {
            return Ok(());
        }
        let partial = partial_disk_path(&vm.dir);
        let backing = vm.image.root.to_string_lossy().into_owned();
        run_tool(
            "qemu-img",
            &vm.name,
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&backing)
                .arg(&partial),
        )?;
        fs::rename(&partial, &disk).map_err(|source| ProviderError::Io {
            what: format!("cannot move {} into place", partial.display()),
            source,
        })
    }

    fn start(&self, vm: &VmSpec) -> Result<(), ProviderError> {
        check_socket_path(&qmp_path(&vm.dir))?;
        let _ = fs::remove_file(qmp_path(&vm.dir));
        let kvm = self.accelerator(&vm.image.kernel).kvm;
        let args = qemu_args(vm, kvm);
        // Kept for a restore, which must give qemu the very same devices.
        let saved = serde_json::to_vec(&args).map_err(|e| ProviderError::Internal {
            what: "recording qemu's command line",
            detail: e.to_string(),
        })?;
        crate::state::write_atomic(&args_path(&vm.dir), &saved, 0o600)?;
        let mut command = Command::new(QEMU);
        command.args(&args);
        run_tool(QEMU, &vm.name, &mut command).map_err(port_in_use)
    }

    fn state(&self, dir: &Path) -> VmState {
        if process_alive(&pid_path(dir), &dir.to_string_lossy()) {
            VmState::Running
        } else if disk_path(dir).exists() {
            VmState::Stopped
        } else {
            VmState::Absent
        }
    }

    fn kill(&self, dir: &Path) -> Result<(), ProviderError> {
        let pid_file = pid_path(dir);
        let marker = dir.to_string_lossy().into_owned();
        if !process_alive(&pid_file, &marker) {
            return Ok(());
        }
        // `quit` lets qemu flush the overlay; a signal is the fallback.
        let _ = qmp::execute(&qmp_path(dir), "quit");
        if !wait_until_dead(&pid_file, &marker, Duration::from_secs(5)) {
            terminate(&pid_file, &marker);
        }
        if process_alive(&pid_file, &marker) {
            return Err(ProviderError::Unkillable(dir.display().to_string()));
        }
        Ok(())
    }

    fn destroy(&self, dir: &Path) -> Result<(), ProviderError> {
        self.kill(dir)?;
        remove_dir(dir)
    }

    /// qemu's user-mode network: the guest is 10.0.2.15, the host 10.0.2.2,
    /// qemu's DNS forwarder 10.0.2.3.
    fn management(&self, mac: &str) -> Management {
        user_net_management(mac)
    }

    /// A machine's disk (or the one being made) or its pid file; a
    /// network's switch.
    fn made(&self, dir: &Path) -> bool {
        [
            disk_path(dir),
            partial_disk_path(dir),
            pid_path(dir),
            switch_pid_path(dir),
            switch_socket(dir),
        ]
        .iter()
        .any(|path| path.exists())
    }

    fn accelerator(&self, kernel: &Path) -> Accelerator {
        kvm::accelerator(kernel, &self.cache_root)
    }

    /// SSH is forwarded on 127.0.0.1 by the user-mode network.
    fn ssh_endpoint(&self, port: u16) -> crate::ssh::Endpoint {
        loopback::ssh_endpoint(port)
    }

    fn ssh_port(&self, previous: u16, retry: bool) -> Result<u16, ProviderError> {
        loopback::ssh_port(previous, retry)
    }

    /// qemu and qemu-img are needed; KVM only makes it faster.
    fn doctor(&self) -> Vec<DoctorLine> {
        vec![
            DoctorLine::version("qemu", QEMU, &["--version"], QEMU_HINT).required(),
            DoctorLine::version("qemu-img", "qemu-img", &["--version"], QEMU_IMG_HINT).required(),
            kvm::doctor_line(&self.cache_root),
        ]
    }
}

/// qemu's complaint that a forwarded port is taken, as the error `up`
/// retries on another port.
fn port_in_use(error: ProviderError) -> ProviderError {
    match error {
        ProviderError::Start {
            machine, message, ..
        } if message.contains("hostfwd") || message.contains("host forwarding") => {
            ProviderError::PortInUse { machine, message }
        }
        other => other,
    }
}

/// The machine's name: its folder's.
fn machine_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Starts qemu with `args` over a copy of the disk saved in `from`, told
/// to take its memory from the saved file and to stay paused (`-S`);
/// returns once the memory is loaded. `args` are recorded first: a later
/// save or restore of this VM needs them.
fn boot_incoming(
    dir: &Path,
    name: &str,
    mut args: Vec<String>,
    from: &Path,
) -> Result<(), ProviderError> {
    check_socket_path(&qmp_path(dir))?;
    let partial = partial_disk_path(dir);
    copy_file(&from.join(DISK), &partial)?;
    fs::rename(&partial, disk_path(dir)).map_err(|source| ProviderError::Io {
        what: format!("cannot move {} into place", partial.display()),
        source,
    })?;
    let recorded = serde_json::to_vec(&args).map_err(|e| ProviderError::Internal {
        what: "recording qemu's command line",
        detail: e.to_string(),
    })?;
    crate::state::write_atomic(&args_path(dir), &recorded, 0o600)?;
    let _ = fs::remove_file(qmp_path(dir));
    let incoming = format!(
        "exec:cat {}",
        crate::ssh::shell_quote(&memory_path(from).to_string_lossy())
    );
    args.extend(["-incoming".into(), incoming, "-S".into()]);
    run_tool(QEMU, name, Command::new(QEMU).args(&args))?;
    wait_until_loaded(dir, name)
}

/// qemu's saved command line for where the VM is restored: the old state
/// folder's paths under the new one, the SSH forward on the new port.
fn relocated(args: &[String], moved: &Relocation) -> Vec<String> {
    // With the separator: a sibling such as `.testbed-old/` is not under it.
    let saved_root = format!("{}/", moved.saved_root.display());
    let root = format!("{}/", moved.root.display());
    let saved_forward = format!(
        "hostfwd=tcp:{}:{}-:22",
        loopback::HOST,
        moved.saved_ssh_port
    );
    let forward = format!("hostfwd=tcp:{}:{}-:22", loopback::HOST, moved.ssh_port);
    args.iter()
        .map(|arg| {
            arg.replace(&saved_root, &root)
                .replace(&saved_forward, &forward)
        })
        .collect()
}

fn disk_path(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2")
}

fn partial_disk_path(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2.partial")
}

fn pid_path(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

fn qmp_path(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

/// qemu's command line as the machine was last booted (JSON array).
fn args_path(dir: &Path) -> PathBuf {
    dir.join("qemu-args.json")
}

/// A saved VM's memory, in a snapshot's machine folder.
fn memory_path(dir: &Path) -> PathBuf {
    dir.join("memory")
}

/// A saved VM's disk overlay, in a snapshot's machine folder.
const DISK: &str = "disk.qcow2";

/// The migration's speed cap, bytes per second: unlimited in practice
/// (qemu's default, 128 MiB/s, is meant for a live guest on a network).
const MIGRATION_BANDWIDTH: u64 = 64 << 30;

/// How long saving or loading one VM's memory may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Polls `query-migrate` until the outgoing migration has completed.
fn wait_for_migration(qmp: &Path, dir: &Path) -> Result<(), ProviderError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let reply = qmp::execute(qmp, "query-migrate").map_err(|source| ProviderError::Io {
            what: format!("cannot follow the save of {}", dir.display()),
            source,
        })?;
        match reply["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(ProviderError::Internal {
                    what: "saving a VM's memory",
                    detail: format!(
                        "{}: {}",
                        dir.display(),
                        reply["error-desc"]
                            .as_str()
                            .unwrap_or("qemu gave no reason")
                    ),
                })
            }
            _ if Instant::now() > deadline => {
                return Err(ProviderError::Internal {
                    what: "saving a VM's memory",
                    detail: format!("{}: not done after {MIGRATION_TIMEOUT:?}", dir.display()),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Polls `query-status` until a restoring qemu has loaded its memory and
/// stands paused.
fn wait_until_loaded(dir: &Path, name: &str) -> Result<(), ProviderError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let marker = dir.to_string_lossy().into_owned();
    let failed = |detail: String| ProviderError::Start {
        program: QEMU.into(),
        machine: name.into(),
        message: format!("loading its snapshot: {detail}"),
    };
    loop {
        if !process_alive(&pid_path(dir), &marker) {
            return Err(failed(
                "qemu exited (the snapshot does not fit this VM?)".into(),
            ));
        }
        if let Ok(reply) = qmp::execute(&qmp_path(dir), "query-status") {
            match reply["status"].as_str().unwrap_or("") {
                "inmigrate" | "prelaunch" => {}
                "paused" => return Ok(()),
                other => return Err(failed(format!("qemu stands `{other}`"))),
            }
        }
        if Instant::now() > deadline {
            return Err(failed(format!("not loaded after {MIGRATION_TIMEOUT:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn copy_file(from: &Path, to: &Path) -> Result<(), ProviderError> {
    fs::copy(from, to)
        .map(drop)
        .map_err(|source| ProviderError::Io {
            what: format!("cannot copy {} to {}", from.display(), to.display()),
            source,
        })
}

/// Runs a QMP command (`doing` says what for, in the error) on the VM in `dir`.
fn qmp_command(dir: &Path, command: &str, doing: &str) -> Result<(), ProviderError> {
    qmp::execute(&qmp_path(dir), command)
        .map(drop)
        .map_err(|source| ProviderError::Io {
            what: format!("cannot {doing} the VM of {} through QMP", dir.display()),
            source,
        })
}

/// Removes `path`; one already gone is fine.
fn remove_file(path: &Path) -> Result<(), ProviderError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ProviderError::Io {
            what: format!("cannot remove {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn switch_pid_path(dir: &Path) -> PathBuf {
    dir.join("switch.pid")
}

pub fn switch_socket(dir: &Path) -> PathBuf {
    dir.join("switch.sock")
}

/// qemu's option syntax takes `,,` for a literal comma inside a value.
fn opt_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The whole qemu command line for a machine; `kvm`: hardware acceleration
/// (only when the KVM probe passed).
pub fn qemu_args(vm: &VmSpec, kvm: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("testbed-{},process=testbed-{}", vm.name, vm.name),
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        if kvm { "kvm" } else { "tcg" }.into(),
        "-cpu".into(),
        if kvm { "host" } else { "max" }.into(),
        "-smp".into(),
        vm.cpus.to_string(),
        "-m".into(),
        format!("{}M", vm.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-kernel".into(),
        vm.image.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        vm.image.initrd.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_cmdline(vm),
        "-drive".into(),
        format!(
            "file={},if=none,id=root,format=qcow2,discard=unmap",
            opt_path(&disk_path(&vm.dir))
        ),
        "-device".into(),
        "virtio-blk-pci,drive=root".into(),
        "-drive".into(),
        format!(
            "file={},if=none,id=seed,format=raw,readonly=on",
            opt_path(&vm.seed)
        ),
        "-device".into(),
        "virtio-blk-pci,drive=seed,serial=testbed-seed".into(),
        "-netdev".into(),
        management_netdev(vm),
        "-device".into(),
        format!("virtio-net-pci,netdev=mgmt,mac={}", vm.management_mac),
    ];
    for (index, nic) in vm.nics.iter().enumerate() {
        args.push("-netdev".into());
        args.push(format!(
            "stream,id=net{index},server=off,addr.type=unix,addr.path={}",
            opt_path(&switch_socket(&nic.network.dir))
        ));
        args.push("-device".into());
        args.push(format!("virtio-net-pci,netdev=net{index},mac={}", nic.mac));
    }
    args.extend([
        "-device".into(),
        "virtio-rng-pci".into(),
        // A new generation id on every start, a restore's included: Linux
        // reseeds its RNG when it changes, so two restores of one snapshot
        // do not share random state.
        "-device".into(),
        "vmgenid".into(),
        "-chardev".into(),
        format!(
            "file,id=console,path={},append=on",
            opt_path(&vm.console_log())
        ),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", opt_path(&qmp_path(&vm.dir))),
        "-pidfile".into(),
        pid_path(&vm.dir).to_string_lossy().into_owned(),
        "-daemonize".into(),
    ]);
    args
}

/// The kernel command line of our images (direct kernel boot).
pub(super) fn kernel_cmdline(vm: &VmSpec) -> String {
    format!(
        "root=/dev/vda rw console=ttyS0 quiet systemd.machine_id={}",
        vm.machine_id
    )
}

/// The management NIC as the guest sees it: qemu's user-mode network.
pub(super) fn user_net_management(mac: &str) -> Management {
    Management {
        mac: mac.to_string(),
        address: "10.0.2.15/24".into(),
        gateway: Ipv4Addr::new(10, 0, 2, 2),
        dns: Ipv4Addr::new(10, 0, 2, 3),
    }
}

/// User-mode networking: SSH and the topology's forwards, bound on 127.0.0.1.
/// Unless the machine asks for the internet, the guest is `restrict`ed: it
/// reaches neither the host's loopback services (through 10.0.2.2) nor the
/// outside; the forwards still work.
pub(super) fn management_netdev(vm: &VmSpec) -> String {
    let host = loopback::HOST;
    let restrict = if vm.internet { "off" } else { "on" };
    let mut netdev = format!(
        "user,id=mgmt,restrict={restrict},hostfwd=tcp:{host}:{}-:22",
        vm.ssh_port
    );
    for forward in &vm.forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:{host}:{}-:{}",
            forward.host, forward.guest
        ));
    }
    netdev
}

/// Runs a tool to completion, turning failure into an error with its stderr.
fn run_tool(program: &str, machine: &str, command: &mut Command) -> Result<(), ProviderError> {
    let output =
        command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ProviderError::Missing {
                program: program.into(),
                hint: QEMU_HINT.into(),
                source,
            })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ProviderError::Start {
        program: program.into(),
        machine: machine.into(),
        message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Unix socket paths are limited to 107 bytes; say so plainly instead of
/// letting qemu fail obscurely.
fn check_socket_path(path: &Path) -> Result<(), ProviderError> {
    const MAX: usize = 100;
    let length = path.as_os_str().len();
    if length > MAX {
        return Err(ProviderError::SocketPathTooLong {
            path: path.to_path_buf(),
            length,
            max: MAX,
        });
    }
    Ok(())
}

fn spawn_switch(network: &NetworkSpec) -> Result<(), ProviderError> {
    let socket = switch_socket(&network.dir);
    check_socket_path(&socket)?;
    let _ = fs::remove_file(&socket);
    use std::os::unix::process::CommandExt;
    // Our own executable by its inode: still there when the file was
    // replaced meanwhile (a rebuild during a long `up`).
    let mut child = Command::new("/proc/self/exe")
        .arg("__switch")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C on `up` must not take the network down.
        .process_group(0)
        .spawn()
        .map_err(|source| ProviderError::Io {
            what: format!("cannot start the switch of network {}", network.name),
            source,
        })?;
    fs::write(switch_pid_path(&network.dir), child.id().to_string()).map_err(|source| {
        ProviderError::Io {
            what: "cannot write the switch pid".into(),
            source,
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ProviderError::SwitchDidNotStart {
                network: network.name.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Serves a network's switch in this process (the hidden `__switch` verb).
pub fn serve_switch(socket: &Path) -> std::io::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(switch::run(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        super::super::sample_vm()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn a_moved_vm_gets_the_new_folder_and_ssh_port() {
        let saved = [
            "file=/a/.testbed/machines/zk-1/disk.qcow2,if=none".to_string(),
            "user,id=mgmt,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:12181-:2181".into(),
            "/a/.testbed-other/x".into(),
        ];
        let moved = Relocation {
            saved_root: "/a/.testbed".into(),
            root: "/b/.testbed".into(),
            saved_ssh_port: 40022,
            ssh_port: 41000,
        };
        assert_eq!(
            relocated(&saved, &moved),
            [
                "file=/b/.testbed/machines/zk-1/disk.qcow2,if=none",
                "user,id=mgmt,hostfwd=tcp:127.0.0.1:41000-:22,hostfwd=tcp:127.0.0.1:12181-:2181",
                "/a/.testbed-other/x",
            ]
        );
    }

    #[test]
    fn forwards_bind_loopback_only_and_networks_use_the_private_switch() {
        let args = qemu_args(&spec(), false);
        let netdevs = after(&args, "-netdev");
        assert_eq!(
            netdevs[0],
            "user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:12181-:2181"
        );
        assert_eq!(
            netdevs[1],
            "stream,id=net0,server=off,addr.type=unix,addr.path=/home/u/pair/.testbed/networks/lan/switch.sock"
        );
        assert_eq!(after(&args, "-accel"), ["tcg"]);
        assert_eq!(after(&args, "-m"), ["768M"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert!(args.iter().any(|a| a.contains("serial=testbed-seed")));
        assert!(args.contains(&"-daemonize".to_string()));
    }

    #[test]
    fn kvm_only_when_the_probe_said_so() {
        let args = qemu_args(&spec(), true);
        assert_eq!(after(&args, "-accel"), ["kvm"]);
        assert_eq!(after(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn a_folder_is_qemus_when_it_holds_a_disk_a_pid_file_or_a_switch() {
        let qemu = Qemu::new(PathBuf::from("/nonexistent-cache"));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!qemu.made(dir.path()));
        fs::write(dir.path().join("console.log"), "").expect("log");
        fs::write(dir.path().join("seed.tar"), "").expect("seed");
        assert!(!qemu.made(dir.path()), "libvirt writes these too");
        for file in ["disk.qcow2", "qemu.pid", "switch.pid"] {
            let one = tempfile::tempdir().expect("tempdir");
            fs::write(one.path().join(file), "").expect("file");
            assert!(qemu.made(one.path()), "{file}");
        }
    }

    #[test]
    fn commas_in_paths_are_escaped_for_qemu() {
        assert_eq!(opt_path(Path::new("/a,b/disk")), "/a,,b/disk");
    }
}
