//! `stager-perf compare A.json B.json …`: runs side by side, each metric with its ratio to the
//! first run (the baseline). Ratios are what the project compares (shared/PERF.md: absolute
//! numbers drift from machine to machine, ratios taken in one session do not), so the table
//! leads with them rather than leaving division to the reader.

use std::io::Write;
use std::path::Path;

use crate::constants::COMPARE_RUNS_MAX;
use crate::report::Report;
use crate::units::{format_count, format_us};
use crate::{PerfError, Result};

/// Loads the reports to compare or plot, in order.
pub fn load_reports<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Report>> {
    if paths.is_empty() {
        return Err(PerfError::Usage("give at least one report (JSON written by --json)".into()));
    }
    if paths.len() > COMPARE_RUNS_MAX {
        return Err(PerfError::Usage(format!("{} reports given, at most {COMPARE_RUNS_MAX} fit", paths.len())));
    }
    paths.iter().map(|p| Report::load(p.as_ref())).collect()
}

/// One row: a label and how to get the value out of a report.
struct Metric {
    label: &'static str,
    value: fn(&Report) -> f64,
    format: fn(f64) -> String,
}

fn metrics() -> Vec<Metric> {
    let us = |v: f64| format_us(v);
    vec![
        Metric { label: "IOPS", value: |r| r.results.iops, format: format_count },
        Metric { label: "MiB/s", value: |r| r.results.mib_per_s, format: |v| format!("{v:.1}") },
        Metric { label: "lat min us", value: |r| r.results.latency_us.min, format: us },
        Metric { label: "lat p50 us", value: |r| r.results.latency_us.p50, format: us },
        Metric { label: "lat p90 us", value: |r| r.results.latency_us.p90, format: us },
        Metric { label: "lat p99 us", value: |r| r.results.latency_us.p99, format: us },
        Metric { label: "lat p99.9 us", value: |r| r.results.latency_us.p99_9, format: us },
        Metric { label: "lat p99.99 us", value: |r| r.results.latency_us.p99_99, format: us },
        Metric { label: "lat max us", value: |r| r.results.latency_us.max, format: us },
        Metric { label: "CPU % (harness)", value: |r| r.results.cpu.pct_of_wall, format: |v| format!("{v:.0}") },
        Metric { label: "errors", value: |r| r.results.errors as f64, format: |v| format!("{v:.0}") },
    ]
}

/// `x1.23`, or `-` when the baseline is zero.
pub fn ratio(value: f64, base: f64) -> String {
    if base == 0.0 || !base.is_finite() || !value.is_finite() {
        "-".to_string()
    } else {
        format!("x{:.2}", value / base)
    }
}

/// Prints the comparison table.
pub fn print_comparison(reports: &[Report], out: &mut dyn Write) -> std::io::Result<()> {
    let Some(base) = reports.first() else { return Ok(()) };
    let label_w = 16;
    let cells: Vec<Vec<String>> = metrics()
        .iter()
        .map(|m| {
            let b = (m.value)(base);
            reports
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let v = (m.value)(r);
                    if i == 0 {
                        (m.format)(v)
                    } else {
                        format!("{} ({})", (m.format)(v), ratio(v, b))
                    }
                })
                .collect()
        })
        .collect();
    let heads: Vec<String> = reports.iter().map(|r| r.label().to_string()).collect();
    let descs: Vec<String> = reports.iter().map(|r| r.describe()).collect();
    let widths: Vec<usize> = (0..reports.len())
        .map(|i| {
            let data = cells.iter().map(|row| row[i].len()).max().unwrap_or(0);
            data.max(heads[i].chars().count()).max(descs[i].chars().count()).min(40) + 2
        })
        .collect();
    let row = |out: &mut dyn Write, label: &str, vals: &[String]| -> std::io::Result<()> {
        write!(out, "{label:<label_w$}")?;
        for (v, w) in vals.iter().zip(&widths) {
            write!(out, "{v:>w$}")?;
        }
        writeln!(out)
    };
    row(out, "", &heads)?;
    row(out, "", &descs)?;
    for (m, vals) in metrics().iter().zip(&cells) {
        row(out, m.label, vals)?;
    }
    writeln!(out, "(ratios are against the first run, {})", base.label())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::synthetic;

    #[test]
    fn compares_with_ratios() {
        let a = synthetic("baseline", 10.0, 100_000.0);
        let b = synthetic("candidate", 20.0, 50_000.0);
        let mut out = Vec::new();
        print_comparison(&[a, b], &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("baseline") && s.contains("candidate"), "{s}");
        // Half the IOPS.
        assert!(s.lines().any(|l| l.starts_with("IOPS") && l.contains("(x0.50)")), "{s}");
        assert!(s.lines().any(|l| l.starts_with("lat p50 us") && l.contains("(x")), "{s}");
    }

    #[test]
    fn ratio_handles_zero() {
        assert_eq!(ratio(1.0, 0.0), "-");
        assert_eq!(ratio(3.0, 2.0), "x1.50");
    }

    #[test]
    fn loading_reports_checks_files() {
        let dir = std::env::temp_dir().join(format!("stager-perf-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("a.json");
        synthetic("a", 10.0, 1.0).save(&good).unwrap();
        let bad = dir.join("b.json");
        std::fs::write(&bad, "{\"schema\": \"other\"}").unwrap();
        assert_eq!(load_reports(&[&good]).unwrap().len(), 1);
        let e = load_reports(&[&good, &bad]).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("schema"), "{e}");
        assert!(load_reports::<&Path>(&[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
