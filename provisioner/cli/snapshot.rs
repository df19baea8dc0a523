use std::process::ExitCode;
use std::time::SystemTime;

use crate::lifecycle::{Testbed, DEFAULT_SNAPSHOT};
use crate::settings::Settings;

/// Save the whole running cluster (every VM's memory and disk) and restore it
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    testbed snapshot save green          # every machine paused, saved, resumed together\n  \
    testbed snapshot restore green       # back to that moment; clocks set, checks run\n  \
    testbed snapshot list\n  \
    testbed snapshot rm green\n\n\
    Snapshots live in .testbed/snapshots/ (so `destroy` removes them). A snapshot is \
    restored only onto the machines, images and networks it was taken of.")]
pub struct Args {
    #[command(flatten)]
    at: super::At,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Pause every machine, save its memory and disk, resume them together
    Save {
        #[arg(default_value = DEFAULT_SNAPSHOT)]
        name: String,
        /// Replace a snapshot of the same name
        #[arg(long)]
        force: bool,
    },
    /// Load every machine paused on fresh networks, resume them together,
    /// set their clocks from the host's and run the checks
    Restore {
        /// The snapshot (default: the newest)
        name: Option<String>,
        /// Print the checks' results as JSON
        #[arg(long)]
        json: bool,
    },
    /// Each snapshot with its machines, size and age
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.at.file.as_deref(), settings)?;
    match args.command {
        Command::Save { name, force } => {
            let saved = testbed.save_snapshot(&name, force).await?;
            out!(
                "snapshot {}: saved, {} on disk, the cluster paused {:.1} s",
                saved.name,
                size(saved.size),
                saved.paused_seconds
            )?;
        }
        Command::Restore { name, json } => {
            let restored = testbed.restore_snapshot(name.as_deref()).await?;
            if json {
                let mut value = restored.checks.json();
                value["snapshot"] = restored.name.clone().into();
                value["resumed_seconds"] = restored.resumed_seconds.into();
                out!("{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                out!(
                    "snapshot {}: restored, every machine running after {:.1} s; clocks set",
                    restored.name,
                    restored.resumed_seconds
                )?;
                out_raw!("{}", restored.checks.table())?;
            }
            if !restored.checks.passed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::List { json } => list(&testbed, json)?,
        Command::Rm { names } => {
            for name in names {
                testbed.remove_snapshot(&name)?;
                out!("snapshot {name}: removed")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(testbed: &Testbed, json: bool) -> anyhow::Result<()> {
    let snapshots = testbed.snapshots()?;
    if json {
        out!("{}", serde_json::to_string_pretty(&snapshots)?)?;
        return Ok(());
    }
    if snapshots.is_empty() {
        out!("no snapshot: `testbed snapshot save NAME` takes one")?;
        return Ok(());
    }
    out!("{:<20} {:>10} {:>10}  MACHINES", "NAME", "SIZE", "AGE")?;
    for snapshot in snapshots {
        out!(
            "{:<20} {:>10} {:>10}  {}",
            snapshot.name,
            size(snapshot.size),
            age(&snapshot.created),
            snapshot.machines.join(" ")
        )?;
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// How long ago an RFC 3339 time was, to the second.
fn age(created: &str) -> String {
    let Ok(then) = humantime::parse_rfc3339(created) else {
        return "?".into();
    };
    let seconds = SystemTime::now()
        .duration_since(then)
        .map_or(0, |d| d.as_secs());
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}
