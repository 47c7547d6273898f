//! What every scenario hands back: named figures with units, the conditions of the run (fsync
//! probe, load average, server process samples), a table for people, JSON for files, the
//! baseline check and the Fabric/NATS ratios.

use crate::fsync_probe::FsyncProbe;
use crate::stats::{Latency, ProcStats};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// How far below (or, for costs, above) its baseline floor a figure may be before it is
/// reported as a regression.
pub const REGRESSION_RATIO_MAX: f64 = 0.20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    PerSec,
    Micros,
    Bytes,
    Count,
    Ratio,
    Secs,
    Cores,
}

impl Unit {
    /// Throughputs and ratios are better high; latencies and costs are better low.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Unit::PerSec | Unit::Ratio)
    }

    fn format(self, v: f64) -> String {
        match self {
            Unit::PerSec => format!("{}/s", thousands(v)),
            Unit::Micros => format!("{:.2} ms", v / 1000.0),
            Unit::Bytes if v >= 1e6 => format!("{:.1} MB", v / 1e6),
            Unit::Bytes => format!("{:.1} KiB", v / 1024.0),
            Unit::Count => thousands(v),
            Unit::Ratio => format!("{:.4}", v),
            Unit::Secs => format!("{:.2} s", v),
            Unit::Cores => format!("{:.2} cores", v),
        }
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Figure {
    pub key: String,
    pub value: f64,
    pub unit: Unit,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    /// `fabric`, `nats (default policy)` or `nats (sync_interval: always)`.
    pub system: String,
    /// The durability policy the system ran with, in words.
    pub policy: String,
    pub params: serde_json::Value,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub fsync_probe: Option<FsyncProbe>,
    pub load_average: String,
    pub server: Option<ProcStats>,
}

impl Report {
    pub fn new(scenario: &str, system: &str, policy: &str, params: serde_json::Value) -> Report {
        Report {
            scenario: scenario.into(),
            system: system.into(),
            policy: policy.into(),
            params,
            figures: Vec::new(),
            notes: Vec::new(),
            fsync_probe: None,
            load_average: crate::stats::load_average(),
            server: None,
        }
    }

    pub fn add(&mut self, key: &str, value: f64, unit: Unit) {
        self.figures.push(Figure {
            key: key.into(),
            value,
            unit,
        });
    }

    /// `{prefix}_p50_us` … `{prefix}_max_us`.
    pub fn add_latency(&mut self, prefix: &str, l: &Latency) {
        for (name, v) in [
            ("p50", l.p50_us),
            ("p95", l.p95_us),
            ("p99", l.p99_us),
            ("p999", l.p999_us),
            ("max", l.max_us),
        ] {
            self.add(&format!("{prefix}_{name}_us"), v as f64, Unit::Micros);
        }
    }

    /// Adds the server samples as figures too (so they are compared and checked).
    pub fn set_server(&mut self, s: Option<ProcStats>) {
        if let Some(s) = s {
            self.add("server_cpu_cores", s.server_cpu_cores, Unit::Cores);
            self.add(
                "server_rss_peak_bytes",
                s.rss_peak_bytes as f64,
                Unit::Bytes,
            );
            self.add("server_fds_peak", s.fds_peak as f64, Unit::Count);
        }
        self.server = s;
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).map(|f| f.value)
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "{} on {} ({}), load average {}\n  params {}\n",
            self.scenario, self.system, self.policy, self.load_average, self.params
        );
        for f in &self.figures {
            let _ = writeln!(s, "  {:<34}{:>18}", f.key, f.unit.format(f.value));
        }
        if let Some(p) = &self.fsync_probe {
            let _ = writeln!(
                s,
                "  fsync probe ({} B write + fdatasync, {:.1} s): p50 {:.2} ms, p99 {:.2} ms, {:.0} syncs/s{}",
                crate::fsync_probe::WRITE_BYTES,
                p.duration.as_secs_f64(),
                p.p50_us as f64 / 1000.0,
                p.p99_us as f64 / 1000.0,
                p.syncs_per_sec,
                if p.is_slow() {
                    "  WARNING: slow or throttled disk, figures not comparable"
                } else {
                    ""
                }
            );
        }
        if let Some(srv) = &self.server {
            let _ = writeln!(
                s,
                "  server pid {}: whole-process CPU {:.2} cores, RSS {:.1} MB at start",
                srv.pid,
                srv.process_cpu_cores,
                srv.rss_start_bytes as f64 / 1e6
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(p) = &self.fsync_probe {
            v["fsync_probe"] = p.to_json();
        }
        let flat: serde_json::Map<String, serde_json::Value> = self
            .figures
            .iter()
            .map(|f| (f.key.clone(), serde_json::json!(f.value)))
            .collect();
        v["values"] = serde_json::Value::Object(flat);
        v
    }
}

/// The median (lower middle for an even count) of each figure over several rounds of the same system (rounds alternate
/// between systems, so a slow moment of the machine does not land on one side only).
pub fn median(rounds: &[Report]) -> Option<Report> {
    let first = rounds.first()?;
    let mut out = first.clone();
    for f in &mut out.figures {
        let mut vs: Vec<f64> = rounds.iter().filter_map(|r| r.get(&f.key)).collect();
        vs.sort_by(|a, b| a.total_cmp(b));
        // The lower middle for an even count: never better than a measured round.
        f.value = vs[(vs.len() - 1) / 2];
    }
    out.notes.push(format!("median of {} rounds", rounds.len()));
    Some(out)
}

/// Fabric / other for every figure both have; for latencies and costs, a ratio below 1 means
/// Fabric is better.
pub fn ratio_table(fabric: &Report, other: &Report) -> String {
    let mut s = format!(
        "{}: Fabric ({}) / {} ({})\n",
        fabric.scenario, fabric.policy, other.system, other.policy
    );
    for f in &fabric.figures {
        if let Some(o) = other.get(&f.key) {
            let ratio = if o == 0.0 { f64::NAN } else { f.value / o };
            let _ = writeln!(
                s,
                "  {:<34}{:>16} {:>16}  ratio {:>8.2}{}",
                f.key,
                f.unit.format(f.value),
                f.unit.format(o),
                ratio,
                if f.unit.higher_is_better() {
                    ""
                } else {
                    " (lower is better)"
                }
            );
        }
    }
    s
}

pub fn ratios_json(fabric: &Report, other: &Report) -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = fabric
        .figures
        .iter()
        .filter_map(|f| {
            let o = other.get(&f.key)?;
            (o != 0.0).then(|| (f.key.clone(), serde_json::json!(f.value / o)))
        })
        .collect();
    serde_json::json!({
        "fabric_policy": fabric.policy,
        "other": other.system,
        "other_policy": other.policy,
        "fabric_over_other": m,
    })
}

