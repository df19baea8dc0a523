//! `destroy`: removes every machine, network and process of a testbed.

use crate::progress::Progress;
use crate::provider::{self, NetworkSpec};
use crate::settings::Settings;
use crate::state::{Access, Record, StateDir, StateError};

use super::ssh_config::{master_pid_path, CONTROL_MASTER_MARKER};
use super::{blocking, take_lock, Result};

/// Takes down every network the record says is up (once no machine runs),
/// and any network folder the record missed (an `up` killed mid-way), with
/// the default provider.
pub(super) fn remove_networks(
    state: &StateDir,
    record: &mut Record,
    settings: &provider::Settings,
) -> Result<()> {
    let mut networks = std::mem::take(&mut record.networks);
    if let Ok(entries) = std::fs::read_dir(state.root().join("networks")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            networks.entry(name).or_default();
        }
    }
    for (name, recorded) in networks {
        let dir = state.network_dir(&name);
        let kind = provider::which_made(&dir, settings).unwrap_or(recorded);
        provider::for_kind(kind, settings)?.remove_network(&NetworkSpec {
            dir,
            name,
            across_hosts: false,
        })?;
    }
    Ok(())
}

/// Removes every machine, network and process of the testbed, from what is
/// on disk (so it works even when the topology file is gone or broken).
/// `settings`: the command's; destroy needs no topology, so a libvirt
/// machine is reached at `$TESTBED_LIBVIRT_URI` or the default URI.
pub async fn destroy(
    state: &StateDir,
    settings: &Settings,
    progress: &Progress,
) -> Result<Vec<String>> {
    let _lock = take_lock(state, Access::Exclusive, settings)?;
    let settings = provider::Settings::new(None, settings);
    // A corrupt record must not stand in the way of removing what is there;
    // a newer testbed's may name what this one cannot remove, so it is left.
    let mut record = match state.load() {
        Err(newer @ StateError::Newer { .. }) => return Err(newer.into()),
        loaded => loaded.unwrap_or_default(),
    };
    let mut removed = Vec::new();
    let machines_dir = state.root().join("machines");
    let names: Vec<String> = std::fs::read_dir(&machines_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        let dir = state.machine_dir(&name);
        let recorded = record.machines.get(&name).map(|r| r.provider);
        let kind = provider::which_made(&dir, &settings)
            .or(recorded)
            .unwrap_or_default();
        let provider = provider::for_kind(kind, &settings)?;
        let task = progress.task(&name);
        task.set("destroying");
        stop_control_master(state, &name).await;
        blocking(move || provider.destroy(&dir)).await?;
        task.finish("destroyed");
        removed.push(name);
    }
    remove_networks(state, &mut record, &settings)?;
    // Removed while the lock is held (the lock file goes with the folder).
    state.remove()?;
    Ok(removed)
}

/// Closes the OpenSSH ControlMaster that `testbed ssh` keeps per machine,
/// and the one `up` started if it is still authenticating.
pub(super) async fn stop_control_master(state: &StateDir, name: &str) {
    crate::process::request_stop(&master_pid_path(state, name), CONTROL_MASTER_MARKER);
    let config = state.ssh_config();
    if !config.is_file() {
        return;
    }
    let _ = tokio::process::Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-O", "exit", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}
