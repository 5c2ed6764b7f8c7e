//! Encryption (the default; `--plaintext` turns it off): TLS 1.3 with
//! rustls (ring provider) on the control connection and on every TCP data
//! channel.
//!
//! # Identity, two modes
//! * **Certificates** ([`TlsConfig::from_dir`], `--tls-dir DIR`): `DIR/ca.pem`
//!   (the CA that signs every migration host's certificate), `DIR/cert.pem`
//!   (this host's certificate, leaf first, then any intermediates) and
//!   `DIR/key.pem` (its private key, PKCS#8, SEC1 or PKCS#1). Both sides
//!   present their certificate (mutual TLS) and accept a peer whose
//!   certificate chains to `ca.pem`. Host names are not checked: sources
//!   reach destinations by addresses (one per NIC with multichannel), so a
//!   CA dedicated to migration is the trust boundary. `ferry gen-certs`
//!   writes a test CA and certificates (the `ferry-cli` crate).
//! * **Pre-shared key** ([`TlsConfig::from_psk`], no `--tls-dir`): the
//!   destination presents a fresh self-signed Ed25519 certificate made at
//!   start (nothing in it depends on the key), the source accepts any
//!   single certificate whose key signs the handshake, and neither side
//!   authenticates the other in TLS. Who the peer is, is proven right after,
//!   inside the session, by the key's challenge-response
//!   ([`ferry_proto::handshake`]), whose proofs cover the session's
//!   exporter value ([`crate::stream::Stream::channel_binding`]): a relay
//!   that terminates TLS towards both sides holds two sessions with two
//!   exporter values, and the proofs fail. Why not a certificate derived
//!   from the key (as before protocol 2): any stranger who completes a TLS
//!   handshake with the destination would get a value computed from the
//!   key, to test guesses against offline. (rustls has no external-PSK
//!   support, and a TLS PSK binder would give the same offline test.)
//!
//! The mode travels in ALPN ([`ALPN_PSK`], [`ALPN_CERTIFICATES`]); a
//! destination serves exactly one mode (certificates with `--tls-dir`, else
//! the key's), and answers the other with TLS's `no_application_protocol`
//! alert, which both sides turn into a message naming the mismatch.
//!
//! TLS 1.2, session tickets and resumption are off: every connection makes a
//! full TLS 1.3 handshake. The key's challenge-response runs inside the
//! encrypted connection in both modes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::TcpStream;

use crate::auth::AuthKey;
use crate::error::{Result, TransportError};
pub use crate::stream::{Mode, ALPN_CERTIFICATES, ALPN_PSK};
use crate::stream::{Stream, TlsTcp};

/// Name the source asks for (not checked: see the module docs).
const SERVER_NAME: &str = "ferry.invalid";
/// File names inside `--tls-dir`.
pub const CA_FILE: &str = "ca.pem";
/// This host's certificate chain.
pub const CERT_FILE: &str = "cert.pem";
/// This host's private key.
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, written by `ferry gen-certs` for issuing more
/// certificates (`ferry gen-certs --ca`); never read by `send`/`listen`.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// First byte of a TLS handshake record: how a destination tells a TLS
/// client from a plaintext one on the same port.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// TLS settings of one host, for both directions.
#[derive(Clone)]
pub struct TlsConfig {
    mode: Mode,
    /// `--tls-dir`, for messages.
    dir: Option<PathBuf>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// ring's provider, AES-128-GCM first (the fastest of the three TLS 1.3
/// suites on CPUs with AES instructions; rustls follows the client's order).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn config_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what}: {e}"))
}

