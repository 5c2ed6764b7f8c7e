//! A connection to the peer: plain TCP, or TLS 1.3 over TCP (the default;
//! its settings are in `tls`). Control connections and data channels are
//! both a [`Stream`]; the data path keeps its zero-copy `writev`/`readv` on
//! the plain variant and reads/writes guest memory through the TLS session
//! on the other. The identity [`Mode`] a TLS session was opened with
//! travels in its ALPN protocol.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// ALPN protocol of the pre-shared-key identity.
pub const ALPN_PSK: &[u8] = b"ferry-psk/1";
/// ALPN protocol of the certificate identity.
pub const ALPN_CERTIFICATES: &[u8] = b"ferry-cert/1";
/// How peers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A certificate derived from the pre-shared key.
    Psk,
    /// Certificates signed by the CA in `--tls-dir`.
    Certificates,
}

impl Mode {
    pub(crate) fn alpn(self) -> &'static [u8] {
        match self {
            Mode::Psk => ALPN_PSK,
            Mode::Certificates => ALPN_CERTIFICATES,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Psk => "pre-shared-key identity",
            Mode::Certificates => "certificates (--tls-dir)",
        })
    }
}

/// Keepalive and `TCP_USER_TIMEOUT` on a socket, so that a peer that
/// vanishes without a FIN or RST (host down, link cut) fails the socket
/// within about `timeout` even when nothing is being sent: first probe
/// after a third of it, then one every sixth, three unanswered probes or
/// data unacknowledged for `timeout` end it. Best effort (a socket that
/// refuses an option is logged and used as it is).
pub fn keep_alive(tcp: &TcpStream, timeout: std::time::Duration) {
    use std::os::fd::AsFd;
    let fd = tcp.as_fd();
    let r = ferry_ffi::net::set_keepalive(fd, timeout / 3, timeout / 6, 3)
        .and_then(|()| ferry_ffi::net::set_user_timeout(fd, timeout));
    if let Err(e) = r {
        tracing::debug!("keepalive / TCP_USER_TIMEOUT not set: {e}");
    }
}

/// A TLS session over TCP, client or server side.
pub type TlsStream = tokio_rustls::TlsStream<TlsTcp>;

/// How many bytes [`TlsTcp`] reads from the socket at once.
pub const TLS_READ_BUFFER: usize = 64 << 10;

