//! VMs on a real libvirtd with real QEMU (TCG) guests: a tiny kernel and a
//! busybox initramfs built by `packaging/dev/testbed.sh guest`. Needs root,
//! libvirtd running (`testbed.sh start`) and the guest files; `.ci/run`
//! provides all three. Fails loudly when any is missing.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use novacron_agent::domxml::VirtType;
use novacron_agent::hypervisor::Hypervisor;
use novacron_agent::vmops::HostSetup;
use novacron_e2e::{assert_holds, guest_dir, testbed_command, wait_for, Agent, Server};
use novacron_shared::ids::{OpId, VmId};
use novacron_shared::protocol::VmState;
use novacron_shared::spec::{CloudInit, DesiredVm, DiskSpec, KernelBoot, Power, VmSpec};
use serde_json::{json, Value};
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};

const URI: &str = "qemu:///system";

/// The tests share one libvirtd and one of them kills it: run them one at
/// a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn conn() -> Connect {
    Connect::open(Some(URI)).unwrap_or_else(|e| {
        panic!("cannot reach libvirtd at {URI} ({e}); run `packaging/dev/testbed.sh install && packaging/dev/testbed.sh start` as root")
    })
}

/// Whether a libvirt error is `n` (and not, say, a lost connection).
fn is(e: &VirtError, n: ErrorNumber) -> bool {
    matches!(e.code(), Enum::Known(c) if c == n)
}

/// A unique suffix, so runs never collide with leftovers.
fn tag() -> String {
    VmId::random().to_string()[..8].to_string()
}

/// A storage pool directory QEMU (running as its own user) can reach, and
/// a console log directory; both removed afterwards with the pool.
struct Scratch {
    pool: String,
    pool_path: PathBuf,
    console: PathBuf,
}

impl Scratch {
    fn new(t: &str) -> Scratch {
        let s = Scratch {
            pool: format!("nc-test-{t}"),
            pool_path: PathBuf::from(format!("/var/lib/libvirt/images/nc-test-{t}")),
            console: PathBuf::from(format!("/var/log/libvirt/qemu/nc-test-{t}")),
        };
        std::fs::create_dir_all(&s.console).unwrap();
        s
    }

    fn setup(&self) -> HostSetup {
        HostSetup {
            pool: self.pool.clone(),
            pool_path: self.pool_path.display().to_string(),
            console_dir: self.console.display().to_string(),
            virt_type: Some(VirtType::Qemu),
            migration_uri: None,
            labels: Default::default(),
            host_name: "real-host".into(),
            disk_locks: false,
        }
    }

    fn vms_toml(&self) -> String {
        format!(
            "virt_type = \"qemu\"\nstorage_pool = \"{}\"\nstorage_path = \"{}\"\nconsole_log_dir = \"{}\"\nshutdown_timeout = \"30s\"",
            self.pool,
            self.pool_path.display(),
            self.console.display()
        )
    }

    /// The pool's volumes; none when libvirt says the pool does not exist.
    /// Any other libvirt failure fails the test.
    fn volumes(&self) -> Vec<String> {
        let c = conn();
        let p = match c.lookup_storage_pool_by_name(&self.pool) {
            Ok(p) => p,
            Err(e) if is(&e, ErrorNumber::NoStoragePool) => return vec![],
            Err(e) => panic!("cannot look up storage pool {}: {e}", self.pool),
        };
        p.refresh(0)
            .unwrap_or_else(|e| panic!("cannot refresh storage pool {}: {e}", self.pool));
        p.list_volumes()
            .unwrap_or_else(|e| panic!("cannot list the volumes of pool {}: {e}", self.pool))
    }

    /// The guest's console log so far; empty until QEMU has created it.
    /// Any other read failure fails the test.
    fn console_log(&self, vm: &str) -> String {
        let path = self.console.join(format!("{vm}.console.log"));
        match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(c) = Connect::open(Some(URI)) {
            if let Ok(p) = c.lookup_storage_pool_by_name(&self.pool) {
                let _ = p.destroy();
                let _ = p.undefine();
            }
        }
        let _ = std::fs::remove_dir_all(&self.pool_path);
        let _ = std::fs::remove_dir_all(&self.console);
    }
}

fn guest_spec(name: &str) -> VmSpec {
    let g = guest_dir();
    let mut spec = VmSpec::minimal(name, 1, 192);
    spec.disks = vec![DiskSpec {
        name: "root".into(),
        size_mib: Some(64),
        template: None,
    }];
    spec.cloud_init = Some(CloudInit {
        user_data: Some("#cloud-config\nruncmd: [\"echo '<novacron>' && true\"]\n".into()),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA test@novacron".into()],
    });
    spec.boot = Some(KernelBoot {
        kernel: g.join("vmlinuz").display().to_string(),
        initrd: Some(g.join("initrd.img").display().to_string()),
        cmdline: "console=ttyS0 panic=-1".into(),
    });
    spec
}

