//! `vm-ops`: what the NovaCron agent costs per VM operation, and what its
//! inventory and reconcile pass cost on a large host.
//!
//! One file, one job: both parts measure the agent's libvirt driver, and
//! their helpers (guest XML, the three ways to call libvirt, timing
//! statistics, cleanup) serve only this measurement. Over 1,000 lines for
//! that reason: split, each part would need the same helpers, which exist
//! for nothing else.
//!
//! **Part 1: agent overhead per operation** against the real libvirtd at
//! `qemu:///system` (needs root and a running libvirtd; on a dev machine
//! `bash packaging/dev/testbed.sh start` starts one). Each iteration runs the
//! same lifecycle three ways, each on a fresh cheap guest (64 MiB, 1 vCPU, one
//! blank 16 MiB qcow2 volume, no kernel: it idles in the BIOS):
//!
//! - `agent`: the agent's own path, `novacron_agent::hypervisor::Hypervisor`
//!   (async; the libvirt call runs on its driver thread after validation, XML
//!   generation and metadata handling), driven with `block_on` from here;
//! - `virsh`: `virsh -c qemu:///system <cmd>` as a subprocess, paying process
//!   start and a new connection each time, as an operator or a script does;
//! - `raw`: the bare `virt` crate call on an already-open connection in this
//!   process (lookup by UUID, then the call): the "warm" baseline that
//!   isolates the agent's own overhead.
//!
//! The operations: `define` (create the qcow2 volume, then define the domain;
//! virsh: `vol-create-as` + `define --validate`, since the agent validates
//! definitions too), `start`, `suspend`, `resume`, `snapshot-create` (internal
//! snapshot of the running guest), `destroy`, `undefine` (undefine with the
//! snapshot metadata, then delete the volume; virsh: `undefine
//! --snapshots-metadata` + `vol-delete`). The virsh and raw sides define the
//! very XML the agent generates. Methods take turns in a rotating order; the
//! first `--warmup` iterations are not recorded. Everything lives in a
//! dedicated storage pool `nc-bench` (`/var/lib/libvirt/images/nc-bench`) and
//! domains named `ncbench-*`; all of it is removed at the end, on error, and
//! on Ctrl-C (leftovers of an earlier killed run are removed first).
//!
//! The domain type is `kvm` when a `kvm` guest starts on this host, else
//! `qemu` (TCG); the output says which (`--virt-type` forces one). A last
//! detail line measures how much of `define` is libvirt's schema validation,
//! which the agent asks for (raw define with and without
//! `VIR_DOMAIN_DEFINE_VALIDATE`).
//!
//! **Part 2: inventory and reconcile** on a libvirt test-driver host (no
//! daemon, no root) holding `--domains` running managed VMs, defined through
//! `novacron_agent::vmops::define`: `vmops::observe` (capacity, every domain
//! with its state, metadata and snapshots), and the reconciler's plan on the
//! converged host (checked to produce no action) and with 10 % of the VMs
//! asked for another power state.
//!
//! Run (as root for part 1):
//!
//! ```text
//! cargo build --release -p novacron-bench --bin vm-ops && ./target/release/vm-ops
//! ./target/release/vm-ops --skip-virsh            # part 2 only (no root, no libvirtd)
//! ./target/release/vm-ops --iterations 50 --domains 1000
//! ```
//!
//! The output is plain `key=value` lines, e.g.
//! `op=start agent_median_ms=.. virsh_median_ms=.. raw_median_ms=.. agent/virsh=.. agent/raw=..`.

// A benchmark times real processes (server, agents, libvirtd, QEMU) by the
// OS clock and waits on them in real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use novacron_agent::domxml::{self, Placement, VirtType};
use novacron_agent::hypervisor::Hypervisor;
use novacron_agent::reconcile::Reconciler;
use novacron_agent::vmops::{self, Defined, HostSetup};
use novacron_bench::{machine_description, percentile};
use novacron_shared::ids::{OpId, VmId};
use novacron_shared::protocol::VmState;
use novacron_shared::spec::{self, DesiredVm, DiskSpec, Power, VmSpec};
use tokio::runtime::Runtime;
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

