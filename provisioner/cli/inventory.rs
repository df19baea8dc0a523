use std::process::ExitCode;

use crate::inventory::{Format, Inventory};
use crate::lifecycle::{configured_machines, Testbed};
use crate::settings::Settings;

/// Print an Ansible inventory of the machines (reached through testbed's
/// ssh config, host keys pinned; a group per kit and per network)
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed inventory > inventory.ini && ansible all -m ping -i inventory.ini\n  \
                        testbed inventory --format yaml > inventory.yml\n  \
                        ansible-playbook -i inventory.yml site.yml\n\
                        Write it to a file: ansible-core 2.14 reads one from a pipe (-i <(…)) as empty."
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// yaml and json need a file named .yml, .yaml or .json
    #[arg(long, value_enum, default_value = "ini")]
    format: Format,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let config = testbed.state.ssh_config();
    let text = std::fs::read_to_string(&config)
        .map_err(|e| anyhow::anyhow!("no SSH config yet ({e}): run `testbed up` first"))?;
    let reached = configured_machines(&text);
    let inventory = Inventory::of(&testbed.topology, &reached, &config);
    out_raw!("{}", inventory.render(args.format))?;
    Ok(ExitCode::SUCCESS)
}
