//! Tests of the fleet's HA wiring without libvirt (`session`: over a real
//! QUIC session; `guards`: the guards of issue 13): the lease
//! view the sessions feed, restarts as compare-and-set, departed VMs in the
//! same transaction, the start grace from stored terms, acks withheld.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use novacron_shared::clock::ManualClock;
use novacron_shared::lease::LeaseTiming;
use novacron_shared::protocol::{Capacity, Departed};
use novacron_shared::spec::{DesiredVm, DiskSpec, Power, VmSpec};

use super::*;
use crate::fleet::view::{Action, ActionError};
use crate::fleet::CreateVm;
use crate::scheduler::Filter;
use crate::store::{HostRecord, PlacementRules};

const H1: HostId = HostId(1);
const H2: HostId = HostId(2);
const H3: HostId = HostId(3);

fn host_record(id: HostId) -> HostRecord {
    HostRecord {
        id,
        name: format!("h{}", id.0),
        addresses: vec![],
        capacity: Capacity {
            cpus: 8,
            memory_mib: 8192,
            ..Capacity::default()
        },
        agent_version: "0".into(),
        first_seen_ms: 0,
        last_seen_ms: 0,
        state: StoredState::Offline,
        cert_serial: format!("{:x}", id.0),
        cert_not_after: 0,
    }
}

fn open_store(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("db.redb")).unwrap()
}

fn fleet(store: Store, ha: HaConfig) -> (Arc<Fleet>, Arc<ManualClock>) {
    let (clock, manual) = Clock::manual();
    let (ca, _) =
        novacron_shared::pki::FleetCa::generate("t", clock.wall(), Duration::from_secs(3600)).unwrap();
    let f = Fleet::with_ha(
        store,
        ca,
        crate::config::AgentPolicy::default(),
        crate::scheduler::Policy::default(),
        crate::config::MigrationPolicy::default(),
        ha,
        clock,
    )
    .unwrap();
    (f, manual)
}

/// An HA VM with one disk, placed on `on`.
fn ha_vm(id: u128, on: HostId) -> VmRecord {
    let mut spec = VmSpec::minimal(&format!("v{id}"), 1, 512);
    spec.ha = true;
    spec.disks.push(DiskSpec {
        name: "root".into(),
        size_mib: Some(1024),
        template: None,
    });
    VmRecord {
        vm: DesiredVm {
            id: VmId(id),
            op_id: OpId(id),
            spec,
            power: Power::Running,
            epoch: 0,
        },
        placement: Placement::Host(on),
        rules: PlacementRules::default(),
        created_ms: 3,
    }
}

fn candidate(id: HostId, pool: Option<&str>) -> crate::scheduler::Host {
    candidate_locked(id, pool, None)
}

fn candidate_locked(id: HostId, pool: Option<&str>, locks: Option<&str>) -> crate::scheduler::Host {
    crate::scheduler::Host {
        id,
        up: true,
        cordoned: false,
        cpus: 4,
        memory_mib: 4096,
        storage_free_mib: 100_000,
        labels: Default::default(),
        load: None,
        used: crate::scheduler::Usage::default(),
        groups: HashSet::new(),
        shared_storage: pool.map(str::to_string),
        disk_locks: locks.map(str::to_string),
    }
}

/// H1 silent since the start, H2 and H3 heard just now: past the start
/// grace, H1 is fenced and the others online.
fn fence_h1(f: &Fleet, clock: &ManualClock) {
    let t0 = f.clock().now();
    for h in [H1, H2, H3] {
        f.ha_connected(h, t0);
    }
    let w = f.ha_fence_wait();
    clock.advance(w + Duration::from_secs(1));
    let now = f.clock().now();
    assert!(f.ha_heard(H2, now, None) && f.ha_heard(H3, now, None));
    let moves = f.tick_leases(now).unwrap();
    assert!(
        moves.iter().any(|t| t.host == H1 && t.to == HostState::Fenced),
        "{moves:?}"
    );
    assert_eq!(f.lease_state(H2), Some(HostState::Online));
}

