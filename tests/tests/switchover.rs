//! The switchover end to end: guest configuration validated before
//! `Accept`, commit order (a failed device-state restore refuses the commit
//! and the source's guest keeps running), `--verify full`, and the audit
//! after the pause catching a guest write the dirty log never reported.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_migration::dest::{Destination, GuestSupport, ListenOptions, Outcome, ResumeHook};
use ferry_migration::dirty::{BitmapDirtyLog, DirtyLog, DirtySet};
use ferry_migration::engine::{Progress, Source, SourceOptions, Summary, Verify};
use ferry_migration::guest::{
    cpu_vendor, GuestControl, SyntheticConfig, SyntheticGuest, SYNTHETIC_FORMAT,
};
use ferry_migration::memory::{default_layout, source_memory, SourceMemory};
use ferry_migration::metrics::Metrics;
use ferry_migration::MigrationError;
use ferry_proto::Evidence;
use ferry_tests::{
    authed_offer, daemon, http_get, key, key_file, listen, metric, offer, rt, send, summary,
    KEEPS_RUNNING, KEY,
};
use ferry_transport::auth::AuthKey;
use ferry_transport::layout::PageRun;
use ferry_transport::proto::{GuestConfig, Msg, RejectReason};
use ferry_transport::tls::TlsConfig;
use vm_memory::{Bytes, GuestAddress};

const LONG: Duration = Duration::from_secs(240);

/// A destination daemon in this test process (with the test's resume
/// hook), on a free loopback port.
struct InProcessDest {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    server: tokio::task::JoinHandle<ferry_migration::Result<()>>,
    outcomes: tokio::sync::mpsc::UnboundedReceiver<Outcome>,
}

impl InProcessDest {
    /// Serves on `rt`: `memory_limit` bytes, progress `timeout`, and
    /// unencrypted sources accepted when `plaintext`.
    fn start(
        rt: &tokio::runtime::Runtime,
        key: &AuthKey,
        memory_limit: u64,
        timeout: Duration,
        plaintext: bool,
        hook: ResumeHook,
    ) -> InProcessDest {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = ListenOptions {
            key: key.clone(),
            memory_limit,
            timeout,
            max_concurrent: 1,
            queue: 0,
            queue_timeout: Duration::ZERO,
            migration_networks: Vec::new(),
            tls: Arc::new(TlsConfig::from_psk(key).unwrap()),
            plaintext,
            handshake_timeout: ferry_migration::admission::DEFAULT_HANDSHAKE_TIMEOUT,
            max_unauthenticated: ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source:
                ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        };
        let dest = Destination::new(opts, hook);
        let metrics = dest.metrics();
        let (tx, outcomes) = tokio::sync::mpsc::unbounded_channel();
        let server = rt.spawn(dest.serve(listener, tx));
        InProcessDest {
            addr,
            metrics,
            server,
            outcomes,
        }
    }

    /// The first migration's outcome (within `timeout`); stops serving.
    fn outcome(&mut self, rt: &tokio::runtime::Runtime, timeout: Duration) -> Outcome {
        let o = rt
            .block_on(async { tokio::time::timeout(timeout, self.outcomes.recv()).await })
            .expect("the destination reports the attempt")
            .expect("an outcome");
        self.server.abort();
        o
    }
}

