//! The SSH transport against a real OpenSSH server (`/usr/sbin/sshd`) run
//! on a free loopback port, one server per test.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testbed::ssh::{generate_keypair, shell_quote, Session, SshError, Stream, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SSHD: &str = "/usr/sbin/sshd";
const DEADLINE: Duration = Duration::from_secs(20);

/// An sshd configuration in a temporary directory, and the server once started.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Sshd {
    /// Write host key, client key, authorized_keys and sshd_config; pick a port.
    fn prepare() -> Sshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let client_pub = generate_keypair(&dir.path().join("client_key"), "client").expect("key");
        generate_keypair(&dir.path().join("host_key"), "host").expect("host key");
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{client_pub}\n"),
        )
        .expect("authorized_keys");
        let sshd = Sshd {
            port: free_port(),
            dir,
            child: None,
        };
        std::fs::write(sshd.path("sshd_config"), sshd.config()).expect("sshd_config");
        sshd
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> String {
        format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             AuthorizedKeysFile {authorized}\n\
             PidFile none\n\
             StrictModes no\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\n\
             LogLevel VERBOSE\n",
            host_key = self.path("host_key").display(),
            authorized = self.path("authorized_keys").display(),
        )
    }

    fn start(&mut self) {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: apt-get install -y --no-install-recommends openssh-server"
        );
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let log = std::fs::File::create(self.path("sshd.log")).expect("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.path("sshd_config"))
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        self.child = Some(child);
    }

    fn started() -> Sshd {
        let mut sshd = Sshd::prepare();
        sshd.start();
        sshd
    }

    fn target(&self) -> Target {
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], self.port)),
            user: current_user(),
            key_path: self.path("client_key"),
            host_key_path: self.path("host_key.pub"),
            jump: None,
        }
    }

    async fn connect(&self) -> Session {
        Session::connect(&self.target(), DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}\nsshd log:\n{}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("sshd log:\n{}", self.log());
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .expect("user lookup")
        .expect("current user exists")
        .name
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn exec_collects_stdout_stderr_and_status() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let output = session
        .exec("echo hi; echo err >&2; exit 3")
        .await
        .expect("exec");
    assert_eq!(output.stdout, b"hi\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.exit_status, 3);
    assert!(!output.success());
    let error = output.ensure_success("the command").expect_err("status 3");
    assert!(
        error.to_string().contains("exited with status 3: err"),
        "{error}"
    );
    session.close().await;
}

#[tokio::test]
async fn exec_does_not_wait_for_stdin() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let output = tokio::time::timeout(Duration::from_secs(10), session.exec("cat; echo done"))
        .await
        .expect("cat saw end of input")
        .expect("exec");
    assert_eq!(output.stdout_lossy(), "done\n");
}

#[tokio::test]
async fn exec_streaming_delivers_chunks_as_they_arrive() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    // The future must be Send, so callers can spawn it.
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&session.exec_streaming("true", |_, _| {}));
    let started = Instant::now();
    let mut chunks: Vec<(Stream, Vec<u8>, Duration)> = Vec::new();
    let output = session
        .exec_streaming(
            "echo first; echo warn >&2; sleep 1; echo last",
            |stream, data| chunks.push((stream, data.to_vec(), started.elapsed())),
        )
        .await
        .expect("exec");
    let finished = started.elapsed();

    assert_eq!(output.stdout, b"first\nlast\n");
    assert_eq!(output.stderr, b"warn\n");
    assert_eq!(output.exit_status, 0);
    let first = chunks.first().expect("at least one chunk");
    assert_eq!(
        (first.0, first.1.as_slice()),
        (Stream::Stdout, &b"first\n"[..])
    );
    assert!(
        finished - first.2 >= Duration::from_millis(700),
        "first chunk came at {:?}, only just before the end at {finished:?}",
        first.2
    );
    assert!(chunks
        .iter()
        .any(|(s, d, _)| *s == Stream::Stderr && d == b"warn\n"));
}

#[tokio::test]
async fn exec_reports_a_signal_as_an_error() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let error = session.exec("kill -TERM $$").await.expect_err("killed");
    assert!(matches!(error, SshError::Killed(_)), "{error:?}");
}

