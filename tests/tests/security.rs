//! Security (issue 10) with real `ferry` processes: an on-path attacker
//! without the key who rewrites what crosses the network never gets
//! anything but the source's data committed, in `--plaintext` mode (a
//! frame-aware proxy that fixes every CRC) and with TLS (a relay that
//! terminates TLS towards both ends, which the pre-shared-key mode's TLS
//! alone would allow, and a proxy that flips bits in the TLS stream).

use std::time::Duration;

use ferry_tests::proxy::{Dir, Frame, Hook, Proxy, Verdict};
use ferry_tests::{key_file, listen, rt, send, Output, KEEPS_RUNNING, KEY};
use ferry_transport::auth::AuthKey;
use ferry_transport::proto::{Msg, MAX_CONTROL_BODY};
use ferry_transport::tls::TlsConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(120);

/// Neither side committed: the source failed with its guest running, the
/// destination (`--once`) reported a failed attempt naming `why`.
fn assert_nothing_committed(src: &Output, dest: &Output, why: &str) {
    assert!(
        !src.panicked() && !dest.panicked(),
        "{}\n{}",
        src.all(),
        dest.all()
    );
    assert_eq!(src.status.code(), Some(1), "{}", src.all());
    assert!(src.stderr.contains(KEEPS_RUNNING), "{}", src.all());
    assert!(!dest.stdout.contains(" committed: "), "{}", dest.all());
    assert_eq!(dest.status.code(), Some(1), "{}", dest.all());
    assert!(
        dest.all().contains(why) || src.all().contains(why),
        "expected {why:?}:\n{}\n{}",
        src.all(),
        dest.all()
    );
}

/// A plaintext migration through a frame-aware proxy running `hook`;
/// returns both sides' output and how many frames the hook changed.
fn through_proxy(
    hook: impl FnMut(&mut Frame) -> Option<Verdict> + Send + 'static,
) -> (Output, Output, usize) {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&key, &["--plaintext", "--peer-timeout", "10s"]);
    let changed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = changed.clone();
    let mut hook = hook;
    let h: Hook = Box::new(move |f| match hook(f) {
        Some(v) => {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            v
        }
        None => Verdict::Forward,
    });
    let proxy = Proxy::start(addr, h);
    let src = send(
        proxy.addr(),
        &key,
        &[
            "--plaintext",
            // Cases that rewrite the Switchover must reach it: round trips
            // through the proxy count in the pause, and a loaded host must
            // not make the policy cancel before (see ferry_tests::migrate_ok).
            "--force-switchover",
            "--memory",
            "32MiB",
            "--dirty-rate",
            "4MB/s",
            "--performance-option",
            "tcp",
            "--peer-timeout",
            "10s",
        ],
        WAIT,
    );
    let dest = dest.wait(Duration::from_secs(60));
    let n = changed.load(std::sync::atomic::Ordering::SeqCst);
    (src, dest, n)
}

/// Rewrites the first control message `pick` selects (and changes) in
/// direction `dir`.
fn rewrite_first(
    dir: Dir,
    mut pick: impl FnMut(&mut Msg) -> bool + Send + 'static,
) -> impl FnMut(&mut Frame) -> Option<Verdict> + Send + 'static {
    let mut done = false;
    move |f: &mut Frame| {
        if done || f.dir != dir {
            return None;
        }
        if f.rewrite_msg(&mut pick) {
            done = true;
            Some(Verdict::Forward)
        } else {
            None
        }
    }
}

