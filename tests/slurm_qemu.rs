//! End to end on real VMs: the tutorial's story on topologies/slurm.toml.
//! `up` builds the job on devtools, boots four machines, starts munge,
//! slurmctld, slurmrestd, slurmd and ZooKeeper in order and runs the checks;
//! `verify` is green; `testbed run submit-hello` sees the job run and print;
//! `testbed run kill-hello` sees it gone; a second `up` is a no-op that
//! skips the build, and an edited input rebuilds and re-pushes the job;
//! `status`, `halt`, `destroy`; then `up` again restores the cluster from
//! the green cache (saved by the first `up`). One booted cluster serves the
//! whole scenario.

mod common;

use common::{repo, Bed};

/// slurm.toml in a temp dir, with its build input beside it (so the test
/// can edit the input without touching the repository).
fn slurm_bed() -> Bed {
    let topology = std::fs::read_to_string(repo().join("topologies/slurm.toml"))
        .expect("slurm.toml")
        .replace(
            "\"../examples/jobs/hello_world.c\"",
            "\"examples/jobs/hello_world.c\"",
        );
    let bed = Bed::new(&topology);
    let jobs = bed.path().join("examples/jobs");
    std::fs::create_dir_all(&jobs).expect("mkdir");
    std::fs::copy(
        repo().join("examples/jobs/hello_world.c"),
        jobs.join("hello_world.c"),
    )
    .expect("copy the job's source");
    bed
}

fn check_names_passed(json: &str) -> Vec<(String, bool)> {
    let value: serde_json::Value = serde_json::from_str(json).expect("JSON");
    value["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_string(),
                c["passed"] == true,
            )
        })
        .collect()
}

#[test]
fn slurm_cluster_builds_runs_and_kills_the_hello_job() {
    let bed = slurm_bed().with_green_cache();
    // --fresh: an entry an earlier run left in the green cache is not used.
    let up = bed.ok(&["up", "--fresh", "topology.toml"]);
    assert!(
        up.contains("build: built dist/hello_world"),
        "up runs the build:\n{up}"
    );
    assert!(
        up.contains("PASS") && !up.contains("FAIL"),
        "up's checks:\n{up}"
    );
    assert!(up.contains("green cache: saved"), "{up}");
    for daemon in [
        "zookeeper: zookeeper started",
        "slurm-controller: munge started",
        "slurm-controller: slurmctld started",
        "slurm-controller: slurmrestd started",
        "slurm-compute: slurmd started",
    ] {
        assert!(up.contains(daemon), "{daemon}:\n{up}");
    }
    assert!(
        bed.path().join("dist/hello_world").is_file(),
        "dist/ filled"
    );

    let verify = check_names_passed(&bed.ok(&["verify", "--json"]));
    assert_eq!(verify.len(), 3, "{verify:?}");
    assert!(verify.iter().all(|(_, passed)| *passed), "{verify:?}");

    let submit = bed.testbed(&["run", "submit-hello", "--json"]);
    let submitted = String::from_utf8_lossy(&submit.stdout).into_owned();
    assert!(
        submit.status.success(),
        "submit-hello:\n{submitted}\n{}",
        String::from_utf8_lossy(&submit.stderr)
    );
    assert!(
        String::from_utf8_lossy(&submit.stderr).contains("Submitted batch job"),
        "sbatch's own output is shown"
    );
    let checks = check_names_passed(&submitted);
    assert_eq!(
        checks,
        vec![
            ("hello is running".to_string(), true),
            ("hello says hello world".to_string(), true)
        ]
    );

    let kill = bed.ok(&["run", "kill-hello"]);
    assert!(
        kill.contains("no hello job left") && !kill.contains("FAIL"),
        "{kill}"
    );

    // Converged: a second `up` does nothing, and says the build was skipped.
    let again = bed.ok(&["up"]);
    assert!(
        again.contains("build: inputs unchanged, skipped"),
        "{again}"
    );
    assert!(again.contains("nothing to do"), "{again}");

    // An edited input rebuilds, and the new binary reaches the compute node.
    let before = sha256_hex(&std::fs::read(bed.path().join("dist/hello_world")).expect("dist"));
    let source = bed.path().join("examples/jobs/hello_world.c");
    let text = std::fs::read_to_string(&source).expect("source");
    std::fs::write(&source, text.replace("sleep(10)", "sleep(9)")).expect("edit");
    let rebuilt = bed.ok(&["up"]);
    assert!(
        rebuilt.contains("build: built dist/hello_world"),
        "{rebuilt}"
    );
    let local = std::fs::read(bed.path().join("dist/hello_world")).expect("dist");
    let remote = bed.ok(&[
        "ssh",
        "slurm-compute",
        "--",
        "sha256sum /srv/testbed/dist/hello_world",
    ]);
    let digest = sha256_hex(&local);
    assert_ne!(digest, before, "the edit changed the binary");
    assert!(
        remote.starts_with(&digest),
        "pushed {digest}, found {remote}"
    );

    let states = bed.states();
    assert_eq!(states.len(), 4, "{states:?}");
    assert!(states.iter().all(|(_, s)| s == "running"), "{states:?}");

    bed.ok(&["halt"]);
    assert!(bed.states().iter().all(|(_, s)| s == "stopped"));
    bed.ok(&["destroy", "-f"]);
    assert!(
        !bed.path().join(".testbed").exists(),
        "destroy removes the state"
    );

    from_the_green_cache(&bed, &source, &text, &before);
}

/// With the job's source as it was at the first `up`, an `up` after
/// `destroy` is the green cache's: every check green without a boot, the
/// build's output put back, and the job runs (munge takes the restored
/// credentials, so every clock is right).
fn from_the_green_cache(bed: &Bed, source: &std::path::Path, text: &str, built: &str) {
    std::fs::write(source, text).expect("the source as first built");
    std::fs::remove_dir_all(bed.path().join("dist")).expect("rm dist");
    let up = bed.ok(&["up"]);
    assert!(up.contains("green cache: restored this cluster"), "{up}");
    assert!(up.contains("PASS") && !up.contains("FAIL"), "{up}");
    assert!(!up.contains("build: built"), "no build: {up}");
    let dist = std::fs::read(bed.path().join("dist/hello_world")).expect("dist restored");
    assert_eq!(sha256_hex(&dist), built, "the first build's output");
    let submit = bed.testbed(&["run", "submit-hello"]);
    assert!(
        submit.status.success(),
        "submit-hello after a restore:\n{}\n{}",
        String::from_utf8_lossy(&submit.stdout),
        String::from_utf8_lossy(&submit.stderr)
    );
    let again = bed.ok(&["up"]);
    assert!(again.contains("nothing to do"), "converged: {again}");
    bed.ok(&["destroy", "-f"]);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
