//! Scenario files: a YAML matrix of runs that `stager-perf scenario FILE --target URL --out DIR`
//! executes in order, writing one JSON report per run (and per floor) and a markdown summary
//! with each run's ratios against its paired floor — the table docs/benchmarks.md collects.
//!
//! ```yaml
//! name: standard            # heading of the summary (default: the file name)
//! defaults:                 # any run key; a run's own value wins
//!   time: 10                # seconds, or "500ms", "2m"
//!   ramp: 1
//! runs:
//!   - name: randread-4k-qd1 # unique; names the JSON file (letters, digits, . _ -)
//!     workload: randread    # read | write | randread | randwrite | rw
//!     size: 4k              # 512, 4k, 4KiB, 1m, 1MiB
//!     qd: 1
//!     connections: 1
//!     floor: true           # also measure the TCP floor with the same size/QD/connections
//! ```
//! Further keys: `mix` (rw read percent), `range` ("OFFSET:LEN"), `digests`, `verify`, `poll`
//! (busy | sleep), `nsid`, `seed`, `floor_mode` (read | write | echo; default from the
//! workload: reads pair with `read`, writes with `write`, rw with whichever it mostly does).
//!
//! The file is parsed with `serde_yaml_ng` — the maintained fork of the deprecated
//! `serde_yaml`, with the same serde model, whose errors carry line and column — and every
//! key is checked (`deny_unknown_fields`), so a typo is an error that names the run and key.
//! Identical floors are measured once and shared.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::constants::SCENARIO_RUNS_MAX;
use crate::floor::{self, FloorConfig, FloorMode};
use crate::report::{read_bounded, Report};
use crate::run::{self, RunConfig};
use crate::units::{format_count, format_size, format_us, parse_duration, parse_io_size, parse_range};
use crate::url::TargetUrl;
use crate::workload::Workload;
use crate::{PerfError, Result};

/// A number or a string with a unit (`4096` or `4k`; `10` or `500ms`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Quantity {
    Int(u64),
    Float(f64),
    Text(String),
}

impl Quantity {
    fn text(&self) -> String {
        match self {
            Quantity::Int(n) => n.to_string(),
            Quantity::Float(f) => f.to_string(),
            Quantity::Text(s) => s.clone(),
        }
    }
}

/// One run as written in the file; every key optional so `defaults` can share the type.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: Option<String>,
    pub workload: Option<String>,
    pub size: Option<Quantity>,
    pub qd: Option<u32>,
    pub time: Option<Quantity>,
    pub ramp: Option<Quantity>,
    pub connections: Option<u32>,
    pub mix: Option<u8>,
    pub range: Option<String>,
    pub digests: Option<bool>,
    pub verify: Option<bool>,
    pub poll: Option<String>,
    pub nsid: Option<u32>,
    pub seed: Option<u64>,
    pub floor: Option<bool>,
    pub floor_mode: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: Option<String>,
    #[serde(default)]
    defaults: RunSpec,
    runs: Vec<RunSpec>,
}

/// One run of a scenario, checked.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    pub run: RunConfig,
    /// The floor it is compared with.
    pub floor: Option<FloorConfig>,
}

/// A parsed and checked scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub path: PathBuf,
    pub runs: Vec<PlannedRun>,
}

/// Options of `stager-perf scenario` that apply to every run.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    pub target: TargetUrl,
    pub out_dir: PathBuf,
    /// Run only these (by name); empty = all.
    pub only: Vec<String>,
    /// Override every run's time / ramp (e.g. a quick smoke pass).
    pub time: Option<Duration>,
    pub ramp: Option<Duration>,
    pub hostnqn: Option<String>,
    pub timeout: Duration,
    pub cpus: Vec<usize>,
    pub progress: bool,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 100
        && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !n.starts_with('.')
}

