use super::*;
use novacron_shared::clock::Clock;
use novacron_shared::protocol::IsolationResponse;

use HostState::{Fenced, LeaseExpired, Online, Returning};

fn host(id: u128, lease: HostState) -> HostInput {
    HostInput::new(HostId(id), lease, false)
}

fn vm(id: u128, host: u128, ha: bool) -> VmInput {
    VmInput {
        id: VmId(id),
        host: Some(HostId(host)),
        ha,
        priority: 0,
        running: true,
        epoch: 3,
        migrating: false,
        created_ms: id as u64,
    }
}

fn restarts(d: &[Decision]) -> Vec<u128> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Restart { vm, .. } => Some(vm.0),
            _ => None,
        })
        .collect()
}

fn start(
    n: u128,
) -> (
    Controller,
    Instant,
    std::sync::Arc<novacron_shared::clock::ManualClock>,
) {
    let (clock, manual) = Clock::manual();
    let now = clock.now();
    let c = Controller::new(Policy::default(), (1..=n).map(HostId), now);
    (c, now, manual)
}

#[test]
fn only_a_fenced_hosts_ha_vms_are_restarted_others_are_lost() {
    let (mut c, t, _) = start(3);
    let vms = [vm(1, 1, true), vm(2, 1, false), vm(3, 2, true)];
    let mut hosts = [host(1, Online), host(2, Online), host(3, Online)];
    assert!(c.step(t, &hosts, &vms).is_empty());
    // Lease expired is not enough.
    hosts[0].lease = LeaseExpired;
    assert!(restarts(&c.step(t + Duration::from_secs(6), &hosts, &vms)).is_empty());
    hosts[0].lease = Fenced;
    let d = c.step(t + Duration::from_secs(8), &hosts, &vms);
    assert_eq!(
        d,
        vec![
            Decision::Lost {
                vm: VmId(2),
                host: HostId(1)
            },
            Decision::Restart {
                vm: VmId(1),
                from: HostId(1),
                epoch: 3
            },
        ]
    );
    // Not proposed twice while in flight; lost reported once.
    assert!(c.step(t + Duration::from_secs(9), &hosts, &vms).is_empty());
    assert_eq!(c.vms()[&VmId(1)].waiting, Some(Waiting::Restarting));
    assert_eq!(c.vms()[&VmId(2)].waiting, None);
}

#[test]
fn restarts_go_by_priority_then_age() {
    let (mut c, t, _) = start(2);
    let mut a = vm(10, 1, true);
    a.created_ms = 1;
    let mut b = vm(11, 1, true);
    b.priority = 9;
    b.created_ms = 5;
    let mut d = vm(12, 1, true);
    d.created_ms = 0;
    let hosts = [host(1, Fenced), host(2, Online)];
    let got = restarts(&c.step(t, &hosts, &[a, b, d]));
    assert_eq!(got, [11, 12, 10]);
}

#[test]
fn no_fit_waits_and_is_retried_after_the_retry_time() {
    let (mut c, t, _) = start(2);
    let vms = [vm(1, 1, true)];
    let hosts = [host(1, Fenced), host(2, Online)];
    assert_eq!(restarts(&c.step(t, &hosts, &vms)), [1]);
    c.restart_failed(VmId(1), t, "exhausted memory on 1 host".into());
    let w = &c.vms()[&VmId(1)];
    assert!(matches!(&w.waiting, Some(Waiting::NoFit { why, .. }) if why.contains("memory")));
    assert!(w
        .waiting
        .as_ref()
        .unwrap()
        .describe(t)
        .contains("trying again in 5s"));
    assert_eq!(c.next_wakeup(), Some(t + Policy::default().retry));
    let early = t + Policy::default().retry - Duration::from_millis(1);
    assert!(restarts(&c.step(early, &hosts, &vms)).is_empty());
    assert_eq!(restarts(&c.step(t + Policy::default().retry, &hosts, &vms)), [1]);
    c.restart_done(VmId(1));
    assert!(!c.vms().contains_key(&VmId(1)));
}

