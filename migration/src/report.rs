//! The `ferry send --json` record of a migration, its time series, and
//! `ferry report`: a text summary and a self-contained SVG drawing of it.
//!
//! The JSON document ([`Record`], schema [`SCHEMA`]) is written for every
//! outcome. It holds:
//!
//! * `schema`: the version of this layout (an integer; a reader refuses
//!   versions it does not know). Fields may be added within a version,
//!   never removed or renamed. Version 2 added `outcome`, `error`,
//!   `guest`, `destination`, `migration_id` and records of migrations that
//!   did not commit; `ferry report` reads versions 1 and 2.
//! * `outcome`: [`Outcome`] (`committed`, `failed`, `cancelled`,
//!   `not_converged`), `error` (the error text, `null` when committed),
//!   `reason` (the kind of failure as a snake_case label, the one
//!   `ferry_migrations_aborted_total{reason}` uses: `not_converged`,
//!   `pause_cannot_fit` and `deadline` tell apart the ways of not
//!   converging; `null` when committed) and `guest` (where the guest runs now: `destination`, `source`, or
//!   `paused_on_source` when a commit went unconfirmed).
//! * committed: the engine's [`Summary`], every field at the top level
//!   (`rounds` and `channels` included); otherwise [`Partial`]: what the
//!   migration got to (its rounds and channels so far).
//! * `samples`: the time series, one [`Sample`] every ~100 ms from the
//!   start to the end.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ferry_transport::proto::PerformanceOption;
use ferry_transport::ChannelStats;

use crate::engine::{Phase, Progress, RoundStats, Summary};

/// Version of the `--json` layout written.
pub const SCHEMA: u32 = 2;

/// Versions `ferry report` reads.
pub const SCHEMAS_READ: [u32; 2] = [1, 2];

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Committed: the guest runs on the destination.
    Committed,
    /// Failed; the guest runs on the source (unless `guest` says otherwise).
    Failed,
    /// Cancelled by the operator (SIGINT/SIGTERM); the guest runs on the source.
    Cancelled,
    /// Cancelled because the guest did not converge (`--max-rounds`,
    /// `--timeout`, or a `--downtime-limit` no pause can fit); the guest
    /// runs on the source.
    NotConverged,
}

impl Outcome {
    /// `committed`, `failed`, `cancelled` or `not_converged`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::NotConverged => "not_converged",
        }
    }
}

impl Default for Outcome {
    /// Schema 1 recorded committed migrations only.
    fn default() -> Self {
        Outcome::Committed
    }
}

/// Shortest span a drawn or reported throughput is measured over.
pub const RATE_WINDOW_MS: f64 = 300.0;

/// One point of the time series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the migration started.
    pub t_ms: f64,
    /// `connecting`, `precopy`, `switchover` (guest paused) or `done`.
    pub phase: String,
    /// Current round (the final copy has the last number).
    pub round: u64,
    /// Dirty bytes left after the last finished round.
    pub remaining_dirty_bytes: u64,
    /// Bytes in the current round's set.
    pub round_bytes: u64,
    /// Page bytes sent so far.
    pub sent_bytes: u64,
    /// Page bytes each data channel carried so far, by channel index.
    pub channel_bytes: Vec<u64>,
}

impl Sample {
    fn of(p: &Progress, started: Instant) -> Sample {
        Sample {
            t_ms: started.elapsed().as_secs_f64() * 1e3,
            phase: match p.phase() {
                Phase::Connecting => "connecting",
                Phase::Precopy => "precopy",
                Phase::Switchover => "switchover",
                Phase::Done => "done",
            }
            .into(),
            round: p.round.load(Ordering::Relaxed),
            remaining_dirty_bytes: p.remaining_bytes.load(Ordering::Relaxed),
            round_bytes: p.round_bytes.load(Ordering::Relaxed),
            sent_bytes: p.sent_bytes.load(Ordering::Relaxed),
            channel_bytes: p.channels().iter().map(|c| c.payload_bytes).collect(),
        }
    }
}

