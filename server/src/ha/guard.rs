//! The mass-failure guard: when many hosts go silent together, the likelier
//! cause is the server's own network, not that many hosts died — so no HA
//! VM is restarted (*held*) until hosts come back or an operator releases
//! it, and then restarts resume gradually.
//!
//! # Rules
//!
//! With `monitored` the hosts not in maintenance, and a host *silent* while
//! its lease state is `Suspect`, `LeaseExpired` or `Fenced` (it went silent
//! at the first step that saw it so; a host not heard since the server
//! started went silent at the start):
//!
//! A host *counts* when its lease has expired (`LeaseExpired` or
//! `Fenced`), or — with the peer witness on (`memory` set) — when it lost
//! its lease (the lease view's [`Loss`], heard or not) at any instant of
//! the last `memory` ([`WitnessTiming::guard_memory`]); a host counted by
//! its loss went silent at the loss's start (the later of the two starts
//! when both apply). Lost hosts in maintenance count too (they can
//! confirm a peer's loss); `monitored` does not include them.
//!
//! - **Enter held** when the counted hosts that went silent within the
//!   last `window` are at least two and more than `ratio · monitored`. A host only suspect (late
//!   heartbeats on a busy machine) does not count: hosts cut off together
//!   all pass their lease within a heartbeat of each other, before the
//!   first of them is fenced. One host alone never holds: in a
//!   fleet of three, losing one host is a failover, losing two at once is
//!   held.
//! - **While held** no fenced host is released, whatever its age: the
//!   window only decides entry, so a long outage of the server's network
//!   does not age into restarts.
//! - **Leave held** by itself when the hosts still counted are no longer
//!   more than the share (or fewer than two): the guard turns *releasing*
//!   and releases the fenced hosts it held back one per `release_step`
//!   (the first a step after leaving held), longest silent first; hosts fenced while releasing queue behind them.
//!   It is normal again when the queue is empty. If the share is exceeded
//!   again it is held again.
//! - **An operator** may release at any time: every fenced host is released
//!   at once and the guard is normal. The hosts silent at that moment no
//!   longer count towards a new hold (the operator judged them) until they
//!   are heard again.
//!
//! With the witness on, these are the guard's side of the argument in
//! `novacron_shared::witness` (its thresholds are checked against
//! [`WitnessTiming::check`] when the config is read): a host whose peers
//! confirm its loss is counted together with them, so the guard holds
//! before any of their VMs could be restarted.
//!
//! Pure: `now` and the hosts' lease states in, decisions out.
//!
//! [`WitnessTiming::guard_memory`]: novacron_shared::witness::WitnessTiming::guard_memory
//! [`WitnessTiming::check`]: novacron_shared::witness::WitnessTiming::check

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use novacron_shared::ids::HostId;

use super::lease::{HostState, Loss};

/// The guard's thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardPolicy {
    /// More than this share of the monitored hosts silent together holds.
    pub ratio: f64,
    /// Silences that began within this long of each other count together.
    pub window: Duration,
    /// While releasing, one more fenced host per step.
    pub release_step: Duration,
    /// With the peer witness on: hosts that lost their lease count for
    /// this long after their loss ended (`WitnessTiming::guard_memory`).
    /// `None`: losses are not counted, only expired leases.
    pub memory: Option<Duration>,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            ratio: novacron_shared::witness::DEFAULT_MASS_FAILURE_RATIO,
            window: Duration::from_secs(60),
            release_step: Duration::from_secs(10),
            memory: None,
        }
    }
}

/// Where the guard stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardState {
    /// Restarts proceed.
    Normal,
    /// No restarts.
    Held {
        /// When it was entered.
        since: Instant,
        /// Silent hosts at entry.
        silent: usize,
        /// Monitored hosts at entry.
        monitored: usize,
    },
    /// Leaving held: fenced hosts are released one per step.
    Releasing {
        /// When the next host is released.
        next: Instant,
    },
}

