//! Tests of the fleet's HA wiring without libvirt or sockets: the lease
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
    let w = f.ha_config().timing().fenced_after();
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
    let short = f.ha_config().timing().fenced_after();
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
    clock.advance(f.ha_config().timing().fenced_after());
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

/// Reads the next control-stream frame, or fails after a few seconds.
async fn next_frame(
    recv: &mut novacron_shared::framing::FramedRecv,
) -> novacron_shared::protocol::ServerMessage {
    use novacron_shared::protocol::ServerMessage;
    match tokio::time::timeout(Duration::from_secs(10), recv.next::<ServerMessage>()).await {
        Ok(Ok(Some((_, m)))) => m,
        other => panic!("no frame from the server: {other:?}"),
    }
}

#[tokio::test]
async fn over_a_real_session_terms_come_first_and_acks_stop_when_fenced_until_returned_clean() {
    use novacron_shared::framing::{self, FramedRecv, MAX_FRAME_LEN};
    use novacron_shared::protocol::{
        AgentMessage, Heartbeat, HeartbeatAck, Hello, RenewRequest, ServerMessage, WitnessPeer, WitnessTerms,
        HANDSHAKE_VERSION,
    };

    let dir = tempfile::tempdir().unwrap();
    // TLS checks certificates against the real wall time: start there.
    let manual = Arc::new(ManualClock::starting_at(Clock::system().wall()));
    let clock = Clock::from_source(manual.clone());
    let mut cfg = crate::config::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    let data = crate::datadir::DataDir::new(dir.path());
    data.init(&cfg, clock.wall()).unwrap();
    {
        let store = Store::open(&data.db()).unwrap();
        store.put_hosts(&[host_record(H1), host_record(H2)]).unwrap();
        store.put_vm(&ha_vm(7, H1)).unwrap().unwrap();
    }
    let ca = data.load_ca().unwrap();
    let (key, csr) = novacron_shared::pki::make_csr("h1").unwrap();
    let validity = novacron_shared::pki::Validity::for_ttl(clock.wall(), Duration::from_secs(3600));
    let cert = ca.sign_host_csr(&csr, H1, validity).unwrap();
    let running = crate::start_with_clock(&cfg, clock).await.unwrap();
    let f = running.fleet.clone();

    let tls = novacron_shared::tls::client_config_mtls(
        ca.cert_der().clone(),
        vec![cert],
        novacron_shared::pki::key_from_pem(&key.serialize_pem()).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(tls, running.quic_addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = FramedRecv::new(recv, MAX_FRAME_LEN);
    let mut buf = Vec::new();
    let hello = AgentMessage::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "test".into(),
        hostname: "h1".into(),
    });
    framing::write_frame(&mut send, HANDSHAKE_VERSION, &hello, &mut buf)
        .await
        .unwrap();
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Welcome(_)));
    match next_frame(&mut recv).await {
        ServerMessage::LeaseTerms(t) => assert_eq!(t, f.ha_config().terms()),
        m => panic!("the lease terms come right after the welcome, got {m:?}"),
    }
    // The witness terms right after: H2 (enrolled, silent) reports no
    // witness address yet, so no peer; quorum of two monitored hosts.
    let quorum = novacron_shared::witness::quorum(2);
    match next_frame(&mut recv).await {
        ServerMessage::Witness(w) => assert_eq!(
            w,
            WitnessTerms {
                peers: vec![],
                quorum
            }
        ),
        m => panic!("the witness terms come right after the lease terms, got {m:?}"),
    }
    match next_frame(&mut recv).await {
        ServerMessage::DesiredState(d) => {
            assert_eq!(d.vms.iter().map(|v| v.id).collect::<Vec<_>>(), [VmId(7)])
        }
        m => panic!("then the desired state, got {m:?}"),
    }
    // H2 reports a witness address: H1 is pushed new terms with it.
    let addr: std::net::SocketAddr = "10.0.0.2:7300".parse().unwrap();
    f.witness_address(H2, Some(addr));
    match next_frame(&mut recv).await {
        ServerMessage::Witness(w) => assert_eq!(
            w,
            WitnessTerms {
                peers: vec![WitnessPeer { host: H2, addr }],
                quorum
            }
        ),
        m => panic!("new witness terms when a peer's address changes, got {m:?}"),
    }
    // The same address again changes nothing (no frame: the probe's
    // error reply comes first below).
    f.witness_address(H2, Some(addr));
    assert_eq!(f.witness_status().peers, 1);
    assert!(f.witness_status().enabled && f.witness_status().pushes >= 1);
    let beat = |seq| {
        AgentMessage::Heartbeat(Heartbeat {
            seq,
            lease_left_ms: None,
        })
    };
    // A garbage renewal always gets an error reply: after a heartbeat it
    // shows whether an ack came first.
    let probe = || {
        AgentMessage::RenewCertificate(RenewRequest {
            csr_der: vec![1, 2, 3],
        })
    };
    for m in [beat(1), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    assert_eq!(
        next_frame(&mut recv).await,
        ServerMessage::HeartbeatAck(HeartbeatAck { seq: 1 })
    );
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Error(_)));

    // Silent past the fence wait: declared fenced; heartbeats go unanswered.
    manual.advance(f.ha_config().timing().fenced_after() + Duration::from_millis(100));
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Fenced));
    // A snapshot revert (which may start the HA VM) is refused while the
    // host holds no lease; it never reaches the agent.
    let revert = novacron_shared::protocol::CommandKind::SnapshotRevert {
        vm: VmId(7),
        name: "s1".into(),
    };
    let r = f.command(H1, revert, Duration::from_secs(5)).await;
    assert!(
        matches!(r, Err(crate::fleet::CommandError::NoLease(h)) if h == H1),
        "{r:?}"
    );
    for m in [beat(2), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    match next_frame(&mut recv).await {
        ServerMessage::Error(_) => {}
        m => panic!("no ack for a fenced host, got {m:?}"),
    }
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::Returning));
    for m in [beat(3), probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    match next_frame(&mut recv).await {
        ServerMessage::Error(_) => {}
        m => panic!("no ack for a returning host, got {m:?}"),
    }
    assert!(matches!(f.returned_clean(H1), Err(HaError::NotReconciled(H1))));

    // The agent reports an inventory and a converged pass at the current
    // generation: reconciled, so the controller may clear it; acks resume.
    let generation = f.store().desired(H1).unwrap().unwrap().generation;
    let mut changes = f.lease_changes();
    changes.borrow_and_update();
    let inventory = AgentMessage::Inventory(novacron_shared::protocol::Inventory {
        capacity: Capacity {
            cpus: 4,
            memory_mib: 4096,
            ..Capacity::default()
        },
        hypervisor: "test:///default".into(),
        vms: vec![],
        migration_uri: None,
        labels: Default::default(),
        shared_storage: Some("/srv/pool".into()),
        disk_locks: None,
        witness: None,
    });
    let report = AgentMessage::Reconciled(novacron_shared::protocol::ReconcileReport {
        generation,
        converged: true,
        actions: vec![],
        drift: vec![],
    });
    for m in [inventory, report, probe()] {
        framing::write_frame(&mut send, 1, &m, &mut buf).await.unwrap();
    }
    assert!(matches!(next_frame(&mut recv).await, ServerMessage::Error(_)));
    assert!(
        changes.has_changed().unwrap(),
        "inventories and reports wake the driver"
    );
    // The running server's HA driver sees it reconciled and clears it
    // (the view may already show it cleared).
    let view = f.view().unwrap();
    let h = view.host(H1).unwrap();
    assert_eq!(h.shared_storage.as_deref(), Some("/srv/pool"));
    assert!(h.reconciled || h.lease == HostState::Online, "{h:?}");
    match next_frame(&mut recv).await {
        ServerMessage::DesiredState(d) => assert!(d.generation > generation && d.departed.is_empty()),
        m => panic!("the cleared host gets its desired state, got {m:?}"),
    }
    framing::write_frame(&mut send, 1, &beat(4), &mut buf)
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut recv).await,
        ServerMessage::HeartbeatAck(HeartbeatAck { seq: 4 })
    );

    // The HA VM's start waits on its disk lock: an expected wait, shown
    // in the HA status (and so on the VM), not an error.
    let mut events = f.bus.subscribe();
    let report = AgentMessage::Reconciled(novacron_shared::protocol::ReconcileReport {
        generation: generation + 1,
        converged: false,
        actions: vec![],
        drift: vec![novacron_shared::protocol::Drift {
            vm: "v7".into(),
            message: "Failed to acquire lock: resource busy".into(),
            kind: novacron_shared::protocol::DriftKind::DiskLockHeld,
        }],
    });
    framing::write_frame(&mut send, 1, &report, &mut buf)
        .await
        .unwrap();
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(w) = f.ha_status().lock_waits.get(&VmId(7)).copied() {
                return w;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the driver shows the lock wait");
    assert_eq!(wait.host, H1);
    assert_eq!(wait.describe(), format!("disk lock held (on host {H1})"));
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.vm == Some(VmId(7)) && e.message.contains("disk lock") {
                return e;
            }
        }
    })
    .await
    .expect("one event when the wait begins");
    assert!(event.message.contains("not an error"), "{}", event.message);
    running.shutdown().await;
}

