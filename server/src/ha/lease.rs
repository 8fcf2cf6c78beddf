//! The server's view of host leases: per host, the instant the server last
//! *received* a frame from it, and the state that follows from the silence
//! since then.
//!
//! # States and the rules between them
//!
//! With `h` the heartbeat interval, `L` the lease and `W` =
//! [`LeaseTiming::fenced_after`], and `silent` the time since the last frame
//! received (or since the server started, for a host not heard in this run):
//!
//! - [`HostState::Online`]: connected, heard in this run, `silent` below
//!   [`SUSPECT_AFTER_BEATS`]`·h`.
//! - [`HostState::Suspect`]: beats missed, disconnected, or not heard yet
//!   in this run. Shown, nothing acts on it.
//! - [`HostState::LeaseExpired`]: `silent > L`. The agent's lease may have
//!   run out; it may not have fenced yet. Nothing acts on it.
//! - [`HostState::Fenced`]: `silent ≥ W`. The agent must have killed its HA
//!   VMs (the argument is in `novacron_shared::lease`): the HA controller
//!   may restart them elsewhere. This is the only state that allows it.
//! - [`HostState::Returning`]: a host declared fenced was heard again. VMs
//!   may have moved off it, so it stays here (through heartbeats,
//!   disconnects and silences shorter than `W`) until the HA controller
//!   reports it reconciled with [`HostLeases::returned_clean`]; silent for
//!   `W` again, it is fenced again.
//! - [`HostState::Maintenance`]: set by an operator; never fenced while
//!   in it. Leaving it applies the rules above at once.
//!
//! Any frame counts, not only heartbeats: the last frame received arrived
//! no earlier than the last heartbeat received, so it is no earlier than the
//! send of any heartbeat whose ack the agent holds, which is all the
//! inequality needs. Out-of-order inputs never move the last receipt back.
//!
//! A host heard again before it was declared fenced goes back to online
//! (through suspect while disconnected): nothing moved, so nothing needs
//! undoing.
//!
//! # Server start
//!
//! A host known from the store but not heard in this run counts as silent
//! since the server's start instant, and no host's lease counts as expired
//! before the start grace (at least `W`) has passed. The previous run can
//! only have acknowledged heartbeats sent before this run started, so the
//! start instant is no earlier than any of them: treating it as the last
//! receipt is safe by the same inequality, and a restart or a kill -9 of
//! the server never fences a host that reconnects in time.
//!
//! # Driving it
//!
//! Inputs ([`HostLeases::heard`], [`HostLeases::connected`],
//! [`HostLeases::disconnected`], [`HostLeases::set_maintenance`],
//! [`HostLeases::returned_clean`], [`HostLeases::forget`]) only record
//! facts. [`HostLeases::tick`] derives every host's state at `now` and
//! returns the changes since the previous tick, each stamped with that
//! `now`; a host that passed through several states between two ticks is
//! reported once, from its last reported state to its current one.
//! [`HostLeases::next_tick`] says when the next tick can have news.
//!
//! (About 380 lines of state machine; the rest is its tests, kept beside it.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use novacron_shared::ids::HostId;
use novacron_shared::lease::LeaseTiming;

/// How many heartbeat intervals without a frame make an online host suspect.
pub const SUSPECT_AFTER_BEATS: u32 = 3;

/// Where a host stands, as far as the server can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostState {
    /// Heard recently on a live session.
    Online,
    /// Heartbeats missed, disconnected, or not heard yet in this run.
    Suspect,
    /// Silent for longer than the lease; the agent may not have fenced yet.
    LeaseExpired,
    /// Silent for at least `fenced_after`: the agent must have fenced.
    Fenced,
    /// Declared fenced, then heard again; waits for the HA controller.
    Returning,
    /// Set by an operator: never fenced while in it.
    Maintenance,
}

/// A host's state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Which host.
    pub host: HostId,
    /// The state the previous tick reported.
    pub from: HostState,
    /// The state now.
    pub to: HostState,
    /// The tick's `now`, when the change was seen.
    pub at: Instant,
}

