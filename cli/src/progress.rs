//! The progress display of `ferry send`: on a terminal, one line redrawn
//! in place (cleared before the summary); otherwise (logs, systemd, CI)
//! a `progress` log event every `--progress-interval`.
//!
//! Both show the phase, how far the current round is (percent of its
//! set), the rate, the round's ETA, the dirty bytes left after the last
//! round, and each data channel's rate.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migration::engine::{Phase, Progress};
use ferry_transport::ChannelState;
use indicatif::{ProgressBar, ProgressStyle};

use super::{logging, units};

/// Rates are measured over at least this long.
const WINDOW: Duration = Duration::from_millis(500);

/// A running progress display.
#[derive(Debug)]
pub struct Display {
    task: tokio::task::JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Display {
    /// Starts showing `p`: a line on stderr when it is a terminal, else a
    /// log event every `every`.
    pub fn start(p: Arc<Progress>, every: Duration) -> Display {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .expect("template"),
            );
            logging::set_progress_bar(Some(bar.clone()));
            let b = bar.clone();
            let task = tokio::spawn(async move {
                let mut m = Meter::new();
                loop {
                    b.set_message(m.line(&p).text);
                    b.tick();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Display {
                task,
                bar: Some(bar),
            }
        } else {
            let task = tokio::spawn(async move {
                let mut m = Meter::new();
                let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
                tick.tick().await;
                loop {
                    // Sample often enough for the rates, log at the interval.
                    tokio::select! {
                        _ = tick.tick() => {
                            let l = m.line(&p);
                            tracing::info!(
                                phase = l.phase,
                                round = l.round,
                                percent = l.percent,
                                rate_bytes_per_sec = l.rate,
                                eta_s = l.eta_s,
                                dirty_bytes = l.dirty,
                                "progress: {}",
                                l.text
                            );
                        }
                        _ = tokio::time::sleep(Duration::from_millis(250)) => { m.line(&p); }
                    }
                }
            });
            Display { task, bar: None }
        }
    }

    /// Stops, and clears the terminal line.
    pub fn stop(self) {
        self.task.abort();
        if let Some(b) = self.bar {
            b.finish_and_clear();
            logging::set_progress_bar(None);
        }
    }
}

/// One reading of the progress.
#[derive(Debug, Default)]
pub struct Line {
    /// For people.
    pub text: String,
    /// `connecting`, `precopy`, `switchover`, `done`.
    pub phase: &'static str,
    /// Current round.
    pub round: u64,
    /// How far the round is, percent.
    pub percent: f64,
    /// Page bytes per second sent, recently.
    pub rate: u64,
    /// Seconds until the round ends at the recent pace, when known.
    pub eta_s: Option<f64>,
    /// Dirty bytes left after the last round.
    pub dirty: u64,
}

/// Turns successive readings of [`Progress`] into rates.
#[derive(Debug)]
struct Meter {
    /// (when, sent bytes, round, round done, per channel bytes) at the
    /// start of the current window.
    then: (Instant, u64, u64, u64, Vec<u64>),
    rate: u64,
    done_rate: f64,
    channel_rates: Vec<u64>,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            then: (Instant::now(), 0, 0, 0, Vec::new()),
            rate: 0,
            done_rate: 0.0,
            channel_rates: Vec::new(),
        }
    }

