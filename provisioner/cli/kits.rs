//! `testbed kits` and `testbed kit copy`: the daemon kits a topology here
//! can name, where each comes from, and a built-in written out to change.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use crate::kit::{kit_names, Kit};
use crate::settings::Settings;

/// List every daemon kit visible from here: built in, or a local folder
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed kits\n  testbed kits --json")]
pub struct Args {
    /// Print JSON: [{name, source, description, packages, service}]
    #[arg(long)]
    json: bool,
}

/// Work with one daemon kit
#[derive(clap::Subcommand)]
pub enum Command {
    /// Write a kit out (a built-in, or the one found from here) to change
    /// it: DIR/NAME/, which then shadows the built-in for topologies in
    /// DIR's folder or below it
    #[command(
        after_help = "Examples:\n  testbed kit copy zookeeper            # ./daemons/zookeeper/\n  \
                            testbed kit copy zookeeper ~/kits      # ~/kits/zookeeper/"
    )]
    Copy {
        name: String,
        /// The folder of kits to write into
        #[arg(default_value = "daemons")]
        dir: PathBuf,
    },
}

#[derive(Serialize)]
struct Listed {
    name: String,
    /// The kit's folder, or `built-in`.
    source: String,
    description: String,
    packages: Vec<String>,
    service: String,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let start = std::env::current_dir()?;
    let mut listed = Vec::new();
    for name in kit_names(&start, &settings.search) {
        let kit = Kit::load(&name, &start, &settings.search)?;
        listed.push(Listed {
            source: kit.origin().to_string(),
            description: kit.manifest.description.clone(),
            packages: kit.manifest.packages.clone(),
            service: kit.manifest.service.clone(),
            name,
        });
    }
    if args.json {
        out!("{}", serde_json::to_string_pretty(&listed)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let width = listed.iter().map(|kit| kit.name.len()).max().unwrap_or(0);
    for kit in &listed {
        let source = short_source(&kit.source);
        out!("{:<width$}  {source:<9} {}", kit.name, kit.description)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `built-in`, or `local` (the path is in `--json`).
fn short_source(source: &str) -> &str {
    if source == crate::library::BUILTIN {
        source
    } else {
        "local"
    }
}

pub fn kit(command: Command, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Copy { name, dir } => {
            let start = std::env::current_dir()?;
            let kit = Kit::load(&name, &start, &settings.search)?;
            let dest = dir.join(&name);
            let written = kit.folder().copy_to(&dest).map_err(|e| {
                anyhow::anyhow!(
                    "cannot copy kit `{name}` ({}) to {}: {e}",
                    kit.origin(),
                    dest.display()
                )
            })?;
            for file in written {
                out!("wrote {}", file.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
