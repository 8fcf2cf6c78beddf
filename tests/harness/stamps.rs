//! The stamp checker: the offline, Jepsen-style proof that no two copies of
//! a guest ever ran at once.
//!
//! The test-bed guest booted with `novacron.stamp=1` (its `/init`, in
//! `packaging/dev/testbed.sh`) writes, every 100 ms, one stamp to its first
//! disk: slot `i` is the 512-byte sector [`BASE_SECTOR`] + `i`, holding one
//! text line, zero-padded,
//!
//! ```text
//! NCSTAMP1 boot=ID host=H epoch=E ctr=N up_ms=U wall_ms=W crc=C
//! ```
//!
//! (the kernel's boot id, the SMBIOS system serial and sku that the agent
//! sets to the host id and the VM's epoch — `unknown` when absent —, a
//! counter from 0 per boot, the guest's uptime and wall clock in ms, and the
//! CRC-32 of everything before ` crc=`, so a torn write shows). Each boot
//! finds the end of the used slots and continues after it, synced to the
//! disk at every stamp. So one copy at a time leaves one contiguous run of
//! slots per boot, counters 0, 1, 2, … in it, the runs in boot order; a
//! second copy writing at the same time breaks that, and [`check`] says so:
//! a boot whose stamps appear in two runs, a run whose counters skip or do
//! not start at 0, an epoch going back from one boot to the next, a torn
//! stamp inside a run, or a used slot after an unused one.
//!
//! On success it reports per boot the host, epoch, stamps, the largest gap
//! between consecutive stamps (guest uptime), and between boots the gap
//! from the last stamp of one to the first of the next (guest wall clocks:
//! a TCG guest's clock starts from the RTC's whole second, so these are
//! good to about a second).

use std::fmt;
use std::path::Path;
use std::process::Command;

/// The first sector holding a stamp (the ones before are left alone).
pub const BASE_SECTOR: usize = 8;
/// Bytes per slot (one sector).
pub const SLOT_BYTES: usize = 512;
/// Every stamp starts with this.
pub const MAGIC: &[u8; 8] = b"NCSTAMP1";

/// Why an image's stamps do not prove one copy at a time (or cannot be
/// read).
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    /// The image could not be read.
    #[error("cannot read the disk image {path}: {reason}")]
    Read {
        /// The image.
        path: String,
        /// What failed.
        reason: String,
    },
    /// No slot holds a stamp.
    #[error("no stamps on the disk (was the guest booted with novacron.stamp=1?)")]
    NoStamps,
    /// A boot's stamps appear in two separate runs of slots: another boot
    /// wrote in between, i.e. two copies ran at once.
    #[error("interleaved: boot {boot} wrote slots {first_run} and {again}, boot {other} wrote slot {between} in between")]
    Interleave {
        /// The boot seen twice.
        boot: String,
        /// A slot of its first run.
        first_run: usize,
        /// A slot of its later run.
        again: usize,
        /// The boot between them.
        other: String,
        /// Its slot.
        between: usize,
    },
    /// A run's counters do not go 0, 1, 2, …: stamps of it were
    /// overwritten or a boot did not start after the used slots.
    #[error("boot {boot}: slot {slot} has counter {got}, expected {want}")]
    Counter {
        /// The boot.
        boot: String,
        /// The slot.
        slot: usize,
        /// Its counter.
        got: u64,
        /// The counter that slot should hold.
        want: u64,
    },
    /// A later boot ran with a lower epoch than an earlier one.
    #[error("epoch went back: boot {boot} (slot {slot}) has epoch {epoch} after epoch {before}")]
    EpochBack {
        /// The later boot.
        boot: String,
        /// Its first slot.
        slot: usize,
        /// Its epoch.
        epoch: u64,
        /// The epoch of a boot before it.
        before: u64,
    },
    /// A stamp whose check sum fails (a torn or foreign write) between two
    /// stamps of one boot.
    #[error("torn stamp at slot {slot} inside the run of boot {boot}")]
    TornInRun {
        /// The slot.
        slot: usize,
        /// The boot around it.
        boot: String,
    },
    /// A used slot after an unused one (boots only ever append).
    #[error("slot {used} holds a stamp but slot {hole} before it is empty")]
    Hole {
        /// The empty slot.
        hole: usize,
        /// The used slot after it.
        used: usize,
    },
}

