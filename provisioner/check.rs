//! Checks: the verification people used to type by hand (`echo stat | nc zk
//! 2181`, `curl master:5050/master/stats.json`), declared in the topology as
//! `[[checks]]` and in kits as readiness probes, run concurrently with retry
//! and timeout. tcp and http checks travel through SSH (direct-tcpip), so
//! they need no forwarded port and work on every provider.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::HeaderName;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use regex::Regex;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::model::Topology;

pub use crate::model::{CheckSpec, CommandProbe, HttpProbe, TcpProbe};

// ---------------------------------------------------------------------------
// Validation: a spec compiled into what an attempt runs
// ---------------------------------------------------------------------------

/// Interval between attempt starts when `retry` is not given.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// How long a check may take when `timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// A tcp reply is complete once the peer has been silent this long (or
/// closed, or sent [`MAX_REPLY`] bytes).
pub const READ_IDLE: Duration = Duration::from_secs(2);
/// Most bytes read from a tcp reply, an http body or kept of stdout.
pub const MAX_REPLY: usize = 1024 * 1024;
/// How long evidence may take to gather for one failed check.
const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest excerpt of a reply shown in a detail.
const EXCERPT_CHARS: usize = 200;

/// Why a check spec cannot run; each message is one line, which the
/// topology module places at the check's location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("a check needs one of `tcp`, `http` or `command`")]
    NoProbe,
    #[error("a check has exactly one of `tcp`, `http` or `command`, not several")]
    SeveralProbes,
    #[error("{probe}.port must be 1..=65535")]
    Port { probe: &'static str },
    #[error("http.path `{0}` is not a request path: it starts with '/', e.g. \"/status\"")]
    Path(String),
    #[error("http.status {0} is not an HTTP status (100..=999)")]
    Status(u16),
    #[error("http.headers: `{0}` is not a header name")]
    HeaderName(String),
    #[error("command.run is empty")]
    EmptyCommand,
    #[error("{field}: `{pointer}` is not a JSON pointer: it starts with '/', e.g. \"/{pointer}\"")]
    Pointer {
        field: &'static str,
        pointer: String,
    },
    #[error("`{field}` must be more than 0")]
    ZeroDuration { field: &'static str },
    #[error("`{field}` = \"{text}\" is not a duration ({reason}); e.g. \"500ms\", \"60s\"")]
    Duration {
        field: &'static str,
        text: String,
        reason: String,
    },
    #[error("{field}: `{text}` is not a valid regex: {reason}")]
    Regex {
        field: String,
        text: String,
        reason: String,
    },
}

/// Why a check cannot be routed between its machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no machine named `{0}`")]
    UnknownMachine(String),
    #[error("`from`: no machine named `{0}`")]
    UnknownFrom(String),
    #[error("`{from}` and `{target}` share no network, so `{from}` cannot reach `{target}`")]
    NoSharedNetwork { from: String, target: String },
}

/// Why a check did not start: its spec or its route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unstartable {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// Checks a spec beyond its shape: exactly one of tcp/http/command;
/// retry/timeout parse (humantime, e.g. "500ms", "60s"); `/regex/` matchers
/// compile; json pointers start with '/'.
pub fn validate(spec: &CheckSpec) -> Result<(), SpecError> {
    Plan::compile(spec).map(|_| ())
}

/// The probe kind a spec names: "tcp", "http" or "command" ("none" when it
/// names none, which [`validate`] rejects).
pub fn kind(spec: &CheckSpec) -> &'static str {
    if spec.tcp.is_some() {
        "tcp"
    } else if spec.http.is_some() {
        "http"
    } else if spec.command.is_some() {
        "command"
    } else {
        "none"
    }
}

/// A validated check: the probe with its matchers compiled, and its timing.
#[derive(Debug)]
struct Plan {
    probe: Probe,
    retry: Duration,
    timeout: Duration,
}

#[derive(Debug)]
enum Probe {
    Tcp(TcpPlan),
    Http(HttpPlan),
    Command(CommandPlan),
}

#[derive(Debug)]
struct TcpPlan {
    port: u16,
    send: Option<String>,
    expect: Option<Matcher>,
}

