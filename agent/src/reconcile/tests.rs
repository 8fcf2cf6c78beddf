use super::*;
use novacron_shared::clock::Clock;
use novacron_shared::protocol::Departed;
use novacron_shared::spec::VmSpec;
use proptest::prelude::*;

/// An instant from a manual clock (the reconciler never reads the time).
fn now() -> Instant {
    Clock::manual().0.now()
}

fn desired(name: &str, id: u128, power: Power) -> DesiredVm {
    DesiredVm {
        id: VmId(id),
        op_id: OpId(id + 1000),
        spec: VmSpec::minimal(name, 1, 128),
        power,
        epoch: 0,
    }
}

fn observed_of(d: &DesiredVm, state: VmState) -> Observed {
    Observed {
        name: d.spec.name.clone(),
        uuid: d.id.to_string(),
        state,
        managed: Some(Managed {
            spec_hash: drift::domain_hash(d),
            ha: d.spec.ha,
            epoch: d.epoch,
        }),
    }
}

fn foreign(name: &str, uuid: &str) -> Observed {
    Observed {
        name: name.into(),
        uuid: uuid.into(),
        state: VmState::Running,
        managed: None,
    }
}

#[test]
fn missing_vms_are_defined_then_started() {
    let r = Reconciler::default();
    let now = now();
    let d = desired("a", 1, Power::Running);
    let p = r.plan(now, std::slice::from_ref(&d), &[]);
    assert_eq!(p.actions, [Action::Define(d.clone())]);
    let p = r.plan(
        now,
        std::slice::from_ref(&d),
        &[observed_of(&d, VmState::Stopped)],
    );
    assert!(matches!(&p.actions[..], [Action::Start(t)] if t.id == d.id));
    let p = r.plan(
        now,
        std::slice::from_ref(&d),
        &[observed_of(&d, VmState::Running)],
    );
    assert!(p.converged(), "{p:?}");
}

#[test]
fn power_is_driven_to_the_desired_state() {
    let r = Reconciler::default();
    let now = now();
    let cases = [
        (Power::Running, VmState::Paused, "Resume"),
        (Power::Running, VmState::Crashed, "Start"),
        (Power::Paused, VmState::Running, "Suspend"),
        (Power::Stopped, VmState::Running, "Shutdown"),
        (Power::Stopped, VmState::Paused, "Shutdown"),
    ];
    for (power, state, want) in cases {
        let d = desired("a", 1, power);
        let p = r.plan(now, std::slice::from_ref(&d), &[observed_of(&d, state)]);
        let got = format!("{:?}", p.actions);
        assert!(
            got.starts_with(&format!("[{want}(")),
            "{power:?}/{state:?}: {got}"
        );
    }
    let d = desired("a", 1, Power::Stopped);
    let p = r.plan(
        now,
        std::slice::from_ref(&d),
        &[observed_of(&d, VmState::ShuttingDown)],
    );
    assert!(p.actions.is_empty() && p.settling == 1 && !p.converged());
}

#[test]
fn unwanted_managed_vms_are_removed_and_foreign_ones_left_alone() {
    let r = Reconciler::default();
    let old = desired("old", 2, Power::Running);
    let p = r.plan(
        now(),
        &[],
        &[observed_of(&old, VmState::Running), foreign("hand-made", "u-1")],
    );
    assert_eq!(
        p.actions,
        [Action::Remove {
            name: "old".into(),
            uuid: old.id.to_string()
        }]
    );
    assert!(p.drift.is_empty());
}

#[test]
fn a_name_clash_with_a_foreign_domain_is_drift_not_action() {
    let r = Reconciler::default();
    let d = desired("web", 3, Power::Running);
    let p = r.plan(now(), std::slice::from_ref(&d), &[foreign("web", "u-9")]);
    assert!(p.actions.is_empty());
    assert_eq!(p.drift.len(), 1);
    assert!(p.drift[0].message.contains("u-9"), "{:?}", p.drift);
}

#[test]
fn a_changed_spec_is_redefined() {
    let r = Reconciler::default();
    let d = desired("web", 3, Power::Running);
    let o = observed_of(&d, VmState::Running);
    let mut d2 = d.clone();
    d2.spec.memory_mib = 256;
    let p = r.plan(now(), std::slice::from_ref(&d2), &[o]);
    assert_eq!(p.actions, [Action::Redefine(d2)]);
}

