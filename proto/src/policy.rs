//! The policies of a migration, in one place. Pure functions; the source
//! (`ferry send`, the engine) and the destination daemon both ask here, so
//! a rule cannot drift between them.
//!
//! * Which options combine: what each performance option can encrypt and
//!   what each side then requires ([`source_encryption`],
//!   [`destination_admits`]).
//! * Convergence: after each pre-copy round, another round, the switchover
//!   or a cancellation, and the auto-converge throttle ([`Convergence`],
//!   built on [`crate::budget`]'s prediction and criteria).
//!
//! The rule: TCP and compression carry every byte inside the session's TLS
//! (on unless `--plaintext`). RDMA moves pages by RDMA WRITE, which TLS
//! cannot cover, so the RDMA option needs `--plaintext` (the operator's
//! consent) on both ends, and its control connection keeps TLS all the
//! same (it carries what admits the RDMA channels).

use std::time::Duration;

use crate::budget::{AutoConverge, ConvergeReason, Decision, PauseCosts, PauseParts, RoundTrips};
use crate::control::RejectReason;
use crate::option::PerformanceOption;

/// Why the RDMA option needs `--plaintext` (the source's message).
pub const RDMA_NOT_ENCRYPTED: &str = "--performance-option rdma needs --plaintext on both ends: RDMA data channels move pages by RDMA WRITE, unencrypted (its control connection keeps TLS). Use --performance-option tcp or compression to encrypt, or add --plaintext to ferry send and ferry listen on a trusted, isolated migration network";

/// The destination's refusal of a plain connection when it requires
/// encryption (no `--plaintext` on `ferry listen`).
pub const ENCRYPTION_REQUIRED: &str = "this destination requires encryption: leave out --plaintext on ferry send, or (on a trusted, isolated migration network) start ferry listen with --plaintext too";

/// The destination's refusal when it requires encryption and the source
/// asks for RDMA.
pub const RDMA_NEEDS_PLAINTEXT_DEST: &str = "RDMA data channels are not encrypted and this destination requires encryption: use --performance-option tcp or compression, or (on a trusted, isolated migration network) start both ferry listen and ferry send with --plaintext";

/// The destination's refusal of an RDMA offer on a plain control
/// connection.
pub const RDMA_NEEDS_TLS_CONTROL: &str = "the RDMA option's control connection must be encrypted (it carries what admits the RDMA channels): connect with TLS";

impl PerformanceOption {
    /// Whether the option's data channels can carry pages inside TLS.
    pub fn can_encrypt_data(self) -> bool {
        !matches!(self, PerformanceOption::Rdma)
    }
}

/// What a source encrypts with `option` and `--plaintext` (`plaintext`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceEncryption {
    /// TLS on the control connection.
    pub control: bool,
    /// TLS on every data channel.
    pub data: bool,
}

/// The source's rule: which connections are encrypted, or why the
/// combination is refused (RDMA without `--plaintext`).
pub fn source_encryption(
    option: PerformanceOption,
    plaintext: bool,
) -> Result<SourceEncryption, &'static str> {
    match (option.can_encrypt_data(), plaintext) {
        (false, false) => Err(RDMA_NOT_ENCRYPTED),
        // The control connection of an unencryptable option keeps TLS.
        (false, true) => Ok(SourceEncryption {
            control: true,
            data: false,
        }),
        (true, true) => Ok(SourceEncryption {
            control: false,
            data: false,
        }),
        (true, false) => Ok(SourceEncryption {
            control: true,
            data: true,
        }),
    }
}

/// The destination's rule for a connection, before anything of it is
/// authenticated: a plain one (`encrypted` false) only with `--plaintext`
/// (`plaintext_allowed`).
pub fn destination_accepts_connection(
    plaintext_allowed: bool,
    encrypted: bool,
) -> Result<(), (RejectReason, &'static str)> {
    if encrypted || plaintext_allowed {
        Ok(())
    } else {
        Err((RejectReason::Encryption, ENCRYPTION_REQUIRED))
    }
}

