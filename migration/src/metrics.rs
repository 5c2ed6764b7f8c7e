//! The destination's Prometheus metrics (`ferry listen --metrics ADDR`).
//!
//! [`Metrics`] is the state the [`crate::dest::Destination`] updates;
//! [`Metrics::render`] writes it in the Prometheus text exposition format
//! (version 0.0.4) and [`serve`] answers `GET /metrics` with it over plain
//! HTTP/1.1 (one small request per connection: what Prometheus sends).
//!
//! Every migration attempt (a control connection that said hello, or sent
//! something else first) counts once in `ferry_migrations_started_total`
//! and, when it ends, once in either `ferry_migrations_committed_total` or
//! `ferry_migrations_aborted_total{reason}`, the reason being
//! [`MigrationError::reason`]; `ferry_migrations_active` holds the rest.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::budget::PauseParts;
use ferry_transport::proto::AuditResult;
use ferry_transport::tcp::RecvCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::error::MigrationError;
use crate::relay::{RelayLive, StreamSample};
use crate::summary::DestSummary;

/// Counters and gauges of one destination daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    started: AtomicU64,
    committed: AtomicU64,
    active: AtomicU64,
    memory_allocated: AtomicU64,
    /// Connections closed unread: peer outside --migration-network.
    refused_network: AtomicU64,
    refused_unauthenticated: AtomicU64,
    aborted: Mutex<BTreeMap<String, u64>>,
    received: Mutex<Received>,
    /// (downtime seen by the destination, migration duration) of the last
    /// committed migration, in seconds.
    last: Mutex<Option<(f64, f64)>>,
    /// Audits of committed migrations by result (`passed`, `failed`,
    /// `missing`).
    audits: Mutex<BTreeMap<String, u64>>,
    /// The last audited migration's pause: (predicted, measured) parts.
    last_pause: Mutex<Option<(PauseParts, PauseParts)>>,
    relays: Mutex<Relays>,
}

