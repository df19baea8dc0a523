//! A Vagrantfile turned into a topology. `ruby` evaluates the Vagrantfile
//! against a stand-in for Vagrant's configuration API (`vagrant/stand_in.rb`)
//! that records what the file sets, so loops, variables and helpers work as
//! under Vagrant; this module maps the record onto a topology's TOML and
//! lists, with their Vagrantfile lines, what it cannot carry over (as
//! comments in the topology and as warnings), never dropping it silently.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::topology::{
    is_valid_name, MAX_CPUS, MAX_PREFIX, MIN_MEMORY_MIB, MIN_PREFIX, PRIVATE_RANGES, QEMU_USER_NET,
};

const STAND_IN: &str = include_str!("vagrant/stand_in.rb");

/// The image every imported machine boots: boxes are Vagrant's own.
const IMAGE: &str = crate::topology::DEFAULT_IMAGE;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "cannot run `ruby`: {0}\n  help: testbed import evaluates the Vagrantfile with Ruby, \
         as Vagrant does: `sudo apt-get install ruby`"
    )]
    NoRuby(std::io::Error),
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Ruby's own message names the file and line.
    #[error("{message}")]
    Syntax { message: String },
    #[error("{}:{line}: error: {message}", path.display())]
    Evaluation {
        path: PathBuf,
        line: u32,
        message: String,
    },
    #[error("{}: error: {message}", path.display())]
    Ruby { path: PathBuf, message: String },
    #[error("{}: defines no machine (no `Vagrant.configure` block)", path.display())]
    Empty { path: PathBuf },
}

/// The topology written from a Vagrantfile, and what did not carry over.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    /// What the Vagrantfile itself printed (`puts`), to show as Vagrant would.
    pub printed: String,
    /// `Vagrantfile:LINE: …`, one per thing left behind.
    pub warnings: Vec<String>,
}

// -- what the stand-in records ----------------------------------------------

