use std::process::ExitCode;

use crate::image::{Cache, Recipe};
use crate::progress::Progress;
use crate::settings::Settings;

/// Build, list and remove cached base images
#[derive(clap::Subcommand)]
pub enum Command {
    /// Build an image from its recipe in images/ (a no-op when cached)
    #[command(after_help = "Examples:\n  testbed image build debian-12")]
    Build { name: String },
    /// List cached images
    #[command(after_help = "Examples:\n  testbed image list\n  testbed image list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove cached images by name (every build of it) or by NAME-HASH
    #[command(after_help = "Examples:\n  testbed image rm debian-12")]
    Rm { names: Vec<String> },
}

pub fn run(command: Command, settings: &Settings) -> anyhow::Result<ExitCode> {
    let cache = Cache::at(settings.cache_root.clone());
    let start = std::env::current_dir()?;
    match command {
        Command::Build { name } => {
            let recipe = Recipe::find(&name, &start, &settings.search)?;
            let task = Progress::new().task(&format!("image {name}"));
            let image = cache.ensure(&recipe, &mut |line| task.set(line))?;
            task.finish("ready");
            println!("{} {}", recipe.key(), image.disk.display());
        }
        Command::List { json } => {
            let images = cache.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else if images.is_empty() {
                println!("no cached images in {}", cache.root().display());
            } else {
                for image in images {
                    println!(
                        "{:<32} {:>8.1} MiB  {}",
                        image.key,
                        image.bytes as f64 / 1048576.0,
                        image.image.disk.display()
                    );
                }
            }
        }
        Command::Rm { names } => {
            for name in names {
                for key in cache.remove(&name)? {
                    println!("removed {key}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
