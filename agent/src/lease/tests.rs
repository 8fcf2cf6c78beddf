//! Tests of `lease` (in a file of their own so the module reads as one
//! piece): acks, renewals, fences, sessions, terms and epochs here; the
//! isolation response and the peer witness's confirmation in
//! `tests/isolation.rs`, which shares these helpers.

use super::*;
use novacron_shared::clock::Clock;
use proptest::prelude::*;

const L: Duration = Duration::from_secs(6);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn timing() -> LeaseTiming {
    LeaseTiming::new(L)
}

/// A base instant from a manual clock, and a fresh lease started there.
fn start() -> (Instant, Lease) {
    let (clock, _) = Clock::manual();
    let t0 = clock.now();
    (t0, Lease::new(timing(), FenceMode::Kill, t0).unwrap())
}

fn step(l: &mut Lease, at: Instant, e: Event) -> Vec<Action> {
    l.step(at, e).unwrap()
}

/// Sends heartbeat `seq`; a send never fences by itself here (the
/// tests send before any deadline), so only a warning may come out.
fn send(l: &mut Lease, at: Instant, seq: u64) {
    let out = step(l, at, Event::HeartbeatSent { seq });
    assert!(
        out.iter().all(|a| matches!(a, Action::Renewing { .. })),
        "{out:?}"
    );
}

fn ack(l: &mut Lease, at: Instant, seq: u64) -> Vec<Action> {
    step(l, at, Event::AckReceived { seq })
}

/// A lease that holds heartbeat 1's lease (sent at `t0 + 1 s`).
fn leased() -> (Instant, Lease) {
    let (t0, mut l) = start();
    send(&mut l, t0 + ms(1_000), 1);
    ack(&mut l, t0 + ms(1_050), 1);
    (t0, l)
}

/// A lease whose deadline passed at `t0 + 7 s` and whose HA VMs the
/// driver confirmed gone at `t0 + 8 s`.
fn fenced() -> (Instant, Lease) {
    let (t0, mut l) = leased();
    step(&mut l, t0 + ms(7_000), Event::Tick);
    step(&mut l, t0 + ms(8_000), Event::HaVmsGone);
    assert_eq!(
        l.state(),
        State::Fenced {
            since: t0 + ms(8_000)
        }
    );
    (t0, l)
}

#[test]
fn the_first_ack_acquires_a_lease_from_its_send_instant() {
    let (t0, mut l) = start();
    assert_eq!(l.state(), State::NoLease { fence_at: t0 + L });
    assert!(!l.may_start_ha(t0));
    send(&mut l, t0 + ms(1_000), 1);
    assert!(!l.may_start_ha(t0 + ms(1_000)));
    let deadline = t0 + ms(1_000) + L;
    assert_eq!(
        ack(&mut l, t0 + ms(1_050), 1),
        vec![Action::LeaseAcquired { deadline }]
    );
    assert_eq!(
        l.state(),
        State::Leased {
            renewed_from: t0 + ms(1_000)
        }
    );
    assert_eq!(l.deadline(), Some(deadline));
    assert!(l.may_start_ha(t0 + ms(1_050)));
}

#[test]
fn a_late_ack_does_not_extend_the_lease_past_send_plus_lease() {
    let (t0, mut l) = leased();
    // Heartbeat 2 goes out at 2 s; its ack takes 1.5 s.
    send(&mut l, t0 + ms(2_000), 2);
    ack(&mut l, t0 + ms(3_500), 2);
    assert_eq!(l.deadline(), Some(t0 + ms(2_000) + L));
    assert_eq!(
        step(&mut l, t0 + ms(7_999), Event::Tick),
        vec![Action::Renewing {
            deadline: t0 + ms(8_000)
        }]
    );
    let lost = step(&mut l, t0 + ms(8_000), Event::Tick);
    assert_eq!(
        lost,
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(8_000)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
}

#[test]
fn an_ack_arriving_at_the_deadline_finds_the_lease_already_lost() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(2_000), 2);
    // No tick in between: the ack itself brings time to the deadline
    // of heartbeat 1 (7 s), and fencing starts before the ack counts.
    let out = ack(&mut l, t0 + ms(7_000), 2);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(7_000)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            },
            Action::AckIgnored {
                seq: 2,
                why: Ignored::Fencing
            },
        ]
    );
    assert_eq!(
        l.state(),
        State::SelfFencing {
            since: t0 + ms(7_000)
        }
    );
    assert!(!l.may_start_ha(t0 + ms(7_000)));
}

