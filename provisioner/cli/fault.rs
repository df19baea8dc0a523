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
    /// Undo every fault in force
    Heal,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
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
