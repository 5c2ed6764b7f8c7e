//! Helpers for Ferry's end-to-end tests: build and start real `ferry`
//! processes, make keys, and play a hostile peer with the library's own
//! protocol pieces.
#![forbid(unsafe_code)]

pub mod netns;
pub mod proxy;
pub mod qemu;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_proto::SessionKeys;
use ferry_transport::auth::AuthKey;
use ferry_transport::conn::Conn;
use ferry_transport::proto::{Accept, GuestConfig, Msg, Offer, PerformanceOption};
use ferry_transport::MemoryLayout;

/// The pre-shared key of the tests' `ferry` processes and hand-made peers
/// (written to a file with [`key_file`]).
pub const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// [`KEY`] as the library's key.
pub fn key() -> AuthKey {
    AuthKey::new(KEY.to_vec()).unwrap()
}

/// A multi-threaded tokio runtime for a test's hand-made peers and
/// in-process daemons.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Path of the `ferry` binary, built once per test process with the same
/// profile as the tests.
pub fn ferry_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "ferry-cli", "--bin", "ferry"]);
        if release {
            cmd.arg("--release");
        }
        let target_dir = profile_dir.parent().expect("target root");
        cmd.env("CARGO_TARGET_DIR", target_dir);
        // What cargo sets for the test being run (this package's manifest
        // directory, name, version...) is not in the environment of the
        // `cargo test` that built everything: a build script that reruns
        // when one of them changes (ring's: CARGO_MANIFEST_DIR,
        // CARGO_PKG_*) would rebuild ring, rustls and Ferry's crates here,
        // and again in the next `cargo` run outside the tests.
        for (name, _) in std::env::vars_os() {
            let Some(n) = name.to_str() else { continue };
            if n.starts_with("CARGO_PKG_")
                || n.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    n,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                )
            {
                cmd.env_remove(n);
            }
        }
        let st = cmd.status().expect("run cargo build for the ferry binary");
        assert!(st.success(), "building the ferry binary failed");
        profile_dir.join("ferry")
    })
    .clone()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a key file holding `bytes` as `ferry gen-key` writes one (base64,
/// mode 0600) and returns its path.
pub fn key_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use base64::Engine;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .unwrap();
    let text = base64::engine::general_purpose::STANDARD.encode(bytes) + "\n";
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    p
}

/// A running `ferry` process whose output is collected. Dropped before it
/// was waited for (a test that failed on the way), it is killed: a daemon
/// of a failed test does not outlive it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    live: Arc<Live>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Output so far, both streams interleaved by line, for waiting on an event.
#[derive(Debug, Default)]
struct Live {
    text: Mutex<String>,
    changed: Condvar,
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Both streams, for assertion messages.
    pub fn all(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
    /// True if the process panicked (Rust exits 101 on panic).
    pub fn panicked(&self) -> bool {
        self.status.code() == Some(101) || self.stderr.contains("panicked at")
    }
}

fn drain<R: Read + Send + 'static>(r: R, live: Arc<Live>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
            let mut t = live.text.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
            live.changed.notify_all();
        }
        s
    })
}

/// The `RUST_LOG` the tests' `ferry` processes run with unless a test says
/// otherwise: the command's own messages, the libraries' warnings and errors.
const LOG: &str = "warn,ferry=info";

impl Proc {
    /// Starts `ferry ARGS` with `RUST_LOG=warn,ferry=info`: the command's
    /// own messages, and the libraries' warnings and errors.
    pub fn start(args: &[&str]) -> Proc {
        Proc::start_logging(args, Some(LOG))
    }

    /// Starts `ferry ARGS` with `RUST_LOG=log`, or without `RUST_LOG`
    /// (ferry's own `-v`/`-q` levels) when `None`.
    pub fn start_logging(args: &[&str], log: Option<&str>) -> Proc {
        Proc::spawn(Command::new(ferry_bin()), args, log)
    }

    /// Starts `ferry ARGS` limited to `nofile` open descriptors (soft and
    /// hard `RLIMIT_NOFILE`, with util-linux's `prlimit`).
    pub fn start_with_nofile(nofile: u64, args: &[&str]) -> Proc {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(ferry_bin());
        Proc::spawn(cmd, args, Some("warn,ferry=info"))
    }

