//! `ferry send` and `ferry demo`: the source, with the synthetic guest.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_migration::dest::{Destination, ListenOptions};
use ferry_migration::dirty::BitmapDirtyLog;
use ferry_migration::engine::{Cancel, Progress, Source, SourceOptions, Summary};
use ferry_migration::guest::{SyntheticConfig, SyntheticGuest};
use ferry_migration::memory::{default_layout, source_memory};
use ferry_migration::nics::MultichannelOptions;
use ferry_migration::report::{self, Record, Sampler};
use ferry_transport::auth::AuthKey;
use ferry_transport::proto::{PerformanceOption, DEFAULT_PORT};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::args::{source_options, DemoArgs, EngineArgs, GuestArgs, OptionArg, SendArgs};
use super::progress::progress_bar;
use super::summary::print_summary;
use super::{audit_exit, dest_audit_line, resume_hook, signals, tls_config, units};

pub fn start_guest(g: &GuestArgs) -> anyhow::Result<SyntheticGuest> {
    if let Some(binary) = g.memory.binary_reading() {
        tracing::warn!(
            "--memory {} is decimal: {} bytes ({}); {binary} would be {}",
            g.memory.text,
            g.memory.bytes,
            units::human(g.memory.bytes),
            units::parse_size(&binary).map_or(String::new(), |b| format!("{b} bytes")),
        );
    }
    let layout = default_layout(g.memory.bytes).context("--memory")?;
    let mem = Arc::new(source_memory(&layout)?);
    let cfg = SyntheticConfig {
        dirty_rate: g.dirty_rate,
        zero_fraction: g.zero_fraction,
        image: g.guest_image.clone(),
        seed: 1,
    };
    Ok(SyntheticGuest::start(mem, cfg)?)
}

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

pub async fn run_source(
    to: String,
    key: &AuthKey,
    guest: &SyntheticGuest,
    e: &EngineArgs,
    cancel: &Cancel,
) -> anyhow::Result<Summary> {
    let mut opts = source_options(e)?;
    opts.tls = Some(tls_config(e.tls_dir.as_deref(), key)?);
    if e.plaintext {
        eprintln!(
            "ferry: --plaintext: {} cross the network unencrypted",
            match e.performance_option {
                OptionArg::Rdma => "guest pages (RDMA WRITE)",
                _ => "guest pages, device state and control messages",
            }
        );
    }
    // auto: try rdma when this host has an RDMA NIC; if the destination
    // refuses the option (no RDMA NIC, no shared subnet), fall back to
    // compression. Nothing has moved when it refuses.
    let fallback = opts.option;
    if e.performance_option == OptionArg::Auto && opts.bandwidth_limit.is_some() {
        eprintln!("ferry: auto: chose {fallback} (--bandwidth-limit: RDMA is not paced)");
    } else if e.performance_option == OptionArg::Auto {
        let usable = if !e.plaintext {
            Err("RDMA data channels are not encrypted: rdma only with --plaintext".to_string())
        } else {
            auto_rdma(&opts.multichannel)
        };
        match usable {
            Ok(()) => opts.option = PerformanceOption::Rdma,
            Err(why) => eprintln!("ferry: auto: chose {fallback} ({why})"),
        }
    }
    if opts.option == PerformanceOption::Rdma && e.performance_option == OptionArg::Auto {
        let tried = run_source_with(to.clone(), key, guest, e, opts.clone(), cancel).await;
        match tried {
            Err(err) if is_option_rejected(&err) => {
                eprintln!("ferry: auto: the destination refused rdma ({err:#}); chose {fallback}");
                opts.option = fallback;
            }
            Ok(s) => {
                eprintln!("ferry: auto: chose rdma");
                return Ok(s);
            }
            Err(err) => return Err(err),
        }
    }
    run_source_with(to, key, guest, e, opts, cancel).await
}

/// Whether this host could use RDMA (`--performance-option auto`).
pub fn auto_rdma(mc: &MultichannelOptions) -> Result<(), String> {
    #[cfg(feature = "rdma")]
    {
        ferry_migration::rdma::source_endpoints(mc)
            .map(|_| ())
            .map_err(|e| format!("no usable RDMA here: {e}"))
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = mc;
        Err("this ferry was built without the rdma feature".into())
    }
}

