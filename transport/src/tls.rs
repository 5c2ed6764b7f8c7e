//! Encryption (the default; `--plaintext` turns it off): TLS 1.3 with rustls (ring provider) on the
//! control connection and on every TCP data channel.
//!
//! # Identity, two modes
//! * **Certificates** ([`TlsConfig::from_dir`], `--tls-dir DIR`): `DIR/ca.pem`
//!   (the CA that signs every migration host's certificate), `DIR/cert.pem`
//!   (this host's certificate, leaf first, then any intermediates) and
//!   `DIR/key.pem` (its private key, PKCS#8, SEC1 or PKCS#1). Both sides
//!   present their certificate (mutual TLS) and accept a peer whose
//!   certificate chains to `ca.pem`. Host names are not checked: sources
//!   reach destinations by addresses (one per NIC with multichannel), so a
//!   CA dedicated to migration is the trust boundary. [`generate`] writes a
//!   test CA and certificates (`ferry gen-certs`).
//! * **Pre-shared key** ([`TlsConfig::from_psk`], no `--tls-dir`): both ends
//!   derive an Ed25519 key from the `--auth-key-file` key with HKDF-SHA256
//!   (info [`IDENTITY_INFO`]) and build the same self-signed certificate
//!   from it (fixed serial, names and validity; Ed25519 signatures are
//!   deterministic, so the DER is byte-identical, see [`psk_identity`]).
//!   Each side accepts exactly that certificate (DER compared) and checks
//!   the handshake signature with it. rustls has no external-PSK support;
//!   this gives the same property (only holders of the key complete the
//!   handshake) over the ordinary certificate path, so both modes share one
//!   encrypted code path.
//!
//! The mode travels in ALPN ([`ALPN_PSK`], [`ALPN_CERTIFICATES`]); a
//! destination serves exactly one mode (certificates with `--tls-dir`, else
//! the key's), and answers the other with TLS's `no_application_protocol`
//! alert, which both sides turn into a message naming the mismatch.
//!
//! TLS 1.2, session tickets and resumption are off: every connection makes a
//! full TLS 1.3 handshake. The HMAC challenge-response of [`crate::auth`]
//! runs unchanged inside the encrypted control connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hkdf::Hkdf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::Sha256;
use tokio::net::TcpStream;

use crate::auth::AuthKey;
use crate::error::{Result, TransportError};
use crate::stream::Stream;

/// ALPN protocol of the pre-shared-key identity.
pub const ALPN_PSK: &[u8] = b"ferry-psk/1";
/// ALPN protocol of the certificate identity.
pub const ALPN_CERTIFICATES: &[u8] = b"ferry-cert/1";
/// HKDF info from which the pre-shared-key identity is derived.
pub const IDENTITY_INFO: &[u8] = b"ferry tls identity v1";
/// Name the source asks for (not checked: see the module docs).
const SERVER_NAME: &str = "ferry.invalid";
/// File names inside `--tls-dir`.
pub const CA_FILE: &str = "ca.pem";
/// This host's certificate chain.
pub const CERT_FILE: &str = "cert.pem";
/// This host's private key.
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, written by [`generate`] for issuing more
/// certificates (`ferry gen-certs --ca`); never read by `send`/`listen`.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// First byte of a TLS handshake record: how a destination tells a TLS
/// client from a plaintext one on the same port.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// How peers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A certificate derived from the pre-shared key.
    Psk,
    /// Certificates signed by the CA in `--tls-dir`.
    Certificates,
}

