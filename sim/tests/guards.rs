//! The HA guards of issue 13 and the rules they rest on: each broken on
//! purpose must fail the checker, and the same run with the rule intact
//! must not.

use novacron_shared::protocol::IsolationResponse;
use novacron_shared::witness::{self, LOSS_SKEW};
use novacron_sim::{run, Bmc, Config, Fault, Outcome, Profile, Timed, Way};

fn at(at_ms: u64, fault: Fault) -> Timed {
    Timed { at_ms, fault }
}

fn unsafe_restart(out: &Outcome) -> bool {
    out.violations
        .iter()
        .any(|v| v.contains("runs twice") || v.contains("can still run it"))
}

/// Two hosts cut from the server (not from their peers) far apart in
/// time: the first long before the second, more than the guard's window.
fn far_apart(seed: u64) -> Config {
    let mut cfg = Config::base(seed, 3);
    cfg.ha_vms = 3;
    cfg.plain_vms = 0;
    cfg.duration_ms = 120_000;
    cfg.keep_going = true;
    cfg.faults = vec![
        at(
            5_000,
            Fault::Partition {
                host: 0,
                for_ms: 200_000,
            },
        ),
        at(
            80_000,
            Fault::Partition {
                host: 1,
                for_ms: 100_000,
            },
        ),
    ];
    cfg
}

#[test]
fn a_witness_counting_a_loss_that_began_outside_the_skew_is_caught() {
    // The second host's only lost peer lost the server 75 s before it:
    // an independent failure the guard (window 60 s) does not hold for.
    assert!(75_000 > LOSS_SKEW.as_millis() as u64);
    let good = run(far_apart(1));
    assert_eq!(good.violation, None, "{:#?}", good.log);
    assert!(
        good.log.iter().any(|l| l.contains("h2 cannot confirm: fences")),
        "{:#?}",
        good.log
    );
    let mut cfg = far_apart(1);
    cfg.broken.witness_ignores_skew = true;
    let bad = run(cfg);
    assert!(unsafe_restart(&bad), "{:#?}\n{:#?}", bad.violations, bad.log);
    assert!(
        bad.log.iter().any(|l| l.contains("h2 peers confirm")),
        "{:#?}",
        bad.log
    );
}

/// Two of five hosts cut from the server, not from each other, with the
/// highest guard share the server accepts with the witness on (0.5): the
/// guard does not hold for two of five.
fn two_of_five(seed: u64) -> Config {
    let mut cfg = Config::base(seed, 5);
    cfg.ha_vms = 5;
    cfg.plain_vms = 0;
    cfg.duration_ms = 40_000;
    cfg.keep_going = true;
    cfg.mass_failure_ratio = witness::WITNESS_QUORUM_RATIO;
    cfg.faults = vec![at(
        5_000,
        Fault::Split {
            hosts: vec![0, 1],
            for_ms: 30_000,
            way: Way::Both,
        },
    )];
    cfg
}

#[test]
fn a_quorum_of_one_in_a_fleet_of_five_is_caught() {
    assert_eq!(witness::quorum(5), 2);
    let good = run(two_of_five(2));
    assert_eq!(good.violation, None, "{:#?}", good.log);
    assert!(
        good.stats.restarts >= 2 && good.stats.fences >= 2,
        "{:?}",
        good.stats
    );
    let mut cfg = two_of_five(2);
    cfg.broken.quorum_of_one = true;
    let bad = run(cfg);
    assert!(unsafe_restart(&bad), "{:#?}\n{:#?}", bad.violations, bad.log);
}

/// One host's link cut for 30 s in keep-running.
fn keep_running_cut(seed: u64, disk_locks: bool) -> Config {
    let mut cfg = Config::base(seed, 4);
    cfg.ha_vms = 4;
    cfg.plain_vms = 0;
    cfg.duration_ms = 60_000;
    cfg.keep_going = true;
    cfg.isolation = IsolationResponse::KeepRunning;
    cfg.disk_locks = disk_locks;
    cfg.faults = vec![at(
        5_000,
        Fault::Partition {
            host: 0,
            for_ms: 30_000,
        },
    )];
    cfg
}