#[test]
fn migrating_vms_and_disabled_ha_wait() {
    let (mut c, t, _) = start(2);
    let mut m = vm(1, 1, true);
    m.migrating = true;
    let hosts = [host(1, Fenced), host(2, Online)];
    assert!(restarts(&c.step(t, &hosts, &[m])).is_empty());
    assert_eq!(c.vms()[&VmId(1)].waiting, Some(Waiting::Migrating));

    let (clock, _) = Clock::manual();
    let now = clock.now();
    let mut off = Controller::new(
        Policy {
            enabled: false,
            ..Policy::default()
        },
        [HostId(1), HostId(2)],
        now,
    );
    assert!(restarts(&off.step(now, &hosts, &[vm(1, 1, true)])).is_empty());
    assert_eq!(off.vms()[&VmId(1)].waiting, Some(Waiting::Disabled));
}

#[test]
fn held_means_no_restarts_until_released() {
    let (mut c, t, _) = start(3);
    let vms = [vm(1, 1, true), vm(2, 2, true)];
    c.step(t, &[host(1, Online), host(2, Online), host(3, Online)], &vms);
    let hosts = [host(1, Fenced), host(2, Fenced), host(3, Online)];
    let d = c.step(t + Duration::from_secs(8), &hosts, &vms);
    assert!(d.contains(&Decision::Held {
        silent: 2,
        monitored: 3
    }));
    assert!(restarts(&d).is_empty(), "{d:?}");
    assert_eq!(c.vms()[&VmId(1)].waiting, Some(Waiting::Held));
    assert!(restarts(&c.step(t + Duration::from_secs(600), &hosts, &vms)).is_empty());
    assert_eq!(c.release(&hosts), Some(Decision::Released { by_operator: true }));
    assert_eq!(
        restarts(&c.step(t + Duration::from_secs(601), &hosts, &vms)),
        [1, 2]
    );
}

#[test]
fn a_returning_host_is_clean_only_when_reconciled_and_no_restart_is_in_flight() {
    let (mut c, t, _) = start(2);
    let vms = [vm(1, 1, true), vm(2, 1, true)];
    let mut hosts = [host(1, Fenced), host(2, Online)];
    assert_eq!(restarts(&c.step(t, &hosts, &vms)), [1, 2]);
    c.restart_done(VmId(1));
    // VM 1 moved; VM 2's restart is still in flight when host 1 returns.
    let vms = [vm(1, 2, true), vm(2, 1, true)];
    hosts[0] = HostInput::new(HostId(1), Returning, true);
    let d = c.step(t + Duration::from_secs(1), &hosts, &vms);
    assert!(!d.contains(&Decision::ReturnedClean { host: HostId(1) }), "{d:?}");
    c.restart_failed(VmId(2), t + Duration::from_secs(1), "changed".into());
    let d = c.step(t + Duration::from_secs(2), &hosts, &vms);
    assert_eq!(d, vec![Decision::ReturnedClean { host: HostId(1) }]);
    // Reported once; VM 2 stays on the host that came back.
    assert!(c.step(t + Duration::from_secs(3), &hosts, &vms).is_empty());
    assert!(c.vms().is_empty());
    // Not reconciled: not clean.
    let (mut c, t, _) = start(2);
    let d = c.step(t, &[host(1, Returning), host(2, Online)], &[]);
    assert!(d.is_empty());
}

#[test]
fn a_vm_that_left_the_fenced_host_is_forgotten() {
    let (mut c, t, _) = start(2);
    let hosts = [host(1, Fenced), host(2, Online)];
    c.step(t, &hosts, &[vm(1, 1, false)]);
    assert!(c.vms().contains_key(&VmId(1)));
    c.step(t, &hosts, &[vm(1, 2, false)]);
    assert!(c.vms().is_empty());
}

fn with_policy(n: u128, p: Policy) -> (Controller, Instant) {
    let (clock, _) = Clock::manual();
    let now = clock.now();
    (Controller::new(p, (1..=n).map(HostId), now), now)
}

fn fences(d: &[Decision]) -> Vec<u128> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Fence { host } => Some(host.0),
            _ => None,
        })
        .collect()
}

