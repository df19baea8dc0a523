//! End to end on libvirt: real libvirtds of the test's own, each in a
//! network namespace the test creates, as two libvirt hosts ("rack-a" at
//! 10.77.0.2 and "rack-b" at 10.77.0.3) on the bridge of a third namespace
//! where testbed runs and reaches them with `qemu+libssh://`. rack-a's
//! daemon serves, in turn: the two-machine lifecycle scenario the qemu
//! provider runs (`scenarios`), then, with rack-b, the zk-ensemble spread
//! over both (zk-1 and zk-2 on rack-a, zk-3 on rack-b, `lan` across them):
//! its checks, its faults and a snapshot saved and restored through libvirt,
//! `halt` and `up` again; then an `up` killed with SIGKILL. The daemons have
//! Debian's stock qemu.conf (qemu as `libvirt-qemu`, DAC on) and testbed
//! runs installed, as an ordinary user in the group `libvirt`. After each
//! `destroy`, every daemon's domains, networks and volumes are as before,
//! but for the images' volumes, kept for the next `up`.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::libvirtd::{PrivateLibvirtd, Runner};
use common::{ordinary_user, processes_mentioning, repo, scenarios, Bed};

/// The two libvirt hosts of the ensemble, by the names its topology gives.
struct Racks {
    a: PrivateLibvirtd,
    b: PrivateLibvirtd,
    /// The URIs testbed reaches them by, from the runner.
    uris: [String; 2],
}

impl Racks {
    /// The daemon that runs `machine`: zk-3 is on rack-b.
    fn of(&self, machine: &str) -> &PrivateLibvirtd {
        if machine == "zk-3" {
            &self.b
        } else {
            &self.a
        }
    }

    fn inventories(&self) -> [(String, String, Vec<String>); 2] {
        [self.a.inventory(), self.b.inventory()]
    }
}

#[test]
fn libvirt_runs_the_lifecycle_the_ensemble_over_two_hosts_and_survives_a_killed_up() {
    // No skipping: `make deps` installs libvirt and CI runs as root, so a
    // libvirtd that cannot start is a failure to see, not to pass over.
    let cannot = |why: String| -> ! {
        panic!(
            "libvirtd cannot start here: {why}\n(install libvirt-daemon-system, \
             dnsmasq-base and openssh-server — `make deps` does —, and run as root)"
        )
    };
    let runner = Runner::start("lvr", ordinary_user().as_ref());
    let (a, uri_a) =
        PrivateLibvirtd::start_host("lva", "10.77.0.2", &runner).unwrap_or_else(|e| cannot(e));
    let (b, uri_b) =
        PrivateLibvirtd::start_host("lvb", "10.77.0.3", &runner).unwrap_or_else(|e| cannot(e));
    let racks = Racks {
        a,
        b,
        uris: [uri_a, uri_b],
    };
    let before = racks.inventories();

    let pair = Bed::with_libvirtd(&scenarios::pair("libvirt"), &racks.a);
    scenarios::two_machines_live_halt_resume_and_leave_nothing_behind(&pair);
    assert_eq!(racks.inventories(), before, "destroy restores libvirt");

    ensemble_over_two_hosts(&runner, &racks);
    assert_eq!(racks.inventories(), before, "destroy restores both hosts");

    killed_up_is_seen_and_destroyed(&racks.a);
    assert_eq!(racks.inventories(), before, "destroy restores libvirt");
}

