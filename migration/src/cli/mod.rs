//! The `ferry` command's parts: flags, subcommands, progress and output.

use std::sync::Arc;

use ferry_migration::dest::ResumeHook;
use ferry_migration::guest::{verify_pages, SyntheticState, SYNTHETIC_FORMAT};
use ferry_transport::auth::AuthKey;
use ferry_transport::proto::DEFAULT_PORT;
use ferry_transport::tls::TlsConfig;

pub mod args;
pub mod help;
pub mod listen;
pub mod logging;
pub mod progress;
pub mod send;
pub mod session;
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

/// `HOST[:PORT]` with Ferry's port when none is given.
pub fn with_port(to: &str) -> String {
    let has_port = to
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')));
    if has_port {
        to.to_string()
    } else {
        format!("{to}:{DEFAULT_PORT}")
    }
}

/// The exit status for a failed command (README, "Exit statuses"):
///
/// * 1: failed; a source's guest keeps running on the source;
/// * 2: bad usage (clap's own status for a flag it refuses);
/// * 3: cancelled because the guest did not converge (`--max-rounds`,
///   `--timeout`); the guest keeps running on the source;
/// * 4: `Commit` was sent but not confirmed: the guest is left paused on
///   the source, as it may already run on the destination;
/// * 128 + N: cancelled by signal N (130 SIGINT, 143 SIGTERM); the guest
///   keeps running on the source.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    use ferry_migration::MigrationError as M;
    let any = |f: fn(&M) -> bool| e.chain().any(|c| c.downcast_ref::<M>().is_some_and(f));
    match signals::exit_status() {
        Some(status) if any(|m| matches!(m, M::Cancelled(_))) => status,
        _ if any(M::is_not_converged) => 3,
        _ if any(|m| matches!(m, M::CommitUnconfirmed(_))) => 4,
        _ => 1,
    }
}

/// Set once a command has logged its own failure in full (`send`'s
/// outcome event): `main` then only sets the exit status.
static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The failure was logged already.
pub fn mark_reported() {
    REPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the failure was logged already.
pub fn reported() -> bool {
    REPORTED.load(std::sync::atomic::Ordering::Relaxed)
}
