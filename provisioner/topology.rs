//! The topology file: parsed, validated, and turned into the model the rest
//! of testbed works from. Every error names file:line:col and what is valid.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::de::{DeString, DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::model::{
    check_dist_path, find_cycle, is_identifier, line_col, Build, Builder, CheckSpec, Forward, Host,
    Input, LibvirtUri, Machine, Network, ProviderKind, ProvisionRun, Provisioner, Script, Step,
    StepCommand, Topology, DIST,
};
use crate::settings::Search;

mod fault;

/// The first `[build]` input of `topology` that does not exist, as a
/// located error.
pub fn missing_input(topology: &Topology) -> Option<TopologyError> {
    let build = topology.build.as_ref()?;
    let input = build
        .inputs
        .iter()
        .find(|input| !topology.dir().join(&input.path).exists())?;
    Some(TopologyError::At {
        path: topology.path.clone(),
        line: input.line,
        col: input.col,
        message: format!("input `{}` does not exist", input.path),
        help: Some(format!(
            "inputs are read relative to {}",
            topology.dir().display()
        )),
    })
}

/// Step names are typed on the command line: letters, digits, `-`, `_`.
fn is_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

// ---------------------------------------------------------------------------
// Built-in defaults and limits
// ---------------------------------------------------------------------------

/// Provider used when neither the machine nor `[defaults]` names one.
pub const DEFAULT_PROVIDER: ProviderKind = ProviderKind::Qemu;
/// Image used when neither the machine nor `[defaults]` names one.
pub const DEFAULT_IMAGE: &str = "debian-12";
/// CPUs used when neither the machine nor `[defaults]` sets `cpus`.
pub const DEFAULT_CPUS: u32 = 1;
/// Memory used when neither the machine nor `[defaults]` sets `memory`.
pub const DEFAULT_MEMORY_MIB: u64 = 768;
/// Smallest `memory` accepted: less does not boot a Debian guest reliably,
/// and usually means a unit was forgotten.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Upper bound for `cpus`; more is almost certainly a typo.
pub const MAX_CPUS: u32 = 64;
/// Longest allowed subnet prefix: /31 and /32 leave no room for two hosts.
pub const MAX_PREFIX: u8 = 30;
/// Shortest allowed subnet prefix: the size of 10.0.0.0/8.
pub const MIN_PREFIX: u8 = 8;

/// The RFC 1918 private ranges a subnet must lie in.
pub const PRIVATE_RANGES: [Ipv4Net; 3] = [
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// qemu's user-mode (slirp) network, which carries the management SSH path;
/// a private network overlapping it would make guest routing ambiguous.
pub const QEMU_USER_NET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 2, 0), 24);

const TOP_KEYS: &[&str] = &[
    "name", "defaults", "networks", "machines", "checks", "build", "steps", "libvirt", "hosts",
];
const LIBVIRT_KEYS: &[&str] = &["uri"];
const HOST_KEYS: &[&str] = &["uri"];
const URI_HELP: &str = "a libvirt URI looks like `qemu:///system`, `qemu:///session` or \
                        `qemu+ssh://root@10.77.0.2/system`";
const BUILD_KEYS: &[&str] = &["machine", "run", "inputs", "outputs", "timeout"];
const STEP_KEYS: &[&str] = &["name", "machine", "run", "fault", "checks", "timeout"];
const DEFAULTS_KEYS: &[&str] = &["provider", "image", "cpus", "memory", "internet", "host"];
const NETWORK_KEYS: &[&str] = &["subnet"];
const MACHINE_KEYS: &[&str] = &[
    "ip",
    "ips",
    "provider",
    "image",
    "cpus",
    "memory",
    "forward",
    "daemons",
    "vars",
    "depends_on",
    "packages",
    "artifacts",
    "internet",
    "host",
    "provision",
];
const PROVISION_KEYS: &[&str] = &["shell", "inline", "ansible", "args", "env", "inputs"];
const PROVISION_HELP: &str = "each `provision` entry is a table with one of `shell` (a script \
                              beside the topology), `inline` (the script's text) or `ansible` \
                              (a playbook beside the topology); shell scripts take `args` and \
                              `env`; any entry takes `inputs` (paths whose changes run it again)";
const PROVISION_EXAMPLE: &str =
    "[{ shell = \"provision.sh\", args = [\"--fast\"] }, { ansible = \"site.yml\" }]";
const FORWARD_KEYS: &[&str] = &["guest", "host"];
const CHECK_KEYS: &[&str] = &[
    "name", "machine", "from", "tcp", "http", "command", "retry", "timeout",
];
/// The probes a check can have (exactly one): name, keys, example.
const PROBES: [(&str, &[&str], &str); 3] = [
    ("tcp", &["port", "send", "expect"], "{ port = 2181 }"),
    (
        "http",
        &["port", "path", "status", "headers", "body", "json"],
        "{ port = 5050, path = \"/\" }",
    ),
    (
        "command",
        &["run", "exit", "stdout", "json"],
        "{ run = \"systemctl is-active zookeeper\" }",
    ),
];

const NAME_HELP: &str = "names become hostnames: 1 to 63 lowercase letters (a-z), digits and \
                         hyphens, not starting or ending with a hyphen";
const MEMORY_HELP: &str = "write memory as `768MiB`, `512M`, `1GiB`, `2G`, or a plain number \
                           of MiB such as `1024`; at least 128 MiB";
const SUBNET_HELP: &str = "write a private IPv4 range as ADDRESS/PREFIX, e.g. \
                           `192.168.33.0/24`, inside 10.0.0.0/8, 172.16.0.0/12 or \
                           192.168.0.0/16, with a prefix from /8 to /30";
const VAR_HELP: &str = "templates use each var as an identifier: a letter or `_`, then \
                        letters, digits and `_`";
const CHECK_HELP: &str = "a check is a `[[checks]]` table with `name`, `machine`, optionally \
                          `from`, `retry` and `timeout`, and one probe: `tcp = { port = 2181 }`, \
                          `http = { port = 5050, path = \"/\" }` or `command = { run = \"…\" }`";
const CHECKS_EXAMPLE: &str = "[{ name = \"zk\", machine = \"zk-1\", tcp = { port = 2181 } }]";
const DAEMONS_EXAMPLE: &str = "[\"zookeeper\"]";
const DEPENDS_EXAMPLE: &str = "[\"zk-1\"]";
const PACKAGES_EXAMPLE: &str = "[\"gcc\", \"libc6-dev\"]";
const ARTIFACTS_EXAMPLE: &str = "[\"dist/hello_world\"]";
const BUILD_HELP: &str = "[build] takes `machine` (a machine of the topology, or \"host\"), \
                          `run` (a shell script), `inputs` (paths beside the topology whose \
                          contents are hashed) and `outputs` (paths under `dist/`)";
const STEP_HELP: &str = "a step is a `[[steps]]` table with a `name`; a `fault` (e.g. \
                         `{ heal = true }`), or a `machine` and the shell command to `run` \
                         there, or both; and optionally `checks`, an array of checks that must \
                         pass after them";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a topology file was rejected. `Display` is the complete message for
/// the user: `FILE:LINE:COL: error: MESSAGE`, optionally followed by a line
/// `  help: …` saying what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file as a whole is unusable (it is empty); there is no position.
    #[error("{}: error: {message}{}", path.display(), help_suffix(help))]
    File {
        path: PathBuf,
        message: String,
        help: Option<String>,
    },
    /// A problem at a position in the file (1-based line and column).
    #[error("{}:{line}:{col}: error: {message}{}", path.display(), help_suffix(help))]
    At {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
        help: Option<String>,
    },
}

impl TopologyError {
    /// 1-based (line, column) of the problem, when it has one.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            TopologyError::At { line, col, .. } => Some((*line, *col)),
            TopologyError::Io { .. } | TopologyError::File { .. } => None,
        }
    }

    /// The `help:` text, when there is one.
    pub fn help(&self) -> Option<&str> {
        match self {
            TopologyError::File { help, .. } | TopologyError::At { help, .. } => help.as_deref(),
            TopologyError::Io { .. } => None,
        }
    }

    fn with_help(mut self, text: impl Into<String>) -> Self {
        if let TopologyError::File { help, .. } | TopologyError::At { help, .. } = &mut self {
            *help = Some(text.into());
        }
        self
    }
}

fn help_suffix(help: &Option<String>) -> String {
    help.as_ref()
        .map(|text| format!("\n  help: {text}"))
        .unwrap_or_default()
}

type Result<T> = std::result::Result<T, TopologyError>;

// ---------------------------------------------------------------------------
// Public entry points and helpers
// ---------------------------------------------------------------------------

/// Reads and validates the topology file at `path`.
/// `search`: the folders searched for recipes and kits besides those
/// beside the topology (their names are checked here).
pub fn load(path: &Path, search: &Search) -> Result<Topology> {
    let bytes = read(path)?;
    parse(path, decode(path, &bytes)?, search)
}