#[test]
fn a_change_outside_the_domain_redefines_nothing() {
    let r = Reconciler::default();
    let d = desired("web", 3, Power::Running);
    let o = observed_of(&d, VmState::Running);
    let mut d2 = d.clone();
    d2.spec.ha_priority = 7;
    d2.spec.ephemeral = true;
    let p = r.plan(now(), std::slice::from_ref(&d2), std::slice::from_ref(&o));
    assert!(p.converged(), "{p:?}");
    // The HA flag lives in the metadata: retagged, not redefined.
    d2.spec.ha = !d.spec.ha;
    let p = r.plan(now(), std::slice::from_ref(&d2), &[o]);
    assert_eq!(p.actions, [Action::Retag(d2)]);
}

#[test]
fn domains_defined_by_an_older_agent_are_not_redefined_on_upgrade() {
    let r = Reconciler::default();
    let d = desired("web", 3, Power::Running);
    let mut o = observed_of(&d, VmState::Running);
    o.managed = Some(Managed {
        spec_hash: drift::legacy_v1_hash(&d),
        ha: false,
        epoch: 0,
    });
    let p = r.plan(now(), std::slice::from_ref(&d), std::slice::from_ref(&o));
    assert!(p.converged(), "{p:?}");
    // A real change since is still redefined.
    let mut d2 = d.clone();
    d2.spec.vcpus = 2;
    let p = r.plan(now(), std::slice::from_ref(&d2), &[o]);
    assert_eq!(p.actions, [Action::Redefine(d2)]);
}

#[test]
fn failures_back_off_exponentially_and_show_as_drift() {
    let (clock, time) = Clock::manual();
    let mut r = Reconciler::default();
    let d = desired("a", 1, Power::Running);
    let acts = |r: &Reconciler| r.plan(clock.now(), std::slice::from_ref(&d), &[]).actions.len();
    r.record(clock.now(), "a", Err("no space".into()));
    time.advance(RETRY_BASE - Duration::from_millis(1));
    let p = r.plan(clock.now(), std::slice::from_ref(&d), &[]);
    assert!(p.actions.is_empty());
    assert!(p.drift[0].message.contains("no space"), "{:?}", p.drift);
    assert!(p.drift[0].message.contains("attempt 1"), "{:?}", p.drift);
    time.advance(Duration::from_millis(1));
    assert_eq!(acts(&r), 1, "retried once the delay is over");
    // Second failure: twice the delay.
    r.record(clock.now(), "a", Err("no space".into()));
    time.advance(RETRY_BASE * 2 - Duration::from_millis(1));
    assert_eq!(acts(&r), 0);
    time.advance(Duration::from_millis(1));
    assert_eq!(acts(&r), 1);
    // Many failures: the delay stops growing at RETRY_MAX.
    for _ in 0..20 {
        r.record(clock.now(), "a", Err("no space".into()));
    }
    time.advance(RETRY_MAX - Duration::from_millis(1));
    assert_eq!(acts(&r), 0);
    time.advance(Duration::from_millis(1));
    assert_eq!(acts(&r), 1);
    // Success clears the failure: nothing holds the next action back.
    r.record(clock.now(), "a", Ok(()));
    r.record(clock.now(), "a", Err("again".into()));
    time.advance(RETRY_BASE);
    assert_eq!(acts(&r), 1, "the count started over after the success");
}

#[test]
fn a_disk_lock_is_an_expected_wait_retried_quickly_and_capped() {
    let (clock, time) = Clock::manual();
    let mut r = Reconciler::default();
    let d = desired("a", 1, Power::Running);
    let plan = |r: &Reconciler| r.plan(clock.now(), std::slice::from_ref(&d), &[]);
    let locked = || ActionError {
        message: "a disk is locked by another host: resource busy".into(),
        kind: DriftKind::DiskLockHeld,
    };
    r.record(clock.now(), "a", Err(locked()));
    let p = plan(&r);
    assert!(p.actions.is_empty());
    assert_eq!(p.drift[0].kind, DriftKind::DiskLockHeld, "{:?}", p.drift);
    assert!(p.drift[0].message.contains("locked"), "{:?}", p.drift);
    time.advance(LOCK_RETRY_BASE);
    assert_eq!(plan(&r).actions.len(), 1, "retried after the lock's base delay");
    for _ in 0..20 {
        r.record(clock.now(), "a", Err(locked()));
    }
    time.advance(LOCK_RETRY_MAX - Duration::from_millis(1));
    assert!(plan(&r).actions.is_empty());
    time.advance(Duration::from_millis(1));
    assert_eq!(
        plan(&r).actions.len(),
        1,
        "a failover never waits longer than the cap"
    );
    // Any other failure is drift of kind Failed.
    r.record(clock.now(), "a", Err("no space".into()));
    assert_eq!(plan(&r).drift[0].kind, DriftKind::Failed);
}

