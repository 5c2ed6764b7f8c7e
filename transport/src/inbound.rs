//! The receive side every backend shares (TCP, compression, RDMA): what
//! the data channels of one incoming migration hold in common
//! ([`Inbound`]: layout, codec, ledger, frame key, the one round gate,
//! deadlines, buffers), its counters, and the checks and answers of a
//! frame: [`Inbound::admit`] before anything lands, [`Inbound::busy`] and
//! [`Inbound::landed`] after, [`Inbound::ack`] the tagged ack. The
//! backends only move bytes: TCP reads the payload into the claimed
//! pages, RDMA finds them already written.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::frame::{RoundGate, Tag};
use ferry_proto::{Ledger, MacKey, WireError};

use crate::error::{Result, TransportError};
use crate::layout::{MemoryLayout, PageRun};
use crate::reservation::ChannelBudgets;
use crate::wire::{self, AckFrame, AckStatus, ChunkHeader, ChunkKind, Codec};

/// Destination-side counters, shared with the session for progress and checks.
#[derive(Debug, Default)]
pub struct RecvCounters {
    /// Page bytes landed (payload).
    pub payload_bytes: AtomicU64,
    /// Bytes read from the socket.
    pub bytes_on_wire: AtomicU64,
    /// Pages covered, zero pages included.
    pub pages: AtomicU64,
    /// Chunks accepted.
    pub chunks: AtomicU64,
    /// Chunks whose CRC did not match.
    pub crc_errors: AtomicU64,
    /// Highest round seen.
    pub round: AtomicU64,
    /// Chunks that arrived compressed.
    pub compressed_chunks: AtomicU64,
    /// CPU time spent populating the pages chunks were about to land in
    /// ([`prefault`](crate::tcp)), nanoseconds: the first touch of fresh
    /// guest memory.
    pub first_touch_ns: AtomicU64,
}

/// What every data channel of one incoming migration shares (TCP and RDMA
/// alike): the layout pages must lie in, the negotiated codec, the frame
/// key, the destination's evidence, the round gate, the per-frame read
/// deadline and the migration's memory reservation.
#[derive(Debug)]
pub struct Inbound {
    /// The offered memory layout.
    pub layout: MemoryLayout,
    /// The codec the migration negotiated (compression option); `None`
    /// refuses compressed frames.
    pub codec: Option<Codec>,
    /// The destination's evidence: every page a channel lands is hashed
    /// (from destination memory, under the landing claim, right after it
    /// landed) and recorded here; zero runs record zero pages.
    pub ledger: Arc<Ledger>,
    /// The session's frame key: header tags are checked before anything
    /// lands, payload tags over what landed, acks are tagged.
    pub frame: MacKey,
    /// One gate for every channel: a frame from an earlier round than any
    /// channel has seen is a stale copy and refused.
    pub rounds: RoundGate,
    /// Once a frame's first byte has arrived, the rest of it must arrive
    /// within this long, or its channel is closed (a channel that trickles
    /// bytes is timed out on its own). Waiting for a frame to begin has no
    /// per-channel limit: a channel may idle between rounds.
    pub deadline: Duration,
    /// Where each channel books its receive buffers (on the migration's
    /// reservation); `None`: not counted.
    pub buffers: Option<Arc<ChannelBudgets>>,
}

impl Inbound {
    /// The shared state of a migration's channels (a 30 s frame deadline,
    /// no reservation).
    pub fn new(
        layout: MemoryLayout,
        codec: Option<Codec>,
        ledger: Arc<Ledger>,
        frame: MacKey,
    ) -> Self {
        Inbound {
            layout,
            codec,
            ledger,
            frame,
            rounds: RoundGate::new(),
            deadline: Duration::from_secs(30),
            buffers: None,
        }
    }

    /// Sets the per-frame read deadline.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Books every channel's receive buffers on `buffers`.
    pub fn with_buffers(mut self, buffers: Arc<ChannelBudgets>) -> Self {
        self.buffers = Some(buffers);
        self
    }

    /// Admits a frame of `round` through the shared gate.
    pub fn admit_round(&self, seq: u64, round: u32) -> Result<()> {
        self.rounds.admit(round).map_err(|newest| {
            TransportError::Wire(WireError::Invalid {
                field: "chunk round",
                detail: format!(
                "chunk {seq} is from round {round}, after round {newest} began: stale copy refused"
            ),
            })
        })
    }

