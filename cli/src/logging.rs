//! The `ferry` command's one logging path: every diagnostic is a `tracing`
//! event on stderr, as text or JSON lines (`--log-format`), at the level
//! `-v`/`-q` pick unless `RUST_LOG` says otherwise. Standard output holds
//! only results (`send`'s summary, `listen`'s line per migration, `nics`,
//! `report`).
//!
//! A progress line on a terminal ([`set_progress_bar`]) is hidden while a
//! log line is written and redrawn after it, so the two never mix.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use super::args::OUTPUT;

/// `-v`, `-q`, `--log-format`: accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// More detail in the log: -v debug, -vv trace (of ferry's own crates).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = OUTPUT)]
    pub verbose: u8,
    /// Warnings and errors only, and no progress display.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = OUTPUT)]
    pub quiet: bool,
    /// Log lines as text, or as JSON objects one per line (for log
    /// collectors). RUST_LOG, when set, overrides -v/-q (e.g.
    /// RUST_LOG=ferry_transport=trace,info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, help_heading = OUTPUT)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL message key=value...`.
    Text,
    /// One JSON object per line: timestamp, level, fields (message
    /// included), target, spans.
    Json,
}

/// Ferry's own crates, whose level `-v`/`-q` set (others stay at warn).
const CRATES: [&str; 4] = ["ferry", "ferry_migration", "ferry_transport", "ferry_proto"];

/// The filter for the flags, unless `RUST_LOG` is set.
pub fn filter(a: &LogArgs) -> EnvFilter {
    if let Ok(f) = EnvFilter::try_from_default_env() {
        return f;
    }
    let level = match (a.quiet, a.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let spec = std::iter::once("warn".to_string())
        .chain(CRATES.iter().map(|c| format!("{c}={level}")))
        .collect::<Vec<_>>()
        .join(",");
    EnvFilter::new(spec)
}

/// Starts logging to stderr.
pub fn init(a: &LogArgs) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(a))
        .with_writer(Stderr)
        // A log reader that went away must not take the process with it:
        // tracing-subscriber would report the failed write with eprintln!,
        // which panics on a closed stderr (in whatever task was logging:
        // the signal handler, a migration).
        .log_internal_errors(false)
        // The module path only when asked for detail.
        .with_target(a.verbose > 0);
    match a.log_format {
        LogFormat::Text => builder
            // Colour codes only on a terminal: logs and CI captures stay plain.
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The progress line on the terminal, if one is shown.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Shows `bar` as the terminal's progress line (`None`: removes it): log
/// lines are then written above it.
pub fn set_progress_bar(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// stderr, writing around the progress line.
#[derive(Debug, Clone, Copy)]
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    /// A closed stderr loses the line, nothing else (see [`init`]).
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        };
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