#[derive(Debug)]
struct HttpPlan {
    port: u16,
    path: String,
    status: Option<u16>,
    headers: Vec<(HeaderName, Matcher)>,
    body: Option<Matcher>,
    json: Vec<(String, Value)>,
}

#[derive(Debug)]
struct CommandPlan {
    run: String,
    exit: i32,
    stdout: Option<Matcher>,
    json: Vec<(String, Value)>,
}

impl Plan {
    fn compile(spec: &CheckSpec) -> Result<Plan, SpecError> {
        let probe = match (&spec.tcp, &spec.http, &spec.command) {
            (Some(tcp), None, None) => Probe::Tcp(compile_tcp(tcp)?),
            (None, Some(http), None) => Probe::Http(compile_http(http)?),
            (None, None, Some(command)) => Probe::Command(compile_command(command)?),
            (None, None, None) => return Err(SpecError::NoProbe),
            _ => return Err(SpecError::SeveralProbes),
        };
        Ok(Plan {
            probe,
            retry: parse_duration("retry", spec.retry.as_deref(), DEFAULT_RETRY)?,
            timeout: parse_duration("timeout", spec.timeout.as_deref(), DEFAULT_TIMEOUT)?,
        })
    }
}

fn compile_tcp(tcp: &TcpProbe) -> Result<TcpPlan, SpecError> {
    Ok(TcpPlan {
        port: check_port("tcp", tcp.port)?,
        send: tcp.send.as_deref().map(with_newline),
        expect: compile_matcher("tcp.expect", tcp.expect.as_deref())?,
    })
}

/// `send` as written to the socket: line-based protocols need the newline,
/// and people rarely write it.
fn with_newline(send: &str) -> String {
    if send.ends_with('\n') {
        send.to_string()
    } else {
        format!("{send}\n")
    }
}

fn compile_http(http: &HttpProbe) -> Result<HttpPlan, SpecError> {
    if !http.path.starts_with('/') || hyper::Uri::try_from(http.path.as_str()).is_err() {
        return Err(SpecError::Path(http.path.clone()));
    }
    if let Some(status) = http.status.filter(|s| !(100..=999).contains(s)) {
        return Err(SpecError::Status(status));
    }
    let headers = http
        .headers
        .iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SpecError::HeaderName(name.clone()))?;
            let matcher = Matcher::parse(&format!("http.headers.{name}"), value)?;
            Ok((header, matcher))
        })
        .collect::<Result<_, SpecError>>()?;
    Ok(HttpPlan {
        port: check_port("http", http.port)?,
        path: http.path.clone(),
        status: http.status,
        headers,
        body: compile_matcher("http.body", http.body.as_deref())?,
        json: compile_pointers("http.json", &http.json)?,
    })
}

fn compile_command(command: &CommandProbe) -> Result<CommandPlan, SpecError> {
    if command.run.trim().is_empty() {
        return Err(SpecError::EmptyCommand);
    }
    Ok(CommandPlan {
        run: command.run.clone(),
        exit: command.exit.unwrap_or(0),
        stdout: compile_matcher("command.stdout", command.stdout.as_deref())?,
        json: compile_pointers("command.json", &command.json)?,
    })
}

fn check_port(probe: &'static str, port: u16) -> Result<u16, SpecError> {
    if port == 0 {
        Err(SpecError::Port { probe })
    } else {
        Ok(port)
    }
}

fn compile_matcher(field: &str, text: Option<&str>) -> Result<Option<Matcher>, SpecError> {
    text.map(|text| Matcher::parse(field, text)).transpose()
}

fn compile_pointers(
    field: &'static str,
    pointers: &BTreeMap<String, Value>,
) -> Result<Vec<(String, Value)>, SpecError> {
    pointers
        .iter()
        .map(|(pointer, value)| {
            if pointer.starts_with('/') {
                Ok((pointer.clone(), value.clone()))
            } else {
                Err(SpecError::Pointer {
                    field,
                    pointer: pointer.clone(),
                })
            }
        })
        .collect()
}

