//! A machine's own `provision` entries (shell scripts and Ansible
//! playbooks, run after its kits): the key each is recorded under, the hash
//! that decides whether it runs again, and the commands that run it.

use std::ffi::OsString;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::files::{self, ReadError};
use crate::model::{Machine, ProvisionRun, Provisioner, Script, Topology};
use crate::ssh::shell_quote;

/// Where shell provisioners' scripts are copied on the guest.
pub const GUEST_DIR: &str = "/var/lib/testbed/provision";

/// The program Ansible provisioners run on the host.
pub const ANSIBLE_PLAYBOOK: &str = "ansible-playbook";

/// What a playbook reads besides itself, by Ansible's conventions, beside
/// it (with every `.yml` and `.yaml` there: its `vars_files`, included
/// tasks and imported playbooks): a change to any of them runs it again.
const PLAYBOOK_NEIGHBOURS: &[&str] = &[
    "roles",
    "templates",
    "files",
    "vars",
    "group_vars",
    "host_vars",
    "tasks",
    "handlers",
    "library",
    "filter_plugins",
    "module_utils",
];

/// The key each of `machine`'s provisioners is recorded under: its label,
/// with ` #2`, ` #3`… when the label came earlier in the list (one script
/// run twice with other `args`). Keys follow a provisioner moved in the
/// list, so moving one does not run it again.
pub fn keys(machine: &Machine) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for provisioner in &machine.provision {
        let label = provisioner.label();
        let earlier = machine
            .provision
            .iter()
            .take(keys.len())
            .filter(|p| p.label() == label)
            .count();
        keys.push(match earlier {
            0 => label,
            n => format!("{label} #{}", n + 1),
        });
    }
    keys
}

/// What decides whether `provisioner` runs again on `machine`: its script
/// or playbook (with the playbook's neighbours and the machine's host vars),
/// its `args` and `env`, and its `inputs`, by contents.
pub fn hash(
    topology: &Topology,
    machine: &Machine,
    provisioner: &Provisioner,
) -> Result<String, ReadError> {
    let dir = topology.dir();
    let mut hasher = Sha256::new();
    match &provisioner.run {
        ProvisionRun::Shell { script, args, env } => {
            part(&mut hasher, b"shell");
            match script {
                Script::File(path) => files::hash(&mut hasher, dir, Path::new(path))?,
                Script::Inline(text) => part(&mut hasher, text.as_bytes()),
            }
            let given = serde_json::json!({ "args": args, "env": env });
            part(&mut hasher, given.to_string().as_bytes());
        }
        ProvisionRun::Ansible { playbook } => {
            part(&mut hasher, b"ansible");
            files::hash(&mut hasher, dir, Path::new(playbook))?;
            // Ansible reads the `ansible.cfg` of the folder it runs in.
            if dir.join("ansible.cfg").is_file() {
                files::hash(&mut hasher, dir, Path::new("ansible.cfg"))?;
            }
            let folder = Path::new(playbook).parent().unwrap_or(Path::new(""));
            for path in playbook_neighbours(dir, folder)? {
                hash_below(&mut hasher, dir, &path)?;
            }
            let host = serde_json::json!({ "vars": machine.vars, "ips": machine.ips });
            part(&mut hasher, host.to_string().as_bytes());
        }
    }
    for input in &provisioner.inputs {
        hash_below(&mut hasher, dir, Path::new(input))?;
    }
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}

