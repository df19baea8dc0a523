//! `halt`: a graceful power-off per machine, disks kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::progress::Progress;
use crate::provider::{Provider, VmState};
use crate::ssh::{Session, Target};
use crate::state::{Access, Desired};

use super::destroy::{remove_networks, stop_control_master};
use super::{all_succeeded, blocking, join_machines, observe, Result, Testbed};

/// How long a guest gets to power off by itself before it is stopped.
const HALT_TIMEOUT: Duration = Duration::from_secs(60);

impl Testbed {
    /// Powers machines off: the guest shuts down by itself when it can,
    /// and is stopped after `HALT_TIMEOUT` when it does not.
    pub async fn halt(&self, names: &[String], progress: &Progress) -> Result<Vec<String>> {
        let _lock = self.lock(Access::Exclusive)?;
        let machines = self.select(names)?;
        let mut record = self.state.load()?;
        let mut halted = Vec::new();
        let mut tasks = Vec::new();
        for machine in machines {
            let provider = self.provider_of(&machine)?;
            let dir = self.state.machine_dir(&machine.name);
            if let Some(saved) = record.machines.get_mut(&machine.name) {
                saved.desired = Desired::Stopped;
            }
            if provider.state(&dir) != VmState::Running {
                continue;
            }
            let port = record
                .machines
                .get(&machine.name)
                .map(|r| r.ssh_port)
                .unwrap_or(0);
            let target = self.ssh_target(&machine, port)?;
            let task = progress.task(&machine.name);
            let state = self.state.clone();
            tasks.push(tokio::spawn(async move {
                task.set("powering off");
                stop_control_master(&state, &machine.name).await;
                let result = power_off(provider, dir, target).await;
                task.finish(if result.is_ok() {
                    "stopped"
                } else {
                    "stop failed"
                });
                (machine.name, result)
            }));
        }
        self.state.save(&record)?;
        let (done, failures) = join_machines(tasks).await;
        halted.extend(done.into_iter().map(|(name, ())| name));
        if !self.any_running() {
            remove_networks(&self.state, &mut record, &self.provider_settings())?;
            self.state.save(&record)?;
        }
        all_succeeded(failures).map(|()| halted)
    }

    fn any_running(&self) -> bool {
        self.topology.machines.iter().any(|machine| {
            self.provider_of(machine)
                .map(|p| p.state(&self.state.machine_dir(&machine.name)) == VmState::Running)
                .unwrap_or(false)
        })
    }
}

/// Asks the guest to power off over SSH; stops the VM when it has not gone
/// within the timeout, or at once when SSH does not answer.
async fn power_off(provider: Box<dyn Provider>, dir: PathBuf, target: Target) -> Result<()> {
    let provider: Arc<dyn Provider> = Arc::from(provider);
    if let Ok(session) = Session::connect(&target, Duration::from_secs(10)).await {
        // The connection drops as the guest goes down: the result is moot.
        let _ = session.exec("systemctl poweroff --no-block").await;
        session.close().await;
        let deadline = Instant::now() + HALT_TIMEOUT;
        while Instant::now() < deadline && observe(provider.clone(), &dir).await == VmState::Running
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    blocking(move || provider.kill(&dir)).await?;
    Ok(())
}