/// A positive duration written for humantime, or `default` when absent.
fn parse_duration(
    field: &'static str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, SpecError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match humantime::parse_duration(text.trim()) {
        Ok(duration) if duration.is_zero() => Err(SpecError::ZeroDuration { field }),
        Ok(duration) => Ok(duration),
        Err(e) => Err(SpecError::Duration {
            field,
            text: text.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// An `expect`/`body`/`stdout`/header matcher: a substring, or a regex when
/// written `/like this/`.
#[derive(Debug, Clone)]
pub enum Matcher {
    Substring(String),
    Regex(Regex),
}

impl Matcher {
    /// Parses `text`; `field` names it in the error when the regex is bad.
    pub fn parse(field: &str, text: &str) -> Result<Matcher, SpecError> {
        match text.strip_prefix('/').and_then(|t| t.strip_suffix('/')) {
            Some(pattern) => {
                Regex::new(pattern)
                    .map(Matcher::Regex)
                    .map_err(|e| SpecError::Regex {
                        field: field.to_string(),
                        text: text.to_string(),
                        reason: first_line(&e.to_string()).to_string(),
                    })
            }
            None => Ok(Matcher::Substring(text.to_string())),
        }
    }

    pub fn is_match(&self, text: &str) -> bool {
        match self {
            Matcher::Substring(needle) => text.contains(needle.as_str()),
            Matcher::Regex(regex) => regex.is_match(text),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Substring(needle) => write!(f, "{needle:?}"),
            Matcher::Regex(regex) => write!(f, "/{}/", regex.as_str()),
        }
    }
}

/// The regex crate's errors span several lines with a caret diagram; the
/// topology error needs one.
fn first_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| line.starts_with("error:"))
        .or_else(|| text.lines().next())
        .unwrap_or(text)
}

// ---------------------------------------------------------------------------
// Transport: how checks reach machines
// ---------------------------------------------------------------------------

/// A byte stream a check talks over.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite + ?Sized> AsyncReadWrite for T {}

pub type BoxedStream = Box<dyn AsyncReadWrite + Unpin + Send>;

/// What a command check's command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How checks reach machines; production implements it over SSH, tests over
/// loopback.
pub trait Transport: Send + Sync + 'static {
    /// A TCP stream to host:port opened from machine `via` (SSH direct-tcpip
    /// in production).
    fn open_tcp(
        &self,
        via: &str,
        host: &str,
        port: u16,
    ) -> impl Future<Output = io::Result<BoxedStream>> + Send;
    /// Runs `command` with the guest's shell on `machine`.
    fn exec(
        &self,
        machine: &str,
        command: &str,
    ) -> impl Future<Output = io::Result<CommandOutput>> + Send;
    /// Evidence attached to a failed check of `machine`: journal tail of its
    /// daemons and console tail.
    fn evidence(&self, machine: &str) -> impl Future<Output = String> + Send;
}

/// Where a check connects from and to: `from` (default: the target) and the
/// target's address as seen from there: "127.0.0.1" when from == target,
/// else the target's IP on a network both machines are on (the first such
/// network by name).
pub fn route(spec: &CheckSpec, topology: &Topology) -> Result<(String, String), RouteError> {
    let target = topology
        .machine(&spec.machine)
        .ok_or_else(|| RouteError::UnknownMachine(spec.machine.clone()))?;
    let from_name = spec.from.as_deref().unwrap_or(&spec.machine);
    if from_name == target.name {
        return Ok((target.name.clone(), "127.0.0.1".into()));
    }
    let from = topology
        .machine(from_name)
        .ok_or_else(|| RouteError::UnknownFrom(from_name.to_string()))?;
    target
        .ips
        .iter()
        .find(|(network, _)| from.ips.contains_key(*network))
        .map(|(_, ip)| (from.name.clone(), ip.to_string()))
        .ok_or_else(|| RouteError::NoSharedNetwork {
            from: from.name.clone(),
            target: target.name.clone(),
        })
}

// ---------------------------------------------------------------------------
// Running checks
// ---------------------------------------------------------------------------

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub machine: String,
    pub from: Option<String>,
    pub kind: &'static str,
    pub passed: bool,
    /// Time spent attempting (evidence gathering not included).
    pub duration: Duration,
    pub attempts: u32,
    /// What it last got (or the error), short and specific, e.g. "expected
    /// /activated_slaves = 1, got 0" or "connection refused" or "no reply
    /// within 5s".
    pub detail: String,
    /// Only on failure, from [`Transport::evidence`].
    pub evidence: Option<String>,
}