#[tokio::test]
async fn with_disk_locks_a_restart_stays_in_the_old_hosts_lock_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    store.put_vm(&ha_vm(7, H1)).unwrap().unwrap();
    store.set_vm_storage(VmId(7), Some("/pool".into())).unwrap();
    store.put_vm(&ha_vm(8, H1)).unwrap().unwrap();
    store.set_vm_storage(VmId(8), Some("/pool".into())).unwrap();
    let ha = HaConfig {
        disk_locks: true,
        ..HaConfig::default()
    };
    let (f, clock) = fleet(store.clone(), ha);
    f.note_lock_space(H1, Some("/locks/a".into()));
    fence_h1(&f, &clock);
    // H2 is in another lock space, H3 reports none: nothing fits.
    let r = f.restart_among(
        VmId(7),
        H1,
        0,
        vec![
            candidate_locked(H2, Some("/pool"), Some("/locks/b")),
            candidate_locked(H3, Some("/pool"), None),
        ],
    );
    match r {
        Err(VmError::NoFit(n)) => {
            assert_eq!(n.excluded.get(&Filter::OtherLockSpace), Some(&1));
            assert_eq!(n.excluded.get(&Filter::DiskLocks), Some(&1));
        }
        other => panic!("{other:?}"),
    }
    let rec = f
        .restart_among(
            VmId(7),
            H1,
            0,
            vec![
                candidate_locked(H2, Some("/pool"), Some("/locks/b")),
                candidate_locked(H3, Some("/pool"), Some("/locks/a")),
            ],
        )
        .unwrap();
    assert_eq!(rec.placement, Placement::Host(H3));
    // A host whose lock space this run never heard: the disks' pool is
    // the lock space.
    f.note_lock_space(H1, None);
    let rec = f
        .restart_among(
            VmId(8),
            H1,
            0,
            vec![
                candidate_locked(H2, Some("/pool"), Some("/locks/b")),
                candidate_locked(H3, Some("/pool"), Some("/pool")),
            ],
        )
        .unwrap();
    assert_eq!(rec.placement, Placement::Host(H3));
}

