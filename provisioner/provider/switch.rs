//! A learning Ethernet switch on a Unix stream socket: qemu's
//! `-netdev stream` speaks it (each frame preceded by its length, 4 bytes
//! big-endian). One switch per topology network joins the VMs on one L2
//! segment with no root and no traffic leaving the host; its socket sits in
//! a 0700 directory, so no other local user can join or listen. (Debian's
//! qemu 7.2 has no vde backend, and multicast on loopback is open to every
//! local user; hence a switch of our own, in-process and small.)

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::model::LinkShape;

type Mac = [u8; 6];
type PortId = u64;

/// Largest frame accepted: a jumbo frame with headroom.
const MAX_FRAME: usize = 65_536;
/// Frames queued per port before the switch drops, as a real switch would.
const PORT_QUEUE: usize = 256;
/// Frames a delayed link holds before it drops (netem's default limit).
const DELAY_QUEUE: usize = 1000;

#[derive(Default)]
struct Fabric {
    ports: HashMap<PortId, mpsc::Sender<Vec<u8>>>,
    macs: HashMap<Mac, PortId>,
    next_port: PortId,
    /// Pairs of MACs that must not reach each other (a partition), both ways.
    blocked: HashSet<(Mac, Mac)>,
    /// Links that are down, slow or lossy, by the MAC of their machine.
    links: HashMap<Mac, LinkShape>,
}

/// The file beside the socket listing the blocked MAC pairs, one pair per
/// line (`52:54:00:…:01 52:54:00:…:02`); no file, no blocks. The switch
/// reads it again whenever it changes.
pub const BLOCKS_FILE: &str = "blocked";

/// The file beside the socket shaping links: a JSON object from each
/// faulty link's MAC to its [`LinkShape`]; no file, every link healthy.
pub const LINKS_FILE: &str = "links.json";

/// How often the switch looks at [`BLOCKS_FILE`] and [`LINKS_FILE`].
const FAULTS_POLL: Duration = Duration::from_millis(100);

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
        if self.blocked.contains(&(src, dst)) || self.is_down(&src) || self.is_down(&dst) {
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
    /// The ports whose machines `src` must not reach (blocked from it, or
    /// their link down): a flood skips them.
    fn ports_blocked_from(&self, src: Mac) -> HashSet<PortId> {
        self.macs
            .iter()
            .filter(|(mac, _)| self.blocked.contains(&(src, **mac)) || self.is_down(mac))
            .map(|(_, port)| *port)
            .collect()
    }

    fn is_down(&self, mac: &Mac) -> bool {
        self.links.get(mac).is_some_and(|shape| shape.down)
    }

    /// How the link of the frame's sender delays or drops what it sends.
    fn sender_shape(&self, frame: &[u8]) -> Option<LinkShape> {
        let src: Mac = frame.get(6..12)?.try_into().ok()?;
        self.links.get(&src).copied()
    }
}

/// Parses a [`LINKS_FILE`]; unreadable entries are skipped.
pub fn parse_links(text: &str) -> HashMap<Mac, LinkShape> {
    let entries: HashMap<String, LinkShape> = serde_json::from_str(text).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|(mac, shape)| Some((parse_mac(&mac)?, shape)))
        .collect()
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

/// Keeps the fabric's blocks and link shapes in step with the
/// [`BLOCKS_FILE`] and [`LINKS_FILE`] in `dir`.
async fn follow_faults(dir: PathBuf, fabric: Arc<Mutex<Fabric>>) {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let mut seen: Option<(String, String)> = None;
    loop {
        let now = (read(BLOCKS_FILE), read(LINKS_FILE));
        if seen.as_ref() != Some(&now) {
            let mut fabric = lock(&fabric);
            fabric.blocked = parse_blocks(&now.0);
            fabric.links = parse_links(&now.1);
            seen = Some(now);
        }
        tokio::time::sleep(FAULTS_POLL).await;
    }
}

