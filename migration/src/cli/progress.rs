//! The progress display of `ferry send`.

use std::sync::Arc;
use std::time::Duration;

use ferry_migration::engine::{Phase, Progress};
use ferry_transport::ChannelState;
use indicatif::{ProgressBar, ProgressStyle};

use super::units;

pub fn progress_bar(p: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("template"),
        );
        let started = std::time::Instant::now();
        let mut last: (std::time::Instant, Vec<u64>) = (started, Vec::new());
        let mut rates: Vec<u64> = Vec::new();
        loop {
            let chans = p.channels();
            let dt = last.0.elapsed().as_secs_f64();
            if dt >= 0.5 {
                rates = chans
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let before = last.1.get(i).copied().unwrap_or(0);
                        (c.payload_bytes.saturating_sub(before) as f64 / dt) as u64
                    })
                    .collect();
                last = (
                    std::time::Instant::now(),
                    chans.iter().map(|c| c.payload_bytes).collect(),
                );
            }
            let per_channel: String = if chans.len() > 1 {
                chans
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c.state {
                        ChannelState::Failed => format!(" ch{i} failed"),
                        _ => format!(
                            " ch{i} {}/s",
                            units::human(rates.get(i).copied().unwrap_or(0))
                        ),
                    })
                    .collect::<String>()
            } else {
                String::new()
            };
            let sent = p.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let phase = match p.phase() {
                Phase::Connecting => "connecting".to_string(),
                Phase::Precopy => format!(
                    "round {}",
                    p.round.load(std::sync::atomic::Ordering::Relaxed)
                ),
                Phase::Switchover => "switchover (guest paused)".to_string(),
                Phase::Done => "done".to_string(),
            };
            bar.set_message(format!(
                "{phase} | remaining dirty {} | sent {} | {}/s{}{per_channel}",
                units::human(p.remaining_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                units::human(sent),
                units::human(rate as u64),
                if per_channel.is_empty() { "" } else { " |" },
            ));
            bar.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
