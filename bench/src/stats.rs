//! Measuring: HDR histograms and their percentiles, send timestamps carried in message bodies,
//! the machine's load, and a sampler of a process's CPU, RSS and open FDs from `/proc`.

use crate::error::BenchError;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Highest latency the histograms track (larger values are clamped): one minute, in µs.
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// How often the process sampler looks at `/proc`.
const SAMPLE_INTERVAL_MS: u64 = 200;
/// The sampler stops by itself after this long even if nobody stops it.
const SAMPLE_DURATION_SECS_MAX: u64 = 3600;

pub fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> Result<(), BenchError> {
    into.add(from)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

/// Percentiles of one latency histogram, in µs (never a mean).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// µs since this process's bench epoch: a send time a receiver in the same process can
/// subtract from its own clock (one monotonic clock, so no skew).
pub fn stamp_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Latency of a stamp taken with [`stamp_us`], at least 1 µs.
pub fn since_stamp_us(stamp: u64) -> u64 {
    stamp_us().saturating_sub(stamp).max(1)
}

/// A JSON body of about `bytes` bytes that starts with a send stamp: `{"t":123,"p":"xx…"}`.
pub fn stamped_body(bytes: usize, stamp: u64) -> Vec<u8> {
    let head = format!("{{\"t\":{stamp},\"p\":\"");
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// The stamp of a body made by [`stamped_body`].
pub fn read_stamp(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` says (`uptime`'s numbers).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What the sampler saw of one process over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcStats {
    pub pid: u32,
    /// CPU time of the server's threads over the run divided by wall time (1.0 = one core).
    /// In-process, the load generator's threads (named `load…`) are left out.
    pub server_cpu_cores: f64,
    /// The whole process's CPU over the run (in-process: server and load generator).
    pub process_cpu_cores: f64,
    pub rss_start_bytes: u64,
    pub rss_peak_bytes: u64,
    pub fds_peak: u64,
}

/// Samples `/proc/<pid>` on its own thread until stopped.
pub struct ProcSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<ProcStats>>,
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (utime + stime) in ticks from a `stat` file's text, and the thread name.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// CPU ticks of (server threads, all threads) of a process.
fn cpu_ticks(pid: u32, in_process: bool) -> (u64, u64) {
    let mut server = 0;
    let mut all = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((name, ticks)) = parse_stat(&text) {
            all += ticks;
            if !(in_process && name.starts_with("load")) {
                server += ticks;
            }
        }
    }
    (server, all)
}

/// VmRSS of a process in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

impl ProcSampler {
    /// Starts sampling `pid`; `in_process` means the load generator shares the process.
    pub fn start(pid: u32, in_process: bool) -> ProcSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("load-sampler".into())
            .spawn(move || {
                let started = Instant::now();
                let ticks0 = cpu_ticks(pid, in_process);
                let mut s = ProcStats {
                    pid,
                    rss_start_bytes: rss_bytes(pid),
                    ..ProcStats::default()
                };
                let deadline = Duration::from_secs(SAMPLE_DURATION_SECS_MAX);
                loop {
                    s.rss_peak_bytes = s.rss_peak_bytes.max(rss_bytes(pid));
                    s.fds_peak = s.fds_peak.max(fd_count(pid));
                    if flag.load(Ordering::Relaxed) || started.elapsed() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(SAMPLE_INTERVAL_MS));
                }
                let ticks1 = cpu_ticks(pid, in_process);
                let wall = started.elapsed().as_secs_f64().max(1e-9);
                let hz = clock_ticks_per_sec();
                s.server_cpu_cores = ticks1.0.saturating_sub(ticks0.0) as f64 / hz / wall;
                s.process_cpu_cores = ticks1.1.saturating_sub(ticks0.1) as f64 / hz / wall;
                s
            })
            .ok();
        ProcSampler { stop, thread }
    }

    pub fn finish(mut self) -> Option<ProcStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for ProcSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Raises this process's open-file limit to `want` (soft and, as far as allowed, hard).
/// Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not privileged: go as far as the hard limit.
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_through_a_body() {
        // Proves a stamped body is valid JSON of the asked size whose stamp reads back.
        let b = stamped_body(128, 987_654);
        assert_eq!(b.len(), 128);
        assert_eq!(read_stamp(&b), Some(987_654));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["t"], 987_654);
    }

    #[test]
    fn sampler_sees_this_process() {
        // Proves the /proc sampler reads a nonzero RSS and FD count for a live process.
        let s = ProcSampler::start(std::process::id(), true);
        std::thread::sleep(Duration::from_millis(50));
        let st = s.finish().expect("sampled");
        assert!(st.rss_peak_bytes > 0 && st.fds_peak > 0);
    }
}
