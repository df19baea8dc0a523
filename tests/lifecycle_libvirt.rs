//! End to end on libvirt: a real libvirtd of the test's own, in a network
//! namespace the test creates. One daemon serves, in turn: the two-machine
//! lifecycle scenario the qemu provider runs (`scenarios`), the zk-ensemble
//! checks (`up --provider libvirt`), its faults and a snapshot saved and
//! restored through libvirt, and an `up` killed with SIGKILL. After
//! each `destroy`, libvirt's domains, networks and volumes are as before.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::libvirtd::PrivateLibvirtd;
use common::{processes_mentioning, repo, scenarios, Bed};

#[test]
fn libvirt_runs_the_lifecycle_the_ensemble_and_survives_a_killed_up() {
    // No skipping: `make deps` installs libvirt and CI runs as root, so a
    // libvirtd that cannot start is a failure to see, not to pass over.
    let libvirtd = PrivateLibvirtd::start("lv").unwrap_or_else(|why| {
        panic!(
            "libvirtd cannot start here: {why}\n(install libvirt-daemon-system and \
             dnsmasq-base — `make deps` does —, and run as root)"
        )
    });
    let before = libvirtd.inventory();

    let pair = Bed::with_libvirtd(&scenarios::pair("libvirt"), &libvirtd);
    scenarios::two_machines_live_halt_resume_and_leave_nothing_behind(&pair);
    assert_eq!(libvirtd.inventory(), before, "destroy restores libvirt");

    ensemble_checks_pass(&libvirtd);
    assert_eq!(libvirtd.inventory(), before, "destroy restores libvirt");

    killed_up_is_seen_and_destroyed(&libvirtd);
    assert_eq!(libvirtd.inventory(), before, "destroy restores libvirt");
}

/// zk-ensemble with every machine moved to libvirt by `--provider`: the
/// domains show up in virsh, and all six checks pass.
fn ensemble_checks_pass(libvirtd: &PrivateLibvirtd) {
    let text = std::fs::read_to_string(repo().join("topologies/zk-ensemble.toml"))
        .expect("zk-ensemble.toml");
    let bed = Bed::with_libvirtd(&text, libvirtd);
    let up = bed.ok(&["up", "--provider", "libvirt", "topology.toml"]);
    assert!(up.contains("PASS") && !up.contains("FAIL"), "{up}");
    let domains = libvirtd.virsh(&["list", "--name"]);
    for machine in ["zk-1", "zk-2", "zk-3"] {
        assert!(
            domains.lines().any(|d| d.ends_with(&format!("-{machine}"))),
            "{machine} runs as a libvirt domain: {domains}"
        );
    }
    everything_goes_through_libvirt(&bed, libvirtd);
    let verify: serde_json::Value =
        serde_json::from_str(&bed.ok(&["verify", "--json"])).expect("verify --json");
    let checks = verify["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 6, "{verify}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{verify}");
    faults_go_through_libvirt_or_are_refused(&bed, libvirtd);
    a_snapshot_is_libvirts_own_and_brings_the_cluster_back(&bed, libvirtd);
    bed.ok(&["destroy", "-f"]);
}

/// Under Debian's stock qemu.conf: each domain's qemu runs as
/// `libvirt-qemu`; what it reads (disk, kernel, initrd, seed, console log)
/// is in the pool's folder, none of it in the user's home; the image was
/// uploaded once for the three machines; the console log comes back
/// through libvirt.
fn everything_goes_through_libvirt(bed: &Bed, libvirtd: &PrivateLibvirtd) {
    let qemu_uid = nix::unistd::User::from_name("libvirt-qemu")
        .expect("getpwnam")
        .expect("Debian's libvirt-daemon-system makes the user libvirt-qemu")
        .uid;
    let home = bed.path().to_string_lossy().into_owned();
    for machine in ["zk-1", "zk-2", "zk-3"] {
        let domain = domain_of(libvirtd, machine);
        let xml = libvirtd.virsh(&["dumpxml", &domain]);
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
fn a_snapshot_is_libvirts_own_and_brings_the_cluster_back(bed: &Bed, libvirtd: &PrivateLibvirtd) {
    bed.ok(&[
        "ssh",
        "zk-1",
        "--",
        "zk-probe put zk-1:2181 /kept before-s1",
    ]);
    bed.ok(&["snapshot", "save", "s1"]);
    let snapshots_of =
        |machine: &str| libvirtd.virsh(&["snapshot-list", "--name", &domain_of(libvirtd, machine)]);
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
fn faults_go_through_libvirt_or_are_refused(bed: &Bed, libvirtd: &PrivateLibvirtd) {
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
