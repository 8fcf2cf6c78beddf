//! HA failover figures on the real test bed: host loss → the HA guest
//! running on another host (and → its boot marker on that host's console),
//! over many trials, split into detection, fence wait and restart.
//!
//! Three libvirt hosts in network namespaces with their agents inside
//! them, the server in a namespace of its own on the same bridge, one TCG
//! guest with a qcow2 disk in the directory pool every host shares
//! (`packaging/dev/testbed.sh hosts-up 3 --ha`). Each trial SIGKILLs every
//! process of the host the guest runs on (`testbed.sh host-kill`), times
//! what follows, then boots that host again (`host-revive`), restarts its
//! agent and waits until it returned clean before the next trial.
//!
//! Phases, each from its own clock source (all processes share this
//! machine's wall clock):
//! - detection: loss (just before the SIGKILLs) → the server's log says the
//!   host's lease expired;
//! - fence wait: lease expired → the server's log says the host is fenced
//!   (the wait that guarantees the agent fenced first);
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
use novacron_e2e::{boot_count, domstate, Agent, HaBed, Server};
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    /// Host losses to time.
    #[arg(long, default_value_t = 20)]
    trials: usize,
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

/// One trial's instants (wall clock).
#[derive(Debug, Clone, Copy)]
struct Trial {
    loss: SystemTime,
    expired: SystemTime,
    fenced: SystemTime,
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
        "terms: heartbeat {}, lease {}, fence time {}, mass-failure ratio 0.5; {} trials",
        args.heartbeat, args.lease, args.fence_time, args.trials
    );

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
        &format!(
            "[ha]\nlease = \"{}\"\nfence_time = \"{}\"\nmass_failure_ratio = 0.5\n",
            args.lease, args.fence_time
        ),
    );
    let mut agents = Vec::new();
    let mut consoles = Vec::new();
    for h in &bed.hosts {
        let console = scratch.path().join(format!("console-{}", h.name));
        std::fs::create_dir_all(&console)?;
        Command::new("chmod").arg("0755").arg(&console).status()?;
        let vms = format!(
            "virt_type = \"qemu\"\nconsole_log_dir = \"{}\"\nstorage_path = \"{}\"\nstorage_shared = true",
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
    let ids: Vec<String> = agents.iter().map(|a| a.host_id.clone()).collect();
    let index_of = |host: &str| ids.iter().position(|id| id == host);

    let (status, v) = server.send(
        "POST",
        "/v1/vms",
        &json!({"spec": {
            "name": "bench-ha", "vcpus": 1, "memory_mib": 128, "ha": true,
            "disks": [{"name": "root", "size_mib": 64}],
            "boot": {"kernel": args.guest_dir.join("vmlinuz"), "initrd": args.guest_dir.join("initrd.img"),
                     "cmdline": "console=ttyS0 panic=-1"}
        }}),
    );
    if status != 201 {
        bail!("creating the HA VM failed: {status} {v}");
    }
    let vm = v["vm"]["id"].as_str().context("no VM id")?.to_string();
    let console = |i: usize| consoles[i].join("bench-ha.console.log");
    let host_of = || -> anyhow::Result<Option<usize>> {
        Ok(server.get(&format!("/v1/vms/{vm}"))["host"]
            .as_str()
            .and_then(index_of))
    };
    let mut on = poll("the VM to be placed", Duration::from_secs(30), host_of)?;
    poll("the first boot", trial_timeout, || {
        Ok((boot_count(&console(on)) >= 1).then_some(()))
    })?;

    let mut trials = Vec::new();
    for n in 1..=args.trials {
        let from = on;
        let host_id = agents[from].host_id.clone();
        let boots: Vec<usize> = (0..3).map(|i| boot_count(&console(i))).collect();
        let loss = SystemTime::now();
        bed.kill_host(&bed.hosts[from]);
        let to = poll("the VM to be placed elsewhere", trial_timeout, || {
            Ok(host_of()?.filter(|&i| i != from))
        })?;
        let uri = bed.hosts[to].local_uri.clone();
        let running = poll("the VM to run on its new host", trial_timeout, || {
            Ok((domstate(&uri, &vm).as_deref() == Some("running")).then(SystemTime::now))
        })?;
        let marker = poll("the boot marker on the new host", trial_timeout, || {
            Ok((boot_count(&console(to)) > boots[to]).then(SystemTime::now))
        })?;
        let placed =
            host_line(&server, &vm, &[LOG_RESTARTED], loss).context("no restart line in the server log")?;
        let expired = host_line(&server, &host_id, &[LOG_EXPIRED], loss)
            .with_context(|| format!("no '{LOG_EXPIRED}' line for host {host_id} in the server log"))?;
        let fenced = host_line(&server, &host_id, &[LOG_FENCED], expired)
            .with_context(|| format!("no '{LOG_FENCED}' line for host {host_id} in the server log"))?;
        let t = Trial {
            loss,
            expired,
            fenced,
            placed,
            running,
            marker,
        };
        println!(
            "trial {n:>2}: {} -> {}: detection {}, fence wait {}, placed {}, running {}, marker {}; loss -> running {}, loss -> marker {}",
            bed.hosts[from].name,
            bed.hosts[to].name,
            ms(since(t.loss, t.expired)),
            ms(since(t.expired, t.fenced)),
            ms(since(t.fenced, t.placed)),
            ms(since(t.placed, t.running)),
            ms(since(t.running, t.marker)),
            ms(since(t.loss, t.running)),
            ms(since(t.loss, t.marker)),
        );
        trials.push(t);

        // The lost host boots again, its agent comes back and removes its
        // stale copy; the next trial starts once it holds a lease again.
        bed.revive_host(&bed.hosts[from]);
        agents[from].start(&[]);
        server.wait_connected(&host_id, true);
        let back = bed.hosts[from].local_uri.clone();
        poll("the returning host to drop its copy", trial_timeout, || {
            Ok(domstate(&back, &vm).is_none().then_some(()))
        })?;
        poll("the returning host to hold a lease again", trial_timeout, || {
            Ok(host_line(&server, &host_id, &[LOG_ONLINE], t.fenced).map(|_| ()))
        })?;
        on = to;
    }

    let phase = |name: &str, f: &dyn Fn(&Trial) -> Duration| {
        let s = Summary::of(trials.iter().map(f).collect());
        match s {
            Some(s) => println!("  {name:<28} {s}"),
            None => println!("  {name:<28} no trials"),
        }
    };
    println!("host loss -> HA guest elsewhere, {} trials:", trials.len());
    phase("detection", &|t| since(t.loss, t.expired));
    phase("fence wait", &|t| since(t.expired, t.fenced));
    phase("restart: fenced -> placed", &|t| since(t.fenced, t.placed));
    phase("restart: placed -> running", &|t| since(t.placed, t.running));
    phase("restart: running -> marker", &|t| since(t.running, t.marker));
    phase("loss -> running elsewhere", &|t| since(t.loss, t.running));
    phase("loss -> boot marker", &|t| since(t.loss, t.marker));
    Ok(())
}
