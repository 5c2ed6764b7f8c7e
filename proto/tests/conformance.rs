//! Conformance of the wire formats: every frame and control message
//! round-trips through its one encoder and decoder, and each kind of
//! malformed input is refused with the error that names it (never a panic).
//! In memory, no IO.

use ferry_proto::control::{
    Accept, AuditReport, AuditResult, GuestConfig, Msg, Offer, PerformanceOption, RejectReason,
    Role, Switchover, CONTROL_MAGIC, MAX_CONTROL_BODY, PREAUTH_BODY_LIMIT,
};
use ferry_proto::handshake::ControlTags;
use ferry_proto::layout::{MemoryLayout, PageRun, RegionDesc, MAX_REGIONS, PAGE_SIZE};
use ferry_proto::net::{pair_interfaces, NetInterface, MAX_CHANNELS};
use ferry_proto::rdma::{
    check_accept, check_offer, RdmaAccept, RdmaChannel, RdmaEndpoint, RdmaOffer, RdmaRegionKey,
    MAX_RDMA_CHANNELS,
};
use ferry_proto::relay::{
    Dir, RelayAck, RelayKeys, RelayOffer, StreamChunk, ACK_LEN as RELAY_ACK_LEN, CHUNK_HEADER_LEN,
};
use ferry_proto::wire::{
    decode_runs, run_table, AckFrame, AckStatus, ChunkHeader, ChunkKind, Codec, CompressedHeader,
    CompressionSpec, ACK_LEN, FLAG_COMPRESSED, HEADER_LEN, MAX_CHUNK_PAYLOAD, MAX_RUNS,
    MAX_SEGMENT, SEGMENT_STORED,
};
use ferry_proto::{MacKey, WireError, WireKind};
use zerocopy::IntoBytes;

fn key() -> MacKey {
    MacKey::from_bytes([0x42; 32])
}

fn layout() -> MemoryLayout {
    MemoryLayout {
        page_size: PAGE_SIZE,
        regions: vec![
            RegionDesc {
                gpa: 0,
                size: 256 * PAGE_SIZE,
            },
            RegionDesc {
                gpa: 1 << 32,
                size: 64 * PAGE_SIZE,
            },
        ],
    }
}

fn run(page: u64, pages: u32, zero: bool) -> PageRun {
    PageRun {
        gpa: page * PAGE_SIZE,
        pages,
        zero,
    }
}

/// A whole encoded chunk head: header bytes followed by the run table.
fn head(seq: u64, round: u32, runs: &[PageRun], flags: u16) -> (ChunkHeader, Vec<u8>) {
    let table = run_table(runs);
    let payload: u64 = runs.iter().map(PageRun::payload_bytes).sum();
    let h = ChunkHeader::pages(&key(), seq, round, &table, payload as u32, flags, [7; 16]);
    (h, table)
}

// ---------------------------------------------------------------- frames

#[test]
fn chunk_headers_round_trip_with_every_field() {
    let runs = [run(0, 3, false), run(10, 5, true), run(300, 1, false)];
    let runs: Vec<PageRun> = runs
        .into_iter()
        .map(|r| {
            if r.gpa >= 256 * PAGE_SIZE {
                PageRun {
                    gpa: (1 << 32) + PAGE_SIZE,
                    ..r
                }
            } else {
                r
            }
        })
        .collect();
    for flags in [0, FLAG_COMPRESSED] {
        let (h, table) = head(u64::MAX - 1, 17, &runs, flags);
        let bytes = h.as_bytes();
        assert_eq!(bytes.len(), HEADER_LEN);
        let (back, kind) = ChunkHeader::decode(bytes).unwrap();
        assert_eq!(kind, ChunkKind::Pages);
        assert_eq!(back.seq.get(), u64::MAX - 1);
        assert_eq!(back.round.get(), 17);
        assert_eq!(back.flags.get(), flags);
        assert_eq!(back.run_count.get(), 3);
        assert_eq!(back.payload_len.get() as u64, 4 * PAGE_SIZE);
        assert_eq!(back.payload_tag, [7; 16]);
        back.verify(&key(), &table).unwrap();
        let (decoded, data) = decode_runs(&table, &layout()).unwrap();
        assert_eq!(decoded, runs);
        assert_eq!(data, 4 * PAGE_SIZE);
    }
}

