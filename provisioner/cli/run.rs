use std::io::Write;
use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::settings::Settings;
use crate::ssh::Stream;

/// Run a step (`[[steps]]`): its fault, its command on its machine, then its checks
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed run submit-hello\n  testbed run kill-hello --json\n  \
                        testbed -f topologies/slurm.toml run submit-hello"
)]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// The step's name
    step: String,
    /// Print the step's result and checks as JSON (the command's output goes to stderr)
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate(args.at.file.as_deref(), settings)?;
    let json = args.json;
    // The command's output as it comes; on stderr when stdout carries JSON.
    let echo = move |stream: Stream, bytes: &[u8]| {
        let _ = match (stream, json) {
            (Stream::Stdout, false) => std::io::stdout().write_all(bytes),
            _ => std::io::stderr().write_all(bytes),
        };
    };
    let report = testbed
        .run_step(&args.step, &crate::progress::Progress::new(), echo)
        .await?;
    let step = &report.step;
    let machine = step.command.as_ref().map(|c| c.machine.as_str());
    if json {
        let value = serde_json::json!({
            "step": step.name,
            "fault": report.fault,
            "machine": machine,
            "exit_status": report.exit_status,
            "seconds": report.seconds,
            "passed": report.passed(),
            "checks": report
                .checks
                .as_ref()
                .map(|c| c.json()["checks"].clone())
                .unwrap_or_else(|| serde_json::json!([])),
        });
        out!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        if let Some(fault) = &report.fault {
            out!("fault: {fault}")?;
        }
        let verdict = match (report.command_succeeded(), report.passed()) {
            (true, true) => "ok",
            (true, false) => "ran, but its checks FAILED",
            _ => "FAILED",
        };
        let place = machine.map(|m| format!(" on {m}")).unwrap_or_default();
        let status = report
            .exit_status
            .map(|s| format!("exit status {s}, "))
            .unwrap_or_default();
        out!(
            "step {}{place}: {verdict} ({status}{:.1} s)",
            step.name,
            report.seconds
        )?;
        match &report.checks {
            Some(checks) => out_raw!("{}", checks.table())?,
            None if !report.command_succeeded() && !step.checks.is_empty() => {
                out!("its checks were not run")?
            }
            None => {}
        }
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
