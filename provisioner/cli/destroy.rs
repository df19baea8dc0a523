use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use crate::lifecycle;
use crate::progress::Progress;
use crate::settings::Settings;
use crate::state::StateDir;

/// Remove every VM, disk, network, process and the state of the testbed
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed destroy\n  testbed destroy -f    # no question asked")]
pub struct Args {
    /// Do not ask for confirmation
    #[arg(short = 'f', long)]
    force: bool,
    /// The topology file (default: the testbed of `.testbed/` in the current directory)
    #[arg(long = "file", value_name = "FILE")]
    pub(super) file: Option<std::path::PathBuf>,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    // Works from `.testbed/` alone, so a deleted or broken topology file
    // never leaves VMs behind that nothing can remove.
    let state = match args.file.as_deref() {
        Some(file) => {
            let dir = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
            StateDir::beside(dir.parent().unwrap_or_else(|| Path::new(".")))
        }
        None => StateDir::find(&std::env::current_dir()?)?,
    };
    if !state.exists() {
        out!("nothing to destroy: no {}", state.root().display())?;
        return Ok(ExitCode::SUCCESS);
    }
    if !args.force && !confirmed(&state)? {
        out!("destroy cancelled")?;
        return Ok(ExitCode::FAILURE);
    }
    let removed = lifecycle::destroy(&state, settings, &Progress::new()).await?;
    out!(
        "destroyed {} machine(s); removed {}",
        removed.len(),
        state.root().display()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn confirmed(state: &StateDir) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "destroy removes every machine of {}: pass -f to confirm when not at a terminal",
            state.root().display()
        );
    }
    print!(
        "Destroy every machine of {}? [y/N] ",
        state.root().display()
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