#[test]
fn a_guest_the_destination_cannot_restore_is_refused_before_accept() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = daemon(&k, &["--plaintext", "--metrics", "127.0.0.1:0"]);
    let metrics = ferry_tests::metrics_addr(&dest).to_string();
    let good = offer(1 << 20).guest;
    let cases = [
        (
            GuestConfig {
                vcpus: 0,
                ..good.clone()
            },
            "0 vCPUs",
        ),
        (
            GuestConfig {
                vcpus: 2,
                ..good.clone()
            },
            "2 vCPUs, this destination restores at most 1",
        ),
        (
            GuestConfig {
                cpu_vendor: format!("Not{}", cpu_vendor()),
                ..good.clone()
            },
            "a guest cannot move between CPU vendors",
        ),
        (
            GuestConfig {
                device_state_format: "qemu-x86-v9".into(),
                ..good.clone()
            },
            "device-state format \"qemu-x86-v9\" is not one this destination restores (ferry-synthetic-v1)",
        ),
    ];
    rt().block_on(async {
        for (guest, why) in &cases {
            let o = ferry_transport::proto::Offer {
                guest: guest.clone(),
                ..offer(1 << 20)
            };
            let mut c = authed_offer(addr, &key(), o).await;
            match c.recv("the answer to the offer").await {
                Ok(Msg::Reject { reason, message }) => {
                    assert_eq!(reason, RejectReason::GuestConfig, "{message}");
                    assert!(message.contains(why), "{message:?} should say {why:?}");
                }
                other => panic!("expected Reject(GuestConfig) for {guest:?}, got {other:?}"),
            }
        }
    });
    let (_, text) = http_get(metrics.parse().unwrap(), "/metrics");
    assert_eq!(
        metric(
            &text,
            "ferry_migrations_aborted_total{reason=\"guest_config\"}"
        ),
        Some(cases.len() as f64),
        "{text}"
    );
    assert_eq!(metric(&text, "ferry_memory_allocated_bytes"), Some(0.0));
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
}

#[test]
fn a_failed_restore_refuses_the_commit_and_the_source_guest_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let key = AuthKey::new(KEY.to_vec()).unwrap();
    let resumed = Arc::new(AtomicBool::new(false));
    let r2 = resumed.clone();
    let hook = ResumeHook {
        supports: GuestSupport {
            max_vcpus: 1,
            cpu_vendor: Some(cpu_vendor()),
            device_state_formats: vec![SYNTHETIC_FORMAT.into()],
        },
        restore: Arc::new(|_, _| Err("vCPU 0: the CPUID leaf 0x7 it needs is not offered".into())),
        resume: Arc::new(move |_| {
            r2.store(true, Ordering::SeqCst);
            Ok("resumed".into())
        }),
    };
    let rt = rt();
    let mut dest = InProcessDest::start(&rt, &key, 1 << 30, Duration::from_secs(30), false, hook);
    let addr = dest.addr;
    let src = send(
        addr,
        &k,
        &[
            "--memory",
            "32MiB",
            "--dirty-rate",
            "8MB/s",
            "--performance-option",
            "tcp",
            // The refused commit is the subject: the switchover must come,
            // whether or not the pause fits the default limit on this host
            // (the destination runs in this process; see migrate_ok).
            "--force-switchover",
        ],
        LONG,
    );
    let outcome = dest.outcome(&rt, Duration::from_secs(30));
    assert!(!src.panicked(), "{}", src.all());
    assert_eq!(src.status.code(), Some(1), "{}", src.all());
    assert!(
        src.stderr.contains(
            "the destination refused the commit: device-state restore failed: vCPU 0: the CPUID leaf 0x7 it needs is not offered"
        ),
        "{}",
        src.all()
    );
    assert!(
        src.stderr.contains(KEEPS_RUNNING),
        "the source resumed its guest: {}",
        src.all()
    );
    assert!(
        matches!(outcome.result, Err(MigrationError::RestoreFailed(_))),
        "{:?}",
        outcome.result
    );
    assert!(
        !resumed.load(Ordering::SeqCst),
        "nothing resumes on the destination after a failed restore"
    );
    let text = dest.metrics.render();
    assert_eq!(
        metric(
            &text,
            "ferry_migrations_aborted_total{reason=\"restore_failed\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "ferry_migrations_committed_total"), Some(0.0));
}

#[test]
fn verify_full_still_verifies_the_whole_memory_in_the_pause() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("s.json");
    let (dest, addr) = listen(&k, &[]);
    let src = send(
        addr,
        &k,
        &[
            "--memory",
            "32MiB",
            "--dirty-rate",
            "4MB/s",
            "--verify",
            "full",
            // The whole-memory hash of a debug build is slow; the budget
            // counts it.
            "--downtime-limit",
            "20s",
            "--json",
            json.to_str().unwrap(),
        ],
        LONG,
    );
    let dest = dest.wait(LONG);
    assert!(src.status.success(), "{}", src.all());
    assert!(dest.status.success(), "{}", dest.all());
    let s = summary(&json);
    assert_eq!(s["verify"], "full");
    assert_eq!(s["digest_verified"], true);
    assert_eq!(s["audit"]["result"], "passed");
    // The budget predicted the whole-memory hash (from this host's hashing
    // rate), not just round trips.
    assert!(
        s["pause_predicted"]["verification_ms"].as_f64().unwrap()
            > s["pause_predicted"]["commit_round_trip_ms"]
                .as_f64()
                .unwrap(),
        "{s}"
    );
    assert!(
        src.stdout
            .contains("verified on both sides (page evidence and whole memory)"),
        "{}",
        src.all()
    );
    assert!(
        dest.stdout.contains(&format!(
            "digest {} verified (page evidence and whole memory)",
            s["digest"].as_str().unwrap()
        )),
        "{}",
        dest.all()
    );
}

