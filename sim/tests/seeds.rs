//! The random seeds CI runs, and the broken variant the checker must catch.

use std::time::Duration;

use novacron_sim::{report, run, Broken, Config, Profile};

/// Seeds CI runs (split over two tests so both cores work).
const SEEDS: u64 = 10_000;

fn run_range(from: u64, to: u64) {
    let mut failures = Vec::new();
    let mut profiles = [0u64; 4];
    for seed in from..to {
        let cfg = Config::random(seed);
        profiles[match cfg.profile {
            Profile::Benign => 0,
            Profile::HostLoss => 1,
            Profile::Chaos => 2,
            Profile::Outage => 3,
        }] += 1;
        if cfg.profile == Profile::Outage {
            assert!(
                cfg.witness && cfg.faults.iter().all(|f| f.fault.is_outage(&cfg)),
                "seed {seed}: an outage plan with another fault: {:?}",
                cfg.faults
            );
        }
        let out = run(cfg.clone());
        assert!(out.stats.steps > 100, "seed {seed} barely ran: {:?}", out.stats);
        if out.violation.is_some() {
            failures.push(report(&cfg, &out));
        }
    }
    assert!(
        profiles.iter().all(|n| *n > 0),
        "every profile drawn: {profiles:?}"
    );
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_first_half_of_the_ci_seeds_keep_every_invariant() {
    run_range(0, SEEDS / 2);
}

#[test]
fn the_second_half_of_the_ci_seeds_keep_every_invariant() {
    run_range(SEEDS / 2, SEEDS);
}

#[test]
fn one_seed_reproduces_one_run() {
    for seed in [3, 77, 1234] {
        let a = run(Config::random(seed));
        let b = run(Config::random(seed));
        assert_eq!(a.log, b.log);
        assert_eq!(a.stats, b.stats);
        assert_eq!(a.violation, b.violation);
    }
}

#[test]
fn a_server_waiting_for_a_shorter_lease_than_agents_hold_is_caught_running_a_vm_twice() {
    // The margin broken on purpose: W computed for a 2 s lease while the
    // agents hold 5 s. Within the CI seed count the checker must find a
    // double run (or a restart while the old host could still run the VM).
    let mut found = None;
    for seed in 0..SEEDS {
        let cfg = Config::random(seed).with_server_lease(Duration::from_secs(2));
        let out = run(cfg);
        if let Some(v) = out.violations.iter().find(|v| v.contains("runs twice")) {
            found = Some((seed, v.clone(), out.violations.clone()));
            break;
        }
    }
    let (seed, v, all) = found.expect("no double run found with a broken margin");
    // The restart that caused it was flagged first, at its decision.
    assert!(all[0].contains("can still run it"), "seed {seed}: {all:?}");
    assert!(v.contains("runs twice"), "seed {seed}: {v}");
}

fn failures(broken: Broken, seeds: u64) -> (u64, u64) {
    let mut failed = 0;
    let mut double = 0;
    for seed in 0..seeds {
        let mut cfg = Config::random(seed);
        cfg.broken = broken;
        cfg.keep_going = true;
        let out = run(cfg);
        if out.violation.is_some() {
            failed += 1;
        }
        if out.violations.iter().any(|v| v.contains("runs twice")) {
            double += 1;
        }
    }
    (failed, double)
}

#[test]
fn withheld_acks_cover_a_lost_push_to_the_old_host() {
    // A restart whose push to the old host is lost: that host keeps a
    // desired state naming the VM at its old epoch. Its acks are withheld
    // until it reconciles to the new one, so it never gets the lease it
    // would need to start that copy...
    let lost_push = Broken {
        skip_old_host_push: true,
        ack_fenced_hosts: false,
        ..Broken::default()
    };
    assert_eq!(failures(lost_push, 1_000), (0, 0));
    // ...and acking it anyway runs the VM twice.
    let also_acked = Broken {
        skip_old_host_push: true,
        ack_fenced_hosts: true,
        ..Broken::default()
    };
    let (failed, double) = failures(also_acked, 1_000);
    assert!(double > 0, "{failed} failed, none ran a VM twice");
}

#[test]
fn the_stated_bounds_follow_from_the_timing() {
    let cfg = Config::base(0, 4);
    // L = 5 s, heartbeat 1 s, delays up to 50 ms: 5000 − 2000 − 200 − 6.
    assert_eq!(cfg.tolerance(), Duration::from_millis(2_700));
    // With the witness on, W is that of the lease plus the 1.5 s grace:
    // 9016 ms (·1.001 → 9026) + 3·50 + 1000 + 3000 (boot) + 100.
    assert!(cfg.witness);
    assert_eq!(cfg.recovery_bound(), Duration::from_millis(13_276));
    // Without it: 7513 ms (·1.001 → 7521) + the same.
    let mut off = cfg.clone();
    off.witness = false;
    assert_eq!(off.recovery_bound(), Duration::from_millis(11_771));
}
