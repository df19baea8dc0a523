//! Reaching a guest's SSH port that is forwarded on another machine's
//! loopback (a libvirt host): through OpenSSH to that machine, `ssh -W`, as
//! libvirt's `qemu+ssh://` transport reaches its daemon. So the user's own
//! ssh config, agent and known hosts apply to the jump, and one shared
//! connection to each host (a ControlMaster) carries every tunnel.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long the shared connection to a host outlives its last tunnel.
const CONTROL_PERSIST: Duration = Duration::from_secs(60);

/// The machine whose loopback a guest's SSH is forwarded on, when it is not
/// this one, and how to log in there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    /// `[user@]host`, as `ssh` takes it.
    pub destination: String,
    pub port: Option<u16>,
    /// `ssh -i` (libvirt's `keyfile=`).
    pub identity: Option<PathBuf>,
    /// `UserKnownHostsFile` (libvirt's `known_hosts=`); else the user's own.
    pub known_hosts: Option<PathBuf>,
    /// Where the shared connection's socket is (`ControlPath`, which may
    /// hold ssh's `%C`).
    pub control: PathBuf,
}

impl Jump {
    /// `ssh`'s arguments before `-W`: no prompt (the host key must be
    /// known: pinned, never accepted blindly), one shared connection.
    pub fn ssh_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ControlMaster=auto",
            "-o",
        ]
        .map(Into::into)
        .into();
        let mut control = OsString::from("ControlPath=");
        control.push(&self.control);
        args.push(control);
        args.push("-o".into());
        args.push(format!("ControlPersist={}", CONTROL_PERSIST.as_secs()).into());
        if let Some(port) = self.port {
            args.push("-p".into());
            args.push(port.to_string().into());
        }
        if let Some(identity) = &self.identity {
            args.push("-i".into());
            args.push(identity.into());
            args.push("-o".into());
            args.push("IdentitiesOnly=yes".into());
        }
        if let Some(known_hosts) = &self.known_hosts {
            let mut option = OsString::from("UserKnownHostsFile=");
            option.push(known_hosts);
            args.push("-o".into());
            args.push(option);
        }
        args
    }

    /// Whether testbed can log in to the host without a prompt (what its
    /// tunnels need): Ok, or ssh's own words.
    pub fn check(&self) -> Result<(), String> {
        self.prepare();
        let output = std::process::Command::new("ssh")
            .args(self.ssh_args())
            .arg(&self.destination)
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr);
        let line = said.lines().map(str::trim).find(|l| !l.is_empty());
        Err(format!(
            "ssh {}: {}",
            self.destination,
            line.unwrap_or("failed")
        ))
    }

    /// Lets the shared connection to the host end with its last tunnel
    /// (`ssh -O stop`: no new ones, the open ones undisturbed), rather
    /// than outlive it by [`CONTROL_PERSIST`]. Best effort: there may be
    /// none.
    pub fn release(&self) {
        let _ = std::process::Command::new("ssh")
            .args(self.ssh_args())
            .args(["-O", "stop"])
            .arg(&self.destination)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Makes the folder of the shared connection's socket (ssh makes the
    /// socket, not its folder), private to the user.
    fn prepare(&self) {
        if let Some(folder) = self.control.parent() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder);
        }
    }

    /// The whole `ssh` command line that tunnels to `to` on the jump host,
    /// `to` being ssh_config's `%h:%p` or an address.
    pub fn tunnel_args(&self, to: &str) -> Vec<OsString> {
        let mut args = self.ssh_args();
        args.push("-W".into());
        args.push(to.into());
        args.push(self.destination.clone().into());
        args
    }
}

/// An `ssh -W` tunnel as one byte stream; the `ssh` is killed with it.
pub(super) struct Tunnel {
    _ssh: Child,
    /// The byte read while waiting for the banner, then the tunnel's output.
    reader: tokio::io::Chain<io::Cursor<Vec<u8>>, ChildStdout>,
    writer: ChildStdin,
}

/// Why a tunnel did not reach a server that talks.
pub(super) enum Untunneled {
    /// Nothing listens at the far end, or the jump host cannot be reached:
    /// ssh's own words.
    Refused(String),
    /// The far end accepted, then closed before saying anything.
    Closed(String),
}

/// Opens a tunnel through `jump` to `addr` (on the jump host) and waits
/// until the server there starts talking, like a TCP connect and peek.
pub(super) async fn open(jump: &Jump, addr: SocketAddr) -> Result<Tunnel, Untunneled> {
    jump.prepare();
    let mut ssh = tokio::process::Command::new("ssh")
        .args(jump.tunnel_args(&addr.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Untunneled::Refused(format!("cannot run ssh: {e}")))?;
    let (Some(writer), Some(mut stdout), Some(mut stderr)) =
        (ssh.stdin.take(), ssh.stdout.take(), ssh.stderr.take())
    else {
        return Err(Untunneled::Refused("ssh's pipes are missing".into()));
    };
    let mut first = [0u8; 1];
    match stdout.read(&mut first).await {
        Ok(1) => Ok(Tunnel {
            _ssh: ssh,
            reader: io::Cursor::new(first.to_vec()).chain(stdout),
            writer,
        }),
        _ => {
            let mut said = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr.read_to_string(&mut said))
                .await;
            Err(why_untunneled(&jump.destination, &said))
        }
    }
}

/// ssh's stderr turned into the reason: a refused port at the far end or a
/// jump host that cannot be reached are "refused"; a tunnel that opened
/// and closed is "closed" (the guest's sshd not up yet).
fn why_untunneled(destination: &str, said: &str) -> Untunneled {
    let line = said
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    if line.is_empty() {
        return Untunneled::Closed(format!(
            "the tunnel through {destination} closed before the SSH banner (sshd not up yet?)"
        ));
    }
    Untunneled::Refused(format!("through {destination}: {line}"))
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jump() -> Jump {
        Jump {
            destination: "root@10.77.0.2".into(),
            port: Some(2222),
            identity: Some("/home/u/.ssh/id_host".into()),
            known_hosts: Some("/home/u/hosts known".into()),
            control: "/home/u/.cache/testbed/ssh/%C".into(),
        }
    }

    #[test]
    fn the_tunnel_pins_the_host_key_and_shares_one_connection() {
        let args: Vec<String> = jump()
            .tunnel_args("127.0.0.1:40022")
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for part in [
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o ControlMaster=auto -o ControlPath=/home/u/.cache/testbed/ssh/%C",
            "-p 2222",
            "-i /home/u/.ssh/id_host -o IdentitiesOnly=yes",
            "-W 127.0.0.1:40022 root@10.77.0.2",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        // One argument, spaces and all.
        assert!(args.contains(&"UserKnownHostsFile=/home/u/hosts known".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("root@10.77.0.2"));
    }

    #[test]
    fn ssh_saying_nothing_is_a_closed_tunnel_and_its_words_a_refusal() {
        assert!(matches!(
            why_untunneled("h", "\n"),
            Untunneled::Closed(why) if why.contains("sshd not up yet")
        ));
        assert!(matches!(
            why_untunneled("root@h", "channel 0: open failed: connect failed: Connection refused\n"),
            Untunneled::Refused(why) if why == "through root@h: channel 0: open failed: connect failed: Connection refused"
        ));
    }
}