#[derive(Debug, Default, Clone, Deserialize)]
struct Recorded {
    configs: Vec<Config>,
    notes: Vec<Note>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct Config {
    settings: BTreeMap<String, Set>,
    networks: Vec<Call>,
    providers: Vec<ProviderBlock>,
    provisioners: Vec<Call>,
    synced_folders: Vec<Folder>,
    others: BTreeMap<String, BTreeMap<String, Set>>,
    defines: Vec<Define>,
}

#[derive(Debug, Clone, Deserialize)]
struct Set {
    value: Value,
    line: u32,
}

/// `network :private_network, ip: …` or `provision "shell", path: …`.
#[derive(Debug, Clone, Deserialize)]
struct Call {
    kind: String,
    options: Map<String, Value>,
    line: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct ProviderBlock {
    name: String,
    settings: BTreeMap<String, Set>,
    customize: Vec<Customize>,
    line: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct Customize {
    command: Vec<String>,
    line: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct Folder {
    from: String,
    to: String,
    #[serde(default)]
    options: Map<String, Value>,
    line: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct Define {
    name: String,
    options: Map<String, Value>,
    config: Config,
    line: u32,
}

/// A call the stand-in does not model (`vb.linked_clone(…)`, say), or
/// what it assumed (`text`).
#[derive(Debug, Clone, Deserialize)]
struct Note {
    #[serde(default)]
    setting: String,
    #[serde(default)]
    text: Option<String>,
    line: u32,
}

#[derive(Debug, Deserialize)]
struct RubyError {
    error: String,
    message: String,
    line: Option<u32>,
}

// -- evaluating ---------------------------------------------------------------

/// Evaluates `vagrantfile` and maps it onto a topology to be written in
/// `topology_dir` (paths in it are made relative to that folder).
pub fn import(vagrantfile: &Path, topology_dir: &Path) -> Result<Imported, ImportError> {
    let path = std::path::absolute(vagrantfile).map_err(|error| ImportError::Read {
        path: vagrantfile.to_path_buf(),
        error,
    })?;
    std::fs::metadata(&path).map_err(|error| ImportError::Read {
        path: path.clone(),
        error,
    })?;
    let (recorded, printed) = evaluate(&path)?;
    let vagrant_dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut mapper = Mapper {
        file: path.file_name().map_or_else(
            || "Vagrantfile".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        ),
        vagrant_dir,
        topology_dir: std::path::absolute(topology_dir).unwrap_or(topology_dir.to_path_buf()),
        warnings: Vec::new(),
    };
    let toml = mapper.topology(&path, &recorded)?;
    Ok(Imported {
        toml,
        printed,
        warnings: mapper.warnings,
    })
}

/// Runs the stand-in on the Vagrantfile, in the Vagrantfile's folder: the
/// record, and what the Vagrantfile printed.
fn evaluate(vagrantfile: &Path) -> Result<(Recorded, String), ImportError> {
    use std::io::Write;
    let mut child = std::process::Command::new("ruby")
        .arg("-")
        .arg(vagrantfile)
        .current_dir(vagrantfile.parent().unwrap_or(Path::new("/")))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(ImportError::NoRuby)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(STAND_IN.as_bytes())
            .map_err(ImportError::NoRuby)?;
    }
    let output = child.wait_with_output().map_err(ImportError::NoRuby)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(ruby_error(vagrantfile, &stderr));
    }
    let recorded = serde_json::from_slice(&output.stdout).map_err(|e| ImportError::Ruby {
        path: vagrantfile.to_path_buf(),
        message: format!("the stand-in's record is not understood: {e}"),
    })?;
    Ok((recorded, stderr.into_owned()))
}

/// The error the stand-in reported as its last line, else Ruby's own words.
fn ruby_error(vagrantfile: &Path, stderr: &str) -> ImportError {
    let reported = stderr
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<RubyError>(line).ok());
    match reported {
        Some(e) if e.error == "syntax" => ImportError::Syntax {
            message: syntax_message(&e.message),
        },
        Some(RubyError {
            line: Some(line),
            message,
            ..
        }) => ImportError::Evaluation {
            path: vagrantfile.to_path_buf(),
            line,
            message,
        },
        Some(e) => ImportError::Ruby {
            path: vagrantfile.to_path_buf(),
            message: e.message,
        },
        None => ImportError::Ruby {
            path: vagrantfile.to_path_buf(),
            message: stderr.trim().to_owned(),
        },
    }
}

/// Ruby's syntax error as `FILE:LINE: error: …` with the lines it quotes.
fn syntax_message(message: &str) -> String {
    let mut lines = message.lines();
    let first = lines.next().unwrap_or_default();
    // `/path/Vagrantfile:12: syntax error, unexpected …`
    let first = match first.split_once(": ") {
        Some((place, rest)) => format!("{place}: error: {rest}"),
        None => first.to_owned(),
    };
    std::iter::once(first)
        .chain(lines.map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n")
}

// -- mapping ------------------------------------------------------------------

/// A machine as it will be written.
#[derive(Debug, Default)]
struct Draft {
    name: String,
    line: u32,
    memory_mib: Option<u64>,
    cpus: Option<u64>,
    ips: Vec<(Ipv4Addr, Ipv4Net)>,
    forwards: Vec<(u64, u64)>,
    /// A playbook's `extra_vars`, as the machine's vars (its host vars).
    vars: BTreeMap<String, toml::Value>,
    provision: Vec<String>,
    /// Comments written in the machine's table: what was left behind.
    comments: Vec<String>,
}

struct Mapper {
    /// The Vagrantfile's name, for `Vagrantfile:LINE` in messages.
    file: String,
    vagrant_dir: PathBuf,
    topology_dir: PathBuf,
    warnings: Vec<String>,
}

impl Mapper {
    fn topology(&mut self, path: &Path, recorded: &Recorded) -> Result<String, ImportError> {
        if recorded.configs.is_empty() {
            return Err(ImportError::Empty {
                path: path.to_path_buf(),
            });
        }
        let global = merged(&recorded.configs);
        let mut top_comments = Vec::new();
        self.leftovers(&global, None, &mut top_comments);
        for note in &recorded.notes {
            let text = match &note.text {
                Some(text) => text.clone(),
                None => format!("`{}` is not carried over", note.setting),
            };
            self.left(note.line, None, &text, &mut top_comments);
        }
        let defines: Vec<Define> = if global.defines.is_empty() {
            // No `define`: Vagrant's one machine is called `default`.
            vec![Define {
                name: "default".into(),
                options: Map::new(),
                config: Config::default(),
                line: 0,
            }]
        } else {
            merge_same_names(&global.defines)
        };
        let mut drafts: Vec<Draft> = Vec::new();
        for define in &defines {
            let mut draft = self.machine(&global, define);
            self.unique_name(&mut draft, &drafts);
            self.claims(&mut draft, &drafts);
            drafts.push(draft);
        }
        let networks = network_names(&drafts);
        let boxes: Vec<String> = defines
            .iter()
            .filter_map(|d| setting(&d.config, &global, "box"))
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        Ok(self.write(path, &drafts, &networks, &boxes, &top_comments))
    }

    /// Two names Vagrant tells apart may be one hostname label here
    /// (`web_1`, `web.1`): the later gets a number.
    fn unique_name(&mut self, draft: &mut Draft, earlier: &[Draft]) {
        let taken = |name: &str| earlier.iter().any(|d| d.name == name);
        if !taken(&draft.name) {
            return;
        }
        let base = draft.name.clone();
        let name = (2..)
            .map(|n| {
                let suffix = format!("-{n}");
                let stem: String = base.chars().take(63 - suffix.len()).collect();
                format!("{}{suffix}", stem.trim_end_matches('-'))
            })
            .find(|name| !taken(name))
            .unwrap_or(base.clone());
        let text = format!("a second machine named `{base}` here is named `{name}`");
        let mut comments = std::mem::take(&mut draft.comments);
        self.left(draft.line, Some(&name), &text, &mut comments);
        draft.comments = comments;
        draft.name = name;
    }

    /// What a topology lets only one machine have (an address, a host
    /// port) and a machine only once (a subnet): the later claim is left.
    fn claims(&mut self, draft: &mut Draft, earlier: &[Draft]) {
        let mut comments = std::mem::take(&mut draft.comments);
        let name = draft.name.clone();
        let mut ips: Vec<(Ipv4Addr, Ipv4Net)> = Vec::new();
        for (ip, subnet) in std::mem::take(&mut draft.ips) {
            let elsewhere = earlier
                .iter()
                .any(|d| d.ips.iter().any(|(other, _)| *other == ip));
            // Another netmask for the same range: testbed's subnets do not overlap.
            let clashes = earlier
                .iter()
                .flat_map(|d| &d.ips)
                .any(|(_, net)| *net != subnet && (net.contains(&subnet) || subnet.contains(net)));
            if clashes {
                let text = format!(
                    "address {ip} is not carried over: its subnet {subnet} overlaps another \
                     machine's, of another netmask"
                );
                self.left(draft.line, Some(&name), &text, &mut comments);
            } else if elsewhere || ips.iter().any(|(_, net)| *net == subnet) {
                let text = format!(
                    "address {ip} is not carried over: another machine has it, or this one \
                     has an address on {subnet} already"
                );
                self.left(draft.line, Some(&name), &text, &mut comments);
            } else {
                ips.push((ip, subnet));
            }
        }
        draft.ips = ips;
        let mut forwards: Vec<(u64, u64)> = Vec::new();
        for (guest, host) in std::mem::take(&mut draft.forwards) {
            let taken = earlier
                .iter()
                .any(|d| d.forwards.iter().any(|(_, h)| *h == host))
                || forwards.iter().any(|(_, h)| *h == host);
            if taken || !(1024..=65535).contains(&host) || !(1..=65535).contains(&guest) {
                let text = format!(
                    "forwarded port {host} -> {guest} is not carried over: testbed forwards \
                     each host port once, from 1024 up"
                );
                self.left(draft.line, Some(&name), &text, &mut comments);
            } else {
                forwards.push((guest, host));
            }
        }
        draft.forwards = forwards;
        draft.comments = comments;
    }

    /// Records `text` as left behind at `line`: a warning, and a comment
    /// for the topology.
    fn left(&mut self, line: u32, machine: Option<&str>, text: &str, comments: &mut Vec<String>) {
        let place = if line > 0 {
            format!("{}:{line}", self.file)
        } else {
            self.file.clone()
        };
        match machine {
            Some(machine) => self.warnings.push(format!("{place}: {machine}: {text}")),
            None => self.warnings.push(format!("{place}: {text}")),
        }
        comments.push(format!("{place}: {text}"));
    }

    /// What a config sets that testbed has no place for: synced folders,
    /// `config.ssh`, plugins' namespaces, `config.vm` settings besides the
    /// box and hostname.
    fn leftovers(&mut self, config: &Config, machine: Option<&str>, comments: &mut Vec<String>) {
        // `disabled: true` takes away what Vagrant would make: nothing is lost.
        for folder in config
            .synced_folders
            .iter()
            .filter(|f| !disabled(&f.options))
        {
            let text = format!(
                "synced folder {} -> {} is not carried over: testbed shares no folder with \
                 its machines: copy what they need in a provisioner, or as `artifacts`",
                folder.from, folder.to
            );
            self.left(folder.line, machine, &text, comments);
        }
        for (namespace, settings) in &config.others {
            for (key, set) in settings {
                let text = format!("`config.{namespace}.{key}` is not carried over");
                self.left(set.line, machine, &text, comments);
            }
        }
        for (key, set) in &config.settings {
            if ![
                "box",
                "hostname",
                "box_url",
                "box_version",
                "box_check_update",
            ]
            .contains(&key.as_str())
            {
                let text = format!("`config.vm.{key}` is not carried over");
                self.left(set.line, machine, &text, comments);
            }
        }
    }

    fn machine(&mut self, global: &Config, define: &Define) -> Draft {
        let name = machine_name(&define.name);
        let mut draft = Draft {
            name: name.clone(),
            line: define.line,
            ..Draft::default()
        };
        let mut comments = Vec::new();
        if name != define.name {
            let text = format!("machine `{}` is named `{name}` here", define.name);
            self.left(define.line, Some(&name), &text, &mut comments);
        }
        if define.options.get("autostart") == Some(&Value::Bool(false)) {
            let text = "`autostart: false` is not carried over: `up` starts every machine";
            self.left(define.line, Some(&name), text, &mut comments);
        }
        let own = &define.config;
        self.leftovers(own, Some(&name), &mut comments);
        if let Some(hostname) = own
            .settings
            .get("hostname")
            .or(global.settings.get("hostname"))
        {
            let text = hostname.value.as_str().unwrap_or_default();
            if text != name {
                let text = format!("hostname `{text}` is not carried over: testbed names the machine's host `{name}`");
                self.left(hostname.line, Some(&name), &text, &mut comments);
            }
        }
        for network in global.networks.iter().chain(&own.networks) {
            self.network(network, &mut draft, &mut comments);
        }
        // The whole file's blocks, then the machine's; libvirt's before
        // VirtualBox's, so that Vagrant's default provider has the last word.
        let mut providers: Vec<&ProviderBlock> =
            global.providers.iter().chain(&own.providers).collect();
        providers.sort_by_key(|p| p.name == "virtualbox");
        for provider in providers {
            self.provider(provider, &mut draft, &mut comments);
        }
        for provisioner in provisioners_of(global, own) {
            self.provisioner(&provisioner, &mut draft, &mut comments);
        }
        draft.comments = comments;
        draft
    }

    fn network(&mut self, network: &Call, draft: &mut Draft, comments: &mut Vec<String>) {
        let name = draft.name.clone();
        let option = |key: &str| network.options.get(key);
        match network.kind.as_str() {
            "private_network" => {
                let Some(ip) = option("ip").and_then(Value::as_str) else {
                    let text = "a private network without `ip` (DHCP) is not carried over: \
                                testbed gives each machine a static address";
                    self.left(network.line, Some(&name), text, comments);
                    return;
                };
                match private_subnet(ip, option("netmask")) {
                    Ok(found) => draft.ips.push(found),
                    Err(why) => {
                        let text =
                            format!("private network address {ip} is not carried over: {why}");
                        self.left(network.line, Some(&name), &text, comments);
                    }
                }
                for key in network
                    .options
                    .keys()
                    .filter(|k| !["ip", "netmask"].contains(&k.as_str()))
                {
                    let text = format!("private network option `{key}` is not carried over");
                    self.left(network.line, Some(&name), &text, comments);
                }
            }
            "forwarded_port" if disabled(&network.options) => {}
            "forwarded_port" => {
                let guest = option("guest").and_then(Value::as_u64);
                let host = option("host").and_then(Value::as_u64);
                let udp = option("protocol").and_then(Value::as_str) == Some("udp");
                match (guest, host) {
                    (Some(guest), Some(host)) if !udp => draft.forwards.push((guest, host)),
                    _ => {
                        let text = "a forwarded port testbed cannot make (it forwards TCP, \
                                    `guest` and `host` both given)";
                        self.left(network.line, Some(&name), text, comments);
                        return;
                    }
                }
                if option("host_ip")
                    .and_then(Value::as_str)
                    .is_some_and(|ip| ip != "127.0.0.1")
                {
                    let text =
                        "`host_ip` is not carried over: testbed binds forwarded ports to 127.0.0.1";
                    self.left(network.line, Some(&name), text, comments);
                }
                for key in network.options.keys().filter(|k| {
                    !["guest", "host", "host_ip", "protocol", "disabled"].contains(&k.as_str())
                }) {
                    let text = format!("forwarded port option `{key}` is not carried over");
                    self.left(network.line, Some(&name), &text, comments);
                }
            }
            other => {
                let text = format!(
                    "network `{other}` is not carried over: testbed's networks are private ones"
                );
                self.left(network.line, Some(&name), &text, comments);
            }
        }
    }

    fn provider(
        &mut self,
        provider: &ProviderBlock,
        draft: &mut Draft,
        comments: &mut Vec<String>,
    ) {
        let name = draft.name.clone();
        if !["virtualbox", "libvirt"].contains(&provider.name.as_str()) {
            let text = format!(
                "provider `{}`'s settings are not carried over",
                provider.name
            );
            self.left(provider.line, Some(&name), &text, comments);
            return;
        }
        for (key, set) in &provider.settings {
            match key.as_str() {
                "memory" => {
                    if let Some(mib) = self.memory(&set.value, set.line, draft, comments) {
                        draft.memory_mib = Some(mib);
                    }
                }
                "cpus" => {
                    if let Some(cpus) = self.cpus(&set.value, set.line, draft, comments) {
                        draft.cpus = Some(cpus);
                    }
                }
                _ => {
                    let text = format!("`{}.{key}` is not carried over", provider.name);
                    self.left(set.line, Some(&name), &text, comments);
                }
            }
        }
        for customize in &provider.customize {
            let mut words = customize.command.iter().map(String::as_str);
            let modifyvm = words.next() == Some("modifyvm");
            let mut args: Vec<&str> = words.skip(1).collect();
            while modifyvm && args.len() >= 2 {
                match args[0] {
                    "--memory" => {
                        let value = Value::String(args[1].into());
                        if let Some(mib) = self.memory(&value, customize.line, draft, comments) {
                            draft.memory_mib = Some(mib);
                        }
                    }
                    "--cpus" => {
                        let value = Value::String(args[1].into());
                        if let Some(cpus) = self.cpus(&value, customize.line, draft, comments) {
                            draft.cpus = Some(cpus);
                        }
                    }
                    option => {
                        let text = format!("`customize` option {option} is not carried over");
                        self.left(customize.line, Some(&name), &text, comments);
                    }
                }
                args.drain(..2);
            }
            if !modifyvm || !args.is_empty() {
                let text = format!("`customize {:?}` is not carried over", customize.command);
                self.left(customize.line, Some(&name), &text, comments);
            }
        }
    }

    /// Memory in MiB (Vagrant's unit), at least testbed's least; `None`
    /// (and a note) when it is no number.
    fn memory(
        &mut self,
        value: &Value,
        line: u32,
        draft: &Draft,
        comments: &mut Vec<String>,
    ) -> Option<u64> {
        let Some(mib) = number(value) else {
            let text = format!("memory {value} is not carried over: not a number of MiB");
            self.left(line, Some(&draft.name), &text, comments);
            return None;
        };
        if mib >= MIN_MEMORY_MIB {
            return Some(mib);
        }
        let text = format!("memory {mib} MiB is raised to testbed's least, {MIN_MEMORY_MIB} MiB");
        self.left(line, Some(&draft.name), &text, comments);
        Some(MIN_MEMORY_MIB)
    }

    /// CPUs as testbed takes them (1 to 64); `None` (and a note) otherwise.
    fn cpus(
        &mut self,
        value: &Value,
        line: u32,
        draft: &Draft,
        comments: &mut Vec<String>,
    ) -> Option<u64> {
        let cpus = number(value).filter(|n| (1..=u64::from(MAX_CPUS)).contains(n));
        if cpus.is_none() {
            let text = format!("cpus {value} is not carried over: testbed takes 1 to {MAX_CPUS}");
            self.left(line, Some(&draft.name), &text, comments);
        }
        cpus
    }

    fn provisioner(&mut self, call: &Call, draft: &mut Draft, comments: &mut Vec<String>) {
        let name = draft.name.clone();
        let mut handled: Vec<&str> = vec!["name", "type"];
        // `provision "bootstrap", type: "shell"`: a named provisioner.
        let kind = call
            .options
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&call.kind);
        let entry = match kind {
            "shell" => {
                handled.extend(["path", "inline", "args", "env", "privileged"]);
                self.shell(call, &name, comments)
            }
            "ansible" | "ansible_local" => {
                handled.extend(["playbook", "become", "compatibility_mode"]);
                if kind == "ansible_local" {
                    let text = "ansible_local runs from this computer here, not inside the guest";
                    self.left(call.line, Some(&name), text, comments);
                }
                if let Some(Value::Object(extra)) = call.options.get("extra_vars") {
                    handled.push("extra_vars");
                    self.extra_vars(extra, call.line, draft, comments);
                }
                match call.options.get("playbook").and_then(Value::as_str) {
                    Some(playbook) => {
                        let path = self.path(playbook);
                        Some(format!("{{ ansible = {} }}", quoted(&path)))
                    }
                    None => None,
                }
            }
            other => {
                let text = format!("provisioner `{other}` is not carried over: testbed runs shell scripts and Ansible playbooks");
                self.left(call.line, Some(&name), &text, comments);
                return;
            }
        };
        let Some(entry) = entry else {
            let text =
                format!("a {kind} provisioner without its script or playbook is not carried over");
            self.left(call.line, Some(&name), &text, comments);
            return;
        };
        for (key, value) in &call.options {
            if key == "privileged" && value == &Value::Bool(false) {
                let text = "`privileged: false` is not carried over: testbed runs scripts as root";
                self.left(call.line, Some(&name), text, comments);
            } else if key == "run" && value == &Value::String("never".into()) {
                let text = "a provisioner with `run: \"never\"` is not carried over: Vagrant runs it only when asked";
                self.left(call.line, Some(&name), text, comments);
                return;
            } else if key == "run" {
                let text = "`run:` is not carried over: a provisioner runs again when it changes, or with `testbed provision --force`";
                self.left(call.line, Some(&name), text, comments);
            } else if !handled.contains(&key.as_str()) {
                let text = format!("{kind} option `{key}` is not carried over");
                self.left(call.line, Some(&name), &text, comments);
            }
        }
        draft.provision.push(entry);
    }

    /// A playbook's `extra_vars` become the machine's `vars`, which the
    /// inventory gives Ansible as host vars.
    fn extra_vars(
        &mut self,
        extra: &Map<String, Value>,
        line: u32,
        draft: &mut Draft,
        comments: &mut Vec<String>,
    ) {
        for (key, value) in extra {
            let converted = toml::Value::try_from(value).ok();
            match converted {
                Some(value) if crate::model::is_identifier(key) => {
                    draft.vars.insert(key.clone(), value);
                }
                _ => {
                    let text = format!("extra var `{key}` is not carried over: vars are identifiers with TOML values");
                    self.left(line, Some(&draft.name.clone()), &text, comments);
                }
            }
        }
    }

    /// A shell provisioner's entry: its script (a file beside the topology,
    /// or inline), `args` split as the guest's shell would, `env`.
    fn shell(&mut self, call: &Call, machine: &str, comments: &mut Vec<String>) -> Option<String> {
        let options = &call.options;
        let mut parts = Vec::new();
        if let Some(path) = options.get("path").and_then(Value::as_str) {
            let relative = self.path(path);
            match std::fs::read_to_string(self.vagrant_dir.join(path)) {
                Ok(text) => {
                    self.warn_about_vagrant_folder(path, &text, call.line, machine, comments)
                }
                Err(e) => {
                    let text = format!("script {path} cannot be read ({e}): `plan` will say so");
                    self.left(call.line, Some(machine), &text, comments);
                }
            }
            parts.push(format!("shell = {}", quoted(&relative)));
        } else if let Some(inline) = options.get("inline").and_then(Value::as_str) {
            self.warn_about_vagrant_folder(
                "the inline script",
                inline,
                call.line,
                machine,
                comments,
            );
            parts.push(format!("inline = {}", quoted(inline)));
        } else {
            return None;
        }
        let args: Vec<String> = match options.get("args") {
            Some(Value::String(text)) => shlex::split(text).unwrap_or_else(|| {
                let note = format!(
                    "args {text:?} do not split as a shell would (a quote left open): kept as one"
                );
                self.left(call.line, Some(machine), &note, comments);
                vec![text.clone()]
            }),
            Some(Value::Array(items)) => items.iter().map(plain).collect(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => vec![plain(other)],
        };
        if !args.is_empty() {
            let list: Vec<String> = args.iter().map(|a| quoted(a)).collect();
            parts.push(format!("args = [{}]", list.join(", ")));
        }
        if let Some(Value::Object(env)) = options.get("env") {
            let mut pairs: Vec<String> = Vec::new();
            for (key, value) in env {
                if crate::model::is_identifier(key) {
                    // Vagrant exports nil as an empty value.
                    let value = if value.is_null() {
                        String::new()
                    } else {
                        plain(value)
                    };
                    pairs.push(format!("{key} = {}", quoted(&value)));
                } else {
                    let text = format!(
                        "environment variable `{key}` is not carried over: not a shell name"
                    );
                    self.left(call.line, Some(machine), &text, comments);
                }
            }
            if !pairs.is_empty() {
                parts.push(format!("env = {{ {} }}", pairs.join(", ")));
            }
        }
        Some(format!("{{ {} }}", parts.join(", ")))
    }

    /// Scripts that read Vagrant's shared `/vagrant` folder will not find
    /// it (`/home/vagrant` is no mention of it).
    fn warn_about_vagrant_folder(
        &mut self,
        what: &str,
        script: &str,
        line: u32,
        machine: &str,
        comments: &mut Vec<String>,
    ) {
        let mentions = script.match_indices("/vagrant").any(|(at, _)| {
            let before = script[..at].chars().next_back();
            let after = script[at + "/vagrant".len()..].chars().next();
            let path_char = |c: char| c.is_alphanumeric() || "_-.".contains(c);
            before.is_none_or(|c| !path_char(c) && c != '/') && after.is_none_or(|c| !path_char(c))
        });
        if mentions {
            let note =
                format!("{what} reads /vagrant, which testbed does not share with the machine");
            self.left(line, Some(machine), &note, comments);
        }
    }

    /// A path of the Vagrantfile (relative to its folder) relative to the
    /// topology's folder.
    fn path(&self, path: &str) -> String {
        let full = self.vagrant_dir.join(path);
        relative_to(&full, &self.topology_dir)
    }

    fn write(
        &self,
        path: &Path,
        drafts: &[Draft],
        networks: &BTreeMap<Ipv4Net, String>,
        boxes: &[String],
        top_comments: &[String],
    ) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "# Imported by `testbed import` from {}.\n",
            path.display()
        ));
        let mut shown: Vec<&String> = Vec::new();
        for name in boxes {
            if shown.contains(&name) {
                continue;
            }
            shown.push(name);
            out.push_str(&format!(
                "# Vagrant box {}: testbed boots its image `{IMAGE}` instead.\n",
                quoted(name)
            ));
        }
        for comment in top_comments {
            out.push_str(&format!("# {comment}\n"));
        }
        out.push_str(&format!(
            "name = {}\n",
            quoted(&topology_name(&self.vagrant_dir))
        ));
        out.push_str(&format!("\n[defaults]\nimage = {}\n", quoted(IMAGE)));
        for (subnet, name) in networks {
            out.push_str(&format!("\n[networks.{name}]\nsubnet = \"{subnet}\"\n"));
        }
        for (index, draft) in drafts.iter().enumerate() {
            out.push('\n');
            if draft.line > 0 {
                out.push_str(&format!("# {}:{}\n", self.file, draft.line));
            }
            out.push_str(&format!("[machines.{}]\n", draft.name));
            for comment in &draft.comments {
                out.push_str(&format!("# {comment}\n"));
            }
            write_addresses(&mut out, draft, networks);
            if let Some(mib) = draft.memory_mib {
                out.push_str(&format!("memory = \"{mib}MiB\"\n"));
            }
            if let Some(cpus) = draft.cpus {
                out.push_str(&format!("cpus = {cpus}\n"));
            }
            if !draft.vars.is_empty() {
                let vars: Vec<String> = draft
                    .vars
                    .iter()
                    .map(|(key, value)| format!("{key} = {}", inline(value)))
                    .collect();
                out.push_str(
                    "# The playbooks' `extra_vars`, as host vars (below play vars in Ansible's \
                     precedence, where extra vars are above all).\n",
                );
                out.push_str(&format!("vars = {{ {} }}\n", vars.join(", ")));
            }
            if !draft.forwards.is_empty() {
                let forwards: Vec<String> = draft
                    .forwards
                    .iter()
                    .map(|(guest, host)| format!("{{ guest = {guest}, host = {host} }}"))
                    .collect();
                out.push_str(&format!("forward = [{}]\n", forwards.join(", ")));
            }
            if let Some(previous) = index.checked_sub(1).and_then(|i| drafts.get(i)) {
                out.push_str("# Vagrant provisions the machines in this order.\n");
                out.push_str(&format!("depends_on = [{}]\n", quoted(&previous.name)));
            }
            if !draft.provision.is_empty() {
                out.push_str("provision = [\n");
                for entry in &draft.provision {
                    out.push_str(&format!("  {entry},\n"));
                }
                out.push_str("]\n");
            }
        }
        out
    }
}

