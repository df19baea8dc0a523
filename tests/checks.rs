//! Checks against real servers this test runs on loopback: a TCP line
//! server, a hand-rolled HTTP server, a server that never answers, and local
//! `sh -c` for command checks, reached through [`Loopback`], a [`Transport`]
//! that connects directly instead of over SSH.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::check::{
    self, BoxedStream, CheckSpec, CommandOutput, CommandProbe, HttpProbe, Report, TcpProbe,
    Transport,
};
use testbed::model::{Machine, Network, ProviderKind, Topology};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------
// The loopback transport
// ---------------------------------------------------------------------------

/// Connects with `TcpStream::connect((host, port))` and runs commands with
/// the local `sh -c`, recording what it was asked to do.
#[derive(Default)]
struct Loopback {
    /// (via, host, port) of every `open_tcp`.
    opened: Mutex<Vec<(String, String, u16)>>,
    /// The machine of every `exec`.
    executed_on: Mutex<Vec<String>>,
    /// The machine of every `evidence`.
    evidence_for: Mutex<Vec<String>>,
}

impl Loopback {
    fn opened(&self) -> Vec<(String, String, u16)> {
        self.opened.lock().expect("lock").clone()
    }
}

impl Transport for Loopback {
    fn open_tcp(
        &self,
        via: &str,
        host: &str,
        port: u16,
    ) -> impl Future<Output = io::Result<BoxedStream>> + Send {
        self.opened
            .lock()
            .expect("lock")
            .push((via.into(), host.into(), port));
        let host = host.to_string();
        async move {
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::new(stream) as BoxedStream)
        }
    }

    fn exec(
        &self,
        machine: &str,
        command: &str,
    ) -> impl Future<Output = io::Result<CommandOutput>> + Send {
        self.executed_on.lock().expect("lock").push(machine.into());
        let mut child = tokio::process::Command::new("sh");
        child.arg("-c").arg(command).kill_on_drop(true);
        async move {
            let output = child.output().await?;
            Ok(CommandOutput {
                status: output.status.code().unwrap_or(-1),
                stdout: output.stdout,
                stderr: output.stderr,
            })
        }
    }

    fn evidence(&self, machine: &str) -> impl Future<Output = String> + Send {
        self.evidence_for.lock().expect("lock").push(machine.into());
        let text = format!(
            "--- journal of zookeeper on {machine}:\nstarted\n--- console of {machine}:\nlogin:"
        );
        async move { text }
    }
}

// ---------------------------------------------------------------------------
// Servers on loopback
// ---------------------------------------------------------------------------

const STAT_REPLY: &str = "Zookeeper version: 3.8.0\nMode: standalone\nNode count: 5\n";

/// A port nothing listens on (bound, then released).
async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A ZooKeeper-like line server on `addr`: reads one line, answers `stat`
/// and `ruok` (anything else: "unknown"), then closes.
async fn line_server_on(addr: &str) -> u16 {
    let listener = TcpListener::bind(addr).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(serve_lines(listener));
    port
}

async fn line_server() -> u16 {
    line_server_on("127.0.0.1:0").await
}

async fn serve_lines(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.as_str() {
                "stat\n" => STAT_REPLY,
                "ruok\n" => "imok",
                _ => "unknown command\n",
            };
            let _ = stream.get_mut().write_all(reply.as_bytes()).await;
        });
    }
}

/// Accepts connections and never answers (holds them open).
async fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    port
}

const STATS_JSON: &str =
    r#"{"activated_slaves": 1.0, "leader": "master@127.0.0.1:5050", "flags": {"quorum": "1"}}"#;

/// A tiny HTTP/1.1 server: `GET /master/stats.json` answers JSON with an
/// `X-Seen-Host` header echoing the request's Host; anything else is 404.
async fn http_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_http(stream));
        }
    });
    port
}