impl Scenario {
    /// Parses and checks a scenario; `target` fills every run's target URL.
    pub fn parse(text: &str, path: &Path, target: &TargetUrl) -> Result<Scenario> {
        let err = |m: String| PerfError::Usage(format!("{}: {m}", path.display()));
        let file: ScenarioFile = serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?;
        if file.runs.is_empty() {
            return Err(err("no runs".into()));
        }
        if file.runs.len() > SCENARIO_RUNS_MAX {
            return Err(err(format!("{} runs, at most {SCENARIO_RUNS_MAX}", file.runs.len())));
        }
        if file.defaults.name.is_some() {
            return Err(err("defaults.name: a name belongs to one run".into()));
        }
        let mut runs: Vec<PlannedRun> = Vec::new();
        for (i, spec) in file.runs.iter().enumerate() {
            let label = match &spec.name {
                Some(n) => format!("runs[{i}] ({n})"),
                None => format!("runs[{i}]"),
            };
            let planned = plan(spec, &file.defaults, target).map_err(|m| err(format!("{label}: {m}")))?;
            let name = planned.run.name.clone().unwrap_or_default();
            if runs.iter().any(|r| r.run.name.as_deref() == Some(name.as_str())) {
                return Err(err(format!("{label}: the name {name:?} is used twice")));
            }
            runs.push(planned);
        }
        let name = file
            .name
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "scenario".into());
        Ok(Scenario { name, path: path.to_path_buf(), runs })
    }

    pub fn load(path: &Path, target: &TargetUrl) -> Result<Scenario> {
        let text = read_bounded(path)?;
        Scenario::parse(&text, path, target)
    }
}

/// Merges a run with the defaults and checks every value.
fn plan(spec: &RunSpec, d: &RunSpec, target: &TargetUrl) -> std::result::Result<PlannedRun, String> {
    macro_rules! pick {
        ($f:ident) => {
            spec.$f.clone().or_else(|| d.$f.clone())
        };
    }
    let mut run = RunConfig::new(target.clone());
    run.workload = match pick!(workload) {
        Some(w) => w.parse().map_err(|e| format!("workload: {e}"))?,
        None => return Err("workload: missing (read, write, randread, randwrite, rw)".into()),
    };
    if let Some(s) = pick!(size) {
        run.io_bytes = parse_io_size(&s.text()).map_err(|e| format!("size: {e}"))?;
    }
    if let Some(q) = pick!(qd) {
        run.queue_depth = q as usize;
    }
    if let Some(t) = pick!(time) {
        run.time = parse_duration(&t.text()).map_err(|e| format!("time: {e}"))?;
    }
    if let Some(t) = pick!(ramp) {
        run.ramp = parse_duration(&t.text()).map_err(|e| format!("ramp: {e}"))?;
    }
    if let Some(c) = pick!(connections) {
        run.connections = c as usize;
    }
    if let Some(m) = pick!(mix) {
        run.mix_read_pct = m;
    }
    if let Some(r) = pick!(range) {
        run.range = Some(parse_range(&r).map_err(|e| format!("range: {e}"))?);
    }
    run.digests = pick!(digests).unwrap_or(false);
    run.verify = pick!(verify).unwrap_or(false);
    if let Some(p) = pick!(poll) {
        run.poll = p.parse().map_err(|e| format!("poll: {e}"))?;
    }
    run.nsid = pick!(nsid);
    run.seed = pick!(seed);
    let name = spec.name.clone().unwrap_or_else(|| run.default_name());
    if !valid_name(&name) {
        return Err(format!("name {name:?}: use letters, digits, '.', '_' and '-' (it names a file)"));
    }
    run.name = Some(name);
    run.validate().map_err(|e| e.to_string())?;
    let floor_mode = match pick!(floor_mode) {
        Some(m) => m.parse().map_err(|e| format!("floor_mode: {e}"))?,
        None if run.workload.read_pct(run.mix_read_pct) >= 50 => FloorMode::Read,
        None => FloorMode::Write,
    };
    let floor = pick!(floor).unwrap_or(false).then(|| FloorConfig {
        name: None,
        mode: floor_mode,
        io_bytes: run.io_bytes,
        queue_depth: run.queue_depth,
        connections: run.connections,
        time: run.time,
        ramp: run.ramp,
        poll: run.poll,
        ..Default::default()
    });
    Ok(PlannedRun { run, floor })
}