#[test]
fn end_frames_round_trip_and_carry_their_seq() {
    for mask in [0, 0b1011, u64::MAX] {
        let e = ChunkHeader::end(&key(), mask);
        let (back, kind) = ChunkHeader::decode(e.as_bytes()).unwrap();
        assert_eq!(kind, ChunkKind::End);
        assert_eq!(back.seq.get(), mask);
        back.verify(&key(), &[]).unwrap();
    }
}

#[test]
fn acks_round_trip_for_every_status() {
    for status in [AckStatus::Landed, AckStatus::Mismatch, AckStatus::Busy] {
        for seq in [0, 1, u64::MAX] {
            let a = AckFrame::new(&key(), seq, status);
            assert_eq!(a.as_bytes().len(), ACK_LEN);
            assert_eq!(
                AckFrame::decode(&key(), a.as_bytes()).unwrap(),
                (seq, status)
            );
        }
    }
}

#[test]
fn run_tables_round_trip_up_to_the_run_limit() {
    let big = MemoryLayout {
        page_size: PAGE_SIZE,
        regions: vec![RegionDesc {
            gpa: 0,
            size: 2 * u64::from(MAX_RUNS) * PAGE_SIZE,
        }],
    };
    let runs: Vec<PageRun> = (0..u64::from(MAX_RUNS))
        .map(|i| run(2 * i, 1, i % 3 == 0))
        .collect();
    let (back, data) = decode_runs(&run_table(&runs), &big).unwrap();
    assert_eq!(back, runs);
    assert_eq!(
        data,
        runs.iter().filter(|r| !r.zero).count() as u64 * PAGE_SIZE
    );
}

fn header_error(mutate: impl FnOnce(&mut ChunkHeader)) -> WireError {
    let (mut h, _) = head(1, 0, &[run(0, 1, false)], 0);
    mutate(&mut h);
    ChunkHeader::decode(h.as_bytes()).unwrap_err()
}

#[test]
fn each_malformed_chunk_header_gets_its_named_error() {
    use zerocopy::byteorder::little_endian::{U16, U32};
    assert!(matches!(
        ChunkHeader::decode(&[0; HEADER_LEN - 1]).unwrap_err(),
        WireError::Malformed {
            what: "chunk header",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.magic = *b"FRYA"),
        WireError::BadMagic { what: "chunk header", found, .. } if found == *b"FRYA"
    ));
    assert!(matches!(
        header_error(|h| h.version = 1),
        WireError::Invalid {
            field: "chunk frame version",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.kind = 0),
        WireError::Invalid {
            field: "chunk kind",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.flags = U16::new(0x8000)),
        WireError::Invalid {
            field: "chunk flags",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.reserved = U32::new(9)),
        WireError::Invalid {
            field: "chunk header",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.run_count = U32::new(MAX_RUNS + 1)),
        WireError::TooLarge {
            field: "chunk run count",
            ..
        }
    ));
    assert!(matches!(
        header_error(|h| h.payload_len = U32::new(MAX_CHUNK_PAYLOAD + 1)),
        WireError::TooLarge {
            field: "chunk payload length",
            ..
        }
    ));
    let mut end = ChunkHeader::end(&key(), 0);
    end.run_count = U32::new(1);
    assert!(matches!(
        ChunkHeader::decode(end.as_bytes()).unwrap_err(),
        WireError::Invalid {
            field: "end frame",
            ..
        }
    ));
}

#[test]
fn a_changed_header_or_table_fails_its_tag_and_nothing_else() {
    let (h, table) = head(9, 2, &[run(0, 2, false), run(4, 1, true)], 0);
    let mut other = table.clone();
    other[0] ^= 1;
    let e = h.verify(&key(), &other).unwrap_err();
    assert!(matches!(
        e,
        WireError::BadTag {
            field: "chunk header tag",
            ..
        }
    ));
    assert_eq!(e.kind(), WireKind::Misbehaved);
    let e = h.verify(&MacKey::from_bytes([1; 32]), &table).unwrap_err();
    assert!(matches!(e, WireError::BadTag { .. }));
    // A changed field still decodes (its plain checks pass) but fails the tag.
    let mut bytes = h.as_bytes().to_vec();
    bytes[16] ^= 1; // round
    let (x, _) = ChunkHeader::decode(&bytes).unwrap();
    assert!(matches!(
        x.verify(&key(), &table).unwrap_err(),
        WireError::BadTag { .. }
    ));
}