/// The neighbours of a playbook in `folder` that exist, sorted.
fn playbook_neighbours(dir: &Path, folder: &Path) -> Result<Vec<std::path::PathBuf>, ReadError> {
    let mut found: Vec<std::path::PathBuf> = PLAYBOOK_NEIGHBOURS
        .iter()
        .map(|name| folder.join(name))
        .filter(|path| dir.join(path).exists())
        .collect();
    let listing = dir.join(folder);
    let entries = std::fs::read_dir(&listing).map_err(|error| ReadError {
        path: listing.clone(),
        error,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let yaml = Path::new(&name)
            .extension()
            .is_some_and(|ext| ext == "yml" || ext == "yaml");
        if yaml && entry.path().is_file() {
            found.push(folder.join(name));
        }
    }
    found.sort();
    Ok(found)
}

fn part(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update(bytes);
    hasher.update([0]);
}

fn hash_below(hasher: &mut Sha256, dir: &Path, path: &Path) -> Result<(), ReadError> {
    for file in files::below(dir, path)? {
        files::hash(hasher, dir, &file)?;
    }
    Ok(())
}

/// A shell provisioner's script as it goes to the guest: its path there
/// (numbered by its place in the list) and its bytes.
pub fn guest_script(
    topology: &Topology,
    index: usize,
    script: &Script,
) -> Result<(String, Vec<u8>), ReadError> {
    match script {
        Script::File(path) => {
            let full = topology.dir().join(path);
            let bytes = std::fs::read(&full).map_err(|error| ReadError { path: full, error })?;
            // As Vagrant does: a script saved with Windows line ends runs.
            let bytes = without_carriage_returns(bytes);
            let name = Path::new(path)
                .file_name()
                .map_or_else(|| "script".into(), |name| name.to_string_lossy());
            Ok((format!("{GUEST_DIR}/{}-{name}", index + 1), bytes))
        }
        Script::Inline(text) => Ok((
            format!("{GUEST_DIR}/{}-inline.sh", index + 1),
            text.as_bytes().to_vec(),
        )),
    }
}

/// `bytes` with each CRLF made LF.
fn without_carriage_returns(bytes: Vec<u8>) -> Vec<u8> {
    if !bytes.windows(2).any(|pair| pair == b"\r\n") {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len());
    for (at, byte) in bytes.iter().enumerate() {
        if *byte == b'\r' && bytes.get(at + 1) == Some(&b'\n') {
            continue;
        }
        out.push(*byte);
    }
    out
}

/// The command that runs the copied script `path` as root, from root's
/// home, with `env` set and `args` given, stderr into stdout. A script
/// without `#!` runs under the login shell, as with Vagrant.
pub fn shell_command(
    path: &str,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
) -> String {
    let mut command = String::from("cd ~ && exec 2>&1 && ");
    for (name, value) in env {
        command.push_str(&format!("{name}={} ", shell_quote(value)));
    }
    command.push_str(&shell_quote(path));
    for arg in args {
        command.push(' ');
        command.push_str(&shell_quote(arg));
    }
    command
}

/// The arguments of `ansible-playbook` running `playbook` (relative to the
/// topology, where it runs) against `machine` alone of `inventory`.
pub fn ansible_args(machine: &str, playbook: &str, inventory: &Path) -> Vec<OsString> {
    vec![
        "-i".into(),
        inventory.into(),
        "--limit".into(),
        machine.into(),
        playbook.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn shell(path: &str, args: &[&str]) -> Provisioner {
        Provisioner {
            run: ProvisionRun::Shell {
                script: Script::File(path.into()),
                args: args.iter().map(|a| a.to_string()).collect(),
                env: BTreeMap::new(),
            },
            inputs: Vec::new(),
        }
    }

    fn topology_in(dir: &Path, provision: Vec<Provisioner>) -> Topology {
        let text = "name = \"t\"\n[machines.a]\n";
        let mut topology =
            crate::topology::parse(&dir.join("t.toml"), text, &Default::default()).expect("parse");
        topology.machines[0].provision = provision;
        topology
    }

    #[test]
    fn a_script_run_twice_gets_a_second_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = topology_in(
            dir.path(),
            vec![
                shell("a.sh", &[]),
                shell("b.sh", &[]),
                shell("a.sh", &["x"]),
            ],
        );
        assert_eq!(
            keys(&topology.machines[0]),
            ["shell a.sh", "shell b.sh", "shell a.sh #2"]
        );
    }

    #[test]
    fn the_hash_follows_the_script_its_args_and_the_playbooks_neighbours() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.sh"), "echo one\n").expect("write");
        std::fs::write(dir.path().join("site.yml"), "- hosts: all\n").expect("write");
        std::fs::create_dir(dir.path().join("templates")).expect("mkdir");
        std::fs::write(dir.path().join("templates/motd.j2"), "hi\n").expect("write");
        let playbook = Provisioner {
            run: ProvisionRun::Ansible {
                playbook: "site.yml".into(),
            },
            inputs: Vec::new(),
        };
        let topology = topology_in(
            dir.path(),
            vec![shell("a.sh", &[]), shell("a.sh", &["x"]), playbook],
        );
        let machine = &topology.machines[0];
        let hashes = |topology: &Topology| -> Vec<String> {
            machine
                .provision
                .iter()
                .map(|p| hash(topology, machine, p).expect("hash"))
                .collect()
        };
        let before = hashes(&topology);
        assert_ne!(before[0], before[1], "args are part of the hash");
        std::fs::write(dir.path().join("templates/motd.j2"), "hello\n").expect("write");
        let after = hashes(&topology);
        assert_eq!(before[..2], after[..2]);
        assert_ne!(before[2], after[2], "a template changed");
        std::fs::write(dir.path().join("a.sh"), "echo two\n").expect("write");
        assert_ne!(hashes(&topology)[0], after[0], "the script changed");
    }

    #[test]
    fn the_shell_command_quotes_what_it_is_given() {
        let env = BTreeMap::from([("GREETING".to_string(), "it's here".to_string())]);
        assert_eq!(
            shell_command("/var/lib/testbed/provision/1-a.sh", &["a b".into()], &env),
            "cd ~ && exec 2>&1 && GREETING='it'\\''s here' '/var/lib/testbed/provision/1-a.sh' 'a b'"
        );
    }
}