/// One row of the summary.
#[derive(Clone, Debug)]
pub struct ScenarioEntry {
    pub name: String,
    pub report: Option<Report>,
    pub floor: Option<Report>,
    /// Why the run (or its floor) failed, if it did.
    pub error: Option<String>,
    pub exit_code: i32,
}

#[derive(Clone, Debug)]
pub struct ScenarioOutcome {
    pub entries: Vec<ScenarioEntry>,
    pub markdown: String,
}

impl ScenarioOutcome {
    /// The worst exit code of any run (3 verify > 1 failure > 0).
    pub fn exit_code(&self) -> i32 {
        let codes = self.entries.iter().map(|e| e.exit_code);
        if codes.clone().any(|c| c == crate::EXIT_VERIFY) {
            crate::EXIT_VERIFY
        } else {
            codes.max().unwrap_or(crate::EXIT_OK)
        }
    }
}

fn floor_key(f: &FloorConfig) -> String {
    format!("{}-{}-{}-{}-{:?}-{:?}-{}", f.mode, f.io_bytes, f.queue_depth, f.connections, f.time, f.ramp, f.poll)
}

/// Runs every planned run (and floor), writing reports to `opts.out_dir`; tables go to
/// `log` as each run finishes. A failing run does not stop the others.
pub fn run_scenario(sc: &Scenario, opts: &ScenarioOptions, log: &mut dyn Write) -> Result<ScenarioOutcome> {
    for n in &opts.only {
        if !sc.runs.iter().any(|r| r.run.name.as_deref() == Some(n.as_str())) {
            return Err(PerfError::Usage(format!("{}: no run named {n:?}", sc.path.display())));
        }
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| PerfError::file(&opts.out_dir, e))?;
    let mut floors: Vec<(String, std::result::Result<Report, String>)> = Vec::new();
    let mut entries = Vec::new();
    for planned in &sc.runs {
        let mut cfg = planned.run.clone();
        let name = cfg.name.clone().unwrap_or_else(|| cfg.default_name());
        if !opts.only.is_empty() && !opts.only.contains(&name) {
            continue;
        }
        cfg.target = opts.target.clone();
        cfg.hostnqn.clone_from(&opts.hostnqn);
        cfg.timeout = opts.timeout;
        cfg.cpus.clone_from(&opts.cpus);
        cfg.progress = opts.progress;
        if let Some(t) = opts.time {
            cfg.time = t;
        }
        if let Some(r) = opts.ramp {
            cfg.ramp = r;
        }
        let mut entry = ScenarioEntry { name: name.clone(), report: None, floor: None, error: None, exit_code: 0 };
        if let Some(f) = &planned.floor {
            let mut f = f.clone();
            f.time = cfg.time;
            f.ramp = cfg.ramp;
            f.progress = opts.progress;
            let key = floor_key(&f);
            if let Some((_, r)) = floors.iter().find(|(k, _)| *k == key) {
                entry.floor = r.as_ref().ok().cloned();
            } else {
                let _ = writeln!(log, "== floor for {name}: {}", f.default_name());
                let r = floor::floor(&f).map_err(|e| e.to_string()).and_then(|rep| {
                    let _ = rep.print_table(log);
                    let path = opts.out_dir.join(format!("{}.json", rep.name));
                    rep.save(&path).map_err(|e| e.to_string())?;
                    Ok(rep)
                });
                if let Err(e) = &r {
                    let _ = writeln!(log, "floor failed: {e}");
                }
                entry.floor = r.as_ref().ok().cloned();
                floors.push((key, r));
            }
        }
        let _ = writeln!(log, "== {name}");
        match run::run(&cfg) {
            Ok(outcome) => {
                let _ = outcome.report.print_table(log);
                outcome.failures.print(log);
                entry.exit_code = outcome.exit_code();
                if !outcome.report.errors.is_empty() {
                    entry.error = Some(outcome.report.errors.join("; "));
                } else if outcome.failures.total > 0 {
                    entry.error = Some(format!("{} verify failures", outcome.failures.total));
                }
                let path = opts.out_dir.join(format!("{name}.json"));
                if let Err(e) = outcome.report.save(&path) {
                    entry.error = Some(e.to_string());
                    entry.exit_code = entry.exit_code.max(crate::EXIT_FAILURE);
                }
                entry.report = Some(outcome.report);
            }
            Err(e) => {
                let _ = writeln!(log, "run failed: {e}");
                entry.exit_code = e.exit_code().max(crate::EXIT_FAILURE);
                entry.error = Some(e.to_string());
            }
        }
        entries.push(entry);
    }
    let markdown = summary_markdown(&sc.name, &opts.target, &entries, crate::report::unix_ms_now());
    Ok(ScenarioOutcome { entries, markdown })
}