/// A change of the guard's state, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardChange {
    /// Entered held.
    Held {
        /// Hosts that went silent together.
        silent: usize,
        /// Hosts monitored.
        monitored: usize,
    },
    /// Started releasing by itself (hosts came back).
    Releasing,
    /// Normal again (by itself, or by an operator).
    Normal {
        /// An operator released it.
        by_operator: bool,
    },
}

/// One host as the guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLease {
    /// The host.
    pub id: HostId,
    /// Its lease state, as the server's lease view last reported it.
    pub lease: HostState,
    /// Its loss of the lease under way, or the last one that ended
    /// ([`super::lease::HostLeases::loss`]).
    pub loss: Option<Loss>,
}

impl HostLease {
    /// A host with no loss recorded.
    pub fn new(id: HostId, lease: HostState) -> Self {
        Self {
            id,
            lease,
            loss: None,
        }
    }
}

/// The guard (pure).
#[derive(Debug, Clone)]
pub struct Guard {
    policy: GuardPolicy,
    state: GuardState,
    /// When each currently silent host went silent.
    silent_since: BTreeMap<HostId, Instant>,
    /// Fenced hosts whose VMs may be restarted.
    released: BTreeSet<HostId>,
    /// Silent hosts an operator released: not counted for a new hold.
    judged: BTreeSet<HostId>,
    /// When a counted loss leaves the memory next.
    forget_at: Option<Instant>,
}

fn is_silent(s: HostState) -> bool {
    matches!(
        s,
        HostState::Suspect | HostState::LeaseExpired | HostState::Fenced
    )
}

impl Guard {
    /// A normal guard of a server that started at `now`, knowing `known`
    /// hosts (all silent since `now` until heard).
    pub fn new(policy: GuardPolicy, known: impl IntoIterator<Item = HostId>, now: Instant) -> Self {
        Self {
            policy,
            state: GuardState::Normal,
            silent_since: known.into_iter().map(|h| (h, now)).collect(),
            released: BTreeSet::new(),
            judged: BTreeSet::new(),
            forget_at: None,
        }
    }

    /// The hosts counted at `now` (module header), each with its silence
    /// start; judged hosts left out.
    fn counted(&self, now: Instant, hosts: &[HostLease]) -> BTreeMap<HostId, Instant> {
        let mut out = BTreeMap::new();
        for h in hosts {
            if self.judged.contains(&h.id) {
                continue;
            }
            let lapsed = matches!(h.lease, HostState::LeaseExpired | HostState::Fenced)
                .then(|| self.silent_since.get(&h.id).copied().unwrap_or(now));
            let lost = self.policy.memory.and_then(|m| {
                let from = now.checked_sub(m).unwrap_or(now);
                h.loss.filter(|l| l.overlaps(from, now)).map(|l| l.since)
            });
            let start = match (lapsed, lost) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if let Some(t) = start {
                out.insert(h.id, t);
            }
        }
        out
    }

    /// Where it stands.
    pub fn state(&self) -> &GuardState {
        &self.state
    }

    /// Whether the VMs of fenced `host` may be restarted now (and so
    /// whether a host whose lease expired may be fenced by hardware).
    pub fn allows(&self, host: HostId) -> bool {
        match self.state {
            GuardState::Normal => true,
            GuardState::Held { .. } => false,
            GuardState::Releasing { .. } => self.released.contains(&host),
        }
    }