#[test]
fn keep_running_without_disk_locks_is_caught_running_a_vm_twice() {
    let good = run(keep_running_cut(3, true));
    assert_eq!(good.violation, None, "{:#?}", good.log);
    assert_eq!(good.stats.fences, 0);
    assert!(good.stats.lock_refusals > 0, "{:?}", good.stats);
    // The server refuses keep-running without locks or a hardware fence:
    // with neither it restarts nothing...
    let refused = run(keep_running_cut(3, false));
    assert_eq!(refused.violation, None, "{:#?}", refused.log);
    assert_eq!(refused.stats.restarts, 0);
    // ...and run as if locks guarded the disks while none do, it runs
    // the VM twice.
    let mut cfg = keep_running_cut(3, false);
    cfg.broken.locks_assumed = true;
    let bad = run(cfg);
    assert!(
        bad.violations.iter().any(|v| v.contains("runs twice")),
        "{:#?}\n{:#?}",
        bad.violations,
        bad.log
    );
}

/// The server down for 60 s over three hosts.
fn outage(seed: u64) -> Config {
    let mut cfg = Config::base(seed, 3);
    cfg.ha_vms = 3;
    cfg.plain_vms = 0;
    cfg.duration_ms = 90_000;
    cfg.profile = Profile::Outage;
    cfg.faults = vec![at(5_000, Fault::ServerCrash { for_ms: 60_000 })];
    cfg
}

#[test]
fn without_the_witness_grace_the_first_lease_to_end_in_an_outage_fences() {
    // Leases end up to a heartbeat apart: the first host to lose its
    // lease finds no peer lost yet. Over a few seeds, one such fence at
    // least; with the grace, none.
    let mut caught = 0;
    for seed in 0..20 {
        assert_eq!(run(outage(seed)).violation, None, "seed {seed}");
        let mut cfg = outage(seed);
        cfg.witness_grace = std::time::Duration::ZERO;
        let out = run(cfg);
        if out
            .violation
            .as_deref()
            .is_some_and(|v| v.contains("a server outage fenced"))
        {
            caught += 1;
        }
    }
    assert!(caught > 0);
}

#[test]
fn without_the_witness_a_long_outage_fences_every_host() {
    let mut cfg = outage(4);
    cfg.witness = false;
    let out = run(cfg);
    let v = out.violation.expect("every agent fences without the witness");
    assert!(v.contains("a server outage fenced"), "{v}");
}

/// Every host's acks lost for 10 s (their leases end, they confirm each
/// other, the server hears them report no lease), one of them cut off
/// altogether meanwhile: the others regain their leases, its confirmation
/// lapses, and it fences only then.
fn acks_lost_then_cut(seed: u64) -> Config {
    let mut cfg = Config::base(seed, 5);
    cfg.ha_vms = 5;
    cfg.plain_vms = 0;
    cfg.duration_ms = 50_000;
    cfg.keep_going = true;
    cfg.faults = vec![
        at(
            5_000,
            Fault::Split {
                hosts: vec![0, 1, 2, 3, 4],
                for_ms: 10_000,
                way: Way::Down,
            },
        ),
        at(
            10_500,
            Fault::Partition {
                host: 2,
                for_ms: 15_000,
            },
        ),
    ];
    cfg
}

#[test]
fn a_guard_without_the_memory_is_caught() {
    let good = run(acks_lost_then_cut(5));
    assert_eq!(good.violation, None, "{:#?}", good.log);
    assert!(
        good.log.iter().any(|l| l.contains("h3 peers confirm")),
        "{:#?}",
        good.log
    );
    let mut cfg = acks_lost_then_cut(5);
    cfg.broken.guard_without_memory = true;
    let bad = run(cfg);
    assert!(unsafe_restart(&bad), "{:#?}\n{:#?}", bad.violations, bad.log);
}

/// Keep-running with a hardware fence and no disk locks; host 1's BMC
/// lies (its `off` does nothing, its next `status` says off).
fn lying_bmc(seed: u64) -> Config {
    let mut cfg = Config::base(seed, 4);
    cfg.ha_vms = 4;
    cfg.plain_vms = 0;
    cfg.duration_ms = 50_000;
    cfg.keep_going = true;
    cfg.isolation = IsolationResponse::KeepRunning;
    cfg.hw_fence = true;
    cfg.bmc = vec![Bmc::Lies];
    cfg.faults = vec![at(
        5_000,
        Fault::Partition {
            host: 0,
            for_ms: 30_000,
        },
    )];
    cfg
}

#[test]
fn a_lying_fence_trusted_after_one_confirmation_is_caught() {
    let good = run(lying_bmc(6));
    assert_eq!(good.violation, None, "{:#?}", good.log);
    assert_eq!(good.stats.restarts, 0);
    assert!(good.stats.fence_failures > 0, "{:?}", good.stats);
    let mut cfg = lying_bmc(6);
    cfg.broken.fence_trusts_one_confirmation = true;
    let bad = run(cfg);
    assert!(unsafe_restart(&bad), "{:#?}\n{:#?}", bad.violations, bad.log);
}
