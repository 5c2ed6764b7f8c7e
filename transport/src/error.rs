//! Errors of the transport layer.

use std::time::Duration;

use ferry_proto::{ErrorKind, WireError};

/// Why a transport operation failed. Every variant names what went wrong and
/// the value that was wrong, so an operator can act on the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("peer closed the {what} connection")]
    PeerClosed {
        /// Which connection / which step.
        what: &'static str,
    },
    /// The peer did not answer in time.
    #[error("peer did not respond within {after:?} while waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// What the peer sent is malformed or not allowed: one of the wire
    /// formats' errors ([`WireError`], with its message and kind).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer speaks no protocol version we speak.
    #[error("unsupported protocol version: peer speaks {peer_min}..={peer_max}, this host speaks {ours_min}..={ours_max}")]
    UnsupportedVersion {
        /// Peer's lowest version.
        peer_min: u16,
        /// Peer's highest version.
        peer_max: u16,
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
    },
    /// Mutual authentication failed.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// A message arrived that is not allowed at this point of the protocol.
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol state allows.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The peer refused (validation failed, busy, ...).
    #[error("peer refused: {reason}: {message}")]
    Rejected {
        /// Machine-readable reason.
        reason: ferry_proto::control::RejectReason,
        /// Peer's explanation.
        message: String,
    },
    /// The peer aborted the migration.
    #[error("peer aborted the migration: {0}")]
    PeerAborted(String),
    /// A control message after authentication whose tag does not verify:
    /// changed, dropped, replayed or reordered on the way, or not sent by
    /// the peer. The connection is not used again.
    #[error("control message {seq} from the peer failed authentication: {detail}")]
    Unauthenticated {
        /// Its sequence number in its direction (from 0 after `Welcome`).
        seq: u64,
        /// What was wrong.
        detail: &'static str,
    },
    /// Every data channel of the migration failed: not the peer's
    /// protocol at fault, the network (or the peer host) is.
    #[error("no data channel left; the last one failed: {last}")]
    NoChannelLeft {
        /// Why the last channel failed.
        last: String,
    },
    /// TLS (on unless `--plaintext`): a setting that cannot be used, a handshake that
    /// failed, or a peer that ended the session; the message names why.
    #[error("encryption: {0}")]
    Tls(String),
    /// A data channel (RDMA) failed, or none could be connected or ended
    /// cleanly; the message names the channel and why.
    #[error("{what}: {detail}")]
    Channel {
        /// Which channel or channels.
        what: &'static str,
        /// What failed.
        detail: String,
    },
    /// A value of this host's own that cannot be used: a key, a chunk too
    /// large to send, an encoder that failed, a landing claim, guest
    /// memory. Checked by the wire formats' rules where they apply, so the
    /// message reads as the peer's would; never the peer's fault.
    #[error(transparent)]
    Local(WireError),
}

impl TransportError {
    /// Wraps an I/O error with what was being done, turning a clean EOF into
    /// [`TransportError::PeerClosed`].
    /// A TLS error inside the I/O error (a peer that refused our identity
    /// sends an alert, which surfaces on the next read) becomes
    /// [`TransportError::Tls`] naming the cause.
    pub fn io(context: impl Into<String>, what: &'static str, source: std::io::Error) -> Self {
        if let Some(why) = describe_io(&source) {
            return TransportError::Tls(format!("{}: {why}", context.into()));
        }
        match source.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => TransportError::PeerClosed { what },
            _ => TransportError::Io {
                context: context.into(),
                source,
            },
        }
    }
}

impl TransportError {
    /// Which kind of error this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use TransportError as T;
        match self {
            T::Wire(w) => w.kind(),
            T::Unexpected { .. } | T::Unauthenticated { .. } => ErrorKind::Misbehaved,
            T::UnsupportedVersion { .. }
            | T::AuthFailed(_)
            | T::Rejected { .. }
            | T::PeerAborted(_) => ErrorKind::Rejected,
            T::Io { .. }
            | T::PeerClosed { .. }
            | T::Timeout { .. }
            | T::NoChannelLeft { .. }
            | T::Tls(_)
            | T::Channel { .. } => ErrorKind::Connection,
            T::Local(_) => ErrorKind::Local,
        }
    }
}

impl From<ferry_proto::session::HandshakeError> for TransportError {
    /// The source handshake's error, as the transport reports it.
    fn from(e: ferry_proto::session::HandshakeError) -> Self {
        use ferry_proto::control::{PROTOCOL_MAX, PROTOCOL_MIN};
        use ferry_proto::session::HandshakeError as H;
        match e {
            H::Rejected { reason, message } => TransportError::Rejected { reason, message },
            H::Unexpected { expected, got } => TransportError::Unexpected {
                expected,
                got: got.into(),
            },
            H::UnsupportedVersion { version } => TransportError::UnsupportedVersion {
                peer_min: version,
                peer_max: version,
                ours_min: PROTOCOL_MIN,
                ours_max: PROTOCOL_MAX,
            },
            H::AuthFailed(why) => TransportError::AuthFailed(why),
            other => WireError::Malformed {
                what: "handshake",
                detail: other.to_string(),
            }
            .into(),
        }
    }
}

/// The rustls error inside an I/O error from a TLS stream, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// A message for a TLS error that surfaced after the handshake (on the
/// first read): in TLS 1.3 the client finishes before the server has
/// checked its certificate, so a rejection arrives as an alert then.
pub fn describe_io(e: &std::io::Error) -> Option<String> {
    match rustls_error(e)? {
        rustls::Error::AlertReceived(a) => Some(format!(
            "the peer ended the TLS session with alert {a:?}: it does not trust our identity (its CA did not sign our certificate)"
        )),
        other => Some(format!("TLS: {other}")),
    }
}

/// Result alias of this crate.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
