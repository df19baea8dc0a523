use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::topology;
use crate::vagrant::{self, ImportError};

/// Turn a multi-machine Vagrantfile into a topology: machines in order,
/// private networks, forwarded ports, memory and cpus, shell and Ansible
/// provisioners; what cannot be carried over is listed
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed import                               # ./Vagrantfile -> ./topology.toml\n  \
                  testbed import ~/src/aurora/Vagrantfile -o topology.toml\n  \
                  testbed import -o - | less\n\
                  The Vagrantfile is evaluated by `ruby` (as under Vagrant) against a stand-in \
                  for Vagrant's configuration API that only records what it is told."
)]
pub struct Args {
    /// The Vagrantfile
    #[arg(default_value = "Vagrantfile")]
    vagrantfile: PathBuf,
    /// Where to write the topology, `-` for standard output [default:
    /// topology.toml beside the Vagrantfile]
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Overwrite the output file when it exists
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let beside = args.vagrantfile.parent().unwrap_or(Path::new(""));
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| beside.join(crate::lifecycle::DEFAULT_TOPOLOGY));
    let to_stdout = output == Path::new("-");
    let topology_dir = match output.parent() {
        Some(dir) if !to_stdout && !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !to_stdout && output.exists() && !args.force {
        anyhow::bail!(
            "{} exists: pass --force to overwrite it, or write elsewhere with -o",
            output.display()
        );
    }
    let imported = match vagrant::import(&args.vagrantfile, &topology_dir) {
        Ok(imported) => imported,
        // Complete already: `Vagrantfile:LINE: error: …`.
        Err(e @ (ImportError::Syntax { .. } | ImportError::Evaluation { .. })) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    // What the mapping writes must be a topology testbed reads.
    let checked_as = if to_stdout {
        Path::new("topology.toml")
    } else {
        &output
    };
    if let Err(e) = topology::check_shape(checked_as, &imported.toml) {
        anyhow::bail!("the topology imported is not valid (a bug of testbed import):\n{e}");
    }
    for warning in &imported.warnings {
        eprintln!("warning: {warning}");
    }
    if to_stdout {
        out_raw!("{}", imported.toml)?;
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&output, &imported.toml)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    match imported.warnings.len() {
        0 => out!("wrote {}: everything carried over", output.display())?,
        left => out!(
            "wrote {}: {left} thing(s) not carried over, each a comment in it",
            output.display()
        )?,
    }
    out!("next: testbed plan {}", output.display())?;
    Ok(ExitCode::SUCCESS)
}
