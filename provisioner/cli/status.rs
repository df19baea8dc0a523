use std::process::ExitCode;

use crate::lifecycle::{MachineState, Testbed};
use crate::settings::Settings;

/// Show each machine's state, like `vagrant status`
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed status\n  testbed status --json | jq '.[] | select(.state != \"running\")'"
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// Print a JSON array of {name, state, provider, host, ssh, ips, in_topology},
    /// with `console: {log, lines}` for a crashed machine and
    /// `networks_down: [NAME]` for one cut off from a network
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let machines = testbed.status()?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&machines)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out!("Current machine states ({}):\n", testbed.topology.name)?;
    for machine in &machines {
        let ips: Vec<String> = machine.ips.values().map(|ip| ip.to_string()).collect();
        let removed = if machine.in_topology {
            ""
        } else {
            "  (no longer in the topology: `testbed destroy` removes it)"
        };
        let runner = match &machine.host {
            Some(host) => format!("{} on {host}", machine.provider),
            None => machine.provider.clone(),
        };
        out!(
            "{:<20} {:<12} ({runner}) {} {}{removed}",
            machine.name,
            machine.state.as_str(),
            machine
                .ssh
                .as_deref()
                .map(|s| format!("ssh {s}"))
                .unwrap_or_default(),
            ips.join(" ")
        )?;
    }
    let faults = testbed.faults()?;
    if !faults.is_empty() {
        out!(
            "\nfaults in force: {} (`testbed fault heal` undoes partitions and link \
             faults, `testbed fault resume MACHINE` a pause)",
            faults.join(", ")
        )?;
    }
    let cut_off: Vec<&str> = machines
        .iter()
        .filter(|m| !m.networks_down.is_empty() && m.state == MachineState::Running)
        .map(|m| m.name.as_str())
        .collect();
    let mut down: Vec<&str> = machines
        .iter()
        .flat_map(|m| m.networks_down.iter().map(String::as_str))
        .collect();
    down.sort();
    down.dedup();
    if !down.is_empty() {
        out!(
            "\nnetwork {} is down (its switch is gone): {} cannot reach each other there\n\
             `testbed up` restarts it and reboots those machines from their disks to reconnect them",
            down.join(", "),
            if cut_off.is_empty() { "the machines".to_string() } else { cut_off.join(", ") }
        )?;
    }
    for machine in &machines {
        if let Some(console) = &machine.console {
            out!(
                "\n{} crashed (its VM is gone); last console lines ({}):",
                machine.name,
                console.log.display()
            )?;
            for line in &console.lines {
                out!("  {line}")?;
            }
            out!("`testbed up` boots it again and re-provisions it")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
