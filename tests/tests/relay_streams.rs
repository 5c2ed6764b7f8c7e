//! `ferry relay`'s byte streams over loopback, without QEMU (issue 13):
//! plain TCP peers stand in for the two hypervisors. The destination daemon
//! and the source relay run in this process (library calls), so each case
//! takes a second or two; the `ferry relay` command itself is exercised by
//! `relay_cli` below and by `tests/tests/relay.rs` with real guests.
//!
//! Cases: many streams each way with half-close, accepted in the source's
//! order; back-pressure from a slow reader (bounded buffering); a corrupt
//! chunk on one data channel (that channel fails, the others carry its
//! chunks); a data channel cut mid-stream (failover); every channel cut (both
//! hypervisors' connections reset); a `--deliver-to` outside `--relay-allow`
//! refused before anything is sent; either relay side gone (the other resets
//! its hypervisor's connections).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_migration::dest::{Destination, GuestSupport, ListenOptions, ResumeHook};
use ferry_migration::nics::MultichannelOptions;
use ferry_migration::relay::{prepare_source, RelayFailure, RelayReport, SourceOptions};
use ferry_proto::control::RejectReason;
use ferry_tests::proxy::{Dir, Kind, Proxy, Verdict};
use ferry_transport::auth::AuthKey;
use ferry_transport::multichannel::ChannelCount;
use ferry_transport::tls::TlsConfig;
use ferry_transport::TransportError;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn key() -> AuthKey {
    AuthKey::new(KEY.to_vec()).unwrap()
}

/// A destination daemon in this runtime; returns its address and the task.
fn daemon(
    rt: &tokio::runtime::Runtime,
    plaintext: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<Destination>) {
    daemon_limited(rt, plaintext, 8 << 30)
}

/// [`daemon`] with this `--memory-limit`.
fn daemon_limited(
    rt: &tokio::runtime::Runtime,
    plaintext: bool,
    memory_limit: u64,
) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<Destination>) {
    let key = key();
    let opts = ListenOptions {
        key: key.clone(),
        memory_limit,
        timeout: Duration::from_secs(10),
        max_concurrent: 2,
        queue: 0,
        queue_timeout: Duration::ZERO,
        migration_networks: Vec::new(),
        tls: Arc::new(TlsConfig::from_psk(&key).unwrap()),
        plaintext,
        handshake_timeout: ferry_migration::admission::DEFAULT_HANDSHAKE_TIMEOUT,
        max_unauthenticated: ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED,
        max_unauthenticated_per_source:
            ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
    };
    let hook = ResumeHook {
        supports: GuestSupport {
            max_vcpus: 1,
            cpu_vendor: None,
            device_state_formats: vec![],
        },
        restore: Arc::new(|_, _| Err("no guests here".into())),
        resume: Arc::new(|_| Err("no guests here".into())),
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = Destination::new(opts, hook);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let d = dest.clone();
    let server = rt.spawn(async move {
        let _ = d.serve(listener, tx).await;
    });
    rt.spawn(async move { while rx.recv().await.is_some() {} });
    (addr, server, dest)
}

fn source_opts(to: SocketAddr, deliver_to: SocketAddr, tls: bool, channels: u16) -> SourceOptions {
    let key = key();
    SourceOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        to: to.to_string(),
        deliver_to: deliver_to.to_string(),
        tls: tls.then(|| Arc::new(TlsConfig::from_psk(&key).unwrap())),
        key,
        compression: None,
        multichannel: MultichannelOptions {
            channels: ChannelCount::Fixed(channels),
            nics: Vec::new(),
            channel_timeout: Duration::from_secs(5),
        },
        bandwidth_limit: None,
        timeout: Duration::from_secs(10),
        window: 1 << 20,
        chunk: 64 << 10,
        max_streams: 65,
    }
}

