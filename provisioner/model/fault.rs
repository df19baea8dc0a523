//! A fault as written: a step's `fault = { … }` or `testbed fault …`.
//! How each is injected is `crate::lifecycle::faults`.

use std::fmt;
use std::time::Duration;

/// One fault, Jepsen's nemesis vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Groups of machines cut off from each other on every network they
    /// share; a machine in no group keeps its links.
    Partition(Vec<Vec<String>>),
    /// Every partition and link fault undone.
    Heal,
    /// The VM stopped at once, like a power failure.
    Kill(String),
    /// A killed machine powered on and brought back to its provisioned state.
    Start(String),
    /// The VM frozen.
    Pause(String),
    /// A paused VM running again, its clock set from the host's.
    Resume(String),
    /// One machine's link on one network made down, slow or lossy.
    Link(LinkFault),
}

/// `link = { machine, network, down, delay, jitter, loss }`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkFault {
    pub machine: String,
    pub network: String,
    pub shape: LinkShape,
}

/// What is wrong with a link; the default is a healthy one. Delay, jitter
/// and loss apply to the frames the machine sends, as `tc netem` on its
/// interface would: a round trip through it grows by `delay`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkShape {
    #[serde(default)]
    pub down: bool,
    #[serde(default, with = "micros")]
    pub delay: Duration,
    #[serde(default, with = "micros")]
    pub jitter: Duration,
    /// The share of frames dropped, from 0 to 1.
    #[serde(default)]
    pub loss: f64,
}

impl LinkShape {
    pub fn is_healthy(&self) -> bool {
        *self == LinkShape::default()
    }
}

impl Fault {
    /// The machines the fault names (for a partition, every group's).
    pub fn machines(&self) -> Vec<&str> {
        match self {
            Fault::Partition(groups) => groups.iter().flatten().map(String::as_str).collect(),
            Fault::Heal => Vec::new(),
            Fault::Kill(m) | Fault::Start(m) | Fault::Pause(m) | Fault::Resume(m) => vec![m],
            Fault::Link(link) => vec![&link.machine],
        }
    }
}

impl fmt::Display for Fault {
    /// As `status` lists it among the faults in force.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition(groups) => {
                let groups: Vec<String> = groups.iter().map(|g| g.join(" ")).collect();
                write!(f, "partition {}", groups.join(" / "))
            }
            Fault::Heal => write!(f, "heal"),
            Fault::Kill(m) => write!(f, "kill {m}"),
            Fault::Start(m) => write!(f, "start {m}"),
            Fault::Pause(m) => write!(f, "pause {m}"),
            Fault::Resume(m) => write!(f, "resume {m}"),
            Fault::Link(link) => write!(
                f,
                "link {} on {}: {}",
                link.machine, link.network, link.shape
            ),
        }
    }
}

impl fmt::Display for LinkShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.down {
            parts.push("down".to_string());
        }
        if !self.delay.is_zero() {
            let mut delay = format!("delay {}", humantime::format_duration(self.delay));
            if !self.jitter.is_zero() {
                delay += &format!(" ± {}", humantime::format_duration(self.jitter));
            }
            parts.push(delay);
        }
        if self.loss > 0.0 {
            parts.push(format!("loss {}%", self.loss * 100.0));
        }
        if parts.is_empty() {
            parts.push("healthy".to_string());
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// Parses a loss written as a percentage (`"10%"`, `"0.5%"`) into a share
/// from 0 (exclusive) to 1.
pub fn parse_loss(text: &str) -> Option<f64> {
    let percent: f64 = text.trim().strip_suffix('%')?.trim().parse().ok()?;
    (percent > 0.0 && percent <= 100.0).then_some(percent / 100.0)
}

/// Durations in the switch's file as whole microseconds.
mod micros {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let micros: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_micros(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_a_percentage_above_zero_and_at_most_a_hundred() {
        assert_eq!(parse_loss("10%"), Some(0.1));
        assert_eq!(parse_loss("0.5 %"), Some(0.005));
        assert_eq!(parse_loss("100%"), Some(1.0));
        for bad in ["10", "0%", "101%", "-1%", "x%", ""] {
            assert_eq!(parse_loss(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_link_fault_reads_as_status_shows_it() {
        let link = Fault::Link(LinkFault {
            machine: "zk-3".into(),
            network: "lan".into(),
            shape: LinkShape {
                delay: Duration::from_millis(300),
                jitter: Duration::from_millis(20),
                loss: 0.1,
                ..LinkShape::default()
            },
        });
        assert_eq!(
            link.to_string(),
            "link zk-3 on lan: delay 300ms ± 20ms, loss 10%"
        );
        let groups = vec![vec!["zk-1".to_string()], vec!["zk-2".into(), "zk-3".into()]];
        assert_eq!(
            Fault::Partition(groups).to_string(),
            "partition zk-1 / zk-2 zk-3"
        );
    }
}
