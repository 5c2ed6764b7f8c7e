//! Tests that run everywhere: on a host without RDMA they check the clear
//! "unavailable" errors and skip the device tests **loudly**; inside the
//! soft-RoCE VMs (`ci/softroce/`) they run for real. The loopback test needs
//! `FERRY_RDMA_TEST_ADDR=<IP of an RDMA NIC>`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use vm_memory::Bytes;

use super::*;

/// `Some(reason)` when this machine has no usable RDMA.
fn unavailable() -> Option<String> {
    match list_devices() {
        Ok(_) => None,
        Err(e) if e.is_unavailable() => Some(e.to_string()),
        Err(e) => panic!("list_devices failed with an unexpected error: {e}"),
    }
}

/// Prints past the test harness' output capture (straight to the terminal
/// or CI log), so a skipped device test is visible in every run.
fn loud(msg: &str) {
    use std::io::Write;
    let line = format!("\n*** SKIPPED RDMA DEVICE TEST: {msg}\n");
    match std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
        Ok(mut f) => drop(f.write_all(line.as_bytes())),
        Err(_) => eprintln!("{line}"),
    }
}

macro_rules! skip_loudly {
    ($why:expr) => {{
        loud(&format!("{} (runs for real in ci/softroce)", $why));
        return;
    }};
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn list_devices_reports_clearly() {
    match list_devices() {
        Ok(devs) => {
            assert!(!devs.is_empty());
            eprintln!("RDMA devices: {devs:?}");
        }
        Err(e) => {
            assert!(e.is_unavailable(), "unexpected error: {e}");
            let msg = e.to_string();
            assert!(msg.starts_with("RDMA unavailable: "), "{msg}");
            // Names what is missing: the library or the device.
            assert!(
                msg.contains(LIBIBVERBS)
                    || msg.contains(LIBRDMACM)
                    || msg.contains("no RDMA device"),
                "{msg}"
            );
            eprintln!("no RDMA on this machine, as reported: {msg}");
        }
    }
}

#[test]
fn open_device_without_rdma_is_an_error_not_a_panic() {
    match Device::open(None) {
        Ok(d) => {
            // No process-wide domain: each call (each migration) gets its own.
            let pd = d.protection_domain().unwrap();
            let pd2 = d.protection_domain().unwrap();
            assert!(!pd.is_same(&pd2));
            // One per device within one migration's set.
            let mine = Domains::new();
            let a = d.protection_domain_in(&mine).unwrap();
            let b = d.protection_domain_in(&mine).unwrap();
            assert!(a.is_same(&b));
            assert_eq!(mine.len(), 1);
            assert!(!a.is_same(&d.protection_domain_in(&Domains::new()).unwrap()));
        }
        Err(e) => assert!(e.is_unavailable(), "{e}"),
    }
    if unavailable().is_none() {
        let e = Device::open(Some("no-such-device")).unwrap_err();
        assert!(matches!(e, RdmaError::DeviceNotFound { .. }), "{e}");
    }
}

#[test]
fn listener_and_connect_without_rdma_fail_cleanly() {
    let Some(why) = unavailable() else {
        eprintln!("RDMA present: listener test covered by the loopback test");
        return;
    };
    rt().block_on(async {
        let e = RdmaListener::bind(
            "0.0.0.0:0".parse().unwrap(),
            ConnectionOptions::default(),
            &Domains::new(),
        )
        .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        let e = RdmaConnection::connect(
            None,
            "10.255.255.1:7471".parse().unwrap(),
            ConnectionOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(e.is_unavailable(), "{e}");
    });
    eprintln!("without RDMA, listener/connect report: {why}");
}

#[test]
fn register_and_write_in_range_on_a_device() {
    if let Some(why) = unavailable() {
        skip_loudly!(why);
    }
    let dev = Device::open(None).unwrap();
    let pd = dev.protection_domain().unwrap();
    let mr = pd
        .register(Arc::new(anon_buffer(1 << 20).unwrap()), Access::RemoteWrite)
        .unwrap();
    assert_eq!(mr.len(), 1 << 20);
    let remote = mr.remote_region();
    // Zero-based: the peer learns offsets, never this process's addresses.
    assert_eq!(remote.addr, 0);
    assert_ne!(mr.addr(), 0);
    assert_eq!(remote.checked_addr(4096, 4096).unwrap(), 4096);
    assert!(remote.checked_addr(1, 1 << 20).is_err());
    // Local-only registrations keep virtual addresses (nothing is told).
    let local = pd
        .register(Arc::new(anon_buffer(4096).unwrap()), Access::LocalRead)
        .unwrap();
    assert_eq!(local.iova(), local.addr());
    assert!(Segment::new(&mr, (1 << 20) - 8, 16).is_err());
    let seg = Segment::new(&mr, 4096, 4096).unwrap();
    assert_eq!(seg.len(), 4096);
    // Keep-alive: the segment holds the region after our handle is gone.
    let weak = Arc::downgrade(&mr);
    drop(mr);
    assert!(weak.upgrade().is_some());
    drop(seg);
    assert!(weak.upgrade().is_none());
}

fn test_addr() -> Option<IpAddr> {
    std::env::var("FERRY_RDMA_TEST_ADDR").ok()?.parse().ok()
}

#[test]
fn loopback_write_imm_and_send_recv() {
    if let Some(why) = unavailable() {
        skip_loudly!(why);
    }
    let Some(ip) = test_addr() else {
        skip_loudly!("RDMA device present but FERRY_RDMA_TEST_ADDR (IP of an RDMA NIC) is not set");
    };
    rt().block_on(async move {
        let addr = SocketAddr::new(ip, 18515);
        let mut listener =
            RdmaListener::bind(addr, ConnectionOptions::default(), &Domains::new()).unwrap();
        let pd = listener.protection_domain().clone();
        const LEN: usize = 4 << 20;
        let dst = pd
            .register(Arc::new(anon_buffer(LEN).unwrap()), Access::RemoteWrite)
            .unwrap();
        let ctrl_rx = pd
            .register(anon_buffer(4096).unwrap(), Access::LocalWrite)
            .unwrap();
        let remote = dst.remote_region();

        let server = async {
            let mut c = listener.accept().await.unwrap();
            c.post_recv(&[], 1).unwrap();
            c.post_recv(&[Segment::new(&ctrl_rx, 0, 4096).unwrap()], 2)
                .unwrap();
            let mut done = Vec::new();
            while done.len() < 2 {
                c.poll_completions(&mut done).await.unwrap();
            }
            (c, done)
        };
        let client = async {
            let mut c = RdmaConnection::connect(
                Some(SocketAddr::new(ip, 0)),
                addr,
                ConnectionOptions::default(),
            )
            .await
            .unwrap();
            let src = c
                .register(Arc::new(anon_buffer(LEN).unwrap()), Access::LocalRead)
                .unwrap();
            let vs = src.as_volatile_slice();
            for i in 0..LEN / 8 {
                vs.write_obj((i as u64).to_le(), i * 8).unwrap();
            }
            // Out of range: refused before anything is posted.
            let e = c
                .post_write(&src, 0, 4096, &remote, (LEN - 100) as u64, 9)
                .unwrap_err();
            assert!(matches!(e, RdmaError::RemoteOutOfRange { .. }), "{e}");
            assert_eq!(c.in_flight(), 0);
            // Scatter-gather: two halves of the first MiB in one request.
            let segs = [
                Segment::new(&src, 0, 1 << 19).unwrap(),
                Segment::new(&src, 1 << 19, 1 << 19).unwrap(),
            ];
            c.post_writes(&[WriteOp {
                segments: &segs,
                remote: &remote,
                remote_offset: 0,
                imm: None,
                wr_id: 10,
            }])
            .unwrap();
            let mut off = 1 << 20;
            let mut id = 11;
            while off < LEN {
                if off + (1 << 20) == LEN {
                    c.post_write_imm(&src, off, 1 << 20, &remote, off as u64, id, 0xC0FFEE)
                        .unwrap();
                } else {
                    c.post_write(&src, off, 1 << 20, &remote, off as u64, id)
                        .unwrap();
                }
                off += 1 << 20;
                id += 1;
            }
            let ctrl = c
                .register(anon_buffer(4096).unwrap(), Access::LocalRead)
                .unwrap();
            ctrl.as_volatile_slice().write_slice(b"hello", 0).unwrap();
            c.post_send(&[Segment::new(&ctrl, 0, 5).unwrap()], 99)
                .unwrap();
            let mut done = Vec::new();
            while c.in_flight() > 0 {
                c.poll_completions(&mut done).await.unwrap();
            }
            for d in &done {
                d.ok().unwrap();
            }
            (c, done.len())
        };
        let ((_sc, sdone), (_cc, n)) = tokio::join!(server, client);
        // 1 scatter-gather WRITE + 2 WRITEs + 1 WRITE_WITH_IMM + 1 SEND.
        assert_eq!(n, 5);
        let imm = sdone
            .iter()
            .find(|d| d.kind == WorkKind::RecvImm)
            .expect("RecvImm completion");
        assert_eq!(imm.imm, Some(0xC0FFEE));
        let recv = sdone
            .iter()
            .find(|d| d.kind == WorkKind::Recv)
            .expect("Recv completion");
        assert_eq!(recv.byte_len, 5);
        let mut hello = [0u8; 5];
        ctrl_rx
            .as_volatile_slice()
            .read_slice(&mut hello, 0)
            .unwrap();
        assert_eq!(&hello, b"hello");
        let vs = dst.as_volatile_slice();
        for i in 0..LEN / 8 {
            let v: u64 = vs.read_obj(i * 8).unwrap();
            assert_eq!(u64::from_le(v), i as u64, "word {i}");
        }
        eprintln!("loopback RDMA on {ip}: {LEN} bytes written and verified");
    });
}

fn loopback_ip() -> Option<IpAddr> {
    if let Some(why) = unavailable() {
        loud(&format!("{why} (runs for real in ci/softroce)"));
        return None;
    }
    let ip = test_addr();
    if ip.is_none() {
        loud("RDMA device present but FERRY_RDMA_TEST_ADDR (IP of an RDMA NIC) is not set");
    }
    ip
}

/// Writes `len` bytes of `src` to `remote` and waits for the completion.
async fn write_once(
    c: &mut RdmaConnection,
    src: &Arc<MemoryRegion<Arc<AnonBuffer>>>,
    remote: &RemoteRegion,
    len: usize,
    wr_id: u64,
) -> Completion {
    c.post_write(src, 0, len, remote, 0, wr_id).unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        if let Err(e) = c.poll_completions(&mut done).await {
            panic!("polling: {e}");
        }
    }
    done[0]
}

#[test]
fn loopback_listener_refuses_requests_without_the_token_and_keeps_waiting() {
    let Some(ip) = loopback_ip() else { return };
    rt().block_on(async move {
        let addr = SocketAddr::new(ip, 18516);
        let mut listener =
            RdmaListener::bind(addr, ConnectionOptions::default(), &Domains::new()).unwrap();
        const TOKEN: &[u8] = b"the right token for channel 0";
        let server = async {
            let mut seen = Vec::new();
            let c = listener
                .accept_checked(|r| {
                    seen.push((r.peer, r.private_data.to_vec()));
                    if r.private_data.starts_with(TOKEN) {
                        Ok(())
                    } else {
                        Err("no token".into())
                    }
                })
                .await
                .unwrap();
            (c, seen)
        };
        let client = async {
            let src = Some(SocketAddr::new(ip, 0));
            let opts = ConnectionOptions::default;
            // No private data, then a wrong token: refused, and told so.
            for data in [&b""[..], b"the wrong token"] {
                let e = RdmaConnection::connect_with(src, addr, opts(), &Domains::new(), data)
                    .await
                    .unwrap_err();
                assert!(matches!(e, RdmaError::Refused { .. }), "{e}");
            }
            // Too much private data never leaves.
            let e = RdmaConnection::connect_with(src, addr, opts(), &Domains::new(), &[7; 57])
                .await
                .unwrap_err();
            assert!(matches!(e, RdmaError::InvalidRequest { .. }), "{e}");
            // The right one is still accepted: the refusals took no slot.
            RdmaConnection::connect_with(src, addr, opts(), &Domains::new(), TOKEN)
                .await
                .unwrap()
        };
        let ((conn, seen), _client) = tokio::join!(server, client);
        assert_eq!(listener.refused(), 2);
        assert_eq!(seen.len(), 3);
        // rdma_cm passes the private data (zero-padded) and the peer's IP.
        assert!(seen[2].1.starts_with(TOKEN), "{:?}", seen[2].1);
        assert_eq!(seen[2].0.map(|a| a.ip()), Some(ip));
        assert!(conn
            .protection_domain()
            .is_same(listener.protection_domain()));
        eprintln!(
            "loopback RDMA on {ip}: 2 requests without the token refused, the third accepted"
        );
    });
}

#[test]
fn loopback_deregistered_region_refuses_writes() {
    let Some(ip) = loopback_ip() else { return };
    rt().block_on(async move {
        let addr = SocketAddr::new(ip, 18517);
        let mut listener =
            RdmaListener::bind(addr, ConnectionOptions::default(), &Domains::new()).unwrap();
        let dst = listener
            .protection_domain()
            .register(Arc::new(anon_buffer(1 << 16).unwrap()), Access::RemoteWrite)
            .unwrap();
        let remote = dst.remote_region();
        assert_eq!(remote.addr, 0, "zero-based");
        let (server, client) = tokio::join!(
            listener.accept(),
            RdmaConnection::connect(
                Some(SocketAddr::new(ip, 0)),
                addr,
                ConnectionOptions::default()
            )
        );
        let _server = server.unwrap();
        let mut c = client.unwrap();
        let src = c
            .register(Arc::new(anon_buffer(1 << 16).unwrap()), Access::LocalRead)
            .unwrap();
        src.as_volatile_slice()
            .write_slice(&[0xab; 4096], 0)
            .unwrap();
        let ok = write_once(&mut c, &src, &remote, 4096, 1).await;
        assert!(ok.status.is_success(), "{:?}", ok.status);
        let mut b = [0u8; 4096];
        dst.as_volatile_slice().read_slice(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        // Revoked: deregistered, its rkey is dead, the write fails at the
        // destination's NIC (remote access error) and lands nothing.
        let host = Arc::clone(dst.owner());
        drop(dst);
        src.as_volatile_slice()
            .write_slice(&[0xcd; 4096], 0)
            .unwrap();
        let refused = write_once(&mut c, &src, &remote, 4096, 2).await;
        assert!(
            !refused.status.is_success(),
            "a write to a deregistered region succeeded"
        );
        eprintln!("write after deregistration: {}", refused.status);
        let vs = vm_memory::VolatileMemory::as_volatile_slice(&*host);
        vs.read_slice(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 0xab),
            "nothing of the refused write landed"
        );
    });
}

#[test]
fn loopback_another_migrations_domain_cannot_write() {
    let Some(ip) = loopback_ip() else { return };
    rt().block_on(async move {
        // Migration 1 registered its memory; migration 2's connection (an
        // accepted queue pair in migration 2's domain) tries migration 1's rkey.
        let (a, b) = (SocketAddr::new(ip, 18518), SocketAddr::new(ip, 18519));
        let la = RdmaListener::bind(a, ConnectionOptions::default(), &Domains::new()).unwrap();
        let mut lb = RdmaListener::bind(b, ConnectionOptions::default(), &Domains::new()).unwrap();
        assert!(!la.protection_domain().is_same(lb.protection_domain()));
        let victim = la
            .protection_domain()
            .register(Arc::new(anon_buffer(1 << 16).unwrap()), Access::RemoteWrite)
            .unwrap();
        let (server, client) = tokio::join!(
            lb.accept(),
            RdmaConnection::connect(
                Some(SocketAddr::new(ip, 0)),
                b,
                ConnectionOptions::default()
            )
        );
        let _server = server.unwrap();
        let mut c = client.unwrap();
        let src = c
            .register(Arc::new(anon_buffer(1 << 16).unwrap()), Access::LocalRead)
            .unwrap();
        src.as_volatile_slice()
            .write_slice(&[0xee; 4096], 0)
            .unwrap();
        let done = write_once(&mut c, &src, &victim.remote_region(), 4096, 1).await;
        assert!(
            !done.status.is_success(),
            "a write crossed protection domains"
        );
        let mut buf = [1u8; 4096];
        victim.as_volatile_slice().read_slice(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "nothing landed in the other migration's memory"
        );
        eprintln!("write into another migration's domain: {}", done.status);
    });
}