/// Deterministic bytes of stream `id`.
fn pattern(id: u32, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(id).wrapping_mul(0x1234_5678_9abc);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The destination hypervisor: accepts connections, records the order
/// (each client's first 4 bytes are its id), echoes everything back
/// (transformed: every byte + 1) and passes the EOF on.
struct Echo {
    addr: SocketAddr,
    order: Arc<Mutex<Vec<(u32, u32)>>>,
    errors: Arc<Mutex<Vec<ErrorKind>>>,
    accepted: Arc<AtomicUsize>,
}

fn echo(gate: Option<Arc<AtomicBool>>, read_total: Arc<AtomicU64>) -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (o, e, a) = (order.clone(), errors.clone(), accepted.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let idx = a.fetch_add(1, Ordering::SeqCst) as u32;
            let (o, e, total, gate) = (o.clone(), e.clone(), read_total.clone(), gate.clone());
            std::thread::spawn(move || {
                // A hypervisor that does not read yet.
                while gate.as_ref().is_some_and(|g| !g.load(Ordering::SeqCst)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut buf = vec![0u8; 16 << 10];
                let mut first = Vec::new();
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            total.fetch_add(n as u64, Ordering::SeqCst);
                            if first.len() < 4 {
                                first.extend_from_slice(&buf[..n.min(4 - first.len())]);
                                if first.len() == 4 {
                                    // (accept index, the client's id)
                                    o.lock().unwrap().push((
                                        idx,
                                        u32::from_le_bytes(first[..4].try_into().unwrap()),
                                    ));
                                }
                            }
                            let out: Vec<u8> = buf[..n].iter().map(|b| b.wrapping_add(1)).collect();
                            if let Err(err) = c.write_all(&out) {
                                e.lock().unwrap().push(err.kind());
                                return;
                            }
                        }
                        Err(err) => {
                            e.lock().unwrap().push(err.kind());
                            return;
                        }
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    Echo {
        addr,
        order,
        errors,
        accepted,
    }
}

/// One source hypervisor connection: writes its id and `len` bytes, closes
/// its side, reads the echo to EOF; returns what came back or the error.
type Client = (
    TcpStream,
    std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
    std::thread::JoinHandle<std::io::Result<()>>,
);

fn client(to: SocketAddr, id: u32, len: usize) -> Client {
    client_counting(to, id, len, Arc::default())
}

/// [`client`], counting the bytes its writes have handed to the kernel.
fn client_counting(to: SocketAddr, id: u32, len: usize, written: Arc<AtomicU64>) -> Client {
    let c = TcpStream::connect(to).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut data = id.to_le_bytes().to_vec();
        data.extend_from_slice(&pattern(id, len));
        for block in data.chunks(64 << 10) {
            w.write_all(block)?;
            written.fetch_add(block.len() as u64, Ordering::SeqCst);
        }
        w.shutdown(Shutdown::Write)
    });
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    });
    (c, reader, writer)
}

fn expected(id: u32, len: usize) -> Vec<u8> {
    let mut data = id.to_le_bytes().to_vec();
    data.extend_from_slice(&pattern(id, len));
    data.iter().map(|b| b.wrapping_add(1)).collect()
}

type Run = tokio::task::JoinHandle<Result<RelayReport, RelayFailure>>;

/// Sets a relay up to `deliver` through `via` (the daemon or a proxy in
/// front of it) and starts it: the address QEMU would migrate to, and the run.
fn start_relay(
    rt: &tokio::runtime::Runtime,
    via: SocketAddr,
    deliver: SocketAddr,
    opts: impl FnOnce(&mut SourceOptions),
) -> (SocketAddr, Run) {
    let mut o = source_opts(via, deliver, false, 2);
    opts(&mut o);
    let ready = rt
        .block_on(prepare_source(&o))
        .expect("the relay is set up");
    let listen = ready.listen;
    (listen, rt.spawn(ready.run()))
}

fn finish(rt: &tokio::runtime::Runtime, run: Run) -> Result<RelayReport, RelayFailure> {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), run).await })
        .expect("the relay ends")
        .expect("the relay task")
}

fn join(clients: Vec<Client>) -> Vec<std::io::Result<Vec<u8>>> {
    clients
        .into_iter()
        .map(|(_c, r, w)| {
            let _ = w.join().unwrap();
            r.join().unwrap()
        })
        .collect()
}

/// A relay carrying `streams` clients of `len` bytes each, opened one after
/// another as QEMU opens its channels (main first).
fn relay_streams(
    rt: &tokio::runtime::Runtime,
    via: SocketAddr,
    deliver: SocketAddr,
    opts: impl FnOnce(&mut SourceOptions),
    streams: u32,
    len: usize,
) -> (
    Result<RelayReport, RelayFailure>,
    Vec<std::io::Result<Vec<u8>>>,
) {
    let (listen, run) = start_relay(rt, via, deliver, opts);
    let clients: Vec<_> = (0..streams).map(|id| client(listen, id, len)).collect();
    let results = join(clients);
    (finish(rt, run), results)
}

