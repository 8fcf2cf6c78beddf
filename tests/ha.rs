//! High availability on real hosts: three libvirt hosts, each in its own
//! network namespace with its agent running inside it, the server in a
//! namespace of its own on the same bridge, TCG guests whose disks live in
//! a directory pool every host sees at the same path
//! (`packaging/dev/testbed.sh hosts-up 3 --ha`). Faults are real: every
//! process of a host SIGKILLed, a host's link cut (nft DROP), the server
//! or an agent SIGKILLed. The tests assert what happens and in which
//! order (from the logs' own timestamps and from libvirt), never how fast.
//! Every guest stamps its disk (`novacron.stamp=1`), and every test that
//! runs an HA guest ends by running the stamp checker on its disk (the
//! harness's `stamps` module): no two copies' stamps interleave, and the
//! boots ran on the hosts the test expects, in order.
//!
//! Needs root, QEMU, libvirt and the guest files (`.ci/run` provides
//! them); fails loudly without. Run them one at a time with the other
//! real-libvirt tests (they share the namespaced hosts); the tests of this
//! file take turns on the one test bed.

#![allow(clippy::unwrap_used)]
// Real processes keep real time: the outages are real durations.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use novacron_e2e::{
    all_domains, boot_count, domstate, guest_dir, stamps, virsh, wait_for, Agent, Cut, HaBed, NsHost, Server,
};
use serde_json::json;

/// The tests share the test bed's hosts: one at a time.
static BED: Mutex<()> = Mutex::new(());

fn take_bed() -> std::sync::MutexGuard<'static, ()> {
    BED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Heartbeats every 500 ms; a session silent for 3 s is closed.
const AGENTS_TOML: &str = "heartbeat_interval = \"500ms\"\nsession_timeout = \"3s\"";

/// A scratch directory QEMU and virtlogd can reach (o+x on the way).
fn scratch(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    Command::new("chmod").arg("0755").arg(d.path()).status().unwrap();
    d
}

/// A libvirt domain of the test guest: direct kernel boot, a qcow2 disk,
/// the serial console appended to `console`.
fn guest_xml(name: &str, uuid: &str, disk: &Path, console: &Path) -> String {
    let g = guest_dir();
    format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 panic=-1</cmdline></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='pty'><log file='{}' append='on'/></serial><console type='pty'/></devices></domain>",
        g.join("vmlinuz").display(),
        g.join("initrd.img").display(),
        disk.display(),
        console.display()
    )
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

