//! Data-channel decoders (chunk header, run table, compressed sub-header,
//! ack) on arbitrary bytes.
#![no_main]

use ferry_proto::layout::{MemoryLayout, RegionDesc, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layout = MemoryLayout {
        page_size: PAGE_SIZE,
        regions: vec![RegionDesc { gpa: 0, size: 64 << 20 }, RegionDesc { gpa: 4 << 30, size: 1 << 20 }],
    };
    ferry_proto::wire::fuzz_decode(data, &layout);
});
