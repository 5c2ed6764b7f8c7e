//! The source's convergence policy ([`ferry_proto::policy::Convergence`])
//! driven over simulated pre-copy: a guest that dirties memory at a given
//! rate (slowed by the throttle the policy asks for), a link of a given
//! rate and round trip, and the flags `ferry send` passes
//! (`--downtime-limit`, `--max-rounds`, `--force-switchover`,
//! `--auto-converge`). Each scenario checks what the policy concludes and
//! after how many rounds.

use std::time::Duration;

use ferry_proto::budget::{
    ConvergeReason, PauseCosts, RoundTrips, THROTTLE_INITIAL, THROTTLE_STEP,
};
use ferry_proto::policy::{AfterRound, ConvergeOptions, Convergence};

const MS: Duration = Duration::from_millis(1);
const GUEST: u64 = 1 << 30;

/// A guest and a link: each round sends what the last one left; while it
/// travels the guest dirties `dirty_rate` bytes per second, slowed by the
/// throttle, never more than `hot` bytes (its working set).
struct Sim {
    link: f64,
    rtt: Duration,
    dirty_rate: f64,
    hot: u64,
    verification: Duration,
}

/// How a simulated migration ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// What the last round's policy said.
    last: AfterRound,
    /// Pre-copy rounds sent.
    rounds: u32,
    /// Throttles applied, in order.
    throttles: Vec<u8>,
}

impl Sim {
    fn run(&self, opts: ConvergeOptions) -> Outcome {
        let mut policy = Convergence::new(opts);
        let mut rtts = RoundTrips::default();
        let costs = PauseCosts {
            rate: self.link,
            round_trip: self.rtt,
            device_state_bytes: 0,
            verification: self.verification,
        };
        let mut to_send = GUEST;
        let mut throttle = 0u8;
        let mut throttles = Vec::new();
        for round in 1..=1000 {
            let secs = to_send as f64 / self.link;
            let rate = self.dirty_rate * (100 - u32::from(throttle)) as f64 / 100.0;
            let remaining = ((rate * secs) as u64).min(self.hot) / 4096 * 4096;
            rtts.measured(self.rtt);
            match policy.after_round(remaining, &costs, &rtts, round) {
                AfterRound::Remeasure => {}
                AfterRound::Continue { throttle: t } => {
                    if let Some(t) = t {
                        throttle = t;
                        throttles.push(t);
                    }
                }
                last => {
                    return Outcome {
                        last,
                        rounds: round,
                        throttles,
                    }
                }
            }
            assert_eq!(policy.throttle(), throttle);
            to_send = remaining;
        }
        panic!("the policy never stopped pre-copy");
    }
}

