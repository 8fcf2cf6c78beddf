//! HA failover figures on the real test bed: host loss → the HA guest
//! running on another host (and → its boot marker on that host's console),
//! over many trials, split into detection, fence wait and restart, for
//! each guard (`--guard lease | hook | lock`, see [`Guard`]); and with
//! `--outage 60s` the server SIGKILLed for that long with one HA guest on
//! each host: the guests stopped (must be 0), restarted after its return
//! (must be 0), and how long their stamps paused.
//!
//! Three libvirt hosts in network namespaces with their agents inside
//! them, the server in a namespace of its own on the same bridge, one TCG
//! guest with a qcow2 disk in the directory pool every host shares
//! (`packaging/dev/testbed.sh hosts-up 3 --ha`). Each trial SIGKILLs every
//! process of the host the guest runs on (`testbed.sh host-kill`), times
//! what follows, then boots that host again (`host-revive`), restarts its
//! agent and waits until it returned clean before the next trial (with
//! `--guard hook` the trial cuts the host's link instead, and the server's
//! fence hook, the test bed's BMC stand-in, powers it off). The guest
//! stamps its disk (`novacron.stamp=1`); after the trials the stamp checker
//! proves no two copies ever ran and that it booted once per placement.
//!
//! Phases, each from its own clock source (all processes share this
//! machine's wall clock):
//! - detection: loss (just before the SIGKILLs) → the server's log says the
//!   host's lease expired;
//! - fence wait: lease expired → the server's log says the host is fenced
//!   (the wait that guarantees the agent fenced first);
//!   (with the hook: the host confirmed off);
//! - restart: fenced → placed (the server's "restarted elsewhere" log
//!   line), placed → running (libvirt on the new host reports it running,
//!   polled every 50 ms), running → the guest's boot marker on the new
//!   host's console (polled every 50 ms).
//!
//! Terms: the product defaults (1 s heartbeats, 5 s lease, 2 s fence
//! time), except the mass-failure ratio: 0.5, as one host of three is a
//! third of the fleet, above the default 30 % (which would hold).
//!
//! Root, QEMU, libvirt and the test guest needed (`make testbed`); run it
//! alone, not beside the real-libvirt tests (they share the namespaced
//! hosts). `make bench-ha` builds and runs it.

// A benchmark times real processes by the OS clock and waits on them in
// real time: the clock rule does not apply.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use novacron_bench::{machine_description, ms, Summary};
use novacron_e2e::{boot_count, domstate, stamps, Agent, Cut, HaBed, Server};
use serde_json::json;

/// How the fleet guards against two copies, and how a trial loses a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Guard {
    /// `isolation = "self-fence"`: the silent host's agent fences its HA
    /// VMs, the server restarts them after the lease wait. Loss: every
    /// process of the host SIGKILLed.
    Lease,
    /// `isolation = "keep-running"` with the hardware fence hook (the test
    /// bed's BMC stand-in): the server powers the silent host off,
    /// confirms it off and restarts at once. Loss: the host's link cut (it
    /// keeps running until the hook powers it off).
    Hook,
    /// `isolation = "keep-running"` with disk locks: the server restarts
    /// after the lease wait, under the disk lock. Loss: every process of
    /// the host SIGKILLed (its virtlockd, and the lock, with them).
    Lock,
}

#[derive(Parser, Debug)]
struct Args {
    /// Host losses to time.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// The guard under test.
    #[arg(long, value_enum, default_value_t = Guard::Lease)]
    guard: Guard,
    /// Instead of host losses: SIGKILL the server for this long, with one
    /// HA guest on each host, and count the guests stopped and restarted
    /// (the peer witness must keep them all running).
    #[arg(long)]
    outage: Option<String>,
    /// The test guest (kernel and initrd from `testbed.sh guest`).
    #[arg(long, default_value = "/var/tmp/novacron-guest")]
    guest_dir: PathBuf,
    /// Heartbeat interval.
    #[arg(long, default_value = "1s")]
    heartbeat: String,
    /// Lease length.
    #[arg(long, default_value = "5s")]
    lease: String,
    /// Fence time.
    #[arg(long, default_value = "2s")]
    fence_time: String,
    /// Give up on one trial after this long.
    #[arg(long, default_value = "180s")]
    trial_timeout: String,
}