async fn serve_http(mut stream: TcpStream) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let host = head
        .lines()
        .find_map(|line| line.strip_prefix("host: ").or(line.strip_prefix("Host: ")))
        .unwrap_or("")
        .to_string();
    let (status, content_type, body) = match path {
        "/master/stats.json" => ("200 OK", "application/json", STATS_JSON),
        _ => ("404 Not Found", "text/plain", "not found"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Seen-Host: {host}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// The request head, up to the blank line.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(head).ok()
}

// ---------------------------------------------------------------------------
// Topologies and specs
// ---------------------------------------------------------------------------

fn machine(name: &str, ips: &[(&str, Ipv4Addr)]) -> Machine {
    Machine {
        name: name.into(),
        provider: ProviderKind::Qemu,
        image: "debian-12".into(),
        cpus: 1,
        memory_mib: 768,
        ips: ips.iter().map(|(net, ip)| (net.to_string(), *ip)).collect(),
        forwards: Vec::new(),
        daemons: vec!["zookeeper".into()],
        vars: BTreeMap::new(),
        depends_on: Vec::new(),
        packages: vec![],
        artifacts: vec![],
        internet: false,
        host: None,
        provision: Vec::new(),
    }
}

fn topology(machines: Vec<Machine>) -> Topology {
    let networks = [("lan", "192.168.33.0/24"), ("mgmt", "10.1.0.0/24")]
        .into_iter()
        .map(|(name, subnet)| {
            let network = Network {
                name: name.into(),
                subnet: subnet.parse().expect("subnet"),
            };
            (name.to_string(), network)
        })
        .collect();
    Topology {
        name: "checks".into(),
        path: PathBuf::from("/nonexistent/checks.toml"),
        networks,
        machines,
        checks: Vec::new(),
        build: None,
        steps: vec![],
        libvirt_uri: None,
        hosts: Default::default(),
    }
}

/// One machine, `zk`, on the lan: checks without `from` go to 127.0.0.1.
fn single() -> Topology {
    topology(vec![machine(
        "zk",
        &[("lan", Ipv4Addr::new(192, 168, 33, 2))],
    )])
}

fn spec(name: &str) -> CheckSpec {
    CheckSpec {
        name: name.into(),
        machine: "zk".into(),
        from: None,
        tcp: None,
        http: None,
        command: None,
        retry: Some("100ms".into()),
        timeout: Some("3s".into()),
    }
}

fn tcp(name: &str, port: u16, send: Option<&str>, expect: Option<&str>) -> CheckSpec {
    CheckSpec {
        tcp: Some(TcpProbe {
            port,
            send: send.map(Into::into),
            expect: expect.map(Into::into),
        }),
        ..spec(name)
    }
}

fn http(port: u16, path: &str) -> HttpProbe {
    HttpProbe {
        port,
        path: path.into(),
        status: None,
        headers: BTreeMap::new(),
        body: None,
        json: BTreeMap::new(),
    }
}

fn http_check(name: &str, probe: HttpProbe) -> CheckSpec {
    CheckSpec {
        http: Some(probe),
        ..spec(name)
    }
}

fn command(run: &str) -> CommandProbe {
    CommandProbe {
        run: run.into(),
        exit: None,
        stdout: None,
        json: BTreeMap::new(),
    }
}

fn command_check(name: &str, probe: CommandProbe) -> CheckSpec {
    CheckSpec {
        command: Some(probe),
        ..spec(name)
    }
}

fn pointers(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(pointer, value)| (pointer.to_string(), value.clone()))
        .collect()
}

async fn run(spec: &CheckSpec) -> check::CheckResult {
    check::run_one(spec, &single(), &Loopback::default()).await
}

// ---------------------------------------------------------------------------
// tcp
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tcp_passes_with_substring_and_regex() {
    let port = line_server().await;
    for expect in ["Mode: standalone", "/Mode: (standalone|leader)/"] {
        let result = run(&tcp("stat", port, Some("stat"), Some(expect))).await;
        assert!(result.passed, "{expect}: {result:?}");
        assert_eq!(result.attempts, 1);
        assert_eq!(result.kind, "tcp");
        assert!(result.detail.contains("matched"), "{}", result.detail);
        assert_eq!(result.evidence, None);
    }
}

#[tokio::test]
async fn tcp_without_expect_passes_on_connect() {
    let port = line_server().await;
    let result = run(&tcp("open", port, None, None)).await;
    assert!(result.passed, "{result:?}");
    assert!(result.detail.contains("connected"), "{}", result.detail);
}

