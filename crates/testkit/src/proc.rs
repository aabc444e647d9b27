//! What the load tool, the benches and the tests read from Linux's `/proc`
//! about a process: CPU time, memory, the open-files limit, and which
//! process listens on a port.
//!
//! **CPU time** is the sum of the first field of
//! `/proc/PID/task/*/schedstat` over the process's threads: nanoseconds on
//! a CPU, exact, where `/proc/PID/stat`'s `utime + stime` counts 10 ms
//! ticks. It misses threads that exited during the run (tokio's workers live
//! as long as the runtime; its blocking-pool threads do little), so when
//! schedstat is unavailable, or reports less than `stat` does, the `stat`
//! figure is used. `stat` counts in `USER_HZ` units, which the kernel fixes
//! at 100 per second on every mainstream architecture whatever its internal
//! tick rate (`getconf CLK_TCK` prints it); this module assumes 100 rather
//! than link libc for `sysconf`.
//!
//! **Memory** is `VmRSS` (resident now) and `VmHWM` (the peak) from
//! `/proc/PID/status`, in KiB.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};

/// `USER_HZ`: the unit of the times in `/proc/PID/stat` (see the module doc).
const USER_HZ: u64 = 100;

/// A process to measure: a pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Pid(u32),
    Myself,
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Pid(pid) => format!("/proc/{pid}"),
            Proc::Myself => "/proc/self".to_owned(),
        }
    }

    /// CPU time used so far by all the process's threads, in nanoseconds.
    pub fn cpu_ns(self) -> anyhow::Result<u64> {
        let dir = self.dir();
        let stat = fs::read_to_string(format!("{dir}/stat"))
            .with_context(|| format!("cannot read {dir}/stat (has the process exited?)"))?;
        let ticks = parse_stat_cpu_ticks(&stat)
            .with_context(|| format!("unexpected format of {dir}/stat"))?;
        let from_stat = ticks * (1_000_000_000 / USER_HZ);
        let from_schedstat = schedstat_sum(&dir).unwrap_or(0);
        // schedstat is exact but forgets exited threads; stat is coarse but
        // complete. The larger is the better estimate (they differ by less
        // than a tick per thread when no thread exited).
        Ok(from_schedstat.max(from_stat))
    }

    /// Resident memory now and at its peak.
    pub fn memory(self) -> anyhow::Result<Memory> {
        let dir = self.dir();
        let status = fs::read_to_string(format!("{dir}/status"))
            .with_context(|| format!("cannot read {dir}/status (has the process exited?)"))?;
        parse_status_memory(&status).with_context(|| format!("no VmRSS/VmHWM in {dir}/status"))
    }

    /// Whether any thread of the process is still running. The main
    /// thread alone is not enough: it turns zombie before its siblings have
    /// exited, while the process still holds its sockets.
    pub fn alive(self) -> bool {
        let Ok(tasks) = fs::read_dir(format!("{}/task", self.dir())) else {
            return false;
        };
        tasks.flatten().any(|task| {
            fs::read_to_string(task.path().join("stat"))
                .is_ok_and(|stat| !matches!(stat_state(&stat), Some('Z') | Some('X') | None))
        })
    }
}

fn schedstat_sum(dir: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for entry in fs::read_dir(format!("{dir}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        // A thread may exit between listing and reading: skip it.
        let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    any.then_some(total)
}

/// The fields after `comm`, which is in parentheses and may contain spaces.
fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    let close = stat.rfind(')')?;
    Some(stat[close + 1..].split_whitespace())
}

fn stat_state(stat: &str) -> Option<char> {
    stat_fields(stat)?.next()?.chars().next()
}

/// `utime + stime` (fields 14 and 15 of `/proc/PID/stat`), in ticks.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // After comm: field 3 (state) is index 0, so utime (14) is index 11.
    let mut fields = stat_fields(stat)?.skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident size so far.
    pub hwm_kib: u64,
}

fn parse_status_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Makes sure this process may open `needed` files, raising its soft limit
/// up to the hard one if necessary, or says how to.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    let limits =
        fs::read_to_string("/proc/self/limits").context("cannot read /proc/self/limits")?;
    let (soft, hard) =
        parse_open_files_limit(&limits).context("no \"Max open files\" in /proc/self/limits")?;
    if soft >= needed {
        return Ok(());
    }
    if hard >= needed && rlimit::increase_nofile_limit(needed).is_ok_and(|got| got >= needed) {
        return Ok(());
    }
    bail!(
        "this run needs about {needed} file descriptors but the limit is {soft} (hard limit {hard}); \
         raise it in the shell first, for example `ulimit -n {needed}` (as root or after raising \
         the hard limit if {needed} > {hard})"
    )
}

/// Soft and hard `Max open files` (`u64::MAX` for unlimited).
fn parse_open_files_limit(limits: &str) -> Option<(u64, u64)> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let value = |field: &str| -> Option<u64> {
        if field == "unlimited" {
            Some(u64::MAX)
        } else {
            field.parse().ok()
        }
    };
    Some((value(fields.next()?)?, value(fields.next()?)?))
}

/// The pid of the process holding the TCP socket listening on `port`
/// (loopback or any address), if this user can see it.
///
/// Finds the socket's inode in `/proc/net/tcp{,6}`, then the process with a
/// file descriptor on that inode. Used to measure the real server when a
/// peer is started through `sh -c`, whose pid is the shell's, and to say who
/// holds a port a peer needs.
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let targets: Vec<String> = inodes
        .iter()
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if targets
                    .iter()
                    .any(|target| link.as_os_str() == target.as_str())
                {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Inodes of sockets in state LISTEN (0A) on `port` in a `/proc/net/tcp` table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let port_hex = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?;
            let (_, local_port) = local.rsplit_once(':')?;
            (local_port == port_hex && *state == "0A")
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect()
}

/// The parent pid of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.nth(1)?.parse().ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        match parent_of(pid) {
            Some(parent) if parent != pid && parent != 0 => pid = parent,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_even_with_spaces_in_comm() {
        let stat = "1234 (tokio (worker) 1) S 1 1234 1234 0 -1 4194560 \
                    1000 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(stat_state(stat), Some('S'));
    }

    #[test]
    fn parses_memory_from_status() {
        let status =
            "Name:\tchat-server\nVmPeak:\t 9000 kB\nVmHWM:\t   7000 kB\nVmRSS:\t   5000 kB\n";
        assert_eq!(
            parse_status_memory(status),
            Some(Memory {
                rss_kib: 5000,
                hwm_kib: 7000
            })
        );
        assert_eq!(parse_status_memory("Name: x\n"), None);
    }

    #[test]
    fn parses_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files_limit(limits), Some((1024, 524288)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_open_files_limit(unlimited),
            Some((u64::MAX, u64::MAX))
        );
    }

    #[test]
    fn finds_listening_sockets_in_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
           1: 0100007F:1F40 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0 20 4 30 10 -1\n";
        assert_eq!(listening_inodes(table, 8000), vec![4242]);
        assert!(listening_inodes(table, 8001).is_empty());
    }

    #[test]
    fn measures_this_process() {
        let me = Proc::Myself;
        assert!(me.alive());
        assert!(me.memory().unwrap().rss_kib > 0);
        let spin: u64 = (0..2_000_000u64).fold(0, |a, b| a ^ b.wrapping_mul(31));
        assert!(me.cpu_ns().unwrap() > 0 || spin == 1);
        assert!(descends_from(std::process::id(), std::process::id()));
    }
}
