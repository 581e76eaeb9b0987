//! `stager-perf plot A.json … -o FILE.svg`: latency CDFs, one line per run, on a log-scale
//! latency axis, with a legend and axis labels.
//!
//! The SVG is written by hand: the drawing is a few dozen elements (grid, axes, a polyline per
//! run, a legend), and a plotting crate would bring far more code than it saves. Latency goes
//! on a log axis because runs worth comparing differ by factors (a floor at 10 µs, a target at
//! 30 µs, a tail at 2 ms). The y axis is the fraction of I/Os completed within a latency,
//! either linear (`--y linear`, shows the body) or in "nines" (`--y nines`: 90 %, 99 %, 99.9 % …
//! evenly spaced, shows the tail).

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use crate::report::Report;
use crate::units::format_us;
use crate::{PerfError, Result};

/// How the fraction axis is scaled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum YScale {
    #[default]
    Linear,
    /// -log10(1 - q): each "nine" gets the same height, up to 99.999 %.
    Nines,
}

impl FromStr for YScale {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "linear" => Ok(YScale::Linear),
            "nines" => Ok(YScale::Nines),
            other => Err(format!("unknown y scale {other:?} (linear, nines)")),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PlotOptions {
    pub title: Option<String>,
    pub y: YScale,
}

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 330.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
/// Top of the nines axis: 99.999 %.
const NINES_MAX: f64 = 5.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Escapes text for SVG element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if c.is_control() => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// `1 us`, `20 us`, `1 ms`, `5 s`.
fn latency_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else if us >= 1.0 {
        format!("{us} us")
    } else {
        format!("{} ns", us * 1e3)
    }
}

fn y_value(q: f64, scale: YScale) -> f64 {
    match scale {
        YScale::Linear => q.clamp(0.0, 1.0),
        YScale::Nines => (-(1.0 - q).max(1e-12).log10()).clamp(0.0, NINES_MAX),
    }
}

