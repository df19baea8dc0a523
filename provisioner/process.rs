//! Background processes testbed started and knows by a pid file: qemu, the
//! network switches, the OpenSSH ControlMasters. A pid alone is not enough
//! (pids are recycled, and a dead child lingers as a zombie until reaped),
//! so every question also names a marker that the process's command line
//! must contain. And the work testbed waits for (image tools, a host
//! build), which an interrupt stops ([`interrupt`]).
//!
//! A bottom-layer module: `/proc`, pid files and signals, nothing of testbed.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a process gets to end after SIGTERM, and again after SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// Where `program` is found on PATH, if it is.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// The pid written in `pid_file`, if it holds one.
pub fn read_pid(pid_file: &Path) -> Option<i32> {
    fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Whether the process in `pid_file` lives and its command line mentions
/// `marker` (so a recycled pid is not mistaken for ours).
pub fn process_alive(pid_file: &Path, marker: &str) -> bool {
    let Some(pid) = read_pid(pid_file) else {
        return false;
    };
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(marker) && !is_zombie(pid)
        }
        Err(_) => false,
    }
}

/// A zombie has ended but keeps its pid (and `/proc` entry) until its
/// parent reaps it: it counts as dead.
pub fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The name in parentheses may itself hold spaces or `)`.
            let after_name = stat.rsplit_once(')')?.1.trim_start().to_owned();
            after_name.chars().next()
        })
        .is_some_and(|state| state == 'Z')
}

/// Waits until the process is gone; false when it still runs at `timeout`.
pub fn wait_until_dead(pid_file: &Path, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid_file, marker) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Asks the process to end (SIGTERM) and returns at once.
pub fn request_stop(pid_file: &Path, marker: &str) {
    if let Some(pid) = live_pid(pid_file, marker) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// SIGTERM, then SIGKILL after a grace period; returns once it is gone (or
/// after a second grace period, when not even SIGKILL took it).
pub fn terminate(pid_file: &Path, marker: &str) {
    let Some(pid) = live_pid(pid_file, marker) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if !wait_until_dead(pid_file, marker, GRACE) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_until_dead(pid_file, marker, GRACE);
    }
}

/// The pid in `pid_file` when that process is alive and ours.
fn live_pid(pid_file: &Path, marker: &str) -> Option<i32> {
    let pid = read_pid(pid_file)?;
    process_alive(pid_file, marker).then_some(pid)
}

/// The process groups of the work children running now.
static WORK: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A work child (spawned with `process_group(0)`, so it leads a group of its
/// own) for as long as this guard lives: [`interrupt`] stops it and every
/// process it started.
#[must_use = "the child is stopped by an interrupt only while the guard lives"]
pub struct Work {
    group: i32,
}

/// Registers the child `pid`, which must lead its own process group. When
/// an interrupt came first, the child is stopped at once.
pub fn work(pid: u32) -> Work {
    let group = i32::try_from(pid).unwrap_or(i32::MAX);
    work_groups().insert(group);
    if interrupted() {
        stop_group(group);
    }
    Work { group }
}

impl Work {
    /// SIGTERM to the child's whole group now (a timeout ran out).
    pub fn stop(&self) {
        stop_group(self.group);
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        work_groups().remove(&self.group);
    }
}

fn work_groups() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    WORK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn stop_group(group: i32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(group), Signal::SIGTERM);
}

/// Ctrl-C or SIGTERM: every work child's group gets SIGTERM, and so does any
/// started from now on; [`interrupted`] says so from here on.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    for group in work_groups().iter() {
        stop_group(*group);
    }
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_live_child_is_ours_only_with_its_marker_and_dead_once_terminated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("sleep.pid");
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep");
        fs::write(&pid_file, child.id().to_string()).expect("pid file");
        assert_eq!(read_pid(&pid_file), i32::try_from(child.id()).ok());
        // Until the child has exec'd, its command line is still ours.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_alive(&pid_file, "sleep 30") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(process_alive(&pid_file, "sleep 30"));
        assert!(!process_alive(&pid_file, "qemu-system"));
        // Not reaped here until the end: the zombie must count as dead.
        terminate(&pid_file, "sleep 30");
        assert!(!process_alive(&pid_file, "sleep 30"));
        let _ = child.wait();
    }

    #[test]
    fn no_pid_file_is_no_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.pid");
        assert_eq!(read_pid(&missing), None);
        assert!(!process_alive(&missing, ""));
        assert!(wait_until_dead(&missing, "", Duration::ZERO));
        terminate(&missing, "");
        request_stop(&missing, "");
    }
}
