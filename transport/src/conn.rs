//! An authenticated, framed control connection over tokio TCP, plain or
//! TLS ([`Stream`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::SessionKeys;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};

use crate::auth::{self, AuthKey, Side};
use crate::error::{Result, TransportError};
use crate::proto::{
    Msg, RejectReason, Role, MAX_CONTROL_BODY, PREAUTH_BODY_LIMIT, PROTOCOL_MAX, PROTOCOL_MIN,
};
use crate::stream::Stream;

/// Running SHA-256 hashes of every control frame sent and received on a
/// connection, in order: what each side said, as the other heard it. The
/// source's `sent` is the destination's `received` and the other way round
/// (one hash per direction, so messages that cross on the wire do not make
/// the two sides' views differ).
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    sent: Sha256,
    received: Arc<Mutex<Sha256>>,
}

/// The two directions of a [`Transcript`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranscriptHashes {
    /// Every frame this side sent.
    pub sent: [u8; 32],
    /// Every frame this side received.
    pub received: [u8; 32],
}

impl Transcript {
    fn sent(&mut self, frame: &[u8]) {
        self.sent.update(frame);
    }
    fn received(&self) -> Arc<Mutex<Sha256>> {
        self.received.clone()
    }
    /// The hashes of both directions so far.
    pub fn hashes(&self) -> TranscriptHashes {
        TranscriptHashes {
            sent: self.sent.clone().finalize().into(),
            received: self
                .received
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .finalize()
                .into(),
        }
    }
}

/// A control connection: framed [`Msg`]s with a body limit and a timeout on
/// every receive.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    limit: u32,
    timeout: Duration,
    peer: String,
    transcript: Transcript,
    keys: Option<Arc<SessionKeys>>,
}

impl Conn {
    /// Wraps a connected stream (plain or TLS). The body limit starts at
    /// the pre-auth limit.
    pub fn new(stream: impl Into<Stream>, timeout: Duration) -> Self {
        let stream = stream.into();
        let _ = stream.tcp().set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        Conn {
            stream,
            limit: PREAUTH_BODY_LIMIT,
            timeout,
            peer,
            transcript: Transcript::default(),
            keys: None,
        }
    }

    /// The session's keys, once the handshake authenticated both sides.
    pub fn session_keys(&self) -> Option<Arc<SessionKeys>> {
        self.keys.clone()
    }

    /// Hashes of every frame sent and received so far.
    pub fn transcript(&self) -> TranscriptHashes {
        self.transcript.hashes()
    }

    /// Peer address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The timeout applied to every receive.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Raises the body limit once the peer is authenticated.
    pub fn authenticated(&mut self) {
        self.limit = MAX_CONTROL_BODY;
    }

    /// Gives back the stream (for a data channel after its hello).
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// The negotiated TLS cipher suite; `None` on a plain connection.
    pub fn cipher_suite(&self) -> Option<String> {
        self.stream.cipher_suite()
    }

    /// The TLS session in words (version, cipher suite, identity mode);
    /// `None` on a plain connection.
    pub fn encryption(&self) -> Option<String> {
        self.stream.encryption()
    }

    /// True when the connection is TLS.
    pub fn is_encrypted(&self) -> bool {
        self.stream.is_encrypted()
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let bytes = msg.encode();
        self.transcript.sent(&bytes);
        write_flush(&mut self.stream, &bytes).await.map_err(|e| {
            TransportError::io(
                format!("sending {} to {}", msg.name(), self.peer),
                "control",
                e,
            )
        })
    }

    /// Receives one message, waiting at most the connection's timeout.
    pub async fn recv(&mut self, what: &'static str) -> Result<Msg> {
        let timeout = self.timeout;
        self.recv_within(what, timeout).await
    }

