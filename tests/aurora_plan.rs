//! The tutorial's Mesos/Aurora half, `topologies/aurora-mesos.toml`, which
//! cannot run here (Mesos and Aurora are retired; no binaries of them can
//! be installed), rendered with `testbed plan` and checked: every flag of
//! Aurora's multi-VM Vagrant setup with the topology's addresses, the
//! Aurora client's clusters.json, the start order, the checks, the build and
//! the steps. And a kit that needs ZooKeeper in a topology without one
//! fails `plan`, naming the kit file and the reason.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use serde_json::json;

/// The kits this topology brings, beside the zookeeper kit.
const KITS: [&str; 4] = [
    "mesos-master",
    "mesos-agent",
    "thermos-observer",
    "aurora-scheduler",
];

/// `testbed plan TOPOLOGY`, run in `dir` with the repository's images and
/// kits.
fn plan(dir: &Path, topology: &Path) -> Output {
    Command::cargo_bin("testbed")
        .expect("binary")
        .current_dir(dir)
        .env("TESTBED_IMAGES", common::repo().join("images"))
        .env("TESTBED_DAEMONS", common::repo().join("daemons"))
        .arg("plan")
        .arg(topology)
        .output()
        .expect("run testbed plan")
}

fn aurora_topology() -> std::path::PathBuf {
    common::repo().join("topologies/aurora-mesos.toml")
}

/// The plan of `topologies/aurora-mesos.toml`, which must succeed.
fn aurora_plan() -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = plan(dir.path(), &aurora_topology());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "testbed plan failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The lines of machine `name`'s part of the plan: from `  machine NAME:`
/// to the next line indented by two spaces only.
fn machine_section<'a>(plan: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("  machine {name}:");
    let mut lines = plan.lines().skip_while(|line| !line.starts_with(&header));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no `{header}` in the plan:\n{plan}"));
    let rest = lines.take_while(|line| !is_top_item(line));
    std::iter::once(first).chain(rest).collect()
}

/// A line indented by exactly two spaces: a machine, the start order, a
/// check, a step.
fn is_top_item(line: &str) -> bool {
    line.starts_with("  ") && !line.starts_with("   ")
}

/// The contents of the file `dest` rendered for machine `name`, as `plan`
/// prints it (each line after `        | `).
fn rendered(plan: &str, name: &str, dest: &str) -> String {
    let section = machine_section(plan, name);
    let header = format!("      file {dest} (");
    let start = section
        .iter()
        .position(|line| line.starts_with(&header))
        .unwrap_or_else(|| panic!("{name} renders no {dest}:\n{}", section.join("\n")));
    let mut text = String::new();
    for line in &section[start + 1..] {
        let Some(content) = line.strip_prefix("        |") else {
            break;
        };
        text.push_str(content.strip_prefix(' ').unwrap_or(content));
        text.push('\n');
    }
    text
}

/// Asserts that `text` (the file `what`) contains each of `needles`.
fn assert_contains_all(what: &str, text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "{what} lacks `{needle}`:\n{text}");
    }
}

/// The command line of a unit's `ExecStart=`, continuation lines joined.
fn exec_start(unit: &str) -> String {
    let mut lines = unit
        .lines()
        .skip_while(|line| !line.starts_with("ExecStart="));
    let mut command = String::new();
    for line in lines.by_ref() {
        let (part, continued) = match line.strip_suffix('\\') {
            Some(part) => (part, true),
            None => (line, false),
        };
        command.push_str(part.trim());
        command.push(' ');
        if !continued {
            break;
        }
    }
    let command = command.trim_end().strip_prefix("ExecStart=");
    command
        .unwrap_or_else(|| panic!("no ExecStart= in:\n{unit}"))
        .to_owned()
}

