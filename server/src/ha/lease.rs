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
//! - **Hardware fence**: a host the server's fence command confirmed off
//!   ([`HostLeases::confirmed_off`]) is `Fenced` at once (no lease wait)
//!   while nothing was heard from it since the confirmation; heard again,
//!   it is returning as after any fence.
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
//! # Lost leases (the peer witness)
//!
//! Apart from the states, the view counts when each host has *lost* its
//! lease, whether or not the server still hears it (acks lost one way, or
//! withheld), as `novacron_shared::witness` says: the host's lease end as
//! far as the server can tell is the earlier of its last receipt plus `L`
//! and its last heartbeat's receipt plus the lease left that heartbeat
//! reported ([`HostLeases::heartbeat`]; at most `L`); from then, or from a
//! heartbeat that reports no lease if that comes first, the host is lost
//! until a heartbeat reporting a lease arrives. Frames in between do not
//! end it. [`HostLeases::loss`] gives the ongoing loss or the last one
//! that ended, for the mass-failure guard's memory. A host not heard in
//! this run counts from the server's start, as above.
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
//! Inputs ([`HostLeases::heard`], [`HostLeases::heartbeat`],
//! [`HostLeases::confirmed_off`], [`HostLeases::connected`],
//! [`HostLeases::disconnected`], [`HostLeases::set_maintenance`],
//! [`HostLeases::returned_clean`], [`HostLeases::forget`]) only record
//! facts. [`HostLeases::tick`] derives every host's state at `now` and
//! returns the changes since the previous tick, each stamped with that
//! `now`; a host that passed through several states between two ticks is
//! reported once, from its last reported state to its current one.
//! [`HostLeases::next_tick`] says when the next tick can have news.

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

/// A host's loss of its lease, as the server counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// When it began (the lease end as far as the server can tell).
    pub since: Instant,
    /// When a heartbeat reporting a lease ended it; `None`: still lost.
    pub until: Option<Instant>,
}

impl Loss {
    /// Whether the host was lost at some instant of `[from, to]`.
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.since <= to && self.until.is_none_or(|u| u >= from)
    }
}

/// What the store remembers of a host across server restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// An operator put it into maintenance.
    pub maintenance: bool,
    /// It was declared fenced and has not been reported reconciled since:
    /// it comes back as returning, never straight to online.
    pub must_return: bool,
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
    /// The lease end the last heartbeat reporting a lease implies
    /// (receipt plus the lease left, at most `L`).
    lease_end: Option<Instant>,
    /// Lost since then, latched (by a heartbeat reporting no lease, or a
    /// frame after the lease end) until a heartbeat reports a lease.
    lost_since: Option<Instant>,
    /// The last loss that a heartbeat reporting a lease ended.
    last_loss: Option<Loss>,
    /// When the hardware fence confirmed the host off.
    off_at: Option<Instant>,
}

impl Host {
    fn unheard() -> Self {
        Self {
            last_heard: None,
            link: Link::Disconnected(None),
            maintenance: false,
            must_return: false,
            reported: HostState::Suspect,
            lease_end: None,
            lost_since: None,
            last_loss: None,
            off_at: None,
        }
    }
}