#[test]
fn many_streams_each_way_with_half_close_arrive_whole_and_in_accept_order() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    let len = 3 << 20;
    let (report, results) = relay_streams(&rt, addr, e.addr, |_| {}, 6, len);
    let report = report.expect("every stream delivered");
    for (id, r) in results.into_iter().enumerate() {
        let got = r.expect("the echo");
        assert!(
            got == expected(id as u32, len),
            "stream {id}: bytes differ ({} vs {})",
            got.len(),
            len + 4
        );
    }
    let mut order = e.order.lock().unwrap().clone();
    order.sort_unstable();
    assert_eq!(
        order,
        (0..6).map(|i| (i, i)).collect::<Vec<_>>(),
        "the destination accepts stream k as its k-th connection"
    );
    assert_eq!(
        e.accepted.load(Ordering::SeqCst),
        6,
        "no connection of its own"
    );
    assert!(e.errors.lock().unwrap().is_empty());
    assert_eq!(report.streams.len(), 6);
    for s in &report.streams {
        assert_eq!(s.forward_bytes, len as u64 + 4, "{s:?}");
        assert_eq!(s.back_bytes, len as u64 + 4, "{s:?}");
        // Per-stream metrics: chunks cut and sent each way, none resent or
        // received twice without a failover.
        assert!(s.chunks_sent > 0 && s.chunks_received > 0, "{s:?}");
        assert_eq!((s.chunks_resent, s.duplicates_dropped), (0, 0), "{s:?}");
    }
    assert_eq!(
        report.streams.iter().map(|s| s.chunks_sent).sum::<u64>(),
        report.channels.iter().map(|c| c.chunks_sent).sum::<u64>(),
        "every chunk a stream cut went out on one channel"
    );
    assert_eq!(report.channels.len(), 2);
    assert!(
        report.channels.iter().all(|c| c.chunks_sent > 0),
        "both channels carry chunks: {:?}",
        report.channels
    );
}

#[test]
fn tls_and_compression_carry_the_same_bytes() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, false);
    let e = echo(None, Arc::default());
    let len = 2 << 20;
    let (report, results) = relay_streams(
        &rt,
        addr,
        e.addr,
        |o| {
            o.tls = Some(Arc::new(TlsConfig::from_psk(&key()).unwrap()));
            o.compression = Some("lz4".parse().unwrap());
        },
        2,
        len,
    );
    let report = report.expect("every stream delivered");
    for (id, r) in results.into_iter().enumerate() {
        assert!(r.unwrap() == expected(id as u32, len), "stream {id}");
    }
    assert!(report.encrypted);
    assert!(report.option.contains("lz4"), "{}", report.option);
}

#[test]
fn a_deliver_to_outside_relay_allow_is_refused_before_anything_is_sent() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let o = source_opts(addr, "192.0.2.7:4444".parse().unwrap(), false, 1);
    let e = rt.block_on(prepare_source(&o)).expect_err("refused");
    match &e {
        RelayFailure::Transport(TransportError::Rejected { reason, message }) => {
            assert_eq!(*reason, RejectReason::RelayNotAllowed);
            assert!(
                message.contains("192.0.2.7:4444") && message.contains("127.0.0.0/8"),
                "{message}"
            );
        }
        e => panic!("{e}"),
    }
    assert_eq!(e.reason(), "relay_not_allowed");
}

#[test]
fn relay_allow_admits_what_it_names() {
    let rt = rt();
    let (addr, _d, dest) = daemon(&rt, true);
    dest.set_relay_allow(vec!["192.0.2.0/24".parse().unwrap()]);
    let o = source_opts(addr, "127.0.0.1:4444".parse().unwrap(), false, 1);
    let e = rt
        .block_on(prepare_source(&o))
        .expect_err("loopback no longer allowed");
    assert!(e.to_string().contains("relay-allow 192.0.2.0/24"), "{e}");
}

#[test]
fn a_corrupt_chunk_fails_its_channel_and_the_others_carry_its_bytes() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    let hit = Arc::new(AtomicUsize::new(0));
    let h = hit.clone();
    let proxy = Proxy::start(
        addr,
        Box::new(move |f| {
            // The first stream bytes toward the destination on a data
            // channel, past its handshake: flip one byte.
            // (The proxy hands its hook the first bytes it cannot parse,
            // then copies the rest as it comes: the first stream chunk.)
            if matches!(f.kind, Kind::Raw)
                && f.dir == Dir::ToDest
                && f.bytes.len() >= 16
                && h.fetch_add(1, Ordering::SeqCst) == 0
            {
                f.bytes[12] ^= 0x40;
            }
            Verdict::Forward
        }),
    );
    let len = 2 << 20;
    let (report, results) = relay_streams(&rt, proxy.addr(), e.addr, |_| {}, 2, len);
    assert!(hit.load(Ordering::SeqCst) > 0, "the proxy saw stream bytes");
    let report = report.expect("delivered over the surviving channel");
    for (id, r) in results.into_iter().enumerate() {
        assert!(r.unwrap() == expected(id as u32, len), "stream {id}");
    }
    let failed: Vec<_> = report
        .channels
        .iter()
        .filter(|c| c.failed.is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", report.channels);
    assert!(report.resent_chunks > 0, "{report:?}");
}