pub fn is_option_rejected(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ferry_transport::TransportError>(),
            Some(ferry_transport::TransportError::Rejected {
                reason: ferry_transport::proto::RejectReason::Option,
                ..
            })
        ) || matches!(
            c.downcast_ref::<ferry_migration::MigrationError>(),
            Some(ferry_migration::MigrationError::Transport(
                ferry_transport::TransportError::Rejected {
                    reason: ferry_transport::proto::RejectReason::Option,
                    ..
                }
            ))
        )
    })
}

pub async fn run_source_with(
    to: String,
    key: &AuthKey,
    guest: &SyntheticGuest,
    e: &EngineArgs,
    opts: SourceOptions,
    cancel: &Cancel,
) -> anyhow::Result<Summary> {
    let dirty = BitmapDirtyLog::new(guest.memory().clone());
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(progress.clone());
    let sampler = Sampler::start(progress.clone(), Duration::from_millis(100));
    let src = Source {
        to,
        key,
        guest,
        mem: guest.memory().clone(),
        dirty: &dirty,
        opts,
        progress,
        cancel: cancel.clone(),
    };
    let r = src.migrate().await;
    bar.abort();
    let samples = sampler.stop();
    let summary = r?;
    if let Some(path) = &e.json {
        let record = Record {
            schema: report::SCHEMA,
            summary: &summary,
            samples: &samples,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print_summary(&summary);
    Ok(summary)
}

pub async fn send(a: SendArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let guest = start_guest(&a.guest)?;
    let cancel = cancel_on_signal()?;
    let r = run_source(with_port(&a.to), &key, &guest, &a.engine, &cancel).await;
    audit_exit(r.as_ref().is_ok_and(|s| s.audit.failed()));
    if r.is_err() {
        if cancel.reason().is_some() && guest.is_running() {
            eprintln!(
                "ferry: migration cancelled; the guest keeps running on this host (running: true)"
            );
        } else if guest.is_running() {
            eprintln!(
                "ferry: migration failed; the guest keeps running on this host (running: true)"
            );
        } else {
            // Commit was sent but not confirmed: resuming could make two
            // running copies.
            eprintln!(
                "ferry: migration failed; the guest is left paused on this host (running: false)"
            );
        }
    }
    r.map(|_| ())
}

pub async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let key = AuthKey::random();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")?;
    let addr = listener.local_addr()?;
    let opts = ListenOptions {
        key: key.clone(),
        memory_limit: u64::MAX,
        timeout: a.engine.peer_timeout,
        max_concurrent: 2,
        queue: 0,
        queue_timeout: Duration::ZERO,
        migration_networks: Vec::new(),
        tls: tls_config(a.engine.tls_dir.as_deref(), &key)?,
        plaintext: a.engine.plaintext,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(Destination::new(opts, resume_hook()).serve(listener, tx));
    eprintln!(
        "ferry demo: {} guest dirtying {}/s, migrating over loopback {addr}",
        units::human(a.guest.memory.bytes),
        units::human(a.guest.dirty_rate)
    );
    let guest = start_guest(&a.guest)?;
    let cancel = cancel_on_signal()?;
    let r = run_source(addr.to_string(), &key, &guest, &a.engine, &cancel).await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    server.abort();
    audit_exit(r.as_ref().is_ok_and(|s| s.audit.failed()));
    r?;
    match outcome {
        Ok(Some(o)) => {
            let d = o.result?;
            println!(
                "  destination: digest {} verified; {}; {}",
                d.digest,
                d.resume_report,
                dest_audit_line(d.audit.as_ref())
            );
            Ok(())
        }
        _ => bail!("the destination did not report its outcome"),
    }
}

/// A [`Cancel`] that the first SIGINT or SIGTERM triggers ("cancelled by
/// the operator"); a second signal exits at once.
fn cancel_on_signal() -> anyhow::Result<Cancel> {
    let cancel = Cancel::default();
    let c = cancel.clone();
    signals::on_signal(move |name| {
        if c.cancel(&format!("cancelled by the operator ({name})")) {
            eprintln!(
                "\nferry: {name}: cancelling the migration (Abort to the destination, guest resumed here); a second signal exits at once"
            );
        } else {
            eprintln!(
                "\nferry: {name}: Commit is already sent, so the migration finishes (cancelling now could leave the guest running nowhere); a second signal exits at once"
            );
        }
    })?;
    Ok(cancel)
}
