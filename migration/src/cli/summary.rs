//! The summary `ferry send` prints after a commit.

use ferry_migration::engine::{ConvergeReason, Summary};
use ferry_transport::proto::PerformanceOption;
use ferry_transport::ChannelState;

use super::units;

/// `writeln!` into a `String` (cannot fail).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Prints the summary of a committed migration: on stdout, or on stderr
/// when stdout carries `--events -`.
pub fn print_summary(s: &Summary, notes: &[String], to_stderr: bool) {
    let mut text = summary(s);
    for n in notes {
        text.push_str(&format!("  note: {n}\n"));
    }
    if to_stderr {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
}

/// The summary's lines.
fn summary(s: &Summary) -> String {
    let mut out = String::new();
    outln!(
        out,
        "migration committed: {} guest over {} in {:.2} s",
        units::human(s.memory_bytes),
        s.option,
        s.total_ms / 1e3
    );
    outln!(
        out,
        "  rounds: {} pre-copy + final copy (stopped: {}); downtime {:.1} ms (limit {} ms; digest {:.1} ms)",
        s.rounds.len() - 1,
        match s.converge_reason {
            ConvergeReason::NothingDirty => "nothing left dirty",
            ConvergeReason::FitsDowntime => "the rest fits the downtime limit",
            ConvergeReason::RoundCap => "--max-rounds reached",
        },
        s.downtime_ms,
        units::trim(s.downtime_limit_ms),
        s.digest_ms
    );
    if s.converge_reason == ConvergeReason::RoundCap {
        outln!(
            out,
            "  --force-switchover: switched over without converging, predicted pause {:.0} ms",
            s.predicted_downtime_ms
        );
    }
    if s.rounds.iter().any(|r| r.throttle_percent > 0) {
        outln!(
            out,
            "  auto-converge: guest throttled {}% at switchover; per round (final copy last): {}",
            s.throttle_percent,
            s.rounds
                .iter()
                .map(|r| format!("{}%", r.throttle_percent))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(cap) = s.bandwidth_limit {
        outln!(
            out,
            "  bandwidth limit {}/s: {}/s on the wire",
            units::human(cap),
            units::human(s.wire_bytes_per_sec as u64)
        );
    }
    outln!(
        out,
        "  throughput {}/s ({:.2} Gbit/s); page bytes {}; bytes on the wire {}; chunks resent {}",
        units::human(s.throughput_bytes_per_sec as u64),
        s.throughput_bytes_per_sec * 8.0 / 1e9,
        units::human(s.payload_bytes),
        units::human(s.bytes_on_wire),
        s.crc_resends
    );
    if let PerformanceOption::Compression { .. } = s.option {
        let sum =
            |f: fn(&ferry_transport::ChannelStats) -> u64| s.channels.iter().map(f).sum::<u64>();
        outln!(
        out,
            "  compression: {:.2}x page bytes per wire byte; chunks compressed {}, raw (incompressible) {}, raw (link would idle) {}",
            s.compression_ratio,
            sum(|c| c.compressed_chunks),
            sum(|c| c.raw_incompressible_chunks),
            sum(|c| c.raw_link_idle_chunks),
        );
    }
    if s.channels.len() > 1 || s.channels.iter().any(|c| c.state == ChannelState::Failed) {
        outln!(out, "  data channels: {}", s.channels.len());
        for c in &s.channels {
            outln!(
                out,
                "    ch{} {} -> {}{}: {:?}, {} page bytes at {}/s, {} chunks{}{}",
                c.channel,
                c.local.as_deref().unwrap_or("?"),
                c.remote.as_deref().unwrap_or("?"),
                c.device
                    .as_deref()
                    .map(|d| format!(" (dev {d})"))
                    .unwrap_or_default(),
                c.state,
                units::human(c.payload_bytes),
                units::human(c.rate_bytes_per_sec),
                c.chunks,
                if c.requeued_chunks > 0 {
                    format!(", {} chunks requeued", c.requeued_chunks)
                } else {
                    String::new()
                },
                c.error
                    .as_deref()
                    .map(|e| format!(", failed: {e}"))
                    .unwrap_or_default(),
            );
        }
    }
    outln!(out, "  encryption: {}", s.encryption);
    outln!(out, "  digest {} verified on both sides", s.digest);
    out
}
