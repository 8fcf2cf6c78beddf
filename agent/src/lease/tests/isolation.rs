//! Tests of `lease` under keep-running and the peer witness's
//! confirmation (the helpers are the parent module's).

use super::*;

const END: u64 = 7_000; // leased(): heartbeat 1 sent at 1 s, L = 6 s.

/// `out` without the renewing warnings (no renewals come in these tests).
fn quiet(out: Vec<Action>) -> Vec<Action> {
    out.into_iter()
        .filter(|a| !matches!(a, Action::Renewing { .. }))
        .collect()
}

fn keep_running(l: &mut Lease, at: Instant) -> Vec<Action> {
    l.set_isolation(at, IsolationResponse::KeepRunning)
}

#[test]
fn keep_running_never_fences_never_starts_and_gives_the_guard_no_deadline() {
    let (t0, mut l) = leased();
    assert_eq!(keep_running(&mut l, t0 + ms(2_000)), vec![]);
    assert_eq!(l.deadline(), None, "nothing is fenced at any deadline");
    assert_eq!(l.guard_duty(), GuardDuty::StandDown);
    assert_eq!(l.lease_end(), Some(t0 + ms(END)));
    assert!(l.may_start_ha(t0 + ms(2_000)), "a lease still allows starts");
    let out = step(&mut l, t0 + ms(END), Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(END)
            },
            Action::HaVmsKept { until: None },
        ]
    );
    assert_eq!(l.state(), State::Lapsed { since: t0 + ms(END) });
    assert!(!l.may_start_ha(t0 + ms(END)));
    assert_eq!(l.next_timer(), None);
    // Any length of time later: still no fence.
    assert_eq!(step(&mut l, t0 + ms(3_600_000), Event::Tick), vec![]);
    assert_eq!(l.guard_duty(), GuardDuty::StandDown);
    // A fresh heartbeat's ack ends the lapse.
    let at = t0 + ms(3_600_100);
    send(&mut l, at, 2);
    let out = ack(&mut l, at + ms(10), 2);
    assert_eq!(out, vec![Action::LeaseAcquired { deadline: at + L }]);
    assert!(l.may_start_ha(at + ms(10)));
}

#[test]
fn switching_back_to_self_fence_rearms_the_guard_and_fences_a_lapsed_lease_at_once() {
    let (t0, mut l) = leased();
    keep_running(&mut l, t0 + ms(2_000));
    // Back while leased: the guard holds the lease end again.
    assert_eq!(
        quiet(l.set_isolation(t0 + ms(3_000), IsolationResponse::SelfFence)),
        vec![]
    );
    assert_eq!(
        l.guard_duty(),
        GuardDuty::Arm {
            deadline: t0 + ms(END)
        }
    );
    keep_running(&mut l, t0 + ms(3_000));
    step(&mut l, t0 + ms(END), Event::Tick);
    // Back after the lease ended: fence now.
    let out = l.set_isolation(t0 + ms(9_000), IsolationResponse::SelfFence);
    assert_eq!(
        out,
        vec![Action::FenceHaVms {
            mode: FenceMode::Kill
        }]
    );
    assert_eq!(
        l.state(),
        State::SelfFencing {
            since: t0 + ms(9_000)
        }
    );
    assert_eq!(l.guard_duty(), GuardDuty::Keep);
    // And keep-running now does not undo a fence under way.
    assert_eq!(keep_running(&mut l, t0 + ms(9_100)), vec![]);
    assert!(matches!(l.state(), State::SelfFencing { .. }));
    step(&mut l, t0 + ms(9_200), Event::HaVmsGone);
    assert_eq!(l.guard_duty(), GuardDuty::StandDown);
}

#[test]
fn keep_running_at_start_keeps_what_a_previous_run_left() {
    let (t0, mut l) = start();
    keep_running(&mut l, t0);
    let out = step(&mut l, t0 + L, Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost { deadline: t0 + L },
            Action::HaVmsKept { until: None }
        ]
    );
    assert_eq!(l.state(), State::Lapsed { since: t0 + L });
    // Peers hear that this run never held a lease.
    assert_eq!(l.peer_view(), LeaseView::Idle);
}

