//! A learning Ethernet switch on a Unix stream socket: qemu's
//! `-netdev stream` speaks it (each frame preceded by its length, 4 bytes
//! big-endian). One switch per topology network joins the VMs on one L2
//! segment with no root and no traffic leaving the host; its socket sits in
//! a 0700 directory, so no other local user can join or listen. (Debian's
//! qemu 7.2 has no vde backend, and multicast on loopback is open to every
//! local user; hence a switch of our own, in-process and small.)

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

type Mac = [u8; 6];
type PortId = u64;

/// Largest frame accepted: a jumbo frame with headroom.
const MAX_FRAME: usize = 65_536;
/// Frames queued per port before the switch drops, as a real switch would.
const PORT_QUEUE: usize = 256;

#[derive(Default)]
struct Fabric {
    ports: HashMap<PortId, mpsc::Sender<Vec<u8>>>,
    macs: HashMap<Mac, PortId>,
    next_port: PortId,
    /// Pairs of MACs that must not reach each other (a partition), both ways.
    blocked: HashSet<(Mac, Mac)>,
}

/// The file beside the socket listing the blocked MAC pairs, one pair per
/// line (`52:54:00:…:01 52:54:00:…:02`); no file, no blocks. The switch
/// reads it again whenever it changes.
pub const BLOCKS_FILE: &str = "blocked";

/// How often the switch looks at [`BLOCKS_FILE`].
const BLOCKS_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl Fabric {
    fn attach(&mut self, tx: mpsc::Sender<Vec<u8>>) -> PortId {
        self.next_port += 1;
        self.ports.insert(self.next_port, tx);
        self.next_port
    }

    fn detach(&mut self, port: PortId) {
        self.ports.remove(&port);
        self.macs.retain(|_, p| *p != port);
    }

    /// Learns the sender's MAC, then delivers to the port that owns the
    /// destination, or floods when it is unknown, broadcast or multicast.
    fn forward(&mut self, from: PortId, frame: Vec<u8>) {
        if frame.len() < 14 {
            return;
        }
        let mut dst: Mac = [0; 6];
        let mut src: Mac = [0; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        if src[0] & 1 == 0 {
            self.macs.insert(src, from);
        }
        if self.blocked.contains(&(src, dst)) {
            return;
        }
        let known = (dst[0] & 1 == 0)
            .then(|| self.macs.get(&dst).copied())
            .flatten();
        match known {
            Some(port) if port != from => {
                if let Some(tx) = self.ports.get(&port) {
                    let _ = tx.try_send(frame);
                }
            }
            Some(_) => {}
            None => {
                let cut_off = self.ports_blocked_from(src);
                for (port, tx) in &self.ports {
                    if *port != from && !cut_off.contains(port) {
                        let _ = tx.try_send(frame.clone());
                    }
                }
            }
        }
    }
}

impl Fabric {
    /// The ports whose machines `src` must not reach: a flood skips them.
    fn ports_blocked_from(&self, src: Mac) -> HashSet<PortId> {
        self.macs
            .iter()
            .filter(|(mac, _)| self.blocked.contains(&(src, **mac)))
            .map(|(_, port)| *port)
            .collect()
    }
}

/// The MAC pairs of a [`BLOCKS_FILE`], each both ways; malformed lines are
/// skipped.
pub fn parse_blocks(text: &str) -> HashSet<(Mac, Mac)> {
    let mut blocked = HashSet::new();
    for line in text.lines() {
        let macs: Vec<Mac> = line.split_whitespace().filter_map(parse_mac).collect();
        if let [a, b] = macs[..] {
            blocked.insert((a, b));
            blocked.insert((b, a));
        }
    }
    blocked
}

fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac: Mac = [0; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Keeps the fabric's blocks in step with the [`BLOCKS_FILE`] at `path`.
async fn follow_blocks(path: std::path::PathBuf, fabric: Arc<Mutex<Fabric>>) {
    let mut seen: Option<String> = None;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if seen.as_deref() != Some(text.as_str()) {
            lock(&fabric).blocked = parse_blocks(&text);
            seen = Some(text);
        }
        tokio::time::sleep(BLOCKS_POLL).await;
    }
}

/// Serves the switch on `socket` until the process is killed.
pub async fn run(socket: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    if let Some(dir) = socket.parent() {
        tokio::spawn(follow_blocks(dir.join(BLOCKS_FILE), fabric.clone()));
    }
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve_port(stream, fabric.clone()));
    }
}

