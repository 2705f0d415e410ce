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

/// CPU seconds of the process trees rooted at `roots`: user + system time of every live
/// process in them, plus the time of children that already ended (`cutime + cstime`, which
/// a parent gains when it reaps them). A server such as Dovecot forks a process per service
/// and ends them now and then; its master reaps them, so this sum only grows and the
/// difference of two samples is what the whole server spent between them.
pub fn tree_cpu_s(roots: &[u32]) -> Result<f64> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 15 {
            continue;
        }
        let num = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        // ppid is field 4; utime, stime, cutime, cstime fields 14 to 17.
        procs.push((pid, num(1) as u32, num(11) + num(12) + num(13) + num(14)));
    }
    let mut in_tree: Vec<u32> = roots.to_vec();
    for &root in roots {
        if !procs.iter().any(|p| p.0 == root) {
            bail!("no process {root}");
        }
    }
    // Parents come before children in no particular order: grow the set until it is stable.
    loop {
        let before = in_tree.len();
        for p in &procs {
            if in_tree.contains(&p.1) && !in_tree.contains(&p.0) {
                in_tree.push(p.0);
            }
        }
        if in_tree.len() == before {
            break;
        }
    }
    let ticks: u64 = procs
        .iter()
        .filter(|p| in_tree.contains(&p.0))
        .map(|p| p.2)
        .sum();
    Ok(ticks as f64 / clock_ticks())
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
    /// CPU of the backend server's process trees (`--backend-tree`).
    pub backend_cpu_s: Option<f64>,
    pub self_cpu_s: f64,
    pub host_busy_s: f64,
    pub host_nice_s: f64,
}

impl Sample {
    /// `pids`: target processes (CPU and RSS); `target_trees`: target servers whose work is
    /// done in child processes (a Dovecot proxy), CPU only, added to the target's;
    /// `trees`: the backends.
    pub fn take(pids: &[u32], target_trees: &[u32], trees: &[u32]) -> Result<Sample> {
        let backend_cpu_s = if trees.is_empty() {
            None
        } else {
            Some(tree_cpu_s(trees)?)
        };
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
        if !target_trees.is_empty() {
            cpu = Some(cpu.unwrap_or(0.0) + tree_cpu_s(target_trees)?);
        }
        let (host_busy_s, host_nice_s) = host_cpu_s();
        Ok(Sample {
            target_cpu_s: cpu,
            target_rss_kb: rss,
            backend_cpu_s,
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
        // A child that burns CPU and is reaped still counts in its parent's tree.
        let before = tree_cpu_s(&[pid]).unwrap();
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let after = tree_cpu_s(&[pid]).unwrap();
        assert!(after - before >= 0.05, "{before} -> {after}");
        assert!(tree_cpu_s(&[u32::MAX - 1]).is_err());
    }
}
