//! A TCP proxy for fault injection: forwards every connection from a
//! loopback port to the real destination, frame by frame, and lets a test
//! look at, alter, hold back or cut each frame on its way.
//!
//! Frames are parsed with the library's own decoders: control frames
//! (`FRYM`, both directions of a control connection, and the hello and its
//! answer on a data channel), chunk frames (format v2: 64-byte header, run
//! table, payload; source to destination on a data channel) and ack frames
//! (32 bytes, destination to source on a data channel). The proxy holds no
//! key: it parses fields and can change bytes, but cannot make a tag match,
//! as an attacker on the path could not. The
//! role of a connection comes from its `Hello`. Bytes the decoders refuse
//! are forwarded as they come ([`Kind::Raw`]).
//!
//! A destination listening on loopback advertises no interface, so the
//! source opens its data channels along the control connection's path:
//! through the proxy. Every connection is numbered in accept order.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::proto::{Msg, Role, MAX_CONTROL_BODY};
use ferry_transport::wire::{AckFrame, AckStatus, ChunkHeader, ChunkKind, ACK_LEN, HEADER_LEN};

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination.
    ToDest,
    /// Destination to source.
    ToSource,
}

/// What a frame is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A control frame and its message.
    Control(Msg),
    /// A chunk frame (header already checked by [`ChunkHeader::decode`]).
    Chunk(ChunkHeader, ChunkKind),
    /// An ack frame.
    Ack(u64, AckStatus),
    /// Bytes that did not parse (everything after them is raw too).
    Raw,
}

/// One frame on its way through the proxy.
#[derive(Debug)]
pub struct Frame {
    /// Connection number, in accept order from 0.
    pub conn: usize,
    /// The connection's role once its hello was seen.
    pub role: Option<Role>,
    /// Direction.
    pub dir: Dir,
    /// What it is (parsed before the hook sees it).
    pub kind: Kind,
    /// The frame's bytes, as they will be forwarded: a hook may change them.
    pub bytes: Vec<u8>,
}

impl Frame {
    /// The control message's name, if this is a control frame.
    pub fn msg_name(&self) -> Option<&'static str> {
        match &self.kind {
            Kind::Control(m) => Some(m.name()),
            _ => None,
        }
    }
    /// The chunk header if this is a page chunk.
    pub fn pages(&self) -> Option<&ChunkHeader> {
        match &self.kind {
            Kind::Chunk(h, ChunkKind::Pages) => Some(h),
            _ => None,
        }
    }

    /// Rewrites a control frame's message as an on-path attacker without
    /// the key would: `change` edits the message (returning false leaves
    /// the frame alone); the frame is re-encoded with a correct CRC and its
    /// flags, and keeps its original tag (the attacker cannot make a new
    /// one). True if the frame was changed.
    pub fn rewrite_msg(&mut self, change: impl FnOnce(&mut Msg) -> bool) -> bool {
        let Kind::Control(m) = &self.kind else {
            return false;
        };
        let mut m = m.clone();
        if !change(&mut m) {
            return false;
        }
        let head: [u8; 16] = self.bytes[..16].try_into().expect("a header");
        let Ok(h) = Msg::decode_head(&head, MAX_CONTROL_BODY) else {
            return false;
        };
        let tag = self.bytes[16 + h.len as usize..].to_vec();
        let mut out = m.encode();
        out[12..16].copy_from_slice(&head[12..16]);
        out.extend_from_slice(&tag);
        self.bytes = out;
        self.kind = Kind::Control(m);
        true
    }
}

/// What the proxy does with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it (with the hook's changes).
    Forward,
    /// Do not forward it; carry on with the next one.
    Swallow,
    /// Close this connection, both sides, both ways; the frame is lost.
    Drop,
    /// Forward nothing more on this connection, either way, but keep both
    /// sockets open (a stalled link).
    Stall,
    /// As [`Verdict::Stall`], and an end of either side is not passed on
    /// either: a link that went dead, neither end hears of the other.
    Silence,
}

/// The test's hook, called for every frame.
pub type Hook = Box<dyn FnMut(&mut Frame) -> Verdict + Send>;