// ---------------------------------------------------------------------------
// A dirty log that misses a guest write

/// The page the broken guest writes when it is paused.
const MISSED: u64 = 37 * 4096;

/// A [`DirtyLog`] that never reports [`MISSED`]: the bug class (a VMM whose
/// dirty tracking misses some writes) no transfer check can see.
struct MissesOnePage(BitmapDirtyLog);

impl DirtyLog for MissesOnePage {
    fn start(&self) {
        self.0.start()
    }
    fn harvest(&self) -> DirtySet {
        let mut set = self.0.harvest();
        for r in &mut set.regions {
            if (r.gpa..r.gpa + r.pages * 4096).contains(&MISSED) {
                let i = (MISSED - r.gpa) / 4096;
                r.words[(i / 64) as usize] &= !(1u64 << (i % 64));
            }
        }
        set
    }
    fn restore(&self, runs: &[PageRun]) {
        self.0.restore(runs)
    }
}

/// The synthetic guest, idle, whose last vCPU write lands as it pauses.
struct WritesAsItPauses {
    inner: SyntheticGuest,
    mem: Arc<SourceMemory>,
}

impl GuestControl for WritesAsItPauses {
    fn config(&self) -> GuestConfig {
        self.inner.config()
    }
    fn pause(&self) -> ferry_migration::Result<()> {
        self.mem
            .write_slice(&[0xa5; 4096], GuestAddress(MISSED))
            .unwrap();
        self.inner.pause()
    }
    fn resume(&self) -> ferry_migration::Result<()> {
        self.inner.resume()
    }
    fn device_state(&self) -> ferry_migration::Result<Vec<u8>> {
        self.inner.device_state()
    }
}

/// Migrates a 16 MiB idle guest whose last write the dirty log misses, to
/// `addr`, in this process.
fn migrate_with_a_missed_write(
    addr: std::net::SocketAddr,
    verify: Verify,
) -> (ferry_migration::Result<Summary>, bool) {
    rt().block_on(async {
        let mem = Arc::new(source_memory(&default_layout(16 << 20).unwrap()).unwrap());
        let guest = WritesAsItPauses {
            inner: SyntheticGuest::start(
                mem.clone(),
                SyntheticConfig {
                    dirty_rate: 0,
                    ..Default::default()
                },
            )
            .unwrap(),
            mem: mem.clone(),
        };
        let dirty = MissesOnePage(BitmapDirtyLog::new(mem.clone()));
        let key = AuthKey::new(KEY.to_vec()).unwrap();
        let src = Source {
            to: addr.to_string(),
            key: &key,
            guest: &guest,
            mem,
            dirty: &dirty,
            opts: SourceOptions {
                option: ferry_transport::proto::PerformanceOption::Tcp,
                verify,
                downtime_limit: Duration::from_secs(20),
                ..Default::default()
            },
            progress: Arc::new(Progress::default()),
            cancel: Default::default(),
        };
        let r = src.migrate().await;
        (r, guest.inner.is_running())
    })
}

