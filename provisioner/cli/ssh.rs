use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use crate::lifecycle::MachineState;
use crate::lifecycle::{self, Testbed};
use crate::settings::Settings;

/// Open a shell on a machine, or run one command there
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed ssh alpha\n  testbed ssh alpha -- hostname\n  \
                        testbed ssh alpha -- 'echo stat | nc localhost 2181'"
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// The machine
    machine: String,
    /// A command to run instead of a shell (words joined by spaces, run by the guest's shell)
    #[arg(last = true)]
    command: Vec<String>,
}

/// Print an OpenSSH config for the machines (host keys pinned)
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed ssh-config >> ~/.ssh/config\n  \
                        ssh -F <(testbed ssh-config) alpha")]
pub struct ConfigArgs {
    #[command(flatten)]
    at: super::At,
    /// Only this machine
    machine: Option<String>,
}

/// Replaces this process with the system `ssh`, so the terminal, agent and
/// escape keys behave as with plain ssh, and its exit status is the command's.
pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let command = (!args.command.is_empty()).then(|| args.command.join(" "));
    exec_ssh(&testbed, &args.machine, command.as_deref(), false)
}

/// Becomes the system `ssh` to the running `machine` (with a terminal when
/// `tty`), running `command` there, or a shell without one.
pub(super) fn exec_ssh(
    testbed: &Testbed,
    machine: &str,
    command: Option<&str>,
    tty: bool,
) -> anyhow::Result<ExitCode> {
    testbed.select(&[machine.to_string()])?;
    let state = testbed
        .status()?
        .into_iter()
        .find(|m| m.name == machine)
        .map(|m| m.state)
        .unwrap_or(MachineState::NotCreated);
    match state {
        MachineState::Running => {}
        MachineState::Paused => {
            anyhow::bail!("{machine} is paused: `testbed fault resume {machine}` runs it again")
        }
        _ => anyhow::bail!("{machine} is {}: run `testbed up` first", state.as_str()),
    }
    lifecycle::wait_for_control_master(&testbed.state, machine);
    let config = testbed.state.ssh_config();
    if !config.is_file() {
        anyhow::bail!("{machine} has no SSH config yet: run `testbed up` first");
    }
    let mut ssh = Command::new("ssh");
    ssh.arg("-F").arg(&config);
    if tty {
        ssh.arg("-t");
    }
    ssh.arg(machine);
    if let Some(command) = command {
        ssh.arg("--").arg(command);
    }
    let error = ssh.exec();
    anyhow::bail!("cannot run ssh: {error} (install openssh-client)")
}

pub fn config(args: ConfigArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let text = std::fs::read_to_string(testbed.state.ssh_config())
        .map_err(|e| anyhow::anyhow!("no SSH config yet ({e}): run `testbed up` first"))?;
    match args.machine {
        None => out_raw!("{text}")?,
        Some(name) => {
            testbed.select(std::slice::from_ref(&name))?;
            let block = text
                .split("\n\n")
                .find(|block| block.lines().next() == Some(&format!("Host {name}")))
                .ok_or_else(|| {
                    anyhow::anyhow!("{name} has not been created yet: run `testbed up`")
                })?;
            out!("{block}\n")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