/// zk-ensemble on libvirt, zk-1 and zk-2 on rack-a and zk-3 on rack-b:
/// every check green (the quorum crosses the hosts), each machine a domain
/// of its host's libvirtd, `testbed ssh` through the host, faults and
/// snapshots through libvirt, `halt` and `up` with the disks intact.
fn ensemble_over_two_hosts(runner: &Runner, racks: &Racks) {
    let bed = Bed::on_hosts(&two_host_ensemble(&racks.uris), runner);
    let up = bed.ok(&["up", "topology.toml"]);
    assert!(up.contains("PASS") && !up.contains("FAIL"), "{up}");
    for machine in ["zk-1", "zk-2", "zk-3"] {
        let domains = racks.of(machine).virsh(&["list", "--name"]);
        assert!(
            domains.lines().any(|d| d.ends_with(&format!("-{machine}"))),
            "{machine} runs as a domain of its host: {domains}"
        );
    }
    let status = bed.ok(&["status"]);
    assert!(
        status.contains("(libvirt on rack-b) ssh 127.0.0.1:")
            && status.contains("via root@10.77.0.3"),
        "{status}"
    );
    assert_eq!(bed.ok(&["ssh", "zk-3", "--", "hostname"]).trim(), "zk-3");
    let doctor = bed.ok(&["doctor", "-f", "topology.toml"]);
    for line in [
        "host rack-a",
        "ssh to rack-a",
        "host rack-b",
        "ssh to rack-b",
    ] {
        assert!(
            doctor
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(line)),
            "doctor -f checks {line}:\n{doctor}"
        );
    }
    everything_goes_through_libvirt(&bed, racks);
    let verify: serde_json::Value =
        serde_json::from_str(&bed.ok(&["verify", "--json"])).expect("verify --json");
    let checks = verify["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 6, "{verify}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{verify}");
    faults_go_through_libvirt_or_are_refused(&bed, racks);
    a_snapshot_is_libvirts_own_and_brings_the_cluster_back(&bed, racks);

    bed.ok(&["ssh", "zk-3", "--", "echo kept > /root/marker && sync"]);
    bed.ok(&["halt"]);
    for rack in [&racks.a, &racks.b] {
        assert!(
            rack.virsh(&["list", "--name"]).is_empty(),
            "halt stops every domain"
        );
    }
    let again = bed.ok(&["up"]);
    assert!(!again.contains("FAIL"), "{again}");
    let marker = bed.ok(&["ssh", "zk-3", "--", "cat /root/marker"]);
    assert_eq!(marker.trim(), "kept", "zk-3's disk outlives halt");
    bed.ok(&["destroy", "-f"]);
    let dir = bed.path().to_string_lossy().into_owned();
    assert!(processes_mentioning(&dir).is_empty(), "processes left");
}

/// zk-ensemble as a user spreads it: `[hosts]` for the two racks, every
/// machine on libvirt and on rack-a but zk-3, on rack-b.
fn two_host_ensemble(uris: &[String; 2]) -> String {
    let text = std::fs::read_to_string(repo().join("topologies/zk-ensemble.toml"))
        .expect("zk-ensemble.toml");
    let hosts = format!(
        "[hosts.rack-a]\nuri = \"{}\"\n[hosts.rack-b]\nuri = \"{}\"\n\n[networks.lan]",
        uris[0], uris[1]
    );
    let spread = text
        .replacen(
            "[defaults]\n",
            "[defaults]\nprovider = \"libvirt\"\nhost = \"rack-a\"\n",
            1,
        )
        .replacen(
            "[machines.zk-3]\n",
            "[machines.zk-3]\nhost = \"rack-b\"\n",
            1,
        )
        .replacen("[networks.lan]", &hosts, 1);
    assert!(spread.contains("host = \"rack-b\""), "{spread}");
    spread
}