#[test]
fn keep_running_without_disk_locks_restarts_only_once_the_fence_confirmed_off() {
    let (mut c, t) = with_policy(
        3,
        Policy {
            isolation: IsolationResponse::KeepRunning,
            hardware_fence: true,
            ..Policy::default()
        },
    );
    let vms = [vm(1, 1, true)];
    let mut hosts = [host(1, LeaseExpired), host(2, Online), host(3, Online)];
    // Lease expired: fence it (once while its fence is idle).
    let d = c.step(t, &hosts, &vms);
    assert_eq!(fences(&d), [1]);
    hosts[0].fence = FenceStatus::Fencing;
    assert!(fences(&c.step(t, &hosts, &vms)).is_empty());
    // Fenced by the lease wait alone: the agent keeps running; wait.
    hosts[0].lease = Fenced;
    let d = c.step(t + Duration::from_secs(8), &hosts, &vms);
    assert!(restarts(&d).is_empty(), "{d:?}");
    assert_eq!(
        c.vms()[&VmId(1)].waiting,
        Some(Waiting::Fencing { failed: false })
    );
    // A failed fence: still waiting, shown as failed (an alert, retried).
    hosts[0].fence = FenceStatus::Failed;
    assert!(restarts(&c.step(t + Duration::from_secs(9), &hosts, &vms)).is_empty());
    assert_eq!(c.vms()[&VmId(1)].waiting, Some(Waiting::Fencing { failed: true }));
    assert!(c.vms()[&VmId(1)]
        .waiting
        .as_ref()
        .is_some_and(|w| w.describe(t).contains("fencing failed")));
    // Confirmed off: restarted.
    hosts[0].fence = FenceStatus::Off;
    assert_eq!(restarts(&c.step(t + Duration::from_secs(10), &hosts, &vms)), [1]);
}

#[test]
fn keep_running_with_disk_locks_restarts_after_the_lease_wait_under_the_lock() {
    let (mut c, t) = with_policy(
        3,
        Policy {
            isolation: IsolationResponse::KeepRunning,
            disk_locks: true,
            ..Policy::default()
        },
    );
    let vms = [vm(1, 1, true)];
    let mut hosts = [host(1, LeaseExpired), host(2, Online), host(3, Online)];
    let d = c.step(t, &hosts, &vms);
    assert!(
        d.is_empty(),
        "no hardware fence configured: nothing to fence: {d:?}"
    );
    hosts[0].lease = Fenced;
    assert_eq!(restarts(&c.step(t + Duration::from_secs(8), &hosts, &vms)), [1]);
}

#[test]
fn self_fence_with_a_hardware_fence_restarts_by_the_wait_even_if_the_fence_failed() {
    let (mut c, t) = with_policy(
        3,
        Policy {
            hardware_fence: true,
            ..Policy::default()
        },
    );
    let vms = [vm(1, 1, true)];
    let mut hosts = [host(1, Fenced), host(2, Online), host(3, Online)];
    hosts[0].fence = FenceStatus::Failed;
    assert_eq!(restarts(&c.step(t, &hosts, &vms)), [1]);
}

#[test]
fn no_fence_while_the_guard_holds() {
    let (mut c, t) = with_policy(
        3,
        Policy {
            hardware_fence: true,
            ..Policy::default()
        },
    );
    c.step(t, &[host(1, Online), host(2, Online), host(3, Online)], &[]);
    let hosts = [host(1, LeaseExpired), host(2, LeaseExpired), host(3, Online)];
    let d = c.step(t + Duration::from_secs(6), &hosts, &[]);
    assert!(d.iter().any(|d| matches!(d, Decision::Held { .. })), "{d:?}");
    assert!(fences(&d).is_empty(), "held: nobody is powered off: {d:?}");
}

#[test]
fn lost_leases_of_heard_hosts_hold_with_the_witness_memory() {
    // Two of three hosts are heard (online) but report no lease: with the
    // witness on they count, and the third host's fence restarts nothing.
    let mut p = Policy::default();
    p.guard.memory = Some(Duration::from_secs(10));
    let (mut c, t) = with_policy(3, p);
    let vms = [vm(1, 3, true)];
    c.step(t, &[host(1, Online), host(2, Online), host(3, Online)], &vms);
    let lost = Some(crate::ha::lease::Loss {
        since: t + Duration::from_secs(1),
        until: None,
    });
    let mut hosts = [host(1, Online), host(2, Online), host(3, Fenced)];
    hosts[0].loss = lost;
    hosts[1].loss = lost;
    let d = c.step(t + Duration::from_secs(8), &hosts, &vms);
    assert!(
        d.iter().any(|d| matches!(d, Decision::Held { silent: 3, .. })),
        "{d:?}"
    );
    assert!(restarts(&d).is_empty());
    assert_eq!(c.vms()[&VmId(1)].waiting, Some(Waiting::Held));
}