/// One valid stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Its slot.
    pub slot: usize,
    /// The guest kernel's boot id.
    pub boot: String,
    /// The host id the agent put in the SMBIOS serial (`unknown` if none).
    pub host: String,
    /// The VM's epoch from the SMBIOS sku (`None` if absent or not a number).
    pub epoch: Option<u64>,
    /// The counter within its boot.
    pub ctr: u64,
    /// Guest uptime, ms.
    pub up_ms: u64,
    /// Guest wall clock, Unix ms.
    pub wall_ms: u64,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// A stamp that checks out.
    Stamp(Stamp),
    /// The magic, but a line that does not parse or whose CRC fails.
    Torn(usize),
}

/// One boot's run of stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The guest kernel's boot id.
    pub boot: String,
    /// The host it ran on (its SMBIOS serial).
    pub host: String,
    /// Its epoch.
    pub epoch: Option<u64>,
    /// Its first slot.
    pub first_slot: usize,
    /// How many stamps it wrote.
    pub stamps: usize,
    /// Its first stamp's wall clock, Unix ms.
    pub first_wall_ms: u64,
    /// Its last stamp's wall clock, Unix ms.
    pub last_wall_ms: u64,
    /// The largest gap between two consecutive stamps (guest uptime), ms.
    pub max_gap_ms: u64,
}

/// The result of a check that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The boots in order.
    pub boots: Vec<Boot>,
    /// Torn stamps at the end of a run (a write cut short by a kill).
    pub torn: Vec<usize>,
}

impl Report {
    /// The largest gap between consecutive stamps of any boot, ms.
    pub fn max_gap_ms(&self) -> u64 {
        self.boots.iter().map(|b| b.max_gap_ms).max().unwrap_or(0)
    }

    /// Per pair of consecutive boots, the last stamp of one to the first
    /// of the next (guest wall clocks, ms; negative if a clock was behind).
    pub fn gaps_between_boots_ms(&self) -> Vec<i64> {
        self.boots
            .windows(2)
            .map(|w| w[1].first_wall_ms as i64 - w[0].last_wall_ms as i64)
            .collect()
    }

    /// The hosts of the boots, in order.
    pub fn hosts(&self) -> Vec<&str> {
        self.boots.iter().map(|b| b.host.as_str()).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} boot(s), no interleave", self.boots.len())?;
        let gaps = self.gaps_between_boots_ms();
        for (i, b) in self.boots.iter().enumerate() {
            let epoch = b.epoch.map_or_else(|| "unknown".to_string(), |e| e.to_string());
            writeln!(
                f,
                "  boot {} host {} epoch {epoch}: slots {}..{} ({} stamps), largest gap {} ms",
                b.boot,
                b.host,
                b.first_slot,
                b.first_slot + b.stamps,
                b.stamps,
                b.max_gap_ms
            )?;
            if let Some(g) = gaps.get(i) {
                writeln!(f, "  -> {g} ms to the next boot")?;
            }
        }
        if !self.torn.is_empty() {
            writeln!(f, "  torn last stamps at slots {:?}", self.torn)?;
        }
        Ok(())
    }
}

/// CRC-32 (IEEE, as zlib and busybox's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The stamp line the guest writes (without the padding), for tests.
pub fn stamp_line(boot: &str, host: &str, epoch: &str, ctr: u64, up_ms: u64, wall_ms: u64) -> String {
    let body =
        format!("NCSTAMP1 boot={boot} host={host} epoch={epoch} ctr={ctr} up_ms={up_ms} wall_ms={wall_ms}");
    format!("{body} crc={:08x}\n", crc32(body.as_bytes()))
}

/// Parses one slot's bytes: `None` when it holds no stamp (no magic).
pub fn parse_slot(slot: usize, bytes: &[u8]) -> Option<Slot> {
    if !bytes.starts_with(MAGIC) {
        return None;
    }
    Some(parse_line(slot, bytes).map_or(Slot::Torn(slot), Slot::Stamp))
}

fn parse_line(slot: usize, bytes: &[u8]) -> Option<Stamp> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    // Everything after the line is the zero padding.
    if bytes[end + 1..].iter().any(|&b| b != 0) {
        return None;
    }
    let line = std::str::from_utf8(&bytes[..end]).ok()?;
    let (body, crc) = line.rsplit_once(" crc=")?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32(body.as_bytes()) {
        return None;
    }
    let mut fields = body.split(' ');
    if fields.next()? != "NCSTAMP1" {
        return None;
    }
    let mut field = |key: &str| -> Option<String> {
        let (k, v) = fields.next()?.split_once('=')?;
        (k == key).then(|| v.to_string())
    };
    let boot = field("boot")?;
    let host = field("host")?;
    let epoch = field("epoch")?.parse().ok();
    let ctr = field("ctr")?.parse().ok()?;
    let up_ms = field("up_ms")?.parse().ok()?;
    let wall_ms = field("wall_ms")?.parse().ok()?;
    if fields.next().is_some() {
        return None;
    }
    Some(Stamp {
        slot,
        boot,
        host,
        epoch,
        ctr,
        up_ms,
        wall_ms,
    })
}

