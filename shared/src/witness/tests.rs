use super::*;
use std::net::SocketAddr;

fn peers(n: usize) -> Vec<WitnessPeer> {
    (0..n)
        .map(|i| WitnessPeer {
            host: HostId::random(),
            addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 7444)),
        })
        .collect()
}

fn terms(n: usize, quorum: u32) -> WitnessTerms {
    WitnessTerms {
        peers: peers(n),
        quorum,
        grace_ms: 0,
    }
}

/// A base instant from a manual clock.
fn base() -> Instant {
    crate::clock::Clock::manual().0.now()
}

fn lost(for_ms: u64) -> Contact {
    Contact::Lost { for_ms }
}

#[test]
fn quorum_is_more_than_half_with_the_asker_and_never_below_two() {
    // needed(M): at least 2 and > M/2.
    for (m, needed_) in [(1, 2), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (10, 6), (101, 51)] {
        assert_eq!(needed(m), needed_, "M = {m}");
        assert_eq!(quorum(m) as usize, needed_ - 1);
        assert!(needed_ as f64 > WITNESS_QUORUM_RATIO * m as f64);
        // And so above the default guard share too.
        assert!(needed_ as f64 > DEFAULT_MASS_FAILURE_RATIO * m as f64);
    }
    // Exactly at half is not more than half.
    assert_eq!(needed(4), 3);
}

#[test]
fn a_round_confirms_with_quorum_lost_peers_and_lasts_from_its_start() {
    let t0 = base();
    let mut w = Witness::new();
    let tm = terms(3, 2);
    let p = tm.peers.clone();
    w.set_terms(Some(tm));
    w.set_lease(LeaseView::Lost { since: t0 });
    let r = w.poll(t0).expect("a lost lease starts a round at once");
    assert_eq!(r.peers, p);
    assert!(!w.answer(t0 + Duration::from_millis(10), r.id, p[0].host, lost(10)));
    assert_eq!(w.confirmed_until(t0), None, "one peer is not a quorum");
    assert!(w.answer(t0 + Duration::from_millis(20), r.id, p[1].host, lost(20)));
    assert_eq!(w.confirmed_until(t0), Some(t0 + CONFIRMATION_VALID));
    assert_eq!(w.confirmed_until(t0 + CONFIRMATION_VALID), None, "it lapses");
}

#[test]
fn answers_that_must_not_count_do_not() {
    let t0 = base();
    let mut w = Witness::new();
    let tm = terms(3, 2);
    let p = tm.peers.clone();
    w.set_terms(Some(tm));
    w.set_lease(LeaseView::Lost { since: t0 });
    let r = w.poll(t0).unwrap();
    let ms = |n| t0 + Duration::from_millis(n);
    // The same peer twice.
    w.answer(ms(1), r.id, p[0].host, lost(1));
    assert!(!w.answer(ms(2), r.id, p[0].host, lost(2)));
    // A host that is not a listed peer.
    assert!(!w.answer(ms(3), r.id, HostId::random(), lost(3)));
    // A peer that has the server, or vouches for nothing.
    assert!(!w.answer(ms(4), r.id, p[1].host, Contact::Leased));
    assert!(!w.answer(ms(5), r.id, p[1].host, Contact::NeverLeased));
    // Another round's answer.
    assert!(!w.answer(ms(6), r.id + 1, p[1].host, lost(6)));
    // A loss that began far from ours (an independent failure).
    let far = LOSS_SKEW + Duration::from_secs(1);
    assert!(!w.answer(ms(7), r.id, p[1].host, lost(far.as_millis() as u64 + 7)));
    // Too late.
    assert!(!w.answer(
        t0 + ROUND_TIMEOUT + Duration::from_millis(1),
        r.id,
        p[1].host,
        lost(1)
    ));
    assert_eq!(w.confirmed_until(t0), None);
    // A loss within the skew, in time, from the second peer: confirms.
    let near = LOSS_SKEW - Duration::from_secs(1);
    assert!(w.answer(ms(8), r.id, p[2].host, lost(near.as_millis() as u64 + 8)));
}

#[test]
fn rounds_start_when_the_lease_is_at_stake_and_repeat() {
    let t0 = base();
    let until = t0 + Duration::from_secs(5);
    let mut w = Witness::new();
    w.set_terms(Some(terms(2, 1)));
    w.set_lease(LeaseView::Leased { until });
    let stake = until - (CONFIRMATION_VALID - ROUND_TIMEOUT);
    assert_eq!(w.poll(t0), None, "a lease far from its end needs no round");
    assert_eq!(w.next_timer(t0), Some(stake));
    let r1 = w.poll(stake).expect("at stake");
    assert_eq!(w.poll(stake + Duration::from_millis(100)), None);
    assert_eq!(w.next_timer(stake), Some(stake + ROUND_EVERY));
    let r2 = w.poll(stake + ROUND_EVERY).expect("every ROUND_EVERY");
    assert!(r2.id > r1.id);
    // The first round's confirmation covers the lease end.
    assert!(stake + CONFIRMATION_VALID > until);
}