/// Draws the CDFs of `reports` as an SVG document.
pub fn render_svg(reports: &[Report], opts: &PlotOptions) -> String {
    let pts = |r: &Report| -> Vec<(f64, f64)> {
        r.latency_cdf
            .iter()
            .filter(|(q, us)| us.is_finite() && *us > 0.0 && q.is_finite())
            .filter(|(q, _)| opts.y == YScale::Linear || *q < 1.0)
            .copied()
            .collect()
    };
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for r in reports {
        for (_, us) in pts(r) {
            lo = lo.min(us);
            hi = hi.max(us);
        }
    }
    if !lo.is_finite() {
        (lo, hi) = (1.0, 10.0);
    }
    let mut dec_lo = lo.log10().floor();
    let mut dec_hi = hi.log10().ceil();
    if dec_hi <= dec_lo {
        dec_hi = dec_lo + 1.0;
    }
    dec_lo = dec_lo.max(-3.0);
    dec_hi = dec_hi.clamp(dec_lo + 1.0, 9.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let y_max = if opts.y == YScale::Linear { 1.0 } else { NINES_MAX };
    let x_of = |us: f64| LEFT + (us.log10().clamp(dec_lo, dec_hi) - dec_lo) / (dec_hi - dec_lo) * plot_w;
    let y_of = |v: f64| TOP + plot_h - v / y_max * plot_h;

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let title = opts.title.clone().unwrap_or_else(|| "Latency CDF".to_string());
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + plot_w / 2.0,
        xml_escape(&title)
    );

    // Grid and x ticks: 1, 2, 5 x 10^k, labels on decades.
    let _ = writeln!(s, r##"<g stroke="#dddddd" stroke-width="1">"##);
    let mut ticks = Vec::new();
    let mut d = dec_lo;
    while d <= dec_hi {
        for m in [1.0, 2.0, 5.0] {
            let us = m * 10f64.powf(d);
            if us.log10() <= dec_hi + 1e-9 {
                ticks.push((us, m == 1.0));
            }
        }
        d += 1.0;
    }
    for (us, _) in &ticks {
        let x = x_of(*us);
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}"/>"#, TOP + plot_h);
    }
    let y_ticks: Vec<(f64, String)> = match opts.y {
        YScale::Linear => (0..=10).map(|i| (i as f64 / 10.0, format!("{:.1}", i as f64 / 10.0))).collect(),
        YScale::Nines => vec![
            (0.0, "0%".into()),
            (1.0, "90%".into()),
            (2.0, "99%".into()),
            (3.0, "99.9%".into()),
            (4.0, "99.99%".into()),
            (5.0, "99.999%".into()),
        ],
    };
    for (v, _) in &y_ticks {
        let y = y_of(*v);
        let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#, LEFT + plot_w);
    }
    let _ = writeln!(s, "</g>");

    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black" stroke-width="1"/>"#
    );
    for (us, major) in &ticks {
        if *major || (dec_hi - dec_lo) <= 2.0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x_of(*us),
                TOP + plot_h + 18.0,
                xml_escape(&latency_label(*us))
            );
        }
    }
    for (v, label) in &y_ticks {
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#, LEFT - 8.0, y_of(*v) + 4.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 25.0
    );
    let y_label = match opts.y {
        YScale::Linear => "fraction of I/Os completed within latency",
        YScale::Nines => "percentile of I/Os completed within latency",
    };
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{y_label}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );

    // One line per run, and its legend entry.
    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if i >= COLORS.len() { r#" stroke-dasharray="6 3""# } else { "" };
        let points: Vec<String> =
            pts(r).iter().map(|(q, us)| format!("{:.1},{:.1}", x_of(*us), y_of(y_value(*q, opts.y)))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"><title>{}</title></polyline>"#,
            points.join(" "),
            xml_escape(r.label())
        );
        let ly = TOP + 10.0 + i as f64 * 36.0;
        let lx = WIDTH - RIGHT + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 30.0, ly + 4.0, xml_escape(r.label()));
        let detail = format!(
            "{}, p50 {} us, p99 {} us",
            r.describe(),
            format_us(r.results.latency_us.p50),
            format_us(r.results.latency_us.p99)
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="10" fill="#555555">{}</text>"##,
            lx + 30.0,
            ly + 18.0,
            xml_escape(&detail)
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Renders and writes the plot.
pub fn write_svg(reports: &[Report], opts: &PlotOptions, path: &Path) -> Result<()> {
    if reports.is_empty() {
        return Err(PerfError::Usage("nothing to plot".into()));
    }
    std::fs::write(path, render_svg(reports, opts)).map_err(|e| PerfError::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::synthetic;

    /// A small well-formedness check: every tag closes in order, attributes are quoted, and
    /// the document is one `<svg>` element.
    fn assert_well_formed(doc: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        let mut roots = 0;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!rest[..start].contains('>'), "stray '>' in text before <{tag}>");
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
                continue;
            }
            let name = tag.split_whitespace().next().unwrap_or("").trim_end_matches('/').to_string();
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()), "bad tag name in <{tag}>");
            if stack.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        assert!(stack.is_empty(), "unclosed tags: {stack:?}");
        assert_eq!(roots, 1);
        assert!(doc.contains("<svg"));
    }

    #[test]
    fn plots_are_well_formed_svg() {
        let mut a = synthetic("fast <&> \"run\"", 10.0, 1.0);
        a.name = "fast <&> \"run\"".into();
        let b = synthetic("slow", 300.0, 1.0);
        for y in [YScale::Linear, YScale::Nines] {
            let svg = render_svg(&[a.clone(), b.clone()], &PlotOptions { title: Some("t & t".into()), y });
            assert_well_formed(&svg);
            assert_eq!(svg.matches("<polyline").count(), 2);
            assert!(svg.contains("latency (log scale)"));
            assert!(svg.contains("fast &lt;&amp;&gt; &quot;run&quot;"));
            assert!(svg.contains("10 us") && svg.contains("100 us"), "decade labels");
        }
    }

    #[test]
    fn empty_and_degenerate_inputs_still_plot() {
        let mut r = synthetic("x", 10.0, 1.0);
        r.latency_cdf.clear();
        assert_well_formed(&render_svg(&[r.clone()], &PlotOptions::default()));
        r.latency_cdf = vec![(0.0, 5.0), (1.0, 5.0)];
        assert_well_formed(&render_svg(&[r], &PlotOptions::default()));
        assert!(write_svg(&[], &PlotOptions::default(), Path::new("/nonexistent/x.svg")).is_err());
    }
}