    /// Receives one message, waiting at most `timeout`.
    pub async fn recv_within(&mut self, what: &'static str, timeout: Duration) -> Result<Msg> {
        match tokio::time::timeout(timeout, self.recv_inner(what)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout {
                what,
                after: timeout,
            }),
        }
    }

    async fn recv_inner(&mut self, what: &'static str) -> Result<Msg> {
        let heard = self.transcript.received();
        read_msg(&mut self.stream, self.limit, what, &heard).await
    }

    /// Splits the connection: a task reads messages into a channel (so a
    /// receive can sit in `select!` without losing half a frame), and the
    /// returned [`ConnWriter`] sends.
    pub fn split(self) -> (ConnWriter, tokio::sync::mpsc::Receiver<Result<Msg>>) {
        let (read, write) = tokio::io::split(self.stream);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let limit = self.limit;
        let heard = self.transcript.received();
        tokio::spawn(async move {
            let mut read = read;
            loop {
                let r = read_msg(&mut read, limit, "a control message", &heard).await;
                let stop = r.is_err();
                if tx.send(r).await.is_err() || stop {
                    return;
                }
            }
        });
        (
            ConnWriter {
                write,
                peer: self.peer,
                transcript: self.transcript,
                keys: self.keys,
            },
            rx,
        )
    }

    /// Best-effort abort notice to the peer (errors ignored: the peer may be gone).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.send(&Msg::Abort {
                reason: reason.to_string(),
            }),
        )
        .await;
    }

    /// Source side of the handshake: hello, mutual authentication.
    /// Returns the protocol version chosen by the destination.
    pub async fn client_handshake(&mut self, key: &AuthKey) -> Result<u16> {
        let nonce_s = auth::nonce();
        self.send(&Msg::Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            role: Role::Control,
            nonce: nonce_s,
        })
        .await?;
        let (version, nonce_d, proof_d) = match self.recv("the destination's hello").await? {
            Msg::HelloReply {
                version,
                nonce,
                proof,
            } => (version, nonce, proof),
            Msg::Reject { reason, message } => {
                return Err(TransportError::Rejected { reason, message })
            }
            m => {
                return Err(TransportError::Unexpected {
                    expected: "HelloReply",
                    got: m.name().into(),
                })
            }
        };
        if !(PROTOCOL_MIN..=PROTOCOL_MAX).contains(&version) {
            return Err(TransportError::UnsupportedVersion {
                peer_min: version,
                peer_max: version,
                ours_min: PROTOCOL_MIN,
                ours_max: PROTOCOL_MAX,
            });
        }
        if !key.verify(Side::Destination, &nonce_s, &nonce_d, &proof_d) {
            self.abort("authentication failed: destination proof does not match our key")
                .await;
            return Err(TransportError::AuthFailed(
                "the destination's proof does not match our key (different --auth-key-file?)",
            ));
        }
        self.send(&Msg::Auth {
            proof: key.proof(Side::Source, &nonce_d, &nonce_s),
        })
        .await?;
        match self.recv("authentication result").await? {
            Msg::Welcome => self.keys = Some(Arc::new(key.session_keys(&nonce_s, &nonce_d))),
            Msg::Reject { reason, message } => {
                return Err(TransportError::Rejected { reason, message })
            }
            m => {
                return Err(TransportError::Unexpected {
                    expected: "Welcome",
                    got: m.name().into(),
                })
            }
        }
        self.authenticated();
        Ok(version)
    }

    /// Destination side of the handshake after the hello was read: answers
    /// the challenge and checks the source's proof.
    pub async fn server_authenticate(
        &mut self,
        key: &AuthKey,
        nonce_s: [u8; 32],
        version: u16,
    ) -> Result<()> {
        let nonce_d = auth::nonce();
        let proof = key.proof(Side::Destination, &nonce_s, &nonce_d);
        self.send(&Msg::HelloReply {
            version,
            nonce: nonce_d,
            proof,
        })
        .await?;
        let proof_s = match self.recv("the source's authentication").await? {
            Msg::Auth { proof } => proof,
            m => {
                return Err(TransportError::Unexpected {
                    expected: "Auth",
                    got: m.name().into(),
                })
            }
        };
        if !key.verify(Side::Source, &nonce_d, &nonce_s, &proof_s) {
            let _ = self
                .send(&Msg::Reject {
                    reason: RejectReason::Auth,
                    message: "authentication failed: wrong key".into(),
                })
                .await;
            return Err(TransportError::AuthFailed(
                "the source's proof does not match our key",
            ));
        }
        self.send(&Msg::Welcome).await?;
        self.keys = Some(Arc::new(key.session_keys(&nonce_s, &nonce_d)));
        self.authenticated();
        Ok(())
    }

    /// Sends a rejection and returns the matching error.
    pub async fn reject(&mut self, reason: RejectReason, message: String) -> TransportError {
        let _ = self
            .send(&Msg::Reject {
                reason,
                message: message.clone(),
            })
            .await;
        TransportError::Rejected { reason, message }
    }
}

