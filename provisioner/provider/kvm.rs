//! Whether hardware acceleration really works here. `/dev/kvm` existing is
//! not enough (with broken nested virtualisation SeaBIOS runs but Linux
//! dies or hangs), so a bounded probe boots a real kernel under KVM and
//! waits for a line only a running kernel prints. The verdict is cached per
//! host kernel and qemu binary, so it is paid once.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::qemu::QEMU;
use super::{Accelerator, DoctorLine};
use crate::image::Cache;

/// A working KVM gets a kernel this far in well under a second.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Printed when the kernel, with no root disk, gives up mounting one.
const KERNEL_RAN: &str = "VFS: Unable to mount root fs";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub kvm: bool,
    /// Why KVM is or is not used, in a user's words.
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    verdict: Verdict,
}

/// The accelerator for machines booted by qemu on this host: KVM when the
/// probe passed, else TCG.
pub(super) fn accelerator(kernel: &Path, cache_dir: &Path) -> Accelerator {
    let (verdict, fresh) = verdict(kernel, cache_dir);
    Accelerator {
        name: if verdict.kvm {
            "KVM"
        } else {
            "TCG (software emulation)"
        },
        kvm: verdict.kvm,
        reason: verdict.reason,
        fresh,
    }
}

/// The verdicts this process has already read or probed, by cache folder:
/// every machine's start asks, and a cache that cannot be written must not
/// cost a probe each time. Held while probing, so parallel starts probe once.
static KNOWN: Mutex<Vec<(PathBuf, Verdict)>> = Mutex::new(Vec::new());

/// The verdict for this host, from this process's memory or the cache when
/// it is still valid. `fresh` is true when the probe ran now (the caller
/// says so, once).
pub fn verdict(kernel: &Path, cache_dir: &Path) -> (Verdict, bool) {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, verdict)) = known.iter().find(|(dir, _)| dir == cache_dir) {
        return (verdict.clone(), false);
    }
    let (verdict, fresh) = cached_or_probed(kernel, cache_dir);
    known.push((cache_dir.to_path_buf(), verdict.clone()));
    (verdict, fresh)
}

fn cached_or_probed(kernel: &Path, cache_dir: &Path) -> (Verdict, bool) {
    let key = cache_key();
    let cache_file = cache_dir.join("kvm-probe.json");
    if let Some(cached) = std::fs::read(&cache_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Cached>(&bytes).ok())
        .filter(|cached| cached.key == key)
    {
        return (cached.verdict, false);
    }
    let verdict = probe(kernel);
    if let Ok(json) = serde_json::to_vec(&Cached {
        key,
        verdict: verdict.clone(),
    }) {
        let _ = std::fs::create_dir_all(cache_dir);
        let _ = crate::state::write_atomic(&cache_file, &json, 0o644);
    }
    (verdict, true)
}

fn cache_key() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu = crate::process::which(QEMU)
        .and_then(|path| std::fs::metadata(path).ok())
        .and_then(|meta| meta.modified().ok())
        .map(|time| format!("{time:?}"))
        .unwrap_or_default();
    format!("{}|{qemu}", release.trim())
}

/// Boots `kernel` under KVM with no disk; KVM works if the kernel gets as far
/// as looking for its root filesystem within the time bound.
pub fn probe(kernel: &Path) -> Verdict {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Verdict {
            kvm: false,
            reason: format!("/dev/kvm is not usable ({e})"),
        };
    }
    let child = Command::new(QEMU)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "256",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return Verdict {
                kvm: false,
                reason: format!("cannot run {QEMU}: {e}"),
            }
        }
    };
    let (tx, rx) = mpsc::channel();
    if let Some(mut stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains(KERNEL_RAN) {
                    let _ = tx.send(());
                    return;
                }
            }
        });
    }
    let ran = rx.recv_timeout(PROBE_TIMEOUT).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    if ran {
        Verdict {
            kvm: true,
            reason: "KVM works (a probe kernel booted under it)".into(),
        }
    } else {
        Verdict {
            kvm: false,
            reason: format!(
                "a probe kernel did not boot under KVM within {} s (nested virtualisation broken?)",
                PROBE_TIMEOUT.as_secs()
            ),
        }
    }
}

/// `doctor`'s KVM line: a fresh probe (never the cached verdict: the host
/// may have changed) with the kernel of any cached image.
pub(super) fn doctor_line(cache_root: &Path) -> DoctorLine {
    let kernel = Cache::at(cache_root.to_path_buf())
        .list()
        .into_iter()
        .next()
        .map(|image| image.image.kernel);
    let (ok, detail) = match kernel {
        Some(kernel) => {
            let verdict = probe(&kernel);
            (verdict.kvm, verdict.reason)
        }
        None => (
            false,
            "not probed yet: no image is built (the probe boots an image's kernel); `up` probes it"
                .into(),
        ),
    };
    DoctorLine {
        name: "KVM".into(),
        ok,
        detail: if ok {
            detail
        } else {
            format!("{detail}; testbed uses TCG (slower, works)")
        },
        fix: "optional: a host where /dev/kvm boots guests (nested virtualisation enabled)".into(),
        required: false,
    }
}
