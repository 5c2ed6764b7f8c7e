//! `ferry listen`: the destination daemon. Its log (stderr) has an event
//! per migration committed or aborted; its standard output one line per
//! migration with the result, for scripts.

use anyhow::Context;
use ferry_migration::dest::{Destination, ListenOptions};
use ferry_transport::auth::AuthKey;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::args::ListenArgs;
use super::{resume_hook, signals, tls_config, units};

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
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        let metrics = dest.metrics();
        tokio::spawn(async move {
            if let Err(e) = ferry_migration::metrics::serve(l, metrics).await {
                tracing::error!("metrics server stopped: {e}");
            }
        });
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    tracing::info!(
        "listening on {} ({}; TLS identity: {})",
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
        tracing::warn!(
            "{name}: shutting down: no new migrations; those before their switchover are aborted and freed, one in its switchover finishes; a second signal exits at once"
        );
        d.shutdown();
    })?;
    let server = tokio::spawn(dest.serve(listener, tx));
    while let Some(o) = rx.recv().await {
        match &o.result {
            Ok(s) => println!(
                "migration {} from {} committed: {} ({} bytes) in {:.2} s, pause {:.1} ms, digest {} verified; {}",
                s.migration_id,
                o.peer,
                units::human(s.memory_bytes),
                s.memory_bytes,
                s.total_ms / 1e3,
                s.downtime_ms,
                s.digest,
                s.resume_report
            ),
            Err(e) => println!("migration from {} failed: {e}", o.peer),
        }
        if a.once {
            server.abort();
            return o.result.map(|_| ()).map_err(Into::into);
        }
    }
    server.await??;
    if signals::exit_status().is_some() {
        tracing::info!("stopped: every migration ended and its memory was freed");
    }
    Ok(())
}