#[tokio::test]
async fn a_host_confirmed_off_by_its_fence_is_fenced_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    let (f, clock) = fleet(store.clone(), HaConfig::default());
    let t0 = f.clock().now();
    for h in [H1, H2, H3] {
        f.ha_connected(h, t0);
    }
    // Past the start grace, every host heard; then H1 goes silent just
    // past its lease.
    let w = f.ha_config().timing().fenced_after();
    clock.advance(w + Duration::from_secs(1));
    for h in [H1, H2, H3] {
        f.ha_heard(h, f.clock().now(), Some(Some(Duration::from_secs(5))));
    }
    f.tick_leases(f.clock().now()).unwrap();
    clock.advance(f.ha_config().lease + Duration::from_millis(10));
    for h in [H2, H3] {
        f.ha_heard(h, f.clock().now(), Some(Some(Duration::from_secs(5))));
    }
    f.tick_leases(f.clock().now()).unwrap();
    assert_eq!(f.lease_state(H1), Some(HostState::LeaseExpired));
    f.fence_confirmed_off(H1, f.clock().now()).unwrap();
    let moves = f.tick_leases(f.clock().now()).unwrap();
    assert!(
        moves.iter().any(|t| t.host == H1 && t.to == HostState::Fenced),
        "{moves:?}"
    );
    assert!(store
        .ha_hosts()
        .unwrap()
        .iter()
        .any(|(h, r)| *h == H1 && r.must_return));
    assert!(matches!(
        f.fence_confirmed_off(HostId(99), f.clock().now()),
        Err(HaError::Lease(LeaseError::UnknownHost(_)))
    ));
}
