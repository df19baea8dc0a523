//! Daemon kits rendered against topologies built in code: the ZooKeeper kit
//! shipped in `daemons/`, and small kits written to a temporary directory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use testbed::kit::{Kit, KitError, RenderedFile};
use testbed::model::{Machine, Network, ProviderKind, Topology};

/// The repository root: its `daemons/` holds the shipped kits.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A machine on network `lan` (when `ip` is given) running `daemons`.
fn machine(name: &str, ip: Option<[u8; 4]>, daemons: &[&str]) -> Machine {
    Machine {
        name: name.into(),
        provider: ProviderKind::Qemu,
        image: "debian-12".into(),
        cpus: 1,
        memory_mib: 768,
        ips: ip
            .map(|ip| ("lan".to_owned(), Ipv4Addr::from(ip)))
            .into_iter()
            .collect(),
        forwards: Vec::new(),
        daemons: daemons.iter().map(|d| d.to_string()).collect(),
        vars: BTreeMap::new(),
        depends_on: Vec::new(),
        packages: vec![],
        artifacts: vec![],
        internet: false,
        host: None,
        provision: Vec::new(),
    }
}

fn topology(dir: &Path, machines: Vec<Machine>) -> Topology {
    let lan = Network {
        name: "lan".into(),
        subnet: "192.168.33.0/24".parse().expect("subnet"),
    };
    Topology {
        name: "kits".into(),
        path: dir.join("topology.toml"),
        networks: BTreeMap::from([("lan".to_owned(), lan)]),
        machines,
        checks: Vec::new(),
        build: None,
        steps: vec![],
        libvirt_uri: None,
        hosts: Default::default(),
    }
}

/// `n` machines zk1…zkn at 192.168.33.11…, all running zookeeper.
fn zookeepers(n: u8) -> Topology {
    let machines = (1..=n)
        .map(|i| {
            machine(
                &format!("zk{i}"),
                Some([192, 168, 33, 10 + i]),
                &["zookeeper"],
            )
        })
        .collect();
    topology(repo(), machines)
}

fn render_zookeeper(topology: &Topology, name: &str) -> Vec<RenderedFile> {
    let kit = Kit::load("zookeeper", repo(), &Default::default()).expect("zookeeper kit loads");
    let machine = topology.machine(name).expect("machine");
    kit.render(topology, machine, &Default::default())
        .expect("zookeeper kit renders")
}

fn file<'a>(files: &'a [RenderedFile], dest: &str) -> &'a str {
    files
        .iter()
        .find(|file| file.dest == dest)
        .map(|file| file.contents.as_str())
        .unwrap_or_else(|| panic!("no rendered file for {dest}"))
}