/// The server's log lines the phases end at.
const LOG_EXPIRED: &str = "HA: host lease expired";
const LOG_FENCED: &str = "HA: host is fenced";
const LOG_RESTARTED: &str = "HA VM restarted elsewhere";
const LOG_ONLINE: &str = "HA: host holds its lease again";

/// One trial's instants (wall clock); the server's log lines of a phase
/// may be missing for a guard that skips it.
#[derive(Debug, Clone, Copy)]
struct Trial {
    loss: SystemTime,
    expired: Option<SystemTime>,
    fenced: Option<SystemTime>,
    placed: SystemTime,
    running: SystemTime,
    marker: SystemTime,
}

fn since(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or(Duration::ZERO)
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout`.
fn poll<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The time of the first line of the server's logs naming `id` (a host's
/// or a VM's) with `words`, at or after `after`.
fn host_line(server: &Server, id: &str, words: &[&str], after: SystemTime) -> Option<SystemTime> {
    server
        .logs()
        .lines()
        .filter(|l| l.contains(id) && words.iter().all(|w| l.contains(w)))
        .filter_map(novacron_e2e::log_time)
        .find(|t| *t >= after)
}

/// `packaging/dev/fence-testbed` of this checkout.
fn fence_testbed() -> PathBuf {
    novacron_e2e::testbed().with_file_name("fence-testbed")
}

/// The server's `[ha]` configuration for a guard. Host losses run with
/// the peer witness off and a mass-failure ratio of 0.7: a trial loses a
/// host within a minute of the previous trial's, and two silent hosts of
/// three within the guard's window would hold the server (a ratio above
/// the witness quorum ratio is refused while the witness is on); the
/// outage runs with the witness on (the default) and a ratio of 0.5.
fn server_toml(args: &Args) -> String {
    let ratio = if args.outage.is_some() { "0.5" } else { "0.7" };
    let mut t = format!(
        "[ha]\nlease = \"{}\"\nfence_time = \"{}\"\nmass_failure_ratio = {ratio}\n",
        args.lease, args.fence_time
    );
    match args.guard {
        Guard::Lease => {}
        Guard::Lock => t.push_str("isolation = \"keep-running\"\ndisk_locks = true\n"),
        Guard::Hook => t.push_str(&format!(
            "isolation = \"keep-running\"\n[{FENCE_TABLE}]\ncommand = [\"{}\", \"{{host}}\", \"{{action}}\"]\ntimeout = \"20s\"\nretries = 2\n",
            fence_testbed().display()
        )),
    }
    if args.outage.is_none() {
        t.push_str("[ha.witness]\nenabled = false\n");
    }
    t
}

/// The server's table of the hardware fence hook.
const FENCE_TABLE: &str = "ha.hardware_fence";

/// The bed: three hosts, the server, their agents.
struct Fleet {
    bed: HaBed,
    server: Server,
    agents: Vec<Agent>,
    consoles: Vec<PathBuf>,
    pool: PathBuf,
    guest_dir: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Fleet {
    fn start(args: &Args) -> anyhow::Result<Fleet> {
        let bed = HaBed::up(3);
        let pool = bed.shared_dir("bench-pool-");
        let scratch = tempfile::Builder::new()
            .prefix("nc-ha-bench-")
            .tempdir_in("/var/tmp")?;
        Command::new("chmod").arg("0755").arg(scratch.path()).status()?;
        let server = Server::start_in_netns(
            &bed.server_ns,
            &bed.server_ip,
            &format!("heartbeat_interval = \"{}\"", args.heartbeat),
            &server_toml(args),
        );
        let locks = if args.guard == Guard::Lock {
            "\ndisk_locks = true"
        } else {
            ""
        };
        let mut agents = Vec::new();
        let mut consoles = Vec::new();
        for h in &bed.hosts {
            let console = scratch.path().join(format!("console-{}", h.name));
            std::fs::create_dir_all(&console)?;
            Command::new("chmod").arg("0755").arg(&console).status()?;
            let vms = format!(
                "virt_type = \"qemu\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"\nstorage_shared = true{locks}",
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
        Ok(Fleet {
            bed,
            server,
            agents,
            consoles,
            pool,
            guest_dir: args.guest_dir.clone(),
            _scratch: scratch,
        })
    }

    fn index_of(&self, host: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.host_id == host)
    }

    /// Creates a stamping HA VM with a disk in the shared pool (on host
    /// `on` if given); returns its id.
    fn create(&self, name: &str, on: Option<usize>) -> anyhow::Result<String> {
        let placement = on.map_or_else(|| json!({}), |i| json!({"host": self.agents[i].host_id}));
        let (status, v) = self.server.send(
            "POST",
            "/v1/vms",
            &json!({"spec": {
                "name": name, "vcpus": 1, "memory_mib": 128, "ha": true,
                "disks": [{"name": "root", "size_mib": 64}],
                "boot": {"kernel": self.guest_dir.join("vmlinuz"), "initrd": self.guest_dir.join("initrd.img"),
                         "cmdline": "console=ttyS0 panic=-1 novacron.stamp=1"}
            }, "placement": placement}),
        );
        if status != 201 {
            bail!("creating HA VM {name} failed: {status} {v}");
        }
        Ok(v["vm"]["id"].as_str().context("no VM id")?.to_string())
    }

    fn console(&self, i: usize, name: &str) -> PathBuf {
        self.consoles[i].join(format!("{name}.console.log"))
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.pool.join(format!("{name}.root.qcow2"))
    }

    fn host_of(&self, vm: &str) -> Option<usize> {
        self.server.get(&format!("/v1/vms/{vm}"))["host"]
            .as_str()
            .and_then(|h| self.index_of(h))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let trial_timeout = novacron_shared::duration::parse(&args.trial_timeout)?;
    for f in ["vmlinuz", "initrd.img"] {
        if !args.guest_dir.join(f).exists() {
            bail!(
                "{} is missing: run `packaging/dev/testbed.sh guest {}` (make testbed)",
                args.guest_dir.join(f).display(),
                args.guest_dir.display()
            );
        }
    }
    println!("ha-failover: {}", machine_description());
    println!(
        "guard {:?}; terms: heartbeat {}, lease {}, fence time {}; {}",
        args.guard,
        args.heartbeat,
        args.lease,
        args.fence_time,
        if args.outage.is_some() {
            "mass-failure ratio 0.5, peer witness on"
        } else {
            "mass-failure ratio 0.7, peer witness off"
        }
    );
    let mut f = Fleet::start(&args)?;
    match &args.outage {
        Some(outage) => server_outage(f, novacron_shared::duration::parse(outage)?, trial_timeout),
        None => host_losses(&mut f, &args, trial_timeout),
    }
}

/// `--trials` host losses, each timed from the loss to the HA guest
/// running (and its boot marker) on another host.
fn host_losses(f: &mut Fleet, args: &Args, trial_timeout: Duration) -> anyhow::Result<()> {
    println!("{} trials of host loss", args.trials);
    let vm = f.create("bench-ha", None)?;
    let mut on = poll("the VM to be placed", Duration::from_secs(30), || {
        Ok(f.host_of(&vm))
    })?;
    poll("the first boot", trial_timeout, || {
        Ok((boot_count(&f.console(on, "bench-ha")) >= 1).then_some(()))
    })?;
    let mut path = vec![on];
    let mut trials = Vec::new();
    for n in 1..=args.trials {
        let from = on;
        // The current boot has stamped (the proof needs one run per boot).
        let disk = f.disk("bench-ha");
        poll("the current boot to stamp", trial_timeout, || {
            Ok(stamps::check_image(&disk)
                .ok()
                .filter(|r| r.boots.len() >= path.len())
                .map(|_| ()))
        })?;
        let lost = f.bed.hosts[from].clone();
        let lost = &lost;
        let host_id = f.agents[from].host_id.clone();
        let boots: Vec<usize> = (0..3).map(|i| boot_count(&f.console(i, "bench-ha"))).collect();
        let loss = SystemTime::now();
        match args.guard {
            Guard::Lease | Guard::Lock => f.bed.kill_host(lost),
            Guard::Hook => f.bed.cut(lost, Cut::Drop),
        }
        let to = poll("the VM to be placed elsewhere", trial_timeout, || {
            Ok(f.host_of(&vm).filter(|&i| i != from))
        })?;
        let uri = f.bed.hosts[to].local_uri.clone();
        let running = poll("the VM to run on its new host", trial_timeout, || {
            Ok((domstate(&uri, &vm).as_deref() == Some("running")).then(SystemTime::now))
        })?;
        let marker = poll("the boot marker on the new host", trial_timeout, || {
            Ok((boot_count(&f.console(to, "bench-ha")) > boots[to]).then(SystemTime::now))
        })?;
        let placed =
            host_line(&f.server, &vm, &[LOG_RESTARTED], loss).context("no restart line in the server log")?;
        let expired = host_line(&f.server, &host_id, &[LOG_EXPIRED], loss);
        let fenced = host_line(&f.server, &host_id, &[LOG_FENCED], loss);
        let t = Trial {
            loss,
            expired,
            fenced,
            placed,
            running,
            marker,
        };
        let opt = |a: Option<SystemTime>, b: Option<SystemTime>| match (a, b) {
            (Some(a), Some(b)) => ms(since(a, b)),
            _ => "-".to_string(),
        };
        println!(
            "trial {n:>2}: {} -> {}: detection {}, fence wait {}, placed {}, running {}, marker {}; loss -> running {}, loss -> marker {}",
            lost.name,
            f.bed.hosts[to].name,
            opt(Some(t.loss), t.expired),
            opt(t.expired, t.fenced),
            opt(t.fenced, Some(t.placed)),
            ms(since(t.placed, t.running)),
            ms(since(t.running, t.marker)),
            ms(since(t.loss, t.running)),
            ms(since(t.loss, t.marker)),
        );
        trials.push(t);
        path.push(to);

        if args.guard == Guard::Hook {
            // The hook powered the cut host off; its link comes back with
            // nothing on it, then the BMC powers it on.
            if !f.bed.pids(lost).is_empty() {
                bail!(
                    "the hook restarted the VM while {} still runs processes",
                    lost.name
                );
            }
            f.bed.restore(lost);
        }
        // The lost host boots again, its agent comes back and removes its
        // stale copy; the next trial starts once it holds a lease again.
        f.bed.revive_host(lost);
        f.agents[from].start(&[]);
        f.server.wait_connected(&host_id, true);
        let back = lost.local_uri.clone();
        poll("the returning host to drop its copy", trial_timeout, || {
            Ok(domstate(&back, &vm).is_none().then_some(()))
        })?;
        poll("the returning host to hold a lease again", trial_timeout, || {
            Ok(host_line(&f.server, &host_id, &[LOG_ONLINE], t.placed).map(|_| ()))
        })?;
        on = to;
    }

    let phase = |name: &str, f: &dyn Fn(&Trial) -> Option<Duration>| match Summary::of(
        trials.iter().filter_map(f).collect(),
    ) {
        Some(s) => println!("  {name:<28} {s}"),
        None => println!("  {name:<28} (not logged for this guard)"),
    };
    println!(
        "host loss -> HA guest elsewhere, guard {:?}, {} trials:",
        args.guard,
        trials.len()
    );
    phase("detection", &|t| t.expired.map(|e| since(t.loss, e)));
    phase("fence wait", &|t| Some(since(t.expired?, t.fenced?)));
    phase("restart: fenced -> placed", &|t| {
        t.fenced.map(|x| since(x, t.placed))
    });
    phase("restart: placed -> running", &|t| {
        Some(since(t.placed, t.running))
    });
    phase("restart: running -> marker", &|t| {
        Some(since(t.running, t.marker))
    });
    phase("loss -> running elsewhere", &|t| Some(since(t.loss, t.running)));
    phase("loss -> boot marker", &|t| Some(since(t.loss, t.marker)));

    // The proof that no two copies ever ran: one boot per placement, in order.
    let r = stamps::check_image(&f.disk("bench-ha")).map_err(|e| anyhow::anyhow!("stamp check: {e}"))?;
    let want: Vec<&str> = path.iter().map(|&i| f.bed.hosts[i].name.as_str()).collect();
    if r.hosts() != want {
        bail!(
            "the stamps show boots on {:?}, the trials moved it along {want:?}",
            r.hosts()
        );
    }
    let gaps = Summary::of(
        r.gaps_between_boots_ms()
            .into_iter()
            .map(|g| Duration::from_millis(g.max(0) as u64))
            .collect(),
    );
    println!(
        "stamps: {} boots, no interleave; largest gap within a boot {} ms; last stamp -> first stamp elsewhere (guest clocks, ±1 s): {}",
        r.boots.len(),
        r.max_gap_ms(),
        gaps.map_or_else(|| "-".to_string(), |s| s.to_string())
    );
    Ok(())
}

/// The server SIGKILLed for `outage` with one HA guest on each host: how
/// many guests stopped (must be 0), how many were restarted after the
/// server came back (must be 0), and the longest pause of their stamps.
fn server_outage(mut f: Fleet, outage: Duration, trial_timeout: Duration) -> anyhow::Result<()> {
    let names: Vec<String> = (0..3).map(|i| format!("bench-out-{}", i + 1)).collect();
    let mut vms = Vec::new();
    for (i, n) in names.iter().enumerate() {
        vms.push(f.create(n, Some(i))?);
    }
    for (i, n) in names.iter().enumerate() {
        poll(&format!("{n} to boot"), trial_timeout, || {
            Ok((boot_count(&f.console(i, n)) >= 1).then_some(()))
        })?;
        let disk = f.disk(n);
        poll(&format!("{n} to stamp"), trial_timeout, || {
            Ok(stamps::read_image(&disk)
                .ok()
                .is_some_and(|img| stamps::used_slots(&img) >= 10)
                .then_some(()))
        })?;
    }
    let from_slot: Vec<usize> = names
        .iter()
        .map(|n| stamps::read_image(&f.disk(n)).map(|img| stamps::used_slots(&img)))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("server outage of {}: 3 HA guests, one per host", ms(outage));
    let killed = SystemTime::now();
    f.server.kill9();
    let mut stopped = std::collections::BTreeSet::new();
    let end = Instant::now() + outage;
    while Instant::now() < end {
        for (i, vm) in vms.iter().enumerate() {
            if domstate(&f.bed.hosts[i].local_uri, vm).as_deref() != Some("running") {
                stopped.insert(names[i].clone());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f.server.restart();
    for a in &f.agents {
        f.server.wait_connected(&a.host_id, true);
    }
    // A while after the return: nothing restarted, nothing moved.
    let watch = Instant::now() + Duration::from_secs(20);
    while Instant::now() < watch {
        for (i, vm) in vms.iter().enumerate() {
            if domstate(&f.bed.hosts[i].local_uri, vm).as_deref() != Some("running") {
                stopped.insert(names[i].clone());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let restarted = vms
        .iter()
        .filter(|vm| host_line(&f.server, vm, &[LOG_RESTARTED], killed).is_some())
        .count();
    println!("  HA guests stopped: {} {:?}", stopped.len(), stopped);
    println!("  HA guests restarted after the server came back: {restarted}");
    for (i, n) in names.iter().enumerate() {
        let img = stamps::read_image(&f.disk(n)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let r = stamps::check(&img).map_err(|e| anyhow::anyhow!("stamp check of {n}: {e}"))?;
        println!(
            "  {n} on {}: {} boot(s), {} stamps during and after the outage, largest stamp gap then {} ms",
            f.bed.hosts[i].name,
            r.boots.len(),
            stamps::used_slots(&img) - from_slot[i],
            stamps::largest_gap_from(&img, from_slot[i])
        );
    }
    Ok(())
}
