//! The summary `ferry send` prints after a commit.

use ferry_migration::engine::{ConvergeReason, PauseParts, Summary, Verify};
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
        super::err_out(&text);
    } else {
        super::out(&text);
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
        "  rounds: {} pre-copy + final copy (stopped: {}); downtime {:.1} ms (limit {} ms; predicted {:.1} ms)",
        s.rounds.len() - 1,
        match s.converge_reason {
            ConvergeReason::NothingDirty => "nothing left dirty",
            ConvergeReason::FitsDowntime => "the predicted pause fits the downtime limit",
            ConvergeReason::RoundCap => "--max-rounds reached",
            ConvergeReason::CannotFit => "no pause can fit the limit",
        },
        s.downtime_ms,
        units::trim(s.downtime_limit_ms),
        s.predicted_downtime_ms
    );
    let parts = |p: &PauseParts| {
        format!(
            "final copy {:.1}, device state {:.1}, verification {:.1}, commit round trip {:.1}",
            p.final_copy_ms, p.device_state_ms, p.verification_ms, p.commit_round_trip_ms
        )
    };
    outln!(out, "  pause (ms): {}", parts(&s.pause_actual));
    outln!(out, "  predicted:  {}", parts(&s.pause_predicted));
    if matches!(
        s.converge_reason,
        ConvergeReason::RoundCap | ConvergeReason::CannotFit
    ) {
        outln!(
            out,
            "  --force-switchover: switched over without a pause that fits the limit, predicted pause {:.0} ms",
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
    outln!(
        out,
        "  memory: peak RSS {} (guest {}, Ferry's own {} = {:.2}% of the guest)",
        units::human(s.memory.peak_rss_bytes),
        units::human(s.memory.guest_resident_bytes),
        units::human(s.memory.own_bytes),
        s.memory.own_percent_of_guest
    );
    outln!(out, "  CPU (this side, Ferry's own): {}", s.cpu);
    outln!(
        out,
        "  digest {} verified on both sides ({})",
        s.digest,
        match s.verify {
            Verify::Evidence => "page evidence",
            Verify::Full => "page evidence and whole memory",
        }
    );
    if s.audit.failed() {
        outln!(
            out,
            "  AUDIT FAILED: {} pages of the frozen source memory differ from what was migrated (first at {:#x}): the dirty log missed guest writes; the destination runs with stale pages",
            s.audit.mismatched_pages,
            s.audit.first_mismatch.unwrap_or(0)
        );
    } else {
        outln!(
            out,
            "  audit passed: {} pages of the frozen source memory equal what was migrated ({:.0} ms after the pause)",
            s.audit.pages,
            s.audit.duration_ms
        );
    }
    out
}