    /// Starts `ferry ARGS` in network namespace `ns` (`ip netns exec`),
    /// with `RUST_LOG=warn,ferry=info`.
    pub fn start_in_netns(ns: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(ferry_bin());
        Proc::spawn(cmd, args, Some("warn,ferry=info"))
    }

    fn spawn(mut cmd: Command, args: &[&str], log: Option<&str>) -> Proc {
        match log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry");
        let live = Arc::new(Live::default());
        let stdout = drain(child.stdout.take().unwrap(), live.clone());
        let stderr = drain(child.stderr.take().unwrap(), live.clone());
        Proc {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            live,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process has printed `needle` (either stream) and
    /// returns everything printed so far; panics after `timeout`.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(|t| t.contains(needle), needle, timeout)
    }

    /// Waits until the process has printed a line (either stream) for
    /// which `matches` holds and returns everything printed so far; panics
    /// after `timeout`, naming `what` was awaited.
    pub fn wait_for_line(
        &self,
        matches: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> String {
        self.wait_until(|t| t.lines().any(&matches), what, timeout)
    }

    fn wait_until(&self, done: impl Fn(&str) -> bool, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut t = self.live.text.lock().unwrap();
        while !done(&t) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what:?} in the output:\n{t}"
            );
            t = self.live.changed.wait_timeout(t, left).unwrap().0;
        }
        t.clone()
    }

    /// Waits for the process (killing it after `timeout`) and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let joined = |h: Option<std::thread::JoinHandle<String>>| {
            h.expect("waited for once").join().unwrap()
        };
        Output {
            status,
            stdout: joined(self.stdout.take()),
            stderr: joined(self.stderr.take()),
        }
    }

    /// Kills the process now.
    pub fn kill(mut self) -> Output {
        let _ = self.child.kill();
        self.wait(Duration::from_secs(5))
    }
}

/// Starts `ferry listen --once` on a free loopback port and waits until it
/// accepts connections. Extra arguments are appended.
pub fn listen(key: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--once"];
    args.extend_from_slice(extra);
    daemon(key, &args)
}

/// Starts `ferry listen` (staying up) on a free loopback port and waits
/// until it accepts connections. Extra arguments are appended.
pub fn daemon(key: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    daemon_logging(key, extra, Some(LOG))
}

