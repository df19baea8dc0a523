//! End to end, the way a user arrives from Vagrant: the example project
//! `examples/provision` (two machines, each with a shell script and an
//! Ansible playbook run from this computer that renders a page from the
//! machine's `vars` and starts a web server) copied into a folder of its
//! own, testbed installed, an ordinary user. `up` runs both provisioners
//! once on each machine and its checks fetch each page from the other
//! machine; a converged `up` runs neither; an edited template runs the
//! playbook alone again; `ansible all -m ping -i <(testbed inventory)`
//! reaches both; a machine halted and booted again from its disk runs
//! neither again; a failing script fails `provision --force` with the
//! machine's name and the script's last lines, and once mended runs again
//! at the next `up`. One booted pair serves the whole scenario.

mod common;

use common::{repo, Bed};
use serde_json::Value;

/// How often each provisioner ran on `machine`: each appends a line.
fn runs(bed: &Bed, machine: &str) -> (usize, usize) {
    let count = |log: &str| {
        let out = bed.ok(&["ssh", machine, "--", &format!("cat {log} | wc -l")]);
        out.trim().parse::<usize>().expect("a count")
    };
    (
        count("/var/log/setup-runs"),
        count("/var/log/playbook-runs"),
    )
}

/// (machine, provisioner, action) of every provisioner in `plan --json`.
fn planned(bed: &Bed) -> Vec<(String, String, String)> {
    let plan: Value = serde_json::from_str(&bed.ok(&["plan", "--json"])).expect("plan --json");
    let word = |v: &Value| v.as_str().expect("a string").to_string();
    let mut found = Vec::new();
    for machine in plan["machines"].as_array().expect("machines") {
        for provisioner in machine["provision"].as_array().expect("provision") {
            found.push((
                word(&machine["name"]),
                word(&provisioner["name"]),
                word(&provisioner["action"]),
            ));
        }
    }
    found
}

fn expect(actions: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    actions
        .iter()
        .map(|(m, p, a)| (m.to_string(), p.to_string(), a.to_string()))
        .collect()
}

/// The page the playbook rendered on `machine`, once its server runs.
fn page(bed: &Bed, machine: &str) -> String {
    let command = "systemctl is-active --quiet hello-web && cat /srv/www/index.html";
    bed.ok(&["ssh", machine, "--", command]).trim().to_string()
}

#[test]
fn provisioners_run_once_per_change_and_ansible_reaches_the_machines() {
    let bed = Bed::installed().with_env("TESTBED_GREEN_CACHE_MAX", "0");
    bed.copy_in(&repo().join("examples/provision"));
    let all = |action| {
        expect(&[
            ("web-1", "shell setup.sh", action),
            ("web-1", "ansible site.yml", action),
            ("web-2", "shell setup.sh", action),
            ("web-2", "ansible site.yml", action),
        ])
    };
    assert_eq!(planned(&bed), all("run"));
    let up = bed.ok(&["up"]);
    assert!(up.contains("2 checks: 2 passed"), "{up}");
    for machine in ["web-1", "web-2"] {
        assert_eq!(runs(&bed, machine), (1, 1), "{machine} after the first up");
        assert_eq!(
            page(&bed, machine),
            format!("<p>hello from {machine} ({machine})</p>")
        );
    }

    assert_eq!(planned(&bed), all("nothing"));
    let converged = bed.ok(&["up"]);
    assert!(converged.contains("nothing to do"), "{converged}");
    assert_eq!(
        runs(&bed, "web-1"),
        (1, 1),
        "a converged up ran a provisioner"
    );

    bed.write(
        "templates/index.html.j2",
        "<p>{{ greeting }}, edited ({{ inventory_hostname }})</p>\n",
    );
    assert_eq!(
        planned(&bed),
        expect(&[
            ("web-1", "shell setup.sh", "nothing"),
            ("web-1", "ansible site.yml", "run"),
            ("web-2", "shell setup.sh", "nothing"),
            ("web-2", "ansible site.yml", "run"),
        ])
    );
    bed.ok(&["up"]);
    for machine in ["web-1", "web-2"] {
        assert_eq!(runs(&bed, machine), (1, 2), "{machine} after the edit");
        assert_eq!(
            page(&bed, machine),
            format!("<p>hello from {machine}, edited ({machine})</p>")
        );
    }

    let ping = bed.user_shell("ansible all -m ping -i <(testbed inventory)");
    let said = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success(),
        "ansible ping failed: {said}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    for machine in ["web-1", "web-2"] {
        assert!(said.contains(&format!("{machine} | SUCCESS")), "{said}");
    }

    // A machine booted again from its disk keeps what ran on it.
    bed.ok(&["halt", "web-2"]);
    bed.ok(&["up"]);
    assert_eq!(
        runs(&bed, "web-2"),
        (1, 2),
        "web-2's provisioners ran again after a halt"
    );
    assert_eq!(
        planned(&bed),
        all("nothing"),
        "the record lost what ran on web-2"
    );

    let script = std::fs::read_to_string(repo().join("examples/provision/setup.sh")).expect("read");
    bed.write("setup.sh", &format!("{script}echo boom\nexit 3\n"));
    let forced = bed.testbed(&["provision", "--force", "web-1"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        !forced.status.success(),
        "a failing script passed: {stderr}"
    );
    assert!(
        stderr.contains("web-1: shell setup.sh failed (exit status 3)")
            && stderr.contains("| boom"),
        "{stderr}"
    );
    assert_eq!(
        runs(&bed, "web-1"),
        (2, 2),
        "--force ran the script, then stopped"
    );
    bed.write("setup.sh", &script);
    assert_eq!(
        planned(&bed),
        expect(&[
            ("web-1", "shell setup.sh", "run"),
            ("web-1", "ansible site.yml", "nothing"),
            ("web-2", "shell setup.sh", "nothing"),
            ("web-2", "ansible site.yml", "nothing"),
        ]),
        "the failed script runs again, mended as it was"
    );
    let up = bed.ok(&["up"]);
    assert!(up.contains("web-1: shell setup.sh ran"), "{up}");
    assert_eq!(runs(&bed, "web-1"), (3, 2));
}