#[test]
fn a_hypervisor_that_does_not_read_stops_the_other_one_writing() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let gate = Arc::new(AtomicBool::new(false));
    let e = echo(Some(gate.clone()), Arc::default());
    let window = 256 << 10;
    let (listen, run) = start_relay(&rt, addr, e.addr, |o| o.window = window);
    let len = 96 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let c = client_counting(listen, 0, len, written.clone());
    // Wait until the writer stops making progress.
    let mut last = u64::MAX;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(100));
        let now = written.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let stuck = written.load(Ordering::SeqCst);
    // Socket buffers on both hosts (loopback autotuning: a few MiB each)
    // plus one window: far below the 96 MiB it tries to write.
    assert!(
        stuck < 32 << 20,
        "the source kept writing ({stuck} bytes) while the destination read nothing"
    );
    gate.store(true, Ordering::SeqCst);
    let results = join(vec![c]);
    assert!(
        results[0].as_ref().unwrap() == &expected(0, len),
        "every byte, in order, after the stall"
    );
    let report = finish(&rt, run).expect("delivered");
    // The stall is in the report: the source's reader waited for credit.
    assert!(
        report.streams[0].waited_for_window_s > 0.0,
        "{:?}",
        report.streams[0]
    );
}

#[test]
fn a_channel_cut_mid_stream_fails_over_to_the_others() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let read = Arc::new(AtomicU64::new(0));
    let e = echo(None, read.clone());
    let proxy = Proxy::transparent(addr);
    let (listen, run) = start_relay(&rt, proxy.addr(), e.addr, |o| {
        o.multichannel.channels = ChannelCount::Fixed(3)
    });
    let len = 48 << 20;
    let c = client(listen, 0, len);
    wait_bytes(&read, 4 << 20);
    // Connection 0 is the control connection; 1..=3 the data channels.
    proxy.cut(2);
    let results = join(vec![c]);
    let report = finish(&rt, run).expect("delivered over the others");
    assert!(results[0].as_ref().unwrap() == &expected(0, len));
    let failed: Vec<_> = report
        .channels
        .iter()
        .filter(|c| c.failed.is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", report.channels);
    assert_eq!(
        report.streams[0].chunks_resent, report.resent_chunks,
        "the resends are counted against their stream: {report:?}"
    );
}

/// Reads until the connection ends; the error kind if it did not end cleanly.
/// Whether a client saw its connection reset: its reader, or its writer
/// (the first call to hit the reset takes the error; a read after a writer
/// took it sees the end of a closed socket).
fn reset_seen(c: Client) -> bool {
    let (_c, r, w) = c;
    let w = w.join().unwrap();
    let r = r.join().unwrap();
    let reset = |k: ErrorKind| matches!(k, ErrorKind::ConnectionReset | ErrorKind::BrokenPipe);
    let seen = r.as_ref().err().is_some_and(|e| reset(e.kind()))
        || w.as_ref().err().is_some_and(|e| reset(e.kind()));
    if !seen {
        eprintln!("reader: {:?}, writer: {w:?}", r.map(|v| v.len()));
    }
    seen
}

#[test]
fn losing_every_channel_resets_both_hypervisors_connections() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let read = Arc::new(AtomicU64::new(0));
    let e = echo(None, read.clone());
    let proxy = Proxy::transparent(addr);
    let (listen, run) = start_relay(&rt, proxy.addr(), e.addr, |o| {
        o.multichannel.channels = ChannelCount::Fixed(1)
    });
    let c = client(listen, 0, 256 << 20);
    // A second stream that has sent all it had and waits for an answer, as
    // QEMU's main channel waits on its return path: nothing unread at the
    // relay, so only SO_LINGER 0 turns its close into a reset.
    let mut waiting = TcpStream::connect(listen).unwrap();
    waiting.write_all(&1u32.to_le_bytes()).unwrap();
    wait_bytes(&read, 1 << 20);
    std::thread::sleep(Duration::from_millis(200));
    proxy.cut(1);
    let err = finish(&rt, run).expect_err("no channel left");
    // Whichever side notices first says so; the other reports its abort.
    assert!(err.to_string().contains("no data channel left"), "{err}");
    assert!(
        reset_seen(c),
        "the source hypervisor sees a reset, not an end"
    );
    let mut rest = Vec::new();
    let r = waiting.read_to_end(&mut rest);
    assert_eq!(
        r.map_err(|e| e.kind()).map(|_| rest.len()),
        Err(ErrorKind::ConnectionReset),
        "a waiting hypervisor connection is reset, not ended"
    );
    wait_destination_reset(&e);
}