    /// Whether `sum` (the landed pages' contributions) matches the payload tag.
    pub fn payload_ok(&self, seq: u64, round: u32, sum: u128, tag: &Tag) -> bool {
        ferry_proto::frame::payload_tag_ok(&self.frame, seq, round, sum, tag)
    }
}

/// A page frame whose header and run table passed every check of
/// [`Inbound::admit`]: known to be the source's, inside the layout, of a
/// round the migration still takes. Nothing of it has landed yet.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Its sequence number.
    pub seq: u64,
    /// Its pre-copy round.
    pub round: u32,
    /// Its runs, ascending, inside the layout.
    pub runs: Vec<PageRun>,
    /// Bytes of its non-zero runs (the payload, unless compressed).
    pub data_bytes: u64,
    /// Bytes of payload after the run table on the wire.
    pub payload_len: u64,
    /// The codec of a compressed frame; `None`: the pages as they are.
    pub codec: Option<Codec>,
    /// The payload tag, compared with what lands.
    pub payload_tag: Tag,
}

/// A frame [`Inbound::admit`] let through.
#[derive(Debug)]
pub(crate) enum Checked {
    /// The end of the channel (`seq` carries RDMA's lost-channel mask).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    End(u64),
    /// Pages to land.
    Pages(Admitted),
}

impl Inbound {
    /// The checks every backend (TCP, compression, RDMA) makes on a frame's
    /// decoded header and its run table before anything of it lands, in
    /// this order: the header tag over header and table (the frame is the
    /// source's), the end of the channel, the runs (inside the layout,
    /// ascending), the round gate, the flags (compressed only where the
    /// migration negotiated a codec) and the payload length against the
    /// runs. Counts the frame's round and wire bytes.
    pub(crate) fn admit(
        &self,
        h: &ChunkHeader,
        kind: ChunkKind,
        table: &[u8],
        counters: &RecvCounters,
    ) -> Result<Checked> {
        h.verify(&self.frame, table)?;
        if kind == ChunkKind::End {
            return Ok(Checked::End(h.seq.get()));
        }
        let (seq, round) = (h.seq.get(), h.round.get());
        let (runs, data_bytes) = wire::decode_runs(table, &self.layout)?;
        self.admit_round(seq, round)?;
        counters.round.fetch_max(round.into(), Ordering::Relaxed);
        let payload_len = u64::from(h.payload_len.get());
        let codec = if h.flags.get() & wire::FLAG_COMPRESSED != 0 {
            match self.codec {
                Some(c) => Some(c),
                None => {
                    return Err(TransportError::Wire(WireError::Invalid {
                        field: "chunk flags",
                        detail: "compressed chunk on a channel negotiated without compression"
                            .into(),
                    }))
                }
            }
        } else {
            None
        };
        if codec.is_none() && data_bytes != payload_len {
            return Err(TransportError::Wire(WireError::Invalid {
                field: "chunk payload length",
                detail: format!(
                    "chunk {seq} says {payload_len} bytes but its runs hold {data_bytes}"
                ),
            }));
        }
        if codec.is_some() && data_bytes > u64::from(wire::MAX_CHUNK_PAYLOAD) {
            return Err(TransportError::Wire(WireError::TooLarge {
                field: "uncompressed chunk",
                len: data_bytes,
                limit: wire::MAX_CHUNK_PAYLOAD.into(),
            }));
        }
        counters.bytes_on_wire.fetch_add(
            (wire::HEADER_LEN + table.len()) as u64 + payload_len,
            Ordering::Relaxed,
        );
        Ok(Checked::Pages(Admitted {
            seq,
            round,
            runs,
            data_bytes,
            payload_len,
            codec,
            payload_tag: h.payload_tag,
        }))
    }

    /// The answer to a frame whose pages another landing holds (`busy`
    /// says which): counted, and asked for again.
    pub(crate) fn busy(
        &self,
        f: &Admitted,
        busy: impl std::fmt::Display,
        counters: &RecvCounters,
    ) -> AckStatus {
        tracing::warn!(
            seq = f.seq,
            round = f.round,
            "chunk refused, asking for it again: {busy} (a stale copy in flight?)"
        );
        counters.crc_errors.fetch_add(1, Ordering::Relaxed);
        AckStatus::Busy
    }