#[test]
fn reordered_acks_never_move_the_deadline_back() {
    let (t0, mut l) = leased();
    for (seq, at) in [(2, 2_000), (3, 3_000), (4, 4_000)] {
        send(&mut l, t0 + ms(at), seq);
    }
    ack(&mut l, t0 + ms(4_100), 4);
    let newest = Some(t0 + ms(4_000) + L);
    assert_eq!(l.deadline(), newest);
    assert_eq!(
        ack(&mut l, t0 + ms(4_200), 2),
        vec![Action::AckIgnored {
            seq: 2,
            why: Ignored::Stale
        }]
    );
    assert_eq!(
        ack(&mut l, t0 + ms(4_300), 3),
        vec![Action::AckIgnored {
            seq: 3,
            why: Ignored::Stale
        }]
    );
    assert_eq!(l.deadline(), newest);
}

#[test]
fn lost_duplicate_and_unknown_acks_renew_nothing() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(2_000), 2);
    send(&mut l, t0 + ms(3_000), 3);
    // The ack of 2 is lost; 3's arrives; then a duplicate of 3 and an
    // ack of a heartbeat never sent.
    ack(&mut l, t0 + ms(3_100), 3);
    assert_eq!(
        ack(&mut l, t0 + ms(3_200), 3),
        vec![Action::AckIgnored {
            seq: 3,
            why: Ignored::Stale
        }]
    );
    assert_eq!(
        ack(&mut l, t0 + ms(3_300), 99),
        vec![Action::AckIgnored {
            seq: 99,
            why: Ignored::Unknown
        }]
    );
    assert_eq!(l.deadline(), Some(t0 + ms(3_000) + L));
    // Every later ack lost: fenced at heartbeat 3's send plus the lease.
    send(&mut l, t0 + ms(4_000), 4);
    assert!(step(&mut l, t0 + ms(8_999), Event::Tick)
        .iter()
        .all(|a| !matches!(a, Action::FenceHaVms { .. })));
    assert!(
        step(&mut l, t0 + ms(9_000), Event::Tick).contains(&Action::FenceHaVms {
            mode: FenceMode::Kill
        })
    );
}

#[test]
fn no_renewal_for_a_third_of_the_lease_is_renewing_and_a_fresh_ack_ends_it() {
    let (t0, mut l) = leased();
    // Heartbeat 1 was sent at 1 s: renewing from 3 s.
    assert!(l.may_start_ha(t0 + ms(2_999)));
    assert!(!l.may_start_ha(t0 + ms(3_000)), "renewing is seen without a tick");
    assert_eq!(step(&mut l, t0 + ms(2_999), Event::Tick), vec![]);
    let deadline = t0 + ms(7_000);
    assert_eq!(
        step(&mut l, t0 + ms(3_000), Event::Tick),
        vec![Action::Renewing { deadline }]
    );
    assert_eq!(
        l.state(),
        State::Renewing {
            renewed_from: t0 + ms(1_000)
        }
    );
    assert_eq!(l.deadline(), Some(deadline), "still leased");
    assert_eq!(
        step(&mut l, t0 + ms(4_000), Event::Tick),
        vec![],
        "the warning is given once"
    );
    send(&mut l, t0 + ms(4_000), 2);
    let renewed = t0 + ms(4_000) + L;
    assert_eq!(
        ack(&mut l, t0 + ms(4_100), 2),
        vec![Action::Renewed { deadline: renewed }]
    );
    assert_eq!(
        l.state(),
        State::Leased {
            renewed_from: t0 + ms(4_000)
        }
    );
    assert!(l.may_start_ha(t0 + ms(4_100)));
}