#[tokio::test]
async fn a_restart_is_a_compare_and_set_that_records_the_departure_with_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    for id in [7, 8, 9] {
        store.put_vm(&ha_vm(id, H1)).unwrap().unwrap();
        store.set_vm_storage(VmId(id), Some("/pool".into())).unwrap();
    }
    let mut plain = ha_vm(10, H1);
    plain.vm.spec.ha = false;
    store.put_vm(&plain).unwrap().unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    let hosts = || {
        vec![
            candidate(H1, Some("/pool")),
            candidate(H2, Some("/pool")),
            candidate(H3, Some("/other")),
        ]
    };

    // Not declared fenced yet: nothing moves.
    let r = f.restart_among(VmId(7), H1, 0, hosts());
    assert!(
        matches!(r, Err(VmError::Stale(RestartRefusal::NotFenced(H1)))),
        "{r:?}"
    );

    fence_h1(&f, &clock);
    let placed_before = TELEMETRY
        .ha_restarts
        .with_label_values(&[RestartOutcome::Placed.as_str()])
        .get();
    let rec = f.restart_among(VmId(7), H1, 0, hosts()).unwrap();
    assert_eq!(
        rec.placement,
        Placement::Host(H2),
        "the online host on the same pool"
    );
    assert_eq!(rec.vm.epoch, 1);
    assert!(
        TELEMETRY
            .ha_restarts
            .with_label_values(&[RestartOutcome::Placed.as_str()])
            .get()
            > placed_before
    );
    // One transaction: the move, the epoch, the departure, the history.
    let from = store.desired(H1).unwrap().unwrap();
    assert!(from.vms.iter().all(|v| v.id != VmId(7)));
    assert_eq!(
        from.departed,
        vec![Departed {
            vm: VmId(7),
            keep_disks: true
        }]
    );
    let to = store.desired(H2).unwrap().unwrap();
    assert_eq!(to.vms.iter().find(|v| v.id == VmId(7)).map(|v| v.epoch), Some(1));
    let h = store.ha_vm(VmId(7)).unwrap().unwrap();
    assert_eq!((h.restarts, h.shared_storage.as_deref()), (1, Some("/pool")));
    assert_eq!(h.last_restart.map(|l| (l.from, l.to)), Some((H1, H2)));

    // A second restart planned from the same view is refused, typed.
    let r = f.restart_among(VmId(7), H1, 0, hosts());
    assert!(
        matches!(r, Err(VmError::Stale(RestartRefusal::Moved { .. }))),
        "{r:?}"
    );
    let r = f.restart_among(VmId(8), H1, 4, hosts());
    assert!(
        matches!(
            r,
            Err(VmError::Stale(RestartRefusal::Epoch { expected: 4, now: 0 }))
        ),
        "{r:?}"
    );
    // Nothing fits: the scheduler's reasons; the fenced host counts as down.
    let r = f.restart_among(
        VmId(9),
        H1,
        0,
        vec![candidate(H1, Some("/pool")), candidate(H3, Some("/other"))],
    );
    match r {
        Err(VmError::NoFit(n)) => {
            assert_eq!(n.excluded.get(&Filter::Down), Some(&1));
            assert_eq!(n.excluded.get(&Filter::OtherSharedStorage), Some(&1));
            assert!(n.to_string().contains("other shared storage"), "{n}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.vm(VmId(9)).unwrap().unwrap().placement, Placement::Host(H1));
    // A cordoned host is no candidate either.
    let mut cordoned = candidate(H2, Some("/pool"));
    cordoned.cordoned = true;
    let r = f.restart_among(VmId(9), H1, 0, vec![cordoned]);
    assert!(matches!(r, Err(VmError::NoFit(_))), "{r:?}");
    // A non-HA VM is lost with its host, never moved.
    let r = f.restart_among(VmId(10), H1, 0, hosts());
    assert!(matches!(r, Err(VmError::Invalid(_))), "{r:?}");
    assert_eq!(
        store.vm(VmId(10)).unwrap().unwrap().placement,
        Placement::Host(H1)
    );
}

#[tokio::test]
async fn an_ephemeral_vm_moves_anywhere_and_leaves_no_disks_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    let mut v = ha_vm(7, H1);
    v.vm.spec.ephemeral = true;
    store.put_vm(&v).unwrap().unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    fence_h1(&f, &clock);
    let rec = f
        .restart_among(VmId(7), H1, 0, vec![candidate(H1, None), candidate(H2, None)])
        .unwrap();
    assert_eq!(rec.placement, Placement::Host(H2), "no shared storage needed");
    assert_eq!(
        store.departed(H1).unwrap(),
        vec![Departed {
            vm: VmId(7),
            keep_disks: false
        }]
    );
}

#[tokio::test]
async fn the_start_grace_is_the_fence_wait_of_the_longest_lease_ever_granted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    // An earlier run granted 20 s leases; this one grants 5 s.
    let long = LeaseTiming::new(Duration::from_secs(20));
    store.raise_ha_terms(long).unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    let short = f.ha_fence_wait();
    assert!(short < long.fenced_after());
    clock.advance(short + Duration::from_secs(1));
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Suspect), "still in the grace");
    clock.advance(long.fenced_after() - short - Duration::from_secs(1));
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Fenced));
    assert_eq!(store.ha_terms().unwrap().map(|t| t.lease), Some(long.lease));

    // Without the stored terms the same silence fences at the short wait:
    // the stored terms are what made the difference above.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    let (f, clock) = fleet(store, HaConfig::default());
    clock.advance(short);
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Fenced));
}

