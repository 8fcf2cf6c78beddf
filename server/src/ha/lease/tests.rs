//! Tests of `lease` (in a file of their own so the module reads as one piece).

use super::*;
use novacron_shared::clock::Clock;
use novacron_shared::lease::MAX_DRIFT_PPM;

use HostState::*;

const MS: Duration = Duration::from_millis(1);
const A: HostId = HostId(1);
const B: HostId = HostId(2);

fn timing() -> LeaseTiming {
    LeaseTiming::new(Duration::from_secs(5))
}

fn policy() -> LeasePolicy {
    LeasePolicy::new(timing(), Duration::from_secs(1))
}

fn base() -> Instant {
    Clock::manual().0.now()
}

/// Leases started at `t0` knowing A and B, and ticked there.
fn started(t0: Instant) -> HostLeases {
    let mut l = HostLeases::new(policy(), [A, B], t0);
    assert!(l.tick(t0).is_empty(), "known hosts start suspect, silently");
    l
}

/// Leases past the start grace with A online, last heard at `t`.
fn online_past_grace() -> (HostLeases, Instant) {
    let t0 = base();
    let mut l = started(t0);
    let t = t0 + l.fenced_after() + Duration::from_secs(1);
    l.connected(A, t0);
    l.heard(A, t);
    l.forget(B).expect("B is known");
    l.tick(t);
    assert_eq!(l.state(A), Some(Online));
    (l, t)
}

fn moves(l: &mut HostLeases, now: Instant) -> Vec<(HostId, HostState, HostState)> {
    l.tick(now).into_iter().map(|t| (t.host, t.from, t.to)).collect()
}

#[test]
fn the_wait_is_the_shared_lease_arithmetic() {
    let l = started(base());
    assert_eq!(l.fenced_after(), timing().fenced_after());
    assert_eq!(l.fenced_after(), Duration::from_millis(7_513));
}

#[test]
fn known_hosts_start_suspect_and_come_online_when_heard() {
    let t0 = base();
    let mut l = started(t0);
    assert_eq!(l.hosts().collect::<Vec<_>>(), vec![(A, Suspect), (B, Suspect)]);
    l.connected(A, t0 + 200 * MS);
    let ts = l.tick(t0 + 300 * MS);
    assert_eq!(
        ts,
        vec![Transition {
            host: A,
            from: Suspect,
            to: Online,
            at: t0 + 300 * MS
        }]
    );
    assert_eq!(l.last_heard(A), Some(t0 + 200 * MS));
    assert_eq!(l.state(B), Some(Suspect));
}

#[test]
fn a_frame_without_a_session_is_not_online() {
    let t0 = base();
    let mut l = started(t0);
    l.heard(A, t0 + MS);
    assert!(l.tick(t0 + 2 * MS).is_empty());
    assert_eq!(l.state(A), Some(Suspect));
}

#[test]
fn no_lease_expires_within_the_start_grace() {
    // B is never heard after the start: at the grace's end, which is
    // `fenced_after` from the start, it is fenced, and not a millisecond
    // before — not even lease-expired in between.
    let t0 = base();
    let mut l = started(t0);
    let w = l.fenced_after();
    for at in [timing().lease + MS, w / 2, w - MS] {
        assert!(l.tick(t0 + at).is_empty(), "at {at:?}");
        assert_eq!(l.state(B), Some(Suspect));
    }
    assert_eq!(
        moves(&mut l, t0 + w),
        vec![(A, Suspect, Fenced), (B, Suspect, Fenced)]
    );
}

#[test]
fn a_host_that_reconnects_within_the_grace_is_never_fenced() {
    // The server restarts; A reconnects after 4 s (in a real restart the
    // agent's lease, counted from heartbeats the old run acknowledged,
    // may well be gone by now: the agent fenced, the server did not).
    let t0 = base();
    let mut l = started(t0);
    let back = t0 + Duration::from_secs(4);
    let mut seen = Vec::new();
    let mut at = t0;
    while at < t0 + Duration::from_secs(30) {
        if at == back {
            l.connected(A, at);
        } else if at > back {
            l.heard(A, at);
        }
        seen.extend(l.tick(at).into_iter().filter(|t| t.host == A));
        at += 500 * MS;
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].from, seen[0].to), (Suspect, Online));
}

