//! Logging that can never take the node down.
//!
//! tracing-subscriber's fmt layer reports a failed write with `eprintln!`, which panics when
//! stderr itself fails (a full log disk, a closed pipe): the panic then kills whichever task
//! logged, the shard supervisor included. And a stderr pipe nobody reads blocks every thread
//! that logs. So log lines go through [`LogQueue`]: the layer formats a line into memory and
//! hands it to a bounded queue ([`LOG_QUEUE_LINES_MAX`]) without ever blocking or failing; one
//! thread writes the queue to stderr. A line that finds the queue full is dropped and counted
//! (`fabric_log_lines_dropped_total`), a failed write is counted
//! (`fabric_log_write_errors_total`); neither is ever an error anywhere else.
//!
//! [`say`] is the same promise for the few lines printed to stdout (the listening address, a
//! generated admin token): a closed stdout must not stop a start.

use crate::config::LogFormat;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Log lines waiting for the writer thread; past it new lines are dropped (and counted).
pub const LOG_QUEUE_LINES_MAX: usize = 4096;
/// How long [`LogGuard`] waits at exit for queued lines to be written.
const FLUSH_WAIT_MS: u64 = 2_000;

/// Process-wide logging figures (logging is per process, not per node).
#[derive(Debug, Default)]
pub struct LogStats {
    /// Log lines whose write to stderr failed.
    pub write_errors: AtomicU64,
    /// Log lines dropped because the queue was full (stderr slower than the node logs).
    pub lines_dropped: AtomicU64,
    /// stdout lines ([`say`]) whose write failed.
    pub stdout_errors: AtomicU64,
}

pub static STATS: LogStats = LogStats {
    write_errors: AtomicU64::new(0),
    lines_dropped: AtomicU64::new(0),
    stdout_errors: AtomicU64::new(0),
};

enum Item {
    Line(Vec<u8>),
    Flush(Sender<()>),
}

/// A `MakeWriter` for tracing-subscriber: each event's writer collects its line in memory and
/// queues it when dropped. Never blocks, never fails.
#[derive(Clone)]
pub struct LogQueue {
    tx: Sender<Item>,
}

/// One event's line on its way to the queue.
pub struct QueuedLine<'a> {
    buf: Vec<u8>,
    tx: &'a Sender<Item>,
}

impl Write for QueuedLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        match self.tx.try_send(Item::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                STATS.lines_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> QueuedLine<'a> {
        QueuedLine {
            buf: Vec::new(),
            tx: &self.tx,
        }
    }
}

/// Writes queued lines to `sink` until every `LogQueue` is gone; a failed write is counted.
fn write_loop(rx: Receiver<Item>, mut sink: Box<dyn Write + Send>) {
    while let Ok(item) = rx.recv() {
        match item {
            Item::Line(line) => {
                if sink.write_all(&line).and_then(|()| sink.flush()).is_err() {
                    STATS.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Item::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Starts the writer thread for `sink`; returns the writer for the subscriber and the guard
/// that flushes at exit.
pub fn queue(sink: Box<dyn Write + Send>) -> std::io::Result<(LogQueue, LogGuard)> {
    let (tx, rx) = crossbeam_channel::bounded(LOG_QUEUE_LINES_MAX);
    std::thread::Builder::new()
        .name("fabric-log".into())
        .spawn(move || write_loop(rx, sink))?;
    Ok((LogQueue { tx: tx.clone() }, LogGuard { tx }))
}

/// Held by `main`: when dropped (at exit), waits briefly for queued lines to be written.
pub struct LogGuard {
    tx: Sender<Item>,
}

impl LogGuard {
    /// Waits (at most 2 s) until every line queued before this call is written.
    pub fn flush(&self) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let wait = Duration::from_millis(FLUSH_WAIT_MS);
        if self.tx.send_timeout(Item::Flush(done_tx), wait).is_ok() {
            let _ = done_rx.recv_timeout(wait);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Installs the node's global subscriber: level from `FABRIC_LOG` (env-filter syntax, default
/// `info`), lines in `format` to stderr through the queue. Keep the guard until exit.
pub fn init(format: LogFormat) -> std::io::Result<LogGuard> {
    init_with(format, Box::new(std::io::stderr()))
}

/// [`init`] writing to `sink` instead of stderr.
pub fn init_with(format: LogFormat, sink: Box<dyn Write + Send>) -> std::io::Result<LogGuard> {
    let (writer, guard) = queue(sink)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FABRIC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The writer never reports an error, so the layer never reaches its `eprintln!`; turning
    // its internal error reports off as well keeps that true should the writer change.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(guard)
}

/// Prints one line to stdout; a failed write (closed pipe, full disk) is counted, never a
/// panic as `println!` would be.
pub fn say(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .is_err()
    {
        STATS.stdout_errors.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that fails every write, as stderr on a full disk or a closed pipe does.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_sink_is_counted_and_a_full_queue_drops_lines_without_blocking() {
        // Proves writes to a broken sink are counted, not raised, and that queuing a line
        // never blocks or fails even when the writer thread cannot keep up.
        use tracing_subscriber::fmt::MakeWriter;
        let (q, guard) = queue(Box::new(Broken)).unwrap();
        let before = STATS.write_errors.load(Ordering::Relaxed);
        for _ in 0..10 {
            let mut w = q.make_writer();
            w.write_all(b"a line\n").unwrap();
        }
        guard.flush();
        assert!(STATS.write_errors.load(Ordering::Relaxed) >= before + 10);

        // A sink that blocks: the queue fills, later lines are dropped and counted.
        let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
        struct Blocked(std::sync::mpsc::Receiver<()>);
        impl Write for Blocked {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (q, guard) = queue(Box::new(Blocked(block_rx))).unwrap();
        let dropped = STATS.lines_dropped.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        for _ in 0..LOG_QUEUE_LINES_MAX + 100 {
            let mut w = q.make_writer();
            w.write_all(b"x\n").unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never blocks");
        assert!(STATS.lines_dropped.load(Ordering::Relaxed) >= dropped + 99);
        drop(block_tx);
        drop(guard);
    }
}