fn write_addresses(out: &mut String, draft: &Draft, networks: &BTreeMap<Ipv4Net, String>) {
    match draft.ips.as_slice() {
        [] => {}
        [(ip, _)] if networks.len() == 1 => out.push_str(&format!("ip = \"{ip}\"\n")),
        ips => {
            let pairs: Vec<String> = ips
                .iter()
                .filter_map(|(ip, subnet)| Some(format!("{} = \"{ip}\"", networks.get(subnet)?)))
                .collect();
            out.push_str(&format!("ips = {{ {} }}\n", pairs.join(", ")));
        }
    }
}

/// The whole file's provisioners, then the machine's; a machine's named
/// provisioner (`provision "NAME", type: …`) takes the place of the whole
/// file's of that name, as in Vagrant.
fn provisioners_of(global: &Config, own: &Config) -> Vec<Call> {
    let named = |call: &Call| call.options.contains_key("type");
    let mut all: Vec<Call> = global.provisioners.clone();
    for call in &own.provisioners {
        match all
            .iter_mut()
            .find(|earlier| named(call) && named(earlier) && earlier.kind == call.kind)
        {
            Some(earlier) => *earlier = call.clone(),
            None => all.push(call.clone()),
        }
    }
    all
}

/// Vagrant merges the blocks of a name defined twice: so does this, at
/// the place of the first.
fn merge_same_names(defines: &[Define]) -> Vec<Define> {
    let mut merged: Vec<Define> = Vec::new();
    for define in defines {
        match merged.iter_mut().find(|d| d.name == define.name) {
            Some(first) => {
                first.config = self::merged(&[first.config.clone(), define.config.clone()]);
                first.options.extend(define.options.clone());
            }
            None => merged.push(define.clone()),
        }
    }
    merged
}