/// The arguments of `ExecStart=`, split on whitespace outside "…".
fn exec_args(unit: &str) -> Vec<String> {
    let command = exec_start(unit);
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

fn assert_args(what: &str, unit: &str, binary: &str, flags: &[&str]) {
    let args = exec_args(unit);
    assert_eq!(
        args.first().map(String::as_str),
        Some(binary),
        "{what} runs {args:?}"
    );
    for flag in flags {
        assert!(
            args.iter().any(|arg| arg == flag),
            "{what} lacks the argument `{flag}`: {args:?}"
        );
    }
}

#[test]
fn mesos_master_flags_come_from_the_topology() {
    let plan = aurora_plan();
    let unit = rendered(
        &plan,
        "mesos-master",
        "/etc/systemd/system/mesos-master.service",
    );
    assert!(
        unit.starts_with(
            "# Rendered by testbed from daemons/mesos-master/mesos-master.service.tera"
        ),
        "{unit}"
    );
    assert_args(
        "mesos-master.service",
        &unit,
        "/usr/local/sbin/mesos-master",
        &[
            "--zk=zk://192.168.33.2:2181/mesos/master",
            "--ip=192.168.33.3",
            "--work_dir=/var/lib/mesos",
            "--quorum=1",
        ],
    );
    assert_contains_all(
        "mesos-master.service",
        &unit,
        &["ExecStartPre=/usr/bin/tar -xzf /srv/testbed/dist/mesos-install.tar.gz -C /"],
    );
    let section = machine_section(&plan, "mesos-master").join("\n");
    assert_contains_all(
        "mesos-master's plan",
        &section,
        &["artifact dist/mesos-install.tar.gz -> /srv/testbed/dist/mesos-install.tar.gz"],
    );
}

#[test]
fn mesos_agent_and_observer_flags_come_from_the_topology() {
    let plan = aurora_plan();
    let agent = rendered(
        &plan,
        "mesos-slave",
        "/etc/systemd/system/mesos-agent.service",
    );
    assert!(
        agent
            .starts_with("# Rendered by testbed from daemons/mesos-agent/mesos-agent.service.tera"),
        "{agent}"
    );
    assert_args(
        "mesos-agent.service",
        &agent,
        "/usr/local/sbin/mesos-slave",
        &[
            "--master=zk://192.168.33.2:2181/mesos/master",
            "--ip=192.168.33.4",
            "--hostname=192.168.33.4",
            "--attributes=host:192.168.33.4;rack:a",
            "--resources=cpus:4;mem:1024;disk:20000",
            "--work_dir=/var/lib/mesos",
        ],
    );

    let observer = rendered(
        &plan,
        "mesos-slave",
        "/etc/systemd/system/thermos-observer.service",
    );
    assert!(
        observer.starts_with(
            "# Rendered by testbed from daemons/thermos-observer/thermos-observer.service.tera"
        ),
        "{observer}"
    );
    assert_args(
        "thermos-observer.service",
        &observer,
        "/usr/local/bin/thermos_observer",
        &[
            "--port=1338",
            "--log_to_disk=NONE",
            "--log_to_stderr=google:INFO",
        ],
    );
    assert_contains_all(
        "thermos-observer.service",
        &observer,
        &["/srv/testbed/dist/thermos_observer.pex"],
    );

    let section = machine_section(&plan, "mesos-slave").join("\n");
    for artifact in [
        "dist/mesos-install.tar.gz",
        "dist/thermos_executor.pex",
        "dist/gc_executor.pex",
        "dist/thermos_observer.pex",
    ] {
        assert_contains_all(
            "mesos-slave's plan",
            &section,
            &[&format!("artifact {artifact} -> /srv/testbed/{artifact}")],
        );
    }
}

#[test]
fn aurora_scheduler_flags_environment_and_clusters_json() {
    let plan = aurora_plan();
    let unit = rendered(
        &plan,
        "aurora-scheduler",
        "/etc/systemd/system/aurora-scheduler.service",
    );
    assert!(
        unit.starts_with(
            "# Rendered by testbed from daemons/aurora-scheduler/aurora-scheduler.service.tera"
        ),
        "{unit}"
    );
    assert_args(
        "aurora-scheduler.service",
        &unit,
        "/usr/local/aurora-scheduler/bin/aurora-scheduler",
        &[
            "-cluster_name=example",
            "-http_port=8081",
            "-native_log_quorum_size=1",
            "-zk_endpoints=192.168.33.2:2181",
            "-mesos_master_address=zk://192.168.33.2:2181/mesos/master",
            "-serverset_path=/aurora/scheduler",
            "-native_log_zk_group_path=/aurora/replicated-log",
            "-native_log_file_path=/var/lib/aurora/db",
            "-backup_dir=/var/lib/aurora/backups",
            "-thermos_executor_path=/srv/testbed/dist/thermos_executor.pex",
            "-gc_executor_path=/srv/testbed/dist/gc_executor.pex",
            "-vlog=INFO",
            "-logtostderr",
        ],
    );
    assert_contains_all(
        "aurora-scheduler.service",
        &unit,
        &[
            "Environment=GLOG_v=0\n",
            "Environment=LIBPROCESS_PORT=8083\n",
            "Environment=LIBPROCESS_IP=192.168.33.5\n",
            "Environment=\"JAVA_OPTS=-server -Xmx1g -Xms1g -Djava.library.path=/usr/local/lib\"\n",
            // The replicated log is initialized only when it does not exist.
            "ExecStartPre=/bin/sh -c 'test -e /var/lib/aurora/db || /usr/local/bin/mesos-log initialize --path=/var/lib/aurora/db'\n",
            "/srv/testbed/dist/aurora-scheduler.tar",
            "/srv/testbed/dist/aurora.pex /usr/local/bin/aurora",
        ],
    );

    let clusters = rendered(&plan, "aurora-scheduler", "/etc/aurora/clusters.json");
    let clusters: serde_json::Value = serde_json::from_str(&clusters)
        .unwrap_or_else(|error| panic!("clusters.json is not JSON ({error}):\n{clusters}"));
    assert_eq!(
        clusters,
        json!([{
            "name": "example",
            "zk": "192.168.33.2",
            "scheduler_zk_path": "/aurora/scheduler",
            "auth_mechanism": "UNAUTHENTICATED",
            "slave_run_directory": "latest",
            "slave_root": "/var/lib/mesos"
        }])
    );

    let section = machine_section(&plan, "aurora-scheduler").join("\n");
    for artifact in [
        "dist/hello_world.aurora",
        "dist/mesos-install.tar.gz",
        "dist/aurora-scheduler.tar",
        "dist/aurora.pex",
    ] {
        assert_contains_all(
            "aurora-scheduler's plan",
            &section,
            &[&format!("artifact {artifact} -> /srv/testbed/{artifact}")],
        );
    }
}

#[test]
fn start_order_is_zookeeper_master_then_agent_and_scheduler() {
    let plan = aurora_plan();
    let mut lines = plan
        .lines()
        .skip_while(|line| !line.starts_with("  start order"));
    assert!(lines.next().is_some(), "no start order in:\n{plan}");
    let mut wave_of = BTreeMap::new();
    for line in lines.take_while(|line| !is_top_item(line)) {
        let (number, machines) = line
            .trim()
            .split_once(". ")
            .unwrap_or_else(|| panic!("not a wave: {line:?}"));
        let number: usize = number.parse().expect("wave number");
        for machine in machines.split(", ") {
            wave_of.insert(machine.to_owned(), number);
        }
    }
    let wave = |machine: &str| {
        *wave_of
            .get(machine)
            .unwrap_or_else(|| panic!("{machine} is in no wave: {wave_of:?}"))
    };
    assert!(wave("zookeeper") < wave("mesos-master"), "{wave_of:?}");
    assert!(wave("mesos-master") < wave("mesos-slave"), "{wave_of:?}");
    assert!(
        wave("mesos-master") < wave("aurora-scheduler"),
        "{wave_of:?}"
    );
    assert_eq!(wave("mesos-slave"), wave("aurora-scheduler"), "{wave_of:?}");
}

/// The checks as `plan` prints them (name, machine, probe), and their
/// expectations, which `plan` does not print, from the parsed topology.
#[test]
fn checks_are_the_tutorials() {
    let plan = aurora_plan();
    let check_line = |name: &str, machine: &str| -> String {
        let prefix = format!("  check \"{name}\" on {machine}: ");
        plan.lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{plan}"))
            .to_owned()
    };
    let stat = check_line("zookeeper answers stat", "zookeeper");
    assert_contains_all(
        "the stat check",
        &stat,
        &[
            "tcp port 2181",
            "send \"stat\"",
            "expect \"Mode: standalone\"",
        ],
    );
    let ls = check_line("zkCli.sh ls / shows mesos and aurora", "zookeeper");
    assert_contains_all(
        "the ls check",
        &ls,
        &["zkCli.sh -server 127.0.0.1:2181 ls /"],
    );
    let master = check_line(
        "mesos-master is elected with one activated slave",
        "mesos-master",
    );
    assert_contains_all(
        "the master check",
        &master,
        &[
            "http GET :5050/master/stats.json",
            "json /activated_slaves == 1",
            "json /elected == 1",
        ],
    );
    let slave = check_line("mesos-slave is registered", "mesos-slave");
    assert_contains_all(
        "the slave check",
        &slave,
        &[
            "http GET :5051/slave(1)/stats.json",
            "json /registered == \"1\"",
        ],
    );
    let scheduler = check_line("aurora-scheduler registered with mesos", "aurora-scheduler");
    assert_contains_all(
        "the scheduler check",
        &scheduler,
        &["http GET :8081/vars", "body \"framework_registered 1\""],
    );

    let topology =
        testbed::topology::load(&aurora_topology(), &Default::default()).expect("topology parses");
    let check = |name: &str| {
        topology
            .checks
            .iter()
            .find(|check| check.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    };
    let ls = check("zkCli.sh ls / shows mesos and aurora");
    let pattern = ls
        .command
        .as_ref()
        .and_then(|command| command.stdout.as_deref())
        .expect("stdout pattern");
    let regex = regex::Regex::new(
        pattern
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix('/'))
            .expect("a /regex/"),
    )
    .expect("regex");
    assert!(regex.is_match("[mesos, zookeeper, aurora]"));
    assert!(regex.is_match("[aurora, zookeeper, mesos]"));
    assert!(!regex.is_match("[zookeeper, mesos]"));

    let master = check("mesos-master is elected with one activated slave");
    let http = master.http.as_ref().expect("http");
    assert_eq!(http.json.get("/elected"), Some(&json!(1)));
    assert_eq!(http.json.get("/activated_slaves"), Some(&json!(1)));
    let slave = check("mesos-slave is registered");
    let http = slave.http.as_ref().expect("http");
    // Mesos' slave stats.json says "registered": "1", a string.
    assert_eq!(http.json.get("/registered"), Some(&json!("1")));
    let scheduler = check("aurora-scheduler registered with mesos");
    let http = scheduler.http.as_ref().expect("http");
    assert_eq!(http.body.as_deref(), Some("framework_registered 1"));
}

#[test]
fn steps_launch_and_kill_hello_and_the_build_feeds_every_artifact() {
    let plan = aurora_plan();
    assert_contains_all(
        "the plan",
        &plan,
        &[
            "  step \"create-hello\" on aurora-scheduler",
            "    $ aurora job create example/www-data/prod/hello /srv/testbed/dist/hello_world.aurora",
            "check \"hello is running\" on aurora-scheduler",
            "  step \"kill-hello\" on aurora-scheduler",
            "    $ aurora job killall example/www-data/prod/hello",
            "check \"hello has no active task\" on aurora-scheduler",
            "  build on machine devtools",
            "./gradlew distTar",
        ],
    );

    let topology =
        testbed::topology::load(&aurora_topology(), &Default::default()).expect("topology parses");
    let step = |name: &str| {
        topology
            .steps
            .iter()
            .find(|step| step.name == name)
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    let running = &step("create-hello").checks[0];
    let command = running.command.as_ref().expect("command");
    assert!(command
        .run
        .starts_with("aurora job status example/www-data/prod/hello"));
    assert_eq!(command.stdout.as_deref(), Some("status: RUNNING"));
    let killed = &step("kill-hello").checks[0];
    let command = killed.command.as_ref().expect("command");
    assert!(command
        .run
        .starts_with("aurora job status example/www-data/prod/hello"));
    let pattern = command.stdout.as_deref().expect("stdout pattern");
    assert!(pattern.contains(r"Active tasks \(0\)"), "{pattern}");

    // Every artifact a kit or a machine names is an output of the build.
    let build = topology.build.as_ref().expect("[build]");
    let mut wanted: Vec<String> = topology
        .machines
        .iter()
        .flat_map(|machine| machine.artifacts.clone())
        .collect();
    for kit in KITS {
        let kit =
            testbed::kit::Kit::load(kit, topology.dir(), &Default::default()).expect("kit loads");
        wanted.extend(kit.manifest.artifacts.clone());
    }
    for artifact in &wanted {
        assert!(
            build.outputs.contains(artifact),
            "{artifact} is no output of [build]: {:?}",
            build.outputs
        );
    }
    for output in &build.outputs {
        assert!(wanted.contains(output), "nothing uses the output {output}");
    }
}

/// Each kit: a readiness probe on its port, its own unit, templates that
/// say where they come from, and no address of its own.
#[test]
fn kits_probe_their_ports_and_hard_code_no_address() {
    let expected = [
        ("mesos-master", 5050, "/master/health"),
        ("mesos-agent", 5051, "/slave(1)/health"),
        ("thermos-observer", 1338, "/"),
        ("aurora-scheduler", 8081, "/health"),
    ];
    for (name, port, path) in expected {
        let kit =
            testbed::kit::Kit::load(name, &common::repo(), &Default::default()).expect("kit loads");
        let manifest = &kit.manifest;
        assert!(manifest.unit.is_some(), "{name} renders no unit");
        assert!(!manifest.artifacts.is_empty(), "{name} has no artifacts");
        let http = manifest
            .readiness
            .as_ref()
            .and_then(|readiness| readiness.http.as_ref())
            .unwrap_or_else(|| panic!("{name} has no http readiness"));
        assert_eq!((http.port, http.path.as_str()), (port, path), "{name}");

        let dir = common::repo().join("daemons").join(name);
        for entry in std::fs::read_dir(&dir).expect("kit dir").flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(entry.path()).expect("kit file");
            assert!(
                !text.contains("192.168."),
                "daemons/{name}/{file} hard-codes an address"
            );
            if file.ends_with(".tera") {
                let origin = format!("Rendered by testbed from daemons/{name}/{file}");
                assert!(
                    text.starts_with(&format!("# {origin}"))
                        || text.starts_with(&format!("{{#- {origin}")),
                    "daemons/{name}/{file} does not start by saying where it comes from"
                );
            }
        }
    }
}

/// A kit that needs ZooKeeper, in a topology without a zookeeper machine:
/// `plan` fails, naming the kit's template and the reason.
#[test]
fn a_kit_needing_zookeeper_fails_without_one() {
    for (kit, template) in [
        ("mesos-master", "mesos-master.service.tera"),
        ("mesos-agent", "mesos-agent.service.tera"),
        ("aurora-scheduler", "clusters.json.tera"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = dir.path().join("topology.toml");
        std::fs::write(
            &topology,
            format!(
                "name = \"no-zookeeper\"\n\n\
                 [networks.lan]\nsubnet = \"192.168.33.0/24\"\n\n\
                 [machines.lonely]\nip = \"192.168.33.3\"\ndaemons = [\"{kit}\"]\n"
            ),
        )
        .expect("write topology");
        let out = plan(dir.path(), &topology);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "plan of {kit} without zookeeper passed"
        );
        assert_contains_all(
            &format!("the error of {kit} without zookeeper"),
            &stderr,
            &[
                &format!("daemons/{kit}/{template}"),
                &format!("{kit} needs a ZooKeeper"),
                "no machine of topology `no-zookeeper` runs the zookeeper kit",
            ],
        );
    }
}
