//! Daemon kits: `daemons/<name>/` holds a manifest (`daemon.toml`: the
//! packages a daemon needs, the files to render with tera, the systemd unit
//! to start, a readiness probe) and its templates.
//!
//! # Manifest
//!
//! ```toml
//! description = "Apache ZooKeeper from Debian's zookeeperd"
//! packages = ["zookeeperd"]        # baked into the machine's image
//! service = "zookeeper"            # the systemd unit (re)started
//! unit = "zookeeper.service.tera"  # optional: our own unit, rendered to
//!                                  # /etc/systemd/system/<service>.service
//! [[files]]
//! template = "zoo.cfg.tera"        # relative to the kit directory
//! dest = "/etc/zookeeper/conf/zoo.cfg"
//! mode = "0644"                    # default "0644"
//! owner = "root:root"              # default "root:root"
//!
//! artifacts = ["dist/app.tar.gz"]  # optional: build outputs pushed to
//!                                  # /srv/testbed/dist/ before the start
//! secrets = ["munge_key"]          # optional: generated once per testbed
//!
//! [readiness]                      # optional; the keys of a [[checks]] entry
//! tcp = { port = 2181, send = "srvr", expect = "/Mode: (standalone|leader|follower)/" }
//! retry = "500ms"
//! timeout = "120s"
//! ```
//!
//! # Template context
//!
//! Every template sees five variables (see [`context`]):
//!
//! - `topology`: `{ name, machines: [MACHINE, …] }`, machines in file order.
//! - `machine`: the MACHINE being rendered, plus its `vars`.
//! - `vars`: this machine's `vars = { … }` from the topology (JSON values).
//! - `daemons`: for each kit any machine runs, by kit name: `{ machines:
//!   [MACHINE, …] }` (every machine running it, file order),
//!   `addresses` (the `ip` of each of those that has one), `count`, and
//!   `index`: this machine's 1-based position among them, absent when it
//!   does not run the kit.
//! - `secrets`: each secret any kit of the topology declares, by name: 64
//!   hex characters (32 random bytes) that testbed generates once per
//!   testbed and keeps in `.testbed/secrets.json`, so every machine renders
//!   the same munge key. `testbed plan` shows `<secret NAME>` instead.
//!
//! A MACHINE is `{ name, ip, ips: { NETWORK: IP }, daemons: [KIT, …], cpus,
//! memory_mib }`, where `ip` is the address on the first network by name,
//! or null when the machine has none. So ZooKeeper's myid is
//! `{{ daemons.zookeeper.index }}` and a Mesos connection string is
//! `zk://{{ daemons.zookeeper.addresses | join(sep=":2181,") }}:2181/mesos`.
//! Using a variable that does not exist is an error naming the template
//! file, the line and the variable.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::check::{CheckSpec, CommandProbe, HttpProbe, TcpProbe};
use crate::library::{self, Folder, Origin, Shelf};
use crate::model::{line_col, Machine, Topology};
use crate::settings::Search;

/// Generated secrets by name (see the module doc).
pub type Secrets = BTreeMap<String, String>;

/// The secret names `secrets.NAME` stands for in `plan`, which generates
/// nothing.
pub fn placeholder_secrets(names: &[String]) -> Secrets {
    names
        .iter()
        .map(|name| (name.clone(), format!("<secret {name}>")))
        .collect()
}

/// The manifest's file name inside a kit directory.
pub const MANIFEST: &str = "daemon.toml";

/// The variables every template sees.
pub const CONTEXT_KEYS: [&str; 5] = ["topology", "machine", "vars", "daemons", "secrets"];

/// Where rendered units go: `<UNIT_DIR>/<service>.service`.
pub const UNIT_DIR: &str = "/etc/systemd/system";

/// A loaded, validated kit: its manifest and the text of every template,
/// read from disk once, when it is loaded.
#[derive(Debug, Clone)]
pub struct Kit {
    pub name: String,
    /// The kit's folder (`…/daemons/<name>`, or built in).
    folder: Folder,
    pub manifest: Manifest,
    /// Each template's text, by its path relative to the kit directory.
    templates: BTreeMap<PathBuf, String>,
}

/// Every kit a topology's machines run, each loaded once per command.
#[derive(Debug, Clone, Default)]
pub struct Kits {
    kits: BTreeMap<String, Kit>,
}

