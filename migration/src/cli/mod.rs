//! The `ferry` command's parts: flags, subcommands, progress and output.

use std::sync::Arc;

use ferry_migration::dest::{GuestSupport, ResumeHook};
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

/// The CLI destination's side of a VMM, for the synthetic guest: it
/// restores its device state (parsing it is what can fail, before
/// `Committed`), then, resumed, checks every page of the guest on its own.
pub fn resume_hook() -> ResumeHook {
    ResumeHook {
        supports: GuestSupport {
            max_vcpus: 1,
            cpu_vendor: Some(ferry_migration::guest::cpu_vendor()),
            device_state_formats: vec![SYNTHETIC_FORMAT.into()],
        },
        restore: Arc::new(|_mem, state| {
            let st: SyntheticState = serde_json::from_slice(state)
                .map_err(|e| format!("device state is not {SYNTHETIC_FORMAT}: {e}"))?;
            Ok(format!("restored after {} guest writes", st.writes))
        }),
        resume: Arc::new(|mem| {
            let c = verify_pages(mem);
            if c.corrupt > 0 {
                return Err(format!(
                    "{} corrupt pages, first at {:#x}",
                    c.corrupt,
                    c.first_corrupt.unwrap_or(0)
                ));
            }
            Ok(format!(
                "guest resumed: {} pattern pages verified, {} zero, {} image pages (evidence-checked)",
                c.pattern, c.zero, c.other
            ))
        }),
    }
}

/// How the destination reports the source's audit.
pub fn dest_audit_line(a: Option<&ferry_transport::proto::AuditReport>) -> String {
    use ferry_transport::proto::AuditResult;
    match a {
        Some(a) if a.result == AuditResult::Passed => {
            format!("audit passed ({} pages)", a.pages)
        }
        Some(a) => format!(
            "AUDIT FAILED: {} pages differ from the source's frozen memory (first at {:#x}): the source's dirty log missed guest writes",
            a.mismatched_pages,
            a.first_mismatch.unwrap_or(0)
        ),
        None => "audit report not received".into(),
    }
}

/// A committed migration whose audit failed exits with status 4 (after its
/// summary and record were written).
pub fn audit_exit(failed: bool) {
    if failed {
        eprintln!("error: the migration committed but its audit failed: the destination runs with pages the source's dirty log never reported");
        std::process::exit(4);
    }
}
