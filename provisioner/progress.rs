//! Progress for long work: a spinner per machine on a terminal (indicatif),
//! plain `name: message` lines otherwise (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new() -> Progress {
        let multi = std::io::stderr().is_terminal().then(MultiProgress::new);
        Progress { multi }
    }

    /// A task labelled `label`, e.g. a machine's name.
    pub fn task(&self, label: &str) -> Task {
        let bar = self.multi.as_ref().map(|multi| {
            let bar = multi.add(ProgressBar::new_spinner());
            let style = ProgressStyle::with_template(
                "{spinner:.cyan} {prefix:.bold} {wide_msg} {elapsed:.dim}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Task {
            label: label.to_string(),
            bar,
            multi: self.multi.clone(),
        }
    }

    /// A line above the bars (or on stderr).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

pub struct Task {
    label: String,
    bar: Option<ProgressBar>,
    multi: Option<MultiProgress>,
}

impl Task {
    pub fn set(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => eprintln!("{}: {message}", self.label),
        }
    }

    /// A line that stays, `label: message`, above the bars; the task goes on.
    pub fn println(&self, message: &str) {
        let line = format!("{}: {message}", self.label);
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Ends the task with a line that stays: the bar is replaced by
    /// `label: message` above the bars still running, so what is printed
    /// on stdout after the last task never lands on a bar's line.
    pub fn finish(&self, message: &str) {
        let line = format!("{}: {message}", self.label);
        match (&self.bar, &self.multi) {
            (Some(bar), Some(multi)) => {
                bar.finish_and_clear();
                let _ = multi.println(line);
            }
            _ => eprintln!("{line}"),
        }
    }
}
