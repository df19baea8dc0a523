//! `testbed import`: a Vagrantfile, evaluated by the real `ruby` against
//! testbed's stand-in for Vagrant's configuration API, becomes a topology
//! that `plan` accepts. The tutorial-shaped one of `examples/vagrant`
//! (six machines, private addresses, VirtualBox memory, a shell script
//! each, machines made in a loop) carries over whole; one with what
//! testbed has no place for lists each thing with its line, as a warning
//! and as a comment; a syntax error and a failing expression name their
//! line. No VM boots here.

mod common;

use std::path::Path;
use std::process::Output;

use common::repo;

fn testbed(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("testbed"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run testbed")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = testbed(dir, args);
    assert!(
        out.status.success(),
        "testbed {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn table<'t>(topology: &'t toml::Table, path: &[&str]) -> &'t toml::Table {
    path.iter().fold(topology, |table, key| {
        table
            .get(*key)
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("no table {key} in {table:#?}"))
    })
}

#[test]
fn the_tutorials_vagrantfile_becomes_a_topology_plan_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("aurora");
    std::fs::create_dir(&project).expect("mkdir");
    for entry in std::fs::read_dir(repo().join("examples/vagrant")).expect("examples") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), project.join(entry.file_name())).expect("copy");
    }
    let said = ok(&project, &["import"]);
    assert!(said.contains("everything carried over"), "{said}");
    let text = std::fs::read_to_string(project.join("topology.toml")).expect("topology");
    let topology: toml::Table = text.parse().expect("TOML");
    assert_eq!(topology["name"].as_str(), Some("aurora"));
    assert_eq!(
        table(&topology, &["networks", "private"])["subnet"].as_str(),
        Some("192.168.33.0/24")
    );
    let machines = table(&topology, &["machines"]);
    let expected = [
        (
            "devtools",
            "192.168.33.7",
            "2048MiB",
            "provision-dev-environment.sh",
        ),
        (
            "zookeeper",
            "192.168.33.2",
            "512MiB",
            "provision-zookeeper.sh",
        ),
        (
            "mesos-master",
            "192.168.33.3",
            "1024MiB",
            "provision-mesos-master.sh",
        ),
        (
            "mesos-slave1",
            "192.168.33.4",
            "512MiB",
            "provision-mesos-slave.sh",
        ),
        (
            "mesos-slave2",
            "192.168.33.5",
            "512MiB",
            "provision-mesos-slave.sh",
        ),
        (
            "aurora-scheduler",
            "192.168.33.6",
            "768MiB",
            "provision-aurora-scheduler.sh",
        ),
    ];
    let names: Vec<&str> = machines.keys().map(String::as_str).collect();
    let mut sorted: Vec<&str> = expected.iter().map(|(name, ..)| *name).collect();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    for (index, (name, ip, memory, script)) in expected.iter().enumerate() {
        let machine = table(machines, &[name]);
        assert_eq!(machine["ip"].as_str(), Some(*ip), "{name}");
        assert_eq!(machine["memory"].as_str(), Some(*memory), "{name}");
        let provision = machine["provision"].as_array().expect("provision");
        assert_eq!(provision.len(), 1, "{name}");
        assert_eq!(provision[0]["shell"].as_str(), Some(*script), "{name}");
        // Vagrant's order, kept: each machine provisions after the one before.
        let after = machine
            .get("depends_on")
            .and_then(|d| d.as_array()?.first()?.as_str());
        assert_eq!(after, index.checked_sub(1).map(|i| expected[i].0), "{name}");
    }
    assert_eq!(table(machines, &["devtools"])["cpus"].as_integer(), Some(2));
    let master = table(machines, &["mesos-master"])["provision"][0]["args"].clone();
    assert_eq!(
        master,
        toml::Value::Array(vec!["--zk".into(), "zk://192.168.33.2:2181/mesos".into()]),
        "a string of args is split as the guest's shell splits it"
    );
    let forward = &table(machines, &["aurora-scheduler"])["forward"][0];
    assert_eq!(forward["guest"].as_integer(), Some(8081));
    assert_eq!(forward["host"].as_integer(), Some(8081));
    let plan = ok(&project, &["plan", "--json", "topology.toml"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).expect("plan --json");
    let planned: Vec<(&str, &str)> = plan["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?"),
                m["provision"][0]["name"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(planned.len(), 6, "{planned:?}");
    assert!(
        planned.contains(&("zookeeper", "shell provision-zookeeper.sh")),
        "{planned:?}"
    );

    let again = testbed(&project, &["import"]);
    assert!(!again.status.success(), "import overwrote its topology");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

const PARTLY: &str = r#"Settings = { "web" => "10.20.0.5" }
Vagrant.configure("2") do |config|
  config.vm.box = "ubuntu/jammy64"
  config.vm.synced_folder "src", "/opt/src"
  config.ssh.forward_agent = true
  config.vm.define "web" do |web|
    web.vm.network "private_network", type: "dhcp"
    web.vm.network "public_network"
    web.vm.network "private_network", ip: Settings["web"]
    web.vm.provider "virtualbox" do |vb|
      vb.gui = true
      vb.memory = "1536"
    end
    web.vm.provision "shell", inline: "echo hi", privileged: false
    web.vm.provision "puppet"
    web.vm.provision "ansible", playbook: "site.yml", extra_vars: { port: 8080 }, limit: "all"
  end
  config.vm.define "db_1", autostart: false do |db|
    db.vm.network "private_network", ip: "10.20.0.6"
    db.vm.provision "shell", path: "db.sh"
  end
  puts "the Vagrantfile speaks"
  if Vagrant::VERSION >= "2.0" && Vagrant.has_plugin?("vagrant-cachier")
    config.cache.scope = :box
  end
  config.vm.provider "libvirt" do |lv, override|
    lv.memory = 2048
    override.vm.box = "generic/debian12"
  end
  config.vm.provision "bootstrap", type: "shell", inline: "cat /vagrant/seed; ls /home/vagrant"
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provision "later", type: "shell", inline: "echo later", run: "never"
  config.vm.define "db_1" do |db|
    db.vm.provision "bootstrap", type: "shell", inline: "echo own"
  end
end
"#;

#[test]
fn what_cannot_be_carried_over_is_listed_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("Vagrantfile"), PARTLY).expect("write");
    std::fs::write(dir.path().join("site.yml"), "- hosts: all\n  tasks: []\n").expect("write");
    std::fs::write(
        dir.path().join("db.sh"),
        "#!/bin/sh\ncp /vagrant/schema.sql /tmp\n",
    )
    .expect("write");
    let out = testbed(dir.path(), &["import"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = std::fs::read_to_string(dir.path().join("topology.toml")).expect("topology");
    let left = [
        ("Vagrantfile:4", "synced folder src -> /opt/src"),
        ("Vagrantfile:5", "`config.ssh.forward_agent`"),
        ("Vagrantfile:7", "without `ip` (DHCP)"),
        ("Vagrantfile:8", "network `public_network`"),
        ("Vagrantfile:11", "`virtualbox.gui`"),
        ("Vagrantfile:14", "`privileged: false`"),
        ("Vagrantfile:15", "provisioner `puppet`"),
        ("Vagrantfile:16", "ansible option `limit`"),
        ("Vagrantfile:18", "machine `db_1` is named `db-1`"),
        ("Vagrantfile:18", "`autostart: false`"),
        ("Vagrantfile:20", "db.sh reads /vagrant"),
        (
            "Vagrantfile:23",
            "plugin vagrant-cachier is taken as installed",
        ),
        ("Vagrantfile:24", "`config.cache.scope`"),
        ("Vagrantfile:26", "the `override` of provider libvirt"),
        ("Vagrantfile:30", "the inline script reads /vagrant"),
        ("Vagrantfile:32", "`run: \"never\"`"),
    ];
    for (line, what) in left {
        let found = |text: &str| text.lines().any(|l| l.contains(line) && l.contains(what));
        assert!(found(&stderr), "no warning {line} {what} in:\n{stderr}");
        assert!(found(&text), "no comment {line} {what} in:\n{text}");
    }
    assert!(stderr.contains("the Vagrantfile speaks"), "{stderr}");
    assert!(
        !stderr.contains("-> /vagrant"),
        "a disabled folder was warned of: {stderr}"
    );
    let topology: toml::Table = text.parse().expect("TOML");
    let web = table(&topology, &["machines", "web"]);
    assert_eq!(
        web["ip"].as_str(),
        Some("10.20.0.5"),
        "a Ruby constant's value"
    );
    // A machine's own provider block wins over the whole file's.
    assert_eq!(web["memory"].as_str(), Some("1536MiB"));
    let db = table(&topology, &["machines", "db-1"]);
    assert_eq!(db["memory"].as_str(), Some("2048MiB"));
    // db_1 defined twice is one machine; its own `bootstrap` replaces the
    // whole file's, and `run: "never"` is left out.
    assert_eq!(db["provision"][0]["inline"].as_str(), Some("echo own"));
    assert_eq!(db["provision"][1]["shell"].as_str(), Some("db.sh"));
    assert_eq!(db["provision"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        web["vars"]["port"].as_integer(),
        Some(8080),
        "extra_vars become vars"
    );
    // The whole file's provisioners first, as Vagrant runs them.
    let inline = web["provision"][0]["inline"].as_str();
    assert_eq!(
        inline,
        Some("cat /vagrant/seed; ls /home/vagrant"),
        "a named shell provisioner"
    );
    assert_eq!(web["provision"][1]["inline"].as_str(), Some("echo hi"));
    assert_eq!(web["provision"][2]["ansible"].as_str(), Some("site.yml"));
    assert!(text.contains("# Vagrant box \"ubuntu/jammy64\""), "{text}");
    ok(dir.path(), &["plan", "topology.toml"]);
}

#[test]
fn a_syntax_error_or_a_failing_line_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "Vagrant.configure(\"2\") do |config|\n  config.vm.define \"a\" do |a|\n    a.vm.box = \"x\"\nend\n",
            "Vagrantfile:4: error: syntax error",
        ),
        (
            "Vagrant.configure(\"2\") do |config|\n  config.vm.define \"a\" do |a|\n    a.vm.box = boxes.first\n  end\nend\n",
            "Vagrantfile:3: error: undefined local variable or method",
        ),
    ];
    for (vagrantfile, expected) in cases {
        std::fs::write(dir.path().join("Vagrantfile"), vagrantfile).expect("write");
        let out = testbed(dir.path(), &["import"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{vagrantfile} was imported");
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
        assert!(stderr.contains("Vagrantfile"), "{stderr}");
        assert!(
            !dir.path().join("topology.toml").exists(),
            "a topology was written"
        );
    }
}