impl Kits {
    /// Loads each kit named in any machine's `daemons`, once.
    pub fn load(topology: &Topology, search: &Search) -> Result<Kits> {
        let mut kits = BTreeMap::new();
        for machine in &topology.machines {
            for daemon in &machine.daemons {
                if !kits.contains_key(daemon) {
                    kits.insert(daemon.clone(), Kit::load(daemon, topology.dir(), search)?);
                }
            }
        }
        Ok(Kits { kits })
    }

    /// Also loads `names` (daemons a record knows that the topology no
    /// longer names), skipping those that cannot be found any more.
    pub fn load_also(
        &mut self,
        names: impl IntoIterator<Item = String>,
        start: &Path,
        search: &Search,
    ) {
        for name in names {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.kits.entry(name) {
                if let Ok(kit) = Kit::load(slot.key(), start, search) {
                    slot.insert(kit);
                }
            }
        }
    }

    /// Each kit as written, by name: its manifest and its templates' text
    /// (rendering is left out: it differs with each testbed's secrets).
    pub fn as_written(&self) -> impl Iterator<Item = (&str, String)> + '_ {
        self.kits.iter().map(|(name, kit)| {
            let mut text = format!("{:?}", kit.manifest);
            for (path, template) in &kit.templates {
                text.push_str(&format!("\0{}\0{template}", path.display()));
            }
            (name.as_str(), text)
        })
    }

    pub fn get(&self, name: &str) -> Option<&Kit> {
        self.kits.get(name)
    }

    /// The kits of `machine`, in its `daemons` order.
    pub fn of<'k>(&'k self, machine: &'k Machine) -> impl Iterator<Item = &'k Kit> + 'k {
        machine
            .daemons
            .iter()
            .filter_map(|name| self.kits.get(name))
    }

    /// Every secret the kits of `topology` declare, sorted, each once.
    pub fn secret_names(&self, topology: &Topology) -> Vec<String> {
        let mut names: Vec<String> = topology
            .machines
            .iter()
            .flat_map(|machine| self.of(machine))
            .flat_map(|kit| kit.manifest.secrets.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The Debian packages `machine`'s kits need, in order.
    pub fn packages(&self, machine: &Machine) -> Vec<String> {
        self.of(machine)
            .flat_map(|kit| kit.manifest.packages.iter().cloned())
            .collect()
    }

    /// The systemd service of each of `machine`'s kits.
    pub fn services(&self, machine: &Machine) -> Vec<String> {
        self.of(machine)
            .map(|kit| kit.manifest.service.clone())
            .collect()
    }
}

/// `daemon.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub description: String,
    /// Debian packages the daemon needs (baked into the machine's image).
    pub packages: Vec<String>,
    /// The systemd unit to (re)start, without `.service`, e.g. `zookeeper`.
    pub service: String,
    /// A template of a unit file of our own, rendered to
    /// `/etc/systemd/system/<service>.service`.
    #[serde(default)]
    pub unit: Option<PathBuf>,
    #[serde(default)]
    pub files: Vec<KitFile>,
    #[serde(default)]
    pub readiness: Option<Readiness>,
    /// Files the build step leaves in `dist/`, pushed to the guest's
    /// `/srv/testbed/dist/` before the daemon starts.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// Names of secrets testbed generates once per testbed (shared by every
    /// machine), available to templates as `secrets.NAME`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// One `[[files]]` entry: a template rendered to a path on the guest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitFile {
    /// Relative to the kit directory.
    pub template: PathBuf,
    /// Absolute path on the guest.
    pub dest: String,
    /// Octal permission bits, e.g. "0644".
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `user:group` (or `user`) on the guest.
    #[serde(default = "default_owner")]
    pub owner: String,
}

fn default_mode() -> String {
    "0644".into()
}

fn default_owner() -> String {
    "root:root".into()
}

impl KitFile {
    /// The permission bits, or `None` when `mode` is not octal up to 7777.
    pub fn mode_bits(&self) -> Option<u32> {
        parse_mode(&self.mode)
    }
}

/// A check without name and machine: the probe keys of
/// [`CheckSpec`] (exactly one of `tcp`, `http`, `command`), `retry`, `timeout`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    #[serde(default)]
    pub tcp: Option<TcpProbe>,
    #[serde(default)]
    pub http: Option<HttpProbe>,
    #[serde(default)]
    pub command: Option<CommandProbe>,
    #[serde(default)]
    pub retry: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A rendered template, ready to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Absolute path on the guest.
    pub dest: String,
    pub mode: u32,
    pub owner: String,
    pub contents: String,
    /// The template it came from (absolute, on the host).
    pub template: PathBuf,
}

