//! Warm boots: a fresh machine resumes a booted template of its image
//! instead of booting cold, then takes its own identity over SSH.
//!
//! A template is one VM of an image, cpus, memory and NIC count, booted
//! once with an identity of its own (`testbed-template`, its own keys),
//! saved by the provider and kept as an entry of the green cache (so
//! `cache list` shows it and the cache's size bound covers it). A machine
//! that warm-boots gets a copy of the template's disk and memory under its
//! own VM definition; `up` then reaches it with the template's keys, sets
//! its clock, renames its NICs to the machine's MACs and applies its seed
//! (hostname, addresses, host key, machine-id), which restarts the daemons
//! that read them. The kernel reseeds its RNG on the new VM generation id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::green::{EntryFiles, GreenCache, KeyHasher};
use crate::identity::{self, MachineKeys, Renames, MANAGEMENT_NIC, TEMPLATE_HOSTNAME};
use crate::progress::{Progress, Task};
use crate::provider::{NetworkSpec, NicSpec, Provider, VmSpec};
use crate::ssh::{self, Target};
use crate::state::StateDir;

use super::{blocking, first_line, Error, Result, Testbed};

/// Part of every template's key: a change to how templates are made or
/// identities applied makes new ones.
const TEMPLATE_LAYOUT: &str = "1";

/// The files of a template's entry beside its saved VM, in the entry's
/// `state/` folder: the key `up` logs in with, and the host key it pins.
const CLIENT_KEY: &str = "id_ed25519";
const HOST_PUBLIC_KEY: &str = "ssh_host_ed25519_key.pub";

/// A template a machine can warm-boot from.
#[derive(Debug, Clone)]
pub(super) struct Template {
    /// Its cache entry.
    dir: PathBuf,
    /// Where the provider's saved VM is.
    saved: PathBuf,
    state: PathBuf,
    nics: usize,
    /// In a user's words: image, cpus, memory, NICs.
    pub(super) label: String,
    /// How long making it took, when this `up` made it.
    pub(super) made_in: Option<Duration>,
}

impl Template {
    pub(super) fn saved(&self) -> &std::path::Path {
        &self.saved
    }

    /// Removes a template that failed to start a machine: the next `up`
    /// makes it anew instead of failing again.
    pub(super) fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// How `up` reaches a machine warm-booted from this template until
    /// the machine has its own identity: the template's key and host key.
    pub(super) fn target(&self, machine: &Target) -> Target {
        Target {
            key_path: self.state.join(CLIENT_KEY),
            host_key_path: self.state.join(HOST_PUBLIC_KEY),
            ..machine.clone()
        }
    }

    /// Each of the template's MACs with the machine's, NIC for NIC.
    pub(super) fn renames(&self, spec: &VmSpec) -> Vec<(String, String)> {
        let machine = std::iter::once(spec.management_mac.clone())
            .chain(spec.nics.iter().map(|nic| nic.mac.clone()));
        template_macs(self.nics).into_iter().zip(machine).collect()
    }
}

/// The template's MACs: management first, then one per NIC.
fn template_macs(nics: usize) -> Vec<String> {
    std::iter::once(identity::mac_address(TEMPLATE_HOSTNAME, MANAGEMENT_NIC))
        .chain((0..nics).map(|i| identity::mac_address(TEMPLATE_HOSTNAME, &format!("nic{i}"))))
        .collect()
}

/// What a template must share with the machines it serves: everything the
/// guest sees of its VM, and what the guest runs.
fn template_key(provider: &dyn Provider, spec: &VmSpec) -> String {
    let accelerator = provider.accelerator(&spec.image.kernel);
    let mut key = KeyHasher::default();
    key.part("template", TEMPLATE_LAYOUT.as_bytes());
    key.part("testbed", env!("CARGO_PKG_VERSION").as_bytes());
    key.part("provider", provider.name().as_bytes());
    key.part("accelerator", accelerator.name.as_bytes());
    key.part("image", spec.image.hash.as_bytes());
    key.part("cpus", &spec.cpus.to_le_bytes());
    key.part("memory", &spec.memory_mib.to_le_bytes());
    key.part("nics", &(spec.nics.len() as u64).to_le_bytes());
    key.finish()
}

fn template_label(spec: &VmSpec) -> String {
    format!(
        "{}, {} cpu, {} MiB, {} NIC",
        spec.image.name,
        spec.cpus,
        spec.memory_mib,
        spec.nics.len()
    )
}

/// A fresh machine `up` is about to boot.
pub(super) struct Fresh<'a> {
    pub(super) name: &'a str,
    pub(super) provider: Arc<dyn Provider>,
    pub(super) spec: &'a VmSpec,
}

