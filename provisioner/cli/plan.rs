use std::path::PathBuf;
use std::process::ExitCode;

use crate::check::CheckSpec;
use crate::image::Cache;
use crate::kit::{self, Secrets};
use crate::lifecycle::Testbed;
use crate::provision;
use crate::topology::{Builder, Machine, Topology};

/// Validate a topology and show what `up` would do, touching nothing
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  testbed plan topologies/quickstart.toml\n  \
                        testbed plan topologies/aurora-mesos.toml | less   # every rendered file"
)]
pub struct Args {
    /// The topology file
    topology: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = args.topology.ok_or_else(|| {
        anyhow::anyhow!("which topology? e.g. `testbed plan topologies/quickstart.toml`")
    })?;
    let testbed = Testbed::open(&path)?;
    testbed.check_build()?;
    let topology = &testbed.topology;
    println!("topology {} ({})", topology.name, topology.path.display());
    for (name, network) in &topology.networks {
        println!("  network {name}: {} (private L2 segment)", network.subnet);
    }
    // Plan generates nothing: secrets show as `<secret NAME>`.
    let secrets = kit::placeholder_secrets(&kit::secret_names(topology)?);
    print_build(topology);
    let cache = Cache::default();
    let states = if testbed.state.exists() {
        testbed.status()?
    } else {
        Vec::new()
    };
    for machine in &topology.machines {
        let recipe = testbed.recipe_for(machine)?;
        let image = if cache.lookup(&recipe).is_some() {
            format!("{} (cached)", recipe.key())
        } else {
            format!("{} (to build)", recipe.key())
        };
        let state = states
            .iter()
            .find(|s| s.name == machine.name)
            .map(|s| s.state)
            .unwrap_or("not-created");
        let action = match state {
            "running" => "keep running (identity re-applied if it changed)",
            "stopped" | "crashed" => "boot from its disk",
            _ => "create disk, boot, apply identity",
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
        println!(
            "  machine {}: {} cpu, {} MiB, {}, image {image}\n    ips: {}  forwards: {}\n    now {state}: up would {action}",
            machine.name,
            machine.cpus,
            machine.memory_mib,
            machine.provider.as_str(),
            if ips.is_empty() { "-".into() } else { ips.join(" ") },
            if forwards.is_empty() { "-".into() } else { forwards.join(" ") },
        );
        if !machine.depends_on.is_empty() {
            println!("    starts after: {}", machine.depends_on.join(", "));
        }
        if topology.build.is_some() && provision::needs_artifacts(topology, machine)? {
            println!("    starts its daemons after the build (needs its artifacts)");
        }
        if !machine.packages.is_empty() {
            println!("    packages: {}", machine.packages.join(" "));
        }
        print_artifacts(&machine.artifacts, "    ");
        print_rendered(topology, machine, &secrets)?;
    }
    print_start_order(topology);
    print_checks(&topology.checks, "  ");
    print_steps(topology);
    Ok(ExitCode::SUCCESS)
}

/// Every file the machine's kits render, in full: what `up` would push.
fn print_rendered(topology: &Topology, machine: &Machine, secrets: &Secrets) -> anyhow::Result<()> {
    for rendered in provision::render_machine(topology, machine, secrets)? {
        let kit = &rendered.kit;
        println!(
            "    daemon {} ({}): service {}, packages {}",
            kit.name,
            kit.manifest.description,
            kit.manifest.service,
            kit.manifest.packages.join(" ")
        );
        print_artifacts(&kit.manifest.artifacts, "      ");
        for file in &rendered.files {
            println!(
                "      file {} (mode {:o}, owner {}):",
                file.dest, file.mode, file.owner
            );
            for line in file.contents.lines() {
                println!("        | {line}");
            }
        }
    }
    Ok(())
}

fn print_start_order(topology: &Topology) {
    let waves = topology.start_waves();
    if topology.machines.iter().all(|m| m.daemons.is_empty()) {
        return;
    }
    println!("  start order (each wave once the one before is ready; machines within a wave in parallel):");
    for (index, wave) in waves.iter().enumerate() {
        println!("    {}. {}", index + 1, wave.join(", "));
    }
}

/// `[build]`: where it runs, what it reads and what it leaves in `dist/`.
fn print_build(topology: &Topology) {
    let Some(build) = &topology.build else {
        return;
    };
    let builder = match &build.builder {
        Builder::Host => "the host, in the topology's directory".to_string(),
        Builder::Machine(name) => format!("machine {name}, in {}", crate::build::BUILD_DIR),
    };
    println!("  build on {builder} (before any daemon that needs its artifacts):");
    let inputs: Vec<String> = build.inputs.iter().map(|i| i.path.clone()).collect();
    println!("    inputs: {}", list_or_dash(&inputs));
    println!("    outputs: {}", list_or_dash(&build.outputs));
    for line in build.run.lines() {
        println!("    $ {line}");
    }
}

fn print_artifacts(artifacts: &[String], indent: &str) {
    for artifact in artifacts {
        println!(
            "{indent}artifact {artifact} -> {}",
            provision::guest_artifact_path(artifact)
        );
    }
}

/// `[[steps]]`: what `testbed run NAME` does.
fn print_steps(topology: &Topology) {
    for step in &topology.steps {
        println!(
            "  step \"{}\" on {} (testbed run {}):",
            step.name, step.machine, step.name
        );
        for line in step.run.lines() {
            println!("    $ {line}");
        }
        print_checks(&step.checks, "    then ");
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(" ")
    }
}

fn print_checks(checks: &[CheckSpec], prefix: &str) {
    for check in checks {
        let from = check
            .from
            .as_deref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        println!(
            "{prefix}check \"{}\" on {}{from}: {}",
            check.name,
            check.machine,
            describe_probe(check)
        );
    }
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