/// Waits until the destination hypervisor has read `bytes`.
fn wait_bytes(read: &AtomicU64, bytes: u64) {
    while read.load(Ordering::SeqCst) < bytes {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the destination hypervisor's connection was reset.
fn wait_destination_reset(e: &Echo) {
    wait_for(
        || {
            e.errors
                .lock()
                .unwrap()
                .contains(&ErrorKind::ConnectionReset)
        },
        "the destination hypervisor sees a reset",
    );
}

fn wait_for(f: impl Fn() -> bool, what: &str) {
    for _ in 0..500 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out: {what}");
}

/// A relay carrying one long stream to an echo hypervisor, the first MiB
/// already delivered: (the daemon's task, the echo, the relay, the source
/// hypervisor's connection).
fn streaming(rt: &tokio::runtime::Runtime) -> (tokio::task::JoinHandle<()>, Echo, Run, Client) {
    let (addr, daemon_task, _) = daemon(rt, true);
    let read = Arc::new(AtomicU64::new(0));
    let e = echo(None, read.clone());
    let (listen, run) = start_relay(rt, addr, e.addr, |_| {});
    let c = client(listen, 0, 256 << 20);
    wait_bytes(&read, 1 << 20);
    (daemon_task, e, run, c)
}

#[test]
fn the_destination_gone_resets_the_source_hypervisors_connections() {
    let rt = rt();
    let (daemon_task, _e, run, c) = streaming(&rt);
    daemon_task.abort();
    let err = finish(&rt, run).expect_err("the destination is gone");
    assert!(
        reset_seen(c),
        "the source hypervisor sees a reset, not an end: {err}"
    );
}

#[test]
fn the_source_relay_gone_resets_the_destination_hypervisors_connections() {
    let rt = rt();
    let (_d, e, run, c) = streaming(&rt);
    run.abort();
    wait_destination_reset(&e);
    drop(c);
}

// Buffers booked per opened stream against the destination's --memory-limit.

/// Window and channels of the memory cases (`source_opts`' chunk of 64 KiB).
const MEM_WINDOW: u32 = 1 << 20;
const MEM_CHANNELS: u16 = 2;
/// What one opened stream books: two windows.
const PER_STREAM: u64 = 2 * MEM_WINDOW as u64;
/// What admission books: the main stream's windows and, per data channel,
/// its 64 KiB read buffer and a 64 KiB chunk.
const ADMISSION: u64 = PER_STREAM + MEM_CHANNELS as u64 * (2 * (64 << 10));

/// A daemon whose `--memory-limit` holds two streams at a time (booking
/// `max_streams` x 2 windows at admission, 130 MiB here, would refuse the
/// relay outright), and a relay set up to it.
fn memory_bed(rt: &tokio::runtime::Runtime, e: &Echo) -> (Arc<Destination>, SocketAddr, Run) {
    let (addr, _d, dest) = daemon_limited(rt, true, ADMISSION + PER_STREAM);
    let (listen, run) = start_relay(rt, addr, e.addr, |o| {
        o.window = MEM_WINDOW;
        o.multichannel.channels = ChannelCount::Fixed(MEM_CHANNELS);
    });
    wait_for(
        || dest.memory_reserved() == ADMISSION,
        "admission books the main stream's windows and the channels' buffers",
    );
    (dest, listen, run)
}

/// A hypervisor connection that sent its id and waits (as QEMU's main
/// channel waits on its return path).
fn held(to: SocketAddr, id: u32) -> TcpStream {
    let mut c = TcpStream::connect(to).unwrap();
    c.write_all(&id.to_le_bytes()).unwrap();
    c
}

/// Whether a connection was reset: on a write of `id`, or on reading it
/// to its end.
fn reset_on_write_or_read(mut c: TcpStream, id: u32) -> bool {
    if let Err(e) = c.write_all(&id.to_le_bytes()) {
        return e.kind() == ErrorKind::ConnectionReset;
    }
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).map_err(|e| e.kind()) == Err(ErrorKind::ConnectionReset)
}

#[test]
fn streams_book_their_windows_as_they_open_and_give_them_back_as_they_end() {
    let rt = rt();
    let e = echo(None, Arc::default());
    let (dest, listen, run) = memory_bed(&rt, &e);
    let mut main = held(listen, 0);
    let len = 4 << 20;
    // Stream 1 opens beside the main stream (both fit), carries its bytes
    // and ends: its windows go back.
    let one = client(listen, 1, len);
    wait_for(
        || dest.memory_reserved() == ADMISSION + PER_STREAM,
        "stream 1 books its two windows when it opens",
    );
    let got = join(vec![one]);
    assert!(got[0].as_ref().unwrap() == &expected(1, len), "stream 1");
    wait_for(
        || dest.memory_reserved() == ADMISSION,
        "stream 1's windows given back when it ended",
    );
    // So stream 2 fits where stream 1 was.
    let got = join(vec![client(listen, 2, len)]);
    assert!(got[0].as_ref().unwrap() == &expected(2, len), "stream 2");
    main.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    main.read_to_end(&mut back).unwrap();
    assert_eq!(back, expected(0, 0), "the main stream's echo");
    let report = finish(&rt, run).expect("every stream delivered");
    assert_eq!(report.streams.len(), 3);
    wait_for(
        || dest.memory_reserved() == 0,
        "everything given back at the end",
    );
}

#[test]
fn a_relay_whose_main_stream_does_not_fit_is_refused_at_admission_naming_the_limit() {
    let rt = rt();
    let (addr, _d, dest) = daemon_limited(&rt, true, ADMISSION - 1);
    let mut o = source_opts(addr, "127.0.0.1:9".parse().unwrap(), false, MEM_CHANNELS);
    o.window = MEM_WINDOW;
    let e = rt.block_on(prepare_source(&o)).expect_err("refused");
    match &e {
        RelayFailure::Transport(TransportError::Rejected { reason, message }) => {
            assert_eq!(*reason, RejectReason::MemoryLimit);
            assert!(
                message.contains("relay buffers of 2.25 MiB")
                    && message.contains("--memory-limit of 2.25 MiB (2359295 bytes)"),
                "{message}"
            );
        }
        e => panic!("{e}"),
    }
    assert_eq!(
        dest.memory_reserved(),
        0,
        "nothing booked for a refused relay"
    );
}

#[test]
fn a_stream_past_the_memory_limit_is_refused_naming_it_and_both_sides_fail() {
    let rt = rt();
    let e = echo(None, Arc::default());
    let (dest, listen, run) = memory_bed(&rt, &e);
    let streams = vec![held(listen, 0), held(listen, 1)];
    wait_for(
        || e.accepted.load(Ordering::SeqCst) == 2,
        "two streams open",
    );
    // A third at once: above the limit (the relay may reset it before
    // its first bytes are written).
    let third = TcpStream::connect(listen).unwrap();
    let err = finish(&rt, run).expect_err("stream 2 does not fit");
    assert_eq!(
        err.reason(),
        "peer_aborted",
        "the destination's reason: {err}"
    );
    let err = err.to_string();
    assert!(
        err.contains("stream 2 refused") && err.contains("--memory-limit of 4.25 MiB"),
        "{err}"
    );
    assert!(
        !err.contains("relay protocol"),
        "a limit, not a broken rule: {err}"
    );
    // Both hypervisors see a failed migration: every connection reset.
    for (id, mut c) in streams.into_iter().enumerate() {
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest).map_err(|e| e.kind());
        assert_eq!(r, Err(ErrorKind::ConnectionReset), "source stream {id}");
    }
    assert!(reset_on_write_or_read(third, 2), "source stream 2 reset");
    wait_destination_reset(&e);
    assert_eq!(
        e.accepted.load(Ordering::SeqCst),
        2,
        "the refused stream never reached the destination hypervisor"
    );
    wait_for(
        || dest.memory_reserved() == 0,
        "the failed relay's bookings given back",
    );
    wait_for(
        || {
            dest.metrics()
                .render()
                .contains("ferry_migrations_aborted_total{reason=\"memory_limit\"} 1")
        },
        "the daemon counts the relay as failed on its memory limit",
    );
}

