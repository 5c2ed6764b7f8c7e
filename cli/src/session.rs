//! One source migration's outputs, whatever its outcome: the `--json`
//! record (checked writable before anything connects, written for every
//! outcome), the `--events` stream, the progress display, the log events
//! of its commit or abort, and the summary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_migration::engine::{Event, Progress, RoundStats, Stamped, Summary};
use ferry_migration::report::{self, Outcome, Partial, Record, Sampler};
use ferry_migration::MigrationError;
use tokio::sync::mpsc;

use super::args::EngineArgs;
use super::progress::Display;
use super::summary::print_summary;

/// Where the guest runs once the migration has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// Committed: on the destination.
    Destination,
    /// Not committed: still (or again) on the source.
    Source,
    /// `Commit` went unconfirmed: paused on the source.
    PausedOnSource,
    /// The migration failed before the guest was set up (a bad key
    /// file, guest memory that cannot be allocated).
    NotStarted,
}

impl GuestState {
    fn name(self) -> &'static str {
        match self {
            GuestState::Destination => "destination",
            GuestState::Source | GuestState::NotStarted => "source",
            GuestState::PausedOnSource => "paused_on_source",
        }
    }
}

/// The `--json` record's file: checked before the migration starts by
/// creating a temporary file beside it, which becomes the record (renamed
/// over the path, so a reader never sees half a record).
#[derive(Debug)]
struct RecordFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl RecordFile {
    fn check(path: &Path) -> anyhow::Result<RecordFile> {
        if path.is_dir() {
            bail!(
                "--json {}: is a directory (nothing was migrated)",
                path.display()
            );
        }
        let Some(name) = path.file_name() else {
            bail!(
                "--json {}: not a file name (nothing was migrated)",
                path.display()
            );
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::File::create(&tmp).with_context(|| {
            format!(
                "--json {}: cannot create a file in {} (nothing was migrated)",
                path.display(),
                dir.display()
            )
        })?;
        Ok(RecordFile {
            path: path.to_path_buf(),
            tmp,
        })
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(&self.tmp, bytes)?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for RecordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// `--events`: standard output or a file.
#[derive(Debug)]
enum Sink {
    Stdout,
    File(std::fs::File),
}

impl Sink {
    fn open(target: &str) -> anyhow::Result<Sink> {
        if target == "-" {
            return Ok(Sink::Stdout);
        }
        let f = std::fs::File::create(target).with_context(|| {
            format!("--events {target}: cannot create it (nothing was migrated)")
        })?;
        Ok(Sink::File(f))
    }

    fn line(&mut self, line: &str) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(line.as_bytes())?;
                o.write_all(b"\n")?;
                o.flush()
            }
            Sink::File(f) => {
                f.write_all(format!("{line}\n").as_bytes())?;
                f.flush()
            }
        }
    }
}

/// What the event feed told about the migration.
#[derive(Debug, Default)]
struct Seen {
    migration_id: Option<u64>,
    option: Option<String>,
    offered: Vec<String>,
    rounds: Vec<RoundStats>,
}

/// The output files of a migration, checked before anything else
/// happens: [`Outputs::check`], then [`Outputs::start`] when the
/// migration starts.
#[derive(Debug)]
pub struct Outputs {
    record: Option<RecordFile>,
    sink: Option<Sink>,
}

impl Outputs {
    /// Checks that `--json` and `--events` can be written (nothing has
    /// connected yet; an error here means no migration happens).
    pub fn check(e: &EngineArgs) -> anyhow::Result<Outputs> {
        Ok(Outputs {
            record: e.json.as_deref().map(RecordFile::check).transpose()?,
            sink: e.events.as_deref().map(Sink::open).transpose()?,
        })
    }

    /// The migration starts: the clock of the time series and events
    /// starts, and the progress display (unless `quiet`).
    pub fn start(self, e: &EngineArgs, quiet: bool) -> Session {
        let events_on_stdout = matches!(self.sink, Some(Sink::Stdout));
        let progress = Arc::new(Progress::default());
        let feed = progress.subscribe();
        let pump = tokio::spawn(pump(feed, self.sink));
        let sampler = Sampler::start(progress.clone(), Duration::from_millis(100));
        let display = (!quiet).then(|| Display::start(progress.clone(), e.progress_interval));
        Session {
            progress,
            record: self.record,
            events_on_stdout,
            sampler,
            display,
            pump,
            started: Instant::now(),
        }
    }
}

/// Outputs of a migration that runs ([`Outputs::start`]), until
/// [`Session::finish`] with its result.
#[derive(Debug)]
pub struct Session {
    /// The engine's live figures and event feed.
    pub progress: Arc<Progress>,
    record: Option<RecordFile>,
    events_on_stdout: bool,
    sampler: Sampler,
    display: Option<Display>,
    pump: tokio::task::JoinHandle<Seen>,
    started: Instant,
}

