//! Real libvirtds of the test's own, each inside a network namespace the
//! test creates (tests/support/libvirtd-netns.sh), stopped and removed on
//! drop; as "libvirt hosts", each also linked to a runner namespace and
//! serving `qemu+libssh://root@IP/system` with an sshd of its own.

use std::path::PathBuf;
use std::process::Command;

use super::repo;

pub struct PrivateLibvirtd {
    pub netns: String,
    pub uri: String,
    /// Made by us, 0700, with a random name: no other user can plant links.
    dir: tempfile::TempDir,
}

/// The namespace testbed runs in to reach libvirt hosts: a bridge at
/// 10.77.0.1/24 that every host's link joins, and the SSH key and known
/// hosts (owned by `user`, who runs testbed) for logging in to them.
pub struct Runner {
    pub netns: String,
    keys: tempfile::TempDir,
}

impl Runner {
    pub fn start(name: &str, user: Option<&nix::unistd::User>) -> Runner {
        let netns = format!("tb-{name}-{}", std::process::id());
        let status = Command::new(script())
            .args(["runner", &netns])
            .status()
            .expect("run libvirtd-netns.sh runner");
        assert!(status.success(), "libvirtd-netns.sh runner {netns} failed");
        let keys = tempfile::tempdir().expect("tempdir");
        let key = keys.path().join("id");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .expect("run ssh-keygen");
        assert!(made.success(), "ssh-keygen failed");
        std::fs::write(keys.path().join("known_hosts"), "").expect("known_hosts");
        let runner = Runner { netns, keys };
        if let Some(user) = user {
            for path in [
                runner.keys.path().to_path_buf(),
                key.clone(),
                key.with_extension("pub"),
                runner.known_hosts(),
            ] {
                nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).expect("chown");
            }
        }
        runner
    }

    fn key(&self) -> PathBuf {
        self.keys.path().join("id")
    }

    fn known_hosts(&self) -> PathBuf {
        self.keys.path().join("known_hosts")
    }

    /// The URI testbed gives a host at `ip`: libvirt's libssh transport,
    /// which takes the known hosts file (its `ssh` transport does not).
    fn uri(&self, ip: &str) -> String {
        format!(
            "qemu+libssh://root@{ip}/system?keyfile={}&known_hosts={}",
            self.key().display(),
            self.known_hosts().display()
        )
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop-runner", &self.netns])
            .status();
    }
}

impl PrivateLibvirtd {
    /// Starts one, or says why it cannot start here.
    pub fn start(name: &str) -> Result<PrivateLibvirtd, String> {
        PrivateLibvirtd::start_with(name, &[], None)
    }

    /// Starts one as a libvirt host at `ip` on `runner`'s bridge, its sshd
    /// letting in the runner's key and pinned in the runner's known hosts.
    /// Returns it with the URI testbed reaches it by from the runner.
    pub fn start_host(
        name: &str,
        ip: &str,
        runner: &Runner,
    ) -> Result<(PrivateLibvirtd, String), String> {
        let daemon = PrivateLibvirtd::start_with(
            name,
            &[ip, &runner.netns],
            Some(runner.key().with_extension("pub")),
        )?;
        let host_key = std::fs::read_to_string(daemon.dir.path().join("ssh/host_key.pub"))
            .map_err(|e| format!("the host key of {name}: {e}"))?;
        let key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        let mut known = std::fs::read_to_string(runner.known_hosts()).unwrap_or_default();
        known.push_str(&format!("{ip} {}\n", key.join(" ")));
        std::fs::write(runner.known_hosts(), known).map_err(|e| e.to_string())?;
        Ok((daemon, runner.uri(ip)))
    }

    fn start_with(
        name: &str,
        host: &[&str],
        authorized_keys: Option<PathBuf>,
    ) -> Result<PrivateLibvirtd, String> {
        // Short: the socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("tb-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("cannot make a folder in /tmp: {e}"))?;
        let netns = format!("tb-{name}-{}", std::process::id());
        let mut start = Command::new(script());
        start.args(["start", &netns]).arg(dir.path()).args(host);
        if let Some(keys) = authorized_keys {
            start.env("AUTHORIZED_KEYS", keys);
        }
        let output = start
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