impl Outcome {
    /// Why it switched over (`None`: cancelled).
    fn switched_over(&self) -> Option<ConvergeReason> {
        match self.last {
            AfterRound::Switchover { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

fn opts(max_rounds: u32, force: bool, auto: bool) -> ConvergeOptions {
    ConvergeOptions {
        downtime_limit: 300 * MS,
        max_rounds,
        force_switchover: force,
        auto_converge: auto,
    }
}

/// 1 GB/s link, 1 ms round trip; a guest dirtying `dirty` MB/s of a
/// `hot` MB working set.
fn sim(dirty: f64, hot: u64) -> Sim {
    Sim {
        link: 1e9,
        rtt: MS,
        dirty_rate: dirty * 1e6,
        hot: hot * 1_000_000,
        verification: Duration::ZERO,
    }
}

#[test]
fn a_quiet_guest_converges_once_the_pause_fits() {
    let o = sim(50.0, 1000).run(opts(30, false, false));
    // 1 GiB at 1 GB/s leaves ~54 MB dirty: 54 ms + 3 ms fits 300 ms.
    assert_eq!(o.rounds, 1);
    let AfterRound::Switchover { reason, predicted } = o.last else {
        panic!("{o:?}")
    };
    assert_eq!(reason, ConvergeReason::FitsDowntime);
    assert!(predicted.total() <= 300 * MS, "{predicted:?}");
    assert!(predicted.final_copy_ms > 50.0, "{predicted:?}");
}

#[test]
fn an_idle_guest_switches_over_with_nothing_dirty() {
    let o = sim(0.0, 0).run(opts(30, false, false));
    assert_eq!(o.rounds, 1);
    assert_eq!(
        o.switched_over(),
        Some(ConvergeReason::NothingDirty),
        "{o:?}"
    );
}

#[test]
fn a_busy_guest_is_cancelled_at_the_round_cap_unless_forced() {
    // 2 GB/s of dirtying over a 500 MB working set: every round leaves
    // 500 MB, 500 ms of final copy.
    let busy = sim(2000.0, 500);
    let o = busy.run(opts(5, false, false));
    assert_eq!(o.rounds, 5);
    let AfterRound::NotConverged { predicted_ms } = o.last else {
        panic!("{o:?}")
    };
    assert!((predicted_ms - 503.0).abs() < 1.0, "{predicted_ms}");
    let o = busy.run(opts(5, true, false));
    assert_eq!(o.rounds, 5);
    assert_eq!(o.switched_over(), Some(ConvergeReason::RoundCap), "{o:?}");
}

#[test]
fn auto_converge_throttles_a_stuck_guest_until_it_converges() {
    let busy = sim(2000.0, 500);
    // Without the flag: no throttle ever.
    assert!(busy.run(opts(30, false, false)).throttles.is_empty());
    let o = busy.run(opts(30, false, true));
    // Two stuck rounds, then 20%, then 10 points more per stuck round,
    // until the dirtying slows enough for the pause to fit.
    assert_eq!(o.throttles[0], THROTTLE_INITIAL);
    assert!(
        o.throttles.windows(2).all(|w| w[1] == w[0] + THROTTLE_STEP),
        "{o:?}"
    );
    assert_eq!(
        o.switched_over(),
        Some(ConvergeReason::FitsDowntime),
        "{o:?}"
    );
    assert!(o.rounds > 3 && o.rounds < 30, "{o:?}");
}

#[test]
fn a_pause_that_cannot_fit_cancels_at_once_unless_forced() {
    // --verify full at 400 ms: no round can make a 300 ms pause.
    let slow_check = Sim {
        verification: 400 * MS,
        ..sim(50.0, 1000)
    };
    let o = slow_check.run(opts(30, false, true));
    assert_eq!(o.rounds, 1);
    let AfterRound::CannotFit { fixed } = o.last else {
        panic!("{o:?}")
    };
    assert!((fixed.verification_ms - 401.0).abs() < 1e-6, "{fixed:?}");
    assert!((fixed.final_copy_ms - 1.0).abs() < 1e-6, "{fixed:?}");
    // Forced: rounds go on while they leave bytes (a quiet guest's shrink
    // to nothing by round 5, a busy one's never do: the round cap), an idle
    // guest switches over at once; each switchover says why the pause did
    // not fit.
    for (guest, rounds) in [
        (sim(50.0, 1000), 5),
        (sim(2000.0, 500), 7),
        (sim(0.0, 0), 1),
    ] {
        let o = Sim {
            verification: 400 * MS,
            ..guest
        }
        .run(opts(7, true, false));
        assert_eq!(
            (o.rounds, o.switched_over()),
            (rounds, Some(ConvergeReason::CannotFit)),
            "{o:?}"
        );
    }
}

#[test]
fn an_unknown_rate_never_fits_and_is_infinite_at_the_cap() {
    let mut p = Convergence::new(opts(2, false, false));
    let unknown = PauseCosts::default();
    assert_eq!(
        p.after_round(4096, &unknown, &RoundTrips::default(), 1),
        AfterRound::Continue { throttle: None }
    );
    assert_eq!(
        p.after_round(4096, &unknown, &RoundTrips::default(), 2),
        AfterRound::NotConverged {
            predicted_ms: f64::INFINITY
        }
    );
    // Forced at the cap: switched over with an empty prediction.
    let mut p = Convergence::new(opts(2, true, false));
    assert_eq!(
        p.after_round(4096, &unknown, &RoundTrips::default(), 2),
        AfterRound::Switchover {
            reason: ConvergeReason::RoundCap,
            predicted: Default::default()
        }
    );
}

/// A 1 GB/s link whose pause is predicted with the round trip `rtts` gives
/// (the largest of the last three).
fn costs(rtts: &RoundTrips) -> PauseCosts {
    PauseCosts {
        rate: 1e9,
        round_trip: rtts.for_prediction(),
        device_state_bytes: 0,
        verification: Duration::ZERO,
    }
}

#[test]
fn one_stalled_round_trip_costs_a_round_not_the_migration() {
    // A quiet guest; the first Pong took a second (a busy host), the next
    // ones 1 ms. With the largest of the last three the pause cannot fit
    // 300 ms until the stalled one leaves the window; the smallest of two
    // shows it could: measured again, never cancelled, and the pause is
    // predicted with the stalled round trip while it is in the window.
    let mut p = Convergence::new(opts(30, false, false));
    let mut rtts = RoundTrips::default();
    rtts.measured(1000 * MS);
    // One measured: no smallest of two yet, so it is not taken as the truth
    // (round trips are judged at zero): measured again.
    assert_eq!(
        p.after_round(0, &costs(&rtts), &rtts, 1),
        AfterRound::Remeasure
    );
    for round in 2..=3 {
        rtts.measured(MS);
        assert_eq!(rtts.for_prediction(), 1000 * MS, "still in the window");
        assert_eq!(
            p.after_round(0, &costs(&rtts), &rtts, round),
            AfterRound::Remeasure
        );
    }
    rtts.measured(MS);
    assert_eq!(rtts.for_prediction(), MS, "the stalled one left the window");
    assert!(matches!(
        p.after_round(0, &costs(&rtts), &rtts, 4),
        AfterRound::Switchover {
            reason: ConvergeReason::NothingDirty,
            ..
        }
    ));
}

#[test]
fn a_round_trip_that_stalled_at_the_round_cap_still_reads_as_the_round_cap() {
    // Four rounds that never converge (each leaves 512 MiB at 1 GB/s),
    // round trips of 1 ms but for one that stalled 200 ms in the last:
    // with the largest of the last three the parts no round can shrink
    // (600 ms) are over 300 ms, with the smallest (3 ms) they are not.
    // The cap is what ended pre-copy, and the diagnosis says so.
    let mut p = Convergence::new(opts(4, false, false));
    let mut rtts = RoundTrips::default();
    for round in 1..=3 {
        rtts.measured(MS);
        assert_eq!(
            p.after_round(GUEST / 2, &costs(&rtts), &rtts, round),
            AfterRound::Continue { throttle: None }
        );
    }
    rtts.measured(200 * MS);
    let AfterRound::NotConverged { predicted_ms } =
        p.after_round(GUEST / 2, &costs(&rtts), &rtts, 4)
    else {
        panic!("a stalled round trip at the cap is not 'cannot fit'");
    };
    assert!(predicted_ms > 300.0, "{predicted_ms}");
    // Round trips that are all long still cannot fit at the cap.
    let mut p = Convergence::new(opts(2, false, false));
    let mut slow = RoundTrips::default();
    slow.measured(200 * MS);
    slow.measured(200 * MS);
    assert!(matches!(
        p.after_round(GUEST / 2, &costs(&slow), &slow, 2),
        AfterRound::CannotFit { .. }
    ));
}

#[test]
fn round_trips_that_really_are_too_long_cancel_after_the_second() {
    // 150 ms each: three of them never fit 300 ms.
    let slow = Sim {
        rtt: 150 * MS,
        ..sim(50.0, 1000)
    };
    let o = slow.run(opts(30, false, false));
    assert_eq!(o.rounds, 2, "{o:?}");
    let AfterRound::CannotFit { fixed } = o.last else {
        panic!("{o:?}")
    };
    assert!((fixed.total_ms() - 450.0).abs() < 1e-6, "{fixed:?}");
    // ...and at the round cap when it comes first.
    assert!(matches!(
        slow.run(opts(1, false, false)).last,
        AfterRound::CannotFit { .. }
    ));
    // Forced: never measured again, rounds go on as before.
    let o = slow.run(opts(30, true, false));
    assert_eq!(o.switched_over(), Some(ConvergeReason::CannotFit), "{o:?}");
}

#[test]
fn the_round_trip_window_keeps_the_last_three() {
    let mut r = RoundTrips::default();
    assert_eq!((r.for_prediction(), r.best()), (Duration::ZERO, None));
    r.measured(5 * MS);
    assert_eq!((r.for_prediction(), r.best()), (5 * MS, None));
    r.measured(2 * MS);
    assert_eq!((r.for_prediction(), r.best()), (5 * MS, Some(2 * MS)));
    r.measured(3 * MS);
    r.measured(4 * MS);
    // 5 ms left: the largest of 2, 3, 4.
    assert_eq!((r.for_prediction(), r.best()), (4 * MS, Some(2 * MS)));
    r.measured(9 * MS);
    assert_eq!((r.for_prediction(), r.best()), (9 * MS, Some(3 * MS)));
}
