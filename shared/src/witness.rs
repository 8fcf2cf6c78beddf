//! The peer witness: an agent whose HA lease runs out asks its peers "do
//! you still have the server?" and keeps its HA VMs running only while
//! enough of them say no — so a server outage of any length stops nothing,
//! while a host cut off alone (from the server and its peers) fences as
//! before.
//!
//! # Who says what
//!
//! - **A peer answers** from its own lease ([`Contact::of`]): `Leased` while
//!   it holds one; `Lost { for_ms }` once the lease it held in this run ran
//!   out, with how long ago; `NeverLeased` when it has held none in this
//!   run (a just-started agent vouches for nothing). Peers talk mutual-TLS
//!   QUIC with the fleet's certificates (ALPN [`ALPN`]); the certificate
//!   names the peer, and only peers the server listed count.
//! - **An agent** ([`Witness`]) whose lease is at stake (less than
//!   `CONFIRMATION_VALID − ROUND_TIMEOUT` left) or gone starts a *round*
//!   every [`ROUND_EVERY`]: it asks every listed peer at once. The round
//!   *confirms* when at least `quorum` distinct listed peers answered
//!   `Lost` within [`ROUND_TIMEOUT`] of its start, each with a loss that
//!   began within [`LOSS_SKEW`] of the agent's own (its lease end). A
//!   confirmation lasts [`CONFIRMATION_VALID`] from the round's start. The
//!   agent keeps its HA VMs while it holds a lease or a confirmation; when
//!   it holds neither it fences within `F`, as without a witness. It never
//!   *starts* an HA VM on a confirmation: only a lease allows that.
//! - **A grace.** The leases of hosts cut off together end up to a
//!   heartbeat apart, so the first to end would find every peer still
//!   leased. With terms that can confirm, an agent keeps its HA VMs until
//!   [`grace`] past its lease end before it fences — a provisional
//!   confirmation — and the server's fence wait `W` is computed for the
//!   lease plus that grace, so the lease argument of `crate::lease`
//!   covers it unchanged; the argument below concerns only the time after.
//! - **The server** counts a host as having *lost* its lease from the
//!   host's lease end as far as it can tell (the earlier of its last
//!   receipt plus `L`, and its last heartbeat's receipt plus the
//!   [`Heartbeat::lease_left_ms`](crate::protocol::Heartbeat) it carried)
//!   until a heartbeat reporting a lease arrives — whether or not it still
//!   hears the host. Its mass-failure guard counts every host lost at any
//!   instant of the last [`WitnessTiming::guard_memory`], with the loss's
//!   start as its silence start, and holds (restarts nothing) when the
//!   count is at least two and more than `ratio · monitored` with the
//!   starts inside its window; it leaves held when the count is back
//!   within the share, and releases one host per release step.
//!
//! # The thresholds
//!
//! The server's guard holds above `ratio` (config `ha.mass_failure_ratio`,
//! [`DEFAULT_MASS_FAILURE_RATIO`]); an agent needs `quorum(M)` peers, so
//! that it plus its peers are [`needed`]`(M)` hosts: at least two and more
//! than [`WITNESS_QUORUM_RATIO`]` · M`, for `M` monitored hosts when the
//! server pushed the terms. The server refuses a `ratio` above
//! [`WITNESS_QUORUM_RATIO`]: then `needed(M) > ratio · M'` for the fleet
//! `M'` at any later time up to `M · WITNESS_QUORUM_RATIO / ratio` hosts
//! (the server pushes new terms whenever the fleet changes; the margin
//! covers an agent that missed them while cut off).
//!
//! # Why a skipped fence never meets a restart
//!
//! Real times; clocks drift by at most `ρ`; `D` bounds how late a
//! heartbeat arrives ([`WitnessTiming::report_delay`]: an HA host's session
//! dies after `L/2` without packets, and no frame outlives its session).
//! Suppose agent A runs HA VMs at time `t` without a lease, on a
//! confirmation from a round that started at `τ > t − X(1+ρ)`.
//!
//! 1. Its `q` peers each answered `Lost` at some `a_P ∈ [τ, τ + T]`, lost
//!    without a break since `e_P`, with `|e_P − e_A| ≤ ω(1+ρ) + T`. The
//!    server counted each from at most `e_P + D` through `a_P` (it cannot
//!    have received a report of a lease P did not hold), and A from at
//!    most `e_A + D` on (A holds no lease since `e_A`).
//! 2. At `t*`, the latest of those counting starts (`t* ≤ τ + T + D`),
//!    all `q + 1 = needed(M)` hosts are counted: each P was lost at some
//!    instant of `[t* − Y, t*]` because `Y ≥ (X + T)(1+ρ) + D`. Their
//!    silence starts lie within `2ω(1+ρ) + 2T + D ≤ window` of `t*`. So at
//!    `t*` the guard holds, if it did not already.
//! 3. It restarts A's VMs only after leaving held at some `t₁` and a
//!    release step `S`. Then `count(t₁) ≤ share`, so some peer of any
//!    round that confirms after `t₁` was not lost in `[t₁ − Y, t₁]`: its
//!    loss began after `t₁`. Such a round puts the guard back in held by
//!    step 2 before it ends. A runs past `t₁ + S` only on a round started
//!    after `t₁`, because `S > (X + T + F)(1+ρ)`: so no release finds A
//!    running. Once `t₁ > e_A + ω(1+ρ) + T`, no peer's loss can begin late
//!    enough to qualify, A's confirmations lapse and A fences within
//!    `X + F` — inside `S`.
//!
//! The inequalities are [`WitnessTiming::check`]; the simulation
//! (`novacron-sim`) drives server outages and partitions of every share
//! against them, and a variant that breaks one must fail it.
//!
//! What it does not cover: an operator's release of a held guard (the
//! operator judges the silent hosts down; with the witness on, a host cut
//! off from the server but not from its peers may still run its VMs — the
//! disk lock, or a hardware fence, is the guard for that).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ids::HostId;
use crate::lease::{LeaseTiming, MAX_DRIFT_PPM, SAFETY_MARGIN};
use crate::protocol::{WitnessPeer, WitnessTerms};