/// Picks the highest version both sides speak.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Result<u16> {
    let v = peer_max.min(PROTOCOL_MAX);
    if v < peer_min || v < PROTOCOL_MIN {
        return Err(TransportError::UnsupportedVersion {
            peer_min,
            peer_max,
            ours_min: PROTOCOL_MIN,
            ours_max: PROTOCOL_MAX,
        });
    }
    Ok(v)
}

/// Reads one framed message; an `Abort` from the peer becomes
/// [`TransportError::PeerAborted`].
async fn read_msg<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    limit: u32,
    what: &'static str,
    heard: &Mutex<Sha256>,
) -> Result<Msg> {
    let mut head = [0u8; 16];
    read.read_exact(&mut head)
        .await
        .map_err(|e| TransportError::io(what, "control", e))?;
    let (len, crc) = Msg::decode_header(&head, limit)?;
    let mut body = vec![0u8; len as usize];
    read.read_exact(&mut body)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => TransportError::Malformed {
                what: "control message",
                detail: format!(
                    "truncated: header announced {len} bytes, connection closed before them"
                ),
            },
            _ => TransportError::io(what, "control", e),
        })?;
    {
        let mut h = heard.lock().unwrap_or_else(|e| e.into_inner());
        h.update(head);
        h.update(&body);
    }
    let msg = Msg::decode_body(&body, crc)?;
    if let Msg::Abort { reason } = msg {
        return Err(TransportError::PeerAborted(reason));
    }
    Ok(msg)
}

/// Writes `bytes` and flushes (a TLS session holds the last record until
/// flushed; a plain socket's flush does nothing).
async fn write_flush<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Sending half of a split [`Conn`].
#[derive(Debug)]
pub struct ConnWriter {
    write: WriteHalf<Stream>,
    peer: String,
    transcript: Transcript,
    keys: Option<Arc<SessionKeys>>,
}

impl ConnWriter {
    /// The session's keys, once the handshake authenticated both sides.
    pub fn session_keys(&self) -> Option<Arc<SessionKeys>> {
        self.keys.clone()
    }

    /// Hashes of every frame sent and received so far (received: as far as
    /// the reader task has read).
    pub fn transcript(&self) -> TranscriptHashes {
        self.transcript.hashes()
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let bytes = msg.encode();
        self.transcript.sent(&bytes);
        write_flush(&mut self.write, &bytes).await.map_err(|e| {
            TransportError::io(
                format!("sending {} to {}", msg.name(), self.peer),
                "control",
                e,
            )
        })
    }

    /// Best-effort abort notice.
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.send(&Msg::Abort {
                reason: reason.to_string(),
            }),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_sides_derive_the_same_session_keys_and_mirror_transcripts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut c = Conn::new(s, Duration::from_secs(5));
            let (version, nonce) = match c.recv("hello").await.unwrap() {
                Msg::Hello {
                    max_version, nonce, ..
                } => (max_version, nonce),
                m => panic!("{m:?}"),
            };
            c.server_authenticate(&k2, nonce, version).await.unwrap();
            let (mut w, mut rx) = c.split();
            w.send(&Msg::Welcome).await.unwrap();
            let got = rx.recv().await.unwrap().unwrap();
            assert!(matches!(got, Msg::RoundDone { round: 3, .. }));
            (w.session_keys().unwrap(), w.transcript())
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = Conn::new(s, Duration::from_secs(5));
        assert!(c.session_keys().is_none(), "no keys before authentication");
        c.client_handshake(&key).await.unwrap();
        c.send(&Msg::RoundDone { round: 3, pages: 1 })
            .await
            .unwrap();
        assert!(matches!(c.recv("welcome").await.unwrap(), Msg::Welcome));
        let (dest_keys, dest_t) = server.await.unwrap();
        let src_keys = c.session_keys().unwrap();
        let m = src_keys.commit.mac(&[b"x"]);
        assert!(dest_keys.commit.verify(&[b"x"], &m), "same commit key");
        let src_t = c.transcript();
        assert_eq!(src_t.sent, dest_t.received);
        assert_eq!(src_t.received, dest_t.sent);
        assert_ne!(src_t.sent, src_t.received);
    }
}
