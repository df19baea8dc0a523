//! `testbed build` on a host builder: no VM needed. The build runs in the
//! topology's directory, its outputs land in `dist/`, unchanged inputs skip
//! it, an edited input rebuilds it, and a failing script shows its tail.

mod common;

use common::Bed;

const HOST_BUILD: &str = r#"
name = "host-build"
[machines.node]
artifacts = ["dist/greeting"]
[build]
machine = "host"
inputs = ["src"]
run = """
mkdir -p dist
cat src/greeting.txt > dist/greeting
echo built >&2
"""
outputs = ["dist/greeting"]
"#;

fn bed() -> Bed {
    let bed = Bed::new(HOST_BUILD);
    std::fs::create_dir(bed.path().join("src")).expect("mkdir");
    std::fs::write(bed.path().join("src/greeting.txt"), "hello\n").expect("write");
    bed
}

#[test]
fn build_skips_unchanged_inputs_and_rebuilds_edited_ones() {
    let bed = bed();
    let first = bed.ok(&["build", "-f", "topology.toml"]);
    assert!(first.contains("build: built dist/greeting"), "{first}");
    let greeting = bed.path().join("dist/greeting");
    assert_eq!(
        std::fs::read_to_string(&greeting).expect("output"),
        "hello\n"
    );

    let again = bed.ok(&["build", "-f", "topology.toml"]);
    assert!(
        again.contains("build: inputs unchanged, skipped"),
        "{again}"
    );

    std::fs::write(bed.path().join("src/greeting.txt"), "bonjour\n").expect("edit");
    let rebuilt = bed.ok(&["build", "-f", "topology.toml"]);
    assert!(rebuilt.contains("build: built"), "{rebuilt}");
    assert_eq!(
        std::fs::read_to_string(&greeting).expect("output"),
        "bonjour\n"
    );

    let forced = bed.ok(&["build", "-f", "topology.toml", "--force"]);
    assert!(forced.contains("build: built"), "{forced}");
}

#[test]
fn a_failing_build_shows_its_tail_and_leaves_no_output() {
    let bed = bed();
    bed.ok(&["build", "-f", "topology.toml"]);
    let failing = HOST_BUILD.replace("echo built >&2", "echo 'src/x.c:3: error: no' >&2; exit 7");
    std::fs::write(bed.path().join("topology.toml"), failing).expect("rewrite");
    let out = bed.testbed(&["build", "-f", "topology.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("src/x.c:3: error: no"), "{stderr}");
    assert!(stderr.contains("build.log"), "{stderr}");
    assert!(
        !bed.path().join("dist/greeting").exists(),
        "a failed build leaves no output that looks current"
    );
}

#[test]
fn an_artifact_no_build_makes_is_an_error() {
    let bed = bed();
    let wrong = HOST_BUILD.replace(
        "artifacts = [\"dist/greeting\"]",
        "artifacts = [\"dist/other\"]",
    );
    std::fs::write(bed.path().join("topology.toml"), wrong).expect("rewrite");
    let out = bed.testbed(&["plan", "topology.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("machine `node` needs artifact `dist/other` (`artifacts` of [machines.node]), which [build]"),
        "{stderr}"
    );
}