/// Every slot of a raw disk image up to the last used one (`None`: empty).
pub fn slots(image: &[u8]) -> Vec<Option<Slot>> {
    let area = image.get(BASE_SECTOR * SLOT_BYTES..).unwrap_or(&[]);
    let mut out: Vec<Option<Slot>> = area
        .chunks_exact(SLOT_BYTES)
        .enumerate()
        .map(|(i, b)| parse_slot(i, b))
        .collect();
    while matches!(out.last(), Some(None)) {
        out.pop();
    }
    out
}

/// Checks a raw disk image's stamps (see the module header).
pub fn check(image: &[u8]) -> Result<Report, StampError> {
    let all = slots(image);
    if all.is_empty() {
        return Err(StampError::NoStamps);
    }
    if let Some(hole) = all.iter().position(Option::is_none) {
        return Err(StampError::Hole {
            hole,
            used: all.len() - 1,
        });
    }
    let all: Vec<Slot> = all.into_iter().flatten().collect();
    let mut boots: Vec<Boot> = Vec::new();
    let mut torn = Vec::new();
    // Where each boot's run was seen, to name an interleave.
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut prev: Option<&Stamp> = None;
    let mut max_epoch: Option<u64> = None;
    let mut pending_torn: Option<usize> = None;
    for s in &all {
        let st = match s {
            Slot::Torn(i) => {
                pending_torn = Some(*i);
                continue;
            }
            Slot::Stamp(st) => st,
        };
        let same_run = prev.is_some_and(|p| p.boot == st.boot);
        if let Some(t) = pending_torn.take() {
            if same_run {
                return Err(StampError::TornInRun {
                    slot: t,
                    boot: st.boot.clone(),
                });
            }
            torn.push(t);
        }
        if same_run {
            let p = prev.expect("same run has a previous stamp");
            if st.ctr != p.ctr + 1 {
                return Err(StampError::Counter {
                    boot: st.boot.clone(),
                    slot: st.slot,
                    got: st.ctr,
                    want: p.ctr + 1,
                });
            }
            let b = boots.last_mut().expect("a run in progress");
            b.stamps += 1;
            b.last_wall_ms = st.wall_ms;
            b.max_gap_ms = b.max_gap_ms.max(st.up_ms.saturating_sub(p.up_ms));
        } else {
            if let Some(&first_run) = seen.get(&st.boot) {
                let p = prev.expect("a boot seen before has a stamp before this one");
                return Err(StampError::Interleave {
                    boot: st.boot.clone(),
                    first_run,
                    again: st.slot,
                    other: p.boot.clone(),
                    between: p.slot,
                });
            }
            if st.ctr != 0 {
                return Err(StampError::Counter {
                    boot: st.boot.clone(),
                    slot: st.slot,
                    got: st.ctr,
                    want: 0,
                });
            }
            if let (Some(e), Some(m)) = (st.epoch, max_epoch) {
                if e < m {
                    return Err(StampError::EpochBack {
                        boot: st.boot.clone(),
                        slot: st.slot,
                        epoch: e,
                        before: m,
                    });
                }
            }
            seen.insert(st.boot.clone(), st.slot);
            boots.push(Boot {
                boot: st.boot.clone(),
                host: st.host.clone(),
                epoch: st.epoch,
                first_slot: st.slot,
                stamps: 1,
                first_wall_ms: st.wall_ms,
                last_wall_ms: st.wall_ms,
                max_gap_ms: 0,
            });
        }
        if let Some(e) = st.epoch {
            max_epoch = Some(max_epoch.map_or(e, |m| m.max(e)));
        }
        prev = Some(st);
    }
    torn.extend(pending_torn);
    if boots.is_empty() {
        return Err(StampError::NoStamps);
    }
    Ok(Report { boots, torn })
}

/// How many slots of a raw image hold something (the next boot's first
/// slot): where a window for [`largest_gap_from`] starts.
pub fn used_slots(image: &[u8]) -> usize {
    slots(image).len()
}

