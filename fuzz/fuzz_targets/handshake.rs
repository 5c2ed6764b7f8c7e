//! Control-frame and handshake message decoders on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_proto::control::fuzz_decode(data);
});
