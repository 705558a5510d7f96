//! What the device is: hostname, os-release, uname, machine id, CPUs, memory, the agent's build,
//! the TPM, network interfaces. Read from the running system (procfs, /etc, libc).

use flotilla::status::{NetworkInterface, SystemInfo};
use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Most interfaces and addresses per interface reported (the control plane's bounds).
const MAX_INTERFACES: usize = 16;
const MAX_ADDRESSES: usize = 8;

/// The system as it is now.
pub(super) fn system_info(boot_id: &str, tpm_used: bool, agent_version: &str) -> SystemInfo {
    let os = os_release();
    let field = |key: &str| os.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let (release, machine) = uname();
    SystemInfo {
        hostname: hostname(),
        os_id: field("ID").unwrap_or_else(|| "linux".into()),
        os_version_id: field("VERSION_ID").unwrap_or_default(),
        os_pretty_name: field("PRETTY_NAME").unwrap_or_else(|| "Linux".into()),
        kernel_release: release,
        architecture: machine,
        boot_id: boot_id.to_string(),
        machine_id: read_trimmed("/etc/machine-id"),
        cpu_count: cpu_count(),
        memory_total_bytes: super::resources::meminfo().0,
        agent_version: agent_version.to_string(),
        agent_build: format!(
            "{}-{} {}",
            std::env::consts::ARCH,
            std::env::consts::OS,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        ),
        tpm_present: Path::new("/dev/tpmrm0").exists() || Path::new("/dev/tpm0").exists(),
        tpm_used,
        interfaces: interfaces(),
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn hostname() -> String {
    let name = read_trimmed("/proc/sys/kernel/hostname");
    if !name.is_empty() {
        return name;
    }
    std::env::var("HOSTNAME").unwrap_or_default()
}

/// `/etc/os-release` (or `/usr/lib/os-release`), as key/value pairs with quotes removed.
fn os_release() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    parse_os_release(&text)
}

pub(super) fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.trim().to_string(), unquoted.replace("\\\"", "\"")))
        })
        .collect()
}

/// uname: (release, machine).
fn uname() -> (String, String) {
    // SAFETY: `utsname` is plain old data; uname fills it and NUL-terminates each field.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname the call may write.
    if unsafe { libc::uname(&mut name) } != 0 {
        return (String::new(), std::env::consts::ARCH.to_string());
    }
    let text = |field: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        unsafe { CStr::from_ptr(field.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (text(&name.release), text(&name.machine))
}

fn cpu_count() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(online).unwrap_or(1).max(1)
}

/// Interfaces with their addresses, loopback left out, at most the bounds.
fn interfaces() -> Vec<NetworkInterface> {
    let mut found: Vec<NetworkInterface> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return found;
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: cursor points into the list getifaddrs returned, which is alive until freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0 || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the address and netmask, when set, point at sockaddrs of the family they name.
        let Some(address) = (unsafe { address_of(entry.ifa_addr, entry.ifa_netmask) }) else {
            continue;
        };
        let room = found.len() < MAX_INTERFACES;
        match found.iter_mut().find(|i| i.name == name) {
            Some(interface) if interface.addresses.len() < MAX_ADDRESSES => {
                interface.addresses.push(address)
            }
            Some(_) => {}
            None if room => found.push(NetworkInterface {
                name,
                addresses: vec![address],
            }),
            None => {}
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// `address/prefix` of an IPv4 or IPv6 sockaddr.
///
/// # Safety
/// `addr` and `mask` must be null or point at sockaddrs of the family in their `sa_family`.
unsafe fn address_of(addr: *const libc::sockaddr, mask: *const libc::sockaddr) -> Option<String> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees addr points at a sockaddr.
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let ip = unsafe { (*(addr as *const libc::sockaddr_in)).sin_addr.s_addr };
            let prefix = if mask.is_null() {
                32
            } else {
                // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                unsafe { (*(mask as *const libc::sockaddr_in)).sin_addr.s_addr }.count_ones()
            };
            Some(format!("{}/{prefix}", Ipv4Addr::from(u32::from_be(ip))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let ip = unsafe { (*(addr as *const libc::sockaddr_in6)).sin6_addr.s6_addr };
            let prefix = if mask.is_null() {
                128
            } else {
                // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
                let bytes = unsafe { (*(mask as *const libc::sockaddr_in6)).sin6_addr.s6_addr };
                bytes.iter().map(|b| b.count_ones()).sum()
            };
            Some(format!("{}/{prefix}", Ipv6Addr::from(ip)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes_and_comments() {
        let parsed = parse_os_release(
            "# comment\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\nVERSION_ID='13'\n",
        );
        assert_eq!(
            parsed,
            [
                (
                    "PRETTY_NAME".to_string(),
                    "Debian GNU/Linux 13 (trixie)".to_string()
                ),
                ("ID".to_string(), "debian".to_string()),
                ("VERSION_ID".to_string(), "13".to_string()),
            ]
        );
    }

    #[test]
    fn reads_this_machine() {
        let info = system_info("boot", false, "1.2.3");
        let uname_r = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .unwrap();
        assert_eq!(
            info.kernel_release,
            String::from_utf8_lossy(&uname_r.stdout).trim()
        );
        let uname_m = std::process::Command::new("uname")
            .arg("-m")
            .output()
            .unwrap();
        assert_eq!(
            info.architecture,
            String::from_utf8_lossy(&uname_m.stdout).trim()
        );
        assert!(info.cpu_count >= 1);
        assert!(info.memory_total_bytes > 0);
        assert!(info.interfaces.len() <= MAX_INTERFACES);
        assert!(
            info.interfaces
                .iter()
                .all(|i| i.addresses.len() <= MAX_ADDRESSES && i.name != "lo")
        );
    }
}
