use std::process::ExitCode;

use crate::model::ProviderKind;
use crate::provider::{self, DoctorLine};
use crate::settings::Settings;

/// Check what this host can run, and say what to install when something is missing
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  testbed doctor\n  \
                        testbed doctor -f cluster.toml   # also the topology's libvirt and each of its [hosts]")]
pub struct Args {
    /// Also check what this topology needs: its `[libvirt] uri`, and each
    /// of its `[hosts]` (libvirtd answers, testbed's SSH login works)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<std::path::PathBuf>,
}

pub fn run(args: Args, settings: &Settings) -> anyhow::Result<ExitCode> {
    let topology = match &args.file {
        Some(file) => Some(crate::topology::load(file, &settings.search)?),
        None => None,
    };
    let libvirt_uri = topology.as_ref().and_then(|t| t.libvirt_uri.as_deref());
    let mut settings = provider::Settings::new(libvirt_uri, settings);
    if let Some(topology) = &topology {
        settings = settings.with_hosts(&topology.hosts);
    }
    // qemu first, the embedded default: without its required lines nothing
    // runs; then a topology's hosts, which its machines cannot run without.
    let qemu = provider::doctor(ProviderKind::Qemu, &settings);
    let hosts = provider::doctor_hosts(&settings);
    let essentials = qemu
        .iter()
        .chain(&hosts)
        .all(|line| line.ok || !line.required);
    let mut lines = qemu;
    lines.extend(host_lines());
    lines.extend(provider::doctor(ProviderKind::Libvirt, &settings));
    lines.extend(hosts);
    lines.extend(provider::doctor(ProviderKind::Virtualbox, &settings));
    for line in &lines {
        print_line(line)?;
    }
    Ok(if essentials {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What building images and reaching machines need, whatever the provider.
fn host_lines() -> Vec<DoctorLine> {
    let mut lines = vec![
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
        // Needed only by what uses them, so never required.
        DoctorLine::version(
            "ansible-playbook (Ansible provisioners)",
            crate::provisioners::ANSIBLE_PLAYBOOK,
            &["--version"],
            "apt-get install --no-install-recommends ansible-core",
        ),
        DoctorLine::version(
            "ruby (testbed import)",
            "ruby",
            &["--version"],
            "apt-get install --no-install-recommends ruby",
        ),
    ];
    if !nix::unistd::geteuid().is_root() {
        lines.extend(unprivileged_build_lines());
    }
    lines
}

fn print_line(line: &DoctorLine) -> std::io::Result<()> {
    let mark = if line.ok { "ok     " } else { "missing" };
    out!("{mark} {:<18} {}", line.name, line.detail)?;
    if !line.ok {
        out!("        {:<18} fix: {}", "", line.fix)?;
    }
    Ok(())
}

fn userns_line() -> DoctorLine {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let ok = max.trim().parse::<u64>().map(|n| n > 0).unwrap_or(false);
    DoctorLine {
        name: "user namespaces".into(),
        ok,
        detail: format!("max_user_namespaces = {}", max.trim()),
        fix: "sysctl user.max_user_namespaces=15000 (image builds without root use \
              mmdebstrap's unshare mode)"
            .into(),
        required: false,
    }
}

/// What building an image as an ordinary user needs besides mmdebstrap:
/// genext2fs, newuidmap and subordinate ids (root needs none of them).
fn unprivileged_build_lines() -> Vec<DoctorLine> {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_default();
    vec![
        DoctorLine::version(
            "genext2fs",
            "genext2fs",
            &["--version"],
            "apt-get install genext2fs (image builds without root)",
        ),
        DoctorLine {
            name: "newuidmap".into(),
            ok: std::path::Path::new("/usr/bin/newuidmap").is_file(),
            detail: "/usr/bin/newuidmap".into(),
            fix: "apt-get install uidmap (image builds without root)".into(),
            required: false,
        },
        subordinate_ids_line(&user, "/etc/subuid"),
        subordinate_ids_line(&user, "/etc/subgid"),
    ]
}

/// Whether `file` gives `user` at least 65536 subordinate ids (what
/// mmdebstrap's unshare mode maps a Debian tree onto).
fn subordinate_ids_line(user: &str, file: &str) -> DoctorLine {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let uid = nix::unistd::getuid().to_string();
    let count = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let _start = fields.next()?;
            let count: u64 = fields.next()?.trim().parse().ok()?;
            (owner == user || owner == uid).then_some(count)
        })
        .max();
    let (ok, detail) = match count {
        Some(count) if count >= 65536 => (true, format!("{user}: {count} ids")),
        Some(count) => (false, format!("{user}: only {count} ids (65536 needed)")),
        None => (false, format!("no range for {user}")),
    };
    DoctorLine {
        name: file.trim_start_matches("/etc/").to_owned(),
        ok,
        detail,
        fix: format!(
            "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} \
             (image builds without root)"
        ),
        required: false,
    }
}