/// The global settings of every `Vagrant.configure` block, in order.
fn merged(configs: &[Config]) -> Config {
    let mut all = Config::default();
    for config in configs {
        all.settings.extend(config.settings.clone());
        all.networks.extend(config.networks.clone());
        all.providers.extend(config.providers.clone());
        all.provisioners.extend(config.provisioners.clone());
        all.synced_folders.extend(config.synced_folders.clone());
        for (namespace, settings) in &config.others {
            all.others
                .entry(namespace.clone())
                .or_default()
                .extend(settings.clone());
        }
        all.defines.extend(config.defines.clone());
    }
    all
}

/// A `config.vm` setting of the machine, else of the whole file.
fn setting<'c>(own: &'c Config, global: &'c Config, key: &str) -> Option<&'c Value> {
    own.settings
        .get(key)
        .or_else(|| global.settings.get(key))
        .map(|set| &set.value)
}

/// A network name per subnet, in the order the machines first use them:
/// `private` alone, else `private-1`, `private-2`, …
fn network_names(drafts: &[Draft]) -> BTreeMap<Ipv4Net, String> {
    let mut order: Vec<Ipv4Net> = Vec::new();
    for (_, subnet) in drafts.iter().flat_map(|d| &d.ips) {
        if !order.contains(subnet) {
            order.push(*subnet);
        }
    }
    let single = order.len() == 1;
    order
        .into_iter()
        .enumerate()
        .map(|(index, subnet)| {
            let name = if single {
                "private".to_owned()
            } else {
                format!("private-{}", index + 1)
            };
            (subnet, name)
        })
        .collect()
}

