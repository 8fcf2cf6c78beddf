//! `ha-sim`: runs the HA simulation over many seeds (or one, with its log,
//! or a scenario file) and prints seeds run, steps per second and the
//! invariant checks made. `--broken-server-lease-ms` runs the broken
//! variant (the server's wait computed for a shorter lease than agents
//! hold), which must fail.

use std::path::PathBuf;
use std::process::ExitCode;

use novacron_shared::clock::Clock;
use novacron_sim::scenario::Scenario;
use novacron_sim::{report, run, Config, Stats};

const USAGE: &str = "usage: ha-sim [--seeds N] [--from S] [--broken-server-lease-ms MS] | --seed S [--log] | --scenario FILE [--print]";

/// An error with its causes, one per line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!("\n  caused by: {c}"));
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 10_000u64;
    let mut from = 0u64;
    let mut one: Option<u64> = None;
    let mut scenario: Option<PathBuf> = None;
    let mut log = false;
    let mut broken: Option<u64> = None;
    let mut grace: Option<u64> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Option<u64> {
            let v = it.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{name} needs a number\n{USAGE}");
            }
            v
        };
        match a.as_str() {
            "--seeds" => match num("--seeds") {
                Some(n) => seeds = n,
                None => return ExitCode::from(2),
            },
            "--from" => match num("--from") {
                Some(n) => from = n,
                None => return ExitCode::from(2),
            },
            "--seed" => match num("--seed") {
                Some(n) => one = Some(n),
                None => return ExitCode::from(2),
            },
            "--broken-server-lease-ms" => match num("--broken-server-lease-ms") {
                Some(n) => broken = Some(n),
                None => return ExitCode::from(2),
            },
            "--witness-grace-ms" => match num("--witness-grace-ms") {
                Some(n) => grace = Some(n),
                None => return ExitCode::from(2),
            },
            "--scenario" => scenario = it.next().map(PathBuf::from),
            "--log" | "--print" => log = true,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = scenario {
        let sc = match Scenario::load(&path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{}", chain(&e));
                return ExitCode::FAILURE;
            }
        };
        if log {
            match sc.run() {
                Ok(out) => {
                    for l in &out.log {
                        println!("{l:?},");
                    }
                    println!("# violation: {:?}", out.violation);
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    eprintln!("{}", chain(&e));
                    return ExitCode::FAILURE;
                }
            }
        }
        return match sc.check() {
            Ok(_) => {
                println!("scenario {:?}: ok", sc.name);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}", chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let plan = |seed: u64| {
        let mut cfg = Config::random(seed);
        if let Some(ms) = grace {
            cfg.witness_grace = std::time::Duration::from_millis(ms);
        }
        match broken {
            Some(ms) => cfg.with_server_lease(std::time::Duration::from_millis(ms)),
            None => cfg,
        }
    };
    if let Some(seed) = one {
        let cfg = plan(seed);
        let out = run(cfg.clone());
        if log {
            println!("{cfg:#?}");
            for l in &out.log {
                println!("{l}");
            }
        }
        println!("{}", report(&cfg, &out));
        return if out.violation.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let clock = Clock::system();
    let started = clock.now();
    let mut total = Stats::default();
    let mut failed = 0u64;
    let mut double_runs = 0u64;
    let mut recoveries: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let mut profiles: std::collections::BTreeMap<String, u64> = Default::default();
    for seed in from..from + seeds {
        let cfg = plan(seed);
        let out = run(cfg.clone());
        total.steps += out.stats.steps;
        total.checks.add(&out.stats.checks);
        recoveries
            .entry(cfg.guard_name())
            .or_default()
            .extend(&out.recoveries_ms);
        *profiles.entry(format!("{:?}", cfg.profile)).or_default() += 1;
        total.guard_kills += out.stats.guard_kills;
        total.rounds += out.stats.rounds;
        total.witness_holds += out.stats.witness_holds;
        total.lock_refusals += out.stats.lock_refusals;
        total.restarts += out.stats.restarts;
        total.fences += out.stats.fences;
        if out.violation.is_some() {
            failed += 1;
            if out.violations.iter().any(|v| v.contains("runs twice")) {
                double_runs += 1;
            }
            if broken.is_none() {
                eprintln!("{}", report(&cfg, &out));
            }
        }
    }
    let secs = clock.since(started).as_secs_f64().max(1e-9);
    println!(
        "seeds run: {seeds} (from {from}), failed: {failed} (with a double run: {double_runs})\nprofiles: {profiles:?}\nsteps: {} ({:.0} steps/s, {:.1} s)\ninvariant checks: {} ({:?})\nrestarts: {}, agent fences: {}, fence-guard kills: {}\nwitness rounds: {}, HA VMs kept on a confirmation: {} hosts, starts refused at the disk lock: {}",
        total.steps,
        total.steps as f64 / secs,
        secs,
        total.checks.total(),
        total.checks,
        total.restarts,
        total.fences,
        total.guard_kills,
        total.rounds,
        total.witness_holds,
        total.lock_refusals
    );
    for (guard, r) in &mut recoveries {
        r.sort_unstable();
        if r.is_empty() {
            continue;
        }
        let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
        println!(
            "host loss -> HA VM running again, by {guard} ({} VMs): median {} ms, p99 {} ms, max {} ms (bound {} ms)",
            r.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            Config::base(0, 4).recovery_bound().as_millis()
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
