//! Host collectors: /proc parsers with reused buffers.
//!
//! Each tick reads `/proc/stat`, `/proc/meminfo`, `/proc/loadavg`,
//! `/proc/pressure/{cpu,memory,io}`, `/proc/diskstats` and `/proc/net/dev`
//! into one buffer kept across ticks, parses the bytes in place and pushes
//! label values as slices of that buffer (the batch builder copies a label
//! only the first time it sees it). In steady state a tick allocates
//! nothing: the buffer, the whole-disk cache and the builder's tables have
//! all reached their size.
//!
//! Values are the catalog's wire units (see [`Metric`]). The kernel's
//! counters are `u64`; a value above `i64::MAX` (for nanoseconds of CPU
//! time, after about 292 years) is pinned at `i64::MAX` rather than wrapped.
//!
//! A source that cannot be read (no PSI on this kernel, say) or that does
//! not parse is skipped, with one warning until it works again.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use novacron_shared::metrics::{BatchBuilder, Metric, Scope};

/// `/proc/stat` CPU modes, in the kernel's column order.
const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// `/proc/meminfo` keys and their labels, in push order.
const MEMORY: [(&[u8], &str); 6] = [
    (b"MemTotal:", "total"),
    (b"MemAvailable:", "available"),
    (b"MemFree:", "free"),
    (b"Cached:", "cached"),
    (b"SwapTotal:", "swap_total"),
    (b"SwapFree:", "swap_free"),
];

/// `/proc/loadavg` periods, in the kernel's column order.
const LOAD_PERIODS: [&str; 3] = ["1m", "5m", "15m"];

/// The sources, in collection order. The index is the source's bit in the
/// warned-once masks.
const STAT: usize = 0;
const MEMINFO: usize = 1;
const LOADAVG: usize = 2;
const PRESSURE_CPU: usize = 3;
const PRESSURE_MEMORY: usize = 4;
const PRESSURE_IO: usize = 5;
const DISKSTATS: usize = 6;
const NET_DEV: usize = 7;
const SOURCES: [&str; 8] = [
    "stat",
    "meminfo",
    "loadavg",
    "pressure/cpu",
    "pressure/memory",
    "pressure/io",
    "diskstats",
    "net/dev",
];

/// PSI labels per pressure source: (`some`, `full`); `None` is not pushed
/// (the system-wide `cpu full` line is always zero).
const PRESSURE_LABELS: [(usize, Option<&str>, Option<&str>); 3] = [
    (PRESSURE_CPU, Some("cpu_some"), None),
    (PRESSURE_MEMORY, Some("memory_some"), Some("memory_full")),
    (PRESSURE_IO, Some("io_some"), Some("io_full")),
];

/// Block devices whose names start with these are never reported.
const SKIP_DISKS: [&str; 2] = ["loop", "ram"];

/// Network interfaces whose names start with these (VM taps) are never
/// reported, nor is `lo`.
const SKIP_NETS: [&str; 3] = ["vnet", "tap", "macvtap"];

/// Samples the host from `/proc` (see the module docs).
#[derive(Debug)]
pub struct HostCollector {
    /// The sources' paths, indexed like [`SOURCES`].
    paths: [PathBuf; SOURCES.len()],
    sys_block: PathBuf,
    /// `USER_HZ`: `/proc/stat` ticks per second.
    user_hz: u64,
    /// The file being parsed; reused by every source.
    buf: Vec<u8>,
    /// Sources that could not be read, warned about already.
    unreadable: u8,
    /// Sources that did not parse, warned about already.
    unparsable: u8,
    /// Whether a `/proc/diskstats` name is a whole disk (a directory in
    /// `sys_block`), with the tick it was last seen on.
    disks: HashMap<Box<str>, (bool, u64)>,
    tick: u64,
}

