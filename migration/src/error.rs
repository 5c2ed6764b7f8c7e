//! Errors of the migration engine.

use ferry_transport::TransportError;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The transport or the peer failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The destination's `Ready` does not prove what the source holds
    /// (checked on the source; the guest keeps running there).
    #[error("switchover verification failed: {0}")]
    Verification(ferry_proto::switchover::Mismatch),
    /// The source's `Commit` does not prove the destination's own claims
    /// (checked on the destination, which refuses it).
    #[error("switchover verification failed: the source's Commit does not prove what this destination holds (evidence, device state or transcript differ, or it is not from this session)")]
    CommitProof,
    /// The device-state blob arrived corrupted.
    #[error("device state corrupt: its SHA-256 is not the one Switchover carries")]
    DeviceStateCorrupt,
    /// The destination could not restore the device state: it refused the
    /// commit and freed everything (seen on the destination).
    #[error("device-state restore failed: {0}")]
    RestoreFailed(String),
    /// The destination refused the commit with this session's proof (its
    /// device-state restore failed): it will not run the guest, so the
    /// source resumed it (seen on the source).
    #[error("the destination refused the commit: {0}")]
    CommitRefused(String),
    /// The guest was committed and restored on the destination, but its
    /// resume hook failed: the guest runs nowhere.
    #[error("committed, but resuming the guest failed: {0}")]
    ResumeFailed(String),
    /// Pages kept failing their checksum in the final copy.
    #[error("final copy failed: {0} pages still failed verification after 3 retries (their payload tags did not match what landed)")]
    FinalCopyCorrupt(u64),
    /// The guest failed to pause, resume or give its state.
    #[error("guest: {0}")]
    Guest(String),
    /// Pre-copy reached `--max-rounds` without converging and
    /// `--force-switchover` was not given: cancelled, guest running here.
    #[error("did not converge after {rounds} rounds: last round dirtied {last_dirty_mib:.1} MiB, link {link_mb_s:.1} MB/s, predicted downtime {predicted_ms:.0} ms > limit {limit_ms:.0} ms{throttle}; migration cancelled (--force-switchover would switch over anyway)")]
    NotConverged {
        /// Pre-copy rounds sent.
        rounds: u32,
        /// Dirty bytes left after the last round, MiB.
        last_dirty_mib: f64,
        /// Link rate used by the prediction (capped by --bandwidth-limit), MB/s.
        link_mb_s: f64,
        /// Predicted pause, ms.
        predicted_ms: f64,
        /// --downtime-limit, ms.
        limit_ms: f64,
        /// ", auto-converge throttle N%" when the guest was throttled.
        throttle: String,
    },
    /// Even with nothing left to copy, the predicted pause is above
    /// `--downtime-limit`: no pre-copy round can make it fit.
    #[error("the pause cannot fit --downtime-limit {limit_ms:.0} ms: with nothing left to copy it is predicted at {fixed_ms:.1} ms (round trips and final acks {round_trips_ms:.1} ms, device state {device_state_ms:.1} ms, verification work {verification_ms:.1} ms); migration cancelled (raise --downtime-limit{hint}, or --force-switchover to switch over anyway)")]
    PauseCannotFit {
        /// --downtime-limit, ms.
        limit_ms: f64,
        /// The predicted pause with an empty final copy, ms.
        fixed_ms: f64,
        /// The round trips in it, ms.
        round_trips_ms: f64,
        /// The device state, ms.
        device_state_ms: f64,
        /// Verification work beyond the round trip, ms.
        verification_ms: f64,
        /// ", or drop --verify full" when that is what costs.
        hint: String,
    },
    /// The whole migration took longer than `--timeout`: cancelled before
    /// switchover, guest running here.
    #[error("migration cancelled: --timeout of {after:?} reached in pre-copy round {round} ({remaining_mib:.1} MiB still dirty)")]
    Deadline {
        /// The limit.
        after: std::time::Duration,
        /// Round in progress.
        round: u32,
        /// Dirty bytes left when the time ran out, MiB.
        remaining_mib: f64,
    },
    /// The migration failed here, and the destination had given up first
    /// (its reason), or is gone: both sides' views, so the error names the
    /// fault even when it was only seen on the destination.
    #[error("{cause}; the destination {peer}")]
    Destination {
        /// What failed on this side.
        cause: Box<MigrationError>,
        /// "aborted: REASON" or "closed the control connection".
        peer: String,
    },
    /// Cancelled from outside before `Commit` (`ferry send` on SIGINT or
    /// SIGTERM): the destination was told (`Abort` with this reason) and
    /// the guest keeps running on the source.
    #[error("{0}")]
    Cancelled(String),
    /// The destination daemon is shutting down (`ferry listen` got
    /// SIGTERM): the migration was aborted before its switchover and its
    /// memory freed; the source keeps its guest.
    #[error("destination shutting down (ferry listen was asked to stop); the migration was aborted before its switchover")]
    ShuttingDown,
    /// Commit was sent but not confirmed: the guest stays paused on the source.
    #[error("commit was sent but the destination did not confirm it ({0}); the guest is left paused on the source because it may already run on the destination")]
    CommitUnconfirmed(String),
}