/// Why a kit could not be loaded or rendered. Every message names the kit
/// file at fault (and its line when known).
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error(
        "unknown daemon kit `{name}`{}\n  help: {}",
        suggestion(name, known),
        known_help(known, searched)
    )]
    Unknown {
        name: String,
        /// Every kit visible from the topology's directory, sorted.
        known: Vec<String>,
        /// The directories searched.
        searched: Vec<PathBuf>,
    },
    #[error("cannot read {}: {error}", shown(path))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A problem in `daemon.toml`: syntax, an unknown key, an invalid value.
    #[error("{}: {message}", located(path, *position))]
    Manifest {
        path: PathBuf,
        /// 1-based (line, column), when known.
        position: Option<(usize, usize)>,
        message: String,
    },
    /// A template that does not parse or render; `tera` is tera's own
    /// message chain.
    #[error("{}: {message}\n  tera: {tera}", located(path, line.map(|line| (line, 0))))]
    Template {
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        message: String,
        tera: String,
    },
}

type Result<T> = std::result::Result<T, KitError>;

impl Kit {
    /// Finds the kit `name` in [`kit_dirs`]`(start)` (the first folder
    /// holding `<name>/daemon.toml` wins) and loads it.
    pub fn load(name: &str, start: &Path, search: &Search) -> Result<Kit> {
        let searched = kit_dirs(start, search);
        let found = if is_plain_name(name) {
            searched
                .iter()
                .map(|dir| dir.join(name))
                .find(|dir| dir.is_file(MANIFEST))
        } else {
            None
        };
        match found {
            Some(folder) => Kit::from_folder(name, folder),
            None => Err(KitError::Unknown {
                name: name.to_owned(),
                known: kit_names(start, search),
                searched: searched.iter().map(|folder| folder.shown("")).collect(),
            }),
        }
    }

    /// Loads and validates the kit in `folder`, named `name`.
    fn from_folder(name: &str, folder: Folder) -> Result<Kit> {
        let path = folder.shown(MANIFEST);
        let text = read(&folder, Path::new(MANIFEST))?;
        let manifest: Manifest = toml::from_str(&text).map_err(|error| {
            let position = error.span().map(|span| line_col(&text, span.start));
            KitError::Manifest {
                path: path.clone(),
                position,
                message: error.message().trim_end().to_owned(),
            }
        })?;
        let checker = ManifestChecker {
            folder: &folder,
            path: &path,
            text: &text,
        };
        checker.check(&manifest)?;
        let templates = manifest
            .files
            .iter()
            .map(|file| &file.template)
            .chain(manifest.unit.as_ref())
            .map(|template| Ok((template.clone(), read(&folder, template)?)))
            .collect::<Result<_>>()?;
        Ok(Kit {
            name: name.to_owned(),
            folder,
            manifest,
            templates,
        })
    }

    /// The manifest file, as messages show it.
    pub fn manifest_path(&self) -> PathBuf {
        self.folder.shown(MANIFEST)
    }

    /// Where the kit was found: its folder, or built in.
    pub fn origin(&self) -> Origin {
        self.folder.origin()
    }

    /// The kit's folder, to copy it out.
    pub fn folder(&self) -> &Folder {
        &self.folder
    }

    /// Renders the kit's files for `machine`, then its unit when it has one.
    pub fn render(
        &self,
        topology: &Topology,
        machine: &Machine,
        secrets: &Secrets,
    ) -> Result<Vec<RenderedFile>> {
        let values = context_map(topology, machine, secrets);
        let context = tera_context(&values);
        self.targets()?
            .into_iter()
            .map(|target| self.render_target(target, &values, &context))
            .collect()
    }

    /// The readiness probe as a check on `machine`, named
    /// `<kit> ready on <machine>`.
    pub fn readiness_check(&self, machine: &str) -> Option<CheckSpec> {
        let readiness = self.manifest.readiness.as_ref()?;
        Some(CheckSpec {
            name: format!("{} ready on {machine}", self.name),
            machine: machine.to_owned(),
            from: None,
            tcp: readiness.tcp.clone(),
            http: readiness.http.clone(),
            command: readiness.command.clone(),
            retry: readiness.retry.clone(),
            timeout: readiness.timeout.clone(),
        })
    }

