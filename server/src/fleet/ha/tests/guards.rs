//! The fleet's side of the HA guards of issue 13: restarts within the old
//! host's disk lock space, a hardware fence's "off" fencing a host at once.

use super::*;

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
    let w = f.ha_fence_wait();
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

/// The running HA driver fences a host whose lease expired with the
/// configured command, and the confirmed "off" fences it at once — long
/// before the lease wait (the manual clock does not reach it).
#[tokio::test]
async fn the_driver_powers_off_an_expired_host_and_it_is_fenced_before_the_lease_wait() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let power = dir.path().join("off");
    let script = dir.path().join("bmc");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> {log}\ncase $2 in off) touch {p}; exit 0;; status) [ -e {p} ] && exit 2; exit 0;; esac\nexit 1\n",
            p = power.display(),
            log = dir.path().join("log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = open_store(&dir);
    store
        .put_hosts(&[host_record(H1), host_record(H2), host_record(H3)])
        .unwrap();
    let ha = HaConfig {
        hardware_fence: Some(crate::config::HardwareFence {
            command: vec![script.display().to_string(), "{host}".into(), "{action}".into()],
            timeout: Duration::from_secs(20),
            retries: 0,
            hosts: Default::default(),
        }),
        ..HaConfig::default()
    };
    let (f, clock) = fleet(store, ha);
    let mut events = f.bus.subscribe();
    let t0 = f.clock().now();
    for h in [H1, H2, H3] {
        f.ha_connected(h, t0);
    }
    // Every host beats with a full lease past the start grace (no loss:
    // lost leases would hold the guard, and no host would be powered off).
    let beat = |h| f.ha_heard(h, f.clock().now(), Some(Some(Duration::from_secs(5))));
    while f.clock().now() < t0 + f.ha_fence_wait() + Duration::from_secs(1) {
        for h in [H1, H2, H3] {
            beat(h);
        }
        clock.advance(Duration::from_secs(1));
    }
    for h in [H1, H2, H3] {
        beat(h);
    }
    f.tick_leases(f.clock().now()).unwrap();
    let driver = tokio::spawn(crate::ha::driver::run(
        f.clone(),
        novacron_shared::notify::Liveness::new(f.clock().clone(), None)
            .register("ha-driver", Duration::from_secs(3600)),
    ));
    // H1 goes silent; the others keep beating until its lease is past.
    let silent_from = f.clock().now();
    while f.clock().now() <= silent_from + f.ha_config().lease {
        clock.advance(Duration::from_millis(500));
        for h in [H2, H3] {
            beat(h);
        }
    }
    assert!(f.clock().now() < silent_from + f.ha_fence_wait());
    f.set_maintenance(H2, false).unwrap(); // wakes the driver
    let fenced = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if f.lease_state(H1) == Some(HostState::Fenced) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    driver.abort();
    if fenced.is_err() {
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e.message.clone());
        }
        panic!(
            "not fenced by the hardware fence: {:?}; {:?}; events {seen:?}; losses {:?} now {:?}",
            f.lease_state(H1),
            f.ha_status(),
            f.lease_losses(f.clock().now()),
            f.clock().now()
        );
    }
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log, "h1 status\nh1 off\nh1 status\nh1 status\n");
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.message.clone());
    }
    assert!(
        seen.iter().any(|m| m.contains("powered off and confirmed off")),
        "{seen:?}"
    );
    assert_eq!(
        f.ha_status().fences.get(&H1).map(|x| x.state),
        Some(crate::ha::fence::FenceStatus::Off)
    );
}
