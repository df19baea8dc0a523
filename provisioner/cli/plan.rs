use std::path::PathBuf;
use std::process::ExitCode;

use crate::check::CheckSpec;
use crate::kit::Secrets;
use crate::lifecycle::Testbed;
use crate::model::{Builder, Topology};
use crate::plan::{self, MachinePlan, Plan};
use crate::settings::Settings;
use crate::state::Record;

/// Validate a topology and show what `up` would do and why, touching nothing
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed plan topologies/quickstart.toml\n  \
                        testbed plan topologies/aurora-mesos.toml | less   # every rendered file\n  \
                        testbed plan --json topologies/zk-ensemble.toml | jq '.machines[].action'"
)]
pub struct Args {
    /// The topology file (default: the testbed in the current directory,
    /// else ./topology.toml)
    topology: Option<PathBuf>,
    /// Print the plan as JSON: {machines: [{name, action, why, daemons: [{name, action, why}], provision: [{name, action, why}]}], build, warnings}
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let testbed = Testbed::locate(args.topology.as_deref(), settings)?;
    let (plan, secrets) = testbed.plan()?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&plan)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let topology = &testbed.topology;
    out!("topology {} ({})", topology.name, topology.path.display())?;
    for (name, network) in &topology.networks {
        out!("  network {name}: {} (private L2 segment)", network.subnet)?;
    }
    print_build(topology, &plan)?;
    let record = testbed.state.load()?;
    for machine in &plan.machines {
        print_machine(&testbed, machine, &record, &secrets)?;
    }
    print_start_order(topology)?;
    print_checks(&topology.checks, "  ")?;
    print_steps(topology)?;
    for warning in &plan.warnings {
        out!("  warning: {warning}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_machine(
    testbed: &Testbed,
    planned: &MachinePlan,
    record: &Record,
    secrets: &Secrets,
) -> anyhow::Result<()> {
    let machine = &planned.machine;
    let key = planned.recipe.key();
    let image = if testbed.cache.lookup(&planned.recipe).is_some() {
        format!("{key} (cached)")
    } else {
        format!("{key} (to build)")
    };
    let ips: Vec<String> = machine
        .ips
        .iter()
        .map(|(net, ip)| format!("{net}={ip}"))
        .collect();
    let forwards: Vec<String> = machine
        .forwards
        .iter()
        .map(|f| format!("127.0.0.1:{}->{}", f.host, f.guest))
        .collect();
    out!(
        "  machine {}: {} cpu, {} MiB, {}, image {image} from {}\n    ips: {}  forwards: {}\n    up would {}: {}",
        machine.name,
        machine.cpus,
        machine.memory_mib,
        machine.provider.as_str(),
        planned.image_source,
        list_or_dash(&ips),
        list_or_dash(&forwards),
        planned.action.as_str(),
        planned.why,
    )?;
    if !machine.depends_on.is_empty() {
        out!("    starts after: {}", machine.depends_on.join(", "))?;
    }
    if planned.needs_build {
        out!("    starts its daemons after the build (needs its artifacts)")?;
    }
    if !machine.packages.is_empty() {
        out!("    packages: {}", machine.packages.join(" "))?;
    }
    print_artifacts(&machine.artifacts, "    ")?;
    let calls = testbed.planned_calls(planned, record)?;
    if !calls.is_empty() {
        out!("    up would run:")?;
        for call in calls {
            out!("      $ {call}")?;
        }
    }
    for daemon in &planned.daemons {
        print_daemon(daemon, secrets)?;
    }
    for provisioner in &planned.provision {
        let action = match provisioner.action {
            plan::ProvisionerAction::Run => "run it",
            plan::ProvisionerAction::Nothing => "leave it",
        };
        out!(
            "    provision {}: up would {action}: {}",
            provisioner.name,
            provisioner.why
        )?;
    }
    Ok(())
}

/// A daemon's action, then every file its kit renders, in full: what `up`
/// would push. Secret values never show: each is `<secret NAME>`.
fn print_daemon(daemon: &plan::DaemonPlan, secrets: &Secrets) -> std::io::Result<()> {
    let action = daemon.action.as_str();
    let Some(rendered) = &daemon.rendered else {
        out!(
            "    daemon {}: up would {action}: {}",
            daemon.name,
            daemon.why
        )?;
        return Ok(());
    };
    let kit = &rendered.kit;
    out!(
        "    daemon {} ({}), kit {}: service {}, packages {}\n      up would {action}: {}",
        kit.name,
        kit.manifest.description,
        kit.origin(),
        kit.manifest.service,
        kit.manifest.packages.join(" "),
        daemon.why,
    )?;
    print_artifacts(&kit.manifest.artifacts, "      ")?;
    for file in &rendered.files {
        out!(
            "      file {} (mode {:o}, owner {}):",
            file.dest,
            file.mode,
            file.owner
        )?;
        for line in masked(&file.contents, secrets).lines() {
            out!("        | {line}")?;
        }
    }
    Ok(())
}

/// `text` with every secret value shown as `<secret NAME>`.
fn masked(text: &str, secrets: &Secrets) -> String {
    secrets
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .fold(text.to_string(), |text, (name, value)| {
            text.replace(value.as_str(), &format!("<secret {name}>"))
        })
}

fn print_start_order(topology: &Topology) -> std::io::Result<()> {
    let waves = topology.start_waves();
    if topology.machines.iter().all(|m| m.daemons.is_empty()) {
        return Ok(());
    }
    out!("  start order (each wave once the one before is ready; machines within a wave in parallel):")?;
    for (index, wave) in waves.iter().enumerate() {
        out!("    {}. {}", index + 1, wave.join(", "))?;
    }
    Ok(())
}

/// `[build]`: where it runs, what it reads and what it leaves in `dist/`.
fn print_build(topology: &Topology, plan: &Plan) -> std::io::Result<()> {
    let Some(build) = &topology.build else {
        return Ok(());
    };
    let builder = match &build.builder {
        Builder::Host => "the host, in the topology's directory".to_string(),
        Builder::Machine(name) => format!("machine {name}, in {}", crate::build::BUILD_DIR),
    };
    out!("  build on {builder} (before any daemon that needs its artifacts):")?;
    let inputs: Vec<String> = build.inputs.iter().map(|i| i.path.clone()).collect();
    out!("    inputs: {}", list_or_dash(&inputs))?;
    out!("    outputs: {}", list_or_dash(&build.outputs))?;
    for line in build.run.lines() {
        out!("    $ {line}")?;
    }
    if let Some(planned) = &plan.build {
        out!(
            "    up would {} it: {}",
            planned.action.as_str(),
            planned.why
        )?;
    }
    Ok(())
}

fn print_artifacts(artifacts: &[String], indent: &str) -> std::io::Result<()> {
    for artifact in artifacts {
        out!(
            "{indent}artifact {artifact} -> {}",
            plan::guest_artifact_path(artifact)
        )?;
    }
    Ok(())
}

/// `[[steps]]`: what `testbed run NAME` does.
fn print_steps(topology: &Topology) -> std::io::Result<()> {
    for step in &topology.steps {
        let place = step
            .command
            .as_ref()
            .map(|c| format!(" on {}", c.machine))
            .unwrap_or_default();
        out!(
            "  step \"{}\"{place} (testbed run {}):",
            step.name,
            step.name
        )?;
        if let Some(fault) = &step.fault {
            out!("    fault: {fault}")?;
        }
        for line in step.command.iter().flat_map(|c| c.run.lines()) {
            out!("    $ {line}")?;
        }
        print_checks(&step.checks, "    then ")?;
    }
    Ok(())
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(" ")
    }
}