/// Reads and validates the topology file at `path` for verbs that act on
/// machines that exist (`ssh`, `status`, `halt`, `destroy`): any image and
/// daemon name is taken, since nothing is built or pushed.
pub fn load_existing(path: &Path) -> Result<Topology> {
    let bytes = read(path)?;
    check(path, decode(path, &bytes)?, None)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| TopologyError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Validates `text` as the topology file `path`. `path` is only used in
/// messages (as given), to canonicalise [`Topology::path`] and to find the
/// image recipes and daemon kits (`images/` and `daemons/` beside it or in an
/// ancestor directory).
pub fn parse(path: &Path, text: &str, search: &Search) -> Result<Topology> {
    check(path, text, Some(search))
}

/// Validates `text` as the topology file `path` without looking for its
/// recipes, kits or provisioners' files (a topology written by `import`).
pub fn check_shape(path: &Path, text: &str) -> Result<Topology> {
    check(path, text, None)
}

/// Parses and validates; image and daemon names are checked against those
/// found through `search`, or taken as they are without it.
fn check(path: &Path, text: &str, search: Option<&Search>) -> Result<Topology> {
    let source = Source { path, text };
    source.check_text()?;
    let root = DeTable::parse(text).map_err(|error| source.syntax_error(&error))?;
    let file = canonical(path);
    let dir = file.parent().unwrap_or_else(|| Path::new("."));
    let checker = Checker {
        source,
        recipes: search.map(|search| crate::image::recipe_names(dir, search)),
        kits: search.map(|search| crate::kit::kit_names(dir, search)),
        files_in: search.map(|_| dir.to_path_buf()),
    };
    checker.topology(root.get_ref(), file)
}

/// Whether `name` can be a machine or topology name: a valid hostname label
/// (`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`).
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let allowed = |byte: &u8| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-';
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(allowed)
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// Parses a memory size into MiB: `768MiB`, `512M`, `1GiB`, `2G`, `1TiB`,
/// or a plain number of MiB (`1024`). Units are binary and case-insensitive.
/// The error is a sentence for the user.
pub fn parse_memory_mib(text: &str) -> std::result::Result<u64, String> {
    parse_size_mib(text, "memory").and_then(check_memory_mib)
}

/// A size in MiB written as memory is (`8GiB`, `512M`, `1024`), zero
/// allowed; `what` names it in the error.
pub fn parse_size_mib(text: &str, what: &str) -> std::result::Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(format!("{what} `{text}` is not a size"));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{what} `{text}` is not a whole number; use a smaller unit (e.g. `1536MiB` for 1.5 GiB)"
        ));
    }
    let factor =
        memory_unit_factor(unit).map_err(|message| format!("{what} `{text}`: {message}"))?;
    number
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(factor))
        .ok_or_else(|| format!("{what} `{text}` is too large"))
}

/// MiB per unit; the error says what the unit could have meant.
fn memory_unit_factor(unit: &str) -> std::result::Result<u64, String> {
    match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mib" => Ok(1),
        "g" | "gib" => Ok(1024),
        "t" | "tib" => Ok(1024 * 1024),
        "mb" => Err("`MB` is ambiguous; did you mean `MiB`?".to_owned()),
        "gb" => Err("`GB` is ambiguous; did you mean `GiB`?".to_owned()),
        "tb" => Err("`TB` is ambiguous; did you mean `TiB`?".to_owned()),
        _ => Err(format!("unknown unit `{unit}`")),
    }
}

fn check_memory_mib(mib: u64) -> std::result::Result<u64, String> {
    if mib == 0 {
        Err("memory cannot be zero".to_owned())
    } else if mib < MIN_MEMORY_MIB {
        Err(format!(
            "{mib} MiB of memory is too little; the minimum is {MIN_MEMORY_MIB} MiB"
        ))
    } else {
        Ok(mib)
    }
}

/// The file's text, or why it is not text. Whole-file problems are checked
/// before parsing so that a binary file never reaches the TOML parser.
fn decode<'b>(path: &Path, bytes: &'b [u8]) -> Result<&'b str> {
    let nul = bytes.iter().position(|&byte| byte == 0);
    let (offset, message) = match (std::str::from_utf8(bytes), nul) {
        (Ok(text), None) => return Ok(text),
        (Ok(_), Some(nul)) => (nul, HAS_NUL),
        (Err(error), Some(nul)) if nul < error.valid_up_to() => (nul, HAS_NUL),
        (Err(error), _) => (error.valid_up_to(), NOT_UTF8),
    };
    // Everything before `offset` is valid UTF-8, so the position is exact.
    let prefix = String::from_utf8_lossy(bytes.get(..offset).unwrap_or_default());
    let source = Source {
        path,
        text: &prefix,
    };
    Err(source.error(offset..offset, message).with_help(TEXT_HELP))
}

const NOT_UTF8: &str = "the file is not UTF-8 text (binary?)";
const HAS_NUL: &str = "the file contains a NUL byte (binary?)";
const TEXT_HELP: &str = "a topology is a UTF-8 TOML text file, e.g. `topologies/quickstart.toml`";

/// `path` made absolute (symlinks resolved when the file exists).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

// ---------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------

type Span = Range<usize>;
type Key<'i> = Spanned<DeString<'i>>;
type Value<'i> = Spanned<DeValue<'i>>;

/// The file being checked: turns byte spans into positioned errors.
#[derive(Clone, Copy)]
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Span, message: impl Into<String>) -> TopologyError {
        let (line, col) = line_col(self.text, span.start);
        TopologyError::At {
            path: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
            help: None,
        }
    }

    fn line(&self, span: &Span) -> usize {
        line_col(self.text, span.start).0
    }

    /// Empty files and NUL bytes, which `parse` may get without `load`.
    fn check_text(&self) -> Result<()> {
        if self.text.trim().is_empty() {
            return Err(TopologyError::File {
                path: self.path.to_path_buf(),
                message: "the file is empty".to_owned(),
                help: Some(
                    "a topology needs at least `name = \"…\"` and one `[machines.NAME]` table"
                        .to_owned(),
                ),
            });
        }
        match self.text.find('\0') {
            Some(offset) => Err(self.error(offset..offset, HAS_NUL).with_help(TEXT_HELP)),
            None => Ok(()),
        }
    }

    fn syntax_error(&self, error: &toml::de::Error) -> TopologyError {
        let span = error.span().unwrap_or(0..0);
        let message = error.message().trim().replace('\n', "; ");
        let located = self.error(span, format!("invalid TOML: {message}"));
        if message.contains("duplicate key") {
            located.with_help("each key may appear only once in a table")
        } else {
            located.with_help("see https://toml.io for the TOML syntax")
        }
    }
}

/// The entries of `table` in file order (the map itself is sorted by key).
fn entries<'t, 'i>(table: &'t DeTable<'i>) -> Vec<(&'t Key<'i>, &'t Value<'i>)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// The candidate closest to `word`, if it is close enough to be a likely typo:
/// a high Jaro-Winkler similarity, or few edits (Jaro-Winkler alone misses
/// transpositions in short words such as `lna` for `lan`).
fn closest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .filter(|candidate| {
            let max_edits = (candidate.chars().count() / 3).max(1);
            strsim::jaro_winkler(&word, candidate) >= 0.8
                || strsim::osa_distance(&word, candidate) <= max_edits
        })
        .min_by(|a, b| {
            let key = |c: &str| {
                (
                    strsim::osa_distance(&word, c),
                    -strsim::jaro_winkler(&word, c),
                )
            };
            let (a, b) = (key(a), key(b));
            a.0.cmp(&b.0).then(a.1.total_cmp(&b.1))
        })
}

/// `; did you mean `x`?` or nothing.
fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    closest(word, candidates)
        .map(|candidate| format!("; did you mean `{candidate}`?"))
        .unwrap_or_default()
}

/// A valid name close to `name` (lowercased, other characters as hyphens).
fn name_suggestion(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-');
    if is_valid_name(trimmed) && trimmed != name {
        format!("; did you mean `{trimmed}`?")
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------
// Checking the document
// ---------------------------------------------------------------------------

/// Settings a machine can take from `[defaults]` or set itself.
#[derive(Debug, Default, Clone)]
struct Settings {
    provider: Option<ProviderKind>,
    image: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    internet: Option<bool>,
    /// `host`, where it is written.
    host: Option<(String, Span)>,
}

/// Who already claimed an address or host port, for clash messages.
struct Claim {
    machine: String,
    line: usize,
}

/// The files a `provision` entry names: a script or playbook must be a
/// file; an input may be a folder.
#[derive(Clone, Copy)]
enum ProvisionFile {
    Script,
    Playbook,
    Input,
}

impl std::fmt::Display for ProvisionFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProvisionFile::Script => "script",
            ProvisionFile::Playbook => "playbook",
            ProvisionFile::Input => "input",
        })
    }
}

/// Walks the parsed document, building the model and stopping at the first
/// problem (in file order within each section).
struct Checker<'a> {
    source: Source<'a>,
    /// Recipe names found, for `image` values (`None`: any is taken).
    recipes: Option<Vec<String>>,
    /// Kit names found, for `daemons` values (`None`: any is taken).
    kits: Option<Vec<String>>,
    /// The topology's folder, where provisioners' files must exist
    /// (`None`: they are not looked for).
    files_in: Option<PathBuf>,
}

