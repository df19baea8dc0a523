//! The boot benchmark: `make bench` (or `cargo build --release && cargo run
//! --release --example bench`). With a warm image cache it measures, side by
//! side in one run:
//! - `testbed up` to SSH-ready for 1 and 3 machines, booting cold (`--cold`)
//!   and warm (resuming a template), beside the same boots done by bare
//!   `qemu-system-x86_64` command lines with ssh polling;
//! - a converged `up`, and `status`;
//! - `testbed ssh NAME -- true` beside plain `ssh` with a fresh connection;
//! - topologies/slurm.toml from `up` to all checks green (build, four
//!   machines, five daemons), with where that time goes, read from `up`'s
//!   own progress lines.
//!
//! - with a private libvirtd (root; tests/support/libvirtd-netns.sh), `up`
//!   to SSH-ready for 3 machines on the libvirt provider beside the qemu
//!   provider, interleaved round by round, then `snapshot save` and
//!   `restore` of each.
//!
//! - libvirt hosts (`BENCH=hosts`, root, not part of the default run: about
//!   15 minutes): topologies/zk-ensemble.toml from `up` to green spread over
//!   two libvirt hosts (namespaces with a libvirtd and an sshd each) beside
//!   the same on one, the first time and again.
//!
//! - the cost of testbed's own work: `plan`, converged `up` and `status` on
//!   the zk-ensemble, and `plan` of a generated 200-machine topology whose
//!   every machine runs a kit (`BENCH=plan` runs only this).
//!
//! - under load (`BENCH=load`, not part of the default run: about half an
//!   hour): a ZooKeeper ensemble of N = 1, 3, 5, 8 brought up to green by
//!   `up` beside the same work by hand, one after the other per N (N = 3
//!   three times, for the spread); and 5 lean machines to SSH-ready with
//!   all booting at once beside `--jobs 3` and `--jobs 2`. `BENCH_LOAD_N=5,3`
//!   measures only those ensemble sizes.
//!
//! - image builds (`BENCH=images`, not part of the default run; root, with
//!   an ordinary user to build as: `$TESTBED_TEST_USER`, else `testbed-ci`):
//!   the debian-12 image built from nothing as root and as that user
//!   (mmdebstrap's unshare mode), each into an empty cache of its own, then
//!   `up` of one machine from each image to SSH-ready.
//!
//! - the green cache and snapshots (`BENCH=green`, not part of the default
//!   run: about 20 minutes): for ZooKeeper ensembles of N = 1, 3, 5
//!   (`BENCH_GREEN_N=3`), `up --fresh --cold` and `up --fresh` with warm
//!   boots to green (and the first warm one, when it made its template),
//!   `up` to green from the
//!   green cache after `destroy`, `snapshot save`, and `snapshot restore`
//!   to green, each beside the same ensemble brought up by hand; then the
//!   same for `topologies/zk-ensemble.toml`, with the snapshot's size and
//!   `verify` riding the ControlMasters beside `verify` without them.
//!
//! `BENCH=boot`, `BENCH=slurm`, `BENCH=libvirt`, `BENCH=plan`, `BENCH=load`
//! or `BENCH=green` runs only that part (`boot`: the SSH-ready rows).
//!
//! It prints a table of medians and ratios. Nothing here asserts: figures
//! are for people to read and compare.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The release (or debug) `testbed` beside this example's binary.
fn testbed_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let binary = dir.join("testbed");
    assert!(
        binary.is_file(),
        "build it first: cargo build --release ({} missing)",
        binary.display()
    );
    binary
}

fn topology(name: &str, machines: usize) -> String {
    let mut text = format!("name = \"{name}\"\n[networks.lan]\nsubnet = \"192.168.50.0/24\"\n");
    for index in 0..machines {
        text.push_str(&format!(
            "[machines.m{index}]\nip = \"192.168.50.{}\"\n",
            index + 10
        ));
    }
    text
}

struct Bed {
    dir: PathBuf,
    /// Run inside this network namespace, against this libvirt URI.
    /// The network namespace testbed runs in, and the libvirt URI if any
    /// (libvirt hosts are named by the topology).
    libvirt: Option<(String, Option<String>)>,
    /// The image cache, when not the invoking user's own.
    cache: Option<PathBuf>,
    /// Whether `up` uses the green cache (only `BENCH=green` measures it;
    /// elsewhere a repeated `up` must boot).
    green_cache: bool,
}

impl Bed {
    fn new(root: &Path, name: &str, machines: usize) -> Bed {
        Bed::with_text(root, name, &topology(name, machines))
    }

    fn with_text(root: &Path, name: &str, text: &str) -> Bed {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("bench dir");
        std::fs::write(dir.join("topology.toml"), text).expect("topology");
        Bed {
            dir,
            libvirt: None,
            cache: None,
            green_cache: false,
        }
    }

