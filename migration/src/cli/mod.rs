//! The `ferry` command's parts: flags, subcommands, progress and output.

use std::sync::Arc;

use ferry_migration::dest::ResumeHook;
use ferry_migration::guest::{verify_pages, SyntheticState, SYNTHETIC_FORMAT};
use ferry_transport::auth::AuthKey;
use ferry_transport::tls::TlsConfig;

pub mod args;
pub mod help;
pub mod listen;
pub mod progress;
pub mod send;
pub mod signals;
pub mod summary;
pub mod tools;
pub mod units;

/// The TLS settings `--tls-dir DIR` names, else the key's.
pub fn tls_config(dir: Option<&std::path::Path>, key: &AuthKey) -> anyhow::Result<Arc<TlsConfig>> {
    Ok(Arc::new(match dir {
        Some(d) => TlsConfig::from_dir(d)?,
        None => TlsConfig::from_psk(key)?,
    }))
}

/// The resume hook of the CLI's destination: checks every page of a
/// synthetic guest on its own.
pub fn resume_hook() -> ResumeHook {
    Arc::new(|mem, state| {
        let st: SyntheticState = serde_json::from_slice(state)
            .map_err(|e| format!("device state is not {SYNTHETIC_FORMAT}: {e}"))?;
        let c = verify_pages(mem);
        if c.corrupt > 0 {
            return Err(format!(
                "{} corrupt pages, first at {:#x}",
                c.corrupt,
                c.first_corrupt.unwrap_or(0)
            ));
        }
        Ok(format!(
            "guest resumed after {} guest writes: {} pattern pages verified, {} zero, {} image pages (digest-checked)",
            st.writes, c.pattern, c.zero, c.other
        ))
    })
}
