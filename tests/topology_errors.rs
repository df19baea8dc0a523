//! Topology parsing and validation: every error names `file:line:col` and
//! says what would be valid.
//!
//! Library-level tests call `testbed::topology::{parse, load}` directly; the
//! CLI tests at the end run `testbed plan FILE`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use testbed::model::{self, Forward, ProviderKind, Topology};
use testbed::settings::Search;
use testbed::topology::{self, TopologyError};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A temporary directory with `images/<recipe>.toml` for each recipe, so
/// `image::recipe_names` finds them beside the topology.
fn dir_with_recipes(recipes: &[&str]) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("images")).expect("mkdir images");
    for recipe in recipes {
        let file = dir.path().join("images").join(format!("{recipe}.toml"));
        std::fs::write(file, "suite = \"bookworm\"\n").expect("write recipe");
    }
    dir
}

/// The usual fixture: `images/debian-12.toml` and `images/debian-13.toml`.
fn fixture() -> TempDir {
    dir_with_recipes(&["debian-12", "debian-13"])
}

fn parse_in(dir: &TempDir, text: &str) -> (PathBuf, Result<Topology, TopologyError>) {
    let path = dir.path().join("cluster.toml");
    let result = topology::parse(&path, text, &Search::default());
    (path, result)
}

fn parse_ok(text: &str) -> Topology {
    parse_ok_in(&fixture(), text)
}

fn parse_ok_in(dir: &TempDir, text: &str) -> Topology {
    let (_, result) = parse_in(dir, text);
    result.unwrap_or_else(|error| panic!("expected a valid topology, got:\n{error}"))
}

/// The usual fixture plus the kits `daemons/zookeeper/` and
/// `daemons/mesos-master/`.
fn kit_fixture() -> TempDir {
    let dir = fixture();
    for kit in ["zookeeper", "mesos-master"] {
        let kit_dir = dir.path().join("daemons").join(kit);
        std::fs::create_dir_all(&kit_dir).expect("mkdir kit");
        std::fs::write(kit_dir.join("daemon.toml"), "# kit\n").expect("write kit");
    }
    dir
}

/// Like [`assert_error_at`], with the kits of [`kit_fixture`] available.
fn assert_kit_error_at(text: &str, line: usize, col: usize, phrases: &[&str]) {
    assert_error_in(&kit_fixture(), text, line, col, phrases);
}

/// Asserts `text` is rejected at `line:col` with a message containing every
/// phrase (the `help:` line included).
fn assert_error_at(text: &str, line: usize, col: usize, phrases: &[&str]) {
    let dir = fixture();
    assert_error_in(&dir, text, line, col, phrases);
}

fn assert_error_in(dir: &TempDir, text: &str, line: usize, col: usize, phrases: &[&str]) {
    let (path, result) = parse_in(dir, text);
    let error = match result {
        Ok(topology) => panic!("expected an error, got {topology:#?}"),
        Err(error) => error,
    };
    assert_message(&error.to_string(), &path, line, col, phrases);
    assert_eq!(error.position(), Some((line, col)));
}

fn assert_message(message: &str, path: &Path, line: usize, col: usize, phrases: &[&str]) {
    let prefix = format!("{}:{line}:{col}: error: ", path.display());
    assert!(
        message.starts_with(&prefix),
        "expected prefix {prefix:?}, got:\n{message}"
    );
    for phrase in phrases {
        assert!(
            message.contains(phrase),
            "expected {phrase:?} in:\n{message}"
        );
    }
}

// ---------------------------------------------------------------------------
// Valid topologies
// ---------------------------------------------------------------------------

const PAIR: &str = r#"name = "pair"
[defaults]
provider = "qemu"
image = "debian-12"
cpus = 1
memory = "768MiB"
[networks.lan]
subnet = "192.168.33.0/24"
[machines.zeta]
ip = "192.168.33.2"
[machines.beta]
ip = "192.168.33.3"
memory = "1GiB"
cpus = 2
image = "debian-13"
forward = [{ guest = 2181, host = 12181 }, { guest = 22, host = 2222 }]
[machines.alpha]
provider = "libvirt"
"#;

#[test]
fn valid_topology_applies_defaults_and_keeps_file_order() {
    let topology = parse_ok(PAIR);
    assert_eq!(topology.name, "pair");
    let names: Vec<&str> = topology.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["zeta", "beta", "alpha"]);

    let lan = &topology.networks["lan"];
    assert_eq!(lan.name, "lan");
    assert_eq!(lan.subnet, "192.168.33.0/24".parse().expect("cidr"));

    let zeta = topology.machine("zeta").expect("zeta");
    assert_eq!(zeta.provider, ProviderKind::Qemu);
    assert_eq!(zeta.image, "debian-12");
    assert_eq!(zeta.cpus, 1);
    assert_eq!(zeta.memory_mib, 768);
    assert_eq!(zeta.ips["lan"], Ipv4Addr::new(192, 168, 33, 2));
    assert!(zeta.forwards.is_empty());

    let beta = topology.machine("beta").expect("beta");
    assert_eq!(beta.provider, ProviderKind::Qemu);
    assert_eq!(beta.image, "debian-13");
    assert_eq!(beta.cpus, 2);
    assert_eq!(beta.memory_mib, 1024);
    assert_eq!(
        beta.forwards,
        [
            Forward {
                guest: 2181,
                host: 12181
            },
            Forward {
                guest: 22,
                host: 2222
            }
        ]
    );

    let alpha = topology.machine("alpha").expect("alpha");
    assert!(alpha.ips.is_empty(), "a machine may stay off the network");
    assert_eq!(
        alpha.provider,
        ProviderKind::Libvirt,
        "off the network: any provider"
    );
}

#[test]
fn machines_on_one_network_share_a_provider() {
    let text = PAIR.replace(
        "image = \"debian-13\"",
        "image = \"debian-13\"\nprovider = \"libvirt\"",
    );
    assert_error_at(
        &text,
        11,
        11,
        &[
            "machine `beta` runs on libvirt but shares network `lan` with `zeta` on qemu",
            "one provider",
        ],
    );
}

#[test]
fn built_in_defaults_apply_without_defaults_table() {
    let topology = parse_ok("name = \"solo\"\n[machines.one]\n");
    let one = &topology.machines[0];
    assert_eq!(one.provider, ProviderKind::Qemu);
    assert_eq!(one.image, "debian-12");
    assert_eq!(one.cpus, 1);
    assert_eq!(one.memory_mib, 768);
    assert!(one.ips.is_empty());
    assert!(topology.networks.is_empty());
}

#[test]
fn several_networks_use_ips_and_inline_machines_keep_order() {
    let topology = parse_ok(
        r#"name = "two-nets"
networks = { front = { subnet = "10.10.0.0/16" }, back = { subnet = "172.16.5.0/24" } }
machines = { web = { ips = { front = "10.10.0.5", back = "172.16.5.5" } }, db = { ips = { back = "172.16.5.6" }, memory = 2048 } }
"#,
    );
    let names: Vec<&str> = topology.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["web", "db"]);
    let web = topology.machine("web").expect("web");
    assert_eq!(web.ips["front"], Ipv4Addr::new(10, 10, 0, 5));
    assert_eq!(web.ips["back"], Ipv4Addr::new(172, 16, 5, 5));
    let db = topology.machine("db").expect("db");
    assert_eq!(db.ips.len(), 1);
    assert_eq!(db.memory_mib, 2048);
}

#[test]
fn load_reads_the_file_and_canonicalises_its_path() {
    let dir = fixture();
    let path = dir.path().join("pair.toml");
    std::fs::write(&path, PAIR).expect("write");
    let topology = topology::load(&path, &Search::default()).expect("valid");
    let canonical = std::fs::canonicalize(&path).expect("canonicalize");
    assert_eq!(topology.path, canonical);
    assert_eq!(topology.dir(), canonical.parent().expect("parent"));
}

#[test]
fn forwards_as_array_of_tables_are_accepted() {
    let topology =
        parse_ok("name = \"t\"\n[machines.a]\n[[machines.a.forward]]\nguest = 80\nhost = 8080\n");
    assert_eq!(
        topology.machines[0].forwards,
        [Forward {
            guest: 80,
            host: 8080
        }]
    );
}

#[test]
fn shipped_topologies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("topologies/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            if let Err(error) = topology::load(&path, &Search::default()) {
                panic!("{error}");
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no topologies in {}", dir.display());
}

// ---------------------------------------------------------------------------
// Helpers exposed by the module
// ---------------------------------------------------------------------------

