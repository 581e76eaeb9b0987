//! The result of one run or floor measurement: the table printed at the end, and the JSON
//! file (`--json FILE`) that `compare`, `plot` and the scenario summary read back.
//!
//! The JSON schema is `stager-perf/1` (field `schema`); docs/perf.md documents every field.
//! It is stable: new fields may be added (readers ignore unknown ones, and optional ones
//! default), but no field changes meaning or unit without a new schema name. Units are in
//! the field names (`_us`, `_s`, `_bytes`, `mib_per_s`). Latency is summarised (min, mean,
//! percentiles, max) and also sampled at fixed quantiles (`latency_cdf`, about 100 points
//! dense in the tail), which is what plots need without shipping the whole histogram.

use std::io::Write;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::constants::INPUT_FILE_BYTES_MAX;
use crate::cpu::CpuTimes;
use crate::stats::Stats;
use crate::units::{format_count, format_size, format_us};
use crate::verify::VerifyCounts;
use crate::PerfError;

/// The schema name every report carries.
pub const SCHEMA: &str = "stager-perf/1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportKind {
    /// An NVMe/TCP workload against a target.
    Run,
    /// Raw loopback TCP request/response.
    Floor,
    /// The flash device alone (`stager-perf disk`).
    Disk,
}

/// What was measured and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `read`, `write`, `randread`, `randwrite`, `rw`; floors: `floor-read`, `floor-write`,
    /// `floor-echo`.
    pub workload: String,
    /// Share of I/Os that are reads, in percent.
    pub read_pct: u8,
    pub io_bytes: u64,
    pub queue_depth: u32,
    pub connections: u32,
    pub time_s: f64,
    pub ramp_s: f64,
    /// `busy` or `sleep`.
    pub poll: String,
    pub digests: bool,
    pub verify: bool,
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnqn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_bytes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_offset_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_bytes: Option<u64>,
    /// Floors: bytes of the small message (request of a read, response of a write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_small_bytes: Option<u64>,
}

/// Latency distribution summary, all in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub min: f64,
    pub mean: f64,
    pub stddev: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub p99_99: f64,
    pub max: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            samples: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            stddev: h.stdev() / 1000.0,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            p99_99: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSummary {
    pub user_s: f64,
    pub sys_s: f64,
    /// (user + sys) / wall time of the measurement window, in percent of one CPU (so a
    /// two-thread busy-poll run shows ~200).
    pub pct_of_wall: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub blocks_checked: u64,
    pub blocks_written: u64,
    pub pending_resolved: u64,
    pub failures: u64,
}

impl From<&VerifyCounts> for VerifySummary {
    fn from(c: &VerifyCounts) -> Self {
        VerifySummary {
            blocks_checked: c.blocks_checked,
            blocks_written: c.blocks_written,
            pending_resolved: c.pending_resolved,
            failures: c.failures,
        }
    }
}

/// What was measured, over the measurement window (ramp excluded).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub duration_s: f64,
    pub ios: u64,
    pub read_ios: u64,
    pub write_ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_per_s: f64,
    /// Commands that completed with an error status.
    pub errors: u64,
    pub latency_us: LatencySummary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_latency_us: Option<LatencySummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_latency_us: Option<LatencySummary>,
    pub cpu: CpuSummary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySummary>,
}

/// One run's report; `schema` is always [`SCHEMA`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub kind: ReportKind,
    /// A label for tables and legends (scenario run name, or derived from the settings).
    pub name: String,
    pub started_unix_ms: u64,
    pub settings: Settings,
    pub results: Results,
    /// `[quantile, latency_us]` pairs at `cdf_quantiles()`, ascending; empty without samples.
    pub latency_cdf: Vec<(f64, f64)>,
    /// Problems that ended the run early (a lost connection), one per connection affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// The first command error's description, if any command failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_command_error: Option<String>,
}

/// What a run or floor measured, over its window.
#[derive(Clone, Copy)]
pub struct Measurement<'a> {
    pub stats: &'a Stats,
    /// Length of the measurement window.
    pub duration_s: f64,
    /// The harness's CPU time over the window.
    pub cpu: CpuTimes,
    pub verify: Option<&'a VerifyCounts>,
}

/// The quantiles `latency_cdf` is sampled at: the minimum, every percent, a denser tail up to
/// 99.999 %, and the maximum (107 points).
pub fn cdf_quantiles() -> Vec<f64> {
    let mut q = vec![0.0];
    q.extend((1..100).map(|i| i as f64 / 100.0));
    q.extend([0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 1.0]);
    q
}

