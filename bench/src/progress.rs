//! A progress bar on stderr while a scenario runs (hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the bar redraws.
const TICK_MS: u64 = 200;

/// A bar that fills with time (or with a count when `total` is a count) and shows a counter.
pub struct Progress {
    bar: ProgressBar,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Fills over `duration`, showing `counter` (what the scenario counts, e.g. acks) per second.
    pub fn timed(label: &str, duration: Duration, counter: Arc<AtomicU64>) -> Progress {
        let total_ms = duration.as_millis().max(1) as u64;
        let bar = ProgressBar::new(total_ms);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Self::drive(bar, move |bar, started| {
            let ms = started.elapsed().as_millis() as u64;
            bar.set_position(ms.min(total_ms));
            let n = counter.load(Ordering::Relaxed);
            bar.set_message(format!(
                "{n} ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64().max(1e-3)
            ));
            ms < total_ms
        })
    }

    /// Fills as `counter` goes to `total`.
    pub fn counted(label: &str, total: u64, counter: Arc<AtomicU64>) -> Progress {
        let bar = ProgressBar::new(total.max(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Self::drive(bar, move |bar, _| {
            let n = counter.load(Ordering::Relaxed);
            bar.set_position(n.min(total));
            n < total
        })
    }

    fn drive(
        bar: ProgressBar,
        mut tick: impl FnMut(&ProgressBar, Instant) -> bool + Send + 'static,
    ) -> Progress {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let b = bar.clone();
        // The bar stops with `finish` or when it is full; the loop cannot outlive either.
        let thread = std::thread::Builder::new()
            .name("load-progress".into())
            .spawn(move || {
                let started = Instant::now();
                while !flag.load(Ordering::Relaxed) && tick(&b, started) {
                    std::thread::sleep(Duration::from_millis(TICK_MS));
                }
            })
            .ok();
        Progress { bar, stop, thread }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
