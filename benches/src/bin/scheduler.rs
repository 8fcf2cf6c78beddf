//! `scheduler`: placements per second of NovaCron's scheduler on one core.
//!
//! Builds a simulated fleet (`--hosts`, default 1,000 and 10,000), then
//! places VMs one after another on a single thread, recording each
//! placement on the fleet like the server does, until `--placements` are
//! made or the fleet is full. A share of the VMs (`--anti-affinity-pct`)
//! belongs to anti-affinity groups (`--groups` of them), another share to
//! affinity groups, some require a label. Prints placements per second for
//! the default candidate limit (64, as the server uses) and for a full scan
//! of every host, and checks the invariants on the result (capacity under
//! the overcommit ratios, anti-affinity held).
//!
//! `cargo build --release -p novacron-bench --bin scheduler && ./target/release/scheduler`

// A benchmark measures real elapsed time by the OS clock: the clock rule
// does not apply.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use clap::Parser;
use novacron_bench::machine_description;
use novacron_server::scheduler::{Host, Mode, Policy, Request, Scheduler, Usage};
use novacron_shared::ids::HostId;

#[derive(Parser, Debug)]
#[command(about = "Placements per second of the NovaCron scheduler on one core")]
struct Args {
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    hosts: Vec<usize>,
    /// Placements to make per run.
    #[arg(long, default_value_t = 100_000)]
    placements: usize,
    /// Share of VMs in anti-affinity groups, percent.
    #[arg(long, default_value_t = 20)]
    anti_affinity_pct: u64,
    /// Number of placement groups.
    #[arg(long, default_value_t = 500)]
    groups: u64,
}

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fleet(n: usize) -> Vec<Host> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 4));
            if rng.next().is_multiple_of(4) {
                labels.insert("ssd".to_string(), "true".to_string());
            }
            Host {
                id: HostId(i as u128 + 1),
                up: !rng.next().is_multiple_of(50),
                cordoned: rng.next().is_multiple_of(100),
                cpus: [32, 64, 96][(rng.next() % 3) as usize],
                memory_mib: [131_072, 262_144, 524_288][(rng.next() % 3) as usize],
                storage_free_mib: 4 << 20,
                labels,
                load: Some((rng.next() % 100) as f64 / 100.0),
                used: Usage::default(),
                groups: HashSet::new(),
                shared_storage: None,
                disk_locks: None,
            }
        })
        .collect()
}

fn requests(n: usize, args: &Args) -> Vec<(Request, Option<String>)> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            let roll = rng.next() % 100;
            let group = format!("g{}", rng.next() % args.groups.max(1));
            let mut r = Request {
                vcpus: [1, 2, 4, 8][(rng.next() % 4) as usize],
                memory_mib: [1024, 2048, 4096, 8192, 16384][(rng.next() % 5) as usize],
                storage_mib: [10_240, 20_480, 51_200][(rng.next() % 3) as usize],
                ..Request::default()
            };
            if rng.next().is_multiple_of(10) {
                r.required_labels.insert("ssd".into(), "true".into());
            }
            let g = if roll < args.anti_affinity_pct {
                r.anti_affinity = Some(group.clone());
                Some(group)
            } else if roll < args.anti_affinity_pct + 10 {
                r.affinity = Some(group.clone());
                Some(group)
            } else {
                None
            };
            (r, g)
        })
        .collect()
}

fn run(hosts: usize, limit: usize, mode: Mode, args: &Args) {
    let mut fleet = fleet(hosts);
    let index: HashMap<HostId, usize> = fleet.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
    let reqs = requests(args.placements, args);
    let policy = Policy {
        mode,
        candidate_limit: limit,
        ..Policy::default()
    };
    let mut s = Scheduler::default();
    let (mut placed, mut refused) = (0usize, 0usize);
    let mut anti_seen: HashSet<(HostId, String)> = HashSet::new();
    let start = Instant::now();
    for (r, g) in &reqs {
        match s.place(&policy, &fleet, r) {
            Ok(id) => {
                placed += 1;
                if let Some(a) = &r.anti_affinity {
                    assert!(anti_seen.insert((id, a.clone())), "anti-affinity broken");
                }
                let h = &mut fleet[index[&id]];
                h.used.vcpus += r.vcpus;
                h.used.memory_mib += r.memory_mib;
                h.used.storage_mib += r.storage_mib;
                if let Some(g) = g {
                    h.groups.insert(g.clone());
                }
            }
            Err(_) => refused += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for h in &fleet {
        assert!(h.used.vcpus as f64 <= f64::from(h.cpus) * policy.cpu_overcommit);
        assert!(h.used.memory_mib as f64 <= h.memory_mib as f64 * policy.memory_overcommit);
    }
    let limit_s = if limit == 0 {
        "all".to_string()
    } else {
        limit.to_string()
    };
    println!(
        "hosts={hosts} mode={mode:?} candidate_limit={limit_s} placements={placed} refused={refused} \
         seconds={secs:.3} placements_per_sec={:.0} us_per_decision={:.2}",
        (placed + refused) as f64 / secs,
        secs * 1e6 / (placed + refused).max(1) as f64
    );
}

fn main() {
    let args = Args::parse();
    println!("machine: {} (one thread)", machine_description());
    println!(
        "workload: {} VMs (1-8 vCPUs, 1-16 GiB, 10-50 GiB disk), {} % anti-affinity and 10 % affinity over {} groups, 10 % need label ssd=true; hosts 32-96 CPUs, 128-512 GiB, 2 % down, 1 % cordoned, cpu overcommit 4, memory 1",
        args.placements, args.anti_affinity_pct, args.groups
    );
    for &n in &args.hosts {
        for (limit, mode) in [(64, Mode::Spread), (64, Mode::Pack), (0, Mode::Spread)] {
            run(n, limit, mode, &args);
        }
    }
}