#[tokio::test]
async fn upload_replaces_the_file_with_the_requested_mode() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("it's a \"file\" $HOME");
    std::fs::write(&path, "old contents").expect("seed");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // Larger than the SSH window, so flow control is exercised.
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let remote = path.to_str().expect("utf-8 path");

    session.upload(&data, remote, 0o600).await.expect("upload");

    assert!(
        std::fs::read(&path).expect("read back") == data,
        "contents differ"
    );
    assert_eq!(mode_of(&path), 0o600);
    let entries = std::fs::read_dir(dir.path()).expect("read_dir").count();
    assert_eq!(entries, 1, "temporary file left behind");
    let stat = session
        .exec(&format!("stat -c %a {}", shell_quote(remote)))
        .await
        .expect("stat");
    assert_eq!(stat.stdout_lossy(), "600\n");
}

#[tokio::test]
async fn upload_then_cat_round_trips_small_text() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let remote = dir.path().join("motd");
    let remote = remote.to_str().expect("utf-8 path");
    session
        .upload(b"hello\nworld\n", remote, 0o644)
        .await
        .expect("upload");
    let cat = session
        .exec(&format!("cat {}", shell_quote(remote)))
        .await
        .expect("cat");
    assert_eq!(cat.stdout, b"hello\nworld\n");
    assert_eq!(mode_of(Path::new(remote)), 0o644);
}

#[tokio::test]
async fn upload_into_a_missing_directory_fails_clearly() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let remote = dir.path().join("missing/file");
    // The command fails before reading its input: the upload must not hang.
    let data = vec![7u8; 4 * 1024 * 1024];
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        session.upload(&data, remote.to_str().expect("utf-8"), 0o600),
    )
    .await
    .expect("upload returned");
    let error = result.expect_err("missing directory");
    assert!(matches!(error, SshError::UploadFailed(_)), "{error:?}");
    assert!(error.to_string().contains("missing/file"), "{error}");
    // The connection is still usable afterwards.
    let output = session.exec("echo still here").await.expect("exec");
    assert_eq!(output.stdout_lossy(), "still here\n");
}

#[tokio::test]
async fn open_tcp_round_trips_bytes_through_the_server() {
    let sshd = Sshd::started();
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut socket, _) = echo.accept().await.expect("accept");
        let (mut read, mut write) = socket.split();
        tokio::io::copy(&mut read, &mut write).await.expect("echo");
    });
    let session = sshd.connect().await;

    let mut tunnel = session
        .open_tcp("127.0.0.1", echo_port)
        .await
        .expect("open_tcp");
    let message: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
    let (mut read, mut write) = tokio::io::split(&mut tunnel);
    let writer = async {
        write.write_all(&message).await.expect("write");
        write.flush().await.expect("flush");
    };
    let mut echoed = vec![0u8; message.len()];
    let reader = async { read.read_exact(&mut echoed).await.expect("read") };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("echo round trip");
    assert!(echoed == message, "echoed bytes differ");
}

#[tokio::test]
async fn open_tcp_to_a_closed_port_fails() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let port = free_port();
    let error = session
        .open_tcp("127.0.0.1", port)
        .await
        .err()
        .expect("nothing listens there");
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
    // The connection survives a refused tunnel.
    assert_eq!(session.exec("echo ok").await.expect("exec").stdout, b"ok\n");
}

#[tokio::test]
async fn wrong_host_key_fails_at_once() {
    let sshd = Sshd::started();
    let mut target = sshd.target();
    let other = sshd.path("other_host_key");
    generate_keypair(&other, "impostor").expect("key");
    target.host_key_path = testbed::ssh::public_key_path(&other);
    // Make sure sshd is up, so the test measures the mismatch, not startup.
    drop(sshd.connect().await);

    let started = Instant::now();
    let error = Session::connect(&target, Duration::from_secs(30))
        .await
        .expect_err("mismatch");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(error, SshError::HostKeyMismatch(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("does not match"), "{message}");
    assert!(message.contains("SHA256:"), "{message}");
}

#[tokio::test]
async fn refused_key_fails_at_once() {
    let sshd = Sshd::started();
    let mut target = sshd.target();
    let stranger = sshd.path("stranger_key");
    generate_keypair(&stranger, "stranger").expect("key");
    target.key_path = stranger;
    drop(sshd.connect().await);

    let started = Instant::now();
    let error = Session::connect(&target, Duration::from_secs(30))
        .await
        .expect_err("refused");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(error, SshError::AuthRefused(_)), "{error:?}");
    assert!(error.to_string().contains("refused"), "{error}");
}

