use std::process::ExitCode;

use crate::green::GreenCache;
use crate::lifecycle::green_cache_max;
use crate::settings::Settings;

/// The green cache: clusters saved the first time `up` had them green
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    testbed cache list\n  \
    testbed cache prune --max-size 4GiB   # least recently used go first\n  \
    testbed cache prune --max-size 0      # empty it\n\n\
    When `up` starts from nothing and every check passes, it saves the cluster in the \
    cache, keyed by a hash of the topology, its kits, the build's inputs, the images and \
    testbed's version. A later `up` of the same key from nothing (after `destroy`, or in \
    another folder) restores it in seconds. `up --fresh` boots anew. \
    TESTBED_GREEN_CACHE_MAX (default 8GiB; 0 saves nothing) bounds it after each save.")]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Each entry: its key, topology, size and when it was last used
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove the least recently used entries until the cache fits
    Prune {
        /// The size to fit in (`4GiB`, `512MiB`, `0`); default:
        /// TESTBED_GREEN_CACHE_MAX, else 8GiB
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    crate::topology::parse_size_mib(text, "size").map(|mib| mib << 20)
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let cache = GreenCache::in_cache(&settings.cache_root);
    match args.command {
        Command::List { json } => {
            let entries = cache.list();
            if json {
                out!("{}", serde_json::to_string_pretty(&entries)?)?;
            } else if entries.is_empty() {
                out!("the green cache is empty: `testbed up` saves a cluster once it is green")?;
            } else {
                out!(
                    "{:<34} {:<16} {:>10} {:>12}",
                    "KEY",
                    "TOPOLOGY",
                    "SIZE",
                    "LAST USED"
                )?;
                for entry in entries {
                    out!(
                        "{:<34} {:<16} {:>10} {:>12}",
                        entry.key,
                        entry.topology,
                        mib(entry.size),
                        format!(
                            "{} ago",
                            humantime::format_duration(std::time::Duration::from_secs(
                                entry.idle_seconds
                            ))
                        )
                    )?;
                }
            }
        }
        Command::Prune { max_size } => {
            let max_size = match max_size {
                Some(size) => size,
                None => green_cache_max(settings)?,
            };
            let removed = cache.prune(max_size)?;
            for entry in &removed {
                out!(
                    "removed {} ({}, {})",
                    entry.key,
                    entry.topology,
                    mib(entry.size)
                )?;
            }
            let left: u64 = cache.list().iter().map(|e| e.size).sum();
            out!(
                "{} entries removed; the cache holds {}",
                removed.len(),
                mib(left)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}
