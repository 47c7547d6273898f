//! The run's trace: its hash, and the lines `--trace` and violation reports show.

use super::*;

/// Where `--trace` lines go.
pub(crate) type TraceSink = Box<dyn FnMut(&str) + Send>;

/// The run's trace. Its hash covers every event the run processes (its time, kind and ids:
/// `Event::hash_into`), whether or not lines are written, so a run has one hash with or
/// without `--trace`. Lines, which cost most of a fast run's time to format, are made only
/// for a sink (`--trace`) or for the ring of last lines a violation report carries; a fast
/// run that fails is run again with the ring on (`crate::run`), which determinism makes the
/// same run.
pub(crate) struct Trace {
    pub(crate) hash: Fnv,
    /// Whether lines are formatted at all.
    pub(crate) lines: bool,
    /// The last [`TRACE_RING_LINES`] lines, if kept.
    pub(crate) ring: Option<VecDeque<String>>,
    /// Every line also goes here (`fabric sim --trace`).
    pub(crate) sink: Option<TraceSink>,
}

impl Trace {
    pub(super) fn line(&mut self, now: u64, text: String) {
        let line = format!("{now:>6}ms {text}");
        if let Some(sink) = &mut self.sink {
            sink(&line);
        }
        if let Some(ring) = &mut self.ring {
            if ring.len() == TRACE_RING_LINES {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }
}