impl Mode {
    fn alpn(self) -> &'static [u8] {
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
    /// The pre-shared-key identity: see the module docs.
    pub fn from_psk(key: &AuthKey) -> Result<Self> {
        let (cert, pkcs8) = psk_identity(key)?;
        let p = provider();
        let peer = Arc::new(PskPeer {
            cert: cert.clone(),
            algs: p.signature_verification_algorithms,
        });
        let key_der = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.clone()));
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS client", e))?
            .dangerous()
            .with_custom_certificate_verifier(peer.clone())
            .with_client_auth_cert(vec![cert.clone()], key_der())
            .map_err(|e| config_err("TLS client identity", e))?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err("TLS server", e))?
            .with_client_cert_verifier(peer)
            .with_single_cert(vec![cert], key_der())
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
        match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
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
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
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
            Some(rustls::Error::InvalidCertificate(CertificateError::Other(o)))
                if o.0.downcast_ref::<PskMismatch>().is_some() =>
            {
                format!(
                    "the {peer}'s TLS identity is not the one derived from our pre-shared key: the two --auth-key-file keys differ"
                )
            }
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => format!("the {peer}'s certificate is not signed by our CA ({ours})"),
            Some(rustls::Error::InvalidCertificate(c)) => {
                format!("the {peer}'s certificate is not acceptable: {c:?}")
            }
            Some(rustls::Error::AlertReceived(a)) => format!(
                "the {peer} refused the handshake (TLS alert {a:?}): it does not trust our identity ({} from {ours}: a different CA, or a different pre-shared key)",
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

/// The rustls error inside an I/O error from a TLS stream, if any.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// A message for a TLS error that surfaced after the handshake (on the
/// first read): in TLS 1.3 the client finishes before the server has
/// checked its certificate, so a rejection arrives as an alert then.
pub fn describe_io(e: &std::io::Error) -> Option<String> {
    match rustls_error(e)? {
        rustls::Error::AlertReceived(a) => Some(format!(
            "the peer ended the TLS session with alert {a:?}: it does not trust our identity (its CA did not sign our certificate, or its pre-shared key differs)"
        )),
        other => Some(format!("TLS: {other}")),
    }
}

/// Derives the pre-shared-key identity: the self-signed certificate (DER)
/// and its Ed25519 private key (PKCS#8 v1 DER). The same key gives the same
/// bytes on every host.
pub fn psk_identity(key: &AuthKey) -> Result<(CertificateDer<'static>, Vec<u8>)> {
    let mut seed = [0u8; 32];
    Hkdf::<Sha256>::new(None, key.bytes())
        .expand(IDENTITY_INFO, &mut seed)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    // PKCS#8 v1 (RFC 8410) of an Ed25519 private key: fixed prefix + seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.clone()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| config_err("deriving the TLS identity", e))?;
    let mut params = rcgen::CertificateParams::default();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(9999, 12, 31);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[1]));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry pre-shared-key identity");
    let cert = params
        .self_signed(&kp)
        .map_err(|e| config_err("deriving the TLS identity", e))?;
    Ok((cert.der().clone(), pkcs8))
}

/// The peer's certificate is not the pre-shared-key identity.
#[derive(Debug)]
struct PskMismatch;

impl std::fmt::Display for PskMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the certificate is not the one derived from our pre-shared key")
    }
}

impl std::error::Error for PskMismatch {}

/// Accepts exactly the pre-shared-key certificate, both as client and as
/// server certificate; the handshake signature is checked against it.
#[derive(Debug)]
struct PskPeer {
    cert: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl PskPeer {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> std::result::Result<(), rustls::Error> {
        if intermediates.is_empty() && end_entity.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PskMismatch)),
            )))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The certificate was compared with ours before: the key is the
        // derived one.
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

impl ServerCertVerifier for PskPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
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
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PskPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
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
        self.tls13(message, cert, dss)
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

/// Distinguished name of CAs written by [`generate`].
const CA_NAME: &str = "Ferry migration CA";

fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2125, 1, 1);
    p
}