#[test]
fn lock_refusals_are_recognised_from_libvirt_and_qemu() {
    use crate::vmops::is_disk_lock_message;
    assert!(is_disk_lock_message(
        "resource busy: Lockspace resource '/srv/pool/web-1.qcow2' is locked"
    ));
    assert!(is_disk_lock_message(
        "internal error: qemu unexpectedly closed the monitor: Failed to get \"write\" lock\nIs another process using the image [/srv/pool/a.qcow2]?"
    ));
    assert!(!is_disk_lock_message(
        "Cannot access storage file '/srv/pool/a.qcow2': No such file or directory"
    ));
}

fn ha(name: &str, id: u128, power: Power, epoch: u64) -> DesiredVm {
    let mut d = desired(name, id, power);
    d.spec.ha = true;
    d.epoch = epoch;
    d
}

fn drift_of(p: &Plan) -> Vec<&str> {
    p.drift.iter().map(|d| d.message.as_str()).collect()
}

#[test]
fn ha_vms_start_or_resume_only_through_an_open_gate() {
    let r = Reconciler::default();
    let closed = Gate::closed("renewing");
    for state in [VmState::Stopped, VmState::Crashed, VmState::Paused] {
        let d = ha("h", 1, Power::Running, 0);
        let seen = [observed_of(&d, state)];
        let p = r.plan_with(now(), std::slice::from_ref(&d), &[], &seen, closed);
        assert!(p.actions.is_empty(), "{state:?}: {p:?}");
        assert_eq!(drift_of(&p), ["waiting for the HA lease (state renewing)"]);
        assert!(!p.converged());
        let p = r.plan_with(now(), std::slice::from_ref(&d), &[], &seen, Gate::open());
        assert!(
            matches!(&p.actions[..], [Action::Start(_) | Action::Resume(_)]),
            "{state:?}: {p:?}"
        );
    }
    // A paused HA VM wanted paused but off starts through the gate too.
    let d = ha("h", 1, Power::Paused, 0);
    let p = r.plan_with(
        now(),
        std::slice::from_ref(&d),
        &[],
        &[observed_of(&d, VmState::Stopped)],
        closed,
    );
    assert!(p.actions.is_empty());
    // Non-HA VMs do not wait for the lease.
    let plain = desired("p", 2, Power::Running);
    let p = r.plan_with(
        now(),
        std::slice::from_ref(&plain),
        &[],
        &[observed_of(&plain, VmState::Stopped)],
        closed,
    );
    assert!(matches!(&p.actions[..], [Action::Start(_)]), "{p:?}");
    // The plan without a gate never starts an HA VM.
    let p = r.plan(
        now(),
        std::slice::from_ref(&d),
        &[observed_of(&d, VmState::Stopped)],
    );
    assert!(p.actions.is_empty());
}

#[test]
fn stopping_pausing_defining_and_removing_need_no_lease() {
    let r = Reconciler::default();
    let closed = Gate::closed("fenced");
    let stop = ha("s", 1, Power::Stopped, 0);
    let pause = ha("p", 2, Power::Paused, 0);
    let missing = ha("m", 3, Power::Running, 0);
    let old = ha("old", 4, Power::Running, 0);
    let seen = [
        observed_of(&stop, VmState::Running),
        observed_of(&pause, VmState::Running),
        observed_of(&old, VmState::Running),
    ];
    let p = r.plan_with(
        now(),
        &[stop.clone(), pause.clone(), missing.clone()],
        &[],
        &seen,
        closed,
    );
    assert_eq!(p.actions.len(), 4, "{p:?}");
    assert!(matches!(&p.actions[0], Action::Shutdown(t) if t.id == stop.id));
    assert!(matches!(&p.actions[1], Action::Suspend(t) if t.id == pause.id));
    assert_eq!(p.actions[2], Action::Define(missing));
    assert!(matches!(&p.actions[3], Action::Remove { uuid, .. } if *uuid == old.id.to_string()));
}