#[test]
fn each_malformed_run_table_gets_its_named_error() {
    let l = layout();
    assert!(matches!(
        decode_runs(&[0; 17], &l).unwrap_err(),
        WireError::Malformed {
            what: "run table",
            ..
        }
    ));
    let mut bad_flag = run_table(&[run(0, 1, false)]);
    bad_flag[12] = 2;
    assert!(matches!(
        decode_runs(&bad_flag, &l).unwrap_err(),
        WireError::Invalid {
            field: "run flags",
            ..
        }
    ));
    for outside in [run(255, 2, false), run(256, 1, false), run(0, 0, false)] {
        assert!(matches!(
            decode_runs(&run_table(&[outside]), &l).unwrap_err(),
            WireError::OutsideLayout { .. }
        ));
    }
    let unaligned = PageRun {
        gpa: 1,
        pages: 1,
        zero: false,
    };
    assert!(matches!(
        decode_runs(&run_table(&[unaligned]), &l).unwrap_err(),
        WireError::OutsideLayout { gpa: 1, pages: 1 }
    ));
    for order in [
        [run(4, 2, false), run(5, 1, false)],
        [run(9, 1, true), run(3, 1, false)],
    ] {
        assert!(matches!(
            decode_runs(&run_table(&order), &l).unwrap_err(),
            WireError::Invalid {
                field: "run table",
                ..
            }
        ));
    }
    assert_eq!(
        decode_runs(&[], &l).unwrap(),
        (vec![], 0),
        "no runs is fine"
    );
}

#[test]
fn each_malformed_ack_gets_its_named_error() {
    let good = AckFrame::new(&key(), 5, AckStatus::Landed);
    assert!(matches!(
        AckFrame::decode(&key(), &good.as_bytes()[..ACK_LEN - 1]).unwrap_err(),
        WireError::Malformed {
            what: "ack frame",
            ..
        }
    ));
    let mut b = good.as_bytes().to_vec();
    b[..4].copy_from_slice(b"FRYC");
    assert!(matches!(
        AckFrame::decode(&key(), &b).unwrap_err(),
        WireError::BadMagic {
            what: "ack frame",
            ..
        }
    ));
    let mut b = good.as_bytes().to_vec();
    b[4] = 3;
    assert!(matches!(
        AckFrame::decode(&key(), &b).unwrap_err(),
        WireError::Invalid {
            field: "ack status",
            ..
        }
    ));
    let mut b = good.as_bytes().to_vec();
    b[4] = AckStatus::Busy as u8;
    assert!(matches!(
        AckFrame::decode(&key(), &b).unwrap_err(),
        WireError::BadTag {
            field: "ack tag",
            ..
        }
    ));
    let mut b = good.as_bytes().to_vec();
    b[8] ^= 1; // seq
    assert!(matches!(
        AckFrame::decode(&key(), &b).unwrap_err(),
        WireError::BadTag { .. }
    ));
}