#[test]
fn line_col_is_one_based_and_counts_characters() {
    let text = "ab\ncé d\n";
    assert_eq!(model::line_col(text, 0), (1, 1));
    assert_eq!(model::line_col(text, 1), (1, 2));
    assert_eq!(model::line_col(text, 3), (2, 1));
    // `é` is two bytes; `d` is the fourth character of line 2.
    assert_eq!(model::line_col(text, 7), (2, 4));
    // Inside a character: clamped to its start.
    assert_eq!(model::line_col(text, 5), (2, 2));
    // Past the end: clamped to the end.
    assert_eq!(model::line_col(text, 1000), (3, 1));
}

#[test]
fn memory_sizes_parse_to_mib() {
    for (text, mib) in [
        ("768MiB", 768),
        ("1GiB", 1024),
        ("2G", 2048),
        ("512M", 512),
        ("1024", 1024),
        ("1 GiB", 1024),
        ("4g", 4096),
        ("1TiB", 1024 * 1024),
    ] {
        assert_eq!(topology::parse_memory_mib(text), Ok(mib), "{text}");
    }
    for (text, phrase) in [
        ("0", "cannot be zero"),
        ("0GiB", "cannot be zero"),
        ("64MiB", "minimum is 128 MiB"),
        ("512MB", "did you mean `MiB`?"),
        ("1.5G", "whole number"),
        ("3 parsecs", "unknown unit `parsecs`"),
        ("lots", "is not a size"),
        ("", "is not a size"),
        ("99999999999999999999G", "too large"),
    ] {
        let error = topology::parse_memory_mib(text).expect_err(text);
        assert!(error.contains(phrase), "{text}: {error}");
    }
}

#[test]
fn names_follow_hostname_rules() {
    for name in [
        "a",
        "alpha",
        "mesos-master",
        "node1",
        "1node",
        &"a".repeat(63),
    ] {
        assert!(topology::is_valid_name(name), "{name}");
    }
    for name in ["", "-a", "a-", "Alpha", "a_b", "a.b", "é", &"a".repeat(64)] {
        assert!(!topology::is_valid_name(name), "{name}");
    }
}

// ---------------------------------------------------------------------------
// 1. Unknown keys, with did-you-mean and the valid keys
// ---------------------------------------------------------------------------

#[test]
fn unknown_top_level_key_suggests_name() {
    assert_error_at(
        "nmae = \"x\"\n[machines.a]\n",
        1,
        1,
        &[
            "unknown key `nmae` at the top level; did you mean `name`?",
            "\n  help: valid keys at the top level: name, defaults, networks, machines",
        ],
    );
}

#[test]
fn unknown_key_in_defaults() {
    assert_error_at(
        "name = \"x\"\n[defaults]\nmemroy = \"1G\"\n[machines.a]\n",
        3,
        1,
        &[
            "unknown key `memroy` in [defaults]; did you mean `memory`?",
            "help: valid keys in [defaults]: provider, image, cpus, memory",
        ],
    );
}

#[test]
fn unknown_key_in_network() {
    assert_error_at(
        "name = \"x\"\n[networks.lan]\nsubnett = \"10.1.0.0/24\"\n[machines.a]\n",
        3,
        1,
        &[
            "unknown key `subnett` in [networks.lan]; did you mean `subnet`?",
            "help: valid keys in [networks.lan]: subnet",
        ],
    );
}

#[test]
fn unknown_key_in_machine() {
    assert_error_at(
        "name = \"x\"\n[machines.alpha]\ncpus = 2\n  imag = \"debian-12\"\n",
        4,
        3,
        &[
            "unknown key `imag` in [machines.alpha]; did you mean `image`?",
            "help: valid keys in [machines.alpha]: ip, ips, provider, image, cpus, memory, forward",
        ],
    );
}

#[test]
fn unknown_key_in_forward_entry() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 1, hots = 2000 }]\n",
        3,
        25,
        &[
            "unknown key `hots` in a `forward` entry; did you mean `host`?",
            "help: valid keys in a `forward` entry: guest, host",
        ],
    );
}

#[test]
fn unknown_key_without_close_match_still_lists_valid_keys() {
    let dir = fixture();
    let (_, result) = parse_in(&dir, "name = \"x\"\ncolour = \"red\"\n[machines.a]\n");
    let message = result.expect_err("unknown key").to_string();
    assert!(
        message.contains("unknown key `colour` at the top level"),
        "{message}"
    );
    assert!(!message.contains("did you mean"), "{message}");
    assert!(
        message.contains("help: valid keys at the top level: name"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------
// 2. Machine names (and 10. the topology name)
// ---------------------------------------------------------------------------

#[test]
fn machine_name_with_uppercase_and_underscore() {
    assert_error_at(
        "name = \"x\"\n[machines.Mesos_Master]\n",
        2,
        11,
        &[
            "invalid machine name `Mesos_Master`; did you mean `mesos-master`?",
            "help: names become hostnames: 1 to 63 lowercase letters (a-z), digits and hyphens, \
             not starting or ending with a hyphen",
        ],
    );
}

#[test]
fn machine_name_starting_with_hyphen() {
    assert_error_at(
        "name = \"x\"\n[machines.-alpha]\n",
        2,
        11,
        &[
            "invalid machine name `-alpha`",
            "not starting or ending with a hyphen",
        ],
    );
}

#[test]
fn machine_name_longer_than_63() {
    let long = "a".repeat(64);
    assert_error_at(
        &format!("name = \"x\"\n[machines.{long}]\n"),
        2,
        11,
        &["invalid machine name", "1 to 63 lowercase letters"],
    );
}

#[test]
fn topology_name_must_be_a_valid_name() {
    assert_error_at(
        "name = \"My Cluster\"\n[machines.a]\n",
        1,
        8,
        &[
            "invalid topology name `My Cluster`; did you mean `my-cluster`?",
            "directory and socket names",
            "lowercase letters",
        ],
    );
}

#[test]
fn topology_name_is_required() {
    assert_error_at(
        "[machines.a]\n",
        1,
        1,
        &["missing `name`", "help: add `name = \"my-cluster\"`"],
    );
}

#[test]
fn topology_name_must_be_a_string() {
    assert_error_at(
        "name = 5\n[machines.a]\n",
        1,
        8,
        &[
            "`name` must be a string, not an integer",
            "help: for example `name = \"my-cluster\"`",
        ],
    );
}

#[test]
fn machines_are_required() {
    assert_error_at(
        "name = \"x\"\n",
        1,
        1,
        &[
            "no machines",
            "help: add a machine, e.g. `[machines.alpha]`",
        ],
    );
}

#[test]
fn machines_table_must_not_be_empty() {
    assert_error_at(
        "name = \"x\"\n\n[machines]\n",
        3,
        2,
        &["`machines` is empty", "at least one machine"],
    );
}

// ---------------------------------------------------------------------------
// 3. Addresses
// ---------------------------------------------------------------------------

const LAN: &str = "name = \"x\"\n[networks.lan]\nsubnet = \"192.168.33.0/24\"\n";

#[test]
fn ip_outside_the_subnet() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nip = \"192.168.34.2\"\n"),
        5,
        6,
        &[
            "192.168.34.2 is outside network `lan` (192.168.33.0/24)",
            "help: use an address from 192.168.33.1 to 192.168.33.254",
        ],
    );
}

#[test]
fn ip_used_twice_names_both_machines() {
    assert_error_at(
        &format!(
            "{LAN}[machines.alpha]\nip = \"192.168.33.2\"\n[machines.beta]\nip = \"192.168.33.2\"\n"
        ),
        7,
        6,
        &[
            "192.168.33.2 is used twice: by machine `alpha` (line 5) and machine `beta`",
            "help: give each machine its own address",
        ],
    );
}

#[test]
fn ip_is_the_network_address() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nip = \"192.168.33.0\"\n"),
        5,
        6,
        &["192.168.33.0 is the network address of network `lan`"],
    );
}

#[test]
fn ip_is_the_broadcast_address() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nip = \"192.168.33.255\"\n"),
        5,
        6,
        &[
            "192.168.33.255 is the broadcast address of network `lan`",
            "192.168.33.1 to 192.168.33.254",
        ],
    );
}

#[test]
fn ip_is_not_an_address() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nip = \"192.168.33\"\n"),
        5,
        6,
        &[
            "`192.168.33` is not an IPv4 address",
            "for example `ip = \"192.168.33.2\"`",
        ],
    );
}

#[test]
fn ip_with_several_networks_must_use_ips() {
    assert_error_at(
        "name = \"x\"\n[networks.front]\nsubnet = \"10.1.0.0/24\"\n[networks.back]\nsubnet = \"10.2.0.0/24\"\n[machines.a]\nip = \"10.1.0.5\"\n",
        7,
        1,
        &[
            "`ip` is ambiguous: this topology has 2 networks (front, back)",
            "help: name the network of each address: `ips = { front = \"…\", back = \"…\" }`",
        ],
    );
}