#[test]
fn an_ack_of_an_old_heartbeat_extends_but_stays_renewing() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(2_000), 2);
    step(&mut l, t0 + ms(3_000), Event::Tick);
    // Heartbeat 2 (sent at 2 s) is acked at 4.5 s: past its own third.
    assert_eq!(ack(&mut l, t0 + ms(4_500), 2), vec![]);
    assert_eq!(
        l.state(),
        State::Renewing {
            renewed_from: t0 + ms(2_000)
        }
    );
    assert_eq!(l.deadline(), Some(t0 + ms(8_000)));
    assert!(!l.may_start_ha(t0 + ms(4_500)));
}

#[test]
fn the_fence_is_emitted_once_and_no_ack_restores_the_lease() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(6_000), 2);
    let out = step(&mut l, t0 + ms(7_000), Event::Tick);
    assert_eq!(
        out,
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(7_000)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
    assert_eq!(l.deadline(), None);
    assert_eq!(l.next_timer(), None);
    // Heartbeat 2 was in flight, 3 is sent while fencing: neither ack
    // brings the lease back, and nothing is emitted twice.
    send(&mut l, t0 + ms(7_500), 3);
    assert_eq!(
        ack(&mut l, t0 + ms(7_600), 2),
        vec![Action::AckIgnored {
            seq: 2,
            why: Ignored::Fencing
        }]
    );
    assert_eq!(
        ack(&mut l, t0 + ms(7_700), 3),
        vec![Action::AckIgnored {
            seq: 3,
            why: Ignored::Fencing
        }]
    );
    assert_eq!(step(&mut l, t0 + ms(60_000), Event::Tick), vec![]);
    assert_eq!(
        l.state(),
        State::SelfFencing {
            since: t0 + ms(7_000)
        }
    );
    assert!(!l.may_start_ha(t0 + ms(60_000)));
}

#[test]
fn after_the_fence_only_a_heartbeat_sent_after_it_gives_a_new_lease() {
    let (t0, mut l) = leased();
    step(&mut l, t0 + ms(7_000), Event::Tick);
    // Heartbeat 2 goes out while fencing; the HA VMs are gone at 8 s.
    send(&mut l, t0 + ms(7_500), 2);
    assert_eq!(step(&mut l, t0 + ms(8_000), Event::HaVmsGone), vec![]);
    assert_eq!(
        l.state(),
        State::Fenced {
            since: t0 + ms(8_000)
        }
    );
    assert!(!l.may_start_ha(t0 + ms(8_000)));
    assert_eq!(
        ack(&mut l, t0 + ms(8_100), 2),
        vec![Action::AckIgnored {
            seq: 2,
            why: Ignored::SentBeforeFence
        }]
    );
    assert!(!l.may_start_ha(t0 + ms(8_100)));
    send(&mut l, t0 + ms(8_500), 3);
    let deadline = t0 + ms(8_500) + L;
    assert_eq!(
        ack(&mut l, t0 + ms(8_600), 3),
        vec![Action::LeaseAcquired { deadline }]
    );
    assert_eq!(
        l.state(),
        State::Leased {
            renewed_from: t0 + ms(8_500)
        }
    );
    assert!(l.may_start_ha(t0 + ms(8_600)));
}

#[test]
fn an_ack_of_a_heartbeat_sent_a_lease_ago_gives_no_lease_after_a_fence() {
    let (t0, mut l) = fenced();
    send(&mut l, t0 + ms(9_000), 2);
    let out = ack(&mut l, t0 + ms(9_000) + L, 2);
    assert_eq!(
        out,
        vec![Action::AckIgnored {
            seq: 2,
            why: Ignored::TooLate
        }]
    );
    assert_eq!(
        l.state(),
        State::Fenced {
            since: t0 + ms(8_000)
        }
    );
    // An ack arriving just inside its lease is taken, already renewing.
    send(&mut l, t0 + ms(16_000), 3);
    let deadline = t0 + ms(16_000) + L;
    let out = ack(&mut l, t0 + ms(21_000), 3);
    assert_eq!(
        out,
        vec![Action::LeaseAcquired { deadline }, Action::Renewing { deadline }]
    );
    assert!(!l.may_start_ha(t0 + ms(21_000)));
}