#[tokio::test]
async fn connect_retries_until_sshd_starts() {
    let mut sshd = Sshd::prepare();
    let target = sshd.target();
    let started = Instant::now();
    let connecting = tokio::spawn(async move { Session::connect(&target, DEADLINE).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    sshd.start();

    let session = connecting
        .await
        .expect("join")
        .expect("connect after retry");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let output = session.exec("echo up").await.expect("exec");
    assert_eq!(output.stdout_lossy(), "up\n");
}

#[tokio::test]
async fn connect_gives_up_at_the_deadline() {
    let sshd = Sshd::prepare(); // never started
    let started = Instant::now();
    let error = Session::connect(&sshd.target(), Duration::from_secs(1))
        .await
        .expect_err("nothing listens");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(matches!(error, SshError::ConnectTimeout(_)), "{error:?}");
    assert!(error.to_string().contains("within 1 s"), "{error}");
}

/// A guest whose network is up but whose sshd is slow: the first
/// connection is closed before the banner, every later one is accepted and
/// left silent. The reach loop waits for them without a storm: never more
/// than two at once, and the error says what the last one heard.
#[tokio::test]
async fn connect_to_a_silent_server_keeps_at_most_two_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let sshd = Sshd::prepare(); // only for its key files
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut target = sshd.target();
    target.addr = listener.local_addr().expect("local addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                held.push(stream); // silent, like an sshd still forking
            } // the first is dropped: closed before the banner
        }
    });
    let error = Session::connect(&target, Duration::from_secs(4))
        .await
        .expect_err("nothing speaks SSH");
    server.abort();
    let message = error.to_string();
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "{message}");
    assert!(message.contains("3 connection(s) tried"), "{message}");
    assert!(
        message.contains("closed before the SSH banner"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_share_one_session() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let session = session.clone();
            tokio::spawn(async move { session.exec(&format!("sleep 1; echo {i}")).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let output = task.await.expect("join").expect("exec");
        assert_eq!(output.stdout_lossy(), format!("{i}\n"));
    }
    // Four one-second commands in sequence would take at least 4 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn close_ends_the_session() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    session.close().await;
    let result = tokio::time::timeout(Duration::from_secs(5), session.exec("true"))
        .await
        .expect("exec after close returns");
    assert!(result.is_err());
}

#[test]
fn ssh_error_is_small_enough_to_embed() {
    assert!(std::mem::size_of::<SshError>() <= 80);
}

#[test]
fn shell_quote_wraps_in_single_quotes() {
    assert_eq!(shell_quote("plain"), "'plain'");
    assert_eq!(shell_quote(""), "''");
    assert_eq!(shell_quote("it's"), "'it'\\''s'");
    assert_eq!(shell_quote("a b"), "'a b'");
    assert_eq!(shell_quote("'"), "''\\'''");
}

#[tokio::test]
async fn shell_quote_survives_a_real_shell() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    for nasty in ["it's", "$HOME `id` $(id)", "a\nb", "\\'\"", "*", "-n", ""] {
        let output = session
            .exec(&format!("printf %s {}", shell_quote(nasty)))
            .await
            .expect("exec");
        assert_eq!(output.stdout_lossy(), nasty);
    }
}

#[test]
fn generate_keypair_writes_a_private_0600_key_and_a_pub_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("id_ed25519");
    // An existing, too-open file must end up 0600 as well.
    std::fs::write(&path, "stale").expect("seed");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let public = generate_keypair(&path, "root@node1").expect("generate");

    assert!(public.starts_with("ssh-ed25519 AAAA"), "{public}");
    assert!(public.ends_with(" root@node1"), "{public}");
    assert_eq!(mode_of(&path), 0o600);
    let private = std::fs::read_to_string(&path).expect("read");
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let pub_file = std::fs::read_to_string(dir.path().join("id_ed25519.pub")).expect("pub");
    assert_eq!(pub_file, format!("{public}\n"));
    // ssh-keygen agrees that the pair belongs together.
    let derived = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("ssh-keygen");
    assert!(derived.status.success());
    let derived = String::from_utf8(derived.stdout).expect("utf-8");
    assert!(public.starts_with(
        derived
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
            .as_str()
    ));
}