#[test]
fn ips_naming_an_unknown_network() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nips = {{ lna = \"192.168.33.2\" }}\n"),
        5,
        9,
        &[
            "unknown network `lna` in `ips`; did you mean `lan`?",
            "help: networks defined here: lan",
        ],
    );
}

#[test]
fn ip_without_any_network() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nip = \"192.168.33.2\"\n",
        3,
        1,
        &[
            "machine `a` has an `ip` but the topology defines no networks",
            "help: add a network, e.g. `[networks.lan]`",
        ],
    );
}

#[test]
fn ip_and_ips_together() {
    assert_error_at(
        &format!("{LAN}[machines.a]\nip = \"192.168.33.2\"\nips = {{ lan = \"192.168.33.3\" }}\n"),
        6,
        1,
        &["machine `a` sets both `ip` and `ips`"],
    );
}

// ---------------------------------------------------------------------------
// 4. Images
// ---------------------------------------------------------------------------

#[test]
fn unknown_image_lists_recipes() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nimage = \"debain-12\"\n",
        3,
        9,
        &[
            "unknown image `debain-12`; did you mean `debian-12`?",
            "help: available images (built in, or images/<name>.toml beside the topology or \
             above it): debian-12, debian-13",
        ],
    );
}

#[test]
fn unknown_image_in_defaults() {
    assert_error_at(
        "name = \"x\"\n[defaults]\nimage = \"centos\"\n[machines.a]\n",
        3,
        9,
        &["unknown image `centos`", "debian-12, debian-13"],
    );
}

#[test]
fn the_default_image_is_built_in_when_the_folder_has_no_recipe_for_it() {
    let dir = dir_with_recipes(&["alpine"]);
    let topology = parse_ok_in(&dir, "name = \"x\"\n[machines.alpha]\n");
    assert_eq!(topology.machines[0].image, "debian-12");
    let other = parse_ok_in(&dir, "name = \"x\"\n[machines.alpha]\nimage = \"alpine\"\n");
    assert_eq!(other.machines[0].image, "alpine", "the folder's own recipe");
}

// ---------------------------------------------------------------------------
// 5. Providers
// ---------------------------------------------------------------------------

#[test]
fn unknown_provider_lists_the_valid_ones() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nprovider = \"qmeu\"\n",
        3,
        12,
        &[
            "unknown provider `qmeu`; did you mean `qemu`?",
            "help: valid providers: qemu, libvirt, virtualbox",
        ],
    );
}

#[test]
fn unknown_provider_in_defaults() {
    assert_error_at(
        "name = \"x\"\n[defaults]\nprovider = \"docker\"\n[machines.a]\n",
        3,
        12,
        &["unknown provider `docker`", "qemu, libvirt, virtualbox"],
    );
}

/// Two libvirt hosts, the machines placed on them.
const TWO_HOSTS: &str = r#"name = "x"
[defaults]
provider = "libvirt"
host = "rack-a"
[hosts.rack-a]
uri = "qemu+ssh://root@10.77.0.2/system"
[hosts.rack-b]
uri = "qemu+ssh://root@10.77.0.3/system?keyfile=/k"
[machines.zk-1]
[machines.zk-3]
host = "rack-b"
"#;

#[test]
fn machines_go_on_their_host_else_the_defaults_one() {
    let topology = parse_ok(TWO_HOSTS);
    let host = |name: &str| topology.machine(name).and_then(|m| m.host.clone());
    assert_eq!(host("zk-1").as_deref(), Some("rack-a"));
    assert_eq!(host("zk-3").as_deref(), Some("rack-b"));
    assert_eq!(
        topology.hosts["rack-b"].uri,
        "qemu+ssh://root@10.77.0.3/system?keyfile=/k"
    );
    // Without `host` anywhere: the topology's own libvirt.
    let local = parse_ok("name = \"x\"\n[machines.a]\nprovider = \"libvirt\"\n");
    assert_eq!(local.machines[0].host, None);
    // [defaults] host places libvirt machines only.
    let mixed = parse_ok(&format!("{TWO_HOSTS}[machines.q]\nprovider = \"qemu\"\n"));
    assert_eq!(mixed.machine("q").and_then(|m| m.host.clone()), None);
}

#[test]
fn an_unknown_host_is_located_and_the_known_ones_listed() {
    let text = TWO_HOSTS.replace("host = \"rack-b\"", "host = \"rack-c\"");
    assert_error_at(
        &text,
        11,
        8,
        &[
            "unknown host `rack-c`; did you mean `rack-a`?",
            "help: hosts in this topology: rack-a, rack-b",
        ],
    );
    assert_error_at(
        "name = \"x\"\n[defaults]\nhost = \"rack-a\"\n[machines.a]\n",
        3,
        8,
        &["unknown host `rack-a`", "help: declare it: `[hosts.NAME]`"],
    );
}

#[test]
fn a_qemu_machine_given_a_host_is_refused() {
    let text = format!("{TWO_HOSTS}[machines.q]\nprovider = \"qemu\"\nhost = \"rack-a\"\n");
    assert_error_at(
        &text,
        14,
        8,
        &[
            "machine `q` runs on qemu, which has no hosts: `host` places libvirt machines",
            "help: set `provider = \"libvirt\"` on it, or remove `host`",
        ],
    );
}

#[test]
fn a_host_uri_libvirt_cannot_take_is_located() {
    for (uri, why) in [
        ("10.77.0.2", "it has no `://`"),
        (
            "http://10.77.0.2/system",
            "the scheme must be `qemu` or `qemu+TRANSPORT`",
        ),
        (
            "qemu+shh://root@10.77.0.2/system",
            "unknown transport `shh`",
        ),
        ("qemu+ssh://root@10.77.0.2", "it has no path"),
        (
            "qemu+ssh://root@10.77.0.2/sytem",
            "its path must be `/system` or `/session`",
        ),
    ] {
        let text = format!("name = \"x\"\n[hosts.rack-a]\nuri = \"{uri}\"\n[machines.a]\n");
        assert_error_at(
            &text,
            3,
            7,
            &[
                &format!("`{uri}` is not a libvirt URI: {why}"),
                "help: a libvirt URI looks like",
            ],
        );
    }
    assert_error_at(
        "name = \"x\"\n[hosts.rack-a]\nurl = \"qemu:///system\"\n[machines.a]\n",
        3,
        1,
        &["unknown key `url` in [hosts.rack-a]; did you mean `uri`?"],
    );
    assert_error_at(
        "name = \"x\"\n[hosts.rack-a]\n[machines.a]\n",
        2,
        8,
        &["[hosts.rack-a] has no `uri`"],
    );
    assert_error_at(
        "name = \"x\"\n[hosts.Rack_A]\nuri = \"qemu:///system\"\n[machines.a]\n",
        2,
        8,
        &["invalid host name `Rack_A`"],
    );
}

// ---------------------------------------------------------------------------
// 6. Sizes
// ---------------------------------------------------------------------------

const MEMORY_HELP: &str =
    "help: write memory as `768MiB`, `512M`, `1GiB`, `2G`, or a plain number of MiB";

#[test]
fn memory_zero() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nmemory = \"0M\"\n",
        3,
        10,
        &["memory cannot be zero", MEMORY_HELP],
    );
}

#[test]
fn memory_unknown_unit() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nmemory = \"2 bananas\"\n",
        3,
        10,
        &["memory `2 bananas`: unknown unit `bananas`", MEMORY_HELP],
    );
}

#[test]
fn memory_garbage() {
    assert_error_at(
        "name = \"x\"\n[defaults]\nmemory = \"lots\"\n[machines.a]\n",
        3,
        10,
        &["memory `lots` is not a size", MEMORY_HELP],
    );
}

#[test]
fn memory_below_minimum() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nmemory = 64\n",
        3,
        10,
        &["64 MiB of memory is too little; the minimum is 128 MiB"],
    );
}

#[test]
fn memory_wrong_type() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nmemory = true\n",
        3,
        10,
        &[
            "`memory` must be a size such as \"1GiB\", not a boolean",
            MEMORY_HELP,
        ],
    );
}

#[test]
fn cpus_zero() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ncpus = 0\n",
        3,
        8,
        &[
            "`cpus` = 0 is out of range",
            "help: `cpus` must be from 1 to 64",
        ],
    );
}

#[test]
fn cpus_too_many() {
    assert_error_at(
        "name = \"x\"\n[defaults]\ncpus = 65\n[machines.a]\n",
        3,
        8,
        &["`cpus` = 65 is out of range", "from 1 to 64"],
    );
}

#[test]
fn cpus_as_string() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ncpus = \"2\"\n",
        3,
        8,
        &[
            "`cpus` must be an integer, not a string",
            "help: for example `cpus = 2`",
        ],
    );
}

// ---------------------------------------------------------------------------
// 7. Forwarded ports
// ---------------------------------------------------------------------------

