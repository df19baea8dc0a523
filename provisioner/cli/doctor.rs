use std::process::{Command, ExitCode};

use crate::image::Cache;
use crate::provider::kvm;

/// Check what this host can run, and say what to install when something is missing
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed doctor")]
pub struct Args {}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: &'static str,
}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let checks = vec![
        version_check(
            "qemu",
            "qemu-system-x86_64",
            &["--version"],
            "apt-get install --no-install-recommends qemu-system-x86 qemu-utils",
        ),
        version_check(
            "qemu-img",
            "qemu-img",
            &["--version"],
            "apt-get install --no-install-recommends qemu-utils",
        ),
        kvm_check(),
        version_check(
            "mmdebstrap",
            "mmdebstrap",
            &["--version"],
            "apt-get install --no-install-recommends mmdebstrap",
        ),
        version_check(
            "mkfs.ext4",
            "mkfs.ext4",
            &["-V"],
            "apt-get install e2fsprogs",
        ),
        version_check(
            "ssh client",
            "ssh",
            &["-V"],
            "apt-get install openssh-client",
        ),
        userns_check(),
        libvirt_check(),
        version_check(
            "VirtualBox",
            "VBoxManage",
            &["--version"],
            "install VirtualBox from virtualbox.org (provider virtualbox)",
        ),
    ];
    for check in &checks {
        let mark = if check.ok { "ok     " } else { "missing" };
        println!("{mark} {:<18} {}", check.name, check.detail);
        if !check.ok {
            println!("        {:<18} fix: {}", "", check.fix);
        }
    }
    let essentials = checks.iter().take(2).all(|c| c.ok);
    Ok(if essentials {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn version_check(name: &'static str, program: &str, args: &[&str], fix: &'static str) -> Check {
    let output = Command::new(program).args(args).output();
    let (ok, detail) = match output {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            let first = String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            (true, first)
        }
        Err(e) => (false, format!("{program}: {e}")),
    };
    Check {
        name,
        ok,
        detail,
        fix,
    }
}

fn kvm_check() -> Check {
    let cache = Cache::default();
    let kernel = cache
        .list()
        .into_iter()
        .next()
        .map(|image| image.image.kernel);
    let (ok, detail) = match kernel {
        Some(kernel) => {
            let verdict = kvm::probe(&kernel);
            (verdict.kvm, verdict.reason)
        }
        None => (
            false,
            "not probed yet: no image is built (the probe boots an image's kernel); `up` probes it"
                .into(),
        ),
    };
    Check {
        name: "KVM",
        ok,
        detail: if ok {
            detail
        } else {
            format!("{detail}; testbed uses TCG (slower, works)")
        },
        fix: "optional: a host where /dev/kvm boots guests (nested virtualisation enabled)",
    }
}

/// Whether the libvirt provider can reach libvirtd, and at which URI.
fn libvirt_check() -> Check {
    let settings = crate::provider::Settings::default();
    let uri = settings.libvirt_uri;
    let (ok, detail) = libvirt_reachable(&uri);
    Check {
        name: "libvirt",
        ok,
        detail,
        fix: "apt-get install libvirt-daemon-system, start libvirtd, or set TESTBED_LIBVIRT_URI \
              (provider libvirt only)",
    }
}

#[cfg(feature = "libvirt")]
fn libvirt_reachable(uri: &str) -> (bool, String) {
    match crate::provider::libvirt::connect(uri) {
        Ok(conn) => {
            let version = conn
                .lib_version()
                .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
                .unwrap_or_else(|_| "?".into());
            (true, format!("reachable at {uri} (libvirt {version})"))
        }
        Err(e) => (
            false,
            e.to_string().lines().next().unwrap_or_default().to_string(),
        ),
    }
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_reachable(_uri: &str) -> (bool, String) {
    (
        false,
        "this build has no libvirt provider (cargo feature `libvirt`)".into(),
    )
}

fn userns_check() -> Check {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let ok = max.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false);
    Check {
        name: "user namespaces",
        ok,
        detail: format!("max_user_namespaces = {}", max.trim()),
        fix: "sysctl user.max_user_namespaces=15000 (mmdebstrap's unshare mode; testbed builds images as root today)",
    }
}