    fn line(&mut self, p: &Progress) -> Line {
        let sent = p.sent_bytes.load(Ordering::Relaxed);
        let round = p.round.load(Ordering::Relaxed);
        let round_bytes = p.round_bytes.load(Ordering::Relaxed);
        let dirty = p.remaining_bytes.load(Ordering::Relaxed);
        let chans = p.channels();
        // The engine counts pages as done when it hands them to the
        // transport; what the channels have not carried yet is not done.
        let carried: u64 = chans.iter().map(|c| c.payload_bytes).sum();
        let in_flight = if chans.is_empty() {
            0
        } else {
            sent.saturating_sub(carried)
        };
        let done = p
            .round_done
            .load(Ordering::Relaxed)
            .saturating_sub(in_flight)
            .min(round_bytes);
        let dt = self.then.0.elapsed();
        if dt >= WINDOW {
            let secs = dt.as_secs_f64();
            self.rate = (sent.saturating_sub(self.then.1) as f64 / secs) as u64;
            self.done_rate = if round == self.then.2 {
                done.saturating_sub(self.then.3) as f64 / secs
            } else {
                // A new round began in the window: its part only.
                done as f64 / secs
            };
            self.channel_rates = chans
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let before = self.then.4.get(i).copied().unwrap_or(0);
                    (c.payload_bytes.saturating_sub(before) as f64 / secs) as u64
                })
                .collect();
            self.then = (
                Instant::now(),
                sent,
                round,
                done,
                chans.iter().map(|c| c.payload_bytes).collect(),
            );
        }
        let phase = p.phase();
        let percent = if round_bytes == 0 {
            0.0
        } else {
            done as f64 * 100.0 / round_bytes as f64
        };
        let eta_s = (self.done_rate > 0.0 && done < round_bytes)
            .then(|| (round_bytes - done) as f64 / self.done_rate);
        let eta = match eta_s {
            Some(s) => format!("ETA {}", eta_text(s)),
            None => "ETA -".into(),
        };
        let per_channel: String = if chans.len() > 1 {
            let list: Vec<String> = chans
                .iter()
                .enumerate()
                .map(|(i, c)| match c.state {
                    ChannelState::Failed => format!("ch{i} failed"),
                    _ => format!(
                        "ch{i} {}/s",
                        units::human(self.channel_rates.get(i).copied().unwrap_or(0))
                    ),
                })
                .collect();
            format!(" | {}", list.join(" "))
        } else {
            String::new()
        };
        let head = match phase {
            Phase::Connecting => "connecting".to_string(),
            Phase::Precopy => format!(
                "round {round}: {percent:.0}% of {}",
                units::human(round_bytes)
            ),
            Phase::Switchover => format!(
                "switchover (guest paused): final copy {percent:.0}% of {}",
                units::human(round_bytes)
            ),
            Phase::Done => "done".to_string(),
        };
        let text = match phase {
            Phase::Connecting | Phase::Done => head,
            _ => format!(
                "{head} | {}/s | {eta} | dirty left {} | sent {}{per_channel}",
                units::human(self.rate),
                units::human(dirty),
                units::human(sent),
            ),
        };
        Line {
            text,
            phase: phase.name(),
            round,
            percent: (percent * 10.0).round() / 10.0,
            rate: self.rate,
            eta_s: eta_s.map(|s| (s * 10.0).round() / 10.0),
            dirty,
        }
    }
}

/// `12s`, `3m05s`, `1h02m`.
fn eta_text(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_percent_rate_eta_and_channels() {
        let p = Progress::default();
        p.phase.store(Phase::Precopy as u8, Ordering::Relaxed);
        p.round.store(2, Ordering::Relaxed);
        p.round_bytes.store(100 << 20, Ordering::Relaxed);
        p.round_done.store(25 << 20, Ordering::Relaxed);
        p.remaining_bytes.store(40 << 20, Ordering::Relaxed);
        let mut m = Meter::new();
        let l = m.line(&p);
        assert!(
            l.text.starts_with("round 2: 25% of 100.00 MiB"),
            "{}",
            l.text
        );
        assert_eq!(l.percent, 25.0);
        assert!(l.text.contains("dirty left 40.00 MiB"), "{}", l.text);
        // A window later, with progress made: a rate and an ETA.
        m.then.0 -= WINDOW;
        p.round_done.store(50 << 20, Ordering::Relaxed);
        p.sent_bytes.store(25 << 20, Ordering::Relaxed);
        let l = m.line(&p);
        assert!(l.rate > 0, "{l:?}");
        let eta = l.eta_s.expect("eta");
        assert!(eta > 0.0 && eta < 10.0, "{l:?}");
        assert!(l.text.contains("ETA "), "{}", l.text);
        // Pages handed to the transport but not carried yet are not done.
        *p.channels.lock().unwrap() = vec![ferry_transport::ChannelStats {
            payload_bytes: 5 << 20,
            ..Default::default()
        }];
        let l = m.line(&p);
        assert_eq!(l.percent, 30.0, "{l:?}");
    }

    #[test]
    fn eta_texts() {
        assert_eq!(eta_text(5.2), "5s");
        assert_eq!(eta_text(185.0), "3m05s");
        assert_eq!(eta_text(3720.0), "1h02m");
    }
}