fn finish(
    mode: Mode,
    mut client: ClientConfig,
    mut server: ServerConfig,
) -> (ClientConfig, ServerConfig) {
    client.alpn_protocols = vec![mode.alpn().to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    client.enable_sni = false;
    server.alpn_protocols = vec![mode.alpn().to_vec()];
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    (client, server)
}

impl TlsConfig {
    /// The pre-shared-key mode: see the module docs. The key itself is
    /// proven inside the session (the control connection's handshake); `_key` is taken so that
    /// both modes are built from what the command line gives.
    pub fn from_psk(_key: &AuthKey) -> Result<Self> {
        let (cert, pkcs8) = ephemeral_identity()?;
        let p = provider();
        let peer = Arc::new(SessionPeer {
            algs: p.signature_verification_algorithms,
        });
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS client", e))?
            .dangerous()
            .with_custom_certificate_verifier(peer)
            .with_no_client_auth();
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS server", e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
            )
            .map_err(|e| config_err("TLS server identity", e))?;
        let (client, server) = finish(Mode::Psk, client, server);
        Ok(TlsConfig {
            mode: Mode::Psk,
            dir: None,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The certificate identity from `dir` ([`CA_FILE`], [`CERT_FILE`],
    /// [`KEY_FILE`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = |name: &str| dir.join(name);
        let read_certs = |name: &str| -> Result<Vec<CertificateDer<'static>>> {
            let path = file(name);
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| config_err(format!("--tls-dir: cannot read {}", path.display()), e))?;
            if certs.is_empty() {
                return Err(TransportError::Tls(format!(
                    "--tls-dir: {} holds no PEM certificate",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let ca = read_certs(CA_FILE)?;
        let chain = read_certs(CERT_FILE)?;
        let key_path = file(KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            config_err(
                format!(
                    "--tls-dir: cannot read a private key from {}",
                    key_path.display()
                ),
                e,
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                config_err(
                    format!(
                        "--tls-dir: {} is not a usable CA certificate",
                        file(CA_FILE).display()
                    ),
                    e,
                )
            })?;
        }
        let roots = Arc::new(roots);
        let p = provider();
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), p.clone())
                .build()
                .map_err(|e| config_err("TLS CA", e))?;
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, p.clone())
                .build()
                .map_err(|e| config_err("TLS CA", e))?;
        let identity = |e: rustls::Error| {
            config_err(
                format!(
                    "--tls-dir: {} and {} do not make a usable identity",
                    file(CERT_FILE).display(),
                    key_path.display()
                ),
                e,
            )
        };
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS client", e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyNameVerifier(server_verifier)))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(identity)?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS server", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(identity)?;
        let (client, server) = finish(Mode::Certificates, client, server);
        Ok(TlsConfig {
            mode: Mode::Certificates,
            dir: Some(dir.to_path_buf()),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The identity mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Source side: TLS handshake on a connected socket, within `timeout`.
    pub async fn connect(&self, tcp: TcpStream, timeout: Duration) -> Result<Stream> {
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let connector = tokio_rustls::TlsConnector::from(self.client.clone());
        match tokio::time::timeout(timeout, connector.connect(name, TlsTcp::new(tcp))).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
            Ok(Err(e)) => Err(TransportError::Tls(format!(
                "TLS handshake with the destination failed: {}",
                self.explain(&e, "destination")
            ))),
            Err(_) => Err(TransportError::Timeout {
                what: "the TLS handshake with the destination",
                after: timeout,
            }),
        }
    }

    /// Destination side: TLS handshake on an accepted socket, within `timeout`.
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Stream> {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        match tokio::time::timeout(timeout, acceptor.accept(TlsTcp::new(tcp))).await {
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s.into()))),
            Ok(Err(e)) => Err(TransportError::Tls(format!(
                "TLS handshake with the source failed: {}",
                self.explain(&e, "source")
            ))),
            Err(_) => Err(TransportError::Timeout {
                what: "the TLS handshake with the source",
                after: timeout,
            }),
        }
    }

    /// Why a handshake failed, in terms of the two sides' settings.
    fn explain(&self, e: &std::io::Error, peer: &str) -> String {
        let ours = match &self.dir {
            Some(d) => format!("{}", d.join(CA_FILE).display()),
            None => "the key in --auth-key-file".into(),
        };
        match rustls_error(e) {
            Some(rustls::Error::NoApplicationProtocol)
            | Some(rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)) => {
                format!(
                    "the {peer} does not use the same TLS identity mode: this host uses {}; start both ends with --tls-dir, or neither",
                    self.mode
                )
            }
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => format!("the {peer}'s certificate is not signed by our CA ({ours})"),
            Some(rustls::Error::InvalidCertificate(c)) => {
                format!("the {peer}'s certificate is not acceptable: {c:?}")
            }
            Some(rustls::Error::AlertReceived(a)) => format!(
                "the {peer} refused the handshake (TLS alert {a:?}): it does not trust our identity ({} from {ours}: a different CA)",
                self.mode
            ),
            Some(rustls::Error::InvalidMessage(_)) => format!(
                "the {peer} did not answer in TLS (it sent plaintext): it does not support encryption (a Ferry from before TLS; start both ends with --plaintext on a trusted network), or it refused the connection before TLS (e.g. an address outside its --migration-network)"
            ),
            Some(other) => other.to_string(),
            None if e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                format!("the {peer} closed the connection during the TLS handshake: it does not speak TLS (a Ferry from before TLS?) or refused us")
            }
            None => e.to_string(),
        }
    }
}

pub use crate::error::{describe_io, rustls_error};