#[test]
fn the_audit_catches_a_write_the_dirty_log_missed() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = daemon(&k, &["--metrics", "127.0.0.1:0"]);
    let metrics = ferry_tests::metrics_addr(&dest).to_string();
    // The transfer checks pass (both sides hold what was sent), so it
    // commits; the audit after the pause finds the page.
    let (r, running) = migrate_with_a_missed_write(addr, Verify::Evidence);
    let s = r.expect("committed: no transfer check can see the missed write");
    assert!(!running, "committed: the guest left this host");
    assert!(s.digest_verified);
    assert!(s.audit.failed(), "{:?}", s.audit);
    assert_eq!(s.audit.mismatched_pages, 1, "{:?}", s.audit);
    assert_eq!(s.audit.first_mismatch, Some(MISSED));
    assert_eq!(s.audit.pages, (16 << 20) / 4096);
    // Its line of output says so (its log line says it first).
    dest.wait_for_output(
        "AUDIT FAILED: 1 pages differ from the source's frozen memory (first at 0x25000)",
        Duration::from_secs(60),
    );
    let (_, text) = http_get(metrics.parse().unwrap(), "/metrics");
    assert_eq!(
        metric(&text, "ferry_audits_total{result=\"failed\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "ferry_last_pause_seconds{kind=\"actual\",part=\"total\"}"
        )
        .is_some(),
        "{text}"
    );
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
    // `ferry listen --once` says so with its exit status.
    let (dest, addr) = listen(&k, &[]);
    let (r, _) = migrate_with_a_missed_write(addr, Verify::Evidence);
    assert!(r.unwrap().audit.failed());
    let out = dest.wait(LONG);
    assert_eq!(out.status.code(), Some(5), "{}", out.all());
    assert!(out.stderr.contains("audit failed"), "{}", out.all());
}

#[test]
fn verify_full_catches_the_missed_write_before_commit() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &[]);
    let (r, running) = migrate_with_a_missed_write(addr, Verify::Full);
    let e = r.expect_err("the whole-memory check sees the missed write");
    assert!(
        matches!(
            e,
            MigrationError::Verification(ferry_proto::switchover::Mismatch::Memory)
        ),
        "{e}"
    );
    assert!(running, "the guest keeps running on the source");
    let out = dest.wait(LONG);
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("the whole-memory check (--verify full) differs"),
        "{}",
        out.all()
    );
}

#[test]
fn a_mostly_zero_guest_costs_memory_only_for_its_data_on_both_sides() {
    // 1 GiB of guest memory of which 2% holds data: only those pages may
    // cost memory, here and on the destination (no pre-faulting, no huge
    // pages over zero memory), and the audit still reads all of it.
    const SIZE: u64 = 1 << 30;
    let key = AuthKey::new(KEY.to_vec()).unwrap();
    let rt = rt();
    let hook = ResumeHook {
        supports: GuestSupport {
            max_vcpus: 1,
            cpu_vendor: Some(cpu_vendor()),
            device_state_formats: vec![SYNTHETIC_FORMAT.into()],
        },
        restore: Arc::new(|_, _| Ok("restored".into())),
        resume: Arc::new(|_| Ok("resumed".into())),
    };
    let mut dest = InProcessDest::start(&rt, &key, 2 << 30, Duration::from_secs(60), true, hook);
    let addr = dest.addr;
    let summary = rt.block_on(async {
        let mem = Arc::new(source_memory(&default_layout(SIZE).unwrap()).unwrap());
        let guest = SyntheticGuest::start(
            mem.clone(),
            SyntheticConfig {
                dirty_rate: 0,
                zero_fraction: 0.98,
                ..Default::default()
            },
        )
        .unwrap();
        let dirty = BitmapDirtyLog::new(mem.clone());
        let src = Source {
            to: addr.to_string(),
            key: &key,
            guest: &guest,
            mem,
            dirty: &dirty,
            opts: SourceOptions {
                option: ferry_transport::proto::PerformanceOption::Tcp,
                plaintext: true,
                // Both ends in this process, on a loaded debug build: the
                // pause is not what this tests (its round trips must not
                // cancel it).
                downtime_limit: Duration::from_secs(5),
                ..Default::default()
            },
            progress: Arc::new(Progress::default()),
            cancel: Default::default(),
        };
        src.migrate().await
    });
    let dest = dest
        .outcome(&rt, Duration::from_secs(60))
        .result
        .expect("committed on the destination");
    let s = summary.expect("committed");
    assert_eq!(s.audit.result, "passed", "{:?}", s.audit);
    assert_eq!(s.audit.pages, SIZE / 4096);
    // About 20 MiB of data pages; the rest never touched on either side.
    let data = s.payload_bytes;
    assert!(data < SIZE / 20, "{data}");
    for (side, resident) in [
        ("source", s.memory.guest_resident_bytes),
        ("destination", dest.memory.guest_resident_bytes),
    ] {
        assert!(
            resident >= data / 2 && resident < data + (16 << 20),
            "{side}: {resident} bytes of guest memory resident for {data} bytes of data"
        );
    }
}

