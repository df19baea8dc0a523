//! The build step (`[build]`, the tutorial's devtools machine): a script
//! run on a builder — a machine of the topology, or the host — whose inputs
//! are hashed so that an unchanged build is skipped, and whose outputs are
//! collected into `dist/` beside the topology, from where kits and machines
//! push them as artifacts.
//!
//! On a machine, the inputs are copied (a tar over SSH) into [`BUILD_DIR`],
//! keeping their paths relative to the topology without any leading `../`
//! (`../examples/jobs/hello.c` arrives as `examples/jobs/hello.c`); the
//! script runs there with
//! `sh -eu` after `dist/` is emptied, so a stale output never passes for a
//! new one; then the outputs come back as a tar. On the host the script runs
//! in the topology's directory itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::files;
use crate::model::{Build, Builder, Topology, DIST};
use crate::ssh::{self, Session, SshError, Stream};

/// Where a machine builder works; inputs keep their relative paths below it.
pub const BUILD_DIR: &str = "/srv/testbed/build";
/// Lines of output shown when a build fails (the whole log is kept).
const TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("build input {}: {error}", path.display())]
    Input {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("build on {builder}: {source}")]
    Ssh { builder: String, source: SshError },
    #[error("build on {builder}: cannot start `sh`: {error}")]
    Start {
        builder: String,
        error: std::io::Error,
    },
    #[error(
        "build on {builder} failed ({status}); the last lines of its output:\n{tail}\n  \
         help: the whole output is in {}; run it again with `testbed build`",
        log.display()
    )]
    Failed {
        builder: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error(
        "build on {builder} succeeded but did not produce {missing}\n  help: the script must \
         leave every path of `outputs` in its working directory"
    )]
    MissingOutput { builder: String, missing: String },
    #[error(
        "build on {builder} did not finish within {} and was stopped (the `timeout` of \
         [build]); the last lines of its output:\n{tail}\n  help: the whole output is in {}; \
         if it needs longer, raise `timeout` in [build] (e.g. `timeout = \"4h\"`)",
        humantime::format_duration(*after),
        log.display()
    )]
    TimedOut {
        builder: String,
        after: Duration,
        tail: String,
        log: PathBuf,
    },
    #[error("writing {}: {error}", path.display())]
    Output {
        path: PathBuf,
        error: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, BuildError>;

/// What a build run did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum BuildOutcome {
    /// Inputs, script and outputs were as recorded: nothing ran.
    Skipped,
    Built {
        outputs: Vec<String>,
        seconds: f64,
    },
}

impl BuildOutcome {
    /// What happened, without the `build:` prefix (for a progress line).
    pub fn summary(&self) -> String {
        match self {
            BuildOutcome::Skipped => "inputs unchanged, skipped".to_string(),
            BuildOutcome::Built { outputs, seconds } => {
                format!("built {} in {seconds:.1} s", outputs.join(", "))
            }
        }
    }
}

impl std::fmt::Display for BuildOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "build: {}", self.summary())
    }
}

/// The builder's name in messages.
pub fn builder_name(build: &Build) -> &str {
    match &build.builder {
        Builder::Host => "host",
        Builder::Machine(name) => name,
    }
}

/// A hash of everything that decides the build's result: the builder, the
/// script, the declared outputs and every input file (path, mode, bytes).
pub fn inputs_hash(build: &Build, topology_dir: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    for part in [builder_name(build), build.run.as_str()] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    for output in &build.outputs {
        hasher.update(output.as_bytes());
        hasher.update([0]);
    }
    for input in &build.inputs {
        for file in files::below(topology_dir, Path::new(&input.path))? {
            files::hash(&mut hasher, topology_dir, &file)?;
        }
    }
    Ok(hex::encode(hasher.finalize())[..16].to_string())
}

/// Whether the recorded build is still good: same hash, outputs present.
pub fn is_current(build: &Build, topology_dir: &Path, recorded: Option<&str>) -> Result<bool> {
    let outputs_present = build
        .outputs
        .iter()
        .all(|output| topology_dir.join(output).is_file());
    Ok(outputs_present && recorded == Some(inputs_hash(build, topology_dir)?.as_str()))
}

