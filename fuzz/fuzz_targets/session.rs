//! The opening and the migration sessions fed arbitrary event sequences:
//! the same bytes drive the opening (hellos, the destination's flags,
//! offers, accepts and answers, `ferry_proto::session_fuzz::fuzz_opening`)
//! and the sessions after it (driver steps, messages made from the input,
//! time passing, and each session's messages handed to the other,
//! `fuzz_sessions`). A panic is a broken invariant: an offer accepted out
//! of turn or against the destination's flags, a forged commit believed,
//! or the guest given up without one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_proto::session_fuzz::fuzz_opening(data);
    ferry_proto::session_fuzz::fuzz_sessions(data, std::time::Instant::now());
});