/// Source side: a connected socket as a [`Stream`], TLS when `tls` is
/// given (the default) and plain otherwise (`--plaintext`): the one place
/// a source picks between the two.
pub async fn secure(tcp: TcpStream, tls: Option<&TlsConfig>, timeout: Duration) -> Result<Stream> {
    match tls {
        Some(t) => t.connect(tcp, timeout).await,
        None => Ok(tcp.into()),
    }
}

/// A fresh self-signed Ed25519 certificate and its key (PKCS#8), for the
/// destination side of the pre-shared-key mode: nothing in it depends on
/// the key, so a stranger who completes a TLS handshake learns nothing
/// about the key from it.
fn ephemeral_identity() -> Result<(CertificateDer<'static>, Vec<u8>)> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| config_err("generating the TLS session identity", e))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry pre-shared-key session");
    let cert = params
        .self_signed(&kp)
        .map_err(|e| config_err("generating the TLS session identity", e))?;
    Ok((cert.der().clone(), kp.serialize_der()))
}

/// The source's verifier in the pre-shared-key mode: any single
/// certificate, whose key must sign the TLS 1.3 handshake. Who the peer is
/// is proven inside the session, with the key, bound to it (see the module
/// docs).
#[derive(Debug)]
struct SessionPeer {
    algs: WebPkiSupportedAlgorithms,
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

impl ServerCertVerifier for SessionPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if intermediates.is_empty() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(std::io::Error::other(
                    "a pre-shared-key session certificate comes alone",
                ))),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// rustls' WebPKI server verifier without the host-name check: the chain
/// to the CA, validity and key usage are checked as usual (the name is
/// checked last, so a name error means everything else passed).
#[derive(Debug)]
struct AnyNameVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Test support (this crate's tests, and `ferry gen-certs`'s in
/// ferry-cli through the `test-support` feature): a TLS handshake between
/// two settings over loopback, and a ping-pong through the result.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use super::*;

    /// Connects `client` to `server` over loopback: both ends' results.
    pub async fn handshake(
        client: &TlsConfig,
        server: &TlsConfig,
    ) -> (Result<Stream>, Result<Stream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let t = Duration::from_secs(5);
        let (c, s) = tokio::join!(client.connect(a, t), server.accept(b, t));
        (c, s)
    }

    /// Sends "ping" one way and "pong" back through a handshake's ends.
    pub async fn exchange(c: Result<Stream>, s: Result<Stream>) -> std::result::Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, mut s) = (c.map_err(|e| e.to_string())?, s.map_err(|e| e.to_string())?);
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(b"pong").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{exchange, handshake};
    use super::*;

    fn key(b: u8) -> AuthKey {
        AuthKey::new(vec![b; 32]).unwrap()
    }

    #[tokio::test]
    async fn psk_mode_sessions_carry_no_key_material_and_bind_each_session() {
        let a = TlsConfig::from_psk(&key(1)).unwrap();
        let (c, s) = handshake(&a, &a).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.cipher_suite().unwrap().contains("TLS13"));
        // Both ends of one session export the same binding...
        let (bc, bs) = (c.channel_binding().unwrap(), s.channel_binding().unwrap());
        assert_eq!(bc.len(), 32);
        assert_eq!(bc, bs);
        exchange(Ok(c), Ok(s)).await.unwrap();
        // ...and another session another one.
        let (c2, _s2) = handshake(&a, &a).await;
        assert_ne!(c2.unwrap().channel_binding().unwrap(), bc);
        // The TLS layer does not test the key (the proofs inside do): a
        // peer with another key completes it, and the destination's
        // certificate is fresh per configuration, not derived from the key.
        let b = TlsConfig::from_psk(&key(2)).unwrap();
        let (c, s) = handshake(&b, &a).await;
        exchange(c, s).await.unwrap();
        // The destination's certificate is not a function of the key: two
        // configurations from one key present different ones.
        let server_cert = |st: &Stream| match st {
            Stream::Tls(t) => t.get_ref().1.peer_certificates().unwrap()[0].clone(),
            Stream::Plain(_) => unreachable!(),
        };
        let a2 = TlsConfig::from_psk(&key(1)).unwrap();
        let (c1, _s1) = handshake(&a, &a).await;
        let (c2, _s2) = handshake(&a, &a2).await;
        assert_ne!(server_cert(&c1.unwrap()), server_cert(&c2.unwrap()));
        // A plain connection has no binding.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = Stream::Plain(TcpStream::connect(l.local_addr().unwrap()).await.unwrap());
        assert!(plain.channel_binding().unwrap().is_empty());
    }
}