async fn serve_port(stream: UnixStream, fabric: Arc<Mutex<Fabric>>) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PORT_QUEUE);
    let port = lock(&fabric).attach(tx);
    let writing = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let len = (frame.len() as u32).to_be_bytes();
            if writer.write_all(&len).await.is_err() || writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    while let Ok(frame) = read_frame(&mut reader).await {
        lock(&fabric).forward(port, frame);
    }
    lock(&fabric).detach(port);
    writing.abort();
}

async fn read_frame(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let len = reader.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("oversized frame"));
    }
    let mut frame = vec![0; len];
    reader.read_exact(&mut frame).await?;
    Ok(frame)
}

fn lock(fabric: &Mutex<Fabric>) -> std::sync::MutexGuard<'_, Fabric> {
    // A panic while holding the lock cannot leave the tables inconsistent
    // in a way that matters to a switch: keep forwarding.
    fabric
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = Vec::from(dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, 0xde, 0xad]);
        f
    }

    async fn connect(path: &Path) -> UnixStream {
        for _ in 0..100 {
            if let Ok(s) = UnixStream::connect(path).await {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("switch did not listen");
    }

    async fn send(stream: &mut UnixStream, f: &[u8]) {
        stream.write_u32(f.len() as u32).await.expect("len");
        stream.write_all(f).await.expect("frame");
    }

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];
    const C: Mac = [2, 0, 0, 0, 0, 3];

    /// A switch served from a temp folder (returned, so it lives) and
    /// three ports plugged into it.
    async fn three_ports() -> (tempfile::TempDir, UnixStream, UnixStream, UnixStream) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("sw");
        let server_sock = sock.clone();
        tokio::spawn(async move { run(&server_sock).await });
        let ports = (
            connect(&sock).await,
            connect(&sock).await,
            connect(&sock).await,
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        (dir, ports.0, ports.1, ports.2)
    }

    #[tokio::test]
    async fn floods_unknown_then_learns_and_delivers_unicast() {
        let (_dir, mut pa, mut pb, mut pc) = three_ports().await;

        // a → broadcast: b and c both get it (and the switch learns a).
        send(&mut pa, &frame([0xff; 6], A)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b"), frame([0xff; 6], A));
        assert_eq!(read_frame(&mut pc).await.expect("c"), frame([0xff; 6], A));
        // b → a: a is known, so only a gets it; c gets the next flood only.
        send(&mut pb, &frame(A, B)).await;
        assert_eq!(read_frame(&mut pa).await.expect("a"), frame(A, B));
        send(&mut pa, &frame(C, A)).await;
        assert_eq!(read_frame(&mut pc).await.expect("c again"), frame(C, A));
    }

    #[tokio::test]
    async fn a_blocked_pair_gets_neither_unicast_nor_floods_from_each_other() {
        let (dir, mut pa, mut pb, mut pc) = three_ports().await;
        // Each port's MAC learned.
        for (port, mac) in [(&mut pa, A), (&mut pb, B), (&mut pc, C)] {
            send(port, &frame([0xff; 6], mac)).await;
        }
        for _ in 0..2 {
            read_frame(&mut pa).await.expect("a learns");
            read_frame(&mut pb).await.expect("b learns");
            read_frame(&mut pc).await.expect("c learns");
        }
        std::fs::write(
            dir.path().join(BLOCKS_FILE),
            "02:00:00:00:00:01 02:00:00:00:00:02\n",
        )
        .expect("blocks");
        tokio::time::sleep(BLOCKS_POLL * 3).await;
        send(&mut pa, &frame(B, A)).await;
        send(&mut pa, &frame([0xff; 6], A)).await;
        // c gets the broadcast; b gets nothing from a, only c's frame after.
        assert_eq!(read_frame(&mut pc).await.expect("c"), frame([0xff; 6], A));
        send(&mut pc, &frame(B, C)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b"), frame(B, C));
        // Healed: a reaches b again.
        std::fs::remove_file(dir.path().join(BLOCKS_FILE)).expect("heal");
        tokio::time::sleep(BLOCKS_POLL * 3).await;
        send(&mut pa, &frame(B, A)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b healed"), frame(B, A));
    }
}
