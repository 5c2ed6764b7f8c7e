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
use ferry_transport::auth::AuthKey;
use ferry_transport::proto::PerformanceOption;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::args::{source_options, DemoArgs, EngineArgs, GuestArgs, OptionArg, SendArgs};
use super::session::{GuestState, Outputs};
use super::{check_audit, dest_audit_line, resume_hook, signals, tls_config, units, with_port};

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

pub async fn run_source(
    to: String,
    key: &AuthKey,
    guest: &SyntheticGuest,
    e: &EngineArgs,
    cancel: &Cancel,
    progress: &Arc<Progress>,
) -> anyhow::Result<Summary> {
    let mut opts = source_options(e)?;
    opts.tls = Some(tls_config(e.tls_dir.as_deref(), key)?);
    if e.plaintext {
        tracing::warn!(
            "--plaintext: {} cross the network unencrypted",
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
        tracing::info!("auto: chose {fallback} (--bandwidth-limit: RDMA is not paced)");
    } else if e.performance_option == OptionArg::Auto {
        let usable = if !e.plaintext {
            Err("RDMA data channels are not encrypted: rdma only with --plaintext".to_string())
        } else {
            auto_rdma(&opts.multichannel)
        };
        match usable {
            Ok(()) => opts.option = PerformanceOption::Rdma,
            Err(why) => tracing::info!("auto: chose {fallback} ({why})"),
        }
    }
    if opts.option == PerformanceOption::Rdma && e.performance_option == OptionArg::Auto {
        let tried = run_source_with(to.clone(), key, guest, opts.clone(), cancel, progress).await;
        match tried {
            Err(err) if is_option_rejected(&err) => {
                tracing::info!("auto: the destination refused rdma ({err:#}); chose {fallback}");
                opts.option = fallback;
            }
            Ok(s) => {
                tracing::info!("auto: chose rdma");
                return Ok(s);
            }
            Err(err) => return Err(err),
        }
    }
    run_source_with(to, key, guest, opts, cancel, progress).await
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
    opts: SourceOptions,
    cancel: &Cancel,
    progress: &Arc<Progress>,
) -> anyhow::Result<Summary> {
    let dirty = BitmapDirtyLog::new(guest.memory().clone());
    let src = Source {
        to,
        key,
        guest,
        mem: guest.memory().clone(),
        dirty: &dirty,
        opts,
        progress: progress.clone(),
        cancel: cancel.clone(),
    };
    let to = src.to.clone();
    src.migrate().await.map_err(|e| not_ferry(e, &to))
}

/// Names the likely cause when what answered at `to` is not a Ferry
/// destination: something else on that port (it answered in another
/// protocol), or nothing that speaks (no answer to the hello).
fn not_ferry(e: ferry_migration::MigrationError, to: &str) -> anyhow::Error {
    use ferry_migration::MigrationError as M;
    use ferry_transport::TransportError as T;
    let hint = match &e {
        M::Transport(T::Wire(ferry_proto::WireError::BadMagic {
            what: "control frame",
            found,
            ..
        })) => {
            let text: String = found
                .iter()
                .map(|b| match *b {
                    b if b.is_ascii_graphic() || b == b' ' => char::from(b),
                    _ => '.',
                })
                .collect();
            Some(format!(
                "{to} is not a ferry listen port: it answered {text:?}, not Ferry (check the host and port)"
            ))
        }
        M::Transport(T::Timeout { what, after })
            if what.contains("hello") || what.contains("TLS handshake") =>
        {
            Some(format!(
                "no Ferry destination answered at {to} within {after:?}: the port accepted the connection but said nothing (is it a ferry listen port?)"
            ))
        }
        _ => None,
    };
    match hint {
        Some(h) => anyhow::Error::new(e).context(h),
        None => e.into(),
    }
}

/// Where the guest runs after `result`.
fn guest_state(result: &anyhow::Result<Summary>, guest: Option<&SyntheticGuest>) -> GuestState {
    match (result, guest) {
        (Ok(_), _) => GuestState::Destination,
        (Err(_), Some(g)) if !g.is_running() => GuestState::PausedOnSource,
        (Err(_), Some(_)) => GuestState::Source,
        (Err(_), None) => GuestState::NotStarted,
    }
}

pub async fn send(a: SendArgs, quiet: bool) -> anyhow::Result<()> {
    // --json and --events are checked before anything else happens.
    let outputs = Outputs::check(&a.engine)?;
    let to = with_port(&a.to);
    // Signals are caught from here on: one during the guest's set-up (a
    // large memory to fill, an image to read) cancels before connecting,
    // with the record written, instead of killing the process unheard.
    let cancel = cancel_on_signal()?;
    let prepared = (|| {
        let key = AuthKey::from_file(&a.auth_key_file)?;
        let guest = start_guest(&a.guest)?;
        anyhow::Ok((key, guest))
    })();
    let session = outputs.start(&a.engine, quiet);
    let (result, guest) = match prepared {
        Ok((key, guest)) => (
            run_source(
                to.clone(),
                &key,
                &guest,
                &a.engine,
                &cancel,
                &session.progress,
            )
            .await,
            Some(guest),
        ),
        Err(e) => (Err(e), None),
    };
    let state = guest_state(&result, guest.as_ref());
    let s = session
        .finish(result, state, &a.engine, &to, a.guest.memory.bytes)
        .await?;
    check_audit(&s)
}

pub async fn demo(a: DemoArgs, quiet: bool) -> anyhow::Result<()> {
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
        handshake_timeout: ferry_migration::admission::DEFAULT_HANDSHAKE_TIMEOUT,
        max_unauthenticated: ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED,
        max_unauthenticated_per_source:
            ferry_migration::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
    };
    let outputs = Outputs::check(&a.engine)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(Destination::new(opts, resume_hook()).serve(listener, tx));
    tracing::info!(
        "demo: {} guest dirtying {}/s, migrating over loopback {addr}",
        units::human(a.guest.memory.bytes),
        units::human(a.guest.dirty_rate)
    );
    let cancel = cancel_on_signal()?;
    let guest = start_guest(&a.guest)?;
    let session = outputs.start(&a.engine, quiet);
    let to = addr.to_string();
    let result = run_source(
        to.clone(),
        &key,
        &guest,
        &a.engine,
        &cancel,
        &session.progress,
    )
    .await;
    let state = guest_state(&result, Some(&guest));
    let r = session
        .finish(result, state, &a.engine, &to, a.guest.memory.bytes)
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    server.abort();
    let s = r?;
    match outcome {
        Ok(Some(o)) => {
            let d = o.result?;
            super::out(&format!(
                "  destination: digest {} verified; {}; {}\n",
                d.digest,
                d.resume_report,
                dest_audit_line(d.audit.as_ref())
            ));
            check_audit(&s)
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
            tracing::warn!(
                "{name}: cancelling the migration (Abort to the destination, guest resumed here); a second signal exits at once"
            );
        } else {
            tracing::warn!(
                "{name}: Commit is already sent, so the migration finishes (cancelling now could leave the guest running nowhere); a second signal exits at once"
            );
        }
    })?;
    Ok(cancel)
}
