//! End to end on real VMs (qemu, TCG here): one two-machine testbed shared by
//! every assertion of the lifecycle — up, private network, ssh, halt, resume,
//! converged up, destroy — because each boot costs seconds under emulation.

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

const PAIR: &str = r#"
name = "e2e-pair"
[defaults]
memory = "768MiB"
[networks.lan]
subnet = "192.168.33.0/24"
[machines.alpha]
ip = "192.168.33.2"
[machines.beta]
ip = "192.168.33.3"
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A testbed in a temp dir, destroyed on drop even when an assertion fails.
struct Bed {
    dir: tempfile::TempDir,
}

impl Bed {
    fn new(topology: &str) -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("topology.toml"), topology).expect("write topology");
        Bed { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn testbed(&self, args: &[&str]) -> Output {
        Command::cargo_bin("testbed")
            .expect("binary")
            .current_dir(self.path())
            .env("TESTBED_IMAGES", repo().join("images"))
            .args(args)
            .output()
            .expect("run testbed")
    }

    /// Runs testbed and asserts success, returning stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.testbed(args);
        assert!(
            out.status.success(),
            "testbed {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn states(&self) -> Vec<(String, String)> {
        let json: serde_json::Value =
            serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json");
        json.as_array()
            .expect("array")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().expect("name").to_string(),
                    m["state"].as_str().expect("state").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.testbed(&["destroy", "-f"]);
    }
}

/// Processes whose command line mentions `needle` (our qemu and switches).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn two_machines_live_halt_resume_and_leave_nothing_behind() {
    let bed = Bed::new(PAIR);
    bed.ok(&["up", "topology.toml"]);
    assert_eq!(
        bed.states(),
        vec![
            ("alpha".to_string(), "running".to_string()),
            ("beta".to_string(), "running".to_string())
        ]
    );

    // Identity: each machine knows its name.
    assert_eq!(bed.ok(&["ssh", "alpha", "--", "hostname"]).trim(), "alpha");

    // Each machine reaches the other on its private IP.
    bed.ok(&[
        "ssh",
        "alpha",
        "--",
        "nc",
        "-z",
        "-w",
        "5",
        "192.168.33.3",
        "22",
    ]);
    bed.ok(&[
        "ssh",
        "beta",
        "--",
        "nc",
        "-z",
        "-w",
        "5",
        "192.168.33.2",
        "22",
    ]);

    // A command's exit status comes back.
    let failed = bed.testbed(&["ssh", "alpha", "--", "false"]);
    assert_eq!(failed.status.code(), Some(1), "ssh -- false must exit 1");

    bed.ok(&["ssh", "alpha", "--", "echo kept > /root/marker && sync"]);

    bed.ok(&["halt"]);
    assert_eq!(
        bed.states(),
        vec![
            ("alpha".to_string(), "stopped".to_string()),
            ("beta".to_string(), "stopped".to_string())
        ]
    );
    let dir = bed.path().to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&dir).is_empty(),
        "halt left processes behind"
    );

    bed.ok(&["up"]);
    assert_eq!(
        bed.ok(&["ssh", "alpha", "--", "cat", "/root/marker"])
            .trim(),
        "kept"
    );
    bed.ok(&["ssh", "beta", "--", "nc", "-z", "-w", "5", "alpha", "22"]);

    let again = bed.ok(&["up"]);
    assert!(
        again.contains("nothing to do"),
        "converged up said: {again}"
    );

    bed.ok(&["destroy", "-f"]);
    assert!(
        !bed.path().join(".testbed").exists(),
        ".testbed/ left behind"
    );
    assert!(
        processes_mentioning(&dir).is_empty(),
        "destroy left processes behind"
    );
    let status = bed.testbed(&["status"]);
    assert!(
        !status.status.success(),
        "status after destroy must say there is no testbed"
    );
}
