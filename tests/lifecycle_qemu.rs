//! End to end on real VMs (qemu, TCG here), each boot shared by as many
//! assertions as it can serve, since boots cost seconds under emulation:
//! five machines come up at once on two cores (more guests than cores),
//! each reaching every other on the private network; then the plan walked
//! through each situation `up` meets (`plan --json` beside `up --json`);
//! (the test kit kills sshd under the provisioning connection, which goes
//! on over a new one); then Ctrl-C on a remote step, which stops it in the guest too; then, on a
//! fresh pair, an `up` interrupted while the VMs boot, and the lifecycle —
//! up (continuing), private network, ssh, halt, resume, converged up,
//! destroy. The lifecycle runs on libvirt too, in
//! `lifecycle_libvirt.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{scenarios, Bed};
use serde_json::Value;

#[test]
fn five_at_once_then_plan_says_what_up_does_then_the_lifecycle_leaves_nothing_behind() {
    let bed = Bed::new(&walk_topology("hi", false));
    write_hello_kit(&bed);
    plan_walk(&bed);
    bed.ok(&["destroy", "-f"]);
    std::fs::write(bed.path().join("topology.toml"), scenarios::pair("qemu")).expect("pair");
    ctrl_c_during_boot_leaves_a_true_status(&bed);
    a_dead_switch_is_seen_and_up_reconnects_the_machines(&bed);
    scenarios::two_machines_live_halt_resume_and_leave_nothing_behind(&bed);
}

/// Machines besides `alpha` and `beta`, idle: with them five guests boot at
/// once on two cores. The last one has `internet = true`.
const IDLE: [(&str, &str); 3] = [
    ("gamma", "192.168.33.4"),
    ("delta", "192.168.33.5"),
    ("epsilon", "192.168.33.6"),
];

/// Every machine of the walk with its private address.
fn all_machines() -> Vec<(&'static str, &'static str)> {
    let mut all = vec![("alpha", "192.168.33.2"), ("beta", "192.168.33.3")];
    all.extend(IDLE);
    all
}

/// Each machine knows its name and reaches every other's sshd on the
/// private network.
fn every_machine_reaches_every_other(bed: &Bed) {
    let all = all_machines();
    for (machine, _) in &all {
        assert_eq!(&ssh(bed, machine, "hostname"), machine);
        let others: Vec<String> = all
            .iter()
            .filter(|(other, _)| other != machine)
            .map(|(_, ip)| format!("nc -z -w 5 {ip} 22"))
            .collect();
        bed.ok(&["ssh", machine, "--", &others.join(" && ")]);
    }
}

/// Sends SIGINT to a running `testbed` and returns its output, which must
/// say it was interrupted and end with status 130.
fn interrupt(child: std::process::Child) -> std::process::Output {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let ended = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&ended.stderr).into_owned();
    assert_eq!(ended.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    ended
}

fn spawn(bed: &Bed, args: &[&str]) -> std::process::Child {
    bed.command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start testbed")
}

/// A step past its `timeout` fails, saying so, and its command is stopped
/// in the guest.
fn a_hung_step_is_stopped_at_its_timeout(bed: &Bed) {
    let hung = bed.testbed(&["run", "hung"]);
    let stderr = String::from_utf8_lossy(&hung.stderr).into_owned();
    assert!(!hung.status.success(), "{stderr}");
    assert!(
        stderr.contains("step `hung` did not finish on alpha within 3s and was stopped"),
        "{stderr}"
    );
    let left = bed.testbed(&["ssh", "alpha", "--", "pgrep -f 'sleep 3133[9]'"]);
    assert!(!left.status.success(), "the hung step still runs on alpha");
}