#[test]
fn the_daemons_metrics_show_each_relay_stream_while_it_runs_and_its_totals_after() {
    let rt = rt();
    let (addr, _d, dest) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    let (listen, run) = start_relay(&rt, addr, e.addr, |_| {});
    let text = || dest.metrics().render();
    let bytes = |stream: u32, dir: &str, n: usize| {
        format!("ferry_relay_stream_bytes_total{{stream=\"{stream}\",direction=\"{dir}\"}} {n}\n")
    };
    let mut main = held(listen, 0);
    let len = 2 << 20;
    let got = join(vec![client(listen, 1, len)]);
    assert!(got[0].as_ref().unwrap() == &expected(1, len), "stream 1");
    // While the relay runs: stream 1 done, the main stream still open.
    wait_for(
        || text().contains("ferry_relay_streams_open 1\n"),
        "one stream open",
    );
    let t = text();
    for want in [bytes(1, "forward", len + 4), bytes(1, "back", len + 4)] {
        assert!(t.contains(&want), "{want} in\n{t}");
    }
    wait_for(
        || text().contains(&bytes(0, "forward", 4)),
        "the main stream's bytes so far",
    );
    main.shutdown(Shutdown::Write).unwrap();
    main.read_to_end(&mut Vec::new()).unwrap();
    finish(&rt, run).expect("delivered");
    // After it: none open, its figures kept as totals.
    wait_for(
        || text().contains("ferry_relay_streams_open 0\n"),
        "no stream open",
    );
    let t = text();
    for want in [
        bytes(0, "forward", 4),
        bytes(0, "back", 4),
        bytes(1, "forward", len + 4),
        bytes(1, "back", len + 4),
    ] {
        assert!(t.contains(&want), "{want} in\n{t}");
    }
    for wait in ["deliver", "window", "hypervisor"] {
        let want =
            format!("ferry_relay_stream_wait_seconds_total{{stream=\"1\",wait=\"{wait}\"}} ");
        assert!(t.contains(&want), "{want} in\n{t}");
    }
}

