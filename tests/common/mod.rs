//! Shared by the end-to-end tests: a testbed in a temp dir, destroyed on
//! drop even when an assertion fails.
#![allow(dead_code)]

pub mod libvirtd;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Output;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Bed {
    dir: tempfile::TempDir,
    /// Run testbed inside this libvirtd's network namespace, with its URI.
    libvirtd: Option<(String, String)>,
}

impl Bed {
    /// A testbed whose topology file has `topology` as its text.
    pub fn new(topology: &str) -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("topology.toml"), topology).expect("write topology");
        Bed {
            dir,
            libvirtd: None,
        }
    }

    /// A testbed whose commands run inside `libvirtd`'s network namespace
    /// (where its guests' forwarded ports are) and talk to it.
    pub fn with_libvirtd(topology: &str, libvirtd: &libvirtd::PrivateLibvirtd) -> Bed {
        let mut bed = Bed::new(topology);
        bed.libvirtd = Some((libvirtd.netns.clone(), libvirtd.uri.clone()));
        bed
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn testbed(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run testbed")
    }

    /// The command `testbed ARGS` in this bed (not started).
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let binary = assert_cmd::cargo::cargo_bin("testbed");
        let mut command = match &self.libvirtd {
            Some((netns, uri)) => {
                let mut command = std::process::Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&binary);
                command.env("TESTBED_LIBVIRT_URI", uri);
                command
            }
            None => std::process::Command::new(&binary),
        };
        command
            .current_dir(self.path())
            .env("TESTBED_IMAGES", repo().join("images"))
            .env("TESTBED_DAEMONS", repo().join("daemons"))
            .args(args);
        command
    }

    /// Runs testbed and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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

    /// (name, state) of every machine, from `status --json`.
    pub fn states(&self) -> Vec<(String, String)> {
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
pub fn processes_mentioning(needle: &str) -> Vec<String> {
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