/// Under Debian's stock qemu.conf: each domain's qemu runs as
/// `libvirt-qemu`; what it reads (disk, kernel, initrd, seed, console log)
/// is in the pool's folder, none of it in the user's home; the image was
/// uploaded once for the three machines; the console log comes back
/// through libvirt.
fn everything_goes_through_libvirt(bed: &Bed, racks: &Racks) {
    let qemu_uid = nix::unistd::User::from_name("libvirt-qemu")
        .expect("getpwnam")
        .expect("Debian's libvirt-daemon-system makes the user libvirt-qemu")
        .uid;
    let home = bed.path().to_string_lossy().into_owned();
    for machine in ["zk-1", "zk-2", "zk-3"] {
        let libvirtd = racks.of(machine);
        let domain = domain_of(libvirtd, machine);
        let xml = libvirtd.virsh(&["dumpxml", &domain]);
        // `lan` spans both hosts: every machine's NIC on it is in its
        // multicast group, on whichever host.
        assert!(xml.contains("<interface type='mcast'>"), "{machine}: {xml}");
        for read in ["<kernel>", "<initrd>", "<source file=", "<source path="] {
            for at in xml.match_indices(read).map(|(at, _)| at) {
                let rest = &xml[at + read.len()..];
                let path = rest.trim_start_matches(['\'', '"']);
                assert!(
                    path.starts_with("/var/lib/libvirt/testbed/"),
                    "{machine}: {read} outside the pool: {}",
                    &rest[..rest.len().min(120)]
                );
            }
        }
        assert!(!xml.contains(&format!("file='{home}")), "{machine}: {xml}");
        let qemu = qemu_uids(&domain);
        assert!(
            !qemu.is_empty() && qemu.iter().all(|uid| *uid == qemu_uid.as_raw()),
            "{machine}'s qemu runs as libvirt-qemu: {qemu:?}"
        );
        let console = bed.ok(&["logs", machine, "--console"]);
        assert!(
            console.contains(&format!("testbed-identity: {machine} ready")),
            "{machine}'s console through libvirt: {console}"
        );
    }
    // Each image whole: its disk, kernel and initrd, and the mark that its
    // upload finished.
    for libvirtd in [&racks.a, &racks.b] {
        let volumes = libvirtd.volumes();
        let images: Vec<&str> = volumes
            .iter()
            .filter_map(|volume| volume.strip_suffix("-complete"))
            .collect();
        assert!(!images.is_empty(), "no image in the pool: {volumes:?}");
        for image in images {
            for part in [".qcow2", "-vmlinuz", "-initrd.img"] {
                let volume = format!("{image}{part}");
                assert!(volumes.contains(&volume), "{volume} missing: {volumes:?}");
            }
        }
    }
}

/// The uids of the processes whose command line names `domain` (its qemu).
fn qemu_uids(domain: &str) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.starts_with("/usr/bin/qemu-system")
                    && cmdline.contains(&format!("guest={domain},"))
            })
        })
        .filter_map(|entry| entry.metadata().ok().map(|m| m.uid()))
        .collect()
}

/// `snapshot save` on libvirt takes a libvirt snapshot of every domain
/// (memory and disk, in its volume); with a znode deleted and zk-3's
/// ZooKeeper stopped, `snapshot restore` brings back both, every check
/// green; `snapshot rm` leaves libvirt no snapshot.
fn a_snapshot_is_libvirts_own_and_brings_the_cluster_back(bed: &Bed, racks: &Racks) {
    bed.ok(&[
        "ssh",
        "zk-1",
        "--",
        "zk-probe put zk-1:2181 /kept before-s1",
    ]);
    bed.ok(&["snapshot", "save", "s1"]);
    let snapshots_of = |machine: &str| {
        let libvirtd = racks.of(machine);
        libvirtd.virsh(&["snapshot-list", "--name", &domain_of(libvirtd, machine)])
    };
    for machine in ["zk-1", "zk-2", "zk-3"] {
        let listed = snapshots_of(machine);
        assert_eq!(listed.lines().count(), 1, "{machine}: {listed}");
    }

    bed.ok(&["ssh", "zk-2", "--", "zk-probe delete zk-2:2181 /kept"]);
    bed.ok(&["ssh", "zk-3", "--", "systemctl stop zookeeper"]);
    let restored = bed.ok(&["snapshot", "restore", "s1"]);
    assert!(!restored.contains("FAIL"), "{restored}");
    let kept = bed.ok(&["ssh", "zk-1", "--", "zk-probe get zk-1:2181 /kept"]);
    assert_eq!(kept.trim(), "before-s1");
    let active = bed.ok(&["ssh", "zk-3", "--", "systemctl is-active zookeeper"]);
    assert_eq!(active.trim(), "active");

    bed.ok(&["snapshot", "rm", "s1"]);
    for machine in ["zk-1", "zk-2", "zk-3"] {
        let listed = snapshots_of(machine);
        assert!(listed.trim().is_empty(), "{machine} keeps {listed}");
    }
}