/// The QEMU domain id of a running domain; `None` when it is not running
/// or libvirt says it does not exist. Any other failure fails the test.
fn domain_id(name: &str) -> Option<u32> {
    let d = match conn().lookup_domain_by_name(name) {
        Ok(d) => d,
        Err(e) if is(&e, ErrorNumber::NoDomain) => return None,
        Err(e) => panic!("cannot look up domain {name}: {e}"),
    };
    let active = d
        .is_active()
        .unwrap_or_else(|e| panic!("cannot tell whether {name} runs: {e}"));
    if active {
        d.id()
    } else {
        None
    }
}

/// Panics unless libvirt answers that domain `name` does not exist.
fn assert_undefined(c: &Connect, name: &str) {
    match c.lookup_domain_by_name(name) {
        Ok(_) => panic!("domain {name} is still defined"),
        Err(e) if is(&e, ErrorNumber::NoDomain) => {}
        Err(e) => panic!("cannot look up domain {name}: {e}"),
    }
}

#[test]
fn a_real_guest_boots_snapshots_reverts_grows_and_shuts_down_cleanly() {
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(guest_lifecycle());
}

async fn guest_lifecycle() {
    let t = tag();
    let scratch = Scratch::new(&t);
    let _ = conn();
    let (hv, _events) = Hypervisor::start(URI, Duration::from_secs(60), scratch.setup()).unwrap();
    let name = format!("nc-guest-{t}");
    // The root disk is a clone (qcow2 overlay) of a template in the pool.
    {
        let c = conn();
        let pool = novacron_agent::vmops::ensure_pool(&c, &scratch.setup()).unwrap();
        let xml = novacron_agent::domxml::volume("tmpl-base.qcow2", 48 << 20, "qcow2", None);
        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).unwrap();
    }
    let mut spec = guest_spec(&name);
    spec.disks[0].template = Some("tmpl-base.qcow2".into());
    let vm = DesiredVm {
        id: VmId::random(),
        op_id: OpId::random(),
        spec,
        power: Power::Running,
        epoch: 0,
    };
    hv.define(vm.clone()).await.unwrap();
    let overlay = {
        let c = conn();
        let pool = c.lookup_storage_pool_by_name(&scratch.pool).unwrap();
        let vol = pool
            .lookup_storage_vol_by_name(&format!("{name}.root.qcow2"))
            .unwrap();
        vol.xml_desc(0).unwrap()
    };
    assert!(
        overlay.contains("<backingStore>") && overlay.contains("tmpl-base.qcow2"),
        "{overlay}"
    );
    hv.start_vm(vm.id).await.unwrap();
    // The guest boots and sees its root disk and the cloud-init seed.
    let log = wait_for("the guest to boot", Duration::from_secs(90), || {
        let l = scratch.console_log(&name);
        l.contains("NOVACRON-GUEST-BOOTED").then_some(l)
    });
    let disks = log
        .lines()
        .find(|l| l.starts_with("NOVACRON-GUEST-DISKS"))
        .unwrap_or_else(|| panic!("no NOVACRON-GUEST-DISKS line in the console log:\n{log}"));
    assert!(disks.contains("vda") && disks.contains("vdb"), "{disks}");

    hv.snapshot_create(vm.id, "booted".into()).await.unwrap();
    let (_, vms) = hv.observe().await.unwrap();
    let o = vms.iter().find(|o| o.name == name).unwrap();
    assert_eq!(o.snapshots, ["booted"]);
    hv.snapshot_revert(vm.id, "booted".into()).await.unwrap();
    let (_, vms) = hv.observe().await.unwrap();
    assert_eq!(
        vms.iter().find(|o| o.name == name).unwrap().state,
        VmState::Running
    );

    // Grow the root disk of the running guest.
    hv.resize_disk(vm.id, "root".into(), 96).await.unwrap();
    let c = conn();
    let pool = c.lookup_storage_pool_by_name(&scratch.pool).unwrap();
    let _ = pool.refresh(0);
    let vol = pool
        .lookup_storage_vol_by_name(&format!("{name}.root.qcow2"))
        .unwrap();
    assert_eq!(vol.info().unwrap().capacity, 96 << 20);
    let e = hv.resize_disk(vm.id, "root".into(), 32).await.unwrap_err();
    assert!(e.to_string().contains("would lose data"), "{e}");

    // Graceful: the guest powers itself off on the ACPI button.
    let forced = hv.shutdown(vm.id, Duration::from_secs(60)).await.unwrap();
    assert!(!forced, "the guest ignored the ACPI power button");
    assert!(scratch.console_log(&name).contains("NOVACRON-GUEST-POWEROFF"));

    // Removal leaves no volume and no definition behind, and the template.
    let removed = hv.remove(vm.id.to_string()).await.unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert_undefined(&c, &name);
    assert_eq!(scratch.volumes(), ["tmpl-base.qcow2"]);
}