/// Samples a migration's [`Progress`] at a fixed interval until stopped.
#[derive(Debug)]
pub struct Sampler {
    progress: Arc<Progress>,
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `progress` every `every` (call it when the
    /// migration starts: sample times count from here).
    pub fn start(progress: Arc<Progress>, every: Duration) -> Sampler {
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (p, s) = (progress.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let sample = Sample::of(&p, started);
                s.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
            }
        });
        Sampler {
            progress,
            started,
            samples,
            task,
        }
    }

    /// Stops, takes one last sample and returns the series.
    pub fn stop(self) -> Vec<Sample> {
        self.task.abort();
        let mut s = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        s.push(Sample::of(&self.progress, self.started));
        s
    }
}

/// What `ferry send --json` writes (see the module doc).
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// [`SCHEMA`].
    pub schema: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it did not commit (`None` when committed).
    pub error: Option<String>,
    /// What kind of failure, as a snake_case label (the
    /// `ferry_migrations_aborted_total{reason}` one: `not_converged`,
    /// `pause_cannot_fit`, `deadline`, `cancelled`, `shutdown`,
    /// `peer_closed`, ...); `None` when committed or not known.
    pub reason: Option<String>,
    /// Where the guest runs now: `destination`, `source` or
    /// `paused_on_source`.
    pub guest: &'static str,
    /// The destination, as given.
    pub destination: &'a str,
    /// The destination's id of the migration, once it accepted it.
    pub migration_id: Option<u64>,
    /// Committed: the engine's summary, flattened into the document.
    #[serde(flatten)]
    pub summary: Option<&'a Summary>,
    /// Not committed: what it got to, flattened into the document.
    #[serde(flatten)]
    pub partial: Option<Partial>,
    /// The time series.
    pub samples: &'a [Sample],
}

/// What a migration that did not commit got to.
#[derive(Debug, Clone, Serialize)]
pub struct Partial {
    /// Performance option (as `Summary::option`; `auto` when the
    /// migration ended before it chose).
    pub option: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// From the start to the end.
    pub total_ms: f64,
    /// `--downtime-limit`, ms.
    pub downtime_limit_ms: f64,
    /// `--bandwidth-limit`, bytes per second (all channels together).
    pub bandwidth_limit: Option<u64>,
    /// The rounds finished (no final copy).
    pub rounds: Vec<RoundStats>,
    /// Per-channel counters at the end.
    pub channels: Vec<ChannelStats>,
}

/// The part of a record that `ferry report` reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordIn {
    /// Layout version.
    pub schema: u32,
    /// How it ended (schema 1: committed).
    #[serde(default)]
    pub outcome: Outcome,
    /// Why it did not commit.
    #[serde(default)]
    pub error: Option<String>,
    /// Performance option, as written.
    #[serde(default)]
    pub option: serde_json::Value,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Start to end (committed: connect to commit).
    pub total_ms: f64,
    /// Pause to commit (committed only).
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// `--downtime-limit` (schema 2).
    #[serde(default)]
    pub downtime_limit_ms: Option<f64>,
    /// `--bandwidth-limit`, bytes per second.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    /// Pause, since the start (committed only).
    #[serde(default)]
    pub switchover_ms: Option<f64>,
    /// Rounds, the final copy last.
    pub rounds: Vec<RoundIn>,
    /// Per-channel totals.
    pub channels: Vec<ChannelIn>,
    /// Time series.
    pub samples: Vec<Sample>,
    /// Digest verified on both sides.
    #[serde(default)]
    pub digest_verified: bool,
}

/// A round as `ferry report` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct RoundIn {
    /// Round number.
    pub round: u32,
    /// Start, since the migration started.
    pub start_ms: f64,
    /// Duration.
    pub duration_ms: f64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Dirty bytes left after it.
    pub dirty_bytes_after: u64,
}