impl Session {
    /// Ends the outputs with the migration's result: clears the progress
    /// line, ends the event stream with the outcome, writes the record
    /// (a failure to write it after a commit is a warning: the migration
    /// still committed), logs the commit or abort and prints the summary.
    pub async fn finish(
        self,
        result: anyhow::Result<Summary>,
        guest: GuestState,
        e: &EngineArgs,
        destination: &str,
        memory_bytes: u64,
    ) -> anyhow::Result<Summary> {
        if let Some(d) = self.display {
            d.stop();
        }
        let samples = self.sampler.stop();
        let outcome = outcome_of(&result);
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        let reason = result.as_ref().err().and_then(reason_of);
        self.progress.emit(Event::Outcome {
            outcome: outcome.name(),
            reason: reason.clone(),
            error: error.clone(),
        });
        self.progress.unsubscribe();
        let seen = self.pump.await.unwrap_or_default();
        let total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(s) => tracing::info!(
                migration_id = seen.migration_id,
                destination,
                bytes = s.memory_bytes,
                payload_bytes = s.payload_bytes,
                downtime_ms = s.downtime_ms,
                downtime_limit_ms = s.downtime_limit_ms,
                total_ms = s.total_ms,
                "migration committed"
            ),
            Err(err) => {
                let (what, guest_says) = (
                    match outcome {
                        Outcome::NotConverged => "stopped",
                        o => o.name(),
                    },
                    match guest {
                        GuestState::PausedOnSource => "; the guest is left paused on this host (running: false): it may already run on the destination, check there before resuming it",
                        GuestState::NotStarted => "",
                        _ => "; the guest keeps running on this host (running: true)",
                    },
                );
                let msg = format!("migration {what}: {err:#}{guest_says}");
                macro_rules! event {
                    ($level:ident) => {
                        tracing::$level!(
                            migration_id = seen.migration_id,
                            destination,
                            bytes = memory_bytes,
                            outcome = outcome.name(),
                            rounds = seen.rounds.len(),
                            total_ms,
                            guest = guest.name(),
                            "{msg}"
                        )
                    };
                }
                // A failure is an error; a cancel or a guest that did not
                // converge is what was asked for or a limit that held.
                match (guest, outcome) {
                    (GuestState::PausedOnSource, _) | (_, Outcome::Failed) => event!(error),
                    _ => event!(warn),
                }
                super::mark_reported();
            }
        }
        if let Some(file) = &self.record {
            let partial = result.as_ref().err().map(|_| Partial {
                option: seen
                    .option
                    .clone()
                    .unwrap_or_else(|| e.performance_option_name()),
                memory_bytes,
                total_ms,
                downtime_limit_ms: e.downtime_limit.as_secs_f64() * 1e3,
                bandwidth_limit: e.bandwidth_limit,
                rounds: seen.rounds.clone(),
                channels: self.progress.channels(),
            });
            let record = Record {
                schema: report::SCHEMA,
                outcome,
                error,
                reason,
                guest: guest.name(),
                destination,
                migration_id: seen.migration_id,
                summary: result.as_ref().ok(),
                partial,
                samples: &samples,
            };
            let written = serde_json::to_vec_pretty(&record)
                .map_err(std::io::Error::from)
                .and_then(|bytes| file.write(&bytes));
            match written {
                Ok(()) => tracing::debug!(path = %file.path.display(), "record written"),
                Err(err) if result.is_ok() => tracing::warn!(
                    "the migration committed, but its --json record could not be written to {}: {err}",
                    file.path.display()
                ),
                Err(err) => tracing::error!(
                    "--json record could not be written to {}: {err}",
                    file.path.display()
                ),
            }
        }
        if let Ok(s) = &result {
            let notes: Vec<String> = one_path_note(&seen.offered).into_iter().collect();
            print_summary(s, &notes, self.events_on_stdout);
        }
        result
    }
}

/// How `result` ended.
pub fn outcome_of(result: &anyhow::Result<Summary>) -> Outcome {
    let Err(e) = result else {
        return Outcome::Committed;
    };
    let m = || e.chain().filter_map(|c| c.downcast_ref::<MigrationError>());
    if m().any(|m| matches!(m, MigrationError::Cancelled(_))) {
        Outcome::Cancelled
    } else if m().any(MigrationError::is_not_converged) {
        Outcome::NotConverged
    } else {
        Outcome::Failed
    }
}

/// The kind of failure, as the metrics label names it (the first
/// migration error in the chain), when there is one.
pub fn reason_of(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|c| c.downcast_ref::<MigrationError>())
        .map(MigrationError::reason)
}

/// Writes each event as a JSON line to `sink` as it comes, and keeps what
/// the record needs from them.
async fn pump(mut feed: mpsc::UnboundedReceiver<Stamped>, mut sink: Option<Sink>) -> Seen {
    let mut seen = Seen::default();
    while let Some(ev) = feed.recv().await {
        match &ev.event {
            Event::Connected {
                migration_id,
                option,
                offered,
                ..
            } => {
                seen.migration_id = Some(*migration_id);
                seen.option = Some(option.clone());
                seen.offered = offered.clone();
            }
            Event::Round(r) => seen.rounds.push(r.clone()),
            _ => {}
        }
        if let Some(s) = &mut sink {
            let line = serde_json::to_string(&ev).unwrap_or_default();
            if let Err(err) = s.line(&line) {
                tracing::warn!("--events: cannot write ({err}); no more events are written");
                sink = None;
            }
        }
    }
    seen
}

/// When the destination offered one address for data channels and this
/// host has more usable interfaces, the migration used one network path:
/// says so, and the likely reason.
fn one_path_note(offered: &[String]) -> Option<String> {
    let [only] = offered else {
        return None;
    };
    // Data channels pair addresses of one family: this host's others
    // could not have carried any.
    let v4 = only
        .parse::<std::net::IpAddr>()
        .is_ok_and(|a| a.to_canonical().is_ipv4());
    let usable = ferry_migration::nics::discover()
        .map(|l| {
            l.iter()
                .filter(|n| n.usable() && n.addr.to_canonical().is_ipv4() == v4)
                .count()
        })
        .unwrap_or(0);
    (usable > 1).then(|| {
        format!(
            "one network path: the destination offered data channels on {only} only, though this host has {usable} usable interfaces (a destination listening on one address takes data channels there only: ferry listen --listen 0.0.0.0:6600 stripes over all its NICs)"
        )
    })
}
