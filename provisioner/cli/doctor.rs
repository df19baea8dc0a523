use std::process::ExitCode;

use crate::model::ProviderKind;
use crate::provider::{self, DoctorLine};
use crate::settings::Settings;

/// Check what this host can run, and say what to install when something is missing
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed doctor")]
pub struct Args {}

pub fn run(_args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let settings = provider::Settings::new(None, settings);
    // qemu first, the embedded default: without its required lines nothing runs.
    let qemu = provider::doctor(ProviderKind::Qemu, &settings);
    let essentials = qemu.iter().all(|line| line.ok || !line.required);
    let mut lines = qemu;
    lines.extend(host_lines());
    lines.extend(provider::doctor(ProviderKind::Libvirt, &settings));
    // No provider exists for VirtualBox yet, so it cannot report itself.
    lines.push(DoctorLine::version(
        "VirtualBox",
        "VBoxManage",
        &["--version"],
        "install VirtualBox from virtualbox.org (provider virtualbox)",
    ));
    for line in &lines {
        print_line(line);
    }
    Ok(if essentials {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What building images and reaching machines need, whatever the provider.
fn host_lines() -> Vec<DoctorLine> {
    vec![
        DoctorLine::version(
            "mmdebstrap",
            "mmdebstrap",
            &["--version"],
            "apt-get install --no-install-recommends mmdebstrap",
        ),
        DoctorLine::version(
            "mkfs.ext4",
            "mkfs.ext4",
            &["-V"],
            "apt-get install e2fsprogs",
        ),
        DoctorLine::version(
            "ssh client",
            "ssh",
            &["-V"],
            "apt-get install openssh-client",
        ),
        userns_line(),
    ]
}

fn print_line(line: &DoctorLine) {
    let mark = if line.ok { "ok     " } else { "missing" };
    println!("{mark} {:<18} {}", line.name, line.detail);
    if !line.ok {
        println!("        {:<18} fix: {}", "", line.fix);
    }
}

fn userns_line() -> DoctorLine {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let ok = max.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false);
    DoctorLine {
        name: "user namespaces".into(),
        ok,
        detail: format!("max_user_namespaces = {}", max.trim()),
        fix: "sysctl user.max_user_namespaces=15000 (mmdebstrap's unshare mode; testbed builds images as root today)".into(),
        required: false,
    }
}
