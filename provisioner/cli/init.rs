//! `testbed init`: a starter topology in a folder, ready for `testbed up`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::library;
use crate::lifecycle::DEFAULT_TOPOLOGY;

/// Write a starter topology (topology.toml) into a folder, ready for `testbed up`
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed init                                 # quickstart, here\n  \
                        testbed init my-cluster --example zk-ensemble\n  \
                        cd my-cluster && testbed up"
)]
pub struct Args {
    /// The folder to write into (made when missing)
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The example to start from: quickstart, pair, zk-ensemble or slurm
    #[arg(long, default_value = "quickstart", value_name = "NAME")]
    example: String,
}

/// The examples `init` offers: the repository's topologies that need no
/// sources of their own beyond what is written with them.
const EXAMPLES: [&str; 4] = ["quickstart", "pair", "zk-ensemble", "slurm"];

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Some(text) = EXAMPLES
        .contains(&args.example.as_str())
        .then(|| library::example(&args.example))
        .flatten()
    else {
        anyhow::bail!(
            "no example `{}`: choose one of {}",
            args.example,
            EXAMPLES.join(", ")
        );
    };
    let (text, extra) = standalone(text);
    let files: Vec<(PathBuf, &str)> =
        std::iter::once((PathBuf::from(DEFAULT_TOPOLOGY), text.as_str()))
            .chain(
                extra
                    .iter()
                    .map(|(path, text)| (PathBuf::from(path), *text)),
            )
            .collect();
    refuse_to_overwrite(&args.dir, &files)?;
    for (relative, contents) in &files {
        let path = args.dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, contents)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        out!("wrote {}", path.display())?;
    }
    let go = if args.dir == Path::new(".") {
        "testbed up".to_owned()
    } else {
        format!("cd {} && testbed up", args.dir.display())
    };
    out!("next: {go}")?;
    Ok(ExitCode::SUCCESS)
}

/// The example's text made to stand in a folder of its own, and the files
/// it needs beside it: the slurm example builds a job from the
/// repository's `examples/jobs/`, written beside it as `jobs/`.
fn standalone(text: &str) -> (String, Vec<(&'static str, &'static str)>) {
    if !text.contains("examples/jobs/") {
        return (text.to_owned(), Vec::new());
    }
    let text = text
        .replace("../examples/jobs/", "jobs/")
        .replace("examples/jobs/", "jobs/");
    (text, vec![("jobs/hello_world.c", library::HELLO_WORLD_C)])
}

fn refuse_to_overwrite(dir: &Path, files: &[(PathBuf, &str)]) -> anyhow::Result<()> {
    for (relative, _) in files {
        let path = dir.join(relative);
        if path.exists() {
            anyhow::bail!(
                "{} already exists: init writes only into a folder without one (remove it, or \
                 name another folder: `testbed init DIR`)",
                path.display()
            );
        }
    }
    Ok(())
}
