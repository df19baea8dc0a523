//! Commands, uploads and TCP tunnels through an OpenSSH ControlMaster that
//! is already authenticated (the one `up` leaves per machine for `testbed
//! ssh`), over its mux protocol: no key exchange, which costs a guest under
//! emulation close to a second, so a short command costs only its own run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::{ForwardType, Session, Socket, Stdio};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use super::{upload_command, ExecOutput};

/// A master that does not answer its alive check within this long counts as
/// gone (its guest paused or its connection hung).
const ALIVE_CHECK: Duration = Duration::from_secs(1);
/// What a command killed by a signal reports, as OpenSSH's `ssh` does.
const SIGNALLED: u32 = 255;

#[derive(Debug, thiserror::Error)]
#[error("through the ControlMaster {socket}: {action}: {source}")]
pub struct MuxError {
    socket: PathBuf,
    action: String,
    #[source]
    source: std::io::Error,
}

/// A live ControlMaster, and the local forwards opened through it.
pub struct Master {
    session: Session,
    socket: PathBuf,
    /// Where the sockets of this process's forwards live (removed on drop).
    scratch: tempfile::TempDir,
    /// One forward per destination, reused by every tunnel to it: a forward
    /// closed right after a connect could drop that connection before the
    /// master accepts it.
    forwards: tokio::sync::Mutex<BTreeMap<(String, u16), PathBuf>>,
}

impl Master {
    /// The master listening on `socket`, when one is there and answers.
    pub async fn attach(socket: &Path) -> Option<Master> {
        if !socket.exists() {
            return None;
        }
        let session = Session::resume_mux(socket.into(), None);
        if !matches!(
            tokio::time::timeout(ALIVE_CHECK, session.check()).await,
            Ok(Ok(()))
        ) {
            return None;
        }
        let scratch = tempfile::Builder::new()
            .prefix("testbed-mux-")
            .tempdir()
            .ok()?;
        Some(Master {
            session,
            socket: socket.to_path_buf(),
            scratch,
            forwards: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Runs `command` with the guest's shell and collects its output.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, MuxError> {
        let output = self
            .session
            .raw_command(command)
            .output()
            .await
            .map_err(|e| self.error(format!("running `{command}`"), e))?;
        Ok(exec_output(output))
    }

    /// Writes `data` to `remote_path` with `mode`, atomically (as
    /// [`super::Session::upload`] does).
    pub async fn upload(
        &self,
        data: &[u8],
        remote_path: &str,
        mode: u32,
    ) -> Result<ExecOutput, MuxError> {
        let action = || format!("writing {remote_path}");
        let mut child = self
            .session
            .raw_command(upload_command(remote_path, mode))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .map_err(|e| self.error(action(), e))?;
        if let Some(mut stdin) = child.stdin().take() {
            stdin
                .write_all(data)
                .await
                .map_err(|e| self.io_error(action(), e))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| self.error(action(), e))?;
        Ok(exec_output(output))
    }

    /// A TCP connection to `host:port` as seen from the guest.
    pub async fn open_tcp(&self, host: &str, port: u16) -> Result<UnixStream, MuxError> {
        let action = || format!("opening a tunnel to {host}:{port}");
        let listen = self.forward(host, port).await?;
        UnixStream::connect(&listen)
            .await
            .map_err(|e| self.io_error(action(), e))
    }

    /// The local socket that the master forwards to `host:port`, asking the
    /// master for it the first time.
    async fn forward(&self, host: &str, port: u16) -> Result<PathBuf, MuxError> {
        let mut forwards = self.forwards.lock().await;
        let key = (host.to_string(), port);
        if let Some(path) = forwards.get(&key) {
            return Ok(path.clone());
        }
        let path = self.scratch.path().join(format!("{}.sock", forwards.len()));
        let (listen, connect) = local_forward(&path, host, port);
        self.session
            .request_port_forward(ForwardType::Local, listen, connect)
            .await
            .map_err(|e| self.error(format!("forwarding to {host}:{port}"), e))?;
        forwards.insert(key, path.clone());
        Ok(path)
    }

    /// Closes this process's forwards; the master itself stays up.
    pub async fn close(&self) {
        let forwards = std::mem::take(&mut *self.forwards.lock().await);
        for ((host, port), path) in forwards {
            let (listen, connect) = local_forward(&path, &host, port);
            let _ = self
                .session
                .close_port_forward(ForwardType::Local, listen, connect)
                .await;
        }
    }

    fn error(&self, action: String, source: openssh::Error) -> MuxError {
        self.io_error(action, std::io::Error::other(source))
    }

    fn io_error(&self, action: String, source: std::io::Error) -> MuxError {
        MuxError {
            socket: self.socket.clone(),
            action,
            source,
        }
    }
}

/// A forward from the local socket `path` to `host:port` seen from the guest.
fn local_forward<'a>(path: &'a Path, host: &'a str, port: u16) -> (Socket<'a>, Socket<'a>) {
    (
        Socket::UnixSocket { path: path.into() },
        Socket::TcpSocket {
            host: host.into(),
            port,
        },
    )
}

fn exec_output(output: std::process::Output) -> ExecOutput {
    let exit_status = output
        .status
        .code()
        .and_then(|code| u32::try_from(code).ok())
        .unwrap_or(SIGNALLED);
    ExecOutput {
        stdout: output.stdout,
        stderr: output.stderr,
        exit_status,
    }
}
