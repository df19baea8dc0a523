//! Ctrl-C and SIGTERM during a verb that works for long (`up`, `build`,
//! `run`, …): the work stops — local tools and builds, and the commands
//! running in guests, each by its process group —, temp files go with
//! their owners, and the user is told what exists and how to go on. Exit
//! 130.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

use crate::lifecycle::Testbed;
use crate::settings::Settings;

/// How a command ended: by itself, or by a signal (its name).
pub enum Ended<T> {
    Finished(T),
    Interrupted(&'static str),
}

/// The shell's status for a command ended by Ctrl-C (128 + SIGINT).
pub const INTERRUPTED_STATUS: u8 = 130;

/// Runs `work` until it finishes or SIGINT/SIGTERM arrives. On a signal,
/// local work children and remote commands are stopped while `work` still
/// holds its connections, then `work` is dropped.
pub async fn run_interruptible<T>(work: impl std::future::Future<Output = T>) -> Ended<T> {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Ended::Finished(work.await);
    };
    tokio::pin!(work);
    let name = tokio::select! {
        result = &mut work => return Ended::Finished(result),
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    crate::process::interrupt();
    // `work` is still polled meanwhile: its remote commands announce their
    // process groups through it.
    let stop = crate::ssh::stop_remote_commands();
    tokio::pin!(stop);
    tokio::select! {
        _ = &mut work => {
            stop.await;
        }
        _ = &mut stop => {}
    }
    Ended::Interrupted(name)
}

/// What an interrupted command says last: what exists now (from `status`)
/// and how to go on.
pub fn report(signal: &str, verb: &str, testbed: Option<Option<PathBuf>>, settings: &Settings) {
    eprintln!(
        "\ninterrupted by {signal}: `testbed {verb}` stopped its work (nothing half-made is kept)"
    );
    let Some(file) = testbed else {
        eprintln!("  run it again to start over");
        return;
    };
    let statuses = Testbed::locate_existing(file.as_deref(), settings).and_then(|t| t.status());
    match statuses {
        Ok(machines) if !machines.is_empty() => {
            let left: Vec<String> = machines
                .iter()
                .map(|m| format!("{} {}", m.name, m.state.as_str()))
                .collect();
            eprintln!("  machines now: {}", left.join(", "));
        }
        _ => {}
    }
    eprintln!("  `testbed up` continues from here; `testbed destroy` removes everything");
}

/// The exit status of an interrupted command.
pub fn status() -> ExitCode {
    ExitCode::from(INTERRUPTED_STATUS)
}
