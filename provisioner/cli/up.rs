use std::path::PathBuf;
use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::progress::Progress;
use crate::topology::ProviderKind;

/// Build images, boot the machines and give each its identity
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed up topologies/quickstart.toml\n  \
                        testbed up            # again: resumes halted machines, or does nothing\n  \
                        testbed up --provider libvirt topologies/zk-ensemble.toml")]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    /// The topology file (default: the testbed in the current directory)
    topology: Option<PathBuf>,
    /// Run every machine on this provider, whatever the topology says
    #[arg(long, value_parser = ["qemu", "libvirt", "virtualbox"])]
    provider: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut testbed = match args.topology.as_deref().or(args.at.file.as_deref()) {
        Some(path) => Testbed::open(path)?,
        None => Testbed::locate(None)?,
    };
    if let Some(provider) = &args.provider {
        let kind: ProviderKind = serde_json::from_value(serde_json::json!(provider))?;
        testbed.use_provider(kind)?;
    }
    let progress = Progress::new();
    let report = testbed.up(&progress).await?;
    let name = &testbed.topology.name;
    if let Some(build) = &report.build {
        println!("{build}");
    }
    let built = matches!(report.build, Some(crate::build::BuildOutcome::Built { .. }));
    if report.changed.is_empty() && built {
        println!(
            "testbed {name} is up: the build refreshed dist/, {} machine(s) running unchanged",
            report.unchanged.len()
        );
    } else if report.changed.is_empty() {
        println!(
            "testbed {name} is up to date: {} machine(s) running, nothing to do",
            report.unchanged.len()
        );
    } else {
        println!(
            "testbed {name} is up: {} machine(s) brought up ({}), {} already running",
            report.changed.len(),
            report.changed.join(", "),
            report.unchanged.len()
        );
        println!(
            "next: testbed status | testbed ssh {} | testbed halt",
            report.changed[0]
        );
    }
    for outcome in &report.daemons {
        let action = format!("{:?}", outcome.action).to_lowercase();
        println!("{}: {} {action}", outcome.machine, outcome.daemon);
    }
    match &report.checks {
        Some(checks) => super::verify::print_report(checks, name, false, None),
        None => Ok(ExitCode::SUCCESS),
    }
}