/// A compressed payload: sub-header, segment table and `segs` (length,
/// stored) with filler bytes.
fn compressed(codec: u8, uncompressed: u32, segs: &[(u32, bool)]) -> Vec<u8> {
    let body: u32 = segs.iter().map(|s| s.0).sum::<u32>() + 4 * segs.len() as u32;
    let mut p = vec![codec, 0];
    p.extend_from_slice(&(segs.len() as u16).to_le_bytes());
    p.extend_from_slice(&uncompressed.to_le_bytes());
    p.extend_from_slice(&body.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for (len, stored) in segs {
        p.extend_from_slice(&(len | if *stored { SEGMENT_STORED } else { 0 }).to_le_bytes());
    }
    for (len, _) in segs {
        p.resize(p.len() + *len as usize, 0xab);
    }
    p
}

#[test]
fn compressed_payloads_round_trip_and_each_bad_field_is_named() {
    let page = PAGE_SIZE as u32;
    let runs = [u64::from(2 * page), u64::from(page)];
    let good = compressed(2, 3 * page, &[(100, false), (page, true)]);
    let p = CompressedHeader::decode(&good, &runs, Some(Codec::Zstd)).unwrap();
    assert_eq!(p.codec, Codec::Zstd);
    assert_eq!(p.segments.len(), 2);
    assert_eq!((p.segments[0].offset, p.segments[0].len), (24, 100));
    assert!(p.segments[1].stored);
    assert_eq!(p.segments[1].offset, 124);

    let invalid = |payload: &[u8], runs: &[u64], want: Option<Codec>| -> &'static str {
        match CompressedHeader::decode(payload, runs, want).unwrap_err() {
            WireError::Invalid { field, .. } => field,
            WireError::Malformed { what, .. } => what,
            e => panic!("unexpected {e}"),
        }
    };
    assert_eq!(
        invalid(&good, &runs, Some(Codec::Lz4)),
        "compression codec id"
    );
    assert_eq!(
        invalid(
            &compressed(9, 3 * page, &[(1, false), (page, true)]),
            &runs,
            None
        ),
        "compression codec id"
    );
    assert_eq!(
        invalid(
            &compressed(2, 3 * page + 1, &[(1, false), (page, true)]),
            &runs,
            None
        ),
        "uncompressed length"
    );
    assert_eq!(
        invalid(&compressed(2, 3 * page, &[(1, false)]), &runs, None),
        "segment count"
    );
    assert_eq!(
        invalid(
            &compressed(2, 3 * page, &[(0, false), (page, true)]),
            &runs,
            None
        ),
        "segment length"
    );
    assert_eq!(
        invalid(
            &compressed(2, 3 * page, &[(1, false), (page - 1, true)]),
            &runs,
            None
        ),
        "segment length",
        "a stored segment is exactly its run"
    );
    assert_eq!(
        invalid(
            &compressed(2, 3 * page, &[(2 * page, false), (page, true)]),
            &runs,
            None
        ),
        "segment length",
        "a compressed segment is shorter than its run"
    );
    let mut reserved = good.clone();
    reserved[1] = 1;
    assert_eq!(invalid(&reserved, &runs, None), "compressed sub-header");
    let mut long = good.clone();
    long.push(0);
    assert_eq!(invalid(&long, &runs, None), "compressed length");
    assert_eq!(invalid(&good[..10], &runs, None), "compressed payload");
    let huge = [MAX_SEGMENT as u64 + PAGE_SIZE];
    assert_eq!(
        invalid(&compressed(2, huge[0] as u32, &[(10, false)]), &huge, None),
        "compressed run"
    );
}

#[test]
fn codecs_and_specs_parse_and_print() {
    for c in Codec::ALL {
        assert_eq!(Codec::from_id(c.id()).unwrap(), c);
    }
    assert!(matches!(
        Codec::from_id(0).unwrap_err(),
        WireError::Invalid {
            field: "compression codec id",
            ..
        }
    ));
    for s in ["lz4", "zstd:1", "zstd:19"] {
        assert_eq!(s.parse::<CompressionSpec>().unwrap().to_string(), s);
    }
    for bad in ["zstd:0", "zstd:20", "lz4:1", "gzip", "zstd:x"] {
        assert!(bad.parse::<CompressionSpec>().is_err(), "{bad}");
    }
}

// ------------------------------------------------------- control messages

fn offer(option: PerformanceOption) -> Offer {
    Offer {
        layout: layout(),
        guest: GuestConfig {
            vcpus: 4,
            cpu_vendor: "AuthenticAMD".into(),
            device_state_format: "synthetic-v1".into(),
        },
        option,
        channels: MAX_CHANNELS,
    }
}