    /// The answer to a frame that landed: `decoded` when its whole payload
    /// decoded, `sum` the landed pages' contributions. `Landed` (and
    /// counted) when the payload tag matches, else `Mismatch`: the source
    /// sends the pages again.
    pub(crate) fn landed(
        &self,
        f: &Admitted,
        decoded: bool,
        sum: u128,
        counters: &RecvCounters,
    ) -> AckStatus {
        if decoded && self.payload_ok(f.seq, f.round, sum, &f.payload_tag) {
            counters
                .payload_bytes
                .fetch_add(f.data_bytes, Ordering::Relaxed);
            counters.pages.fetch_add(
                f.runs.iter().map(|r| u64::from(r.pages)).sum(),
                Ordering::Relaxed,
            );
            counters.chunks.fetch_add(1, Ordering::Relaxed);
            AckStatus::Landed
        } else {
            // During pre-copy a guest write racing the source's read causes
            // this too; the page is dirty and is sent again anyway.
            tracing::debug!(
                seq = f.seq,
                round = f.round,
                "payload tag mismatch: asking the source to send the chunk again"
            );
            counters.crc_errors.fetch_add(1, Ordering::Relaxed);
            AckStatus::Mismatch
        }
    }

    /// The tagged ack of `status` for frame `seq`.
    pub(crate) fn ack(&self, seq: u64, status: AckStatus) -> AckFrame {
        AckFrame::new(&self.frame, seq, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PAGE_SIZE;
    use crate::tcp::{test_frame_key, test_inbound, test_layout};
    use crate::wire::{decode_runs, encode_head, FLAG_COMPRESSED, HEADER_LEN};
    use zerocopy::IntoBytes;

    fn head(seq: u64, round: u32, runs: &[PageRun], payload: u32, flags: u16) -> Vec<u8> {
        encode_head(&test_frame_key(), seq, round, runs, payload, flags, [0; 16])
    }

    fn check(inbound: &Inbound, bytes: &[u8]) -> Result<Checked> {
        let (h, kind) = ChunkHeader::decode(&bytes[..HEADER_LEN])?;
        inbound.admit(&h, kind, &bytes[HEADER_LEN..], &RecvCounters::default())
    }

    #[test]
    fn one_encoder_and_the_checks_every_backend_makes() {
        let inbound = test_inbound(test_layout(16), None);
        let runs = [
            PageRun {
                gpa: 0,
                pages: 2,
                zero: false,
            },
            PageRun {
                gpa: 4 * PAGE_SIZE,
                pages: 1,
                zero: true,
            },
        ];
        // The head decodes back to its runs and is admitted.
        let good = head(7, 2, &runs, 2 * PAGE_SIZE as u32, 0);
        let (decoded, data) = decode_runs(&good[HEADER_LEN..], &inbound.layout).unwrap();
        assert_eq!((decoded.as_slice(), data), (&runs[..], 2 * PAGE_SIZE));
        let Checked::Pages(f) = check(&inbound, &good).unwrap() else {
            panic!("pages")
        };
        assert_eq!(
            (f.seq, f.round, f.payload_len, f.codec),
            (7, 2, 2 * PAGE_SIZE, None)
        );
        // A run table changed on the way: its header tag fails first.
        let mut tampered = good.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let e = check(&inbound, &tampered).unwrap_err();
        assert_eq!(e.kind(), ferry_proto::ErrorKind::Misbehaved, "{e}");
        // The payload length must be what the runs hold.
        let e = check(&inbound, &head(8, 2, &runs, PAGE_SIZE as u32, 0)).unwrap_err();
        assert!(
            e.to_string()
                .contains("says 4096 bytes but its runs hold 8192"),
            "{e}"
        );
        // Compressed only where the migration negotiated a codec.
        let e = check(&inbound, &head(9, 2, &runs, 100, FLAG_COMPRESSED)).unwrap_err();
        assert!(
            e.to_string().contains("negotiated without compression"),
            "{e}"
        );
        // One round gate for every channel: an older round is refused.
        let e = check(&inbound, &head(10, 1, &runs, 2 * PAGE_SIZE as u32, 0)).unwrap_err();
        assert!(e.to_string().contains("stale copy refused"), "{e}");
        // The end of a channel.
        let end = ChunkHeader::end(&test_frame_key(), 0b101);
        assert!(matches!(
            check(&inbound, end.as_bytes()).unwrap(),
            Checked::End(0b101)
        ));
        // The answers: a payload tag that does not match asks again.
        let counters = RecvCounters::default();
        assert_eq!(inbound.landed(&f, true, 1, &counters), AckStatus::Mismatch);
        assert_eq!(inbound.busy(&f, "held", &counters), AckStatus::Busy);
        assert_eq!(counters.crc_errors.load(Ordering::Relaxed), 2);
        assert_eq!(counters.chunks.load(Ordering::Relaxed), 0);
    }
}
