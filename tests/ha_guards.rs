//! The HA guards on real hosts: the stamp checker against real QEMUs, the
//! disk locks of the test bed's `--ha` hosts (libvirt's lockd lock manager,
//! a virtlockd per host), and the test bed's stand-in for a BMC
//! (`packaging/dev/fence-testbed`).
//!
//! The guest writes a stamp every 100 ms to its first disk when booted
//! with `novacron.stamp=1` (the harness's `stamps` module explains the
//! format); every test here reads the disk at its end and runs the checker,
//! which fails when two copies of a guest ran at once.
//!
//! Needs root, QEMU, libvirt and the guest files (`.ci/run` provides
//! them); fails loudly without. Run one at a time with the other
//! real-libvirt tests.

#![allow(clippy::unwrap_used)]
// Real processes keep real time: the guests stamp in real time.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use novacron_e2e::stamps::{self, StampError};
use novacron_e2e::{domstate, guest_dir, testbed, virsh, wait_for, HaBed, NsHost};

/// The tests share the test bed: one at a time.
static BED: Mutex<()> = Mutex::new(());

fn take_bed() -> std::sync::MutexGuard<'static, ()> {
    BED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scratch directory QEMU can reach (o+x on the way).
fn scratch(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    Command::new("chmod").arg("0755").arg(d.path()).status().unwrap();
    d
}

/// How many stamps boot `boot` has on `disk` now.
fn stamps_of(disk: &Path, boot: &str) -> usize {
    let img = stamps::read_image(disk).unwrap_or_else(|e| panic!("{e}"));
    stamps::slots(&img)
        .into_iter()
        .flatten()
        .filter(|s| matches!(s, stamps::Slot::Stamp(st) if st.boot == boot))
        .count()
}

/// The boot ids of every `NOVACRON-GUEST-STAMPS` line of a console log.
fn stamp_boots(console: &Path) -> Vec<String> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("NOVACRON-GUEST-STAMPS "))
        .filter_map(|l| l.split(" boot=").nth(1))
        .map(|r| r.split(' ').next().unwrap_or("").trim().to_string())
        .collect()
}

/// Waits until the console at `console` shows the `n`-th stamping boot
/// and that boot has written at least `stamps` stamps to `disk`; returns
/// its boot id.
fn wait_stamping(console: &Path, disk: &Path, n: usize, stamps: usize) -> String {
    let boot = wait_for(
        &format!("boot {n} to start stamping ({})", console.display()),
        Duration::from_secs(180),
        || stamp_boots(console).get(n - 1).cloned(),
    );
    wait_for(
        &format!("boot {boot} to write {stamps} stamps"),
        Duration::from_secs(60),
        || (stamps_of(disk, &boot) >= stamps).then_some(()),
    );
    boot
}