// The `ferry relay` command against a `ferry listen` process.

const LONG: Duration = Duration::from_secs(60);

fn relay_proc(
    key: &std::path::Path,
    to: SocketAddr,
    deliver: &str,
    extra: &[&str],
) -> ferry_tests::Proc {
    let to = to.to_string();
    let mut args = vec![
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--deliver-to",
        deliver,
        "--auth-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ferry_tests::Proc::start(&args)
}

/// The address the relay printed as ready.
fn ready_addr(p: &ferry_tests::Proc) -> SocketAddr {
    let text = p.wait_for_output("relay: ready, migrate to tcp:", LONG);
    let rest = text.split("migrate to tcp:").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn relay_cli_carries_streams_and_exits_zero_with_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let key = ferry_tests::key_file(dir.path(), "key", KEY);
    let (dest, addr) = ferry_tests::listen(&key, &[]);
    let e = echo(None, Arc::default());
    let json = dir.path().join("relay.json");
    let p = relay_proc(
        &key,
        addr,
        &e.addr.to_string(),
        &["--channels", "3", "--json", json.to_str().unwrap()],
    );
    let listen = ready_addr(&p);
    let len = 4 << 20;
    let results = join((0..3).map(|id| client(listen, id, len)).collect());
    for (id, r) in results.into_iter().enumerate() {
        assert!(r.unwrap() == expected(id as u32, len), "stream {id}");
    }
    let out = p.wait(LONG);
    assert!(out.status.success(), "{}", out.all());
    assert!(
        out.stdout
            .contains("relay: done: 3 streams delivered and checked"),
        "{}",
        out.all()
    );
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(rec["outcome"], "delivered");
    assert_eq!(rec["report"]["streams"].as_array().unwrap().len(), 3);
    assert_eq!(rec["report"]["channels"].as_array().unwrap().len(), 3);
    assert!(
        rec["report"]["encrypted"].as_bool().unwrap(),
        "TLS by default"
    );
    let d = dest.wait(LONG);
    assert!(d.status.success(), "listen --once: {}", d.all());
    assert!(!d.panicked());
}

#[test]
fn relay_cli_refuses_a_deliver_to_outside_relay_allow_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let key = ferry_tests::key_file(dir.path(), "key", KEY);
    let (dest, addr) = ferry_tests::listen(&key, &["--relay-allow", "10.99.0.0/16"]);
    let e = echo(None, Arc::default());
    let p = relay_proc(&key, addr, &e.addr.to_string(), &[]);
    let out = p.wait(LONG);
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("relay destination not allowed")
            && out.stderr.contains(&e.addr.to_string())
            && out.stderr.contains("--relay-allow 10.99.0.0/16"),
        "{}",
        out.all()
    );
    assert!(!out.stdout.contains("ready"), "never ready: {}", out.all());
    assert_eq!(
        e.accepted.load(Ordering::SeqCst),
        0,
        "nothing connected to the hypervisor"
    );
    let d = dest.wait(LONG);
    assert!(!d.panicked(), "{}", d.all());
}

#[test]
fn relay_cli_destination_killed_resets_the_source_hypervisor_and_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = ferry_tests::key_file(dir.path(), "key", KEY);
    let (dest, addr) = ferry_tests::daemon(&key, &[]);
    let read = Arc::new(AtomicU64::new(0));
    let e = echo(None, read.clone());
    let p = relay_proc(
        &key,
        addr,
        &e.addr.to_string(),
        &["--performance-option", "tcp"],
    );
    let listen = ready_addr(&p);
    let c = client(listen, 0, 1 << 30);
    wait_bytes(&read, 1 << 20);
    ferry_tests::sigkill(dest.pid());
    let out = p.wait(LONG);
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    assert!(out.stderr.contains("relay failed"), "{}", out.all());
    assert!(!out.panicked(), "{}", out.all());
    assert!(
        reset_seen(c),
        "the source hypervisor sees a reset: {}",
        out.all()
    );
    let _ = dest.wait(Duration::from_secs(5));
}