#[tokio::test]
async fn tcp_regex_that_does_not_match_fails_showing_the_reply() {
    let port = line_server().await;
    let mut spec = tcp(
        "leader",
        port,
        Some("stat"),
        Some("/Mode: (leader|follower)/"),
    );
    spec.timeout = Some("600ms".into());
    spec.retry = Some("200ms".into());
    let result = run(&spec).await;
    assert!(!result.passed);
    assert!(result.attempts >= 2, "{result:?}");
    assert!(
        result.detail.contains("expected /Mode: (leader|follower)/"),
        "{}",
        result.detail
    );
    assert!(
        result.detail.contains("Mode: standalone"),
        "{}",
        result.detail
    );
    let evidence = result.evidence.expect("evidence on failure");
    assert!(
        evidence.contains("journal of zookeeper on zk"),
        "{evidence}"
    );
}

#[tokio::test]
async fn refused_port_fails_within_the_timeout() {
    let port = free_port().await;
    let mut spec = tcp("refused", port, Some("ruok"), Some("imok"));
    spec.timeout = Some("1s".into());
    spec.retry = Some("200ms".into());
    let started = Instant::now();
    let result = run(&spec).await;
    let elapsed = started.elapsed();
    assert!(!result.passed);
    assert!(result.detail.contains("refused"), "{}", result.detail);
    assert!(result.attempts >= 3, "{result:?}");
    assert!(elapsed < Duration::from_millis(1300), "{elapsed:?}");
}

#[tokio::test]
async fn server_that_never_answers_times_out_on_time() {
    let port = silent_server().await;
    let mut tcp_spec = tcp("silent tcp", port, Some("ruok"), Some("imok"));
    tcp_spec.timeout = Some("1s".into());
    let mut http_spec = http_check("silent http", http(port, "/"));
    http_spec.timeout = Some("1s".into());
    let started = Instant::now();
    let (tcp_result, http_result) = tokio::join!(run(&tcp_spec), run(&http_spec));
    let elapsed = started.elapsed();
    for result in [tcp_result, http_result] {
        assert!(!result.passed);
        assert!(
            result.detail.contains("no reply within 1s"),
            "{}",
            result.detail
        );
        assert!(result.duration >= Duration::from_millis(950), "{result:?}");
        assert!(result.evidence.is_some());
    }
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn check_passes_on_a_later_attempt() {
    let port = free_port().await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        line_server_on(&format!("127.0.0.1:{port}")).await;
    });
    let mut spec = tcp("late", port, Some("ruok"), Some("imok"));
    spec.retry = Some("200ms".into());
    spec.timeout = Some("5s".into());
    let result = run(&spec).await;
    assert!(result.passed, "{result:?}");
    assert!(result.attempts > 1, "{result:?}");
    assert!(result.duration >= Duration::from_millis(900), "{result:?}");
    assert!(result.duration < Duration::from_secs(2), "{result:?}");
    assert_eq!(result.evidence, None);
}