impl HostCollector {
    /// `proc_root` is normally "/proc" (tests pass a fixture directory);
    /// `sys_block` normally "/sys/block".
    pub fn new(proc_root: impl Into<PathBuf>, sys_block: impl Into<PathBuf>) -> HostCollector {
        let root = proc_root.into();
        let user_hz = crate::ffi::clock_ticks_per_second().unwrap_or_else(|| {
            tracing::warn!("sysconf(_SC_CLK_TCK) failed; assuming 100 ticks per second");
            100
        });
        HostCollector {
            paths: SOURCES.map(|s| root.join(s)),
            sys_block: sys_block.into(),
            user_hz,
            buf: Vec::with_capacity(16 * 1024),
            unreadable: 0,
            unparsable: 0,
            disks: HashMap::new(),
            tick: 0,
        }
    }

    /// Reads every source and pushes one value per series into `b`
    /// (between the caller's `start_tick` and `end_tick`), in a stable
    /// order: CPU, CPU count, memory, load, pressure, disks, network, and
    /// devices in the kernel's order. Missing or unparsable sources are
    /// skipped (and logged once).
    pub fn collect(&mut self, b: &mut BatchBuilder) {
        self.tick = self.tick.wrapping_add(1);
        if self.read(STAT) {
            let ok = parse_stat(&self.buf, self.user_hz, b);
            self.parsed(STAT, ok);
        }
        if self.read(MEMINFO) {
            let ok = parse_meminfo(&self.buf, b);
            self.parsed(MEMINFO, ok);
        }
        if self.read(LOADAVG) {
            let ok = parse_loadavg(&self.buf, b);
            self.parsed(LOADAVG, ok);
        }
        for (src, some, full) in PRESSURE_LABELS {
            if self.read(src) {
                let ok = parse_pressure(&self.buf, some, full, b);
                self.parsed(src, ok);
            }
        }
        if self.read(DISKSTATS) {
            let ok = parse_diskstats(&self.buf, &self.sys_block, &mut self.disks, self.tick, b);
            self.parsed(DISKSTATS, ok);
        }
        if self.read(NET_DEV) {
            let ok = parse_net_dev(&self.buf, b);
            self.parsed(NET_DEV, ok);
        }
    }

    /// Reads source `src` into the buffer; false (warned once) when it
    /// cannot be read.
    fn read(&mut self, src: usize) -> bool {
        self.buf.clear();
        let bit = 1u8 << src;
        match File::open(&self.paths[src]).and_then(|mut f| f.read_to_end(&mut self.buf)) {
            Ok(_) => {
                self.unreadable &= !bit;
                true
            }
            Err(e) => {
                if self.unreadable & bit == 0 {
                    self.unreadable |= bit;
                    tracing::warn!(path = %self.paths[src].display(), error = %e, "host metrics source unavailable; skipping it");
                }
                false
            }
        }
    }

    /// Notes whether source `src` parsed fully; warns once when it did not.
    fn parsed(&mut self, src: usize, ok: bool) {
        let bit = 1u8 << src;
        if ok {
            self.unparsable &= !bit;
        } else if self.unparsable & bit == 0 {
            self.unparsable |= bit;
            tracing::warn!(path = %self.paths[src].display(), "host metrics source has unexpected contents; skipping what does not parse");
        }
    }
}

/// The whitespace-separated fields of a line.
fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(u8::is_ascii_whitespace).filter(|f| !f.is_empty())
}

/// The lines of a file.
fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split(|c| *c == b'\n')
}

/// An unsigned decimal integer, all of `s`.
/// The first `N` fields as integers; `None` if there are fewer or one is
/// not an integer.
fn uints<'a, const N: usize>(mut f: impl Iterator<Item = &'a [u8]>) -> Option<[u64; N]> {
    let mut v = [0u64; N];
    for slot in v.iter_mut() {
        *slot = uint(f.next()?)?;
    }
    Some(v)
}

