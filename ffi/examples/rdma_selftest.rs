//! End-to-end RDMA self-test over one or more device pairs at once.
//!
//! ```text
//! rdma_selftest server --pair LOCAL_IP:PEER_IP [--pair ...] [--mib 64]
//! rdma_selftest client --pair LOCAL_IP:PEER_IP [--pair ...] [--mib 64] [--wr-kib 256] [--depth 32]
//! ```
//!
//! Per pair, the server registers an N MiB buffer for remote write, listens
//! with rdma_cm on LOCAL_IP, and sends `addr len rkey seed` over a plain TCP
//! control socket (rdma_cm private data is not available in sideway 0.4.3).
//! The client RDMA-WRITEs a pattern derived from `seed` in many work
//! requests of two scatter-gather entries each, the last one as
//! WRITE_WITH_IMM; the server waits for that immediate, verifies every
//! byte, and answers `OK` or `BAD <offset>`. Both print MB/s. The exit code
//! is 0 only if every pair verified.
//!
//! ```text
//! rdma_selftest probe --from LOCAL_IP --to IP:PORT [--data TEXT] [--for-s 60]
//! ```
//!
//! An intruder's connection request (no private data, or `TEXT`), repeated
//! every 200 ms until a Ferry listener refuses it (`PROBE refused`, exit 0).
//! Exit 1 if a listener *accepted* it, 2 if none refused within the time.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_ffi::rdma::{
    anon_buffer, Access, Completion, ConnectionOptions, Domains, RdmaConnection, RdmaError,
    RdmaListener, RemoteRegion, Segment, WorkKind, WriteOp,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use vm_memory::Bytes;

const RDMA_PORT: u16 = 18515;
const CTRL_PORT: u16 = 18600;
const IMM_DONE: u32 = 0xF3_11_DD_01;

#[derive(Debug, Clone)]
struct Opts {
    server: bool,
    pairs: Vec<(IpAddr, IpAddr)>,
    mib: usize,
    wr_kib: usize,
    depth: usize,
    timeout: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: rdma_selftest server|client --pair LOCAL_IP:PEER_IP [--pair ...] [--mib N] [--wr-kib K] [--depth D] [--timeout-s S]"
    );
    std::process::exit(2);
}

fn parse() -> Opts {
    let mut args = std::env::args().skip(1);
    let server = match args.next().as_deref() {
        Some("server") => true,
        Some("client") => false,
        _ => usage(),
    };
    let mut o = Opts {
        server,
        pairs: vec![],
        mib: 64,
        wr_kib: 256,
        depth: 32,
        timeout: Duration::from_secs(240),
    };
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--pair" => {
                let (l, p) = v.split_once(':').unwrap_or_else(|| usage());
                o.pairs.push((
                    l.parse().unwrap_or_else(|_| usage()),
                    p.parse().unwrap_or_else(|_| usage()),
                ));
            }
            "--mib" => o.mib = v.parse().unwrap_or_else(|_| usage()),
            "--wr-kib" => o.wr_kib = v.parse().unwrap_or_else(|_| usage()),
            "--depth" => o.depth = v.parse().unwrap_or_else(|_| usage()),
            "--timeout-s" => o.timeout = Duration::from_secs(v.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if o.pairs.is_empty() || o.mib == 0 || o.wr_kib < 8 || o.depth == 0 {
        usage();
    }
    o
}