/// The ALPN protocol name of the peer witness's QUIC connections.
pub const ALPN: &[u8] = b"novacron-witness/1";

/// An agent skips its fence only when it and the peers that confirm are
/// more than this share of the monitored hosts.
pub const WITNESS_QUORUM_RATIO: f64 = 0.5;

/// The server's mass-failure guard ratio when its config does not say;
/// it may not exceed [`WITNESS_QUORUM_RATIO`] while the witness is on.
pub const DEFAULT_MASS_FAILURE_RATIO: f64 = 0.3;

/// How often a round starts while the lease is at stake or gone (`p`).
pub const ROUND_EVERY: Duration = Duration::from_millis(500);

/// Answers later than this after the round's start do not count (`T`).
pub const ROUND_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a confirmation lasts from its round's start (`X`).
pub const CONFIRMATION_VALID: Duration = Duration::from_secs(2);

/// A peer's loss counts only if it began within this of the agent's own
/// (`ω`): silences far apart are independent failures, which the server's
/// guard does not hold for either.
pub const LOSS_SKEW: Duration = Duration::from_secs(20);

/// The witness grace for heartbeats every `heartbeat_interval`: one
/// interval (the spread of the fleet's lease ends) plus a round.
pub fn grace(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval + ROUND_TIMEOUT
}

/// The hosts (the agent itself included) that must have lost the server
/// for an agent to skip its fence, of `monitored` hosts: at least two and
/// more than [`WITNESS_QUORUM_RATIO`] of them.
pub fn needed(monitored: usize) -> usize {
    // ⌊R·M⌋ + 1 is the least integer above R·M (R·M ≥ 0).
    let above = (WITNESS_QUORUM_RATIO * monitored as f64).floor() as usize + 1;
    above.max(2)
}

/// The peers (not counting the agent) that must confirm: `needed − 1`.
pub fn quorum(monitored: usize) -> u32 {
    u32::try_from(needed(monitored) - 1).unwrap_or(u32::MAX)
}

/// What a peer says about its own contact with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Contact {
    /// It holds a lease: it has the server.
    Leased,
    /// Its lease ran out `for_ms` ago and it has not regained one.
    Lost {
        /// Since its lease ended, ms.
        for_ms: u64,
    },
    /// It has held no lease since it started: it vouches for nothing.
    NeverLeased,
}

impl Contact {
    /// The answer of an agent whose lease is `view`, at `now`.
    pub fn of(view: LeaseView, now: Instant) -> Contact {
        match view {
            LeaseView::Leased { until } if now < until => Contact::Leased,
            LeaseView::Leased { until } => Contact::Lost {
                for_ms: millis(now.saturating_duration_since(until)),
            },
            LeaseView::Lost { since } => Contact::Lost {
                for_ms: millis(now.saturating_duration_since(since)),
            },
            LeaseView::Idle => Contact::NeverLeased,
        }
    }
}

/// A question to a peer (one per round); the answer echoes `nonce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Picked by the asker; answers with another nonce are dropped.
    pub nonce: u64,
}

/// A peer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The query's nonce.
    pub nonce: u64,
    /// Its contact with the server.
    pub contact: Contact,
}