fn testbed_cmd(arg: &str) -> String {
    let out = testbed_command().arg(arg).output().unwrap();
    assert!(
        out.status.success(),
        "testbed.sh {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Where `testbed.sh start` writes the pid of the libvirtd it started.
fn testbed_pid_file() -> PathBuf {
    let run = std::env::var_os("NOVACRON_TESTBED_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/novacron-testbed"));
    run.join("libvirtd.pid")
}

/// Whether `pid` is a live (not zombie) process.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("cannot read /proc/{pid}/stat: {e}"),
    }
}

/// The pid of the libvirtd the test bed started, read from the pid file
/// `testbed.sh start` writes: only that daemon may be signalled, never one
/// found by name or by its socket. Panics with what to do when the file is
/// missing or names no live libvirtd.
fn testbed_libvirtd_pid() -> u32 {
    let file = testbed_pid_file();
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): this test signals only the libvirtd that `packaging/dev/testbed.sh start` started; stop any other libvirtd and run `testbed.sh start` as root",
            file.display()
        )
    });
    let pid: u32 = text
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds {text:?}, not a pid: {e}", file.display()));
    let comm = match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(c) => c.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "{} names pid {pid}, which is not running; run `packaging/dev/testbed.sh start` as root",
                file.display()
            )
        }
        Err(e) => panic!("cannot read /proc/{pid}/comm: {e}"),
    };
    assert!(
        comm == "libvirtd" && process_alive(pid),
        "{} names pid {pid}, which is not a running libvirtd (it is {comm:?}); run `packaging/dev/testbed.sh start` as root",
        file.display()
    );
    pid
}

fn wait_report(server: &Server, host: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(120), || {
        let v = server.get(&format!("/v1/hosts/{host}/vms"));
        (v["report"]["converged"] == true && f(&v)).then_some(v)
    })
}

fn state_of(v: &Value, name: &str) -> Option<String> {
    v["observed"]["vms"]
        .as_array()?
        .iter()
        .find(|o| o["name"] == name)
        .map(|o| {
            o["state"]
                .as_str()
                .unwrap_or_else(|| panic!("an observed VM without a state: {o}"))
                .to_string()
        })
}