#[test]
fn host_port_forwarded_twice_names_both_machines() {
    assert_error_at(
        "name = \"x\"\n[machines.zk]\nforward = [{ guest = 2181, host = 12181 }]\n[machines.web]\nforward = [{ guest = 80, host = 12181 }]\n",
        5,
        33,
        &[
            "host port 12181 is forwarded twice: by machine `zk` (line 3) and machine `web`",
            "help: each forward needs its own host port on 127.0.0.1",
        ],
    );
}

#[test]
fn host_port_zero() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 80, host = 0 }]\n",
        3,
        33,
        &[
            "host port 0 is not a port",
            "bound on 127.0.0.1",
            "use 1024 to 65535",
        ],
    );
}

#[test]
fn host_port_privileged() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 80, host = 80 }]\n",
        3,
        33,
        &[
            "host port 80 is privileged (below 1024): testbed runs unprivileged and binds forwards on 127.0.0.1",
            "help: use a host port from 1024 to 65535, e.g. 10080",
        ],
    );
}

#[test]
fn guest_port_zero() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 0, host = 8080 }]\n",
        3,
        22,
        &[
            "guest port 0 is not a port",
            "help: a TCP port is from 1 to 65535",
        ],
    );
}

#[test]
fn port_above_65535() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 70000, host = 8080 }]\n",
        3,
        22,
        &["guest port 70000 is not a port"],
    );
}

#[test]
fn forward_entry_missing_host() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [{ guest = 80 }]\n",
        3,
        12,
        &[
            "this `forward` entry has no `host` port",
            "e.g. `{ guest = 2181, host = 12181 }`",
        ],
    );
}

#[test]
fn forward_must_be_an_array() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = { guest = 80, host = 8080 }\n",
        3,
        11,
        &[
            "`forward` must be an array of tables, not a table",
            "help: for example `forward = [{ guest = 2181, host = 12181 }]`",
        ],
    );
}

#[test]
fn forward_entry_must_be_a_table() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nforward = [2181]\n",
        3,
        12,
        &[
            "each `forward` entry must be a table, not an integer",
            "help: for example `forward = [{ guest = 2181, host = 12181 }]`",
        ],
    );
}

#[test]
fn defaults_must_be_a_table() {
    assert_error_at(
        "name = \"x\"\ndefaults = 5\n[machines.a]\n",
        2,
        12,
        &[
            "`defaults` must be a table, not an integer",
            "help: for example `defaults = { cpus = 2 }`",
        ],
    );
}

// ---------------------------------------------------------------------------
// 8. Subnets
// ---------------------------------------------------------------------------

const SUBNET_HELP: &str = "help: write a private IPv4 range as ADDRESS/PREFIX";

fn subnet_error(subnet: &str, phrases: &[&str]) {
    let text = format!("name = \"x\"\n[networks.lan]\nsubnet = \"{subnet}\"\n[machines.a]\n");
    assert_error_at(&text, 3, 10, phrases);
}

#[test]
fn subnet_not_private() {
    subnet_error(
        "8.8.8.0/24",
        &[
            "subnet `8.8.8.0/24` is not a private range",
            "inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16",
        ],
    );
}

#[test]
fn subnet_not_cidr() {
    subnet_error(
        "192.168.33.0/99",
        &[
            "`192.168.33.0/99` is not an IPv4 subnet in CIDR notation",
            SUBNET_HELP,
        ],
    );
}

#[test]
fn subnet_without_prefix() {
    subnet_error(
        "192.168.33.0",
        &["subnet `192.168.33.0` has no prefix length; did you mean `192.168.33.0/24`?"],
    );
}

#[test]
fn subnet_prefix_too_long() {
    subnet_error(
        "192.168.33.0/31",
        &[
            "prefix /31 is outside /8 to /30",
            "with a prefix from /8 to /30",
        ],
    );
}

#[test]
fn subnet_prefix_too_short() {
    subnet_error("10.0.0.0/7", &["prefix /7 is outside /8 to /30"]);
}

#[test]
fn subnet_with_host_bits() {
    subnet_error(
        "192.168.33.5/24",
        &["subnet `192.168.33.5/24` has host bits set; did you mean `192.168.33.0/24`?"],
    );
}

#[test]
fn subnet_overlapping_qemu_user_network() {
    subnet_error(
        "10.0.0.0/16",
        &[
            "subnet 10.0.0.0/16 of network `lan` overlaps 10.0.2.0/24, which qemu's user-mode network uses",
            "help: pick a range that avoids 10.0.2.0/24",
        ],
    );
}

#[test]
fn subnets_overlapping_each_other() {
    assert_error_at(
        "name = \"x\"\n[networks.a]\nsubnet = \"192.168.33.0/24\"\n[networks.b]\nsubnet = \"192.168.0.0/16\"\n[machines.m]\n",
        5,
        10,
        &[
            "subnet 192.168.0.0/16 of network `b` overlaps 192.168.33.0/24 of network `a` (line 3)",
            "help: each network needs its own range",
        ],
    );
}

#[test]
fn network_without_subnet() {
    assert_error_at(
        "name = \"x\"\n[networks.lan]\n[machines.a]\n",
        2,
        11,
        &["network `lan` has no `subnet`", SUBNET_HELP],
    );
}

// ---------------------------------------------------------------------------
// 9. Empty, binary and malformed files
// ---------------------------------------------------------------------------

#[test]
fn empty_file() {
    let dir = fixture();
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").expect("write");
    let message = topology::load(&path, &Search::default())
        .expect_err("empty")
        .to_string();
    assert!(
        message.starts_with(&format!("{}: error: the file is empty", path.display())),
        "{message}"
    );
    assert!(
        message.contains("help: a topology needs at least `name"),
        "{message}"
    );
}

#[test]
fn whitespace_only_file_is_empty() {
    let dir = fixture();
    let (path, result) = parse_in(&dir, "  \n\n\t\n");
    let error = result.expect_err("empty");
    assert_eq!(error.position(), None);
    assert!(error
        .to_string()
        .starts_with(&format!("{}: error: the file is empty", path.display())));
}

#[test]
fn binary_file_is_not_utf8() {
    let dir = fixture();
    let path = dir.path().join("image.toml");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR").expect("write");
    let message = topology::load(&path, &Search::default())
        .expect_err("binary")
        .to_string();
    assert_message(
        &message,
        &path,
        1,
        1,
        &[
            "the file is not UTF-8 text (binary?)",
            "help: a topology is a UTF-8 TOML text file",
        ],
    );
}

#[test]
fn invalid_utf8_is_located() {
    let dir = fixture();
    let path = dir.path().join("latin1.toml");
    std::fs::write(&path, b"name = \"x\"\n# caf\xe9\n").expect("write");
    let message = topology::load(&path, &Search::default())
        .expect_err("latin-1")
        .to_string();
    assert_message(&message, &path, 2, 6, &["not UTF-8 text"]);
}

#[test]
fn nul_byte_in_loaded_file() {
    let dir = fixture();
    let path = dir.path().join("nul.toml");
    std::fs::write(&path, b"name = \"x\"\nab\x00cd\n").expect("write");
    let message = topology::load(&path, &Search::default())
        .expect_err("nul")
        .to_string();
    assert_message(
        &message,
        &path,
        2,
        3,
        &["the file contains a NUL byte (binary?)"],
    );
}

#[test]
fn nul_byte_in_parsed_text() {
    assert_error_at("name = \"x\"\n\0\n", 2, 1, &["NUL byte"]);
}

#[test]
fn toml_syntax_error_is_located() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ncpus = \n",
        3,
        8,
        &[
            "invalid TOML: string values must be quoted",
            "help: see https://toml.io",
        ],
    );
}

#[test]
fn unclosed_table_header() {
    assert_error_at("name = \"x\"\n[machines.a\n", 2, 12, &["invalid TOML"]);
}

#[test]
fn duplicate_key_is_located() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ncpus = 1\ncpus = 2\n",
        4,
        1,
        &[
            "invalid TOML: duplicate key",
            "help: each key may appear only once",
        ],
    );
}

#[test]
fn duplicate_machine_table_is_located() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\n[machines.a]\n",
        3,
        11,
        &["duplicate key"],
    );
}

#[test]
fn unreadable_file() {
    let dir = fixture();
    let path = dir.path().join("missing.toml");
    let error = topology::load(&path, &Search::default()).expect_err("missing");
    assert!(matches!(error, TopologyError::Io { .. }));
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("cannot read {}: ", path.display())),
        "{message}"
    );
}