/// The storage pool part 1 uses (defined here, removed at the end).
const POOL: &str = "nc-bench";
/// Its directory.
const POOL_PATH: &str = "/var/lib/libvirt/images/nc-bench";
/// Where the guests' serial console logs go.
const CONSOLE_DIR: &str = "/var/tmp/nc-bench-console";
/// Every domain part 1 makes is named with this prefix.
const PREFIX: &str = "ncbench-";
/// Guest memory, MiB.
const GUEST_MIB: u64 = 64;
/// Size of the guest's blank qcow2 disk, MiB.
const DISK_MIB: u64 = 16;
/// The snapshot each lifecycle takes.
const SNAPSHOT: &str = "s1";
/// Time allowed for one agent call.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The operations of part 1, in lifecycle order.
const OPS: [&str; 7] = [
    "define",
    "start",
    "suspend",
    "resume",
    "snapshot-create",
    "destroy",
    "undefine",
];
/// The ways of doing them.
const METHODS: [Method; 3] = [Method::Agent, Method::Virsh, Method::Raw];

/// Set on Ctrl-C; checked between operations so that cleanup still runs.
static STOP: AtomicBool = AtomicBool::new(false);

/// Measures the NovaCron agent's per-operation overhead against virsh and raw
/// libvirt calls, and its inventory/reconcile cost on a large test-driver host.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Recorded lifecycles per method in part 1.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Unrecorded lifecycles per method before those.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The libvirt URI of part 1.
    #[arg(long, default_value = "qemu:///system")]
    uri: String,
    /// Force the domain type of part 1 (kvm or qemu) instead of probing.
    #[arg(long)]
    virt_type: Option<String>,
    /// Skip part 1 (real libvirtd and virsh); run only the test-driver part.
    #[arg(long)]
    skip_virsh: bool,
    /// Skip part 2 (the test-driver inventory and reconcile figures).
    #[arg(long)]
    skip_inventory: bool,
    /// Managed, running domains on the test-driver host of part 2.
    #[arg(long, default_value_t = 500)]
    domains: usize,
    /// Snapshots taken of each domain in part 2 (observe lists them).
    #[arg(long, default_value_t = 0)]
    snapshots_per_domain: usize,
    /// Timed `observe` calls in part 2.
    #[arg(long, default_value_t = 20)]
    observe_runs: usize,
    /// Timed reconcile plans in part 2, per scenario.
    #[arg(long, default_value_t = 200)]
    plan_runs: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // libvirt's default handler prints every error, expected ones too
    // ("domain not found" while checking that a name is free); errors that
    // matter come back as values.
    virt::error::clear_error_callback();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vm-ops: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("vm-ops: interrupted; cleaning up");
            STOP.store(true, Relaxed);
        }
    });
    match run(&args, &runtime) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm-ops: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, rt: &Runtime) -> anyhow::Result<()> {
    print_machine();
    if !args.skip_virsh {
        ops_bench(args, rt).context("part 1 (agent vs virsh vs raw libvirt)")?;
    }
    if !args.skip_inventory {
        inventory_bench(args).context("part 2 (inventory and reconcile on the test driver)")?;
    }
    Ok(())
}

fn print_machine() {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("machine: {}, kernel {}", machine_description(), kernel.trim());
}

// ---------------------------------------------------------------- helpers

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `f` and returns how long it took.
fn timed(what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    check_stop()?;
    let t = Instant::now();
    f().with_context(|| what.to_string())?;
    Ok(t.elapsed())
}

/// Milliseconds, three decimals.
fn fmt_ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Microseconds per item, one decimal.
fn per_item_us(d: Duration, n: usize) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6 / n.max(1) as f64)
}

/// Median and p90 (nearest rank).
fn med_p90(v: &[Duration]) -> Option<(Duration, Duration)> {
    let mut s = v.to_vec();
    s.sort_unstable();
    Some((percentile(&s, 50.0)?, percentile(&s, 90.0)?))
}

fn libvirt_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

fn virt_err(what: &'static str) -> impl Fn(virt::error::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("{what}: {e}")
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("{tag}-{}-{}", std::process::id(), VmId::random()));
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- part 1

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Agent,
    Virsh,
    Raw,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Agent => "agent",
            Method::Virsh => "virsh",
            Method::Raw => "raw",
        }
    }
}

/// Durations by `method/op` (and `method/op.step` for the parts of a step).
#[derive(Default)]
struct Samples {
    record: bool,
    by_key: BTreeMap<String, Vec<Duration>>,
}

impl Samples {
    fn add(&mut self, m: Method, key: &str, d: Duration) {
        if self.record {
            self.by_key
                .entry(format!("{}/{key}", m.as_str()))
                .or_default()
                .push(d);
        }
    }

    fn get(&self, m: Method, key: &str) -> &[Duration] {
        self.by_key
            .get(&format!("{}/{key}", m.as_str()))
            .map_or(&[], |v| v.as_slice())
    }
}

