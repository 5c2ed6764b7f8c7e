//! Which options combine: the one place that says what each performance
//! option can encrypt and what each side then requires. Pure functions;
//! the source (`ferry send`, the engine) and the destination daemon both
//! ask here, so the rule cannot drift between them.
//!
//! The rule: TCP and compression carry every byte inside the session's TLS
//! (on unless `--plaintext`). RDMA moves pages by RDMA WRITE, which TLS
//! cannot cover, so the RDMA option needs `--plaintext` (the operator's
//! consent) on both ends, and its control connection keeps TLS all the
//! same (it carries what admits the RDMA channels).

use crate::control::RejectReason;
use crate::option::PerformanceOption;

/// Why the RDMA option needs `--plaintext` (the source's message).
pub const RDMA_NOT_ENCRYPTED: &str = "--performance-option rdma needs --plaintext on both ends: RDMA data channels move pages by RDMA WRITE, unencrypted (its control connection keeps TLS). Use --performance-option tcp or compression to encrypt, or add --plaintext to ferry send and ferry listen on a trusted, isolated migration network";

/// The destination's refusal when it requires encryption and the source
/// asks for RDMA.
pub const RDMA_NEEDS_PLAINTEXT_DEST: &str = "RDMA data channels are not encrypted and this destination requires encryption: use --performance-option tcp or compression, or (on a trusted, isolated migration network) start both ferry listen and ferry send with --plaintext";

/// The destination's refusal of an RDMA offer on a plain control
/// connection.
pub const RDMA_NEEDS_TLS_CONTROL: &str = "the RDMA option's control connection must be encrypted (it carries what admits the RDMA channels): connect with TLS";

impl PerformanceOption {
    /// Whether the option's data channels can carry pages inside TLS.
    pub fn can_encrypt_data(self) -> bool {
        !matches!(self, PerformanceOption::Rdma)
    }
}

/// What a source encrypts with `option` and `--plaintext` (`plaintext`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceEncryption {
    /// TLS on the control connection.
    pub control: bool,
    /// TLS on every data channel.
    pub data: bool,
}

/// The source's rule: which connections are encrypted, or why the
/// combination is refused (RDMA without `--plaintext`).
pub fn source_encryption(
    option: PerformanceOption,
    plaintext: bool,
) -> Result<SourceEncryption, &'static str> {
    match (option.can_encrypt_data(), plaintext) {
        (false, false) => Err(RDMA_NOT_ENCRYPTED),
        // The control connection of an unencryptable option keeps TLS.
        (false, true) => Ok(SourceEncryption {
            control: true,
            data: false,
        }),
        (true, true) => Ok(SourceEncryption {
            control: false,
            data: false,
        }),
        (true, false) => Ok(SourceEncryption {
            control: true,
            data: true,
        }),
    }
}

/// The destination's rule for an offered `option`: `plaintext_allowed` is
/// its `--plaintext`, `control_encrypted` whether the offer came over TLS.
/// (Whether an encryptable option's plain connection is acceptable was
/// decided before the offer, when the connection was accepted.)
pub fn destination_admits(
    option: PerformanceOption,
    plaintext_allowed: bool,
    control_encrypted: bool,
) -> Result<(), (RejectReason, &'static str)> {
    if option.can_encrypt_data() {
        return Ok(());
    }
    if !plaintext_allowed {
        return Err((RejectReason::Encryption, RDMA_NEEDS_PLAINTEXT_DEST));
    }
    if !control_encrypted {
        return Err((RejectReason::Encryption, RDMA_NEEDS_TLS_CONTROL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PerformanceOption; 3] = [
        PerformanceOption::Tcp,
        PerformanceOption::Compression { codec: 1, level: 0 },
        PerformanceOption::Rdma,
    ];

    #[test]
    fn the_source_encrypts_everything_it_can_and_rdma_needs_consent() {
        for o in ALL {
            let default = source_encryption(o, false);
            let plain = source_encryption(o, true).unwrap();
            if o.can_encrypt_data() {
                assert_eq!(
                    default,
                    Ok(SourceEncryption {
                        control: true,
                        data: true
                    })
                );
                assert!(!plain.control && !plain.data, "{o}");
            } else {
                assert_eq!(default, Err(RDMA_NOT_ENCRYPTED));
                assert!(plain.control && !plain.data, "RDMA keeps TLS on control");
            }
        }
    }

    #[test]
    fn the_destination_admits_rdma_only_with_plaintext_and_a_tls_control() {
        for o in ALL {
            for (allowed, tls) in [(false, false), (false, true), (true, false), (true, true)] {
                let r = destination_admits(o, allowed, tls);
                match (o.can_encrypt_data(), allowed, tls) {
                    (true, ..) | (false, true, true) => assert_eq!(r, Ok(())),
                    (false, false, _) => {
                        assert_eq!(
                            r,
                            Err((RejectReason::Encryption, RDMA_NEEDS_PLAINTEXT_DEST))
                        )
                    }
                    (false, true, false) => {
                        assert_eq!(r, Err((RejectReason::Encryption, RDMA_NEEDS_TLS_CONTROL)))
                    }
                }
            }
        }
    }
}
