use std::process::ExitCode;

use crate::inventory::{Format, Inventory, PIPE_PREAMBLE};
use crate::lifecycle::{configured_machines, Testbed};
use crate::settings::Settings;

/// Print an Ansible inventory of the machines (reached through testbed's
/// ssh config, host keys pinned; a group per kit and per network)
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  ansible all -m ping -i <(testbed inventory)\n  \
                        testbed inventory > inventory.ini && ansible-playbook -i inventory.ini site.yml\n  \
                        testbed inventory --format yaml > inventory.yml"
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// Default: ini, or yaml into a pipe (`-i <(testbed inventory)`); yaml and json need a
    /// file named .yml, .yaml, .json or without an extension
    #[arg(long, value_enum)]
    format: Option<Format>,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let config = testbed.state.ssh_config();
    let text = std::fs::read_to_string(&config)
        .map_err(|e| anyhow::anyhow!("no SSH config yet ({e}): run `testbed up` first"))?;
    let reached = configured_machines(&text);
    let inventory = Inventory::of(&testbed.topology, &reached, &config);
    let into_pipe = stdout_is_pipe();
    let format = args
        .format
        .unwrap_or(if into_pipe { Format::Yaml } else { Format::Ini });
    if into_pipe && format != Format::Ini {
        out_raw!("{}", "\n".repeat(PIPE_PREAMBLE))?;
    }
    out_raw!("{}", inventory.render(format))?;
    Ok(ExitCode::SUCCESS)
}

/// Whether standard output is a pipe, as in `-i <(testbed inventory)`.
fn stdout_is_pipe() -> bool {
    use nix::sys::stat::{fstat, SFlag};
    use std::os::fd::AsFd;
    fstat(std::io::stdout().as_fd())
        .is_ok_and(|stat| SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
}
