//! Convergence and the pause budget: when pre-copy stops, and what the pause
//! that follows will cost. Pure: rates and durations are passed in.
//!
//! The pause (guest stopped on the source until `Committed`) is made of four
//! parts, predicted before the switchover from figures measured during
//! pre-copy, and measured again when it happens:
//!
//! ```text
//! final copy        = final dirty bytes / rate  + one round trip (the last acks)
//! device state      = device-state bytes / rate
//! verification      = one round trip (Switchover -> Ready) + verification work
//! commit round trip = one round trip (Commit -> Committed; the destination
//!                     restores the device state in it)
//! ```
//!
//! `rate` is the page bytes per second of the last pre-copy round (capped by
//! `--bandwidth-limit`), the round trip is the control connection's, measured
//! after every round, and the verification work is zero for the default
//! evidence check (a MAC over constant-size values) or the whole-memory hash
//! of `--verify full`. The engine switches over only when the predicted
//! total fits `--downtime-limit`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvergeReason {
    /// No page was dirty (and the rest of the pause fits the limit).
    NothingDirty,
    /// The predicted pause fits the downtime limit.
    FitsDowntime,
    /// The round cap was reached (switched over only with
    /// `--force-switchover`, else cancelled).
    RoundCap,
    /// The parts of the pause that no pre-copy round can shrink (round
    /// trips, device state, verification) are above the limit on their own
    /// (switched over only with `--force-switchover`, else cancelled).
    CannotFit,
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send another round.
    Continue,
    /// Pause the guest and copy the rest.
    Switchover(ConvergeReason),
}

/// The parts of a pause, predicted or measured, in milliseconds (see the
/// module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseParts {
    /// Pause to the final copy acknowledged.
    pub final_copy_ms: f64,
    /// Taking the device state and sending it.
    pub device_state_ms: f64,
    /// `Switchover` sent to `Ready` checked (the destination stops its
    /// channels and proves its evidence).
    pub verification_ms: f64,
    /// `Commit` sent to `Committed` checked (the destination restores the
    /// device state first).
    pub commit_round_trip_ms: f64,
}

impl PauseParts {
    /// The whole pause.
    pub fn total_ms(&self) -> f64 {
        self.final_copy_ms + self.device_state_ms + self.verification_ms + self.commit_round_trip_ms
    }

    /// The whole pause as a duration.
    pub fn total(&self) -> Duration {
        Duration::from_secs_f64(self.total_ms().max(0.0) / 1e3)
    }
}

/// Figures measured during pre-copy that the pause prediction uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PauseCosts {
    /// Page bytes per second over the last round that moved data (never
    /// above `--bandwidth-limit`); 0: unknown.
    pub rate: f64,
    /// Control-connection round trip.
    pub round_trip: Duration,
    /// Expected size of the device state.
    pub device_state_bytes: u64,
    /// Verification work inside the pause beyond the round trip (zero for
    /// the evidence check; the whole-memory hash with `--verify full`).
    pub verification: Duration,
}

impl PauseCosts {
    /// The pause predicted for a final copy of `dirty_bytes`. `None` when
    /// bytes must move and the rate is unknown. (Bytes that are not there
    /// cost nothing at any rate; a device state with no rate known yet is
    /// counted as free: it travels in one control message.)
    pub fn predict(&self, dirty_bytes: u64) -> Option<PauseParts> {
        let known = self.rate > 0.0 && self.rate.is_finite();
        if dirty_bytes > 0 && !known {
            return None;
        }
        let at_rate = |bytes: u64| {
            if bytes == 0 || !known {
                0.0
            } else {
                bytes as f64 / self.rate * 1e3
            }
        };
        let rtt = self.round_trip.as_secs_f64() * 1e3;
        Some(PauseParts {
            final_copy_ms: at_rate(dirty_bytes) + rtt,
            device_state_ms: at_rate(self.device_state_bytes),
            verification_ms: rtt + self.verification.as_secs_f64() * 1e3,
            commit_round_trip_ms: rtt,
        })
    }
}

/// The control connection's round trips measured between rounds (the
/// last three). The prediction uses the largest ([`RoundTrips::for_prediction`]:
/// a noisy host errs on the long side when deciding that a pause fits);
/// whether round trips alone make a pause impossible is judged on the
/// smallest of at least two ([`RoundTrips::best`]), so one that stalled on
/// a busy host costs another round, not the migration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTrips {
    last: std::collections::VecDeque<Duration>,
}