/// Serves the switch on `socket` until the process is killed.
pub async fn run(socket: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let fabric = Arc::new(Mutex::new(Fabric::default()));
    if let Some(dir) = socket.parent() {
        tokio::spawn(follow_faults(dir.to_path_buf(), fabric.clone()));
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
    let delayed = delay_line(port, fabric.clone());
    // When the last delayed frame leaves, so that frames keep their order.
    let mut last_release = Instant::now();
    while let Ok(frame) = read_frame(&mut reader).await {
        let shape = lock(&fabric).sender_shape(&frame);
        match shape {
            Some(shape) if shape.loss > 0.0 && fastrand::f64() < shape.loss => {}
            Some(shape) if !shape.delay.is_zero() => {
                last_release = last_release.max(Instant::now() + sample_delay(&shape));
                // A full line drops the frame, as netem does past its limit.
                let _ = delayed.try_send((last_release, frame));
            }
            _ => lock(&fabric).forward(port, frame),
        }
    }
    lock(&fabric).detach(port);
    writing.abort();
}

/// The delay of one frame: `delay`, varied uniformly by up to `jitter`.
fn sample_delay(shape: &LinkShape) -> Duration {
    let spread = shape.jitter.as_secs_f64() * (2.0 * fastrand::f64() - 1.0);
    Duration::from_secs_f64((shape.delay.as_secs_f64() + spread).max(0.0))
}

/// A queue that forwards each frame from `port` once its release time comes.
fn delay_line(port: PortId, fabric: Arc<Mutex<Fabric>>) -> mpsc::Sender<(Instant, Vec<u8>)> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(DELAY_QUEUE);
    tokio::spawn(async move {
        while let Some((release, frame)) = rx.recv().await {
            tokio::time::sleep_until(release.into()).await;
            lock(&fabric).forward(port, frame);
        }
    });
    tx
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
        let (dir, mut pa, mut pb, mut pc) = three_learned_ports().await;
        std::fs::write(
            dir.path().join(BLOCKS_FILE),
            "02:00:00:00:00:01 02:00:00:00:00:02\n",
        )
        .expect("blocks");
        tokio::time::sleep(FAULTS_POLL * 3).await;
        send(&mut pa, &frame(B, A)).await;
        send(&mut pa, &frame([0xff; 6], A)).await;
        // c gets the broadcast; b gets nothing from a, only c's frame after.
        assert_eq!(read_frame(&mut pc).await.expect("c"), frame([0xff; 6], A));
        send(&mut pc, &frame(B, C)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b"), frame(B, C));
        // Healed: a reaches b again.
        std::fs::remove_file(dir.path().join(BLOCKS_FILE)).expect("heal");
        tokio::time::sleep(FAULTS_POLL * 3).await;
        send(&mut pa, &frame(B, A)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b healed"), frame(B, A));
    }

    /// Three ports with every MAC learned (each has broadcast once).
    async fn three_learned_ports() -> (tempfile::TempDir, UnixStream, UnixStream, UnixStream) {
        let (dir, mut pa, mut pb, mut pc) = three_ports().await;
        for (port, mac) in [(&mut pa, A), (&mut pb, B), (&mut pc, C)] {
            send(port, &frame([0xff; 6], mac)).await;
        }
        for _ in 0..2 {
            read_frame(&mut pa).await.expect("a learns");
            read_frame(&mut pb).await.expect("b learns");
            read_frame(&mut pc).await.expect("c learns");
        }
        (dir, pa, pb, pc)
    }

    async fn shape_links(dir: &Path, json: &str) {
        std::fs::write(dir.join(LINKS_FILE), json).expect("links");
        tokio::time::sleep(FAULTS_POLL * 3).await;
    }

    #[tokio::test]
    async fn a_delayed_link_holds_what_its_machine_sends_and_keeps_the_order() {
        let (dir, mut pa, mut pb, _pc) = three_learned_ports().await;
        shape_links(dir.path(), r#"{"02:00:00:00:00:01": {"delay": 300000}}"#).await;
        let sent = Instant::now();
        send(&mut pa, &frame(B, A)).await;
        let mut second = frame(B, A);
        second.push(2);
        send(&mut pa, &second).await;
        assert_eq!(read_frame(&mut pb).await.expect("first"), frame(B, A));
        let held = sent.elapsed();
        assert_eq!(read_frame(&mut pb).await.expect("second"), second);
        assert!(held >= Duration::from_millis(300), "held {held:?}");
        assert!(held < Duration::from_millis(1000), "held {held:?}");
        // The other way is not delayed: b's link is healthy.
        let sent = Instant::now();
        send(&mut pb, &frame(A, B)).await;
        read_frame(&mut pa).await.expect("b to a");
        assert!(sent.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_down_link_neither_sends_nor_receives_and_full_loss_drops_all() {
        let (dir, mut pa, mut pb, mut pc) = three_learned_ports().await;
        shape_links(dir.path(), r#"{"02:00:00:00:00:01": {"down": true}}"#).await;
        send(&mut pa, &frame(B, A)).await;
        send(&mut pb, &frame(A, B)).await;
        send(&mut pb, &frame([0xff; 6], B)).await;
        // c gets b's broadcast and nothing of a's; a gets nothing at all.
        assert_eq!(read_frame(&mut pc).await.expect("c"), frame([0xff; 6], B));
        send(&mut pc, &frame(B, C)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b"), frame(B, C));
        shape_links(dir.path(), r#"{"02:00:00:00:00:01": {"loss": 1.0}}"#).await;
        send(&mut pa, &frame(B, A)).await;
        send(&mut pc, &frame(A, C)).await;
        // a receives again (loss is what a sends); b still gets nothing of a's.
        assert_eq!(read_frame(&mut pa).await.expect("a"), frame(A, C));
        send(&mut pc, &frame(B, C)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b again"), frame(B, C));
        std::fs::remove_file(dir.path().join(LINKS_FILE)).expect("heal");
        tokio::time::sleep(FAULTS_POLL * 3).await;
        send(&mut pa, &frame(B, A)).await;
        assert_eq!(read_frame(&mut pb).await.expect("b healed"), frame(B, A));
    }
}
