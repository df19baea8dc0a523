//! A real libvirtd of the test's own, inside a network namespace the test
//! creates (tests/support/libvirtd-netns.sh), stopped and removed on drop.

use std::path::PathBuf;
use std::process::Command;

use super::repo;

pub struct PrivateLibvirtd {
    pub netns: String,
    pub uri: String,
    /// Made by us, 0700, with a random name: no other user can plant links.
    dir: tempfile::TempDir,
}

impl PrivateLibvirtd {
    /// Starts one, or says why it cannot start here.
    pub fn start(name: &str) -> Result<PrivateLibvirtd, String> {
        // Short: the socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("tb-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("cannot make a folder in /tmp: {e}"))?;
        let netns = format!("tb-{name}-{}", std::process::id());
        let output = Command::new(script())
            .args(["start", &netns])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        let daemon = PrivateLibvirtd {
            netns,
            uri: String::from_utf8_lossy(&output.stdout).trim().to_string(),
            dir,
        };
        if !output.status.success() {
            return Err(format!(
                "libvirtd-netns.sh start failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(daemon)
    }

    /// `virsh -c URI ARGS…`, stdout (which must succeed).
    pub fn virsh(&self, args: &[&str]) -> String {
        let output = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .expect("run virsh");
        assert!(
            output.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The names of the volumes in testbed's pool (none without a pool).
    pub fn volumes(&self) -> Vec<String> {
        if !self
            .virsh(&["pool-list", "--all", "--name"])
            .lines()
            .any(|pool| pool.trim() == "testbed")
        {
            return Vec::new();
        }
        self.virsh(&["vol-list", "testbed"])
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// What libvirt holds: every domain, network and volume of the pool but
    /// the images' (`tb-img-…`), which stay for the next `up` as the images
    /// stay in testbed's cache.
    pub fn inventory(&self) -> (String, String, Vec<String>) {
        let volumes = self
            .volumes()
            .into_iter()
            .filter(|volume| !volume.starts_with("tb-img-"))
            .collect();
        (
            self.virsh(&["list", "--all", "--name"]),
            self.virsh(&["net-list", "--all", "--name"]),
            volumes,
        )
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", &self.netns])
            .arg(self.dir.path())
            .status();
    }
}

fn script() -> PathBuf {
    repo().join("tests/support/libvirtd-netns.sh")
}