/// What an attempt found: `Ok` with what passed, `Err` with what it got.
type Attempt = Result<String, String>;

/// Runs one check until it passes or its timeout ends. tcp and http
/// connect from `from` (default: the target) to the address [`route`]
/// gives; a command runs on `from` (default: the target). Attempts start every
/// `retry` (sooner never; an attempt slower than `retry` is followed at
/// once), each bounded by the time left, so a check ends within its timeout
/// and never sleeps past the point where another attempt could start.
pub async fn run_one<T: Transport>(
    spec: &CheckSpec,
    topology: &Topology,
    transport: &T,
) -> CheckResult {
    let start = Instant::now();
    let mut result = unfinished(spec);
    // A check that cannot be planned never reached the machine: no evidence.
    let (plan, (via, host)) = match plan_and_route(spec, topology) {
        Ok(planned) => planned,
        Err(detail) => {
            result.detail = detail.to_string();
            return result;
        }
    };
    let outcome = retry_until_deadline(&plan, start, &mut result.attempts, || {
        attempt(&plan.probe, transport, &via, &host)
    })
    .await;
    result.duration = start.elapsed();
    match outcome {
        Ok(detail) => {
            result.passed = true;
            result.detail = detail;
        }
        Err(detail) => {
            result.detail = detail;
            result.evidence = Some(gather_evidence(transport, &spec.machine).await);
        }
    }
    result
}

/// A failed result with no attempts yet, to fill in.
fn unfinished(spec: &CheckSpec) -> CheckResult {
    CheckResult {
        name: spec.name.clone(),
        machine: spec.machine.clone(),
        from: spec.from.clone().filter(|from| *from != spec.machine),
        kind: kind(spec),
        passed: false,
        duration: Duration::ZERO,
        attempts: 0,
        detail: String::new(),
        evidence: None,
    }
}

fn plan_and_route(
    spec: &CheckSpec,
    topology: &Topology,
) -> Result<(Plan, (String, String)), Unstartable> {
    Ok((Plan::compile(spec)?, route(spec, topology)?))
}