/// Relay streams (`ferry relay`): totals of finished relays by stream
/// index, plus the live counters of running ones.
#[derive(Debug, Default)]
struct Relays {
    /// (stream, direction) -> bytes.
    bytes: BTreeMap<(u32, &'static str), u64>,
    /// (stream, what was waited for) -> seconds.
    waits: BTreeMap<(u32, &'static str), f64>,
    live: Vec<(u64, Arc<RelayLive>)>,
}

impl Relays {
    fn add(
        bytes: &mut BTreeMap<(u32, &'static str), u64>,
        waits: &mut BTreeMap<(u32, &'static str), f64>,
        s: &StreamSample,
    ) {
        *bytes.entry((s.stream, "forward")).or_default() += s.forward_bytes;
        *bytes.entry((s.stream, "back")).or_default() += s.back_bytes;
        *waits.entry((s.stream, "deliver")).or_default() += s.waited_to_deliver_s;
        *waits.entry((s.stream, "window")).or_default() += s.waited_for_window_s;
        *waits.entry((s.stream, "hypervisor")).or_default() += s.waited_for_hypervisor_s;
    }
}

/// Page bytes received per data-channel label: totals of finished channels
/// plus the live counters of running ones.
#[derive(Debug, Default)]
struct Received {
    done: BTreeMap<String, u64>,
    live: Vec<(u64, String, Arc<RecvCounters>)>,
}

/// A migration attempt in progress: `ferry_migrations_active` counts it
/// until it is finished or dropped.
#[derive(Debug)]
pub struct Attempt {
    metrics: Arc<Metrics>,
    finished: bool,
}

impl Attempt {
    /// Records the attempt's outcome (committed, or aborted with a reason).
    pub fn finish(mut self, result: &Result<DestSummary, MigrationError>) {
        let m = &self.metrics;
        match result {
            Ok(s) => {
                m.committed.fetch_add(1, Ordering::Relaxed);
                *m.last.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((s.downtime_ms / 1e3, s.total_ms / 1e3));
                let result = match &s.audit {
                    Some(a) if a.result == AuditResult::Passed => "passed",
                    Some(_) => "failed",
                    None => "missing",
                };
                *m.audits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(result.into())
                    .or_default() += 1;
                if let Some(a) = &s.audit {
                    *m.last_pause.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((a.pause_predicted.into(), a.pause_actual.into()));
                }
            }
            Err(e) => m.aborted(e),
        }
        m.active.fetch_sub(1, Ordering::Relaxed);
        self.finished = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped without an outcome (its task was cancelled).
            self.metrics.active.fetch_sub(1, Ordering::Relaxed);
            *self
                .metrics
                .aborted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry("cancelled".into())
                .or_default() += 1;
        }
    }
}

/// Guest memory held by a migration in progress, counted in
/// `ferry_memory_allocated_bytes` until dropped.
#[derive(Debug)]
pub struct Allocation {
    metrics: Arc<Metrics>,
    bytes: u64,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.metrics
            .memory_allocated
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Metrics {
    /// A migration attempt begins.
    pub fn begin(self: &Arc<Self>) -> Attempt {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Attempt {
            metrics: self.clone(),
            finished: false,
        }
    }

    /// `bytes` of guest memory were allocated for a migration.
    pub fn allocated(self: &Arc<Self>, bytes: u64) -> Allocation {
        self.memory_allocated.fetch_add(bytes, Ordering::Relaxed);
        Allocation {
            metrics: self.clone(),
            bytes,
        }
    }

    fn aborted(&self, e: &MigrationError) {
        *self
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(e.reason())
            .or_default() += 1;
    }

    /// Counts the page bytes of a data channel of `migration` under
    /// `label` while it runs (see [`Metrics::retire`]).
    pub fn track_channel(&self, migration: u64, label: String, counters: Arc<RecvCounters>) {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .push((migration, label, counters));
    }

    /// Shows the streams of relay `migration` while it runs (see
    /// [`Metrics::retire_relay`]).
    pub fn track_relay(&self, migration: u64, live: Arc<RelayLive>) {
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .push((migration, live));
    }

    /// Relay `migration` ended: its streams' figures become fixed totals.
    pub fn retire_relay(&self, migration: u64) {
        let mut r = self.relays.lock().unwrap_or_else(|e| e.into_inner());
        let Relays { bytes, waits, live } = &mut *r;
        live.retain(|(id, l)| {
            if *id != migration {
                return true;
            }
            for s in l.streams() {
                Relays::add(bytes, waits, &s);
            }
            false
        });
    }

    /// `migration` ended: its channels' bytes become fixed totals.
    pub fn retire(&self, migration: u64) {
        let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        let Received { done, live } = &mut *r;
        live.retain(|(id, label, c)| {
            if *id != migration {
                return true;
            }
            *done.entry(label.clone()).or_default() += c.payload_bytes.load(Ordering::Relaxed);
            false
        });
    }

    /// Counts a connection refused before authentication because its peer
    /// is outside `--migration-network`; returns the count so far.
    pub fn refused_network(&self) -> u64 {
        self.refused_network.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a connection closed on accept: the caps on unauthenticated
    /// connections were reached. Returns the new total.
    pub fn refused_unauthenticated(&self) -> u64 {
        self.refused_unauthenticated.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The metrics in the Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v as f64)];
        let labelled = |key: &str, m: BTreeMap<String, u64>| -> Vec<(String, f64)> {
            m.into_iter()
                .map(|(k, v)| (format!("{{{key}=\"{}\"}}", escape(&k)), v as f64))
                .collect()
        };
        metric(
            "ferry_migrations_started_total",
            "counter",
            "Incoming migration attempts.",
            &plain(self.started.load(Ordering::Relaxed)),
        );
        metric(
            "ferry_migrations_committed_total",
            "counter",
            "Incoming migrations committed (digest verified, guest resumed here).",
            &plain(self.committed.load(Ordering::Relaxed)),
        );
        let mut aborted = self
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for r in crate::error::COMMON_REASONS {
            aborted.entry(r.to_string()).or_default();
        }
        metric(
            "ferry_migrations_aborted_total",
            "counter",
            "Incoming migrations that failed or were refused, by reason.",
            &labelled("reason", aborted),
        );
        metric(
            "ferry_connections_refused_network_total",
            "counter",
            "Connections closed before authentication: peer outside --migration-network.",
            &plain(self.refused_network.load(Ordering::Relaxed)),
        );
        metric(
            "ferry_connections_refused_unauthenticated_total",
            "counter",
            "Connections closed as soon as accepted: --max-unauthenticated or --max-unauthenticated-per-source reached.",
            &plain(self.refused_unauthenticated.load(Ordering::Relaxed)),
        );
        metric(
            "ferry_migrations_active",
            "gauge",
            "Incoming migrations in progress.",
            &plain(self.active.load(Ordering::Relaxed)),
        );
        metric(
            "ferry_memory_allocated_bytes",
            "gauge",
            "Guest memory held by migrations in progress.",
            &plain(self.memory_allocated.load(Ordering::Relaxed)),
        );
        let received = {
            let r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            let mut m = r.done.clone();
            for (_, label, c) in &r.live {
                *m.entry(label.clone()).or_default() += c.payload_bytes.load(Ordering::Relaxed);
            }
            m
        };
        metric(
            "ferry_received_bytes_total",
            "counter",
            "Page bytes received, by data channel (its index within its migration, or rdma).",
            &labelled("channel", received),
        );
        let (stream_bytes, stream_waits, open) = {
            let r = self.relays.lock().unwrap_or_else(|e| e.into_inner());
            let (mut bytes, mut waits, mut open) = (r.bytes.clone(), r.waits.clone(), 0u64);
            for (_, l) in &r.live {
                for s in l.streams() {
                    Relays::add(&mut bytes, &mut waits, &s);
                    open += u64::from(s.open);
                }
            }
            let stream = |k: &str, (s, v): &(u32, &str)| format!("{{stream=\"{s}\",{k}=\"{v}\"}}");
            (
                bytes
                    .iter()
                    .map(|(key, b)| (stream("direction", key), *b as f64))
                    .collect::<Vec<_>>(),
                waits
                    .iter()
                    .map(|(key, w)| (stream("wait", key), *w))
                    .collect::<Vec<_>>(),
                open,
            )
        };
        metric(
            "ferry_relay_streams_open",
            "gauge",
            "Relay streams (ferry relay: one per hypervisor connection) open now; each holds two --window buffers booked against --memory-limit.",
            &plain(open),
        );
        metric(
            "ferry_relay_stream_bytes_total",
            "counter",
            "Relay stream bytes delivered to this host's hypervisor (direction forward) or read from it (back), by stream (its index within its relay: 0 is the hypervisor's first connection, QEMU's main channel).",
            &stream_bytes,
        );
        metric(
            "ferry_relay_stream_wait_seconds_total",
            "counter",
            "Seconds relay streams waited, by stream and for what: deliver (this host's hypervisor to read: it set the pace), window (the source's credit, back direction), hypervisor (this host's hypervisor to write).",
            &stream_waits,
        );
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (downtime, duration) = match last {
            Some((d, t)) => (vec![(String::new(), d)], vec![(String::new(), t)]),
            None => (Vec::new(), Vec::new()),
        };
        metric(
            "ferry_last_downtime_seconds",
            "gauge",
            "Last committed migration: from the source's last pre-copy round to Committed, as the destination saw it.",
            &downtime,
        );
        metric(
            "ferry_last_migration_duration_seconds",
            "gauge",
            "Last committed migration: from its hello to Committed.",
            &duration,
        );
        let audits = self
            .audits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric(
            "ferry_audits_total",
            "counter",
            "Committed migrations by the source's audit of its frozen memory after the pause: passed, failed (the source's dirty log missed guest writes: this host runs stale pages), missing (no report came).",
            &labelled("result", audits),
        );
        let pause = *self.last_pause.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts = Vec::new();
        if let Some((predicted, actual)) = pause {
            for (kind, p) in [("predicted", predicted), ("actual", actual)] {
                for (part, ms) in [
                    ("final_copy", p.final_copy_ms),
                    ("device_state", p.device_state_ms),
                    ("verification", p.verification_ms),
                    ("commit_round_trip", p.commit_round_trip_ms),
                    ("total", p.total_ms()),
                ] {
                    parts.push((format!("{{kind=\"{kind}\",part=\"{part}\"}}"), ms / 1e3));
                }
            }
        }
        metric(
            "ferry_last_pause_seconds",
            "gauge",
            "Last audited migration: the pause as the source predicted it when pre-copy stopped and as it measured it, by part (final_copy, device_state, verification, commit_round_trip, total).",
            &parts,
        );
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// Most metrics connections served at once; more are closed on accept.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// Deadline for a metrics request's head.
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `GET /metrics` on `listener` forever; anything else gets 404
/// (another path) or 405 (another method). Like the migration port, it
/// cannot be stopped by strangers: an accept error is logged and retried
/// with backoff (never fatal), at most [`MAX_METRICS_CONNECTIONS`] are
/// served at once (more are closed as soon as accepted), and each has
/// [`METRICS_REQUEST_TIMEOUT`] to send its request.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    let mut starved = crate::admission::RefusalLog::new(Duration::from_secs(10));
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::ZERO;
                s
            }
            Err(e) => {
                let (wait, warn) = crate::admission::accept_retry(&e, &mut backoff);
                if warn && starved.note(std::time::Instant::now()).is_some() {
                    tracing::warn!(
                        "metrics: accepting a connection failed: {e}; retrying in {wait:?}"
                    );
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (bounded in size and time).
            let head = tokio::time::timeout(METRICS_REQUEST_TIMEOUT, async {
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => len += n,
                    }
                }
                true
            })
            .await;
            if head != Ok(true) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let mut first = request.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path.split('?').next()) {
                ("GET", Some("/metrics")) => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.render(),
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "ferry serves /metrics only\n".into(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET /metrics only\n".into(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            // A client that does not read its answer is not waited for.
            let _ = tokio::time::timeout(METRICS_REQUEST_TIMEOUT, async {
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::proto::RejectReason;
    use ferry_transport::TransportError;

    fn summary() -> DestSummary {
        DestSummary {
            migration_id: 1,
            peer: "p".into(),
            memory_bytes: 8192,
            payload_bytes: 4096,
            crc_errors: 0,
            digest: "00".into(),
            verify_full: false,
            restore_report: String::new(),
            resume_report: String::new(),
            audit: Some(ferry_transport::proto::AuditReport {
                result: AuditResult::Failed,
                pages: 2,
                mismatched_pages: 1,
                first_mismatch: Some(4096),
                duration_us: 10,
                pause_predicted: ferry_transport::proto::PauseMicros {
                    final_copy: 2000,
                    ..Default::default()
                },
                pause_actual: ferry_transport::proto::PauseMicros {
                    final_copy: 1000,
                    device_state: 500,
                    verification: 250,
                    commit_round_trip: 250,
                },
                mac: [0; 32],
            }),
            memory: Default::default(),
            total_ms: 1500.0,
            downtime_ms: 25.0,
            cpu: Default::default(),
        }
    }

    #[test]
    fn renders_counters_gauges_and_labels() {
        let m = Arc::new(Metrics::default());
        let a = m.begin();
        let mem = m.allocated(1 << 20);
        let c = Arc::new(RecvCounters::default());
        c.payload_bytes.store(4096, Ordering::Relaxed);
        m.track_channel(1, "0".into(), c.clone());
        let text = m.render();
        assert!(text.contains("ferry_migrations_active 1\n"), "{text}");
        assert!(text.contains("ferry_memory_allocated_bytes 1048576\n"));
        assert!(text.contains("ferry_received_bytes_total{channel=\"0\"} 4096\n"));
        c.payload_bytes.store(8192, Ordering::Relaxed);
        m.retire(1);
        c.payload_bytes.store(1, Ordering::Relaxed);
        drop(mem);
        a.finish(&Ok(summary()));
        let b = m.begin();
        b.finish(&Err(TransportError::AuthFailed("wrong key").into()));
        let b = m.begin();
        b.finish(&Err(TransportError::Rejected {
            reason: RejectReason::MemoryLimit,
            message: "too big".into(),
        }
        .into()));
        drop(m.begin());
        let text = m.render();
        for line in [
            "# TYPE ferry_migrations_started_total counter",
            "# TYPE ferry_migrations_active gauge",
            "ferry_migrations_started_total 4\n",
            "ferry_migrations_committed_total 1\n",
            "ferry_migrations_aborted_total{reason=\"auth\"} 1\n",
            "ferry_migrations_aborted_total{reason=\"memory_limit\"} 1\n",
            "ferry_migrations_aborted_total{reason=\"cancelled\"} 1\n",
            "ferry_migrations_active 0\n",
            "ferry_memory_allocated_bytes 0\n",
            "ferry_received_bytes_total{channel=\"0\"} 8192\n",
            "ferry_last_downtime_seconds 0.025\n",
            "ferry_last_migration_duration_seconds 1.5\n",
            "ferry_audits_total{result=\"failed\"} 1\n",
            "ferry_last_pause_seconds{kind=\"actual\",part=\"final_copy\"} 0.001\n",
            "ferry_last_pause_seconds{kind=\"actual\",part=\"total\"} 0.002\n",
            "ferry_last_pause_seconds{kind=\"predicted\",part=\"final_copy\"} 0.002\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Every sample has its HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn aborted_series_exist_at_zero_before_the_first_abort() {
        let text = Metrics::default().render();
        for r in ["auth", "busy", "timeout", "shutdown", "cancelled"] {
            let line = format!("ferry_migrations_aborted_total{{reason=\"{r}\"}} 0\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