impl MigrationError {
    /// A deliberate cancel because the guest could not converge in time
    /// (`ferry send` exits with status 3 for these).
    pub fn is_not_converged(&self) -> bool {
        matches!(
            self,
            MigrationError::NotConverged { .. }
                | MigrationError::Deadline { .. }
                | MigrationError::PauseCannotFit { .. }
        )
    }
}

/// Result alias of this crate.
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;

impl MigrationError {
    /// A short snake_case name of what went wrong, for metrics labels
    /// (`ferry_migrations_aborted_total{reason}`): the rejection reason
    /// when the peer was refused (`version`, `auth`, `memory_limit`,
    /// `busy`, ...), else the kind of failure (`timeout`, `peer_closed`,
    /// `crc`, `evidence_mismatch`, `restore_failed`, `protocol`, ...).
    pub fn reason(&self) -> String {
        use TransportError as T;
        let s = match self {
            MigrationError::Transport(t) => match t {
                // Every rejection reason, present and future: its variant name.
                T::Rejected { reason, .. } => return snake_case(&format!("{reason:?}")),
                T::UnsupportedVersion { .. } => "version",
                T::AuthFailed(_) => "auth",
                T::Timeout { .. } => "timeout",
                T::PeerClosed { .. } => "peer_closed",
                T::PeerAborted(_) => "peer_aborted",
                T::CrcMismatch { .. } => "crc",
                T::Tls(_) => "tls",
                T::Io { .. } => "io",
                T::NoChannelLeft { .. } => "channels_lost",
                T::BadMagic { .. }
                | T::TooLarge { .. }
                | T::Invalid { .. }
                | T::OutsideLayout { .. }
                | T::Malformed { .. }
                | T::Unexpected { .. } => "protocol",
                _ => "transport",
            },
            MigrationError::Config(_) => "config",
            MigrationError::Memory(_) => "memory",
            MigrationError::Verification(m) => {
                use ferry_proto::switchover::Mismatch as M;
                match m {
                    M::Transcript => "transcript_mismatch",
                    M::Evidence => "evidence_mismatch",
                    M::DeviceState => "device_state_mismatch",
                    M::Memory => "memory_mismatch",
                }
            }
            MigrationError::CommitProof => "commit_proof",
            MigrationError::DeviceStateCorrupt => "device_state_corrupt",
            MigrationError::RestoreFailed(_) => "restore_failed",
            MigrationError::CommitRefused(_) => "commit_refused",
            MigrationError::ResumeFailed(_) => "resume_failed",
            MigrationError::PauseCannotFit { .. } => "pause_cannot_fit",
            MigrationError::FinalCopyCorrupt(_) => "crc",
            MigrationError::Guest(_) => "guest",
            MigrationError::CommitUnconfirmed(_) => "commit_unconfirmed",
            MigrationError::NotConverged { .. } => "not_converged",
            MigrationError::Deadline { .. } => "deadline",
            MigrationError::Cancelled(_) => "cancelled",
            MigrationError::ShuttingDown => "shutdown",
            // What failed here; the destination's view is in the message.
            MigrationError::Destination { cause, .. } => return cause.reason(),
        };
        s.into()
    }
}

impl From<ferry_proto::WireError> for MigrationError {
    /// A wire format's error, reported as the transport reports it.
    fn from(e: ferry_proto::WireError) -> Self {
        MigrationError::Transport(e.into())
    }
}

/// Reasons `ferry_migrations_aborted_total{reason}` shows from the start
/// (at zero until one happens), so that alerts and rates have a series to
/// work on before the first abort; others appear when they happen.
pub const COMMON_REASONS: [&str; 19] = [
    "auth",
    "version",
    "busy",
    "memory_limit",
    "option",
    "encryption",
    "tls",
    "timeout",
    "peer_closed",
    "peer_aborted",
    "protocol",
    "crc",
    "evidence_mismatch",
    "guest_config",
    "restore_failed",
    "commit_proof",
    "not_converged",
    "shutdown",
    "cancelled",
];

/// `MemoryLimit` → `memory_limit`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::proto::RejectReason;

    #[test]
    fn reasons_are_snake_case_labels() {
        let rejected = |reason| {
            MigrationError::from(TransportError::Rejected {
                reason,
                message: String::new(),
            })
        };
        assert_eq!(rejected(RejectReason::MemoryLimit).reason(), "memory_limit");
        assert_eq!(rejected(RejectReason::Busy).reason(), "busy");
        assert_eq!(rejected(RejectReason::BadOffer).reason(), "bad_offer");
        assert_eq!(
            MigrationError::from(TransportError::AuthFailed("x")).reason(),
            "auth"
        );
        assert_eq!(
            MigrationError::from(TransportError::PeerClosed { what: "control" }).reason(),
            "peer_closed"
        );
        // Losing every data channel is the network's doing, not a
        // protocol error of the peer.
        assert_eq!(
            MigrationError::from(TransportError::NoChannelLeft {
                last: "reset".into()
            })
            .reason(),
            "channels_lost"
        );
        assert_eq!(
            MigrationError::Verification(ferry_proto::switchover::Mismatch::Evidence).reason(),
            "evidence_mismatch"
        );
        assert_eq!(
            MigrationError::RestoreFailed("x".into()).reason(),
            "restore_failed"
        );
    }
}
