//! The harness's own CPU cost and placement: `getrusage(RUSAGE_SELF)` snapshots (user + system
//! time of every thread of the process) and pinning a thread to a CPU.
//!
//! A polled-mode benchmark is only meaningful next to what it cost: a busy-polling host burns
//! a core per connection by design, and on a 2-vCPU machine the harness competes with the
//! target for cores. Reporting the harness's CPU time (and as a share of wall time) makes that
//! visible in every result instead of leaving it to be guessed.

use std::time::Duration;

/// CPU time used by this process up to a point.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub user: Duration,
    pub sys: Duration,
}

impl CpuTimes {
    /// The process's CPU time so far (all threads). Zero if the call fails, which it cannot
    /// with these arguments.
    pub fn now() -> CpuTimes {
        // SAFETY: `ru` is a plain C struct that getrusage fills; zeroed is a valid value of it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        if rc != 0 {
            return CpuTimes::default();
        }
        let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.clamp(0, 999_999) as u32) * 1000);
        CpuTimes { user: tv(ru.ru_utime), sys: tv(ru.ru_stime) }
    }

    /// Time used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user.saturating_sub(earlier.user), sys: self.sys.saturating_sub(earlier.sys) }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!(
            "CPU {cpu} is beyond the {} the kernel API can name",
            libc::CPU_SETSIZE
        )));
    }
    // SAFETY: cpu_set_t is a plain bit set; zeroed is empty. CPU_SET is given an index checked
    // against CPU_SETSIZE above, and sched_setaffinity(0, ..) acts on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Parses a CPU list such as `0,2-3` into `[0, 2, 3]`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse =
            |x: &str| x.trim().parse::<usize>().map_err(|_| format!("CPU list {s:?}: {x:?} is not a CPU number"));
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(format!("CPU list {s:?}: bad range {part:?}"));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        return Err(format!("CPU list {s:?} names no CPU"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_moves_forward() {
        let a = CpuTimes::now();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let d = CpuTimes::now().since(&a);
        assert!(d.user + d.sys > Duration::ZERO);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-3"), Ok(vec![0, 2, 3]));
        assert_eq!(parse_cpu_list("1"), Ok(vec![1]));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("99999").is_err());
    }
}
