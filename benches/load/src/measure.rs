//! Reading what a run costs: process memory and CPU from /proc, socket memory from `ss`, counters
//! from a Prometheus exposition, and latency percentiles.

use anyhow::{Context, Result};
use serde::Serialize;
use std::process::Command;

/// Resident memory (KiB) and CPU time (seconds) of a process.
pub(crate) fn usage(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command name.
    Ok((rss, (field(11) + field(12)) / ticks))
}

/// Total kernel socket memory (KiB) of established TCP sockets on local `port`, from `ss -tmn`:
/// receive and send buffers allocated, forward-allocated, queued and option memory.
pub(crate) fn socket_memory(port: u16) -> Option<f64> {
    let out = Command::new("ss")
        .args([
            "-tmn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bytes = 0u64;
    for chunk in text.split("skmem:(").skip(1) {
        let inner = chunk.split(')').next().unwrap_or_default();
        for field in inner.split(',') {
            for prefix in ["r", "t", "f", "w", "o"] {
                if let Some(v) = field
                    .strip_prefix(prefix)
                    .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
                {
                    bytes += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Some(bytes as f64 / 1024.0)
}

/// Sum of every series of a metric family in a Prometheus exposition (optionally only series whose
/// labels contain `labels`).
pub(crate) fn metric_sum(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latencies {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub(crate) fn of(mut millis: Vec<f64>) -> Latencies {
        millis.sort_by(f64::total_cmp);
        let at = |p: f64| {
            if millis.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * millis.len() as f64).ceil() as usize;
            millis[rank.clamp(1, millis.len()) - 1]
        };
        Latencies {
            count: millis.len(),
            p50_ms: at(50.0),
            p99_ms: at(99.0),
            max_ms: millis.last().copied().unwrap_or(0.0),
        }
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.count, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it). Returns it.
pub(crate) fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a properly initialised rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let l = Latencies::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            (l.count, l.p50_ms, l.p99_ms, l.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Latencies::of(vec![]).count, 0);
    }

    #[test]
    fn metric_sums_match_whole_names_and_labels() {
        let text = "# HELP a x\na_total{r=\"x\"} 2\na_total{r=\"y\"} 3\na_total_more 7\n";
        assert_eq!(metric_sum(text, "a_total", ""), 5.0);
        assert_eq!(metric_sum(text, "a_total", "r=\"y\""), 3.0);
    }
}