#[test]
fn plaintext_an_offer_field_rewritten_is_refused() {
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToDest, |m| match m {
        Msg::Offer(o) => {
            o.guest.vcpus += 1;
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "the offer was rewritten: {}", src.all());
    assert_nothing_committed(&src, &dest, "failed authentication: its tag does not match");
}

#[test]
fn plaintext_the_device_state_rewritten_with_its_hash_fixed_is_refused() {
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToDest, |m| match m {
        Msg::Switchover(sw) => {
            // The vCPU state an attacker would like to run.
            sw.device_state = b"{\"writes\":0,\"attacker\":true}".to_vec();
            sw.device_state_hash = ferry_proto::switchover::device_state_hash(&sw.device_state);
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "the switchover was rewritten: {}", src.all());
    assert_nothing_committed(&src, &dest, "failed authentication: its tag does not match");
}

#[test]
fn plaintext_control_messages_changed_or_dropped_either_way_are_refused() {
    // A source's message changed.
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToDest, |m| match m {
        Msg::RoundDone { pages, .. } => {
            *pages += 1;
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "{}", src.all());
    assert_nothing_committed(&src, &dest, "failed authentication");
    // A destination's message changed: the source refuses it.
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToSource, |m| match m {
        Msg::Accept(a) => {
            a.migration_id ^= 1;
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "{}", src.all());
    assert!(
        src.stderr
            .contains("failed authentication: its tag does not match"),
        "{}",
        src.all()
    );
    assert_nothing_committed(&src, &dest, "failed authentication");
    // A source's message dropped: the next one fails (sequence numbers).
    let mut dropped = false;
    let (src, dest, n) = through_proxy(move |f| {
        if !dropped && f.dir == Dir::ToDest && f.msg_name() == Some("RoundDone") {
            dropped = true;
            return Some(Verdict::Swallow);
        }
        None
    });
    assert_eq!(n, 1, "{}", src.all());
    assert_nothing_committed(&src, &dest, "failed authentication");
}

#[test]
fn plaintext_handshake_messages_changed_on_the_way_fail_the_proofs() {
    // The destination's nonce changed: the source proves what it received,
    // the destination checks what it sent.
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToSource, |m| match m {
        Msg::HelloReply { nonce, .. } => {
            nonce[0] ^= 1;
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "{}", src.all());
    assert_nothing_committed(&src, &dest, "the two --auth-key-file keys differ");
    // The source's hello changed (its nonce).
    let (src, dest, n) = through_proxy(rewrite_first(Dir::ToDest, |m| match m {
        Msg::Hello { nonce, .. } => {
            nonce[31] ^= 1;
            true
        }
        _ => false,
    }));
    assert_eq!(n, 1, "{}", src.all());
    assert_nothing_committed(&src, &dest, "proof does not match");
}

/// Reads one control frame from `r`: its bytes and message.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<(Vec<u8>, Msg)> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head).await.ok()?;
    let h = Msg::decode_head(&head, MAX_CONTROL_BODY).ok()?;
    let mut bytes = head.to_vec();
    bytes.resize(16 + h.rest_len(), 0);
    r.read_exact(&mut bytes[16..]).await.ok()?;
    let m = Msg::decode_body(&bytes[16..16 + h.len as usize], h.crc).ok()?;
    Some((bytes, m))
}

/// Copies control frames from `r` to `w`, rewriting any `Offer` (its vCPU
/// count, CRC fixed, tag kept); counts the frames it read.
async fn pump_frames<R, W>(mut r: R, mut w: W, seen: std::sync::Arc<std::sync::atomic::AtomicUsize>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while let Some((mut bytes, m)) = read_frame(&mut r).await {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Msg::Offer(mut o) = m {
            o.guest.vcpus += 1;
            let head: [u8; 16] = bytes[..16].try_into().unwrap();
            let h = Msg::decode_head(&head, MAX_CONTROL_BODY).unwrap();
            let tag = bytes[16 + h.len as usize..].to_vec();
            bytes = Msg::Offer(o).encode();
            bytes[12..16].copy_from_slice(&head[12..16]);
            bytes.extend_from_slice(&tag);
        }
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}

#[test]
fn tls_a_relay_that_terminates_tls_towards_both_ends_is_refused() {
    // The pre-shared-key mode's TLS authenticates nobody by itself, so an
    // attacker can complete TLS with both ends, read the frames and rewrite
    // the offer. The proofs are bound to each TLS session: the destination
    // refuses the source's, and nothing moves.
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&key, &["--peer-timeout", "10s"]);
    let rt = rt();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let relay_addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = seen.clone();
    rt.spawn(async move {
        // The attacker's own TLS settings: it does not have the key.
        let tls = TlsConfig::from_psk(&AuthKey::new(vec![0x5a; 32]).unwrap()).unwrap();
        let t = Duration::from_secs(10);
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let (Ok(a), Ok(b)) = tokio::join!(tls.accept(inbound, t), tls.connect(outbound, t))
            else {
                continue;
            };
            let (ar, aw) = tokio::io::split(a);
            let (br, bw) = tokio::io::split(b);
            tokio::spawn(pump_frames(ar, bw, s2.clone()));
            tokio::spawn(pump_frames(br, aw, s2.clone()));
        }
    });
    let src = send(
        relay_addr,
        &key,
        &["--memory", "32MiB", "--dirty-rate", "0"],
        WAIT,
    );
    let dest = dest.wait(Duration::from_secs(60));
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the relay read the handshake in the clear: {}",
        src.all()
    );
    assert_nothing_committed(&src, &dest, "proof does not match");
}

#[test]
fn tls_bits_flipped_in_the_encrypted_stream_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&key, &["--peer-timeout", "10s"]);
    let rt = rt();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let tap = l.local_addr().unwrap();
    // Flips one bit of the first connection (the control connection), past
    // the TLS ClientHello, source to destination.
    const AT: usize = 500;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    rt.spawn(async move {
        let mut first = true;
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let flip = std::mem::take(&mut first);
            let done = d2.clone();
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut or, &mut iw).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0usize;
                let mut flipped = !flip;
                loop {
                    let n = match ir.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !flipped && total + n > AT {
                        let at = AT.saturating_sub(total).min(n - 1);
                        buf[at] ^= 0x10;
                        flipped = true;
                        done.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    total += n;
                    if ow.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = ow.shutdown().await;
            });
        }
    });
    let src = send(
        tap,
        &key,
        &["--memory", "32MiB", "--dirty-rate", "4MB/s"],
        WAIT,
    );
    let dest = dest.wait(Duration::from_secs(60));
    assert!(
        done.load(std::sync::atomic::Ordering::SeqCst),
        "a bit was flipped: {}",
        src.all()
    );
    assert_nothing_committed(&src, &dest, "");
    let all = format!("{}{}", src.all(), dest.all());
    assert!(
        all.contains("encryption") || all.contains("TLS") || all.contains("peer closed"),
        "the TLS session refused the changed record: {all}"
    );
}