/// Floors (throughputs) and ceilings (latencies, costs) per scenario, as in
/// `bench/baseline.json`: `{"pipelined": {"msgs_per_sec": 100000, "ack_p99_us": 20000}}`.
pub type Baseline = BTreeMap<String, BTreeMap<String, f64>>;

pub fn load_baseline(path: &Path) -> Result<Baseline, crate::error::BenchError> {
    let text = std::fs::read_to_string(path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        crate::error::BenchError::Options(format!("{} is not JSON: {e}", path.display()))
    })?;
    let mut out = Baseline::new();
    if let Some(obj) = v.as_object() {
        for (scenario, figs) in obj {
            let Some(figs) = figs.as_object() else {
                continue;
            };
            let m = figs
                .iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect();
            out.insert(scenario.clone(), m);
        }
    }
    Ok(out)
}

/// One line per figure with a baseline: ok, or REGRESSION beyond [`REGRESSION_RATIO_MAX`].
pub fn check_baseline(report: &Report, baseline: &Baseline) -> (String, usize) {
    let mut s = format!("baseline check, {}:\n", report.scenario);
    let mut regressions = 0;
    let Some(floors) = baseline.get(&report.scenario) else {
        s += "  no baseline for this scenario\n";
        return (s, 0);
    };
    for (key, base) in floors {
        let Some(f) = report.figures.iter().find(|f| &f.key == key) else {
            let _ = writeln!(s, "  {key:<34} not measured in this run");
            continue;
        };
        let bad = if f.unit.higher_is_better() {
            f.value < base * (1.0 - REGRESSION_RATIO_MAX)
        } else {
            f.value > base * (1.0 + REGRESSION_RATIO_MAX)
        };
        regressions += usize::from(bad);
        let _ = writeln!(
            s,
            "  {:<34}{:>16} baseline {:>16}  {}",
            key,
            f.unit.format(f.value),
            f.unit.format(*base),
            if bad { "REGRESSION" } else { "ok" }
        );
    }
    (s, regressions)
}

impl crate::setup::RunContext for Report {
    fn set_context(
        &mut self,
        fsync_probe: Option<crate::fsync_probe::FsyncProbe>,
        load_average: String,
    ) {
        self.fsync_probe = fsync_probe;
        self.load_average = load_average;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_flags_only_regressions_beyond_the_margin() {
        // Proves a throughput 25% under its floor and a p99 30% over its ceiling are flagged,
        // while figures within 20% pass.
        let mut r = Report::new("pipelined", "fabric", "fsync", serde_json::json!({}));
        r.add("msgs_per_sec", 75_000.0, Unit::PerSec);
        r.add("ack_p99_us", 13_000.0, Unit::Micros);
        r.add("ack_p50_us", 1_100.0, Unit::Micros);
        let mut b = Baseline::new();
        b.insert(
            "pipelined".into(),
            [
                ("msgs_per_sec".into(), 100_000.0),
                ("ack_p99_us".into(), 10_000.0),
                ("ack_p50_us".into(), 1_000.0),
            ]
            .into(),
        );
        let (text, n) = check_baseline(&r, &b);
        assert_eq!(n, 2, "{text}");
    }

    #[test]
    fn thousands_separators() {
        // Proves throughput figures print with thousands separators.
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