#[test]
fn without_any_ack_a_fresh_agent_fences_what_a_previous_run_left() {
    let (t0, mut l) = start();
    send(&mut l, t0 + ms(1_000), 1);
    assert_eq!(l.next_timer(), Some(t0 + L));
    assert_eq!(step(&mut l, t0 + L - ms(1), Event::Tick), vec![]);
    assert_eq!(
        step(&mut l, t0 + L, Event::Tick),
        vec![
            Action::LeaseLost { deadline: t0 + L },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
    step(&mut l, t0 + L + ms(10), Event::HaVmsGone);
    assert_eq!(
        l.state(),
        State::Fenced {
            since: t0 + L + ms(10)
        }
    );
}

#[test]
fn the_driver_reporting_vms_gone_outside_a_fence_changes_nothing() {
    let (t0, mut l) = leased();
    assert_eq!(step(&mut l, t0 + ms(1_500), Event::HaVmsGone), vec![]);
    assert_eq!(
        l.state(),
        State::Leased {
            renewed_from: t0 + ms(1_000)
        }
    );
    let (t0, mut l) = fenced();
    assert_eq!(step(&mut l, t0 + ms(9_000), Event::HaVmsGone), vec![]);
    assert_eq!(
        l.state(),
        State::Fenced {
            since: t0 + ms(8_000)
        }
    );
}

#[test]
fn a_new_session_keeps_the_lease_and_restarts_sequence_numbers() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(2_000), 2);
    send(&mut l, t0 + ms(3_000), 3);
    // Renewing since 3 s (heartbeat 1 at 1 s); the reconnect keeps it.
    assert_eq!(step(&mut l, t0 + ms(3_500), Event::SessionStarted), vec![]);
    assert_eq!(
        l.state(),
        State::Renewing {
            renewed_from: t0 + ms(1_000)
        }
    );
    // Numbers of the old session mean nothing in the new one.
    assert_eq!(
        ack(&mut l, t0 + ms(3_600), 3),
        vec![Action::AckIgnored {
            seq: 3,
            why: Ignored::Unknown
        }]
    );
    send(&mut l, t0 + ms(4_000), 1);
    assert_eq!(
        ack(&mut l, t0 + ms(4_100), 1),
        vec![Action::Renewed {
            deadline: t0 + ms(4_000) + L
        }]
    );
    assert_eq!(l.deadline(), Some(t0 + ms(10_000)));
}

#[test]
fn a_reused_heartbeat_number_is_refused_and_changes_nothing() {
    let (t0, mut l) = leased();
    send(&mut l, t0 + ms(2_000), 5);
    let err = l
        .step(t0 + ms(6_000), Event::HeartbeatSent { seq: 5 })
        .unwrap_err();
    assert_eq!(err, LeaseError::HeartbeatSeqNotIncreasing { seq: 5, last: 5 });
    assert!(l.step(t0 + ms(6_000), Event::HeartbeatSent { seq: 4 }).is_err());
    // The ack of 5 still counts from its first send, at 2 s.
    ack(&mut l, t0 + ms(6_100), 5);
    assert_eq!(l.deadline(), Some(t0 + ms(2_000) + L));
}

#[test]
fn heartbeats_in_flight_are_bounded_and_the_oldest_go_first() {
    let (t0, mut l) = leased();
    let n = MAX_IN_FLIGHT as u64 + 1;
    for i in 0..n {
        send(&mut l, t0 + ms(1_000 + i), 2 + i);
    }
    assert_eq!(l.in_flight.len(), MAX_IN_FLIGHT);
    // Heartbeat 2 was forgotten; 3 still counts.
    assert_eq!(
        ack(&mut l, t0 + ms(1_100), 2),
        vec![Action::AckIgnored {
            seq: 2,
            why: Ignored::Unknown
        }]
    );
    ack(&mut l, t0 + ms(1_100), 3);
    assert_eq!(l.deadline(), Some(t0 + ms(1_001) + L));
    assert_eq!(l.in_flight.len(), MAX_IN_FLIGHT - 1);
}