/// Samples a histogram at `cdf_quantiles()`, in µs.
pub fn latency_cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    cdf_quantiles()
        .into_iter()
        .map(|q| {
            let ns = if q <= 0.0 {
                h.min()
            } else if q >= 1.0 {
                h.max()
            } else {
                h.value_at_quantile(q)
            };
            (q, ns as f64 / 1000.0)
        })
        .collect()
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Report {
    /// Builds a report from what was measured.
    pub fn build(kind: ReportKind, name: String, started_unix_ms: u64, settings: Settings, m: &Measurement) -> Report {
        let Measurement { stats, duration_s, cpu, verify } = *m;
        let all = stats.combined_latency();
        let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
        let dir_summary =
            |d: &crate::stats::DirectionStats| (d.ios > 0).then(|| LatencySummary::from_histogram(&d.latency_ns));
        let cpu_s = cpu.user.as_secs_f64() + cpu.sys.as_secs_f64();
        Report {
            schema: SCHEMA.to_string(),
            kind,
            name,
            started_unix_ms,
            settings,
            results: Results {
                duration_s,
                ios: stats.ios(),
                read_ios: stats.read.ios,
                write_ios: stats.write.ios,
                bytes: stats.bytes(),
                iops: per_s(stats.ios() as f64),
                mib_per_s: per_s(stats.bytes() as f64) / (1u64 << 20) as f64,
                errors: stats.errors,
                latency_us: LatencySummary::from_histogram(&all),
                read_latency_us: dir_summary(&stats.read),
                write_latency_us: dir_summary(&stats.write),
                cpu: CpuSummary {
                    user_s: cpu.user.as_secs_f64(),
                    sys_s: cpu.sys.as_secs_f64(),
                    pct_of_wall: per_s(cpu_s) * 100.0,
                },
                verify: verify.map(VerifySummary::from),
            },
            latency_cdf: latency_cdf(&all),
            errors: Vec::new(),
            first_command_error: stats.first_error.clone(),
        }
    }

    /// A short description of the settings: `randread 4 KiB QD1 x2`.
    pub fn describe(&self) -> String {
        let s = &self.settings;
        let mut d = format!("{} {} QD{}", s.workload, format_size(s.io_bytes), s.queue_depth);
        if s.workload == "rw" {
            d.push_str(&format!(" ({}% reads)", s.read_pct));
        }
        if s.connections > 1 {
            d.push_str(&format!(" x{} connections", s.connections));
        }
        d
    }

    /// The human table printed at the end of a run.
    pub fn print_table(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let s = &self.settings;
        let r = &self.results;
        let mut head = format!("{}: {}", self.name, self.describe());
        if let Some(t) = &s.target {
            head.push_str(&format!(" -> {t}"));
        }
        if let (Some(ns), Some(bs)) = (s.nsid, s.block_bytes) {
            head.push_str(&format!(" nsid {ns} ({bs}-byte blocks)"));
        }
        writeln!(out, "{head}")?;
        writeln!(
            out,
            "  {:.1} s measured after {:.1} s ramp, {}-poll{}{}",
            r.duration_s,
            s.ramp_s,
            s.poll,
            if s.digests { ", digests" } else { "" },
            if s.verify { ", verify" } else { "" }
        )?;
        writeln!(
            out,
            "  {:<6}{:>10}{:>11} | {:>8}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}  (latency us){:>8}",
            "", "IOPS", "MiB/s", "min", "p50", "p90", "p99", "p99.9", "p99.99", "max", "errors"
        )?;
        let row =
            |out: &mut dyn Write, label: &str, ios: u64, bytes_per_io: f64, l: &LatencySummary, errors: String| {
                let iops = if r.duration_s > 0.0 { ios as f64 / r.duration_s } else { 0.0 };
                writeln!(
                    out,
                    "  {:<6}{:>10}{:>11.1} | {:>8}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}  {:>12}{:>8}",
                    label,
                    format_count(iops),
                    iops * bytes_per_io / (1u64 << 20) as f64,
                    format_us(l.min),
                    format_us(l.p50),
                    format_us(l.p90),
                    format_us(l.p99),
                    format_us(l.p99_9),
                    format_us(l.p99_99),
                    format_us(l.max),
                    "",
                    errors
                )
            };
        let bytes_per_io = s.io_bytes as f64;
        row(out, "all", r.ios, bytes_per_io, &r.latency_us, r.errors.to_string())?;
        if r.read_ios > 0 && r.write_ios > 0 {
            if let Some(l) = &r.read_latency_us {
                row(out, "read", r.read_ios, bytes_per_io, l, String::new())?;
            }
            if let Some(l) = &r.write_latency_us {
                row(out, "write", r.write_ios, bytes_per_io, l, String::new())?;
            }
        }
        writeln!(
            out,
            "  CPU (stager-perf itself): user {:.2} s + sys {:.2} s = {:.1}% of one CPU over the window",
            r.cpu.user_s, r.cpu.sys_s, r.cpu.pct_of_wall
        )?;
        if let Some(v) = &r.verify {
            writeln!(
                out,
                "  verify: {} blocks checked, {} written, {} in-flight writes resolved, {} failures",
                v.blocks_checked, v.blocks_written, v.pending_resolved, v.failures
            )?;
        }
        if let Some(e) = &self.first_command_error {
            writeln!(out, "  first command error: {e}")?;
        }
        for e in &self.errors {
            writeln!(out, "  error: {e}")?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs of numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Report, String> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => return Err(format!("schema {other:?}, this stager-perf reads {SCHEMA:?}")),
            None => return Err(format!("no \"schema\" field; not a {SCHEMA} report")),
        }
        serde_json::from_value(v).map_err(|e| format!("not a valid {SCHEMA} report: {e}"))
    }

    pub fn save(&self, path: &Path) -> Result<(), PerfError> {
        let mut s = self.to_json();
        s.push('\n');
        std::fs::write(path, s).map_err(|e| PerfError::file(path, e))
    }

    pub fn load(path: &Path) -> Result<Report, PerfError> {
        let s = read_bounded(path)?;
        Report::from_json(&s).map_err(|reason| PerfError::bad_file(path, reason))
    }

    /// The label used in comparisons and legends: the name.
    pub fn label(&self) -> &str {
        &self.name
    }
}