impl Checker<'_> {
    fn topology(&self, root: &DeTable<'_>, path: PathBuf) -> Result<Topology> {
        self.check_keys(root, TOP_KEYS, "at the top level")?;
        let name = self.topology_name(root)?;
        let defaults = match root.get("defaults") {
            Some(value) => {
                let table = self.table(value, "defaults", "{ cpus = 2 }")?;
                self.check_keys(table, DEFAULTS_KEYS, "in [defaults]")?;
                self.settings(table)?
            }
            None => Settings::default(),
        };
        let networks = match root.get("networks") {
            Some(value) => self.networks(value)?,
            None => Vec::new(),
        };
        let hosts = match root.get("hosts") {
            Some(value) => self.hosts(value)?,
            None => BTreeMap::new(),
        };
        if let Some(host) = &defaults.host {
            self.known_host(host, &hosts)?;
        }
        let machines = self.machines(root, &defaults, &networks, &hosts)?;
        let checks = match root.get("checks") {
            Some(value) => self.checks(value, &machines)?,
            None => Vec::new(),
        };
        let build = match root.get("build") {
            Some(value) => Some(self.build(value, &machines)?),
            None => None,
        };
        let steps = match root.get("steps") {
            Some(value) => self.steps(value, &machines)?,
            None => Vec::new(),
        };
        let libvirt_uri = match root.get("libvirt") {
            Some(value) => Some(self.libvirt_uri(value)?),
            None => None,
        };
        Ok(Topology {
            name,
            path,
            networks: networks
                .into_iter()
                .map(|(network, _)| (network.name.clone(), network))
                .collect(),
            machines,
            checks,
            build,
            steps,
            libvirt_uri,
            hosts,
        })
    }

    /// `[libvirt]`: `uri`, a libvirt connection URI.
    fn libvirt_uri(&self, value: &Value<'_>) -> Result<String> {
        const EXAMPLE: &str = "{ uri = \"qemu:///system\" }";
        let table = self.table(value, "libvirt", EXAMPLE)?;
        self.check_keys(table, LIBVIRT_KEYS, "in [libvirt]")?;
        let Some(uri) = table.get("uri") else {
            return Err(self
                .source
                .error(value.span(), "[libvirt] has no `uri`")
                .with_help(
                    "add `uri = \"qemu:///system\"` (or qemu:///session, qemu+ssh://host/system)",
                ));
        };
        self.uri(uri)
    }

    /// `uri`: a URI of libvirt's qemu driver (scheme `qemu` or
    /// `qemu+TRANSPORT`, path `/system` or `/session`).
    fn uri(&self, value: &Value<'_>) -> Result<String> {
        let text = self.string(value, "uri", "\"qemu:///system\"")?;
        if let Err(why) = LibvirtUri::parse(text) {
            return Err(self
                .source
                .error(
                    value.span(),
                    format!("`{text}` is not a libvirt URI: {why}"),
                )
                .with_help(URI_HELP));
        }
        Ok(text.to_owned())
    }

    /// `[hosts.NAME]`: the libvirt hosts machines may be placed on.
    fn hosts(&self, value: &Value<'_>) -> Result<BTreeMap<String, Host>> {
        const EXAMPLE: &str = "{ uri = \"qemu+ssh://root@10.77.0.2/system\" }";
        let table = self.table(value, "hosts", "{ rack-a = { uri = \"qemu:///system\" } }")?;
        let mut hosts = BTreeMap::new();
        for (key, value) in entries(table) {
            self.check_name(key, "host")?;
            let name = key.get_ref().as_ref();
            let place = format!("in [hosts.{name}]");
            let host = self.table(value, name, EXAMPLE)?;
            self.check_keys(host, HOST_KEYS, &place)?;
            let Some(uri) = host.get("uri") else {
                return Err(self
                    .source
                    .error(key.span(), format!("[hosts.{name}] has no `uri`"))
                    .with_help(format!(
                        "add `uri = \"qemu+ssh://root@HOST/system\"`; {URI_HELP}"
                    )));
            };
            let uri = self.uri(uri)?;
            hosts.insert(
                name.to_owned(),
                Host {
                    name: name.to_owned(),
                    uri,
                },
            );
        }
        Ok(hosts)
    }

    /// A `host` value must name one of `[hosts]`.
    fn known_host(
        &self,
        (name, span): &(String, Span),
        hosts: &BTreeMap<String, Host>,
    ) -> Result<()> {
        if hosts.contains_key(name) {
            return Ok(());
        }
        let hint = did_you_mean(name, hosts.keys().map(String::as_str));
        let help = if hosts.is_empty() {
            "declare it: `[hosts.NAME]` with `uri = \"qemu+ssh://root@HOST/system\"`".to_owned()
        } else {
            format!(
                "hosts in this topology: {}",
                hosts.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        Err(self
            .source
            .error(span.clone(), format!("unknown host `{name}`{hint}"))
            .with_help(help))
    }

    /// The host a machine runs on: its own `host`, else `[defaults] host`
    /// when it is a libvirt machine. Only libvirt machines have hosts.
    fn machine_host(
        &self,
        machine: &str,
        provider: ProviderKind,
        own: Option<&(String, Span)>,
        defaults: &Settings,
        hosts: &BTreeMap<String, Host>,
    ) -> Result<Option<String>> {
        let host = match (own, &defaults.host) {
            (Some((_, span)), _) if provider != ProviderKind::Libvirt => {
                return Err(self
                    .source
                    .error(
                        span.clone(),
                        format!(
                            "machine `{machine}` runs on {}, which has no hosts: `host` \
                             places libvirt machines",
                            provider.as_str()
                        ),
                    )
                    .with_help("set `provider = \"libvirt\"` on it, or remove `host`"));
            }
            (Some(host), _) => host,
            (None, Some(host)) if provider == ProviderKind::Libvirt => host,
            _ => return Ok(None),
        };
        self.known_host(host, hosts)?;
        Ok(Some(host.0.clone()))
    }

    fn topology_name(&self, root: &DeTable<'_>) -> Result<String> {
        let Some(value) = root.get("name") else {
            return Err(self
                .source
                .error(0..0, "missing `name`: every topology needs a name")
                .with_help(format!(
                    "add `name = \"my-cluster\"` at the top of the file; {NAME_HELP}"
                )));
        };
        let name = self.string(value, "name", "\"my-cluster\"")?;
        if !is_valid_name(name) {
            return Err(self
                .source
                .error(
                    value.span(),
                    format!("invalid topology name `{name}`{}", name_suggestion(name)),
                )
                .with_help(format!(
                    "the name is used in directory and socket names; {NAME_HELP}"
                )));
        }
        Ok(name.to_owned())
    }

    // -- generic value checks ------------------------------------------------

    /// Rejects keys of `table` not in `valid`, suggesting the closest one.
    fn check_keys(&self, table: &DeTable<'_>, valid: &[&str], place: &str) -> Result<()> {
        for (key, _) in entries(table) {
            let word = key.get_ref().as_ref();
            if !valid.contains(&word) {
                let hint = did_you_mean(word, valid.iter().copied());
                return Err(self
                    .source
                    .error(key.span(), format!("unknown key `{word}` {place}{hint}"))
                    .with_help(format!("valid keys {place}: {}", valid.join(", "))));
            }
        }
        Ok(())
    }

    fn type_error(
        &self,
        value: &Value<'_>,
        key: &str,
        expected: &str,
        example: &str,
    ) -> TopologyError {
        self.source
            .error(
                value.span(),
                format!("`{key}` must be {expected}, not {}", a_type(value)),
            )
            .with_help(format!("for example `{key} = {example}`"))
    }

    fn table<'t, 'i>(
        &self,
        value: &'t Value<'i>,
        key: &str,
        example: &str,
    ) -> Result<&'t DeTable<'i>> {
        value
            .get_ref()
            .as_table()
            .ok_or_else(|| self.type_error(value, key, "a table", example))
    }

    fn string<'t>(&self, value: &'t Value<'_>, key: &str, example: &str) -> Result<&'t str> {
        value
            .get_ref()
            .as_str()
            .ok_or_else(|| self.type_error(value, key, "a string", example))
    }

    /// A positive duration written as humantime reads it (`90s`, `10m`, `2h`).
    fn duration(&self, value: &Value<'_>, key: &str, example: &str) -> Result<Duration> {
        let text = self.string(value, key, example)?;
        match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            _ => Err(self
                .source
                .error(value.span(), format!("`{key}` `{text}` is not a duration"))
                .with_help(format!(
                    "write a positive duration with its unit, e.g. `{key} = {example}` \
                     (ms, s, m, h)"
                ))),
        }
    }

    fn boolean(&self, value: &Value<'_>, key: &str) -> Result<bool> {
        value
            .get_ref()
            .as_bool()
            .ok_or_else(|| self.type_error(value, key, "true or false", "true"))
    }

    /// An integer of any size TOML allows, so range errors can quote it.
    fn integer(&self, value: &Value<'_>, key: &str, example: &str) -> Result<i128> {
        let integer = value
            .get_ref()
            .as_integer()
            .ok_or_else(|| self.type_error(value, key, "an integer", example))?;
        i128::from_str_radix(integer.as_str(), integer.radix()).map_err(|_| {
            self.source
                .error(value.span(), format!("`{key}` is out of range"))
                .with_help(format!("for example `{key} = {example}`"))
        })
    }

    /// An array of strings, each with its span.
    fn string_list<'t>(
        &self,
        value: &'t Value<'_>,
        key: &str,
        example: &str,
    ) -> Result<Vec<(&'t str, Span)>> {
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.type_error(value, key, "an array of strings", example));
        };
        items
            .iter()
            .map(|item| match item.get_ref().as_str() {
                Some(text) => Ok((text, item.span())),
                None => Err(self
                    .source
                    .error(
                        item.span(),
                        format!("each `{key}` entry must be a string, not {}", a_type(item)),
                    )
                    .with_help(format!("for example `{key} = {example}`"))),
            })
            .collect()
    }

    /// Rejects `entry` when `earlier` entries of the same list have it.
    fn listed_once(
        &self,
        entry: &str,
        span: Span,
        earlier: &[&str],
        list: &str,
        what: &str,
    ) -> Result<()> {
        if !earlier.contains(&entry) {
            return Ok(());
        }
        Err(self
            .source
            .error(span, format!("`{entry}` is listed twice in {list}"))
            .with_help(format!("list each {what} once")))
    }

    /// The machine of `machines` called `name`, or an error naming the others.
    fn known_machine<'m>(
        &self,
        name: &str,
        span: Span,
        place: &str,
        machines: &'m [Machine],
    ) -> Result<&'m Machine> {
        if let Some(machine) = machines.iter().find(|machine| machine.name == name) {
            return Ok(machine);
        }
        let names: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
        let hint = did_you_mean(name, names.iter().copied());
        Err(self
            .source
            .error(span, format!("unknown machine `{name}` {place}{hint}"))
            .with_help(format!("machines defined here: {}", names.join(", "))))
    }

    // -- settings (defaults and machines) ------------------------------------

    /// `provider`, `image`, `cpus` and `memory` of a `[defaults]` or machine
    /// table; other keys are left to the caller.
    fn settings(&self, table: &DeTable<'_>) -> Result<Settings> {
        let mut settings = Settings::default();
        for (key, value) in entries(table) {
            match key.get_ref().as_ref() {
                "provider" => settings.provider = Some(self.provider(value)?),
                "image" => settings.image = Some(self.image(value)?),
                "cpus" => settings.cpus = Some(self.cpus(value)?),
                "memory" => settings.memory_mib = Some(self.memory(value)?),
                "internet" => settings.internet = Some(self.boolean(value, "internet")?),
                "host" => {
                    let host = self.string(value, "host", "\"rack-a\"")?;
                    settings.host = Some((host.to_owned(), value.span()));
                }
                _ => {}
            }
        }
        Ok(settings)
    }

    fn provider(&self, value: &Value<'_>) -> Result<ProviderKind> {
        let text = self.string(value, "provider", "\"qemu\"")?;
        match text {
            "qemu" => Ok(ProviderKind::Qemu),
            "libvirt" => Ok(ProviderKind::Libvirt),
            "virtualbox" => Ok(ProviderKind::Virtualbox),
            _ => {
                let hint = did_you_mean(text, ProviderKind::ALL);
                Err(self
                    .source
                    .error(value.span(), format!("unknown provider `{text}`{hint}"))
                    .with_help(format!("valid providers: {}", ProviderKind::ALL.join(", "))))
            }
        }
    }

    fn image(&self, value: &Value<'_>) -> Result<String> {
        let text = self.string(value, "image", "\"debian-12\"")?;
        let Some(recipes) = &self.recipes else {
            return Ok(text.to_owned());
        };
        if recipes.iter().any(|recipe| recipe == text) {
            return Ok(text.to_owned());
        }
        let hint = did_you_mean(text, recipes.iter().map(String::as_str));
        Err(self
            .source
            .error(value.span(), format!("unknown image `{text}`{hint}"))
            .with_help(self.recipes_help()))
    }

    fn recipes_help(&self) -> String {
        let recipes = self.recipes.as_deref().unwrap_or_default();
        if recipes.is_empty() {
            "no image recipes found: add `images/<name>.toml` beside the topology or in a \
             directory above it"
                .to_owned()
        } else {
            format!(
                "available images (built in, or images/<name>.toml beside the topology or \
                 above it): {}",
                recipes.join(", ")
            )
        }
    }

    fn cpus(&self, value: &Value<'_>) -> Result<u32> {
        let count = self.integer(value, "cpus", "2")?;
        match u32::try_from(count) {
            Ok(cpus @ 1..=MAX_CPUS) => Ok(cpus),
            _ => Err(self
                .source
                .error(value.span(), format!("`cpus` = {count} is out of range"))
                .with_help(format!("`cpus` must be from 1 to {MAX_CPUS}"))),
        }
    }

    /// A size string, or a plain integer meaning MiB.
    fn memory(&self, value: &Value<'_>) -> Result<u64> {
        let parsed = match value.get_ref() {
            DeValue::String(text) => parse_memory_mib(text),
            DeValue::Integer(_) => {
                let mib = self.integer(value, "memory", "\"1GiB\"")?;
                u64::try_from(mib)
                    .map_err(|_| format!("memory {mib} is negative"))
                    .and_then(check_memory_mib)
            }
            _ => Err(format!(
                "`memory` must be a size such as \"1GiB\", not {}",
                a_type(value)
            )),
        };
        parsed.map_err(|message| {
            self.source
                .error(value.span(), message)
                .with_help(MEMORY_HELP)
        })
    }

    // -- networks ------------------------------------------------------------

    /// The networks in file order, each with the span of its subnet.
    fn networks(&self, value: &Value<'_>) -> Result<Vec<(Network, Span)>> {
        let table = self.table(
            value,
            "networks",
            "{ lan = { subnet = \"192.168.33.0/24\" } }",
        )?;
        let mut networks: Vec<(Network, Span)> = Vec::new();
        for (key, value) in entries(table) {
            let name = key.get_ref().as_ref();
            self.check_name(key, "network")?;
            let place = format!("in [networks.{name}]");
            let body = self.table(value, name, "{ subnet = \"192.168.33.0/24\" }")?;
            self.check_keys(body, NETWORK_KEYS, &place)?;
            let Some(subnet_value) = body.get("subnet") else {
                return Err(self
                    .source
                    .error(key.span(), format!("network `{name}` has no `subnet`"))
                    .with_help(SUBNET_HELP));
            };
            let subnet = self.subnet(subnet_value)?;
            self.check_overlaps(name, subnet, subnet_value.span(), &networks)?;
            let network = Network {
                name: name.to_owned(),
                subnet,
            };
            networks.push((network, subnet_value.span()));
        }
        Ok(networks)
    }

    fn subnet(&self, value: &Value<'_>) -> Result<Ipv4Net> {
        let text = self.string(value, "subnet", "\"192.168.33.0/24\"")?;
        let problem = |message: String| {
            self.source
                .error(value.span(), message)
                .with_help(SUBNET_HELP)
        };
        let net: Ipv4Net = match text.parse() {
            Ok(net) => net,
            Err(_) if text.parse::<Ipv4Addr>().is_ok() => {
                return Err(problem(format!(
                    "subnet `{text}` has no prefix length; did you mean `{text}/24`?"
                )))
            }
            Err(_) => {
                return Err(problem(format!(
                    "`{text}` is not an IPv4 subnet in CIDR notation"
                )))
            }
        };
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&net.prefix_len()) {
            return Err(problem(format!(
                "subnet `{text}`: prefix /{} is outside /{MIN_PREFIX} to /{MAX_PREFIX}",
                net.prefix_len()
            )));
        }
        if net.trunc() != net {
            return Err(problem(format!(
                "subnet `{text}` has host bits set; did you mean `{}`?",
                net.trunc()
            )));
        }
        if !PRIVATE_RANGES.iter().any(|range| range.contains(&net)) {
            return Err(problem(format!("subnet `{text}` is not a private range")));
        }
        Ok(net)
    }

    /// Rejects a subnet sharing addresses with qemu's user network or with a
    /// network defined earlier in the file.
    fn check_overlaps(
        &self,
        name: &str,
        subnet: Ipv4Net,
        span: Span,
        earlier: &[(Network, Span)],
    ) -> Result<()> {
        if overlaps(subnet, QEMU_USER_NET) {
            return Err(self
                .source
                .error(
                    span,
                    format!(
                        "subnet {subnet} of network `{name}` overlaps {QEMU_USER_NET}, which \
                         qemu's user-mode network uses for the management (SSH) path"
                    ),
                )
                .with_help("pick a range that avoids 10.0.2.0/24, e.g. `192.168.33.0/24`"));
        }
        for (other, other_span) in earlier {
            if overlaps(subnet, other.subnet) {
                return Err(self
                    .source
                    .error(
                        span,
                        format!(
                            "subnet {subnet} of network `{name}` overlaps {} of network `{}` \
                             (line {})",
                            other.subnet,
                            other.name,
                            self.source.line(other_span)
                        ),
                    )
                    .with_help("each network needs its own range; choose disjoint subnets"));
            }
        }
        Ok(())
    }

    // -- machines ------------------------------------------------------------

    fn machines(
        &self,
        root: &DeTable<'_>,
        defaults: &Settings,
        networks: &[(Network, Span)],
        hosts: &BTreeMap<String, Host>,
    ) -> Result<Vec<Machine>> {
        const EXAMPLE: &str = "add a machine, e.g. `[machines.alpha]` with `ip = \"192.168.33.2\"`";
        let Some((key, value)) = root.get_key_value("machines") else {
            return Err(self
                .source
                .error(0..0, "no machines: a topology needs at least one machine")
                .with_help(EXAMPLE));
        };
        let table = self.table(value, "machines", "{ alpha = {} }")?;
        if table.is_empty() {
            return Err(self
                .source
                .error(
                    key.span(),
                    "`machines` is empty: a topology needs at least one machine",
                )
                .with_help(EXAMPLE));
        }
        let mut claims = Claims::default();
        let machines = entries(table)
            .into_iter()
            .map(|(key, value)| self.machine(key, value, defaults, networks, hosts, &mut claims))
            .collect::<Result<Vec<_>>>()?;
        self.dependencies(table, &machines)?;
        self.one_provider_per_network(table, &machines)?;
        Ok(machines)
    }

    /// A network is made by one provider: a qemu switch and a libvirt
    /// bridge cannot be one L2 segment.
    fn one_provider_per_network(&self, table: &DeTable<'_>, machines: &[Machine]) -> Result<()> {
        let mut first: BTreeMap<&str, &Machine> = BTreeMap::new();
        for machine in machines {
            for network in machine.ips.keys() {
                let earlier = *first.entry(network).or_insert(machine);
                if earlier.provider == machine.provider {
                    continue;
                }
                let span = table
                    .get_key_value(machine.name.as_str())
                    .map(|(key, _)| key.span())
                    .unwrap_or_default();
                return Err(self
                    .source
                    .error(
                        span,
                        format!(
                            "machine `{}` runs on {} but shares network `{network}` with `{}` on \
                             {}",
                            machine.name,
                            machine.provider.as_str(),
                            earlier.name,
                            earlier.provider.as_str()
                        ),
                    )
                    .with_help(
                        "machines on one network need one provider: set `provider` in [defaults]",
                    ));
            }
        }
        Ok(())
    }

    fn check_name(&self, key: &Key<'_>, what: &str) -> Result<()> {
        let name = key.get_ref().as_ref();
        if is_valid_name(name) {
            return Ok(());
        }
        Err(self
            .source
            .error(
                key.span(),
                format!("invalid {what} name `{name}`{}", name_suggestion(name)),
            )
            .with_help(NAME_HELP))
    }

    fn machine(
        &self,
        key: &Key<'_>,
        value: &Value<'_>,
        defaults: &Settings,
        networks: &[(Network, Span)],
        hosts: &BTreeMap<String, Host>,
        claims: &mut Claims,
    ) -> Result<Machine> {
        let name = key.get_ref().as_ref();
        self.check_name(key, "machine")?;
        let place = format!("in [machines.{name}]");
        let table = self.table(value, name, "{ ip = \"192.168.33.2\" }")?;
        self.check_keys(table, MACHINE_KEYS, &place)?;
        let own = self.settings(table)?;
        let ips = self.machine_ips(name, table, networks, claims)?;
        let forwards = match table.get("forward") {
            Some(value) => self.forwards(name, value, claims)?,
            None => Vec::new(),
        };
        let image = match own.image.or_else(|| defaults.image.clone()) {
            Some(image) => image,
            None => self.default_image(key)?,
        };
        let daemons = match table.get("daemons") {
            Some(value) => self.daemons(name, value)?,
            None => Vec::new(),
        };
        let vars = match table.get("vars") {
            Some(value) => self.vars(name, value)?,
            None => BTreeMap::new(),
        };
        // Names are checked once every machine is known (`dependencies`).
        let depends_on = match table.get("depends_on") {
            Some(value) => self.string_list(value, "depends_on", DEPENDS_EXAMPLE)?,
            None => Vec::new(),
        };
        let packages = match table.get("packages") {
            Some(value) => self.packages(name, value)?,
            None => Vec::new(),
        };
        let artifacts = match table.get("artifacts") {
            Some(value) => self.artifacts(name, value)?,
            None => Vec::new(),
        };
        let provider = own
            .provider
            .or(defaults.provider)
            .unwrap_or(DEFAULT_PROVIDER);
        let host = self.machine_host(name, provider, own.host.as_ref(), defaults, hosts)?;
        let provision = match table.get("provision") {
            Some(value) => self.provisioners(value)?,
            None => Vec::new(),
        };
        Ok(Machine {
            name: name.to_owned(),
            provider,
            image,
            cpus: own.cpus.or(defaults.cpus).unwrap_or(DEFAULT_CPUS),
            memory_mib: own
                .memory_mib
                .or(defaults.memory_mib)
                .unwrap_or(DEFAULT_MEMORY_MIB),
            ips,
            forwards,
            daemons,
            vars,
            depends_on: depends_on
                .into_iter()
                .map(|(machine, _)| machine.to_owned())
                .collect(),
            packages,
            artifacts,
            internet: own.internet.or(defaults.internet).unwrap_or(false),
            host,
            provision,
        })
    }

    // -- provision -----------------------------------------------------------

    /// `provision`: an array of provisioner tables, in the order they run.
    fn provisioners(&self, value: &Value<'_>) -> Result<Vec<Provisioner>> {
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.type_error(
                value,
                "provision",
                "an array of tables",
                PROVISION_EXAMPLE,
            ));
        };
        items.iter().map(|item| self.provisioner(item)).collect()
    }

    fn provisioner(&self, item: &Value<'_>) -> Result<Provisioner> {
        let Some(table) = item.get_ref().as_table() else {
            return Err(self
                .source
                .error(
                    item.span(),
                    format!(
                        "each `provision` entry must be a table, not {}",
                        a_type(item)
                    ),
                )
                .with_help(PROVISION_HELP));
        };
        self.check_keys(table, PROVISION_KEYS, "in a `provision` entry")?;
        let (kind, script) = self.provision_kind(table, item)?;
        let text = self.string(script, kind, "\"provision.sh\"")?;
        let run = match kind {
            "inline" => {
                self.not_blank((text, script.span()), "inline", "a `provision` entry")?;
                self.shell_run(table, Script::Inline(text.to_owned()))?
            }
            "shell" => {
                self.provision_file(text, script.span(), ProvisionFile::Script)?;
                self.shell_run(table, Script::File(text.to_owned()))?
            }
            _ => self.ansible_run(table, text, script.span())?,
        };
        let inputs = match table.get("inputs") {
            Some(value) => {
                let mut inputs = Vec::new();
                for (path, span) in self.string_list(value, "inputs", "[\"templates\"]")? {
                    self.provision_file(path, span, ProvisionFile::Input)?;
                    inputs.push(path.to_owned());
                }
                inputs
            }
            None => Vec::new(),
        };
        Ok(Provisioner { run, inputs })
    }

    /// Which of `shell`, `inline` and `ansible` the entry has (just one),
    /// with its value.
    fn provision_kind<'t, 'i>(
        &self,
        table: &'t DeTable<'i>,
        item: &Value<'_>,
    ) -> Result<(&'static str, &'t Value<'i>)> {
        let kinds: Vec<(&'static str, &Value<'_>)> = ["shell", "inline", "ansible"]
            .into_iter()
            .filter_map(|kind| Some((kind, table.get(kind)?)))
            .collect();
        match kinds.as_slice() {
            [only] => Ok(*only),
            [] => Err(self
                .source
                .error(item.span(), "this `provision` entry runs nothing")
                .with_help(PROVISION_HELP)),
            [(first, _), (second, _), ..] => Err(self
                .source
                .error(
                    item.span(),
                    format!("this `provision` entry has both `{first}` and `{second}`"),
                )
                .with_help(format!("give each its own entry; {PROVISION_HELP}"))),
        }
    }

    /// An Ansible provisioner: its playbook, and none of a script's keys.
    fn ansible_run(&self, table: &DeTable<'_>, playbook: &str, span: Span) -> Result<ProvisionRun> {
        for key in ["args", "env"] {
            if let Some(value) = table.get(key) {
                return Err(self
                    .source
                    .error(value.span(), format!("`{key}` is for shell provisioners"))
                    .with_help(
                        "pass values to a playbook through the machine's `vars` \
                         (they are its host vars)",
                    ));
            }
        }
        self.provision_file(playbook, span, ProvisionFile::Playbook)?;
        Ok(ProvisionRun::Ansible {
            playbook: playbook.to_owned(),
        })
    }

    /// A shell provisioner's `args` and `env` around its script.
    fn shell_run(&self, table: &DeTable<'_>, script: Script) -> Result<ProvisionRun> {
        let args = match table.get("args") {
            Some(value) => self
                .string_list(value, "args", "[\"--fast\"]")?
                .into_iter()
                .map(|(arg, _)| arg.to_owned())
                .collect(),
            None => Vec::new(),
        };
        let mut env = BTreeMap::new();
        if let Some(value) = table.get("env") {
            let table = self.table(value, "env", "{ ZK_MYID = \"1\" }")?;
            for (key, value) in entries(table) {
                let name = key.get_ref().as_ref();
                if !is_identifier(name) {
                    return Err(self
                        .source
                        .error(
                            key.span(),
                            format!("invalid environment variable name `{name}`"),
                        )
                        .with_help("a letter or `_`, then letters, digits and `_`"));
                }
                env.insert(
                    name.to_owned(),
                    self.string(value, name, "\"1\"")?.to_owned(),
                );
            }
        }
        Ok(ProvisionRun::Shell { script, args, env })
    }

    /// A provisioner's file: relative to the topology (it may climb out
    /// with a leading `../`), and there when files are looked for.
    fn provision_file(&self, path: &str, span: Span, what: ProvisionFile) -> Result<()> {
        if crate::build::build_path(path).is_none() {
            return Err(self
                .source
                .error(span, format!("{what} `{path}` must be a relative path"))
                .with_help(
                    "write it relative to the topology file, e.g. `provision/zookeeper.sh`; \
                     `..` only at the start",
                ));
        }
        let Some(dir) = &self.files_in else {
            return Ok(());
        };
        let found = dir.join(path);
        let ok = match what {
            ProvisionFile::Input => found.exists(),
            ProvisionFile::Script | ProvisionFile::Playbook => found.is_file(),
        };
        if ok {
            return Ok(());
        }
        Err(self
            .source
            .error(span, format!("{what} `{path}` does not exist"))
            .with_help(format!("it is read relative to {}", dir.display())))
    }

    /// `packages`: Debian package names, each once.
    fn packages(&self, machine: &str, value: &Value<'_>) -> Result<Vec<String>> {
        let list = format!("`packages` of machine `{machine}`");
        let mut packages: Vec<&str> = Vec::new();
        for (package, span) in self.string_list(value, "packages", PACKAGES_EXAMPLE)? {
            if !crate::image::is_package_name(package) {
                return Err(self
                    .source
                    .error(span, format!("`{package}` is not a Debian package name"))
                    .with_help(
                        "Debian package names are lowercase letters, digits and `+-.`, e.g. \
                         `build-essential`",
                    ));
            }
            self.listed_once(package, span, &packages, &list, "package")?;
            packages.push(package);
        }
        Ok(packages.into_iter().map(str::to_owned).collect())
    }

    /// `artifacts`: paths under `dist/`, each once.
    fn artifacts(&self, machine: &str, value: &Value<'_>) -> Result<Vec<String>> {
        let list = format!("`artifacts` of machine `{machine}`");
        let mut artifacts: Vec<&str> = Vec::new();
        for (path, span) in self.string_list(value, "artifacts", ARTIFACTS_EXAMPLE)? {
            self.dist_path(path, span.clone(), "artifact")?;
            self.listed_once(path, span, &artifacts, &list, "artifact")?;
            artifacts.push(path);
        }
        Ok(artifacts.into_iter().map(str::to_owned).collect())
    }

    fn dist_path(&self, path: &str, span: Span, what: &str) -> Result<()> {
        check_dist_path(path).map_err(|message| {
            self.source
                .error(span, format!("{what} `{path}`: {message}"))
                .with_help(format!(
                    "artifacts are files the build step leaves under `{DIST}/`, e.g. \
                     `{DIST}/hello_world`"
                ))
        })
    }

    /// The built-in image, which must exist like any other.
    fn default_image(&self, key: &Key<'_>) -> Result<String> {
        let found = self.recipes.as_ref();
        if found.is_none_or(|recipes| recipes.iter().any(|recipe| recipe == DEFAULT_IMAGE)) {
            return Ok(DEFAULT_IMAGE.to_owned());
        }
        Err(self
            .source
            .error(
                key.span(),
                format!(
                    "machine `{}` uses the built-in default image `{DEFAULT_IMAGE}`, which has \
                     no recipe",
                    key.get_ref()
                ),
            )
            .with_help(format!(
                "set `image` in [defaults] or on the machine; {}",
                self.recipes_help()
            )))
    }

    // -- daemons and vars ----------------------------------------------------

    /// `daemons`: kit names, each once.
    fn daemons(&self, machine: &str, value: &Value<'_>) -> Result<Vec<String>> {
        let list = format!("`daemons` of machine `{machine}`");
        let mut daemons: Vec<&str> = Vec::new();
        for (name, span) in self.string_list(value, "daemons", DAEMONS_EXAMPLE)? {
            self.kit(name, span.clone())?;
            self.listed_once(name, span, &daemons, &list, "daemon")?;
            daemons.push(name);
        }
        Ok(daemons.into_iter().map(str::to_owned).collect())
    }

    fn kit(&self, name: &str, span: Span) -> Result<()> {
        let Some(kits) = &self.kits else {
            return Ok(());
        };
        if kits.iter().any(|kit| kit == name) {
            return Ok(());
        }
        let hint = did_you_mean(name, kits.iter().map(String::as_str));
        let help = if kits.is_empty() {
            "no kits found: add `daemons/<name>/daemon.toml` beside the topology or in a \
             directory above it, or point TESTBED_DAEMONS at a directory of kits"
                .to_owned()
        } else {
            format!(
                "available kits (built in, or daemons/<name>/daemon.toml beside the topology \
                 or above it): {}",
                kits.join(", ")
            )
        };
        Err(self
            .source
            .error(span, format!("unknown daemon `{name}`{hint}"))
            .with_help(help))
    }

    /// `vars`: identifier keys, any TOML values (as JSON for the templates).
    fn vars(
        &self,
        machine: &str,
        value: &Value<'_>,
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        let table = self.table(value, "vars", "{ myid = 1 }")?;
        let mut vars = BTreeMap::new();
        for (key, value) in entries(table) {
            let name = key.get_ref().as_ref();
            if !is_identifier(name) {
                return Err(self
                    .source
                    .error(
                        key.span(),
                        format!(
                            "invalid variable name `{name}` in `vars` of machine \
                             `{machine}`{}",
                            identifier_suggestion(name)
                        ),
                    )
                    .with_help(VAR_HELP));
            }
            vars.insert(name.to_owned(), self.json(value, name)?);
        }
        Ok(vars)
    }

    /// A TOML value as JSON; datetimes become their TOML text.
    fn json(&self, value: &Value<'_>, key: &str) -> Result<serde_json::Value> {
        use serde_json::Value as Json;
        Ok(match value.get_ref() {
            DeValue::String(text) => Json::String(text.to_string()),
            DeValue::Integer(_) => self.json_integer(value, key)?,
            DeValue::Float(float) => float
                .as_str()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Json::Number)
                .ok_or_else(|| {
                    self.source
                        .error(
                            value.span(),
                            format!("`{key}` = {float} has no JSON equivalent"),
                        )
                        .with_help("template variables are JSON: use a finite number")
                })?,
            DeValue::Boolean(flag) => Json::Bool(*flag),
            DeValue::Datetime(datetime) => Json::String(datetime.to_string()),
            DeValue::Array(items) => Json::Array(
                items
                    .iter()
                    .map(|item| self.json(item, key))
                    .collect::<Result<_>>()?,
            ),
            DeValue::Table(table) => Json::Object(
                entries(table)
                    .into_iter()
                    .map(|(name, item)| {
                        Ok((name.get_ref().to_string(), self.json(item, name.get_ref())?))
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }

    fn json_integer(&self, value: &Value<'_>, key: &str) -> Result<serde_json::Value> {
        let number = self.integer(value, key, "1")?;
        let json = match i64::try_from(number) {
            Ok(signed) => serde_json::Number::from(signed),
            Err(_) => u64::try_from(number)
                .map(serde_json::Number::from)
                .map_err(|_| {
                    self.source
                        .error(value.span(), format!("`{key}` is out of range"))
                        .with_help("template variables are JSON: integers fit in 64 bits")
                })?,
        };
        Ok(serde_json::Value::Number(json))
    }

    // -- start order ---------------------------------------------------------

    /// `depends_on` names other machines, each once, without cycles.
    fn dependencies(&self, table: &DeTable<'_>, machines: &[Machine]) -> Result<()> {
        let mut spans: HashMap<&str, Span> = HashMap::new();
        for (key, value) in entries(table) {
            let machine = key.get_ref().as_ref();
            let Some(list) = value.get_ref().as_table().and_then(|t| t.get("depends_on")) else {
                continue;
            };
            let mut earlier: Vec<&str> = Vec::new();
            for (name, span) in self.string_list(list, "depends_on", DEPENDS_EXAMPLE)? {
                self.dependency(machine, name, span, &earlier, machines)?;
                earlier.push(name);
            }
            spans.insert(machine, list.span());
        }
        let Some(cycle) = find_cycle(machines) else {
            return Ok(());
        };
        let first = cycle.first().copied().unwrap_or_default();
        let span = spans.get(first).cloned().unwrap_or_default();
        let path: Vec<&str> = cycle.iter().chain(cycle.first()).copied().collect();
        Err(self
            .source
            .error(span, format!("dependency cycle: {}", path.join(" → ")))
            .with_help(
                "machines in a cycle wait on each other and can never start: remove one of \
                 these `depends_on` entries",
            ))
    }

    fn dependency(
        &self,
        machine: &str,
        name: &str,
        span: Span,
        earlier: &[&str],
        machines: &[Machine],
    ) -> Result<()> {
        if name == machine {
            return Err(self
                .source
                .error(span, format!("machine `{machine}` depends on itself"))
                .with_help(format!(
                    "`depends_on` lists the machines that must be ready before this one \
                     starts; remove `{machine}`"
                )));
        }
        let place = format!("in `depends_on` of machine `{machine}`");
        self.known_machine(name, span.clone(), &place, machines)?;
        let list = format!("`depends_on` of machine `{machine}`");
        self.listed_once(name, span, earlier, &list, "machine")
    }

    // -- addresses -----------------------------------------------------------

    /// `ip` (only network) or `ips` (by network name), checked and claimed.
    fn machine_ips(
        &self,
        machine: &str,
        table: &DeTable<'_>,
        networks: &[(Network, Span)],
        claims: &mut Claims,
    ) -> Result<BTreeMap<String, Ipv4Addr>> {
        let mut ips = BTreeMap::new();
        if let (Some((ip_key, _)), Some((ips_key, _))) =
            (table.get_key_value("ip"), table.get_key_value("ips"))
        {
            let later = std::cmp::max_by_key(ip_key.span(), ips_key.span(), |span| span.start);
            return Err(self
                .source
                .error(
                    later,
                    format!("machine `{machine}` sets both `ip` and `ips`"),
                )
                .with_help(
                    "use `ip` when there is one network, `ips = { NETWORK = \"…\" }` otherwise",
                ));
        }
        for (key, value) in entries(table) {
            match key.get_ref().as_ref() {
                "ip" => {
                    let network = self.only_network(machine, key, networks)?;
                    let addr = self.address(value, "ip")?;
                    self.claim_ip(machine, network, addr, value.span(), claims)?;
                    ips.insert(network.name.clone(), addr);
                }
                "ips" => {
                    let by_network = self.table(value, "ips", "{ lan = \"192.168.33.2\" }")?;
                    for (net_key, addr_value) in entries(by_network) {
                        let network = self.named_network(net_key, networks)?;
                        let addr = self.address(addr_value, net_key.get_ref())?;
                        self.claim_ip(machine, network, addr, addr_value.span(), claims)?;
                        ips.insert(network.name.clone(), addr);
                    }
                }
                _ => {}
            }
        }
        Ok(ips)
    }

    /// The network `ip` refers to: the only one there is.
    fn only_network<'n>(
        &self,
        machine: &str,
        key: &Key<'_>,
        networks: &'n [(Network, Span)],
    ) -> Result<&'n Network> {
        match networks {
            [(network, _)] => Ok(network),
            [] => Err(self
                .source
                .error(
                    key.span(),
                    format!("machine `{machine}` has an `ip` but the topology defines no networks"),
                )
                .with_help(
                    "add a network, e.g. `[networks.lan]` with `subnet = \"192.168.33.0/24\"`, \
                     or remove `ip`",
                )),
            _ => {
                let names: Vec<&str> = networks.iter().map(|(n, _)| n.name.as_str()).collect();
                let example: Vec<String> =
                    names.iter().map(|name| format!("{name} = \"…\"")).collect();
                Err(self
                    .source
                    .error(
                        key.span(),
                        format!(
                            "`ip` is ambiguous: this topology has {} networks ({})",
                            names.len(),
                            names.join(", ")
                        ),
                    )
                    .with_help(format!(
                        "name the network of each address: `ips = {{ {} }}`",
                        example.join(", ")
                    )))
            }
        }
    }

    /// The network a key of `ips` names.
    fn named_network<'n>(
        &self,
        key: &Key<'_>,
        networks: &'n [(Network, Span)],
    ) -> Result<&'n Network> {
        let name = key.get_ref().as_ref();
        if let Some((network, _)) = networks.iter().find(|(n, _)| n.name == name) {
            return Ok(network);
        }
        let names: Vec<&str> = networks.iter().map(|(n, _)| n.name.as_str()).collect();
        let hint = did_you_mean(name, names.iter().copied());
        let help = if names.is_empty() {
            "this topology defines no networks; add `[networks.NAME]` with a `subnet`".to_owned()
        } else {
            format!("networks defined here: {}", names.join(", "))
        };
        Err(self
            .source
            .error(
                key.span(),
                format!("unknown network `{name}` in `ips`{hint}"),
            )
            .with_help(help))
    }

    fn address(&self, value: &Value<'_>, key: &str) -> Result<Ipv4Addr> {
        let text = self.string(value, key, "\"192.168.33.2\"")?;
        text.parse().map_err(|_| {
            let message = if text.contains('/') {
                format!(
                    "`{text}` is not an address: write it without a prefix length (the \
                     network's subnet gives it)"
                )
            } else {
                format!("`{text}` is not an IPv4 address")
            };
            self.source
                .error(value.span(), message)
                .with_help(format!("for example `{key} = \"192.168.33.2\"`"))
        })
    }

    /// Checks `addr` is a usable host address of `network` and not taken.
    fn claim_ip(
        &self,
        machine: &str,
        network: &Network,
        addr: Ipv4Addr,
        span: Span,
        claims: &mut Claims,
    ) -> Result<()> {
        let subnet = network.subnet;
        let usable = format!(
            "use an address from {} to {}",
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            Ipv4Addr::from(u32::from(subnet.broadcast()) - 1)
        );
        let at = |message: String| self.source.error(span.clone(), message);
        let network_desc = format!("network `{}` ({subnet})", network.name);
        if !subnet.contains(&addr) {
            return Err(at(format!("{addr} is outside {network_desc}")).with_help(usable));
        }
        if addr == subnet.network() {
            return Err(at(format!(
                "{addr} is the network address of {network_desc}, not a host address"
            ))
            .with_help(usable));
        }
        if addr == subnet.broadcast() {
            return Err(at(format!(
                "{addr} is the broadcast address of {network_desc}, not a host address"
            ))
            .with_help(usable));
        }
        if let Some(claim) = claims.ips.get(&addr) {
            return Err(at(format!(
                "{addr} is used twice: by machine `{}` (line {}) and machine `{machine}`",
                claim.machine, claim.line
            ))
            .with_help("give each machine its own address"));
        }
        let claim = Claim {
            machine: machine.to_owned(),
            line: self.source.line(&span),
        };
        claims.ips.insert(addr, claim);
        Ok(())
    }

    // -- forwarded ports -----------------------------------------------------

    fn forwards(
        &self,
        machine: &str,
        value: &Value<'_>,
        claims: &mut Claims,
    ) -> Result<Vec<Forward>> {
        const EXAMPLE: &str = "[{ guest = 2181, host = 12181 }]";
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.type_error(value, "forward", "an array of tables", EXAMPLE));
        };
        let mut forwards = Vec::new();
        for item in items.iter() {
            let Some(table) = item.get_ref().as_table() else {
                return Err(self
                    .source
                    .error(
                        item.span(),
                        format!("each `forward` entry must be a table, not {}", a_type(item)),
                    )
                    .with_help(format!("for example `forward = {EXAMPLE}`")));
            };
            self.check_keys(table, FORWARD_KEYS, "in a `forward` entry")?;
            let port = |key: &str| -> Result<(u16, Span)> {
                let Some(value) = table.get(key) else {
                    return Err(self
                        .source
                        .error(
                            item.span(),
                            format!("this `forward` entry has no `{key}` port"),
                        )
                        .with_help(
                            "each entry needs both ports, e.g. `{ guest = 2181, host = 12181 }`",
                        ));
                };
                Ok((self.port(value, key)?, value.span()))
            };
            let (guest, _) = port("guest")?;
            let (host, host_span) = port("host")?;
            self.claim_host_port(machine, host, host_span, claims)?;
            forwards.push(Forward { guest, host });
        }
        Ok(forwards)
    }

    /// A TCP port number; host ports must also be unprivileged.
    fn port(&self, value: &Value<'_>, key: &str) -> Result<u16> {
        let number = self.integer(value, key, "12181")?;
        let at = |message: String| self.source.error(value.span(), message);
        let port = match u16::try_from(number) {
            Ok(port) if port > 0 => port,
            _ => {
                let why = format!("{key} port {number} is not a port");
                let help = if key == "host" {
                    "host ports are bound on 127.0.0.1 by testbed, unprivileged: use 1024 to 65535"
                } else {
                    "a TCP port is from 1 to 65535"
                };
                return Err(at(why).with_help(help));
            }
        };
        if key == "host" && port < 1024 {
            return Err(at(format!(
                "host port {port} is privileged (below 1024): testbed runs unprivileged and binds \
                 forwards on 127.0.0.1"
            ))
            .with_help(format!(
                "use a host port from 1024 to 65535, e.g. {}",
                u32::from(port) + 10000
            )));
        }
        Ok(port)
    }

    fn claim_host_port(
        &self,
        machine: &str,
        port: u16,
        span: Span,
        claims: &mut Claims,
    ) -> Result<()> {
        if let Some(claim) = claims.ports.get(&port) {
            return Err(self
                .source
                .error(
                    span,
                    format!(
                        "host port {port} is forwarded twice: by machine `{}` (line {}) and \
                         machine `{machine}`",
                        claim.machine, claim.line
                    ),
                )
                .with_help("each forward needs its own host port on 127.0.0.1"));
        }
        let claim = Claim {
            machine: machine.to_owned(),
            line: self.source.line(&span),
        };
        claims.ports.insert(port, claim);
        Ok(())
    }
}

