use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use crate::lifecycle::Testbed;
use crate::settings::Settings;

/// Draw the topology: machines, networks and addresses, the host, the start order
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed graph                       # Graphviz dot\n  \
                        testbed graph --format mermaid > cluster.md\n  \
                        testbed graph topologies/slurm.toml --format svg > slurm.svg"
)]
pub struct Args {
    /// The topology file (default: the testbed in the current directory,
    /// else ./topology.toml)
    topology: Option<PathBuf>,
    /// dot (Graphviz), mermaid, or svg (through Graphviz's `dot`)
    #[arg(long, default_value = "dot", value_parser = ["dot", "mermaid", "svg"])]
    format: String,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate_existing(args.topology.as_deref(), settings)?;
    let topology = &testbed.topology;
    match args.format.as_str() {
        "mermaid" => out_raw!("{}", crate::graph::mermaid(topology))?,
        "svg" => std::io::stdout().write_all(&svg(&crate::graph::dot(topology))?)?,
        _ => out_raw!("{}", crate::graph::dot(topology))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The picture rendered by Graphviz's `dot -Tsvg`.
fn svg(dot: &str) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "--format svg needs Graphviz's `dot` ({e}): apt-get install --no-install-recommends \
                 graphviz, or use --format dot and render it elsewhere"
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(dot.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        anyhow::bail!(
            "dot -Tsvg failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