/// The thresholds every host is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rules {
    /// The server's start instant.
    started: Instant,
    /// No lease counts as expired before this (`None`: a grace so long
    /// that its end cannot be represented, so it never ends).
    grace_end: Option<Instant>,
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
                grace_end: now.checked_add(grace),
                suspect_after: policy.heartbeat_interval.saturating_mul(SUSPECT_AFTER_BEATS),
                lease: policy.timing.lease,
                fenced_after,
            },
            hosts: known.into_iter().map(|h| (h, Host::unheard())).collect(),
        }
    }

    /// Like [`HostLeases::new`], each known host with the flags the store
    /// kept for it (maintenance, declared fenced and not yet returned).
    pub fn restored(
        policy: LeasePolicy,
        known: impl IntoIterator<Item = (HostId, Restored)>,
        now: Instant,
    ) -> Self {
        let known: Vec<(HostId, Restored)> = known.into_iter().collect();
        let mut l = Self::new(policy, known.iter().map(|(h, _)| *h), now);
        for (id, r) in known {
            if let Some(h) = l.hosts.get_mut(&id) {
                h.maintenance = r.maintenance;
                h.must_return = r.must_return;
            }
        }
        l
    }

    /// Whether a heartbeat from `host` may be acknowledged at `now` (which
    /// would renew its lease): the host is known, the last tick did not
    /// report it fenced, a tick at `now` would call it neither fenced nor
    /// returning, and it is not waiting to return (not even in maintenance;
    /// [`HostLeases::returned_clean`] ends the wait). Reports nothing.
    pub fn may_ack(&self, host: HostId, now: Instant) -> bool {
        let Some(h) = self.hosts.get(&host) else {
            return false;
        };
        let derived = self.rules.derive(h, now);
        !h.must_return
            && h.reported != HostState::Fenced
            && !matches!(derived, HostState::Fenced | HostState::Returning)
    }

    /// Whether `host` was declared fenced and is not reported reconciled
    /// since (what the store keeps across restarts).
    pub fn must_return(&self, host: HostId) -> bool {
        self.hosts.get(&host).is_some_and(|h| h.must_return)
    }

    /// Whether `host` is in maintenance.
    pub fn in_maintenance(&self, host: HostId) -> bool {
        self.hosts.get(&host).is_some_and(|h| h.maintenance)
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
    /// unknown host (enrolled while the server runs) becomes known. A loss
    /// under way is latched: a frame does not end it.
    pub fn heard(&mut self, host: HostId, now: Instant) {
        let rules = self.rules;
        let h = self.hosts.entry(host).or_insert_with(Host::unheard);
        if h.lost_since.is_none() {
            let end = rules.lease_end(h);
            if end <= now {
                h.lost_since = Some(end);
            }
        }
        h.last_heard = Some(h.last_heard.map_or(now, |t| t.max(now)));
    }

    /// A heartbeat from `host` arrived at `now`, reporting the lease it
    /// had left when it was sent (`None`: it held none). Records the frame
    /// as [`HostLeases::heard`] does, and the loss bookkeeping of the
    /// module header.
    pub fn heartbeat(&mut self, host: HostId, now: Instant, lease_left: Option<Duration>) {
        let rules = self.rules;
        let h = self.hosts.entry(host).or_insert_with(Host::unheard);
        let end = rules.lease_end(h);
        let ongoing = h.lost_since.or((end <= now).then_some(end));
        match lease_left {
            Some(left) => {
                if let Some(since) = ongoing {
                    h.last_loss = Some(Loss {
                        since,
                        until: Some(now),
                    });
                }
                h.lost_since = None;
                // The latest report is the agent's lease as it stands.
                h.lease_end = Some(now.checked_add(left.min(rules.lease)).unwrap_or(now));
            }
            None => {
                if h.lost_since.is_none() {
                    h.lost_since = Some(ongoing.unwrap_or(now).min(now));
                }
            }
        }
        h.last_heard = Some(h.last_heard.map_or(now, |t| t.max(now)));
    }

    /// `host`'s loss at `now`: the one under way, else the last one that
    /// ended (`None`: not lost in this run).
    pub fn loss(&self, host: HostId, now: Instant) -> Option<Loss> {
        let h = self.hosts.get(&host)?;
        self.rules.loss(h, now)
    }

    /// The hardware fence confirmed `host` off at `at`: fenced at once,
    /// as long as nothing is heard from it after `at`.
    pub fn confirmed_off(&mut self, host: HostId, at: Instant) -> Result<(), LeaseError> {
        let h = self.hosts.get_mut(&host).ok_or(LeaseError::UnknownHost(host))?;
        h.off_at = Some(h.off_at.map_or(at, |t| t.max(at)));
        Ok(())
    }

    /// Whether `host` is fenced because its hardware fence confirmed it
    /// off (and it was not heard since), not only by the lease wait.
    pub fn off(&self, host: HostId) -> bool {
        self.hosts.get(&host).is_some_and(Rules::off)
    }

    /// Tracks `host` (enrolled while the server runs) as not heard yet, if
    /// it is not tracked already; records no frame.
    pub fn track(&mut self, host: HostId) {
        self.hosts.entry(host).or_insert_with(Host::unheard);
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
            let loss_start = (h.lost_since.is_none()).then(|| r.lease_end(h));
            let thresholds = [
                r.grace_end,
                loss_start,
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

    /// The lease end as far as the server can tell: the earlier of the
    /// last receipt plus `L` and what the last leased heartbeat implied.
    fn lease_end(&self, h: &Host) -> Instant {
        let by_receipt = self.silent_since(h).checked_add(self.lease);
        match (by_receipt, h.lease_end) {
            (Some(a), Some(b)) => a.min(b),
            (None, Some(b)) => b,
            (Some(a), None) => a,
            // `L` past the last receipt is beyond the clock's range: the
            // receipt itself (the earliest the loss can count from).
            (None, None) => self.silent_since(h),
        }
    }

    /// The loss under way at `now`, else the last one that ended.
    fn loss(&self, h: &Host, now: Instant) -> Option<Loss> {
        let since = h.lost_since.or_else(|| {
            let end = self.lease_end(h);
            (end <= now).then_some(end)
        });
        match since {
            Some(since) => Some(Loss { since, until: None }),
            None => h.last_loss,
        }
    }

    /// Confirmed off by the hardware fence and not heard since.
    fn off(h: &Host) -> bool {
        h.off_at.is_some_and(|at| h.last_heard.is_none_or(|t| t <= at))
    }

    /// A host's state at `now` from its facts (the rules in the module header).
    fn derive(&self, h: &Host, now: Instant) -> HostState {
        if h.maintenance {
            return HostState::Maintenance;
        }
        if Self::off(h) {
            return HostState::Fenced;
        }
        let silent = now.saturating_duration_since(self.silent_since(h));
        let in_grace = self.grace_end.is_none_or(|end| now < end);
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
mod tests;
