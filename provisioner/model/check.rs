//! A check as written: a `[[checks]]` entry, a step's check or a kit's
//! readiness probe. What each means and how it runs is `crate::check`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One `[[checks]]` entry as written (validated by the topology module).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// The machine whose service is checked.
    pub machine: String,
    /// Another machine the connection is made from (proves guest-to-guest
    /// reachability over the private network); default: the target itself,
    /// to 127.0.0.1.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub tcp: Option<TcpProbe>,
    #[serde(default)]
    pub http: Option<HttpProbe>,
    #[serde(default)]
    pub command: Option<CommandProbe>,
    /// Pause between attempts, e.g. "500ms" (default 1s).
    #[serde(default)]
    pub retry: Option<String>,
    /// Give up after, e.g. "60s" (default 30s).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `tcp = { port, send, expect }`: expect is a substring, or `/regex/`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    pub port: u16,
    #[serde(default)]
    pub send: Option<String>,
    #[serde(default)]
    pub expect: Option<String>,
}

/// `http = { port, path, status, headers, body, json = { "/pointer" = value } }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub json: BTreeMap<String, serde_json::Value>,
}

fn default_path() -> String {
    "/".into()
}

/// `command = { run, exit, stdout, json = { "/pointer" = value } }`, run on
/// the target over SSH by the guest's shell.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandProbe {
    pub run: String,
    #[serde(default)]
    pub exit: Option<i32>,
    #[serde(default)]
    pub stdout: Option<String>,
    #[serde(default)]
    pub json: BTreeMap<String, serde_json::Value>,
}
