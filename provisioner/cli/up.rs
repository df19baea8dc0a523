use std::path::PathBuf;
use std::process::ExitCode;

use crate::lifecycle::{GreenOutcome, Testbed, UpOptions, UpReport};
use crate::model::ProviderKind;
use crate::progress::Progress;
use crate::settings::Settings;

/// Build images, boot the machines and give each its identity
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed up topologies/quickstart.toml\n  \
                        testbed up            # again: resumes halted machines, or does nothing\n  \
                        testbed up --provider libvirt topologies/zk-ensemble.toml\n  \
                        testbed up --json | jq '.machines[] | {name, action}'\n  \
                        testbed up --jobs 3   # boot three machines at a time\n  \
                        testbed up --fresh    # boot and provision even if the green cache has it\n  \
                        testbed up --fresh --cold   # and boot every machine from its kernel\n\n\
                        A fresh machine warm-boots: it resumes a booted template of its image, \
                        cpus, memory and NIC count (made once, kept in the cache: `testbed cache \
                        list`) and is then given its own identity, clock and MACs. A provider that \
                        cannot restore one says so, and its machines boot cold.")]
pub struct Args {
    #[command(flatten)]
    pub(super) at: super::At,
    /// The topology file (default: the testbed in the current directory)
    pub(super) topology: Option<PathBuf>,
    /// Run every machine on this provider, whatever the topology says
    #[arg(long, value_parser = ["qemu", "libvirt", "virtualbox"])]
    provider: Option<String>,
    /// Print what was done as JSON: the shape of `plan --json` with each
    /// daemon's action as carried out, and the checks' results
    #[arg(long)]
    json: bool,
    /// Boot at most N machines at once (until each answers SSH); the rest
    /// wait for a slot. Default: all at once
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    jobs: Option<u16>,
    /// Boot and provision from nothing even when the green cache holds this
    /// cluster (it is saved anew once green)
    #[arg(long)]
    fresh: bool,
    /// Boot fresh machines from their kernel instead of resuming a booted
    /// template of their image (a warm boot)
    #[arg(long)]
    cold: bool,
}

pub async fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let mut testbed = match args.topology.as_deref().or(args.at.file.as_deref()) {
        Some(path) => Testbed::open(path, settings)?,
        None => Testbed::locate(None, settings)?,
    };
    if let Some(provider) = &args.provider {
        let kind: ProviderKind = serde_json::from_value(serde_json::json!(provider))?;
        testbed.use_provider(kind)?;
    }
    let progress = Progress::new();
    let options = UpOptions {
        boot_jobs: args.jobs.map(usize::from),
        fresh: args.fresh,
        cold: args.cold,
    };
    let report = testbed.up(&progress, options).await?;
    if args.json {
        return print_json(&report);
    }
    if let Some(green) = &report.green {
        out!("{}", green_line(green))?;
    }
    let name = &testbed.topology.name;
    let changed = report.changed();
    let unchanged = report.unchanged();
    if let Some(build) = &report.build {
        out!("{build}")?;
    }
    for (template, seconds) in &report.templates_made {
        out!("warm boot: made a template ({template}) in {seconds:.1} s, kept in the cache")?;
    }
    if !report.warm.is_empty() {
        let machines: Vec<&str> = report.warm.keys().map(String::as_str).collect();
        out!(
            "warm boot: {} resumed a booted template instead of booting cold (`--cold` boots them)",
            machines.join(", ")
        )?;
    }
    for outcome in &report.daemons {
        let action = outcome.action.past_tense();
        out!("{}: {} {action}", outcome.machine, outcome.daemon)?;
    }
    for outcome in &report.provisioners {
        if outcome.action == crate::plan::ProvisionerAction::Run {
            out!("{}: {} ran", outcome.machine, outcome.provisioner)?;
        }
    }
    let built = matches!(report.build, Some(crate::build::BuildOutcome::Built { .. }));
    if changed.is_empty() && built {
        out!(
            "testbed {name} is up: the build refreshed dist/, {} machine(s) running unchanged",
            unchanged.len()
        )?;
    } else if changed.is_empty() {
        out!(
            "testbed {name} is up to date: {} machine(s) running, nothing to do",
            unchanged.len()
        )?;
    } else {
        out!(
            "testbed {name} is up: {} machine(s) brought up ({}), {} already running",
            changed.len(),
            changed.join(", "),
            unchanged.len()
        )?;
        out!(
            "next: testbed status | testbed ssh {} | testbed halt",
            changed[0]
        )?;
    }
    match &report.checks {
        Some(checks) => super::verify::print_report(checks, name, false, None),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// What the green cache did, in one line.
fn green_line(green: &GreenOutcome) -> String {
    match green {
        GreenOutcome::Restored(r) => format!(
            "green cache: restored this cluster as it was first green ({}), running after {:.1} s; \
             `testbed up --fresh` boots it anew",
            r.created, r.resumed_seconds
        ),
        GreenOutcome::Saved(s) => {
            let mut line = format!(
                "green cache: saved ({} MiB, the cluster paused {:.1} s); the next `up` of this \
                 topology from nothing restores it",
                s.size >> 20,
                s.paused_seconds
            );
            if !s.evicted.is_empty() {
                line.push_str(&format!("; {} older entries evicted", s.evicted.len()));
            }
            line
        }
        GreenOutcome::NotSaved(why) => format!("green cache: not saved: {why}"),
    }
}

/// `up --json`: what was done, in `plan --json`'s shape, with the checks.
fn print_json(report: &UpReport) -> anyhow::Result<ExitCode> {
    let mut done = report.done();
    done["green_cache"] = match &report.green {
        Some(GreenOutcome::Restored(r)) => serde_json::json!({ "restored": r.key }),
        Some(GreenOutcome::Saved(s)) => serde_json::json!({ "saved": s.key, "size": s.size }),
        Some(GreenOutcome::NotSaved(why)) => serde_json::json!({ "not_saved": why }),
        None => serde_json::Value::Null,
    };
    done["warm"] = serde_json::json!(report.warm);
    done["checks"] = match &report.checks {
        Some(checks) => checks.json(),
        None => serde_json::Value::Null,
    };
    out!("{}", serde_json::to_string_pretty(&done)?)?;
    let passed = report.checks.as_ref().is_none_or(|c| c.passed());
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
