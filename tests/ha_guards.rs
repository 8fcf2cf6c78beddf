//! The HA guards on real hosts: the stamp checker against real QEMUs, the
//! disk locks of the test bed's `--ha` hosts (libvirt's lockd lock manager,
//! a virtlockd per host), the test bed's stand-in for a BMC
//! (`packaging/dev/fence-testbed`), and then with NovaCron at work: the
//! keep-running isolation response under disk locks, the hardware fence
//! hook (powering off, already off, hanging), and the peer witness (a
//! 60 s server outage stops nothing; a host cut from everything fences).
//!
//! The guest writes a stamp every 100 ms to its first disk when booted
//! with `novacron.stamp=1` (the harness's `stamps` module explains the
//! format); every test here reads the disk at its end and runs the checker,
//! which fails when two copies of a guest ran at once.
//!
//! Needs root, QEMU, libvirt and the guest files (`.ci/run` provides
//! them); fails loudly without. Run one at a time with the other
//! real-libvirt tests.
//!
//! Over 900 lines as one file: the test-bed checks and the NovaCron
//! tests share the bed's lock and the stamp helpers (scratch pools,
//! waiting for a boot to stamp, counting a boot's stamps), and each
//! NovaCron test is the bed check it builds on plus the product. Its
//! `Fleet` repeats part of `tests/ha.rs`'s; both belong in one harness
//! module, which is the way to split this file (a follow-up).

#![allow(clippy::unwrap_used)]
// Real processes keep real time: the guests stamp in real time.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use novacron_e2e::stamps::{self, StampError};
use novacron_e2e::{domstate, guest_dir, testbed, virsh, wait_for, Agent, Cut, HaBed, NsHost, Server};
use serde_json::json;

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

