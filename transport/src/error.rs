//! Errors of the transport layer.

use std::time::Duration;

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
    /// A frame did not start with the expected magic.
    #[error("bad magic in {what}: expected {expected:?}, got {found:?}")]
    BadMagic {
        /// Which frame.
        what: &'static str,
        /// The magic we want.
        expected: [u8; 4],
        /// The bytes we got.
        found: [u8; 4],
    },
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
    /// A length field is above its limit.
    #[error("{field} is {len} bytes, above the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A field has a value that cannot be right.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// A page run lies outside the memory layout that was offered.
    #[error("page run at guest address {gpa:#x} with {pages} pages lies outside the offered memory layout")]
    OutsideLayout {
        /// First guest physical address.
        gpa: u64,
        /// Page count.
        pages: u64,
    },
    /// A payload's checksum does not match the one in its header.
    #[error("CRC mismatch in {what} {seq}: header says {expected:#010x}, payload hashes to {computed:#010x}")]
    CrcMismatch {
        /// Which frame kind.
        what: &'static str,
        /// Its sequence number.
        seq: u64,
        /// CRC in the header.
        expected: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// A control message could not be decoded.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// Decoder's reason.
        detail: String,
    },
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

impl From<ferry_proto::WireError> for TransportError {
    /// A wire format's error, as the transport reports it (the same
    /// message).
    fn from(e: ferry_proto::WireError) -> Self {
        use ferry_proto::WireError as W;
        match e {
            W::BadMagic {
                what,
                expected,
                found,
            } => TransportError::BadMagic {
                what,
                expected,
                found,
            },
            W::TooLarge { field, len, limit } => TransportError::TooLarge { field, len, limit },
            W::Invalid { field, detail } | W::BadTag { field, detail } => {
                TransportError::Invalid { field, detail }
            }
            W::OutsideLayout { gpa, pages } => TransportError::OutsideLayout { gpa, pages },
            W::CrcMismatch {
                what,
                seq,
                expected,
                computed,
            } => TransportError::CrcMismatch {
                what,
                seq,
                expected,
                computed,
            },
            W::Malformed { what, detail } => TransportError::Malformed { what, detail },
            // `WireError` is non-exhaustive: a kind added later is still
            // reported with its own message.
            other => TransportError::Malformed {
                what: "frame",
                detail: other.to_string(),
            },
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
            other => TransportError::Malformed {
                what: "handshake",
                detail: other.to_string(),
            },
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