/// The TCP socket under a TLS session, with a read buffer.
///
/// rustls asks its transport for at most 4 KiB more than it holds at a
/// time, so a TLS session reading straight from a socket makes a `recv`
/// for every 4 KiB that arrives: 262,144 system calls per GiB on a data
/// channel. Reading up to [`TLS_READ_BUFFER`] bytes per call and serving
/// rustls from memory costs one copy of the ciphertext out of a buffer
/// that is in cache, and removes 15 of every 16 calls
/// (docs/performance.md). Reads larger than the buffer go straight to
/// the socket; writes are passed through unchanged.
#[derive(Debug)]
pub struct TlsTcp {
    /// `None` only while the session moves to another runtime
    /// ([`TlsTcp::take_tcp`], [`TlsTcp::put_tcp`]), when nothing polls it.
    tcp: Option<TcpStream>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl TlsTcp {
    /// Wraps a connected socket (the buffer is allocated on the first read).
    pub fn new(tcp: TcpStream) -> Self {
        TlsTcp {
            tcp: Some(tcp),
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        self.tcp
            .as_ref()
            .expect("a TLS session's socket is only away while the session moves, unused")
    }

    /// Takes the socket out, to move the session (its state and buffered
    /// bytes stay here) to another runtime; [`TlsTcp::put_tcp`] puts the
    /// socket, registered there, back. Until then the session must not be
    /// used (its reads and writes fail).
    pub(crate) fn take_tcp(&mut self) -> Option<TcpStream> {
        self.tcp.take()
    }

    /// Puts the socket back (see [`TlsTcp::take_tcp`]).
    pub(crate) fn put_tcp(&mut self, tcp: TcpStream) {
        self.tcp = Some(tcp);
    }

    /// The socket, or the error of a session used while its socket is away
    /// ([`TlsTcp::take_tcp`]). Over the field alone, so that a read can
    /// hold the socket and the read buffer at once.
    fn sock(tcp: &mut Option<TcpStream>) -> io::Result<&mut TcpStream> {
        tcp.as_mut()
            .ok_or_else(|| io::Error::other("the TLS session's socket is moving to another thread"))
    }
}

impl AsyncRead for TlsTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.start == me.end {
            if out.remaining() >= TLS_READ_BUFFER {
                return Pin::new(Self::sock(&mut me.tcp)?).poll_read(cx, out);
            }
            if me.buf.is_empty() {
                me.buf = vec![0; TLS_READ_BUFFER];
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            match Pin::new(Self::sock(&mut me.tcp)?).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    me.start = 0;
                    me.end = rb.filled().len();
                }
                other => return other,
            }
            if me.end == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let n = (me.end - me.start).min(out.remaining());
        out.put_slice(&me.buf[me.start..me.start + n]);
        me.start += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(Self::sock(&mut self.get_mut().tcp)?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(Self::sock(&mut self.get_mut().tcp)?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(|t| t.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(Self::sock(&mut self.get_mut().tcp)?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(Self::sock(&mut self.get_mut().tcp)?).poll_shutdown(cx)
    }
}

/// A connection, encrypted or not.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS 1.3 over TCP.
    Tls(Box<TlsStream>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
    }
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.get_ref().0.tcp(),
        }
    }

    /// True for a TLS session.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// The negotiated TLS cipher suite, for messages and summaries.
    pub fn cipher_suite(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite())),
        }
    }

    /// The channel binding of the connection: 32 bytes exported from the
    /// TLS session (label [`ferry_proto::handshake::BINDING_LABEL`]), the
    /// same at both ends of one session and unlike any other session's;
    /// empty on a plain connection. Handshake proofs cover it, so a proof
    /// made in one TLS session is worthless in another (a relay between
    /// two sessions fails).
    pub fn channel_binding(&self) -> io::Result<Vec<u8>> {
        use ferry_proto::handshake::{BINDING_LABEL, BINDING_LEN};
        let out = vec![0u8; BINDING_LEN];
        let r = match self {
            Stream::Plain(_) => return Ok(Vec::new()),
            Stream::Tls(t) => match t.as_ref() {
                tokio_rustls::TlsStream::Client(c) => {
                    c.get_ref()
                        .1
                        .export_keying_material(out, BINDING_LABEL, None)
                }
                tokio_rustls::TlsStream::Server(s) => {
                    s.get_ref()
                        .1
                        .export_keying_material(out, BINDING_LABEL, None)
                }
            },
        };
        r.map_err(|e| io::Error::other(format!("TLS exporter: {e}")))
    }

    /// The TLS session in words, for summaries and logs: "TLS 1.3
    /// SUITE, MODE" (the identity mode from the negotiated ALPN).
    pub fn encryption(&self) -> Option<String> {
        let Stream::Tls(t) = self else {
            return None;
        };
        let mode = match t.get_ref().1.alpn_protocol() {
            Some(p) if p == ALPN_CERTIFICATES => Mode::Certificates,
            _ => Mode::Psk,
        };
        Some(format!(
            "TLS 1.3 {}, {mode}",
            self.cipher_suite().unwrap_or_default()
        ))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn buffered_socket_delivers_every_byte_in_order_to_small_and_large_reads() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let data: Vec<u8> = (0..3 * TLS_READ_BUFFER + 12345)
            .map(|i| (i * 31 + i / 7) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut a = TlsTcp::new(a);
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut r = TlsTcp::new(b);
        let mut got = Vec::new();
        // rustls-sized reads, then one larger than the buffer, then the rest.
        let mut small = [0u8; 4096];
        while got.len() < TLS_READ_BUFFER + 100 {
            let n = r
                .read(&mut small[..4096.min(TLS_READ_BUFFER + 100 - got.len())])
                .await
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        let mut big = vec![0u8; 2 * TLS_READ_BUFFER];
        let n = r.read(&mut big).await.unwrap();
        got.extend_from_slice(&big[..n]);
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        // End of stream stays end of stream.
        assert_eq!(r.read(&mut small).await.unwrap(), 0);
    }
}