/// Where input `input` lands in the build directory: its path without
/// leading `..` and `.` parts; `None` when it is absolute, climbs anywhere
/// else, or names nothing.
pub fn build_path(input: &str) -> Option<PathBuf> {
    use std::path::Component;
    let mut parts = Path::new(input)
        .components()
        .skip_while(|c| matches!(c, Component::ParentDir | Component::CurDir))
        .peekable();
    parts.peek()?;
    let mut path = PathBuf::new();
    for part in parts {
        match part {
            Component::Normal(name) => path.push(name),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!path.as_os_str().is_empty()).then_some(path)
}

fn ssh_error(builder: &str) -> impl FnOnce(SshError) -> BuildError + '_ {
    move |source| BuildError::Ssh {
        builder: builder.to_string(),
        source,
    }
}

impl From<files::ReadError> for BuildError {
    fn from(e: files::ReadError) -> BuildError {
        BuildError::Input {
            path: e.path,
            error: e.error,
        }
    }
}

fn input_error(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |error| BuildError::Input {
        path: path.to_path_buf(),
        error,
    }
}

/// The inputs as one tar archive, paths relative to the topology.
fn inputs_tar(build: &Build, topology_dir: &Path) -> Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    archive.follow_symlinks(true);
    for input in &build.inputs {
        let Some(landing) = build_path(&input.path) else {
            continue;
        };
        for file in files::below(topology_dir, Path::new(&input.path))? {
            let path = topology_dir.join(&file);
            let name = match file.strip_prefix(&input.path) {
                Ok(rest) if !rest.as_os_str().is_empty() => landing.join(rest),
                _ => landing.clone(),
            };
            archive
                .append_path_with_name(&path, &name)
                .map_err(input_error(&path))?;
        }
    }
    archive.into_inner().map_err(input_error(topology_dir))
}

/// Runs the build on the host, in the topology's directory.
pub async fn run_on_host(
    build: &Build,
    topology: &Topology,
    log: &Path,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<BuildOutcome> {
    let started = Instant::now();
    let dir = topology.dir();
    clear_outputs(build, dir)?;
    let start_error = |error| BuildError::Start {
        builder: "host".into(),
        error,
    };
    // stderr into stdout, as on a terminal: one stream, in order.
    let mut child = tokio::process::Command::new("sh")
        .arg("-euc")
        .arg(format!("exec 2>&1\n{}", build.run))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // A group of its own, so an interrupt stops the script and all it started.
        .process_group(0)
        .spawn()
        .map_err(start_error)?;
    let work = child.id().map(crate::process::work);
    let mut text = Vec::new();
    let stdout = child.stdout.take();
    let finished = tokio::time::timeout(build.timeout, async {
        if let Some(stdout) = stdout {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                on_line(&line);
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
            }
        }
        child.wait().await
    })
    .await;
    let Ok(status) = finished else {
        if let Some(work) = &work {
            work.stop();
        }
        let _ = child.wait().await;
        return Err(timed_out(build, "host", &text, log));
    };
    let status = status.map_err(start_error)?;
    write_log(log, &text)?;
    if !status.success() {
        clear_outputs(build, dir)?;
        let status = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => status.to_string(),
        };
        return Err(failed("host", status, &text, log));
    }
    check_outputs(build, dir, "host")?;
    Ok(built(build, started.elapsed()))
}

