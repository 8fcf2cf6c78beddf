//! The agent's HA lease: renewed by heartbeat acks, and at its deadline the
//! agent stops its HA VMs itself, before the server can restart them
//! elsewhere. Pure: `now` and events in, actions out; no clock reads, no
//! I/O. Its driver (`crate::ha`) feeds it the link's heartbeats, acks,
//! sessions and lease terms, the VM loop asks [`Lease::may_start_ha`]
//! before starting an HA VM, and the driver performs [`Action::FenceHaVms`].
//!
//! # The safety argument it relies on
//!
//! `novacron_shared::lease` states the inequality: the server declares a
//! silent host fenced `W = LeaseTiming::fenced_after()` after the last
//! heartbeat it *received*, and that comes after the agent's fence as long
//! as the agent's lease ends no later than `s_n + L` on its own monotonic
//! clock, `s_n` being when it *sent* the newest heartbeat whose ack it
//! holds, and the agent kills its HA VMs within `F` of that deadline. This
//! module keeps the agent's half:
//!
//! - A deadline is only ever `sent + L` for a heartbeat whose ack arrived:
//!   never counted from the ack's arrival, never from an ack this session
//!   did not send a heartbeat for (unknown sequence numbers are ignored),
//!   and a heartbeat sequence number may not be reused (a reused number
//!   could tie an old ack to a newer send time).
//! - Deadlines only move forward: an ack of an older heartbeat than the
//!   newest acknowledged one is ignored. Heartbeats in flight are kept with
//!   their send instants, at most [`MAX_IN_FLIGHT`]; evicting the oldest
//!   only loses a lease that would have ended earlier (the safe side).
//! - Time is applied before every event, so an ack that arrives at or past
//!   the deadline cannot revive the lease: fencing starts first.
//! - Once fencing starts, no ack restores the lease. A new lease needs an
//!   ack of a heartbeat sent after the driver confirmed every HA VM gone.
//! - A fresh `Lease` (agent start) assumes a previous run of the agent may
//!   have held a lease until `start + L` (its heartbeats were all sent
//!   before `start`), so without a new lease by then it fences too: HA VMs
//!   left running by a killed agent are not left to outlive the server's
//!   wait (unless keep-running or a confirmation keeps them, as below).
//! - [`FenceMode::ShutdownThenKill`] must fit its grace inside `F`.
//!
//! Two things keep HA VMs past the lease end instead of fencing them (the
//! lease is [`State::Lapsed`] then; [`Action::LeaseLost`] is still
//! emitted, and no HA VM may *start* — only a lease allows that):
//!
//! - the isolation response [`IsolationResponse::KeepRunning`]
//!   ([`Lease::set_isolation`], from the lease terms): no fence at all, and
//!   no deadline for the fence guard ([`Lease::guard_duty`]); switching
//!   back to self-fence fences at once a lease already gone;
//! - a confirmation of the peer witness ([`Lease::set_confirmation`], the
//!   `confirmed_until` of `novacron_shared::witness::Witness`): the fence
//!   deadline is `max(lease end, confirmed until)`, and the fence guard's
//!   deadline follows it. When the confirmation lapses without a new one,
//!   the lease fences at once. The safety argument for it is in
//!   `novacron_shared::witness`; this module only never lets a
//!   confirmation start anything or outlast its `until`.
//!
//! Either way a lease regained (an ack of a heartbeat sent less than `L`
//! ago) ends the lapse. What the witness needs of the lease is
//! [`Lease::witness_view`] (for its own rounds) and [`Lease::peer_view`]
//! (what peers are told).
//!
//! Only [`Instant`]s are used: the wall clock can jump without effect.
//!
//! Epochs: [`EpochGuard`] keeps the highest epoch seen per VM (in desired
//! states and in domain metadata), for the reconciler to refuse a copy of
//! a VM from a stale placement.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use novacron_shared::ids::VmId;
use novacron_shared::lease::LeaseTiming;
pub use novacron_shared::protocol::IsolationResponse;
use novacron_shared::witness::LeaseView;

/// Most heartbeats kept in flight (awaiting their ack); older ones are
/// forgotten first.
pub const MAX_IN_FLIGHT: usize = 64;

/// The lease turns [`State::Renewing`] when no renewal came within
/// `L / RENEWING_DIVISOR` of the newest acknowledged heartbeat's send.
pub const RENEWING_DIVISOR: u32 = 3;