/// A data channel as `ferry report` reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct ChannelIn {
    /// Index.
    pub channel: u16,
    /// Page bytes carried.
    pub payload_bytes: u64,
    /// Chunks acknowledged.
    pub chunks: u64,
    /// CRC resends.
    #[serde(default)]
    pub crc_resends: u64,
    /// active / ended / failed.
    #[serde(default)]
    pub state: String,
    /// Local address.
    #[serde(default)]
    pub local: Option<String>,
    /// Remote address.
    #[serde(default)]
    pub remote: Option<String>,
}

/// Why a `--json` file cannot be reported on.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Not JSON, or not a migration record.
    #[error("not a ferry migration record (JSON written by `ferry send --json`): {0}")]
    NotARecord(String),
    /// Another layout version.
    #[error("record has schema {found}; this ferry reads schemas 1 and {SCHEMA}")]
    Schema {
        /// The file's version.
        found: u64,
    },
    /// Nothing to draw.
    #[error("record has no {0}")]
    Empty(&'static str),
}

impl RecordIn {
    /// Parses and checks a record.
    pub fn parse(bytes: &[u8]) -> Result<RecordIn, ReportError> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ReportError::NotARecord(e.to_string()))?;
        match v.get("schema").map(serde_json::Value::as_u64) {
            Some(Some(n)) if SCHEMAS_READ.iter().any(|s| u64::from(*s) == n) => {}
            Some(Some(n)) => return Err(ReportError::Schema { found: n }),
            _ => {
                return Err(ReportError::NotARecord(
                    "no integer \"schema\" field".into(),
                ))
            }
        }
        let r: RecordIn =
            serde_json::from_value(v).map_err(|e| ReportError::NotARecord(e.to_string()))?;
        if r.samples.is_empty() {
            return Err(ReportError::Empty("samples (time series)"));
        }
        if r.rounds.is_empty() && r.outcome == Outcome::Committed {
            return Err(ReportError::Empty("rounds"));
        }
        Ok(r)
    }

    /// Throughput of each channel, in bytes per second, at each sample's
    /// time (ms): one series per channel. Each rate is taken over the last
    /// [`RATE_WINDOW_MS`] or more (back to the latest sample at least that
    /// old), so that the engine refreshing its channel counters on its own
    /// beat does not alias into spikes.
    pub fn channel_rates(&self) -> Vec<Vec<(f64, f64)>> {
        let n = self
            .samples
            .iter()
            .map(|s| s.channel_bytes.len())
            .max()
            .unwrap_or(0);
        (0..n)
            .map(|c| {
                let bytes = |s: &Sample| s.channel_bytes.get(c).copied().unwrap_or(0);
                let mut points = vec![(0.0, 0.0)];
                let mut from = 0;
                for (i, now) in self.samples.iter().enumerate().skip(1) {
                    while from + 1 < i && self.samples[from + 1].t_ms <= now.t_ms - RATE_WINDOW_MS {
                        from += 1;
                    }
                    let then = &self.samples[from];
                    let dt = (now.t_ms - then.t_ms) / 1e3;
                    if dt > 0.0 {
                        points.push((now.t_ms, bytes(now).saturating_sub(bytes(then)) as f64 / dt));
                    }
                }
                points
            })
            .collect()
    }

    /// The performance option in words: `tcp`, `compression (zstd:1)`,
    /// from either schema's spelling (schema 1 wrote `"Tcp"` or
    /// `{"Compression": {"codec": 2, "level": 1}}`).
    pub fn option_name(&self) -> String {
        match serde_json::from_value::<PerformanceOption>(self.option.clone()) {
            Ok(o) => o.to_string(),
            Err(_) => match &self.option {
                serde_json::Value::String(o) => o.clone(),
                serde_json::Value::Null => "?".into(),
                o => o.to_string(),
            },
        }
    }

    /// Whether the last round is the final copy (committed records).
    fn has_final_copy(&self) -> bool {
        self.outcome == Outcome::Committed
    }

    /// A few lines for a terminal.
    pub fn text_summary(&self) -> String {
        let mut s = String::new();
        let option = self.option_name();
        let limit = self
            .downtime_limit_ms
            .map(|l| format!(" (limit {} ms)", trim(l)))
            .unwrap_or_default();
        match (self.outcome, self.downtime_ms) {
            (Outcome::Committed, Some(downtime)) => {
                let _ = writeln!(
                    s,
                    "migration of {} over {option}: committed, {:.2} s total, downtime {downtime:.1} ms{limit}, {} pre-copy rounds + final copy{}",
                    crate::units::human(self.memory_bytes),
                    self.total_ms / 1e3,
                    self.rounds.len().saturating_sub(1),
                    if self.digest_verified { ", digest verified" } else { "" }
                );
            }
            (outcome, _) => {
                let _ = writeln!(
                    s,
                    "migration of {} over {option}: {} after {:.2} s, {} pre-copy rounds; downtime limit{}",
                    crate::units::human(self.memory_bytes),
                    outcome.name(),
                    self.total_ms / 1e3,
                    self.rounds.len(),
                    if limit.is_empty() { " ?".to_string() } else { limit.replace(" (limit", "").replace(')', "") },
                );
                if let Some(e) = &self.error {
                    let _ = writeln!(s, "  error: {e}");
                }
            }
        }
        if let Some(cap) = self.bandwidth_limit {
            let _ = writeln!(
                s,
                "  bandwidth limit {}/s (all channels together)",
                mib(cap as f64)
            );
        }
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "  round {:>2}{}: {} in {:.0} ms ({}/s), {} dirty after",
                r.round,
                if self.has_final_copy() && r.round + 1 == self.rounds.len() as u32 {
                    " (final)"
                } else {
                    ""
                },
                mib(r.bytes as f64),
                r.duration_ms,
                mib(r.bytes as f64 / (r.duration_ms / 1e3).max(1e-6)),
                mib(r.dirty_bytes_after as f64),
            );
        }
        let rates = self.channel_rates();
        for c in &self.channels {
            let peak = rates
                .get(usize::from(c.channel))
                .map(|p| p.iter().map(|x| x.1).fold(0.0, f64::max))
                .unwrap_or(0.0);
            let _ = writeln!(
                s,
                "  channel {} {} -> {}: {} in {} chunks, peak {}/s, {} CRC resends, {}",
                c.channel,
                c.local.as_deref().unwrap_or("?"),
                c.remote.as_deref().unwrap_or("?"),
                mib(c.payload_bytes as f64),
                c.chunks,
                mib(peak),
                c.crc_resends,
                c.state
            );
        }
        let _ = writeln!(s, "  {} samples", self.samples.len());
        s
    }

    /// The migration as a self-contained SVG: remaining dirty bytes per
    /// round (bars), and throughput per channel over time (one line per
    /// channel) with round boundaries and the switchover marked.
    pub fn svg(&self) -> String {
        const TOP1: f64 = 75.0;
        const TOP2: f64 = TOP1 + PH + 90.0;
        const H: f64 = TOP2 + PH + 70.0;
        let colors = [
            "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        ];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{LEFT}" y="24" font-size="16">Ferry migration of {}: {}</text>"#,
            crate::units::human(self.memory_bytes),
            match self.downtime_ms {
                Some(d) if self.outcome == Outcome::Committed => format!(
                    "{:.2} s, downtime {d:.1} ms{}",
                    self.total_ms / 1e3,
                    self.downtime_limit_ms
                        .map(|l| format!(" (limit {} ms)", trim(l)))
                        .unwrap_or_default()
                ),
                _ => format!("{} after {:.2} s", self.outcome.name(), self.total_ms / 1e3),
            }
        );

        // Panel 1: remaining dirty bytes after each round.
        let max_dirty = self
            .rounds
            .iter()
            .map(|r| r.dirty_bytes_after)
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let ymax1 = nice_ceiling(max_dirty / MIB);
        axes(
            &mut s,
            TOP1,
            PH,
            "Remaining dirty bytes after each round",
            "MiB",
            ymax1,
            "round",
        );
        let n = self.rounds.len().max(1) as f64;
        let slot = PW / n;
        for (i, r) in self.rounds.iter().enumerate() {
            let h = r.dirty_bytes_after as f64 / MIB / ymax1 * PH;
            let x = LEFT + i as f64 * slot + slot * 0.15;
            let final_copy = self.has_final_copy() && i + 1 == self.rounds.len();
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>round {}: {} dirty after</title></rect>"#,
                TOP1 + PH - h,
                slot * 0.7,
                if final_copy { "#d62728" } else { "#1f77b4" },
                r.round,
                mib(r.dirty_bytes_after as f64)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + slot * 0.35,
                TOP1 + PH + 15.0,
                if final_copy {
                    "final".to_string()
                } else {
                    r.round.to_string()
                }
            );
        }

        // Panel 2: throughput per channel over time.
        let rates = self.channel_rates();
        let tmax = self
            .samples
            .last()
            .map(|s| s.t_ms)
            .unwrap_or(0.0)
            .max(self.total_ms)
            .max(1.0);
        // With several channels, their sum too: what a cap bounds.
        let total: Vec<(f64, f64)> = match rates.len() {
            0 | 1 => Vec::new(),
            _ => (0..rates[0].len())
                .map(|i| {
                    let t = rates[0][i].0;
                    (t, rates.iter().filter_map(|r| r.get(i)).map(|p| p.1).sum())
                })
                .collect(),
        };
        let max_rate = rates
            .iter()
            .flatten()
            .chain(&total)
            .map(|p| p.1)
            .chain(self.bandwidth_limit.map(|c| c as f64))
            .fold(0.0, f64::max)
            .max(1.0);
        let ymax2 = nice_ceiling(max_rate / MIB);
        axes(
            &mut s,
            TOP2,
            PH,
            "Throughput per data channel",
            "MiB/s",
            ymax2,
            "time (s)",
        );
        let xt = |t_ms: f64| LEFT + t_ms.clamp(0.0, tmax) / tmax * PW;
        // Time ticks.
        let step = nice_ceiling(tmax / 1e3 / 8.0);
        let mut t = 0.0;
        while t <= tmax / 1e3 + 1e-9 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                xt(t * 1e3),
                TOP2 + PH + 15.0,
                trim(t)
            );
            t += step;
        }
        // Switchover (downtime) shaded, the downtime limit outlined from
        // the pause on, round boundaries dashed.
        if let (Some(switchover), Some(downtime)) = (self.switchover_ms, self.downtime_ms) {
            let (sw, end) = (xt(switchover), xt(self.total_ms));
            let _ = writeln!(
                s,
                r##"<rect x="{sw:.1}" y="{TOP2}" width="{:.1}" height="{PH}" fill="#d62728" fill-opacity="0.15"><title>downtime {downtime:.1} ms</title></rect>
<text x="{sw:.1}" y="{:.1}" fill="#d62728">switchover (downtime {downtime:.1} ms)</text>"##,
                (end - sw).max(1.0),
                TOP2 - 4.0,
            );
            if let Some(limit) = self.downtime_limit_ms {
                let _ = writeln!(
                    s,
                    r##"<rect class="downtime-limit" x="{sw:.1}" y="{TOP2}" width="{:.1}" height="{PH}" fill="none" stroke="#d62728" stroke-dasharray="6 3"><title>downtime limit {} ms</title></rect>
<text x="{sw:.1}" y="{:.1}" fill="#d62728" font-size="10">limit {} ms</text>"##,
                    (xt(switchover + limit) - sw).max(1.0),
                    trim(limit),
                    TOP2 + PH - 4.0,
                    trim(limit),
                );
            }
        }
        if let Some(cap) = self.bandwidth_limit {
            let y = TOP2 + PH - cap as f64 / MIB / ymax2 * PH;
            let _ = writeln!(
                s,
                r##"<line class="bandwidth-limit" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#000" stroke-dasharray="8 4"><title>bandwidth limit {}/s (wire bytes, all channels)</title></line>
<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">bandwidth limit {}/s</text>"##,
                LEFT + PW,
                mib(cap as f64),
                LEFT + PW - 4.0,
                y - 4.0,
                mib(cap as f64),
            );
        }
        if !total.is_empty() {
            let pts: Vec<String> = total
                .iter()
                .map(|(t, r)| format!("{:.1},{:.1}", xt(*t), TOP2 + PH - r / MIB / ymax2 * PH))
                .collect();
            let lx = LEFT + PW + 15.0;
            let ly = TOP2 + 10.0 + rates.len() as f64 * 18.0;
            let _ = writeln!(
                s,
                r##"<polyline class="total" fill="none" stroke="#000" stroke-width="1" points="{}"/>
<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#000" stroke-width="1"/>
<text x="{:.1}" y="{:.1}">all channels</text>"##,
                pts.join(" "),
                lx + 20.0,
                lx + 25.0,
                ly + 4.0
            );
        }
        for r in &self.rounds {
            let x = xt(r.start_ms);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP2}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 3"><title>round {} starts</title></line>