fn every_message() -> Vec<Msg> {
    let ep = RdmaEndpoint {
        addr: "10.9.0.1".parse().unwrap(),
        prefix: 24,
        device: "rxe0".into(),
        port: 7000,
    };
    vec![
        Msg::Hello {
            min_version: 2,
            max_version: 2,
            role: Role::Data,
            nonce: [1; 32],
        },
        Msg::HelloReply {
            version: 2,
            nonce: [2; 32],
        },
        Msg::Auth { proof: [3; 32] },
        Msg::Welcome { proof: [4; 32] },
        Msg::Offer(offer(PerformanceOption::Tcp)),
        Msg::Offer(offer(PerformanceOption::Rdma)),
        Msg::Offer(offer(PerformanceOption::Compression { codec: 1, level: 0 })),
        Msg::Accept(Accept {
            migration_id: u64::MAX,
            interfaces: vec![],
        }),
        Msg::Reject {
            reason: RejectReason::GuestConfig,
            message: "vcpus".into(),
        },
        Msg::RoundDone {
            round: u32::MAX,
            pages: 0,
        },
        Msg::Switchover(Switchover {
            device_state: vec![0; 1000],
            device_state_hash: [9; 32],
            verify_full: false,
        }),
        Msg::Ready(ferry_proto::switchover::ReadyProof {
            transcript: [1; 32],
            evidence: [2; 32],
            device_state: [3; 32],
            memory: None,
        }),
        Msg::Commit { mac: [5; 32] },
        Msg::Committed { mac: [6; 32] },
        Msg::CommitRefused {
            reason: String::new(),
            mac: [7; 32],
        },
        Msg::Abort {
            reason: "operator".into(),
        },
        Msg::Fence { channels: vec![] },
        Msg::Fenced {
            channels: vec!["192.0.2.1:1".parse().unwrap()],
        },
        Msg::RdmaOffer(RdmaOffer {
            endpoints: vec![ep.clone()],
        }),
        Msg::RdmaAccept(RdmaAccept {
            channels: vec![RdmaChannel {
                endpoint: ep,
                regions: vec![],
            }],
        }),
        Msg::Ping { seq: 1 },
        Msg::Pong { seq: u64::MAX },
        Msg::Audit(AuditReport {
            result: AuditResult::Passed,
            pages: 1,
            mismatched_pages: 0,
            first_mismatch: None,
            duration_us: 0,
            pause_predicted: Default::default(),
            pause_actual: Default::default(),
            mac: [0; 32],
        }),
        Msg::RelayOffer(RelayOffer {
            deliver_to: "[::1]:4444".into(),
            max_streams: 65,
            window: 8 << 20,
            chunk: 256 << 10,
            option: PerformanceOption::Tcp,
            channels: 4,
        }),
        Msg::Reject {
            reason: RejectReason::RelayNotAllowed,
            message: "10.0.0.1:4444".into(),
        },
        Msg::Reject {
            reason: RejectReason::TooManyStreams,
            message: "66".into(),
        },
        Msg::Open { stream: 0 },
        Msg::Opened { stream: u32::MAX },
        Msg::OpenFailed {
            stream: 1,
            error: String::new(),
        },
        Msg::Credit {
            stream: 0,
            dir: Dir::Forward,
            delivered: u64::MAX,
            finished: false,
        },
        Msg::Fin {
            stream: 64,
            dir: Dir::Back,
            length: 0,
            digest: [0xff; 16],
        },
        Msg::RelayEnd { streams: 65 },
    ]
}

fn split(frame: &[u8]) -> ([u8; 16], &[u8]) {
    (frame[..16].try_into().unwrap(), &frame[16..])
}

#[test]
fn every_message_round_trips_plain_and_tagged() {
    let (mut tx, mut rx) = (ControlTags::new(key()), ControlTags::new(key()));
    for m in every_message() {
        let plain = m.encode();
        let (h, rest) = split(&plain);
        let head = Msg::decode_head(&h, MAX_CONTROL_BODY).unwrap();
        assert!(!head.tagged);
        assert_eq!(head.rest_len(), rest.len());
        assert_eq!(Msg::decode_body(rest, head.crc).unwrap(), m, "{}", m.name());

        let tagged = m.encode_frame(Some(&mut tx));
        let (h, rest) = split(&tagged);
        let head = Msg::decode_head(&h, MAX_CONTROL_BODY).unwrap();
        assert!(head.tagged);
        let (body, tag) = rest.split_at(head.len as usize);
        rx.open(&h, body, tag.try_into().unwrap()).unwrap();
        assert_eq!(Msg::decode_body(body, head.crc).unwrap(), m, "{}", m.name());
    }
}