// ---------------------------------------------------------------------------
// http
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_status_headers_body_and_json_pass() {
    let port = http_server().await;
    let mut probe = http(port, "/master/stats.json");
    probe.status = Some(200);
    probe.headers = [
        ("Content-Type", "application/json"),
        ("x-seen-host", r"/^127\.0\.0\.1:\d+$/"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    probe.body = Some(r#"/"leader":\s*"master@/"#.into());
    // 1 in the topology equals 1.0 in the response.
    probe.json = pointers(&[
        ("/activated_slaves", serde_json::json!(1)),
        ("/flags/quorum", serde_json::json!("1")),
    ]);
    let result = run(&http_check("stats", probe)).await;
    assert!(result.passed, "{result:?}");
    assert_eq!(result.kind, "http");
    assert_eq!(result.detail, "status 200");
}

#[tokio::test]
async fn http_default_status_is_2xx() {
    let port = http_server().await;
    let mut spec = http_check("missing", http(port, "/nope"));
    spec.timeout = Some("300ms".into());
    let result = run(&spec).await;
    assert!(!result.passed);
    assert!(
        result.detail.contains("expected status 2xx, got 404"),
        "{}",
        result.detail
    );
    assert!(result.detail.contains("not found"), "{}", result.detail);
}

#[tokio::test]
async fn http_wrong_json_value_names_pointer_expected_and_got() {
    let port = http_server().await;
    let mut probe = http(port, "/master/stats.json");
    probe.json = pointers(&[("/activated_slaves", serde_json::json!(2))]);
    let mut spec = http_check("slaves", probe);
    spec.timeout = Some("300ms".into());
    let result = run(&spec).await;
    assert!(!result.passed);
    assert_eq!(result.detail, "expected /activated_slaves = 2, got 1.0");

    let mut probe = http(port, "/master/stats.json");
    probe.json = pointers(&[("/frameworks/0", serde_json::json!("x"))]);
    let mut spec = http_check("absent", probe);
    spec.timeout = Some("300ms".into());
    let result = run(&spec).await;
    assert!(!result.passed);
    assert!(
        result.detail.contains("expected /frameworks/0 = \"x\"")
            && result.detail.contains("has no /frameworks/0"),
        "{}",
        result.detail
    );
}

#[tokio::test]
async fn http_header_mismatch_shows_the_value() {
    let port = http_server().await;
    let mut probe = http(port, "/master/stats.json");
    probe.headers = BTreeMap::from([("content-type".to_string(), "text/html".to_string())]);
    let mut spec = http_check("ct", probe);
    spec.timeout = Some("300ms".into());
    let result = run(&spec).await;
    assert!(!result.passed);
    assert!(
        result.detail.contains("content-type")
            && result.detail.contains("\"text/html\"")
            && result.detail.contains("application/json"),
        "{}",
        result.detail
    );
}

// ---------------------------------------------------------------------------
// command
// ---------------------------------------------------------------------------

#[tokio::test]
async fn command_exit_stdout_and_json_pass() {
    let mut probe = command(r#"printf '{"zk": {"mode": "leader", "znodes": 5}}'"#);
    probe.stdout = Some(r#"/"mode":\s*"(leader|follower)"/"#.into());
    probe.json = pointers(&[
        ("/zk/mode", serde_json::json!("leader")),
        ("/zk/znodes", serde_json::json!(5.0)),
    ]);
    let result = run(&command_check("json", probe)).await;
    assert!(result.passed, "{result:?}");
    assert_eq!(result.kind, "command");
    assert_eq!(result.detail, "exit status 0");

    let mut probe = command("exit 3");
    probe.exit = Some(3);
    let result = run(&command_check("exit 3", probe)).await;
    assert!(result.passed, "{result:?}");
}

#[tokio::test]
async fn command_failures_say_what_they_got() {
    let mut cases = Vec::new();
    cases.push((
        command("echo starting; echo 'no such node /brokers' >&2; exit 1"),
        "expected exit status 0, got 1; stderr: \"no such node /brokers\"",
    ));
    let mut probe = command("echo Mode: follower");
    probe.stdout = Some("Mode: leader".into());
    cases.push((
        probe,
        "expected stdout \"Mode: leader\", got \"Mode: follower\\n\"",
    ));
    let mut probe = command(r#"echo '{"count": 0}'"#);
    probe.json = pointers(&[("/count", serde_json::json!(1))]);
    cases.push((probe, "expected /count = 1, got 0"));
    let mut probe = command("echo hello");
    probe.json = pointers(&[("/count", serde_json::json!(1))]);
    cases.push((probe, "stdout is not JSON"));

    for (probe, want) in cases {
        let mut spec = command_check("case", probe);
        spec.timeout = Some("200ms".into());
        let result = run(&spec).await;
        assert!(!result.passed, "{result:?}");
        assert!(result.detail.contains(want), "{} !~ {want}", result.detail);
        assert!(result.evidence.is_some());
    }
}

// ---------------------------------------------------------------------------
// from: routing
// ---------------------------------------------------------------------------

#[test]
fn route_picks_loopback_or_a_shared_network() {
    let topology = topology(vec![
        machine(
            "a",
            &[
                ("lan", Ipv4Addr::new(192, 168, 33, 2)),
                ("mgmt", Ipv4Addr::new(10, 1, 0, 2)),
            ],
        ),
        machine("b", &[("lan", Ipv4Addr::new(192, 168, 33, 3))]),
        machine("c", &[("mgmt", Ipv4Addr::new(10, 1, 0, 4))]),
        machine("d", &[("other", Ipv4Addr::new(172, 16, 0, 5))]),
    ]);
    let with = |machine: &str, from: Option<&str>| CheckSpec {
        machine: machine.into(),
        from: from.map(Into::into),
        ..tcp("r", 1, None, None)
    };
    let route = |spec: CheckSpec| check::route(&spec, &topology);
    assert_eq!(route(with("a", None)), Ok(("a".into(), "127.0.0.1".into())));
    assert_eq!(
        route(with("a", Some("a"))),
        Ok(("a".into(), "127.0.0.1".into()))
    );
    assert_eq!(
        route(with("a", Some("b"))),
        Ok(("b".into(), "192.168.33.2".into()))
    );
    assert_eq!(
        route(with("a", Some("c"))),
        Ok(("c".into(), "10.1.0.2".into()))
    );
    let no_network = route(with("a", Some("d")))
        .expect_err("no shared network")
        .to_string();
    assert!(no_network.contains("share no network"), "{no_network}");
    let unknown = route(with("a", Some("zz")))
        .expect_err("unknown from")
        .to_string();
    assert!(unknown.contains("zz"), "{unknown}");
    let unknown = route(with("zz", None))
        .expect_err("unknown machine")
        .to_string();
    assert!(unknown.contains("zz"), "{unknown}");
}

/// `from` end to end: the target's "private" address is 127.0.0.2, so the
/// connection opened via the other machine really reaches the server.
#[tokio::test]
async fn check_from_another_machine_connects_there() {
    let port = line_server_on("127.0.0.2:0").await;
    let topology = topology(vec![
        machine("srv", &[("lan", Ipv4Addr::new(127, 0, 0, 2))]),
        machine("cli", &[("lan", Ipv4Addr::new(127, 0, 0, 3))]),
    ]);
    let transport = Loopback::default();
    let mut spec = tcp("ruok from cli", port, Some("ruok"), Some("imok"));
    spec.machine = "srv".into();
    spec.from = Some("cli".into());
    let result = check::run_one(&spec, &topology, &transport).await;
    assert!(result.passed, "{result:?}");
    assert_eq!(result.from.as_deref(), Some("cli"));
    assert_eq!(
        transport.opened(),
        vec![("cli".to_string(), "127.0.0.2".to_string(), port)]
    );

    let mut spec = command_check("cmd from cli", command("true"));
    spec.machine = "srv".into();
    spec.from = Some("cli".into());
    let result = check::run_one(&spec, &topology, &transport).await;
    assert!(result.passed, "{result:?}");
    assert_eq!(*transport.executed_on.lock().expect("lock"), vec!["cli"]);
}

// ---------------------------------------------------------------------------
// run_all and the report
// ---------------------------------------------------------------------------

#[tokio::test]
async fn run_all_runs_checks_concurrently_in_order() {
    let specs: Vec<CheckSpec> = ["1", "0.8", "0.6"]
        .into_iter()
        .map(|secs| command_check(&format!("sleep {secs}"), command(&format!("sleep {secs}"))))
        .collect();
    let started = Instant::now();
    let report = check::run_all(&specs, &single(), Arc::new(Loopback::default())).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(report.passed(), "{report:?}");
    let names: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["sleep 1", "sleep 0.8", "sleep 0.6"]);
}

/// One pass and one failure: the report's three renderings.
async fn mixed_report(transport: Arc<Loopback>) -> Report {
    let port = line_server().await;
    let refused = free_port().await;
    let mut failing = tcp("zk ruok", refused, Some("ruok"), Some("imok"));
    failing.timeout = Some("300ms".into());
    let specs = [
        tcp("zk stat", port, Some("stat"), Some("Mode: standalone")),
        failing,
    ];
    check::run_all(&specs, &single(), transport).await
}

#[tokio::test]
async fn evidence_is_gathered_only_for_failures() {
    let transport = Arc::new(Loopback::default());
    let report = mixed_report(transport.clone()).await;
    assert_eq!(report.results[0].evidence, None);
    assert!(report.results[1].evidence.is_some());
    assert_eq!(*transport.evidence_for.lock().expect("lock"), vec!["zk"]);
}

#[tokio::test]
async fn report_table_is_aligned_with_evidence_under_failures() {
    let report = mixed_report(Arc::new(Loopback::default())).await;
    assert!(!report.passed());
    let table = report.table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PASS  zk stat "), "{table}");
    assert!(lines[1].starts_with("FAIL  zk ruok "), "{table}");
    assert!(lines[1].contains("refused"), "{table}");
    // The machine and duration columns line up.
    assert_eq!(lines[0].find(" zk "), lines[1].find(" zk "), "{table}");
    let seconds = |line: &str| line.find("s  ").expect("duration column");
    assert_eq!(seconds(lines[0]), seconds(lines[1]), "{table}");
    assert!(
        lines[2].starts_with("      --- journal of zookeeper on zk"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("      --- console of zk")),
        "{table}"
    );
    assert_eq!(
        lines.last(),
        Some(&"2 checks: 1 passed, 1 failed"),
        "{table}"
    );
    assert!(table.ends_with('\n'));
}

#[tokio::test]
async fn report_json_and_junit() {
    let report = mixed_report(Arc::new(Loopback::default())).await;
    let json = report.json();
    assert_eq!(json["passed"], false);
    let checks = json["checks"].as_array().expect("checks array");
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0]["name"], "zk stat");
    assert_eq!(checks[0]["passed"], true);
    assert_eq!(checks[0]["kind"], "tcp");
    assert_eq!(checks[0]["machine"], "zk");
    assert_eq!(checks[0]["evidence"], serde_json::Value::Null);
    assert!(checks[0]["duration_ms"].is_u64());
    assert_eq!(checks[0]["attempts"], 1);
    assert_eq!(checks[1]["passed"], false);
    assert!(checks[1]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("refused")));
    assert!(checks[1]["evidence"]
        .as_str()
        .is_some_and(|e| e.contains("console of zk")));

    let junit = report.junit("checks");
    assert!(junit.starts_with("<?xml"), "{junit}");
    assert!(
        junit.contains(r#"<testsuite name="checks" tests="2""#),
        "{junit}"
    );
    assert!(junit.contains(r#"failures="1""#), "{junit}");
    assert!(
        junit.contains(r#"<testcase name="zk stat" classname="zk""#),
        "{junit}"
    );
    assert!(junit.contains("<failure message="), "{junit}");
    assert!(junit.contains("connection refused"), "{junit}");
    assert!(junit.contains("console of zk"), "{junit}");
}

// ---------------------------------------------------------------------------
// validate
// ---------------------------------------------------------------------------

#[test]
fn validate_accepts_good_specs_and_explains_bad_ones() {
    assert_eq!(
        check::validate(&tcp("ok", 2181, Some("stat"), Some("/Mode: \\w+/"))),
        Ok(())
    );

    let none = spec("none");
    let mut two = tcp("two", 2181, None, None);
    two.command = Some(command("true"));
    let mut bad_duration = tcp("d", 2181, None, None);
    bad_duration.timeout = Some("soon".into());
    let mut zero_retry = tcp("z", 2181, None, None);
    zero_retry.retry = Some("0s".into());
    let bad_regex = tcp("re", 2181, None, Some("/Mode: (/"));
    let mut probe = http(80, "/");
    probe.json = pointers(&[("activated_slaves", serde_json::json!(1))]);
    let bad_pointer = http_check("p", probe);
    let bad_path = http_check("path", http(80, "stats.json"));
    let cases = [
        (bad_path, "is not a request path"),
        (none, "one of `tcp`, `http` or `command`"),
        (two, "exactly one"),
        (bad_duration, "`timeout` = \"soon\" is not a duration"),
        (zero_retry, "`retry` must be more than 0"),
        (bad_regex, "not a valid regex"),
        (bad_pointer, "\"/activated_slaves\""),
    ];
    for (spec, want) in cases {
        let error = check::validate(&spec).expect_err(want).to_string();
        assert!(error.contains(want), "{error} !~ {want}");
        assert!(!error.contains('\n'), "one line: {error}");
    }
}

#[tokio::test]
async fn invalid_spec_fails_without_attempting() {
    let transport = Loopback::default();
    let result = check::run_one(&spec("none"), &single(), &transport).await;
    assert!(!result.passed);
    assert_eq!(result.attempts, 0);
    assert_eq!(result.evidence, None);
    assert!(transport.opened().is_empty());
}
