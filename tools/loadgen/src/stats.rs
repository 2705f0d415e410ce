//! What is measured: CPU time and RSS of the target process (from /proc), the load
//! generator's own CPU time (getrusage), latency percentiles and errors.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
pub fn proc_cpu_s(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name in parentheses may hold spaces: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    if fields.len() < 13 {
        bail!("short {path}");
    }
    let utime: u64 = fields[11].parse().context("utime")?;
    let stime: u64 = fields[12].parse().context("stime")?;
    Ok((utime + stime) as f64 / clock_ticks())
}

/// Resident set size of a process in KiB, from /proc/PID/status (VmRSS).
pub fn proc_rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let kb = v.trim().trim_end_matches("kB").trim();
            return kb.parse().context("VmRSS");
        }
    }
    bail!("no VmRSS in {path}")
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) of this process, all threads.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Whole-machine CPU seconds from /proc/stat: (busy, of which niced). Other work on the
/// machine (e.g. builds, which cargo runs niced) shows as busy time the run did not cause.
pub fn host_cpu_s() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0.0, 0.0);
    };
    let Some(line) = stat.lines().next() else {
        return (0.0, 0.0);
    };
    // cpu user nice system idle iowait irq softirq steal ...
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0.0, 0.0);
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    (busy as f64 / clock_ticks(), v[1] as f64 / clock_ticks())
}

/// A snapshot of the target processes and of this one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub target_cpu_s: Option<f64>,
    pub target_rss_kb: Option<u64>,
    pub self_cpu_s: f64,
    pub host_busy_s: f64,
    pub host_nice_s: f64,
}

impl Sample {
    pub fn take(pids: &[u32]) -> Result<Sample> {
        let (mut cpu, mut rss) = (None, None);
        if !pids.is_empty() {
            let mut c = 0.0;
            let mut r = 0;
            for &pid in pids {
                c += proc_cpu_s(pid)?;
                r += proc_rss_kb(pid)?;
            }
            cpu = Some(c);
            rss = Some(r);
        }
        let (host_busy_s, host_nice_s) = host_cpu_s();
        Ok(Sample {
            target_cpu_s: cpu,
            target_rss_kb: rss,
            self_cpu_s: self_cpu_s(),
            host_busy_s,
            host_nice_s,
        })
    }
}

/// Errors: a count and the first few messages.
#[derive(Default)]
pub struct Errors {
    count: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Errors {
    pub fn record(&self, what: &str, err: &anyhow::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock()
            && first.len() < 10
        {
            first.push(format!("{what}: {err:#}"));
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn to_json(&self) -> Value {
        let first = self.first.lock().map(|f| f.clone()).unwrap_or_default();
        json!({ "count": self.count(), "first": first })
    }
}

/// Percentiles of latency samples in microseconds.
pub fn percentiles(samples: &mut [u32]) -> Value {
    if samples.is_empty() {
        return json!({ "count": 0 });
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    json!({
        "count": samples.len(),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": samples[samples.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_ranks() {
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        let p = percentiles(&mut v);
        assert_eq!(p["p50"], 500);
        assert_eq!(p["p99"], 990);
        assert_eq!(p["p999"], 999);
        assert_eq!(p["max"], 1000);
    }

    #[test]
    fn own_process() {
        let pid = std::process::id();
        assert!(proc_cpu_s(pid).is_ok());
        assert!(proc_rss_kb(pid).is_ok_and(|kb| kb > 0));
    }
}
