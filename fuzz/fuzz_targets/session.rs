//! The migration sessions fed arbitrary event sequences: driver steps,
//! messages made from the input, time passing, and each session's messages
//! handed to the other (`ferry_proto::session_fuzz`). A panic is a broken
//! invariant: a forged commit believed, or the guest given up without one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_proto::session_fuzz::fuzz_sessions(data, std::time::Instant::now());
});
