//! Helpers for NovaCron's benchmark harness (the `fleet-sim` binary):
//! per-process CPU and memory from `/proc`, percentiles, and a one-line
//! description of the machine the figures were taken on.

// The benchmarks' timers measure real elapsed time by the OS clock: the
// clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

/// One reading of a process's CPU time and memory, from `/proc/<pid>/`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// When the reading was taken.
    pub at: Instant,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size, KiB (`VmHWM`).
    pub hwm_kib: u64,
    /// Number of threads.
    pub threads: u64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
    pub fn read(pid: u32) -> std::io::Result<Self> {
        let at = Instant::now();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let (cpu_ticks, threads) =
            parse_stat(&stat).ok_or_else(|| std::io::Error::other(format!("unparsable /proc/{pid}/stat")))?;
        Ok(Self {
            at,
            cpu_ticks,
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
            threads,
        })
    }

    /// CPU used between `earlier` and `self`, as a percentage of one core.
    pub fn cpu_percent_since(&self, earlier: &ProcSample, ticks_per_sec: u64) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 || ticks_per_sec == 0 {
            return 0.0;
        }
        let cpu = self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / ticks_per_sec as f64;
        100.0 * cpu / wall
    }
}

/// `(utime + stime, num_threads)` from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) may contain spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); utime is field 14, stime 15, num_threads 20.
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some((num(11)? + num(12)?, num(17)?))
}

/// A `Key:   123 kB` value from `/proc/<pid>/status`, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 if that fails,
/// which is what Linux uses on every common architecture).
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// The machine: logical CPUs, CPU model and memory, e.g.
/// `2 CPUs (Intel(R) Xeon(R) Processor @ 2.50GHz), 23.5 GiB RAM, socket
/// rmem_default 208 KiB / rmem_max 4096 KiB`.
pub fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU model".into());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_kib(&t, "MemTotal:"))
        .unwrap_or(0);
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or_else(|| "?".into(), |v| format!("{} KiB", v / 1024))
    };
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB RAM, socket rmem_default {} / rmem_max {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        sysctl("rmem_default"),
        sysctl("rmem_max")
    )
}

/// Packets the kernel dropped on one UDP socket because its receive buffer
/// was full (the `drops` column of `/proc/net/udp` and `/proc/net/udp6`),
/// summed over the sockets bound to local `port`.
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    let mut found = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (p, drops) in text.lines().skip(1).filter_map(parse_udp_line) {
            if p == port {
                found = Some(found.unwrap_or(0) + drops);
            }
        }
    }
    found
}

/// `(local port, drops)` from one line of `/proc/net/udp`.
pub fn parse_udp_line(line: &str) -> Option<(u16, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let port = f.get(1)?.rsplit_once(':')?.1;
    Some((u16::from_str_radix(port, 16).ok()?, f.last()?.parse().ok()?))
}

/// The system-wide UDP `RcvbufErrors` counter from `/proc/net/snmp`.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// CPU time of the whole machine, in clock ticks summed over all CPUs, from
/// the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    /// Time in processes (user, nice, system).
    pub processes: u64,
    /// Time in interrupts and softirqs (loopback traffic is processed here,
    /// charged to no process).
    pub interrupts: u64,
    /// Time the hypervisor says it took from this VM's CPUs.
    pub steal: u64,
}

impl MachineTicks {
    /// Reads `/proc/stat`.
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let at = |i: usize| v.get(i).copied();
        Some(Self {
            processes: at(0)? + at(1)? + at(2)?,
            interrupts: at(5)? + at(6)?,
            steal: at(7)?,
        })
    }
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Order statistics of a set of durations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many values.
    pub count: usize,
    /// The median.
    pub median: Duration,
    /// The 99th percentile (nearest rank).
    pub p99: Duration,
    /// The largest value.
    pub max: Duration,
}

impl Summary {
    /// Summarises `values` (in any order); `None` when empty.
    pub fn of(mut values: Vec<Duration>) -> Option<Self> {
        values.sort_unstable();
        Some(Self {
            count: values.len(),
            median: percentile(&values, 50.0)?,
            p99: percentile(&values, 99.0)?,
            max: *values.last()?,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {}, p99 {}, max {} (n={})",
            ms(self.median),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// The nearest-rank `p`th percentile of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// A duration in milliseconds with a precision that suits its size.
pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let stat = "4242 (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 7 0 100 2000 300";
        assert_eq!(parse_stat(stat), Some((300, 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_reads() {
        let s = ProcSample::read(std::process::id()).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib && s.threads >= 1);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&[7u32], 99.0), Some(7));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
        let s = Summary::of(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(
            s.map(|s| (s.median, s.max)),
            Some((Duration::from_millis(1), Duration::from_millis(3)))
        );
    }

    #[test]
    fn udp_lines() {
        let l = "  263: 0100007F:B660 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 1 2 0 17";
        assert_eq!(parse_udp_line(l), Some((0xB660, 17)));
        assert!(udp_rcvbuf_errors().is_some());
    }

    #[test]
    fn machine_counters() {
        assert!(MachineTicks::read().is_some());
        assert!(load_average().is_some());
    }

    #[test]
    fn status_values() {
        let t = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(t, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(t, "VmSwap:"), None);
    }
}