#[test]
fn no_rounds_without_enough_peers_or_without_anything_to_defend() {
    let t0 = base();
    let mut w = Witness::new();
    w.set_lease(LeaseView::Lost { since: t0 });
    assert_eq!(w.poll(t0), None, "no terms");
    w.set_terms(Some(terms(1, 2)));
    assert!(!w.armed());
    assert_eq!(w.poll(t0), None, "fewer peers than the quorum");
    w.set_terms(Some(terms(2, 0)));
    assert_eq!(w.poll(t0), None, "a zero quorum never confirms");
    w.set_terms(Some(terms(2, 1)));
    w.set_lease(LeaseView::Idle);
    assert_eq!(w.poll(t0), None, "idle");
    assert_eq!(w.next_timer(t0), None);
}

#[test]
fn regaining_the_lease_ends_the_confirmation() {
    let t0 = base();
    let mut w = Witness::new();
    let tm = terms(1, 1);
    let p = tm.peers[0].host;
    w.set_terms(Some(tm));
    w.set_lease(LeaseView::Lost { since: t0 });
    let r = w.poll(t0).unwrap();
    assert!(w.answer(t0, r.id, p, lost(0)));
    w.set_lease(LeaseView::Leased {
        until: t0 + Duration::from_secs(5),
    });
    assert_eq!(w.confirmed_until(t0), None);
    // Lost again later: the old answers do not carry over.
    w.set_lease(LeaseView::Lost {
        since: t0 + Duration::from_secs(5),
    });
    assert_eq!(w.confirmed_until(t0 + Duration::from_secs(5)), None);
}

#[test]
fn new_terms_drop_the_round_in_flight() {
    let t0 = base();
    let mut w = Witness::new();
    let tm = terms(1, 1);
    let p = tm.peers[0].host;
    w.set_terms(Some(tm.clone()));
    w.set_lease(LeaseView::Lost { since: t0 });
    let r = w.poll(t0).unwrap();
    w.set_terms(Some(tm));
    assert!(!w.answer(t0, r.id, p, lost(0)));
}

#[test]
fn contact_reflects_the_lease() {
    let t0 = base();
    let s = Duration::from_secs(1);
    assert_eq!(
        Contact::of(LeaseView::Leased { until: t0 + s }, t0),
        Contact::Leased
    );
    assert_eq!(
        Contact::of(LeaseView::Leased { until: t0 }, t0 + s),
        Contact::Lost { for_ms: 1000 }
    );
    assert_eq!(
        Contact::of(LeaseView::Lost { since: t0 }, t0 + 2 * s),
        Contact::Lost { for_ms: 2000 }
    );
    assert_eq!(Contact::of(LeaseView::Idle, t0), Contact::NeverLeased);
}

#[test]
fn the_default_guard_fits_the_witness_and_tighter_settings_are_refused() {
    let t = WitnessTiming {
        lease: LeaseTiming::new(crate::lease::DEFAULT_LEASE),
    };
    let (ratio, window, step) = (
        DEFAULT_MASS_FAILURE_RATIO,
        Duration::from_secs(60),
        Duration::from_secs(10),
    );
    t.check(ratio, window, step).expect("the defaults fit");
    assert!(t
        .check(0.6, window, step)
        .unwrap_err()
        .contains("mass_failure_ratio"));
    assert!(t.check(f64::NAN, window, step).is_err());
    let e = t
        .check(ratio, t.min_window() - Duration::from_millis(1), step)
        .unwrap_err();
    assert!(e.contains("mass_failure_window"), "{e}");
    let e = t
        .check(ratio, window, t.min_release_step() - Duration::from_millis(1))
        .unwrap_err();
    assert!(e.contains("release_step"), "{e}");
    // The memory covers a confirmation, a round, the fence and the report delay.
    assert!(t.guard_memory() > CONFIRMATION_VALID + ROUND_TIMEOUT + t.lease.fence_time + t.report_delay());
    assert!(t.min_release_step() > CONFIRMATION_VALID + ROUND_TIMEOUT + t.lease.fence_time);
}

#[test]
fn an_armed_witness_keeps_the_vms_for_the_grace_past_the_lease_end() {
    let t0 = base();
    let end = t0 + Duration::from_secs(5);
    let grace = grace(Duration::from_secs(1));
    assert_eq!(grace, Duration::from_millis(1_500));
    let mut w = Witness::new();
    w.set_lease(LeaseView::Leased { until: end });
    let mut t = terms(2, 1);
    t.grace_ms = grace.as_millis() as u32;
    w.set_terms(Some(t.clone()));
    assert_eq!(w.confirmed_until(t0), Some(end + grace));
    w.set_lease(LeaseView::Lost { since: end });
    assert_eq!(w.confirmed_until(end), Some(end + grace));
    assert_eq!(w.confirmed_until(end + grace), None, "the grace ends");
    // Not armed (too few peers for the quorum): no grace.
    t.quorum = 3;
    w.set_terms(Some(t));
    assert_eq!(w.confirmed_until(end), None);
    // A real confirmation past the grace wins.
    let mut t = terms(1, 1);
    t.grace_ms = 100;
    let p = t.peers[0].host;
    w.set_terms(Some(t));
    let r = w.poll(end).unwrap();
    assert!(w.answer(end, r.id, p, lost(0)));
    assert_eq!(w.confirmed_until(end), Some(end + CONFIRMATION_VALID));
}