#[test]
fn every_message_has_a_distinct_name() {
    let mut names: Vec<&str> = every_message().iter().map(Msg::name).collect();
    names.sort_unstable();
    names.dedup();
    // Offer appears three times above (one per option), Reject three
    // times (the relay's two reasons).
    assert_eq!(names.len(), every_message().len() - 4);
}

#[test]
fn each_malformed_control_frame_gets_its_named_error() {
    let frame = Msg::Ping { seq: 7 }.encode();
    let (h, body) = split(&frame);
    let mut bad = h;
    bad[..4].copy_from_slice(b"FRYC");
    assert!(matches!(
        Msg::decode_head(&bad, MAX_CONTROL_BODY).unwrap_err(),
        WireError::BadMagic { what: "control frame", expected, .. } if expected == CONTROL_MAGIC
    ));
    assert!(matches!(
        Msg::decode_head(&h, body.len() as u32 - 1).unwrap_err(),
        WireError::TooLarge {
            field: "control message length",
            ..
        }
    ));
    let mut flags = h;
    flags[12] = 0x10;
    assert!(matches!(
        Msg::decode_head(&flags, MAX_CONTROL_BODY).unwrap_err(),
        WireError::Invalid {
            field: "control frame flags",
            ..
        }
    ));
    let head = Msg::decode_head(&h, MAX_CONTROL_BODY).unwrap();
    let mut flipped = body.to_vec();
    flipped[0] ^= 0xff;
    assert!(matches!(
        Msg::decode_body(&flipped, head.crc).unwrap_err(),
        WireError::CrcMismatch {
            what: "control message",
            ..
        }
    ));
    let truncated = &body[..body.len() - 1];
    assert!(matches!(
        Msg::decode_body(truncated, crc32fast::hash(truncated)).unwrap_err(),
        WireError::Malformed {
            what: "control message",
            ..
        }
    ));
    let mut trailing = body.to_vec();
    trailing.push(0);
    let e = Msg::decode_body(&trailing, crc32fast::hash(&trailing)).unwrap_err();
    assert!(e.to_string().contains("1 trailing bytes"), "{e}");
    let unknown = [200u8];
    assert!(matches!(
        Msg::decode_body(&unknown, crc32fast::hash(&unknown)).unwrap_err(),
        WireError::Malformed { .. }
    ));
}

#[test]
fn the_preauth_limit_refuses_large_frames_before_the_body_is_read() {
    let big = Msg::Abort {
        reason: "x".repeat(PREAUTH_BODY_LIMIT as usize),
    }
    .encode();
    let (h, _) = split(&big);
    assert!(matches!(
        Msg::decode_head(&h, PREAUTH_BODY_LIMIT).unwrap_err(),
        WireError::TooLarge { limit, .. } if limit == u64::from(PREAUTH_BODY_LIMIT)
    ));
    Msg::decode_head(&h, MAX_CONTROL_BODY).unwrap();
}

#[test]
fn a_tagged_frame_replayed_reordered_or_changed_does_not_open() {
    let (mut tx, mut rx) = (ControlTags::new(key()), ControlTags::new(key()));
    let a = Msg::Ping { seq: 1 }.encode_frame(Some(&mut tx));
    let b = Msg::Ping { seq: 2 }.encode_frame(Some(&mut tx));
    let open = |rx: &mut ControlTags, f: &[u8]| {
        let (h, rest) = split(f);
        let (body, tag) = rest.split_at(rest.len() - 16);
        rx.open(&h, body, tag.try_into().unwrap())
    };
    assert!(open(&mut rx, &b).is_err(), "out of order");
    let mut rx = ControlTags::new(key());
    open(&mut rx, &a).unwrap();
    assert!(open(&mut rx, &a).is_err(), "replayed");
    let mut changed = b.clone();
    changed[17] ^= 1;
    assert!(open(&mut rx, &changed).is_err(), "changed");
}