/// The destination's rule for an offered `option`: `plaintext_allowed` is
/// its `--plaintext`, `control_encrypted` whether the offer came over TLS.
/// (Whether an encryptable option's plain connection is acceptable was
/// decided before the offer, when the connection was accepted.)
pub fn destination_admits(
    option: PerformanceOption,
    plaintext_allowed: bool,
    control_encrypted: bool,
) -> Result<(), (RejectReason, &'static str)> {
    if option.can_encrypt_data() {
        return Ok(());
    }
    if !plaintext_allowed {
        return Err((RejectReason::Encryption, RDMA_NEEDS_PLAINTEXT_DEST));
    }
    if !control_encrypted {
        return Err((RejectReason::Encryption, RDMA_NEEDS_TLS_CONTROL));
    }
    Ok(())
}

/// The source's convergence options (`ferry send`'s flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvergeOptions {
    /// `--downtime-limit`: the pause the switchover must fit.
    pub downtime_limit: Duration,
    /// `--max-rounds`: pre-copy rounds before the round cap.
    pub max_rounds: u32,
    /// `--force-switchover`: at the round cap, or when no round can make
    /// the pause fit, switch over anyway instead of cancelling.
    pub force_switchover: bool,
    /// `--auto-converge`: throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
}

/// What the source does after a pre-copy round ([`Convergence::after_round`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AfterRound {
    /// Send another round, after throttling the guest to `throttle`
    /// percent when it is `Some` (auto-converge raised it).
    Continue {
        /// The new auto-converge throttle, if it changed.
        throttle: Option<u8>,
    },
    /// Pause the guest and copy the rest: why, and the pause predicted
    /// (zero parts when the rate was unknown). `RoundCap` and `CannotFit`
    /// come only with `--force-switchover`.
    Switchover {
        /// Why pre-copy stopped.
        reason: ConvergeReason,
        /// The pause predicted for switching over now.
        predicted: PauseParts,
    },
    /// Send another round without changing the throttle: the parts of the
    /// pause no round can shrink are above the limit only with the largest
    /// recent round trip, not with the smallest of at least two (one may
    /// have stalled on a busy host): they are measured again.
    Remeasure,
    /// Cancel: the parts of the pause no round can shrink are above the
    /// limit on their own (`fixed`: the pause of an empty final copy), and
    /// `--force-switchover` was not given.
    CannotFit {
        /// The predicted pause of an empty final copy.
        fixed: PauseParts,
    },
    /// Cancel: the round cap came without a pause that fits, and
    /// `--force-switchover` was not given. `predicted_ms`: the pause the
    /// last round predicts (infinite when the rate was unknown).
    NotConverged {
        /// The predicted pause, in milliseconds.
        predicted_ms: f64,
    },
}

/// The source's convergence policy over one migration: [`crate::budget::decide`]'s
/// criteria, what `--force-switchover` makes of a round cap or a pause that
/// cannot fit, and auto-converge's throttle (never lowered while the
/// migration runs).
#[derive(Debug, Clone)]
pub struct Convergence {
    opts: ConvergeOptions,
    auto: AutoConverge,
}

impl Convergence {
    /// The policy for one migration.
    pub fn new(opts: ConvergeOptions) -> Self {
        Convergence {
            opts,
            auto: AutoConverge::default(),
        }
    }

    /// The auto-converge throttle this policy has asked for, percent.
    pub fn throttle(&self) -> u8 {
        self.auto.percent
    }