/// How the agent stops its HA VMs when its lease ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FenceMode {
    /// Kill them at once (the default).
    #[default]
    Kill,
    /// Ask the guests to shut down, and kill what still runs after `grace`.
    ShutdownThenKill {
        /// How long the guests get before they are killed; less than the
        /// lease timing's fence time.
        grace: Duration,
    },
}

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Before the first ack since the agent started. HA VMs a previous run
    /// left behind are fenced at `fence_at` unless a lease comes first
    /// (or, as after a lease, keep-running or a confirmation keeps them).
    NoLease {
        /// When any lease a previous run held has ended for sure.
        fence_at: Instant,
    },
    /// Held and recently renewed.
    Leased {
        /// When the newest acknowledged heartbeat was sent.
        renewed_from: Instant,
    },
    /// Still held, but no renewal for a while: a warning; no new HA VM is
    /// started until a renewal.
    Renewing {
        /// When the newest acknowledged heartbeat was sent.
        renewed_from: Instant,
    },
    /// The lease (or a previous run's) ended at `since`, and the HA VMs
    /// keep running: the isolation response is keep-running, or the peer
    /// witness confirms the server is lost to much of the fleet. No HA VM
    /// starts; a renewal ends it.
    Lapsed {
        /// When the lease ended.
        since: Instant,
    },
    /// The deadline passed: the HA VMs are being stopped.
    SelfFencing {
        /// When fencing started.
        since: Instant,
    },
    /// The driver reported every HA VM gone; no lease until a new ack.
    Fenced {
        /// When the driver confirmed it.
        since: Instant,
    },
}

impl State {
    /// A short name, for logs and drift messages.
    pub fn name(&self) -> &'static str {
        match self {
            State::NoLease { .. } => "no lease",
            State::Leased { .. } => "leased",
            State::Renewing { .. } => "renewing",
            State::Lapsed { .. } => "lapsed",
            State::SelfFencing { .. } => "self-fencing",
            State::Fenced { .. } => "fenced",
        }
    }
}

/// What happened, as the driver tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Time passed (the driver's timer; see [`Lease::next_timer`]).
    Tick,
    /// A heartbeat went out now.
    HeartbeatSent {
        /// Its sequence number, increasing within a session.
        seq: u64,
    },
    /// The server acknowledged a heartbeat.
    AckReceived {
        /// The sequence number the ack names (network input).
        seq: u64,
    },
    /// A new session with the server began (sequence numbers restart).
    SessionStarted,
    /// The driver stopped every HA VM after [`Action::FenceHaVms`].
    HaVmsGone,
}

/// What the driver must do or log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A lease began (from no lease or after a fence); log it.
    LeaseAcquired {
        /// Its deadline.
        deadline: Instant,
    },
    /// No renewal for a while; warn.
    Renewing {
        /// When the lease ends unless renewed.
        deadline: Instant,
    },
    /// Renewals resumed after [`Action::Renewing`]; log it.
    Renewed {
        /// The new deadline.
        deadline: Instant,
    },
    /// The lease (or, at start, the one a previous run may have held)
    /// ended; log it.
    LeaseLost {
        /// The deadline that passed.
        deadline: Instant,
    },
    /// Stop every HA VM on this host now, then report [`Event::HaVmsGone`].
    /// Emitted once per loss.
    FenceHaVms {
        /// How to stop them.
        mode: FenceMode,
    },
    /// The lease ended but the HA VMs stay (the lease is
    /// [`State::Lapsed`]); log it.
    HaVmsKept {
        /// Until when the peer witness's confirmation holds them; `None`:
        /// the isolation response is keep-running.
        until: Option<Instant>,
    },
    /// An ack changed nothing; for debug logs.
    AckIgnored {
        /// The sequence number it named.
        seq: u64,
        /// Why.
        why: Ignored,
    },
}

/// Why an ack changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// No heartbeat in flight this session has that number.
    Unknown,
    /// A newer heartbeat is already acknowledged.
    Stale,
    /// Its heartbeat was sent a lease or more ago: nothing left to renew.
    TooLate,
    /// The agent is fencing; no ack restores the lease.
    Fencing,
    /// Its heartbeat went out before the fence was confirmed.
    SentBeforeFence,
}