/// Calls `attempt` until it passes or no further attempt can start before
/// the deadline; returns the last outcome.
async fn retry_until_deadline<F, Fut>(
    plan: &Plan,
    start: Instant,
    attempts: &mut u32,
    attempt: F,
) -> Attempt
where
    F: Fn() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let deadline = start + plan.timeout;
    let mut previous: Option<String> = None;
    loop {
        let began = Instant::now();
        let left = deadline.saturating_duration_since(began);
        // The first attempt had the whole timeout, less the moment spent
        // planning: say so in the user's own terms.
        let budget = if *attempts == 0 { plan.timeout } else { left };
        *attempts += 1;
        let outcome = match tokio::time::timeout(left, attempt()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out(budget, previous.as_deref())),
        };
        let next = Instant::now().max(began + plan.retry);
        match outcome {
            Err(detail) if next < deadline => previous = Some(detail),
            done => return done,
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

/// The detail of an attempt cut short by the deadline. A last attempt that
/// only had moments left says little, so what the attempt before got is
/// kept (e.g. "connection refused").
fn timed_out(left: Duration, previous: Option<&str>) -> String {
    let detail = format!("no reply within {}", format_duration(left));
    match previous {
        Some(previous) if !previous.starts_with("no reply") => {
            format!("{detail}; the attempt before: {previous}")
        }
        _ => detail,
    }
}

async fn gather_evidence<T: Transport>(transport: &T, machine: &str) -> String {
    match tokio::time::timeout(EVIDENCE_TIMEOUT, transport.evidence(machine)).await {
        Ok(evidence) => evidence,
        Err(_) => format!(
            "(no evidence: gathering it from {machine} took over {})",
            format_duration(EVIDENCE_TIMEOUT)
        ),
    }
}

/// One attempt of a probe; `via`/`host` are from [`route`]. A command runs
/// on `via`: the machine it is checked from.
async fn attempt<T: Transport>(probe: &Probe, transport: &T, via: &str, host: &str) -> Attempt {
    match probe {
        Probe::Tcp(tcp) => tcp_attempt(tcp, transport, via, host).await,
        Probe::Http(http) => http_attempt(http, transport, via, host).await,
        Probe::Command(command) => command_attempt(command, transport, via).await,
    }
}

/// Runs all checks concurrently; results in the given order. Dropping the
/// returned future stops the checks still running.
pub async fn run_all<T: Transport>(
    specs: &[CheckSpec],
    topology: &Topology,
    transport: Arc<T>,
) -> Report {
    let topology = Arc::new(topology.clone());
    let mut tasks = AbortOnDrop(
        specs
            .iter()
            .map(|spec| {
                let (spec, topology, transport) =
                    (spec.clone(), topology.clone(), transport.clone());
                tokio::spawn(async move { run_one(&spec, &topology, transport.as_ref()).await })
            })
            .collect(),
    );
    let mut results = Vec::with_capacity(specs.len());
    for (spec, task) in specs.iter().zip(tasks.0.iter_mut()) {
        results.push(task.await.unwrap_or_else(|e| crashed(spec, &e)));
    }
    Report { results }
}

/// Spawned checks, stopped when `run_all` is dropped before they end.
struct AbortOnDrop(Vec<JoinHandle<CheckResult>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

/// The result of a check whose task panicked or was cancelled.
fn crashed(spec: &CheckSpec, error: &tokio::task::JoinError) -> CheckResult {
    CheckResult {
        detail: format!("the check itself failed: {error}"),
        ..unfinished(spec)
    }
}

// -- tcp ---------------------------------------------------------------------

async fn tcp_attempt<T: Transport>(tcp: &TcpPlan, transport: &T, via: &str, host: &str) -> Attempt {
    let mut stream = connect(transport, via, host, tcp.port).await?;
    if let Some(send) = &tcp.send {
        write_all(&mut stream, send.as_bytes())
            .await
            .map_err(|e| format!("sending {:?}: {}", send, describe_io(&e)))?;
    }
    let Some(expect) = &tcp.expect else {
        return Ok(format!("connected to {host}:{}", tcp.port));
    };
    let reply = read_reply(&mut stream, expect)
        .await
        .map_err(|e| format!("reading the reply: {}", describe_io(&e)))?;
    let text = String::from_utf8_lossy(&reply);
    if expect.is_match(&text) {
        Ok(format!("matched {expect}"))
    } else {
        Err(format!("expected {expect}, got {}", got(&text)))
    }
}

async fn connect<T: Transport>(
    transport: &T,
    via: &str,
    host: &str,
    port: u16,
) -> Result<BoxedStream, String> {
    transport
        .open_tcp(via, host, port)
        .await
        .map_err(|e| format!("{host}:{port} from {via}: {}", describe_io(&e)))
}

async fn write_all(stream: &mut BoxedStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads until EOF, [`READ_IDLE`] of silence, [`MAX_REPLY`] bytes, or as soon
/// as `expect` matches (so a server that keeps the connection open costs no
/// idle wait). A reset after some data ends the reply rather than failing.
async fn read_reply(stream: &mut BoxedStream, expect: &Matcher) -> io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    while reply.len() < MAX_REPLY {
        let n = match tokio::time::timeout(READ_IDLE, stream.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(_)) if !reply.is_empty() => break,
            Ok(Err(e)) => return Err(e),
        };
        reply.extend_from_slice(&chunk[..n]);
        if expect.is_match(&String::from_utf8_lossy(&reply)) {
            break;
        }
    }
    reply.truncate(MAX_REPLY);
    Ok(reply)
}

// -- http --------------------------------------------------------------------

/// A response as far as checks care.
struct HttpReply {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
}

async fn http_attempt<T: Transport>(
    http: &HttpPlan,
    transport: &T,
    via: &str,
    host: &str,
) -> Attempt {
    let stream = connect(transport, via, host, http.port).await?;
    let authority = if http.port == 80 {
        host.to_string()
    } else {
        format!("{host}:{}", http.port)
    };
    let reply = http_get(stream, &authority, &http.path)
        .await
        .map_err(|e| format!("GET http://{authority}{}: {e}", http.path))?;
    check_http(http, &reply)
}

/// One HTTP/1.1 GET over `stream`, body capped at [`MAX_REPLY`].
async fn http_get(stream: BoxedStream, authority: &str, path: &str) -> Result<HttpReply, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| describe_error(&e))?;
    let request = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "testbed-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| describe_error(&e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_REPLY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok(HttpReply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    let (mut exchange, mut connection) = (std::pin::pin!(exchange), std::pin::pin!(connection));
    // The connection drives the socket; it may end cleanly (the server
    // closed after its response) before the exchange has read the body.
    tokio::select! {
        biased;
        reply = &mut exchange => reply,
        ended = &mut connection => match ended {
            Ok(()) => exchange.await,
            Err(e) => Err(describe_error(&e)),
        },
    }
}