/// The address and its subnet (a /24 unless `netmask` says otherwise),
/// when testbed can make it: a private range away from qemu's own.
fn private_subnet(ip: &str, netmask: Option<&Value>) -> Result<(Ipv4Addr, Ipv4Net), String> {
    let address: Ipv4Addr = ip.parse().map_err(|_| "not an IPv4 address".to_owned())?;
    let prefix = match netmask.and_then(Value::as_str) {
        Some(mask) => {
            let mask: Ipv4Addr = mask
                .parse()
                .map_err(|_| format!("netmask {mask} is not one"))?;
            ipnet::ipv4_mask_to_prefix(mask).map_err(|_| format!("netmask {mask} is not one"))?
        }
        None => 24,
    };
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
        return Err(format!(
            "testbed's subnets are /{MIN_PREFIX} to /{MAX_PREFIX}, not /{prefix}"
        ));
    }
    let subnet = Ipv4Net::new(address, prefix)
        .map_err(|_| format!("prefix /{prefix} is not one"))?
        .trunc();
    if address == subnet.network() || address == subnet.broadcast() {
        return Err(format!("it is {subnet}'s network or broadcast address"));
    }
    if !PRIVATE_RANGES.iter().any(|range| range.contains(&subnet)) {
        return Err("testbed's networks lie in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16".into());
    }
    if subnet.contains(&QEMU_USER_NET.network()) || QEMU_USER_NET.contains(&address) {
        return Err(format!(
            "it overlaps {QEMU_USER_NET}, which qemu's own network uses"
        ));
    }
    Ok((address, subnet))
}