#[test]
fn a_shutdown_grace_must_fit_inside_the_fence_time() {
    let (clock, _) = Clock::manual();
    let t0 = clock.now();
    let t = timing();
    let too_long = FenceMode::ShutdownThenKill { grace: t.fence_time };
    assert_eq!(
        Lease::new(t, too_long, t0).unwrap_err(),
        LeaseError::GraceExceedsFenceTime {
            grace: t.fence_time,
            fence_time: t.fence_time
        }
    );
    let mode = FenceMode::ShutdownThenKill {
        grace: t.fence_time - ms(500),
    };
    let mut l = Lease::new(t, mode, t0).unwrap();
    assert_eq!(l.mode(), mode);
    assert!(step(&mut l, t0 + L, Event::Tick).contains(&Action::FenceHaVms { mode }));
}

#[test]
fn may_start_ha_across_the_whole_lifecycle() {
    let (t0, mut l) = start();
    let at = |n| t0 + ms(n);
    let mut checks: Vec<(u64, bool)> = Vec::new();
    let mut check = |l: &Lease, n: u64, expect: bool| {
        assert_eq!(l.may_start_ha(at(n)), expect, "at {n} ms in {:?}", l.state());
        checks.push((n, expect));
    };
    check(&l, 0, false); // no lease yet
    send(&mut l, at(500), 1);
    check(&l, 500, false); // sent, not acked
    ack(&mut l, at(600), 1);
    check(&l, 600, true); // leased
    check(&l, 2_499, true);
    check(&l, 2_500, false); // renewing (500 + 6000 / 3)
    step(&mut l, at(2_500), Event::Tick);
    check(&l, 2_500, false);
    send(&mut l, at(3_000), 2);
    ack(&mut l, at(3_050), 2);
    check(&l, 3_050, true); // renewed
    step(&mut l, at(9_000), Event::Tick);
    check(&l, 9_000, false); // fencing (deadline 3000 + 6000)
    send(&mut l, at(9_100), 3);
    ack(&mut l, at(9_150), 3);
    check(&l, 9_150, false); // no ack helps while fencing
    step(&mut l, at(9_500), Event::HaVmsGone);
    check(&l, 9_500, false); // fenced
    send(&mut l, at(10_000), 4);
    check(&l, 10_000, false);
    ack(&mut l, at(10_100), 4);
    check(&l, 10_100, true); // a new lease after the confirmed fence
    step(&mut l, at(11_000), Event::SessionStarted);
    check(&l, 11_000, true); // a reconnect keeps it
    check(&l, 12_000, false); // renewing again (10000 + 2000)
    assert_eq!(checks.iter().filter(|c| c.1).count(), 5);
}

#[test]
fn the_epoch_guard_refuses_stale_epochs() {
    let (a, b) = (VmId(1), VmId(2));
    let mut g = EpochGuard::new();
    assert_eq!(g.highest(a), None);
    assert!(g.admit(a, 3));
    assert!(g.admit(a, 3), "the same epoch again is the same placement");
    assert!(!g.admit(a, 2));
    assert!(g.admit(a, 5));
    assert!(!g.admit(a, 4));
    assert!(!g.admit(a, 0));
    assert_eq!(g.highest(a), Some(5));
    // Per VM: another VM's epochs are its own.
    assert!(g.admit(b, 1));
    assert_eq!(g.highest(b), Some(1));
    assert_eq!(g.highest(a), Some(5));
}

#[derive(Debug, Clone)]
enum Op {
    Wait(u64),
    Send,
    /// Deliver the ack of the `k`-th newest heartbeat sent this session
    /// (again, if it was delivered already).
    Ack(usize),
    Bogus(u64),
    Session,
    Gone,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4_000).prop_map(Op::Wait),
        4 => Just(Op::Send),
        4 => (0usize..6).prop_map(Op::Ack),
        1 => any::<u64>().prop_map(Op::Bogus),
        1 => Just(Op::Session),
        1 => Just(Op::Gone),
    ]
}

