//! Parsing and printing of the quantities on the command line and in scenario files: byte
//! sizes (`512`, `4k`, `4KiB`, `1m`, `1MiB`), durations (`10`, `1.5`, `500ms`, `2m`) and
//! `OFFSET:LEN` ranges, plus the human formatting of the tables.
//!
//! Size suffixes are always binary (k = KiB = 1024): storage people write `4k` for 4096, and a
//! decimal kilobyte is never what a block size means. `KB`/`MB`/`GB` are refused as ambiguous,
//! as stagerd's configuration does. Errors are plain strings that name the
//! input, because clap and the scenario loader wrap them with the option or key.

use std::time::Duration;

/// Parses a byte size: a non-negative integer with an optional binary suffix
/// (`k`/`KiB`, `m`/`MiB`, `g`/`GiB`, `t`/`TiB`, any case; `b` alone for bytes). `KB`, `MB`…
/// are refused as ambiguous.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("size {s:?} does not start with a number"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        // Same stance as stagerd's configuration: whether "1GB" means 10^9 or 2^30 is not
        // something to guess.
        "kb" | "mb" | "gb" | "tb" => {
            return Err(format!("size {s:?} is ambiguous (decimal or binary?); write 4k or 4KiB"));
        }
        other => {
            return Err(format!("size {s:?} has unknown suffix {other:?} (use k, KiB, m, MiB, g, GiB)"));
        }
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a size that must be positive and fit a `usize` I/O length.
pub fn parse_io_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n == 0 {
        return Err(format!("size {s:?} must be more than 0"));
    }
    usize::try_from(n).map_err(|_| format!("size {s:?} is too large"))
}

/// Parses a duration: plain seconds (`10`, `0.5`) or with a unit (`500ms`, `10s`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 =
        num.trim().parse().map_err(|_| format!("duration {s:?} is not a number of seconds (e.g. 10, 0.5, 500ms)"))?;
    let secs = v * scale;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration {s:?} must be a non-negative number"));
    }
    if secs > crate::constants::RUN_SECONDS_MAX {
        return Err(format!("duration {s:?} is longer than {} s", crate::constants::RUN_SECONDS_MAX));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A byte range of the namespace: `OFFSET:LEN`, or `OFFSET:` for "to the end".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset_bytes: u64,
    /// `None`: up to the end of the namespace.
    pub len_bytes: Option<u64>,
}

pub fn parse_range(s: &str) -> Result<ByteRange, String> {
    let Some((off, len)) = s.split_once(':') else {
        return Err(format!("range {s:?} is not OFFSET:LEN (e.g. 0:1g, 1m:64m, 4k:)"));
    };
    let offset_bytes = parse_size(off).map_err(|e| format!("range offset: {e}"))?;
    let len_bytes = if len.trim().is_empty() {
        None
    } else {
        let n = parse_size(len).map_err(|e| format!("range length: {e}"))?;
        if n == 0 {
            return Err(format!("range {s:?} has length 0"));
        }
        Some(n)
    };
    Ok(ByteRange { offset_bytes, len_bytes })
}

/// A part of a device: `SIZE` (its first SIZE bytes) or `OFFSET:LEN` as in [`parse_range`].
pub fn parse_disk_range(s: &str) -> Result<ByteRange, String> {
    if s.contains(':') {
        parse_range(s)
    } else {
        Ok(ByteRange { offset_bytes: 0, len_bytes: Some(parse_io_size(s)? as u64) })
    }
}

/// `4096` → `4 KiB`, `1536` → `1536 B`: exact binary units when they divide evenly.
pub fn format_size(n: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, name) in UNITS {
        let unit = 1u64 << shift;
        if n >= unit && n % unit == 0 {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} B")
}

/// Compact count: `950`, `12.3K`, `1.05M`.
pub fn format_count(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Latency in µs with precision that suits its size.
pub fn format_us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert!(parse_size("4kB").unwrap_err().contains("ambiguous"));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 8 KiB "), Ok(8192));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("7b"), Ok(7));
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        for bad in ["", " ", "k", "4x", "4kk", "-4k", "1.5k", "4 k i b", "99999999999999999999", "16777216t", "٣k"] {
            let e = parse_size(bad);
            assert!(e.is_err(), "{bad:?} parsed as {e:?}");
        }
        assert!(parse_io_size("0").is_err());
        assert_eq!(parse_io_size("1m"), Ok(1 << 20));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "x", "-1", "nan", "inf", "1e30", "10 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0:1g"), Ok(ByteRange { offset_bytes: 0, len_bytes: Some(1 << 30) }));
        assert_eq!(parse_range("1m:"), Ok(ByteRange { offset_bytes: 1 << 20, len_bytes: None }));
        for bad in ["", "1g", ":", "x:1", "0:0", "0:y"] {
            assert!(parse_range(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_disk_range("256m"), Ok(ByteRange { offset_bytes: 0, len_bytes: Some(256 << 20) }));
        assert_eq!(parse_disk_range("1g:256m"), Ok(ByteRange { offset_bytes: 1 << 30, len_bytes: Some(256 << 20) }));
        for bad in ["", "0", "x", "0:0"] {
            assert!(parse_disk_range(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1 << 20), "1 MiB");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1536), "1536 B");
        assert_eq!(format_count(123_456.0), "123.5K");
        assert_eq!(format_count(1_050_000.0), "1.05M");
        assert_eq!(format_us(9.456), "9.46");
    }
}