impl RoundTrips {
    /// How many are kept.
    pub const KEPT: usize = 3;

    /// A round trip measured after a round.
    pub fn measured(&mut self, rtt: Duration) {
        if self.last.len() == Self::KEPT {
            self.last.pop_front();
        }
        self.last.push_back(rtt);
    }

    /// The round trip the pause prediction uses: the largest of the last
    /// three measured (zero before any).
    pub fn for_prediction(&self) -> Duration {
        self.last.iter().copied().max().unwrap_or_default()
    }

    /// The smallest of the last three, once at least two were measured.
    pub fn best(&self) -> Option<Duration> {
        (self.last.len() >= 2).then(|| self.last.iter().copied().min().unwrap_or_default())
    }
}

/// Decides whether pre-copy has converged. Returns the decision and the
/// pause predicted for switching over now (`None`: rate unknown).
///
/// Criteria, in order:
/// 1. the parts of the pause no round can shrink (everything but the final
///    copy's bytes) are above `limit` → [`ConvergeReason::CannotFit`]:
///    more rounds cannot help;
/// 2. the predicted pause fits `limit` → [`ConvergeReason::NothingDirty`]
///    when nothing is dirty, else [`ConvergeReason::FitsDowntime`];
/// 3. `rounds_done >= max_rounds` → [`ConvergeReason::RoundCap`];
/// 4. otherwise another round.
pub fn decide(
    remaining_bytes: u64,
    costs: &PauseCosts,
    limit: Duration,
    rounds_done: u32,
    max_rounds: u32,
) -> (Decision, Option<PauseParts>) {
    let predicted = costs.predict(remaining_bytes);
    let fixed = costs
        .predict(0)
        .expect("an empty final copy is always predictable");
    if fixed.total() > limit {
        return (Decision::Switchover(ConvergeReason::CannotFit), predicted);
    }
    if let Some(p) = predicted {
        if p.total() <= limit {
            let why = if remaining_bytes == 0 {
                ConvergeReason::NothingDirty
            } else {
                ConvergeReason::FitsDowntime
            };
            return (Decision::Switchover(why), predicted);
        }
    }
    if rounds_done >= max_rounds {
        return (Decision::Switchover(ConvergeReason::RoundCap), predicted);
    }
    (Decision::Continue, predicted)
}

/// Auto-converge (QEMU-like): a round is *stuck* when the pause it predicts
/// is above the limit and it left at least 90% of the previous round's dirty
/// bytes. After two stuck rounds in a row the guest is throttled 20%, then
/// 10 points more after every further stuck round, up to 99%. The throttle
/// is never lowered during a migration (reset when it ends).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoConverge {
    stuck: u32,
    prev_remaining: Option<u64>,
    /// Throttle in force, percent.
    pub percent: u8,
}

/// First throttle step, percent.
pub const THROTTLE_INITIAL: u8 = 20;
/// Further steps, percent.
pub const THROTTLE_STEP: u8 = 10;
/// Highest throttle.
pub const THROTTLE_MAX: u8 = 99;