/// What the lease refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The driver reused or lowered a heartbeat sequence number.
    #[error(
        "heartbeat {seq} sent after heartbeat {last} in the same session; sequence numbers must increase"
    )]
    HeartbeatSeqNotIncreasing {
        /// The number sent.
        seq: u64,
        /// The last number sent before it.
        last: u64,
    },
    /// A shutdown grace that does not fit inside the fence time.
    #[error("fence grace {grace:?} must be shorter than the fence time {fence_time:?}")]
    GraceExceedsFenceTime {
        /// The grace asked for.
        grace: Duration,
        /// The fence time of the lease timing.
        fence_time: Duration,
    },
}

/// What the fence guard process must hold ([`Lease::guard_duty`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDuty {
    /// Armed: the HA VMs must be gone by `deadline` (plus the guard's
    /// slack) unless the agent renews it.
    Arm {
        /// The fence deadline: [`Lease::deadline`].
        deadline: Instant,
    },
    /// Fencing: keep the last deadline as the backstop.
    Keep,
    /// Nothing to kill at any deadline: fenced, or keep-running.
    StandDown,
}

/// The agent's lease.
#[derive(Debug, Clone)]
pub struct Lease {
    timing: LeaseTiming,
    mode: FenceMode,
    state: State,
    /// Heartbeats awaiting their ack this session: (seq, sent), by seq.
    in_flight: VecDeque<(u64, Instant)>,
    /// The last heartbeat number sent this session.
    last_sent: Option<u64>,
    /// The newest heartbeat acknowledged this session.
    newest_acked: Option<u64>,
    /// Heartbeats up to this number were sent before the fence was
    /// confirmed (this session).
    sent_before_fence: Option<u64>,
    /// When this lease (the agent) started: the no-lease deadline counts
    /// from it.
    started: Instant,
    /// What a lost lease does to the HA VMs.
    isolation: IsolationResponse,
    /// The peer witness's confirmation, as last set.
    confirmed_until: Option<Instant>,
    /// When the last lease held in this run ended, while not regained.
    lost_since: Option<Instant>,
    /// A previous run may have held a lease (saved terms, or a fence
    /// guard holding its deadline): the no-lease deadline is at stake.
    prior: bool,
}

impl Lease {
    /// A lease for an agent that started at `now`, with no lease yet.
    pub fn new(timing: LeaseTiming, mode: FenceMode, now: Instant) -> Result<Self, LeaseError> {
        check_mode(timing, mode)?;
        Ok(Self {
            timing,
            mode,
            state: State::NoLease {
                fence_at: after(now, timing.lease),
            },
            in_flight: VecDeque::new(),
            last_sent: None,
            newest_acked: None,
            sent_before_fence: None,
            started: now,
            isolation: IsolationResponse::SelfFence,
            confirmed_until: None,
            lost_since: None,
            prior: false,
        })
    }

    /// A previous run may have held a lease (the agent found saved
    /// terms): the peer witness defends the no-lease deadline as a lease
    /// (see [`Lease::witness_view`]).
    pub fn assume_prior_run(&mut self) {
        self.prior = true;
    }

    /// The isolation response in force.
    pub fn isolation(&self) -> IsolationResponse {
        self.isolation
    }

    /// Sets the isolation response at `now` (from the lease terms), then
    /// applies time: a lease already gone under keep-running is fenced at
    /// once when self-fence comes back (unless a confirmation holds).
    /// Fencing or fenced, nothing but the setting changes.
    pub fn set_isolation(&mut self, now: Instant, isolation: IsolationResponse) -> Vec<Action> {
        self.isolation = isolation;
        let mut out = Vec::new();
        self.advance(now, &mut out);
        out
    }

    /// The peer witness's confirmation at `now` (`Witness::confirmed_until`):
    /// the HA VMs stay past the lease end until `until`. `None`, or an
    /// `until` already past, fences a lapsed lease at once (self-fence).
    pub fn set_confirmation(&mut self, now: Instant, until: Option<Instant>) -> Vec<Action> {
        self.confirmed_until = until;
        let mut out = Vec::new();
        self.advance(now, &mut out);
        out
    }

    /// The confirmation in force at `now`.
    fn confirmed(&self, now: Instant) -> Option<Instant> {
        self.confirmed_until.filter(|&c| c > now)
    }

    /// When the lease held now ends: `None` without one.
    pub fn lease_end(&self) -> Option<Instant> {
        match self.state {
            State::Leased { renewed_from } | State::Renewing { renewed_from } => {
                Some(self.deadline_from(renewed_from))
            }
            State::NoLease { .. }
            | State::Lapsed { .. }
            | State::SelfFencing { .. }
            | State::Fenced { .. } => None,
        }
    }

