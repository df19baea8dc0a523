use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::plan::{DaemonAction, ProvisionerAction};
use crate::progress::Progress;
use crate::settings::Settings;

/// Re-render and push kit files; restart what changed, start what is not
/// running; run the provisioners whose script, playbook or inputs changed
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed provision\n  testbed provision zk-2\n  \
                  testbed provision --force zk-2    # run zk-2's provisioners again"
)]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// Run every provisioner of the machines again, changed or not
    #[arg(long)]
    force: bool,
    /// Machines to provision (default: all)
    machines: Vec<String>,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate(args.at.file.as_deref(), settings)?;
    let done = testbed
        .provision(&args.machines, args.force, &Progress::new())
        .await?;
    if done.daemons.is_empty() && done.provisioners.is_empty() {
        out!("no daemons or provisioners to provision")?;
    }
    for outcome in done.daemons {
        let what = match outcome.action {
            DaemonAction::Start => "started",
            DaemonAction::Restart => "restarted (its files changed)",
            DaemonAction::Stop => "stopped and disabled (no longer in its daemons)",
            DaemonAction::Nothing => "unchanged, running",
        };
        out!("{}: {} {what}", outcome.machine, outcome.daemon)?;
    }
    for outcome in done.provisioners {
        let what = match outcome.action {
            ProvisionerAction::Run => "ran",
            ProvisionerAction::Nothing => "unchanged since it last ran",
        };
        out!("{}: {} {what}", outcome.machine, outcome.provisioner)?;
    }
    Ok(ExitCode::SUCCESS)
}
