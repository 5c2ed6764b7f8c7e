//! The sender's table of chunks sent and not yet acknowledged, one per data
//! channel, shared by every backend (TCP, compressed, RDMA): what an ack
//! settles, which runs the destination asked for again, and what a failed
//! channel leaves for the others to send.

use std::collections::HashMap;

use ferry_proto::wire::AckStatus;

use crate::{ChannelStats, PageRun};

/// Chunks in flight on one data channel, by sequence number, each with its
/// runs and what its backend holds until the ack (`T`: the bytes it counts
/// against the window, a descriptor slot, a buffer the transfer reads).
#[derive(Debug)]
pub struct InFlight<T> {
    chunks: HashMap<u64, (Vec<PageRun>, T)>,
    /// Runs of chunks the destination asked for again (payload tag
    /// mismatch, pages busy), until the next flush.
    resend: Vec<PageRun>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            chunks: HashMap::new(),
            resend: Vec::new(),
        }
    }
}

impl<T> InFlight<T> {
    /// Records chunk `seq`, just sent.
    pub fn sent(&mut self, seq: u64, runs: Vec<PageRun>, held: T) {
        self.chunks.insert(seq, (runs, held));
    }

    /// Settles chunk `seq` with the destination's answer and counts it in
    /// `stats`; a chunk not landed has its runs kept for [`Self::take_resend`].
    /// Returns what the backend held for it, or `None` when `seq` is not in
    /// flight here (the caller names that protocol error in its own terms).
    pub fn acked(&mut self, seq: u64, status: AckStatus, stats: &mut ChannelStats) -> Option<T> {
        let (runs, held) = self.chunks.remove(&seq)?;
        stats.chunks += 1;
        if status != AckStatus::Landed {
            // Expected now and then during pre-copy (a guest write racing
            // the read of a page); counted in the summary, so not a warning.
            tracing::debug!(
                seq,
                ?status,
                "destination asked for the chunk again; its pages will be sent again"
            );
            stats.crc_resends += 1;
            self.resend.extend(runs);
        }
        Some(held)
    }

    /// Whether every chunk sent has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// How many chunks are in flight.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// The runs the destination asked for again since the last call.
    pub fn take_resend(&mut self) -> Vec<PageRun> {
        std::mem::take(&mut self.resend)
    }

    /// After the channel failed: the sequence numbers still in flight
    /// (ascending) and the runs asked for again, for another channel to
    /// send.
    pub fn take_unlanded(&mut self) -> (Vec<u64>, Vec<PageRun>) {
        let mut seqs: Vec<u64> = self.chunks.keys().copied().collect();
        seqs.sort_unstable();
        (seqs, self.take_resend())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(page: u64) -> PageRun {
        PageRun {
            gpa: page * crate::PAGE_SIZE,
            pages: 1,
            zero: false,
        }
    }

    #[test]
    fn landed_chunks_settle_and_refused_ones_are_kept_for_resend() {
        let mut t = InFlight::default();
        let mut stats = ChannelStats::default();
        t.sent(7, vec![run(1)], 10u64);
        t.sent(3, vec![run(2), run(3)], 20u64);
        t.sent(5, vec![run(4)], 30u64);
        assert_eq!(t.acked(7, AckStatus::Landed, &mut stats), Some(10));
        assert_eq!(t.acked(3, AckStatus::Mismatch, &mut stats), Some(20));
        assert_eq!(
            t.acked(3, AckStatus::Landed, &mut stats),
            None,
            "acked once"
        );
        assert_eq!(
            t.acked(9, AckStatus::Landed, &mut stats),
            None,
            "never sent"
        );
        assert_eq!((stats.chunks, stats.crc_resends), (2, 1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.take_unlanded(), (vec![5], vec![run(2), run(3)]));
        assert!(t.take_resend().is_empty(), "taken once");
        assert_eq!(t.acked(5, AckStatus::Landed, &mut stats), Some(30));
        assert!(t.is_empty());
    }

    #[test]
    fn unlanded_sequence_numbers_are_ascending() {
        let mut t = InFlight::default();
        for seq in [9, 2, 40, 11] {
            t.sent(seq, vec![run(seq)], ());
        }
        assert_eq!(t.take_unlanded().0, vec![2, 9, 11, 40]);
    }
}
