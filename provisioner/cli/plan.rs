use std::path::PathBuf;
use std::process::ExitCode;

use crate::image::{Cache, Recipe};
use crate::lifecycle::Testbed;

/// Validate a topology and show what `up` would do, touching nothing
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed plan topologies/quickstart.toml")]
pub struct Args {
    /// The topology file
    topology: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = args.topology.ok_or_else(|| {
        anyhow::anyhow!("which topology? e.g. `testbed plan topologies/quickstart.toml`")
    })?;
    let testbed = Testbed::open(&path)?;
    let topology = &testbed.topology;
    println!("topology {} ({})", topology.name, topology.path.display());
    for (name, network) in &topology.networks {
        println!("  network {name}: {} (private L2 segment)", network.subnet);
    }
    let cache = Cache::default();
    let states = if testbed.state.exists() {
        testbed.status()?
    } else {
        Vec::new()
    };
    for machine in &topology.machines {
        let image = match Recipe::find(&machine.image, topology.dir()) {
            Ok(recipe) if cache.lookup(&recipe).is_some() => format!("{} (cached)", recipe.key()),
            Ok(recipe) => format!("{} (to build)", recipe.key()),
            Err(e) => format!("{} ({e})", machine.image),
        };
        let state = states
            .iter()
            .find(|s| s.name == machine.name)
            .map(|s| s.state)
            .unwrap_or("not-created");
        let action = match state {
            "running" => "keep running (identity re-applied if it changed)",
            "stopped" | "crashed" => "boot from its disk",
            _ => "create disk, boot, apply identity",
        };
        let ips: Vec<String> = machine
            .ips
            .iter()
            .map(|(net, ip)| format!("{net}={ip}"))
            .collect();
        let forwards: Vec<String> = machine
            .forwards
            .iter()
            .map(|f| format!("127.0.0.1:{}->{}", f.host, f.guest))
            .collect();
        println!(
            "  machine {}: {} cpu, {} MiB, {}, image {image}\n    ips: {}  forwards: {}\n    now {state}: up would {action}",
            machine.name,
            machine.cpus,
            machine.memory_mib,
            machine.provider.as_str(),
            if ips.is_empty() { "-".into() } else { ips.join(" ") },
            if forwards.is_empty() { "-".into() } else { forwards.join(" ") },
        );
    }
    Ok(ExitCode::SUCCESS)
}