/// Reads a text input file of bounded size.
pub fn read_bounded(path: &Path) -> Result<String, PerfError> {
    let meta = std::fs::metadata(path).map_err(|e| PerfError::file(path, e))?;
    if meta.len() > INPUT_FILE_BYTES_MAX {
        return Err(PerfError::bad_file(
            path,
            format!("{} bytes, more than the {INPUT_FILE_BYTES_MAX} read", meta.len()),
        ));
    }
    let b = std::fs::read(path).map_err(|e| PerfError::file(path, e))?;
    String::from_utf8(b).map_err(|_| PerfError::bad_file(path, "not UTF-8 text"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::Direction;

    /// A synthetic report whose latencies are `base_us` plus a spread (for compare/plot tests).
    pub fn synthetic(name: &str, base_us: f64, iops: f64) -> Report {
        let mut stats = Stats::default();
        for i in 0..10_000u64 {
            let ns = (base_us * 1000.0) as u64 + (i * i) % 50_000;
            stats.record(if i % 3 == 0 { Direction::Write } else { Direction::Read }, 4096, ns);
        }
        let settings = Settings {
            workload: "rw".into(),
            read_pct: 67,
            io_bytes: 4096,
            queue_depth: 1,
            connections: 1,
            time_s: 1.0,
            ramp_s: 0.0,
            poll: "busy".into(),
            digests: false,
            verify: false,
            seed: 1,
            target: Some("tcp://127.0.0.1:4420/nqn.x".into()),
            subnqn: Some("nqn.x".into()),
            nsid: Some(1),
            block_bytes: Some(4096),
            range_offset_bytes: None,
            range_bytes: None,
            floor_small_bytes: None,
        };
        let cpu = CpuTimes { user: std::time::Duration::from_millis(900), sys: std::time::Duration::from_millis(100) };
        let m = Measurement { stats: &stats, duration_s: 10_000.0 / iops, cpu, verify: None };
        let mut r = Report::build(ReportKind::Run, name.into(), 1, settings, &m);
        r.results.iops = iops;
        r
    }

    #[test]
    fn json_round_trip() {
        let r = synthetic("a", 10.0, 100_000.0);
        let j = r.to_json();
        assert!(j.contains("\"schema\": \"stager-perf/1\""));
        let back = Report::from_json(&j).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.latency_cdf.len(), cdf_quantiles().len());
        assert!(r.latency_cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!(r.results.read_latency_us.is_some() && r.results.write_latency_us.is_some());
    }

    #[test]
    fn unknown_fields_are_ignored_and_wrong_schema_refused() {
        let r = synthetic("a", 10.0, 1.0);
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        v["future_field"] = serde_json::json!({"x": 1});
        assert_eq!(Report::from_json(&v.to_string()).unwrap(), r);
        v["schema"] = "stager-perf/2".into();
        assert!(Report::from_json(&v.to_string()).unwrap_err().contains("stager-perf/2"));
        assert!(Report::from_json("{}").unwrap_err().contains("schema"));
        assert!(Report::from_json("[1,2").unwrap_err().contains("not JSON"));
        assert!(Report::from_json(r#"{"schema":"stager-perf/1"}"#).unwrap_err().contains("missing field"));
    }

    #[test]
    fn table_prints() {
        let r = synthetic("a", 10.0, 100_000.0);
        let mut out = Vec::new();
        r.print_table(&mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("IOPS") && s.contains("p99.99") && s.contains("read") && s.contains("CPU"), "{s}");
    }

    #[test]
    fn empty_stats_give_an_empty_cdf() {
        let stats = Stats::default();
        let m = Measurement { stats: &stats, duration_s: 0.0, cpu: CpuTimes::default(), verify: None };
        let r = Report::build(ReportKind::Floor, "x".into(), 0, synthetic("a", 1.0, 1.0).settings, &m);
        assert!(r.latency_cdf.is_empty());
        assert_eq!(r.results.iops, 0.0);
    }
}