#[test]
fn a_confirmation_moves_the_fence_deadline_and_its_lapse_fences() {
    let (t0, mut l) = leased();
    let end = t0 + ms(END);
    // A confirmation ending before the lease changes nothing.
    assert_eq!(
        quiet(l.set_confirmation(t0 + ms(5_000), Some(t0 + ms(6_500)))),
        vec![]
    );
    assert_eq!(l.deadline(), Some(end));
    // One ending after it is the fence deadline, for the guard too.
    assert_eq!(l.set_confirmation(t0 + ms(5_600), Some(t0 + ms(7_600))), vec![]);
    assert_eq!(l.deadline(), Some(t0 + ms(7_600)));
    assert_eq!(
        l.guard_duty(),
        GuardDuty::Arm {
            deadline: t0 + ms(7_600)
        }
    );
    let out = step(&mut l, end, Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost { deadline: end },
            Action::HaVmsKept {
                until: Some(t0 + ms(7_600))
            },
        ]
    );
    assert_eq!(l.state(), State::Lapsed { since: end });
    assert!(!l.may_start_ha(end), "a confirmation never allows a start");
    assert_eq!(l.lease_left(end), None);
    assert_eq!(l.next_timer(), Some(t0 + ms(7_600)));
    // Rounds extend it.
    assert_eq!(l.set_confirmation(t0 + ms(7_100), Some(t0 + ms(9_100))), vec![]);
    assert_eq!(l.next_timer(), Some(t0 + ms(9_100)));
    assert_eq!(step(&mut l, t0 + ms(9_000), Event::Tick), vec![]);
    // The last extension passes: fence.
    let out = step(&mut l, t0 + ms(9_100), Event::Tick);
    assert_eq!(
        out,
        vec![Action::FenceHaVms {
            mode: FenceMode::Kill
        }]
    );
    assert_eq!(l.guard_duty(), GuardDuty::Keep);
}

#[test]
fn a_confirmation_withdrawn_or_already_past_fences_a_lapsed_lease_at_once() {
    for until in [None, Some(ms(7_500))] {
        let (t0, mut l) = leased();
        l.set_confirmation(t0 + ms(6_000), Some(t0 + ms(8_000)));
        step(&mut l, t0 + ms(END), Event::Tick);
        assert!(matches!(l.state(), State::Lapsed { .. }));
        let out = l.set_confirmation(t0 + ms(7_600), until.map(|u| t0 + u));
        assert_eq!(
            out,
            vec![Action::FenceHaVms {
                mode: FenceMode::Kill
            }],
            "{until:?}"
        );
    }
    // Without a confirmation at the lease end: fenced as always.
    let (t0, mut l) = leased();
    l.set_confirmation(t0 + ms(6_000), Some(t0 + ms(END)));
    let out = step(&mut l, t0 + ms(END), Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(END)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
}

#[test]
fn a_regained_lease_drops_the_confirmation() {
    let (t0, mut l) = leased();
    l.set_confirmation(t0 + ms(6_000), Some(t0 + ms(8_000)));
    step(&mut l, t0 + ms(END), Event::Tick);
    send(&mut l, t0 + ms(7_200), 2);
    ack(&mut l, t0 + ms(7_300), 2);
    assert_eq!(l.deadline(), Some(t0 + ms(7_200) + L));
    assert_eq!(l.lease_end(), Some(t0 + ms(7_200) + L));
    // Its next loss fences unless confirmed anew.
    let end = t0 + ms(7_200) + L;
    let out = step(&mut l, end, Event::Tick);
    assert!(
        out.contains(&Action::FenceHaVms {
            mode: FenceMode::Kill
        }),
        "{out:?}"
    );
}

#[test]
fn a_confirmation_keeps_what_a_previous_run_left_but_starts_nothing() {
    let (t0, mut l) = start();
    l.assume_prior_run();
    assert_eq!(l.witness_view(), LeaseView::Leased { until: t0 + L });
    assert_eq!(l.peer_view(), LeaseView::Idle, "it vouches for nothing yet");
    l.set_confirmation(t0 + ms(5_000), Some(t0 + L + ms(1_000)));
    assert!(!l.may_start_ha(t0 + ms(5_000)));
    let out = step(&mut l, t0 + L, Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost { deadline: t0 + L },
            Action::HaVmsKept {
                until: Some(t0 + L + ms(1_000))
            }
        ]
    );
    assert_eq!(l.witness_view(), LeaseView::Lost { since: t0 + L });
    assert_eq!(l.peer_view(), LeaseView::Idle);
    assert!(!l.may_start_ha(t0 + L));
}

#[test]
fn the_views_the_witness_rounds_and_peers_get() {
    let (t0, mut l) = start();
    assert_eq!(
        l.witness_view(),
        LeaseView::Idle,
        "no previous run: nothing at stake"
    );
    assert_eq!(l.peer_view(), LeaseView::Idle);
    // The fence guard's deadline says a previous run held a lease.
    l.limit_no_lease(t0 + ms(3_000));
    assert_eq!(
        l.witness_view(),
        LeaseView::Leased {
            until: t0 + ms(3_000)
        }
    );
    let (t0, mut l) = leased();
    let end = t0 + ms(END);
    assert_eq!(l.witness_view(), LeaseView::Leased { until: end });
    assert_eq!(l.peer_view(), LeaseView::Leased { until: end });
    step(&mut l, end, Event::Tick);
    assert_eq!(l.peer_view(), LeaseView::Lost { since: end });
    assert_eq!(l.witness_view(), LeaseView::Idle, "fencing: nothing to defend");
    step(&mut l, end + ms(500), Event::HaVmsGone);
    assert_eq!(
        l.peer_view(),
        LeaseView::Lost { since: end },
        "fenced, still lost"
    );
    send(&mut l, end + ms(600), 2);
    ack(&mut l, end + ms(700), 2);
    assert_eq!(
        l.peer_view(),
        LeaseView::Leased {
            until: end + ms(600) + L
        }
    );
}