/// Writes a test PKI into `dir` (created if missing): a host certificate
/// ([`CERT_FILE`], [`KEY_FILE`], valid for both client and server use)
/// signed by the CA of `ca_dir` (its [`CA_FILE`] and [`CA_KEY_FILE`]) or,
/// without one, by a new CA written to `dir` as [`CA_FILE`] and
/// [`CA_KEY_FILE`]. Refuses to overwrite existing files. ECDSA P-256 keys.
pub fn generate(dir: &Path, ca_dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let err = |what: String, e: &dyn std::fmt::Display| TransportError::Tls(format!("{what}: {e}"));
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create {}", dir.display()), &e))?;
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let (ca_pem, ca_key) = match ca_dir {
        Some(c) => {
            let read = |name: &str| {
                let p = c.join(name);
                std::fs::read_to_string(&p)
                    .map_err(|e| err(format!("cannot read {}", p.display()), &e))
            };
            let pem = read(CA_FILE)?;
            let key = rcgen::KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(|e| {
                err(
                    format!("{} holds no usable key", c.join(CA_KEY_FILE).display()),
                    &e,
                )
            })?;
            (pem, key)
        }
        None => {
            let key =
                rcgen::KeyPair::generate().map_err(|e| err("generating a CA key".into(), &e))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| err("signing the CA certificate".into(), &e))?;
            files.push((dir.join(CA_KEY_FILE), key.serialize_pem()));
            (cert.pem(), key)
        }
    };
    // rcgen signs with an issuer Certificate; the CA's own name, key usages
    // and key identifier are all it takes from it, and they are fixed.
    let issuer = ca_params()
        .self_signed(&ca_key)
        .map_err(|e| err("loading the CA".into(), &e))?;
    let host_key =
        rcgen::KeyPair::generate().map_err(|e| err("generating a host key".into(), &e))?;
    let mut p = rcgen::CertificateParams::new(vec!["ferry".to_string(), "localhost".to_string()])
        .map_err(|e| err("host certificate names".into(), &e))?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "ferry migration host");
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2125, 1, 1);
    let host = p
        .signed_by(&host_key, &issuer, &ca_key)
        .map_err(|e| err("signing the host certificate".into(), &e))?;
    files.push((dir.join(CA_FILE), ca_pem));
    files.push((dir.join(CERT_FILE), host.pem()));
    files.push((dir.join(KEY_FILE), host_key.serialize_pem()));
    if let Some((p, _)) = files.iter().find(|(p, _)| p.exists()) {
        return Err(TransportError::Tls(format!(
            "{} exists: not overwritten",
            p.display()
        )));
    }
    for (p, content) in &files {
        write_private(p, content).map_err(|e| err(format!("cannot write {}", p.display()), &e))?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> AuthKey {
        AuthKey::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn both_sides_derive_the_same_identity_and_other_keys_differ() {
        let (c1, k1) = psk_identity(&key(7)).unwrap();
        let (c2, k2) = psk_identity(&key(7)).unwrap();
        assert_eq!(c1, c2, "certificate DER is byte-identical");
        assert_eq!(k1, k2);
        let (c3, k3) = psk_identity(&key(8)).unwrap();
        assert_ne!(c1, c3);
        assert_ne!(k1, k3);
        // The key is in the certificate: its raw public key follows the
        // Ed25519 SubjectPublicKeyInfo header.
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(k1),
            &rcgen::PKCS_ED25519,
        )
        .unwrap();
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(kp.public_key_raw());
        assert!(c1.windows(spki.len()).any(|w| w == spki.as_slice()));
    }

    async fn handshake(client: &TlsConfig, server: &TlsConfig) -> (Result<Stream>, Result<Stream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let t = Duration::from_secs(5);
        let (c, s) = tokio::join!(client.connect(a, t), server.accept(b, t));
        (c, s)
    }

    async fn exchange(c: Result<Stream>, s: Result<Stream>) -> std::result::Result<(), String> {
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

    #[tokio::test]
    async fn psk_identity_handshakes_only_with_the_same_key() {
        let a = TlsConfig::from_psk(&key(1)).unwrap();
        let (c, s) = handshake(&a, &a).await;
        assert!(c
            .as_ref()
            .unwrap()
            .cipher_suite()
            .unwrap()
            .contains("TLS13"));
        exchange(c, s).await.unwrap();
        let b = TlsConfig::from_psk(&key(2)).unwrap();
        let (c, _s) = handshake(&a, &b).await;
        let e = c.unwrap_err().to_string();
        assert!(e.contains("--auth-key-file keys differ"), "{e}");
    }

    #[tokio::test]
    async fn certificates_from_one_ca_handshake_and_others_are_refused() {
        let d = std::env::temp_dir().join(format!("ferry-tls-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        generate(&d.join("a"), None).unwrap();
        generate(&d.join("a2"), Some(&d.join("a"))).unwrap();
        generate(&d.join("b"), None).unwrap();
        assert!(generate(&d.join("a"), None)
            .unwrap_err()
            .to_string()
            .contains("exists"));
        let a = TlsConfig::from_dir(&d.join("a")).unwrap();
        let a2 = TlsConfig::from_dir(&d.join("a2")).unwrap();
        let b = TlsConfig::from_dir(&d.join("b")).unwrap();
        let (c, s) = handshake(&a2, &a).await;
        exchange(c, s).await.unwrap();
        // The destination's certificate is from another CA: the source says so.
        let (c, _) = handshake(&a, &b).await;
        let e = c.unwrap_err().to_string();
        assert!(e.contains("not signed by our CA"), "{e}");
        // Certificates against the pre-shared-key identity: mode mismatch.
        let psk = TlsConfig::from_psk(&key(1)).unwrap();
        let (c, s) = handshake(&a, &psk).await;
        let (e, es) = (c.unwrap_err().to_string(), s.unwrap_err().to_string());
        assert!(e.contains("same TLS identity mode"), "{e}");
        assert!(es.contains("same TLS identity mode"), "{es}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