/// The domain of `machine` (testbed names it `tb-…-MACHINE`).
fn domain_of(libvirtd: &PrivateLibvirtd, machine: &str) -> String {
    let domains = libvirtd.virsh(&["list", "--all", "--name"]);
    domains
        .lines()
        .find(|d| d.ends_with(&format!("-{machine}")))
        .unwrap_or_else(|| panic!("no domain for {machine}: {domains}"))
        .to_string()
}

/// On libvirt a link goes down and a VM pauses through libvirt's API; the
/// zk-ensemble steps that partition or delay are refused, saying why, and
/// leave no fault in force.
fn faults_go_through_libvirt_or_are_refused(bed: &Bed, racks: &Racks) {
    for (step, cannot) in [
        (
            "isolate-zk-1",
            "cannot drop traffic between chosen machines",
        ),
        (
            "slow-zk-3",
            "cannot delay or drop a share of a link's frames",
        ),
    ] {
        let refused = bed.testbed(&["run", step]);
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{step} must be refused");
        assert!(message.contains(cannot), "{step}: {message}");
    }
    assert!(!bed.ok(&["status"]).contains("faults in force"));

    let libvirtd = racks.of("zk-3");
    let zk_3 = domain_of(libvirtd, "zk-3");
    let mac = testbed::identity::mac_address("zk-3", "lan");
    bed.ok(&["fault", "link", "zk-3", "--down"]);
    let link = libvirtd.virsh(&["domif-getlink", &zk_3, &mac]);
    assert!(link.contains("down"), "{link}");
    let asked = bed.ok(&[
        "ssh",
        "zk-1",
        "--",
        "echo ruok | nc -w 2 zk-3 2181; echo done",
    ]);
    assert_eq!(asked.trim(), "done", "zk-3's link is down");
    assert!(bed
        .ok(&["fault", "heal"])
        .contains("healed: link zk-3 on lan: down"));
    let link = libvirtd.virsh(&["domif-getlink", &zk_3, &mac]);
    assert!(link.contains("up"), "{link}");

    let libvirtd = racks.of("zk-2");
    let zk_2 = domain_of(libvirtd, "zk-2");
    bed.ok(&["fault", "pause", "zk-2"]);
    assert!(libvirtd.virsh(&["domstate", &zk_2]).contains("paused"));
    assert!(bed.ok(&["status"]).contains("paused"));
    bed.ok(&["fault", "resume", "zk-2"]);
    assert!(libvirtd.virsh(&["domstate", &zk_2]).contains("running"));
    assert_eq!(bed.ok(&["ssh", "zk-2", "--", "hostname"]).trim(), "zk-2");
}

/// SIGKILL during `up`: `status` still tells the truth from libvirt, and
/// `destroy` removes exactly what was made.
fn killed_up_is_seen_and_destroyed(libvirtd: &PrivateLibvirtd) {
    let bed = Bed::with_libvirtd(&scenarios::pair("libvirt"), libvirtd);
    // A group of its own: SIGKILL reaches testbed, not only `runuser`.
    let mut up = bed
        .command(&["up", "topology.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start up");
    let deadline = Instant::now() + Duration::from_secs(120);
    while libvirtd.virsh(&["list", "--name"]).is_empty() {
        assert!(Instant::now() < deadline, "no domain started within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let group = nix::unistd::Pid::from_raw(up.id() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL up");
    let _ = up.wait();

    let status = bed.ok(&["status", "--json"]);
    let states: serde_json::Value = serde_json::from_str(&status).expect("status --json");
    let running = states
        .as_array()
        .expect("array")
        .iter()
        .filter(|m| m["state"] == "running")
        .count();
    let active = libvirtd.virsh(&["list", "--name"]).lines().count();
    assert_eq!(running, active, "status agrees with libvirt: {status}");

    // Behind testbed's back: libvirt's word wins.
    for domain in libvirtd.virsh(&["list", "--name"]).lines() {
        libvirtd.virsh(&["destroy", domain]);
    }
    let status = bed.ok(&["status", "--json"]);
    assert!(!status.contains("\"running\""), "{status}");

    bed.ok(&["destroy", "-f"]);
    let dir = bed.path().to_string_lossy().into_owned();
    assert!(processes_mentioning(&dir).is_empty(), "processes left");
}
