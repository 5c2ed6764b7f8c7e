//! Errors of the migration engine.

use ferry_proto::ErrorKind;
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
    /// The destination gave up while this side was sending pages and said
    /// why (its `Abort`) before anything failed here: its reason.
    #[error("the destination aborted: {0}")]
    DestinationAborted(String),
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
    /// Which kind of error this is (see [`ErrorKind`]): the transport's
    /// kind for its errors; for the engine's and the destination's own,
    /// whose doing it was.
    pub fn kind(&self) -> ErrorKind {
        use MigrationError as M;
        match self {
            M::Transport(t) => t.kind(),
            M::Config(_)
            | M::Memory(_)
            | M::Guest(_)
            | M::RestoreFailed(_)
            | M::ResumeFailed(_) => ErrorKind::Local,
            // Proofs, hashes and tags the peer sent that do not verify.
            M::Verification(_)
            | M::CommitProof
            | M::DeviceStateCorrupt
            | M::FinalCopyCorrupt(_) => ErrorKind::Misbehaved,
            M::CommitRefused(_) | M::DestinationAborted(_) => ErrorKind::Rejected,
            M::CommitUnconfirmed(_) => ErrorKind::Connection,
            M::NotConverged { .. }
            | M::PauseCannotFit { .. }
            | M::Deadline { .. }
            | M::Cancelled(_)
            | M::ShuttingDown => ErrorKind::Cancelled,
            M::Destination { cause, .. } => cause.kind(),
        }
    }

    /// A short snake_case name of what went wrong, for metrics labels
    /// (`ferry_migrations_aborted_total{reason}`) and the `--json`
    /// record: the one mapping from errors to reasons. The rejection
    /// reason when the peer was refused (`version`, `auth`,
    /// `memory_limit`, `busy`, ...); a name of its own for a failure an
    /// operator tells apart (`timeout`, `peer_closed`, `crc`,
    /// `evidence_mismatch`, `restore_failed`, ...); else the name of its
    /// [`kind`](Self::kind): malformed or misbehaving input is `protocol`,
    /// this host's own failure `local`.
    pub fn reason(&self) -> String {
        use ferry_proto::WireError as W;
        use MigrationError as M;
        use TransportError as T;
        let s = match self {
            // What failed here; the destination's view is in the message.
            M::Destination { cause, .. } => return cause.reason(),
            // Every rejection reason, present and future: its variant name.
            M::Transport(T::Rejected { reason, .. }) => return snake_case(&format!("{reason:?}")),
            M::Transport(T::UnsupportedVersion { .. }) => "version",
            M::Transport(T::AuthFailed(_)) => "auth",
            M::Transport(T::Timeout { .. }) => "timeout",
            M::Transport(T::PeerClosed { .. }) => "peer_closed",
            M::Transport(T::PeerAborted(_)) | M::DestinationAborted(_) => "peer_aborted",
            M::Transport(T::Wire(W::CrcMismatch { .. })) | M::FinalCopyCorrupt(_) => "crc",
            M::Transport(T::Tls(_)) => "tls",
            M::Transport(T::Io { .. }) => "io",
            // The network's doing, not a protocol error of the peer.
            M::Transport(T::NoChannelLeft { .. } | T::Channel { .. }) => "channels_lost",
            M::Config(_) => "config",
            M::Memory(_) => "memory",
            M::Verification(m) => {
                use ferry_proto::switchover::Mismatch as Mm;
                match m {
                    Mm::Transcript => "transcript_mismatch",
                    Mm::Evidence => "evidence_mismatch",
                    Mm::DeviceState => "device_state_mismatch",
                    Mm::Memory => "memory_mismatch",
                }
            }
            M::CommitProof => "commit_proof",
            M::DeviceStateCorrupt => "device_state_corrupt",
            M::RestoreFailed(_) => "restore_failed",
            M::CommitRefused(_) => "commit_refused",
            M::ResumeFailed(_) => "resume_failed",
            M::PauseCannotFit { .. } => "pause_cannot_fit",
            M::Guest(_) => "guest",
            M::CommitUnconfirmed(_) => "commit_unconfirmed",
            M::NotConverged { .. } => "not_converged",
            M::Deadline { .. } => "deadline",
            M::Cancelled(_) => "cancelled",
            M::ShuttingDown => "shutdown",
            // The rest by kind.
            _ => match self.kind() {
                ErrorKind::Malformed | ErrorKind::Misbehaved => "protocol",
                ErrorKind::Rejected => "rejected",
                ErrorKind::Connection => "connection",
                ErrorKind::Local => "local",
                ErrorKind::Cancelled => "cancelled",
                _ => "transport",
            },
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

    #[test]
    fn kinds_decide_the_reasons_no_variant_names() {
        use ferry_proto::WireError as W;
        let invalid = || W::Invalid {
            field: "chunk round",
            detail: "stale".into(),
        };
        // The peer's malformed or misbehaving input: `protocol`, with the
        // wire format's own message.
        let peer = MigrationError::from(invalid());
        assert_eq!(peer.kind(), ErrorKind::Malformed);
        assert_eq!(peer.reason(), "protocol");
        assert_eq!(peer.to_string(), "invalid chunk round: stale");
        let outside = MigrationError::from(W::OutsideLayout { gpa: 0, pages: 1 });
        assert_eq!(outside.kind(), ErrorKind::Misbehaved);
        assert_eq!(outside.reason(), "protocol");
        let tampered = MigrationError::from(TransportError::Unauthenticated {
            seq: 3,
            detail: "tag",
        });
        assert_eq!(tampered.kind(), ErrorKind::Misbehaved);
        assert_eq!(tampered.reason(), "protocol");
        let crc = MigrationError::from(W::CrcMismatch {
            what: "chunk",
            seq: 1,
            expected: 1,
            computed: 2,
        });
        assert_eq!(crc.reason(), "crc");
        // The same check failing on a value of our own: this host's doing.
        let local = MigrationError::from(TransportError::Local(invalid()));
        assert_eq!(local.kind(), ErrorKind::Local);
        assert_eq!(local.reason(), "local");
        assert_eq!(local.to_string(), "invalid chunk round: stale");
        // A failed RDMA channel set: the network's doing.
        let channels = MigrationError::from(TransportError::Channel {
            what: "RDMA channels",
            detail: "none could be connected".into(),
        });
        assert_eq!(channels.kind(), ErrorKind::Connection);
        assert_eq!(channels.reason(), "channels_lost");
        // Refusals and cancels.
        assert_eq!(
            MigrationError::from(TransportError::AuthFailed("x")).kind(),
            ErrorKind::Rejected
        );
        assert_eq!(
            MigrationError::Cancelled("SIGINT".into()).kind(),
            ErrorKind::Cancelled
        );
        // The destination's view wraps the cause: the cause decides.
        let both = MigrationError::Destination {
            cause: Box::new(MigrationError::from(invalid())),
            peer: "aborted: x".into(),
        };
        assert_eq!(
            (both.kind(), both.reason().as_str()),
            (ErrorKind::Malformed, "protocol")
        );
    }
}