/// A QEMU of the test guest run directly (no libvirt): TCG, 128 MiB,
/// stamping on `disk` (raw) with `file.locking=off`, so that two of them
/// can open the one disk; SMBIOS serial `host`, sku `epoch`.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn start(disk: &Path, console: &Path, host: &str, epoch: u32) -> Qemu {
        let g = guest_dir();
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "accel=tcg",
                "-m",
                "128",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(g.join("vmlinuz"))
            .arg("-initrd")
            .arg(g.join("initrd.img"))
            .args(["-append", "console=ttyS0 panic=-1 novacron.stamp=1"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,file.locking=off",
                disk.display()
            ))
            .arg("-smbios")
            .arg(format!("type=1,serial={host},sku={epoch}"))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64: {e}"));
        Qemu { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The checker on real disks: boots one after another pass (each after
/// the last used slot, the second boot's run right after the first's), and
/// two QEMUs writing the one disk at once (QEMU's image locking off, as
/// two hosts with no lock would) are reported as an interleave.
#[test]
fn the_stamp_checker_passes_boots_in_turn_and_catches_two_qemus_on_one_disk() {
    let _bed = take_bed();
    let dir = scratch("nc-stamps-");
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();

    // One copy at a time: boot, stamp, kill; again on "another host".
    let c1 = dir.path().join("c1.log");
    let mut q = Qemu::start(&disk, &c1, "host-a", 1);
    let b1 = wait_stamping(&c1, &disk, 1, 20);
    q.kill();
    let c2 = dir.path().join("c2.log");
    let mut q = Qemu::start(&disk, &c2, "host-b", 2);
    let b2 = wait_stamping(&c2, &disk, 1, 20);
    q.kill();
    let r = stamps::check_image(&disk).unwrap_or_else(|e| panic!("one copy at a time failed the check: {e}"));
    eprintln!("{r}");
    assert_eq!(r.boots.len(), 2, "{r}");
    assert_eq!(
        (r.boots[0].boot.as_str(), r.boots[1].boot.as_str()),
        (b1.as_str(), b2.as_str())
    );
    assert_eq!(r.hosts(), ["host-a", "host-b"]);
    assert_eq!((r.boots[0].epoch, r.boots[1].epoch), (Some(1), Some(2)));
    assert_eq!(
        r.boots[1].first_slot,
        r.boots[0].stamps + r.torn.len(),
        "the second boot continues after the first"
    );
    // A TCG guest under a build may stall, but not for seconds.
    assert!(r.max_gap_ms() < 2000, "{r}");

    // Two at once on the same disk.
    let c3 = dir.path().join("c3.log");
    let c4 = dir.path().join("c4.log");
    let mut q3 = Qemu::start(&disk, &c3, "host-a", 3);
    let b3 = wait_stamping(&c3, &disk, 1, 10);
    let mut q4 = Qemu::start(&disk, &c4, "host-b", 3);
    let b4 = wait_for(
        "the second copy to start stamping",
        Duration::from_secs(180),
        || stamp_boots(&c4).first().cloned(),
    );
    // Both write for a while.
    wait_for("the second copy to write stamps", Duration::from_secs(60), || {
        (stamps_of(&disk, &b4) >= 5).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    q3.kill();
    q4.kill();
    let e = stamps::check_image(&disk).expect_err("two copies at once passed the check");
    eprintln!("two copies at once: {e}");
    match &e {
        StampError::Interleave { boot, other, .. } => {
            let pair = [boot.as_str(), other.as_str()];
            assert!(pair.contains(&b3.as_str()) && pair.contains(&b4.as_str()), "{e}");
        }
        StampError::Counter { boot, .. } => assert!(*boot == b3 || *boot == b4, "{e}"),
        _ => panic!("not reported as two copies writing: {e}"),
    }
}

/// A domain of the test guest for host `h`: its disk `disk` (qcow2, in the
/// shared pool), stamping, SMBIOS serial = the host's name, sku = `epoch`.
fn stamping_xml(name: &str, uuid: &str, disk: &Path, console: &Path, h: &NsHost, epoch: u32) -> String {
    let g = guest_dir();
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <sysinfo type='smbios'><system><entry name='serial'>{host}</entry>\
         <entry name='sku'>{epoch}</entry></system></sysinfo>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 panic=-1 novacron.stamp=1</cmdline><smbios mode='sysinfo'/></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='pty'><log file='{}' append='on'/></serial><console type='pty'/></devices></domain>",
        g.join("vmlinuz").display(),
        g.join("initrd.img").display(),
        disk.display(),
        console.display(),
        host = h.name,
    )
}

/// The pids holding a POSIX lock on `file` (from `/proc/locks`).
fn lock_holders(file: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).unwrap();
    // The device number there may be the underlying file system's (an
    // overlay reports its own): match the inode.
    let want = format!(":{}", m.ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: POSIX  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
            let i = f.iter().position(|x| *x == "POSIX")?;
            let pid = f.get(i + 3)?.parse().ok()?;
            f.get(i + 4)?.ends_with(&want).then_some(pid)
        })
        .collect()
}

/// The comm of a process.
fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Disk locks with no NovaCron at all: the same domain on two `--ha` hosts
/// (lockd on, the disk in the shared pool). Host 1's virtlockd holds a lock
/// on the disk while its guest runs; starting the domain on host 2 then
/// fails at the lock and host 1's guest keeps writing its stamps; once
/// every process of host 1 is killed the lock is gone and the start on
/// host 2 succeeds. The checker passes: two boots, one per host, in order.
#[test]
fn a_second_start_of_a_running_disk_fails_at_the_lock_until_its_host_dies() {
    let _bed = take_bed();
    let bed = HaBed::up(2);
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    for h in [h1, h2] {
        let conf =
            std::fs::read_to_string(h.libvirt_log_dir().parent().unwrap().join("etc/qemu.conf")).unwrap();
        assert!(
            conf.lines().any(|l| l.trim() == "lock_manager = \"lockd\""),
            "{} runs without lockd",
            h.name
        );
    }
    let pool = bed.shared_dir("lock-");
    let dir = scratch("nc-lock-");
    let disk = pool.join("locked.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create");
    let uuid = "6e6f7661-6372-6f6e-2d6c-6f636b656421";
    let console = dir.path().join("console.log");
    for (h, epoch) in [(h1, 1), (h2, 2)] {
        let xml = dir.path().join(format!("{}.xml", h.name));
        std::fs::write(&xml, stamping_xml("locked", uuid, &disk, &console, h, epoch)).unwrap();
        virsh(&h.local_uri, &["define", xml.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:?}"));
    }

    virsh(&h1.local_uri, &["start", "locked"]).unwrap_or_else(|e| panic!("{e:?}"));
    let b1 = wait_stamping(&console, &disk, 1, 10);
    let holders = lock_holders(&disk);
    assert!(
        holders.iter().any(|&p| comm(p) == "virtlockd"),
        "no virtlockd holds a lock on the disk: {holders:?} ({:?})",
        holders.iter().map(|&p| comm(p)).collect::<Vec<_>>()
    );

    // The forced second start fails at the lock.
    let e = virsh(&h2.local_uri, &["start", "locked"]).expect_err("a second host started a running disk");
    let msg = e.errors.join(" / ");
    eprintln!("second start refused: {msg}");
    assert!(
        msg.contains("Failed to acquire lock") || msg.contains("resource busy") || msg.contains("lock"),
        "refused for another reason: {msg}"
    );
    assert_eq!(domstate(&h2.local_uri, "locked").as_deref(), Some("shut off"));
    assert_eq!(domstate(&h1.local_uri, "locked").as_deref(), Some("running"));
    // The first copy keeps writing, untouched.
    let n = stamps_of(&disk, &b1);
    wait_for("the first copy to keep stamping", Duration::from_secs(30), || {
        (stamps_of(&disk, &b1) >= n + 20).then_some(())
    });
    let r = stamps::check_image(&disk).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.boots.len(), 1, "{r}");

    // Host 1 loses every process: its virtlockd's lock goes with it.
    bed.kill_host(h1);
    assert!(
        lock_holders(&disk).is_empty(),
        "a lock outlived its host: {:?}",
        lock_holders(&disk)
    );
    virsh(&h2.local_uri, &["start", "locked"]).unwrap_or_else(|e| panic!("start after the kill: {e:?}"));
    let b2 = wait_stamping(&console, &disk, 2, 10);
    virsh(&h2.local_uri, &["destroy", "locked"]).unwrap_or_else(|e| panic!("{e:?}"));

    let r = stamps::check_image(&disk).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{r}");
    assert_eq!(r.boots.len(), 2, "{r}");
    assert_eq!(
        (r.boots[0].boot.as_str(), r.boots[1].boot.as_str()),
        (b1.as_str(), b2.as_str())
    );
    assert_eq!(r.hosts(), [h1.name.as_str(), h2.name.as_str()]);
    assert_eq!((r.boots[0].epoch, r.boots[1].epoch), (Some(1), Some(2)));
}

/// The path of `packaging/dev/fence-testbed` of this checkout.
fn fence_testbed() -> PathBuf {
    testbed().with_file_name("fence-testbed")
}

/// Runs the BMC stand-in; returns its exit code.
fn fence(host: &str, action: &str, timeout: Duration) -> Option<i32> {
    let mut c = Command::new(fence_testbed())
        .args([host, action])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + timeout;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st.code();
        }
        if std::time::Instant::now() > end {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test bed's stand-in for a BMC: status says on (0) while any
/// process of the host runs; off kills them all (0) and status then says
/// off (2); off again is "already off" (0); on revives the host (0). The
/// faults: `hang` never answers, `lie` says off (and claims off done) with
/// every process still running, `fail` answers 1.
#[test]
fn the_bmc_stand_in_powers_a_host_off_and_on_and_can_hang_lie_or_fail() {
    let _bed = take_bed();
    let bed = HaBed::up(1);
    let h = &bed.hosts[0];
    let t = Duration::from_secs(60);
    let fault = h.libvirt_log_dir().parent().unwrap().join("bmc-fault");
    assert_eq!(fence(&h.name, "status", t), Some(0));

    std::fs::write(&fault, "hang\n").unwrap();
    assert_eq!(
        fence(&h.name, "status", Duration::from_secs(3)),
        None,
        "a hanging BMC answered"
    );
    std::fs::write(&fault, "lie\n").unwrap();
    assert_eq!(fence(&h.name, "off", t), Some(0));
    assert_eq!(fence(&h.name, "status", t), Some(2));
    assert!(!bed.pids(h).is_empty(), "the lying BMC touched the host");
    std::fs::write(&fault, "fail\n").unwrap();
    assert_eq!(fence(&h.name, "status", t), Some(1));
    assert_eq!(fence(&h.name, "off", t), Some(1));
    std::fs::remove_file(&fault).unwrap();

    assert_eq!(fence(&h.name, "off", t), Some(0));
    assert_eq!(bed.pids(h), Vec::<u32>::new(), "off left processes");
    assert_eq!(fence(&h.name, "status", t), Some(2));
    assert_eq!(fence(&h.name, "off", t), Some(0), "already off counts as done");
    assert_eq!(fence(&h.name, "on", t), Some(0));
    assert_eq!(fence(&h.name, "status", t), Some(0));
    assert!(virsh(&h.local_uri, &["uri"]).is_ok(), "libvirtd is back");
    let names: Vec<String> = bed.pids(h).into_iter().map(comm).collect();
    assert!(
        names.iter().any(|n| n == "virtlockd"),
        "virtlockd is back: {names:?}"
    );
}
