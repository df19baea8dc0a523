use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::plan::DaemonAction;
use crate::progress::Progress;
use crate::settings::Settings;

/// Re-render and push kit files; restart what changed, start what is not running
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed provision\n  testbed provision zk-2")]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// Machines to provision (default: all)
    machines: Vec<String>,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate(args.at.file.as_deref(), settings)?;
    let outcomes = testbed.provision(&args.machines, &Progress::new()).await?;
    if outcomes.is_empty() {
        out!("no daemons to provision")?;
    }
    for outcome in outcomes {
        let what = match outcome.action {
            DaemonAction::Start => "started",
            DaemonAction::Restart => "restarted (its files changed)",
            DaemonAction::Stop => "stopped and disabled (no longer in its daemons)",
            DaemonAction::Nothing => "unchanged, running",
        };
        out!("{}: {} {what}", outcome.machine, outcome.daemon)?;
    }
    Ok(ExitCode::SUCCESS)
}