#[tokio::test]
async fn stop_commands_ends_a_running_command_and_all_it_started() {
    let sshd = Sshd::started();
    let session = sshd.connect().await;
    let marker = format!("sleep 3{}", std::process::id() % 10_000 + 10_000);
    let command = format!("{marker} & {marker}1; wait");
    let running = {
        let session = session.clone();
        tokio::spawn(async move { session.exec(&command).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_named(&marker) < 2 {
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(session.stop_commands().await, 1);
    let ended = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the command ended once stopped")
        .expect("task");
    assert!(matches!(ended, Err(SshError::Killed(_))), "{ended:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_named(&marker) > 0 {
        assert!(
            Instant::now() < deadline,
            "a background `sleep` outlived the stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(session.stop_commands().await, 0, "nothing left to stop");
}

/// How many processes' command lines contain `needle`.
fn processes_named(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.starts_with(needle))
        .count()
}

/// An OpenSSH ControlMaster to the test's sshd, as `up` leaves one per
/// machine (`ssh -fN` with the host key pinned); exits when dropped.
struct ControlMaster {
    socket: PathBuf,
}

impl ControlMaster {
    fn start(sshd: &Sshd) -> ControlMaster {
        let socket = sshd.path("master.sock");
        std::fs::write(
            sshd.path("known_hosts"),
            format!(
                "[127.0.0.1]:{} {}",
                sshd.port,
                std::fs::read_to_string(sshd.path("host_key.pub")).expect("host key")
            ),
        )
        .expect("known_hosts");
        let status = Command::new("ssh")
            .args(["-o", "ControlMaster=yes", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                sshd.path("known_hosts").display()
            ))
            .arg("-S")
            .arg(&socket)
            .arg("-i")
            .arg(sshd.path("client_key"))
            .args(["-p", &sshd.port.to_string(), "-fN"])
            .arg(format!("{}@127.0.0.1", current_user()))
            .stdin(Stdio::null())
            .status()
            .expect("run ssh");
        assert!(
            status.success(),
            "ssh -fN failed\nsshd log:\n{}",
            sshd.log()
        );
        ControlMaster { socket }
    }

    /// Connections sshd accepted so far: a command through the master
    /// must not add one.
    fn accepted(sshd: &Sshd) -> usize {
        sshd.log().matches("Accepted publickey").count()
    }
}

impl Drop for ControlMaster {
    fn drop(&mut self) {
        let _ = Command::new("ssh")
            .arg("-S")
            .arg(&self.socket)
            .args(["-O", "exit", "none"])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn a_control_master_carries_commands_uploads_and_tunnels_without_a_new_login() {
    let sshd = Sshd::started();
    // Once sshd answers (the master's ssh would not retry).
    sshd.connect().await.close().await;
    let master = ControlMaster::start(&sshd);
    let logins = ControlMaster::accepted(&sshd);
    assert!(logins >= 2, "sshd logs its logins:\n{}", sshd.log());
    let mux = testbed::ssh::mux::Master::attach(&master.socket)
        .await
        .expect("the master answers");

    let output = mux
        .exec("echo hi; echo err >&2; exit 3")
        .await
        .expect("exec");
    assert_eq!(
        (
            output.stdout.as_slice(),
            output.stderr.as_slice(),
            output.exit_status
        ),
        (&b"hi\n"[..], &b"err\n"[..], 3)
    );

    let dest = sshd.path("uploaded");
    let written = mux
        .upload(b"through the master\n", &dest.display().to_string(), 0o640)
        .await
        .expect("upload");
    assert!(written.success(), "{}", written.stderr_lossy());
    assert_eq!(
        std::fs::read_to_string(&dest).expect("read"),
        "through the master\n"
    );
    assert_eq!(mode_of(&dest), 0o640);

    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    // Twice: the second tunnel reuses the forward the first one asked for.
    for message in [&b"ruok"[..], &b"stat"[..]] {
        let mut tunnel = mux.open_tcp("127.0.0.1", echo_port).await.expect("tunnel");
        tunnel.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(echoed, message);
    }
    mux.close().await;

    assert_eq!(
        ControlMaster::accepted(&sshd),
        logins,
        "a command through the master logged in again"
    );
}

#[tokio::test]
async fn no_master_is_attached_where_none_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("master.sock");
    assert!(testbed::ssh::mux::Master::attach(&missing).await.is_none());
    // A socket file nobody listens on (a master that died).
    drop(std::os::unix::net::UnixListener::bind(&missing).expect("bind"));
    assert!(missing.exists());
    assert!(testbed::ssh::mux::Master::attach(&missing).await.is_none());
}
