use std::path::PathBuf;
use std::process::ExitCode;

use crate::check::Report;
use crate::lifecycle::Testbed;
use crate::settings::Settings;

/// Run the topology's checks: a table with pass/fail and durations
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed verify\n  testbed verify --json\n  \
                        testbed verify --junit checks.xml"
)]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// Print the results as JSON
    #[arg(long)]
    json: bool,
    /// Also write the results as a JUnit XML file
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    if testbed.topology.checks.is_empty() {
        out!(
            "{} has no [[checks]]: nothing to verify",
            testbed.topology.name
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = testbed.verify().await?;
    print_report(
        &report,
        &testbed.topology.name,
        args.json,
        args.junit.as_deref(),
    )
}

/// Prints a check report the way `verify` and `up` do; exit status 1 when
/// any check failed.
pub fn print_report(
    report: &Report,
    suite: &str,
    json: bool,
    junit: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = junit {
        std::fs::write(path, report.junit(suite))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&report.json())?)?;
    } else {
        out_raw!("{}", report.table())?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
