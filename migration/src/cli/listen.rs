//! `ferry listen`: the destination daemon.

use anyhow::Context;
use ferry_migration::dest::{Destination, ListenOptions};
use ferry_transport::auth::AuthKey;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::args::ListenArgs;
use super::{audit_exit, dest_audit_line, resume_hook, signals, tls_config};

pub async fn listen(a: ListenArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let tls = tls_config(a.tls_dir.as_deref(), &key)?;
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let opts = ListenOptions {
        key,
        memory_limit: a.memory_limit,
        timeout: a.peer_timeout,
        max_concurrent: a.max_concurrent,
        queue: a.queue,
        queue_timeout: a.queue_timeout,
        migration_networks: a.migration_network.clone(),
        tls: tls.clone(),
        plaintext: a.plaintext,
    };
    let dest = Destination::new(opts, resume_hook());
    if let Some(addr) = a.metrics {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
        eprintln!("ferry: metrics on http://{}/metrics", l.local_addr()?);
        let metrics = dest.metrics();
        tokio::spawn(async move {
            if let Err(e) = ferry_migration::metrics::serve(l, metrics).await {
                eprintln!("ferry: metrics server stopped: {e}");
            }
        });
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    eprintln!(
        "ferry: listening on {} ({}; TLS identity: {})",
        listener.local_addr()?,
        if a.plaintext {
            "--plaintext: unencrypted sources and the RDMA option accepted, TLS served to sources that ask"
        } else {
            "TLS 1.3 required"
        },
        tls.mode()
    );
    let d = dest.clone();
    signals::on_signal(move |name| {
        eprintln!(
            "ferry: {name}: shutting down: no new migrations; those before their switchover are aborted and freed, one in its switchover finishes; a second signal exits at once"
        );
        d.shutdown();
    })?;
    let server = tokio::spawn(dest.serve(listener, tx));
    while let Some(o) = rx.recv().await {
        match &o.result {
            Ok(s) => println!(
                "migration {} from {} committed: {} bytes, digest {} verified ({}); {}; {}; {}",
                s.migration_id,
                o.peer,
                s.memory_bytes,
                s.digest,
                if s.verify_full {
                    "page evidence and whole memory"
                } else {
                    "page evidence"
                },
                s.restore_report,
                s.resume_report,
                dest_audit_line(s.audit.as_ref())
            ),
            Err(e) => println!("migration from {} failed: {e}", o.peer),
        }
        if a.once {
            server.abort();
            if let Ok(s) = &o.result {
                audit_exit(
                    s.audit
                        .as_ref()
                        .is_some_and(|a| a.result == ferry_transport::proto::AuditResult::Failed),
                );
            }
            return o.result.map(|_| ()).map_err(Into::into);
        }
    }
    server.await??;
    if signals::exit_status().is_some() {
        eprintln!("ferry: stopped: every migration ended and its memory was freed");
    }
    Ok(())
}