impl Checker<'_> {
    // -- checks --------------------------------------------------------------

    // -- build and steps ------------------------------------------------------

    /// `[build]`.
    fn build(&self, value: &Value<'_>, machines: &[Machine]) -> Result<Build> {
        let table = self.table(value, "build", "{ machine = \"devtools\", run = \"make\" }")?;
        self.check_keys(table, BUILD_KEYS, "in [build]")?;
        let machine = self.required_string(
            table,
            value,
            "machine",
            "[build]",
            "\"devtools\"",
            BUILD_HELP,
        )?;
        let builder = if machine.0 == "host" {
            if machines.iter().any(|m| m.name == "host") {
                return Err(self
                    .source
                    .error(
                        machine.1,
                        "`host` is both a machine and the word for this computer",
                    )
                    .with_help("rename the machine `host`, or build elsewhere"));
            }
            Builder::Host
        } else {
            self.known_machine(machine.0, machine.1, "in `machine` of [build]", machines)?;
            Builder::Machine(machine.0.to_owned())
        };
        let run =
            self.required_string(table, value, "run", "[build]", "\"make dist\"", BUILD_HELP)?;
        self.not_blank(run.clone(), "run", "[build]")?;
        let inputs = match table.get("inputs") {
            Some(value) => self.inputs(value)?,
            None => Vec::new(),
        };
        let outputs = match table.get("outputs") {
            Some(value) => {
                let mut outputs: Vec<&str> = Vec::new();
                for (path, span) in self.string_list(value, "outputs", ARTIFACTS_EXAMPLE)? {
                    self.dist_path(path, span.clone(), "output")?;
                    self.listed_once(path, span, &outputs, "`outputs` of [build]", "output")?;
                    outputs.push(path);
                }
                outputs.into_iter().map(str::to_owned).collect::<Vec<_>>()
            }
            None => Vec::new(),
        };
        if outputs.is_empty() {
            return Err(self
                .source
                .error(
                    value.span(),
                    "[build] has no `outputs`: nothing would reach `dist/`",
                )
                .with_help(format!("add `outputs = {ARTIFACTS_EXAMPLE}`; {BUILD_HELP}")));
        }
        let timeout = match table.get("timeout") {
            Some(value) => self.duration(value, "timeout", "\"90m\"")?,
            None => crate::model::DEFAULT_BUILD_TIMEOUT,
        };
        Ok(Build {
            builder,
            run: run.0.to_owned(),
            inputs,
            outputs,
            timeout,
        })
    }

    /// `inputs`: paths relative to the topology file that exist. They may
    /// climb out of its directory (`../examples/jobs`): a builder machine
    /// gets them without the leading `../`.
    fn inputs(&self, value: &Value<'_>) -> Result<Vec<Input>> {
        let mut inputs = Vec::new();
        for (path, span) in self.string_list(value, "inputs", "[\"src\", \"Makefile\"]")? {
            if crate::build::build_path(path).is_none() {
                return Err(self
                    .source
                    .error(span, format!("input `{path}` must be a relative path below the topology's directory or its ancestors"))
                    .with_help("write inputs relative to the topology file, e.g. `../examples/jobs/hello_world.c`; `..` only at the start"));
            }
            let (line, col) = line_col(self.source.text, span.start);
            inputs.push(Input {
                path: path.to_owned(),
                line,
                col,
            });
        }
        Ok(inputs)
    }

    /// A required string key of `table` (the value and its span).
    fn required_string<'t>(
        &self,
        table: &'t DeTable<'_>,
        item: &Value<'_>,
        key: &str,
        label: &str,
        example: &str,
        help: &str,
    ) -> Result<(&'t str, Span)> {
        let Some(value) = table.get(key) else {
            return Err(self
                .source
                .error(item.span(), format!("{label} has no `{key}`"))
                .with_help(format!("add `{key} = {example}`; {help}")));
        };
        Ok((self.string(value, key, example)?, value.span()))
    }

    fn not_blank(&self, value: (&str, Span), key: &str, label: &str) -> Result<()> {
        if value.0.trim().is_empty() {
            return Err(self
                .source
                .error(value.1, format!("`{key}` of {label} is empty"))
                .with_help("give the shell command to run"));
        }
        Ok(())
    }

    /// `[[steps]]`, in file order, with unique names.
    fn steps(&self, value: &Value<'_>, machines: &[Machine]) -> Result<Vec<Step>> {
        const EXAMPLE: &str = "[{ name = \"submit\", machine = \"ctl\", run = \"sbatch job.sh\" }]";
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.type_error(value, "steps", "an array of tables", EXAMPLE));
        };
        let mut steps: Vec<Step> = Vec::new();
        for item in items {
            let step = self.step(item, machines)?;
            if steps.iter().any(|earlier| earlier.name == step.name) {
                return Err(self
                    .source
                    .error(
                        item.span(),
                        format!("step name `{}` is used twice", step.name),
                    )
                    .with_help("give each step its own name: `testbed run NAME` picks one"));
            }
            steps.push(step);
        }
        Ok(steps)
    }

    fn step(&self, item: &Value<'_>, machines: &[Machine]) -> Result<Step> {
        let Some(table) = item.get_ref().as_table() else {
            return Err(self
                .source
                .error(
                    item.span(),
                    format!("each `steps` entry must be a table, not {}", a_type(item)),
                )
                .with_help(STEP_HELP));
        };
        let label = match table.get("name").and_then(|v| v.get_ref().as_str()) {
            Some(name) => format!("step `{name}`"),
            None => "a step".to_owned(),
        };
        self.check_keys(table, STEP_KEYS, &format!("in {label}"))?;
        let name =
            self.required_string(table, item, "name", &label, "\"submit-hello\"", STEP_HELP)?;
        if !is_step_name(name.0) {
            return Err(self
                .source
                .error(name.1, format!("invalid step name `{}`", name.0))
                .with_help(
                    "step names are typed on the command line (`testbed run NAME`): \
                            letters, digits, `-` and `_`",
                ));
        }
        let fault = match table.get("fault") {
            Some(value) => Some(self.fault(value, machines)?),
            None => None,
        };
        let command = self.step_command(table, item, &label, machines)?;
        if fault.is_none() && command.is_none() {
            return Err(self
                .source
                .error(
                    item.span(),
                    format!("{label} has neither `run` nor `fault`"),
                )
                .with_help(STEP_HELP));
        }
        let checks = match table.get("checks") {
            Some(value) => self.checks(value, machines)?,
            None => Vec::new(),
        };
        let timeout = match table.get("timeout") {
            Some(value) => self.duration(value, "timeout", "\"10m\"")?,
            None => crate::model::DEFAULT_STEP_TIMEOUT,
        };
        Ok(Step {
            name: name.0.to_owned(),
            fault,
            command,
            checks,
            timeout,
        })
    }

    /// A step's `run` and the `machine` it runs on (both or neither).
    fn step_command(
        &self,
        table: &DeTable<'_>,
        item: &Value<'_>,
        label: &str,
        machines: &[Machine],
    ) -> Result<Option<StepCommand>> {
        if table.get("run").is_none() {
            if let Some(machine) = table.get("machine") {
                return Err(self
                    .source
                    .error(
                        machine.span(),
                        format!("{label} has a `machine` but no `run`"),
                    )
                    .with_help("`machine` says where `run` runs: add `run`, or drop `machine`"));
            }
            return Ok(None);
        }
        let machine = self.required_string(table, item, "machine", label, "\"zk-1\"", STEP_HELP)?;
        self.known_machine(
            machine.0,
            machine.1,
            &format!("in `machine` of {label}"),
            machines,
        )?;
        let run =
            self.required_string(table, item, "run", label, "\"sbatch job.sh\"", STEP_HELP)?;
        self.not_blank(run.clone(), "run", label)?;
        Ok(Some(StepCommand {
            machine: machine.0.to_owned(),
            run: run.0.to_owned(),
        }))
    }

    /// `[[checks]]`, in file order.
    fn checks(&self, value: &Value<'_>, machines: &[Machine]) -> Result<Vec<CheckSpec>> {
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.type_error(value, "checks", "an array of tables", CHECKS_EXAMPLE));
        };
        let mut names = Vec::new();
        items
            .iter()
            .map(|item| self.check(item, machines, &mut names))
            .collect()
    }

    /// One check; `names` holds the names (and lines) of the earlier ones.
    fn check(
        &self,
        item: &Value<'_>,
        machines: &[Machine],
        names: &mut Vec<(String, usize)>,
    ) -> Result<CheckSpec> {
        let Some(table) = item.get_ref().as_table() else {
            return Err(self
                .source
                .error(
                    item.span(),
                    format!("each `checks` entry must be a table, not {}", a_type(item)),
                )
                .with_help(format!("for example `checks = {CHECKS_EXAMPLE}`")));
        };
        let label = check_label(table);
        self.check_keys(table, CHECK_KEYS, &format!("in {label}"))?;
        self.probe_keys(table, &label)?;
        self.required(table, item, "name", &label, "\"zookeeper-answers\"")?;
        self.required(table, item, "machine", &label, "\"zk-1\"")?;
        let spec = self.check_spec(item, &label)?;
        self.unique_check_name(table, names)?;
        self.one_probe(table, item, &label)?;
        for key in ["machine", "from"] {
            if let Some(value) = table.get(key) {
                let name = self.string(value, key, "\"zk-1\"")?;
                let place = format!("in `{key}` of {label}");
                self.known_machine(name, value.span(), &place, machines)?;
            }
        }
        self.reachable(&spec, table, machines, &label)?;
        crate::check::validate(&spec).map_err(|message| {
            self.source
                .error(item.span(), format!("{label}: {message}"))
                .with_help(CHECK_HELP)
        })?;
        Ok(spec)
    }

    /// Unknown keys inside the probe tables (their types: see `check_spec`).
    fn probe_keys(&self, table: &DeTable<'_>, label: &str) -> Result<()> {
        for (key, value) in entries(table) {
            let word = key.get_ref().as_ref();
            if let Some((probe, keys, example)) = PROBES.iter().find(|(p, ..)| *p == word) {
                let body = self.table(value, probe, example)?;
                self.check_keys(body, keys, &format!("in the `{probe}` probe of {label}"))?;
            }
        }
        Ok(())
    }

    fn required(
        &self,
        table: &DeTable<'_>,
        item: &Value<'_>,
        key: &str,
        label: &str,
        example: &str,
    ) -> Result<()> {
        if table.contains_key(key) {
            return Ok(());
        }
        Err(self
            .source
            .error(item.span(), format!("{label} has no `{key}`"))
            .with_help(format!("add `{key} = {example}`; {CHECK_HELP}")))
    }

    /// The check as [`CheckSpec`]; keys are known to be valid, so what is
    /// left are types and missing probe fields, located by the deserializer.
    fn check_spec(&self, item: &Value<'_>, label: &str) -> Result<CheckSpec> {
        CheckSpec::deserialize(ValueDeserializer::from(item.clone())).map_err(|error| {
            let span = error.span().unwrap_or_else(|| item.span());
            let message = error.message().trim().replace('\n', "; ");
            self.source
                .error(span, format!("{label}: {message}"))
                .with_help(CHECK_HELP)
        })
    }

    fn unique_check_name(
        &self,
        table: &DeTable<'_>,
        names: &mut Vec<(String, usize)>,
    ) -> Result<()> {
        let Some(value) = table.get("name") else {
            return Ok(());
        };
        let name = self.string(value, "name", "\"zookeeper-answers\"")?;
        let line = self.source.line(&value.span());
        if let Some((_, first)) = names.iter().find(|(earlier, _)| earlier == name) {
            return Err(self
                .source
                .error(
                    value.span(),
                    format!(
                        "check name `{name}` is used twice: by the checks at line {first} and \
                         line {line}"
                    ),
                )
                .with_help("give each check its own name: results are reported by name"));
        }
        names.push((name.to_owned(), line));
        Ok(())
    }

    /// Exactly one of `tcp`, `http` and `command`.
    fn one_probe(&self, table: &DeTable<'_>, item: &Value<'_>, label: &str) -> Result<()> {
        let probes: Vec<&Key<'_>> = entries(table)
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| PROBES.iter().any(|(probe, ..)| key.get_ref() == probe))
            .collect();
        match probes.as_slice() {
            [_] => Ok(()),
            [] => {
                let examples: Vec<String> = PROBES
                    .iter()
                    .map(|(probe, _, example)| format!("`{probe} = {example}`"))
                    .collect();
                Err(self
                    .source
                    .error(item.span(), format!("{label} has no probe"))
                    .with_help(format!("add exactly one of {}", examples.join(", "))))
            }
            [first, second, ..] => Err(self
                .source
                .error(
                    second.span(),
                    format!(
                        "{label} has both `{}` and `{}`: a check has exactly one probe",
                        first.get_ref(),
                        second.get_ref()
                    ),
                )
                .with_help("split it into one check per probe, each with its own name")),
        }
    }

    /// `from` and `machine` share a network (or are the same machine).
    fn reachable(
        &self,
        spec: &CheckSpec,
        table: &DeTable<'_>,
        machines: &[Machine],
        label: &str,
    ) -> Result<()> {
        let Some(from) = spec.from.as_deref() else {
            return Ok(());
        };
        let find = |name: &str| machines.iter().find(|machine| machine.name == name);
        let (Some(source), Some(target)) = (find(from), find(&spec.machine)) else {
            return Ok(());
        };
        let shared = source.ips.keys().any(|net| target.ips.contains_key(net));
        if shared || source.name == target.name {
            return Ok(());
        }
        let span = table
            .get("from")
            .map(|value| value.span())
            .unwrap_or_default();
        Err(self
            .source
            .error(
                span,
                format!(
                    "{label}: machines `{from}` and `{}` share no network: they cannot reach \
                     each other over a private network",
                    target.name
                ),
            )
            .with_help(format!(
                "`{from}` is on {}, `{}` on {}: give both an address on one network, or drop \
                 `from` to check from `{}` itself",
                networks_of(source),
                target.name,
                networks_of(target),
                target.name
            )))
    }
}