#[test]
fn a_longer_start_grace_holds_and_a_shorter_one_is_raised() {
    let t0 = base();
    let w = timing().fenced_after();
    let long = LeasePolicy {
        start_grace: Duration::from_secs(60),
        ..policy()
    };
    let mut l = HostLeases::new(long, [A], t0);
    assert!(l.tick(t0 + Duration::from_secs(60) - MS).is_empty());
    assert_eq!(
        moves(&mut l, t0 + Duration::from_secs(60)),
        vec![(A, Suspect, Fenced)]
    );

    let short = LeasePolicy {
        start_grace: Duration::from_secs(1),
        ..policy()
    };
    let mut l = HostLeases::new(short, [A], t0);
    assert!(l.tick(t0 + w - MS).is_empty());
    assert_eq!(moves(&mut l, t0 + w), vec![(A, Suspect, Fenced)]);
}

#[test]
fn missed_beats_make_a_host_suspect() {
    let (mut l, t) = online_past_grace();
    let after = Duration::from_secs(u64::from(SUSPECT_AFTER_BEATS));
    assert!(l.tick(t + after - MS).is_empty());
    assert_eq!(moves(&mut l, t + after), vec![(A, Online, Suspect)]);
    l.heard(A, t + after + MS);
    assert_eq!(moves(&mut l, t + after + MS), vec![(A, Suspect, Online)]);
}

#[test]
fn silence_past_the_lease_expires_it() {
    let (mut l, t) = online_past_grace();
    let lease = timing().lease;
    l.tick(t + lease - MS);
    assert_eq!(l.state(A), Some(Suspect));
    assert!(
        l.tick(t + lease).is_empty(),
        "exactly the lease is not more than it"
    );
    assert_eq!(moves(&mut l, t + lease + MS), vec![(A, Suspect, LeaseExpired)]);
}

#[test]
fn fenced_exactly_at_fenced_after_and_not_a_millisecond_before() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.tick(t + w - 2 * MS);
    assert_eq!(l.state(A), Some(LeaseExpired));
    assert!(l.tick(t + w - MS).is_empty());
    assert_eq!(l.state(A), Some(LeaseExpired));
    assert_eq!(
        l.tick(t + w),
        vec![Transition {
            host: A,
            from: LeaseExpired,
            to: Fenced,
            at: t + w
        }]
    );
    assert!(
        l.tick(t + w + Duration::from_secs(3600)).is_empty(),
        "fenced stays fenced"
    );
}

#[test]
fn a_frame_received_late_counts_from_its_arrival_and_never_backwards() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    // A frame handed in out of order, stamped before the last one, does
    // not move the last receipt back (that would fence early).
    l.heard(A, t - Duration::from_secs(1));
    assert_eq!(l.last_heard(A), Some(t));
    assert!(!l.tick(t + w - MS).iter().any(|x| x.to == Fenced));
    assert_eq!(moves(&mut l, t + w), vec![(A, LeaseExpired, Fenced)]);
}

#[test]
fn a_skipped_tick_reports_the_change_once() {
    let (mut l, t) = online_past_grace();
    assert_eq!(
        moves(&mut l, t + Duration::from_secs(60)),
        vec![(A, Online, Fenced)]
    );
    assert!(l.tick(t + Duration::from_secs(61)).is_empty());
}

#[test]
fn heard_before_fenced_goes_back_online_without_returning() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.tick(t + w - MS);
    assert_eq!(l.state(A), Some(LeaseExpired));
    l.heard(A, t + w - MS);
    assert_eq!(moves(&mut l, t + w), vec![(A, LeaseExpired, Online)]);
    // Even a late tick after a frame that came in time: never declared
    // fenced, so nothing to undo.
    l.heard(A, t + 2 * w - MS);
    assert_eq!(moves(&mut l, t + 2 * w + Duration::from_secs(1)), vec![]);
    assert_eq!(l.state(A), Some(Online));
}

#[test]
fn a_disconnect_is_suspect_at_once_and_the_silence_counts_from_the_last_frame() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.disconnected(A, t + 100 * MS);
    assert_eq!(l.disconnected_at(A), Some(t + 100 * MS));
    assert_eq!(moves(&mut l, t + 100 * MS), vec![(A, Online, Suspect)]);
    assert!(l.tick(t + w - MS).iter().all(|x| x.to != Fenced));
    assert_eq!(moves(&mut l, t + w), vec![(A, LeaseExpired, Fenced)]);
}