#[test]
fn vms_survive_agent_and_libvirtd_restarts_without_duplicates_or_stops() {
    let _serial = serial();
    let t = tag();
    let scratch = Scratch::new(&t);
    let _ = conn();
    let server = Server::start("heartbeat_interval = \"500ms\"");
    let mut agent = Agent::on(&format!("real-{t}"), URI, &scratch.vms_toml());
    agent.join(&server);
    agent.start(&[]);
    let host = agent.host_id.clone();
    server.wait_connected(&host, true);
    let name = format!("nc-e2e-{t}");
    let spec = serde_json::to_value(guest_spec(&name)).unwrap();
    let (status, d) = server.send(
        "PUT",
        &format!("/v1/hosts/{host}/vms"),
        &json!({"vms": [{"spec": spec}]}),
    );
    assert_eq!(status, 200, "{d}");
    wait_report(&server, &host, "the VM running", |v| {
        state_of(v, &name).as_deref() == Some("running")
    });
    wait_for("the guest to boot", Duration::from_secs(90), || {
        scratch
            .console_log(&name)
            .contains("NOVACRON-GUEST-BOOTED")
            .then_some(())
    });
    let qemu_id = domain_id(&name).unwrap();

    // The agent dies: the VM keeps running. It comes back: nothing is
    // duplicated and the VM was not restarted (same QEMU domain id).
    agent.kill9();
    assert_holds(
        "the VM running without its agent",
        Duration::from_secs(2),
        || match domain_id(&name) {
            Some(id) if id == qemu_id => Ok(()),
            other => Err(format!("the VM stopped with the agent (domain id {other:?})")),
        },
    );
    agent.start(&[]);
    // The server may still hold the old session for a moment: wait for the
    // new agent's own word that it has the desired state and matches it.
    wait_for("the restarted agent to converge", Duration::from_secs(60), || {
        let log = agent.log();
        (log.contains("desired state from the server") && log.contains("converged on the desired state"))
            .then_some(())
    });
    assert_eq!(domain_id(&name), Some(qemu_id), "the VM was restarted");
    let same_name = conn()
        .list_all_domains(0)
        .unwrap()
        .iter()
        .filter(|d| d.name().unwrap() == name)
        .count();
    assert_eq!(same_name, 1);
    assert!(
        !agent.log().contains("reconciled"),
        "the restarted agent acted: {}",
        agent.log()
    );

    // libvirtd dies and comes back under the running agent: the agent
    // reconnects and re-registers for events.
    let pid = testbed_libvirtd_pid();
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_for("libvirtd to die", Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });
    testbed_cmd("start");
    assert_eq!(domain_id(&name), Some(qemu_id), "QEMU must outlive libvirtd");
    wait_for(
        "the agent to reconnect to libvirt",
        Duration::from_secs(60),
        || (agent.log().matches("connected to libvirt").count() >= 2).then_some(()),
    );
    let (status, d) = server.send(
        "PUT",
        &format!("/v1/hosts/{host}/vms"),
        &json!({"vms": [{"spec": spec, "power": "paused"}]}),
    );
    assert_eq!(status, 200, "{d}");
    let v = wait_report(&server, &host, "the VM paused", |v| {
        state_of(v, &name).as_deref() == Some("paused")
    });
    let events = v["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["name"] == name.as_str() && e["event"] == "suspended"),
        "no suspended event after the libvirtd restart: {events:?}"
    );

    // Not wanted any more: removed with its volumes.
    let (status, _) = server.send("PUT", &format!("/v1/hosts/{host}/vms"), &json!({"vms": []}));
    assert_eq!(status, 200);
    wait_report(&server, &host, "the VM removed", |v| state_of(v, &name).is_none());
    assert_undefined(&conn(), &name);
    assert!(scratch.volumes().is_empty(), "{:?}", scratch.volumes());
}

#[test]
fn a_hung_libvirtd_does_not_stop_heartbeats() {
    let _serial = serial();
    let t = tag();
    let scratch = Scratch::new(&t);
    let _ = conn();
    let server = Server::start("heartbeat_interval = \"300ms\"");
    let mut agent = Agent::on(
        &format!("hang-{t}"),
        URI,
        &format!("{}\ncall_timeout = \"2s\"", scratch.vms_toml()),
    );
    agent.join(&server);
    agent.start(&[]);
    let host = agent.host_id.clone();
    server.wait_connected(&host, true);
    let (status, d) = server.send("PUT", &format!("/v1/hosts/{host}/vms"), &json!({"vms": []}));
    assert_eq!(status, 200, "{d}");
    wait_report(&server, &host, "a first converged pass", |_| true);

    // Freeze libvirtd: every libvirt call now hangs.
    let pid = testbed_libvirtd_pid().to_string();
    let stop = |sig: &str| {
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    };
    stop("-STOP");
    let thawed = scopeguard(|| {
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
    });
    wait_for(
        "the agent to notice the hung call",
        Duration::from_secs(30),
        || agent.log().contains("libvirt call hung").then_some(()),
    );
    // Heartbeats keep arriving while libvirt is frozen: every 300 ms, so
    // the host's last-seen time never falls 1.5 s behind for 3 s on end
    // (a stall the 10 s session timeout would still tolerate fails here).
    let wall = novacron_shared::clock::Clock::system();
    assert_holds("heartbeats while libvirt hangs", Duration::from_secs(3), || {
        let h = server.host(&host);
        if h["connected"] != true {
            return Err(format!("the host dropped while libvirt hung: {h}"));
        }
        let seen = h["last_seen_ms"]
            .as_u64()
            .ok_or(format!("no last_seen_ms: {h}"))?;
        let behind = wall.unix_ms().saturating_sub(seen);
        if behind > 1_500 {
            return Err(format!("last heartbeat {behind} ms ago"));
        }
        Ok(())
    });

    // libvirtd thaws: the agent recovers and converges on a new state.
    stop("-CONT");
    drop(thawed);
    let (status, d) = server.send("PUT", &format!("/v1/hosts/{host}/vms"), &json!({"vms": []}));
    assert_eq!(status, 200, "{d}");
    let generation = d["generation"].as_u64().unwrap();
    wait_report(&server, &host, "convergence after libvirtd thawed", |v| {
        v["report"]["generation"] == generation
    });
}

/// Runs `f` when dropped (a test that fails mid-way still thaws libvirtd).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