/// One template the fresh machines need: the provider and VM of the
/// first of them, and all their names.
struct Wanted {
    provider: Arc<dyn Provider>,
    spec: VmSpec,
    machines: Vec<String>,
}

impl Testbed {
    /// The template each of the `fresh` machines warm-boots from, made now
    /// when the cache lacks it (one per key, all at once). A machine whose
    /// provider cannot, or whose template could not be made, is left out
    /// and boots cold; `up` says why once per template.
    pub(super) async fn warm_templates(
        &self,
        fresh: &[Fresh<'_>],
        progress: &Progress,
    ) -> BTreeMap<String, Template> {
        let cache = self.green_cache();
        let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
        // Why a provider cannot, and the machines it then boots cold.
        let mut refused: BTreeMap<&str, (String, Vec<&str>)> = BTreeMap::new();
        for machine in fresh {
            if let Err(e) = machine.provider.check_saves_travel() {
                refused
                    .entry(machine.provider.name())
                    .or_insert_with(|| (first_line(&e.to_string()).to_string(), Vec::new()))
                    .1
                    .push(machine.name);
                continue;
            }
            let key = template_key(&*machine.provider, machine.spec);
            wanted
                .entry(key)
                .or_insert_with(|| Wanted {
                    provider: machine.provider.clone(),
                    spec: machine.spec.clone(),
                    machines: Vec::new(),
                })
                .machines
                .push(machine.name.to_string());
        }
        for (why, machines) in refused.values() {
            progress.println(&format!(
                "warm boot: {} boot cold: {why}",
                machines.join(", ")
            ));
        }
        let mut making = tokio::task::JoinSet::new();
        let mut templates = BTreeMap::new();
        for (key, wanted) in wanted {
            let Wanted {
                provider,
                spec,
                machines,
            } = wanted;
            if let Some(entry) = cache.lookup(&key) {
                cache.touch(&entry);
                let template = template_of(&entry, &spec, None);
                for machine in machines {
                    templates.insert(machine, template.clone());
                }
                continue;
            }
            let task = progress.task(&format!("template ({})", template_label(&spec)));
            let cache = cache.clone();
            making.spawn(async move {
                let made = make_template(&cache, &key, provider, &spec, &task).await;
                match &made {
                    Ok(template) => task.finish(&format!(
                        "made in {:.1} s",
                        template.made_in.unwrap_or_default().as_secs_f64()
                    )),
                    Err(e) => task.finish(&format!(
                        "failed, {} boot cold: {}",
                        machines.join(", "),
                        first_line(&e.to_string())
                    )),
                }
                (machines, made)
            });
        }
        while let Some(joined) = making.join_next().await {
            let Ok((machines, Ok(template))) = joined else {
                continue;
            };
            for machine in machines {
                templates.insert(machine, template.clone());
            }
        }
        templates
    }
}

fn template_of(entry: &impl EntryFiles, spec: &VmSpec, made_in: Option<Duration>) -> Template {
    Template {
        dir: entry.dir().to_path_buf(),
        saved: entry.snapshot(),
        state: entry.state(),
        nics: spec.nics.len(),
        label: template_label(spec),
        made_in,
    }
}

/// Boots a VM like `like` with the template's identity in a temporary
/// folder, waits until its boot is done, saves it into a new cache entry
/// and removes the VM.
async fn make_template(
    cache: &GreenCache,
    key: &str,
    provider: Arc<dyn Provider>,
    like: &VmSpec,
    task: &Task,
) -> Result<Template> {
    let started = Instant::now();
    let partial = cache.prepare(key)?;
    if let Err(e) = boot_and_save(&partial, provider, like, task).await {
        cache.abandon(partial);
        return Err(e);
    }
    let label = format!("(warm template) {}", template_label(like));
    let entry = cache.commit_or_keep(partial, &label)?;
    Ok(template_of(&entry, like, Some(started.elapsed())))
}

/// The template VM: stopped and removed, with its networks, however
/// making the template ends (an interrupted `up` drops it too).
struct TemplateVm {
    provider: Arc<dyn Provider>,
    dir: PathBuf,
    networks: Vec<NetworkSpec>,
    /// The temporary folder everything is in (short socket paths).
    _root: tempfile::TempDir,
}

impl Drop for TemplateVm {
    fn drop(&mut self) {
        let _ = self.provider.destroy(&self.dir);
        for network in &self.networks {
            let _ = self.provider.remove_network(network);
        }
    }
}

/// The temporary folders template VMs run in: `testbed-template-PID-…`,
/// PID the process making it (in the name, so no moment exists when a
/// folder does not say whose it is).
const TEMPLATE_RUN_PREFIX: &str = "testbed-template-";

/// Whether the process that made the temp folder `name` still runs.
fn maker_alive(name: &str) -> bool {
    let pid = name
        .strip_prefix(TEMPLATE_RUN_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<i32>().ok());
    let Some(pid) = pid else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("testbed"))
        && !crate::process::is_zombie(pid)
}

