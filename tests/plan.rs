//! The plan, resolved by the library from a topology in a folder of its own
//! (no VMs): what it says for fresh and stopped machines and for one left
//! with its warm-boot template's identity, that kits are read
//! from disk once, and the JSON contract of `plan --json`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;

use testbed::kit::Kits;
use testbed::model::Topology;
use testbed::plan::{BuildAction, DaemonAction, Inputs, MachineAction, Plan};
use testbed::provider;
use testbed::settings::Search;
use testbed::state::{Desired, MachineRecord, Record, StateDir};

const TOPOLOGY: &str = r#"
name = "planned"
[networks.lan]
subnet = "192.168.40.0/24"
[machines.one]
ip = "192.168.40.2"
daemons = ["idle"]
[machines.two]
ip = "192.168.40.3"
daemons = ["idle"]
[build]
machine = "host"
run = "mkdir -p dist && touch dist/out"
inputs = ["topology.toml"]
outputs = ["dist/out"]
"#;

/// A folder holding the topology and its own kit `idle`.
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.toml"), TOPOLOGY).expect("topology");
    let kit = dir.path().join("daemons/idle");
    std::fs::create_dir_all(&kit).expect("kit");
    std::fs::write(
        kit.join("daemon.toml"),
        "description = \"idle\"\npackages = []\nservice = \"idle\"\n\
         [[files]]\ntemplate = \"who.tera\"\ndest = \"/etc/idle/who\"\n",
    )
    .expect("manifest");
    std::fs::write(
        kit.join("who.tera"),
        "{{ machine.name }} of {{ daemons.idle.count }}\n",
    )
    .expect("template");
    dir
}

fn search() -> Search {
    Search {
        images: Some(common::repo().join("images")),
        daemons: None,
    }
}

fn load(dir: &Path) -> Topology {
    testbed::topology::load(&dir.join("topology.toml"), &search()).expect("loads")
}

fn resolve(dir: &Path, record: &Record, kits: &Kits) -> Plan {
    resolve_topology(dir, &load(dir), record, kits)
}

fn resolve_topology(dir: &Path, topology: &Topology, record: &Record, kits: &Kits) -> Plan {
    let providers = provider::Settings {
        libvirt_uri: "qemu:///system".into(),
        cache_root: dir.join("cache"),
        hosts: Default::default(),
    };
    Plan::resolve(&Inputs {
        topology,
        record,
        state: &StateDir::beside(dir),
        kits,
        secrets: &BTreeMap::new(),
        providers: &providers,
        search: &search(),
    })
    .expect("resolves")
}

fn kits(dir: &Path) -> Kits {
    Kits::load(&load(dir), &search()).expect("kits load")
}

#[test]
fn a_fresh_topology_creates_every_machine_and_starts_every_daemon() {
    let dir = folder();
    let plan = resolve(dir.path(), &Record::default(), &kits(dir.path()));
    for machine in &plan.machines {
        assert_eq!(machine.action, MachineAction::Create, "{}", machine.why);
        let actions: Vec<_> = machine.daemons.iter().map(|d| d.action).collect();
        assert_eq!(actions, [DaemonAction::Start]);
    }
    let build = plan.build.as_ref().expect("a build plan");
    assert_eq!(build.action, BuildAction::Run);
    assert!(!plan.converged());
}

#[test]
fn kits_are_read_once_then_the_plan_renders_without_the_disk() {
    let dir = folder();
    let topology = load(dir.path());
    let kits = Kits::load(&topology, &search()).expect("kits load");
    // Loaded: from here on nothing may read the kit's files again.
    std::fs::remove_dir_all(dir.path().join("daemons")).expect("remove the kit");
    let plan = resolve_topology(dir.path(), &topology, &Record::default(), &kits);
    let one = plan.machine("one").expect("one");
    let rendered = one.daemons[0].rendered.as_ref().expect("rendered");
    assert_eq!(rendered.files[0].contents, "one of 2\n");
}

/// The machine's folder in the testbed beside `dir`, holding a disk.
fn machine_with_a_disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let machine_dir = StateDir::beside(dir).machine_dir(name);
    std::fs::create_dir_all(&machine_dir).expect("machine dir");
    std::fs::write(machine_dir.join("disk.qcow2"), "").expect("disk");
    machine_dir
}