/// The largest gap (guest uptime, ms) between consecutive stamps of one
/// boot among the slots from `from_slot` on: the longest the guest stopped
/// stamping in that window (a guest that stopped for good shows no gap
/// here: count its stamps too).
pub fn largest_gap_from(image: &[u8], from_slot: usize) -> u64 {
    let stamps: Vec<Stamp> = slots(image)
        .into_iter()
        .skip(from_slot)
        .filter_map(|s| match s {
            Some(Slot::Stamp(st)) => Some(st),
            _ => None,
        })
        .collect();
    stamps
        .windows(2)
        .filter(|w| w[0].boot == w[1].boot)
        .map(|w| w[1].up_ms.saturating_sub(w[0].up_ms))
        .max()
        .unwrap_or(0)
}

/// Reads a disk image as raw bytes: a raw image as it is, a qcow2 one
/// through `qemu-img convert -U` (which reads it while a QEMU runs it).
pub fn read_image(path: &Path) -> Result<Vec<u8>, StampError> {
    let err = |reason: String| StampError::Read {
        path: path.display().to_string(),
        reason,
    };
    let head = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut h = [0u8; 4];
        f.read_exact(&mut h).map_err(|e| err(e.to_string()))?;
        h
    };
    if &head != b"QFI\xfb" {
        return std::fs::read(path).map_err(|e| err(e.to_string()));
    }
    let dir = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
    let raw = dir.path().join("image.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .map_err(|e| err(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(&raw).map_err(|e| err(e.to_string()))
}