/// An input named a host the leases cannot take it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The host is not known (never enrolled, or forgotten).
    #[error("host {0} is not known")]
    UnknownHost(HostId),
    /// `returned_clean` for a host that is not returning.
    #[error("host {host} is not returning (it is {state:?})")]
    NotReturning {
        /// Which host.
        host: HostId,
        /// The state the last tick reported for it.
        state: HostState,
    },
}

/// The timing the server's lease view runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// The lease agents hold, and their fence time.
    pub timing: LeaseTiming,
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// From the server's start, how long before any lease can count as
    /// expired; raised to `timing.fenced_after()` when shorter.
    pub start_grace: Duration,
}

impl LeasePolicy {
    /// `timing` with heartbeats every `heartbeat_interval` and the shortest
    /// safe start grace (`timing.fenced_after()`).
    pub fn new(timing: LeaseTiming, heartbeat_interval: Duration) -> Self {
        Self {
            timing,
            heartbeat_interval,
            start_grace: timing.fenced_after(),
        }
    }
}

/// Whether a host has a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A session is open.
    Connected,
    /// No session: closed at `Some(instant)`, or none yet in this run.
    Disconnected(Option<Instant>),
}

/// One host's facts and its last reported state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Host {
    /// When a frame from it last arrived in this run.
    last_heard: Option<Instant>,
    link: Link,
    maintenance: bool,
    /// Declared fenced and not yet reported reconciled.
    must_return: bool,
    /// What the last tick said.
    reported: HostState,
}

impl Host {
    fn unheard() -> Self {
        Self {
            last_heard: None,
            link: Link::Disconnected(None),
            maintenance: false,
            must_return: false,
            reported: HostState::Suspect,
        }
    }
}

/// The thresholds every host is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    /// The server's start instant.
    started: Instant,
    /// No lease counts as expired before this.
    grace_end: Instant,
    /// `SUSPECT_AFTER_BEATS` heartbeat intervals.
    suspect_after: Duration,
    /// `L`.
    lease: Duration,
    /// `W`, computed once.
    fenced_after: Duration,
}

/// Every known host's lease as the server sees it (pure).
#[derive(Debug, Clone)]
pub struct HostLeases {
    rules: Rules,
    hosts: BTreeMap<HostId, Host>,
}

impl HostLeases {
    /// The leases of a server that started at `now`, knowing `known` hosts
    /// (from the store): each is suspect, and silent since `now`.
    pub fn new(policy: LeasePolicy, known: impl IntoIterator<Item = HostId>, now: Instant) -> Self {
        let fenced_after = policy.timing.fenced_after();
        let grace = policy.start_grace.max(fenced_after);
        Self {
            rules: Rules {
                started: now,
                // Past the end of time no lease expires (no silence is that long).
                grace_end: now.checked_add(grace).unwrap_or(now),
                suspect_after: policy.heartbeat_interval.saturating_mul(SUSPECT_AFTER_BEATS),
                lease: policy.timing.lease,
                fenced_after,
            },
            hosts: known.into_iter().map(|h| (h, Host::unheard())).collect(),
        }
    }

    /// How long after the last frame a host counts as fenced.
    pub fn fenced_after(&self) -> Duration {
        self.rules.fenced_after
    }

    /// The state the last tick reported for `host`.
    pub fn state(&self, host: HostId) -> Option<HostState> {
        self.hosts.get(&host).map(|h| h.reported)
    }

    /// When a frame from `host` last arrived in this run.
    pub fn last_heard(&self, host: HostId) -> Option<Instant> {
        self.hosts.get(&host).and_then(|h| h.last_heard)
    }

    /// When `host`'s session closed (`None` while connected, or when it has
    /// not connected in this run).
    pub fn disconnected_at(&self, host: HostId) -> Option<Instant> {
        match self.hosts.get(&host)?.link {
            Link::Connected => None,
            Link::Disconnected(at) => at,
        }
    }