#[tokio::test]
async fn acks_are_withheld_from_a_fenced_host_until_it_returned_clean_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    let t0 = f.clock().now();
    f.ha_connected(H1, t0);
    assert!(
        f.ha_heard(H1, t0, None),
        "an online host's heartbeat is acknowledged"
    );
    clock.advance(f.ha_fence_wait());
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Fenced));
    assert!(store
        .ha_hosts()
        .unwrap()
        .iter()
        .any(|(h, r)| *h == H1 && r.must_return));
    clock.advance(Duration::from_millis(10));
    assert!(!f.ha_heard(H1, f.clock().now(), None), "fenced: no ack");
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Returning));
    assert!(!f.ha_heard(H1, f.clock().now(), None), "returning: no ack");
    let r = f.set_maintenance(H1, true);
    assert!(r.is_ok(), "{r:?}");
    assert!(
        !f.ha_heard(H1, f.clock().now(), None),
        "maintenance does not end the wait"
    );
    f.set_maintenance(H1, false).unwrap();
    drop(f);

    // A restarted server remembers: still no ack.
    let (f, _clock) = fleet(store.clone(), HaConfig::default());
    let now = f.clock().now();
    f.ha_connected(H1, now);
    assert!(!f.ha_heard(H1, now, None));
    f.tick_leases(now).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Returning));
    // No session has reported it reconciled: refused, still no ack.
    assert!(matches!(f.returned_clean(H1), Err(HaError::NotReconciled(H1))));
    assert!(!f.ha_heard(H1, now, None));
    let generation = store.desired(H1).unwrap().map_or(0, |d| d.generation);
    let r = f.clear_returned(H1, generation + 1);
    assert!(
        matches!(r, Err(HaError::NotReconciled(H1))),
        "reconciled to another generation: {r:?}"
    );
    f.clear_returned(H1, generation).unwrap();
    assert!(f.ha_heard(H1, now, None), "reconciled: acks resume");
    assert!(store.ha_hosts().unwrap().is_empty());
    f.tick_leases(now).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Online));
    let r = f.clear_returned(H1, generation + 1);
    assert!(
        matches!(r, Err(HaError::Lease(LeaseError::NotReturning { .. }))),
        "{r:?}"
    );
    assert!(matches!(
        f.clear_returned(HostId(99), 0),
        Err(HaError::UnknownHost(_))
    ));
}

#[tokio::test]
async fn maintenance_is_persisted_and_announced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    let mut changes = f.lease_changes();
    f.set_maintenance(H1, true).unwrap();
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    assert!(matches!(
        f.set_maintenance(HostId(9), true),
        Err(HaError::UnknownHost(_))
    ));
    clock.advance(Duration::from_secs(3600));
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(
        f.lease_state(H1),
        Some(HostState::Maintenance),
        "never fenced in maintenance"
    );
    drop(f);
    let (f, _) = fleet(store, HaConfig::default());
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Maintenance));
    // A host enrolled while the server runs: tracked, and no frame invented.
    f.store().put_hosts(&[host_record(H2)]).unwrap();
    f.set_maintenance(H2, true).unwrap();
    assert_eq!(f.lease_last_heard(H2), None);
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H2), Some(HostState::Maintenance));
    // Connects, disconnects bump the change counter too.
    let mut changes = f.lease_changes();
    f.ha_connected(H1, f.clock().now());
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    f.ha_disconnected(H1, f.clock().now());
    assert!(changes.has_changed().unwrap());
}

#[tokio::test]
async fn an_ha_vm_with_local_disks_is_refused_at_create_with_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    let (f, _) = fleet(store, HaConfig::default());
    let spec = ha_vm(1, H1).vm.spec;
    let e = f
        .create_vm(CreateVm {
            spec: spec.clone(),
            power: Power::Running,
            placement: PlacementRules::default(),
        })
        .unwrap_err();
    let VmError::Invalid(m) = e else { panic!("{e:?}") };
    assert!(
        m.contains("vms.storage_shared") && m.contains("ephemeral: true"),
        "{m}"
    );
    // Ephemeral, or without disks, it is not refused for storage (here it
    // does not fit only because no host is connected).
    let mut eph = spec.clone();
    eph.ephemeral = true;
    let mut diskless = spec;
    diskless.disks.clear();
    for s in [eph, diskless] {
        let r = f.create_vm(CreateVm {
            spec: s,
            power: Power::Running,
            placement: PlacementRules::default(),
        });
        assert!(matches!(r, Err(VmError::NoFit(_))), "{r:?}");
    }
}