#[test]
fn a_reconnect_after_a_disconnect_is_online() {
    let (mut l, t) = online_past_grace();
    l.disconnected(A, t + MS);
    l.tick(t + MS);
    l.connected(A, t + 2 * MS);
    assert_eq!(l.disconnected_at(A), None);
    assert_eq!(moves(&mut l, t + 2 * MS), vec![(A, Suspect, Online)]);
}

#[test]
fn a_fenced_host_returns_and_waits_for_the_controller() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.tick(t + w);
    assert_eq!(l.state(A), Some(Fenced));
    assert_eq!(
        l.returned_clean(A),
        Err(LeaseError::NotReturning {
            host: A,
            state: Fenced
        })
    );
    l.connected(A, t + w + Duration::from_secs(5));
    assert_eq!(
        moves(&mut l, t + w + Duration::from_secs(5)),
        vec![(A, Fenced, Returning)]
    );
    // Heartbeats, a disconnect, silence past the lease: still returning.
    let r = t + w + Duration::from_secs(5);
    for i in 1..=5u32 {
        l.heard(A, r + i * Duration::from_secs(1));
        assert!(l.tick(r + i * Duration::from_secs(1)).is_empty());
    }
    let last = r + Duration::from_secs(5);
    l.disconnected(A, last);
    assert!(l.tick(last + timing().lease + MS).is_empty());
    assert_eq!(l.state(A), Some(Returning));
    l.connected(A, last + timing().lease + MS);
    l.returned_clean(A).expect("returning");
    assert_eq!(
        moves(&mut l, last + timing().lease + 2 * MS),
        vec![(A, Returning, Online)]
    );
    assert_eq!(
        l.returned_clean(A),
        Err(LeaseError::NotReturning {
            host: A,
            state: Online
        })
    );
}

#[test]
fn a_returning_host_silent_again_is_fenced_again_at_the_bound() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.tick(t + w);
    let r = t + w + Duration::from_secs(1);
    l.connected(A, r);
    l.tick(r);
    assert_eq!(l.state(A), Some(Returning));
    assert!(l.tick(r + w - MS).is_empty());
    assert_eq!(moves(&mut l, r + w), vec![(A, Returning, Fenced)]);
}

#[test]
fn clearing_a_returning_host_that_went_silent_fences_it_again() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.tick(t + w);
    let r = t + w + Duration::from_secs(1);
    l.connected(A, r);
    l.tick(r);
    l.returned_clean(A).expect("returning");
    assert_eq!(moves(&mut l, r + w), vec![(A, Returning, Fenced)]);
}

#[test]
fn maintenance_is_never_fenced_and_leaving_it_applies_the_rules() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    l.set_maintenance(A, true).expect("known");
    assert_eq!(moves(&mut l, t + MS), vec![(A, Online, Maintenance)]);
    assert!(l.tick(t + 100 * w).is_empty());
    assert_eq!(l.next_tick(t + 100 * w), None, "nothing timed in maintenance");
    // Still silent when it leaves: the rules apply at once.
    l.set_maintenance(A, false).expect("known");
    assert_eq!(moves(&mut l, t + 100 * w), vec![(A, Maintenance, Fenced)]);
    // Into maintenance while fenced, heard, out again: returning.
    l.set_maintenance(A, true).expect("known");
    l.connected(A, t + 101 * w);
    assert_eq!(moves(&mut l, t + 101 * w), vec![(A, Fenced, Maintenance)]);
    l.set_maintenance(A, false).expect("known");
    assert_eq!(moves(&mut l, t + 101 * w), vec![(A, Maintenance, Returning)]);
}

#[test]
fn maintenance_on_a_heard_host_returns_to_online() {
    let (mut l, t) = online_past_grace();
    l.set_maintenance(A, true).expect("known");
    l.tick(t + MS);
    l.heard(A, t + 2 * MS);
    l.set_maintenance(A, false).expect("known");
    assert_eq!(moves(&mut l, t + 2 * MS), vec![(A, Maintenance, Online)]);
}

#[test]
fn unknown_hosts_are_errors_for_operators_and_known_once_heard() {
    let t0 = base();
    let mut l = started(t0);
    let c = HostId(3);
    assert_eq!(l.set_maintenance(c, true), Err(LeaseError::UnknownHost(c)));
    assert_eq!(l.returned_clean(c), Err(LeaseError::UnknownHost(c)));
    assert_eq!(l.forget(c), Err(LeaseError::UnknownHost(c)));
    l.disconnected(c, t0);
    assert_eq!(l.state(c), None, "a close does not make a host known");
    l.connected(c, t0 + MS);
    assert_eq!(moves(&mut l, t0 + MS), vec![(c, Suspect, Online)]);
    l.forget(c).expect("known now");
    assert_eq!(l.state(c), None);
    assert!(l.tick(t0 + Duration::from_secs(600)).iter().all(|x| x.host != c));
}

