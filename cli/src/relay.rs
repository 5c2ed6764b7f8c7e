//! `ferry relay`: a hypervisor's own migration connections carried over
//! Ferry's data channels (issue 13, `docs/relay.md`). One relay carries one
//! migration and exits: 0 only when every byte of every stream was
//! delivered to the destination's hypervisor and its digest matched.

use std::io::Write;
use std::sync::Arc;

use anyhow::bail;
use ferry_migration::nics::MultichannelOptions;
use ferry_migration::relay::{prepare_source, RelayReport, SourceOptions};
use ferry_migration::units::human;
use ferry_transport::auth::AuthKey;

use super::args::{OptionArg, RelayArgs};
use super::{out, tls_config, with_port};

/// `--events`: JSON lines to a file or standard output.
struct Events(Option<Box<dyn Write + Send>>);

impl Events {
    fn open(target: Option<&str>) -> anyhow::Result<Self> {
        Ok(Events(match target {
            None => None,
            Some("-") => Some(Box::new(std::io::stdout())),
            Some(f) => Some(Box::new(std::fs::File::create(f).map_err(|e| {
                anyhow::anyhow!("--events {f}: cannot create it ({e}); nothing was relayed")
            })?)),
        }))
    }

    fn emit(&mut self, v: serde_json::Value) {
        if let Some(w) = &mut self.0 {
            let _ = writeln!(w, "{v}").and_then(|()| w.flush());
        }
    }
}

fn rate(r: &RelayReport) -> String {
    if r.seconds <= 0.0 {
        return String::new();
    }
    format!(
        ", {:.2} Gbit/s of stream bytes",
        r.stream_bytes as f64 * 8.0 / r.seconds / 1e9
    )
}

pub async fn relay(a: RelayArgs) -> anyhow::Result<()> {
    let key = AuthKey::from_file(&a.auth_key_file)?;
    let compression = match a.performance_option {
        OptionArg::Tcp => None,
        OptionArg::Compression | OptionArg::Auto => Some(a.compression),
        OptionArg::Rdma => {
            bail!("--performance-option rdma does not carry byte streams: use tcp or compression")
        }
    };
    if matches!(a.bandwidth_limit, Some(0)) {
        bail!("--bandwidth-limit must be above zero");
    }
    let Ok(window) = u32::try_from(a.window) else {
        bail!("--window {}: at most 256MiB", a.window);
    };
    let tls = if a.plaintext {
        None
    } else {
        Some(tls_config(a.tls_dir.as_deref(), &key)?)
    };
    let mut events = Events::open(a.events.as_deref())?;
    let o = SourceOptions {
        listen: a.listen,
        to: with_port(&a.to),
        deliver_to: a.deliver_to.clone(),
        key,
        compression,
        multichannel: MultichannelOptions {
            channels: a.channels,
            nics: a.nic.clone(),
            channel_timeout: a.channel_timeout,
        },
        tls,
        bandwidth_limit: a.bandwidth_limit,
        timeout: a.peer_timeout,
        window,
        chunk: ferry_migration::relay::MAX_STREAM_CHUNK.min(window),
        max_streams: a.max_streams,
    };
    let record = |outcome: &str,
                  report: Option<&RelayReport>,
                  error: Option<String>,
                  reason: Option<String>| {
        serde_json::json!({
            "outcome": outcome,
            "listen": a.listen.to_string(),
            "to": a.to,
            "deliver_to": a.deliver_to,
            "report": report,
            "error": error,
            "reason": reason,
        })
    };
    let write_json = |v: &serde_json::Value| {
        if let Some(p) = &a.json {
            if let Err(e) = std::fs::write(p, serde_json::to_vec_pretty(v).unwrap_or_default()) {
                tracing::warn!("--json {}: cannot write it: {e}", p.display());
            }
        }
    };
    let ready = match prepare_source(&o).await {
        Ok(r) => r,
        Err(e) => {
            let v = record("failed", None, Some(e.to_string()), Some(e.reason()));
            write_json(&v);
            events.emit(serde_json::json!({"event": "failed", "error": e.to_string(), "reason": e.reason()}));
            bail!("relay not started: {e}");
        }
    };
    let listen = ready.listen;
    tracing::info!(channels = ?ready.paths, "data channels open");
    out(&format!(
        "relay: ready, migrate to tcp:{listen} ({} data channel{} to {})\n",
        ready.paths.len(),
        if ready.paths.len() == 1 { "" } else { "s" },
        o.to
    ));
    events.emit(serde_json::json!({
        "event": "ready",
        "listen": listen.to_string(),
        "channels": ready.paths,
    }));
    let events = Arc::new(std::sync::Mutex::new(events));
    match ready.run().await {
        Ok(r) => {
            let streams: Vec<String> = r
                .streams
                .iter()
                .map(|s| {
                    format!(
                        "{} {}: {} / {}",
                        s.stream,
                        s.label,
                        human(s.forward_bytes),
                        human(s.back_bytes)
                    )
                })
                .collect();
            out(&format!(
                "relay: done: {} stream{} delivered and checked ({}) in {:.2} s{}; {} on the wire, {} chunks resent\n",
                r.streams.len(),
                if r.streams.len() == 1 { "" } else { "s" },
                streams.join("; "),
                r.seconds,
                rate(&r),
                human(r.wire_bytes),
                r.resent_chunks
            ));
            write_json(&record("delivered", Some(&r), None, None));
            events
                .lock()
                .expect("events")
                .emit(serde_json::json!({"event": "done", "streams": r.streams.len(), "stream_bytes": r.stream_bytes, "seconds": r.seconds}));
            Ok(())
        }
        Err(e) => {
            write_json(&record(
                "failed",
                None,
                Some(e.to_string()),
                Some(e.reason()),
            ));
            events
                .lock()
                .expect("events")
                .emit(serde_json::json!({"event": "failed", "error": e.to_string(), "reason": e.reason()}));
            bail!("relay failed (both hypervisors' connections were reset; QEMU reports the migration failed and keeps the guest on the source): {e}")
        }
    }
}