/// `2026-11-24 15:56 UTC` from Unix milliseconds (civil-from-days, no calendar crate).
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let mut d = format!("{cpus} CPUs");
    if !kernel.is_empty() {
        d.push_str(&format!(", Linux {kernel}"));
    }
    d
}

/// The summary table, in markdown ready to paste into docs/benchmarks.md.
pub fn summary_markdown(name: &str, target: &TargetUrl, entries: &[ScenarioEntry], unix_ms: u64) -> String {
    let mut s = String::new();
    s.push_str(&format!("### Scenario `{name}` — {}\n\n", format_utc(unix_ms)));
    s.push_str(&format!(
        "Target `{target}`; {}; stager-perf {}. *Floor*: raw loopback TCP request/response with the same \
         sizes, queue depth and connections (`stager-perf floor`); ratios are run / floor \
         (latency: lower is better; IOPS: higher is better). CPU % is stager-perf's own, in percent of one CPU.\n\n",
        machine_description(),
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str("| run | workload | size | QD | conns | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU % | floor p50 µs | floor p99 µs | p50 / floor | p99 / floor | IOPS / floor |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for e in entries {
        let Some(r) = &e.report else {
            s.push_str(&format!(
                "| {} | failed: {} | | | | | | | | | | | | | | |\n",
                e.name,
                e.error.as_deref().unwrap_or("unknown error").replace('|', "\\|")
            ));
            continue;
        };
        let (set, res) = (&r.settings, &r.results);
        let workload = if set.workload == "rw" { format!("rw {}% reads", set.read_pct) } else { set.workload.clone() };
        let name = match &e.error {
            Some(err) => format!("{} (error: {})", e.name, err.replace('|', "\\|")),
            None => e.name.clone(),
        };
        let mut row = format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {:.0} |",
            name,
            workload,
            format_size(set.io_bytes),
            set.queue_depth,
            set.connections,
            format_count(res.iops),
            res.mib_per_s,
            format_us(res.latency_us.p50),
            format_us(res.latency_us.p99),
            format_us(res.latency_us.p99_9),
            res.cpu.pct_of_wall
        );
        match &e.floor {
            Some(f) => {
                let fl = &f.results.latency_us;
                row.push_str(&format!(
                    " {} | {} | {} | {} | {} |",
                    format_us(fl.p50),
                    format_us(fl.p99),
                    crate::compare::ratio(res.latency_us.p50, fl.p50),
                    crate::compare::ratio(res.latency_us.p99, fl.p99),
                    crate::compare::ratio(res.iops, f.results.iops)
                ));
            }
            None => row.push_str(" | | | | |"),
        }
        s.push_str(&row);
        s.push('\n');
    }
    s
}

/// Prints the planned runs (for `--list`).
pub fn print_plan(sc: &Scenario, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "scenario {} ({}): {} runs", sc.name, sc.path.display(), sc.runs.len())?;
    for p in &sc.runs {
        let r = &p.run;
        writeln!(
            out,
            "  {:<28} {:<9} {:>8} QD{:<4} x{:<2} {:>6.1} s (+{:.1} s ramp){}{}{}{}",
            r.name.as_deref().unwrap_or("?"),
            r.workload.name(),
            format_size(r.io_bytes as u64),
            r.queue_depth,
            r.connections,
            r.time.as_secs_f64(),
            r.ramp.as_secs_f64(),
            if r.workload == Workload::Rw { format!(" mix {}%", r.mix_read_pct) } else { String::new() },
            if r.digests { " digests" } else { "" },
            if r.verify { " verify" } else { "" },
            match &p.floor {
                Some(f) => format!(" + floor ({})", f.mode),
                None => String::new(),
            }
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::synthetic;

    fn target() -> TargetUrl {
        TargetUrl::parse("tcp://127.0.0.1:4420/nqn.x:y").unwrap()
    }
    fn parse(text: &str) -> Result<Scenario> {
        Scenario::parse(text, Path::new("s.yaml"), &target())
    }

    #[test]
    fn parses_with_defaults_and_floors() {
        let sc = parse(
            "name: std\ndefaults: { time: 2, ramp: 500ms, floor: true }\nruns:\n  - { name: a, workload: randread, size: 4k, qd: 1 }\n  - { workload: rw, mix: 30, size: 131072, qd: 8, connections: 2, time: 1.5, floor: false }\n  - { workload: randwrite, size: 4KiB, qd: 32, digests: true }\n",
        )
        .unwrap();
        assert_eq!(sc.name, "std");
        assert_eq!(sc.runs.len(), 3);
        let a = &sc.runs[0];
        assert_eq!(
            (a.run.io_bytes, a.run.queue_depth, a.run.time, a.run.ramp),
            (4096, 1, Duration::from_secs(2), Duration::from_millis(500))
        );
        assert_eq!(a.floor.as_ref().unwrap().mode, FloorMode::Read);
        let b = &sc.runs[1];
        assert_eq!(b.run.name.as_deref(), Some("rw30-128k-qd8-x2"));
        assert_eq!(b.run.time, Duration::from_millis(1500));
        assert!(b.floor.is_none());
        assert_eq!(sc.runs[2].floor.as_ref().unwrap().mode, FloorMode::Write);
        assert!(sc.runs[2].run.digests);
    }

    #[test]
    fn bad_scenarios_name_the_run_and_key() {
        let cases = [
            ("runs: []", "no runs"),
            ("runs:\n  - { workload: randread, sise: 4k }", "sise"),
            ("runs:\n  - { name: a, workload: randread, size: 4x }", "runs[0] (a): size"),
            ("runs:\n  - { workload: bogus }", "workload"),
            ("runs:\n  - { size: 4k }", "workload: missing"),
            ("runs:\n  - { name: a, workload: read }\n  - { name: a, workload: write }", "used twice"),
            ("runs:\n  - { name: '../x', workload: read }", "names a file"),
            ("runs:\n  - { workload: read, qd: 0 }", "queue depth"),
            ("runs:\n  - { workload: read, time: -1 }", "time"),
            ("runs:\n  - { workload: read, floor_mode: sideways, floor: true }", "floor_mode"),
            ("runs: {", "s.yaml"),
            ("defaults: { name: x }\nruns:\n  - { workload: read }", "defaults.name"),
        ];
        for (text, want) in cases {
            let e = parse(text).err().unwrap_or_else(|| panic!("{text:?} parsed"));
            let msg = e.to_string();
            assert!(msg.contains(want) && msg.starts_with("s.yaml"), "{text:?}: {msg}");
            assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        }
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                Scenario::load(&p, &target()).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn summary_has_ratios_against_the_floor() {
        let run = synthetic("r", 20.0, 50_000.0);
        let mut floor = synthetic("f", 10.0, 100_000.0);
        floor.results.latency_us.p50 = run.results.latency_us.p50 / 2.0;
        let entries = vec![
            ScenarioEntry { name: "r".into(), report: Some(run), floor: Some(floor), error: None, exit_code: 0 },
            ScenarioEntry {
                name: "bad".into(),
                report: None,
                floor: None,
                error: Some("cannot connect | x".into()),
                exit_code: 1,
            },
        ];
        let md = summary_markdown("std", &target(), &entries, 1_795_000_000_000);
        assert!(md.contains("| r | rw 67% reads | 4 KiB | 1 | 1 |"), "{md}");
        assert!(md.contains("x2.00"), "{md}");
        assert!(md.contains("| bad | failed: cannot connect \\| x |"), "{md}");
        // Every table line has the same number of cells as the header.
        let cols = |l: &str| l.matches('|').count() - l.matches("\\|").count();
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert!(lines.iter().all(|l| cols(l) == cols(lines[0])), "{md}");
    }

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_795_000_000_000), "2026-11-18 11:06 UTC");
    }
}