#[test]
fn message_uses_the_path_as_given() {
    let error = topology::parse(
        Path::new("topologies/typo.toml"),
        "nmae = \"x\"\n",
        &Search::default(),
    )
    .expect_err("unknown key");
    assert!(
        error
            .to_string()
            .starts_with("topologies/typo.toml:1:1: error: "),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// CLI: `testbed plan FILE` reports the same errors and never panics.
// (Needs the `plan` subcommand.)
// ---------------------------------------------------------------------------

mod cli {
    use assert_cmd::Command;
    use predicates::prelude::*;

    use super::fixture;

    fn plan_fails_with(file: &str, contents: &[u8], expected: &str) {
        let dir = fixture();
        let path = dir.path().join(file);
        std::fs::write(&path, contents).expect("write");
        let expected = expected.replace("FILE", &path.display().to_string());
        Command::cargo_bin("testbed")
            .expect("testbed binary")
            .args(["plan", path.to_str().expect("utf-8 path")])
            .assert()
            .failure()
            .stderr(predicate::str::contains(expected))
            .stderr(predicate::str::contains("panicked").not());
    }

    #[test]
    fn plan_empty_file() {
        plan_fails_with("empty.toml", b"", "FILE: error: the file is empty");
    }

    #[test]
    fn plan_binary_file() {
        plan_fails_with(
            "binary.toml",
            b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe",
            "FILE:1:8: error: the file contains a NUL byte",
        );
    }

    #[test]
    fn plan_unknown_key() {
        plan_fails_with(
            "typo.toml",
            b"name = \"x\"\n[machines.a]\nmemroy = \"1G\"\n",
            "FILE:3:1: error: unknown key `memroy` in [machines.a]; did you mean `memory`?",
        );
    }
}

// ---------------------------------------------------------------------------
// 11. Daemons, vars and depends_on
// ---------------------------------------------------------------------------

const CLUSTER: &str = r#"name = "mesos"
[networks.lan]
subnet = "192.168.33.0/24"
[machines.zk-1]
ip = "192.168.33.11"
daemons = ["zookeeper"]
vars = { myid = 1, role = "leader", weight = 0.5, on = true, peers = [1, 2], nested = { a = "b" }, since = 1979-05-27 }
[machines.master]
ip = "192.168.33.20"
daemons = ["mesos-master", "zookeeper"]
depends_on = ["zk-1"]
[machines.master.vars]
quorum = 1
[machines.solo]

[[checks]]
name = "zk answers ruok"
machine = "zk-1"
from = "master"
tcp = { port = 2181, send = "ruok", expect = "imok" }
retry = "500ms"
timeout = "60s"

[[checks]]
name = "master stats"
machine = "master"
[checks.http]
port = 5050
path = "/master/stats.json"
status = 200
json = { "/elected" = 1 }

[[checks]]
name = "zk service"
machine = "zk-1"
command = { run = "systemctl is-active zookeeper", exit = 0, stdout = "active" }
"#;

#[test]
fn daemons_vars_dependencies_and_checks_are_parsed() {
    let topology = parse_ok_in(&kit_fixture(), CLUSTER);

    let zk = topology.machine("zk-1").expect("zk-1");
    assert_eq!(zk.daemons, ["zookeeper"]);
    assert!(zk.depends_on.is_empty());
    let vars = serde_json::to_value(&zk.vars).expect("json");
    assert_eq!(
        vars,
        serde_json::json!({
            "myid": 1,
            "role": "leader",
            "weight": 0.5,
            "on": true,
            "peers": [1, 2],
            "nested": { "a": "b" },
            "since": "1979-05-27",
        })
    );

    let master = topology.machine("master").expect("master");
    assert_eq!(master.daemons, ["mesos-master", "zookeeper"]);
    assert_eq!(master.depends_on, ["zk-1"]);
    assert_eq!(master.vars["quorum"], serde_json::json!(1));

    let solo = topology.machine("solo").expect("solo");
    assert!(solo.daemons.is_empty() && solo.vars.is_empty() && solo.depends_on.is_empty());

    let running: Vec<&str> = topology
        .machines_running("zookeeper")
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(running, ["zk-1", "master"]);
    assert_eq!(topology.machines_running("mesos-master").len(), 1);
    assert!(topology.machines_running("marathon").is_empty());

    let names: Vec<&str> = topology.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["zk answers ruok", "master stats", "zk service"]);

    let ruok = &topology.checks[0];
    assert_eq!(ruok.machine, "zk-1");
    assert_eq!(ruok.from.as_deref(), Some("master"));
    assert_eq!(ruok.retry.as_deref(), Some("500ms"));
    assert_eq!(ruok.timeout.as_deref(), Some("60s"));
    assert!(ruok.http.is_none() && ruok.command.is_none());
    let tcp = ruok.tcp.as_ref().expect("tcp probe");
    assert_eq!(tcp.port, 2181);
    assert_eq!(tcp.send.as_deref(), Some("ruok"));
    assert_eq!(tcp.expect.as_deref(), Some("imok"));

    let stats = &topology.checks[1];
    assert_eq!(stats.machine, "master");
    assert_eq!(stats.from, None);
    assert_eq!(stats.retry, None);
    let http = stats.http.as_ref().expect("http probe");
    assert_eq!(http.port, 5050);
    assert_eq!(http.path, "/master/stats.json");
    assert_eq!(http.status, Some(200));
    assert_eq!(http.json["/elected"], serde_json::json!(1));
    assert!(http.headers.is_empty() && http.body.is_none());

    let service = &topology.checks[2];
    let command = service.command.as_ref().expect("command probe");
    assert_eq!(command.run, "systemctl is-active zookeeper");
    assert_eq!(command.exit, Some(0));
    assert_eq!(command.stdout.as_deref(), Some("active"));
    assert!(command.json.is_empty());
}

#[test]
fn http_probe_path_defaults_to_root() {
    let topology = parse_ok(
        "name = \"x\"\n[machines.a]\n[[checks]]\nname = \"up\"\nmachine = \"a\"\nhttp = { port = 80 }\n",
    );
    let http = topology.checks[0].http.as_ref().expect("http probe");
    assert_eq!(http.path, "/");
    assert_eq!(http.status, None);
}

#[test]
fn start_waves_follow_dependency_depth_in_file_order() {
    let topology = parse_ok(
        r#"name = "x"
[machines.marathon]
depends_on = ["master"]
[machines.client]
[machines.master]
depends_on = ["zk"]
[machines.zk]
[machines.agent]
depends_on = ["zk", "marathon"]
"#,
    );
    assert_eq!(
        topology.start_waves(),
        [
            vec!["client", "zk"],
            vec!["master"],
            vec!["marathon"],
            vec!["agent"]
        ]
    );
}

#[test]
fn start_waves_without_dependencies_is_one_wave() {
    let topology = parse_ok("name = \"x\"\n[machines.b]\n[machines.a]\n");
    assert_eq!(topology.start_waves(), [vec!["b", "a"]]);
}

#[test]
fn unknown_machine_key_suggests_depends_on() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ndepend_on = [\"b\"]\n",
        3,
        1,
        &[
            "unknown key `depend_on` in [machines.a]; did you mean `depends_on`?",
            "help: valid keys in [machines.a]: ip, ips, provider, image, cpus, memory, forward, \
             daemons, vars, depends_on",
        ],
    );
}

#[test]
fn unknown_daemon_suggests_a_kit() {
    assert_kit_error_at(
        "name = \"x\"\n[machines.zk-1]\ndaemons = [\"zookeper\"]\n",
        3,
        12,
        &[
            "unknown daemon `zookeper`; did you mean `zookeeper`?",
            "help: available kits (built in, or daemons/<name>/daemon.toml beside the topology \
             or above it): ",
            "mesos-master",
        ],
    );
}

#[test]
fn a_built_in_kit_needs_no_local_kit() {
    let topology = parse_ok("name = \"x\"\n[machines.a]\ndaemons = [\"zookeeper\"]\n");
    assert_eq!(topology.machines[0].daemons, ["zookeeper"]);
}

#[test]
fn unknown_daemon_without_any_local_kit_lists_the_built_ins() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\ndaemons = [\"zookeepr\"]\n",
        3,
        12,
        &[
            "unknown daemon `zookeepr`; did you mean `zookeeper`?",
            "slurmctld",
        ],
    );
}

#[test]
fn daemon_listed_twice() {
    assert_kit_error_at(
        "name = \"x\"\n[machines.a]\ndaemons = [\"zookeeper\", \"mesos-master\", \"zookeeper\"]\n",
        3,
        41,
        &[
            "`zookeeper` is listed twice in `daemons` of machine `a`",
            "help: list each daemon once",
        ],
    );
}

#[test]
fn daemons_must_be_an_array_of_strings() {
    assert_kit_error_at(
        "name = \"x\"\n[machines.a]\ndaemons = \"zookeeper\"\n",
        3,
        11,
        &[
            "`daemons` must be an array of strings, not a string",
            "help: for example `daemons = [\"zookeeper\"]`",
        ],
    );
    assert_kit_error_at(
        "name = \"x\"\n[machines.a]\ndaemons = [\"zookeeper\", 2]\n",
        3,
        25,
        &["each `daemons` entry must be a string, not an integer"],
    );
}

