//! The OpenSSH config `testbed ssh` uses, and the ControlMaster kept per machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process;
use crate::ssh::{shell_quote, Endpoint, Jump};
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
/// `endpoints`: where each machine's SSH is reached (its provider says).
pub fn write_ssh_config(
    state: &StateDir,
    topology_name: &str,
    endpoints: &BTreeMap<String, Endpoint>,
) -> Result<()> {
    let mut config = String::new();
    let mut known_hosts = String::new();
    for (name, endpoint) in endpoints {
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
        config.push_str(&ssh_config_block(state, name, endpoint, &alias));
    }
    crate::state::write_atomic(&state.known_hosts(), known_hosts.as_bytes(), 0o644)?;
    crate::state::write_atomic(&state.ssh_config(), config.as_bytes(), 0o644)?;
    Ok(())
}

/// The machines an ssh config written by [`write_ssh_config`] reaches.
pub fn configured_machines(config: &str) -> Vec<String> {
    config
        .lines()
        .filter_map(|line| line.strip_prefix("Host "))
        .map(str::to_owned)
        .collect()
}

fn ssh_config_block(state: &StateDir, name: &str, endpoint: &Endpoint, alias: &str) -> String {
    let (host, port) = (endpoint.addr.ip(), endpoint.addr.port());
    format!(
        "Host {name}\n  HostName {host}\n  Port {port}\n{proxy}  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  HostKeyAlias {alias}\n  \
         ControlMaster auto\n  ControlPath {control}\n  ControlPersist 10m\n  \
         ServerAliveInterval 15\n  ServerAliveCountMax 4\n  LogLevel ERROR\n\n",
        key = quote_ssh(&state.user_key()),
        known = quote_ssh(&state.known_hosts()),
        control = quote_ssh(&control_path(state, name)),
        proxy = endpoint
            .jump
            .as_ref()
            .map(|jump| format!("  ProxyCommand {}\n", proxy_command(jump)))
            .unwrap_or_default(),
    )
}

/// `ProxyCommand` (run by a shell): `ssh … -W %h:%p` through the jump host.
/// ssh expands `%` tokens in it first, so the jump's own (its ControlPath's
/// `%C`) are written `%%` to reach the inner ssh.
fn proxy_command(jump: &Jump) -> String {
    let escaped = |arg: &std::ffi::OsStr| shell_quote(&arg.to_string_lossy().replace('%', "%%"));
    let mut words = vec!["ssh".to_string()];
    words.extend(jump.ssh_args().iter().map(|arg| escaped(arg)));
    words.extend(["-W".to_string(), "%h:%p".to_string()]);
    words.push(escaped(std::ffi::OsStr::new(&jump.destination)));
    words.join(" ")
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
        let endpoints = BTreeMap::from([(
            "alpha".to_string(),
            Endpoint::local(([127, 0, 0, 1], 2222).into()),
        )]);
        write_ssh_config(&state, "pair", &endpoints).expect("write");
        let config = std::fs::read_to_string(state.ssh_config()).expect("config");
        assert!(config.contains("Host alpha\n"));
        assert!(config.contains("HostName 127.0.0.1\n  Port 2222"));
        assert!(config.contains("StrictHostKeyChecking yes"));
        assert!(config.contains("HostKeyAlias testbed-pair-alpha"));
        assert!(config.contains("ControlMaster auto"));
        let known = std::fs::read_to_string(state.known_hosts()).expect("known_hosts");
        assert_eq!(known, "testbed-pair-alpha ssh-ed25519 AAAAC3Nz\n");
        assert!(!config.contains("ProxyCommand"), "{config}");
    }

    #[test]
    fn a_machine_on_another_host_is_reached_through_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::beside(dir.path());
        state.create().expect("state folder");
        let jump = Jump {
            destination: "root@10.77.0.3".into(),
            port: None,
            identity: Some("/k/id host".into()),
            known_hosts: None,
            control: "/c/%C".into(),
        };
        let endpoints = BTreeMap::from([(
            "zk-3".to_string(),
            Endpoint {
                addr: ([127, 0, 0, 1], 40022).into(),
                jump: Some(jump),
            },
        )]);
        write_ssh_config(&state, "zk", &endpoints).expect("write");
        let config = std::fs::read_to_string(state.ssh_config()).expect("config");
        assert!(
            config.contains("HostName 127.0.0.1\n  Port 40022\n"),
            "{config}"
        );
        assert!(
            config.contains("  ProxyCommand ssh '-o' 'BatchMode=yes'"),
            "{config}"
        );
        assert!(config.contains("'ControlPath=/c/%%C'"), "{config}");
        assert!(
            config.contains(
                "'-i' '/k/id host' '-o' 'IdentitiesOnly=yes' -W %h:%p 'root@10.77.0.3'\n"
            ),
            "{config}"
        );
        // The guest's own key stays pinned behind the jump.
        assert!(config.contains("StrictHostKeyChecking yes\n  HostKeyAlias testbed-zk-zk-3"));
    }
}