// ---------------------------------------------------------------------------
// The page evidence end to end: a fault no per-chunk check can see

/// A frame a source holding the session's keys sends: its round, runs and
/// payload (the non-zero runs' bytes). Its tags hold: nothing on the data
/// channel objects to it.
struct Sent {
    round: u32,
    runs: Vec<PageRun>,
    payload: Vec<u8>,
}

fn page(fill: u8) -> Vec<u8> {
    let mut p = vec![fill; 4096];
    p[100] = fill.wrapping_mul(3).wrapping_add(1);
    p
}

fn run(gpa: u64) -> Vec<PageRun> {
    vec![PageRun {
        gpa,
        pages: 1,
        zero: false,
    }]
}

/// What the destination answered a switchover whose claims were `claimed`.
struct Answer {
    /// The destination's `Ready` checked against the claims.
    ready: std::result::Result<(), ferry_proto::switchover::Mismatch>,
    /// Its answer to `Commit` (sent whatever `Ready` said, as a buggy
    /// source would): `Committed` or `CommitRefused`.
    commit: Msg,
    /// The destination's output (`ferry listen --once`).
    dest: ferry_tests::Output,
}

/// A source whose page pass has a bug: it sends `frames` on one data
/// channel (every one with tags that hold, every one acknowledged as
/// landed), then switches over claiming it sent `claimed` (guest address,
/// bytes) for the 1 MiB guest's pages; the rest zero. Only the page
/// evidence can tell the two apart.
fn buggy_source(frames: Vec<Sent>, claimed: Vec<(u64, Vec<u8>)>) -> Answer {
    use ferry_proto::switchover::{self as proof, Claims, Transcripts};
    use ferry_transport::wire::AckStatus;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &["--plaintext"]);
    let (ready, commit) = rt().block_on(async move {
        let key = AuthKey::new(KEY.to_vec()).unwrap();
        let (mut conn, _) = ferry_tests::authed_session(addr, &key, 1 << 20).await;
        let keys = conn.session_keys().unwrap();
        let mut data = ferry_tests::data_channel(addr, &conn).await;
        for (seq, f) in frames.iter().enumerate() {
            let seq = seq as u64 + 1;
            let frame = ferry_tests::chunk_frame(&keys, seq, f.round, &f.runs, &f.payload);
            data.write_all(&frame).await.unwrap();
            assert_eq!(
                ferry_tests::read_ack(&mut data, &keys).await,
                Some((seq, AckStatus::Landed)),
                "no per-chunk check objects to frame {seq}"
            );
        }
        data.write_all(&ferry_tests::end_frame(&keys))
            .await
            .unwrap();
        let state = br#"{"writes":0,"dirty_rate":0}"#.to_vec();
        let device_state = proof::device_state_hash(&state);
        conn.send(&Msg::Switchover(ferry_transport::proto::Switchover {
            device_state: state,
            device_state_hash: device_state,
            verify_full: false,
        }))
        .await
        .unwrap();
        let t = conn.transcript();
        let Msg::Ready(ready) = conn.recv("Ready").await.unwrap() else {
            panic!("expected Ready")
        };
        let mut evidence = Evidence::default();
        for (gpa, bytes) in &claimed {
            evidence.apply(keys.page.contribution(*gpa, keys.page.hash_or_zero(bytes)));
        }
        let claims = Claims {
            transcripts: Transcripts {
                s2d: t.sent,
                d2s: t.received,
            },
            evidence,
            device_state,
            memory: None,
        };
        let checked = ready.check(&keys.commit, &claims);
        let mac = proof::commit_mac(&keys.commit, &claims, &ready);
        conn.send(&Msg::Commit { mac }).await.unwrap();
        let answer = conn.recv("the answer to Commit").await.unwrap();
        (checked, answer)
    });
    let dest = dest.wait(LONG);
    assert!(!dest.panicked(), "{}", dest.all());
    Answer {
        ready,
        commit,
        dest,
    }
}

