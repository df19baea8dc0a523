use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::progress::Progress;
use crate::settings::Settings;

/// Power machines off, keeping their disks (`up` resumes them)
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed halt\n  testbed halt beta")]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// Machines to halt (default: all)
    machines: Vec<String>,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    let halted = testbed.halt(&args.machines, &Progress::new()).await?;
    if halted.is_empty() {
        out!("nothing to halt: no machine was running")?;
    } else {
        out!("halted: {}", halted.join(", "))?;
    }
    Ok(ExitCode::SUCCESS)
}