fn check_http(http: &HttpPlan, reply: &HttpReply) -> Attempt {
    let status = reply.status;
    let status_ok = match http.status {
        Some(want) => status.as_u16() == want,
        None => status.is_success(),
    };
    if !status_ok {
        let want = http.status.map_or("2xx".to_string(), |s| s.to_string());
        return Err(format!(
            "expected status {want}, got {status}; body {}",
            got(&reply.body)
        ));
    }
    for (name, matcher) in &http.headers {
        let Some(value) = reply.headers.get(name) else {
            return Err(format!(
                "expected header {name}: {matcher}, got no {name} header"
            ));
        };
        let value = String::from_utf8_lossy(value.as_bytes());
        if !matcher.is_match(&value) {
            return Err(format!("expected header {name}: {matcher}, got {value:?}"));
        }
    }
    check_text("body", http.body.as_ref(), &reply.body)?;
    check_json("body", &http.json, &reply.body)?;
    Ok(format!("status {}", status.as_u16()))
}

// -- command -----------------------------------------------------------------

async fn command_attempt<T: Transport>(
    command: &CommandPlan,
    transport: &T,
    machine: &str,
) -> Attempt {
    let output = transport.exec(machine, &command.run).await.map_err(|e| {
        format!(
            "running `{}` on {machine}: {}",
            command.run,
            describe_io(&e)
        )
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout[..output.stdout.len().min(MAX_REPLY)]);
    if output.status != command.exit {
        return Err(format!(
            "expected exit status {}, got {}{}",
            command.exit,
            output.status,
            stderr_note(&output.stderr, &stdout)
        ));
    }
    check_text("stdout", command.stdout.as_ref(), &stdout)?;
    check_json("stdout", &command.json, &stdout)?;
    Ok(format!("exit status {}", output.status))
}

/// The last line of stderr (or else of stdout): usually the error message.
fn stderr_note(stderr: &[u8], stdout: &str) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    let (stream, text) = if stderr.trim().is_empty() {
        ("stdout", stdout)
    } else {
        ("stderr", stderr.as_ref())
    };
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(|line| format!("; {stream}: {}", excerpt(line.trim())))
        .unwrap_or_default()
}

// -- shared matching -----------------------------------------------------------

/// `what` (body, stdout) against its matcher, when there is one.
fn check_text(what: &str, matcher: Option<&Matcher>, text: &str) -> Result<(), String> {
    match matcher {
        Some(matcher) if !matcher.is_match(text) => {
            Err(format!("expected {what} {matcher}, got {}", got(text)))
        }
        _ => Ok(()),
    }
}

/// Each JSON pointer of `what` (parsed as JSON) equals its value.
fn check_json(what: &str, pointers: &[(String, Value)], text: &str) -> Result<(), String> {
    if pointers.is_empty() {
        return Ok(());
    }
    let document: Value = serde_json::from_str(text)
        .map_err(|e| format!("{what} is not JSON ({e}): {}", got(text)))?;
    for (pointer, want) in pointers {
        match document.pointer(pointer) {
            None => {
                return Err(format!(
                    "expected {pointer} = {want}, but {what} has no {pointer}"
                ))
            }
            Some(value) if !json_equal(value, want) => {
                return Err(format!("expected {pointer} = {want}, got {value}"))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// JSON equality where numbers compare by value: 1 == 1.0.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(key, x)| ys.get(key).is_some_and(|y| json_equal(x, y)))
        }
        _ => a == b,
    }
}

/// Integers exactly (large ones lose precision as f64), else as f64.
fn numbers_equal(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
        return x == y;
    }
    matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
}