    /// What to render: every `[[files]]` entry, then the unit.
    fn targets(&self) -> Result<Vec<Target<'_>>> {
        let mut targets = Vec::new();
        for file in &self.manifest.files {
            let mode = file
                .mode_bits()
                .ok_or_else(|| self.mode_error(&file.mode))?;
            targets.push(Target {
                template: &file.template,
                dest: file.dest.clone(),
                mode,
                owner: file.owner.clone(),
            });
        }
        if let Some(unit) = &self.manifest.unit {
            targets.push(Target {
                template: unit,
                dest: format!("{UNIT_DIR}/{}.service", self.manifest.service),
                mode: 0o644,
                owner: "root:root".into(),
            });
        }
        Ok(targets)
    }

    fn mode_error(&self, mode: &str) -> KitError {
        KitError::Manifest {
            path: self.manifest_path(),
            position: None,
            message: format!("mode `{mode}` is not an octal permission such as \"0644\""),
        }
    }
}

/// Folders searched for `<name>/daemon.toml` kits, in order (see
/// [`library`]).
pub fn kit_dirs(start: &Path, search: &Search) -> Vec<Folder> {
    library::search(Shelf::Daemons, start, search)
}

/// The names of every kit visible from `start`, sorted.
pub fn kit_names(start: &Path, search: &Search) -> Vec<String> {
    let mut names: Vec<String> = kit_dirs(start, search)
        .iter()
        .flat_map(|folder| {
            folder
                .entries()
                .into_iter()
                .filter(|entry| folder.join(entry).is_file(MANIFEST))
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The template context for `machine` (documented in the module doc).
pub fn context(topology: &Topology, machine: &Machine, secrets: &Secrets) -> tera::Context {
    tera_context(&context_map(topology, machine, secrets))
}

// ---------------------------------------------------------------------------
// Manifest validation
// ---------------------------------------------------------------------------

/// Checks the values serde cannot: names, paths, modes, probes.
struct ManifestChecker<'a> {
    folder: &'a Folder,
    path: &'a Path,
    text: &'a str,
}

impl ManifestChecker<'_> {
    fn check(&self, manifest: &Manifest) -> Result<()> {
        self.check_service(&manifest.service)?;
        for package in &manifest.packages {
            self.check_package(package)?;
        }
        let mut dests = BTreeMap::new();
        for file in &manifest.files {
            self.check_file(file)?;
            if let Some(earlier) = dests.insert(file.dest.as_str(), &file.template) {
                return Err(self.error(
                    &file.dest,
                    format!(
                        "`{}` is the destination of both `{}` and `{}`",
                        file.dest,
                        earlier.display(),
                        file.template.display()
                    ),
                ));
            }
        }
        if let Some(unit) = &manifest.unit {
            self.check_template(unit)?;
        }
        if let Some(readiness) = &manifest.readiness {
            self.check_readiness(readiness)?;
        }
        for artifact in &manifest.artifacts {
            crate::model::check_dist_path(artifact).map_err(|message| {
                self.error(artifact, format!("artifact `{artifact}` {message}"))
            })?;
        }
        for secret in &manifest.secrets {
            if !crate::model::is_identifier(secret) {
                return Err(self.error(
                    secret,
                    format!("secret `{secret}` must be an identifier (letters, digits, `_`), e.g. \"munge_key\""),
                ));
            }
        }
        Ok(())
    }

    fn check_service(&self, service: &str) -> Result<()> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "@._:-".contains(c);
        if service.is_empty() || !service.chars().all(allowed) {
            return Err(self.error(
                "service",
                format!("service `{service}` is not a systemd unit name, e.g. \"zookeeper\""),
            ));
        }
        if let Some(base) = service.strip_suffix(".service") {
            return Err(self.error(
                service,
                format!("write the service without `.service`: \"{base}\""),
            ));
        }
        Ok(())
    }

    fn check_package(&self, package: &str) -> Result<()> {
        if crate::image::is_package_name(package) {
            return Ok(());
        }
        Err(self.error(
            package,
            format!("`{package}` is not a Debian package name (lowercase letters, digits, `+-.`)"),
        ))
    }

    fn check_file(&self, file: &KitFile) -> Result<()> {
        self.check_template(&file.template)?;
        if !file.dest.starts_with('/') || file.dest.ends_with('/') {
            return Err(self.error(
                &file.dest,
                format!(
                    "dest `{}` must be an absolute path to a file on the guest",
                    file.dest
                ),
            ));
        }
        if file.mode_bits().is_none() {
            return Err(self.error(
                &file.mode,
                format!(
                    "mode `{}` is not an octal permission such as \"0644\"",
                    file.mode
                ),
            ));
        }
        let owner_ok = !file.owner.is_empty()
            && file.owner.split(':').count() <= 2
            && file.owner.split(':').all(|part| !part.is_empty())
            && !file.owner.contains(char::is_whitespace);
        if !owner_ok {
            return Err(self.error(
                &file.owner,
                format!(
                    "owner `{}` must be `user:group` or `user`, e.g. \"root:root\"",
                    file.owner
                ),
            ));
        }
        Ok(())
    }

    /// A template path inside the kit directory, naming an existing file.
    fn check_template(&self, template: &Path) -> Result<()> {
        let shown_name = template.display().to_string();
        let inside = template
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
        if !inside || template.as_os_str().is_empty() {
            return Err(self.error(
                &shown_name,
                format!("template `{shown_name}` must be a path inside the kit directory"),
            ));
        }
        if !self.folder.is_file(template) {
            return Err(self.error(
                &shown_name,
                format!(
                    "template `{shown_name}` does not exist in {}",
                    shown(&self.folder.shown(""))
                ),
            ));
        }
        Ok(())
    }

    fn check_readiness(&self, readiness: &Readiness) -> Result<()> {
        let probes = [
            readiness.tcp.is_some(),
            readiness.http.is_some(),
            readiness.command.is_some(),
        ];
        if probes.iter().filter(|&&set| set).count() != 1 {
            return Err(self.error(
                "readiness",
                "[readiness] needs exactly one probe: `tcp`, `http` or `command`",
            ));
        }
        for (key, value) in [("retry", &readiness.retry), ("timeout", &readiness.timeout)] {
            if let Some(text) = value {
                if humantime::parse_duration(text).is_err() {
                    return Err(self.error(
                        text,
                        format!("{key} `{text}` is not a duration such as \"500ms\" or \"2m\""),
                    ));
                }
            }
        }
        Ok(())
    }

    /// An error at the first line of the manifest mentioning `needle`.
    fn error(&self, needle: &str, message: impl Into<String>) -> KitError {
        let position = (!needle.is_empty())
            .then(|| self.text.find(needle))
            .flatten()
            .map(|offset| line_col(self.text, offset));
        KitError::Manifest {
            path: self.path.to_path_buf(),
            position,
            message: message.into(),
        }
    }
}

fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok()
}

/// A kit name is one directory name: no separators, not `.` or `..`.
fn is_plain_name(name: &str) -> bool {
    matches!(
        Path::new(name).components().collect::<Vec<_>>().as_slice(),
        [Component::Normal(_)]
    ) && !name.contains(['/', '\\'])
}

fn read(folder: &Folder, relative: &Path) -> Result<String> {
    folder
        .read_to_string(relative)
        .map_err(|error| KitError::Io {
            path: folder.shown(relative),
            error,
        })
}

// ---------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------

fn context_map(topology: &Topology, machine: &Machine, secrets: &Secrets) -> Map<String, Value> {
    let machines: Vec<Value> = topology.machines.iter().map(machine_value).collect();
    let vars = vars_value(machine);
    let mut this = machine_value(machine);
    if let Value::Object(fields) = &mut this {
        fields.insert("vars".into(), vars.clone());
    }
    let mut map = Map::new();
    map.insert(
        "topology".into(),
        json!({ "name": topology.name, "machines": machines }),
    );
    map.insert("machine".into(), this);
    map.insert("vars".into(), vars);
    map.insert("daemons".into(), daemons_value(topology, machine));
    map.insert("secrets".into(), json!(secrets));
    map
}

fn tera_context(values: &Map<String, Value>) -> tera::Context {
    let mut context = tera::Context::new();
    for (key, value) in values {
        context.insert(key.as_str(), value);
    }
    context
}

/// The address templates use for a machine: on its first network by name.
fn first_ip(machine: &Machine) -> Option<String> {
    machine.ips.values().next().map(ToString::to_string)
}

fn machine_value(machine: &Machine) -> Value {
    let ips: Map<String, Value> = machine
        .ips
        .iter()
        .map(|(network, ip)| (network.clone(), Value::String(ip.to_string())))
        .collect();
    json!({
        "name": machine.name,
        "ip": first_ip(machine),
        "ips": ips,
        "daemons": machine.daemons,
        "cpus": machine.cpus,
        "memory_mib": machine.memory_mib,
    })
}

