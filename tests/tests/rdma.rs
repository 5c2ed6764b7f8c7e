//! The RDMA option on a host without RDMA (every CI host; the real RDMA
//! runs are in ci/softroce/ferry-suite.sh): clear errors before any page
//! moves, and `auto` falling back to compression. On a host that does have
//! an RDMA device these tests skip loudly.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_tests::{
    free_port, key_file, listen, migrate_ok, offer, start_send, summary, Migrated, KEY,
};
use ferry_transport::auth::AuthKey;
use ferry_transport::conn::Conn;
use ferry_transport::proto::{Msg, PerformanceOption, RejectReason};
use ferry_transport::rdma_wire::{RdmaEndpoint, RdmaOffer};
use ferry_transport::tls::TlsConfig;

/// True (and says so) when this host has RDMA devices, where these tests
/// do not apply.
fn host_has_rdma() -> bool {
    let has = std::fs::read_dir("/sys/class/infiniband")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if has {
        eprintln!("SKIPPED RDMA-LESS HOST TEST: this host has RDMA devices");
    }
    has
}

#[test]
fn rdma_without_a_device_fails_before_connecting() {
    if host_has_rdma() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    // Nothing listens there: an attempt to connect would say so.
    let to = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = start_send(
        to,
        &key,
        &[
            "--memory",
            "16MiB",
            "--performance-option",
            "rdma",
            "--plaintext",
        ],
    )
    .wait(Duration::from_secs(30));
    assert!(!out.status.success(), "{}", out.all());
    let all = out.all();
    assert!(all.contains("this host cannot do RDMA"), "{all}");
    assert!(all.contains("RDMA unavailable"), "{all}");
    assert!(
        !all.contains("cannot connect"),
        "it must fail before connecting: {all}"
    );
    assert!(all.contains("guest keeps running"), "{all}");
}

#[test]
fn destination_without_rdma_rejects_the_option_before_allocating() {
    if host_has_rdma() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    // --plaintext: consent to RDMA's unencrypted data channels.
    let (dest, addr) = listen(&key, &["--plaintext"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (reason, message) = rt.block_on(async {
        // The RDMA option's control connection is TLS.
        let k = AuthKey::from_file(&key).unwrap();
        let tls = TlsConfig::from_psk(&k).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = Duration::from_secs(10);
        let mut c = Conn::new(tls.connect(tcp, t).await.unwrap(), t);
        c.client_handshake(&k).await.unwrap();
        let mut o = offer(1 << 30);
        o.option = PerformanceOption::Rdma;
        c.send(&Msg::Offer(o)).await.unwrap();
        c.send(&Msg::RdmaOffer(RdmaOffer {
            endpoints: vec![RdmaEndpoint {
                addr: "10.77.10.2".parse().unwrap(),
                prefix: 24,
                device: "rxe0".into(),
                port: 0,
            }],
        }))
        .await
        .unwrap();
        match c.recv("answer").await.unwrap() {
            Msg::Reject { reason, message } => (reason, message),
            m => panic!("expected Reject, got {m:?}"),
        }
    });
    assert_eq!(reason, RejectReason::Option, "{message}");
    assert!(message.contains("cannot do RDMA"), "{message}");
    let out = dest.wait(Duration::from_secs(20));
    assert!(!out.status.success(), "{}", out.all());
}

#[test]
fn auto_without_rdma_falls_back_to_compression_and_says_so() {
    if host_has_rdma() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    // --plaintext on both ends: auto may pick RDMA only with it.
    let json = dir.path().join("summary.json");
    let Migrated { src, .. } = migrate_ok(
        &key,
        &["--plaintext"],
        &[
            "--memory",
            "32MiB",
            "--dirty-rate",
            "4MB/s",
            "--performance-option",
            "auto",
            "--plaintext",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(
        src.all().contains("auto: chose compression"),
        "{}",
        src.all()
    );
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    assert!(
        s["option"]
            .as_str()
            .unwrap_or("")
            .starts_with("compression"),
        "{}",
        s["option"]
    );
}