proptest! {
    /// Over any order of sends, delays, losses, duplicates, reordering,
    /// bogus acks, reconnects and fence reports: a held lease always
    /// ends at the send instant of a heartbeat whose ack arrived plus
    /// the lease, and `now` is before it; the deadline of a held lease
    /// never moves back; one fence per loss; starting HA VMs is allowed
    /// only under a lease earned after the last fence was confirmed.
    #[test]
    fn the_lease_never_outlives_an_acked_send(ops in proptest::collection::vec(op(), 1..200)) {
        let (t0, mut l) = start();
        let mut now = t0;
        let mut seq = 0u64;
        let mut sent: Vec<(u64, Instant)> = Vec::new();
        let mut acked_sends: Vec<Instant> = Vec::new();
        let mut last_deadline: Option<Instant> = None;
        // Fences and losses since the last lease acquired.
        let mut fences = 0usize;
        let mut losses = 0usize;
        let mut gone_at: Option<Instant> = None;
        for o in ops {
            let event = match o {
                Op::Wait(d) => { now += ms(d); Event::Tick }
                Op::Send => { seq += 1; sent.push((seq, now)); Event::HeartbeatSent { seq } }
                Op::Ack(k) => match sent.len().checked_sub(k + 1).map(|i| sent[i]) {
                    Some((s, at)) => { acked_sends.push(at); Event::AckReceived { seq: s } }
                    None => Event::Tick,
                },
                Op::Bogus(s) => Event::AckReceived { seq: s },
                Op::Session => { seq = 0; sent.clear(); Event::SessionStarted }
                Op::Gone => {
                    if matches!(l.state(), State::SelfFencing { .. }) { gone_at = Some(now); }
                    Event::HaVmsGone
                }
            };
            let out = l.step(now, event).unwrap();
            for a in &out {
                match a {
                    Action::FenceHaVms { .. } => fences += 1,
                    Action::LeaseLost { .. } => losses += 1,
                    _ => {}
                }
            }
            match l.state() {
                State::Leased { renewed_from } | State::Renewing { renewed_from } => {
                    let deadline = l.deadline().unwrap();
                    prop_assert_eq!(deadline, renewed_from + L);
                    prop_assert!(now < deadline);
                    prop_assert!(acked_sends.contains(&renewed_from), "renewed from a send never acked");
                    if let Some(g) = gone_at { prop_assert!(renewed_from >= g); }
                    if let Some(prev) = last_deadline { prop_assert!(deadline >= prev); }
                    last_deadline = Some(deadline);
                    prop_assert_eq!(l.may_start_ha(now), now < renewed_from + L / RENEWING_DIVISOR);
                }
                State::NoLease { .. } | State::Lapsed { .. } | State::SelfFencing { .. } | State::Fenced { .. } => {
                    last_deadline = None;
                    prop_assert!(!l.may_start_ha(now));
                }
            }
            prop_assert_eq!(fences, losses);
            prop_assert!(fences <= 1, "more than one fence between two leases");
            if out.iter().any(|a| matches!(a, Action::LeaseAcquired { .. })) {
                fences = 0;
                losses = 0;
            }
        }
    }
}

/// `timing()` with another lease length.
fn with_lease(lease: Duration) -> LeaseTiming {
    LeaseTiming { lease, ..timing() }
}

