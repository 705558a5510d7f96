//! Resource samples: load averages and CPU busy share from procfs, memory from /proc/meminfo,
//! filesystems with statvfs (the state directory's, `/`, and those disk monitors name).

use flotilla::status::{FilesystemUsage, ResourceUsage};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Most filesystems reported (the control plane's bound).
const MAX_FILESYSTEMS: usize = 16;

/// Samples resources; CPU use is measured between two samples.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    /// (busy, total) jiffies at the previous sample.
    previous_cpu: Option<(u64, u64)>,
}

impl Sampler {
    /// A sample now, with the filesystems holding `paths` (deduplicated by mount point).
    pub(super) fn sample(&mut self, paths: &[PathBuf], now_ms: i64) -> ResourceUsage {
        let (memory_total_bytes, available) = meminfo();
        let cpu = cpu_jiffies();
        let cpu_percent = match (self.previous_cpu, cpu) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                let busy = busy1.saturating_sub(busy0) * 100;
                u32::try_from(busy.div_ceil(total1 - total0))
                    .unwrap_or(100)
                    .min(100)
            }
            _ => 0,
        };
        if cpu.is_some() {
            self.previous_cpu = cpu;
        }
        let mounts = mount_points();
        let mut filesystems: Vec<FilesystemUsage> = Vec::new();
        for path in paths {
            if filesystems.len() >= MAX_FILESYSTEMS {
                break;
            }
            let mount = mount_point_of(&mounts, path);
            if filesystems.iter().any(|f| f.mount_point == mount) {
                continue;
            }
            if let Some((total_bytes, used_bytes)) = statvfs(Path::new(&mount)) {
                filesystems.push(FilesystemUsage {
                    mount_point: mount,
                    total_bytes,
                    used_bytes,
                });
            }
        }
        ResourceUsage {
            sampled_ms: now_ms,
            load_centi: load_averages(),
            cpu_percent,
            memory_total_bytes,
            memory_used_bytes: memory_total_bytes.saturating_sub(available),
            filesystems,
        }
    }
}

/// (MemTotal, MemAvailable) in bytes.
pub(super) fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal"), field("MemAvailable"))
}

fn load_averages() -> [u32; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().map_or(0, |l| (l * 100.0).round() as u32));
    [
        values.next().unwrap_or(0),
        values.next().unwrap_or(0),
        values.next().unwrap_or(0),
    ]
}

/// (busy, total) jiffies of all CPUs from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Mount points from /proc/self/mounts (octal escapes decoded).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1).map(unescape_mount))
        .collect()
}

fn unescape_mount(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(code) = u8::from_str_radix(&String::from_utf8_lossy(digits), 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The longest mount point containing `path` (`/` at worst).
pub(super) fn mount_point_of(mounts: &[String], path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .iter()
        .filter(|m| path.starts_with(Path::new(m.as_str())))
        .max_by_key(|m| m.len())
        .cloned()
        .unwrap_or_else(|| "/".to_string())
}

/// (total, used) bytes of the filesystem at `path`; used counts what unprivileged users cannot
/// have (as `df` does).
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` is plain old data the call fills.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let block = stats.f_frsize as u64;
    let total = stats.f_blocks as u64 * block;
    let available = stats.f_bavail as u64 * block;
    Some((total, total.saturating_sub(available)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_by_longest_prefix() {
        let mounts: Vec<String> = ["/", "/var", "/var/lib/flotilla", "/va"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(mount_point_of(&mounts, Path::new("/var/lib/x")), "/var");
        assert_eq!(
            mount_point_of(&mounts, Path::new("/var/lib/flotilla/a")),
            "/var/lib/flotilla"
        );
        assert_eq!(mount_point_of(&mounts, Path::new("/vat")), "/");
        assert_eq!(unescape_mount("/mnt/with\\040space"), "/mnt/with space");
    }

    #[test]
    fn samples_this_machine() {
        let mut sampler = Sampler::default();
        let first = sampler.sample(&[PathBuf::from("/"), PathBuf::from("/")], 1);
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_used_bytes <= first.memory_total_bytes);
        assert_eq!(first.filesystems.len(), 1);
        assert_eq!(first.filesystems[0].mount_point, "/");
        assert!(first.filesystems[0].total_bytes > 0);
        let second = sampler.sample(&[], 2);
        assert!(second.cpu_percent <= 100);
    }
}
