//! testbed in a folder of the user's own, with nothing beside the binary:
//! the recipes and kits compiled in, a local kit shadowing a built-in (and
//! `plan` saying which was used), `init`, `kits`, and printing verbs that
//! stop quietly when their reader goes away. No VMs.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use testbed::image::Recipe;
use testbed::library::Origin;
use testbed::settings::Search;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `testbed ARGS` in `dir` as a user would run it: no `TESTBED_*` variable.
fn testbed(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("testbed"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESTBED_") {
            command.env_remove(name);
        }
    }
    command.current_dir(dir).args(args);
    command
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = testbed(dir, args).output().expect("run testbed");
    assert!(
        out.status.success(),
        "testbed {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const ONE_ZK: &str = r#"
name = "mine"
[networks.lan]
subnet = "192.168.60.0/24"
[machines.zk]
ip = "192.168.60.2"
daemons = ["zookeeper"]
"#;

#[test]
fn a_recipe_is_found_built_in_and_a_local_copy_shares_its_image() {
    let empty = tempfile::tempdir().expect("tempdir");
    let built_in = Recipe::find("debian-12", empty.path(), &Search::default()).expect("built in");
    assert_eq!(built_in.origin(), Origin::BuiltIn);
    let local = Recipe::find("debian-12", repo(), &Search::default()).expect("the checkout's");
    assert_eq!(local.origin(), Origin::Local(repo().join("images")));
    assert_eq!(built_in.key(), local.key(), "one cache entry for both");
}

#[test]
fn a_local_kit_shadows_the_built_in_and_plan_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.toml"), ONE_ZK).expect("topology");
    let plan = ok(dir.path(), &["plan", "topology.toml"]);
    assert!(plan.contains("kit built-in"), "{plan}");
    assert!(
        plan.contains("from built-in"),
        "the image recipe too:\n{plan}"
    );

    let copied = ok(dir.path(), &["kit", "copy", "zookeeper"]);
    assert!(
        copied.contains("daemons/zookeeper/zoo.cfg.tera"),
        "{copied}"
    );
    let template = dir.path().join("daemons/zookeeper/zoo.cfg.tera");
    let text = std::fs::read_to_string(&template).expect("copied template");
    let changed = text.replacen("tickTime=", "# changed here\ntickTime=", 1);
    assert_ne!(text, changed, "zoo.cfg.tera sets tickTime");
    std::fs::write(&template, changed).expect("edit");

    let plan = ok(dir.path(), &["plan", "topology.toml"]);
    assert!(
        plan.contains("| # changed here"),
        "the local template renders:\n{plan}"
    );
    let local = dir
        .path()
        .canonicalize()
        .expect("canonical")
        .join("daemons/zookeeper");
    assert!(
        plan.contains(&format!("kit {}", local.display())),
        "plan names the local kit:\n{plan}"
    );
    let again = testbed(dir.path(), &["kit", "copy", "zookeeper"])
        .output()
        .expect("run");
    assert!(!again.status.success(), "kit copy must not overwrite");
}

#[test]
fn kits_lists_each_kit_with_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(dir.path(), &["kits", "--json"])).expect("kits --json");
    let zookeeper = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|kit| kit["name"] == "zookeeper")
        .unwrap_or_else(|| panic!("zookeeper is built in: {listed}"));
    assert_eq!(zookeeper["source"], "built-in");
    assert!(zookeeper["description"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
}

#[test]
fn init_writes_a_topology_that_plans_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    ok(dir.path(), &["init", "--example", "slurm"]);
    assert!(
        dir.path().join("jobs/hello_world.c").is_file(),
        "its job's source"
    );
    // `plan` with no file uses the folder's topology.toml, and resolves.
    let plan = ok(dir.path(), &["plan", "topology.toml"]);
    assert!(plan.contains("machine slurm-compute"), "{plan}");
    let again = testbed(dir.path(), &["init", "--example", "slurm"])
        .output()
        .expect("run");
    assert!(!again.status.success(), "init must not overwrite");
    let unknown = testbed(dir.path(), &["init", "elsewhere", "--example", "nope"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("zk-ensemble"),
        "names the examples: {stderr}"
    );
    assert!(!dir.path().join("elsewhere").exists(), "nothing written");
}

/// A pipe whose reading end is already closed: the first write fails with
/// EPIPE, as under `| head -1` once head has its line.
fn closed_pipe() -> OwnedFd {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    writer
}

#[test]
fn printing_verbs_stop_quietly_when_the_reader_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("topology.toml"), ONE_ZK).expect("topology");
    let verbs: [&[&str]; 8] = [
        &["plan", "topology.toml"],
        &["plan", "--json", "topology.toml"],
        &["kits"],
        &["image", "list", "--json"],
        &["doctor"],
        &["completions", "bash"],
        &["man"],
        &["--help"],
    ];
    for args in verbs {
        let out = testbed(dir.path(), args)
            .stdout(Stdio::from(closed_pipe()))
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "testbed {args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "testbed {args:?}: {stderr}");
    }
}

