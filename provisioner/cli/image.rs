use std::process::ExitCode;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::image::{recipe_names, BuiltImage, Cache, CachedImage, DiskFormat, Recipe};
use crate::lifecycle::Testbed;
use crate::progress::Progress;
use crate::settings::Settings;

/// Build, list and remove cached base images
#[derive(clap::Subcommand)]
pub enum Command {
    /// Build an image from its recipe in images/, or every image a topology's
    /// machines boot (a no-op when cached)
    #[command(after_help = "Examples:\n  testbed image build debian-12\n  \
                            testbed image build debian-12 --disk   # and its bootable disk\n  \
                            testbed image build -f topologies/zk-ensemble.toml   # what `up` \
                            would build, kits' packages included, without booting")]
    Build {
        /// The recipe (default: every image of the topology)
        name: Option<String>,
        /// Also build each image's bootable disk (MBR, syslinux, the root
        /// filesystem): what provider virtualbox boots, and any hypervisor
        /// can. Prints its path instead of the root filesystem's
        #[arg(long)]
        disk: bool,
        #[command(flatten)]
        at: super::At,
    },
    /// List the recipes visible from here (built in or local) and the cached images
    #[command(after_help = "Examples:\n  testbed image list\n  testbed image list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove cached images by name (every build of it) or by NAME-HASH
    #[command(after_help = "Examples:\n  testbed image rm debian-12")]
    Rm { names: Vec<String> },
}

pub async fn run(command: Command, settings: &Settings) -> anyhow::Result<ExitCode> {
    let cache = Cache::at(settings.cache_root.clone());
    let start = std::env::current_dir()?;
    match command {
        Command::Build {
            name: None,
            disk,
            at,
        } => {
            let testbed = Testbed::locate(at.file.as_deref(), settings)?;
            let progress = Progress::new();
            for image in testbed.build_images(&progress).await? {
                let path = match disk {
                    true => boot_disk(&testbed.cache, image.clone(), &progress).await?,
                    false => image.root.clone(),
                };
                out!("{} {}", image.key(), path.display())?;
            }
        }
        Command::Build {
            name: Some(name),
            disk,
            ..
        } => {
            let recipe = Recipe::find(&name, &start, &settings.search)?;
            let progress = Progress::new();
            let task = progress.task(&format!("image {name}"));
            let key = recipe.key();
            let builder = cache.clone();
            // Off the async threads, so that an interrupt is seen meanwhile.
            let image = tokio::task::spawn_blocking(move || {
                let image = builder.ensure(&recipe, &mut |line| task.set(line));
                task.finish(if image.is_ok() { "ready" } else { "failed" });
                image
            })
            .await??;
            let path = match disk {
                true => boot_disk(&cache, image, &progress).await?,
                false => image.root,
            };
            out!("{key} {}", path.display())?;
        }
        Command::List { json } => list(&cache, &start, settings, json)?,
        Command::Rm { names } => {
            for name in names {
                for key in cache.remove(&name)? {
                    out!("removed {key}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The image's bootable disk, built first when missing.
async fn boot_disk(
    cache: &Cache,
    image: BuiltImage,
    progress: &Progress,
) -> anyhow::Result<PathBuf> {
    let task = progress.task(&format!("disk {}", image.name));
    let cache = cache.clone();
    let disk = tokio::task::spawn_blocking(move || {
        let disk = cache.ensure_boot_disk(&image, DiskFormat::Qcow2, &mut |line| task.set(line));
        task.finish(if disk.is_ok() { "ready" } else { "failed" });
        disk
    })
    .await??;
    Ok(disk)
}

#[derive(Serialize)]
struct Listing {
    recipes: Vec<ListedRecipe>,
    cached: Vec<CachedImage>,
}

#[derive(Serialize)]
struct ListedRecipe {
    name: String,
    /// The recipe file, or `built-in`.
    source: String,
    /// The cache folder its build has (or would have): `NAME-HASH`.
    key: String,
    cached: bool,
}

fn list(cache: &Cache, start: &Path, settings: &Settings, json: bool) -> anyhow::Result<()> {
    let mut recipes = Vec::new();
    for name in recipe_names(start, &settings.search) {
        let recipe = Recipe::find(&name, start, &settings.search)?;
        recipes.push(ListedRecipe {
            source: recipe.found_at(),
            key: recipe.key(),
            cached: cache.lookup(&recipe).is_some(),
            name,
        });
    }
    let listing = Listing {
        recipes,
        cached: cache.list(),
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&listing)?)?;
        return Ok(());
    }
    out!("recipes (kits add their packages to these):")?;
    for recipe in &listing.recipes {
        let cached = if recipe.cached {
            "cached"
        } else {
            "not built yet"
        };
        out!("  {:<16} {:<14} {}", recipe.name, cached, recipe.source)?;
    }
    if listing.cached.is_empty() {
        out!("no cached images in {}", cache.root().display())?;
        return Ok(());
    }
    out!("cached images in {}:", cache.root().display())?;
    for image in &listing.cached {
        out!(
            "  {:<32} {:>8.1} MiB  {}",
            image.key,
            image.bytes as f64 / 1048576.0,
            image.image.root.display()
        )?;
        if let Some(disk) = &image.disk {
            out!(
                "  {:<32} {:>12}  {} (bootable disk)",
                "",
                "",
                disk.display()
            )?;
        }
    }
    Ok(())
}
