use std::process::ExitCode;

use crate::lifecycle::Testbed;
use crate::settings::Settings;

/// Inject a fault into the running cluster, or heal it
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed fault partition zk-1 / zk-2 zk-3   # zk-1 cut off from the others\n  \
                        testbed fault heal                         # every link back"
)]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    #[command(subcommand)]
    fault: Fault,
}

#[derive(clap::Subcommand)]
enum Fault {
    /// Cut groups of machines (separated by `/`) off from each other on every
    /// network they share; a machine in no group keeps its links
    Partition {
        #[arg(required = true, num_args = 3.., value_name = "MACHINE… / MACHINE…")]
        groups: Vec<String>,
    },
    /// Undo every partition in force
    Heal,
    /// Stop a machine's VM at once, like a power failure
    Kill { machine: String },
    /// Bring killed machines back as `up` does: boot from disk, re-provision
    Start,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    match args.fault {
        Fault::Partition { groups } => {
            let groups: Vec<Vec<String>> = groups
                .split(|word| word == "/")
                .map(<[String]>::to_vec)
                .collect();
            let fault = testbed.partition(&groups)?;
            out!("in force: {fault}; `testbed fault heal` undoes it")?;
        }
        Fault::Kill { machine } => {
            testbed.kill_machine(&machine).await?;
            out!("{machine}: killed; `testbed fault start` (or `up`) brings it back")?;
        }
        Fault::Start => {
            let testbed = Testbed::locate(args.at.file.as_deref(), settings)?;
            let report = testbed.up(&crate::progress::Progress::new(), None).await?;
            let started = report.changed();
            if started.is_empty() {
                out!("nothing to start: every machine runs")?;
            } else {
                out!("started: {}", started.join(", "))?;
            }
        }
        Fault::Heal => {
            let healed = testbed.heal()?;
            if healed.is_empty() {
                out!("no fault was in force")?;
            } else {
                out!("healed: {}", healed.join(", "))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
