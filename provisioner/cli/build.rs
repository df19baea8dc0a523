use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::progress::Progress;
use crate::settings::Settings;

/// Run the build step alone (`[build]`): skipped when its inputs are unchanged
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed build            # rebuild dist/ if an input changed\n  \
                        testbed build --force    # rebuild anyway\n  \
                        testbed build && testbed provision   # push the new artifacts"
)]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// Build even when the inputs are unchanged
    #[arg(long)]
    force: bool,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate(args.at.file.as_deref(), settings)?;
    let outcome = testbed.build(args.force, &Progress::new()).await?;
    out!("{outcome}")?;
    Ok(ExitCode::SUCCESS)
}
