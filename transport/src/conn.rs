//! An authenticated, framed control connection over tokio TCP, plain or
//! TLS ([`Stream`]): the handshake (the source proves itself first, both
//! proofs bound to the transcript and the TLS session, see
//! [`ferry_proto::handshake`]), a tag on every control message after it,
//! and the data channels' admission by proof.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::handshake::{ControlTags, Prover, TAG_LEN};
use ferry_proto::session::{Credential, DestHandshake, Established, SourceHandshake, Transcripts};
use ferry_proto::{MacKey, SessionKeys};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};

use crate::auth::{self, AuthKey};
use crate::error::{Result, TransportError};
use crate::proto::{Msg, RejectReason, Role, MAX_CONTROL_BODY, PREAUTH_BODY_LIMIT};
use crate::stream::Stream;
use ferry_proto::WireError;

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
    /// Tags of the frames this side sends (after authentication).
    seal: Option<ControlTags>,
    /// Tags of the frames this side receives (after authentication).
    open: Option<ControlTags>,
    /// A frame as far as it was read when its receive was dropped.
    partial: PartialFrame,
}

impl Conn {
    /// Wraps a connected stream (plain or TLS). The body limit starts at
    /// the pre-auth limit. Every connection of a migration, control or
    /// data, both sides, passes here: its socket gets keepalive and
    /// `TCP_USER_TIMEOUT` from `timeout` ([`crate::stream::keep_alive`]).
    pub fn new(stream: impl Into<Stream>, timeout: Duration) -> Self {
        let stream = stream.into();
        let _ = stream.tcp().set_nodelay(true);
        crate::stream::keep_alive(stream.tcp(), timeout);
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
            seal: None,
            open: None,
            partial: PartialFrame::default(),
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

    /// Authentication passed: the session's keys, the larger body limit,
    /// and tags on every frame from now on, each way.
    fn authenticated(&mut self, keys: SessionKeys, side: Prover) {
        let (seal, open) = match side {
            Prover::Source => (keys.control_s2d.clone(), keys.control_d2s.clone()),
            Prover::Destination => (keys.control_d2s.clone(), keys.control_s2d.clone()),
        };
        self.seal = Some(ControlTags::new(seal));
        self.open = Some(ControlTags::new(open));
        self.keys = Some(Arc::new(keys));
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

    /// Sends one message (tagged once authenticated).
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let to = Frames {
            seal: self.seal.as_mut(),
            transcript: &mut self.transcript,
            peer: &self.peer,
        };
        to.send(&mut self.stream, msg).await
    }

    /// Receives one message, waiting at most the connection's timeout.
    ///
    /// Cancel safe (as every receive here): dropped before a whole frame
    /// came (a timeout, another branch of a `select!`), the part read so far
    /// is kept and the next receive goes on from it.
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

    /// Receives one message, waiting as long as it takes (until the
    /// connection fails): for a side that awaits no answer but must hear
    /// the peer speak up (its `Abort`), in a `select!` beside its own work.
    pub async fn recv_unprompted(&mut self, what: &'static str) -> Result<Msg> {
        self.recv_inner(what).await
    }

    async fn recv_inner(&mut self, what: &'static str) -> Result<Msg> {
        let heard = self.transcript.received();
        read_msg(
            &mut self.stream,
            &mut self.partial,
            self.limit,
            what,
            &heard,
            &mut self.open,
        )
        .await
    }

    /// Splits the connection: a task reads messages into a channel (so a
    /// receive can sit in `select!` without losing half a frame), and the
    /// returned [`ConnWriter`] sends. The reader task ends when the
    /// connection fails or ends, when the receiver is dropped, or when the
    /// writer is dropped (it holds the task's abort handle): a silent peer
    /// cannot keep the socket open past the session.
    pub fn split(self) -> (ConnWriter, tokio::sync::mpsc::Receiver<Result<Msg>>) {
        let (read, write) = tokio::io::split(self.stream);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let limit = self.limit;
        let heard = self.transcript.received();
        let mut open = self.open;
        let mut partial = self.partial;
        let reader = tokio::spawn(async move {
            let mut read = read;
            loop {
                let r = tokio::select! {
                    r = read_msg(&mut read, &mut partial, limit, "a control message", &heard, &mut open) => r,
                    () = tx.closed() => return,
                };
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
                seal: self.seal,
                _reader: AbortOnDrop(reader.abort_handle()),
            },
            rx,
        )
    }

    /// Best-effort abort notice to the peer (errors ignored: the peer may be gone).
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(ABORT_WAIT, self.send(&abort(reason))).await;
    }

    /// The channel binding of this connection (see
    /// [`Stream::channel_binding`]).
    fn binding(&self) -> Result<Vec<u8>> {
        self.stream
            .channel_binding()
            .map_err(|e| TransportError::Tls(format!("channel binding: {e}")))
    }

    /// The transcripts as the source (`side`) or the destination sees them,
    /// put the source's way round.
    fn transcripts(&self, side: Prover) -> ([u8; 32], [u8; 32]) {
        let t = self.transcript.hashes();
        match side {
            Prover::Source => (t.sent, t.received),
            Prover::Destination => (t.received, t.sent),
        }
    }

    /// The source's transcripts, in [`SourceHandshake`]'s terms.
    fn source_transcripts(&self) -> Transcripts {
        self.source_transcripts_from(Prover::Source)
    }

    /// The transcripts as `side` holds them, put the source's way round
    /// (the terms of both handshake machines).
    fn source_transcripts_from(&self, side: Prover) -> Transcripts {
        let (s2d, d2s) = self.transcripts(side);
        Transcripts { s2d, d2s }
    }

    /// Drives the source's handshake ([`ferry_proto::session`]): sends the
    /// hello, hands the destination's answers to the state machine and
    /// sends what it returns, until the destination has proven itself.
    async fn run_source(&mut self, hs: &mut SourceHandshake, hello: Msg) -> Result<Established> {
        self.send(&hello).await?;
        let reply = self.recv("the destination's hello").await?;
        let auth = hs.on_reply(reply, self.source_transcripts())?;
        self.send(&auth).await?;
        let before = self.source_transcripts();
        let welcome = self.recv("the destination's welcome").await?;
        Ok(hs.on_welcome(welcome, before)?)
    }

    /// Source side of the handshake: hello, then the source's proof, then
    /// the destination's, checked before anything else is sent. Returns the
    /// protocol version chosen by the destination.
    pub async fn client_handshake(&mut self, key: &AuthKey) -> Result<u16> {
        let binding = self.binding()?;
        let (mut hs, hello) = SourceHandshake::new(
            Role::Control,
            Credential::Psk(key.bytes().to_vec()),
            binding,
            auth::nonce(),
        );
        let done = match self.run_source(&mut hs, hello).await {
            Err(TransportError::AuthFailed(why)) => {
                self.abort("authentication failed: the destination's proof does not match our key")
                    .await;
                return Err(TransportError::AuthFailed(why));
            }
            r => r?,
        };
        let keys = done.keys.ok_or(TransportError::AuthFailed(
            "no session keys after the control handshake",
        ))?;
        self.authenticated(keys, Prover::Source);
        Ok(done.version)
    }

    /// Destination side of the handshake after the hello was read: drives
    /// [`DestHandshake`] (sends its nonce, nothing derived from the key;
    /// checks the source's proof, and only then proves itself).
    pub async fn server_authenticate(
        &mut self,
        key: &AuthKey,
        nonce_s: [u8; 32],
        version: u16,
    ) -> Result<()> {
        let mut hs = self.challenge(Role::Control, nonce_s, version).await?;
        let credential = Credential::Psk(key.bytes().to_vec());
        let done = self.welcome(&mut hs, &credential).await?;
        let keys = done.keys.ok_or(TransportError::AuthFailed(
            "no session keys after the control handshake",
        ))?;
        self.authenticated(keys, Prover::Destination);
        Ok(())
    }

    /// Sends the destination's `HelloReply` and reads the source's proof
    /// into a new [`DestHandshake`].
    async fn challenge(
        &mut self,
        role: Role,
        nonce_s: [u8; 32],
        version: u16,
    ) -> Result<DestHandshake> {
        let binding = self.binding()?;
        let (mut hs, reply) = DestHandshake::new(role, binding, nonce_s, version, auth::nonce());
        self.send(&reply).await?;
        let before = self.source_transcripts_from(Prover::Destination);
        let what = match role {
            Role::Control => "the source's authentication",
            Role::Data => "the data channel's proof",
        };
        let auth = self.recv(what).await?;
        hs.on_auth(auth, before)?;
        Ok(hs)
    }

    /// Sends what [`DestHandshake::welcome`] decides: its `Welcome`, or its
    /// `Reject` and the error.
    async fn welcome(
        &mut self,
        hs: &mut DestHandshake,
        credential: &Credential,
    ) -> Result<Established> {
        match hs.welcome(
            credential,
            self.source_transcripts_from(Prover::Destination),
        ) {
            Ok((welcome, done)) => {
                self.send(&welcome).await?;
                Ok(done)
            }
            Err(refusal) => {
                let _ = self.send(&refusal.reject()).await;
                Err(refusal.error.into())
            }
        }
    }

    /// Destination side of a data channel after its hello was read: sends
    /// its nonce and reads the source's proof, to be matched against the
    /// `data_channel` keys of the sessions that take channels
    /// ([`DataClaim::belongs_to`]), then answered with [`Conn::admit_data`]
    /// or a rejection.
    pub async fn data_challenge(&mut self, version: u16) -> Result<DataClaim> {
        // The data channel's hello nonce is not used: it derives nothing.
        let hs = self.challenge(Role::Data, [0; 32], version).await?;
        Ok(DataClaim { hs })
    }

    /// Admits a data channel whose claim matched `key`: sends the
    /// destination's proof of the same session.
    pub async fn admit_data(&mut self, claim: &DataClaim, key: &MacKey) -> Result<()> {
        let mut hs = claim.hs.clone();
        self.welcome(&mut hs, &Credential::Session(key.clone()))
            .await
            .map(|_| ())
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

/// A data channel's proof, read by [`Conn::data_challenge`]: which
/// session it belongs to is found by trying the `data_channel` keys of the
/// sessions that take channels.
#[derive(Debug, Clone)]
pub struct DataClaim {
    hs: DestHandshake,
}

impl DataClaim {
    /// True if the channel proved it belongs to the session of `key` (its
    /// `data_channel` key); constant time.
    pub fn belongs_to(&self, key: &MacKey) -> bool {
        self.hs.proves(&Credential::Session(key.clone()))
    }
}

/// Source side of a data channel on a connected stream (TLS or not): hello,
/// the proof that it belongs to the session of `keys`, and the
/// destination's proof of the same session. No token crosses the network.
/// Returns the stream, ready for data frames.
pub async fn open_data_channel(
    stream: Stream,
    keys: &SessionKeys,
    timeout: Duration,
) -> Result<Stream> {
    let mut c = Conn::new(stream, timeout);
    let binding = c.binding()?;
    let (mut hs, hello) = SourceHandshake::new(
        Role::Data,
        Credential::Session(keys.data_channel.clone()),
        binding,
        auth::nonce(),
    );
    c.run_source(&mut hs, hello).await?;
    Ok(c.into_stream())
}

/// A control frame as far as it has been read: what a dropped receive had
/// read, for the next one to go on from.
#[derive(Debug, Default)]
struct PartialFrame {
    buf: Vec<u8>,
    filled: usize,
}

impl PartialFrame {
    /// Reads until the frame holds `len` bytes. Cancel safe: each read is
    /// counted as soon as it returns. `Ok(false)`: the connection ended
    /// first.
    async fn fill<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        read: &mut R,
        len: usize,
    ) -> std::io::Result<bool> {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        while self.filled < len {
            let n = read.read(&mut self.buf[self.filled..len]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.filled += n;
        }
        Ok(true)
    }

    /// The whole frame, and an empty one for the next.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut frame = std::mem::take(&mut self.buf);
        frame.truncate(len);
        self.filled = 0;
        frame
    }
}

/// Reads one framed message; an `Abort` from the peer becomes
/// [`TransportError::PeerAborted`]. With `open` (after authentication) the
/// frame must carry a tag that verifies, checked before the body is
/// decoded; before it, a tagged frame is malformed. Cancel safe: what was
/// read of a frame stays in `partial`.
async fn read_msg<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    partial: &mut PartialFrame,
    limit: u32,
    what: &'static str,
    heard: &Mutex<Sha256>,
    open: &mut Option<ControlTags>,
) -> Result<Msg> {
    const HEAD: usize = 16;
    let whole = partial
        .fill(read, HEAD)
        .await
        .map_err(|e| TransportError::io(what, "control", e))?;
    if !whole {
        return Err(TransportError::io(
            what,
            "control",
            std::io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    let head: [u8; HEAD] = partial.buf[..HEAD].try_into().expect("16 bytes");
    let h = Msg::decode_head(&head, limit)?;
    match (open.as_ref(), h.tagged) {
        (Some(o), false) => {
            return Err(TransportError::Unauthenticated {
                seq: o.seq(),
                detail: "it carries no tag (every control message after authentication must)",
            })
        }
        (None, true) => {
            return Err(TransportError::Wire(WireError::Malformed {
                what: "control message",
                detail: "a tagged frame before authentication".into(),
            }))
        }
        _ => {}
    }
    let len = HEAD + h.rest_len();
    let whole = partial
        .fill(read, len)
        .await
        .map_err(|e| TransportError::io(what, "control", e))?;
    if !whole {
        return Err(TransportError::Wire(WireError::Malformed {
            what: "control message",
            detail: format!(
                "truncated: header announced {} bytes, connection closed before them",
                h.len
            ),
        }));
    }
    let frame = partial.take(len);
    let rest = &frame[HEAD..];
    let (body, tag) = rest.split_at(h.len as usize);
    if let Some(o) = open.as_mut() {
        let tag: &[u8; TAG_LEN] = tag.try_into().expect("tagged frames end in a tag");
        o.open(&head, body, tag)
            .map_err(|b| TransportError::Unauthenticated {
                seq: b.seq,
                detail: "its tag does not match (changed, dropped, replayed or reordered on the way, or not sent by the peer)",
            })?;
    }
    {
        let mut t = heard.lock().unwrap_or_else(|e| e.into_inner());
        t.update(head);
        t.update(rest);
    }
    let msg = Msg::decode_body(body, h.crc)?;
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

/// How long a best-effort `Abort` may take to leave.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// The `Abort` naming `reason`.
fn abort(reason: &str) -> Msg {
    Msg::Abort {
        reason: reason.to_string(),
    }
}

/// The sending side of a control connection, whole ([`Conn`]) or split
/// off ([`ConnWriter`]): every frame is sealed once authenticated, hashed
/// into the transcript as it leaves, and an IO error names the message and
/// the peer.
struct Frames<'a> {
    seal: Option<&'a mut ControlTags>,
    transcript: &'a mut Transcript,
    peer: &'a str,
}

impl Frames<'_> {
    async fn send<W: tokio::io::AsyncWrite + Unpin>(self, w: &mut W, msg: &Msg) -> Result<()> {
        let bytes = msg.encode_frame(self.seal);
        self.transcript.sent(&bytes);
        write_flush(w, &bytes).await.map_err(|e| {
            TransportError::io(
                format!("sending {} to {}", msg.name(), self.peer),
                "control",
                e,
            )
        })
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sending half of a split [`Conn`]. Dropping it stops the reader task.
#[derive(Debug)]
pub struct ConnWriter {
    write: WriteHalf<Stream>,
    peer: String,
    transcript: Transcript,
    keys: Option<Arc<SessionKeys>>,
    seal: Option<ControlTags>,
    _reader: AbortOnDrop,
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

    /// Sends one message (tagged once authenticated).
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let to = Frames {
            seal: self.seal.as_mut(),
            transcript: &mut self.transcript,
            peer: &self.peer,
        };
        to.send(&mut self.write, msg).await
    }

    /// Best-effort abort notice.
    pub async fn abort(&mut self, reason: &str) {
        let _ = tokio::time::timeout(ABORT_WAIT, self.send(&abort(reason))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{PROTOCOL_MAX, PROTOCOL_MIN};
    use tokio::net::{TcpListener, TcpStream};

    fn t() -> Duration {
        Duration::from_secs(5)
    }

    /// A connected pair of plain sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The destination's side of a control handshake on `s`.
    async fn serve(s: TcpStream, key: AuthKey) -> Result<Conn> {
        let mut c = Conn::new(s, t());
        let (version, nonce) = match c.recv("hello").await? {
            Msg::Hello {
                max_version, nonce, ..
            } => (max_version, nonce),
            m => panic!("{m:?}"),
        };
        c.server_authenticate(&key, nonce, version).await?;
        Ok(c)
    }

    #[tokio::test]
    async fn a_receive_dropped_mid_frame_loses_nothing() {
        let (a, mut b) = pair().await;
        let mut c = Conn::new(a, t());
        let first = Msg::Ping { seq: 7 }.encode_frame(None);
        let second = Msg::Pong { seq: 8 }.encode_frame(None);
        // Half a header, then the receive gives up (its timeout, or the
        // other branch of a select!).
        b.write_all(&first[..5]).await.unwrap();
        let e = c
            .recv_within("a ping", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
        // Past the header, into the body: dropped again.
        b.write_all(&first[5..first.len() - 1]).await.unwrap();
        {
            let recv = c.recv_unprompted("a ping");
            tokio::pin!(recv);
            let dropped = tokio::time::timeout(Duration::from_millis(50), &mut recv).await;
            assert!(dropped.is_err(), "the frame is not whole yet");
        }
        // The last byte and the next frame: both come out whole, in order.
        b.write_all(&first[first.len() - 1..]).await.unwrap();
        b.write_all(&second).await.unwrap();
        assert!(matches!(
            c.recv("a ping").await.unwrap(),
            Msg::Ping { seq: 7 }
        ));
        assert!(matches!(
            c.recv("a pong").await.unwrap(),
            Msg::Pong { seq: 8 }
        ));
        // Everything received is in the transcript, once.
        let mut want = Sha256::new();
        want.update(&first);
        want.update(&second);
        assert_eq!(c.transcript().received, <[u8; 32]>::from(want.finalize()));
    }

    #[tokio::test]
    async fn both_sides_derive_the_same_session_keys_and_mirror_transcripts() {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, key.clone()));
        let mut c = Conn::new(a, t());
        assert!(c.session_keys().is_none(), "no keys before authentication");
        c.client_handshake(&key).await.unwrap();
        let (mut w, mut rx) = server.await.unwrap().unwrap().split();
        c.send(&Msg::RoundDone { round: 3, pages: 1 })
            .await
            .unwrap();
        w.send(&Msg::Fenced { channels: vec![] }).await.unwrap();
        let got = rx.recv().await.unwrap().unwrap();
        assert!(matches!(got, Msg::RoundDone { round: 3, .. }));
        assert!(matches!(
            c.recv("fenced").await.unwrap(),
            Msg::Fenced { .. }
        ));
        let (dest_keys, dest_t) = (w.session_keys().unwrap(), w.transcript());
        let src_keys = c.session_keys().unwrap();
        let m = src_keys.commit.mac(&[b"x"]);
        assert!(dest_keys.commit.verify(&[b"x"], &m), "same commit key");
        let src_t = c.transcript();
        assert_eq!(src_t.sent, dest_t.received);
        assert_eq!(src_t.received, dest_t.sent);
        assert_ne!(src_t.sent, src_t.received);
    }

    #[tokio::test]
    async fn a_stranger_gets_a_nonce_and_a_refusal_and_nothing_from_the_key() {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, key));
        let mut c = Conn::new(a, t());
        c.send(&Msg::Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            role: Role::Control,
            nonce: [0; 32],
        })
        .await
        .unwrap();
        // The reply: a version and a nonce, the same shape whatever the key.
        let reply = c.recv("reply").await.unwrap();
        assert!(matches!(reply, Msg::HelloReply { .. }), "{reply:?}");
        c.send(&Msg::Auth { proof: [9; 32] }).await.unwrap();
        match c.recv("answer").await.unwrap() {
            Msg::Reject { reason, message } => {
                assert_eq!(reason, RejectReason::Auth);
                assert!(message.contains("keys differ"), "{message}");
            }
            m => panic!("expected Reject, got {m:?}"),
        }
        let e = server.await.unwrap().unwrap_err();
        assert!(matches!(e, TransportError::AuthFailed(_)), "{e}");
        // With another key the source is refused the same way.
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, AuthKey::new(vec![8; 32]).unwrap()));
        let e = Conn::new(a, t())
            .client_handshake(&AuthKey::new(vec![7; 32]).unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Rejected {
                    reason: RejectReason::Auth,
                    ..
                }
            ),
            "{e}"
        );
        assert!(server.await.unwrap().is_err());
    }

    /// What the relay does with the source's `n`-th frame (from 0).
    type Edit = fn(&mut Vec<u8>) -> bool;

    /// Forwards frames from the source to the destination, letting `edit`
    /// change (or, returning false, drop) the `n`-th; the other way bytes
    /// are copied as they come.
    async fn relay(src: TcpStream, dst: TcpStream, n: usize, edit: Edit) {
        let (mut sr, mut sw) = src.into_split();
        let (mut dr, mut dw) = dst.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut dr, &mut sw).await;
        });
        tokio::spawn(async move {
            for i in 0.. {
                let mut head = [0u8; 16];
                if sr.read_exact(&mut head).await.is_err() {
                    return;
                }
                let h = Msg::decode_head(&head, MAX_CONTROL_BODY).unwrap();
                let mut frame = head.to_vec();
                frame.resize(16 + h.rest_len(), 0);
                if sr.read_exact(&mut frame[16..]).await.is_err() {
                    return;
                }
                if (i != n || edit(&mut frame)) && dw.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
    }

    /// A handshake and two round-done messages through a relay that applies
    /// `edit` to the source's `n`-th frame; what each side got.
    async fn through_relay(n: usize, edit: Edit) -> (Result<u16>, Result<Vec<Msg>>) {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let (src, relay_src) = pair().await;
        let (relay_dst, dst) = pair().await;
        relay(relay_src, relay_dst, n, edit).await;
        let server = tokio::spawn(async move {
            let mut c = serve(dst, AuthKey::new(vec![7; 32]).unwrap()).await?;
            let mut got = Vec::new();
            for _ in 0..2 {
                got.push(c.recv("a round").await?);
            }
            Ok(got)
        });
        let mut c = Conn::new(src, t());
        let hs = c.client_handshake(&key).await;
        if hs.is_ok() {
            for round in [3, 4] {
                let _ = c.send(&Msg::RoundDone { round, pages: 1 }).await;
            }
        }
        (hs, server.await.unwrap())
    }

    /// Re-encodes a frame's message after `change`, fixing its CRC (and
    /// keeping its tag, which no longer matches).
    fn rewrite(frame: &mut Vec<u8>, change: fn(&mut Msg)) {
        let head: [u8; 16] = frame[..16].try_into().unwrap();
        let h = Msg::decode_head(&head, MAX_CONTROL_BODY).unwrap();
        let mut m = Msg::decode_body(&frame[16..16 + h.len as usize], h.crc).unwrap();
        change(&mut m);
        let tag = frame[16 + h.len as usize..].to_vec();
        let mut out = m.encode();
        if h.tagged {
            out[12] = 1;
        }
        out.extend_from_slice(&tag);
        *frame = out;
    }

    #[tokio::test]
    async fn an_unchanged_relay_passes_and_every_change_after_the_handshake_is_refused() {
        let (hs, got) = through_relay(usize::MAX, |_| true).await;
        hs.unwrap();
        assert_eq!(got.unwrap().len(), 2);
        // A message rewritten with its CRC fixed (frames: Hello, Auth, then
        // the rounds).
        let (hs, got) = through_relay(2, |f| {
            rewrite(f, |m| {
                if let Msg::RoundDone { round, .. } = m {
                    *round = 99;
                }
            });
            true
        })
        .await;
        hs.unwrap();
        let e = got.unwrap_err().to_string();
        assert!(
            e.contains(
                "control message 0 from the peer failed authentication: its tag does not match"
            ),
            "{e}"
        );
        // A message dropped: the next one fails (its sequence number).
        let (_, got) = through_relay(2, |_| false).await;
        assert!(
            matches!(got, Err(TransportError::Unauthenticated { seq: 0, .. })),
            "{got:?}"
        );
        // The tag stripped.
        let (_, got) = through_relay(2, |f| {
            let len = f.len() - TAG_LEN;
            f.truncate(len);
            f[12] = 0;
            true
        })
        .await;
        let e = got.unwrap_err().to_string();
        assert!(e.contains("it carries no tag"), "{e}");
    }

    #[tokio::test]
    async fn a_changed_hello_fails_both_proofs() {
        // The version range or nonce of the hello changed on the way: the
        // source's proof covers what it sent, the destination checks it
        // against what it received.
        let (hs, got) = through_relay(0, |f| {
            rewrite(f, |m| {
                if let Msg::Hello { nonce, .. } = m {
                    nonce[0] ^= 1;
                }
            });
            true
        })
        .await;
        assert!(
            matches!(
                hs,
                Err(TransportError::Rejected {
                    reason: RejectReason::Auth,
                    ..
                })
            ),
            "{hs:?}"
        );
        assert!(matches!(got, Err(TransportError::AuthFailed(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_relay_between_two_tls_sessions_fails_the_proofs() {
        // Someone in between terminates TLS towards both sides (the
        // pre-shared-key mode's TLS authenticates nobody) and copies the
        // decrypted bytes across unchanged: each side's proof is bound to
        // its own session, so the destination refuses the source.
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let tls = crate::tls::TlsConfig::from_psk(&key).unwrap();
        let (src, relay_in) = pair().await;
        let (relay_out, dst) = pair().await;
        let (t1, t2) = (tls.clone(), tls.clone());
        tokio::spawn(async move {
            let (inner, outer) = tokio::join!(t1.accept(relay_in, t()), t2.connect(relay_out, t()));
            let (mut a, mut b) = (inner.unwrap(), outer.unwrap());
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
        let t3 = tls.clone();
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let s = t3.accept(dst, t()).await.unwrap();
            let mut c = Conn::new(s, t());
            let Msg::Hello {
                max_version, nonce, ..
            } = c.recv("hello").await.unwrap()
            else {
                panic!()
            };
            c.server_authenticate(&k2, nonce, max_version).await
        });
        let s = tls.connect(src, t()).await.unwrap();
        let hs = Conn::new(s, t()).client_handshake(&key).await;
        assert!(
            matches!(
                hs,
                Err(TransportError::Rejected {
                    reason: RejectReason::Auth,
                    ..
                })
            ),
            "{hs:?}"
        );
        assert!(matches!(
            server.await.unwrap(),
            Err(TransportError::AuthFailed(_))
        ));
    }

    #[tokio::test]
    async fn data_channels_prove_their_session_and_nothing_else_admits_them() {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, key.clone()));
        let mut c = Conn::new(a, t());
        c.client_handshake(&key).await.unwrap();
        let dest = server.await.unwrap().unwrap();
        let (ours, theirs) = (c.session_keys().unwrap(), dest.session_keys().unwrap());
        // Another session of the same key: other keys.
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, key.clone()));
        let mut c2 = Conn::new(a, t());
        c2.client_handshake(&key).await.unwrap();
        let other = server.await.unwrap().unwrap().session_keys().unwrap();
        for (src_keys, admits) in [(ours.clone(), true), (other.clone(), false)] {
            let (a, b) = pair().await;
            let theirs = theirs.clone();
            let dst = tokio::spawn(async move {
                let mut d = Conn::new(b, t());
                let Msg::Hello { role, .. } = d.recv("hello").await.unwrap() else {
                    panic!()
                };
                assert_eq!(role, Role::Data);
                let claim = d.data_challenge(PROTOCOL_MAX).await.unwrap();
                if claim.belongs_to(&theirs.data_channel) {
                    d.admit_data(&claim, &theirs.data_channel).await.unwrap();
                    true
                } else {
                    let _ = d.reject(RejectReason::Token, "no session".into()).await;
                    false
                }
            });
            let r = open_data_channel(a.into(), &src_keys, t()).await;
            assert_eq!(dst.await.unwrap(), admits);
            assert_eq!(r.is_ok(), admits, "{r:?}");
        }
    }

    #[tokio::test]
    async fn dropping_the_writer_stops_the_reader_and_frees_the_socket() {
        let key = AuthKey::new(vec![7; 32]).unwrap();
        let (a, b) = pair().await;
        let server = tokio::spawn(serve(b, key.clone()));
        let mut c = Conn::new(a, t());
        c.client_handshake(&key).await.unwrap();
        let (w, rx) = server.await.unwrap().unwrap().split();
        // The source stays silent; the destination ends its session while
        // keeping the receiver (as a session that is still winding down).
        drop(w);
        let mut s = c.into_stream();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the destination closed its socket")
            .unwrap_or(0);
        assert_eq!(n, 0, "end of stream: the reader task let go of the socket");
        drop(rx);
    }
}