/// A temporary directory holding `daemons/<kit>/<file>` for each entry.
fn kits(files: &[(&str, &str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (kit, name, text) in files {
        let path: PathBuf = dir.path().join("daemons").join(kit).join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    dir
}

const SIMPLE_MANIFEST: &str = r#"
description = "test kit"
packages = ["hello"]
service = "hello"

[[files]]
template = "conf.tera"
dest = "/etc/hello.conf"
mode = "0600"
owner = "root:hello"
"#;

/// Renders the one-file kit `name` whose template is `template` for the
/// first machine of `machines`.
fn render_simple(template: &str, machines: Vec<Machine>) -> Result<Vec<RenderedFile>, KitError> {
    let dir = kits(&[
        ("simple", "daemon.toml", SIMPLE_MANIFEST),
        ("simple", "conf.tera", template),
    ]);
    let topology = topology(dir.path(), machines);
    let kit = Kit::load("simple", dir.path(), &Default::default())?;
    kit.render(&topology, &topology.machines[0], &Default::default())
}

#[test]
fn zookeeper_alone_renders_a_standalone_config_with_the_whitelist_and_myid_1() {
    let topology = zookeepers(1);
    let files = render_zookeeper(&topology, "zk1");
    let zoo = file(&files, "/etc/zookeeper/conf/zoo.cfg");
    assert!(
        !zoo.contains("server."),
        "standalone has no server lines:\n{zoo}"
    );
    for line in [
        "clientPort=2181",
        "dataDir=/var/lib/zookeeper",
        "4lw.commands.whitelist=stat,ruok,mntr,srvr,conf",
        "admin.enableServer=false",
    ] {
        assert!(zoo.lines().any(|l| l == line), "missing `{line}`:\n{zoo}");
    }
    assert_eq!(file(&files, "/etc/zookeeper/conf/myid"), "1\n");
    for f in &files {
        let mode = if f.dest == "/usr/local/bin/zk-probe" {
            0o755
        } else {
            0o644
        };
        assert_eq!(
            (f.mode, f.owner.as_str()),
            (mode, "root:root"),
            "{}",
            f.dest
        );
    }
    assert!(
        file(&files, "/usr/local/bin/zk-probe").starts_with("#!/usr/bin/python3"),
        "the JVM-free probe is installed"
    );
}

#[test]
fn zookeeper_ensemble_lists_every_server_and_numbers_each_myid() {
    let topology = zookeepers(3);
    let expected = [
        "server.1=192.168.33.11:2888:3888",
        "server.2=192.168.33.12:2888:3888",
        "server.3=192.168.33.13:2888:3888",
    ];
    for (index, name) in ["zk1", "zk2", "zk3"].iter().enumerate() {
        let files = render_zookeeper(&topology, name);
        let zoo = file(&files, "/etc/zookeeper/conf/zoo.cfg");
        let servers: Vec<&str> = zoo.lines().filter(|l| l.starts_with("server.")).collect();
        assert_eq!(servers, expected, "{name}:\n{zoo}");
        let myid = file(&files, "/etc/zookeeper/conf/myid");
        assert_eq!(myid, format!("{}\n", index + 1));
    }
}

#[test]
fn zookeeper_ensemble_member_without_an_ip_is_an_error() {
    let mut topology = zookeepers(2);
    topology.machines[1].ips.clear();
    let kit = Kit::load("zookeeper", repo(), &Default::default()).expect("kit");
    let error = kit
        .render(&topology, &topology.machines[0], &Default::default())
        .expect_err("no IP for zk2");
    let message = error.to_string();
    assert!(message.contains("zoo.cfg.tera"), "{message}");
    assert!(message.contains("`zk2` has no private IP"), "{message}");
}

/// What `$JAVA_OPTS` is after a shell sources `file` (as the init script
/// does), run in `dir`.
fn sourced_java_opts(file: &str, dir: &Path) -> String {
    let path = dir.join("zookeeper.default");
    std::fs::write(&path, file).expect("write");
    let output = std::process::Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(". ./zookeeper.default && printf %s \"$JAVA_OPTS\"")
        .output()
        .expect("sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn zookeeper_jvm_heap_is_small_and_set_by_vars() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut topology = zookeepers(1);
    let files = render_zookeeper(&topology, "zk1");
    let default = file(&files, "/etc/default/zookeeper");
    assert_eq!(
        sourced_java_opts(default, dir.path()),
        "-Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
    );
    topology.machines[0]
        .vars
        .insert("zookeeper_heap".into(), "512m".into());
    let files = render_zookeeper(&topology, "zk1");
    let default = file(&files, "/etc/default/zookeeper");
    assert!(sourced_java_opts(default, dir.path()).contains("-Xmx512m "));
}

#[test]
fn a_hostile_var_stays_text_in_a_shell_sourced_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut topology = zookeepers(1);
    let hostile = "1g\" $(touch dollar) `touch backtick` '; touch quote; '\ntouch newline\n";
    topology.machines[0]
        .vars
        .insert("zookeeper_heap".into(), hostile.into());
    let files = render_zookeeper(&topology, "zk1");
    let opts = sourced_java_opts(file(&files, "/etc/default/zookeeper"), dir.path());
    assert!(opts.contains(hostile), "{opts}");
    for planted in ["dollar", "backtick", "quote", "newline"] {
        assert!(!dir.path().join(planted).exists(), "`touch {planted}` ran");
    }
}

#[test]
fn the_shell_filter_takes_scalars_only() {
    let quoted = render_simple(
        "{{ machine.name | shell }} {{ machine.cpus | shell }}",
        vec![machine("it's", None, &[])],
    )
    .expect("renders");
    assert_eq!(quoted[0].contents, "'it'\\''s' '1'");
    let error = render_simple("{{ machine.ips | shell }}", vec![machine("a", None, &[])])
        .expect_err("an object is no shell word");
    assert!(
        format!("{error:?}").contains("quotes a string, number or boolean"),
        "{error:?}"
    );
}

#[test]
fn zookeeper_manifest_and_readiness_check() {
    let kit = Kit::load("zookeeper", repo(), &Default::default()).expect("kit");
    assert_eq!(kit.manifest.packages, ["zookeeperd"]);
    assert_eq!(kit.manifest.service, "zookeeper");
    assert_eq!(kit.manifest.unit, None);
    let check = kit.readiness_check("zk1").expect("a readiness probe");
    assert_eq!(check.name, "zookeeper ready on zk1");
    assert_eq!(check.machine, "zk1");
    let tcp = check.tcp.expect("tcp probe");
    assert_eq!(tcp.port, 2181);
    assert_eq!(tcp.send.as_deref(), Some("srvr"));
    assert_eq!(
        tcp.expect.as_deref(),
        Some("/Mode: (standalone|leader|follower)/")
    );
    assert_eq!(check.timeout.as_deref(), Some("10m"));
    assert_eq!(check.retry.as_deref(), Some("500ms"));
    assert!(check.http.is_none() && check.command.is_none());
}

#[test]
fn zookeeper_addresses_join_into_a_zk_connection_string() {
    let machines = vec![
        machine("master", Some([192, 168, 33, 7]), &["simple"]),
        machine("zk1", Some([192, 168, 33, 11]), &["zookeeper"]),
        machine("zk2", Some([192, 168, 33, 12]), &["zookeeper"]),
    ];
    let template =
        "--zk=zk://{{ daemons.zookeeper.addresses | join(sep=\":2181,\") }}:2181/mesos\n";
    let files = render_simple(template, machines).expect("renders");
    assert_eq!(
        files[0].contents,
        "--zk=zk://192.168.33.11:2181,192.168.33.12:2181/mesos\n"
    );
    assert_eq!(files[0].dest, "/etc/hello.conf");
    assert_eq!(files[0].mode, 0o600);
    assert_eq!(files[0].owner, "root:hello");
}

#[test]
fn context_describes_machines_vars_and_daemons() {
    let mut first = machine("a", Some([192, 168, 33, 2]), &["simple"]);
    first.vars.insert("greeting".into(), "hi".into());
    let machines = vec![first, machine("b", None, &["other"])];
    let template = "{{ machine.name }} {{ machine.ip }} {{ machine.ips.lan }} \
                    {{ vars.greeting }} {{ machine.vars.greeting }} \
                    {{ topology.name }}:{% for m in topology.machines %}{{ m.name }}={{ m.ip }},{% endfor %} \
                    {{ daemons.simple.index }}/{{ daemons.simple.count }} \
                    {{ daemons.other.index | default(value=\"-\") }}/{{ daemons.other.count }}";
    let files = render_simple(template, machines).expect("renders");
    assert_eq!(
        files[0].contents,
        "a 192.168.33.2 192.168.33.2 hi hi kits:a=192.168.33.2,b=, 1/1 -/1"
    );
}

#[test]
fn undefined_variable_names_the_file_the_line_and_the_variable() {
    let template = "first line\nsecond {{ machine.name }}\nthird {{ nope }}\n";
    let machines = vec![machine("a", Some([192, 168, 33, 2]), &["simple"])];
    let error = render_simple(template, machines).expect_err("undefined");
    let message = error.to_string();
    assert!(
        message.contains("conf.tera:3: variable `nope` is not defined (available: topology, machine, vars, daemons, secrets)"),
        "{message}"
    );
    assert!(
        message.contains("not found in context"),
        "tera's chain: {message}"
    );
    assert!(matches!(error, KitError::Template { line: Some(3), .. }));
}

#[test]
fn a_throw_names_the_line_of_the_throw_that_fired() {
    let template = "a\n{% if false %}{{ throw(message=\"never this one\") }}{% endif %}\n\
                    {{ throw(message=\"needs a zookeeper machine in `\" ~ topology.name ~ \"`\") }}\n";
    let machines = vec![machine("a", None, &["simple"])];
    let error = render_simple(template, machines).expect_err("throws");
    let message = error.to_string();
    assert!(
        message.contains("needs a zookeeper machine in `kits`"),
        "{message}"
    );
    assert!(
        matches!(error, KitError::Template { line: Some(3), .. }),
        "{message}"
    );
}

#[test]
fn undefined_nested_variable_lists_what_exists_there() {
    let template = "# a comment mentioning daemons.zookeepr\n\n{{ daemons.zookeepr.addresses }}\n";
    let machines = vec![
        machine("a", Some([192, 168, 33, 2]), &["simple"]),
        machine("zk", Some([192, 168, 33, 3]), &["zookeeper"]),
    ];
    let message = render_simple(template, machines)
        .expect_err("misspelt kit")
        .to_string();
    assert!(
        message.contains(
            "conf.tera:3: variable `daemons.zookeepr.addresses` is not defined \
             (available in `daemons`: simple, zookeeper)"
        ),
        "{message}"
    );
}

#[test]
fn template_syntax_error_names_the_file_and_line() {
    let template = "ok\n{% if %}\n";
    let machines = vec![machine("a", None, &["simple"])];
    let message = render_simple(template, machines)
        .expect_err("bad syntax")
        .to_string();
    assert!(message.contains("conf.tera:2: syntax error"), "{message}");
}

#[test]
fn unit_template_renders_to_the_systemd_directory() {
    let manifest =
        "description = \"d\"\npackages = []\nservice = \"hello\"\nunit = \"hello.service.tera\"\n";
    let dir = kits(&[
        ("unit", "daemon.toml", manifest),
        (
            "unit",
            "hello.service.tera",
            "[Service]\nExecStart=/bin/hello {{ machine.name }}\n",
        ),
    ]);
    let topology = topology(dir.path(), vec![machine("a", None, &["unit"])]);
    let kit = Kit::load("unit", dir.path(), &Default::default()).expect("kit");
    let files = kit
        .render(&topology, &topology.machines[0], &Default::default())
        .expect("renders");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].dest, "/etc/systemd/system/hello.service");
    assert_eq!(files[0].contents, "[Service]\nExecStart=/bin/hello a\n");
    assert_eq!(files[0].mode, 0o644);
    assert!(kit.readiness_check("a").is_none());
}

#[test]
fn unknown_kit_lists_the_known_ones() {
    let dir = kits(&[
        ("simple", "daemon.toml", SIMPLE_MANIFEST),
        ("simple", "conf.tera", ""),
        ("zookeeper", "daemon.toml", SIMPLE_MANIFEST),
        ("zookeeper", "conf.tera", ""),
    ]);
    let error = Kit::load("zookeepr", dir.path(), &Default::default()).expect_err("unknown");
    let message = error.to_string();
    assert!(
        message.contains("unknown daemon kit `zookeepr`"),
        "{message}"
    );
    assert!(message.contains("did you mean `zookeeper`?"), "{message}");
    // The folder's kits, then the built-ins (zookeeper among them).
    assert!(message.contains("known kits: "), "{message}");
    assert!(message.contains("simple"), "{message}");
    assert!(message.contains("built-in/daemons"), "{message}");
    assert!(Kit::load("../simple", dir.path(), &Default::default()).is_err());
}

#[test]
fn manifest_with_an_unknown_key_names_the_file_and_line() {
    let manifest = format!("colour = \"blue\"\n{SIMPLE_MANIFEST}");
    let dir = kits(&[
        ("simple", "daemon.toml", &manifest),
        ("simple", "conf.tera", ""),
    ]);
    let message = Kit::load("simple", dir.path(), &Default::default())
        .expect_err("unknown key")
        .to_string();
    assert!(message.contains("simple/daemon.toml:1:1: "), "{message}");
    assert!(message.contains("unknown field `colour`"), "{message}");
    assert!(
        message.contains("expected one of `description`"),
        "{message}"
    );
}

#[test]
fn manifest_values_are_checked_at_load() {
    let cases = [
        (
            "mode = \"0600\"",
            "mode = \"rw\"",
            "mode `rw` is not an octal",
        ),
        (
            "template = \"conf.tera\"",
            "template = \"missing.tera\"",
            "template `missing.tera` does not exist",
        ),
        (
            "dest = \"/etc/hello.conf\"",
            "dest = \"etc/hello.conf\"",
            "must be an absolute path",
        ),
        (
            "service = \"hello\"",
            "service = \"hello.service\"",
            "without `.service`",
        ),
    ];
    for (from, to, expected) in cases {
        let manifest = SIMPLE_MANIFEST.replace(from, to);
        let dir = kits(&[
            ("simple", "daemon.toml", &manifest),
            ("simple", "conf.tera", ""),
        ]);
        let message = Kit::load("simple", dir.path(), &Default::default())
            .expect_err(expected)
            .to_string();
        assert!(message.contains("simple/daemon.toml:"), "{message}");
        assert!(message.contains(expected), "{message}");
    }
}
