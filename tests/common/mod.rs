//! Shared by the end-to-end tests: a testbed in a temp dir, destroyed on
//! drop even when an assertion fails.
#![allow(dead_code)]

pub mod libvirtd;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Output;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Bed {
    dir: tempfile::TempDir,
    /// Run testbed inside this network namespace (a libvirtd's, or the
    /// runner's of libvirt hosts), with this libvirt URI if any (an
    /// installed testbed only).
    netns: Option<(String, Option<String>)>,
    /// Run testbed as a user runs it after installing it (see
    /// [`Bed::installed`]); `None`: from the checkout.
    installed: Option<Installed>,
    /// Whether `up` may use the green cache (see [`Bed::with_green_cache`]).
    green_cache: bool,
    /// Variables set for testbed besides its own (see [`Bed::with_env`]).
    env: Vec<(String, std::ffi::OsString)>,
    /// A folder searched before the system's on PATH (see
    /// [`Bed::with_path_first`]).
    path_first: Option<PathBuf>,
}

/// testbed as installed: the binary alone in a folder of its own, no
/// `TESTBED_*` variable, run as an ordinary user.
struct Installed {
    binary: PathBuf,
    /// Whom to run it as (`runuser`) when the tests run as root.
    user: Option<nix::unistd::User>,
}

/// The ordinary user end-to-end tests run testbed as when they run as root:
/// `$TESTBED_TEST_USER` (`.ci/run` creates one). Run as an ordinary user,
/// the tests use that user.
pub fn ordinary_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let name = std::env::var("TESTBED_TEST_USER").unwrap_or_else(|_| {
        panic!(
            "the tests run as root: set TESTBED_TEST_USER to an ordinary user with \
             subordinate ids (.ci/run makes one: useradd -m testbed-ci)"
        )
    });
    let user = nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("TESTBED_TEST_USER={name}: no such user"));
    assert!(!user.uid.is_root(), "TESTBED_TEST_USER={name} is root");
    Some(user)
}

impl Bed {
    /// A testbed whose topology file has `topology` as its text.
    pub fn new(topology: &str) -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("topology.toml"), topology).expect("write topology");
        Bed {
            dir,
            netns: None,
            installed: None,
            green_cache: false,
            env: Vec::new(),
            path_first: None,
        }
    }

    /// An empty folder outside the checkout where testbed runs as a user
    /// runs it after `cargo install`: the binary copied alone into a
    /// folder of its own, no `TESTBED_*` variable, as an ordinary user
    /// ([`ordinary_user`]) whose own cache holds the images.
    pub fn installed() -> Bed {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let user = ordinary_user();
        // The user must reach the binary and own the project folder.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let binary = bin.join("testbed");
        std::fs::copy(assert_cmd::cargo::cargo_bin("testbed"), &binary).expect("copy testbed");
        let project = dir.path().join("project");
        std::fs::create_dir(&project).expect("project");
        if let Some(user) = &user {
            nix::unistd::chown(&project, Some(user.uid), Some(user.gid)).expect("chown");
        }
        Bed {
            dir,
            netns: None,
            installed: Some(Installed { binary, user }),
            green_cache: true,
            env: Vec::new(),
            path_first: None,
        }
    }

    /// An installed testbed ([`Bed::installed`]) whose commands run inside
    /// `libvirtd`'s network namespace (where its guests' forwarded ports
    /// are) and talk to it, as the ordinary user the daemon's socket lets
    /// in. The images are built first, outside: the namespace has no route
    /// to the package mirror.
    pub fn with_libvirtd(topology: &str, libvirtd: &libvirtd::PrivateLibvirtd) -> Bed {
        Bed::in_netns(topology, &libvirtd.netns, Some(&libvirtd.uri))
    }

    /// [`Bed::with_libvirtd`] for a topology whose `[hosts]` are libvirt
    /// hosts on `runner`'s bridge: testbed runs in the runner's namespace.
    pub fn on_hosts(topology: &str, runner: &libvirtd::Runner) -> Bed {
        Bed::in_netns(topology, &runner.netns, None)
    }

    fn in_netns(topology: &str, netns: &str, uri: Option<&str>) -> Bed {
        let mut bed = Bed::installed();
        bed.green_cache = false;
        bed.write("topology.toml", topology);
        bed.ok(&["image", "build"]);
        bed.netns = Some((netns.to_owned(), uri.map(str::to_owned)));
        bed
    }

    /// The user testbed runs as, when the tests run as root.
    pub fn user(&self) -> Option<&nix::unistd::User> {
        self.installed.as_ref().and_then(|i| i.user.as_ref())
    }

    /// Writes `text` into the project folder's file `name`, owned by the
    /// user testbed runs as.
    pub fn write(&self, name: &str, text: &str) {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("write into the project");
        if let Some(user) = self.user() {
            nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).expect("chown");
        }
    }

    /// Copies the files of `from` (a folder of the checkout) into the
    /// project folder, modes kept, owned by the user testbed runs as.
    pub fn copy_in(&self, from: &Path) {
        copy_tree(from, &self.path(), self.user());
    }

    /// A bed from the checkout whose `up` saves to and restores from the
    /// green cache. The others save nothing there: each scenario is about
    /// boots, and saving every cluster would cost CI seconds and GiBs.
    pub fn with_green_cache(mut self) -> Bed {
        self.green_cache = true;
        self
    }

    /// A bed whose testbed runs with `name=value` in its environment.
    pub fn with_env(mut self, name: &str, value: impl Into<std::ffi::OsString>) -> Bed {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// A bed whose testbed finds the programs in `dir` before the
    /// system's (a stand-in for one it cannot have here).
    pub fn with_path_first(mut self, dir: PathBuf) -> Bed {
        self.path_first = Some(dir);
        self
    }

    /// The folder for the bed's own files (a fake's, say), readable by the
    /// user testbed runs as: beside the project, not in it.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The folder testbed runs in.
    pub fn path(&self) -> PathBuf {
        match &self.installed {
            Some(_) => self.dir.path().join("project"),
            None => self.dir.path().to_path_buf(),
        }
    }

    pub fn testbed(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run testbed")
    }

    /// The command `testbed ARGS` in this bed (not started).
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        if let Some(installed) = &self.installed {
            let mut command = installed.command(&self.path(), self.netns.as_ref(), args);
            if !self.green_cache {
                command.env("TESTBED_GREEN_CACHE_MAX", "0");
            }
            self.add_env(&mut command, SYSTEM_PATH);
            return command;
        }
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("testbed"));
        command
            .current_dir(self.path())
            .env("TESTBED_IMAGES", repo().join("images"))
            .env("TESTBED_DAEMONS", repo().join("daemons"))
            .args(args);
        if !self.green_cache {
            command.env("TESTBED_GREEN_CACHE_MAX", "0");
        }
        self.add_env(&mut command, &std::env::var("PATH").unwrap_or_default());
        command
    }

    /// The bed's variables, and its folder first on `path`.
    fn add_env(&self, command: &mut std::process::Command, path: &str) {
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        if let Some(first) = &self.path_first {
            command.env("PATH", format!("{}:{path}", first.display()));
        }
    }

    /// Runs `script` under bash in the project folder as the user testbed
    /// runs as, the installed `testbed` first on PATH (an installed bed only).
    pub fn user_shell(&self, script: &str) -> Output {
        let installed = self.installed.as_ref().expect("an installed bed");
        let bin = installed.binary.parent().expect("the binary's folder");
        let path = format!("{}:{SYSTEM_PATH}", bin.display());
        let mut command = installed.run_as_user(
            &self.path(),
            self.netns.as_ref(),
            std::ffi::OsStr::new("bash"),
            &path,
            &["-c", script],
        );
        self.add_env(&mut command, &path);
        command.output().expect("run bash")
    }

    /// Runs testbed and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.testbed(args);
        assert!(
            out.status.success(),
            "testbed {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (name, state) of every machine, from `status --json`.
    pub fn states(&self) -> Vec<(String, String)> {
        let json: serde_json::Value =
            serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json");
        json.as_array()
            .expect("array")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().expect("name").to_string(),
                    m["state"].as_str().expect("state").to_string(),
                )
            })
            .collect()
    }
}