    /// When time alone can change the guard next (a release step, or a
    /// counted loss leaving the memory).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let step = match self.state {
            GuardState::Releasing { next } => Some(next),
            GuardState::Normal | GuardState::Held { .. } => None,
        };
        match (step, self.forget_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// An operator releases the guard: every fenced host may restart.
    pub fn release(&mut self, hosts: &[HostLease]) -> Option<GuardChange> {
        self.released.extend(
            hosts
                .iter()
                .filter(|h| h.lease == HostState::Fenced)
                .map(|h| h.id),
        );
        self.judged.extend(
            hosts
                .iter()
                .filter(|h| is_silent(h.lease) || h.loss.is_some_and(|l| l.until.is_none()))
                .map(|h| h.id),
        );
        if self.state == GuardState::Normal {
            return None;
        }
        self.state = GuardState::Normal;
        Some(GuardChange::Normal { by_operator: true })
    }

    /// Applies the hosts' states at `now`.
    pub fn observe(&mut self, now: Instant, hosts: &[HostLease]) -> Option<GuardChange> {
        let known: BTreeSet<HostId> = hosts.iter().map(|h| h.id).collect();
        self.silent_since.retain(|h, _| known.contains(h));
        self.released.retain(|h| known.contains(h));
        self.judged.retain(|h| known.contains(h));
        let lost_now = |h: &HostLease| h.loss.is_some_and(|l| l.until.is_none());
        for h in hosts {
            if is_silent(h.lease) {
                self.silent_since.entry(h.id).or_insert(now);
            } else {
                self.silent_since.remove(&h.id);
                if !(self.policy.memory.is_some() && lost_now(h)) {
                    self.judged.remove(&h.id);
                }
            }
            if h.lease != HostState::Fenced {
                // Released for one fence only: fenced again, judged again.
                self.released.remove(&h.id);
            }
        }
        let monitored = hosts.iter().filter(|h| h.lease != HostState::Maintenance).count();
        // Counted: hosts whose lease expired (a host only late with its
        // heartbeats — suspect: a busy machine, a slow link — is no sign of
        // a mass failure; hosts cut off together all pass their lease
        // within a heartbeat of each other, before the first is fenced),
        // and with the witness, hosts that lost their lease lately.
        let counted = self.counted(now, hosts);
        self.forget_at = self.policy.memory.and_then(|m| {
            hosts
                .iter()
                .filter_map(|h| h.loss?.until?.checked_add(m + Duration::from_nanos(1)))
                .filter(|t| *t > now)
                .min()
        });
        let silent_now = counted.len();
        let expired = !counted.is_empty();
        let recent = counted
            .values()
            .filter(|t| now.saturating_duration_since(**t) <= self.policy.window)
            .count();
        let too_many = |n: usize| n >= 2 && (n as f64) > self.policy.ratio * monitored as f64;
        match self.state {
            GuardState::Normal | GuardState::Releasing { .. } if expired && too_many(recent) => {
                // Every restart stops, also of hosts released before.
                self.state = GuardState::Held {
                    since: now,
                    silent: recent,
                    monitored,
                };
                Some(GuardChange::Held {
                    silent: recent,
                    monitored,
                })
            }
            GuardState::Normal => {
                // Fenced hosts are released as they come.
                self.released.extend(
                    hosts
                        .iter()
                        .filter(|h| h.lease == HostState::Fenced)
                        .map(|h| h.id),
                );
                None
            }
            GuardState::Held { .. } if !too_many(silent_now) => {
                // The first release waits a step too: hosts coming back
                // after a network fault return over a few moments, and one
                // heard before then keeps its VMs.
                self.state = GuardState::Releasing {
                    next: now.checked_add(self.policy.release_step).unwrap_or(now),
                };
                Some(GuardChange::Releasing)
            }
            GuardState::Held { .. } => None,
            GuardState::Releasing { next } if now >= next => self.release_step(now, hosts),
            GuardState::Releasing { .. } => None,
        }
    }

    /// Releases the longest-silent held-back fenced host; normal when none
    /// is left.
    fn release_step(&mut self, now: Instant, hosts: &[HostLease]) -> Option<GuardChange> {
        let next = hosts
            .iter()
            .filter(|h| h.lease == HostState::Fenced && !self.released.contains(&h.id))
            .min_by_key(|h| (self.silent_since.get(&h.id).copied(), h.id));
        match next {
            Some(h) => {
                self.released.insert(h.id);
                self.state = GuardState::Releasing {
                    next: now.checked_add(self.policy.release_step).unwrap_or(now),
                };
                None
            }
            None => {
                self.state = GuardState::Normal;
                Some(GuardChange::Normal { by_operator: false })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::clock::Clock;

    fn hosts(states: &[HostState]) -> Vec<HostLease> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| HostLease::new(HostId(i as u128 + 1), *s))
            .collect()
    }

    use HostState::{Fenced, LeaseExpired, Online, Returning, Suspect};

    #[test]
    fn one_host_of_three_fails_over_two_at_once_are_held() {
        let (clock, manual) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        assert_eq!(g.observe(t0, &hosts(&[Online, Online, Online])), None);
        manual.advance(Duration::from_secs(10));
        let one = hosts(&[Fenced, Online, Online]);
        assert_eq!(g.observe(clock.now(), &one), None);
        assert!(g.allows(HostId(1)), "a single host's loss is a failover");

        let mut g = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        g.observe(t0, &hosts(&[Online, Online, Online]));
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(g.observe(t1, &hosts(&[Suspect, Suspect, Online])), None);
        let t2 = t0 + Duration::from_secs(8);
        assert_eq!(
            g.observe(t2, &hosts(&[Fenced, LeaseExpired, Online])),
            Some(GuardChange::Held {
                silent: 2,
                monitored: 3
            })
        );
        assert!(!g.allows(HostId(1)) && !g.allows(HostId(2)));
    }

    #[test]
    fn held_does_not_age_into_restarts_and_leaves_gradually() {
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let p = GuardPolicy::default();
        let ids = (1..=10).map(HostId);
        let mut g = Guard::new(p, ids, t0);
        let mut states = vec![Online; 10];
        g.observe(t0, &hosts(&states));
        // Four of ten (40 % > 30 %) go silent together.
        for s in states.iter_mut().take(4) {
            *s = Fenced;
        }
        let t1 = t0 + Duration::from_secs(8);
        assert!(matches!(
            g.observe(t1, &hosts(&states)),
            Some(GuardChange::Held { silent: 4, .. })
        ));
        // Long after the window, still held: nothing aged out.
        let t2 = t1 + Duration::from_secs(600);
        assert_eq!(g.observe(t2, &hosts(&states)), None);
        assert!(matches!(g.state(), GuardState::Held { .. }));
        // Two come back (returning); two remain fenced: 2 of 10 is not
        // more than the share: releasing, one host per step.
        states[0] = Returning;
        states[1] = Online;
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(g.observe(t3, &hosts(&states)), Some(GuardChange::Releasing));
        assert!(matches!(g.state(), GuardState::Releasing { .. }));
        let allowed = |g: &Guard| (3..=4).filter(|h| g.allows(HostId(*h))).count();
        assert_eq!(allowed(&g), 0, "the first release waits a step");
        assert_eq!(g.observe(t3 + p.release_step / 2, &hosts(&states)), None);
        assert_eq!(allowed(&g), 0, "not before the step");
        assert_eq!(g.observe(t3 + p.release_step, &hosts(&states)), None);
        assert_eq!(allowed(&g), 1);
        assert_eq!(g.observe(t3 + p.release_step * 2, &hosts(&states)), None);
        assert_eq!(allowed(&g), 2);
        assert_eq!(
            g.observe(t3 + p.release_step * 3, &hosts(&states)),
            Some(GuardChange::Normal { by_operator: false })
        );
        assert_eq!(g.state(), &GuardState::Normal);
    }

    #[test]
    fn an_operator_releases_every_fenced_host_at_once() {
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        let s = hosts(&[Fenced, Fenced, Fenced]);
        assert!(g.observe(t0 + Duration::from_secs(8), &s).is_some());
        assert!(!g.allows(HostId(3)));
        assert_eq!(g.release(&s), Some(GuardChange::Normal { by_operator: true }));
        assert!((1..=3).all(|h| g.allows(HostId(h))));
        // The hosts the operator released do not hold again by themselves.
        assert_eq!(g.observe(t0 + Duration::from_secs(9), &s), None);
        assert!((1..=3).all(|h| g.allows(HostId(h))));
        // Heard again, then silent again with another: a new burst holds.
        let t = t0 + Duration::from_secs(20);
        g.observe(t, &hosts(&[Online, Online, Fenced]));
        let again = g.observe(t + Duration::from_secs(8), &hosts(&[Fenced, Fenced, Fenced]));
        assert!(
            matches!(again, Some(GuardChange::Held { silent: 2, .. })),
            "{again:?}"
        );
    }

    #[test]
    fn a_server_start_with_no_host_back_is_held_after_the_grace() {
        // Hosts not heard since the start are silent since the start;
        // during the grace they are only suspect (nothing expired): no
        // hold; when the grace ends with none back, they expire together.
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        assert_eq!(g.observe(t0, &hosts(&[Suspect, Suspect, Suspect])), None);
        assert_eq!(
            g.observe(t0 + Duration::from_secs(2), &hosts(&[Online, Suspect, Suspect])),
            None
        );
        let r = g.observe(t0 + Duration::from_secs(8), &hosts(&[Online, Fenced, Fenced]));
        assert_eq!(
            r,
            Some(GuardChange::Held {
                silent: 2,
                monitored: 3
            })
        );
    }

    #[test]
    fn silences_far_apart_do_not_count_together() {
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        g.observe(t0, &hosts(&[Online, Online, Online]));
        g.observe(t0 + Duration::from_secs(1), &hosts(&[Suspect, Online, Online]));
        assert_eq!(
            g.observe(t0 + Duration::from_secs(9), &hosts(&[Fenced, Online, Online])),
            None
        );
        assert!(g.allows(HostId(1)));
        // Host 2 dies two minutes later: host 1's silence is out of the
        // window; one recent silence is a failover.
        let t = t0 + Duration::from_secs(120);
        g.observe(t, &hosts(&[Fenced, Suspect, Online]));
        assert_eq!(
            g.observe(t + Duration::from_secs(8), &hosts(&[Fenced, Fenced, Online])),
            None
        );
        assert!(g.allows(HostId(2)));
    }
}

#[cfg(test)]
mod suspect_tests {
    use super::*;
    use novacron_shared::clock::Clock;
    use HostState::{Fenced, Online, Suspect};

    #[test]
    fn a_late_host_beside_a_dead_one_does_not_hold() {
        // One host of three dies; another is only late with its heartbeats
        // (a busy machine): a failover, not a mass failure.
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let ids = [HostId(1), HostId(2), HostId(3)];
        let mut g = Guard::new(GuardPolicy::default(), ids, t0);
        let at = |states: [HostState; 3]| -> Vec<HostLease> {
            ids.iter()
                .zip(states)
                .map(|(id, lease)| HostLease::new(*id, lease))
                .collect()
        };
        g.observe(t0, &at([Online, Online, Online]));
        g.observe(t0 + Duration::from_secs(3), &at([Suspect, Suspect, Online]));
        assert_eq!(
            g.observe(t0 + Duration::from_secs(8), &at([Fenced, Suspect, Online])),
            None
        );
        assert!(g.allows(HostId(1)));
    }
}

#[cfg(test)]
mod witness_tests {
    //! The guard's steps of the witness argument (`novacron_shared::witness`).
    use super::*;
    use novacron_shared::clock::Clock;
    use HostState::{Fenced, Online};

    const S: Duration = Duration::from_secs(1);
    const MEMORY: Duration = Duration::from_secs(10);

    fn policy() -> GuardPolicy {
        GuardPolicy {
            memory: Some(MEMORY),
            ..GuardPolicy::default()
        }
    }

    fn host(id: u128, lease: HostState, loss: Option<Loss>) -> HostLease {
        HostLease {
            id: HostId(id),
            lease,
            loss,
        }
    }

    fn lost(since: Instant, until: Option<Instant>) -> Option<Loss> {
        Some(Loss { since, until })
    }

    #[test]
    fn a_one_way_partition_where_the_server_hears_hosts_that_report_no_lease_holds() {
        // Hosts 1 and 2 still reach the server, but its acks do not reach
        // them: they report no lease and may confirm each other's loss.
        // The server hears them (online) and must hold all the same.
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(policy(), (1..=3).map(HostId), t0);
        g.observe(
            t0,
            &[
                host(1, Online, None),
                host(2, Online, None),
                host(3, Online, None),
            ],
        );
        let t1 = t0 + 5 * S;
        let hosts = [
            host(1, Online, lost(t1, None)),
            host(2, Online, lost(t1 + S, None)),
            host(3, Fenced, None),
        ];
        assert_eq!(
            g.observe(t1 + 2 * S, &hosts),
            Some(GuardChange::Held {
                silent: 3,
                monitored: 3
            })
        );
        assert!(!g.allows(HostId(3)), "host 3's VMs wait");
        // Without the witness the same losses do not count.
        let mut plain = Guard::new(GuardPolicy::default(), (1..=3).map(HostId), t0);
        plain.observe(
            t0,
            &[
                host(1, Online, None),
                host(2, Online, None),
                host(3, Online, None),
            ],
        );
        assert_eq!(plain.observe(t1 + 2 * S, &hosts), None);
        assert!(plain.allows(HostId(3)));
    }

    #[test]
    fn a_host_that_regained_its_lease_still_counts_for_the_memory() {
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let mut g = Guard::new(policy(), (1..=3).map(HostId), t0);
        g.observe(
            t0,
            &[
                host(1, Online, None),
                host(2, Online, None),
                host(3, Online, None),
            ],
        );
        let t1 = t0 + 5 * S;
        let back = t1 + 2 * S;
        let hosts = |now_lost: bool| {
            let until = (!now_lost).then_some(back);
            [
                host(1, Online, lost(t1, until)),
                host(2, Online, lost(t1, until)),
                host(3, Online, None),
            ]
        };
        assert!(matches!(
            g.observe(t1 + S, &hosts(true)),
            Some(GuardChange::Held { silent: 2, .. })
        ));
        // Both regained their lease at `back`: counted until back + memory.
        assert_eq!(g.observe(back + S, &hosts(false)), None);
        assert_eq!(
            g.next_wakeup(),
            Some(back + MEMORY + Duration::from_nanos(1)),
            "wakes when the memory ends"
        );
        assert_eq!(g.observe(back + MEMORY, &hosts(false)), None);
        assert!(matches!(g.state(), GuardState::Held { .. }));
        assert_eq!(
            g.observe(back + MEMORY + S, &hosts(false)),
            Some(GuardChange::Releasing)
        );
        // Even a fresh hold can come from the memory: a loss that ended
        // counts at entry too.
        let mut g = Guard::new(policy(), (1..=3).map(HostId), t0);
        g.observe(
            t0,
            &[
                host(1, Online, None),
                host(2, Online, None),
                host(3, Online, None),
            ],
        );
        assert!(matches!(
            g.observe(back + S, &hosts(false)),
            Some(GuardChange::Held { silent: 2, .. })
        ));
    }

    #[test]
    fn a_loss_outside_the_window_does_not_enter() {
        let (clock, _) = Clock::manual();
        let t0 = clock.now();
        let p = policy();
        let mut g = Guard::new(p, (1..=3).map(HostId), t0);
        g.observe(
            t0,
            &[
                host(1, Online, None),
                host(2, Online, None),
                host(3, Online, None),
            ],
        );
        // Host 1 lost its lease long ago (and is still lost); host 2 now.
        let now = t0 + p.window + 20 * S;
        let hosts = [
            host(1, Online, lost(t0 + S, None)),
            host(2, Online, lost(now - S, None)),
            host(3, Online, None),
        ];
        assert_eq!(g.observe(now, &hosts), None, "one recent loss is no mass failure");
        assert_eq!(g.state(), &GuardState::Normal);
        // A loss that ended before the memory does not count either.
        let old = [
            host(1, Online, lost(now - 2 * MEMORY, Some(now - MEMORY - S))),
            host(2, Online, lost(now - S, None)),
            host(3, Online, None),
        ];
        assert_eq!(g.observe(now, &old), None);
    }
}