/// The pattern word at byte offset `off` (a multiple of 8).
fn word(seed: u64, off: usize) -> u64 {
    (off as u64 / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn server_pair(local: IpAddr, o: &Opts) -> Res<()> {
    let len = o.mib << 20;
    let mut listener = RdmaListener::bind(
        SocketAddr::new(local, RDMA_PORT),
        ConnectionOptions::default(),
        &Domains::new(),
    )?;
    let pd = listener.protection_domain().clone();
    let dst = pd.register(Arc::new(anon_buffer(len)?), Access::RemoteWrite)?;
    let seed =
        u64::from_be_bytes([0x5e, 0xed, 0, 0, 0, 0, 0, 0]) ^ dst.addr() ^ u64::from(dst.rkey());
    println!(
        "[server {local}] device {} registered {} MiB rkey {:#x}",
        pd.device_name(),
        o.mib,
        dst.rkey()
    );

    let tcp = TcpListener::bind(SocketAddr::new(local, CTRL_PORT)).await?;
    let (mut ctrl, peer) = tcp.accept().await?;
    let r = dst.remote_region();
    ctrl.write_all(format!("{} {} {} {}\n", r.addr, r.len, r.rkey, seed).as_bytes())
        .await?;
    println!("[server {local}] control connection from {peer}; sent region");

    let mut conn = listener.accept().await?;
    conn.post_recv(&[], 1)?;
    let mut done: Vec<Completion> = Vec::new();
    let t0 = Instant::now();
    let imm = loop {
        conn.poll_completions(&mut done).await?;
        if let Some(c) = done.iter().find(|c| c.wr_id == 1) {
            break c.ok()?;
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    if imm.kind != WorkKind::RecvImm || imm.imm != Some(IMM_DONE) {
        return Err(format!("unexpected completion {imm:?}").into());
    }
    let vs = dst.as_volatile_slice();
    let mut bad = None;
    for off in (0..len).step_by(8) {
        let v: u64 = vs.read_obj(off)?;
        if u64::from_le(v) != word(seed, off) {
            bad = Some(off);
            break;
        }
    }
    match bad {
        None => {
            ctrl.write_all(b"OK\n").await?;
            println!(
                "[server {local}] VERIFIED {} MiB from {} (accept->imm {:.2}s, {:.1} MB/s)",
                o.mib,
                peer.ip(),
                secs,
                len as f64 / secs / 1e6
            );
            Ok(())
        }
        Some(off) => {
            ctrl.write_all(format!("BAD {off}\n").as_bytes()).await?;
            Err(format!("pattern mismatch at offset {off:#x}").into())
        }
    }
}

async fn retry<T, F, Fut>(what: &str, deadline: Instant, mut f: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<T>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn client_pair(local: IpAddr, peer: IpAddr, o: &Opts) -> Res<f64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let ctrl = retry("control connect", deadline, || async {
        Ok(TcpStream::connect(SocketAddr::new(peer, CTRL_PORT)).await?)
    })
    .await?;
    let mut ctrl = BufReader::new(ctrl);
    let mut line = String::new();
    ctrl.read_line(&mut line).await?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [addr, rlen, rkey, seed] = f[..] else {
        return Err(format!("bad descriptor {line:?}").into());
    };
    let remote = RemoteRegion::new(addr, rlen, u32::try_from(rkey)?);
    let len = o.mib << 20;
    if (len as u64) > remote.len {
        return Err("remote region smaller than --mib".into());
    }

    let mut conn = retry("rdma connect", deadline, || async {
        let r: Result<RdmaConnection, RdmaError> = RdmaConnection::connect(
            Some(SocketAddr::new(local, 0)),
            SocketAddr::new(peer, RDMA_PORT),
            ConnectionOptions::default(),
        )
        .await;
        Ok(r?)
    })
    .await?;
    let src = conn.register(Arc::new(anon_buffer(len)?), Access::LocalRead)?;
    let vs = src.as_volatile_slice();
    for off in (0..len).step_by(8) {
        vs.write_obj(word(seed, off).to_le(), off)?;
    }
    println!(
        "[client {local}] device {} connected to {peer}",
        conn.device_name()
    );

    let wr = o.wr_kib << 10;
    let half = wr / 2;
    let mut done: Vec<Completion> = Vec::new();
    let t0 = Instant::now();
    let mut off = 0;
    let mut wr_id = 0u64;
    while off < len {
        while conn.in_flight() >= o.depth {
            done.clear();
            conn.poll_completions(&mut done).await?;
            for c in &done {
                c.ok()?;
            }
        }
        let this = wr.min(len - off);
        let h = half.min(this);
        // Two scatter-gather entries per request (the second may be empty).
        let segs = [
            Segment::new(&src, off, h)?,
            Segment::new(&src, off + h, this - h)?,
        ];
        let last = off + this == len;
        conn.post_writes(&[WriteOp {
            segments: if this > h { &segs } else { &segs[..1] },
            remote: &remote,
            remote_offset: off as u64,
            imm: last.then_some(IMM_DONE),
            wr_id,
        }])?;
        wr_id += 1;
        off += this;
    }
    while conn.in_flight() > 0 {
        done.clear();
        conn.poll_completions(&mut done).await?;
        for c in &done {
            c.ok()?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mbps = len as f64 / secs / 1e6;
    println!(
        "[client {local}] wrote {} MiB to {peer} in {wr_id} WRs of {} KiB: {:.2}s, {:.1} MB/s",
        o.mib, o.wr_kib, secs, mbps
    );
    line.clear();
    ctrl.read_line(&mut line).await?;
    if line.trim() != "OK" {
        return Err(format!("server says {:?}", line.trim()).into());
    }
    println!("[client {local}] server VERIFIED the pattern");
    Ok(mbps)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("probe") {
        return probe().await;
    }
    let o = parse();
    let o = &o;
    let t0 = Instant::now();
    let run = async {
        let mut ok = true;
        if o.server {
            let rs = futures_join_all(o.pairs.iter().map(|&(l, _)| server_pair(l, o))).await;
            for (r, (l, _)) in rs.into_iter().zip(&o.pairs) {
                if let Err(e) = r {
                    eprintln!("[server {l}] FAILED: {e}");
                    ok = false;
                }
            }
        } else {
            let rs = futures_join_all(o.pairs.iter().map(|&(l, p)| client_pair(l, p, o))).await;
            let mut total = 0.0;
            for (r, (l, _)) in rs.into_iter().zip(&o.pairs) {
                match r {
                    Ok(m) => total += m,
                    Err(e) => {
                        eprintln!("[client {l}] FAILED: {e}");
                        ok = false;
                    }
                }
            }
            if ok {
                let secs = t0.elapsed().as_secs_f64();
                println!(
                    "RESULT selftest pairs={} mib_per_pair={} sum_of_pair_MBps={:.1} sum_of_pair_MiBps={:.2} wall={:.1}s",
                    o.pairs.len(),
                    o.mib,
                    total,
                    total * 1e6 / f64::from(1u32 << 20),
                    secs
                );
            }
        }
        ok
    };
    match tokio::time::timeout(o.timeout, run).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(_) => {
            eprintln!("selftest timed out after {:?}", o.timeout);
            ExitCode::FAILURE
        }
    }
}

/// Runs futures concurrently on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future completed"))
        .collect()
}

/// `probe`: see the module docs.
async fn probe() -> ExitCode {
    let mut args = std::env::args().skip(2);
    let (mut from, mut to, mut data, mut secs) = (None, None, Vec::new(), 60u64);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--from" => from = Some(v.parse::<IpAddr>().unwrap_or_else(|_| usage())),
            "--to" => to = Some(v.parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            "--data" => data = v.into_bytes(),
            "--for-s" => secs = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        usage()
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    while Instant::now() < deadline {
        let r = RdmaConnection::connect_with(
            Some(SocketAddr::new(from, 0)),
            to,
            ConnectionOptions::default(),
            &Domains::new(),
            &data,
        )
        .await;
        match r {
            Ok(_) => {
                println!("PROBE ACCEPTED by {to}: a listener took a request without its token");
                return ExitCode::from(1);
            }
            Err(RdmaError::Refused { .. }) => {
                println!(
                    "PROBE refused by {to} ({} bytes of private data)",
                    data.len()
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("PROBE no refusal from {to} within {secs}s (last: {last})");
    ExitCode::from(2)
}