impl AutoConverge {
    /// Takes a round's outcome (`remaining` dirty bytes, whether the pause
    /// it predicts fits the limit) and returns the new throttle when it
    /// changes.
    pub fn after_round(&mut self, remaining: u64, fits: bool) -> Option<u8> {
        let shrank = self
            .prev_remaining
            .is_none_or(|p| (remaining as f64) < 0.9 * p as f64);
        self.prev_remaining = Some(remaining);
        if fits || shrank {
            self.stuck = 0;
            return None;
        }
        self.stuck += 1;
        let next = match self.percent {
            0 if self.stuck >= 2 => THROTTLE_INITIAL,
            0 => return None,
            p => p.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
        };
        (next != self.percent).then(|| {
            self.percent = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn costs(rate: f64, rtt_ms: u32) -> PauseCosts {
        PauseCosts {
            rate,
            round_trip: rtt_ms * MS,
            device_state_bytes: 0,
            verification: Duration::ZERO,
        }
    }

    #[test]
    fn prediction_adds_the_parts() {
        let c = PauseCosts {
            rate: 1e9,
            round_trip: 2 * MS,
            device_state_bytes: 10_000_000,
            verification: 5 * MS,
        };
        // 100 MB at 1 GB/s = 100 ms; 10 MB of device state = 10 ms.
        let p = c.predict(100_000_000).unwrap();
        assert!((p.final_copy_ms - 102.0).abs() < 1e-6, "{p:?}");
        assert!((p.device_state_ms - 10.0).abs() < 1e-6);
        assert!((p.verification_ms - 7.0).abs() < 1e-6);
        assert!((p.commit_round_trip_ms - 2.0).abs() < 1e-6);
        assert!((p.total_ms() - 121.0).abs() < 1e-6);
        assert_eq!(p.total(), Duration::from_micros(121_000));
        // Unknown rate: bytes cannot be predicted, an empty copy can.
        assert_eq!(costs(0.0, 1).predict(1), None);
        let empty = costs(0.0, 1).predict(0).unwrap();
        assert!((empty.total_ms() - 3.0).abs() < 1e-9, "{empty:?}");
    }

    #[test]
    fn convergence_criteria_in_order() {
        let ms300 = 300 * MS;
        let fast = costs(1e9, 1);
        assert_eq!(
            decide(0, &fast, ms300, 1, 30).0,
            Decision::Switchover(ConvergeReason::NothingDirty)
        );
        // 100 MB at 1 GB/s = 100 ms + 3 round trips <= 300 ms
        assert_eq!(
            decide(100_000_000, &fast, ms300, 1, 30).0,
            Decision::Switchover(ConvergeReason::FitsDowntime)
        );
        // 1 GB at 1 GB/s = 1 s > 300 ms
        assert_eq!(
            decide(1_000_000_000, &fast, ms300, 1, 30).0,
            Decision::Continue
        );
        assert_eq!(
            decide(1_000_000_000, &fast, ms300, 30, 30).0,
            Decision::Switchover(ConvergeReason::RoundCap)
        );
        assert_eq!(
            decide(1, &costs(0.0, 0), ms300, 1, 30).0,
            Decision::Continue,
            "unknown bandwidth never fits"
        );
    }

    #[test]
    fn the_constant_parts_count_against_the_limit() {
        let ms300 = 300 * MS;
        // 290 MB at 1 GB/s fits on its own, not with 3 x 5 ms round trips.
        assert_eq!(
            decide(290_000_000, &costs(1e9, 5), ms300, 1, 30).0,
            Decision::Continue
        );
        assert_eq!(
            decide(280_000_000, &costs(1e9, 5), ms300, 1, 30).0,
            Decision::Switchover(ConvergeReason::FitsDowntime)
        );
        // A device state that takes 250 ms leaves room for 50 ms of pages.
        let big_state = PauseCosts {
            device_state_bytes: 250_000_000,
            ..costs(1e9, 0)
        };
        assert_eq!(
            decide(60_000_000, &big_state, ms300, 1, 30).0,
            Decision::Continue
        );
        assert_eq!(
            decide(40_000_000, &big_state, ms300, 1, 30).0,
            Decision::Switchover(ConvergeReason::FitsDowntime)
        );
        // Verification of 400 ms can never fit 300 ms, however small the copy.
        let full = PauseCosts {
            verification: 400 * MS,
            ..costs(1e9, 0)
        };
        let (d, p) = decide(0, &full, ms300, 1, 30);
        assert_eq!(d, Decision::Switchover(ConvergeReason::CannotFit));
        assert!((p.unwrap().verification_ms - 400.0).abs() < 1e-6);
    }

    #[test]
    fn auto_converge_throttles_stuck_rounds_in_steps() {
        let mut a = AutoConverge::default();
        // Shrinking rounds never throttle.
        assert_eq!(a.after_round(1000, false), None);
        assert_eq!(a.after_round(800, false), None);
        // Two stuck rounds (>= 90% of the one before, pause too long): 20%.
        assert_eq!(a.after_round(790, false), None);
        assert_eq!(a.after_round(800, false), Some(THROTTLE_INITIAL));
        // Then +10 per stuck round...
        assert_eq!(a.after_round(780, false), Some(30));
        // ...not while rounds shrink or fit the limit...
        assert_eq!(a.after_round(500, false), None);
        assert_eq!(a.after_round(500, true), None);
        assert_eq!(a.percent, 30);
        // ...up to 99.
        for _ in 0..20 {
            a.after_round(500, false);
        }
        assert_eq!(a.percent, THROTTLE_MAX);
        assert_eq!(a.after_round(500, false), None, "no change at the top");
    }
}