fn uint(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |v, c| {
        if c.is_ascii_digit() {
            v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

/// A non-negative decimal number (`12.34`) as an integer of
/// `10^-digits` units, without floating point: further fraction digits are
/// truncated, missing ones are zeros (`fixed(b"0.5", 3) == Some(500)`).
fn fixed(s: &[u8], digits: u32) -> Option<u64> {
    let (int, frac) = match s.iter().position(|c| *c == b'.') {
        Some(dot) => (&s[..dot], &s[dot + 1..]),
        None => (s, &[][..]),
    };
    let mut v = uint(int)?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut frac = frac.iter();
    for _ in 0..digits {
        let d = frac.next().map_or(0, |c| u64::from(c - b'0'));
        v = v.checked_mul(10)?.checked_add(d)?;
    }
    Some(v)
}

/// A kernel counter on the wire: pinned at `i64::MAX`.
fn wire(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A kernel counter times `mul`, pinned at `i64::MAX`.
fn wire_times(v: u64, mul: u64) -> i64 {
    wire(v.saturating_mul(mul))
}

/// A label value from the buffer (device names are ASCII).
fn label(s: &[u8]) -> Option<&str> {
    std::str::from_utf8(s).ok()
}

/// `/proc/stat`: the aggregate `cpu` line (ticks → ns) and the number of
/// `cpuN` lines.
fn parse_stat(buf: &[u8], user_hz: u64, b: &mut BatchBuilder) -> bool {
    let mut ok = true;
    let mut seen_total = false;
    let mut cpus = 0i64;
    for line in lines(buf) {
        let mut f = fields(line);
        let Some(name) = f.next() else { continue };
        if name == b"cpu" {
            seen_total = true;
            for mode in CPU_MODES {
                match f.next().and_then(uint) {
                    Some(ticks) => {
                        let ns = u128::from(ticks) * 1_000_000_000 / u128::from(user_hz.max(1));
                        b.push(
                            Scope::Host,
                            Metric::HostCpu,
                            Some(mode),
                            i64::try_from(ns).unwrap_or(i64::MAX),
                        );
                    }
                    None => ok = false,
                }
            }
        } else if name.len() > 3 && name.starts_with(b"cpu") && name[3..].iter().all(u8::is_ascii_digit) {
            cpus += 1;
        }
    }
    if cpus > 0 {
        b.push(Scope::Host, Metric::HostCpus, None, cpus);
    }
    ok && seen_total && cpus > 0
}

/// `/proc/meminfo`: the [`MEMORY`] keys, kB → bytes.
fn parse_meminfo(buf: &[u8], b: &mut BatchBuilder) -> bool {
    let mut found = [None::<u64>; MEMORY.len()];
    let mut ok = true;
    for line in lines(buf) {
        let mut f = fields(line);
        let Some(key) = f.next() else { continue };
        let Some(i) = MEMORY.iter().position(|(k, _)| *k == key) else {
            continue;
        };
        match (f.next().and_then(uint), f.next()) {
            (Some(kb), Some(b"kB")) => found[i] = Some(kb),
            _ => ok = false,
        }
    }
    for ((_, kind), v) in MEMORY.iter().zip(found) {
        if let Some(kb) = v {
            b.push(Scope::Host, Metric::HostMemory, Some(kind), wire_times(kb, 1024));
        }
    }
    ok && found[0].is_some()
}

/// `/proc/loadavg`: the three averages, in thousandths.
fn parse_loadavg(buf: &[u8], b: &mut BatchBuilder) -> bool {
    let mut f = fields(buf);
    let mut ok = true;
    for period in LOAD_PERIODS {
        match f.next().and_then(|s| fixed(s, 3)) {
            Some(v) => b.push(Scope::Host, Metric::HostLoad, Some(period), wire(v)),
            None => ok = false,
        }
    }
    ok
}

/// One `/proc/pressure/*` file: per line, `avg10` in hundredths of a
/// percent and `total` in microseconds.
fn parse_pressure(buf: &[u8], some: Option<&str>, full: Option<&str>, b: &mut BatchBuilder) -> bool {
    let mut ok = true;
    for line in lines(buf) {
        let mut f = fields(line);
        let resource = match f.next() {
            None => continue,
            Some(b"some") => some,
            Some(b"full") => full,
            Some(_) => {
                ok = false;
                continue;
            }
        };
        let Some(resource) = resource else { continue };
        let (mut avg10, mut total) = (None, None);
        for kv in f {
            if let Some(v) = kv.strip_prefix(b"avg10=") {
                avg10 = fixed(v, 2);
            } else if let Some(v) = kv.strip_prefix(b"total=") {
                total = uint(v);
            }
        }
        match (avg10, total) {
            (Some(avg10), Some(total)) => {
                b.push(Scope::Host, Metric::HostPressure, Some(resource), wire(avg10));
                b.push(
                    Scope::Host,
                    Metric::HostPressureStall,
                    Some(resource),
                    wire(total),
                );
            }
            _ => ok = false,
        }
    }
    ok
}

/// `/proc/diskstats`: whole disks (directories in `sys_block`), except
/// loop and RAM disks. `disks` caches the whole-disk verdict per name;
/// names not seen this tick are forgotten.
fn parse_diskstats(
    buf: &[u8],
    sys_block: &std::path::Path,
    disks: &mut HashMap<Box<str>, (bool, u64)>,
    tick: u64,
    b: &mut BatchBuilder,
) -> bool {
    let mut ok = true;
    for line in lines(buf) {
        let mut f = fields(line);
        let Some(name) = f.nth(2) else { continue };
        let Some(name) = label(name) else {
            ok = false;
            continue;
        };
        if SKIP_DISKS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let whole = match disks.get_mut(name) {
            Some(e) => {
                e.1 = tick;
                e.0
            }
            None => {
                // A new name: one stat, then cached. Names with a slash
                // (cciss/c0d0) appear in /sys/block with a `!`.
                let whole = !name.contains("..") && sys_block.join(name.replace('/', "!")).is_dir();
                disks.insert(name.into(), (whole, tick));
                whole
            }
        };
        if !whole {
            continue;
        }
        // Fields after the name: reads, reads merged, sectors read, ms
        // reading, writes, writes merged, sectors written, ms writing, I/Os
        // in progress, ms doing I/O, ...
        let Some(v) = uints::<10>(f) else {
            ok = false;
            continue;
        };
        // Sectors in diskstats are always 512 bytes.
        let device = Some(name);
        b.push(
            Scope::Host,
            Metric::HostDiskReadBytes,
            device,
            wire_times(v[2], 512),
        );
        b.push(
            Scope::Host,
            Metric::HostDiskWriteBytes,
            device,
            wire_times(v[6], 512),
        );
        b.push(Scope::Host, Metric::HostDiskReads, device, wire(v[0]));
        b.push(Scope::Host, Metric::HostDiskWrites, device, wire(v[4]));
        b.push(Scope::Host, Metric::HostDiskIoTime, device, wire(v[9]));
    }
    disks.retain(|_, e| e.1 == tick);
    ok
}

/// `/proc/net/dev`: every interface but `lo` and VM taps.
fn parse_net_dev(buf: &[u8], b: &mut BatchBuilder) -> bool {
    let mut ok = true;
    // The two header lines have no colon.
    for line in lines(buf) {
        let Some(colon) = line.iter().position(|c| *c == b':') else {
            continue;
        };
        let Some(name) = fields(&line[..colon]).next().and_then(label) else {
            ok = false;
            continue;
        };
        if name == "lo" || SKIP_NETS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes packets ...
        let Some(v) = uints::<10>(fields(&line[colon + 1..])) else {
            ok = false;
            continue;
        };
        let device = Some(name);
        b.push(Scope::Host, Metric::HostNetRxBytes, device, wire(v[0]));
        b.push(Scope::Host, Metric::HostNetTxBytes, device, wire(v[8]));
        b.push(Scope::Host, Metric::HostNetRxPackets, device, wire(v[1]));
        b.push(Scope::Host, Metric::HostNetTxPackets, device, wire(v[9]));
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::metrics::MetricBatch;
    use std::path::Path;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc");

    /// A fake /sys/block with the fixture's whole disks (and a loop device,
    /// which is skipped by name).
    fn sys_block() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for disk in ["sda", "nvme0n1", "dm-0", "loop0"] {
            std::fs::create_dir(d.path().join(disk)).expect("mkdir");
        }
        d
    }

    /// One collected tick, decoded: (metric, label, value) in push order.
    fn collect_once(c: &mut HostCollector) -> Vec<(Metric, Option<String>, i64)> {
        let mut b = BatchBuilder::new(1000);
        b.start_tick(1_000);
        c.collect(&mut b);
        b.end_tick();
        decode(b.take().expect("batch"))
    }

    fn decode(mut batch: MetricBatch) -> Vec<(Metric, Option<String>, i64)> {
        batch.seq = 1;
        batch.validate().expect("valid");
        let mut vals = Vec::new();
        let mut out = Vec::new();
        for (i, s) in batch.series.iter().enumerate() {
            assert_eq!(batch.scope(s), Scope::Host);
            batch.series_values(i, &mut vals).expect("values");
            let m = Metric::from_id(s.metric).expect("metric");
            out.push((m, batch.label(s).map(str::to_string), vals[0]));
        }
        out
    }

    fn get(d: &[(Metric, Option<String>, i64)], m: Metric, l: Option<&str>) -> Option<i64> {
        d.iter()
            .find(|(dm, dl, _)| *dm == m && dl.as_deref() == l)
            .map(|x| x.2)
    }

    fn labels(d: &[(Metric, Option<String>, i64)], m: Metric) -> Vec<String> {
        d.iter()
            .filter(|x| x.0 == m)
            .filter_map(|x| x.1.clone())
            .collect()
    }

    #[test]
    fn numbers_parse_without_floats() {
        assert_eq!(uint(b"0"), Some(0));
        assert_eq!(uint(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(uint(b"18446744073709551616"), None);
        assert_eq!(uint(b""), None);
        assert_eq!(uint(b"1a"), None);
        assert_eq!(fixed(b"0.52", 3), Some(520));
        assert_eq!(fixed(b"12.345678", 3), Some(12_345));
        assert_eq!(fixed(b"3", 3), Some(3_000));
        assert_eq!(fixed(b"0.5", 2), Some(50));
        assert_eq!(fixed(b"1.23", 2), Some(123));
        assert_eq!(fixed(b"100.00", 2), Some(10_000));
        assert_eq!(fixed(b"1.2x", 2), None);
        assert_eq!(fixed(b".5", 2), None);
        assert_eq!(wire(u64::MAX), i64::MAX);
        assert_eq!(wire_times(u64::MAX / 2, 512), i64::MAX);
    }

    #[test]
    fn fixtures_give_exact_values() {
        let sys = sys_block();
        let mut c = HostCollector::new(FIXTURES, sys.path());
        c.user_hz = 100;
        let d = collect_once(&mut c);
        let ns = |ticks: i64| ticks * 10_000_000;
        let cpu: Vec<i64> = d.iter().filter(|x| x.0 == Metric::HostCpu).map(|x| x.2).collect();
        assert_eq!(
            cpu,
            [
                ns(1_113_349),
                ns(7),
                ns(155_686),
                ns(1_384_467),
                ns(28_035),
                ns(0),
                ns(10_649),
                ns(202_354)
            ]
        );
        assert_eq!(labels(&d, Metric::HostCpu), CPU_MODES);
        assert_eq!(get(&d, Metric::HostCpus, None), Some(4));
        assert_eq!(
            get(&d, Metric::HostMemory, Some("total")),
            Some(16_314_672 * 1024)
        );
        assert_eq!(
            get(&d, Metric::HostMemory, Some("available")),
            Some(9_876_543 * 1024)
        );
        assert_eq!(get(&d, Metric::HostMemory, Some("free")), Some(1_234_567 * 1024));
        assert_eq!(
            get(&d, Metric::HostMemory, Some("cached")),
            Some(5_432_100 * 1024)
        );
        assert_eq!(
            get(&d, Metric::HostMemory, Some("swap_total")),
            Some(8_388_604 * 1024)
        );
        assert_eq!(
            get(&d, Metric::HostMemory, Some("swap_free")),
            Some(8_000_000 * 1024)
        );
        assert_eq!(
            labels(&d, Metric::HostMemory),
            ["total", "available", "free", "cached", "swap_total", "swap_free"]
        );
        assert_eq!(get(&d, Metric::HostLoad, Some("1m")), Some(520));
        assert_eq!(get(&d, Metric::HostLoad, Some("5m")), Some(1_080));
        assert_eq!(get(&d, Metric::HostLoad, Some("15m")), Some(12_050));
        assert_eq!(
            labels(&d, Metric::HostPressure),
            ["cpu_some", "memory_some", "memory_full", "io_some", "io_full"]
        );
        assert_eq!(get(&d, Metric::HostPressure, Some("cpu_some")), Some(123));
        assert_eq!(
            get(&d, Metric::HostPressureStall, Some("cpu_some")),
            Some(2_306_463_231)
        );
        assert_eq!(get(&d, Metric::HostPressure, Some("memory_full")), Some(5));
        assert_eq!(
            get(&d, Metric::HostPressureStall, Some("memory_full")),
            Some(4_242)
        );
        assert_eq!(get(&d, Metric::HostPressure, Some("io_some")), Some(10_000));
        assert_eq!(
            get(&d, Metric::HostPressureStall, Some("io_full")),
            Some(77_000_001)
        );
        // Whole disks only, in the kernel's order: no partition, loop or RAM disk.
        assert_eq!(labels(&d, Metric::HostDiskReads), ["sda", "nvme0n1", "dm-0"]);
        assert_eq!(get(&d, Metric::HostDiskReads, Some("sda")), Some(84_521));
        assert_eq!(
            get(&d, Metric::HostDiskReadBytes, Some("sda")),
            Some(4_512_378 * 512)
        );
        assert_eq!(get(&d, Metric::HostDiskWrites, Some("sda")), Some(912_345));
        assert_eq!(
            get(&d, Metric::HostDiskWriteBytes, Some("sda")),
            Some(23_456_789 * 512)
        );
        assert_eq!(get(&d, Metric::HostDiskIoTime, Some("sda")), Some(654_321));
        assert_eq!(get(&d, Metric::HostDiskIoTime, Some("nvme0n1")), Some(1_111));
        // Every interface but lo and VM taps.
        assert_eq!(labels(&d, Metric::HostNetRxBytes), ["eth0", "br0", "wlan0"]);
        assert_eq!(get(&d, Metric::HostNetRxBytes, Some("eth0")), Some(987_654_321));
        assert_eq!(get(&d, Metric::HostNetRxPackets, Some("eth0")), Some(1_234_567));
        assert_eq!(get(&d, Metric::HostNetTxBytes, Some("eth0")), Some(123_456_789));
        assert_eq!(get(&d, Metric::HostNetTxPackets, Some("eth0")), Some(765_432));
        // A counter too large to fit the wire is pinned, not wrapped.
        assert_eq!(get(&d, Metric::HostNetTxBytes, Some("wlan0")), Some(i64::MAX));
        // 8 + 1 + 6 + 3 + 5 × 2 + 3 disks × 5 + 3 interfaces × 4.
        assert_eq!(d.len(), 8 + 1 + 6 + 3 + 10 + 15 + 12);
        // Every metric of the catalog's host section is covered.
        for m in Metric::ALL
            .iter()
            .filter(|m| m.owner() == novacron_shared::metrics::Owner::Host)
        {
            assert!(d.iter().any(|x| x.0 == *m), "{m:?} missing");
        }
    }

    /// A copy of the fixtures without `skip` (paths under the proc root).
    fn fixtures_without(skip: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("pressure")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("net")).expect("mkdir");
        for src in SOURCES.iter().filter(|s| !skip.contains(s)) {
            std::fs::copy(Path::new(FIXTURES).join(src), d.path().join(src)).expect("copy");
        }
        d
    }

    #[test]
    fn missing_sources_are_skipped() {
        let sys = sys_block();
        let root = fixtures_without(&["pressure/cpu", "pressure/memory", "pressure/io"]);
        let mut c = HostCollector::new(root.path(), sys.path());
        let d = collect_once(&mut c);
        assert!(labels(&d, Metric::HostPressure).is_empty());
        assert!(labels(&d, Metric::HostPressureStall).is_empty());
        assert_eq!(labels(&d, Metric::HostCpu).len(), 8);
        assert_eq!(labels(&d, Metric::HostDiskReads).len(), 3);
        assert_eq!(c.unreadable, 0b11_1000, "the PSI files are noted as missing");
        // A later tick is the same, without new warnings.
        assert_eq!(collect_once(&mut c), d);
        // A missing /sys/block: no disk counts as whole.
        let mut c = HostCollector::new(root.path(), sys.path().join("nope"));
        let d = collect_once(&mut c);
        assert!(labels(&d, Metric::HostDiskReads).is_empty());
        assert_eq!(labels(&d, Metric::HostNetRxBytes).len(), 3);
    }

    #[test]
    fn garbage_is_skipped_not_fatal() {
        let sys = sys_block();
        let root = fixtures_without(&[]);
        std::fs::write(root.path().join("loadavg"), "0.10 nope\n").expect("write");
        std::fs::write(
            root.path().join("pressure/io"),
            "some avg10=x total=1\nfull avg10=0.01 total=9\n",
        )
        .expect("write");
        std::fs::write(
            root.path().join("diskstats"),
            "   8       0 sda 1 2\n   8  16 sdb\n",
        )
        .expect("write");
        let mut c = HostCollector::new(root.path(), sys.path());
        let d = collect_once(&mut c);
        assert_eq!(labels(&d, Metric::HostLoad), ["1m"]);
        assert_eq!(get(&d, Metric::HostPressure, Some("io_full")), Some(1));
        assert_eq!(get(&d, Metric::HostPressure, Some("io_some")), None);
        assert!(labels(&d, Metric::HostDiskReads).is_empty());
        assert_eq!(c.unparsable, 1 << LOADAVG | 1 << PRESSURE_IO | 1 << DISKSTATS);
        // Once fixed, the warning is re-armed.
        std::fs::copy(Path::new(FIXTURES).join("loadavg"), root.path().join("loadavg")).expect("copy");
        collect_once(&mut c);
        assert_eq!(c.unparsable, 1 << PRESSURE_IO | 1 << DISKSTATS);
    }

    #[test]
    fn steady_state_ticks_reuse_their_buffers() {
        let sys = sys_block();
        let mut c = HostCollector::new(FIXTURES, sys.path());
        let mut b = BatchBuilder::new(1000);
        let mut caps = Vec::new();
        for t in 1..=4u64 {
            b.start_tick(t * 1_000);
            c.collect(&mut b);
            b.end_tick();
            caps.push((
                c.buf.capacity(),
                c.buf.as_ptr(),
                c.disks.capacity(),
                c.disks.len(),
            ));
        }
        assert_eq!(caps[1], caps[2]);
        assert_eq!(caps[2], caps[3]);
        // The disk cache holds what diskstats lists, minus loop and RAM disks.
        assert_eq!(caps[3].3, 6);
        let batch = b.take().expect("batch");
        assert_eq!(batch.ticks.len(), 4, "one layout for every tick");
    }

    #[test]
    fn the_real_proc() {
        let mut c = HostCollector::new("/proc", "/sys/block");
        let mut b = BatchBuilder::new(1000);
        for t in 1..=2u64 {
            b.start_tick(t * 1_000);
            c.collect(&mut b);
            b.end_tick();
        }
        let mut batch = b.take().expect("batch");
        batch.seq = 1;
        batch.validate().expect("valid");
        let mut cpu = Vec::new();
        let mut vals = Vec::new();
        for (i, s) in batch.series.iter().enumerate() {
            batch.series_values(i, &mut vals).expect("values");
            assert_eq!(vals.len(), 2, "the same layout both ticks");
            match Metric::from_id(s.metric) {
                Some(Metric::HostCpu) => cpu.push((batch.label(s).map(str::to_string), vals.clone())),
                Some(Metric::HostMemory) if batch.label(s) == Some("total") => assert!(vals[0] > 0),
                Some(Metric::HostCpus) => assert!(vals[0] >= 1),
                _ => {}
            }
        }
        assert_eq!(cpu.len(), 8, "{cpu:?}");
        // User time only grows (iowait, and idle on some NO_HZ kernels, may
        // step back a little, so they are not checked).
        let user = &cpu
            .iter()
            .find(|(m, _)| m.as_deref() == Some("user"))
            .expect("user")
            .1;
        assert!(user[1] >= user[0], "user time went backwards: {user:?}");
        assert!(cpu
            .iter()
            .any(|(m, v)| matches!(m.as_deref(), Some("user" | "idle")) && v[0] > 0));
    }
}