    /// After pre-copy round `rounds_done` (counted from 1) left `remaining`
    /// dirty bytes, with the pause `costs` measured so far: go on, switch
    /// over or cancel.
    ///
    /// * No round can make the pause fit: measure the round trips again
    ///   while the smallest of them would let it ([`AfterRound::Remeasure`]),
    ///   else cancel, or with
    ///   `--force-switchover` go on while rounds still shrink the final
    ///   copy (bytes remain, round cap not reached), then switch over.
    /// * The round cap without a fitting pause: cancel, or switch over with
    ///   `--force-switchover`. At the cap a round trip that stalled (the
    ///   smallest of the last ones would fit) still reads as the round cap,
    ///   not as a pause that cannot fit.
    /// * The pause fits: switch over.
    /// * Otherwise another round; with `--auto-converge` a stuck round
    ///   raises the throttle first ([`AutoConverge::after_round`]).
    pub fn after_round(
        &mut self,
        remaining: u64,
        costs: &PauseCosts,
        round_trips: &RoundTrips,
        rounds_done: u32,
    ) -> AfterRound {
        let o = self.opts;
        let (decision, predicted) = crate::budget::decide(
            remaining,
            costs,
            o.downtime_limit,
            rounds_done,
            o.max_rounds,
        );
        match decision {
            Decision::Continue => {}
            // --force-switchover: no round makes the pause fit, but rounds
            // still shrink its final copy, up to the round cap.
            Decision::Switchover(ConvergeReason::CannotFit)
                if o.force_switchover && remaining > 0 && rounds_done < o.max_rounds => {}
            // The round trip of `costs` is the largest of the last three:
            // right for predicting a pause, but one that stalled on a busy
            // host must not cancel the migration for good. Cancel once the
            // parts no round can shrink are over the limit even with the
            // smallest round trip of at least two measured (a device state
            // or verification work over the limit on its own cancels after
            // the first round); else measure again in another round (no
            // throttle change), up to the round cap.
            Decision::Switchover(ConvergeReason::CannotFit)
                if !o.force_switchover
                    && rounds_done < o.max_rounds
                    && PauseCosts {
                        round_trip: round_trips.best().unwrap_or_default(),
                        ..*costs
                    }
                    .predict(0)
                    .is_some_and(|f| f.total() <= o.downtime_limit) =>
            {
                return AfterRound::Remeasure;
            }
            // At the round cap the same stalled round trip must not turn
            // "did not converge" into "cannot fit": where the smallest of
            // at least two measured would let the fixed parts fit, the
            // round cap is what ended pre-copy.
            Decision::Switchover(ConvergeReason::CannotFit)
                if !o.force_switchover
                    && round_trips.best().is_some_and(|best| {
                        PauseCosts {
                            round_trip: best,
                            ..*costs
                        }
                        .predict(0)
                        .is_some_and(|f| f.total() <= o.downtime_limit)
                    }) =>
            {
                return AfterRound::NotConverged {
                    predicted_ms: costs
                        .predict(remaining)
                        .map_or(f64::INFINITY, |p| p.total_ms()),
                };
            }
            Decision::Switchover(ConvergeReason::CannotFit) if !o.force_switchover => {
                return AfterRound::CannotFit {
                    fixed: costs.predict(0).unwrap_or_default(),
                }
            }
            Decision::Switchover(ConvergeReason::RoundCap) if !o.force_switchover => {
                return AfterRound::NotConverged {
                    predicted_ms: predicted.map_or(f64::INFINITY, |p| p.total_ms()),
                }
            }
            Decision::Switchover(reason) => {
                return AfterRound::Switchover {
                    reason,
                    predicted: predicted.unwrap_or_default(),
                }
            }
        }
        let throttle = if o.auto_converge {
            let fits = predicted.is_some_and(|p| p.total() <= o.downtime_limit);
            self.auto.after_round(remaining, fits)
        } else {
            None
        };
        AfterRound::Continue { throttle }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PerformanceOption; 3] = [
        PerformanceOption::Tcp,
        PerformanceOption::Compression { codec: 1, level: 0 },
        PerformanceOption::Rdma,
    ];

    #[test]
    fn the_source_encrypts_everything_it_can_and_rdma_needs_consent() {
        for o in ALL {
            let default = source_encryption(o, false);
            let plain = source_encryption(o, true).unwrap();
            if o.can_encrypt_data() {
                assert_eq!(
                    default,
                    Ok(SourceEncryption {
                        control: true,
                        data: true
                    })
                );
                assert!(!plain.control && !plain.data, "{o}");
            } else {
                assert_eq!(default, Err(RDMA_NOT_ENCRYPTED));
                assert!(plain.control && !plain.data, "RDMA keeps TLS on control");
            }
        }
    }

    #[test]
    fn the_destination_admits_rdma_only_with_plaintext_and_a_tls_control() {
        for o in ALL {
            for (allowed, tls) in [(false, false), (false, true), (true, false), (true, true)] {
                let r = destination_admits(o, allowed, tls);
                match (o.can_encrypt_data(), allowed, tls) {
                    (true, ..) | (false, true, true) => assert_eq!(r, Ok(())),
                    (false, false, _) => {
                        assert_eq!(
                            r,
                            Err((RejectReason::Encryption, RDMA_NEEDS_PLAINTEXT_DEST))
                        )
                    }
                    (false, true, false) => {
                        assert_eq!(r, Err((RejectReason::Encryption, RDMA_NEEDS_TLS_CONTROL)))
                    }
                }
            }
        }
    }
}