/// Stops and removes what a killed `up` left of the templates it was making
/// (its VM and switches run on: they are processes of their own).
fn sweep_abandoned_templates(provider: &dyn Provider) {
    let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for dir in dirs.flatten() {
        let root = dir.path();
        let name = dir.file_name().to_string_lossy().into_owned();
        if !name.starts_with(TEMPLATE_RUN_PREFIX) || maker_alive(&name) {
            continue;
        }
        let state = StateDir::beside(&root);
        let _ = provider.destroy(&state.machine_dir(TEMPLATE_HOSTNAME));
        let networks = std::fs::read_dir(state.root().join("networks"));
        for network in networks.into_iter().flatten().flatten() {
            let _ = provider.remove_network(&NetworkSpec {
                name: network.file_name().to_string_lossy().into_owned(),
                dir: network.path(),
                across_hosts: false,
            });
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

async fn boot_and_save(
    partial: &impl EntryFiles,
    provider: Arc<dyn Provider>,
    like: &VmSpec,
    task: &Task,
) -> Result<()> {
    task.set("booting");
    let p = provider.clone();
    blocking(move || {
        sweep_abandoned_templates(&*p);
        Ok(())
    })
    .await?;
    let root = tempfile::Builder::new()
        .prefix(&format!("{TEMPLATE_RUN_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|source| crate::state::StateError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let state = StateDir::beside(root.path());
    state.create()?;
    let layout = state.machine(TEMPLATE_HOSTNAME);
    crate::state::create_private_dir(layout.path())?;
    let networks: Vec<NetworkSpec> = (0..like.nics.len())
        .map(|i| NetworkSpec {
            name: format!("template-{i}"),
            dir: state.network_dir(&format!("n{i}")),
            across_hosts: false,
        })
        .collect();
    let vm = TemplateVm {
        provider: provider.clone(),
        dir: layout.path().to_path_buf(),
        networks: networks.clone(),
        _root: root,
    };
    let keys = MachineKeys::ensure(&layout, TEMPLATE_HOSTNAME)?;
    let client_key = partial.state().join(CLIENT_KEY);
    let client_public =
        ssh::generate_keypair(&client_key, "testbed-template").map_err(ssh_error)?;
    crate::state::write_atomic(
        &partial.state().join(HOST_PUBLIC_KEY),
        format!("{}\n", keys.host_public).as_bytes(),
        0o644,
    )?;
    let macs = template_macs(like.nics.len());
    let management = provider.management(&macs[0]);
    let seed = identity::template_seed(&keys, &client_public, &management)?;
    crate::state::write_atomic(&layout.seed(), &seed.bytes, 0o600)?;
    for network in &networks {
        let (p, n) = (provider.clone(), network.clone());
        blocking(move || p.ensure_network(&n)).await?;
    }
    let mut spec = VmSpec {
        name: TEMPLATE_HOSTNAME.into(),
        dir: vm.dir.clone(),
        image: like.image.clone(),
        cpus: like.cpus,
        memory_mib: like.memory_mib,
        seed: layout.seed(),
        machine_id: keys.machine_id.clone(),
        management_mac: macs[0].clone(),
        ssh_port: 0,
        forwards: Vec::new(),
        nics: networks
            .iter()
            .zip(&macs[1..])
            .map(|(network, mac)| NicSpec {
                network: network.clone(),
                mac: mac.clone(),
            })
            .collect(),
        internet: false,
    };
    let (p, s) = (provider.clone(), spec.clone());
    blocking(move || p.create(&s)).await?;
    // Nothing records the template VM's port: it lives only in `spec`.
    super::up::boot_with_free_port(
        provider.clone(),
        &mut spec,
        |_, _| Ok(()),
        |p, s| p.start(s),
    )
    .await?;
    let target = Target::root(
        provider.ssh_endpoint(spec.ssh_port),
        client_key,
        partial.state().join(HOST_PUBLIC_KEY),
    );
    task.set("waiting for SSH");
    let session = super::up::connect_while_running(
        TEMPLATE_HOSTNAME,
        &target,
        provider.clone(),
        &layout,
        false,
    )
    .await?;
    task.set("waiting for its boot to finish");
    // Degraded is fine (a unit the lean image does not need); a template
    // saved mid-boot would resume half-started jobs in every machine.
    let wait = "systemctl is-system-running --wait >/dev/null 2>&1; true";
    session.exec(wait).await.map_err(ssh_error)?;
    session.close().await;
    task.set("saving");
    let (p, dir, to) = (provider.clone(), vm.dir.clone(), partial.snapshot());
    blocking(move || {
        p.pause(&dir)?;
        p.save_state(&dir, &to)
    })
    .await?;
    drop(vm);
    Ok(())
}

fn ssh_error(source: ssh::SshError) -> Error {
    Error::Ssh {
        machine: TEMPLATE_HOSTNAME.into(),
        source,
    }
}

/// The command a warm-booted machine's first connection runs, its seed on
/// stdin: the clock from the host's (it stood still in the template), then
/// the identity, which says so on the console as a cold boot does (the
/// console log is where `logs --console` and `up`'s errors look).
pub(super) fn warm_identity_command(renames: &Renames) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "date -u -s @{}.{:09} >/dev/null && {} >/dev/console",
        now.as_secs(),
        now.subsec_nanos(),
        identity::apply_from_stdin_command(renames)
    )
}

/// How far off the host's a guest's clock may stay after [`correct_clock`].
const CLOCK_TOLERANCE_NS: i128 = 20_000_000;

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default()
}

/// Sets the guest's clock right after the rough setting of the first
/// command, which a loaded guest may run well after it was written. The
/// guest's clock is read as its answer arrives (a command's start-up comes
/// before `date` runs, its answer right after), then shifted by the
/// difference relative to itself: the second command's latency no longer
/// counts.
pub(super) async fn correct_clock(
    session: &ssh::Session,
) -> std::result::Result<(), ssh::SshError> {
    let read = "date +%s%N";
    let output = session.exec(read).await?.ensure_success(read)?;
    let received = now_ns();
    let guest: i128 = output.stdout_lossy().trim().parse().unwrap_or(received);
    let behind = received - guest;
    if behind.abs() < CLOCK_TOLERANCE_NS {
        return Ok(());
    }
    let shift = shift_clock_command(behind);
    session.exec(&shift).await?.ensure_success(&shift)?;
    Ok(())
}

/// Moves the guest's clock forward by `ns` nanoseconds (back when negative).
fn shift_clock_command(ns: i128) -> String {
    format!(
        "n=$(( $(date +%s%N) + ({ns}) )) && \
         date -u -s \"@$((n / 1000000000)).$(printf %09d $((n % 1000000000)))\" >/dev/null"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_shift_is_relative_to_the_guests_own_clock() {
        let shift = shift_clock_command(1_800_000_000);
        assert!(
            shift.starts_with("n=$(( $(date +%s%N) + (1800000000) ))"),
            "{shift}"
        );
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                shift
                    .replace("date -u -s", "echo")
                    .replace(" >/dev/null", ""),
            )
            .output()
            .expect("sh");
        let shifted: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .trim_start_matches('@')
            .parse()
            .expect("seconds");
        let now = now_ns() as f64 / 1e9;
        assert!((shifted - now - 1.8).abs() < 0.5, "{shifted} against {now}");
    }

    #[test]
    fn a_template_folder_names_its_maker() {
        let ours = format!("{TEMPLATE_RUN_PREFIX}{}-Ab12Cd", std::process::id());
        assert!(maker_alive(&ours), "this test runs from a testbed binary");
        assert!(!maker_alive(&format!(
            "{TEMPLATE_RUN_PREFIX}999999999-Ab12Cd"
        )));
        assert!(!maker_alive(&format!("{TEMPLATE_RUN_PREFIX}Ab12Cd")));
    }

    #[test]
    fn a_template_has_a_mac_per_nic_distinct_from_any_machines() {
        let macs = template_macs(2);
        assert_eq!(macs.len(), 3);
        assert_eq!(
            macs[0],
            identity::mac_address(TEMPLATE_HOSTNAME, MANAGEMENT_NIC)
        );
        assert_ne!(macs[1], macs[2]);
        assert_ne!(macs[0], identity::mac_address("zk-1", MANAGEMENT_NIC));
    }

    #[test]
    fn the_first_command_sets_the_clock_then_applies_the_identity_with_quoted_renames() {
        let renames = [(
            "52:54:00:00:00:01".to_string(),
            "52:54:00:aa:bb:cc".to_string(),
        )];
        let command = warm_identity_command(&renames);
        assert!(command.starts_with("date -u -s @"), "{command}");
        assert!(
            command.ends_with(&format!(
                "&& {} - '52:54:00:00:00:01=52:54:00:aa:bb:cc' >/dev/console",
                identity::GUEST_APPLY
            )),
            "{command}"
        );
    }
}