/// Runs the build on `builder` over `session`, then fetches the outputs.
pub async fn run_on_machine(
    build: &Build,
    topology: &Topology,
    session: &Session,
    log: &Path,
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<BuildOutcome> {
    let started = Instant::now();
    let builder = builder_name(build).to_string();
    let dir = ssh::shell_quote(BUILD_DIR);
    let tar_path = format!("{BUILD_DIR}.inputs.tar");
    on_line("copying inputs");
    // A clean folder each time: a deleted input must not linger there.
    let fresh = format!("rm -rf {dir} && mkdir -p {dir}");
    exec_ok(session, &builder, &fresh, log).await?;
    session
        .upload(&inputs_tar(build, topology.dir())?, &tar_path, 0o600)
        .await
        .map_err(ssh_error(&builder))?;
    let unpack = format!(
        "cd {dir} && tar xf {tar} && rm -f {tar}",
        tar = ssh::shell_quote(&tar_path)
    );
    exec_ok(session, &builder, &unpack, log).await?;
    on_line("running the build script");
    let script = format!("cd {dir} && sh -euc {}", ssh::shell_quote(&build.run));
    let mut text = Vec::new();
    let output = session
        .exec_streaming_within(&script, build.timeout, |_: Stream, bytes: &[u8]| {
            text.extend_from_slice(bytes);
            if let Some(line) = String::from_utf8_lossy(bytes).lines().last() {
                on_line(line);
            }
        })
        .await
        .map_err(ssh_error(&builder))?;
    let Some(output) = output else {
        return Err(timed_out(build, &builder, &text, log));
    };
    write_log(log, &text)?;
    if !output.success() {
        clear_outputs(build, topology.dir())?;
        let status = format!("exit status {}", output.exit_status);
        return Err(failed(&builder, status, &text, log));
    }
    on_line("collecting outputs");
    fetch_outputs(build, topology.dir(), session, &builder).await?;
    Ok(built(build, started.elapsed()))
}

async fn exec_ok(session: &Session, builder: &str, command: &str, log: &Path) -> Result<()> {
    let output = session.exec(command).await.map_err(ssh_error(builder))?;
    if output.success() {
        return Ok(());
    }
    let mut text = output.stdout.clone();
    text.extend_from_slice(&output.stderr);
    write_log(log, &text)?;
    Err(failed(
        builder,
        format!("`{command}`: exit status {}", output.exit_status),
        &text,
        log,
    ))
}

/// Copies the outputs from the builder into `dist/` beside the topology.
async fn fetch_outputs(
    build: &Build,
    topology_dir: &Path,
    session: &Session,
    builder: &str,
) -> Result<()> {
    let mut check = String::new();
    for output in &build.outputs {
        let quoted = ssh::shell_quote(output);
        check.push_str(&format!("[ -f {quoted} ] || echo {quoted}; "));
    }
    let dir = ssh::shell_quote(BUILD_DIR);
    let missing = session
        .exec(&format!("cd {dir} && {{ {check}}}"))
        .await
        .map_err(ssh_error(builder))?;
    if let Some(first) = missing.stdout_lossy().lines().next() {
        return Err(BuildError::MissingOutput {
            builder: builder.to_string(),
            missing: first.to_string(),
        });
    }
    let paths: Vec<String> = build.outputs.iter().map(|o| ssh::shell_quote(o)).collect();
    // -h: an output that is a symlink arrives as the file it points to.
    let archive = session
        .exec(&format!("cd {dir} && tar chf - {}", paths.join(" ")))
        .await
        .map_err(ssh_error(builder))?;
    if !archive.success() {
        return Err(BuildError::MissingOutput {
            builder: builder.to_string(),
            missing: format!(
                "its outputs (tar failed: {})",
                archive.stderr_lossy().trim()
            ),
        });
    }
    clear_outputs(build, topology_dir)?;
    unpack_files(&archive.stdout, topology_dir, &build.outputs)?;
    check_outputs(build, topology_dir, builder)
}

/// Unpacks into `dir` the files of `archive` that are declared outputs, each
/// at its declared path and nowhere else: a builder that sends any other
/// path (`.testbed/ssh_config`, say), or a link or device, is refused
/// before anything is written. Folder entries are skipped (each output's
/// folders are made here).
fn unpack_files(archive: &[u8], dir: &Path, outputs: &[String]) -> Result<()> {
    let output_error = |error| BuildError::Output {
        path: dir.join(DIST),
        error,
    };
    let declared: Vec<PathBuf> = outputs.iter().filter_map(|o| build_path(o)).collect();
    let refuse = |what: String| output_error(std::io::Error::other(what));
    let mut files = Vec::new();
    for entry in tar::Archive::new(archive).entries().map_err(output_error)? {
        let mut entry = entry.map_err(output_error)?;
        let path = entry.path().map_err(output_error)?;
        let Some(path) = build_path(&path.to_string_lossy()) else {
            return Err(refuse(format!("{} is outside the build", path.display())));
        };
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(refuse(format!("{} is not a regular file", path.display())));
        }
        if !declared.contains(&path) {
            return Err(refuse(format!(
                "the builder sent {}, which is not one of the build's outputs",
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(output_error)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
        files.push((path, bytes, mode));
    }
    for (path, bytes, mode) in files {
        let target = dir.join(&path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(output_error)?;
        }
        crate::state::write_atomic(&target, &bytes, mode)
            .map_err(|e| output_error(std::io::Error::other(e.to_string())))?;
    }
    Ok(())
}

/// Removes the declared outputs from `dist/`, so a failed build never
/// leaves an old or half-made artifact behind to be pushed.
fn clear_outputs(build: &Build, topology_dir: &Path) -> Result<()> {
    for output in &build.outputs {
        let path = topology_dir.join(output);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(BuildError::Output { path, error })
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_outputs(build: &Build, topology_dir: &Path, builder: &str) -> Result<()> {
    match build
        .outputs
        .iter()
        .find(|output| !topology_dir.join(output).is_file())
    {
        Some(missing) => Err(BuildError::MissingOutput {
            builder: builder.to_string(),
            missing: missing.clone(),
        }),
        None => Ok(()),
    }
}

fn write_log(log: &Path, text: &[u8]) -> Result<()> {
    std::fs::write(log, text).map_err(|error| BuildError::Output {
        path: log.to_path_buf(),
        error,
    })
}

fn failed(builder: &str, status: String, text: &[u8], log: &Path) -> BuildError {
    BuildError::Failed {
        builder: builder.to_string(),
        status,
        tail: tail_of(text),
        log: log.to_path_buf(),
    }
}

/// The last [`TAIL_LINES`] lines of a build's output, indented for a message.
fn tail_of(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..]
        .iter()
        .map(|line| format!("    | {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The error of a build stopped at its timeout, its output so far logged.
fn timed_out(build: &Build, builder: &str, text: &[u8], log: &Path) -> BuildError {
    let _ = write_log(log, text);
    BuildError::TimedOut {
        builder: builder.to_string(),
        after: build.timeout,
        tail: tail_of(text),
        log: log.to_path_buf(),
    }
}

fn built(build: &Build, elapsed: Duration) -> BuildOutcome {
    BuildOutcome::Built {
        outputs: build.outputs.clone(),
        seconds: elapsed.as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(inputs: &[&str]) -> Build {
        Build {
            builder: Builder::Host,
            run: "cc -o dist/hello hello.c".into(),
            inputs: inputs
                .iter()
                .map(|path| crate::model::Input {
                    path: path.to_string(),
                    line: 1,
                    col: 1,
                })
                .collect(),
            outputs: vec!["dist/hello".into()],
            timeout: crate::model::DEFAULT_BUILD_TIMEOUT,
        }
    }

    #[test]
    fn the_hash_follows_input_contents_not_timestamps() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("src")).expect("mkdir");
        std::fs::write(dir.path().join("src/hello.c"), "int main(){}").expect("write");
        let plan = build(&["src"]);
        let first = inputs_hash(&plan, dir.path()).expect("hash");
        std::fs::write(dir.path().join("src/hello.c"), "int main(){}").expect("rewrite");
        assert_eq!(first, inputs_hash(&plan, dir.path()).expect("hash"));
        std::fs::write(dir.path().join("src/hello.c"), "int main(){return 1;}").expect("edit");
        assert_ne!(first, inputs_hash(&plan, dir.path()).expect("hash"));
        std::fs::write(dir.path().join("src/extra.h"), "").expect("add");
        let with_extra = inputs_hash(&plan, dir.path()).expect("hash");
        assert_ne!(first, with_extra);
        let mut other_script = plan.clone();
        other_script.run.push_str(" -O2");
        assert_ne!(
            with_extra,
            inputs_hash(&other_script, dir.path()).expect("hash")
        );
    }

    #[test]
    fn a_build_is_current_only_with_its_outputs_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("hello.c"), "x").expect("write");
        let plan = build(&["hello.c"]);
        let hash = inputs_hash(&plan, dir.path()).expect("hash");
        assert!(!is_current(&plan, dir.path(), Some(&hash)).expect("current"));
        std::fs::create_dir(dir.path().join("dist")).expect("mkdir");
        std::fs::write(dir.path().join("dist/hello"), "bin").expect("write");
        assert!(is_current(&plan, dir.path(), Some(&hash)).expect("current"));
        assert!(!is_current(&plan, dir.path(), Some("other")).expect("current"));
        assert!(!is_current(&plan, dir.path(), None).expect("current"));
    }

    #[test]
    fn the_inputs_archive_keeps_relative_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("examples/jobs")).expect("mkdir");
        std::fs::write(dir.path().join("examples/jobs/hello.c"), "x").expect("write");
        let bytes = inputs_tar(&build(&["examples"]), dir.path()).expect("tar");
        assert_eq!(entry_names(&bytes), vec!["examples/jobs/hello.c"]);
        // From a topology one level down, `../examples` arrives as `examples`.
        std::fs::create_dir(dir.path().join("topologies")).expect("mkdir");
        let below = dir.path().join("topologies");
        let bytes = inputs_tar(&build(&["../examples/jobs/hello.c"]), &below).expect("tar");
        assert_eq!(entry_names(&bytes), vec!["examples/jobs/hello.c"]);
    }

    fn entry_names(bytes: &[u8]) -> Vec<String> {
        tar::Archive::new(bytes)
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn outputs_must_be_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut archive = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        archive
            .append_link(&mut header, "dist/hello", "/etc/shadow")
            .expect("link");
        let bytes = archive.into_inner().expect("tar");
        let outputs = ["dist/hello".to_string()];
        let error = unpack_files(&bytes, dir.path(), &outputs).expect_err("a link is refused");
        assert!(error.to_string().contains("not a regular file"), "{error}");
        assert!(!dir.path().join("dist/hello").exists());
    }

    /// A tar of regular files, as a builder's `tar chf -` sends them.
    fn archive_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut archive = tar::Builder::new(Vec::new());
        for (path, text) in files {
            // Written raw: the tar crate itself refuses to make `..` paths.
            let mut header = tar::Header::new_gnu();
            header.as_gnu_mut().expect("gnu").name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            archive.append(&header, text.as_bytes()).expect("append");
        }
        archive.into_inner().expect("tar")
    }

    #[test]
    fn a_builder_writes_its_declared_outputs_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outputs = ["dist/hello".to_string()];
        let hostile = archive_of(&[
            ("dist/hello", "ok"),
            (
                ".testbed/ssh_config",
                "Host *\n  ProxyCommand touch /tmp/owned\n",
            ),
        ]);
        let error = unpack_files(&hostile, dir.path(), &outputs).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains(".testbed/ssh_config, which is not one of"),
            "{error}"
        );
        assert!(!dir.path().join(".testbed").exists());
        assert!(
            !dir.path().join("dist/hello").exists(),
            "nothing is written when one entry is refused"
        );
        let climbing = archive_of(&[("dist/../../escaped", "x")]);
        assert!(unpack_files(&climbing, dir.path(), &outputs).is_err());
        assert!(!dir
            .path()
            .parent()
            .expect("parent")
            .join("escaped")
            .exists());

        let honest = archive_of(&[("./dist/hello", "ok")]);
        unpack_files(&honest, dir.path(), &outputs).expect("declared output");
        let written = std::fs::read_to_string(dir.path().join("dist/hello")).expect("read");
        assert_eq!(written, "ok");
    }

    #[test]
    fn the_testbed_state_and_dist_are_never_inputs() {
        let dir = tempfile::tempdir().expect("tempdir");
        for folder in [".testbed", "dist", "src"] {
            std::fs::create_dir(dir.path().join(folder)).expect("mkdir");
            std::fs::write(dir.path().join(folder).join("f"), folder).expect("write");
        }
        let files = files::below(dir.path(), Path::new("")).expect("walk");
        assert_eq!(files, vec![PathBuf::from("src/f")]);
    }

    #[test]
    fn build_paths_drop_leading_parents_only() {
        assert_eq!(
            build_path("../examples/a.c"),
            Some(PathBuf::from("examples/a.c"))
        );
        assert_eq!(build_path("./src"), Some(PathBuf::from("src")));
        assert_eq!(build_path("src/../x"), None);
        assert_eq!(build_path("/etc/passwd"), None);
        assert_eq!(build_path(".."), None);
        assert_eq!(build_path(""), None);
    }

    #[tokio::test]
    async fn a_failing_host_build_shows_its_tail_and_leaves_no_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("dist")).expect("mkdir");
        std::fs::write(dir.path().join("dist/hello"), "old").expect("write");
        let topology_file = dir.path().join("t.toml");
        let topology = Topology {
            name: "t".into(),
            path: topology_file,
            networks: Default::default(),
            machines: vec![],
            checks: vec![],
            build: None,
            steps: vec![],
            libvirt_uri: None,
            hosts: Default::default(),
        };
        let mut plan = build(&[]);
        plan.run = "echo compiling; echo 'hello.c:1: error: oops' >&2; exit 3".into();
        let log = dir.path().join("build.log");
        let seen = std::sync::Mutex::new(Vec::new());
        let on_line = |line: &str| {
            if let Ok(mut seen) = seen.lock() {
                seen.push(line.to_string());
            }
        };
        let error = run_on_host(&plan, &topology, &log, &on_line)
            .await
            .expect_err("fails");
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            ["compiling", "hello.c:1: error: oops"],
            "lines as they come"
        );
        let message = error.to_string();
        assert!(message.contains("hello.c:1: error: oops"), "{message}");
        assert!(message.contains("exit status 3"), "{message}");
        assert!(
            !dir.path().join("dist/hello").exists(),
            "old output removed"
        );

        plan.run = "mkdir -p dist && echo new > dist/hello".into();
        let outcome = run_on_host(&plan, &topology, &log, &|_| {})
            .await
            .expect("builds");
        assert!(matches!(outcome, BuildOutcome::Built { .. }));
        let built = std::fs::read_to_string(dir.path().join("dist/hello")).expect("output");
        assert_eq!(built, "new\n");
    }
}