#[test]
fn vars_key_must_be_an_identifier() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nvars = { ok = 1, my-var = \"x\" }\n",
        3,
        18,
        &[
            "invalid variable name `my-var` in `vars` of machine `a`; did you mean `my_var`?",
            "help: templates use each var as an identifier: a letter or `_`, then letters, \
             digits and `_`",
        ],
    );
}

#[test]
fn vars_key_starting_with_a_digit() {
    assert_error_at(
        "name = \"x\"\n[machines.a.vars]\n2nd = true\n",
        3,
        1,
        &["invalid variable name `2nd` in `vars` of machine `a`; did you mean `_2nd`?"],
    );
}

#[test]
fn vars_must_be_a_table() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nvars = [1]\n",
        3,
        8,
        &[
            "`vars` must be a table, not an array",
            "help: for example `vars = { myid = 1 }`",
        ],
    );
}

#[test]
fn vars_value_without_json_equivalent() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\nvars = { limit = inf }\n",
        3,
        18,
        &[
            "`limit` = inf has no JSON equivalent",
            "use a finite number",
        ],
    );
}

#[test]
fn depends_on_unknown_machine() {
    assert_error_at(
        "name = \"x\"\n[machines.zk-1]\n[machines.master]\ndepends_on = [\"zk1\"]\n",
        4,
        15,
        &[
            "unknown machine `zk1` in `depends_on` of machine `master`; did you mean `zk-1`?",
            "help: machines defined here: zk-1, master",
        ],
    );
}

#[test]
fn depends_on_itself() {
    assert_error_at(
        "name = \"x\"\n[machines.b]\n[machines.a]\ndepends_on = [\"b\", \"a\"]\n",
        4,
        20,
        &[
            "machine `a` depends on itself",
            "help: `depends_on` lists the machines that must be ready before this one starts; \
             remove `a`",
        ],
    );
}

#[test]
fn depends_on_listed_twice() {
    assert_error_at(
        "name = \"x\"\n[machines.b]\n[machines.a]\ndepends_on = [\"b\", \"b\"]\n",
        4,
        20,
        &[
            "`b` is listed twice in `depends_on` of machine `a`",
            "help: list each machine once",
        ],
    );
}

#[test]
fn depends_on_must_be_an_array() {
    assert_error_at(
        "name = \"x\"\n[machines.b]\n[machines.a]\ndepends_on = \"b\"\n",
        4,
        14,
        &[
            "`depends_on` must be an array of strings, not a string",
            "help: for example `depends_on = [\"zk-1\"]`",
        ],
    );
}

#[test]
fn dependency_cycle_is_named_from_its_first_machine_in_file_order() {
    // `head` waits on the cycle without being part of it; the cycle is
    // reported from `zk-1`, its first machine in the file.
    assert_error_at(
        r#"name = "x"
[machines.head]
depends_on = ["master"]
[machines.zk-1]
depends_on = ["agent"]
[machines.master]
depends_on = ["zk-1"]
[machines.agent]
depends_on = ["master"]
"#,
        5,
        14,
        &[
            "dependency cycle: zk-1 → agent → master → zk-1",
            "help: machines in a cycle wait on each other and can never start",
        ],
    );
}

#[test]
fn two_machine_cycle() {
    assert_error_at(
        "name = \"x\"\nmachines = { a = { depends_on = [\"b\"] }, b = { depends_on = [\"a\"] } }\n",
        2,
        33,
        &["dependency cycle: a → b → a"],
    );
}

// ---------------------------------------------------------------------------
// 12. Checks
// ---------------------------------------------------------------------------

/// Two machines on `lan` and `solo` on no network, then `checks`.
fn with_checks(checks: &str) -> String {
    format!(
        "name = \"x\"\n[networks.lan]\nsubnet = \"192.168.33.0/24\"\n\
         [machines.zk-1]\nip = \"192.168.33.11\"\n\
         [machines.master]\nip = \"192.168.33.20\"\n\
         [machines.solo]\n{checks}"
    )
}

#[test]
fn unknown_top_level_key_suggests_checks() {
    assert_error_at(
        "name = \"x\"\n[machines.a]\n[[check]]\nname = \"c\"\n",
        3,
        3,
        &[
            "unknown key `check` at the top level; did you mean `checks`?",
            "help: valid keys at the top level: name, defaults, networks, machines, checks",
        ],
    );
}

#[test]
fn unknown_key_in_check() {
    assert_error_at(
        &with_checks("[[checks]]\nname = \"c\"\nmahcine = \"zk-1\"\ntcp = { port = 2181 }\n"),
        11,
        1,
        &[
            "unknown key `mahcine` in check `c`; did you mean `machine`?",
            "help: valid keys in check `c`: name, machine, from, tcp, http, command, retry, \
             timeout",
        ],
    );
}

#[test]
fn unknown_key_in_tcp_probe() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\ntcp = { port = 2181, expcet = \"imok\" }\n",
        ),
        12,
        22,
        &[
            "unknown key `expcet` in the `tcp` probe of check `c`; did you mean `expect`?",
            "help: valid keys in the `tcp` probe of check `c`: port, send, expect",
        ],
    );
}

#[test]
fn unknown_key_in_http_probe_table() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\n[checks.http]\nport = 80\nstatuss = 200\n",
        ),
        14,
        1,
        &[
            "unknown key `statuss` in the `http` probe of check `c`; did you mean `status`?",
            "help: valid keys in the `http` probe of check `c`: port, path, status, headers, \
             body, json",
        ],
    );
}

#[test]
fn check_naming_an_unknown_machine() {
    assert_error_at(
        &with_checks("[[checks]]\nname = \"c\"\nmachine = \"zk1\"\ntcp = { port = 2181 }\n"),
        11,
        11,
        &[
            "unknown machine `zk1` in `machine` of check `c`; did you mean `zk-1`?",
            "help: machines defined here: zk-1, master, solo",
        ],
    );
}

#[test]
fn check_from_an_unknown_machine() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\nfrom = \"mastr\"\ntcp = { port = 2181 }\n",
        ),
        12,
        8,
        &["unknown machine `mastr` in `from` of check `c`; did you mean `master`?"],
    );
}

#[test]
fn check_with_two_probes() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\ntcp = { port = 2181 }\ncommand = { run = \"true\" }\n",
        ),
        13,
        1,
        &[
            "check `c` has both `tcp` and `command`: a check has exactly one probe",
            "help: split it into one check per probe",
        ],
    );
}

#[test]
fn check_without_a_probe() {
    assert_error_at(
        &with_checks("\n[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\n"),
        10,
        1,
        &[
            "check `c` has no probe",
            "help: add exactly one of `tcp = { port = 2181 }`, `http = { port = 5050, path = \
             \"/\" }`, `command = { run = ",
        ],
    );
}

#[test]
fn check_without_a_machine() {
    assert_error_at(
        &with_checks("[[checks]]\nname = \"c\"\ntcp = { port = 2181 }\n"),
        9,
        1,
        &[
            "check `c` has no `machine`",
            "help: add `machine = \"zk-1\"`",
        ],
    );
}

#[test]
fn check_field_with_the_wrong_type() {
    assert_error_at(
        &with_checks("[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\ntcp = { port = \"zk\" }\n"),
        12,
        16,
        &[
            "check `c`: invalid type: string \"zk\", expected u16",
            "help: a check is a `[[checks]]` table",
        ],
    );
}

#[test]
fn checks_must_be_tables() {
    assert_error_at(
        "name = \"x\"\n\n\nchecks = 3\n[machines.a]\n",
        4,
        10,
        &["`checks` must be an array of tables, not an integer"],
    );
    assert_error_at(
        "name = \"x\"\nchecks = [\"up\"]\n[machines.a]\n",
        2,
        11,
        &["each `checks` entry must be a table, not a string"],
    );
}

#[test]
fn duplicate_check_names_name_both_lines() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"zk up\"\nmachine = \"zk-1\"\ntcp = { port = 2181 }\n\
             [[checks]]\nname = \"zk up\"\nmachine = \"master\"\ntcp = { port = 2181 }\n",
        ),
        14,
        8,
        &[
            "check name `zk up` is used twice: by the checks at line 10 and line 14",
            "help: give each check its own name",
        ],
    );
}

#[test]
fn check_from_a_machine_sharing_no_network() {
    assert_error_at(
        &with_checks(
            "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\nfrom = \"solo\"\ntcp = { port = 2181 }\n",
        ),
        12,
        8,
        &[
            "check `c`: machines `solo` and `zk-1` share no network: they cannot reach each \
             other over a private network",
            "help: `solo` is on no network, `zk-1` on network `lan`: give both an address on \
             one network, or drop `from` to check from `zk-1` itself",
        ],
    );
}