    /// What a heartbeat sent at `now` reports: the lease left, if any.
    pub fn lease_left(&self, now: Instant) -> Option<Duration> {
        self.lease_end().filter(|&end| end > now).map(|end| end - now)
    }

    /// The lease as the peer witness's own rounds need it: the no-lease
    /// deadline counts as a lease when a previous run may have held one
    /// (so a restarted agent defends the HA VMs it found), a lapse as lost;
    /// fencing or fenced there is nothing to defend.
    pub fn witness_view(&self) -> LeaseView {
        match self.state {
            State::NoLease { fence_at } if self.prior => LeaseView::Leased { until: fence_at },
            State::NoLease { .. } => LeaseView::Idle,
            State::Leased { renewed_from } | State::Renewing { renewed_from } => LeaseView::Leased {
                until: self.deadline_from(renewed_from),
            },
            State::Lapsed { since } => LeaseView::Lost { since },
            State::SelfFencing { .. } | State::Fenced { .. } => LeaseView::Idle,
        }
    }

    /// The lease as peers are told it (`Contact::of`): only a lease held
    /// in this run counts, so a restarted agent vouches for nothing until
    /// it holds one; once lost it stays lost (fenced or not) until
    /// regained.
    pub fn peer_view(&self) -> LeaseView {
        match self.state {
            State::Leased { renewed_from } | State::Renewing { renewed_from } => LeaseView::Leased {
                until: self.deadline_from(renewed_from),
            },
            State::NoLease { .. } => LeaseView::Idle,
            State::Lapsed { .. } | State::SelfFencing { .. } | State::Fenced { .. } => self
                .lost_since
                .map_or(LeaseView::Idle, |since| LeaseView::Lost { since }),
        }
    }

    /// What the fence guard must hold: the fence deadline while one
    /// stands; nothing under keep-running or once fenced; the last one
    /// while fencing.
    pub fn guard_duty(&self) -> GuardDuty {
        match self.state {
            State::SelfFencing { .. } => GuardDuty::Keep,
            State::Fenced { .. } => GuardDuty::StandDown,
            _ => match self.deadline() {
                Some(deadline) => GuardDuty::Arm { deadline },
                None => GuardDuty::StandDown,
            },
        }
    }

    /// Brings the no-lease deadline forward to `at` (never later): a
    /// previous run's lease, as the fence guard remembers it, ended then.
    /// Does nothing once a lease was held.
    pub fn limit_no_lease(&mut self, at: Instant) {
        if let State::NoLease { fence_at } = self.state {
            self.prior = true;
            self.state = State::NoLease {
                fence_at: fence_at.min(at),
            };
        }
    }

    /// The timing in force.
    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// New terms from the server, applied at `now`: every deadline is
    /// recomputed from the same send instants under the new lease length
    /// (a held lease ends at `sent + L'`), then time is applied, so terms
    /// that end the lease at once fence at once. Without a lease yet, the
    /// start deadline only ever moves earlier (`min(fence_at, start + L')`):
    /// a previous run may have held a lease under the longer terms. While
    /// fencing or fenced nothing but the terms themselves changes. Refused
    /// (nothing changed) when the grace does not fit the new fence time.
    pub fn set_timing(
        &mut self,
        now: Instant,
        timing: LeaseTiming,
        mode: FenceMode,
    ) -> Result<Vec<Action>, LeaseError> {
        check_mode(timing, mode)?;
        self.timing = timing;
        self.mode = mode;
        let mut out = Vec::new();
        match self.state {
            State::NoLease { fence_at } => {
                self.state = State::NoLease {
                    fence_at: fence_at.min(after(self.started, timing.lease)),
                };
            }
            State::Renewing { renewed_from } if now < self.renewing_from(renewed_from) => {
                // A longer lease: no longer overdue for a renewal.
                self.state = State::Leased { renewed_from };
                out.push(Action::Renewed {
                    deadline: self.deadline_from(renewed_from),
                });
            }
            State::Leased { .. }
            | State::Renewing { .. }
            | State::Lapsed { .. }
            | State::SelfFencing { .. }
            | State::Fenced { .. } => {}
        }
        self.advance(now, &mut out);
        Ok(out)
    }

    /// Where the lease stands (as of the last step).
    pub fn state(&self) -> State {
        self.state
    }

    /// How this lease fences.
    pub fn mode(&self) -> FenceMode {
        self.mode
    }

