//! `ferry gen-certs`: a test PKI for `--tls-dir` (the files
//! [`TlsConfig::from_dir`](ferry_transport::tls::TlsConfig::from_dir) reads).
//! Only the command writes certificates, so this lives here, not in the
//! transport.

use std::path::{Path, PathBuf};

use ferry_transport::tls::{CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};

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
pub fn generate(dir: &Path, ca_dir: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    // Worded as the transport's TLS errors are ("encryption: ...").
    let err = |what: String, e: &dyn std::fmt::Display| anyhow::anyhow!("encryption: {what}: {e}");
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
        anyhow::bail!("encryption: {} exists: not overwritten", p.display());
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
    use ferry_transport::auth::AuthKey;
    use ferry_transport::tls::testing::{exchange, handshake};
    use ferry_transport::tls::TlsConfig;

    fn key(b: u8) -> AuthKey {
        AuthKey::new(vec![b; 32]).unwrap()
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