#[test]
fn a_stale_epoch_is_never_defined_or_started() {
    let mut r = Reconciler::default();
    // The domain here records epoch 3; the desired state says 2.
    let d3 = ha("h", 1, Power::Running, 3);
    let seen = [observed_of(&d3, VmState::Stopped)];
    let d2 = ha("h", 1, Power::Running, 2);
    r.learn_epochs(std::slice::from_ref(&d2), &seen);
    let p = r.plan_with(now(), std::slice::from_ref(&d2), &[], &seen, Gate::open());
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(drift_of(&p).len(), 1);
    assert!(drift_of(&p)[0].starts_with("stale epoch 2 < 3"), "{p:?}");
    // Once seen, the guard remembers it even when the domain is gone:
    // a stale copy is not defined again.
    let p = r.plan_with(now(), std::slice::from_ref(&d2), &[], &[], Gate::open());
    assert!(
        p.actions.is_empty() && drift_of(&p)[0].starts_with("stale epoch 2 < 3"),
        "{p:?}"
    );
    assert_eq!(r.highest_epoch(d2.id), Some(3));
    // A desired epoch seen earlier guards too.
    let mut r = Reconciler::default();
    r.learn_epochs(&[ha("h", 1, Power::Running, 5)], &[]);
    r.learn_epochs(std::slice::from_ref(&d2), &[]);
    let p = r.plan_with(now(), std::slice::from_ref(&d2), &[], &[], Gate::open());
    assert!(
        p.actions.is_empty() && drift_of(&p)[0].starts_with("stale epoch 2 < 5"),
        "{p:?}"
    );
}

#[test]
fn a_higher_epoch_or_a_new_ha_flag_retags_before_starting() {
    let mut r = Reconciler::default();
    let d1 = ha("h", 1, Power::Running, 1);
    let mut seen = [observed_of(&d1, VmState::Stopped)];
    let d2 = ha("h", 1, Power::Running, 2);
    r.learn_epochs(std::slice::from_ref(&d2), &seen);
    let p = r.plan_with(now(), std::slice::from_ref(&d2), &[], &seen, Gate::open());
    assert_eq!(p.actions, [Action::Retag(d2.clone())]);
    if let Some(m) = seen[0].managed.as_mut() {
        m.epoch = 2;
    }
    let p = r.plan_with(now(), std::slice::from_ref(&d2), &[], &seen, Gate::open());
    assert!(matches!(&p.actions[..], [Action::Start(_)]), "{p:?}");
    // A domain defined before HA metadata (ha false, epoch 0).
    let mut old = observed_of(&d2, VmState::Running);
    old.managed = Some(Managed {
        spec_hash: drift::domain_hash(&d2),
        ha: false,
        epoch: 0,
    });
    let p = r.plan_with(
        now(),
        std::slice::from_ref(&d2),
        &[],
        &[old],
        Gate::closed("no lease"),
    );
    assert_eq!(p.actions, [Action::Retag(d2.clone())]);
    // The epoch alone never redefines the domain.
    let mut e = d2.clone();
    e.epoch = 9;
    assert_eq!(drift::domain_hash(&e), drift::domain_hash(&d2));
}

#[test]
fn departed_vms_are_removed_keeping_or_deleting_disks_and_never_started() {
    let r = Reconciler::default();
    let a = ha("a", 1, Power::Running, 0);
    let b = ha("b", 2, Power::Running, 0);
    let other = desired("other", 3, Power::Running);
    let gone = [
        Departed {
            vm: a.id,
            keep_disks: true,
        },
        Departed {
            vm: b.id,
            keep_disks: false,
        },
        // Not here at all: nothing to do.
        Departed {
            vm: VmId(99),
            keep_disks: true,
        },
    ];
    let seen = [
        observed_of(&a, VmState::Running),
        observed_of(&b, VmState::Stopped),
        observed_of(&other, VmState::Running),
        foreign("hand-made", &VmId(98).to_string()),
    ];
    // `other` is no longer desired: removed as before, with its disks.
    let p = r.plan_with(now(), &[], &gone, &seen, Gate::open());
    assert_eq!(
        p.actions,
        [
            Action::Depart {
                name: "a".into(),
                uuid: a.id.to_string(),
                keep_disks: true
            },
            Action::Depart {
                name: "b".into(),
                uuid: b.id.to_string(),
                keep_disks: false
            },
            Action::Remove {
                name: "other".into(),
                uuid: other.id.to_string()
            },
        ]
    );
    // Listed as departed and desired at once: departed wins, drift says so.
    let p = r.plan_with(
        now(),
        std::slice::from_ref(&a),
        &gone[..1],
        &seen[..1],
        Gate::open(),
    );
    assert!(
        matches!(&p.actions[..], [Action::Depart { keep_disks: true, .. }]),
        "{p:?}"
    );
    assert_eq!(
        drift_of(&p),
        ["listed both as desired and as departed; treated as departed"]
    );
    // A foreign domain with a departed VM's UUID is never touched.
    let p = r.plan_with(
        now(),
        &[],
        &[Departed {
            vm: VmId(98),
            keep_disks: false,
        }],
        &seen[3..],
        Gate::open(),
    );
    assert!(p.actions.is_empty(), "{p:?}");
}

