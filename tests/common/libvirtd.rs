//! A real libvirtd of the test's own, inside a network namespace the test
//! creates (tests/support/libvirtd-netns.sh), stopped and removed on drop.

use std::path::PathBuf;
use std::process::Command;

use super::repo;

/// Builds the images the machines of `topology` (a topology file's text)
/// boot, their kits' packages included, into the cache testbed uses, from
/// the test's own network namespace: a testbed run inside a libvirtd's
/// namespace has no route to the package mirror.
pub fn build_images_outside(topology: &str) {
    use std::collections::BTreeMap;
    use testbed::plan::{Inputs, Plan};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, topology).expect("topology");
    let search = testbed::settings::Search {
        images: Some(repo().join("images")),
        daemons: Some(repo().join("daemons")),
    };
    let topology = testbed::topology::load(&file, &search).expect("topology loads");
    let kits = testbed::kit::Kits::load(&topology, &search).expect("kits load");
    let cache_root = testbed::settings::Settings::from_env().cache_root;
    let plan = Plan::resolve(&Inputs {
        topology: &topology,
        record: &Default::default(),
        state: &testbed::state::StateDir::beside(dir.path()),
        kits: &kits,
        secrets: &BTreeMap::new(),
        providers: &testbed::provider::Settings {
            libvirt_uri: "qemu:///system".into(),
            cache_root: cache_root.clone(),
        },
        search: &search,
    })
    .expect("the plan resolves");
    let cache = testbed::image::Cache::at(cache_root);
    for machine in &plan.machines {
        cache
            .ensure(&machine.recipe, &mut |_| {})
            .unwrap_or_else(|e| panic!("image of {}: {e}", machine.name));
    }
}

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

    /// What libvirt holds: every domain, network and volume of the pool.
    pub fn inventory(&self) -> (String, String, String) {
        let volumes = if self
            .virsh(&["pool-list", "--all", "--name"])
            .contains("testbed")
        {
            self.virsh(&["vol-list", "testbed"])
        } else {
            String::new()
        };
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