/// The server in the bed's server namespace and one agent inside each
/// host's namespace, all connected.
struct Fleet {
    bed: HaBed,
    server: Server,
    agents: Vec<Agent>,
    /// Per host, the directory its agent writes console logs to.
    consoles: Vec<PathBuf>,
    /// The agents' storage pool, in the shared directory.
    pool: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Fleet {
    /// `n` hosts; `server_extra` goes at the end of the server's config,
    /// `vms_extra` into every agent's `[vms]`.
    fn start(n: usize, server_extra: &str, vms_extra: &str) -> Fleet {
        let bed = HaBed::up(n);
        let pool = bed.shared_dir("ha-pool-");
        let scratch = scratch("nc-ha-");
        let server = Server::start_in_netns(&bed.server_ns, &bed.server_ip, AGENTS_TOML, server_extra);
        let mut agents = Vec::new();
        let mut consoles = Vec::new();
        for h in &bed.hosts {
            let console = scratch.path().join(format!("console-{}", h.name));
            std::fs::create_dir_all(&console).unwrap();
            Command::new("chmod").arg("0755").arg(&console).status().unwrap();
            let vms = format!(
                "virt_type = \"qemu\"\nmigration_uri = \"{}\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"\n{vms_extra}",
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
        wait_for("every host to report capacity", Duration::from_secs(30), || {
            agents
                .iter()
                .all(|a| {
                    server.host(&a.host_id)["capacity"]["memory_mib"]
                        .as_u64()
                        .unwrap_or(0)
                        > 0
                })
                .then_some(())
        });
        Fleet {
            bed,
            server,
            agents,
            consoles,
            pool,
            _scratch: scratch,
        }
    }

    fn host(&self, i: usize) -> &NsHost {
        &self.bed.hosts[i]
    }

    /// The console log of VM `name` on host `i`.
    fn console(&self, i: usize, name: &str) -> PathBuf {
        self.consoles[i].join(format!("{name}.console.log"))
    }

    /// Creates a running guest VM through the API; returns its id.
    fn create(&self, name: &str, extra: serde_json::Value, placement: serde_json::Value) -> String {
        let g = guest_dir();
        let mut spec = json!({
            "name": name, "vcpus": 1, "memory_mib": 128,
            "boot": {"kernel": g.join("vmlinuz"), "initrd": g.join("initrd.img"),
                     "cmdline": "console=ttyS0 panic=-1 novacron.stamp=1"}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let (s, v) = self
            .server
            .send("POST", "/v1/vms", &json!({"spec": spec, "placement": placement}));
        assert_eq!(s, 201, "{v}");
        v["vm"]["id"].as_str().unwrap().to_string()
    }

    /// Waits until VM `name` printed its boot marker on host `i` at least
    /// `count` times.
    fn wait_booted(&self, i: usize, name: &str, count: usize) {
        let log = self.console(i, name);
        wait_for(
            &format!("{name} to boot on {}", self.host(i).name),
            Duration::from_secs(180),
            || (boot_count(&log) >= count).then_some(()),
        );
    }
}

/// The test bed itself, with no HA at work: the agents inside the hosts'
/// namespaces reach the server in its own; the same qcow2 in the shared
/// pool boots on every host in turn (and QEMU's image lock proves it is
/// one file: a second host cannot start it while the first runs it); a
/// guest created through the API runs from the shared pool; a cut link
/// disconnects its agent and restoring it reconnects; killing a host
/// leaves no process of it (agent and QEMU included).
#[test]
fn the_ha_test_bed_shares_a_pool_and_injects_faults() {
    let _bed = take_bed();
    let f = Fleet::start(3, "", "");
    let scratch = scratch("nc-ha-bed-");
    let pool = f.bed.shared_dir("bed-");

    // One disk, every host in turn.
    let disk = pool.join("bed.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create");
    let uuid = "6e6f7661-6372-6f6e-2d68-612d62656421";
    let xml = scratch.path().join("bed.xml");
    for (i, h) in f.bed.hosts.iter().enumerate() {
        let console = scratch.path().join(format!("bed-{}.log", h.name));
        std::fs::write(&xml, guest_xml("ha-bed", uuid, &disk, &console)).unwrap();
        virsh(&h.local_uri, &["define", xml.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:?}"));
        if i > 0 {
            // Still running on the previous host: QEMU's lock refuses.
            let prev = &f.bed.hosts[i - 1];
            let e = virsh(&h.local_uri, &["start", "ha-bed"]).expect_err("a second QEMU opened the disk");
            assert!(
                e.errors.iter().any(|l| l.contains("lock")),
                "refused for another reason: {e:?}"
            );
            virsh(&prev.local_uri, &["destroy", "ha-bed"]).unwrap_or_else(|e| panic!("{e:?}"));
            virsh(&prev.local_uri, &["undefine", "ha-bed"]).unwrap_or_else(|e| panic!("{e:?}"));
        }
        virsh(&h.local_uri, &["start", "ha-bed"]).unwrap_or_else(|e| panic!("{e:?}"));
        wait_for(
            &format!("the shared-disk guest to boot on {}", h.name),
            Duration::from_secs(180),
            || {
                let t = std::fs::read_to_string(&console).ok()?;
                (t.contains("NOVACRON-GUEST-BOOTED") && t.contains("NOVACRON-GUEST-DISKS vda")).then_some(())
            },
        );
    }
    let last = f.bed.hosts.last().unwrap();
    virsh(&last.local_uri, &["destroy", "ha-bed"]).unwrap_or_else(|e| panic!("{e:?}"));
    virsh(&last.local_uri, &["undefine", "ha-bed"]).unwrap_or_else(|e| panic!("{e:?}"));

    // A VM with a disk, through the API, onto the shared pool of host 3.
    let id3 = f.agents[2].host_id.clone();
    let vm = f.create(
        "bed-api",
        json!({"disks": [{"name": "root", "size_mib": 64}]}),
        json!({"host": id3}),
    );
    f.wait_booted(2, "bed-api", 1);
    let files: Vec<String> = std::fs::read_dir(&f.pool)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        files.iter().any(|n| n.starts_with("bed-api")),
        "the API guest's disk is in the shared pool: {files:?}"
    );
    assert_eq!(domstate(&f.host(2).local_uri, &vm).as_deref(), Some("running"));

    // A cut link: the server loses host 2's agent; restored, it is back.
    let id2 = f.agents[1].host_id.clone();
    f.bed.cut(f.host(1), Cut::Drop);
    f.server.wait_connected(&id2, false);
    f.bed.restore(f.host(1));
    f.server.wait_connected(&id2, true);

    // Host 3 loses every process: its agent and the guest's QEMU too.
    let agent_pid = f.agents[2].pid().unwrap();
    let qemu_pid = qemu_pid(f.host(2), &vm);
    let before = f.bed.pids(f.host(2));
    assert!(
        before.contains(&agent_pid),
        "the agent runs in its host: {before:?}"
    );
    assert!(before.contains(&qemu_pid), "so does the guest's QEMU: {before:?}");
    f.bed.kill_host(f.host(2));
    assert_eq!(
        f.bed.pids(f.host(2)),
        Vec::<u32>::new(),
        "nothing of host 3 is left"
    );
    f.server.wait_connected(&id3, false);
    // The others kept running.
    assert!(all_domains(&f.host(0).local_uri).is_empty());
    f.server.wait_connected(&f.agents[0].host_id, true);
}

/// The HA terms of these tests: the default 5 s lease and 2 s fence time
/// (libvirt's destroy of a TCG guest takes up to about 1.8 s here, so a
/// shorter fence time would be unsafe: the server could restart a guest
/// whose QEMU is still being killed), so the server restarts after about
/// 7.5 s (`fenced_after`); and a mass-failure ratio of one half, so that
/// one of three hosts failing is a host failure, not the server's own
/// network (the default 30 % would hold at one in three).
///
/// The agents' session timeout (3 s, `AGENTS_TOML`) is shorter than the
/// lease on purpose: an agent notices a restarted server only when its
/// old QUIC connection times out (the new server process cannot reset
/// it), so a server outage is survived only when that timeout plus a
/// reconnect fits in the lease.
const HA_TOML: &str = "[ha]\nlease = \"5s\"\nfence_time = \"2s\"\nmass_failure_ratio = 0.5\n";
/// The lease above.
const LEASE: Duration = Duration::from_secs(5);
/// Longer than the server's fence wait for the terms above (5 s + 2 s,
/// drift and margin are well under a second more).
const PAST_FENCE_WAIT: Duration = Duration::from_secs(10);
/// Every agent reports its pool as shared.
const SHARED_TOML: &str = "storage_shared = true";

fn ha_fleet() -> Fleet {
    Fleet::start(3, HA_TOML, SHARED_TOML)
}

impl Fleet {
    fn vm(&self, id: &str) -> serde_json::Value {
        self.server.get(&format!("/v1/vms/{id}"))
    }

    /// The index of the host with id `host_id`.
    fn index_of(&self, host_id: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.host_id == host_id)
            .unwrap_or_else(|| panic!("no agent with host id {host_id}"))
    }

    /// The index of the host the API places VM `id` on.
    fn placed_on(&self, id: &str) -> usize {
        let v = self.vm(id);
        self.index_of(
            v["host"]
                .as_str()
                .unwrap_or_else(|| panic!("VM without a host: {v}")),
        )
    }

    /// The hosts (among those not in `dead`) whose libvirt runs domain
    /// `id`; a dead host has no libvirtd to ask, and no process at all
    /// (checked where it is killed).
    fn running_on(&self, id: &str, dead: &[usize]) -> Vec<usize> {
        (0..self.bed.hosts.len())
            .filter(|i| !dead.contains(i))
            .filter(|&i| domstate(&self.host(i).local_uri, id).as_deref() == Some("running"))
            .collect()
    }

    /// Boot markers of VM `name` on all hosts together.
    fn boots(&self, name: &str) -> usize {
        (0..self.bed.hosts.len())
            .map(|i| boot_count(&self.console(i, name)))
            .sum()
    }

    /// Creates an HA VM with a disk on the shared pool and waits until it
    /// booted; returns its id and host.
    fn ha_vm(&self, name: &str) -> (String, usize) {
        let id = self.create(
            name,
            json!({"ha": true, "disks": [{"name": "root", "size_mib": 64}]}),
            json!({}),
        );
        let i = wait_for(&format!("{name} to be placed"), Duration::from_secs(30), || {
            self.vm(&id)["host"].as_str().map(|h| self.index_of(h))
        });
        self.wait_booted(i, name, 1);
        wait_for(
            &format!("the API to see {name} running"),
            Duration::from_secs(30),
            || (self.vm(&id)["observed"]["state"] == "running").then_some(()),
        );
        (id, i)
    }

    /// Waits until HA VM `id` runs on a host other than `from` and booted
    /// there; returns that host.
    fn wait_restarted(&self, id: &str, name: &str, from: usize, dead: &[usize]) -> usize {
        let to = wait_for(
            &format!(
                "{name} to be placed on another host than {}",
                self.host(from).name
            ),
            Duration::from_secs(120),
            || {
                let i = self.placed_on(id);
                (i != from).then_some(i)
            },
        );
        self.wait_booted(to, name, 1);
        wait_for(
            &format!("{name} to run on {}", self.host(to).name),
            Duration::from_secs(60),
            || (self.running_on(id, dead) == [to]).then_some(()),
        );
        to
    }
}

impl Fleet {
    /// The disk `root` of VM `name` in the shared pool.
    fn disk_of(&self, name: &str) -> PathBuf {
        self.pool.join(format!("{name}.root.qcow2"))
    }

    /// Runs the stamp checker on VM `name`'s disk once its stamps show
    /// `hosts` (host indices) boot after boot: fails at once when two
    /// copies' stamps interleave, and when the boots ran elsewhere.
    fn check_stamps(&self, name: &str, hosts: &[usize]) -> stamps::Report {
        let disk = self.disk_of(name);
        let want: Vec<&str> = hosts.iter().map(|&i| self.host(i).name.as_str()).collect();
        let r = wait_for(
            &format!("{name}'s stamps to show boots on {want:?}"),
            Duration::from_secs(60),
            || {
                let r = stamps::check_image(&disk).unwrap_or_else(|e| {
                    panic!(
                        "stamp check of {name} ({}): {e}\n{}",
                        disk.display(),
                        self.ha_story()
                    )
                });
                (r.boots.len() >= want.len()).then_some(r)
            },
        );
        eprintln!("stamps of {name}: {r}");
        assert_eq!(r.hosts(), want, "{name}'s boots ran on other hosts: {r}");
        r
    }
}

/// The HA lines of a log (lease, fence, restart), for failure messages.
fn ha_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("HA") || l.contains("lease") || l.contains("session") || l.contains("connect"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Fleet {
    /// The HA lines of the server's and every agent's logs.
    fn ha_story(&self) -> String {
        let mut out = format!("server:\n{}\n", ha_lines(&self.server.logs()));
        for (h, a) in self.bed.hosts.iter().zip(&self.agents) {
            out.push_str(&format!("agent on {}:\n{}\n", h.name, ha_lines(&a.logs())));
        }
        out
    }
}

/// The `at_ms=N` field of a log line.
fn at_ms(line: &str) -> Option<u64> {
    let rest = line.split("at_ms=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Unix ms of a wall-clock time.
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// (a) Every process of a host SIGKILLed (libvirtd, virtlogd, QEMUs, the
/// agent): its HA guest boots on another host, from the same disk in the
/// shared pool (its console there shows the boot marker), and runs only
/// there; the host's non-HA VM is reported lost, and runs nowhere.
#[test]
fn a_host_that_loses_every_process_has_its_ha_guest_boot_elsewhere_and_its_other_vm_reported_lost() {
    let _bed = take_bed();
    let f = ha_fleet();
    let (ha, from) = f.ha_vm("ha-a");
    let plain = f.create("plain-a", json!({}), json!({"host": f.agents[from].host_id}));
    f.wait_booted(from, "plain-a", 1);

    f.bed.kill_host(f.host(from));
    assert_eq!(
        f.bed.pids(f.host(from)),
        Vec::<u32>::new(),
        "nothing of the host is left"
    );
    let to = f.wait_restarted(&ha, "ha-a", from, &[from]);
    assert_ne!(to, from);
    let v = f.vm(&ha);
    assert_eq!(v["vm"]["epoch"], 1, "one restart, one epoch: {v}");
    assert_eq!(v["ha"]["restarts"], 1, "{v}");
    assert_eq!(
        v["ha"]["last_restart_from"],
        f.agents[from].host_id.as_str(),
        "{v}"
    );
    // The disk moved with it: the guest sees it.
    let console = std::fs::read_to_string(f.console(to, "ha-a")).unwrap();
    assert!(console.contains("NOVACRON-GUEST-DISKS vda"), "{console}");

    // The non-HA VM stays where it was, reported lost, running nowhere.
    wait_for(
        "the non-HA VM to be reported lost",
        Duration::from_secs(60),
        || {
            let v = f.vm(&plain);
            (v["ha"]["fenced"]["state"] == "lost").then_some(())
        },
    );
    let overview = f.server.get("/v1/ha");
    let listed = overview["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == plain.as_str())
        .unwrap_or_else(|| panic!("GET /v1/ha lists the lost VM: {overview:#}"));
    assert_eq!(listed["state"], "lost", "{overview:#}");
    let lease = overview["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == f.agents[from].host_id.as_str())
        .map(|h| h["lease"].clone());
    assert_eq!(lease, Some(json!("fenced")), "{overview:#}");
    let v = f.vm(&plain);
    assert_eq!(f.index_of(v["host"].as_str().unwrap()), from, "never moved: {v}");
    assert_eq!(f.running_on(&plain, &[from]), Vec::<usize>::new());
    // Nothing else changed meanwhile: one copy of the HA guest.
    novacron_e2e::assert_holds("one running copy", Duration::from_secs(3), || {
        let on = f.running_on(&ha, &[from]);
        (on == [to]).then_some(()).ok_or(format!("running on {on:?}"))
    });
    let r = f.check_stamps("ha-a", &[from, to]);
    assert_eq!((r.boots[0].epoch, r.boots[1].epoch), (Some(0), Some(1)), "{r}");
}

/// (b) A host's link cut (nft DROP inside it): its agent fences its HA
/// guest — QEMU gone, in libvirt's log and the agent's `at_ms` log — before
/// the server restarts it elsewhere (the server's log), on the one wall
/// clock all these processes share. Restored, the host destroys its copy
/// (the VM departed from it) and no duplicate runs anywhere.
#[test]
fn a_cut_host_fences_its_ha_guest_before_the_server_restarts_it_and_keeps_no_copy_when_back() {
    let _bed = take_bed();
    let f = ha_fleet();
    let (ha, from) = f.ha_vm("ha-b");
    let x = f.host(from).clone();
    let dom = virsh(&x.local_uri, &["domname", &ha]).unwrap_or_else(|e| panic!("{e:?}"));
    let dom = dom.trim().to_string();

    f.bed.cut(&x, Cut::Drop);
    // Its libvirt is still reachable from here (unix socket): the agent
    // stops the guest with no word from the server.
    wait_for(
        "the cut host to fence its HA guest",
        Duration::from_secs(60),
        || (domstate(&x.local_uri, &ha).as_deref() != Some("running")).then_some(()),
    );
    let to = f.wait_restarted(&ha, "ha-b", from, &[]);
    assert_ne!(to, from);

    let agent_log = f.agents[from].logs();
    let killed = agent_log
        .lines()
        .find(|l| l.contains("HA VM killed") && l.contains(&ha))
        .and_then(at_ms)
        .unwrap_or_else(|| panic!("the agent logged no kill of {ha}:\n{agent_log}"));
    let qemu_log = std::fs::read_to_string(x.libvirt_log_dir().join(format!("qemu/{dom}.log"))).unwrap();
    let destroyed = qemu_log
        .lines()
        .filter(|l| l.contains("shutting down, reason=destroyed"))
        .filter_map(novacron_e2e::log_time)
        .next_back()
        .unwrap_or_else(|| panic!("libvirt logged no destroy:\n{qemu_log}"));
    let server_log = f.server.logs();
    let restarted = novacron_e2e::first_log_time(&server_log, &["HA VM restarted elsewhere", &ha])
        .unwrap_or_else(|| panic!("the server logged no restart of {ha}"));
    eprintln!(
        "agent killed at {killed}, libvirt destroyed at {}, server restarted at {}",
        unix_ms(destroyed),
        unix_ms(restarted)
    );
    assert!(
        killed < unix_ms(restarted),
        "the agent fenced before the restart:\n{}",
        f.ha_story()
    );
    assert!(
        destroyed < restarted,
        "QEMU was gone before the restart:\n{}",
        f.ha_story()
    );
    // The API's record of the restart says the same.
    let v = f.vm(&ha);
    let api_restart = v["ha"]["last_restart_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no restart time in the API: {v}"));
    assert!(
        killed < api_restart,
        "fenced at {killed}, restarted at {api_restart}"
    );
    assert_eq!(v["ha"]["restarts"], 1, "{v}");

    // Back on the bridge: the host reconciles, its copy goes, acks resume.
    f.bed.restore(&x);
    f.server.wait_connected(&f.agents[from].host_id, true);
    wait_for(
        "the returning host to hold a lease again",
        Duration::from_secs(60),
        || (f.server.host(&f.agents[from].host_id)["lease"] == "online").then_some(()),
    );
    wait_for(
        "the returning host to remove its copy",
        Duration::from_secs(60),
        || domstate(&x.local_uri, &ha).is_none().then_some(()),
    );
    novacron_e2e::assert_holds("no duplicate after the return", Duration::from_secs(5), || {
        let on = f.running_on(&ha, &[]);
        let defined: usize = (0..3)
            .map(|i| {
                all_domains(&f.host(i).local_uri)
                    .iter()
                    .filter(|d| **d == ha)
                    .count()
            })
            .sum();
        (on == [to] && defined == 1)
            .then_some(())
            .ok_or(format!("running on {on:?}, defined {defined} times"))
    });
    assert_eq!(
        f.boots("ha-b"),
        2,
        "booted once where it was created, once where it moved"
    );
    f.check_stamps("ha-b", &[from, to]);
}

/// (c) The server SIGKILLed for less than the lease and started again:
/// nothing is fenced or restarted (same QEMU processes, no new boot).
/// SIGKILLed for longer than the lease with the peer witness off: every
/// agent fences its HA VMs (as Proxmox VE does when the whole cluster loses
/// quorum), and once the server is back every HA VM is started exactly
/// once. (With the witness on, the default, nothing stops:
/// tests/ha_guards.rs.)
#[test]
fn a_server_kill9_within_the_lease_changes_nothing_and_a_longer_one_restarts_each_ha_vm_once() {
    let _bed = take_bed();
    let mut f = Fleet::start(
        3,
        &format!("{HA_TOML}[ha.witness]\nenabled = false\n"),
        SHARED_TOML,
    );
    let vms: Vec<(String, String, usize)> = ["ha-c1", "ha-c2"]
        .iter()
        .map(|n| {
            let (id, i) = f.ha_vm(n);
            (n.to_string(), id, i)
        })
        .collect();
    let pids: Vec<u32> = vms.iter().map(|(_, id, i)| qemu_pid(f.host(*i), id)).collect();

    // Shorter than the lease.
    f.server.kill9();
    novacron_e2e::let_real_time_pass(LEASE / 3);
    f.server.restart();
    for a in &f.agents {
        f.server.wait_connected(&a.host_id, true);
    }
    novacron_e2e::assert_holds("nothing fenced or moved", PAST_FENCE_WAIT, || {
        for ((name, id, i), pid) in vms.iter().zip(&pids) {
            let state = domstate(&f.host(*i).local_uri, id);
            if state.as_deref() != Some("running") {
                return Err(format!(
                    "{name} is {state:?} on {}:\n{}\nits agent's whole log:\n{}",
                    f.host(*i).name,
                    f.ha_story(),
                    f.agents[*i].logs()
                ));
            }
            if qemu_pid(f.host(*i), id) != *pid {
                return Err(format!("{name} has a new QEMU"));
            }
            if f.boots(name) != 1 {
                return Err(format!("{name} booted again"));
            }
        }
        Ok(())
    });
    let logs: String = f.agents.iter().map(Agent::logs).collect();
    assert!(!logs.contains("HA fencing started"), "no agent fenced:\n{logs}");

    // Longer than the lease: the agents fence by themselves.
    f.server.kill9();
    for (name, id, i) in &vms {
        wait_for(&format!("{name} to be fenced"), Duration::from_secs(60), || {
            (domstate(&f.host(*i).local_uri, id).as_deref() != Some("running")).then_some(())
        });
    }
    f.server.restart();
    for (name, id, _) in &vms {
        wait_for(&format!("{name} to run again"), Duration::from_secs(180), || {
            (f.running_on(id, &[]).len() == 1 && f.boots(name) == 2).then_some(())
        });
    }
    novacron_e2e::assert_holds("each HA VM started exactly once", Duration::from_secs(5), || {
        for (name, id, _) in &vms {
            let on = f.running_on(id, &[]);
            if on.len() != 1 || f.boots(name) != 2 {
                return Err(format!("{name}: running on {on:?}, {} boots", f.boots(name)));
            }
        }
        Ok(())
    });
    for (name, id, i) in &vms {
        let on = f.running_on(id, &[]);
        f.check_stamps(name, &[*i, on[0]]);
    }
}

/// (d) An agent SIGKILLed and started again within the lease (its QEMU
/// keeps running): nothing moves, nothing is fenced.
#[test]
fn an_agent_kill9_within_the_tolerance_moves_nothing() {
    let _bed = take_bed();
    let mut f = ha_fleet();
    let (ha, on) = f.ha_vm("ha-d");
    let pid = qemu_pid(f.host(on), &ha);
    f.agents[on].kill9();
    novacron_e2e::let_real_time_pass(LEASE / 3);
    f.agents[on].start(&[]);
    f.server.wait_connected(&f.agents[on].host_id, true);
    novacron_e2e::assert_holds("nothing moved", PAST_FENCE_WAIT, || {
        if f.placed_on(&ha) != on {
            return Err("the API moved it".into());
        }
        if qemu_pid(f.host(on), &ha) != pid {
            return Err("a new QEMU runs it".into());
        }
        if f.boots("ha-d") != 1 {
            return Err("it booted again".into());
        }
        Ok(())
    });
    assert!(!f.agents[on].logs().contains("HA fencing started"));
    assert!(!f.server.logs().contains("HA VM restarted elsewhere"));
    f.check_stamps("ha-d", &[on]);
}

/// `novacron-server demo --kill-host`: the demo's agent of a host running
/// an HA VM is SIGKILLed once everything runs; the demo prints that host
/// fenced, its HA VM placed on another host and running there, and its
/// other VMs reported lost (libvirt test-driver hosts, no test bed).
#[test]
fn the_demo_kills_a_host_and_shows_its_ha_vm_running_elsewhere() {
    let out = Command::new(novacron_e2e::bin("novacron-server"))
        .args(["demo", "--agents", "3", "--kill-host", "--duration", "1s"])
        .args(["--api", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = stdout
        .split_once("HA: killing ")
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("the demo killed no host: {stdout}"));
    let killed = after.split_whitespace().next().unwrap();
    assert!(
        after.contains(&format!("{killed}: lease fenced after")),
        "{stdout}"
    );
    let placed = after
        .lines()
        .find(|l| l.contains(": placed on demo-host-"))
        .unwrap_or_else(|| panic!("no HA VM placed elsewhere: {stdout}"));
    assert!(!placed.contains(&format!("placed on {killed} ")), "{placed}");
    assert!(placed.contains("(epoch 1)"), "{placed}");
    assert!(after.contains(": running there after"), "{stdout}");
    assert!(after.contains("not HA, reported lost after"), "{stdout}");
    assert!(!after.contains("not all of it within"), "{stdout}");
}
