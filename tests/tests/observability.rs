//! Observability end to end: `ferry listen --metrics` counts what happened,
//! `ferry send --json` records rounds, channels and a time series, and
//! `ferry report` summarises and draws that record.

use std::time::{Duration, Instant};

use ferry_tests::{
    daemon, free_port, http_get, key_file, metric, metrics_addr, migrate_ok, send, summary, Proc,
    KEY,
};

#[test]
fn metrics_count_a_committed_and_an_unauthenticated_migration() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let wrong = key_file(dir.path(), "wrong", b"another key, 32 bytes long......");
    let (dest, addr) = daemon(&key, &["--metrics", "127.0.0.1:0"]);
    let maddr = metrics_addr(&dest);

    let (status, body) = http_get(maddr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&body, "ferry_migrations_started_total"), Some(0.0));

    let json = dir.path().join("s.json");
    let ok = send(
        addr,
        &key,
        &[
            "--memory",
            "64MiB",
            "--dirty-rate",
            "8MB/s",
            "--channels",
            "2",
            // The counters are the subject, not whether the pause fits
            // the default limit on this host (see migrate_ok).
            "--force-switchover",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(ok.status.success(), "{}", ok.all());
    let bad = send(
        addr,
        &wrong,
        &["--memory", "16MiB"],
        Duration::from_secs(60),
    );
    assert!(!bad.status.success(), "{}", bad.all());

    // The destination records the outcome just after the source returns.
    let start = Instant::now();
    let body = loop {
        let (_, body) = http_get(maddr, "/metrics");
        if metric(&body, "ferry_migrations_active") == Some(0.0)
            || start.elapsed() > Duration::from_secs(20)
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (status, _) = http_get(maddr, "/nope");
    assert!(status.contains("404"), "{status}");
    let dest = dest.kill();
    let all = format!("{body}\n{}", dest.all());
    for (sample, want) in [
        ("ferry_migrations_started_total", 2.0),
        ("ferry_migrations_committed_total", 1.0),
        ("ferry_migrations_aborted_total{reason=\"auth\"}", 1.0),
        ("ferry_migrations_active", 0.0),
        ("ferry_memory_allocated_bytes", 0.0),
    ] {
        assert_eq!(metric(&body, sample), Some(want), "{sample}: {all}");
    }
    for kind in [
        "# TYPE ferry_migrations_started_total counter",
        "# TYPE ferry_migrations_aborted_total counter",
        "# TYPE ferry_received_bytes_total counter",
        "# TYPE ferry_migrations_active gauge",
        "# TYPE ferry_last_downtime_seconds gauge",
        "# HELP ferry_migrations_committed_total ",
    ] {
        assert!(body.contains(kind), "{kind}: {all}");
    }
    // Bytes per channel: both channels carried pages, and together the
    // record's page bytes (a copy the destination refuses counts in the
    // record, not here: see the next test).
    let s = summary(&json);
    let ch0 = metric(&body, "ferry_received_bytes_total{channel=\"0\"}").unwrap_or(0.0);
    let ch1 = metric(&body, "ferry_received_bytes_total{channel=\"1\"}").unwrap_or(0.0);
    assert!(ch0 > 0.0 && ch1 > 0.0, "{all}");
    assert!(
        s["channels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "ended"),
        "no channel failed: {s}"
    );
    if s["crc_resends"] == 0 {
        assert_eq!(
            (ch0 + ch1) as u64,
            s["payload_bytes"].as_u64().unwrap(),
            "{all}"
        );
    }
    let downtime = metric(&body, "ferry_last_downtime_seconds").unwrap();
    assert!(downtime > 0.0, "{all}");
    assert!(metric(&body, "ferry_last_migration_duration_seconds").unwrap() >= downtime);
}

#[test]
fn send_json_records_a_time_series_that_report_draws() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("run.json");
    migrate_ok(
        &key,
        &[],
        &[
            "--memory",
            "128MiB",
            "--dirty-rate",
            "32MB/s",
            "--channels",
            "2",
            "--performance-option",
            "tcp",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );

    let s = summary(&json);
    assert_eq!(s["schema"], 2);
    assert_eq!(s["outcome"], "committed");
    assert_eq!(s["guest"], "destination");
    assert!(s["error"].is_null());
    let rounds = s["rounds"].as_array().unwrap();
    for r in rounds {
        for f in [
            "bytes",
            "pages",
            "duration_ms",
            "start_ms",
            "dirty_bytes_after",
            "rate_bytes_per_sec",
        ] {
            assert!(r.get(f).is_some(), "round lacks {f}: {r}");
        }
    }
    assert_eq!(rounds.last().unwrap()["dirty_bytes_after"], 0);
    let channels = s["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 2);
    for c in channels {
        for f in ["payload_bytes", "chunks", "crc_resends", "state"] {
            assert!(c.get(f).is_some(), "channel lacks {f}: {c}");
        }
    }
    let samples = s["samples"].as_array().unwrap();
    // Sampled every 100 ms over the whole migration: at least one sample
    // per 250 ms of its own reported duration (generous for a busy host).
    let total_ms = s["total_ms"].as_f64().unwrap();
    assert!(
        samples.len() as f64 >= (total_ms / 250.0).floor(),
        "{} samples over {total_ms} ms",
        samples.len()
    );
    let last = samples.last().unwrap();
    let per_channel: u64 = last["channel_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(per_channel, s["payload_bytes"].as_u64().unwrap(), "{last}");
    let t: Vec<f64> = samples
        .iter()
        .map(|x| x["t_ms"].as_f64().unwrap())
        .collect();
    assert!(t.windows(2).all(|w| w[0] <= w[1]), "{t:?}");

    let svg = dir.path().join("run.svg");
    let out = Proc::start(&[
        "report",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ])
    .wait(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.all());
    assert!(out.stdout.contains("downtime"), "{}", out.all());
    assert!(out.stdout.contains("channel 1"), "{}", out.all());
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<polyline class=\"channel\"").count(),
        2,
        "one line per channel"
    );
    assert!(svg.contains("switchover"));
}

#[test]
fn report_refuses_bad_input_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("garbage.json", "this is not json".to_string(), "not a ferry migration record"),
        ("schema.json", r#"{"schema": 99}"#.to_string(), "schema 99"),
        (
            "empty.json",
            r#"{"schema": 1, "memory_bytes": 1, "total_ms": 1, "downtime_ms": 1, "switchover_ms": 0,
                "rounds": [], "channels": [], "samples": []}"#
                .to_string(),
            "no samples",
        ),
    ];
    for (name, content, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let out = Proc::start(&["report", p.to_str().unwrap()]).wait(Duration::from_secs(30));
        assert!(!out.status.success(), "{name}: {}", out.all());
        assert!(!out.panicked(), "{}", out.all());
        assert!(out.stderr.contains(want), "{name}: {}", out.all());
        assert!(out.stderr.contains(name), "names the file: {}", out.all());
    }
    let out = Proc::start(&["report", "/nonexistent/x.json"]).wait(Duration::from_secs(30));
    assert!(out.stderr.contains("cannot read"), "{}", out.all());
}

#[test]
fn metrics_address_in_use_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Proc::start(&[
        "listen",
        "--listen",
        &listen,
        "--auth-key-file",
        key.to_str().unwrap(),
        "--metrics",
        &taken,
    ])
    .wait(Duration::from_secs(30));
    assert!(!out.status.success(), "{}", out.all());
    assert!(!out.panicked(), "{}", out.all());
    assert!(
        out.stderr
            .contains(&format!("--metrics: cannot listen on {taken}")),
        "{}",
        out.all()
    );
}