#[test]
fn next_tick_is_exactly_when_the_next_change_is_due() {
    let (mut l, t) = online_past_grace();
    let w = l.fenced_after();
    let mut now = t;
    let mut seen = Vec::new();
    while let Some(next) = l.next_tick(now) {
        assert!(next > now, "nothing pending right after a tick");
        // Nothing changes just before it.
        assert!(l.clone().tick(next - Duration::from_nanos(1)).is_empty());
        now = next;
        seen.extend(moves(&mut l, now));
        if l.state(A) == Some(Fenced) {
            break;
        }
    }
    assert_eq!(now, t + w);
    assert_eq!(
        seen,
        vec![
            (A, Online, Suspect),
            (A, Suspect, LeaseExpired),
            (A, LeaseExpired, Fenced)
        ]
    );
    l.heard(A, now);
    assert_eq!(l.next_tick(now), Some(now), "an input waits to be reported");
}

// ---- the server's wait against the agent's deadline ----

/// The first instant after `t` (the last receipt) at which the state
/// machine reports `host` fenced, found by bisection on fresh copies:
/// measured from the machine, not read from `fenced_after`.
fn measured_wait(l: &HostLeases, host: HostId, t: Instant) -> Duration {
    let fenced_at = |d: Duration| {
        l.clone()
            .tick(t + d)
            .iter()
            .any(|x| x.host == host && x.to == Fenced)
    };
    let (mut lo, mut hi) = (Duration::ZERO, Duration::from_secs(3600));
    assert!(!fenced_at(lo) && fenced_at(hi));
    while hi - lo > Duration::from_nanos(1) {
        let mid = lo + (hi - lo) / 2;
        if fenced_at(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// In real nanoseconds from one origin: the agent sent its last
/// acknowledged heartbeat at `s`, the server received its last
/// heartbeat at `t ≥ s`. The agent's clock runs slow by `agent_ppm`
/// (its lease lasts longest in real time), the server's runs fast by
/// `server_ppm` (its wait ends soonest). Whether the server's
/// declaration comes strictly after the agent has fenced.
fn agent_fences_first(
    timing: LeaseTiming,
    wait: Duration,
    s: u128,
    t: u128,
    agent_ppm: u64,
    server_ppm: u64,
) -> bool {
    let m = 1_000_000u128;
    // The agent's deadline: `lease` on its clock after `s`, then the
    // fence time, rounded up (later is worse).
    let lease_real = (timing.lease.as_nanos() * m).div_ceil(m - u128::from(agent_ppm));
    let agent_done = s + lease_real + timing.fence_time.as_nanos();
    // The server's declaration: `wait` on its clock after `t`, rounded
    // down (earlier is worse).
    let server_fenced = t + wait.as_nanos() * m / (m + u128::from(server_ppm));
    server_fenced > agent_done
}

#[test]
fn fenced_never_comes_before_the_agent_has_fenced_up_to_the_drift_bound() {
    let (l, t) = online_past_grace();
    let timing = timing();
    let w = measured_wait(&l, A, t);
    assert_eq!(w, l.fenced_after(), "the machine fences at W, to the nanosecond");
    let drifts = [0, 1, 100, 500, MAX_DRIFT_PPM / 2, MAX_DRIFT_PPM];
    for ppm in drifts {
        assert!(timing.is_safe_for(w, ppm), "{ppm} ppm");
    }
    // Both sides' drifts independently, the last acknowledged send at or
    // before the last receipt (one-way delay up to a whole lease).
    let t_real = 1_000_000_000_000u128;
    for agent_ppm in drifts {
        for server_ppm in drifts {
            for delay_ms in [0u128, 1, 250, 1_000, 5_000] {
                let s = t_real - delay_ms * 1_000_000;
                assert!(
                    agent_fences_first(timing, w, s, t_real, agent_ppm, server_ppm),
                    "agent {agent_ppm} ppm, server {server_ppm} ppm, delay {delay_ms} ms"
                );
            }
        }
    }
}

#[test]
fn a_shrunk_wait_lets_fenced_come_first_so_the_check_can_fail() {
    let (l, t) = online_past_grace();
    let timing = timing();
    let w = measured_wait(&l, A, t);
    let t_real = 1_000_000_000_000u128;
    // Without the margin and a little more, at the drift bound, with
    // the send and the receipt at the same instant.
    let shrunk = w - novacron_shared::lease::SAFETY_MARGIN - 2 * MS;
    assert!(!timing.is_safe_for(shrunk, MAX_DRIFT_PPM));
    assert!(!agent_fences_first(
        timing,
        shrunk,
        t_real,
        t_real,
        MAX_DRIFT_PPM,
        MAX_DRIFT_PPM
    ));
    // The naive wait (lease plus fence time) fails even with perfect clocks.
    let naive = timing.lease + timing.fence_time;
    assert!(!timing.is_safe_for(naive, 0));
    assert!(!agent_fences_first(timing, naive, t_real, t_real, 0, 0));
}

#[test]
fn acks_are_withheld_from_fenced_and_returning_hosts() {
    let (mut l, t) = online_past_grace();
    assert!(l.may_ack(A, t), "an online host is acknowledged");
    assert!(!l.may_ack(B, t), "a forgotten host is not");
    // Silent for W: a tick at that instant would call it fenced, so a
    // heartbeat checked there (before any tick ran) is not acknowledged.
    let w = t + l.fenced_after();
    assert!(l.may_ack(A, w - MS));
    assert!(!l.may_ack(A, w), "fenced by the rules, not yet reported");
    assert_eq!(l.state(A), Some(Online), "may_ack reports nothing");
    assert_eq!(moves(&mut l, w), vec![(A, Online, Fenced)]);
    assert!(!l.may_ack(A, w));
    // Heard again: returning, still no ack, before and after a tick.
    l.heard(A, w + MS);
    assert!(!l.may_ack(A, w + MS));
    assert_eq!(moves(&mut l, w + MS), vec![(A, Fenced, Returning)]);
    assert!(!l.may_ack(A, w + MS));
    // In maintenance it still waits for the controller.
    l.set_maintenance(A, true).unwrap();
    assert!(!l.may_ack(A, w + MS));
    l.set_maintenance(A, false).unwrap();
    l.returned_clean(A).unwrap();
    assert!(l.may_ack(A, w + 2 * MS), "reconciled: acks resume");
    assert_eq!(moves(&mut l, w + 2 * MS), vec![(A, Returning, Online)]);
}

#[test]
fn restored_flags_come_back_as_returning_and_maintenance() {
    let t0 = base();
    let flags = [
        (
            A,
            Restored {
                maintenance: false,
                must_return: true,
            },
        ),
        (
            B,
            Restored {
                maintenance: true,
                must_return: false,
            },
        ),
    ];
    let mut l = HostLeases::restored(policy(), flags, t0);
    assert!(l.must_return(A) && !l.must_return(B));
    assert!(l.in_maintenance(B) && !l.in_maintenance(A));
    l.connected(A, t0);
    l.connected(B, t0);
    assert!(
        !l.may_ack(A, t0),
        "declared fenced in an earlier run: no lease yet"
    );
    assert!(l.may_ack(B, t0));
    let mut got = moves(&mut l, t0);
    got.sort_by_key(|m| m.0);
    assert_eq!(got, vec![(A, Suspect, Returning), (B, Suspect, Maintenance)]);
    l.returned_clean(A).unwrap();
    assert!(!l.must_return(A));
    assert!(l.may_ack(A, t0));
    // The same hosts through `new` carry no flags.
    let mut plain = HostLeases::new(policy(), [A, B], t0);
    plain.connected(A, t0);
    assert!(plain.may_ack(A, t0));
}

#[test]
fn a_tracked_host_is_known_but_not_heard() {
    let t0 = base();
    let mut l = HostLeases::new(policy(), [], t0);
    l.track(A);
    assert_eq!(l.state(A), Some(Suspect));
    assert_eq!(l.last_heard(A), None, "tracking records no frame");
    l.connected(A, t0);
    l.track(A);
    assert_eq!(l.last_heard(A), Some(t0), "tracking a known host changes nothing");
    assert!(l.may_ack(A, t0));
}

const S: Duration = Duration::from_secs(1);

/// Like [`online_past_grace`], A beating every second with a full lease
/// from the start (no loss in this run), the last beat at the instant
/// returned.
fn leased_past_grace() -> (HostLeases, Instant) {
    let t0 = base();
    let mut l = started(t0);
    l.forget(B).expect("B is known");
    l.connected(A, t0);
    let mut t = t0;
    loop {
        l.heartbeat(A, t, Some(5 * S));
        if t >= t0 + l.fenced_after() + S {
            break;
        }
        t += S;
    }
    l.tick(t);
    assert_eq!(l.state(A), Some(Online));
    assert_eq!(l.loss(A, t), None);
    (l, t)
}

#[test]
fn the_loss_starts_at_the_reported_lease_end_and_frames_do_not_end_it() {
    let (mut l, t) = leased_past_grace();
    l.heartbeat(A, t, Some(3 * S));
    assert_eq!(l.loss(A, t + 3 * S - MS), None, "still leased");
    // Frames keep coming (acks lost one way): the lease end stands.
    l.heard(A, t + 2 * S);
    let lost = Some(Loss {
        since: t + 3 * S,
        until: None,
    });
    assert_eq!(l.loss(A, t + 3 * S), lost, "lost at receipt + lease left");
    l.heard(A, t + 4 * S);
    l.heartbeat(A, t + 5 * S, None);
    assert_eq!(l.loss(A, t + 6 * S), lost, "no lease reported: still lost");
    assert_eq!(l.state(A), Some(Online), "the state machine is unchanged");
    // A heartbeat reporting a lease ends it; the loss is remembered.
    l.heartbeat(A, t + 7 * S, Some(5 * S));
    assert_eq!(
        l.loss(A, t + 8 * S),
        Some(Loss {
            since: t + 3 * S,
            until: Some(t + 7 * S)
        })
    );
}

#[test]
fn the_loss_starts_at_the_earlier_of_receipt_plus_lease_and_the_report() {
    let (mut l, t) = leased_past_grace();
    // A lease left above L counts as L.
    l.heartbeat(A, t, Some(60 * S));
    assert_eq!(l.loss(A, t + 5 * S).map(|x| x.since), Some(t + 5 * S));
    // A heartbeat that reports no lease before that starts it at once.
    let (mut l, t) = leased_past_grace();
    l.heartbeat(A, t, Some(4 * S));
    l.heartbeat(A, t + S, None);
    assert_eq!(l.loss(A, t + S).map(|x| x.since), Some(t + S));
    // A silent host: from its last receipt plus L, as its lease.
    let (l, t) = leased_past_grace();
    assert_eq!(l.loss(A, t + 5 * S - MS), None);
    assert_eq!(l.loss(A, t + 5 * S).map(|x| x.since), Some(t + 5 * S));
    // The next tick comes when a loss starts.
    assert!(
        l.next_tick(t).is_some_and(|n| n <= t + 3 * S + S),
        "suspect first"
    );
}

#[test]
fn a_host_not_heard_since_the_start_is_lost_from_the_start_plus_the_lease() {
    let t0 = base();
    let mut l = started(t0);
    assert_eq!(l.loss(A, t0 + 5 * S - MS), None);
    assert_eq!(l.loss(A, t0 + 5 * S).map(|x| x.since), Some(t0 + 5 * S));
    // It comes back with no lease: the loss was latched at its hello.
    l.connected(A, t0 + 20 * S);
    l.heartbeat(A, t0 + 21 * S, None);
    assert_eq!(l.loss(A, t0 + 21 * S).map(|x| x.since), Some(t0 + 5 * S));
    assert!(l.loss(A, t0 + 21 * S).is_some_and(|x| x.until.is_none()));
}

#[test]
fn a_host_confirmed_off_is_fenced_at_once_and_returns_when_heard() {
    let (mut l, t) = leased_past_grace();
    let t1 = t + 6 * S;
    assert_eq!(moves(&mut l, t1), vec![(A, Online, LeaseExpired)]);
    assert!(!l.off(A));
    l.confirmed_off(A, t1).expect("known");
    assert!(l.off(A));
    assert_eq!(l.next_tick(t1), Some(t1), "news at once");
    assert_eq!(moves(&mut l, t1), vec![(A, LeaseExpired, Fenced)]);
    assert!(l.fenced_after() > 6 * S, "well before the lease wait");
    assert!(!l.may_ack(A, t1));
    // Powered on again and heard: returning, as after any fence.
    l.connected(A, t1 + S);
    assert!(!l.off(A));
    assert_eq!(moves(&mut l, t1 + S), vec![(A, Fenced, Returning)]);
    assert_eq!(
        l.confirmed_off(HostId(99), t1),
        Err(LeaseError::UnknownHost(HostId(99)))
    );
}