/// [`read_image`] then [`check`].
pub fn check_image(path: &Path) -> Result<Report, StampError> {
    check(&read_image(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of `slots` slots, filled from `stamps` in order.
    fn image(stamps: &[Vec<u8>]) -> Vec<u8> {
        let mut img = vec![0u8; (BASE_SECTOR + stamps.len() + 4) * SLOT_BYTES];
        for (i, s) in stamps.iter().enumerate() {
            let at = (BASE_SECTOR + i) * SLOT_BYTES;
            img[at..at + s.len()].copy_from_slice(s);
        }
        img
    }

    fn st(boot: &str, host: &str, epoch: u64, ctr: u64) -> Vec<u8> {
        stamp_line(
            boot,
            host,
            &epoch.to_string(),
            ctr,
            3000 + ctr * 100,
            1_000_000 + ctr * 100,
        )
        .into_bytes()
    }

    /// `n` stamps of one boot.
    fn run(boot: &str, host: &str, epoch: u64, n: u64) -> Vec<Vec<u8>> {
        (0..n).map(|c| st(boot, host, epoch, c)).collect()
    }

    #[test]
    fn crc32_matches_busybox() {
        // `printf abc | busybox crc32`
        assert_eq!(crc32(b"abc"), 0x3524_41c2);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_line_written_by_the_guest_parses() {
        // Copied from a real guest's disk.
        let line = b"NCSTAMP1 boot=40a64545-bbad-4413-857a-97109cc3a451 host=hostA epoch=7 ctr=1 up_ms=3840 wall_ms=1796175688522 crc=1b154756\n";
        let mut slot = line.to_vec();
        slot.resize(SLOT_BYTES, 0);
        let Some(Slot::Stamp(s)) = parse_slot(3, &slot) else {
            panic!("not a stamp")
        };
        assert_eq!(s.host, "hostA");
        assert_eq!(s.epoch, Some(7));
        assert_eq!(
            (s.slot, s.ctr, s.up_ms, s.wall_ms),
            (3, 1, 3840, 1_796_175_688_522)
        );
    }

    #[test]
    fn boots_one_after_another_pass_with_their_hosts_epochs_and_gaps() {
        let mut s = run("a", "h1", 1, 30);
        s.extend(run("b", "h2", 2, 20));
        s.extend(run("c", "h2", 2, 5));
        let r = check(&image(&s)).unwrap();
        assert_eq!(r.hosts(), ["h1", "h2", "h2"]);
        assert_eq!(r.boots.iter().map(|b| b.stamps).collect::<Vec<_>>(), [30, 20, 5]);
        assert_eq!(r.boots[1].first_slot, 30);
        assert_eq!(r.boots[2].epoch, Some(2));
        assert_eq!(r.max_gap_ms(), 100);
        // Each synthetic boot's wall clock starts at 1_000_000.
        assert_eq!(r.gaps_between_boots_ms(), [-2900, -1900]);
        assert!(r.to_string().contains("3 boot(s), no interleave"));
    }

    #[test]
    fn the_largest_gap_is_measured_on_guest_uptime() {
        let mut s = run("a", "h1", 1, 3);
        s.push(stamp_line("a", "h1", "1", 3, 3200 + 1700, 1_000_000).into_bytes());
        let r = check(&image(&s)).unwrap();
        assert_eq!(r.max_gap_ms(), 1700);
    }

    #[test]
    fn the_largest_gap_of_a_window_ignores_what_came_before() {
        let mut s = run("a", "h1", 1, 3);
        s.push(stamp_line("a", "h1", "1", 3, 3200 + 1700, 1_000_000).into_bytes());
        s.extend((4..8).map(|c| stamp_line("a", "h1", "1", c, 4900 + (c - 3) * 100, 0).into_bytes()));
        let img = image(&s);
        assert_eq!(used_slots(&img), 8);
        assert_eq!(largest_gap_from(&img, 0), 1700);
        assert_eq!(largest_gap_from(&img, 3), 100);
    }

    #[test]
    fn two_copies_writing_at_once_are_an_interleave() {
        // b starts while a still runs: a's later stamps land after b's.
        let mut s = run("a", "h1", 1, 10);
        s.extend(run("b", "h2", 1, 3));
        s.push(st("a", "h1", 1, 10));
        s.push(st("b", "h2", 1, 3));
        let e = check(&image(&s)).unwrap_err();
        assert!(
            matches!(&e, StampError::Interleave { boot, other, .. } if boot == "a" && other == "b"),
            "{e}"
        );
    }

    #[test]
    fn an_overwritten_stamp_breaks_the_counters() {
        // Two copies that found the same end overwrite each other's slots.
        let mut s = run("a", "h1", 1, 5);
        s[3] = st("a", "h1", 1, 7);
        let e = check(&image(&s)).unwrap_err();
        assert!(matches!(e, StampError::Counter { got: 7, want: 3, .. }), "{e}");
        // A boot's run that does not start at 0.
        let mut s = run("a", "h1", 1, 5);
        s.extend((2..5).map(|c| st("b", "h2", 1, c)));
        let e = check(&image(&s)).unwrap_err();
        assert!(matches!(e, StampError::Counter { got: 2, want: 0, .. }), "{e}");
    }

    #[test]
    fn an_epoch_going_back_fails() {
        let mut s = run("a", "h1", 3, 5);
        s.extend(run("b", "h2", 2, 5));
        let e = check(&image(&s)).unwrap_err();
        assert!(
            matches!(
                e,
                StampError::EpochBack {
                    epoch: 2,
                    before: 3,
                    ..
                }
            ),
            "{e}"
        );
        // Unknown epochs (no SMBIOS sku) are not compared.
        let mut s = run("a", "h1", 3, 5);
        s.extend((0..5).map(|c| stamp_line("b", "unknown", "unknown", c, c * 100, c * 100).into_bytes()));
        let r = check(&image(&s)).unwrap();
        assert_eq!(r.boots[1].epoch, None);
    }

    #[test]
    fn a_torn_stamp_is_visible_and_fails_inside_a_run() {
        let mut s = run("a", "h1", 1, 6);
        // Half of another stamp over the end of slot 3.
        let mut torn = s[3].clone();
        torn.resize(SLOT_BYTES, 0);
        let mut other = st("zzzz", "h9", 1, 0);
        other.resize(SLOT_BYTES, 0);
        torn[40..].copy_from_slice(&other[40..]);
        assert_eq!(parse_slot(3, &torn), Some(Slot::Torn(3)));
        s[3] = torn;
        let e = check(&image(&s)).unwrap_err();
        assert!(matches!(e, StampError::TornInRun { slot: 3, .. }), "{e}");
        // The last stamp of a boot cut short by a kill is reported, not failed.
        let mut s = run("a", "h1", 1, 4);
        let mut cut = st("a", "h1", 1, 4);
        cut.truncate(40);
        s.push(cut);
        s.extend(run("b", "h2", 2, 3));
        let r = check(&image(&s)).unwrap();
        assert_eq!(r.torn, [4]);
        assert_eq!(r.boots.len(), 2);
    }

    #[test]
    fn a_hole_or_no_stamps_fail() {
        let mut s = run("a", "h1", 1, 3);
        s.push(Vec::new());
        s.extend(run("b", "h1", 1, 2));
        let e = check(&image(&s)).unwrap_err();
        assert!(matches!(e, StampError::Hole { hole: 3, used: 5 }), "{e}");
        assert!(matches!(check(&image(&[])), Err(StampError::NoStamps)));
        assert!(matches!(check(&[]), Err(StampError::NoStamps)));
    }
}