#[test]
fn check_from_a_machine_on_the_same_network() {
    let topology = parse_ok(&with_checks(
        "[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\nfrom = \"master\"\ntcp = { port = 2181 }\n",
    ));
    assert_eq!(topology.checks[0].from.as_deref(), Some("master"));
}

#[test]
fn check_rejected_by_check_validate_is_located_at_its_table() {
    assert_error_at(
        &with_checks(
            "\n[[checks]]\nname = \"c\"\nmachine = \"zk-1\"\ntcp = { port = 2181 }\ntimeout = \"soon\"\n",
        ),
        10,
        1,
        &[
            "check `c`: `timeout` = \"soon\" is not a duration",
            "help: a check is a `[[checks]]` table",
        ],
    );
}

// ---------------------------------------------------------------------------
// 12. The build step, steps, packages and artifacts
// ---------------------------------------------------------------------------

const BUILT: &str = r#"name = "built"
[machines.devtools]
packages = ["gcc", "libc6-dev"]
[machines.node]
artifacts = ["dist/hello"]
[build]
machine = "devtools"
inputs = ["src"]
run = "mkdir -p dist && cc -o dist/hello src/hello.c"
outputs = ["dist/hello"]
[[steps]]
name = "say-hello"
machine = "node"
run = "/srv/testbed/dist/hello"
checks = [{ name = "said", machine = "node", command = { run = "true" } }]
"#;

/// The fixture plus `src/hello.c`, the input BUILT names.
fn build_fixture() -> TempDir {
    let dir = fixture();
    std::fs::create_dir(dir.path().join("src")).expect("mkdir src");
    std::fs::write(dir.path().join("src/hello.c"), "int main(){}").expect("write");
    dir
}

fn assert_build_error_at(text: &str, line: usize, col: usize, phrases: &[&str]) {
    assert_error_in(&build_fixture(), text, line, col, phrases);
}

#[test]
fn build_steps_packages_and_artifacts_are_read() {
    let topology = parse_ok_in(&build_fixture(), BUILT);
    let build = topology.build.as_ref().expect("build");
    assert_eq!(build.builder, model::Builder::Machine("devtools".into()));
    let input = &build.inputs[0];
    assert_eq!((input.path.as_str(), input.line, input.col), ("src", 8, 11));
    assert_eq!(build.outputs, ["dist/hello"]);
    assert_eq!(topology.machines[0].packages, ["gcc", "libc6-dev"]);
    assert_eq!(topology.machines[1].artifacts, ["dist/hello"]);
    let step = &topology.steps[0];
    assert_eq!(
        (
            step.name.as_str(),
            step.command.as_ref().map(|c| c.machine.as_str())
        ),
        ("say-hello", Some("node"))
    );
    assert_eq!(step.checks[0].name, "said");
}

#[test]
fn build_on_an_unknown_machine_is_rejected() {
    let text = BUILT.replace("machine = \"devtools\"", "machine = \"devtool\"");
    assert_build_error_at(
        &text,
        7,
        11,
        &["unknown machine `devtool`", "did you mean `devtools`?"],
    );
}

#[test]
fn a_missing_build_input_is_located_but_only_stops_a_build() {
    let text = BUILT.replace("inputs = [\"src\"]", "inputs = [\"src\", \"Makefile\"]");
    let dir = build_fixture();
    let (path, result) = parse_in(&dir, &text);
    let topology = result.expect("parses: status and destroy must still work");
    let error = topology::missing_input(&topology).expect("Makefile is missing");
    assert_message(
        &error.to_string(),
        &path,
        8,
        18,
        &["input `Makefile` does not exist"],
    );
}

#[test]
fn inputs_may_climb_only_at_their_start() {
    let text = BUILT.replace("inputs = [\"src\"]", "inputs = [\"src/../../x\"]");
    assert_build_error_at(
        &text,
        8,
        11,
        &["must be a relative path", "`..` only at the start"],
    );
}

#[test]
fn build_outputs_must_be_under_dist() {
    let text = BUILT.replace("outputs = [\"dist/hello\"]", "outputs = [\"hello\"]");
    assert_build_error_at(
        &text,
        10,
        12,
        &["output `hello`", "must start with `dist/`"],
    );
}

#[test]
fn a_build_without_outputs_is_rejected() {
    let text = BUILT.replace("outputs = [\"dist/hello\"]\n", "");
    assert_build_error_at(&text, 6, 1, &["[build] has no `outputs`"]);
}

#[test]
fn unknown_build_keys_are_rejected() {
    let text = BUILT.replace("run = \"mkdir", "script = \"mkdir");
    assert_build_error_at(
        &text,
        9,
        1,
        &["unknown key `script` in [build]", "valid keys in [build]"],
    );
}

#[test]
fn artifacts_must_be_under_dist_and_listed_once() {
    let text = BUILT.replace(
        "artifacts = [\"dist/hello\"]",
        "artifacts = [\"/srv/hello\"]",
    );
    assert_build_error_at(&text, 5, 14, &["artifact `/srv/hello`", "dist/"]);
    let text = BUILT.replace(
        "artifacts = [\"dist/hello\"]",
        "artifacts = [\"dist/hello\", \"dist/hello\"]",
    );
    assert_build_error_at(&text, 5, 28, &["listed twice"]);
}

#[test]
fn packages_must_be_debian_package_names() {
    let text = BUILT.replace("\"libc6-dev\"", "\"Libc6_dev\"");
    assert_build_error_at(&text, 3, 20, &["`Libc6_dev` is not a Debian package name"]);
}

#[test]
fn steps_need_unique_names_a_known_machine_and_a_command() {
    let twice =
        format!("{BUILT}[[steps]]\nname = \"say-hello\"\nmachine = \"node\"\nrun = \"true\"\n");
    assert_build_error_at(&twice, 16, 1, &["step name `say-hello` is used twice"]);
    let text = BUILT.replace("machine = \"node\"\nrun", "machine = \"nod\"\nrun");
    assert_build_error_at(
        &text,
        13,
        11,
        &["unknown machine `nod`", "did you mean `node`?"],
    );
    let text = BUILT.replace("run = \"/srv/testbed/dist/hello\"", "run = \"  \"");
    assert_build_error_at(&text, 14, 7, &["`run` of step `say-hello` is empty"]);
    let text = BUILT.replace("name = \"say-hello\"", "name = \"say hello\"");
    assert_build_error_at(
        &text,
        12,
        8,
        &["invalid step name `say hello`", "testbed run NAME"],
    );
}

#[test]
fn a_step_check_is_checked_like_any_other() {
    let text = BUILT.replace("machine = \"node\", command", "machine = \"gone\", command");
    assert_build_error_at(&text, 15, 38, &["unknown machine `gone`"]);
}

#[test]
fn internet_is_off_unless_a_machine_or_the_defaults_turn_it_on() {
    let topology = parse_ok(PAIR);
    assert!(topology.machines.iter().all(|m| !m.internet));
    let text = PAIR.replace("cpus = 2\n", "cpus = 2\ninternet = true\n");
    let topology = parse_ok(&text);
    let online: Vec<&str> = topology
        .machines
        .iter()
        .filter(|m| m.internet)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(online, ["beta"]);
    let all = PAIR.replace("cpus = 1\n", "cpus = 1\ninternet = true\n");
    assert!(parse_ok(&all).machines.iter().all(|m| m.internet));
    assert_error_at(
        &PAIR.replace("cpus = 2\n", "cpus = 2\ninternet = \"yes\"\n"),
        15,
        12,
        &[
            "`internet` must be true or false, not a string",
            "internet = true",
        ],
    );
}

#[test]
fn build_and_step_timeouts_are_durations() {
    let text = r#"name = "t"
[machines.devtools]
[build]
machine = "devtools"
run = "true"
outputs = ["dist/x"]
timeout = "90m"
[[steps]]
name = "s"
machine = "devtools"
run = "true"
timeout = "soon"
"#;
    assert_error_at(
        text,
        12,
        11,
        &["`timeout` `soon` is not a duration", "timeout = \"10m\""],
    );
    let topology = parse_ok(&text.replace("\"soon\"", "\"2s\""));
    let build = topology.build.expect("build");
    assert_eq!(build.timeout, std::time::Duration::from_secs(90 * 60));
    assert_eq!(topology.steps[0].timeout, std::time::Duration::from_secs(2));
    let defaults = parse_ok(
        &text
            .replace("timeout = \"soon\"\n", "")
            .replace("timeout = \"90m\"\n", ""),
    );
    assert_eq!(
        defaults.build.expect("build").timeout,
        testbed::model::DEFAULT_BUILD_TIMEOUT
    );
    assert_eq!(
        defaults.steps[0].timeout,
        testbed::model::DEFAULT_STEP_TIMEOUT
    );
}