/// One guest of one lifecycle.
struct Guest {
    vm: DesiredVm,
    uuid: String,
    name: String,
    volume: String,
    /// The domain XML, exactly as the agent generates it.
    xml: String,
    /// That XML in a file, for virsh.
    xml_file: PathBuf,
}

impl Guest {
    fn new(label: &str, virt_type: VirtType, dir: &Path) -> anyhow::Result<Self> {
        let name = format!("{PREFIX}{label}");
        let mut s = VmSpec::minimal(&name, 1, GUEST_MIB);
        s.disks = vec![DiskSpec {
            name: "root".into(),
            size_mib: Some(DISK_MIB),
            template: None,
        }];
        let vm = DesiredVm {
            id: VmId::random(),
            op_id: OpId::random(),
            spec: s,
            power: Power::Running,
            epoch: 0,
        };
        vm.spec.validate().context("the benchmark's own VM spec")?;
        let volume = spec::volume_name(&name, "root");
        let xml = domxml::domain(
            &vm,
            &Placement {
                virt_type,
                disk_paths: vec![format!("{POOL_PATH}/{volume}")],
                seed_path: None,
                console_log: format!("{CONSOLE_DIR}/{name}.console.log"),
                host_name: "bench-host".into(),
            },
        );
        let xml_file = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_file, &xml).with_context(|| format!("cannot write {}", xml_file.display()))?;
        Ok(Self {
            uuid: vm.id.to_string(),
            vm,
            name,
            volume,
            xml,
            xml_file,
        })
    }
}

