//! A live migration as a state machine.
//!
//! A migration is claimed first (the target's capacity and both agents'
//! hands off the VM, in one transaction; see the driver). Then:
//! `Preparing` until both agents acknowledged that desired state (or the
//! prepare timeout: nothing moved), `Migrating` while the source agent
//! migrates peer to peer, and on an unknown outcome (the source agent
//! vanished, the command timed out, the server restarted) `Resolving`: the
//! VM's location is decided from fresh inventories of both hosts, never by
//! guessing, and the claim keeps both agents' hands off until then. Past a
//! grace period the operation is left to an operator with the claim held.
//!
//! [`Migration::step`] is pure: it takes an event and the time and returns
//! what the driver must do.

use std::time::{Duration, Instant};

use novacron_shared::ids::HostId;
use novacron_shared::protocol::{CommandOutcome, VmState};

use super::Now;
use crate::store::MigrationClaim;

/// How often an uncertain migration re-reads both hosts.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(3);
/// How long past the agent's own deadline an uncertain migration is
/// watched before it is left to the operator (the claim stays).
pub const RESOLVE_GRACE: Duration = Duration::from_secs(600);
/// Progress is persisted at most this often (every report is published).
pub const PERSIST_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Slack past the agent's migration timeout before its deadline counts as passed.
const AGENT_SLACK: Duration = Duration::from_secs(30);

/// Where a VM was found when both hosts were asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whereabouts {
    /// Only on the target: the migration completed.
    Target,
    /// Only on the source.
    Source,
    /// On both (the migration runs) or on neither (something else is wrong).
    Unclear,
}