// ---------------------------------------------------------------------------
// Faults in steps
// ---------------------------------------------------------------------------

/// Three machines on `lan`, zk-3 on `backup` too; a step carrying `fault`
/// on line 16, which starts at column 9.
fn with_fault(fault: &str) -> String {
    format!(
        r#"name = "zk"
[defaults]
image = "debian-12"
[networks.lan]
subnet = "192.168.33.0/24"
[networks.backup]
subnet = "192.168.34.0/24"
[machines.zk-1]
ips = {{ lan = "192.168.33.11" }}
[machines.zk-2]
ips = {{ lan = "192.168.33.12" }}
[machines.zk-3]
ips = {{ lan = "192.168.33.13", backup = "192.168.34.13" }}
[[steps]]
name = "f"
fault = {fault}
"#
    )
}

/// The error for `fault`, at the first occurrence of `at` in it.
fn assert_fault_error(fault: &str, at: &str, phrases: &[&str]) {
    let col = 9 + fault.find(at).expect("`at` is in the fault");
    assert_error_at(&with_fault(fault), 16, col, phrases);
}

#[test]
fn step_faults_are_read_with_the_network_filled_in() {
    use testbed::model::{Fault, LinkFault, LinkShape};
    let fault_of = |text: &str| parse_ok(&with_fault(text)).steps[0].fault.clone();
    assert_eq!(
        fault_of(r#"{ partition = [["zk-1"], ["zk-2", "zk-3"]] }"#),
        Some(Fault::Partition(vec![
            vec!["zk-1".into()],
            vec!["zk-2".into(), "zk-3".into()]
        ]))
    );
    assert_eq!(fault_of("{ heal = true }"), Some(Fault::Heal));
    assert_eq!(
        fault_of(r#"{ pause = "zk-2" }"#),
        Some(Fault::Pause("zk-2".into()))
    );
    assert_eq!(
        fault_of(
            r#"{ link = { machine = "zk-1", delay = "300ms", jitter = "20ms", loss = "1.5%" } }"#
        ),
        Some(Fault::Link(LinkFault {
            machine: "zk-1".into(),
            network: "lan".into(),
            shape: LinkShape {
                down: false,
                delay: std::time::Duration::from_millis(300),
                jitter: std::time::Duration::from_millis(20),
                loss: 0.015,
            },
        }))
    );
    let step = &parse_ok(&with_fault("{ heal = true }")).steps[0];
    assert!(step.command.is_none(), "a fault alone needs no run");
}

#[test]
fn a_bad_fault_is_located_and_says_what_would_do() {
    assert_fault_error(
        r#"{ partiton = [["zk-1"], ["zk-2"]] }"#,
        "partiton",
        &[
            "unknown key `partiton` in `fault`",
            "did you mean `partition`?",
        ],
    );
    assert_fault_error(
        r#"{ heal = true, kill = "zk-1" }"#,
        "{",
        &["`fault` names 2 faults; a step has one"],
    );
    assert_fault_error(
        r#"{ partition = [["zk-1", "zk-2", "zk-3"]] }"#,
        "[[",
        &["a partition needs two or more groups"],
    );
    assert_fault_error(
        r#"{ partition = [["zk-1"], []] }"#,
        "[]",
        &["a group of the partition is empty"],
    );
    assert_fault_error(
        r#"{ partition = [["zk-1"], ["zk-4"]] }"#,
        "\"zk-4",
        &[
            "unknown machine `zk-4` in the partition",
            "machines defined here",
        ],
    );
    assert_fault_error(
        r#"{ partition = [["zk-1"], ["zk-2", "zk-1"]] }"#,
        "\"zk-1\"]]",
        &["`zk-1` is in two groups"],
    );
    assert_fault_error(
        r#"{ kill = "zk-9" }"#,
        "\"zk-9",
        &["unknown machine `zk-9` in `fault.kill`"],
    );
    assert_fault_error(
        "{ heal = false }",
        "false",
        &["`heal = false` asks for nothing"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-3", delay = "1s" } }"#,
        "\"zk-3",
        &["`zk-3` is on several networks: say which", "lan", "backup"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", network = "backup", down = true } }"#,
        "\"backup",
        &["`zk-1` is not on network `backup`", "is on: lan"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", delay = "soon" } }"#,
        "\"soon",
        &["`delay` `soon` is not a duration"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", loss = "10" } }"#,
        "\"10",
        &["`loss` `10` is not a percentage", "loss = \"10%\""],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", delay = "10ms", jitter = "20ms" } }"#,
        "\"20ms",
        &["`jitter` is larger than `delay`"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", down = false } }"#,
        "{ machine",
        &["`link` says nothing is wrong with the link", "down = true"],
    );
    assert_fault_error(
        r#"{ link = { machine = "zk-1", lag = "1s" } }"#,
        "lag",
        &["unknown key `lag` in `link`", "delay"],
    );
}

#[test]
fn a_step_needs_a_fault_or_a_command_and_machine_goes_with_run() {
    let text = with_fault("{ heal = true }").replace("fault = { heal = true }\n", "");
    assert_error_at(&text, 14, 1, &["step `f` has neither `run` nor `fault`"]);
    let text = with_fault("{ heal = true }\nmachine = \"zk-1\"");
    assert_error_at(&text, 17, 11, &["step `f` has a `machine` but no `run`"]);
    let text = with_fault("{ heal = true }\nrun = \"true\"");
    assert_error_at(&text, 14, 1, &["step `f` has no `machine`"]);
}

// ---------------------------------------------------------------------------
// Provisioners
// ---------------------------------------------------------------------------

/// The usual fixture plus `setup.sh` and `site.yml` beside the topology.
fn provision_fixture() -> TempDir {
    let dir = fixture();
    std::fs::write(dir.path().join("setup.sh"), "#!/bin/sh\n").expect("write");
    std::fs::write(dir.path().join("site.yml"), "- hosts: all\n").expect("write");
    dir
}

#[test]
fn provisioners_keep_their_order_args_and_env() {
    let topology = parse_ok_in(
        &provision_fixture(),
        "name = \"x\"\n[machines.a]\nprovision = [\n  { shell = \"setup.sh\", args = [\"--fast\"], \
         env = { ZK_ID = \"1\" } },\n  { inline = \"echo hi\" },\n  { ansible = \"site.yml\", inputs = [\"setup.sh\"] },\n]\n",
    );
    let provision = &topology.machines[0].provision;
    let labels: Vec<String> = provision.iter().map(|p| p.label()).collect();
    assert_eq!(
        labels,
        ["shell setup.sh", "inline `echo hi`", "ansible site.yml"]
    );
    assert_eq!(
        provision[0].run,
        model::ProvisionRun::Shell {
            script: model::Script::File("setup.sh".into()),
            args: vec!["--fast".into()],
            env: [("ZK_ID".to_string(), "1".to_string())].into(),
        }
    );
    assert_eq!(provision[2].inputs, ["setup.sh"]);
}

#[test]
fn a_provisioner_runs_exactly_one_thing_from_a_file_that_exists() {
    let head = "name = \"x\"\n[machines.a]\nprovision = [\n";
    let cases: [(&str, usize, &[&str]); 6] = [
        (
            "  { args = [\"x\"] },\n]\n",
            3,
            &[
                "this `provision` entry runs nothing",
                "help: each `provision` entry is a table with one of `shell`",
            ],
        ),
        (
            "  { shell = \"setup.sh\", ansible = \"site.yml\" },\n]\n",
            3,
            &["has both `shell` and `ansible`", "give each its own entry"],
        ),
        (
            "  { shell = \"missing.sh\" },\n]\n",
            13,
            &[
                "script `missing.sh` does not exist",
                "help: it is read relative to",
            ],
        ),
        (
            "  { ansible = \"/etc/site.yml\" },\n]\n",
            15,
            &["playbook `/etc/site.yml` must be a relative path"],
        ),
        (
            "  { ansible = \"site.yml\", args = [\"-v\"] },\n]\n",
            34,
            &["`args` is for shell provisioners", "machine's `vars`"],
        ),
        (
            "  { shell = \"setup.sh\", envv = {} },\n]\n",
            25,
            &["unknown key `envv` in a `provision` entry; did you mean `env`?"],
        ),
    ];
    for (entry, col, phrases) in cases {
        assert_error_in(
            &provision_fixture(),
            &format!("{head}{entry}"),
            4,
            col,
            phrases,
        );
    }
    assert_error_in(
        &provision_fixture(),
        "name = \"x\"\n[machines.a]\nprovision = \"setup.sh\"\n",
        3,
        13,
        &["`provision` must be an array of tables, not a string"],
    );
}