fn copy_tree(from: &Path, to: &Path, owner: Option<&nix::unistd::User>) {
    let own = |path: &Path| {
        if let Some(user) = owner {
            nix::unistd::chown(path, Some(user.uid), Some(user.gid)).expect("chown");
        }
    };
    for entry in std::fs::read_dir(from).expect("read the folder").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            own(&target);
            copy_tree(&entry.path(), &target, owner);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            own(&target);
        }
    }
}

/// The PATH an installed testbed runs with.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

impl Installed {
    /// `netns`: the network namespace to run in, and the libvirt URI if any.
    fn command(
        &self,
        dir: &Path,
        netns: Option<&(String, Option<String>)>,
        args: &[&str],
    ) -> std::process::Command {
        self.run_as_user(dir, netns, self.binary.as_os_str(), SYSTEM_PATH, args)
    }

    /// `program ARGS` in `dir` as the user, with `path` as PATH.
    fn run_as_user(
        &self,
        dir: &Path,
        netns: Option<&(String, Option<String>)>,
        program: &std::ffi::OsStr,
        path: &str,
        args: &[&str],
    ) -> std::process::Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some((netns, _)) = netns {
            argv.extend(["ip", "netns", "exec", netns].map(Into::into));
        }
        if let Some(user) = &self.user {
            argv.extend(["runuser", "-u", &user.name, "--"].map(Into::into));
        }
        argv.push(program.to_owned());
        let mut command = std::process::Command::new(&argv[0]);
        command.args(&argv[1..]).env_clear();
        match &self.user {
            Some(user) => command.env("HOME", &user.dir).env("USER", &user.name),
            None => command.env("HOME", std::env::var_os("HOME").unwrap_or_default()),
        };
        if let Some((_, Some(uri))) = netns {
            command.env("TESTBED_LIBVIRT_URI", uri);
        }
        command.env("PATH", path).current_dir(dir).args(args);
        command
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.testbed(&["destroy", "-f"]);
    }
}

/// Processes whose command line mentions `needle` (our qemu and switches).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}