/// The agent's own lease, as the witness needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseView {
    /// No lease and nothing to defend: no HA VM may be running on a lease
    /// of this run (no rounds).
    Idle,
    /// A lease (or, after a restart, the deadline the saved terms give)
    /// runs until `until`.
    Leased {
        /// When it ends, on the agent's clock.
        until: Instant,
    },
    /// The lease ran out at `since` and was not regained.
    Lost {
        /// When it ended.
        since: Instant,
    },
}

impl LeaseView {
    /// When the agent's loss began (or will, for a lease still running).
    fn loss_start(&self) -> Option<Instant> {
        match *self {
            LeaseView::Idle => None,
            LeaseView::Leased { until } => Some(until),
            LeaseView::Lost { since } => Some(since),
        }
    }
}

/// A round to run: ask every peer, feed each answer to
/// [`Witness::answer`] with this `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundStart {
    /// The round; also usable as the queries' nonce.
    pub id: u64,
    /// Whom to ask.
    pub peers: Vec<WitnessPeer>,
}

#[derive(Debug, Clone)]
struct Round {
    id: u64,
    started: Instant,
    lost: BTreeSet<HostId>,
}

/// The agent's side of the witness (pure: `now` in, rounds out).
#[derive(Debug, Clone)]
pub struct Witness {
    terms: Option<WitnessTerms>,
    lease: LeaseView,
    round: Option<Round>,
    confirmed_until: Option<Instant>,
    next_id: u64,
}

impl Default for Witness {
    fn default() -> Self {
        Self::new()
    }
}

impl Witness {
    /// A witness with no terms (it never confirms until it gets some).
    pub fn new() -> Self {
        Self {
            terms: None,
            lease: LeaseView::Idle,
            round: None,
            confirmed_until: None,
            next_id: 1,
        }
    }

    /// New terms from the server (or `None`: the witness is off). A round
    /// in flight is dropped; a confirmation already held stands until it
    /// lapses (its peers were listed when they answered).
    pub fn set_terms(&mut self, terms: Option<WitnessTerms>) {
        self.terms = terms;
        self.round = None;
    }

    /// The terms in force.
    pub fn terms(&self) -> Option<&WitnessTerms> {
        self.terms.as_ref()
    }

    /// The agent's lease changed. A lease regained ends any confirmation:
    /// the next loss needs rounds of its own.
    pub fn set_lease(&mut self, view: LeaseView) {
        let regained =
            matches!(view, LeaseView::Leased { .. }) && !matches!(self.lease, LeaseView::Leased { .. });
        let moved = self.lease.loss_start() != view.loss_start();
        if regained || matches!(view, LeaseView::Idle) {
            self.confirmed_until = None;
        }
        if moved {
            // Answers were judged against the old loss start.
            self.round = None;
        }
        self.lease = view;
    }

    /// Whether rounds can ever confirm: terms with at least `quorum`
    /// peers, and a quorum above zero.
    pub fn armed(&self) -> bool {
        self.terms
            .as_ref()
            .is_some_and(|t| t.quorum > 0 && t.peers.len() >= t.quorum as usize)
    }

    fn at_stake(&self, now: Instant) -> bool {
        match self.lease {
            LeaseView::Idle => false,
            LeaseView::Lost { .. } => true,
            LeaseView::Leased { until } => {
                until.saturating_duration_since(now) <= CONFIRMATION_VALID - ROUND_TIMEOUT
            }
        }
    }

    fn next_round_at(&self, now: Instant) -> Option<Instant> {
        if !self.armed() {
            return None;
        }
        let stake_from = match self.lease {
            LeaseView::Idle => return None,
            LeaseView::Lost { .. } => now,
            LeaseView::Leased { until } => until
                .checked_sub(CONFIRMATION_VALID - ROUND_TIMEOUT)
                .unwrap_or(now),
        };
        let after_last = self.round.as_ref().map(|r| r.started + ROUND_EVERY);
        Some(match after_last {
            Some(t) => t.max(stake_from),
            None => stake_from,
        })
    }

