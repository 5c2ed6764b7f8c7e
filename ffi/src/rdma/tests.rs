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
            let pd = d.protection_domain().unwrap();
            // One protection domain per device context.
            let pd2 = d.protection_domain().unwrap();
            assert!(pd.same_as(&pd2.pd));
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
        let e = RdmaListener::bind("0.0.0.0:0".parse().unwrap(), ConnectionOptions::default())
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
    assert_eq!(remote.checked_addr(0, 1 << 20).unwrap(), mr.addr());
    assert!(remote.checked_addr(1, 1 << 20).is_err());
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
        let mut listener = RdmaListener::bind(addr, ConnectionOptions::default()).unwrap();
        let pd = listener
            .protection_domain()
            .expect("bound to a device address")
            .unwrap();
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