#[test]
fn heartbeats_report_the_lease_left_at_their_send() {
    let (t0, mut l) = start();
    assert_eq!(l.lease_left(t0), None);
    send(&mut l, t0 + ms(1_000), 1);
    ack(&mut l, t0 + ms(1_050), 1);
    assert_eq!(l.lease_left(t0 + ms(1_050)), Some(L - ms(50)));
    assert_eq!(l.lease_left(t0 + ms(6_999)), Some(ms(1)));
    assert_eq!(l.lease_left(t0 + ms(7_000)), None);
    keep_running(&mut l, t0 + ms(2_000));
    assert_eq!(
        l.lease_left(t0 + ms(2_000)),
        Some(ms(5_000)),
        "keep-running: still a lease"
    );
}

#[derive(Debug, Clone)]
enum WOp {
    Wait(u64),
    /// Send a heartbeat and deliver its ack (or not).
    Beat(bool),
    /// A confirmation until `now + ms`, or none.
    Confirm(Option<u64>),
    Isolation(bool),
    Gone,
}

fn wop() -> impl Strategy<Value = WOp> {
    prop_oneof![
        4 => (0u64..3_000).prop_map(WOp::Wait),
        3 => any::<bool>().prop_map(WOp::Beat),
        3 => proptest::option::of(0u64..2_500).prop_map(WOp::Confirm),
        1 => any::<bool>().prop_map(WOp::Isolation),
        1 => Just(WOp::Gone),
    ]
}

proptest! {
    /// Over any mix of renewals, confirmations and isolation switches:
    /// HA VMs are kept (not fencing, not fenced) only under a lease, the
    /// no-lease deadline, keep-running, or a confirmation that holds;
    /// only a lease allows a start; a fence is asked for only under
    /// self-fence; the guard is armed with a deadline in the future, at or
    /// past the lease end, and never under keep-running.
    #[test]
    fn nothing_but_a_lease_keep_running_or_a_confirmation_keeps_ha_vms(
        ops in proptest::collection::vec(wop(), 1..150)
    ) {
        let (t0, mut l) = start();
        let mut now = t0;
        let mut seq = 0u64;
        let mut confirmed: Option<Instant> = None;
        for o in ops {
            let out = match o {
                WOp::Wait(d) => { now += ms(d); l.step(now, Event::Tick).unwrap() }
                WOp::Beat(delivered) => {
                    seq += 1;
                    let mut out = l.step(now, Event::HeartbeatSent { seq }).unwrap();
                    if delivered {
                        now += ms(20);
                        out.extend(l.step(now, Event::AckReceived { seq }).unwrap());
                    }
                    out
                }
                WOp::Confirm(c) => {
                    confirmed = c.map(|d| now + ms(d));
                    l.set_confirmation(now, confirmed)
                }
                WOp::Isolation(keep) => l.set_isolation(now, if keep {
                    IsolationResponse::KeepRunning
                } else {
                    IsolationResponse::SelfFence
                }),
                WOp::Gone => l.step(now, Event::HaVmsGone).unwrap(),
            };
            if out.iter().any(|a| matches!(a, Action::LeaseAcquired { .. })) {
                confirmed = None;
            }
            let keep = l.isolation() == IsolationResponse::KeepRunning;
            if out.iter().any(|a| matches!(a, Action::FenceHaVms { .. })) {
                prop_assert!(!keep, "a fence under keep-running");
            }
            match l.state() {
                State::Leased { renewed_from } | State::Renewing { renewed_from } => {
                    prop_assert!(now < renewed_from + L);
                }
                State::NoLease { fence_at } => prop_assert!(now < fence_at),
                State::Lapsed { .. } => {
                    prop_assert!(keep || confirmed.is_some_and(|c| c > now), "kept without a reason");
                }
                State::SelfFencing { .. } | State::Fenced { .. } => {}
            }
            if l.may_start_ha(now) {
                prop_assert!(matches!(l.state(), State::Leased { .. }), "{:?}", l.state());
            }
            match l.guard_duty() {
                GuardDuty::Arm { deadline } => {
                    prop_assert!(!keep);
                    prop_assert!(deadline > now);
                    if let Some(end) = l.lease_end() { prop_assert!(deadline >= end); }
                }
                GuardDuty::Keep => prop_assert!(matches!(l.state(), State::SelfFencing { .. }), "{:?}", l.state()),
                GuardDuty::StandDown => {
                    prop_assert!(keep || matches!(l.state(), State::Fenced { .. }), "{:?}", l.state());
                }
            }
        }
    }
}