    /// Every host with the state the last tick reported, in id order.
    pub fn hosts(&self) -> impl Iterator<Item = (HostId, HostState)> + '_ {
        self.hosts.iter().map(|(id, h)| (*id, h.reported))
    }

    /// A frame (heartbeat or any other) from `host` arrived at `now`. An
    /// unknown host (enrolled while the server runs) becomes known.
    pub fn heard(&mut self, host: HostId, now: Instant) {
        let h = self.hosts.entry(host).or_insert_with(Host::unheard);
        h.last_heard = Some(h.last_heard.map_or(now, |t| t.max(now)));
    }

    /// `host` opened a session at `now` (its hello counts as a frame).
    pub fn connected(&mut self, host: HostId, now: Instant) {
        self.heard(host, now);
        if let Some(h) = self.hosts.get_mut(&host) {
            h.link = Link::Connected;
        }
    }

    /// `host`'s session closed at `now`. The silence still counts from the
    /// last frame received, not from the close.
    pub fn disconnected(&mut self, host: HostId, now: Instant) {
        if let Some(h) = self.hosts.get_mut(&host) {
            h.link = Link::Disconnected(Some(now));
        }
    }

    /// An operator put `host` into maintenance (`on`) or took it out.
    pub fn set_maintenance(&mut self, host: HostId, on: bool) -> Result<(), LeaseError> {
        let h = self.hosts.get_mut(&host).ok_or(LeaseError::UnknownHost(host))?;
        h.maintenance = on;
        Ok(())
    }

    /// The HA controller reconciled returning `host` (VMs that moved are
    /// gone from it): the next tick derives its state afresh.
    pub fn returned_clean(&mut self, host: HostId) -> Result<(), LeaseError> {
        let h = self.hosts.get_mut(&host).ok_or(LeaseError::UnknownHost(host))?;
        if h.reported != HostState::Returning {
            return Err(LeaseError::NotReturning {
                host,
                state: h.reported,
            });
        }
        h.must_return = false;
        Ok(())
    }

    /// `host` left the fleet: it is no longer tracked.
    pub fn forget(&mut self, host: HostId) -> Result<(), LeaseError> {
        self.hosts
            .remove(&host)
            .map(|_| ())
            .ok_or(LeaseError::UnknownHost(host))
    }

    /// Derives every host's state at `now`; returns the changes since the
    /// previous tick, in host id order.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        let rules = self.rules;
        for (id, h) in &mut self.hosts {
            let to = rules.derive(h, now);
            if to == HostState::Fenced {
                h.must_return = true;
            }
            if to != h.reported {
                out.push(Transition {
                    host: *id,
                    from: h.reported,
                    to,
                    at: now,
                });
                h.reported = to;
            }
        }
        out
    }

    /// The earliest instant at which a tick can report a change without a
    /// new input: `now` when an input since the last tick is still to be
    /// reported, `None` when nothing is timed (every host in maintenance).
    pub fn next_tick(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for h in self.hosts.values() {
            let derived = self.rules.derive(h, now);
            if derived != h.reported {
                return Some(now);
            }
            if h.maintenance {
                continue;
            }
            let r = &self.rules;
            let since = r.silent_since(h);
            let thresholds = [
                Some(r.grace_end),
                since.checked_add(r.suspect_after),
                since
                    .checked_add(r.lease)
                    .and_then(|t| t.checked_add(Duration::from_nanos(1))),
                since.checked_add(r.fenced_after),
            ];
            for t in thresholds.into_iter().flatten().filter(|t| *t > now) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }
}

impl Rules {
    /// From when a host counts as silent: its last frame, or the server's
    /// start for a host not heard in this run (never earlier than the start).
    fn silent_since(&self, h: &Host) -> Instant {
        h.last_heard.map_or(self.started, |t| t.max(self.started))
    }

    /// A host's state at `now` from its facts (the rules in the module header).
    fn derive(&self, h: &Host, now: Instant) -> HostState {
        if h.maintenance {
            return HostState::Maintenance;
        }
        let silent = now.saturating_duration_since(self.silent_since(h));
        let in_grace = now < self.grace_end;
        if !in_grace && silent >= self.fenced_after {
            return HostState::Fenced;
        }
        if h.must_return {
            return HostState::Returning;
        }
        if !in_grace && silent > self.lease {
            return HostState::LeaseExpired;
        }
        let fresh = h.last_heard.is_some() && h.link == Link::Connected && silent < self.suspect_after;
        if fresh {
            HostState::Online
        } else {
            HostState::Suspect
        }
    }
}

#[cfg(test)]
mod tests {
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
}