// ------------------------------------------- layout, networks, RDMA, errors

#[test]
fn each_malformed_layout_gets_its_named_error() {
    let field = |l: MemoryLayout| match l.validate().unwrap_err() {
        WireError::Invalid { field, .. } | WireError::TooLarge { field, .. } => field,
        e => panic!("unexpected {e}"),
    };
    layout().validate().unwrap();
    let mut l = layout();
    l.page_size = 2 << 20;
    assert_eq!(field(l), "page size");
    assert_eq!(
        field(MemoryLayout {
            page_size: PAGE_SIZE,
            regions: vec![]
        }),
        "memory layout"
    );
    let mut l = layout();
    l.regions = vec![
        RegionDesc {
            gpa: 0,
            size: PAGE_SIZE
        };
        MAX_REGIONS + 1
    ];
    assert_eq!(field(l), "region count");
    let mut l = layout();
    l.regions[0].size = 0;
    assert_eq!(field(l), "memory region");
    let mut l = layout();
    l.regions[1].gpa = u64::MAX - PAGE_SIZE + 1;
    assert_eq!(field(l), "memory region", "wraps");
    let mut l = layout();
    l.regions.reverse();
    assert_eq!(field(l), "memory region", "out of order");
}

#[test]
fn layouts_from_regions_are_sorted() {
    let l = MemoryLayout::from_regions([(1 << 32, 64 * PAGE_SIZE), (0, 256 * PAGE_SIZE)]);
    assert_eq!(l, layout());
    assert_eq!(l.total_pages(), 320);
}

#[test]
fn tcp_and_rdma_pair_by_the_same_subnet_rule() {
    let iface = |addr: &str, prefix| NetInterface {
        name: "x".into(),
        addr: addr.parse().unwrap(),
        prefix,
        speed_mbps: None,
        rdma: None,
    };
    let ep = |addr: &str, prefix| RdmaEndpoint {
        addr: addr.parse().unwrap(),
        prefix,
        device: "rxe0".into(),
        port: 0,
    };
    let cases = [
        ("10.1.0.1", 24, "10.1.0.2", 24, true),
        ("10.1.0.1", 24, "10.1.1.2", 24, false),
        ("10.1.0.1", 16, "10.1.1.2", 24, false),
        ("10.1.0.1", 16, "10.1.1.2", 16, true),
        ("fd00::1", 64, "fd00::2", 64, true),
        ("fd00::1", 64, "10.1.0.2", 24, false),
        ("10.1.0.1", 0, "10.1.0.2", 24, false),
    ];
    for (a, ap, b, bp, want) in cases {
        let tcp = !pair_interfaces(&[iface(a, ap)], &[iface(b, bp)]).is_empty();
        let rdma = ep(a, ap).shares_subnet(&ep(b, bp));
        assert_eq!((tcp, rdma), (want, want), "{a}/{ap} with {b}/{bp}");
    }
}

#[test]
fn one_channel_limit_for_every_option() {
    assert_eq!(MAX_RDMA_CHANNELS, usize::from(MAX_CHANNELS));
    let ep = RdmaEndpoint {
        addr: "10.0.0.1".parse().unwrap(),
        prefix: 24,
        device: "rxe0".into(),
        port: 1,
    };
    let l = layout();
    let chan = RdmaChannel {
        endpoint: ep,
        regions: l
            .regions
            .iter()
            .map(|r| RdmaRegionKey {
                len: r.size,
                rkey: 1,
            })
            .collect(),
    };
    let accept = |n| RdmaAccept {
        channels: vec![chan.clone(); n],
    };
    check_accept(&accept(MAX_RDMA_CHANNELS), &l).unwrap();
    assert!(matches!(
        check_accept(&accept(MAX_RDMA_CHANNELS + 1), &l).unwrap_err(),
        WireError::TooLarge {
            field: "RDMA channel count",
            ..
        }
    ));
    assert!(matches!(
        check_offer(&RdmaOffer {
            endpoints: vec![chan.endpoint.clone(); 257]
        })
        .unwrap_err(),
        WireError::TooLarge { .. }
    ));
}