    /// When the HA VMs are fenced unless a renewal comes first: the lease
    /// end (or the no-lease deadline), or the witness's confirmation if
    /// later; `None` while fencing or fenced, and under keep-running
    /// (nothing is fenced).
    pub fn deadline(&self) -> Option<Instant> {
        if self.isolation == IsolationResponse::KeepRunning {
            return None;
        }
        let end = match self.state {
            State::NoLease { fence_at } => fence_at,
            State::Leased { renewed_from } | State::Renewing { renewed_from } => {
                self.deadline_from(renewed_from)
            }
            State::Lapsed { .. } => return self.confirmed_until,
            State::SelfFencing { .. } | State::Fenced { .. } => return None,
        };
        Some(self.confirmed_until.map_or(end, |c| c.max(end)))
    }

    /// When the driver must step the lease with [`Event::Tick`] next, if
    /// time alone can change it.
    pub fn next_timer(&self) -> Option<Instant> {
        match self.state {
            State::NoLease { fence_at } => Some(fence_at),
            State::Leased { renewed_from } => Some(self.renewing_from(renewed_from)),
            State::Renewing { renewed_from } => Some(self.deadline_from(renewed_from)),
            State::Lapsed { .. } if self.isolation == IsolationResponse::SelfFence => self.confirmed_until,
            State::Lapsed { .. } | State::SelfFencing { .. } | State::Fenced { .. } => None,
        }
    }

    /// Whether an HA VM may be started now: only under a live, recently
    /// renewed lease — never without one, while renewing, fencing or
    /// fenced. Exact at any `now` past the last step (it does not wait for
    /// a tick to see the lease age).
    pub fn may_start_ha(&self, now: Instant) -> bool {
        match self.state {
            State::Leased { renewed_from } => now < self.renewing_from(renewed_from),
            State::NoLease { .. }
            | State::Renewing { .. }
            | State::Lapsed { .. }
            | State::SelfFencing { .. }
            | State::Fenced { .. } => false,
        }
    }