/// What a proxy saw: one entry per frame (before the hook changed it).
#[derive(Debug, Clone)]
pub struct Seen {
    /// Connection number.
    pub conn: usize,
    /// Its role.
    pub role: Option<Role>,
    /// Direction.
    pub dir: Dir,
    /// What it was.
    pub kind: Kind,
    /// Its bytes, for control frames only (data would be large).
    pub bytes: Vec<u8>,
    /// What the hook decided.
    pub verdict: Verdict,
}

struct ConnState {
    role: Mutex<Option<Role>>,
    role_set: Condvar,
    stalled: AtomicBool,
    /// Silenced: not even an end passes.
    silent: AtomicBool,
    /// Clones of both sockets, to close them from anywhere; the pumps own
    /// their own clones and drop them when they end, so a closed
    /// connection's descriptors really go (a reset if bytes are unread).
    sockets: Mutex<Vec<TcpStream>>,
}

struct Shared {
    hook: Mutex<Hook>,
    seen: Mutex<Vec<Seen>>,
    changed: Condvar,
    conns: Mutex<Vec<Arc<ConnState>>>,
    stop: AtomicBool,
}

/// A running proxy. Dropping it closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("addr", &self.addr).finish()
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr, hook: Hook) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            hook: Mutex::new(hook),
            seen: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let next = AtomicUsize::new(0);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    // The destination is gone: the source sees the close.
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let st = Arc::new(ConnState {
                    role: Mutex::new(None),
                    role_set: Condvar::new(),
                    stalled: AtomicBool::new(false),
                    silent: AtomicBool::new(false),
                    sockets: Mutex::new(vec![
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                    ]),
                });
                let id = next.fetch_add(1, Ordering::SeqCst);
                sh.conns.lock().unwrap().push(st.clone());
                for (dir, from, to) in [
                    (
                        Dir::ToDest,
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                    ),
                    (
                        Dir::ToSource,
                        server.try_clone().unwrap(),
                        client.try_clone().unwrap(),
                    ),
                ] {
                    let (sh, st) = (sh.clone(), st.clone());
                    std::thread::spawn(move || pump(&sh, &st, id, dir, from, to));
                }
            }
        });
        Proxy { addr, shared }
    }

    /// Forwards everything unchanged.
    pub fn transparent(target: SocketAddr) -> Proxy {
        Proxy::start(target, Box::new(|_| Verdict::Forward))
    }

    /// Closes connection `conn` (accept order), both sides, both ways, as
    /// a link that went down and a peer that gave up would.
    pub fn cut(&self, conn: usize) {
        if let Some(st) = self.shared.conns.lock().unwrap().get(conn) {
            close(st);
        }
    }

    /// The address sources should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every frame seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`) until `pred` holds for the frames seen so
    /// far; panics naming `what` otherwise.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Seen]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut seen = self.shared.seen.lock().unwrap();
        while !pred(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "proxy: timed out waiting for {what}");
            seen = self.shared.changed.wait_timeout(seen, left).unwrap().0;
        }
    }

    /// The bytes the source sent on connection `conn` (control frames only).
    pub fn control_bytes(&self, conn: usize, dir: Dir) -> Vec<u8> {
        self.seen()
            .iter()
            .filter(|s| s.conn == conn && s.dir == dir)
            .flat_map(|s| s.bytes.clone())
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in self.shared.conns.lock().unwrap().iter() {
            close(c);
        }
        // Wake the accept loop so it sees the stop flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn close(c: &ConnState) {
    for s in c.sockets.lock().unwrap().drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Control frames at the start of a data channel, each way: Hello and Auth
/// from the source, HelloReply and Welcome from the destination.
const DATA_HANDSHAKE_FRAMES: usize = 2;

/// Reads one frame (`seen` frames came before it this way); `None` at a
/// clean end of stream.
fn read_frame(from: &mut TcpStream, role: Option<Role>, dir: Dir, seen: usize) -> Option<Frame> {
    let mut head = [0u8; 16];
    if from.read_exact(&mut head).is_err() {
        return None;
    }
    let mut bytes = head.to_vec();
    let data = role == Some(Role::Data) && seen >= DATA_HANDSHAKE_FRAMES;
    let kind = match (data, dir) {
        (false, _) => match Msg::decode_head(&head, MAX_CONTROL_BODY) {
            Ok(h) => {
                // Body, and after authentication the frame's tag (kept in
                // the frame's bytes: a hook that changes the body leaves a
                // tag that no longer matches).
                let mut rest = vec![0u8; h.rest_len()];
                if from.read_exact(&mut rest).is_err() {
                    return None;
                }
                bytes.extend_from_slice(&rest);
                match Msg::decode_body(&rest[..h.len as usize], h.crc) {
                    Ok(m) => Kind::Control(m),
                    Err(_) => Kind::Raw,
                }
            }
            Err(_) => Kind::Raw,
        },
        (true, Dir::ToSource) => {
            let mut rest = [0u8; ACK_LEN - 16];
            if from.read_exact(&mut rest).is_err() {
                return None;
            }
            bytes.extend_from_slice(&rest);
            // The proxy has no key: fields only (the source checks the tag).
            match AckFrame::decode_fields(&bytes) {
                Ok((seq, st, _)) => Kind::Ack(seq, st),
                Err(_) => Kind::Raw,
            }
        }
        (true, Dir::ToDest) => {
            let mut rest = [0u8; HEADER_LEN - 16];
            if from.read_exact(&mut rest).is_err() {
                return None;
            }
            bytes.extend_from_slice(&rest);
            match ChunkHeader::decode(&bytes) {
                Ok((h, k)) => {
                    let more = h.run_count.get() as usize * 16 + h.payload_len.get() as usize;
                    let at = bytes.len();
                    bytes.resize(at + more, 0);
                    if from.read_exact(&mut bytes[at..]).is_err() {
                        return None;
                    }
                    Kind::Chunk(h, k)
                }
                Err(_) => Kind::Raw,
            }
        }
    };
    Some(Frame {
        conn: 0,
        role,
        dir,
        kind,
        bytes,
    })
}

fn pump(sh: &Shared, st: &ConnState, id: usize, dir: Dir, mut from: TcpStream, mut to: TcpStream) {
    let mut seen = 0;
    loop {
        let role = match dir {
            Dir::ToDest => *st.role.lock().unwrap(),
            // The answer comes after the hello, whose role is known by then.
            Dir::ToSource => {
                let g = st.role.lock().unwrap();
                *st.role_set
                    .wait_timeout_while(g, Duration::from_secs(30), |r| r.is_none())
                    .unwrap()
                    .0
            }
        };
        let Some(mut f) = read_frame(&mut from, role, dir, seen) else {
            break;
        };
        seen += 1;
        f.conn = id;
        if let (Dir::ToDest, Kind::Control(Msg::Hello { role, .. })) = (dir, &f.kind) {
            *st.role.lock().unwrap() = Some(*role);
            f.role = Some(*role);
            st.role_set.notify_all();
        }
        let raw = matches!(f.kind, Kind::Raw);
        let kind = f.kind.clone();
        let original = if matches!(kind, Kind::Control(_)) {
            f.bytes.clone()
        } else {
            Vec::new()
        };
        let verdict = if st.silent.load(Ordering::SeqCst) {
            Verdict::Silence
        } else if st.stalled.load(Ordering::SeqCst) {
            Verdict::Stall
        } else {
            (sh.hook.lock().unwrap())(&mut f)
        };
        {
            let mut seen = sh.seen.lock().unwrap();
            seen.push(Seen {
                conn: id,
                role: f.role,
                dir,
                kind,
                bytes: original,
                verdict,
            });
            sh.changed.notify_all();
        }
        match verdict {
            Verdict::Forward => {
                if to.write_all(&f.bytes).is_err() {
                    // The other side reset the connection (it refused what
                    // it was sent, and closed with bytes unread): reset this
                    // side too, as one TCP connection would, so a writer
                    // here sees the failure instead of a full buffer.
                    close(st);
                    return;
                }
            }
            Verdict::Swallow => {}
            Verdict::Drop => {
                close(st);
                return;
            }
            Verdict::Stall | Verdict::Silence => {
                st.stalled.store(true, Ordering::SeqCst);
                if verdict == Verdict::Silence {
                    st.silent.store(true, Ordering::SeqCst);
                }
                // Hold the sockets open, read nothing more, until the proxy goes.
                while !sh.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        }
        if raw {
            // Past bytes that did not parse: copy the rest as it comes.
            let _ = std::io::copy(&mut from, &mut to);
            break;
        }
    }
    // One side closed: pass the close on (half-close, as TCP would),
    // unless the link is dead.
    if !st.silent.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
