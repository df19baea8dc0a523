use std::process::ExitCode;

use crate::inventory::{Format, Inventory};
use crate::lifecycle::Testbed;
use crate::settings::Settings;

/// Print an Ansible inventory of the machines (reached through testbed's
/// ssh config, host keys pinned; a group per kit and per network)
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  ansible all -m ping -i <(testbed inventory)\n  \
                        testbed inventory --format yaml > inventory.yml\n  \
                        ansible-playbook -i inventory.yml site.yml"
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// ini reads from a pipe; yaml and json from a file named .yml or .json
    #[arg(long, value_enum, default_value = "ini")]
    format: Format,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let config = testbed.state.ssh_config();
    let text = std::fs::read_to_string(&config)
        .map_err(|e| anyhow::anyhow!("no SSH config yet ({e}): run `testbed up` first"))?;
    // The machines the ssh config reaches: those that were brought up.
    let reached: Vec<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("Host "))
        .map(str::to_owned)
        .collect();
    let inventory = Inventory::of(&testbed.topology, &reached, &config);
    out_raw!("{}", inventory.render(args.format))?;
    Ok(ExitCode::SUCCESS)
}