<text x="{:.1}" y="{:.1}" fill="#888" font-size="10">r{}</text>"##,
                TOP2 + PH,
                r.round,
                x + 2.0,
                TOP2 + 10.0,
                r.round
            );
        }
        for (c, points) in rates.iter().enumerate() {
            let color = colors[c % colors.len()];
            let pts: Vec<String> = points
                .iter()
                .map(|(t, r)| format!("{:.1},{:.1}", xt(*t), TOP2 + PH - r / MIB / ymax2 * PH))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="channel" data-channel="{c}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = TOP2 + 10.0 + c as f64 * 18.0;
            let lx = LEFT + PW + 15.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/>
<text x="{:.1}" y="{:.1}">channel {c}</text>"#,
                lx + 20.0,
                lx + 25.0,
                ly + 4.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

const MIB: f64 = (1u64 << 20) as f64;
/// SVG width, left margin (y labels), plot width (the legend is right of
/// it) and panel height.
const W: f64 = 900.0;
const LEFT: f64 = 80.0;
const PW: f64 = W - LEFT - 160.0;
const PH: f64 = 220.0;

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / MIB)
}

/// Draws a panel's frame, title, y ticks and axis labels.
fn axes(s: &mut String, top: f64, ph: f64, title: &str, yunit: &str, ymax: f64, xlabel: &str) {
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}" font-size="14">{title}</text>
<rect x="{LEFT}" y="{top}" width="{PW}" height="{ph}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{xlabel}</text>
<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{yunit}</text>"##,
        top - 22.0,
        LEFT + PW / 2.0,
        top + ph + 35.0,
        top + ph / 2.0,
        top + ph / 2.0,
    );
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let y = top + ph - ph * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0,
            trim(v)
        );
    }
}