/// A qemu machine's record, its identity not applied yet.
fn machine_record(desired: Desired, warm_boot: bool) -> MachineRecord {
    MachineRecord {
        provider: testbed::model::ProviderKind::Qemu,
        image: "debian-12-old".into(),
        spec: String::new(),
        ssh_port: 2222,
        desired,
        identity: None,
        daemons: BTreeMap::new(),
        artifacts: None,
        provisioned: BTreeMap::new(),
        warm_boot,
        unknown: Default::default(),
    }
}

#[test]
fn a_stopped_machine_starts_and_a_daemon_it_no_longer_runs_is_stopped() {
    let dir = folder();
    // A disk and no qemu process: the qemu provider sees it stopped.
    machine_with_a_disk(dir.path(), "one");
    let mut record = Record::default();
    let mut saved = machine_record(Desired::Stopped, false);
    saved.daemons = BTreeMap::from([("retired".to_string(), "h".to_string())]);
    record.machines.insert("one".into(), saved);
    let plan = resolve(dir.path(), &record, &kits(dir.path()));
    let one = plan.machine("one").expect("one");
    assert_eq!(one.action, MachineAction::Start, "{}", one.why);
    let daemons: Vec<_> = one
        .daemons
        .iter()
        .map(|d| (d.name.as_str(), d.action))
        .collect();
    assert_eq!(
        daemons,
        [
            ("retired", DaemonAction::Stop),
            ("idle", DaemonAction::Start)
        ]
    );
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("keeps image debian-12-old")),
        "the image drift is said: {:?}",
        plan.warnings
    );
    assert_eq!(
        plan.machine("two").expect("two").action,
        MachineAction::Create
    );
}

#[test]
fn a_running_machine_still_with_its_templates_identity_boots_from_its_disk() {
    let dir = folder();
    // A process naming the machine's folder in the pid file: the qemu
    // provider sees the VM running.
    let machine_dir = machine_with_a_disk(dir.path(), "one");
    // `; true`: the shell stays, its command line naming the folder.
    let mut vm = std::process::Command::new("sh")
        .args(["-c", "sleep 60; true", "vm"])
        .arg(&machine_dir)
        .process_group(0)
        .spawn()
        .expect("a stand-in VM process");
    std::fs::write(machine_dir.join("qemu.pid"), vm.id().to_string()).expect("pid");
    // Until the child has exec'd `sh`, its command line is still this
    // test's, and the provider would see no VM (a loaded machine shows it).
    let cmdline = format!("/proc/{}/cmdline", vm.id());
    let named = machine_dir.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read(&cmdline).is_ok_and(|text| String::from_utf8_lossy(&text).contains(&named))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let saved = |warm_boot| machine_record(Desired::Running, warm_boot);
    let mut record = Record::default();
    record.machines.insert("one".into(), saved(true));
    let plan = resolve(dir.path(), &record, &kits(dir.path()));
    let one = plan.machine("one").expect("one");
    assert_eq!(one.action, MachineAction::Start, "{}", one.why);
    assert!(one.why.contains("its template's identity"), "{}", one.why);

    record.machines.insert("one".into(), saved(false));
    let plan = resolve(dir.path(), &record, &kits(dir.path()));
    let one = plan.machine("one").expect("one");
    assert_eq!(one.action, MachineAction::Provision, "{}", one.why);
    let group = nix::unistd::Pid::from_raw(vm.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = vm.wait();
}

#[test]
fn the_json_has_the_contract_shape() {
    let dir = folder();
    let plan = resolve(dir.path(), &Record::default(), &kits(dir.path()));
    let json = serde_json::to_value(&plan).expect("json");
    let keys: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["build", "machines", "warnings"]);
    let one = &json["machines"][0];
    assert_eq!(one["name"], "one");
    assert_eq!(one["action"], "create");
    assert!(one["why"].as_str().is_some_and(|why| !why.is_empty()));
    assert_eq!(one["daemons"][0]["name"], "idle");
    assert_eq!(one["daemons"][0]["action"], "start");
    assert!(one["daemons"][0]["why"].is_string());
    assert_eq!(json["build"]["action"], "run");
    assert!(json["build"]["why"].is_string());
    let fields: Vec<&str> = one
        .as_object()
        .expect("machine")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "action",
            "daemons",
            "image_source",
            "name",
            "provision",
            "why"
        ]
    );
    let image_source = one["image_source"].as_str().expect("image_source");
    assert!(
        image_source.ends_with("images/debian-12.toml"),
        "{image_source}"
    );
    let kit_source = one["daemons"][0]["source"].as_str().expect("source");
    assert!(kit_source.ends_with("daemons/idle"), "{kit_source}");
}
