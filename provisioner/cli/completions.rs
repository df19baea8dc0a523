//! `testbed completions SHELL` and `testbed man`: shell completions and the
//! manual page, both generated from the same clap definitions as `--help`.

use std::process::ExitCode;

use clap::CommandFactory;

/// Print shell completions (bash, zsh, fish, elvish or powershell)
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    testbed completions bash > ~/.local/share/bash-completion/completions/testbed\n  \
    testbed completions zsh > ~/.zfunc/_testbed\n  \
    testbed completions fish > ~/.config/fish/completions/testbed.fish")]
pub struct Args {
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut command = super::Cli::command();
    let mut buffer = Vec::new();
    clap_complete::generate(args.shell, &mut command, "testbed", &mut buffer);
    write_out(&buffer)
}

/// Print the manual page (roff)
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    testbed man > ~/.local/share/man/man1/testbed.1 && man testbed")]
pub struct ManArgs {}

pub fn man(_: ManArgs) -> anyhow::Result<ExitCode> {
    let mut buffer = Vec::new();
    clap_mangen::Man::new(super::Cli::command()).render(&mut buffer)?;
    write_out(&buffer)
}

fn write_out(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    std::io::stdout().lock().write_all(bytes)?;
    Ok(ExitCode::SUCCESS)
}
