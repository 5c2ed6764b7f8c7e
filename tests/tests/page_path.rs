//! The page path against a real destination, played by a source built from
//! the library's own pieces: the round gate shared by every data channel.

use std::time::Duration;

use ferry_proto::SessionKeys;
use ferry_tests::{chunk_frame, data_channel, key_file, listen, offer, read_ack};
use ferry_transport::auth::AuthKey;
use ferry_transport::conn::Conn;
use ferry_transport::layout::PageRun;
use ferry_transport::proto::Msg;
use ferry_transport::wire::AckStatus;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one page of `fill` at page `page` in `round` as chunk `seq`.
async fn send_page(
    s: &mut TcpStream,
    keys: &SessionKeys,
    seq: u64,
    round: u32,
    page: u64,
    fill: u8,
) {
    let runs = [PageRun {
        gpa: page * 4096,
        pages: 1,
        zero: false,
    }];
    s.write_all(&chunk_frame(keys, seq, round, &runs, &[fill; 4096]))
        .await
        .unwrap();
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
        let keys = c.session_keys().unwrap();
        let mut o = offer(1 << 20);
        o.channels = 2;
        c.send(&Msg::Offer(o)).await.unwrap();
        let Msg::Accept(accept) = c.recv("accept").await.unwrap() else {
            panic!("expected Accept")
        };
        let mut a = data_channel(addr, accept.data_token).await;
        let mut b = data_channel(addr, accept.data_token).await;
        // Round 1 begins on channel a...
        send_page(&mut a, &keys, 1, 1, 0, 0x11).await;
        assert_eq!(read_ack(&mut a, &keys).await, Some((1, AckStatus::Landed)));
        // ...so a round-0 frame on channel b, which has seen no frame yet,
        // can only be a stale copy: refused, the channel closed, no ack.
        send_page(&mut b, &keys, 0, 0, 1, 0x22).await;
        assert_eq!(
            read_ack(&mut b, &keys).await,
            None,
            "a stale frame on another channel was accepted"
        );
        // The channel that carried round 1 still works.
        send_page(&mut a, &keys, 2, 1, 2, 0x33).await;
        assert_eq!(read_ack(&mut a, &keys).await, Some((2, AckStatus::Landed)));
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
