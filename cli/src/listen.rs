//! `ferry listen`: the destination daemon. Its log (stderr) has an event
//! per migration committed or aborted; its standard output one line per
//! migration with the result, for scripts.

use anyhow::Context;
use ferry_migration::dest::{Destination, ListenOptions};
use ferry_transport::auth::AuthKey;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::args::ListenArgs;
use super::{dest_audit_line, resume_hook, signals, tls_config, units, with_port, AuditFailed};

pub async fn listen(a: ListenArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let tls = tls_config(a.tls_dir.as_deref(), &key)?;
    let backing = if a.hugepages {
        // Said at start, so an operator sees a pool too small before any
        // migration is refused for it.
        let (total, free, resv) = ferry_migration::memory::hugetlb_pool()
            .context("--hugepages: this kernel has no 2 MiB hugetlb pool")?;
        tracing::info!(
            "guest memory from the 2 MiB hugetlb pool (--hugepages): {} of its {total} pages free and not reserved, room for {}",
            free.saturating_sub(resv),
            units::human(free.saturating_sub(resv) * ferry_migration::memory::HUGE_PAGE)
        );
        ferry_migration::memory::Backing::HugeTlb
    } else {
        ferry_migration::memory::Backing::Anonymous
    };
    // Backed before the port is open: a source that connects finds the
    // guest's memory ready, as it would a preallocating VMM's.
    let preallocated = match a.prealloc_guest {
        Some(size) if size > a.memory_limit => anyhow::bail!(
            "--prealloc-guest {} is above --memory-limit {}: no migration could land in it",
            units::human(size),
            units::human(a.memory_limit)
        ),
        Some(size) => {
            let layout = ferry_migration::memory::default_layout(size)
                .with_context(|| format!("--prealloc-guest {size}"))?;
            let p = ferry_migration::memory::preallocated_dest_memory(&layout, backing)
                .with_context(|| format!("--prealloc-guest {}", units::human(size)))?;
            tracing::info!(
                "guest memory of {} preallocated in {:.2} s (CPU {:.2} s): the guest's work, before any migration; the first migration of a {} guest lands in it",
                units::human(size),
                p.wall.as_secs_f64(),
                p.cpu.as_secs_f64(),
                units::human(size),
            );
            Some(p)
        }
        None => None,
    };
    let listen = with_port(&a.listen);
    let addr = tokio::net::lookup_host(&listen)
        .await
        .with_context(|| format!("--listen {}: cannot resolve it", a.listen))?
        .next()
        .with_context(|| format!("--listen {}: no address", a.listen))?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--listen {})", a.listen))?;
    let one_path = one_path_note(addr.ip(), &a.migration_network);
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
        handshake_timeout: a.handshake_timeout,
        max_unauthenticated: a.max_unauthenticated,
        max_unauthenticated_per_source: a.max_unauthenticated_per_source,
    };
    if a.handshake_timeout.is_zero() {
        anyhow::bail!("--handshake-timeout must be above zero");
    }
    let dest = Destination::new(opts, resume_hook());
    if !a.relay_allow.is_empty() {
        dest.set_relay_allow(a.relay_allow.clone());
    }
    dest.set_backing(backing);
    if let Some(p) = preallocated {
        dest.set_preallocated(p);
    }
    tracing::info!(
        "at most {} connections authenticating at once, {} per source address, {} each (descriptor limit {})",
        dest.unauthenticated_cap(),
        a.max_unauthenticated_per_source.max(1),
        format!("{:?}", a.handshake_timeout),
        ferry_ffi::net::nofile_limit().map_or("unknown".into(), |n| n.to_string())
    );
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
            Ok(s) => super::out(&format!(
                "migration {} from {} committed: {} ({} bytes) in {:.2} s, pause {:.1} ms, digest {} verified ({}); {}; {}; {}; peak RSS {} (guest {}, own {:.2}% of the guest); CPU {}{}\n",
                s.migration_id,
                o.peer,
                units::human(s.memory_bytes),
                s.memory_bytes,
                s.total_ms / 1e3,
                s.downtime_ms,
                s.digest,
                if s.verify_full {
                    "page evidence and whole memory"
                } else {
                    "page evidence"
                },
                s.restore_report,
                s.resume_report,
                dest_audit_line(s.audit.as_ref()),
                units::human(s.memory.peak_rss_bytes),
                units::human(s.memory.guest_resident_bytes),
                s.memory.own_percent_of_guest,
                s.cpu,
                one_path.as_deref().map(|n| format!("; {n}")).unwrap_or_default()
            )),
            Err(e) => super::out(&format!("migration from {} failed: {e}\n", o.peer)),
        }
        if a.once {
            server.abort();
            let s = o.result?;
            if let Some(r) = s
                .audit
                .as_ref()
                .filter(|r| r.result == ferry_transport::proto::AuditResult::Failed)
            {
                return Err(AuditFailed(format!(
                    "{} pages differ, first at {:#x}",
                    r.mismatched_pages,
                    r.first_mismatch.unwrap_or(0)
                ))
                .into());
            }
            return Ok(());
        }
    }
    server.await??;
    if signals::exit_status().is_some() {
        tracing::info!("stopped: every migration ended and its memory was freed");
    }
    Ok(())
}

/// A daemon listening on one address takes data channels there only: when
/// this host has other usable interfaces (inside `--migration-network`), it
/// says so at start (with the fix) and returns the note each migration's
/// line carries.
fn one_path_note(
    ip: std::net::IpAddr,
    networks: &[ferry_transport::multichannel::Cidr],
) -> Option<String> {
    // A loopback daemon serves this host only: one path is all there is.
    if ip.is_loopback() {
        return None;
    }
    let local = match ferry_migration::nics::discover() {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("cannot list interfaces: {e}");
            return None;
        }
    };
    // Sources reach this address over its own family, and pair data
    // channels within it: only this family's other addresses are missed
    // (so an unspecified address misses none, on a dual-stack host too).
    let unreached: Vec<std::net::IpAddr> = ferry_migration::nics::unreached(&local, networks, ip)
        .into_iter()
        .filter(|u| u.is_ipv4() == ip.to_canonical().is_ipv4())
        .collect();
    if unreached.is_empty() {
        return None;
    }
    let list = unreached
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(
        unreached = %list,
        "listening on {ip} only: sources can open data channels to this address alone, so each migration gets one network path although this host has {} more usable interface(s) ({list}); to stripe over them, listen on {} (with --migration-network CIDR to keep migrations to that network)",
        unreached.len(),
        if ip.is_ipv4() { "0.0.0.0" } else { "[::]" },
    );
    Some(format!(
        "one network path only: listening on {ip}, not on {list}"
    ))
}