fn virsh(uri: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run virsh (is libvirt-clients installed?)")?;
    if !out.status.success() {
        bail!(
            "`virsh {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Everything part 1 needs: the agent, a warm raw connection, the pool.
struct Bench<'a> {
    rt: &'a Runtime,
    uri: &'a str,
    hv: Hypervisor,
    conn: Connect,
    pool: StoragePool,
    virt_type: VirtType,
}

impl Bench<'_> {
    fn lifecycle(&self, m: Method, g: &Guest, s: &mut Samples) -> anyhow::Result<()> {
        match m {
            Method::Agent => self.agent_lifecycle(g, s),
            Method::Virsh => self.virsh_lifecycle(g, s),
            Method::Raw => self.raw_lifecycle(g, s),
        }
    }

    fn agent_lifecycle(&self, g: &Guest, s: &mut Samples) -> anyhow::Result<()> {
        let (hv, rt, id) = (&self.hv, self.rt, g.vm.id);
        let m = Method::Agent;
        let vm = g.vm.clone();
        let d = timed("agent define", || {
            let r = rt.block_on(hv.define(vm))?;
            ensure!(r == Defined::Created, "define returned {r:?}");
            Ok(())
        })?;
        s.add(m, "define", d);
        let d = timed("agent start", || Ok(rt.block_on(hv.start_vm(id))?))?;
        s.add(m, "start", d);
        let d = timed("agent suspend", || Ok(rt.block_on(hv.suspend(id))?))?;
        s.add(m, "suspend", d);
        let d = timed("agent resume", || Ok(rt.block_on(hv.resume(id))?))?;
        s.add(m, "resume", d);
        let d = timed("agent snapshot-create", || {
            Ok(rt.block_on(hv.snapshot_create(id, SNAPSHOT.into()))?)
        })?;
        s.add(m, "snapshot-create", d);
        let d = timed("agent destroy", || Ok(rt.block_on(hv.destroy(id))?))?;
        s.add(m, "destroy", d);
        let uuid = g.uuid.clone();
        let d = timed("agent remove", || {
            let removed = rt.block_on(hv.remove(uuid))?;
            ensure!(
                removed == [g.volume.clone()],
                "remove deleted {removed:?}, expected [{}]",
                g.volume
            );
            Ok(())
        })?;
        s.add(m, "undefine", d);
        Ok(())
    }

    fn virsh_lifecycle(&self, g: &Guest, s: &mut Samples) -> anyhow::Result<()> {
        let (uri, m, n) = (self.uri, Method::Virsh, g.name.as_str());
        let size = format!("{DISK_MIB}M");
        let xml = g.xml_file.to_string_lossy();
        let vol = timed("virsh vol-create-as", || {
            virsh(
                uri,
                &["vol-create-as", POOL, &g.volume, &size, "--format", "qcow2"],
            )
        })?;
        let def = timed("virsh define", || virsh(uri, &["define", "--validate", &xml]))?;
        s.add(m, "define.volume", vol);
        s.add(m, "define.domain", def);
        s.add(m, "define", vol + def);
        for (op, args) in [
            ("start", vec!["start", n]),
            ("suspend", vec!["suspend", n]),
            ("resume", vec!["resume", n]),
            (
                "snapshot-create",
                vec!["snapshot-create-as", "--domain", n, "--name", SNAPSHOT],
            ),
            ("destroy", vec!["destroy", n]),
        ] {
            let d = timed(&format!("virsh {op}"), || virsh(uri, &args))?;
            s.add(m, op, d);
        }
        let und = timed("virsh undefine", || {
            virsh(uri, &["undefine", "--snapshots-metadata", n])
        })?;
        let del = timed("virsh vol-delete", || {
            virsh(uri, &["vol-delete", "--pool", POOL, &g.volume])
        })?;
        s.add(m, "undefine.domain", und);
        s.add(m, "undefine.volume", del);
        s.add(m, "undefine", und + del);
        Ok(())
    }

    fn raw_lifecycle(&self, g: &Guest, s: &mut Samples) -> anyhow::Result<()> {
        let (c, m) = (&self.conn, Method::Raw);
        let lookup = || {
            c.lookup_domain_by_uuid_string(&g.uuid)
                .map_err(virt_err("lookup domain"))
        };
        let vol_xml = domxml::volume(&g.volume, DISK_MIB << 20, "qcow2", None);
        let vol = timed("raw volume create", || {
            StorageVol::create_xml(&self.pool, &vol_xml, 0).map_err(virt_err("create volume"))?;
            Ok(())
        })?;
        let def = timed("raw define", || {
            c.define_domain_xml_flags(&g.xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
                .map_err(virt_err("define domain"))?;
            Ok(())
        })?;
        s.add(m, "define.volume", vol);
        s.add(m, "define.domain", def);
        s.add(m, "define", vol + def);
        let d = timed("raw start", || lookup()?.create().map_err(virt_err("start")))?;
        s.add(m, "start", d);
        let d = timed("raw suspend", || lookup()?.suspend().map_err(virt_err("suspend")))?;
        s.add(m, "suspend", d);
        let d = timed("raw resume", || lookup()?.resume().map_err(virt_err("resume")))?;
        s.add(m, "resume", d);
        let snap_xml = domxml::snapshot(SNAPSHOT);
        let d = timed("raw snapshot-create", || {
            lookup()?
                .create_snapshot_xml(&snap_xml, 0)
                .map_err(virt_err("create snapshot"))?;
            Ok(())
        })?;
        s.add(m, "snapshot-create", d);
        let d = timed("raw destroy", || lookup()?.destroy().map_err(virt_err("destroy")))?;
        s.add(m, "destroy", d);
        let und = timed("raw undefine", || {
            lookup()?
                .undefine_flags(
                    sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
                )
                .map_err(virt_err("undefine"))
        })?;
        let del = timed("raw volume delete", || {
            self.pool
                .lookup_storage_vol_by_name(&g.volume)
                .map_err(virt_err("lookup volume"))?
                .delete(0)
                .map_err(virt_err("delete volume"))
        })?;
        s.add(m, "undefine.domain", und);
        s.add(m, "undefine.volume", del);
        s.add(m, "undefine", und + del);
        Ok(())
    }
}

/// How much of `define` is libvirt's schema validation, which the agent
/// asks for (`VIR_DOMAIN_DEFINE_VALIDATE`): raw define + undefine of the
/// same XML with and without it, alternately.
fn validation_cost(bench: &Bench<'_>, runs: usize, dir: &Path) -> anyhow::Result<()> {
    let g = Guest::new("validate", bench.virt_type, dir)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (flags, into) in [(sys::VIR_DOMAIN_DEFINE_VALIDATE, &mut with), (0, &mut without)] {
            let d = timed("raw define", || {
                bench
                    .conn
                    .define_domain_xml_flags(&g.xml, flags)
                    .map_err(virt_err("define domain"))?;
                Ok(())
            })?;
            into.push(d);
            bench
                .conn
                .lookup_domain_by_uuid_string(&g.uuid)
                .map_err(virt_err("lookup domain"))?
                .undefine()
                .map_err(virt_err("undefine"))?;
        }
    }
    let (Some((w, _)), Some((wo, _))) = (med_p90(&with), med_p90(&without)) else {
        bail!("no validation samples");
    };
    println!(
        "detail op=define raw define_domain_validate_median_ms={} define_domain_novalidate_median_ms={} \
         validation_ms={:+.3} (runs={runs}; the agent validates, and so does virsh define --validate here)",
        fmt_ms(w),
        fmt_ms(wo),
        (w.as_secs_f64() - wo.as_secs_f64()) * 1e3
    );
    Ok(())
}

/// Removes the domains (`ncbench-*`) and volumes part 1 made, and the pool
/// when part 1 defined it. Best effort; returns what it could not do.
fn cleanup(uri: &str, remove_pool: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let conn = match Connect::open(Some(uri)) {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot connect to {uri} to clean up: {e}")],
    };
    for d in conn.list_all_domains(0).unwrap_or_default() {
        let Ok(name) = d.name() else { continue };
        if !name.starts_with(PREFIX) {
            continue;
        }
        if d.is_active().unwrap_or(false) {
            if let Err(e) = d.destroy() {
                problems.push(format!("destroy {name}: {e}"));
            }
        }
        if let Err(e) = d.undefine_flags(
            sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
        ) {
            problems.push(format!("undefine {name}: {e}"));
        }
    }
    if let Ok(pool) = conn.lookup_storage_pool_by_name(POOL) {
        if !pool.is_active().unwrap_or(false) {
            let _ = pool.create(0);
        }
        let _ = pool.refresh(0);
        for v in pool.list_all_volumes(0).unwrap_or_default() {
            let Ok(name) = v.name() else { continue };
            if name.starts_with(PREFIX) {
                if let Err(e) = v.delete(0) {
                    problems.push(format!("delete volume {name}: {e}"));
                }
            }
        }
        if remove_pool {
            let _ = pool.destroy();
            if let Err(e) = pool.delete(0) {
                problems.push(format!("delete pool directory {POOL_PATH}: {e}"));
            }
            if let Err(e) = pool.undefine() {
                problems.push(format!("undefine pool {POOL}: {e}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(CONSOLE_DIR) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(CONSOLE_DIR);
    problems
}

/// Runs [`cleanup`] when dropped (on success, error, panic or Ctrl-C).
struct Cleanup {
    uri: String,
    remove_pool: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let problems = cleanup(&self.uri, self.remove_pool);
        if problems.is_empty() {
            println!(
                "cleanup: done (domains {PREFIX}*, their volumes{})",
                if self.remove_pool {
                    format!(", pool {POOL} and {POOL_PATH}")
                } else {
                    String::new()
                }
            );
        }
        for p in problems {
            eprintln!("vm-ops: cleanup: {p}");
        }
    }
}

/// Whether a `kvm` guest (no kernel, no disk) starts and stays running here.
fn kvm_works(conn: &Connect, dir: &Path) -> anyhow::Result<Result<(), String>> {
    let mut g = Guest::new("probe", VirtType::Kvm, dir)?;
    g.vm.spec.disks.clear();
    let xml = domxml::domain(
        &g.vm,
        &Placement {
            virt_type: VirtType::Kvm,
            disk_paths: Vec::new(),
            seed_path: None,
            console_log: format!("{CONSOLE_DIR}/{}.console.log", g.name),
            host_name: "bench-host".into(),
        },
    );
    let dom = match conn.define_domain_xml_flags(&xml, sys::VIR_DOMAIN_DEFINE_VALIDATE) {
        Ok(d) => d,
        Err(e) => return Ok(Err(format!("define: {e}"))),
    };
    let outcome = match dom.create() {
        Err(e) => Err(format!("start: {e}")),
        Ok(_) => {
            std::thread::sleep(Duration::from_secs(2));
            match dom.is_active() {
                Ok(true) => Ok(()),
                Ok(false) => Err("the guest stopped by itself".into()),
                Err(e) => Err(format!("state: {e}")),
            }
        }
    };
    if dom.is_active().unwrap_or(false) {
        dom.destroy().map_err(virt_err("destroy the probe"))?;
    }
    dom.undefine().map_err(virt_err("undefine the probe"))?;
    Ok(outcome)
}

fn ops_bench(args: &Args, rt: &Runtime) -> anyhow::Result<()> {
    ensure!(args.iterations > 0, "--iterations must be at least 1");
    let uri = args.uri.as_str();
    let conn = Connect::open(Some(uri)).map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to {uri}: {e} (part 1 needs root and a running libvirtd: \
             `bash packaging/dev/testbed.sh start`; or run with --skip-virsh)"
        )
    })?;
    let pool_existed = conn.lookup_storage_pool_by_name(POOL).is_ok();
    // Leftovers of a killed earlier run.
    for p in cleanup(uri, false) {
        eprintln!("vm-ops: leftover cleanup: {p}");
    }
    let _cleanup = Cleanup {
        uri: uri.to_string(),
        remove_pool: !pool_existed,
    };
    std::fs::create_dir_all(CONSOLE_DIR).with_context(|| format!("cannot create {CONSOLE_DIR}"))?;
    let pool = match conn.lookup_storage_pool_by_name(POOL) {
        Ok(p) => p,
        Err(_) => {
            let p = conn
                .define_storage_pool_xml(&domxml::dir_pool(POOL, POOL_PATH), 0)
                .map_err(virt_err("define the storage pool"))?;
            p.build(0).map_err(virt_err("build the storage pool"))?;
            p
        }
    };
    if !pool.is_active().map_err(virt_err("storage pool state"))? {
        pool.create(0).map_err(virt_err("start the storage pool"))?;
    }
    let dir = TempDir::new("nc-bench-vm-ops")?;

    let (virt_type, type_note) = match args.virt_type.as_deref() {
        Some("kvm") => (VirtType::Kvm, "forced by --virt-type".to_string()),
        Some("qemu") => (VirtType::Qemu, "forced by --virt-type".to_string()),
        Some(other) => bail!("--virt-type must be kvm or qemu, not {other:?}"),
        None => match kvm_works(&conn, dir.path())? {
            Ok(()) => (VirtType::Kvm, "a kvm guest starts here".to_string()),
            Err(why) => (
                VirtType::Qemu,
                format!("FALLBACK to qemu (TCG): a kvm guest does not start here: {why}"),
            ),
        },
    };

    let setup = HostSetup {
        pool: POOL.into(),
        pool_path: POOL_PATH.into(),
        console_dir: CONSOLE_DIR.into(),
        virt_type: Some(virt_type),
        migration_uri: None,
        labels: Default::default(),
        host_name: "test-host".into(),
        disk_locks: false,
    };
    let (hv, mut events) = {
        let _guard = rt.enter();
        Hypervisor::start(uri, CALL_TIMEOUT, setup).context("cannot start the agent's libvirt driver")?
    };
    let event_count = Arc::new(AtomicU64::new(0));
    let counter = event_count.clone();
    rt.spawn(async move {
        while events.recv().await.is_some() {
            counter.fetch_add(1, Relaxed);
        }
    });
    rt.block_on(hv.ping()).context("the agent cannot reach libvirt")?;

    let lib = conn.lib_version().map(libvirt_version).unwrap_or_default();
    let hyp = conn.hyp_version().map(libvirt_version).unwrap_or_default();
    println!();
    println!(
        "== part 1: agent overhead per operation, {uri} (libvirt {lib}, QEMU {hyp}) ==\n\
         guest: domain type {} ({type_note}), {GUEST_MIB} MiB, 1 vCPU, one blank {DISK_MIB} MiB qcow2 \
         volume in pool {POOL}, no kernel (idles in the BIOS)\n\
         iterations={} warmup={} (per method; methods take turns in rotating order, one guest at a time)",
        virt_type.as_str(),
        args.iterations,
        args.warmup
    );

    let bench = Bench {
        rt,
        uri,
        hv,
        conn,
        pool,
        virt_type,
    };
    let mut samples = Samples::default();
    let total = args.warmup + args.iterations;
    let started = Instant::now();
    for i in 0..total {
        samples.record = i >= args.warmup;
        for k in 0..METHODS.len() {
            let m = METHODS[(i + k) % METHODS.len()];
            let g = Guest::new(&format!("{}-{i}", m.as_str()), bench.virt_type, dir.path())?;
            bench
                .lifecycle(m, &g, &mut samples)
                .with_context(|| format!("iteration {i}, {} lifecycle of {}", m.as_str(), g.name))?;
        }
        if (i + 1) % 5 == 0 || i + 1 == total {
            eprintln!(
                "vm-ops: {}/{total} iterations ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }

    for op in OPS {
        let stat = |m: Method| med_p90(samples.get(m, op));
        let (Some((am, ap)), Some((vm, vp)), Some((rm, rp))) =
            (stat(Method::Agent), stat(Method::Virsh), stat(Method::Raw))
        else {
            bail!("no samples for {op}");
        };
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "op={op} agent_median_ms={} agent_p90_ms={} virsh_median_ms={} virsh_p90_ms={} \
             raw_median_ms={} raw_p90_ms={} agent/virsh={:.3} agent/raw={:.3} agent-raw_ms={:+.3}",
            fmt_ms(am),
            fmt_ms(ap),
            fmt_ms(vm),
            fmt_ms(vp),
            fmt_ms(rm),
            fmt_ms(rp),
            ratio(am, vm),
            ratio(am, rm),
            (am.as_secs_f64() - rm.as_secs_f64()) * 1e3
        );
    }
    for (op, parts) in [
        ("define", ["define.volume", "define.domain"]),
        ("undefine", ["undefine.domain", "undefine.volume"]),
    ] {
        for m in [Method::Virsh, Method::Raw] {
            let med = |k: &str| med_p90(samples.get(m, k)).map_or_else(|| "?".into(), |(x, _)| fmt_ms(x));
            println!(
                "detail op={op} method={} {}_median_ms={} {}_median_ms={}",
                m.as_str(),
                parts[0],
                med(parts[0]),
                parts[1],
                med(parts[1])
            );
        }
    }
    let lifecycle = |m: Method| -> Duration {
        OPS.iter()
            .filter_map(|op| med_p90(samples.get(m, op)).map(|(x, _)| x))
            .sum()
    };
    let (a, v, r) = (
        lifecycle(Method::Agent),
        lifecycle(Method::Virsh),
        lifecycle(Method::Raw),
    );
    println!(
        "op=lifecycle-sum-of-medians agent_ms={} virsh_ms={} raw_ms={} agent/virsh={:.3} agent/raw={:.3}",
        fmt_ms(a),
        fmt_ms(v),
        fmt_ms(r),
        a.as_secs_f64() / v.as_secs_f64().max(1e-9),
        a.as_secs_f64() / r.as_secs_f64().max(1e-9)
    );
    validation_cost(&bench, args.iterations, dir.path())?;
    println!(
        "agent: lifecycle events received={} hung_calls_abandoned={} part1_wall_s={:.0}",
        event_count.load(Relaxed),
        bench.hv.abandoned.load(Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------- part 2

fn inventory_bench(args: &Args) -> anyhow::Result<()> {
    let n = args.domains;
    ensure!(n > 0, "--domains must be at least 1");
    ensure!(
        args.observe_runs > 0 && args.plan_runs > 0,
        "--observe-runs and --plan-runs must be at least 1"
    );
    let dir = TempDir::new("nc-bench-inventory")?;
    let node = dir.path().join("node.xml");
    // A 64-CPU, 1 TiB host with no domains of its own.
    std::fs::write(
        &node,
        "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>64</active><total>64</total>\
         <nodes>1</nodes><sockets>2</sockets><cores>32</cores><threads>1</threads></cpu>\
         <memory>1073741824</memory></node>",
    )
    .with_context(|| format!("cannot write {}", node.display()))?;
    let uri = format!("test://{}", node.display());
    let conn = Connect::open(Some(&uri)).map_err(|e| anyhow::anyhow!("cannot open {uri}: {e}"))?;
    let setup = HostSetup {
        pool: "nc-bench".into(),
        pool_path: dir.path().join("pool").to_string_lossy().into_owned(),
        console_dir: dir.path().to_string_lossy().into_owned(),
        virt_type: None,
        migration_uri: None,
        labels: Default::default(),
        host_name: "test-host".into(),
        disk_locks: false,
    };
    let desired: Vec<DesiredVm> = (0..n)
        .map(|i| {
            let mut s = VmSpec::minimal(&format!("vm-{i:05}"), 1 + (i % 4) as u32, 512);
            s.disks = vec![DiskSpec {
                name: "root".into(),
                size_mib: Some(DISK_MIB),
                template: None,
            }];
            DesiredVm {
                id: VmId::random(),
                op_id: OpId::random(),
                spec: s,
                power: Power::Running,
                epoch: 0,
            }
        })
        .collect();

    println!();
    println!(
        "== part 2: inventory and reconcile, libvirt test driver (test:///<node.xml>: 64 CPUs, 1 TiB), \
         {n} managed running domains, {} snapshot(s) each ==",
        args.snapshots_per_domain
    );
    let t = Instant::now();
    for vm in &desired {
        check_stop()?;
        let r = vmops::define(&conn, &setup, vm).with_context(|| format!("define {}", vm.spec.name))?;
        ensure!(r == Defined::Created, "define {} returned {r:?}", vm.spec.name);
    }
    let define_total = t.elapsed();
    let t = Instant::now();
    for vm in &desired {
        vmops::start(&conn, vm.id).with_context(|| format!("start {}", vm.spec.name))?;
    }
    let start_total = t.elapsed();
    let t = Instant::now();
    for vm in &desired {
        for k in 0..args.snapshots_per_domain {
            vmops::snapshot_create(&conn, vm.id, &format!("snap-{k}"))
                .with_context(|| format!("snapshot {}", vm.spec.name))?;
        }
    }
    let snap_total = t.elapsed();
    println!(
        "setup: vmops::define total_ms={} per_domain_us={}; vmops::start total_ms={} per_domain_us={}{}",
        fmt_ms(define_total),
        per_item_us(define_total, n),
        fmt_ms(start_total),
        per_item_us(start_total, n),
        if args.snapshots_per_domain > 0 {
            format!(
                "; snapshot_create total_ms={} per_snapshot_us={}",
                fmt_ms(snap_total),
                per_item_us(snap_total, n * args.snapshots_per_domain)
            )
        } else {
            String::new()
        }
    );

    // Inventory.
    let mut observe_times = Vec::with_capacity(args.observe_runs);
    let mut last = None;
    for _ in 0..args.observe_runs {
        check_stop()?;
        let t = Instant::now();
        let o = vmops::observe(&conn, &setup).context("vmops::observe")?;
        observe_times.push(t.elapsed());
        last = Some(o);
    }
    let Some((capacity, observed)) = last else {
        bail!("no observation");
    };
    ensure!(
        observed.len() == n,
        "observe saw {} domains, expected {n}",
        observed.len()
    );
    ensure!(
        observed
            .iter()
            .all(|o| o.meta.is_some() && o.state == VmState::Running),
        "observe found a domain that is not a running managed VM"
    );
    ensure!(
        observed
            .iter()
            .all(|o| o.snapshots.len() == args.snapshots_per_domain),
        "observe did not list every snapshot"
    );
    let (om, op) = med_p90(&observe_times).context("no observe samples")?;
    println!(
        "op=observe domains={n} runs={} median_ms={} p90_ms={} per_domain_us={} (capacity cpus={} memory_mib={})",
        args.observe_runs,
        fmt_ms(om),
        fmt_ms(op),
        per_item_us(om, n),
        capacity.cpus,
        capacity.memory_mib
    );

    // Reconcile on the converged host (the planner sees what the driver
    // hands it: its own observation type).
    let observed: Vec<_> = observed.iter().map(vmops::ObservedVm::to_observed).collect();
    let rec = Reconciler::default();
    let plan_bench = |desired: &[DesiredVm], want_actions: usize, label: &str| -> anyhow::Result<Duration> {
        let mut times = Vec::with_capacity(args.plan_runs);
        let mut actions = 0;
        for _ in 0..args.plan_runs {
            let now = Instant::now();
            let p = rec.plan(now, desired, &observed);
            times.push(now.elapsed());
            ensure!(p.drift.is_empty(), "{label}: unexpected drift {:?}", p.drift);
            ensure!(
                p.actions.len() == want_actions,
                "{label}: {} actions, expected {want_actions}: {:?}",
                p.actions.len(),
                p.actions
                    .iter()
                    .take(3)
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
            );
            actions = p.actions.len();
        }
        let (m, p90) = med_p90(&times).context("no plan samples")?;
        println!(
            "op={label} domains={n} runs={} actions={actions} median_ms={} p90_ms={} per_domain_us={}",
            args.plan_runs,
            fmt_ms(m),
            fmt_ms(p90),
            per_item_us(m, n)
        );
        Ok(m)
    };
    ensure!(
        rec.plan(Instant::now(), &desired, &observed).converged(),
        "the host is not converged after defining and starting every VM"
    );
    let plan_median = plan_bench(&desired, 0, "plan-converged")?;

    // 10 % of the VMs asked for another power state (alternately stopped and paused).
    let mut changed = desired.clone();
    let mut n_changed = 0;
    for (i, vm) in changed.iter_mut().enumerate().filter(|(i, _)| i % 10 == 0) {
        vm.power = if (i / 10) % 2 == 0 {
            Power::Stopped
        } else {
            Power::Paused
        };
        n_changed += 1;
    }
    plan_bench(&changed, n_changed, "plan-10pct-power-changed")?;
    let pass = om + plan_median;
    println!(
        "op=pass-converged (observe median + plan median) domains={n} ms={} per_domain_us={}",
        fmt_ms(pass),
        per_item_us(pass, n)
    );
    Ok(())
}