#[test]
fn new_terms_recompute_the_deadline_from_the_same_send_instant() {
    let (t0, mut l) = leased();
    let sent = t0 + ms(1_000);
    // Longer: the same heartbeat now holds the lease for 10 s.
    let out = l
        .set_timing(t0 + ms(2_000), with_lease(ms(10_000)), FenceMode::Kill)
        .unwrap();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(l.deadline(), Some(sent + ms(10_000)));
    assert_eq!(l.next_timer(), Some(sent + ms(10_000) / RENEWING_DIVISOR));
    // Shorter: 3 s from the same send; nothing happens before it...
    assert!(l
        .set_timing(t0 + ms(2_000), with_lease(ms(3_000)), FenceMode::Kill)
        .unwrap()
        .iter()
        .all(|a| matches!(a, Action::Renewing { .. })));
    assert_eq!(l.deadline(), Some(sent + ms(3_000)));
    assert!(step(&mut l, sent + ms(2_999), Event::Tick).is_empty());
    // ...and at it the HA VMs are fenced.
    assert_eq!(
        step(&mut l, sent + ms(3_000), Event::Tick),
        vec![
            Action::LeaseLost {
                deadline: sent + ms(3_000)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
}

#[test]
fn terms_that_end_the_lease_fence_at_once() {
    let (t0, mut l) = leased();
    let sent = t0 + ms(1_000);
    let mode = FenceMode::ShutdownThenKill { grace: ms(500) };
    let out = l.set_timing(t0 + ms(4_000), with_lease(ms(2_000)), mode).unwrap();
    assert_eq!(
        out,
        vec![
            Action::LeaseLost {
                deadline: sent + ms(2_000)
            },
            Action::FenceHaVms { mode }
        ]
    );
    assert_eq!(l.mode(), mode);
}

#[test]
fn a_longer_lease_ends_a_renewing_warning_and_a_shorter_one_starts_it() {
    let (t0, mut l) = leased();
    let sent = t0 + ms(1_000);
    // 6 s lease: renewing from sent + 2 s.
    let out = step(&mut l, sent + ms(2_500), Event::Tick);
    assert_eq!(out, vec![Action::Renewing { deadline: sent + L }]);
    assert!(!l.may_start_ha(sent + ms(2_500)));
    let out = l
        .set_timing(sent + ms(2_500), with_lease(ms(12_000)), FenceMode::Kill)
        .unwrap();
    assert_eq!(
        out,
        vec![Action::Renewed {
            deadline: sent + ms(12_000)
        }]
    );
    assert!(l.may_start_ha(sent + ms(2_500)));
    let out = l
        .set_timing(sent + ms(2_500), with_lease(ms(6_000)), FenceMode::Kill)
        .unwrap();
    assert_eq!(out, vec![Action::Renewing { deadline: sent + L }]);
}

#[test]
fn without_a_lease_new_terms_only_bring_the_start_deadline_forward() {
    let (t0, mut l) = start();
    assert_eq!(l.deadline(), Some(t0 + L));
    l.set_timing(t0 + ms(100), with_lease(ms(20_000)), FenceMode::Kill)
        .unwrap();
    assert_eq!(l.deadline(), Some(t0 + L), "a previous run may have held L");
    l.set_timing(t0 + ms(100), with_lease(ms(2_000)), FenceMode::Kill)
        .unwrap();
    assert_eq!(l.deadline(), Some(t0 + ms(2_000)));
    // The next lease is counted under the new terms.
    send(&mut l, t0 + ms(1_000), 1);
    ack(&mut l, t0 + ms(1_100), 1);
    assert_eq!(l.deadline(), Some(t0 + ms(3_000)));
}

#[test]
fn terms_with_a_grace_longer_than_the_fence_time_change_nothing() {
    let (t0, mut l) = leased();
    let e = l
        .set_timing(
            t0 + ms(1_500),
            with_lease(ms(1_000)),
            FenceMode::ShutdownThenKill {
                grace: timing().fence_time,
            },
        )
        .unwrap_err();
    assert!(matches!(e, LeaseError::GraceExceedsFenceTime { .. }), "{e}");
    assert_eq!(l.timing(), timing());
    assert_eq!(l.deadline(), Some(t0 + ms(1_000) + L));
}

#[test]
fn a_previous_runs_deadline_only_brings_the_no_lease_fence_forward() {
    let (t0, mut l) = start();
    l.limit_no_lease(t0 + L + ms(1));
    assert_eq!(l.deadline(), Some(t0 + L));
    l.limit_no_lease(t0 + ms(1_500));
    assert_eq!(l.deadline(), Some(t0 + ms(1_500)));
    assert!(step(&mut l, t0 + ms(1_499), Event::Tick).is_empty());
    assert_eq!(
        step(&mut l, t0 + ms(1_500), Event::Tick),
        vec![
            Action::LeaseLost {
                deadline: t0 + ms(1_500)
            },
            Action::FenceHaVms {
                mode: FenceMode::Kill
            }
        ]
    );
    // Under a lease it changes nothing.
    let (t0, mut l) = leased();
    l.limit_no_lease(t0);
    assert_eq!(l.deadline(), Some(t0 + ms(1_000) + L));
}

mod isolation;