/// Runs `ferry ARGS` to completion.
fn ferry(args: &[&str]) -> Output {
    ferry_tests::Proc::start(args).wait(Duration::from_secs(60))
}

#[test]
fn gen_key_output_is_accepted_and_weak_or_exposed_key_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let k = key.to_str().unwrap();
    let out = ferry(&["gen-key", k]);
    assert!(out.status.success(), "{}", out.all());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let written = std::fs::read(&key).unwrap();
    // Never overwritten.
    let again = ferry(&["gen-key", k]);
    assert!(!again.status.success(), "{}", again.all());
    assert!(
        again.stderr.contains("exists: not overwritten"),
        "{}",
        again.all()
    );
    assert_eq!(std::fs::read(&key).unwrap(), written);
    // Accepted by both ends: a migration commits with it.
    let (dest, addr) = listen(&key, &[]);
    let src = send(
        addr,
        &key,
        &[
            "--memory",
            "16MiB",
            "--dirty-rate",
            "0",
            // The key is the subject, not the pause (see migrate_ok).
            "--force-switchover",
        ],
        WAIT,
    );
    let dest = dest.wait(Duration::from_secs(60));
    assert!(src.status.success(), "{}", src.all());
    assert!(dest.status.success(), "{}", dest.all());

    // Refused by send and by listen, before anything is sent or bound,
    // each naming the fix.
    let refused = |file: &std::path::Path, want: &[&str]| {
        let f = file.to_str().unwrap();
        let port = ferry_tests::free_port().to_string();
        let to = format!("127.0.0.1:{port}");
        let listen_addr = to.clone();
        for out in [
            ferry(&[
                "send",
                "--to",
                &to,
                "--auth-key-file",
                f,
                "--memory",
                "16MiB",
            ]),
            ferry(&[
                "listen",
                "--listen",
                &listen_addr,
                "--auth-key-file",
                f,
                "--once",
            ]),
        ] {
            assert!(!out.status.success() && !out.panicked(), "{}", out.all());
            assert!(!out.all().contains("cannot connect"), "{}", out.all());
            for w in want {
                assert!(out.stderr.contains(w), "wants {w:?}: {}", out.all());
            }
        }
    };
    // Exposed: readable by the group, or by others.
    for mode in [0o640, 0o644] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        refused(
            &key,
            &[&format!("(mode {mode:04o})"), &format!("chmod 600 {k}")],
        );
    }
    // Weak: a password (16 bytes once decoded), and text that is not base64.
    let write = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    refused(
        &write("password", "cGFzc3dvcmRwYXNzd29yZA==\n"),
        &[
            "is 16 bytes after decoding, need at least 32",
            "ferry gen-key",
        ],
    );
    refused(
        &write("text", "passwordpassword, my favourite one\n"),
        &["does not hold a base64-encoded key", "ferry gen-key"],
    );
}

/// Opens an idle TCP connection to `to` from `from` (a loopback address).
fn idle_from(from: &str, to: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    connect_from(from, to).ok()
}

/// `connect(2)` from a chosen loopback source address (tokio's TcpSocket
/// on a small runtime).
fn connect_from(from: &str, to: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(format!("{from}:0").parse().unwrap())?;
        let c = tokio::time::timeout(Duration::from_secs(10), s.connect(to))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        c.into_std()
    })
}

