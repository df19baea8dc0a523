use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use crate::lifecycle::Testbed;
use crate::model::Machine;
use crate::settings::Settings;
use crate::ssh::shell_quote;

/// Show a machine's daemon journals, or its serial console
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed logs zk-1               # every daemon of zk-1\n  \
                        testbed logs zk-1 zookeeper -n 50\n  \
                        testbed logs zk-1 zookeeper -f    # follow (Ctrl-C ends)\n  \
                        testbed logs zk-1 --console      # the serial console, from the host"
)]
pub struct Args {
    /// The topology file (default: the testbed of `.testbed/` in the current directory)
    #[arg(long = "file", value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    /// The machine
    machine: String,
    /// One of its daemons (default: all of them)
    daemon: Option<String>,
    /// Keep printing new lines as they come
    #[arg(short = 'f', long)]
    follow: bool,
    /// How many of the last lines to print
    #[arg(short = 'n', long, default_value_t = 100)]
    lines: usize,
    /// The machine's serial console log instead (works whatever the guest's state)
    #[arg(long, conflicts_with = "daemon")]
    console: bool,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.file.as_deref(), settings)?;
    let machine = testbed
        .select(std::slice::from_ref(&args.machine))?
        .remove(0);
    if args.console {
        return console(&testbed, &machine, &args);
    }
    let units = testbed.daemon_units(&machine, args.daemon.as_deref())?;
    if units.is_empty() {
        anyhow::bail!(
            "{} runs no daemons; `testbed logs {} --console` shows its console",
            args.machine,
            args.machine
        );
    }
    let mut command = format!("journalctl --no-pager --output=short-iso -n {}", args.lines);
    for unit in &units {
        command.push_str(&format!(" -u {}", shell_quote(unit)));
    }
    if args.follow {
        command.push_str(" -f");
    }
    // Following wants a terminal, so Ctrl-C reaches journalctl in the guest.
    let tty = args.follow && std::io::stdin().is_terminal();
    super::ssh::exec_ssh(&testbed, &args.machine, Some(&command), tty)
}

/// The last lines of the console log; with `--follow`, then what is added.
fn console(testbed: &Testbed, machine: &Machine, args: &Args) -> anyhow::Result<ExitCode> {
    let layout = testbed.state.machine(&args.machine);
    testbed.fetch_console(machine)?;
    let path = layout.console_log();
    let mut file = std::fs::File::open(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} ({} has not booted yet?)",
            path.display(),
            args.machine
        )
    })?;
    out!("{}", layout.console_tail(args.lines))?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut at = file.seek(SeekFrom::End(0))?;
    let mut chunk = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        testbed.fetch_console(machine)?;
        // A fetched log is a new file each time; a log replaced by a new
        // boot starts again from its beginning.
        file = std::fs::File::open(&path)?;
        if file.metadata()?.len() < at {
            at = 0;
        }
        chunk.clear();
        file.seek(SeekFrom::Start(at))?;
        at += file.read_to_end(&mut chunk)? as u64;
        if !chunk.is_empty() {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&chunk)?;
            stdout.flush()?;
        }
    }
}
