//! The checks a destination and a source make on what the peer offers:
//! any decodable control message body, then the memory layout, the RDMA
//! offer and the RDMA accept checked as the daemon and the engine do.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_proto::control::fuzz_check(data);
});
