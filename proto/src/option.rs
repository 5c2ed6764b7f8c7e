//! The performance option a migration or a relay asks for: the one
//! transport choice every message that names it shares (kept apart from
//! [`crate::control`] so the message payload modules, such as
//! [`crate::relay`], can name it without importing the message catalogue).

use serde::{Deserialize, Serialize};

/// The performance option (transport) a migration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PerformanceOption {
    /// Plain TCP/IP.
    Tcp,
    /// Compressed pages over TCP.
    Compression {
        /// Codec wire id ([`crate::wire::Codec`]); kept as a raw id so that a
        /// destination can name an id it does not know when it refuses it.
        codec: u8,
        /// Codec level (zstd: 1..=19; lz4: 0). Informational for the
        /// destination, which decompresses any level.
        level: i32,
    },
    /// RDMA WRITE.
    Rdma,
}

impl std::fmt::Display for PerformanceOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PerformanceOption::Tcp => f.write_str("tcp"),
            PerformanceOption::Compression { codec, level } => {
                match crate::wire::Codec::from_id(codec) {
                    Ok(c) => write!(
                        f,
                        "compression ({})",
                        crate::wire::CompressionSpec { codec: c, level }
                    ),
                    Err(_) => write!(f, "compression (codec id {codec})"),
                }
            }
            PerformanceOption::Rdma => f.write_str("rdma"),
        }
    }
}