fn vars_value(machine: &Machine) -> Value {
    Value::Object(
        machine
            .vars
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    )
}

/// `daemons`: per kit, who runs it and where this machine stands.
fn daemons_value(topology: &Topology, machine: &Machine) -> Value {
    let mut runners: BTreeMap<&str, Vec<&Machine>> = BTreeMap::new();
    for candidate in &topology.machines {
        for daemon in &candidate.daemons {
            runners.entry(daemon.as_str()).or_default().push(candidate);
        }
    }
    let kits: Map<String, Value> = runners
        .into_iter()
        .map(|(daemon, members)| (daemon.to_owned(), daemon_value(&members, machine)))
        .collect();
    Value::Object(kits)
}

fn daemon_value(members: &[&Machine], machine: &Machine) -> Value {
    let machines: Vec<Value> = members.iter().map(|member| machine_value(member)).collect();
    let addresses: Vec<String> = members.iter().filter_map(|m| first_ip(m)).collect();
    let mut value = json!({
        "machines": machines,
        "addresses": addresses,
        "count": members.len(),
    });
    let index = members.iter().position(|m| m.name == machine.name);
    if let (Some(index), Value::Object(fields)) = (index, &mut value) {
        fields.insert("index".into(), json!(index + 1));
    }
    value
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// One template to render (relative to the kit directory) and where its
/// output goes.
struct Target<'k> {
    template: &'k Path,
    dest: String,
    mode: u32,
    owner: String,
}

impl Kit {
    fn render_target(
        &self,
        target: Target<'_>,
        values: &Map<String, Value>,
        context: &tera::Context,
    ) -> Result<RenderedFile> {
        let path = self.folder.shown(target.template);
        let text = self
            .templates
            .get(target.template)
            .ok_or_else(|| KitError::Io {
                path: path.clone(),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        let name = shown(&path);
        let mut tera = tera::Tera::default();
        tera.autoescape_on(Vec::new());
        tera.register_filter("shell", shell_filter);
        let failure = |error: tera::Error| template_error(&path, text, values, &error);
        tera.add_raw_template(&name, text).map_err(failure)?;
        let contents = tera.render(&name, context).map_err(failure)?;
        Ok(RenderedFile {
            dest: target.dest,
            mode: target.mode,
            owner: target.owner,
            contents,
            template: path,
        })
    }
}

/// `{{ value | shell }}`: the value as one word of POSIX shell, single-quoted,
/// for files a shell sources or runs (`"`, `$(…)`, backticks and newlines
/// stay text). Strings, numbers and booleans only.
fn shell_filter(
    value: &Value,
    _: &std::collections::HashMap<String, Value>,
) -> tera::Result<Value> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        other => {
            return Err(tera::Error::msg(format!(
                "the `shell` filter quotes a string, number or boolean, not {other}"
            )))
        }
    };
    if text.contains('\0') {
        return Err(tera::Error::msg(
            "the `shell` filter cannot quote a NUL character",
        ));
    }
    Ok(Value::String(crate::ssh::shell_quote(&text)))
}

/// Turns a tera error into one naming the file, the line and the cause.
fn template_error(
    path: &Path,
    text: &str,
    values: &Map<String, Value>,
    error: &tera::Error,
) -> KitError {
    let messages = error_chain(error);
    let tera = messages.join(": ");
    let (line, message) = if let Some(variable) = capture(&tera, r"Variable `([^`]+)` not found") {
        let message = format!(
            "variable `{variable}` is not defined ({})",
            available(values, &variable)
        );
        (line_in_tags(text, &variable), message)
    } else if let Some(line) = capture(&tera, r"-->\s*(\d+):\d+") {
        (line.parse().ok(), "syntax error".to_owned())
    } else {
        let line = thrown_at(text, &messages)
            .or_else(|| named_in_error(error).and_then(|name| line_in_tags(text, &name)));
        (line, "cannot render".to_owned())
    };
    KitError::Template {
        path: path.to_path_buf(),
        line,
        message,
        tera,
    }
}

/// The messages of `error` and of each of its sources.
fn error_chain(error: &tera::Error) -> Vec<String> {
    let mut messages = vec![error.to_string()];
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        messages.push(cause.to_string());
        source = cause.source();
    }
    messages
}

