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
    /// The digests of source and destination memory differ.
    #[error("memory digest mismatch: source {source_digest}, destination {dest_digest}")]
    DigestMismatch {
        /// Source digest (hex).
        source_digest: String,
        /// Destination digest (hex).
        dest_digest: String,
    },
    /// The device-state blob arrived corrupted.
    #[error("device state CRC mismatch: expected {expected:#010x}, got {computed:#010x}")]
    DeviceStateCrc {
        /// CRC sent.
        expected: u32,
        /// CRC computed.
        computed: u32,
    },
    /// Pages kept failing their checksum in the final copy.
    #[error("final copy failed: {0} chunks still failed their CRC after retries")]
    FinalCopyCorrupt(u64),
    /// The guest failed to pause, resume or give its state.
    #[error("guest: {0}")]
    Guest(String),
    /// Commit was sent but not confirmed: the guest stays paused on the source.
    #[error("commit was sent but the destination did not confirm it ({0}); the guest is left paused on the source because it may already run on the destination")]
    CommitUnconfirmed(String),
}

/// Result alias of this crate.
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;