/// The smallest 1, 2 or 5 × 10^k at or above `v` (positive).
fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(1e-9);
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

/// A number without trailing zeros.
fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(channels: usize) -> serde_json::Value {
        let samples: Vec<serde_json::Value> = (0..20u32)
            .map(|i| {
                serde_json::json!({
                    "t_ms": f64::from(i) * 100.0,
                    "phase": if i < 15 { "precopy" } else { "switchover" },
                    "round": i / 5,
                    "remaining_dirty_bytes": 1000,
                    "round_bytes": 2000,
                    "sent_bytes": i * 1000,
                    "channel_bytes": (0..channels).map(|c| (c as u64 + 1) * u64::from(i) * 5_000_000).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "schema": 1,
            "option": "tcp",
            "memory_bytes": 64u64 << 20,
            "total_ms": 2000.0,
            "downtime_ms": 120.5,
            "switchover_ms": 1879.5,
            "digest_verified": true,
            "rounds": (0..4).map(|r| serde_json::json!({
                "round": r, "start_ms": f64::from(r) * 500.0, "duration_ms": 400.0,
                "bytes": 10u64 << 20, "pages": 2560, "dirty_bytes_after": if r == 3 { 0 } else { (8u64 >> r) << 20 },
            })).collect::<Vec<_>>(),
            "channels": (0..channels).map(|c| serde_json::json!({
                "channel": c, "payload_bytes": 1u64 << 20, "chunks": 3, "crc_resends": 0, "state": "ended",
            })).collect::<Vec<_>>(),
            "samples": samples,
        })
    }

    /// Tags balance, attributes are quoted, nothing is left unescaped: a
    /// small well-formedness check (no XML crate needed).
    fn check_xml(s: &str) {
        let body = s.split_once("?>").map_or(s, |(_, b)| b);
        let mut stack: Vec<String> = Vec::new();
        let mut rest = body;
        while let Some(i) = rest.find('<') {
            assert!(!rest[..i].contains('>'), "stray > before {:?}", &rest[i..]);
            let end = rest[i..].find('>').expect("unclosed tag") + i;
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap();
                stack.push(name.to_string());
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(body.trim_start().starts_with("<svg"));
    }

    #[test]
    fn svg_is_well_formed_with_a_line_per_channel_and_labelled_axes() {
        for channels in [1, 3] {
            let r = RecordIn::parse(record(channels).to_string().as_bytes()).unwrap();
            let svg = r.svg();
            check_xml(&svg);
            assert_eq!(
                svg.matches("<polyline class=\"channel\"").count(),
                channels,
                "{svg}"
            );
            // Several channels: their sum too.
            assert_eq!(svg.contains("class=\"total\""), channels > 1);
            for c in 0..channels {
                assert!(svg.contains(&format!("channel {c}</text>")), "legend {c}");
            }
            for label in [
                "MiB",
                "MiB/s",
                "time (s)",
                "round",
                "final",
                "switchover",
                "r0",
                "r3",
            ] {
                assert!(svg.contains(label), "missing {label}");
            }
            // Rounds: one bar each.
            assert_eq!(svg.matches("dirty after</title>").count(), 4);
        }
    }

    #[test]
    fn rates_follow_the_channel_counters() {
        let r = RecordIn::parse(record(2).to_string().as_bytes()).unwrap();
        let rates = r.channel_rates();
        assert_eq!(rates.len(), 2);
        // 5 MB per 100 ms = 50 MB/s on channel 0, twice that on channel 1.
        assert!((rates[0][3].1 - 50e6).abs() < 1.0, "{:?}", rates[0]);
        assert!((rates[1][3].1 - 100e6).abs() < 1.0);
        let text = r.text_summary();
        assert!(text.contains("downtime 120.5 ms"), "{text}");
        assert!(text.contains("round  3 (final)"), "{text}");
        assert!(text.contains("channel 1"), "{text}");
    }

    #[test]
    fn rates_are_windowed_so_a_slow_counter_refresh_does_not_alias() {
        // The counter moves 10 MB every other 100 ms sample: 50 MB/s, which
        // sample-to-sample differences would show as 0 and 100 MB/s.
        let mut v = record(1);
        for (i, s) in v["samples"].as_array_mut().unwrap().iter_mut().enumerate() {
            s["channel_bytes"] = serde_json::json!([(i as u64 / 2) * 10_000_000]);
        }
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        let rates = &r.channel_rates()[0];
        let settled: Vec<f64> = rates.iter().skip(4).map(|p| p.1).collect();
        assert!(settled.iter().all(|r| *r > 25e6 && *r < 75e6), "{rates:?}");
        let mean = settled.iter().sum::<f64>() / settled.len() as f64;
        assert!((mean - 50e6).abs() < 10e6, "{mean}");
    }

    #[test]
    fn bad_records_are_refused_by_name() {
        let e = RecordIn::parse(b"not json").unwrap_err();
        assert!(
            e.to_string().contains("not a ferry migration record"),
            "{e}"
        );
        let mut v = record(1);
        v["schema"] = 7.into();
        let e = RecordIn::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("schema 7"), "{e}");
        let mut v = record(1);
        v.as_object_mut().unwrap().remove("schema");
        assert!(RecordIn::parse(v.to_string().as_bytes()).is_err());
        let mut v = record(1);
        v["samples"] = serde_json::json!([]);
        let e = RecordIn::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("no samples"), "{e}");
    }

    #[test]
    fn the_svg_draws_the_downtime_limit_and_the_bandwidth_cap() {
        let mut v = record(2);
        v["schema"] = 2.into();
        v["downtime_limit_ms"] = 300.0.into();
        v["bandwidth_limit"] = 100_000_000u64.into();
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        let svg = r.svg();
        check_xml(&svg);
        assert!(svg.contains("class=\"downtime-limit\""), "{svg}");
        assert!(svg.contains("limit 300 ms"), "{svg}");
        assert!(svg.contains("class=\"bandwidth-limit\""), "{svg}");
        assert!(svg.contains("bandwidth limit 95.4 MiB/s"), "{svg}");
        let text = r.text_summary();
        assert!(text.contains("downtime 120.5 ms (limit 300 ms)"), "{text}");
        assert!(text.contains("bandwidth limit 95.4 MiB/s"), "{text}");
        // Without them, neither is drawn.
        let svg = RecordIn::parse(record(2).to_string().as_bytes())
            .unwrap()
            .svg();
        assert!(!svg.contains("downtime-limit") && !svg.contains("bandwidth-limit"));
    }

    #[test]
    fn records_of_migrations_that_did_not_commit_are_reported() {
        let mut v = record(1);
        let o = v.as_object_mut().unwrap();
        o.insert("schema".into(), 2.into());
        o.insert("outcome".into(), "not_converged".into());
        o.insert(
            "error".into(),
            "did not converge after 4 rounds: ...".into(),
        );
        o.remove("downtime_ms");
        o.remove("switchover_ms");
        o.insert("option".into(), "compression (zstd:1)".into());
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        let text = r.text_summary();
        assert!(
            text.contains(
                "migration of 64.00 MiB over compression (zstd:1): not_converged after 2.00 s"
            ),
            "{text}"
        );
        assert!(
            text.contains("error: did not converge after 4 rounds"),
            "{text}"
        );
        assert!(!text.contains("(final)"), "no final copy: {text}");
        let svg = r.svg();
        check_xml(&svg);
        assert!(
            svg.contains("Ferry migration of 64.00 MiB: not_converged after 2.00 s"),
            "{svg}"
        );
        assert!(!svg.contains("switchover (downtime"), "{svg}");
        // A failure before any round still makes a report.
        let mut v = v.clone();
        v["rounds"] = serde_json::json!([]);
        v["outcome"] = "failed".into();
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        check_xml(&r.svg());
        assert!(r.text_summary().contains("failed after"));
        // A committed record needs its rounds.
        let mut v = record(1);
        v["rounds"] = serde_json::json!([]);
        assert!(RecordIn::parse(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn the_option_is_named_in_either_schema() {
        let mut v = record(1);
        v["option"] = serde_json::json!({"Compression": {"codec": 2, "level": 1}});
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(r.option_name(), "compression (zstd:1)");
        v["option"] = "Tcp".into();
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(r.option_name(), "tcp");
        v["option"] = "compression (lz4)".into();
        let r = RecordIn::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(r.option_name(), "compression (lz4)");
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
        assert_eq!(trim(2.50), "2.5");
        assert_eq!(trim(3.0), "3");
    }
}
