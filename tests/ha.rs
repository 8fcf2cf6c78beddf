//! High availability on real hosts: three libvirt hosts, each in its own
//! network namespace with its agent running inside it, the server in a
//! namespace of its own on the same bridge, TCG guests whose disks live in
//! a directory pool every host sees at the same path
//! (`packaging/dev/testbed.sh hosts-up 3 --ha`). Faults are real: every
//! process of a host SIGKILLed, a host's link cut (nft DROP), the server
//! or an agent SIGKILLed. The tests assert what happens and in which
//! order (from the logs' own timestamps and from libvirt), never how fast.
//!
//! Needs root, QEMU, libvirt and the guest files (`.ci/run` provides
//! them); fails loudly without. Run one at a time with the other real
//! libvirt tests (`flock /var/tmp/nc-libvirt.lock`); the tests of this
//! file take turns on the one test bed.

#![allow(clippy::unwrap_used)]
// Real processes keep real time: the outages are real durations.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use novacron_e2e::{
    all_domains, boot_count, domstate, guest_dir, virsh, wait_for, Agent, Cut, HaBed, NsHost, Server,
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
                .all(|a| server.host(&a.host_id)["capacity"]["memory_mib"].as_u64().unwrap_or(0) > 0)
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
                     "cmdline": "console=ttyS0 panic=-1"}
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
        virsh(&h.local_uri, &["define", xml.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e:?}"));
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
    assert!(before.contains(&agent_pid), "the agent runs in its host: {before:?}");
    assert!(before.contains(&qemu_pid), "so does the guest's QEMU: {before:?}");
    f.bed.kill_host(f.host(2));
    assert_eq!(f.bed.pids(f.host(2)), Vec::<u32>::new(), "nothing of host 3 is left");
    f.server.wait_connected(&id3, false);
    // The others kept running.
    assert!(all_domains(&f.host(0).local_uri).is_empty());
    f.server.wait_connected(&f.agents[0].host_id, true);
}