proptest! {
    /// Applying the plan's actions to a model host converges within a
    /// few passes, never touches foreign domains, and never leaves two
    /// domains with one name.
    #[test]
    fn converges_on_a_model_host(
        wants in proptest::collection::vec((0u8..6, 0u8..3), 0..6),
        has in proptest::collection::vec((0u8..6, 0u8..4, any::<bool>()), 0..6),
    ) {
        let powers = [Power::Running, Power::Paused, Power::Stopped];
        let states = [VmState::Running, VmState::Paused, VmState::Stopped, VmState::Crashed];
        let mut seen = HashSet::new();
        let want: Vec<DesiredVm> = wants
            .into_iter()
            .filter(|(n, _)| seen.insert(*n))
            .map(|(n, p)| desired(&format!("vm{n}"), u128::from(n) + 1, powers[usize::from(p)]))
            .collect();
        let mut seen = HashSet::new();
        let mut host: Vec<Observed> = has
            .into_iter()
            .filter(|(n, _, _)| seen.insert(*n))
            .map(|(n, s, managed)| {
                let d = desired(&format!("vm{n}"), u128::from(n) + 1, Power::Running);
                let mut o = observed_of(&d, states[usize::from(s)]);
                if !managed {
                    o.managed = None;
                    o.uuid = format!("foreign-{n}");
                }
                o
            })
            .collect();
        let foreign_before: Vec<Observed> = host.iter().filter(|o| o.managed.is_none()).cloned().collect();
        let r = Reconciler::default();
        let now = now();
        for _ in 0..4 {
            let plan = r.plan(now, &want, &host);
            for a in plan.actions {
                match a {
                    Action::Define(d) | Action::Redefine(d) => {
                        host.retain(|o| o.uuid != d.id.to_string());
                        host.push(observed_of(&d, VmState::Stopped));
                    }
                    Action::Start(t) | Action::Resume(t) => set(&mut host, t.id, VmState::Running),
                    Action::Suspend(t) => set(&mut host, t.id, VmState::Paused),
                    Action::Shutdown(t) => set(&mut host, t.id, VmState::Stopped),
                    Action::Remove { uuid, .. } | Action::Depart { uuid, .. } => {
                        host.retain(|o| o.uuid != uuid)
                    }
                    Action::Retag(d) => {
                        for o in host.iter_mut().filter(|o| o.uuid == d.id.to_string()) {
                            if let Some(m) = o.managed.as_mut() {
                                m.ha = d.spec.ha;
                                m.epoch = d.epoch;
                            }
                        }
                    }
                }
            }
        }
        let plan = r.plan(now, &want, &host);
        prop_assert!(plan.actions.is_empty(), "still acting: {:?}", plan.actions);
        let foreign_after: Vec<Observed> = host.iter().filter(|o| o.managed.is_none()).cloned().collect();
        prop_assert_eq!(foreign_before, foreign_after);
        let mut names = HashSet::new();
        for o in &host {
            prop_assert!(names.insert(o.name.clone()), "two domains named {}", o.name);
        }
        // Every desired VM without a foreign name clash matches.
        for d in &want {
            if let Some(o) = host.iter().find(|o| o.uuid == d.id.to_string()) {
                let matches = match d.power {
                    Power::Running => o.state == VmState::Running,
                    Power::Paused => o.state == VmState::Paused,
                    // A crashed domain is off too: both count as stopped.
                    Power::Stopped => matches!(o.state, VmState::Stopped | VmState::Crashed),
                };
                prop_assert!(matches, "{} should be {:?} but is {:?}", d.spec.name, d.power, o.state);
            } else {
                prop_assert!(host.iter().any(|o| o.name == d.spec.name && o.managed.is_none()));
            }
        }
    }
}

fn set(host: &mut [Observed], id: VmId, s: VmState) {
    for o in host.iter_mut() {
        if o.uuid == id.to_string() {
            o.state = s;
        }
    }
}