fn print_checks(checks: &[CheckSpec], prefix: &str) -> std::io::Result<()> {
    for check in checks {
        let from = check
            .from
            .as_deref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        out!(
            "{prefix}check \"{}\" on {}{from}: {}",
            check.name,
            check.machine,
            describe_probe(check)
        )?;
    }
    Ok(())
}

/// A probe in words: what it sends or runs and what it expects.
fn describe_probe(check: &CheckSpec) -> String {
    let mut words = Vec::new();
    if let Some(tcp) = &check.tcp {
        words.push(format!("tcp port {}", tcp.port));
        if let Some(send) = &tcp.send {
            words.push(format!("send {send:?}"));
        }
        if let Some(expect) = &tcp.expect {
            words.push(format!("expect {expect:?}"));
        }
    } else if let Some(http) = &check.http {
        words.push(format!("http GET :{}{}", http.port, http.path));
        if let Some(status) = http.status {
            words.push(format!("status {status}"));
        }
        if let Some(body) = &http.body {
            words.push(format!("body {body:?}"));
        }
        words.extend(json_words(&http.json));
    } else if let Some(command) = &check.command {
        words.push(format!("command {:?}", command.run.trim()));
        if let Some(exit) = command.exit {
            words.push(format!("exit {exit}"));
        }
        if let Some(stdout) = &command.stdout {
            words.push(format!("stdout {stdout:?}"));
        }
        words.extend(json_words(&command.json));
    }
    words.join(", ")
}

fn json_words(json: &std::collections::BTreeMap<String, serde_json::Value>) -> Vec<String> {
    json.iter()
        .map(|(pointer, value)| format!("json {pointer} == {value}"))
        .collect()
}