    /// `testbed ARGS` in this bed (inside the libvirt netns when it has one).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = match &self.libvirt {
            Some((netns, uri)) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(testbed_binary());
                if let Some(uri) = uri {
                    command.env("TESTBED_LIBVIRT_URI", uri);
                }
                command
            }
            None => Command::new(testbed_binary()),
        };
        command
            .current_dir(&self.dir)
            .env("TESTBED_IMAGES", repo().join("images"))
            .env("TESTBED_DAEMONS", repo().join("daemons"))
            .args(args);
        if let Some(cache) = &self.cache {
            command.env("TESTBED_CACHE", cache);
        }
        if !self.green_cache {
            command.env("TESTBED_GREEN_CACHE_MAX", "0");
        }
        command
    }

    fn run(&self, args: &[&str]) -> Duration {
        let start = Instant::now();
        let output = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run testbed");
        let elapsed = start.elapsed();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "testbed {args:?} failed in {} after {:.1} s:\n{}",
                self.dir.display(),
                elapsed.as_secs_f64(),
                tail.join("\n")
            );
        }
        elapsed
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self
            .command(&["destroy", "-f"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The files a bare boot needs, taken from a testbed machine: the cached
/// kernel, initrd and base disk, and that machine's seed, key and host key.
struct BareKit {
    kernel: String,
    initrd: String,
    base: String,
    seed: PathBuf,
    user_key: PathBuf,
    known_hosts: PathBuf,
}

impl BareKit {
    fn from(bed: &Bed, root: &Path) -> BareKit {
        let state = bed.dir.join(".testbed");
        let machine = state.join("machines/m0");
        let args = std::fs::read_to_string(format!(
            "/proc/{}/cmdline",
            std::fs::read_to_string(machine.join("qemu.pid"))
                .expect("pid")
                .trim()
        ))
        .expect("qemu cmdline");
        let args: Vec<&str> = args.split('\0').collect();
        let after = |flag: &str| -> String {
            let i = args.iter().position(|a| *a == flag).expect("flag");
            args[i + 1].to_string()
        };
        // The base disk sits beside the kernel in the image cache.
        let kernel = after("-kernel");
        let base = Path::new(&kernel).with_file_name("disk.qcow2");
        let dir = root.join("bare-kit");
        std::fs::create_dir_all(&dir).expect("kit dir");
        let seed = dir.join("seed.tar");
        std::fs::copy(machine.join("seed.tar"), &seed).expect("seed");
        // Copied: the testbed they come from is destroyed before the bare boots.
        let user_key = dir.join("id_ed25519");
        std::fs::copy(state.join("id_ed25519"), &user_key).expect("user key");
        let known_hosts = dir.join("known_hosts");
        let host_key =
            std::fs::read_to_string(machine.join("ssh_host_ed25519_key.pub")).expect("host key");
        std::fs::write(&known_hosts, format!("bare {host_key}")).expect("known_hosts");
        BareKit {
            kernel,
            initrd: after("-initrd"),
            base: base.to_string_lossy().into_owned(),
            seed,
            user_key,
            known_hosts,
        }
    }
}

/// Boots `count` VMs with bare qemu command lines and polls each with a
/// fresh `ssh … true` until all answer; returns the wall time.
fn bare_boot(kit: &BareKit, root: &Path, count: usize) -> Duration {
    let start = Instant::now();
    let mut vms = Vec::new();
    for index in 0..count {
        let dir = root.join(format!("bare-{count}-{index}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bare dir");
        let disk = dir.join("disk.qcow2");
        let ok = Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &kit.base,
            ])
            .arg(&disk)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img create failed");
        let port = free_port();
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "768M",
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-kernel", &kit.kernel, "-initrd", &kit.initrd])
            .args(["-append", "root=/dev/vda rw console=ttyS0 quiet"])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=root,format=qcow2",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root"])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=seed,format=raw,readonly=on",
                kit.seed.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=seed,serial=testbed-seed"])
            .arg("-netdev")
            .arg(format!("user,id=mgmt,hostfwd=tcp:127.0.0.1:{port}-:22"))
            // The seed configures the NIC by its MAC: use testbed's management MAC.
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=mgmt,mac={}",
                management_mac()
            ))
            // The seed also names the machine's NIC on the topology network.
            .args(["-netdev", "user,id=lan,restrict=on", "-device"])
            .arg(format!(
                "virtio-net-pci,netdev=lan,mac={}",
                testbed::identity::mac_address("m0", "lan")
            ))
            .args(["-device", "virtio-rng-pci", "-serial", "null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu");
        vms.push((port, dir));
        // Reaped below, after the VM is killed.
        let _ = child.stdin.take();
        BARE_CHILDREN.with(|c| c.borrow_mut().push(child));
    }
    for (port, dir) in &vms {
        while !plain_ssh(kit, *port) {
            assert!(
                start.elapsed() < Duration::from_secs(900),
                "bare VM in {} never answered SSH",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let elapsed = start.elapsed();
    BARE_CHILDREN.with(|c| {
        for mut child in c.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
    for (_, dir) in vms {
        let _ = std::fs::remove_dir_all(dir);
    }
    elapsed
}

thread_local! {
    static BARE_CHILDREN: std::cell::RefCell<Vec<std::process::Child>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// testbed's management MAC for machine m0 (the seed's interfaces name it).
fn management_mac() -> String {
    testbed::identity::mac_address("m0", testbed::identity::MANAGEMENT_NIC)
}

/// One fresh `ssh root@127.0.0.1 true`, host key pinned.
fn plain_ssh(kit: &BareKit, port: u16) -> bool {
    fresh_ssh(&kit.known_hosts, &kit.user_key, port, "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `ssh root@127.0.0.1 COMMAND` on a new connection (no multiplexing), the
/// host key pinned under the alias `bare`, as a person would type it.
fn fresh_ssh(known_hosts: &Path, key: &Path, port: u16, command: &str) -> Command {
    let mut ssh = Command::new("ssh");
    ssh.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=3"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=bare"])
        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "root@127.0.0.1", command]);
    ssh
}

/// The zk-ensemble by hand: bare qemu command lines on one switch, then for
/// each machine one ssh that writes zoo.cfg, myid and the JVM options and
/// starts ZooKeeper, then `printf stat | nc` over ssh until all three serve.
/// The files are the ones testbed renders, so both do the same work.
struct Ensemble {
    kernel: String,
    initrd: String,
    base: String,
    user_key: PathBuf,
    machines: Vec<EnsembleMachine>,
}

struct EnsembleMachine {
    name: String,
    seed: PathBuf,
    known_hosts: PathBuf,
    files: Vec<(String, String)>,
}

impl Ensemble {
    /// Taken from a testbed-made ensemble (warm image cache, seeds, keys).
    fn from(bed: &Bed, root: &Path) -> Ensemble {
        let state = bed.dir.join(".testbed");
        let kit_dir = root.join("zk-kit");
        std::fs::create_dir_all(&kit_dir).expect("kit dir");
        let search = testbed::settings::Settings::from_env().search;
        let topology =
            testbed::topology::load(&bed.dir.join("topology.toml"), &search).expect("topology");
        let kits = testbed::kit::Kits::load(&topology, &search).expect("kits");
        let machines = topology
            .machines
            .iter()
            .map(|machine| {
                let dir = state.join("machines").join(&machine.name);
                let seed = kit_dir.join(format!("{}.seed.tar", machine.name));
                std::fs::copy(dir.join("seed.tar"), &seed).expect("seed");
                let known_hosts = kit_dir.join(format!("{}.known_hosts", machine.name));
                let key =
                    std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).expect("key");
                std::fs::write(&known_hosts, format!("bare {key}")).expect("known_hosts");
                let files = kits
                    .of(machine)
                    .flat_map(|kit| {
                        kit.render(&topology, machine, &Default::default())
                            .expect("render")
                    })
                    .map(|f| (f.dest, f.contents))
                    .collect();
                EnsembleMachine {
                    name: machine.name.clone(),
                    seed,
                    known_hosts,
                    files,
                }
            })
            .collect();
        let user_key = kit_dir.join("id_ed25519");
        std::fs::copy(state.join("id_ed25519"), &user_key).expect("user key");
        let args = std::fs::read_to_string(format!(
            "/proc/{}/cmdline",
            std::fs::read_to_string(state.join("machines/zk-1/qemu.pid"))
                .expect("pid")
                .trim()
        ))
        .expect("cmdline");
        let args: Vec<&str> = args.split('\0').collect();
        let after =
            |flag: &str| args[args.iter().position(|a| *a == flag).expect("flag") + 1].to_string();
        let kernel = after("-kernel");
        let base = Path::new(&kernel)
            .with_file_name("disk.qcow2")
            .to_string_lossy()
            .into_owned();
        Ensemble {
            initrd: after("-initrd"),
            kernel,
            base,
            user_key,
            machines,
        }
    }

    fn ssh(
        &self,
        machine: &EnsembleMachine,
        port: u16,
        command: &str,
        stdin: Option<&str>,
    ) -> Option<String> {
        use std::io::Write;
        let mut child = fresh_ssh(&machine.known_hosts, &self.user_key, port, command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        if let Some(mut pipe) = child.stdin.take() {
            let _ = pipe.write_all(stdin.unwrap_or("").as_bytes());
        }
        let out = child.wait_with_output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Boot, configure, start and poll, all by hand; the wall time.
    fn by_hand(&self, root: &Path) -> Duration {
        let start = Instant::now();
        let net = root.join("bare-net");
        let _ = std::fs::remove_dir_all(&net);
        std::fs::create_dir_all(&net).expect("net dir");
        let socket = net.join("sw");
        let mut children = vec![Command::new(testbed_binary())
            .arg("__switch")
            .arg(&socket)
            .spawn()
            .expect("switch")];
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut ports = Vec::new();
        for machine in &self.machines {
            let disk = net.join(format!("{}.qcow2", machine.name));
            let ok = Command::new("qemu-img")
                .args([
                    "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &self.base,
                ])
                .arg(&disk)
                .status()
                .expect("qemu-img")
                .success();
            assert!(ok, "qemu-img create");
            let port = free_port();
            ports.push(port);
            children.push(
                Command::new("qemu-system-x86_64")
                    .args([
                        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m",
                        "1024M",
                    ])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-kernel", &self.kernel, "-initrd", &self.initrd])
                    .args(["-append", "root=/dev/vda rw console=ttyS0 quiet"])
                    .arg("-drive")
                    .arg(format!(
                        "file={},if=none,id=root,format=qcow2",
                        disk.display()
                    ))
                    .args(["-device", "virtio-blk-pci,drive=root", "-drive"])
                    .arg(format!(
                        "file={},if=none,id=seed,format=raw,readonly=on",
                        machine.seed.display()
                    ))
                    .args([
                        "-device",
                        "virtio-blk-pci,drive=seed,serial=testbed-seed",
                        "-netdev",
                    ])
                    .arg(format!("user,id=mgmt,hostfwd=tcp:127.0.0.1:{port}-:22"))
                    .arg("-device")
                    .arg(format!(
                        "virtio-net-pci,netdev=mgmt,mac={}",
                        testbed::identity::mac_address(
                            &machine.name,
                            testbed::identity::MANAGEMENT_NIC
                        )
                    ))
                    .arg("-netdev")
                    .arg(format!(
                        "stream,id=lan,server=off,addr.type=unix,addr.path={}",
                        socket.display()
                    ))
                    .arg("-device")
                    .arg(format!(
                        "virtio-net-pci,netdev=lan,mac={}",
                        testbed::identity::mac_address(&machine.name, "lan")
                    ))
                    .args(["-device", "virtio-rng-pci", "-serial", "null"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("qemu"),
            );
        }
        std::thread::scope(|scope| {
            for (machine, port) in self.machines.iter().zip(&ports) {
                scope.spawn(move || {
                    while self.ssh(machine, *port, "true", None).is_none() {
                        assert!(
                            start.elapsed() < Duration::from_secs(900),
                            "{} never answered",
                            machine.name
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    let mut script = String::new();
                    for (dest, contents) in &machine.files {
                        let newline = if contents.ends_with('\n') { "" } else { "\n" };
                        script.push_str(&format!(
                            "cat > {dest} <<'TESTBED_EOF'\n{contents}{newline}TESTBED_EOF\n"
                        ));
                    }
                    script.push_str("systemctl start zookeeper\n");
                    // What the obvious script does under load: try again.
                    while self.ssh(machine, *port, "sh -s", Some(&script)).is_none() {
                        assert!(
                            start.elapsed() < Duration::from_secs(900),
                            "{} could not be configured",
                            machine.name
                        );
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    loop {
                        let stat =
                            self.ssh(machine, *port, "printf stat | nc -w 3 localhost 2181", None);
                        if stat.is_some_and(|s| {
                            ["Mode: leader", "Mode: follower", "Mode: standalone"]
                                .iter()
                                .any(|mode| s.contains(mode))
                        }) {
                            break;
                        }
                        assert!(
                            start.elapsed() < Duration::from_secs(1200),
                            "{} never served",
                            machine.name
                        );
                        std::thread::sleep(Duration::from_millis(500));
                    }
                });
            }
        });
        let elapsed = start.elapsed();
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&net);
        elapsed
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn repeat(times: usize, mut f: impl FnMut() -> Duration) -> Duration {
    median((0..times).map(|_| f()).collect())
}

fn time(f: impl FnOnce() -> bool) -> Duration {
    let start = Instant::now();
    assert!(f(), "benchmark step failed");
    start.elapsed()
}

fn row(what: &str, testbed: Duration, baseline: Option<(&str, Duration)>) {
    match baseline {
        Some((name, base)) => println!(
            "{what:<34} {:>9.3} s   {name:<26} {:>9.3} s   {:>5.2}x",
            testbed.as_secs_f64(),
            base.as_secs_f64(),
            testbed.as_secs_f64() / base.as_secs_f64()
        ),
        None => println!("{what:<34} {:>9.3} s", testbed.as_secs_f64()),
    }
}

/// `up`'s progress lines (stderr, `NAME: message` when not a terminal),
/// each with the time since `up` started.
fn timed_up(bed: &Bed) -> (Duration, Vec<(Duration, String, String)>) {
    let start = Instant::now();
    let mut child = bed
        .command(&["up", "topology.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run testbed up");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let (who, what) = line.split_once(": ")?;
            Some((start.elapsed(), who.to_string(), what.to_string()))
        })
        .collect();
    assert!(child.wait().expect("wait").success(), "slurm up failed");
    (start.elapsed(), lines)
}

/// The time of `who`'s first line starting with `from` and of its first
/// later line starting with `to`.
fn span(lines: &[(Duration, String, String)], who: &str, from: &str, to: &str) -> Option<Duration> {
    let start = lines
        .iter()
        .position(|(_, w, what)| w == who && what.starts_with(from))?;
    let (began, ..) = lines[start];
    let (ended, ..) = lines[start..]
        .iter()
        .find(|(_, w, what)| w == who && what.starts_with(to))?;
    Some(*ended - began)
}

/// slurm.toml up → green with a warm cache, and where the time goes.
fn slurm_breakdown(root: &Path) {
    let text = std::fs::read_to_string(repo().join("topologies/slurm.toml"))
        .expect("slurm.toml")
        .replace(
            "\"../examples/jobs/hello_world.c\"",
            "\"examples/jobs/hello_world.c\"",
        );
    let bed = Bed::with_text(root, "bench-slurm", &text);
    let jobs = bed.dir.join("examples/jobs");
    std::fs::create_dir_all(&jobs).expect("jobs dir");
    std::fs::copy(
        repo().join("examples/jobs/hello_world.c"),
        jobs.join("hello_world.c"),
    )
    .expect("job source");
    eprintln!("slurm: warming its images");
    bed.run(&["up", "topology.toml"]);
    bed.run(&["destroy", "-f"]);
    let _ = std::fs::remove_dir_all(bed.dir.join("dist"));
    eprintln!("slurm: timed up");
    let (total, lines) = timed_up(&bed);
    let converged = repeat(5, || bed.run(&["up"]));
    let verify = repeat(3, || bed.run(&["verify"]));

    println!("\nslurm.toml (4 machines, build + 5 daemons + 3 checks), warm image cache\n");
    let share = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64();
    println!(
        "{:<52} {:>8.2} s  100%",
        "up → all checks green",
        total.as_secs_f64()
    );
    let mut rows: BTreeMap<String, Duration> = BTreeMap::new();
    for machine in ["devtools", "zookeeper", "slurm-controller", "slurm-compute"] {
        if let Some(d) = span(&lines, machine, "booting", "applying identity") {
            rows.insert(format!("{machine}: boot to SSH"), d);
        }
    }
    if let Some(d) = span(&lines, "build", "copying inputs", "built") {
        rows.insert("build on devtools (copy, gcc, fetch)".into(), d);
    }
    for (machine, daemon) in [
        ("zookeeper", "zookeeper"),
        ("slurm-controller", "munge"),
        ("slurm-controller", "slurmctld"),
        ("slurm-controller", "slurmrestd"),
        ("slurm-compute", "munge"),
        ("slurm-compute", "slurmd"),
    ] {
        let from = format!("pushing {daemon} files");
        if let Some(d) = span(&lines, machine, &from, "ready")
            .or_else(|| span(&lines, machine, &from, "pushing").filter(|d| !d.is_zero()))
        {
            rows.insert(format!("{machine}: {daemon} push to ready"), d);
        }
    }
    if let Some((last_ready, ..)) = lines.iter().rev().find(|(_, _, what)| what == "ready") {
        rows.insert(
            "checks after the last machine is ready".into(),
            total - *last_ready,
        );
    }
    for (what, d) in rows {
        println!("{what:<52} {:>8.2} s  {:>3.0}%", d.as_secs_f64(), share(d));
    }
    println!(
        "{:<52} {:>8.3} s",
        "converged up (build skipped)",
        converged.as_secs_f64()
    );
    println!(
        "{:<52} {:>8.3} s",
        "verify (3 checks)",
        verify.as_secs_f64()
    );
}

/// A private libvirtd in a network namespace (tests/support/libvirtd-netns.sh).
struct Libvirtd {
    netns: String,
    dir: tempfile::TempDir,
    uri: String,
}

impl Libvirtd {
    fn start() -> Result<Libvirtd, String> {
        Libvirtd::start_with("bench", &[], None)
    }

    /// `host`: [IP, runner namespace] for a libvirt host on the runner's
    /// bridge, its sshd letting in `authorized_keys`.
    fn start_with(
        name: &str,
        host: &[&str],
        authorized_keys: Option<&Path>,
    ) -> Result<Libvirtd, String> {
        let netns = format!("tb-{name}-{}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("tb-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let mut start = Command::new(repo().join("tests/support/libvirtd-netns.sh"));
        start.args(["start", &netns]).arg(dir.path()).args(host);
        if let Some(keys) = authorized_keys {
            start.env("AUTHORIZED_KEYS", keys);
        }
        let output = start.output().map_err(|e| e.to_string())?;
        let daemon = Libvirtd {
            netns,
            dir,
            uri: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        };
        if output.status.success() {
            Ok(daemon)
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tests/support/libvirtd-netns.sh"))
            .args(["stop", &self.netns])
            .arg(self.dir.path())
            .status();
    }
}

/// Two libvirt hosts on the bridge of a runner namespace, as the libvirt
/// test makes them: testbed reaches each with `qemu+libssh://root@IP`.
struct Hosts {
    runner: String,
    keys: tempfile::TempDir,
    daemons: Vec<Libvirtd>,
}

impl Hosts {
    fn start() -> Result<Hosts, String> {
        let script = repo().join("tests/support/libvirtd-netns.sh");
        let runner = format!("tb-bench-run-{}", std::process::id());
        let ok = Command::new(&script).args(["runner", &runner]).status();
        if !ok.is_ok_and(|status| status.success()) {
            return Err(format!("libvirtd-netns.sh runner {runner} failed"));
        }
        let keys = tempfile::tempdir().map_err(|e| e.to_string())?;
        let key = keys.path().join("id");
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .map_err(|e| e.to_string())?;
        let mut hosts = Hosts {
            runner,
            keys,
            daemons: Vec::new(),
        };
        let mut known = String::new();
        for (name, ip) in [("bench-a", "10.77.0.2"), ("bench-b", "10.77.0.3")] {
            let pubkey = key.with_extension("pub");
            let daemon = Libvirtd::start_with(name, &[ip, &hosts.runner], Some(&pubkey))?;
            let host_key = std::fs::read_to_string(daemon.dir.path().join("ssh/host_key.pub"))
                .map_err(|e| e.to_string())?;
            let fields: Vec<&str> = host_key.split_whitespace().take(2).collect();
            known.push_str(&format!("{ip} {}\n", fields.join(" ")));
            hosts.daemons.push(daemon);
        }
        std::fs::write(hosts.keys.path().join("known_hosts"), known).map_err(|e| e.to_string())?;
        Ok(hosts)
    }

    fn uri(&self, ip: &str) -> String {
        format!(
            "qemu+libssh://root@{ip}/system?keyfile={}&known_hosts={}",
            self.keys.path().join("id").display(),
            self.keys.path().join("known_hosts").display()
        )
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.daemons.clear();
        let _ = Command::new(repo().join("tests/support/libvirtd-netns.sh"))
            .args(["stop-runner", &self.runner])
            .status();
    }
}

/// `BENCH=hosts`: topologies/zk-ensemble.toml from `up` to green on one
/// libvirt host (a private libvirtd, `up --provider libvirt`) beside the
/// same spread over two (zk-3 on the second, `lan` across them), each the
/// first time (the image uploaded to the hosts' pools) and again after
/// `destroy` (the images there already).
fn two_hosts_beside_one(root: &Path) {
    let hosts = match Hosts::start() {
        Ok(hosts) => hosts,
        Err(why) => {
            eprintln!("hosts: skipped, no private libvirtds here: {why}");
            return;
        }
    };
    let text = std::fs::read_to_string(repo().join("topologies/zk-ensemble.toml"))
        .expect("zk-ensemble.toml");
    let mut one = Bed::with_text(root, "bench-one-host", &text);
    let local = &hosts.daemons[0];
    one.libvirt = Some((local.netns.clone(), Some(local.uri.clone())));
    let spread = text
        .replacen(
            "[defaults]\n",
            "[defaults]\nprovider = \"libvirt\"\nhost = \"a\"\n",
            1,
        )
        .replacen("[machines.zk-3]\n", "[machines.zk-3]\nhost = \"b\"\n", 1)
        .replacen(
            "[networks.lan]",
            &format!(
                "[hosts.a]\nuri = \"{}\"\n[hosts.b]\nuri = \"{}\"\n[networks.lan]",
                hosts.uri("10.77.0.2"),
                hosts.uri("10.77.0.3")
            ),
            1,
        );
    let mut two = Bed::with_text(root, "bench-two-hosts", &spread);
    two.libvirt = Some((hosts.runner.clone(), None));
    let mut rows = Vec::new();
    for pass in [
        "first, uploading the image",
        "again, the image on the hosts",
    ] {
        eprintln!("hosts: zk-ensemble on one libvirt host, {pass}");
        let on_one = one.run(&["up", "--provider", "libvirt", "topology.toml"]);
        one.run(&["destroy", "-f"]);
        eprintln!("hosts: zk-ensemble over two libvirt hosts, {pass}");
        let on_two = two.run(&["up", "topology.toml"]);
        two.run(&["destroy", "-f"]);
        rows.push((pass, on_two, on_one));
    }
    println!("\ntestbed benchmark: libvirt hosts (TCG, warm image cache, one run each)\n");
    for (pass, on_two, on_one) in rows {
        row(
            &format!("zk-ens over two hosts: up to green, {pass}"),
            on_two,
            Some(("one libvirt host", on_one)),
        );
    }
}

/// libvirt's figures, each beside the qemu provider's.
struct LibvirtFigures {
    up: (Duration, Duration),
    save: (Duration, Duration),
    restore: (Duration, Duration),
}

/// `up` to SSH-ready for 3 machines on libvirt and on qemu, interleaved
/// round by round, then `snapshot save` and `restore` of each; `None` when
/// no libvirtd can be started here.
fn libvirt_beside_qemu(root: &Path, rounds: usize) -> Option<LibvirtFigures> {
    let libvirtd = match Libvirtd::start() {
        Ok(daemon) => daemon,
        Err(why) => {
            eprintln!("libvirt: skipped, no private libvirtd here: {why}");
            return None;
        }
    };
    let text = topology("bench-lv", 3).replace(
        "[networks.lan]",
        "[defaults]\nprovider = \"libvirt\"\n[networks.lan]",
    );
    let mut on_libvirt = Bed::with_text(root, "bench-lv", &text);
    on_libvirt.libvirt = Some((libvirtd.netns.clone(), Some(libvirtd.uri.clone())));
    let on_qemu = Bed::new(root, "bench-qemu3", 3);
    eprintln!("libvirt: warming (capabilities probe, pool)");
    on_libvirt.run(&["up", "topology.toml"]);
    on_libvirt.run(&["destroy", "-f"]);
    let (mut libvirt, mut qemu) = (vec![], vec![]);
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: libvirt and qemu, 3 machines", round + 1);
        libvirt.push(on_libvirt.run(&["up", "topology.toml"]));
        if round + 1 < rounds {
            on_libvirt.run(&["destroy", "-f"]);
        }
        qemu.push(on_qemu.run(&["up", "topology.toml"]));
        if round + 1 < rounds {
            on_qemu.run(&["destroy", "-f"]);
        }
    }
    eprintln!("libvirt and qemu: snapshot save, restore");
    let save = (
        on_libvirt.run(&["snapshot", "save", "b"]),
        on_qemu.run(&["snapshot", "save", "b"]),
    );
    let restore = (
        on_libvirt.run(&["snapshot", "restore", "b"]),
        on_qemu.run(&["snapshot", "restore", "b"]),
    );
    on_libvirt.run(&["destroy", "-f"]);
    on_qemu.run(&["destroy", "-f"]);
    Some(LibvirtFigures {
        up: (median(libvirt), median(qemu)),
        save,
        restore,
    })
}

fn print_libvirt_rows(figures: Option<LibvirtFigures>) {
    let Some(figures) = figures else {
        return;
    };
    for (what, (libvirt, qemu)) in [
        ("up to SSH-ready", figures.up),
        ("snapshot save", figures.save),
        ("snapshot restore", figures.restore),
    ] {
        row(
            &format!("libvirt x3: {what}"),
            libvirt,
            Some(("qemu provider, 3 machines", qemu)),
        );
    }
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    // The library calls below (topology, kits) look recipes and kits up the
    // same way the testbed binary does.
    std::env::set_var("TESTBED_IMAGES", repo().join("images"));
    std::env::set_var("TESTBED_DAEMONS", repo().join("daemons"));
    let root = tempfile::tempdir().expect("tempdir");
    match std::env::var("BENCH").as_deref() {
        Ok("libvirt") => {
            let figures = libvirt_beside_qemu(root.path(), rounds);
            println!(
                "\ntestbed benchmark: libvirt beside qemu (TCG, warm image cache, medians of {rounds})\n"
            );
            print_libvirt_rows(figures);
            return;
        }
        Ok("slurm") => {
            slurm_breakdown(root.path());
            return;
        }
        Ok("hosts") => {
            two_hosts_beside_one(root.path());
            return;
        }
        Ok("load") => {
            under_load(root.path());
            return;
        }
        Ok("images") => {
            image_builds(root.path());
            return;
        }
        Ok("green") => {
            green_and_snapshots(root.path());
            return;
        }
        Ok("plan") => {
            let zk = zk_bed(root.path());
            zk.run(&["up", "topology.toml"]);
            let converged = converged_commands(&zk);
            drop(zk);
            let large = large_plan(root.path());
            println!("\ntestbed benchmark: testbed's own work (medians of 10 runs)\n");
            print_converged(&converged, large);
            return;
        }
        _ => {}
    }
    let (one, kit, boots) = boot_rounds(root.path(), rounds);
    if std::env::var("BENCH").as_deref() == Ok("boot") {
        println!("\ntestbed benchmark: boots (TCG, warm image cache, medians of {rounds})\n");
        print_header();
        print_boot_rows(boots);
        return;
    }

    eprintln!("converged commands");
    one.run(&["up", "topology.toml"]);
    let converged = repeat(10, || one.run(&["up"]));
    let status = repeat(10, || one.run(&["status"]));
    let port: u16 = {
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(one.dir.join(".testbed/state.json")).expect("state"),
        )
        .expect("json");
        record["machines"]["m0"]["ssh_port"].as_u64().expect("port") as u16
    };
    let kit_for_one = BareKit {
        known_hosts: {
            let path = root.path().join("one_known_hosts");
            let key = std::fs::read_to_string(
                one.dir
                    .join(".testbed/machines/m0/ssh_host_ed25519_key.pub"),
            )
            .expect("host key");
            std::fs::write(&path, format!("bare {key}")).expect("known hosts");
            path
        },
        user_key: one.dir.join(".testbed/id_ed25519"),
        ..kit
    };
    one.run(&["ssh", "m0", "--", "true"]); // a ControlMaster is up from here on
    let tb_ssh = repeat(10, || one.run(&["ssh", "m0", "--", "true"]));
    let plain = repeat(5, || time(|| plain_ssh(&kit_for_one, port)));
    one.run(&["destroy", "-f"]);

    eprintln!("zk-ensemble: warming its image");
    let zk = zk_bed(root.path());
    zk.run(&["up", "topology.toml"]);
    let ensemble = Ensemble::from(&zk, root.path());
    zk.run(&["destroy", "-f"]);
    let (mut zk_up, mut zk_hand) = (vec![], vec![]);
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: zk-ensemble", round + 1);
        zk_hand.push(ensemble.by_hand(root.path()));
        zk_up.push(zk.run(&["up", "topology.toml"]));
        if round + 1 < rounds {
            zk.run(&["destroy", "-f"]);
        }
    }
    let zk_verify = repeat(3, || zk.run(&["verify"]));
    let converged_zk = converged_commands(&zk);
    drop(zk); // destroys the ensemble: what follows gets both cores
    let large = large_plan(root.path());
    let libvirt = libvirt_beside_qemu(root.path(), rounds);

    println!(
        "\ntestbed benchmark (TCG, warm image cache, medians of {rounds} boot rounds / 10 runs)\n"
    );
    print_header();
    print_boot_rows(boots);
    row("converged up", converged, None);
    row("status", status, None);
    row(
        "zk-ensemble: up to green (warm)",
        median(zk_up),
        Some(("by hand: qemu, ssh, nc stat", median(zk_hand))),
    );
    row("zk-ensemble: verify, converged (6 checks)", zk_verify, None);
    row(
        "ssh m0 -- true",
        tb_ssh,
        Some(("plain ssh, new connection", plain)),
    );
    print_converged(&converged_zk, large);
    print_libvirt_rows(libvirt);
    slurm_breakdown(root.path());
}

/// `up` to SSH-ready beside bare qemu, 1 and 3 machines, alternated round
/// by round: each run's figures, testbed's cold then warm, then the
/// baseline's.
struct Boots {
    one: BootFigures,
    three: BootFigures,
}

#[derive(Default)]
struct BootFigures {
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    bare: Vec<Duration>,
}

/// Warms the image cache, then alternates the boots; returns the
/// one-machine bed (destroyed) and the bare-qemu kit for what follows.
fn boot_rounds(root: &Path, rounds: usize) -> (Bed, BareKit, Boots) {
    eprintln!("warming: image cache and KVM probe");
    let one = Bed::new(root, "bench-one", 1);
    one.run(&["up", "topology.toml"]);
    let kit = BareKit::from(&one, root);
    one.run(&["destroy", "-f"]);

    let three = Bed::new(root, "bench-three", 3);
    let mut boots = Boots {
        one: BootFigures::default(),
        three: BootFigures::default(),
    };
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: boots", round + 1);
        for (bed, figures, count) in [(&one, &mut boots.one, 1), (&three, &mut boots.three, 3)] {
            figures.bare.push(bare_boot(&kit, root, count));
            figures
                .cold
                .push(bed.run(&["up", "--cold", "topology.toml"]));
            bed.run(&["destroy", "-f"]);
            // The warm-up's `up` made the template these resume.
            figures.warm.push(bed.run(&["up", "topology.toml"]));
            bed.run(&["destroy", "-f"]);
        }
    }
    (one, kit, boots)
}

fn print_header() {
    println!(
        "{:<34} {:>11}   {:<26} {:>11}   {:>6}",
        "testbed", "", "baseline", "", "ratio"
    );
}

fn print_boot_rows(boots: Boots) {
    for (figures, machines) in [(boots.one, "1 machine"), (boots.three, "3 machines")] {
        eprintln!(
            "boots of {machines}, each run: cold {:?}, warm {:?}, bare {:?}",
            figures.cold, figures.warm, figures.bare
        );
        let bare = Some(("bare qemu + ssh poll", median(figures.bare)));
        row(
            &format!("up to SSH-ready, {machines}, cold"),
            median(figures.cold),
            bare,
        );
        row(
            &format!("up to SSH-ready, {machines}, warm"),
            median(figures.warm),
            bare,
        );
    }
}

/// A ZooKeeper ensemble of `n` machines (zk-1 … zk-n, one standalone when
/// `n` is 1), each checked to serve.
fn zk_topology(n: usize) -> String {
    let mut text = format!(
        "name = \"bench-zk{n}\"\n[defaults]\nmemory = \"1GiB\"\n[networks.lan]\n\
         subnet = \"192.168.33.0/24\"\n"
    );
    for index in 1..=n {
        text.push_str(&format!(
            "[machines.zk-{index}]\nip = \"192.168.33.{}\"\ndaemons = [\"zookeeper\"]\n",
            10 + index
        ));
    }
    for index in 1..=n {
        text.push_str(&format!(
            "[[checks]]\nname = \"zk-{index} serves\"\nmachine = \"zk-{index}\"\n\
             tcp = {{ port = 2181, send = \"stat\", expect = \"/Mode: (leader|follower|standalone)/\" }}\n\
             timeout = \"600s\"\n"
        ));
    }
    text
}

/// Ensembles of 1, 3, 5 and 8 to green, testbed beside by hand; then 5
/// lean machines to SSH-ready at each `--jobs`.
fn under_load(root: &Path) {
    println!("\ntestbed benchmark: under load (TCG, 2 cores, warm image cache)\n");
    // The largest first: what fails under load fails early.
    // `BENCH_LOAD_N=5,3` measures only those sizes.
    let sizes = sizes_from_env("BENCH_LOAD_N", &[8, 5, 3, 1]);
    for n in sizes {
        let rounds = if n == 3 { 3 } else { 1 };
        let bed = Bed::with_text(root, &format!("bench-zk{n}"), &zk_topology(n));
        let (mut ups, mut hands) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            eprintln!("zk x{n}, round {}/{rounds}: testbed up", round + 1);
            ups.push(bed.run(&["up", "topology.toml"]));
            let ensemble = Ensemble::from(&bed, root);
            bed.run(&["destroy", "-f"]);
            eprintln!("zk x{n}, round {}/{rounds}: by hand", round + 1);
            hands.push(ensemble.by_hand(root));
        }
        // Printed as measured: a later failure keeps what came before.
        row(
            &format!("zk x{n}: up to green"),
            median(ups.clone()),
            Some(("by hand", median(hands.clone()))),
        );
        if rounds > 1 {
            println!(
                "    testbed runs {}; by hand {}",
                seconds(&ups),
                seconds(&hands)
            );
        }
        if n == 5 {
            // `up` boots cores + 1 at a time unless told: beside all at once.
            eprintln!("zk x5: up --jobs 5 (all at once)");
            let all = bed.run(&["up", "--jobs", "5", "topology.toml"]);
            bed.run(&["destroy", "-f"]);
            row(
                "zk x5: up --jobs 5 (all at once)",
                all,
                Some(("up, default --jobs", median(ups.clone()))),
            );
        }
    }
    let lean = Bed::new(root, "bench-lean5", 5);
    for limit in ["5", "3", "2"] {
        eprintln!("5 lean machines, --jobs {limit}");
        let took = lean.run(&["up", "--jobs", limit, "topology.toml"]);
        row(&format!("5 lean to SSH-ready, --jobs {limit}"), took, None);
        lean.run(&["destroy", "-f"]);
    }
}

/// For ensembles of 1, 3 and 5: a cold and a warm `up` (each saves the
/// cluster in the green cache), `up` from the green cache after `destroy`, `snapshot
/// save` and `snapshot restore` (to green), beside the floor: the same
/// ensemble by hand (bare qemu, ssh, nc), measured in the same run.
fn green_and_snapshots(root: &Path) {
    let sizes = sizes_from_env("BENCH_GREEN_N", &[1, 3, 5]);
    println!("\ntestbed benchmark: green cache and snapshots (TCG, 2 cores, warm image cache)\n");
    print_header();
    for n in sizes {
        let mut bed = Bed::with_text(root, &format!("bench-green{n}"), &zk_topology(n));
        bed.green_cache = true;
        green_rows(&bed, &format!("zk x{n}"), root);
        bed.run(&["destroy", "-f"]);
    }
    // The topology the targets name, with its six checks (a JVM-free
    // znode round trip among them), and `verify` on it.
    let mut zk = zk_bed(root);
    zk.green_cache = true;
    green_rows(&zk, "zk-ens", root);
    eprintln!("zk-ensemble: verify beside a new connection per machine");
    let (riding, connecting) = verify_riding_and_connecting(&zk);
    row(
        "zk-ens: verify (ControlMasters)",
        riding,
        Some(("verify, new SSH connections", connecting)),
    );
    zk.run(&["destroy", "-f"]);
}

/// `up --fresh --cold` and `up --fresh` with warm boots (the first of
/// these makes the template when the cache lacks it: then that row too,
/// and a second), then after `destroy` `up` from the green cache, then
/// `snapshot save` and `restore`, each beside the ensemble by hand. Rows
/// are printed as measured: a later failure keeps what came before.
fn green_rows(bed: &Bed, label: &str, root: &Path) {
    eprintln!("{label}: up --fresh --cold (saves to the green cache)");
    let cold = bed.run(&["up", "--fresh", "--cold", "topology.toml"]);
    let ensemble = Ensemble::from(bed, root);
    bed.run(&["destroy", "-f"]);
    eprintln!("{label}: by hand");
    let floor = ensemble.by_hand(root);
    let by_hand = Some(("by hand: qemu, ssh, nc stat", floor));
    row(&format!("{label}: up --fresh, cold"), cold, by_hand);
    eprintln!("{label}: up --fresh (warm boots)");
    let templates = templates_in_cache(bed);
    let mut warm = bed.run(&["up", "--fresh", "topology.toml"]);
    bed.run(&["destroy", "-f"]);
    if templates_in_cache(bed) > templates {
        row(
            &format!("{label}: up --fresh, making template"),
            warm,
            by_hand,
        );
        warm = bed.run(&["up", "--fresh", "topology.toml"]);
        bed.run(&["destroy", "-f"]);
    }
    row(&format!("{label}: up --fresh, warm"), warm, by_hand);
    eprintln!("{label}: up from the green cache");
    let cached = bed.run(&["up", "topology.toml"]);
    row(&format!("{label}: up from green cache"), cached, by_hand);
    eprintln!("{label}: snapshot save, restore");
    let save = bed.run(&["snapshot", "save", "b"]);
    row(&format!("{label}: snapshot save"), save, by_hand);
    let stored = testbed::state::disk_usage(&bed.dir.join(".testbed/snapshots/b"));
    println!(
        "{:<34} {:>7.0} MiB on disk",
        format!("{label}: the snapshot"),
        stored as f64 / f64::from(1 << 20)
    );
    let restore = bed.run(&["snapshot", "restore", "b"]);
    row(
        &format!("{label}: snapshot restore to green"),
        restore,
        by_hand,
    );
}

/// How many warm-boot templates the cache holds (`cache list --json`).
fn templates_in_cache(bed: &Bed) -> usize {
    let output = bed
        .command(&["cache", "list", "--json"])
        .output()
        .expect("cache list");
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("cache list --json");
    entries
        .iter()
        .filter(|e| {
            e["topology"]
                .as_str()
                .is_some_and(|t| t.starts_with("(warm template)"))
        })
        .count()
}

/// Medians of 5 `verify` runs riding the ControlMasters, and of 5 with
/// every master stopped first (each machine then a key exchange).
fn verify_riding_and_connecting(bed: &Bed) -> (Duration, Duration) {
    let machines = ["zk-1", "zk-2", "zk-3"];
    let config = bed.dir.join(".testbed/ssh_config");
    let stop_masters = || {
        for machine in machines {
            let _ = Command::new("ssh")
                .arg("-F")
                .arg(&config)
                .args(["-O", "exit", machine])
                .stderr(Stdio::null())
                .status();
        }
    };
    let start_masters = || {
        for machine in machines {
            bed.run(&["ssh", machine, "--", "true"]);
        }
    };
    start_masters();
    let riding = repeat(5, || bed.run(&["verify"]));
    let connecting = repeat(5, || {
        stop_masters();
        bed.run(&["verify"])
    });
    start_masters();
    (riding, connecting)
}

/// The ensemble sizes `variable` lists (`5,3`; empty: none), else `default`.
fn sizes_from_env(variable: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(variable) {
        Ok(list) => list
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn seconds(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|s| format!("{:.1} s", s.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn zk_bed(root: &Path) -> Bed {
    let zk_text =
        std::fs::read_to_string(repo().join("topologies/zk-ensemble.toml")).expect("zk-ensemble");
    Bed::with_text(root, "bench-zk", &zk_text)
}

/// `plan`, `up` and `status` on a converged testbed: testbed's own work
/// (load, resolve, ask the providers) with nothing to do.
fn converged_commands(bed: &Bed) -> Vec<(&'static str, Duration)> {
    eprintln!("converged plan, up, status");
    vec![
        ("plan", repeat(10, || bed.run(&["plan", "topology.toml"]))),
        ("up", repeat(10, || bed.run(&["up"]))),
        ("status", repeat(10, || bed.run(&["status"]))),
    ]
}

/// `plan` of a topology of 200 machines, each running the zookeeper kit
/// (one ensemble, so every machine renders a zoo.cfg naming all 200).
fn large_plan(root: &Path) -> Duration {
    eprintln!("plan of 200 machines");
    let mut text =
        String::from("name = \"bench-large\"\n[networks.lan]\nsubnet = \"10.20.0.0/16\"\n");
    for index in 0..200 {
        text.push_str(&format!(
            "[machines.m{index}]\nip = \"10.20.{}.{}\"\ndaemons = [\"zookeeper\"]\n",
            index / 200 + 1,
            index % 200 + 10
        ));
    }
    let bed = Bed::with_text(root, "bench-large", &text);
    repeat(10, || bed.run(&["plan", "topology.toml"]))
}

fn print_converged(converged: &[(&str, Duration)], large: Duration) {
    for (command, took) in converged {
        row(&format!("zk-ensemble: converged {command}"), *took, None);
    }
    row("plan, 200 machines running a kit", large, None);
}

/// Builds debian-12 from nothing as root and as an ordinary user, side by
/// side, then boots one machine from each image.
fn image_builds(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let name = std::env::var("TESTBED_TEST_USER").unwrap_or_else(|_| "testbed-ci".into());
    let user = nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {name} to build as (useradd --create-home {name})"));
    // Reachable by the user: the binary and its cache.
    let shared = tempfile::Builder::new()
        .prefix("testbed-bench-images-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = shared.path().join("testbed");
    std::fs::copy(testbed_binary(), &binary).expect("copy testbed");
    let root_cache = shared.path().join("root-cache");
    let user_cache = shared.path().join("user-cache");
    std::fs::create_dir(&root_cache).expect("root cache");
    std::fs::create_dir(&user_cache).expect("user cache");
    nix::unistd::chown(&user_cache, Some(user.uid), Some(user.gid)).expect("chown");

    eprintln!("image build as root");
    let as_root = time(|| {
        Command::new(&binary)
            .args(["image", "build", "debian-12"])
            .current_dir(shared.path())
            .env("TESTBED_CACHE", &root_cache)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    eprintln!("image build as {name}");
    let as_user = time(|| {
        Command::new("runuser")
            .args(["-u", &name, "--"])
            .arg(&binary)
            .args(["image", "build", "debian-12"])
            .current_dir(shared.path())
            .env_clear()
            .env("HOME", &user.dir)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("TESTBED_CACHE", &user_cache)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let mut boots = Vec::new();
    for (label, cache) in [("root", &root_cache), (name.as_str(), &user_cache)] {
        eprintln!("boot from the image built as {label}");
        let mut bed = Bed::new(root, &format!("bench-image-{label}"), 1);
        bed.cache = Some(cache.clone());
        boots.push(bed.run(&["up", "topology.toml"]));
        bed.run(&["destroy", "-f"]);
    }
    println!("\ntestbed benchmark: image builds (TCG, empty caches, one run each)\n");
    print_header();
    row(
        &format!("image build as {name} (unshare)"),
        as_user,
        Some(("image build as root", as_root)),
    );
    row(
        &format!("up to SSH-ready, {name}'s image"),
        boots[1],
        Some(("up to SSH-ready, root's", boots[0])),
    );
}