#[test]
fn a_silent_control_connection_fails_the_relay_and_resets_the_hypervisor() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    // The control connection (the proxy's connection 0) stops carrying
    // anything either way once the first stream opens, sockets kept open:
    // a peer host gone silent. The data channels stay up.
    let proxy = Proxy::start(
        addr,
        Box::new(|f| {
            if f.conn == 0 && f.msg_name() == Some("Open") {
                Verdict::Stall
            } else {
                Verdict::Forward
            }
        }),
    );
    let (listen, run) = start_relay(&rt, proxy.addr(), e.addr, |o| {
        o.timeout = Duration::from_secs(2)
    });
    let c = client(listen, 0, 8 << 20);
    let err = finish(&rt, run).expect_err("a silent peer fails the relay");
    assert!(
        err.to_string().contains("relay's control connection"),
        "{err}"
    );
    assert!(reset_seen(c), "the hypervisor's connection is reset");
}

#[test]
fn an_idle_relay_outlives_its_peer_timeout() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    let (listen, run) = start_relay(&rt, addr, e.addr, |o| o.timeout = Duration::from_secs(1));
    // Three peer timeouts with nothing to carry: the pings keep it alive.
    std::thread::sleep(Duration::from_secs(3));
    let len = 1 << 20;
    let results = join(vec![client(listen, 0, len)]);
    assert!(results[0].as_ref().unwrap() == &expected(0, len));
    finish(&rt, run).expect("delivered after the idle time");
}

/// A client whose bytes compress well (text), checked against the echo.
fn text_client(to: SocketAddr, id: u32, len: usize) -> (Vec<u8>, Client) {
    let line = b"QEMU RAM page: the quick brown fox jumps over the lazy dog 0123456789\n";
    let mut data = id.to_le_bytes().to_vec();
    data.extend(line.iter().cycle().take(len));
    let want = data.iter().map(|b| b.wrapping_add(1)).collect();
    let c = TcpStream::connect(to).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    });
    (want, (c, reader, writer))
}

#[test]
fn compression_shrinks_what_shrinks_and_stops_trying_what_does_not() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    // A cap of 8 MiB/s is the link: a backlog, so compressing pays.
    let (listen, run) = start_relay(&rt, addr, e.addr, |o| {
        o.compression = Some("lz4".parse().unwrap());
        o.bandwidth_limit = Some(8 << 20);
    });
    let len = 3 << 20;
    let (want, text) = text_client(listen, 0, len);
    let random = client(listen, 1, len);
    let got = join(vec![text, random]);
    assert!(got[0].as_ref().unwrap() == &want, "the text stream");
    assert!(
        got[1].as_ref().unwrap() == &expected(1, len),
        "the random stream"
    );
    let report = finish(&rt, run).expect("delivered");
    let (t, r) = (&report.streams[0], &report.streams[1]);
    assert!(t.chunks_compressed > 0, "text compresses: {t:?}");
    assert_eq!(t.chunks_raw_skipped, 0, "{t:?}");
    assert_eq!(r.chunks_compressed, 0, "{r:?}");
    // After a chunk that did not shrink, the next ones go untried.
    assert!(r.chunks_raw_skipped > 0, "{r:?}");
    assert!(
        r.chunks_raw_incompressible * 4 < r.chunks_sent,
        "random bytes tried again and again: {r:?}"
    );
    assert!(
        report.wire_bytes < report.stream_bytes,
        "{} on the wire for {} stream bytes",
        report.wire_bytes,
        report.stream_bytes
    );
}

#[test]
fn compression_sends_raw_while_the_link_is_idle() {
    let rt = rt();
    let (addr, _d, _) = daemon(&rt, true);
    let e = echo(None, Arc::default());
    let (listen, run) = start_relay(&rt, addr, e.addr, |o| {
        o.compression = Some("lz4".parse().unwrap())
    });
    // The first chunk finds an empty socket: the link is idle, and a chunk
    // compressed then would only cost CPU.
    let (want, text) = text_client(listen, 0, 1 << 20);
    let got = join(vec![text]);
    assert!(got[0].as_ref().unwrap() == &want);
    let report = finish(&rt, run).expect("delivered");
    let s = &report.streams[0];
    assert!(s.chunks_raw_link_idle > 0, "{s:?}");
    assert_eq!(
        s.chunks_compressed
            + s.chunks_raw_incompressible
            + s.chunks_raw_skipped
            + s.chunks_raw_link_idle
            + s.chunks_raw_low_yield,
        s.chunks_sent,
        "every chunk is counted once: {s:?}"
    );
}