/// `check `NAME`` when the check has a string name, else `a check`.
fn check_label(table: &DeTable<'_>) -> String {
    match table.get("name").and_then(|value| value.get_ref().as_str()) {
        Some(name) => format!("check `{name}`"),
        None => "a check".to_owned(),
    }
}

/// "no network" or "network(s) a, b", for messages.
fn networks_of(machine: &Machine) -> String {
    let names: Vec<&str> = machine.ips.keys().map(String::as_str).collect();
    match names.as_slice() {
        [] => "no network".to_owned(),
        [one] => format!("network `{one}`"),
        _ => format!("networks {}", names.join(", ")),
    }
}

/// `; did you mean `x`?` with other characters as `_`, or nothing.
fn identifier_suggestion(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let candidate = if mapped.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{mapped}")
    } else {
        mapped
    };
    if is_identifier(&candidate) && candidate != name {
        format!("; did you mean `{candidate}`?")
    } else {
        String::new()
    }
}

/// Addresses and host ports already taken, across all machines.
#[derive(Default)]
struct Claims {
    ips: HashMap<Ipv4Addr, Claim>,
    ports: HashMap<u16, Claim>,
}

/// The type of a TOML value with its article, for messages: "an integer".
fn a_type(value: &Value<'_>) -> String {
    let kind = value.get_ref().type_str();
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

/// Whether two subnets share any address (one contains the other's start).
fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}
