//! The operator's view end to end (issue 12): strict units, a `--json`
//! record for every outcome, cancel and shutdown by signal, progress lines
//! in logs, and the `--events` stream, each with real `ferry` processes.

use std::net::TcpListener;
use std::time::Duration;

use ferry_tests::{key_file, Proc};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A listener that counts whether anyone connected (nobody should).
fn silent_listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn nobody_connected(l: &TcpListener) -> bool {
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn bad_units_are_refused_with_the_likely_value_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (l, addr) = silent_listener();
    let cases: [(&str, &str, &[&str]); 5] = [
        // A bare duration: 300 what?
        ("--downtime-limit", "300", &["has no unit", "300ms"]),
        ("--peer-timeout", "30", &["has no unit", "30s"]),
        // A decimal size that is not whole pages: the binary one was meant.
        (
            "--memory",
            "1GB",
            &["not a whole number of 4 KiB pages", "did you mean 1GiB?"],
        ),
        // A bare rate is not bytes per second by default any more.
        ("--dirty-rate", "64", &["has no unit", "64MB/s"]),
        // Bits or bytes?
        ("--bandwidth-limit", "64Mb/s", &["64Mbit/s", "64MB/s"]),
    ];
    for (flag, value, want) in cases {
        let out = Proc::start(&[
            "send",
            "--to",
            &addr,
            "--auth-key-file",
            key.to_str().unwrap(),
            flag,
            value,
        ])
        .wait(Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {}", out.all());
        for w in want {
            assert!(
                out.stderr.contains(w),
                "{flag} {value}: wants {w:?}: {}",
                out.all()
            );
        }
        assert!(out.stderr.contains(flag), "names the flag: {}", out.all());
    }
    assert!(nobody_connected(&l), "nothing connected for a refused flag");
}
