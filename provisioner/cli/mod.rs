//! The `testbed` command line: each verb a thin file over the library.

/// `println!` that returns the write's error instead of panicking: a reader
/// that goes away (`testbed plan | head -1`) ends the command quietly
/// ([`is_broken_pipe`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// [`out!`] without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod build;
mod cache;
mod completions;
mod destroy;
mod doctor;
mod fault;
mod graph;
mod halt;
mod image;
mod import;
mod init;
mod interrupt;
mod inventory;
mod kits;
mod logs;
mod plan;
mod provision;
mod run;
mod snapshot;
mod ssh;
mod status;
mod up;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

#[derive(Parser)]
#[command(
    name = "testbed",
    version,
    about = "Bring up a multi-machine cluster of VMs from one topology file",
    long_about = "testbed builds images, boots VMs (qemu by default: no daemon, no root), \
                  injects each machine's identity and gives you SSH to every machine.",
    after_help = "Examples:\n  testbed init my-cluster --example zk-ensemble && cd my-cluster\n  \
                  testbed up\n  testbed status\n  \
                  testbed verify\n  testbed run submit-hello\n  testbed ssh zk-1 -- hostname\n  testbed halt\n  testbed destroy -f"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// When another testbed command holds this testbed's lock, wait for it
    /// instead of failing
    #[arg(long, global = true)]
    wait: bool,
}

#[derive(Subcommand)]
enum Command {
    Up(up::Args),
    Plan(plan::Args),
    Build(build::Args),
    Verify(verify::Args),
    Run(run::Args),
    Provision(provision::Args),
    Status(status::Args),
    Ssh(ssh::Args),
    Logs(logs::Args),
    Graph(graph::Args),
    Fault(fault::Args),
    Snapshot(snapshot::Args),
    Cache(cache::Args),
    SshConfig(ssh::ConfigArgs),
    Inventory(inventory::Args),
    Halt(halt::Args),
    Destroy(destroy::Args),
    Doctor(doctor::Args),
    #[command(
        subcommand,
        after_help = "Examples:\n  testbed image build debian-12\n  testbed image list\n  testbed image rm debian-12"
    )]
    Image(image::Command),
    Kits(kits::Args),
    #[command(subcommand)]
    Kit(kits::Command),
    Init(init::Args),
    Import(import::Args),
    Completions(completions::Args),
    Man(completions::ManArgs),
    /// Serve a network switch (started by `up`; not for users)
    #[command(name = "__switch", hide = true)]
    Switch {
        socket: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Switch { socket } = &cli.command {
        return match crate::provider::qemu::serve_switch(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Every TESTBED_* variable is read here, once.
    let settings = Settings {
        wait_for_lock: cli.wait,
        ..Settings::from_env()
    };
    let result = match cli.command.interruptible() {
        Some((verb, testbed)) => {
            match runtime.block_on(interrupt::run_interruptible(run(cli, &settings))) {
                interrupt::Ended::Finished(result) => result,
                interrupt::Ended::Interrupted(signal) => {
                    // Machine tasks end at their next await; blocking work
                    // (an image build whose tools were stopped) unwinds.
                    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
                    interrupt::report(signal, verb, testbed, &settings);
                    return interrupt::status();
                }
            }
        }
        None => runtime.block_on(run(cli, &settings)),
    };
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", render(&e));
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// For a verb that works for long enough to be interrupted: its name
    /// and, when it acts on a testbed, the `-f FILE` it was given.
    fn interruptible(&self) -> Option<(&'static str, Option<Option<PathBuf>>)> {
        let testbed = |file: &Option<PathBuf>| Some(file.clone());
        match self {
            Command::Up(args) => Some((
                "up",
                testbed(&args.topology.clone().or(args.at.file.clone())),
            )),
            Command::Build(args) => Some(("build", testbed(&args.at.file))),
            Command::Verify(args) => Some(("verify", testbed(&args.at.file))),
            Command::Run(args) => Some(("run", testbed(&args.at.file))),
            Command::Provision(args) => Some(("provision", testbed(&args.at.file))),
            Command::Halt(args) => Some(("halt", testbed(&args.at.file))),
            Command::Destroy(args) => Some(("destroy", testbed(&args.file))),
            Command::Image(image::Command::Build { .. }) => Some(("image build", None)),
            _ => None,
        }
    }
}

/// Whether the command ended because its output's reader went away: not a
/// failure worth a word (`testbed status --json | head -c 10`).
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The message for a failed command. Topology errors are complete already
/// (`FILE:LINE:COL: error: …` and a help line); the rest get `error: `.
fn render(error: &anyhow::Error) -> String {
    use crate::lifecycle::Error as LifecycleError;
    use crate::topology::TopologyError;
    let located = error.chain().find_map(|cause| {
        let topology_error = match cause.downcast_ref::<LifecycleError>() {
            Some(LifecycleError::Topology(inner)) => Some(inner),
            _ => cause.downcast_ref::<TopologyError>(),
        };
        topology_error.filter(|e| !matches!(e, TopologyError::Io { .. }))
    });
    match located {
        Some(topology_error) => topology_error.to_string(),
        None => format!("error: {error:#}"),
    }
}

async fn run(cli: Cli, settings: &Settings) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => up::run(args, settings).await,
        Command::Plan(args) => plan::run(args, settings),
        Command::Build(args) => build::run(args, settings).await,
        Command::Verify(args) => verify::run(args, settings).await,
        Command::Run(args) => run::run(args, settings).await,
        Command::Provision(args) => provision::run(args, settings).await,
        Command::Status(args) => status::run(args, settings),
        Command::Ssh(args) => ssh::run(args, settings),
        Command::Logs(args) => logs::run(args, settings),
        Command::Graph(args) => graph::run(args, settings),
        Command::Fault(args) => fault::run(args, settings).await,
        Command::Snapshot(args) => snapshot::run(args, settings).await,
        Command::Cache(args) => cache::run(args, settings).await,
        Command::SshConfig(args) => ssh::config(args, settings),
        Command::Inventory(args) => inventory::run(args, settings),
        Command::Halt(args) => halt::run(args, settings).await,
        Command::Destroy(args) => destroy::run(args, settings).await,
        Command::Doctor(args) => doctor::run(args, settings),
        Command::Image(command) => image::run(command, settings).await,
        Command::Kits(args) => kits::run(args, settings),
        Command::Kit(command) => kits::kit(command, settings),
        Command::Init(args) => init::run(args),
        Command::Import(args) => import::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => completions::man(args),
        Command::Switch { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// Which testbed a verb acts on.
#[derive(clap::Args)]
pub struct At {
    /// The topology file (default: the testbed of `.testbed/` in the current directory)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_verb_and_flag_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
