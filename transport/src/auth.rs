//! The pre-shared key, its file, and the nonces of the handshake.
//!
//! # Key files
//! `ferry gen-key FILE` ([`generate_key_file`]) writes [`KEY_LEN`] random
//! bytes, base64-encoded, to a new file of mode 0600 (it never overwrites).
//! `ferry send` and `ferry listen` ([`AuthKey::from_file`]) refuse, naming
//! the fix, a key file that group or others may access (as ssh refuses a
//! private key), one that does not hold base64, and a key shorter than
//! [`MIN_KEY_LEN`] bytes once decoded: a key someone chose (a password) can
//! be guessed offline by whoever a source connects to; 32 random bytes
//! cannot.
//!
//! The handshake itself (the source proves first, both proofs bound to the
//! transcript and the TLS session) is [`ferry_proto::handshake`], run by
//! the control connection's `Conn::client_handshake` and
//! `Conn::server_authenticate`. Proofs are HMAC-SHA256 under
//! the key, compared in constant time; fresh 32-byte nonces on both sides
//! make a recorded exchange useless, and the role labels stop a reflection
//! of one side's proof as the other's.

use crate::error::{Result, TransportError};
use ferry_proto::WireError;

/// Shortest key accepted, in bytes (after decoding).
pub const MIN_KEY_LEN: usize = 32;
/// Bytes of a key written by [`generate_key_file`].
pub const KEY_LEN: usize = 32;

/// base64 (RFC 4648, standard alphabet), padding optional when decoding.
fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// The fix for a bad key file, for messages.
fn fix(path: &std::path::Path) -> String {
    format!("create a key with `ferry gen-key {}` (32 random bytes, base64, mode 0600) and copy it to the other host keeping its mode", path.display())
}

/// Writes a new key file at `path`: [`KEY_LEN`] random bytes in base64
/// and a newline, mode 0600. Refuses to overwrite an existing file.
pub fn generate_key_file(path: &std::path::Path) -> Result<()> {
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; KEY_LEN];
    rand::fill(&mut key);
    let mut text = b64().encode(key);
    text.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TransportError::Io {
            context: if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists: not overwritten (a key in use would be lost)",
                    path.display()
                )
            } else {
                format!("cannot create key file {}", path.display())
            },
            source: e,
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| TransportError::Io {
            context: format!("cannot write key file {}", path.display()),
            source: e,
        })
}

/// A pre-shared key.
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    /// Wraps key bytes; refuses keys shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(TransportError::Local(WireError::Invalid {
                field: "auth key",
                detail: format!("{} bytes, need at least {MIN_KEY_LEN}", bytes.len()),
            }));
        }
        Ok(AuthKey(bytes))
    }

    /// Reads a key file (see the module docs): refused when group or
    /// others may access it, when it is not base64, or when the key is
    /// shorter than [`MIN_KEY_LEN`] bytes once decoded; each error names
    /// the file and the fix.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        use base64::Engine;
        use std::os::unix::fs::PermissionsExt;
        let bad = |detail: String| {
            TransportError::Local(WireError::Invalid {
                field: "auth key file",
                detail,
            })
        };
        let mut f = std::fs::File::open(path).map_err(|e| TransportError::Io {
            context: format!("cannot read auth key file {}", path.display()),
            source: e,
        })?;
        // The mode of the file actually opened (no race with a rename).
        let mode = f
            .metadata()
            .map_err(|e| TransportError::Io {
                context: format!("cannot stat auth key file {}", path.display()),
                source: e,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "{} is accessible by group or others (mode {:04o}): anyone who reads it can migrate guests to and from this host; run `chmod 600 {}`",
                path.display(),
                mode & 0o7777,
                path.display()
            )));
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut raw).map_err(|e| TransportError::Io {
            context: format!("cannot read auth key file {}", path.display()),
            source: e,
        })?;
        let key = b64().decode(raw.trim_ascii()).map_err(|e| {
            bad(format!(
                "{} does not hold a base64-encoded key ({e}): {}",
                path.display(),
                fix(path)
            ))
        })?;
        if key.len() < MIN_KEY_LEN {
            return Err(bad(format!(
                "the key in {} is {} bytes after decoding, need at least {MIN_KEY_LEN} (a short or chosen key can be guessed): {}",
                path.display(),
                key.len(),
                fix(path)
            )));
        }
        Ok(AuthKey(key))
    }

    /// A random key (used by `ferry demo`, where both ends share a process).
    pub fn random() -> Self {
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        AuthKey(k)
    }

    /// The keys of the session whose handshake exchanged `nonce_s` (the
    /// source's) and `nonce_d` (the destination's).
    pub fn session_keys(&self, nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> ferry_proto::SessionKeys {
        ferry_proto::SessionKeys::derive(&self.0, nonce_s, nonce_d)
    }

    /// The key bytes (the handshake proofs key).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::fill(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        assert!(AuthKey::new(vec![0; 16])
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
    }

    #[test]
    fn generated_key_files_are_read_and_weak_or_exposed_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-key-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        generate_key_file(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim_end().len(), 44, "{text:?}");
        let k = AuthKey::from_file(&p).unwrap();
        assert_eq!(k.bytes().len(), KEY_LEN);
        // Never overwritten.
        let e = generate_key_file(&p).unwrap_err().to_string();
        assert!(e.contains("exists: not overwritten"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        // Exposed.
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = AuthKey::from_file(&p).unwrap_err().to_string();
            assert!(
                e.contains(&format!("(mode {mode:04o})")) && e.contains("chmod 600"),
                "{e}"
            );
        }
        // Weak or not encoded.
        let write = |name: &str, content: &str| {
            let q = dir.join(name);
            let _ = std::fs::remove_file(&q);
            std::fs::write(&q, content).unwrap();
            std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
            AuthKey::from_file(&q).map(|_| ()).unwrap_err().to_string()
        };
        let e = write("short", "cGFzc3dvcmRwYXNzd29yZA==\n"); // "passwordpassword"
        assert!(
            e.contains("is 16 bytes after decoding, need at least 32")
                && e.contains("ferry gen-key"),
            "{e}"
        );
        let e = write("text", "correct horse battery staple, really long enough\n");
        assert!(e.contains("does not hold a base64-encoded key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