/// A chunk whose payload was damaged on the way is refused, and its pages
/// are sent again: the record's page bytes count both copies (what was
/// sent), the destination's received bytes the one that landed. They
/// differ by the refused copies exactly: more than nothing, at most one
/// chunk per resend.
#[test]
fn metrics_received_bytes_differ_from_the_record_by_the_refused_copies_only() {
    use ferry_tests::proxy::{Frame, Proxy, Verdict};
    use ferry_transport::proto::Role;
    use ferry_transport::wire::HEADER_LEN;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (dest, addr) = daemon(&key, &["--plaintext", "--metrics", "127.0.0.1:0"]);
    let maddr = metrics_addr(&dest);
    // Flip one bit in the payload of the second data chunk with a payload.
    let mut n = 0;
    let proxy = Proxy::start(
        addr,
        Box::new(move |f: &mut Frame| {
            if f.role == Some(Role::Data) {
                if let Some(h) = f.pages() {
                    let (runs, len) = (h.run_count.get() as usize, h.payload_len.get());
                    if len > 8192 {
                        n += 1;
                        if n == 2 {
                            let at = HEADER_LEN + runs * 16 + 5000;
                            f.bytes[at] ^= 0x10;
                        }
                    }
                }
            }
            Verdict::Forward
        }),
    );
    let json = dir.path().join("r.json");
    let src = send(
        proxy.addr(),
        &key,
        &[
            "--plaintext",
            // Round trips through the proxy count in the pause: the bytes
            // are the subject, not whether it fits the default limit.
            "--force-switchover",
            "--memory",
            "64MiB",
            "--dirty-rate",
            "8MB/s",
            "--performance-option",
            "tcp",
            "--chunk-size",
            "1MiB",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(src.status.success(), "{}", src.all());
    let s = summary(&json);
    assert!(s["crc_resends"].as_u64().unwrap() >= 1, "{s}");
    let start = Instant::now();
    let body = loop {
        let (_, body) = http_get(maddr, "/metrics");
        if metric(&body, "ferry_migrations_committed_total") == Some(1.0)
            || start.elapsed() > Duration::from_secs(60)
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let received = metric(&body, "ferry_received_bytes_total{channel=\"0\"}").unwrap() as u64;
    let sent = s["payload_bytes"].as_u64().unwrap();
    let refused = s["crc_resends"].as_u64().unwrap();
    let dest = dest.kill();
    let all = format!("{s}\n{body}\n{}", dest.all());
    assert!(received < sent, "the refused copy did not land: {all}");
    assert!(
        sent - received <= refused * (1 << 20),
        "at most one 1 MiB chunk per refused copy: {all}"
    );
}