/// The boot ids of every complete `NOVACRON-GUEST-STAMPS` line of a
/// console log (a line still being written is not one yet).
fn stamp_boots(console: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
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

// ------------------------------------------------------------ NovaCron --
//
// The guards with NovaCron at work: the server in the bed's server
// namespace, an agent inside each host's namespace, HA guests with a disk
// in the shared pool, stamping.

/// Heartbeats every 500 ms; a session silent for 3 s is closed.
const AGENTS_TOML: &str = "heartbeat_interval = \"500ms\"\nsession_timeout = \"3s\"";
/// The lease terms of these tests (as tests/ha.rs: 5 s lease, 2 s fence
/// time, one host of three failing is a host failure, not a mass one).
const HA_TOML: &str = "[ha]\nlease = \"5s\"\nfence_time = \"2s\"\nmass_failure_ratio = 0.5\n";

/// The server, one agent per host, the shared pool, and every HA event
/// the server published since the start.
struct Fleet {
    bed: HaBed,
    server: Server,
    agents: Vec<Agent>,
    consoles: Vec<PathBuf>,
    pool: PathBuf,
    events: std::sync::Arc<Mutex<Vec<String>>>,
    _scratch: tempfile::TempDir,
}

impl Fleet {
    /// `n` hosts; `ha_extra` goes into the server's `[ha]` (after
    /// [`HA_TOML`]), `tables` after it, `vms_extra` into every agent's
    /// `[vms]`.
    fn start(n: usize, ha_extra: &str, tables: &str, vms_extra: &str) -> Fleet {
        let bed = HaBed::up(n);
        let pool = bed.shared_dir("guards-pool-");
        let scratch = scratch("nc-guards-");
        let server = Server::start_in_netns(
            &bed.server_ns,
            &bed.server_ip,
            AGENTS_TOML,
            &format!("{HA_TOML}{ha_extra}\n{tables}"),
        );
        let mut agents = Vec::new();
        let mut consoles = Vec::new();
        for h in &bed.hosts {
            let console = scratch.path().join(format!("console-{}", h.name));
            std::fs::create_dir_all(&console).unwrap();
            Command::new("chmod").arg("0755").arg(&console).status().unwrap();
            let vms = format!(
                "virt_type = \"qemu\"\nmigration_uri = \"{}\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"\nstorage_shared = true\n{vms_extra}",
                h.migration_uri,
                console.display(),
                pool.display()
            );
            let mut a = Agent::in_netns(&h.name, &h.name, &h.local_uri, &vms);
            a.join(&server);
            a.start(&[]);
            agents.push(a);
            consoles.push(console);
        }
        for a in &agents {
            server.wait_connected(&a.host_id, true);
        }
        let events = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let mut stream = novacron_e2e::sse(server.api, &server.token, "/v1/events");
        std::thread::spawn(move || loop {
            match stream.next_event(Duration::from_secs(3600)) {
                Some((_, data)) => sink.lock().unwrap().push(data),
                None => return,
            }
        });
        Fleet {
            bed,
            server,
            agents,
            consoles,
            pool,
            events,
            _scratch: scratch,
        }
    }

    fn host(&self, i: usize) -> &NsHost {
        &self.bed.hosts[i]
    }

    fn console(&self, i: usize, name: &str) -> PathBuf {
        self.consoles[i].join(format!("{name}.console.log"))
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.pool.join(format!("{name}.root.qcow2"))
    }

    fn vm(&self, id: &str) -> serde_json::Value {
        self.server.get(&format!("/v1/vms/{id}"))
    }

    fn index_of(&self, host_id: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.host_id == host_id)
            .unwrap_or_else(|| panic!("no agent with host id {host_id}"))
    }

    fn placed_on(&self, id: &str) -> usize {
        let v = self.vm(id);
        self.index_of(
            v["host"]
                .as_str()
                .unwrap_or_else(|| panic!("VM without a host: {v}")),
        )
    }

    /// The hosts (but `dead` ones) whose libvirt runs domain `id`.
    fn running_on(&self, id: &str, dead: &[usize]) -> Vec<usize> {
        (0..self.bed.hosts.len())
            .filter(|i| !dead.contains(i))
            .filter(|&i| domstate(&self.host(i).local_uri, id).as_deref() == Some("running"))
            .collect()
    }

    /// Creates a stamping HA VM (on host `on` if given) and waits until it
    /// stamps; returns its id and host.
    fn ha_vm(&self, name: &str, on: Option<usize>) -> (String, usize) {
        let g = guest_dir();
        let placement = on.map_or_else(|| json!({}), |i| json!({"host": self.agents[i].host_id}));
        let (s, v) = self.server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": {
                "name": name, "vcpus": 1, "memory_mib": 128, "ha": true,
                "disks": [{"name": "root", "size_mib": 64}],
                "boot": {"kernel": g.join("vmlinuz"), "initrd": g.join("initrd.img"),
                         "cmdline": "console=ttyS0 panic=-1 novacron.stamp=1"}
            }, "placement": placement}),
        );
        assert_eq!(s, 201, "{v}");
        let id = v["vm"]["id"].as_str().unwrap().to_string();
        let i = wait_for(&format!("{name} to be placed"), Duration::from_secs(30), || {
            self.vm(&id)["host"].as_str().map(|h| self.index_of(h))
        });
        wait_stamping(&self.console(i, name), &self.disk(name), 1, 5);
        (id, i)
    }

    /// Waits until VM `id` (named `name`) is placed on a host other than
    /// `from`, runs there (only there, among the hosts not `dead`) and
    /// stamps from a new boot there; returns that host.
    fn wait_running_elsewhere(&self, id: &str, name: &str, from: usize, dead: &[usize]) -> usize {
        let before: Vec<usize> = (0..self.bed.hosts.len())
            .map(|i| stamp_boots(&self.console(i, name)).len())
            .collect();
        let to = wait_for("the VM to be placed elsewhere", Duration::from_secs(120), || {
            let i = self.placed_on(id);
            (i != from).then_some(i)
        });
        wait_for(
            &format!("the VM to run on {} alone", self.host(to).name),
            Duration::from_secs(120),
            || (self.running_on(id, dead) == [to]).then_some(()),
        );
        wait_stamping(&self.console(to, name), &self.disk(name), before[to] + 1, 3);
        to
    }

    /// The HA events so far that contain `words`.
    fn events_with(&self, words: &[&str]) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| words.iter().all(|w| e.contains(w)))
            .cloned()
            .collect()
    }

    /// Waits until the stamps of VM `name` show boots on `hosts` (indices),
    /// in order, with no interleave (failing at once on one).
    fn check_stamps(&self, name: &str, hosts: &[usize]) -> stamps::Report {
        let disk = self.disk(name);
        let want: Vec<&str> = hosts.iter().map(|&i| self.host(i).name.as_str()).collect();
        let end = std::time::Instant::now() + Duration::from_secs(60);
        let r = loop {
            let r = stamps::check_image(&disk)
                .unwrap_or_else(|e| panic!("stamp check of {name}: {e}\n{}", self.story()));
            if r.boots.len() >= want.len() {
                break r;
            }
            if std::time::Instant::now() > end {
                let consoles: Vec<String> = (0..self.bed.hosts.len())
                    .map(|i| {
                        let c = std::fs::read_to_string(self.console(i, name)).unwrap_or_default();
                        let tail: Vec<&str> = c.lines().filter(|l| l.contains("NOVACRON")).collect();
                        format!("{}: {}", self.host(i).name, tail.join(" | "))
                    })
                    .collect();
                panic!(
                    "{name}'s stamps show {r} but not boots on {want:?}\nconsoles:\n{}\n{}",
                    consoles.join("\n"),
                    self.story()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("stamps of {name}: {r}");
        assert_eq!(r.hosts(), want, "{name}'s boots: {r}");
        r
    }

    /// The events, the server's HA log lines and the agents' HA and
    /// witness lines, for failure messages.
    fn story(&self) -> String {
        let pick = |log: String| -> String {
            log.lines()
                .filter(|l| {
                    ["HA", "witness", "lease", "server lost", "peer"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut out = format!(
            "events:\n{}\nserver HA log:\n{}\n",
            self.events.lock().unwrap().join("\n"),
            pick(self.server.logs())
        );
        for (h, a) in self.bed.hosts.iter().zip(&self.agents) {
            out.push_str(&format!("agent on {}:\n{}\n", h.name, pick(a.logs())));
        }
        out
    }
}

/// Keep-running with disk locks: the server's `[ha]` and the agents'.
const KEEP_LOCKS: (&str, &str) = (
    "isolation = \"keep-running\"\ndisk_locks = true\n",
    "disk_locks = true",
);

/// Keep-running, one host's link cut: its guest keeps running (and
/// stamping); after the lease wait the server restarts it on another host,
/// whose start waits on the disk lock (shown in `GET /v1/ha`) while the old
/// copy runs. The link restored, the old host destroys its copy (the VM
/// departed from it), the lock frees and the new start succeeds. The
/// stamps: one boot on the old host, then one on the new, never both.
#[test]
fn keep_running_a_cut_host_keeps_its_guest_and_the_restart_waits_on_the_lock_until_it_returns() {
    let _bed = take_bed();
    let f = Fleet::start(3, KEEP_LOCKS.0, "", KEEP_LOCKS.1);
    let (id, x) = f.ha_vm("kr-a", None);
    let console = f.console(x, "kr-a");
    let boot_x = stamp_boots(&console)[0].clone();
    f.bed.cut(f.host(x), Cut::Drop);

    let to = wait_for(
        "the restart elsewhere to wait on the disk lock",
        Duration::from_secs(120),
        || {
            let ha = f.server.get("/v1/ha");
            let waits = ha["lock_waits"].as_array().cloned().unwrap_or_default();
            waits.iter().find(|w| w["id"] == id.as_str()).map(|w| {
                eprintln!("lock wait: {w}");
                f.index_of(w["host"].as_str().unwrap())
            })
        },
    );
    assert_ne!(to, x);
    // The old copy keeps running and stamping; the new one does not start.
    let n = stamps_of(&f.disk("kr-a"), &boot_x);
    novacron_e2e::assert_holds("the old copy alone runs", Duration::from_secs(8), || {
        let on = f.running_on(&id, &[]);
        (on == [x])
            .then_some(())
            .ok_or(format!("running on {on:?}\n{}", f.story()))
    });
    assert!(
        stamps_of(&f.disk("kr-a"), &boot_x) >= n + 40,
        "the cut host's guest stopped stamping"
    );
    let v = f.vm(&id);
    eprintln!("VM while waiting: {}", v["ha"]);

    f.bed.restore(f.host(x));
    let now = f.wait_running_elsewhere(&id, "kr-a", x, &[]);
    assert_eq!(now, to);
    wait_for(
        "the returning host to remove its copy",
        Duration::from_secs(60),
        || domstate(&f.host(x).local_uri, &id).is_none().then_some(()),
    );
    f.check_stamps("kr-a", &[x, to]);
}

/// Keep-running with disk locks: the restart waits on the lock while the
/// cut host's copy runs, and succeeds once that host dies (every process
/// killed: its virtlockd's lock goes with it). No interleave.
#[test]
fn keep_running_the_restart_under_the_lock_succeeds_when_the_old_copy_dies() {
    let _bed = take_bed();
    let f = Fleet::start(3, KEEP_LOCKS.0, "", KEEP_LOCKS.1);
    let (id, x) = f.ha_vm("kr-b", None);
    f.bed.cut(f.host(x), Cut::Drop);
    wait_for(
        "the restart to wait on the disk lock",
        Duration::from_secs(120),
        || {
            let ha = f.server.get("/v1/ha");
            ha["lock_waits"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["id"] == id.as_str()))
                .then_some(())
        },
    );
    assert_eq!(f.running_on(&id, &[]), [x], "the old copy runs, the new waits");
    f.bed.kill_host(f.host(x));
    let to = f.wait_running_elsewhere(&id, "kr-b", x, &[x]);
    f.check_stamps("kr-b", &[x, to]);
}

/// The server's hardware fence hook: the test bed's BMC stand-in.
fn fence_table(timeout: &str, retries: u32) -> String {
    format!(
        "[ha.hardware_fence]\ncommand = [\"{}\", \"{{host}}\", \"{{action}}\"]\ntimeout = \"{timeout}\"\nretries = {retries}\n",
        fence_testbed().display()
    )
}

/// Keep-running with the hardware hook (no disk locks): a cut host is
/// powered off by the hook (every process of it gone) and its HA guest
/// restarted elsewhere; then a host that lost power by itself is "already
/// off" to the hook, which counts as done: its guest restarts too.
#[test]
fn the_hook_powers_a_silent_host_off_and_already_off_counts() {
    let _bed = take_bed();
    let mut f = Fleet::start(3, "isolation = \"keep-running\"\n", &fence_table("20s", 2), "");
    let (id, x) = f.ha_vm("hook-a", None);
    f.bed.cut(f.host(x), Cut::Drop);
    let y = f.wait_running_elsewhere(&id, "hook-a", x, &[x]);
    assert_eq!(
        f.bed.pids(f.host(x)),
        Vec::<u32>::new(),
        "the hook left processes on the host"
    );
    let name_x = f.host(x).name.clone();
    assert!(
        !f.events_with(&[&name_x, "powered off and confirmed off"])
            .is_empty(),
        "{}",
        f.story()
    );

    // Back: link, power, agent.
    f.bed.restore(f.host(x));
    assert_eq!(fence(&name_x, "on", Duration::from_secs(60)), Some(0));
    f.agents[x].start(&[]);
    wait_for(
        "the powered-on host to hold its lease again",
        Duration::from_secs(90),
        || (f.server.host(&f.agents[x].host_id)["lease"] == "online").then_some(()),
    );

    // Power lost by itself: the hook finds it off already.
    f.bed.kill_host(f.host(y));
    let z = f.wait_running_elsewhere(&id, "hook-a", y, &[y]);
    let name_y = f.host(y).name.clone();
    assert!(
        !f.events_with(&[&name_y, "it was off already"]).is_empty(),
        "{}",
        f.story()
    );
    f.check_stamps("hook-a", &[x, y, z]);
}

/// A hook that hangs (the BMC never answers): each attempt is killed at
/// its timeout, the fence fails with an alert event, the host stays
/// *fencing* and its guest is not restarted (keep-running, no disk locks:
/// nothing else proves it off) and keeps running. Healed, the retry
/// powers it off and the guest restarts elsewhere.
#[test]
fn a_hanging_hook_leaves_the_host_fencing_with_an_alert_and_restarts_nothing() {
    let _bed = take_bed();
    let f = Fleet::start(3, "isolation = \"keep-running\"\n", &fence_table("2s", 1), "");
    let (id, x) = f.ha_vm("hook-b", None);
    let name_x = f.host(x).name.clone();
    let fault = f.host(x).libvirt_log_dir().parent().unwrap().join("bmc-fault");
    std::fs::write(&fault, "hang\n").unwrap();
    f.bed.cut(f.host(x), Cut::Drop);
    wait_for(
        "the fence to fail with an alert",
        Duration::from_secs(120),
        || (!f.events_with(&["ALERT", &name_x]).is_empty()).then_some(()),
    );
    let ha = f.server.get("/v1/ha");
    let fencing = ha["fencing"].as_array().cloned().unwrap_or_default();
    assert!(
        fencing.iter().any(|h| h["id"] == f.agents[x].host_id.as_str()),
        "the host is not listed as fencing: {ha:#}"
    );
    novacron_e2e::assert_holds(
        "nothing restarted while the fence hangs",
        Duration::from_secs(10),
        || {
            if f.placed_on(&id) != x {
                return Err(format!("moved while its host is not proven off\n{}", f.story()));
            }
            let on = f.running_on(&id, &[]);
            (on == [x]).then_some(()).ok_or(format!("running on {on:?}"))
        },
    );

    std::fs::remove_file(&fault).unwrap();
    let y = f.wait_running_elsewhere(&id, "hook-b", x, &[x]);
    assert_eq!(f.bed.pids(f.host(x)), Vec::<u32>::new());
    f.check_stamps("hook-b", &[x, y]);
}

/// The peer witness: the server SIGKILLed for 60 s (twelve leases) with
/// one HA guest on each of three hosts: no guest stops (same QEMU, no new
/// boot, no stamp pause as long as a fence and a restart; the largest
/// pause is printed: the bench reports it), and once the server is back
/// nothing is restarted. Then one host is cut from the
/// server and its peers alike: it cannot confirm, fences, and its guest
/// restarts elsewhere.
#[test]
fn with_the_peer_witness_a_server_outage_stops_nothing_and_a_host_cut_from_all_fences() {
    let _bed = take_bed();
    let mut f = Fleet::start(3, "", "", "");
    let names = ["wit-1", "wit-2", "wit-3"];
    let vms: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (id, on) = f.ha_vm(n, Some(i));
            assert_eq!(on, i);
            id
        })
        .collect();
    let witness = f.server.get("/v1/ha")["witness"].clone();
    eprintln!("witness: {witness}");
    let pids: Vec<u32> = vms
        .iter()
        .enumerate()
        .map(|(i, id)| qemu_pid(f.host(i), id))
        .collect();
    let from: Vec<usize> = names
        .iter()
        .map(|n| stamps::used_slots(&stamps::read_image(&f.disk(n)).unwrap()))
        .collect();

    f.server.kill9();
    let check = |f: &Fleet, what: &str| -> Result<(), String> {
        for (i, id) in vms.iter().enumerate() {
            let h = &f.bed.hosts[i];
            if domstate(&h.local_uri, id).as_deref() != Some("running") {
                return Err(format!(
                    "{what}: {} stopped on {}\n{}",
                    names[i],
                    h.name,
                    f.story()
                ));
            }
            if qemu_pid(h, id) != pids[i] {
                return Err(format!("{what}: {} has a new QEMU", names[i]));
            }
        }
        Ok(())
    };
    novacron_e2e::assert_holds(
        "no guest stops while the server is down",
        Duration::from_secs(60),
        || check(&f, "server down"),
    );
    f.server.restart();
    for a in &f.agents {
        f.server.wait_connected(&a.host_id, true);
    }
    novacron_e2e::assert_holds(
        "nothing restarted after the server is back",
        Duration::from_secs(15),
        || check(&f, "server back"),
    );
    let log = f.server.logs();
    assert!(!log.contains("HA VM restarted elsewhere"), "{log}");
    // A guest that was stopped (fenced) and started again pauses for at
    // least the fence wait and shows a second boot; shorter pauses are the
    // machine's scheduling of a TCG guest (on two shared cores seen up to
    // 3.5 s) and are reported, not failed on (the bench measures them).
    let wait_ms = f.server.get("/v1/ha")["fenced_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("GET /v1/ha has no fenced_after_ms"));
    for (i, n) in names.iter().enumerate() {
        let img = stamps::read_image(&f.disk(n)).unwrap();
        let r = stamps::check(&img).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert_eq!(r.boots.len(), 1, "{n}: {r}");
        let gap = stamps::largest_gap_from(&img, from[i]);
        let during = stamps::used_slots(&img) - from[i];
        eprintln!("{n}: {during} stamps since the outage began, largest gap {gap} ms");
        assert!(
            gap < wait_ms,
            "{n}'s stamps paused for {gap} ms, as long as a fence and a restart ({wait_ms} ms)"
        );
        assert!(during >= 600, "{n} wrote only {during} stamps in 75 s");
    }
    let agents_log: String = f.agents.iter().map(Agent::logs).collect();
    assert!(!agents_log.contains("HA fencing started"), "an agent fenced");

    // Cut from everything: no lease, no peer to confirm: it fences.
    f.bed.cut(f.host(0), Cut::Drop);
    wait_for("the cut host to fence its guest", Duration::from_secs(60), || {
        (domstate(&f.host(0).local_uri, &vms[0]).as_deref() != Some("running")).then_some(())
    });
    let to = f.wait_running_elsewhere(&vms[0], "wit-1", 0, &[]);
    f.check_stamps("wit-1", &[0, to]);
    f.check_stamps("wit-2", &[1]);
    f.check_stamps("wit-3", &[2]);
}

/// The pid of the QEMU running domain `dom` (name or UUID) on `h`.
fn qemu_pid(h: &NsHost, dom: &str) -> u32 {
    let name = virsh(&h.local_uri, &["domname", dom]).unwrap_or_else(|e| panic!("{e:?}"));
    let file = h
        .libvirt_log_dir()
        .parent()
        .unwrap()
        .join(format!("run/qemu/{}.pid", name.trim()));
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}