#[tokio::test]
async fn the_view_carries_lease_and_ha_facts_and_actions_reach_the_ha_part() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1), host_record(H2)]).unwrap();
    let mut v = ha_vm(7, H1);
    v.vm.spec.ha_priority = 9;
    store.put_vm(&v).unwrap().unwrap();
    let (f, _) = fleet(store, HaConfig::default());
    f.ha_connected(H2, f.clock().now());
    f.tick_leases(f.clock().now()).unwrap();
    let view = f.view().unwrap();
    let h2 = view.host(H2).unwrap();
    assert_eq!(h2.lease, HostState::Online);
    assert_eq!(
        (h2.shared_storage.as_deref(), h2.reconciled),
        (None, false),
        "no session"
    );
    assert_eq!(view.host(H1).unwrap().lease, HostState::Suspect);
    let s = &view.vms[0];
    assert!(s.ha && s.has_disks && !s.ephemeral);
    assert_eq!((s.ha_priority, s.epoch, s.created_ms), (9, 0, 3));

    let actions = f.actions();
    let r = actions
        .submit(
            Action::Restart {
                vm: VmId(7),
                from: H1,
                epoch: 0,
            },
            "test",
        )
        .await;
    assert!(
        matches!(
            r,
            Err(ActionError::Refused(VmError::Stale(RestartRefusal::NotFenced(
                H1
            ))))
        ),
        "{r:?}"
    );
    let r = actions.submit(Action::ReturnedClean { host: H2 }, "test").await;
    assert!(
        matches!(r, Err(ActionError::Ha(HaError::NotReconciled(H2)))),
        "{r:?}"
    );

    // The driver's status and the operator's release request.
    let releases = f.release_requests();
    f.request_release();
    assert!(releases.has_changed().unwrap());
    let mut status = HaStatus {
        held: Some(Held {
            since_ms: 5,
            silent: 4,
            monitored: 10,
        }),
        ..HaStatus::default()
    };
    status.vms.insert(
        VmId(7),
        VmHa {
            state: VmHaState::Waiting,
            why: "held".into(),
            since_ms: 5,
        },
    );
    f.publish_ha_status(status.clone());
    assert_eq!(f.ha_status(), status);
}

#[tokio::test]
async fn an_epoch_never_goes_back_when_an_operator_replaces_the_hosts_vms() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    let mut v = ha_vm(7, H1);
    v.vm.spec.ephemeral = true;
    store.put_vm(&v).unwrap().unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    fence_h1(&f, &clock);
    let rec = f
        .restart_among(VmId(7), H1, 0, vec![candidate(H2, None)])
        .unwrap();
    assert_eq!(rec.vm.epoch, 1);
    let d = f
        .set_desired(
            H2,
            vec![crate::fleet::VmRequest {
                id: None,
                spec: rec.vm.spec.clone(),
                power: Power::Stopped,
            }],
        )
        .unwrap();
    assert_eq!(
        d.vms.iter().map(|v| (v.id, v.epoch)).collect::<Vec<_>>(),
        [(VmId(7), 1)]
    );
    // Pinned elsewhere by id, it keeps its epoch too.
    let d = f
        .set_desired(
            H3,
            vec![crate::fleet::VmRequest {
                id: Some(VmId(7)),
                spec: rec.vm.spec,
                power: Power::Running,
            }],
        )
        .unwrap();
    assert_eq!(d.vms.iter().map(|v| v.epoch).collect::<Vec<_>>(), [1]);
}

#[tokio::test]
async fn a_revoked_host_is_forgotten_and_a_late_frame_does_not_track_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store.put_hosts(&[host_record(H1)]).unwrap();
    let (f, _) = fleet(store, HaConfig::default());
    let now = f.clock().now();
    f.ha_connected(H1, now);
    assert!(f.ha_heard(H1, now, None));
    f.revoke(H1).unwrap();
    assert!(!f.ha_heard(H1, now, None), "no ack for a revoked host");
    f.tick_leases(now).unwrap();
    assert_eq!(f.lease_state(H1), None);
}

mod guards;
mod session;
