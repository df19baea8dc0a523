use std::process::ExitCode;
use std::time::Duration;

use crate::lifecycle::{Testbed, UpOptions};
use crate::model::fault::parse_loss;
use crate::model::{Fault, LinkShape};
use crate::progress::Progress;
use crate::settings::Settings;

/// Inject a fault into the running cluster, or heal it
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    testbed fault partition zk-1 / zk-2 zk-3   # zk-1 cut off from the others\n  \
    testbed fault link zk-3 --delay 300ms      # what zk-3 sends arrives 300 ms late\n  \
    testbed fault link zk-3 --loss 10% --delay 50ms --jitter 20ms\n  \
    testbed fault heal                         # every partition and link back\n  \
    testbed fault kill zk-2                    # a power failure\n  \
    testbed fault start zk-2                   # booted and provisioned again\n  \
    testbed fault pause zk-1                   # frozen; `resume` sets its clock again\n\n\
    `testbed status` lists the faults in force. A step can carry the same \
    faults: `fault = { partition = [[\"zk-1\"], [\"zk-2\", \"zk-3\"]] }`.")]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    #[command(subcommand)]
    fault: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Cut groups of machines (separated by `/`) off from each other on every
    /// network they share; a machine in no group keeps its links
    Partition {
        #[arg(required = true, num_args = 3.., value_name = "MACHINE… / MACHINE…")]
        groups: Vec<String>,
    },
    /// Undo every partition and link fault in force
    Heal,
    /// Stop a machine's VM at once, like a power failure
    Kill { machine: String },
    /// Bring a killed machine back as `up` does: boot from disk, re-provision
    /// (with no machine: every killed one)
    Start { machine: Option<String> },
    /// Freeze a machine's VM
    Pause { machine: String },
    /// Run a paused VM again and set its clock from the host's
    Resume { machine: String },
    /// Make a machine's link down, slow or lossy (delay, jitter and loss
    /// apply to what it sends, as `tc netem` would)
    Link {
        machine: String,
        /// The network of the link (default: the machine's only one)
        #[arg(long)]
        network: Option<String>,
        /// No frame in or out
        #[arg(long)]
        down: bool,
        /// How late each frame it sends arrives, e.g. 300ms
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// How much the delay varies either way, e.g. 20ms
        #[arg(long, value_parser = humantime::parse_duration, requires = "delay")]
        jitter: Option<Duration>,
        /// The share of the frames it sends that are lost, e.g. 10%
        #[arg(long, value_parser = loss)]
        loss: Option<f64>,
    },
}

fn loss(text: &str) -> Result<f64, String> {
    parse_loss(text).ok_or_else(|| "write a percentage above 0 and at most 100, e.g. 10%".into())
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = match args.fault {
        // `start` runs `up`, which may make what it lacks.
        Command::Start { .. } => Testbed::locate(args.at.file.as_deref(), settings)?,
        _ => Testbed::locate_existing(args.at.file.as_deref(), settings)?,
    };
    let fault = match args.fault {
        Command::Partition { groups } => Fault::Partition(
            groups
                .split(|word| word == "/")
                .map(<[String]>::to_vec)
                .collect(),
        ),
        Command::Heal => Fault::Heal,
        Command::Kill { machine } => Fault::Kill(machine),
        Command::Start { machine: None } => return start_all(&testbed).await,
        Command::Start {
            machine: Some(machine),
        } => Fault::Start(machine),
        Command::Pause { machine } => Fault::Pause(machine),
        Command::Resume { machine } => Fault::Resume(machine),
        Command::Link {
            machine,
            network,
            down,
            delay,
            jitter,
            loss,
        } => {
            let shape = LinkShape {
                down,
                delay: delay.unwrap_or_default(),
                jitter: jitter.unwrap_or_default(),
                loss: loss.unwrap_or_default(),
            };
            if shape.is_healthy() {
                anyhow::bail!("say what is wrong with the link: --down, --delay or --loss");
            }
            if shape.jitter > shape.delay {
                anyhow::bail!("--jitter is larger than --delay; it varies the delay either way");
            }
            Fault::Link(testbed.link_fault(&machine, network.as_deref(), shape)?)
        }
    };
    let said = testbed.inject(&fault, &Progress::new()).await?;
    out!("{said}")?;
    Ok(ExitCode::SUCCESS)
}

/// `fault start` with no machine: `up`, which boots every killed machine.
async fn start_all(testbed: &Testbed) -> anyhow::Result<ExitCode> {
    let report = testbed.up(&Progress::new(), UpOptions::default()).await?;
    let started = report.changed();
    if started.is_empty() {
        out!("nothing to start: every machine runs")?;
    } else {
        out!("started: {}", started.join(", "))?;
    }
    Ok(ExitCode::SUCCESS)
}