/// The filter, test or function a tera error is about, if any.
fn named_in_error(error: &tera::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = current {
        if let Some(tera_error) = cause.downcast_ref::<tera::Error>() {
            match &tera_error.kind {
                tera::ErrorKind::FilterNotFound(name)
                | tera::ErrorKind::TestNotFound(name)
                | tera::ErrorKind::FunctionNotFound(name) => return Some(name.clone()),
                tera::ErrorKind::CallFunction(name) => return Some(name.clone()),
                _ => {}
            }
        }
        current = cause.source();
    }
    None
}

/// The line of the `throw(…)` whose message the chain ends with: found by
/// the message's opening words, the part a template usually writes literally.
fn thrown_at(text: &str, messages: &[String]) -> Option<usize> {
    if !messages.iter().any(|m| m.contains("'throw'")) {
        return None;
    }
    let thrown = messages.last()?;
    let literal: String = thrown.chars().take_while(|c| *c != '`').take(40).collect();
    if literal.trim().len() < 8 {
        return None;
    }
    text.find(literal.as_str())
        .map(|offset| line_col(text, offset).0)
}

/// The first capture group of `pattern` in `text`.
fn capture(text: &str, pattern: &str) -> Option<String> {
    let regex = regex::Regex::new(pattern).ok()?;
    let captures = regex.captures(text)?;
    captures.get(1).map(|found| found.as_str().to_owned())
}

/// The 1-based line where `name` first appears as a whole word inside a
/// `{{ … }}` or `{% … %}` tag of `text` (tera's errors carry no line).
fn line_in_tags(text: &str, name: &str) -> Option<usize> {
    let tags = regex::Regex::new(r"(?s)\{[{%].*?[%}]\}").ok()?;
    let word = regex::Regex::new(&format!(
        r"(?:^|[^\w.])({})(?:$|[^\w])",
        regex::escape(name)
    ))
    .ok()?;
    let line = tags.find_iter(text).find_map(|tag| {
        let found = word.captures(tag.as_str())?.get(1)?;
        Some(line_col(text, tag.start() + found.start()).0)
    });
    line
}

/// What could have been meant: the keys at the deepest existing prefix of
/// `variable`'s dotted path, or the context's top-level names.
fn available(values: &Map<String, Value>, variable: &str) -> String {
    let segments: Vec<&str> = variable.split(['.', '[']).collect();
    let Some(mut node) = segments.first().and_then(|first| values.get(*first)) else {
        return format!("available: {}", CONTEXT_KEYS.join(", "));
    };
    let mut depth = 1;
    for segment in segments.iter().skip(1) {
        let Some(next) = node.get(*segment) else {
            break;
        };
        node = next;
        depth += 1;
    }
    let path = segments
        .iter()
        .take(depth)
        .copied()
        .collect::<Vec<_>>()
        .join(".");
    match node.as_object() {
        Some(fields) if fields.is_empty() => format!("`{path}` is empty"),
        Some(fields) => {
            let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
            format!("available in `{path}`: {}", keys.join(", "))
        }
        None => match node.as_array() {
            Some(items) => format!("`{path}` is a list of {}", items.len()),
            None => format!("`{path}` has no fields"),
        },
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// `path`, relative to the working directory when inside it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// `FILE`, `FILE:LINE` or `FILE:LINE:COL` (a column of 0 is left out).
fn located(path: &Path, position: Option<(usize, usize)>) -> String {
    match position {
        Some((line, 0)) => format!("{}:{line}", shown(path)),
        Some((line, col)) => format!("{}:{line}:{col}", shown(path)),
        None => shown(path),
    }
}

fn suggestion(name: &str, known: &[String]) -> String {
    known
        .iter()
        .map(|candidate| (strsim::levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2.max(name.len() / 3))
        .min()
        .map(|(_, candidate)| format!("; did you mean `{candidate}`?"))
        .unwrap_or_default()
}

fn known_help(known: &[String], searched: &[PathBuf]) -> String {
    let dirs: Vec<String> = searched.iter().map(|dir| shown(dir)).collect();
    let dirs = if dirs.is_empty() {
        "no `daemons/` directory beside the topology or above it, and TESTBED_DAEMONS unset"
            .to_owned()
    } else {
        format!("searched {}", dirs.join(", "))
    };
    if known.is_empty() {
        format!("no kits found ({dirs})")
    } else {
        format!("known kits: {} ({dirs})", known.join(", "))
    }
}