/// The destination found the evidence different and never commits.
fn assert_refused(a: &Answer, kind: &str) {
    use ferry_proto::switchover::Mismatch;
    assert_eq!(a.ready, Err(Mismatch::Evidence), "{kind}: {}", a.dest.all());
    match &a.commit {
        Msg::CommitRefused { reason, .. } => {
            assert!(reason.contains("verification failed"), "{kind}: {reason}")
        }
        m => panic!("{kind}: expected CommitRefused, got {m:?}"),
    }
    assert_eq!(a.dest.status.code(), Some(1), "{kind}: {}", a.dest.all());
    assert!(
        a.dest.stdout.contains("switchover verification failed"),
        "{kind}: {}",
        a.dest.all()
    );
    assert!(
        !a.dest.stdout.contains(" committed: "),
        "{kind}: {}",
        a.dest.all()
    );
}

#[test]
fn the_page_evidence_refuses_what_no_per_chunk_check_sees() {
    let (a, b, newer) = (page(1), page(2), page(3));
    let both = |a: &[u8], b: &[u8]| [a, b].concat();
    // The control: what was sent is what is claimed, so it commits (the
    // test can tell a good migration from a bad one).
    let good = buggy_source(
        vec![Sent {
            round: 0,
            runs: vec![PageRun {
                gpa: 0,
                pages: 2,
                zero: false,
            }],
            payload: both(&a, &b),
        }],
        vec![(0, a.clone()), (4096, b.clone())],
    );
    assert_eq!(good.ready, Ok(()), "{}", good.dest.all());
    assert!(
        matches!(good.commit, Msg::Committed { .. }),
        "{:?}: {}",
        good.commit,
        good.dest.all()
    );
    // A corrupted page whose tags were made to fit it: what the source
    // hashed and claims is `b`, what it put on the wire is `b` with a bit
    // flipped.
    let mut flipped = b.clone();
    flipped[2000] ^= 0x10;
    let corrupted = buggy_source(
        vec![Sent {
            round: 0,
            runs: vec![PageRun {
                gpa: 0,
                pages: 2,
                zero: false,
            }],
            payload: both(&a, &flipped),
        }],
        vec![(0, a.clone()), (4096, b.clone())],
    );
    assert_refused(&corrupted, "corrupted page");
    // A page landed at the wrong address: `b` read from 0x1000, sent for
    // 0x3000.
    let misplaced = buggy_source(
        vec![
            Sent {
                round: 0,
                runs: run(0),
                payload: a.clone(),
            },
            Sent {
                round: 0,
                runs: run(3 * 4096),
                payload: b.clone(),
            },
        ],
        vec![(0, a.clone()), (4096, b.clone())],
    );
    assert_refused(&misplaced, "wrong address");
    // A dropped chunk: `b`'s chunk never sent, yet counted as sent.
    let dropped = buggy_source(
        vec![Sent {
            round: 0,
            runs: run(0),
            payload: a.clone(),
        }],
        vec![(0, a.clone()), (4096, b.clone())],
    );
    assert_refused(&dropped, "dropped chunk");
    // A stale copy: page 0x1000 sent as `b` in round 0 and as `newer` in
    // round 1, then the round-0 copy lands again, relabelled as round 1 (so
    // the round gate passes it).
    let stale = buggy_source(
        vec![
            Sent {
                round: 0,
                runs: vec![PageRun {
                    gpa: 0,
                    pages: 2,
                    zero: false,
                }],
                payload: both(&a, &b),
            },
            Sent {
                round: 1,
                runs: run(4096),
                payload: newer.clone(),
            },
            Sent {
                round: 1,
                runs: run(4096),
                payload: b.clone(),
            },
        ],
        vec![(0, a.clone()), (4096, newer.clone())],
    );
    assert_refused(&stale, "stale copy");
}