/// What was received, for a detail: an excerpt, or "no reply".
fn got(text: &str) -> String {
    if text.is_empty() {
        "no reply".into()
    } else {
        excerpt(text)
    }
}

/// `text` quoted and escaped, cut to [`EXCERPT_CHARS`].
fn excerpt(text: &str) -> String {
    let count = text.chars().count();
    if count <= EXCERPT_CHARS {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(EXCERPT_CHARS).collect();
        format!("{cut:?}… ({count} chars)")
    }
}

/// An I/O error in words people grep for ("connection refused").
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => e.to_string(),
    }
}

/// An error with its causes: hyper's own message is often just "connection
/// error" with the useful part in the source chain.
fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        match cause.downcast_ref::<io::Error>() {
            Some(io) => text.push_str(&describe_io(io)),
            None => text.push_str(&cause.to_string()),
        }
        source = cause.source();
    }
    text
}

/// A duration for people: "250ms", "5s", "1.5s".
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        let tenths = (ms + 50) / 100;
        match tenths % 10 {
            0 => format!("{}s", tenths / 10),
            frac => format!("{}.{frac}s", tenths / 10),
        }
    }
}

// ---------------------------------------------------------------------------
// Report: table, JSON, JUnit
// ---------------------------------------------------------------------------

/// The results of a set of checks, in the order they were given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub results: Vec<CheckResult>,
}

/// Indent of evidence lines under a failed check in the table.
const EVIDENCE_INDENT: &str = "      ";