#[test]
fn errors_sort_into_kinds() {
    assert_eq!(header_error(|h| h.version = 9).kind(), WireKind::Malformed);
    assert_eq!(
        decode_runs(&run_table(&[run(999, 1, false)]), &layout())
            .unwrap_err()
            .kind(),
        WireKind::Misbehaved
    );
    let frame = Msg::Ping { seq: 1 }.encode();
    assert_eq!(
        Msg::decode_body(&frame[16..], 0).unwrap_err().kind(),
        WireKind::Misbehaved,
        "a checksum mismatch"
    );
}

#[test]
fn no_decoder_panics_on_short_or_random_input() {
    let l = layout();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        ferry_proto::wire::fuzz_decode(&bytes, &l);
        ferry_proto::control::fuzz_decode(&bytes);
        // Plausible prefixes too: a real header followed by noise.
        let mut framed = head(1, 0, &[run(0, 1, false)], 0).0.as_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        ferry_proto::wire::fuzz_decode(&framed, &l);
        let mut control = Msg::Ping { seq: 0 }.encode()[..16].to_vec();
        control.extend_from_slice(&bytes);
        ferry_proto::control::fuzz_decode(&control);
        ferry_proto::control::fuzz_check(&bytes);
    }
    // The offer checks on real bodies, and on each of them cut short.
    for m in every_message() {
        let frame = m.encode();
        let body = &frame[16..];
        for end in 0..=body.len() {
            ferry_proto::control::fuzz_check(&body[..end]);
        }
    }
}

#[test]
fn stream_chunks_and_relay_acks_round_trip_and_name_each_malformed_field() {
    let k = RelayKeys::from_frame_key(&key());
    let payload = b"QEVM\0\0\0\x03";
    let c = StreamChunk {
        stream: 0,
        dir: Dir::Forward,
        offset: 1 << 33,
        raw_len: payload.len() as u32,
        wire_len: payload.len() as u32,
        codec: 0,
        seq: u64::MAX,
        digest: k.chunk_digest(payload),
    };
    let b = c.encode(&k);
    assert_eq!(StreamChunk::decode(&b, &k, 1 << 18).unwrap(), c);
    // Fields are checked after the tag: re-tag a changed header to reach them.
    let field = |mutate: &dyn Fn(&mut StreamChunk)| {
        let mut m = c;
        mutate(&mut m);
        StreamChunk::decode(&m.encode(&k), &k, 1 << 18)
            .unwrap_err()
            .to_string()
    };
    assert!(field(&|m| m.raw_len = 0).contains("stream chunk length"));
    assert!(field(&|m| m.raw_len = (1 << 18) + 1).contains("above the limit"));
    assert!(field(&|m| m.wire_len = 3).contains("wire length"));
    assert!(field(&|m| m.codec = 9).contains("codec"));
    assert!(field(&|m| {
        m.codec = 1;
        m.wire_len = m.raw_len + 1;
    })
    .contains("compressed bytes"));
    assert!(field(&|m| m.offset = u64::MAX).contains("overflows"));
    let mut bad = b;
    bad[..4].copy_from_slice(b"FRYX");
    assert!(matches!(
        StreamChunk::decode(&bad, &k, 1 << 18),
        Err(WireError::BadMagic { .. })
    ));
    let mut bad = b;
    bad[5] = 7;
    let e = StreamChunk::decode(&bad, &k, 1 << 18).unwrap_err();
    assert_eq!(
        e.kind(),
        WireKind::Misbehaved,
        "a changed direction fails the tag: {e}"
    );
    let a = RelayAck { seq: 5 }.encode(&k);
    assert_eq!(RelayAck::decode(&a, &k).unwrap(), RelayAck { seq: 5 });
    // Random headers never panic and never pass.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..2000 {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        for b in h.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        h[..4].copy_from_slice(b"FRYS");
        assert!(StreamChunk::decode(&h, &k, 1 << 18).is_err());
        let mut a = [0u8; RELAY_ACK_LEN];
        a.copy_from_slice(&h[..RELAY_ACK_LEN]);
        a[..4].copy_from_slice(b"FRYA");
        assert!(RelayAck::decode(&a, &k).is_err());
    }
}