#[test]
fn verification_is_on_by_default_and_the_pause_parts_are_reported_everywhere() {
    // In every option this host can run (RDMA runs in the soft-RoCE VMs,
    // tests/rdma.rs): page evidence proved in the pause, an audit after
    // it, and the pause predicted and measured by part in the summary, the
    // --json record and the destination's metrics.
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    for option in ["tcp", "compression"] {
        let (dest, addr) = daemon(&k, &["--metrics", "127.0.0.1:0"]);
        let metrics = ferry_tests::metrics_addr(&dest).to_string();
        let json = dir.path().join(format!("{option}.json"));
        let src = send(
            addr,
            &k,
            &[
                "--memory",
                "32MiB",
                "--dirty-rate",
                "4MB/s",
                "--performance-option",
                option,
                // A loaded debug build: the pause is not what this tests.
                "--downtime-limit",
                "5s",
                "--json",
                json.to_str().unwrap(),
            ],
            LONG,
        );
        assert!(src.status.success(), "{option}: {}", src.all());
        let s = summary(&json);
        assert_eq!(s["verify"], "evidence", "{option}: {s}");
        assert_eq!(s["digest_verified"], true, "{option}: {s}");
        assert_eq!(s["audit"]["result"], "passed", "{option}: {s}");
        assert_eq!(s["audit"]["pages"], (32 << 20) / 4096, "{option}: {s}");
        assert_eq!(s["audit"]["mismatched_pages"], 0, "{option}: {s}");
        let parts = [
            "final_copy_ms",
            "device_state_ms",
            "verification_ms",
            "commit_round_trip_ms",
        ];
        let sum = |kind: &str| -> f64 {
            parts
                .iter()
                .map(|p| {
                    let v = s[kind][p]
                        .as_f64()
                        .unwrap_or_else(|| panic!("{kind}.{p}: {s}"));
                    assert!(v >= 0.0, "{option}: {kind}.{p}: {s}");
                    v
                })
                .sum()
        };
        // The measured parts are the pause cut at four instants: they add
        // up to it. The predicted ones add up to the predicted pause.
        let downtime = s["downtime_ms"].as_f64().unwrap();
        assert!(
            (sum("pause_actual") - downtime).abs() < 0.01,
            "{option}: {s}"
        );
        let predicted = s["predicted_downtime_ms"].as_f64().unwrap();
        assert!(
            (sum("pause_predicted") - predicted).abs() < 0.01,
            "{option}: {s}"
        );
        assert!(s["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0, "{s}");
        for line in [
            "  pause (ms): final copy ",
            "  predicted:  final copy ",
            "verified on both sides (page evidence)",
            "  audit passed: 8192 pages",
        ] {
            assert!(
                src.stdout.contains(line),
                "{option}: {line:?}: {}",
                src.all()
            );
        }
        // The destination's metrics carry the same parts (from the audit
        // report, in microseconds).
        dest.wait_for_output("audit passed (8192 pages)", Duration::from_secs(60));
        let (_, text) = http_get(metrics.parse().unwrap(), "/metrics");
        for (kind, key) in [("predicted", "pause_predicted"), ("actual", "pause_actual")] {
            for p in parts {
                let part = p.trim_end_matches("_ms");
                let m = metric(
                    &text,
                    &format!("ferry_last_pause_seconds{{kind=\"{kind}\",part=\"{part}\"}}"),
                )
                .unwrap_or_else(|| panic!("{option}: {kind} {part}: {text}"));
                let want = s[key][p].as_f64().unwrap() / 1e3;
                assert!(
                    (m - want).abs() < 2e-6,
                    "{option}: {kind} {part}: {m} vs {want}"
                );
            }
        }
        assert_eq!(
            metric(&text, "ferry_audits_total{result=\"passed\"}"),
            Some(1.0),
            "{option}: {text}"
        );
        let out = dest.kill();
        assert!(!out.panicked(), "{}", out.all());
    }
}
