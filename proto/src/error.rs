//! The errors of decoding and checking what a peer sent: one typed error
//! for every wire format of this crate (data frames, control messages, the
//! memory layout, RDMA descriptors).
//!
//! Every variant names the frame or field that was wrong and the value it
//! had, so an operator can act on the message alone. [`WireError::kind`]
//! sorts them into the few kinds a caller acts on differently (metrics
//! reasons, whether the channel can still be trusted); [`ErrorKind`] is
//! the one list of kinds every error of Ferry is sorted into.

/// What was wrong with bytes or values that came from the peer. (The
/// transport also checks values of its own by the same rules before it
/// sends them; those failures are its `TransportError::Local`.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
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
    /// A length or count field is above its limit.
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
    /// Bytes that do not decode as the frame or message they should be.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which frame or message.
        what: &'static str,
        /// Decoder's reason.
        detail: String,
    },
    /// A frame's or message's authentication tag does not verify: changed
    /// on the way, or sent by someone without the session's key.
    #[error("invalid {field}: {detail}")]
    BadTag {
        /// Which tag.
        field: &'static str,
        /// What it was meant to protect.
        detail: String,
    },
}

/// The kinds of every error of Ferry (wire formats, transport, migration),
/// for callers that act on the kind alone: metrics reasons, whether the
/// peer is at fault, whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The peer's bytes do not decode, or a field is out of its range: the
    /// framing of the connection can no longer be trusted.
    Malformed,
    /// Well-formed, but the peer sent something it must not (a run outside
    /// the layout, a checksum, tag or proof that does not verify, a message
    /// out of turn).
    Misbehaved,
    /// The peer refused us or gave up (a rejection, no common version, a
    /// failed authentication, an abort): it followed the protocol.
    Rejected,
    /// The connection failed: a socket error, a timeout, a peer that went
    /// away, TLS, every data channel lost. Nobody's protocol is at fault.
    Connection,
    /// This host's own doing: its configuration, its memory, its guest or
    /// VMM, a value of its own that cannot be sent.
    Local,
    /// Stopped on purpose before switchover: not converged in time, a
    /// deadline, a signal, a daemon shutting down.
    Cancelled,
}

/// The kinds a [`WireError`] has: [`ErrorKind::Malformed`] or
/// [`ErrorKind::Misbehaved`].
pub type WireKind = ErrorKind;

impl WireError {
    /// Which kind of error this is: malformed or misbehaving, never another.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WireError::BadMagic { .. }
            | WireError::TooLarge { .. }
            | WireError::Invalid { .. }
            | WireError::Malformed { .. } => WireKind::Malformed,
            WireError::OutsideLayout { .. }
            | WireError::CrcMismatch { .. }
            | WireError::BadTag { .. } => WireKind::Misbehaved,
        }
    }
}

/// Result alias of the wire formats.
pub type Result<T, E = WireError> = std::result::Result<T, E>;