/// Decides where a VM is from both hosts' fresh inventories.
pub fn whereabouts(on_source: Option<VmState>, on_target: Option<VmState>) -> Whereabouts {
    match (on_source, on_target) {
        (None, Some(_)) => Whereabouts::Target,
        (Some(_), None) => Whereabouts::Source,
        _ => Whereabouts::Unclear,
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for both agents to acknowledge the claim, until `deadline`.
    Preparing {
        /// When waiting ends with nothing moved.
        deadline: Instant,
        /// The source agent acknowledged.
        source_acked: bool,
        /// The target agent acknowledged.
        target_acked: bool,
    },
    /// The source agent migrates.
    Migrating {
        /// When progress was last persisted.
        last_persist: Instant,
    },
    /// The outcome is unknown: both hosts are asked.
    Resolving,
    /// Ended (moved, failed, or left to the operator).
    Done,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The driver starts a freshly claimed migration.
    Started,
    /// The host's agent reported converging on the claimed desired state.
    Acked(HostId),
    /// Time passed (a wait the driver was told to do ended).
    Tick,
    /// The source agent's progress report.
    Progress {
        /// 0 to 100.
        percent: u8,
        /// For people.
        message: String,
    },
    /// The source agent's answer to the migrate command.
    Outcome(CommandOutcome),
    /// The migrate command ended without an answer (the source agent is
    /// gone, or it did not answer in time): the outcome is unknown.
    Lost(String),
    /// Fresh inventories of both hosts: the VM's state on each.
    Found {
        /// On the source.
        on_source: Option<VmState>,
        /// On the target.
        on_target: Option<VmState>,
    },
    /// One of the hosts could not be asked.
    Unreachable,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record and publish progress (`percent` None: keep it).
    Progress {
        /// New percentage, if it changed.
        percent: Option<u8>,
        /// For people.
        message: String,
        /// Store it (not only publish it).
        persist: bool,
    },
    /// Wait until one of `hosts` acknowledges (feed [`Event::Acked`]) or
    /// `until` passes (feed [`Event::Tick`]).
    AwaitAcks {
        /// Hosts not acknowledged yet.
        hosts: Vec<HostId>,
        /// The deadline.
        until: Instant,
    },
    /// Tell the source agent to migrate; feed its progress and its
    /// [`Event::Outcome`] or [`Event::Lost`].
    SendMigrate,
    /// Ask both hosts for fresh inventories; feed [`Event::Found`] or
    /// [`Event::Unreachable`].
    Refresh,
    /// Wait this long, then feed [`Event::Tick`].
    Sleep(Duration),
    /// End it: move the VM's record when `moved`, release the claim.
    Finish {
        /// The VM now runs on the target.
        moved: bool,
        /// Why it failed.
        error: Option<String>,
    },
    /// Fail the operation but keep the claim: nobody knows where the VM
    /// runs, so both agents keep their hands off until an operator checks.
    Abandon {
        /// For the operator.
        error: String,
    },
}

/// One live migration's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The claim it runs under.
    pub claim: MigrationClaim,
    /// Where it stands.
    pub phase: Phase,
    prepare_timeout: Duration,
    /// Past this (wall ms) the source agent has given up itself.
    agent_deadline_ms: u64,
    /// Past this (wall ms) an unknown outcome is left to the operator.
    give_up_ms: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Migration {
    /// A freshly claimed migration, about to start at `now`; the agent's
    /// own migration timeout is `timeout`.
    pub fn new(claim: MigrationClaim, prepare_timeout: Duration, timeout: Duration, now: Now) -> Self {
        let agent_deadline_ms = claim.started_ms.saturating_add(ms(timeout + AGENT_SLACK));
        Self {
            phase: Phase::Preparing {
                deadline: now.at + prepare_timeout,
                source_acked: false,
                target_acked: false,
            },
            claim,
            prepare_timeout,
            agent_deadline_ms,
            give_up_ms: agent_deadline_ms.saturating_add(ms(RESOLVE_GRACE)),
        }
    }

    /// A migration found claimed after a restart: its outcome is unknown.
    /// Feed it [`Event::Tick`] to start.
    pub fn resumed(claim: MigrationClaim, timeout: Duration, now: Now) -> Self {
        let mut m = Self::new(claim, Duration::ZERO, timeout, now);
        m.phase = Phase::Resolving;
        m
    }

    /// Whether it has ended.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Takes one event at `now`; returns what to do, in order.
    pub fn step(&mut self, event: Event, now: Now) -> Vec<Action> {
        let (source, target) = (self.claim.source, self.claim.target);
        match (self.phase, event) {
            (Phase::Done, _) => vec![],
            (Phase::Preparing { deadline, .. }, Event::Started) => vec![
                Action::Progress {
                    percent: Some(0),
                    message: "waiting for both agents to leave the VM alone".into(),
                    persist: true,
                },
                Action::AwaitAcks {
                    hosts: vec![source, target],
                    until: deadline,
                },
            ],
            (
                Phase::Preparing {
                    deadline,
                    mut source_acked,
                    mut target_acked,
                },
                Event::Acked(h),
            ) => {
                source_acked |= h == source;
                target_acked |= h == target;
                if source_acked && target_acked {
                    self.phase = Phase::Migrating { last_persist: now.at };
                    return vec![
                        Action::Progress {
                            percent: Some(0),
                            message: format!("migrating to host {target}"),
                            persist: true,
                        },
                        Action::SendMigrate,
                    ];
                }
                self.phase = Phase::Preparing {
                    deadline,
                    source_acked,
                    target_acked,
                };
                let hosts = [(source, source_acked), (target, target_acked)]
                    .into_iter()
                    .filter(|(_, acked)| !acked)
                    .map(|(h, _)| h)
                    .collect();
                vec![Action::AwaitAcks {
                    hosts,
                    until: deadline,
                }]
            }
            (
                Phase::Preparing {
                    deadline,
                    source_acked,
                    target_acked,
                },
                Event::Tick,
            ) => {
                if now.at < deadline {
                    let hosts = [(source, source_acked), (target, target_acked)]
                        .into_iter()
                        .filter(|(_, acked)| !acked)
                        .map(|(h, _)| h)
                        .collect();
                    return vec![Action::AwaitAcks {
                        hosts,
                        until: deadline,
                    }];
                }
                let late = if source_acked { target } else { source };
                self.phase = Phase::Done;
                vec![Action::Finish {
                    moved: false,
                    error: Some(format!(
                        "host {late} did not acknowledge the migration within {}; nothing was moved",
                        novacron_shared::duration::format(self.prepare_timeout)
                    )),
                }]
            }
            (Phase::Migrating { last_persist }, Event::Progress { percent, message }) => {
                let persist = now.at.saturating_duration_since(last_persist) >= PERSIST_PROGRESS_EVERY;
                if persist {
                    self.phase = Phase::Migrating { last_persist: now.at };
                }
                vec![Action::Progress {
                    percent: Some(percent.min(99)),
                    message,
                    persist,
                }]
            }
            (Phase::Migrating { .. }, Event::Outcome(CommandOutcome::Done)) => {
                self.phase = Phase::Done;
                vec![Action::Finish {
                    moved: true,
                    error: None,
                }]
            }
            (Phase::Migrating { .. }, Event::Outcome(CommandOutcome::Failed { message })) => {
                self.phase = Phase::Done;
                vec![Action::Finish {
                    moved: false,
                    error: Some(message),
                }]
            }
            (Phase::Migrating { .. }, Event::Lost(_)) => {
                self.phase = Phase::Resolving;
                self.resolve_now(now)
            }
            (Phase::Resolving, Event::Tick) => self.resolve_now(now),
            (Phase::Resolving, Event::Found { on_source, on_target }) => {
                match whereabouts(on_source, on_target) {
                    Whereabouts::Target => {
                        self.phase = Phase::Done;
                        vec![Action::Finish {
                            moved: true,
                            error: None,
                        }]
                    }
                    Whereabouts::Source if now.wall_ms > self.agent_deadline_ms => {
                        self.phase = Phase::Done;
                        vec![Action::Finish {
                            moved: false,
                            error: Some(
                                "the source agent lost track of the migration and the VM is still there"
                                    .into(),
                            ),
                        }]
                    }
                    _ => vec![
                        Action::Progress {
                            percent: None,
                            message: "outcome unknown; watching both hosts".into(),
                            persist: false,
                        },
                        Action::Sleep(RESOLVE_EVERY),
                    ],
                }
            }
            (Phase::Resolving, Event::Unreachable) => vec![
                Action::Progress {
                    percent: None,
                    message: "outcome unknown; waiting for both hosts to connect".into(),
                    persist: false,
                },
                Action::Sleep(RESOLVE_EVERY),
            ],
            // Anything else does not belong to the phase (a late progress
            // report, a stray acknowledgement): nothing to do.
            (_, _) => vec![],
        }
    }

    /// Resolving: give up past the grace period, else ask both hosts.
    fn resolve_now(&mut self, now: Now) -> Vec<Action> {
        if now.wall_ms > self.give_up_ms {
            self.phase = Phase::Done;
            let c = &self.claim;
            return vec![Action::Abandon {
                error: format!(
                    "could not tell where VM {} runs; both hosts keep their hands off it until an operator checks hosts {} and {}",
                    c.vm, c.source, c.target
                ),
            }];
        }
        vec![Action::Refresh]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_shared::clock::{Clock, ManualClock};
    use novacron_shared::ids::{OpId, VmId};
    use std::sync::Arc;

    const S: HostId = HostId(1);
    const T: HostId = HostId(2);
    const TIMEOUT: Duration = Duration::from_secs(100);
    const PREPARE: Duration = Duration::from_secs(10);

    struct Rig {
        clock: Clock,
        manual: Arc<ManualClock>,
        m: Migration,
    }

    impl Rig {
        fn new() -> Self {
            let (clock, manual) = Clock::manual();
            let now = Now {
                at: clock.now(),
                wall_ms: clock.unix_ms(),
            };
            let claim = MigrationClaim {
                vm: VmId(7),
                source: S,
                target: T,
                op: OpId(8),
                started_ms: now.wall_ms,
            };
            let m = Migration::new(claim, PREPARE, TIMEOUT, now);
            Self { clock, manual, m }
        }

        fn now(&self) -> Now {
            Now {
                at: self.clock.now(),
                wall_ms: self.clock.unix_ms(),
            }
        }

        fn step(&mut self, e: Event) -> Vec<Action> {
            let now = self.now();
            self.m.step(e, now)
        }

        /// Through both acknowledgements into `Migrating`.
        fn migrating() -> Self {
            let mut r = Self::new();
            r.step(Event::Started);
            r.step(Event::Acked(S));
            let a = r.step(Event::Acked(T));
            assert!(a.contains(&Action::SendMigrate));
            r
        }

        /// Migrating, then the command was lost.
        fn resolving() -> Self {
            let mut r = Self::migrating();
            assert_eq!(r.step(Event::Lost("gone".into())), vec![Action::Refresh]);
            r
        }
    }

    fn finish(a: &[Action]) -> Option<(bool, Option<String>)> {
        a.iter().find_map(|a| match a {
            Action::Finish { moved, error } => Some((*moved, error.clone())),
            _ => None,
        })
    }

    #[test]
    fn started_waits_for_both_agents_until_the_deadline() {
        let mut r = Rig::new();
        let deadline = r.clock.now() + PREPARE;
        let a = r.step(Event::Started);
        assert!(matches!(&a[0], Action::Progress { persist: true, .. }));
        assert_eq!(
            a[1],
            Action::AwaitAcks {
                hosts: vec![S, T],
                until: deadline
            }
        );
    }

    #[test]
    fn one_acknowledgement_waits_for_the_other() {
        let mut r = Rig::new();
        r.step(Event::Started);
        let a = r.step(Event::Acked(T));
        assert!(matches!(&a[..], [Action::AwaitAcks { hosts, .. }] if hosts == &vec![S]));
        // A repeated acknowledgement changes nothing.
        let a = r.step(Event::Acked(T));
        assert!(matches!(&a[..], [Action::AwaitAcks { hosts, .. }] if hosts == &vec![S]));
        assert!(matches!(r.m.phase, Phase::Preparing { .. }));
    }

    #[test]
    fn both_acknowledgements_send_the_migration() {
        let r = Rig::migrating();
        assert!(matches!(r.m.phase, Phase::Migrating { .. }));
    }

    #[test]
    fn a_tick_before_the_deadline_keeps_waiting_and_after_it_moves_nothing() {
        let mut r = Rig::new();
        r.step(Event::Started);
        r.step(Event::Acked(S));
        r.manual.advance(PREPARE - Duration::from_millis(1));
        let a = r.step(Event::Tick);
        assert!(matches!(&a[..], [Action::AwaitAcks { hosts, .. }] if hosts == &vec![T]));
        r.manual.advance(Duration::from_millis(1));
        let a = r.step(Event::Tick);
        let (moved, error) = finish(&a).expect("finished");
        assert!(!moved);
        let error = error.expect("why");
        assert!(
            error.contains(&T.to_string()) && error.contains("nothing was moved"),
            "{error}"
        );
        assert!(r.m.is_done());
    }

    #[test]
    fn a_wall_clock_jump_does_not_end_the_prepare_wait() {
        let mut r = Rig::new();
        r.step(Event::Started);
        r.manual.jump_wall(Duration::from_secs(86_400), true);
        assert!(matches!(&r.step(Event::Tick)[..], [Action::AwaitAcks { .. }]));
    }

    #[test]
    fn progress_is_published_always_and_persisted_at_most_every_second() {
        let mut r = Rig::migrating();
        let p = |pct| Event::Progress {
            percent: pct,
            message: "copying".into(),
        };
        let a = r.step(p(10));
        assert_eq!(
            a,
            vec![Action::Progress {
                percent: Some(10),
                message: "copying".into(),
                persist: false
            }]
        );
        r.manual.advance(Duration::from_secs(1));
        assert!(matches!(
            &r.step(p(20))[..],
            [Action::Progress { persist: true, .. }]
        ));
        assert!(matches!(
            &r.step(p(30))[..],
            [Action::Progress { persist: false, .. }]
        ));
        // 100 % is shown only once the record moved.
        assert!(matches!(
            &r.step(p(100))[..],
            [Action::Progress {
                percent: Some(99),
                ..
            }]
        ));
    }

    #[test]
    fn the_source_agents_answer_decides() {
        let mut r = Rig::migrating();
        assert_eq!(
            finish(&r.step(Event::Outcome(CommandOutcome::Done))),
            Some((true, None))
        );
        assert!(r.m.is_done());
        let mut r = Rig::migrating();
        let a = r.step(Event::Outcome(CommandOutcome::Failed {
            message: "no route".into(),
        }));
        assert_eq!(finish(&a), Some((false, Some("no route".into()))));
    }

    #[test]
    fn source_gone_or_timed_out_asks_both_hosts() {
        for why in [
            "host 1 is not connected",
            "the agent did not finish op 8 within 160s",
        ] {
            let mut r = Rig::migrating();
            assert_eq!(r.step(Event::Lost(why.into())), vec![Action::Refresh]);
            assert_eq!(r.m.phase, Phase::Resolving);
        }
    }

    #[test]
    fn found_on_the_target_alone_moves_the_vm() {
        let mut r = Rig::resolving();
        let a = r.step(Event::Found {
            on_source: None,
            on_target: Some(VmState::Running),
        });
        assert_eq!(finish(&a), Some((true, None)));
    }

    #[test]
    fn found_on_the_source_fails_only_after_the_agents_deadline() {
        let mut r = Rig::resolving();
        let found = Event::Found {
            on_source: Some(VmState::Running),
            on_target: None,
        };
        let a = r.step(found.clone());
        assert_eq!(
            a.last(),
            Some(&Action::Sleep(RESOLVE_EVERY)),
            "the agent may still finish"
        );
        assert_eq!(r.step(Event::Tick), vec![Action::Refresh]);
        r.manual.advance(TIMEOUT + AGENT_SLACK + Duration::from_millis(1));
        let (moved, error) = finish(&r.step(found)).expect("finished");
        assert!(!moved);
        assert!(error.expect("why").contains("still there"));
    }

    #[test]
    fn unclear_or_unreachable_keeps_watching() {
        let mut r = Rig::resolving();
        for e in [
            Event::Found {
                on_source: Some(VmState::Running),
                on_target: Some(VmState::Paused),
            },
            Event::Found {
                on_source: None,
                on_target: None,
            },
            Event::Unreachable,
        ] {
            let a = r.step(e);
            assert!(matches!(
                &a[..],
                [
                    Action::Progress { persist: false, .. },
                    Action::Sleep(RESOLVE_EVERY)
                ]
            ));
        }
        assert_eq!(r.m.phase, Phase::Resolving);
    }

    #[test]
    fn past_the_grace_period_the_operator_decides_and_the_claim_stays() {
        let mut r = Rig::resolving();
        r.manual
            .advance(TIMEOUT + AGENT_SLACK + RESOLVE_GRACE + Duration::from_millis(1));
        let a = r.step(Event::Tick);
        assert!(matches!(&a[..], [Action::Abandon { error }] if error.contains("operator")));
        assert!(r.m.is_done());
        assert!(
            r.step(Event::Tick).is_empty(),
            "a finished migration does nothing"
        );
    }

    #[test]
    fn after_a_restart_the_migration_is_resolved_from_the_stored_start() {
        let (clock, manual) = Clock::manual();
        let started_ms = clock.unix_ms();
        manual.advance(Duration::from_secs(50));
        let now = Now {
            at: clock.now(),
            wall_ms: clock.unix_ms(),
        };
        let claim = MigrationClaim {
            vm: VmId(7),
            source: S,
            target: T,
            op: OpId(8),
            started_ms,
        };
        let mut m = Migration::resumed(claim.clone(), TIMEOUT, now);
        assert_eq!(m.step(Event::Tick, now), vec![Action::Refresh]);
        // The agent's deadline counts from the stored start, not the restart.
        manual.advance(TIMEOUT + AGENT_SLACK - Duration::from_secs(50) + Duration::from_millis(1));
        let now = Now {
            at: clock.now(),
            wall_ms: clock.unix_ms(),
        };
        let a = m.step(
            Event::Found {
                on_source: Some(VmState::Running),
                on_target: None,
            },
            now,
        );
        assert_eq!(finish(&a).map(|f| f.0), Some(false));
        // A restarted migration well past its grace period is abandoned at once.
        let late = Now {
            at: now.at,
            wall_ms: started_ms + ms(TIMEOUT + AGENT_SLACK + RESOLVE_GRACE) + 1,
        };
        let mut m = Migration::resumed(claim, TIMEOUT, late);
        assert!(matches!(&m.step(Event::Tick, late)[..], [Action::Abandon { .. }]));
    }

    #[test]
    fn events_outside_their_phase_do_nothing() {
        let mut r = Rig::new();
        r.step(Event::Started);
        let before = r.m.clone();
        assert!(r.step(Event::Outcome(CommandOutcome::Done)).is_empty());
        assert!(r
            .step(Event::Progress {
                percent: 5,
                message: String::new()
            })
            .is_empty());
        assert!(r.step(Event::Unreachable).is_empty());
        assert_eq!(r.m, before);
        let mut r = Rig::migrating();
        assert!(r.step(Event::Acked(S)).is_empty());
        assert!(r.step(Event::Tick).is_empty());
    }

    #[test]
    fn a_vm_moves_only_when_it_is_on_the_target_alone() {
        use VmState::*;
        assert_eq!(whereabouts(None, Some(Running)), Whereabouts::Target);
        assert_eq!(whereabouts(None, Some(Paused)), Whereabouts::Target);
        assert_eq!(whereabouts(Some(Running), None), Whereabouts::Source);
        assert_eq!(whereabouts(Some(Running), Some(Paused)), Whereabouts::Unclear);
        assert_eq!(whereabouts(None, None), Whereabouts::Unclear);
    }
}