/// [`daemon`] with `RUST_LOG=log`, or ferry's own levels when `None` (see
/// [`Proc::start_logging`]).
pub fn daemon_logging(key: &Path, extra: &[&str], log: Option<&str>) -> (Proc, SocketAddr) {
    // Port 0: the kernel picks a free port as the daemon binds it, and the
    // daemon says which ("listening on ADDR (...)", once it is bound). A
    // port picked here and bound later by the daemon could be picked by a
    // test running beside this one in between: one of the two daemons then
    // fails to bind, and its test talks to the other one (seen: an offer
    // refused with another test's --memory-limit).
    let mut args = vec![
        "listen",
        "--listen",
        "127.0.0.1:0",
        "--auth-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let p = Proc::start_logging(&args, log);
    let addr = listening_addr(&p);
    (p, addr)
}

/// The address `ferry listen --listen 127.0.0.1:0` bound, from its
/// "listening on ADDR (...)" line (logged once bound); see [`daemon`].
pub fn listening_addr(p: &Proc) -> SocketAddr {
    let out = p.wait_for_output("listening on 127.0.0.1:", Duration::from_secs(20));
    out.split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split([' ', '"']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ferry listen did not say its address:\n{out}"))
}

/// The address `ferry listen --metrics 127.0.0.1:0` bound its endpoint to,
/// from its "metrics on http://ADDR/metrics" line (logged once bound,
/// before the daemon listens). Port 0 rather than a port picked by the
/// test: see [`daemon`].
pub fn metrics_addr(p: &Proc) -> SocketAddr {
    let out = p.wait_for_output("metrics on http://", Duration::from_secs(20));
    out.split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("ferry listen did not say its metrics address:\n{out}"))
}

/// Runs `ferry send --to ADDR --auth-key-file KEY EXTRA...` to completion
/// (killed after `timeout`).
pub fn send(addr: SocketAddr, key: &Path, extra: &[&str], timeout: Duration) -> Output {
    start_send(addr, key, extra).wait(timeout)
}

/// Starts `ferry send --to ADDR --auth-key-file KEY EXTRA...` and returns
/// at once.
pub fn start_send(addr: SocketAddr, key: &Path, extra: &[&str]) -> Proc {
    start_send_logging(addr, key, extra, Some(LOG))
}

/// [`start_send`] with `RUST_LOG=log`, or ferry's own levels when `None`
/// (see [`Proc::start_logging`]).
pub fn start_send_logging(addr: SocketAddr, key: &Path, extra: &[&str], log: Option<&str>) -> Proc {
    let to = addr.to_string();
    let mut args = vec![
        "send",
        "--to",
        &to,
        "--auth-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start_logging(&args, log)
}

/// A migration between two `ferry` processes over loopback that ended
/// well on both sides: see [`migrate_ok`].
#[derive(Debug)]
pub struct Migrated {
    /// The destination's address.
    pub addr: SocketAddr,
    /// What `ferry send` printed.
    pub src: Output,
    /// What `ferry listen --once` printed.
    pub dest: Output,
}

/// Runs a migration between two `ferry` processes over loopback: `ferry
/// listen --once LISTEN_EXTRA...`, then `ferry send ... SEND_EXTRA...
/// --force-switchover` to it (killed after `timeout`); asserts that both
/// succeeded.
///
/// `--force-switchover` (added unless SEND_EXTRA has it): the tests that
/// call this check what a committed migration carried, not whether its
/// pause fits `--downtime-limit` on this host. Three control round trips
/// count in the pause, so round trips of 100 ms (a loaded machine, a busy
/// debug build) make the default 300 ms unable to fit, and the migration
/// would be cancelled for that. Where the pause itself is tested
/// (operations.rs, switchover.rs, operator.rs), `send` is used without it.
pub fn migrate_ok(
    key: &Path,
    listen_extra: &[&str],
    send_extra: &[&str],
    timeout: Duration,
) -> Migrated {
    let (dest, addr) = listen(key, listen_extra);
    let mut send_extra = send_extra.to_vec();
    if !send_extra.contains(&"--force-switchover") {
        send_extra.push("--force-switchover");
    }
    let src = send(addr, key, &send_extra, timeout);
    let dest = dest.wait(Duration::from_secs(30));
    assert!(src.status.success(), "source failed: {}", src.all());
    assert!(dest.status.success(), "destination failed: {}", dest.all());
    Migrated { addr, src, dest }
}

/// What `ferry send` says when a migration ended without moving the
/// guest: it still runs on the source.
pub const KEEPS_RUNNING: &str = "the guest keeps running on this host (running: true)";

/// Asserts that `ferry send` failed cleanly: non-zero exit, no panic, and
/// its guest keeps running (said on stderr).
pub fn assert_guest_kept(out: &Output) {
    assert!(!out.panicked(), "{}", out.all());
    assert!(!out.status.success(), "{}", out.all());
    assert!(out.stderr.contains(KEEPS_RUNNING), "{}", out.all());
}

/// The resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sends SIGKILL to process `pid` (a `ferry` this test started).
pub fn sigkill(pid: u32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -KILL {pid} failed");
}

/// Sends signal `name` (`INT`, `TERM`) to process `pid` (a `ferry` this
/// test started).
pub fn signal(pid: u32, name: &str) {
    let st = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -s {name} {pid} failed");
}

/// Waits until the file at `path` contains `needle` and returns its text;
/// panics after `timeout`.
pub fn wait_for_file(path: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {needle:?} in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (up to 20 s) until `addr` accepts connections.
pub fn wait_for_port(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not come up on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `GET PATH` over plain HTTP/1.1: the status line and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of one Prometheus sample (`name{labels}` exactly as
/// exposed), if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads a `--json` summary.
pub fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A small offer for hostile-peer tests.
pub fn offer(bytes: u64) -> Offer {
    Offer {
        layout: MemoryLayout {
            page_size: 4096,
            regions: vec![ferry_transport::layout::RegionDesc {
                gpa: 0,
                size: bytes,
            }],
        },
        // What `ferry listen` restores: the synthetic guest of this host.
        guest: GuestConfig {
            vcpus: 1,
            cpu_vendor: ferry_migration::guest::cpu_vendor(),
            device_state_format: ferry_migration::guest::SYNTHETIC_FORMAT.into(),
        },
        option: PerformanceOption::Tcp,
        channels: 1,
    }
}

/// Connects (plaintext), authenticates and sends `offer`; the answer is
/// the caller's to read.
pub async fn authed_offer(addr: SocketAddr, key: &AuthKey, offer: Offer) -> Conn {
    let mut c = Conn::new(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        Duration::from_secs(10),
    );
    c.client_handshake(key).await.unwrap();
    c.send(&Msg::Offer(offer)).await.unwrap();
    c
}

/// Connects, authenticates and gets an offer of `bytes` accepted.
pub async fn authed_session(addr: SocketAddr, key: &AuthKey, bytes: u64) -> (Conn, Accept) {
    let mut c = Conn::new(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        Duration::from_secs(10),
    );
    c.client_handshake(key).await.unwrap();
    c.send(&Msg::Offer(offer(bytes))).await.unwrap();
    match c.recv("accept").await.unwrap() {
        Msg::Accept(a) => (c, a),
        m => panic!("expected Accept, got {m:?}"),
    }
}

/// Opens a (plaintext) data channel of the session of `control` (an
/// authenticated control connection).
pub async fn data_channel(addr: SocketAddr, control: &Conn) -> tokio::net::TcpStream {
    let keys = control.session_keys().expect("an authenticated session");
    let s = data_channel_with(addr, &keys).await.unwrap();
    match s {
        ferry_transport::stream::Stream::Plain(s) => s,
        ferry_transport::stream::Stream::Tls(_) => unreachable!("a plain connection"),
    }
}

/// A chunk frame (format v2) as a source holding the session's keys builds
/// it: the run table of `runs`, the payload tag over the pages in `payload`
/// (the non-zero runs' bytes, in run order) at their addresses, and the
/// header tag.
pub fn chunk_frame(
    keys: &ferry_proto::SessionKeys,
    seq: u64,
    round: u32,
    runs: &[ferry_transport::PageRun],
    payload: &[u8],
) -> Vec<u8> {
    use zerocopy::IntoBytes;
    let mut sum = 0u128;
    let mut at = 0usize;
    for r in runs.iter().filter(|r| !r.zero) {
        for p in 0..u64::from(r.pages) {
            if let Some(page) = payload.get(at..at + 4096) {
                let h = keys.page.hash_or_zero(page);
                sum = sum.wrapping_add(keys.page.contribution(r.gpa + p * 4096, h));
            }
            at += 4096;
        }
    }
    let table = ferry_transport::wire::run_table(runs);
    let tag = ferry_proto::frame::payload_tag(&keys.frame, seq, round, sum);
    let h = ferry_transport::wire::ChunkHeader::pages(
        &keys.frame,
        seq,
        round,
        &table,
        payload.len() as u32,
        0,
        tag,
    );
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&table);
    out.extend_from_slice(payload);
    out
}

/// An end frame (format v2) under the session's frame key.
pub fn end_frame(keys: &ferry_proto::SessionKeys) -> Vec<u8> {
    use zerocopy::IntoBytes;
    ferry_transport::wire::ChunkHeader::end(&keys.frame, u64::MAX)
        .as_bytes()
        .to_vec()
}

/// The next ack on a data channel (its tag checked), or `None` once the
/// destination closed the channel; panics if neither comes within 20 s.
pub async fn read_ack(
    s: &mut tokio::net::TcpStream,
    keys: &ferry_proto::SessionKeys,
) -> Option<(u64, ferry_transport::wire::AckStatus)> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; ferry_transport::wire::ACK_LEN];
    match tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut b)).await {
        Ok(Ok(_)) => Some(ferry_transport::wire::AckFrame::decode(&keys.frame, &b).unwrap()),
        Ok(Err(_)) => None,
        Err(_) => panic!("the destination neither acknowledged nor closed the channel"),
    }
}

/// Tries to open a (plaintext) data channel with the proof of the session
/// of `keys`: the stream, or why the destination refused it.
pub async fn data_channel_with(
    addr: SocketAddr,
    keys: &SessionKeys,
) -> Result<ferry_transport::stream::Stream, ferry_transport::TransportError> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    ferry_transport::conn::open_data_channel(tcp.into(), keys, Duration::from_secs(10)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_dropped_before_it_was_waited_for_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "key", KEY);
        let (p, _addr) = daemon(&key, &[]);
        let pid = p.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        // Killed and reaped: no process, not even a zombie.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        // One that was waited for is left as it ended.
        let (p, _addr) = daemon(&key, &[]);
        let out = p.kill();
        assert!(!out.panicked(), "{}", out.all());
    }
}
