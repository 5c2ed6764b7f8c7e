//! `ferry`: live-migrate guest memory.
//!
//! * `ferry listen`: destination daemon.
//! * `ferry send`: source, with a built-in synthetic guest.
//! * `ferry demo`: both ends in one process over loopback.
//! * `ferry relay`: a hypervisor's own migration over Ferry's transport.
//! * `ferry nics`: this host's interfaces as multichannel sees them.
//! * `ferry gen-key`: a new pre-shared key file for `--auth-key-file`.
//! * `ferry gen-certs`: a test CA and host certificates for `--tls-dir`.
//!
//! The parts: `args` (every flag), `listen`, `send` (send and demo),
//! `session` (outputs of one migration), `tools` (nics, report, gen-key,
//! gen-certs), `certs` (the test PKI of gen-certs), `progress`, `summary`,
//! `units`, `logging`, `signals`, `help`. The helpers shared by the
//! subcommands (where results go, the synthetic guest's resume hook, exit
//! statuses) are below `main`.

use std::sync::Arc;

use args::{
    DemoArgs, GenCertsArgs, GenKeyArgs, ListenArgs, NicsArgs, RelayArgs, ReportArgs, SendArgs,
};
use clap::{Parser, Subcommand};
use ferry_migration::dest::{GuestSupport, ResumeHook};
use ferry_migration::guest::{verify_pages, SyntheticState, SYNTHETIC_FORMAT};
use ferry_transport::auth::AuthKey;
use ferry_transport::proto::DEFAULT_PORT;
use ferry_transport::tls::TlsConfig;

mod args;
mod certs;
mod help;
mod listen;
mod logging;
mod progress;
mod relay;
mod send;
mod session;
mod signals;
mod summary;
mod tools;
mod units;

/// Ferry: live-migration memory transport.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: live-migrate guest memory between hosts (pre-copy over TCP, compression or RDMA, on every NIC at once)",
    long_about = None,
    after_help = help::TOP_EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Destination daemon: accept incoming migrations.
    #[command(after_help = help::LISTEN_EXAMPLES)]
    Listen(ListenArgs),
    /// Source: migrate a synthetic guest to a destination.
    #[command(after_help = help::SEND_EXAMPLES)]
    Send(SendArgs),
    /// Both ends in one process over loopback (1 GiB guest dirtying 64 MB/s unless told otherwise).
    #[command(after_help = help::DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// Carry a hypervisor's own migration (QEMU: `migrate
    /// tcp:127.0.0.1:PORT`) over Ferry's data channels: every NIC pair,
    /// compression, TLS, failover; the destination's `ferry listen` opens
    /// the same connections to --deliver-to.
    Relay(RelayArgs),
    /// List this host's interfaces as multichannel sees them: address,
    /// prefix, link speed, RDMA device, and whether they can carry a migration.
    #[command(after_help = help::NICS_EXAMPLES)]
    Nics(NicsArgs),
    /// Summarise a `ferry send --json` record, and draw it as an SVG.
    #[command(after_help = help::REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Write a new pre-shared key for --auth-key-file: 32 random bytes,
    /// base64, to a new file of mode 0600 (never overwrites a file).
    #[command(after_help = help::GEN_KEY_EXAMPLES)]
    GenKey(GenKeyArgs),
    /// Write a test PKI for --tls-dir: DIR/ca.pem and DIR/ca-key.pem (a new
    /// CA, unless --ca), DIR/cert.pem and DIR/key.pem (a host certificate
    /// signed by it, for client and server use). Never overwrites a file.
    #[command(after_help = help::GEN_CERTS_EXAMPLES)]
    GenCerts(GenCertsArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(&cli.log);
    // Every descriptor the process may have (soft limit up to the hard
    // one): a daemon under many connections, a source with many channels.
    if let Err(e) = ferry_ffi::net::raise_nofile_limit() {
        tracing::warn!("cannot raise the descriptor limit (RLIMIT_NOFILE): {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let quiet = cli.log.quiet;
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Listen(a) => listen::listen(a).await,
            Cmd::Send(a) => send::send(a, quiet).await,
            Cmd::Demo(a) => send::demo(a, quiet).await,
            Cmd::Relay(a) => relay::relay(a).await,
            Cmd::Nics(a) => tools::list_nics(&a),
            Cmd::Report(a) => tools::report(&a),
            Cmd::GenCerts(a) => tools::gen_certs(&a),
            Cmd::GenKey(a) => tools::gen_key(&a),
        }
    });
    if let Err(e) = r {
        if !reported() {
            tracing::error!("{e:#}");
        }
        std::process::exit(exit_status(&e));
    }
}

/// Writes `text` to standard output, where results go. A reader that went
/// away (`ferry send ... | head -1`, a log pipe that died) costs the text
/// only: never a panic, and a migration or the daemon carries on.
pub fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// [`out`], on standard error.
pub fn err_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

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

/// A migration committed but its audit after the pause failed (exit
/// status 5): the destination runs pages the source's dirty log missed.
#[derive(Debug)]
pub struct AuditFailed(pub String);

impl std::fmt::Display for AuditFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the migration committed but its audit failed: {}; the destination runs with pages the source's dirty log never reported",
            self.0
        )
    }
}

impl std::error::Error for AuditFailed {}

/// `Err(AuditFailed)` for a committed migration whose audit failed.
pub fn check_audit(s: &ferry_migration::engine::Summary) -> anyhow::Result<()> {
    if s.audit.failed() {
        return Err(AuditFailed(format!(
            "{} pages differ, first at {:#x}",
            s.audit.mismatched_pages,
            s.audit.first_mismatch.unwrap_or(0)
        ))
        .into());
    }
    Ok(())
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
///   `--timeout`, or a `--downtime-limit` no pause can fit); the guest
///   keeps running on the source;
/// * 4: `Commit` was sent but not confirmed: the guest is left paused on
///   the source, as it may already run on the destination;
/// * 5: committed, but the audit after the pause failed (`send`, `demo`,
///   `listen --once`): the guest runs on the destination with pages the
///   source's dirty log missed;
/// * 128 + N: cancelled by signal N (130 SIGINT, 143 SIGTERM); the guest
///   keeps running on the source.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    use ferry_migration::MigrationError as M;
    let any = |f: fn(&M) -> bool| e.chain().any(|c| c.downcast_ref::<M>().is_some_and(f));
    match signals::exit_status() {
        Some(status) if any(|m| matches!(m, M::Cancelled(_))) => status,
        _ if any(M::is_not_converged) => 3,
        _ if any(|m| matches!(m, M::CommitUnconfirmed(_))) => 4,
        _ if e.chain().any(|c| c.is::<AuditFailed>()) => 5,
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