    /// Starts a round when one is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<RoundStart> {
        if !self.at_stake(now) {
            return None;
        }
        let due = self.next_round_at(now)?;
        if due > now {
            return None;
        }
        let terms = self.terms.as_ref()?;
        let id = self.next_id;
        self.next_id += 1;
        self.round = Some(Round {
            id,
            started: now,
            lost: BTreeSet::new(),
        });
        Some(RoundStart {
            id,
            peers: terms.peers.clone(),
        })
    }

    /// A peer's answer to round `round`, received at `now`; `from` is the
    /// host its certificate names. Returns whether the round confirmed
    /// with this answer.
    pub fn answer(&mut self, now: Instant, round: u64, from: HostId, contact: Contact) -> bool {
        let Some(terms) = self.terms.as_ref() else {
            return false;
        };
        let Some(r) = self.round.as_mut() else {
            return false;
        };
        if r.id != round || now > r.started + ROUND_TIMEOUT {
            return false;
        }
        if !terms.peers.iter().any(|p| p.host == from) {
            return false;
        }
        let Contact::Lost { for_ms } = contact else {
            return false;
        };
        let Some(own) = self.lease.loss_start() else {
            return false;
        };
        let Some(theirs) = now.checked_sub(Duration::from_millis(for_ms)) else {
            return false;
        };
        let skew = if theirs > own { theirs - own } else { own - theirs };
        if skew > LOSS_SKEW {
            return false;
        }
        let before = r.lost.len();
        r.lost.insert(from);
        let quorum = terms.quorum as usize;
        if r.lost.len() >= quorum && before < quorum {
            let until = r.started + CONFIRMATION_VALID;
            self.confirmed_until = Some(self.confirmed_until.map_or(until, |u| u.max(until)));
            return true;
        }
        false
    }

    /// Until when the peers' confirmation alone holds, if it holds at
    /// `now` (without the grace; for logs).
    pub fn peer_confirmation(&self, now: Instant) -> Option<Instant> {
        self.confirmed_until.filter(|&u| u > now)
    }

    /// Until when the agent may keep its HA VMs without a lease, if a
    /// confirmation (or, while armed, the grace past the lease end) holds
    /// at `now`.
    pub fn confirmed_until(&self, now: Instant) -> Option<Instant> {
        let grace = self
            .terms
            .as_ref()
            .filter(|t| t.grace_ms > 0 && self.armed())
            .and_then(|t| {
                self.lease
                    .loss_start()?
                    .checked_add(Duration::from_millis(u64::from(t.grace_ms)))
            });
        let until = match (self.confirmed_until, grace) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        until.filter(|&u| u > now)
    }

    /// When time alone can change something: the next round, or the end of
    /// the current confirmation.
    pub fn next_timer(&self, now: Instant) -> Option<Instant> {
        let round = if matches!(self.lease, LeaseView::Idle) {
            None
        } else {
            self.next_round_at(now)
        };
        let lapse = self.confirmed_until(now);
        match (round, lapse) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The witness's timing bounds for given lease terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WitnessTiming {
    /// The fleet's lease terms.
    pub lease: LeaseTiming,
}

fn drifted(d: Duration) -> Duration {
    // d · (1 + ρ)², rounded up to the millisecond.
    let ppm = u128::from(MAX_DRIFT_PPM);
    let million = 1_000_000u128;
    let n = d.as_nanos() * (million + ppm) * (million + ppm);
    let n = n.div_ceil(million * million);
    let ms = n.div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

impl WitnessTiming {
    /// `D`: how late a heartbeat (and the lease report it carries) can
    /// arrive: an HA host's session has a QUIC idle timeout of `L/2`.
    pub fn report_delay(&self) -> Duration {
        self.lease.lease / 2
    }

    /// `Y`: how long the guard keeps counting a host after it regained its
    /// lease: `(X + T + F)(1+ρ)² + D + margin`.
    pub fn guard_memory(&self) -> Duration {
        drifted(CONFIRMATION_VALID + ROUND_TIMEOUT + self.lease.fence_time)
            + self.report_delay()
            + SAFETY_MARGIN
    }

    /// The shortest mass-failure window the argument allows:
    /// `(2ω + 2T)(1+ρ)² + D + margin`.
    pub fn min_window(&self) -> Duration {
        drifted(2 * LOSS_SKEW + 2 * ROUND_TIMEOUT) + self.report_delay() + SAFETY_MARGIN
    }

    /// The shortest release step the argument allows:
    /// `(X + T + F)(1+ρ)² + margin`.
    pub fn min_release_step(&self) -> Duration {
        drifted(CONFIRMATION_VALID + ROUND_TIMEOUT + self.lease.fence_time) + SAFETY_MARGIN
    }

    /// Whether the guard's thresholds fit the argument; the error names
    /// the setting and the bound.
    pub fn check(&self, ratio: f64, window: Duration, release_step: Duration) -> Result<(), String> {
        if ratio.is_nan() || ratio > WITNESS_QUORUM_RATIO {
            return Err(format!(
                "ha.mass_failure_ratio {ratio} is above the witness quorum ratio {WITNESS_QUORUM_RATIO}: \
                 agents could skip fencing while the guard restarts their VMs"
            ));
        }
        let w = self.min_window();
        if window < w {
            return Err(format!(
                "ha.mass_failure_window {} is shorter than the witness needs ({} for a lease of {})",
                crate::duration::format(window),
                crate::duration::format(w),
                crate::duration::format(self.lease.lease),
            ));
        }
        let s = self.min_release_step();
        if release_step < s {
            return Err(format!(
                "ha.release_step {} is shorter than the witness needs ({})",
                crate::duration::format(release_step),
                crate::duration::format(s),
            ));
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
