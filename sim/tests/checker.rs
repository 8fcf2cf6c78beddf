//! The checker can fail: runs built to break one property each are caught.

use novacron_sim::{run, Config, Fault, Profile, Timed};

#[test]
fn a_silence_past_the_tolerance_in_a_benign_run_is_reported() {
    let mut cfg = Config::base(11, 4);
    cfg.profile = Profile::Benign;
    cfg.duration_ms = 30_000;
    cfg.faults.push(Timed {
        at_ms: 5_000,
        fault: Fault::Partition {
            host: 0,
            for_ms: 9_000,
        },
    });
    assert!(!cfg.faults[0].fault.within_tolerance(&cfg));
    let out = run(cfg);
    let v = out
        .violation
        .expect("a 9 s partition fences: the benign check must say so");
    assert!(v.contains("within tolerance"), "{v}");
}

#[test]
fn the_same_silence_within_the_tolerance_is_quiet() {
    let mut cfg = Config::base(11, 4);
    cfg.profile = Profile::Benign;
    cfg.duration_ms = 30_000;
    let tol = cfg.tolerance().as_millis() as u64;
    cfg.faults.push(Timed {
        at_ms: 5_000,
        fault: Fault::Partition { host: 0, for_ms: tol },
    });
    assert!(cfg.faults[0].fault.within_tolerance(&cfg));
    let out = run(cfg);
    assert_eq!(out.violation, None, "{:?}", out.log);
    assert_eq!((out.stats.fences, out.stats.restarts), (0, 0));
}

#[test]
fn a_lost_host_whose_vms_cannot_fit_anywhere_breaks_the_recovery_bound() {
    // Every host full: the restarts find no fit, so the HA VMs of the lost
    // host do not run again within the bound, and the check says so.
    let mut cfg = Config::base(12, 4);
    cfg.profile = Profile::HostLoss;
    cfg.host_memory_mib = 2 * 1024;
    cfg.ha_vms = 8;
    cfg.plain_vms = 0;
    cfg.duration_ms = 30_000;
    cfg.faults.push(Timed {
        at_ms: 5_000,
        fault: Fault::HostCrash {
            host: 0,
            reboot_ms: None,
        },
    });
    let out = run(cfg);
    let v = out.violation.expect("no capacity: the bound cannot hold");
    assert!(v.contains("not running again within"), "{v}");
    assert!(
        out.log.iter().any(|l| l.contains("waits: no host fits")),
        "{:?}",
        out.log
    );
}

#[test]
fn with_capacity_the_lost_hosts_vms_run_again_within_the_bound() {
    let mut cfg = Config::base(12, 4);
    cfg.profile = Profile::HostLoss;
    cfg.ha_vms = 8;
    cfg.plain_vms = 0;
    cfg.duration_ms = 30_000;
    cfg.faults.push(Timed {
        at_ms: 5_000,
        fault: Fault::HostCrash {
            host: 0,
            reboot_ms: None,
        },
    });
    let out = run(cfg);
    assert_eq!(out.violation, None, "{:?}", out.log);
    assert_eq!(out.stats.restarts, 2);
    assert_eq!(out.stats.checks.recovery, 2);
    let bound = Config::base(12, 4).recovery_bound().as_millis() as u64;
    assert_eq!(out.recoveries_ms.len(), 2);
    assert!(
        out.recoveries_ms.iter().all(|ms| *ms <= bound),
        "{:?}",
        out.recoveries_ms
    );
}