/// Waits until the peer closes each of `conns` (end of stream or reset);
/// panics after `limit`.
fn wait_closed(conns: Vec<std::net::TcpStream>, limit: Duration) {
    let start = std::time::Instant::now();
    for mut c in conns {
        c.set_nonblocking(false).unwrap();
        let left = limit
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(10));
        c.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 64];
        loop {
            match std::io::Read::read(&mut c, &mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("a connection that never authenticated is still open after {limit:?}")
                }
                Err(_) => break,
            }
        }
    }
}

#[test]
fn idle_connections_cannot_stop_a_daemon_with_few_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let dest = ferry_tests::Proc::start_with_nofile(
        128,
        &[
            "listen",
            "--listen",
            "127.0.0.1:0",
            "--auth-key-file",
            key.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--handshake-timeout",
            "3s",
        ],
    );
    let addr = ferry_tests::listening_addr(&dest);
    let maddr = ferry_tests::metrics_addr(&dest);
    // 200 connections that never say anything: 100 from one address, 100
    // from 100 others; and 40 to the metrics port.
    let mut idle = Vec::new();
    for i in 0..200 {
        let from = if i < 100 {
            "127.0.0.2".to_string()
        } else {
            format!("127.0.1.{}", i - 99)
        };
        if let Some(c) = idle_from(&from, addr) {
            idle.push(c);
        }
    }
    assert!(
        idle.len() >= 150,
        "only {} connections were made",
        idle.len()
    );
    let idle_metrics: Vec<_> = (0..40)
        .filter_map(|i| idle_from(&format!("127.0.2.{}", i + 1), maddr))
        .collect();
    // The daemon did not go down under them...
    let out = dest.wait_for_output("connection closed before authentication", WAIT);
    assert!(out.contains("--max-unauthenticated"), "{out}");
    // ...and each was closed: over the caps at once, the others when the
    // handshake deadline passed.
    wait_closed(idle, Duration::from_secs(60));
    wait_closed(idle_metrics, Duration::from_secs(60));
    // It serves a migration, and its metrics, afterwards (whether its
    // pause fits the default limit on this host is not the question).
    let src = send(
        addr,
        &key,
        &[
            "--memory",
            "16MiB",
            "--dirty-rate",
            "0",
            "--force-switchover",
        ],
        WAIT,
    );
    assert!(src.status.success(), "{}", src.all());
    let (status, body) = ferry_tests::http_get(maddr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let refused =
        ferry_tests::metric(&body, "ferry_connections_refused_unauthenticated_total").unwrap();
    assert!(refused >= 100.0, "{body}");
    dest.wait_for_output(" committed: ", WAIT);
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
    // Idle strangers are not migration attempts: no line each.
    assert!(
        !out.stdout.contains("migration from 127.0.1."),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("Too many open files"), "{}", out.all());
    // The caps in force are logged at start (a quarter of 128 descriptors).
    assert!(
        out.stderr
            .contains("at most 32 connections authenticating at once, 8 per source address"),
        "{}",
        out.all()
    );
}

#[test]
fn descriptors_return_to_the_baseline_after_20_migrations_aborted_by_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = ferry_tests::daemon(
        &k,
        &[
            "--plaintext",
            // Long enough that each source below opens its data channel
            // before its session times out, on a loaded host too (a
            // channel that came after would be refused, and the test
            // would stop on it); short enough to wait for 20 of them.
            "--peer-timeout",
            "3s",
            "--max-concurrent",
            "20",
            "--max-unauthenticated-per-source",
            "64",
        ],
    );
    // The daemon at rest (the probe of wait_for_port gone).
    std::thread::sleep(Duration::from_millis(500));
    let baseline = ferry_tests::open_fds(dest.pid());
    assert!(baseline > 0);
    let key = AuthKey::new(KEY.to_vec()).unwrap();
    // 20 sources authenticate, open their data channel, and then say
    // nothing while keeping both sockets open: the destination times
    // each out and aborts it.
    let held = rt().block_on(async {
        let mut held = Vec::new();
        for _ in 0..20 {
            let (conn, _) = ferry_tests::authed_session(addr, &key, 1 << 20).await;
            let data = ferry_tests::data_channel(addr, &conn).await;
            held.push((conn, data));
        }
        held
    });
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = dest.wait_for_output("did not respond within 3s", WAIT);
        let aborted = out
            .lines()
            .filter(|l| l.starts_with("migration from ") && l.contains("did not respond within 3s"))
            .count();
        if aborted >= 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every descriptor of those migrations goes, although their peers
    // still hold their ends open.
    let mut now = ferry_tests::open_fds(dest.pid());
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while now > baseline && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        now = ferry_tests::open_fds(dest.pid());
    }
    assert!(
        now <= baseline,
        "{now} descriptors open after 20 aborted migrations, {baseline} before"
    );
    drop(held);
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
}