/// Ctrl-C on `testbed run` stops the step's command in the guest too.
fn ctrl_c_stops_a_remote_step(bed: &Bed) {
    let step = spawn(bed, &["run", "sleeper"]);
    let running = || {
        bed.testbed(&["ssh", "alpha", "--", "pgrep -f 'sleep 3133[8]'"])
            .status
            .success()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running() {
        assert!(Instant::now() < deadline, "the step never started on alpha");
        std::thread::sleep(Duration::from_millis(200));
    }
    interrupt(step);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(
            Instant::now() < deadline,
            "the step's command outlived the interrupt"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Ctrl-C during `up` while machines boot: exit 130, and `status` agrees
/// with the VM processes that exist. The `up` after it continues.
fn ctrl_c_during_boot_leaves_a_true_status(bed: &Bed) {
    let up = spawn(bed, &["up", "topology.toml"]);
    let machines = bed.path().join(".testbed/machines");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !["alpha", "beta"]
        .iter()
        .any(|m| machines.join(m).join("qemu.pid").exists())
    {
        assert!(Instant::now() < deadline, "no VM started within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = interrupt(up);
    let stderr = String::from_utf8_lossy(&ended.stderr).into_owned();
    assert!(stderr.contains("machines now: alpha "), "{stderr}");
    status_agrees_with_the_vms(bed);
}

/// As many machines are `running` as VM processes run in the bed.
fn status_agrees_with_the_vms(bed: &Bed) {
    let dir = bed.path().to_string_lossy().into_owned();
    let vms = common::processes_mentioning(&dir)
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .count();
    let running = bed.states().iter().filter(|(_, s)| s == "running").count();
    assert_eq!(running, vms, "status agrees with the VMs that run");
}

/// Runs `up` and kills it with SIGKILL as soon as a progress line on its
/// stderr contains `moment`.
fn kill_up_when(bed: &Bed, moment: &str) {
    use std::io::BufRead;
    let mut up = bed
        .command(&["up", "topology.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start up");
    let stderr = up.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains(moment) {
            up.kill().expect("SIGKILL up");
            let _ = up.wait();
            return;
        }
        seen.push(line);
    }
    let _ = up.wait();
    panic!("`up` ended before `{moment}`:\n{}", seen.join("\n"));
}

/// The network's switch killed under the running pair: `status` says the
/// network is down, and `up` restarts it and reboots both machines onto it,
/// after which they reach each other again.
fn a_dead_switch_is_seen_and_up_reconnects_the_machines(bed: &Bed) {
    bed.ok(&["up", "topology.toml"]);
    let pid_file = bed.path().join(".testbed/networks/lan/switch.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("switch.pid")
        .trim()
        .parse()
        .expect("pid");
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the switch");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = bed.ok(&["status"]);
        if status.contains("network lan is down") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "status never saw the switch die:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.contains("alpha, beta cannot reach each other"),
        "{status}"
    );
    let cut = bed.testbed(&["ssh", "alpha", "--", "nc -z -w 3 192.168.33.3 22"]);
    assert!(
        !cut.status.success(),
        "alpha still reaches beta without a switch"
    );
    let plan = bed.ok(&["plan", "topology.toml", "--json"]);
    let json: Value = serde_json::from_str(&plan).expect("plan --json");
    for machine in json["machines"].as_array().expect("machines") {
        assert_eq!(machine["action"], "start", "{machine}");
        assert!(
            machine["why"]
                .as_str()
                .is_some_and(|why| why.contains("lost its switch")),
            "{machine}"
        );
    }
    // kill -9 while the rebooted machines get their identity: `status`
    // still agrees with the VMs, and the next `up` finishes the job.
    kill_up_when(bed, "applying identity");
    status_agrees_with_the_vms(bed);
    bed.ok(&["up", "topology.toml"]);
    assert!(!bed.ok(&["status"]).contains("is down"));
    bed.ok(&["ssh", "alpha", "--", "nc -z -w 5 192.168.33.3 22"]);
}

/// A service on the host's loopback is out of a guest's reach through
/// qemu's 10.0.2.2 (`restrict=on`), unless the machine says `internet = true`.
fn only_the_machine_with_internet_reaches_the_host(bed: &Bed) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
    let port = listener.local_addr().expect("addr").port();
    let probe = format!("nc -z -w 3 10.0.2.2 {port}");
    let restricted = bed.testbed(&["ssh", "alpha", "--", &probe]);
    assert!(
        !restricted.status.success(),
        "alpha reached the host's 127.0.0.1:{port} without `internet = true`"
    );
    bed.ok(&["ssh", "epsilon", "--", &probe]);
}

/// The five machines, `alpha` running the test kit `hello` with
/// `greeting`, and `beta` too when `beta_hello`.
fn walk_topology(greeting: &str, beta_hello: bool) -> String {
    let beta_daemons = if beta_hello {
        "daemons = [\"hello\"]\nvars = { greeting = \"bye\" }\n"
    } else {
        ""
    };
    format!(
        r#"name = "e2e-pair"
[defaults]
provider = "qemu"
memory = "768MiB"
[networks.lan]
subnet = "192.168.33.0/24"
[machines.alpha]
ip = "192.168.33.2"
daemons = ["hello"]
vars = {{ greeting = "{greeting}" }}
[machines.beta]
ip = "192.168.33.3"
{beta_daemons}{idle}
[[steps]]
name = "sleeper"
machine = "alpha"
run = "sleep 31338"
[[steps]]
name = "hung"
machine = "alpha"
run = "sleep 31339"
timeout = "3s"
"#,
        idle = IDLE
            .iter()
            .map(|(name, ip)| format!("[machines.{name}]\nip = \"{ip}\"\n"))
            .collect::<String>()
            + "internet = true\n"
    )
}

/// A kit of the topology's own folder: a unit of its own that idles, and a
/// file rendered from the machine's `greeting`.
fn write_hello_kit(bed: &Bed) {
    let kit = bed.path().join("daemons/hello");
    std::fs::create_dir_all(&kit).expect("kit dir");
    let files = [
        (
            "daemon.toml",
            r#"description = "an idle daemon for the end-to-end tests"
packages = []
service = "hello"
unit = "hello.service.tera"
[[files]]
template = "greeting.tera"
dest = "/etc/hello/greeting"
[readiness]
command = { run = "systemctl is-active --quiet hello" }
retry = "200ms"
timeout = "60s"
"#,
        ),
        ("greeting.tera", "{{ vars.greeting }}\n"),
        (
            "hello.service.tera",
            // Once per boot its start kills every sshd (the listener and the
            // session `up` is starting it through): provisioning must go on
            // over a new connection.
            "[Unit]\nDescription=testbed e2e idle daemon\n[Service]\n\
             ExecStartPre=/bin/sh -c 'test -e /run/hello-cut-ssh || \
             { touch /run/hello-cut-ssh; pkill -KILL -f \"^sshd: \"; }'\n\
             ExecStart=/bin/sh -c 'while :; do sleep 3600; done'\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(kit.join(name), text).expect("kit file");
    }
}

/// (machine, action, [(daemon, action)]) of a `plan --json` or `up --json`.
type Actions = Vec<(String, String, Vec<(String, String)>)>;

fn actions(json: &Value) -> Actions {
    let word = |v: &Value| v.as_str().unwrap_or("?").to_string();
    json["machines"]
        .as_array()
        .unwrap_or_else(|| panic!("no machines in {json}"))
        .iter()
        .map(|machine| {
            let daemons = machine["daemons"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| (word(&d["name"]), word(&d["action"])))
                .collect();
            (word(&machine["name"]), word(&machine["action"]), daemons)
        })
        .collect()
}

/// A machine's expected action and its daemons' actions.
type Expected<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn expect(spec: &[Expected<'_>]) -> Actions {
    spec.iter()
        .map(|(machine, action, daemons)| {
            let daemons = daemons
                .iter()
                .map(|(d, a)| (d.to_string(), a.to_string()))
                .collect();
            (machine.to_string(), action.to_string(), daemons)
        })
        .collect()
}

/// `plan --json` must say `wanted` (for alpha and beta, then the idle
/// machines doing `idle_action`), then `up --json` must do exactly that.
fn plan_then_up(bed: &Bed, situation: &str, wanted: Actions) {
    let mut wanted = wanted;
    let idle_action = if situation == "fresh" {
        "create"
    } else {
        "nothing"
    };
    wanted.extend(
        IDLE.iter()
            .map(|(name, _)| (name.to_string(), idle_action.to_string(), Vec::new())),
    );
    let plan: Value = serde_json::from_str(&bed.ok(&["plan", "--json", "topology.toml"]))
        .unwrap_or_else(|e| panic!("{situation}: plan --json: {e}"));
    assert_eq!(actions(&plan), wanted, "{situation}: the plan: {plan:#}");
    let up: Value = serde_json::from_str(&bed.ok(&["up", "--json", "topology.toml"]))
        .unwrap_or_else(|e| panic!("{situation}: up --json: {e}"));
    assert_eq!(actions(&up), wanted, "{situation}: what up did: {up:#}");
}

fn ssh(bed: &Bed, machine: &str, command: &str) -> String {
    bed.ok(&["ssh", machine, "--", command]).trim().to_string()
}

fn plan_walk(bed: &Bed) {
    let topology = bed.path().join("topology.toml");
    plan_then_up(
        bed,
        "fresh",
        expect(&[
            ("alpha", "create", &[("hello", "start")]),
            ("beta", "create", &[]),
        ]),
    );
    assert_eq!(ssh(bed, "alpha", "cat /etc/hello/greeting"), "hi");
    // hello's start killed sshd under `up`, which carried on.
    bed.ok(&["ssh", "alpha", "--", "test -e /run/hello-cut-ssh"]);
    every_machine_reaches_every_other(bed);
    only_the_machine_with_internet_reaches_the_host(bed);

    let converged = expect(&[
        ("alpha", "nothing", &[("hello", "nothing")]),
        ("beta", "nothing", &[]),
    ]);
    plan_then_up(bed, "converged", converged.clone());
    ctrl_c_stops_a_remote_step(bed);
    a_hung_step_is_stopped_at_its_timeout(bed);

    bed.ok(&["halt", "beta"]);
    plan_then_up(
        bed,
        "beta halted",
        expect(&[
            ("alpha", "nothing", &[("hello", "nothing")]),
            ("beta", "start", &[]),
        ]),
    );

    kill_vm(bed, "alpha");
    plan_then_up(
        bed,
        "alpha's VM killed",
        expect(&[
            ("alpha", "start", &[("hello", "start")]),
            ("beta", "nothing", &[]),
        ]),
    );
    assert_eq!(ssh(bed, "alpha", "systemctl is-active hello"), "active");

    std::fs::write(&topology, walk_topology("hello", false)).expect("rewrite");
    // kill -9 while alpha's new files are pushed: nothing is recorded as
    // applied, so the plan below still restarts hello.
    kill_up_when(bed, "alpha: pushing hello files");
    status_agrees_with_the_vms(bed);
    plan_then_up(
        bed,
        "a kit variable changed on alpha",
        expect(&[
            ("alpha", "provision", &[("hello", "restart")]),
            ("beta", "nothing", &[]),
        ]),
    );
    assert_eq!(ssh(bed, "alpha", "cat /etc/hello/greeting"), "hello");

    std::fs::write(&topology, walk_topology("hello", true)).expect("rewrite");
    plan_then_up(
        bed,
        "a daemon added to beta",
        expect(&[
            ("alpha", "nothing", &[("hello", "nothing")]),
            ("beta", "provision", &[("hello", "start")]),
        ]),
    );
    assert_eq!(ssh(bed, "beta", "systemctl is-active hello"), "active");
    assert_eq!(ssh(bed, "beta", "cat /etc/hello/greeting"), "bye");

    let without_alpha_hello = walk_topology("hello", true).replace(
        "daemons = [\"hello\"]\nvars = { greeting = \"hello\" }\n",
        "",
    );
    std::fs::write(&topology, without_alpha_hello).expect("rewrite");
    plan_then_up(
        bed,
        "a daemon removed from alpha",
        expect(&[
            ("alpha", "provision", &[("hello", "stop")]),
            ("beta", "nothing", &[("hello", "nothing")]),
        ]),
    );
    let stopped = bed.testbed(&["ssh", "alpha", "--", "systemctl is-active hello"]);
    assert!(
        !stopped.status.success(),
        "hello still runs on alpha after `stop`: {}",
        String::from_utf8_lossy(&stopped.stdout)
    );
    plan_then_up(
        bed,
        "converged again",
        expect(&[
            ("alpha", "nothing", &[]),
            ("beta", "nothing", &[("hello", "nothing")]),
        ]),
    );
}

/// Kills the machine's qemu like a power failure and waits until `status`
/// says it crashed.
fn kill_vm(bed: &Bed, machine: &str) {
    let pid_file = bed
        .path()
        .join(format!(".testbed/machines/{machine}/qemu.pid"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let state = bed
            .states()
            .into_iter()
            .find(|(name, _)| name == machine)
            .map(|(_, state)| state);
        if state.as_deref() == Some("crashed") {
            let status = bed.ok(&["status"]);
            let said = format!("{machine} crashed (its VM is gone); last console lines (");
            assert!(status.contains(&said), "{status}");
            let json: Value = serde_json::from_str(&bed.ok(&["status", "--json"])).expect("json");
            let entry = json
                .as_array()
                .and_then(|all| all.iter().find(|m| m["name"] == machine))
                .expect("the machine in status --json");
            let lines = entry["console"]["lines"].as_array().expect("console lines");
            assert!(!lines.is_empty(), "{entry}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{machine} is not shown as crashed after its VM was killed");
}
