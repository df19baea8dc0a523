//! End-to-end scenarios shared by the providers' test files: the same
//! assertions, whatever runs the VMs.

use super::{processes_mentioning, Bed};

/// A two-machine testbed, `alpha` (192.168.33.2) and `beta` (.3) on `lan`.
pub fn pair(provider: &str) -> String {
    format!(
        r#"
name = "e2e-pair"
[defaults]
provider = "{provider}"
memory = "768MiB"
[networks.lan]
subnet = "192.168.33.0/24"
[machines.alpha]
ip = "192.168.33.2"
[machines.beta]
ip = "192.168.33.3"
"#
    )
}

fn both(state: &str) -> Vec<(String, String)> {
    vec![
        ("alpha".to_string(), state.to_string()),
        ("beta".to_string(), state.to_string()),
    ]
}

/// up, identity, guest-to-guest TCP, exit statuses, halt, resume with the
/// disk intact, a converged up, destroy leaving no process or state.
pub fn two_machines_live_halt_resume_and_leave_nothing_behind(bed: &Bed) {
    bed.ok(&["up", "topology.toml"]);
    assert_eq!(bed.states(), both("running"));

    // Identity: each machine knows its name.
    assert_eq!(bed.ok(&["ssh", "alpha", "--", "hostname"]).trim(), "alpha");

    // Each machine reaches the other on its private IP.
    bed.ok(&["ssh", "alpha", "--", "nc -z -w 5 192.168.33.3 22"]);
    bed.ok(&["ssh", "beta", "--", "nc -z -w 5 192.168.33.2 22"]);

    // A command's exit status comes back.
    let failed = bed.testbed(&["ssh", "alpha", "--", "false"]);
    assert_eq!(failed.status.code(), Some(1), "ssh -- false must exit 1");

    bed.ok(&["ssh", "alpha", "--", "echo kept > /root/marker && sync"]);

    bed.ok(&["halt"]);
    assert_eq!(bed.states(), both("stopped"));
    let dir = bed.path().to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&dir).is_empty(),
        "halt left processes behind"
    );

    // Resumed one at a time: the second waits for the first's boot slot.
    let resumed = bed.testbed(&["up", "--jobs", "1"]);
    let progress = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "up --jobs 1 failed:\n{progress}");
    assert_eq!(
        progress.matches("waiting for a boot slot (--jobs)").count(),
        1,
        "with --jobs 1 exactly one of the two machines waits:\n{progress}"
    );
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

    // A machine removed from the file while it runs is still shown.
    let file = bed.path().join("topology.toml");
    let text = std::fs::read_to_string(&file).expect("topology");
    let without_beta = text.replace("[machines.beta]\nip = \"192.168.33.3\"\n", "");
    std::fs::write(&file, &without_beta).expect("rewrite");
    let status: serde_json::Value =
        serde_json::from_str(&bed.ok(&["status", "--json"])).expect("status --json");
    let beta = status
        .as_array()
        .and_then(|all| all.iter().find(|m| m["name"] == "beta"))
        .unwrap_or_else(|| panic!("beta is still listed: {status}"));
    assert_eq!(beta["in_topology"], false, "{status}");
    assert_eq!(beta["state"], "running", "{status}");
    std::fs::write(&file, text).expect("restore");

    bed.ok(&["destroy", "-f"]);
    assert!(
        !bed.path().join(".testbed").exists(),
        ".testbed/ left behind"
    );
    assert!(
        processes_mentioning(&dir).is_empty(),
        "destroy left processes behind"
    );
    // As `vagrant status` beside a Vagrantfile: the folder's topology.toml,
    // every machine not created.
    let states = bed.states();
    assert!(
        !states.is_empty() && states.iter().all(|(_, state)| state == "not-created"),
        "status after destroy: {states:?}"
    );
}
