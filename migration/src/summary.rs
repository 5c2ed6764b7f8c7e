//! What a committed incoming migration looked like: the destination's
//! summary, shared by the daemon (`dest`), its metrics and the CLI.

use serde::Serialize;

use ferry_transport::proto::AuditReport;

/// What a committed incoming migration looked like.
#[derive(Debug, Clone, Serialize)]
pub struct DestSummary {
    /// Migration id.
    pub migration_id: u64,
    /// Source address.
    pub peer: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Page bytes received.
    pub payload_bytes: u64,
    /// Chunks whose CRC failed and were sent again.
    pub crc_errors: u64,
    /// Fingerprint of the verified switchover (hex): the source prints the
    /// same one.
    pub digest: String,
    /// `--verify full`: the whole memory was hashed in the pause too.
    pub verify_full: bool,
    /// What the restore hook said (before `Committed`).
    pub restore_report: String,
    /// What the resume hook said (after `Committed`).
    pub resume_report: String,
    /// The source's audit of its frozen memory after the pause (`None`: it
    /// never came, e.g. the source died first).
    pub audit: Option<AuditReport>,
    /// This process's memory when the migration ended: peak RSS (over the
    /// daemon's life), the guest's resident part, and the rest.
    pub memory: crate::memory::MemoryUse,
    /// Wall time from hello to commit.
    pub total_ms: f64,
    /// Downtime as the destination sees it: from the source's last
    /// pre-copy round (when it pauses the guest) to `Committed`.
    pub downtime_ms: f64,
    /// CPU seconds this process spent from the source's hello to the end
    /// (the source's audit report), the restore and resume hooks left out.
    /// Migrations running at once in one daemon share the process: each
    /// one's figure counts them all.
    pub cpu: crate::cpu::CpuUse,
}
