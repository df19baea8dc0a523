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
    eprint!("{}", imported.printed);
    for warning in &imported.warnings {
        eprintln!("warning: {warning}");
    }
    let checked_as = if to_stdout {
        Path::new("topology.toml")
    } else {
        &output
    };
    let invalid = topology::check_shape(checked_as, &imported.toml).err();
    if to_stdout {
        out_raw!("{}", imported.toml)?;
    } else {
        std::fs::write(&output, &imported.toml)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    }
    // Written all the same: the error's line and column are in it, and
    // the user mends one line rather than importing by hand.
    if let Some(e) = invalid {
        eprintln!("{e}");
        eprintln!(
            "  note: the topology was written as imported; mend it there (and tell us: \
             `testbed import` should have said so as a warning)"
        );
        return Ok(ExitCode::FAILURE);
    }
    if to_stdout {
        return Ok(ExitCode::SUCCESS);
    }
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
