//! The testbed's lock and its state file, through the binary and with no VM:
//! a command that changes the testbed holds the lock, and a second one fails
//! at once naming it (or waits with `--wait`) while the read-only verbs go
//! on; a corrupt state says how to recover and `destroy -f` still works; a
//! state from a newer testbed is refused and left byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::Bed;

/// A host build that holds the testbed's lock for as long as `hold` exists.
const SLOW_BUILD: &str = r#"
name = "locked"
[machines.node]
[build]
machine = "host"
inputs = ["src"]
run = """
while [ -e hold ]; do sleep 0.1; done
mkdir -p dist && echo done > dist/out
"""
outputs = ["dist/out"]
[[checks]]
name = "node answers"
machine = "node"
command = { run = "true" }
"#;

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until the lock file names `pid` as its holder.
fn wait_for_holder(bed: &Bed, pid: u32) {
    let lock = bed.path().join(".testbed/lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .starts_with(&format!("{pid}\n"))
    {
        assert!(Instant::now() < deadline, "pid {pid} never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_command_fails_at_once_naming_the_holder_and_waits_with_wait() {
    let bed = Bed::new(SLOW_BUILD);
    std::fs::create_dir(bed.path().join("src")).expect("src");
    std::fs::write(bed.path().join("hold"), "").expect("hold");
    let mut build = bed
        .command(&["build", "-f", "topology.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start build");
    wait_for_holder(&bed, build.id());

    for verb in [&["up"][..], &["verify"], &["halt"], &["destroy", "-f"]] {
        let started = Instant::now();
        let refused = bed.testbed(verb);
        assert!(!refused.status.success(), "{verb:?} ran beside a build");
        let message = stderr(&refused);
        let holder = format!(
            "locked by pid {} (`testbed build -f topology.toml`, since ",
            build.id()
        );
        assert!(message.contains(&holder), "{verb:?}: {message}");
        assert!(message.contains("--wait"), "{verb:?}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{verb:?} waited instead of failing at once"
        );
    }
    bed.ok(&["status"]);
    bed.ok(&["plan"]);
    // Nothing is up, so there is no config to print, but not for the lock.
    let config = stderr(&bed.testbed(&["ssh-config"]));
    assert!(config.contains("run `testbed up` first"), "{config}");

    let mut waiter = bed
        .command(&["--wait", "destroy", "-f"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start destroy --wait");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        waiter.try_wait().expect("poll").is_none(),
        "destroy --wait did not wait for the build"
    );
    std::fs::remove_file(bed.path().join("hold")).expect("release the build");
    assert!(
        build.wait().expect("build").success(),
        "the build itself fails"
    );
    let waited = waiter.wait_with_output().expect("destroy --wait");
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert!(
        stderr(&waited).contains(&format!("locked by pid {}", build.id())),
        "{}",
        stderr(&waited)
    );
    assert!(
        !bed.path().join(".testbed").exists(),
        "destroy removed the state"
    );
}

const ONE_MACHINE: &str = "name = \"state\"\n[machines.node]\n";

fn write_state(bed: &Bed, text: &[u8]) -> std::path::PathBuf {
    let state = bed.path().join(".testbed");
    std::fs::create_dir_all(state.join("machines/node")).expect("state");
    std::fs::write(state.join("state.json"), text).expect("state.json");
    state.join("state.json")
}

#[test]
fn a_truncated_state_says_how_to_recover_and_destroy_still_works() {
    let bed = Bed::new(ONE_MACHINE);
    let path = write_state(
        &bed,
        br#"{"topology": "topology.toml", "machines": {"node": {"prov"#,
    );
    let status = bed.testbed(&["status"]);
    assert!(!status.status.success());
    let message = stderr(&status);
    assert!(message.contains("state.json is corrupt"), "{message}");
    assert!(
        message.contains("`testbed destroy -f` still removes"),
        "{message}"
    );
    let up = bed.testbed(&["up"]);
    assert!(!up.status.success());
    assert!(stderr(&up).contains("is corrupt"), "{}", stderr(&up));
    bed.ok(&["destroy", "-f"]);
    assert!(!path.exists());
}

#[test]
fn a_state_from_a_newer_testbed_is_refused_and_never_rewritten() {
    let bed = Bed::new(ONE_MACHINE);
    let newer = br#"{"version": 7, "topology": "topology.toml", "machines": {}, "fleet": {}}"#;
    let path = write_state(&bed, newer);
    for verb in [&["status"][..], &["up"], &["destroy", "-f"]] {
        let refused = bed.testbed(verb);
        assert!(!refused.status.success(), "{verb:?} took a newer state");
        let message = stderr(&refused);
        assert!(
            message.contains("written by a newer testbed (state version 7"),
            "{verb:?}: {message}"
        );
    }
    assert_eq!(
        std::fs::read(&path).expect("state"),
        newer,
        "left as it was"
    );
}

/// A host build whose script leaves a grandchild running in the
/// background, as real build tools do.
const HANGING_BUILD: &str = r#"
name = "interrupted"
[machines.node]
[build]
machine = "host"
inputs = ["src"]
run = """
sleep 31337 &
echo started > started
wait
"""
outputs = ["dist/out"]
"#;

#[test]
fn ctrl_c_stops_a_host_build_and_all_it_started_then_exits_130() {
    let bed = Bed::new(HANGING_BUILD);
    std::fs::create_dir(bed.path().join("src")).expect("src");
    let build = bed
        .command(&["build", "-f", "topology.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start build");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bed.path().join("started").exists() {
        assert!(Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!common::processes_mentioning("sleep 31337").is_empty());
    let pid = nix::unistd::Pid::from_raw(build.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let ended = build.wait_with_output().expect("build");
    assert_eq!(ended.status.code(), Some(130), "{}", stderr(&ended));
    let message = stderr(&ended);
    assert!(
        message.contains("interrupted by SIGINT: `testbed build` stopped"),
        "{message}"
    );
    assert!(
        message.contains("`testbed up` continues from here"),
        "{message}"
    );
    gone("sleep 31337", "testbed was interrupted");
    assert!(!bed.path().join("dist/out").exists());
    // The lock went with the process: the next command runs at once.
    bed.ok(&["status"]);
    bed.ok(&["destroy", "-f"]);
}

/// The `.build-*` folders of the image cache at `cache`.
fn build_folders(cache: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(cache.join("images"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(".build-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts `testbed image build debian-12` into `cache` and returns once its
/// mmdebstrap runs.
fn image_build_under_way(bed: &Bed, cache: &std::path::Path) -> std::process::Child {
    let cache_dir = cache.to_string_lossy().into_owned();
    let before = build_folders(cache);
    let build = bed
        .command(&["image", "build", "debian-12"])
        .env("TESTBED_CACHE", cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start image build");
    let deadline = Instant::now() + Duration::from_secs(60);
    while build_folders(cache).iter().all(|f| before.contains(f))
        || !common::processes_mentioning("mmdebstrap")
            .iter()
            .any(|p| p.contains(&cache_dir))
    {
        assert!(Instant::now() < deadline, "mmdebstrap never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    build
}

/// Waits until no process's command line mentions `needle`.
fn gone(needle: &str, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::processes_mentioning(needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "still running after {after}: {:?}",
            common::processes_mentioning(needle)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_image_build_killed_or_interrupted_stops_mmdebstrap_and_keeps_nothing_half_made() {
    let bed = Bed::new(ONE_MACHINE);
    let cache = tempfile::tempdir().expect("cache");

    // kill -9: testbed has no say; its tools end at their next line of
    // output (the pipe to testbed is gone).
    let mut killed = image_build_under_way(&bed, cache.path());
    killed.kill().expect("SIGKILL");
    let _ = killed.wait();
    gone(&cache.path().to_string_lossy(), "testbed was killed");
    let stale = build_folders(cache.path());
    assert!(
        !stale.is_empty(),
        "a killed testbed cannot remove its build folder"
    );

    // Ctrl-C on the next build, which first sweeps what the killed one left.
    let build = image_build_under_way(&bed, cache.path());
    assert!(
        build_folders(cache.path())
            .iter()
            .all(|f| !stale.contains(f)),
        "the killed build's folder was kept: {stale:?}"
    );
    let pid = nix::unistd::Pid::from_raw(build.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let ended = build.wait_with_output().expect("image build");
    assert_eq!(ended.status.code(), Some(130), "{}", stderr(&ended));
    assert!(
        stderr(&ended).contains("interrupted by SIGINT: `testbed image build` stopped"),
        "{}",
        stderr(&ended)
    );
    gone(&cache.path().to_string_lossy(), "the interrupt");
    assert_eq!(build_folders(cache.path()), Vec::<String>::new());
    let list = bed
        .command(&["image", "list", "--json"])
        .env("TESTBED_CACHE", cache.path())
        .output()
        .expect("list");
    let listed: serde_json::Value =
        serde_json::from_slice(&list.stdout).expect("image list --json");
    assert_eq!(listed["cached"], serde_json::json!([]), "{listed}");
}

#[test]
fn a_cache_on_a_small_disk_refuses_the_build_up_front_and_stays_usable() {
    let bed = Bed::new(ONE_MACHINE);
    let cache = tempfile::tempdir().expect("cache");
    let binary = assert_cmd::cargo::cargo_bin("testbed");
    // A 64 MiB tmpfs as the cache, in a mount namespace of the test's own
    // (a user namespace too, so it needs no root).
    let script = r#"mount -t tmpfs -o size=64m tmpfs "$1" || exit 99
"$2" image build debian-12; echo "build status $?"
ls -A "$1/images"; echo "listing:"; "$2" image list --json"#;
    let output = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(cache.path())
        .arg(&binary)
        .current_dir(bed.path())
        .env("TESTBED_CACHE", cache.path())
        .env("TESTBED_IMAGES", common::repo().join("images"))
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let message = stderr(&output);
    assert!(stdout.contains("build status 1"), "{stdout}\n{message}");
    assert!(
        message.contains("image debian-12 needs at least 2048 MiB free in ")
            && message.contains("which has 6"),
        "{message}"
    );
    assert!(message.contains("TESTBED_CACHE"), "{message}");
    let (left, listing) = stdout.split_once("listing:").expect("the listing ran");
    assert!(!left.contains(".build-"), "a build folder was left: {left}");
    let listed: serde_json::Value = serde_json::from_str(listing).expect("image list --json");
    assert_eq!(listed["cached"], serde_json::json!([]), "{listed}");
}

#[test]
fn a_host_build_past_its_timeout_is_stopped_with_all_it_started() {
    let topology = HANGING_BUILD.replace("[build]\n", "[build]\ntimeout = \"1s\"\n");
    let bed = Bed::new(&topology.replace("31337", "31343"));
    std::fs::create_dir(bed.path().join("src")).expect("src");
    let started = Instant::now();
    let build = bed.testbed(&["build", "-f", "topology.toml"]);
    assert!(!build.status.success());
    let message = stderr(&build);
    assert!(
        message.contains("build on host did not finish within 1s and was stopped"),
        "{message}"
    );
    assert!(message.contains("raise `timeout` in [build]"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    gone("sleep 31343", "the build's timeout");
}