#[test]
fn graph_draws_machines_networks_addresses_and_the_start_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    ok(dir.path(), &["init", "--example", "slurm"]);
    let dot = ok(dir.path(), &["graph"]);
    assert!(dot.starts_with("digraph \"slurm\" {"), "{dot}");
    assert!(
        dot.contains("\"machine:slurm-compute\" [shape=box, label=\"slurm-compute\\nqemu, 1 cpu, 768 MiB\\nmunge, slurmd\"];"),
        "{dot}"
    );
    assert!(
        dot.contains(
            "\"machine:slurm-compute\" -> \"net:lan\" [dir=none, label=\"192.168.33.4\"];"
        ),
        "{dot}"
    );
    assert!(
        dot.contains("\"machine:slurm-controller\" -> \"machine:slurm-compute\" [style=dashed"),
        "{dot}"
    );
    let mermaid = ok(dir.path(), &["graph", "--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("---|192.168.33.4| n0"), "{mermaid}");
    assert!(mermaid.contains("-.->|starts before|"), "{mermaid}");

    // svg goes through Graphviz; without it, the message says what to do.
    let empty = tempfile::tempdir().expect("an empty PATH");
    let out = testbed(dir.path(), &["graph", "--format", "svg"])
        .env("PATH", empty.path())
        .output()
        .expect("graph --format svg");
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("needs Graphviz's `dot`"), "{message}");
    assert!(message.contains("apt-get install"), "{message}");
}

#[test]
fn a_partition_names_what_is_wrong_with_its_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    ok(dir.path(), &["init", "--example", "zk-ensemble"]);
    let refused = |args: &[&str], expected: &str| {
        let out = testbed(dir.path(), args).output().expect("fault");
        assert!(!out.status.success(), "{args:?} was taken");
        let message = String::from_utf8_lossy(&out.stderr);
        assert!(message.contains(expected), "{args:?}: {message}");
    };
    refused(
        &["fault", "partition", "zk-1", "zk-2", "zk-3"],
        "a partition needs two or more groups of machines, separated by `/`",
    );
    refused(
        &["fault", "partition", "zk-1", "/", "zk-9"],
        "no machine named `zk-9` in this testbed",
    );
    refused(
        &["fault", "partition", "zk-1", "/", "zk-1"],
        "zk-1 is in two groups of the partition",
    );
    refused(
        &["fault", "partition", "zk-1", "/", "zk-2"],
        "no network of this testbed is up to partition",
    );
}

#[test]
fn doctor_f_checks_each_host_of_the_topology_and_fails_when_one_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on loopback port 1: libvirt and ssh are refused at once.
    let topology = "name = \"racks\"\n[defaults]\nprovider = \"libvirt\"\nhost = \"rack-a\"\n\
                    [hosts.rack-a]\nuri = \"qemu+ssh://root@127.0.0.1:1/system\"\n\
                    [machines.alpha]\n";
    std::fs::write(dir.path().join("topology.toml"), topology).expect("topology");
    let out = testbed(dir.path(), &["doctor", "-f", "topology.toml"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for line in ["missing host rack-a", "missing ssh to rack-a"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("missing") && l.contains(&line[8..])),
            "{line} in:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("fix: start libvirtd there, or correct [hosts.rack-a] uri"),
        "{stdout}"
    );
}
