//! The OpenSSH config `testbed ssh` uses, and the ControlMaster kept per machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process;
use crate::state::StateDir;

use super::Result;

/// Starts each machine's OpenSSH ControlMaster in the background, so the
/// first `testbed ssh` after `up` skips the key exchange like the next ones.
/// `up` does not wait for it (a handshake costs the guest about a second
/// under emulation); the pid of the authenticating `ssh -fN` is kept so that
/// `testbed ssh` can wait for the master instead of racing it.
pub(super) fn start_control_masters(state: &StateDir, names: &[String]) {
    for name in names {
        let spawned = std::process::Command::new("ssh")
            .arg("-F")
            .arg(state.ssh_config())
            .args([
                "-o",
                CONTROL_MASTER_MARKER,
                "-o",
                "BatchMode=yes",
                "-fN",
                name,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(child) = spawned {
            let _ = std::fs::write(master_pid_path(state, name), child.id().to_string());
        }
    }
}

pub(super) const CONTROL_MASTER_MARKER: &str = "ControlMaster=yes";

pub(super) fn master_pid_path(state: &StateDir, name: &str) -> PathBuf {
    state.machine(name).control_master_pid()
}

/// Waits (a few seconds at most) while the ControlMaster that `up` started
/// for `name` is still authenticating.
pub fn wait_for_control_master(state: &StateDir, name: &str) {
    wait_for_control_masters(state, std::slice::from_ref(&name.to_string()));
}

/// [`wait_for_control_master`] for each of `names`, within one deadline.
/// Riding a master beats a connection of one's own made beside it: two
/// key exchanges at once on a guest just booted took `verify` from 1 s to
/// 18 s here (libvirt, 3 TCG guests).
pub fn wait_for_control_masters(state: &StateDir, names: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let authenticating = |name: &String| {
        process::process_alive(&master_pid_path(state, name), CONTROL_MASTER_MARKER)
    };
    while names.iter().any(authenticating) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of a machine's ControlMaster socket.
pub fn control_path(state: &StateDir, name: &str) -> PathBuf {
    state.machine(name).control_socket()
}

/// Writes `ssh_config` and `known_hosts` for the system `ssh`: every host key
/// pinned under an alias (ports change across boots; the key does not), and
/// a ControlMaster per machine so repeated `testbed ssh` skip the handshake.
/// `addresses`: where each machine's SSH is reached (its provider says).
pub fn write_ssh_config(
    state: &StateDir,
    topology_name: &str,
    addresses: &BTreeMap<String, SocketAddr>,
) -> Result<()> {
    let mut config = String::new();
    let mut known_hosts = String::new();
    for (name, address) in addresses {
        let public =
            std::fs::read_to_string(state.machine(name).host_public_key()).unwrap_or_default();
        let alias = format!("testbed-{topology_name}-{name}");
        if let Some(key) = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .get(..2)
        {
            known_hosts.push_str(&format!("{alias} {} {}\n", key[0], key[1]));
        }
        config.push_str(&ssh_config_block(state, name, *address, &alias));
    }
    crate::state::write_atomic(&state.known_hosts(), known_hosts.as_bytes(), 0o644)?;
    crate::state::write_atomic(&state.ssh_config(), config.as_bytes(), 0o644)?;
    Ok(())
}

fn ssh_config_block(state: &StateDir, name: &str, address: SocketAddr, alias: &str) -> String {
    let (host, port) = (address.ip(), address.port());
    format!(
        "Host {name}\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  HostKeyAlias {alias}\n  \
         ControlMaster auto\n  ControlPath {control}\n  ControlPersist 10m\n  \
         ServerAliveInterval 15\n  ServerAliveCountMax 4\n  LogLevel ERROR\n\n",
        key = quote_ssh(&state.user_key()),
        known = quote_ssh(&state.known_hosts()),
        control = quote_ssh(&control_path(state, name)),
    )
}

/// ssh_config values with spaces must be double-quoted.
fn quote_ssh(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_config_pins_the_host_key_and_shares_one_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        let machine_dir = state.machine_dir("alpha");
        std::fs::create_dir_all(&machine_dir).expect("dir");
        std::fs::write(
            machine_dir.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAC3Nz root@alpha\n",
        )
        .expect("key");
        let addresses = BTreeMap::from([(
            "alpha".to_string(),
            SocketAddr::from(([127, 0, 0, 1], 2222)),
        )]);
        write_ssh_config(&state, "pair", &addresses).expect("write");
        let config = std::fs::read_to_string(state.ssh_config()).expect("config");
        assert!(config.contains("Host alpha\n"));
        assert!(config.contains("HostName 127.0.0.1\n  Port 2222"));
        assert!(config.contains("StrictHostKeyChecking yes"));
        assert!(config.contains("HostKeyAlias testbed-pair-alpha"));
        assert!(config.contains("ControlMaster auto"));
        let known = std::fs::read_to_string(state.known_hosts()).expect("known_hosts");
        assert_eq!(known, "testbed-pair-alpha ssh-ed25519 AAAAC3Nz\n");
    }
}