/// A machine name testbed takes: a hostname label.
fn machine_name(name: &str) -> String {
    if is_valid_name(name) {
        return name.to_owned();
    }
    let mut label: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    label = label.trim_matches('-').chars().take(63).collect();
    if label.is_empty() {
        "machine".into()
    } else {
        label
    }
}

/// The topology's name, from the Vagrantfile's folder.
fn topology_name(dir: &Path) -> String {
    let folder = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = machine_name(&folder);
    if name == "machine" {
        "imported".into()
    } else {
        name
    }
}

fn disabled(options: &Map<String, Value>) -> bool {
    options.get("disabled") == Some(&Value::Bool(true))
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A TOML value on one line: tables inline.
fn inline(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(table) => {
            let pairs: Vec<String> = table
                .iter()
                .map(|(key, value)| format!("{} = {}", bare_key(key), inline(value)))
                .collect();
            format!("{{ {} }}", pairs.join(", "))
        }
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A TOML key: bare when it can be.
fn bare_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        quoted(key)
    }
}

/// `path` relative to `base` (both absolute), with `..` where it climbs.
fn relative_to(path: &Path, base: &Path) -> String {
    let normal = |p: &Path| -> Vec<String> {
        let mut parts: Vec<String> = Vec::new();
        for component in p.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
                Component::ParentDir => {
                    parts.pop();
                }
                _ => {}
            }
        }
        parts
    };
    let (path, base) = (normal(path), normal(base));
    let shared = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_owned(); base.len() - shared];
    parts.extend(path[shared..].iter().cloned());
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_relative_to_the_topology() {
        let at = |p: &str, b: &str| relative_to(Path::new(p), Path::new(b));
        assert_eq!(at("/p/scripts/a.sh", "/p"), "scripts/a.sh");
        assert_eq!(at("/p/scripts/a.sh", "/p/topo"), "../scripts/a.sh");
        assert_eq!(at("/p/./x/../a.sh", "/p"), "a.sh");
    }

    #[test]
    fn addresses_get_a_private_subnet_or_a_reason() {
        assert_eq!(
            private_subnet("192.168.33.7", None).map(|(_, net)| net.to_string()),
            Ok("192.168.33.0/24".into())
        );
        let mask = Value::String("255.255.0.0".into());
        assert_eq!(
            private_subnet("10.1.2.3", Some(&mask)).map(|(_, net)| net.to_string()),
            Ok("10.1.0.0/16".into())
        );
        assert!(private_subnet("8.8.8.8", None).is_err());
        assert!(
            private_subnet("192.168.33.0", None).is_err(),
            "network address"
        );
        assert!(private_subnet("192.168.33.255", None).is_err(), "broadcast");
        let narrow = Value::String("255.255.255.254".into());
        assert!(
            private_subnet("192.168.33.4", Some(&narrow)).is_err(),
            "a /31"
        );
        assert!(private_subnet("10.0.2.15", None).is_err());
    }

    #[test]
    fn names_become_hostname_labels() {
        assert_eq!(machine_name("mesos-slave1"), "mesos-slave1");
        assert_eq!(machine_name("Mesos_Slave.1"), "mesos-slave-1");
        assert_eq!(topology_name(Path::new("/home/u/Aurora")), "aurora");
    }
}