impl Report {
    /// True when every check passed (and vacuously when there are none).
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    /// Aligned columns: status, name, machine (`target<-from`), duration,
    /// detail; each failure followed by its indented evidence; then a
    /// summary line. Ends with a newline.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 5]> = self.results.iter().map(table_row).collect();
        let widths: Vec<usize> = (0..4)
            .map(|column| {
                rows.iter()
                    .map(|row| row[column].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (result, row) in self.results.iter().zip(&rows) {
            out.push_str(&format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}\n",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
            ));
            for line in result.evidence.iter().flat_map(|e| e.lines()) {
                out.push_str(EVIDENCE_INDENT);
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// "3 checks: 2 passed, 1 failed".
    pub fn summary(&self) -> String {
        let passed = self.results.iter().filter(|r| r.passed).count();
        let total = self.results.len();
        let noun = if total == 1 { "check" } else { "checks" };
        format!("{total} {noun}: {passed} passed, {} failed", total - passed)
    }

    /// `{"passed": bool, "checks": [{name, machine, from, kind, passed,
    /// duration_ms, attempts, detail, evidence}]}`.
    pub fn json(&self) -> Value {
        let checks: Vec<Value> = self.results.iter().map(result_json).collect();
        serde_json::json!({ "passed": self.passed(), "checks": checks })
    }

    /// A JUnit XML document: one suite named `suite`, one test case per
    /// check (classname: the machine), failures carrying detail as message
    /// and evidence as description.
    pub fn junit(&self, suite: &str) -> String {
        let mut test_suite = quick_junit::TestSuite::new(suite);
        test_suite.add_test_cases(self.results.iter().map(junit_case));
        let mut report = quick_junit::Report::new(suite);
        report.set_time(
            self.results
                .iter()
                .map(|r| r.duration)
                .max()
                .unwrap_or_default(),
        );
        report.add_test_suite(test_suite);
        report
            .to_string()
            .unwrap_or_else(|e| format!("<!-- cannot write the JUnit report: {e} -->\n"))
    }
}

impl CheckResult {
    /// `target`, or `target<-from` when checked from another machine.
    pub fn route_label(&self) -> String {
        match &self.from {
            Some(from) => format!("{}<-{from}", self.machine),
            None => self.machine.clone(),
        }
    }
}

fn table_row(result: &CheckResult) -> [String; 5] {
    [
        if result.passed { "PASS" } else { "FAIL" }.to_string(),
        result.name.clone(),
        result.route_label(),
        format!("{:.2}s", result.duration.as_secs_f64()),
        result.detail.clone(),
    ]
}

fn result_json(result: &CheckResult) -> Value {
    serde_json::json!({
        "name": result.name,
        "machine": result.machine,
        "from": result.from,
        "kind": result.kind,
        "passed": result.passed,
        "duration_ms": u64::try_from(result.duration.as_millis()).unwrap_or(u64::MAX),
        "attempts": result.attempts,
        "detail": result.detail,
        "evidence": result.evidence,
    })
}

fn junit_case(result: &CheckResult) -> quick_junit::TestCase {
    let status = if result.passed {
        quick_junit::TestCaseStatus::success()
    } else {
        let mut status =
            quick_junit::TestCaseStatus::non_success(quick_junit::NonSuccessKind::Failure);
        status.set_message(result.detail.as_str());
        status.set_type(result.kind);
        if let Some(evidence) = &result.evidence {
            status.set_description(evidence.as_str());
        }
        status
    };
    let mut case = quick_junit::TestCase::new(result.name.as_str(), status);
    case.set_classname(result.route_label());
    case.set_time(result.duration);
    if result.passed {
        case.set_system_out(result.detail.as_str());
    }
    case
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matcher_is_a_substring_or_a_slash_delimited_regex() {
        let substring = Matcher::parse("expect", "Mode: leader").expect("substring");
        assert!(substring.is_match("Zookeeper\nMode: leader\n"));
        assert!(!substring.is_match("Mode: follower"));
        // Flags go inline, as the regex crate writes them.
        let regex = Matcher::parse("expect", "/(?m)^Mode: (leader|follower)$/").expect("regex");
        assert!(regex.is_match("Zookeeper\nMode: follower\nNode count: 4\n"));
        assert!(!regex.is_match("Mode: standalone\n"));
        assert_eq!(regex.to_string(), "/(?m)^Mode: (leader|follower)$/");
        // Only a lone "/" is not a regex: it is a substring.
        assert!(matches!(
            Matcher::parse("expect", "/").expect("slash"),
            Matcher::Substring(_)
        ));
        assert_eq!(substring.to_string(), "\"Mode: leader\"");
        let error = Matcher::parse("tcp.expect", "/(/")
            .expect_err("bad regex")
            .to_string();
        assert!(error.starts_with("tcp.expect: `/(/` is not a valid regex: "));
        assert!(!error.contains('\n'), "{error}");
    }

    #[test]
    fn json_numbers_compare_by_value() {
        use serde_json::json;
        assert!(json_equal(&json!(1), &json!(1.0)));
        assert!(json_equal(
            &json!({"a": [1, 2.5]}),
            &json!({"a": [1.0, 2.5]})
        ));
        assert!(!json_equal(&json!(1), &json!("1")));
        assert!(!json_equal(&json!([1]), &json!([1, 2])));
        assert!(json_equal(&json!(u64::MAX), &json!(u64::MAX)));
        assert!(!json_equal(&json!(i64::MAX), &json!(i64::MAX - 1)));
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(4999)), "5s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(
            parse_duration("retry", Some("500ms"), DEFAULT_RETRY),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("retry", None, DEFAULT_RETRY),
            Ok(DEFAULT_RETRY)
        );
    }

    #[test]
    fn send_gets_one_trailing_newline() {
        assert_eq!(with_newline("stat"), "stat\n");
        assert_eq!(with_newline("stat\n"), "stat\n");
    }

    #[test]
    fn a_short_last_attempt_keeps_what_the_one_before_got() {
        assert_eq!(
            timed_out(
                Duration::from_millis(20),
                Some("127.0.0.1:1 from a: connection refused")
            ),
            "no reply within 20ms; the attempt before: 127.0.0.1:1 from a: connection refused"
        );
        assert_eq!(
            timed_out(Duration::from_secs(5), None),
            "no reply within 5s"
        );
    }

    #[test]
    fn long_replies_are_cut_in_details() {
        let long = "x".repeat(EXCERPT_CHARS + 10);
        let cut = excerpt(&long);
        assert!(cut.ends_with(&format!("… ({} chars)", EXCERPT_CHARS + 10)));
        assert_eq!(got(""), "no reply");
        assert_eq!(excerpt("a\nb"), "\"a\\nb\"");
    }
}
