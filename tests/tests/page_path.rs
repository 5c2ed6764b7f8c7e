//! The page path against a real destination, played by a source built from
//! the library's own pieces: the round gate shared by every data channel.

use std::time::Duration;

use ferry_tests::{data_channel, key_file, listen, offer};
use ferry_transport::auth::AuthKey;
use ferry_transport::conn::Conn;
use ferry_transport::layout::PageRun;
use ferry_transport::proto::Msg;
use ferry_transport::wire::{AckFrame, AckStatus, ChunkHeader, RunDesc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zerocopy::IntoBytes;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one page of `fill` at page `page` in `round` as chunk `seq`.
async fn send_page(s: &mut TcpStream, seq: u64, round: u32, page: u64, fill: u8) {
    let runs = [RunDesc::from_run(&PageRun {
        gpa: page * 4096,
        pages: 1,
        zero: false,
    })];
    let payload = [fill; 4096];
    let mut crc = crc32fast::Hasher::new();
    crc.update(runs.as_bytes());
    crc.update(&payload);
    let h = ChunkHeader::pages(seq, round, 1, 4096, 0, crc.finalize());
    s.write_all(h.as_bytes()).await.unwrap();
    s.write_all(runs.as_bytes()).await.unwrap();
    s.write_all(&payload).await.unwrap();
}

/// The next ack on `s`, or `None` when the destination closed the channel.
async fn ack(s: &mut TcpStream) -> Option<(u64, AckStatus)> {
    let mut b = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut b)).await {
        Ok(Ok(_)) => Some(AckFrame::decode(&b).unwrap()),
        Ok(Err(_)) => None,
        Err(_) => panic!("the destination neither acknowledged nor closed the channel"),
    }
}

#[test]
fn a_frame_older_than_any_channel_has_seen_is_refused_on_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &["--plaintext", "--peer-timeout", "5s"]);
    rt().block_on(async move {
        let mut c = Conn::new(
            TcpStream::connect(addr).await.unwrap(),
            Duration::from_secs(10),
        );
        c.client_handshake(&AuthKey::new(KEY.to_vec()).unwrap())
            .await
            .unwrap();
        let mut o = offer(1 << 20);
        o.channels = 2;
        c.send(&Msg::Offer(o)).await.unwrap();
        let Msg::Accept(_) = c.recv("accept").await.unwrap() else {
            panic!("expected Accept")
        };
        let mut a = data_channel(addr, &c).await;
        let mut b = data_channel(addr, &c).await;
        // Round 1 begins on channel a...
        send_page(&mut a, 1, 1, 0, 0x11).await;
        assert_eq!(ack(&mut a).await, Some((1, AckStatus::Landed)));
        // ...so a round-0 frame on channel b, which has seen no frame yet,
        // can only be a stale copy: refused, the channel closed, no ack.
        send_page(&mut b, 0, 0, 1, 0x22).await;
        assert_eq!(
            ack(&mut b).await,
            None,
            "a stale frame on another channel was accepted"
        );
        // The channel that carried round 1 still works.
        send_page(&mut a, 2, 1, 2, 0x33).await;
        assert_eq!(ack(&mut a).await, Some((2, AckStatus::Landed)));
        drop(c);
    });
    let out = dest.wait(Duration::from_secs(30));
    assert!(!out.panicked(), "{}", out.all());
    assert!(
        out.all()
            .contains("chunk 0 is from round 0, after round 1 began"),
        "the destination names the stale frame: {}",
        out.all()
    );
}
