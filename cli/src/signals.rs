//! SIGINT and SIGTERM: the first one asks for a clean stop (`send`:
//! cancel the migration; `listen`: shut down), a second one exits at once.

use std::sync::atomic::{AtomicI32, Ordering};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The first signal received (its number), 0 before any.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The exit status for a run stopped by the signal received, `128 + N` as
/// shells report a signal (130 for SIGINT, 143 for SIGTERM).
pub fn exit_status() -> Option<i32> {
    match RECEIVED.load(Ordering::Relaxed) {
        0 => None,
        n => Some(128 + n),
    }
}

/// Watches for SIGINT and SIGTERM from now on: the first runs `first`
/// with the signal's name, a second makes the process exit at once
/// (status 128 + N) after saying so.
pub fn on_signal(first: impl FnOnce(&'static str) + Send + 'static) -> anyhow::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let (name, n) = next(&mut int, &mut term).await;
        RECEIVED.store(n, Ordering::Relaxed);
        first(name);
        let (name, n) = next(&mut int, &mut term).await;
        tracing::error!("second signal ({name}): exiting now");
        std::process::exit(128 + n);
    });
    Ok(())
}

/// The next SIGINT or SIGTERM: its name and number.
async fn next(int: &mut Signal, term: &mut Signal) -> (&'static str, i32) {
    tokio::select! {
        _ = int.recv() => ("SIGINT", SignalKind::interrupt().as_raw_value()),
        _ = term.recv() => ("SIGTERM", SignalKind::terminate().as_raw_value()),
    }
}
