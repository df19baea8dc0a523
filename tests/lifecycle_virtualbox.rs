//! The VirtualBox provider, end to end on a fake `VBoxManage`
//! (`tests/support/fake-vboxmanage`): VirtualBox cannot be installed here.
//! The fake checks every call against VBoxManage's documented grammar,
//! keeps its VMs' state, and runs each VM as plain qemu with VirtualBox's
//! hardware: the bootable disk on an IDE controller, booted by the BIOS
//! from the disk alone (no `-kernel`), the seed a second IDE disk without a
//! serial, NAT with the SSH rule, intnet segments. So the shared lifecycle
//! scenario on it also proves that the bootable disk boots, takes its
//! identity from the seed and answers SSH.

mod common;

use std::path::{Path, PathBuf};

use common::{scenarios, Bed};

fn fake() -> PathBuf {
    common::repo().join("tests/support/fake-vboxmanage")
}

/// A folder holding the fake as `VBoxManage`, readable by the test user.
fn fake_on_path(scratch: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = scratch.join("fake-bin");
    std::fs::create_dir_all(&bin).expect("fake bin");
    let vboxmanage = bin.join("VBoxManage");
    std::fs::copy(fake(), &vboxmanage).expect("copy the fake");
    std::fs::set_permissions(&vboxmanage, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

fn run_fake(home: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(fake())
        .args(args)
        .env("VBOX_USER_HOME", home)
        .output()
        .expect("run the fake VBoxManage")
}

#[test]
fn the_fake_refuses_what_vboxmanage_would() {
    let home = tempfile::tempdir().expect("tempdir");
    let created = run_fake(home.path(), &["createvm", "--name", "vm", "--basefolder"]);
    assert!(!created.status.success(), "--basefolder without a value");
    let base = home.path().join("vms");
    std::fs::create_dir(&base).expect("base folder");
    let base = base.to_string_lossy().into_owned();
    let created = run_fake(
        home.path(),
        &[
            "createvm",
            "--name",
            "vm",
            "--basefolder",
            &base,
            "--register",
        ],
    );
    assert!(
        created.status.success(),
        "createvm: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    // VBoxManage exits 2 on a syntax error (an unknown option, a value its
    // option parser refuses), 1 on a value a subcommand refuses.
    let bad_rule = "ssh,tcp,127.0.0.1,notaport,,22";
    for (args, named, code) in [
        (&["modifyvm", "vm", "--memroy", "512"][..], "--memroy", 2),
        (&["modifyvm", "vm", "--nictype1", "virtioo"], "virtioo", 1),
        (&["modifyvm", "vm", "--natpf1", bad_rule], "notaport", 2),
        (&["startvm", "vm", "--type", "headles"], "headles", 1),
        (&["modifyvm", "nosuchvm", "--memory", "512"], "nosuchvm", 1),
    ] {
        let refused = run_fake(home.path(), args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?}: the error names {named}: {stderr}"
        );
    }
    let fine = run_fake(home.path(), &["modifyvm", "vm", "--memory", "512"]);
    assert!(fine.status.success(), "a correct call is taken");
    let removed = run_fake(home.path(), &["unregistervm", "vm", "--delete"]);
    assert!(removed.status.success(), "unregistervm");
}

#[test]
fn a_pair_on_virtualbox_lives_halts_resumes_and_leaves_nothing_behind() {
    let bed = Bed::installed();
    let home = bed.scratch().join("vbox-home");
    std::fs::create_dir_all(&home).expect("VBOX_USER_HOME");
    if let Some(user) = bed.user() {
        nix::unistd::chown(&home, Some(user.uid), Some(user.gid)).expect("chown");
    }
    let bin = fake_on_path(&bed.scratch());
    let bed = bed.with_env("VBOX_USER_HOME", &home).with_path_first(bin);
    bed.write("topology.toml", &scenarios::pair("virtualbox"));

    let plan = bed.ok(&["plan"]);
    let planned = planned_calls(&plan);
    assert_eq!(
        planned
            .iter()
            .filter(|call| call.first().is_some_and(|c| c == "startvm"))
            .count(),
        2,
        "plan shows each machine's VBoxManage calls:\n{plan}"
    );

    scenarios::two_machines_live_halt_resume_and_leave_nothing_behind(&bed);

    let booted = std::fs::read_to_string(home.join("qemu.log")).expect("the fake's qemu lines");
    assert!(
        !booted.contains("-kernel") && booted.contains("ide-hd"),
        "the VMs booted from their disk alone:\n{booted}"
    );
    let calls = std::fs::read_to_string(home.join("calls.log")).expect("the fake's calls");
    let made: Vec<Vec<String>> = calls
        .lines()
        .map(|line| serde_json::from_str::<Vec<String>>(line).expect("a call"))
        .map(|call| call.iter().map(|arg| without_ssh_port(arg)).collect())
        .collect();
    for call in &planned {
        assert!(
            made.contains(call),
            "up made the call plan showed, {call:?}; it made:\n{calls}"
        );
    }
    assert!(
        made.iter()
            .any(|call| call.first().is_some_and(|c| c == "unregistervm")),
        "destroy unregistered the VMs:\n{calls}"
    );
    let listing: serde_json::Value =
        serde_json::from_str(&bed.ok(&["image", "list", "--json"])).expect("image list --json");
    let disk = listing["cached"]
        .as_array()
        .and_then(|cached| cached.iter().find_map(|image| image["disk"].as_str()))
        .unwrap_or_else(|| panic!("a bootable disk is listed: {listing}"));
    assert!(disk.ends_with("boot-disk.qcow2"), "{disk}");

    // Last (it runs the fake as the test's user, not testbed's): destroy
    // left no stale base in VirtualBox's media registry.
    let media = run_fake(&home, &["list", "hdds"]);
    let media = String::from_utf8_lossy(&media.stdout);
    assert!(
        !media.contains("boot-disk.vdi"),
        "the base was closed:\n{media}"
    );
}

/// The `$ VBoxManage …` lines of `plan`, as argument lists without the
/// program, SSH ports masked (each `up` picks a free one).
fn planned_calls(plan: &str) -> Vec<Vec<String>> {
    plan.lines()
        .filter_map(|line| line.trim().strip_prefix("$ VBoxManage "))
        .map(|call| shlex::split(call).expect("a shell line"))
        .map(|call| call.iter().map(|arg| without_ssh_port(arg)).collect())
        .collect()
}

/// A NAT rule's SSH host port as `PORT`.
fn without_ssh_port(arg: &str) -> String {
    let rule = regex::Regex::new(r"127\.0\.0\.1,\d+,,22$").expect("regex");
    rule.replace(arg, "127.0.0.1,PORT,,22").into_owned()
}