    /// Applies the passage of time up to `now`, then `event`.
    pub fn step(&mut self, now: Instant, event: Event) -> Result<Vec<Action>, LeaseError> {
        if let Event::HeartbeatSent { seq } = event {
            if let Some(last) = self.last_sent {
                if seq <= last {
                    return Err(LeaseError::HeartbeatSeqNotIncreasing { seq, last });
                }
            }
        }
        let mut out = Vec::new();
        self.advance(now, &mut out);
        match event {
            Event::Tick => {}
            Event::HeartbeatSent { seq } => {
                if self.in_flight.len() >= MAX_IN_FLIGHT {
                    self.in_flight.pop_front();
                }
                self.in_flight.push_back((seq, now));
                self.last_sent = Some(seq);
            }
            Event::AckReceived { seq } => self.ack(now, seq, &mut out),
            Event::SessionStarted => {
                // The lease itself survives a reconnect: it was earned by
                // a heartbeat the server received, whatever the session.
                self.in_flight.clear();
                self.last_sent = None;
                self.newest_acked = None;
                self.sent_before_fence = None;
            }
            Event::HaVmsGone => {
                if let State::SelfFencing { .. } = self.state {
                    self.state = State::Fenced { since: now };
                    self.in_flight.clear();
                    self.sent_before_fence = self.last_sent;
                }
            }
        }
        Ok(out)
    }

    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::NoLease { fence_at } => {
                if now >= fence_at {
                    self.lapse(now, fence_at, out);
                }
            }
            State::Leased { renewed_from } | State::Renewing { renewed_from } => {
                let deadline = self.deadline_from(renewed_from);
                if now >= deadline {
                    self.lost_since = Some(deadline);
                    self.lapse(now, deadline, out);
                } else if matches!(self.state, State::Leased { .. })
                    && now >= self.renewing_from(renewed_from)
                {
                    self.state = State::Renewing { renewed_from };
                    out.push(Action::Renewing { deadline });
                }
            }
            State::Lapsed { .. } => {
                if self.isolation == IsolationResponse::SelfFence && self.confirmed(now).is_none() {
                    self.fence(now, out);
                }
            }
            State::SelfFencing { .. } | State::Fenced { .. } => {}
        }
    }

    /// The lease (or a previous run's) ended at `deadline`: keep the HA
    /// VMs when keep-running or confirmed, else fence.
    fn lapse(&mut self, now: Instant, deadline: Instant, out: &mut Vec<Action>) {
        out.push(Action::LeaseLost { deadline });
        let kept = match self.isolation {
            IsolationResponse::KeepRunning => Some(None),
            IsolationResponse::SelfFence => self.confirmed(now).map(Some),
        };
        match kept {
            Some(until) => {
                self.state = State::Lapsed { since: deadline };
                out.push(Action::HaVmsKept { until });
            }
            None => self.fence(now, out),
        }
    }

    fn fence(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.state = State::SelfFencing { since: now };
        self.in_flight.clear();
        out.push(Action::FenceHaVms { mode: self.mode });
    }

    fn ack(&mut self, now: Instant, seq: u64, out: &mut Vec<Action>) {
        let ignore = |why| Action::AckIgnored { seq, why };
        if let State::SelfFencing { .. } = self.state {
            out.push(ignore(Ignored::Fencing));
            return;
        }
        if matches!(self.state, State::Fenced { .. }) && self.sent_before_fence.is_some_and(|f| seq <= f) {
            out.push(ignore(Ignored::SentBeforeFence));
            return;
        }
        if self.newest_acked.is_some_and(|n| seq <= n) {
            out.push(ignore(Ignored::Stale));
            return;
        }
        let Some(pos) = self.in_flight.iter().position(|&(s, _)| s == seq) else {
            out.push(ignore(Ignored::Unknown));
            return;
        };
        let sent = self.in_flight[pos].1;
        // Heartbeats up to this one can no longer renew anything.
        self.in_flight.drain(..=pos);
        self.newest_acked = Some(seq);
        let deadline = self.deadline_from(sent);
        if now >= deadline {
            out.push(ignore(Ignored::TooLate));
            return;
        }
        let (renewed_from, was_renewing, acquired) = match self.state {
            State::NoLease { .. } | State::Lapsed { .. } | State::Fenced { .. } => (sent, false, true),
            State::Leased { renewed_from } => (renewed_from.max(sent), false, false),
            State::Renewing { renewed_from } => (renewed_from.max(sent), true, false),
            // Handled above; kept exhaustive.
            State::SelfFencing { .. } => return,
        };
        let deadline = self.deadline_from(renewed_from);
        let renewing = now >= self.renewing_from(renewed_from);
        self.state = if renewing {
            State::Renewing { renewed_from }
        } else {
            State::Leased { renewed_from }
        };
        if acquired {
            // A new lease: the next loss needs confirmations of its own.
            self.lost_since = None;
            self.confirmed_until = None;
            out.push(Action::LeaseAcquired { deadline });
            if renewing {
                out.push(Action::Renewing { deadline });
            }
        } else if was_renewing && !renewing {
            out.push(Action::Renewed { deadline });
        }
    }

    fn deadline_from(&self, sent: Instant) -> Instant {
        after(sent, self.timing.lease)
    }

    fn renewing_from(&self, sent: Instant) -> Instant {
        after(sent, self.timing.lease / RENEWING_DIVISOR)
    }
}

/// Refuses a shutdown grace that does not fit inside the fence time.
fn check_mode(timing: LeaseTiming, mode: FenceMode) -> Result<(), LeaseError> {
    if let FenceMode::ShutdownThenKill { grace } = mode {
        if grace >= timing.fence_time {
            return Err(LeaseError::GraceExceedsFenceTime {
                grace,
                fence_time: timing.fence_time,
            });
        }
    }
    Ok(())
}

/// `t + d`, or `t` itself where that overflows (an already-ended lease:
/// the safe side).
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

/// The highest placement epoch seen per VM: the agent starts a VM only for
/// an epoch at least as high, so a copy from a stale placement is never
/// started after the server moved the VM.
#[derive(Debug, Clone, Default)]
pub struct EpochGuard {
    highest: HashMap<VmId, u64>,
}

impl EpochGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `vm` may run at `epoch`: refuses an epoch lower than the
    /// highest seen for it; a higher one becomes the highest.
    pub fn admit(&mut self, vm: VmId, epoch: u64) -> bool {
        match self.highest.get_mut(&vm) {
            Some(h) if epoch < *h => false,
            Some(h) => {
                *h = epoch;
                true
            }
            None => {
                self.highest.insert(vm, epoch);
                true
            }
        }
    }

    /// The highest epoch seen for `vm`.
    pub fn highest(&self, vm: VmId) -> Option<u64> {
        self.highest.get(&vm).copied()
    }
}

#[cfg(test)]
mod tests;
