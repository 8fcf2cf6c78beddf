//! A drain as a state machine: the host is cordoned, then its VMs are
//! live-migrated away one at a time; the drain succeeds when every VM moved
//! and says which stayed otherwise. The host stays cordoned either way.
//!
//! [`Drain::step`] is pure (a drain has no deadlines of its own: each
//! migration carries its own).

use novacron_shared::ids::VmId;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The host's VMs, as id and name.
    Listed(Vec<(VmId, String)>),
    /// The host's VMs could not be listed.
    ListFailed(String),
    /// The current VM's migration could not start.
    Refused(String),
    /// The current VM's migration ended: moved, or not (and whether its
    /// outcome is still unknown).
    Ended {
        /// The VM runs on another host now.
        moved: bool,
        /// Its claim is still held: nobody knows where it runs.
        unknown: bool,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record and publish progress.
    Progress {
        /// 0 to 100.
        percent: u8,
        /// For people.
        message: String,
    },
    /// Claim and run a live migration of this VM to the scheduler's
    /// choice; feed [`Event::Refused`] or [`Event::Ended`].
    Migrate(VmId),
    /// End the drain.
    Finish {
        /// Every VM moved.
        succeeded: bool,
        /// The final progress message.
        message: String,
        /// Why it failed.
        error: Option<String>,
    },
}

/// One drain's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drain {
    vms: Vec<(VmId, String)>,
    next: usize,
    moved: usize,
    problems: Vec<String>,
    done: bool,
}

impl Drain {
    /// A drain of a freshly cordoned host; feed it [`Event::Listed`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether it has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes one event; returns what to do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        if self.done {
            return vec![];
        }
        match event {
            Event::Listed(vms) => {
                self.vms = vms;
                self.next = 0;
            }
            Event::ListFailed(e) => {
                self.done = true;
                return vec![Action::Finish {
                    succeeded: false,
                    message: "host cordoned".into(),
                    error: Some(format!("cannot list the host's VMs: {e}")),
                }];
            }
            Event::Refused(why) => self.current_failed(why),
            Event::Ended { moved: true, .. } => {
                self.moved += 1;
                self.next += 1;
            }
            Event::Ended {
                moved: false,
                unknown,
            } => {
                let why = if unknown {
                    "outcome unknown"
                } else {
                    "migration failed"
                };
                self.current_failed(why.into());
            }
        }
        self.advance()
    }

    fn current_failed(&mut self, why: String) {
        if let Some((_, name)) = self.vms.get(self.next) {
            self.problems.push(format!("{name}: {why}"));
        }
        self.next += 1;
    }

    fn advance(&mut self) -> Vec<Action> {
        let total = self.vms.len();
        if let Some((id, name)) = self.vms.get(self.next) {
            let percent = u8::try_from(self.next * 100 / total.max(1)).unwrap_or(99);
            return vec![
                Action::Progress {
                    percent,
                    message: format!("migrating {name} ({} of {total})", self.next + 1),
                },
                Action::Migrate(*id),
            ];
        }
        self.done = true;
        if self.problems.is_empty() {
            vec![Action::Finish {
                succeeded: true,
                message: format!("drained: {} VMs moved; the host stays cordoned", self.moved),
                error: None,
            }]
        } else {
            vec![Action::Finish {
                succeeded: false,
                message: format!("{} of {total} VMs moved", self.moved),
                error: Some(format!(
                    "{} of {total} VMs stay on the host: {}",
                    self.problems.len(),
                    self.problems.join("; ")
                )),
            }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(n: u128) -> Vec<(VmId, String)> {
        (1..=n).map(|i| (VmId(i), format!("vm{i}"))).collect()
    }

    #[test]
    fn an_empty_host_is_drained_at_once() {
        let mut d = Drain::new();
        let a = d.step(Event::Listed(vec![]));
        assert!(
            matches!(&a[..], [Action::Finish { succeeded: true, message, error: None }] if message.contains("0 VMs moved"))
        );
        assert!(d.is_done());
    }

    #[test]
    fn vms_are_moved_one_at_a_time_in_order() {
        let mut d = Drain::new();
        let a = d.step(Event::Listed(vms(2)));
        assert_eq!(
            a,
            vec![
                Action::Progress {
                    percent: 0,
                    message: "migrating vm1 (1 of 2)".into()
                },
                Action::Migrate(VmId(1))
            ]
        );
        let a = d.step(Event::Ended {
            moved: true,
            unknown: false,
        });
        assert_eq!(a[1], Action::Migrate(VmId(2)));
        assert!(matches!(&a[0], Action::Progress { percent: 50, .. }));
        let a = d.step(Event::Ended {
            moved: true,
            unknown: false,
        });
        assert!(
            matches!(&a[..], [Action::Finish { succeeded: true, message, .. }] if message.contains("2 VMs moved"))
        );
    }

    #[test]
    fn refused_failed_and_unknown_migrations_are_named_and_the_rest_go_on() {
        let mut d = Drain::new();
        d.step(Event::Listed(vms(4)));
        let a = d.step(Event::Refused("VM vm1 is Stopped".into()));
        assert_eq!(a[1], Action::Migrate(VmId(2)));
        d.step(Event::Ended {
            moved: false,
            unknown: false,
        });
        d.step(Event::Ended {
            moved: false,
            unknown: true,
        });
        let a = d.step(Event::Ended {
            moved: true,
            unknown: false,
        });
        let [Action::Finish {
            succeeded: false,
            message,
            error: Some(error),
        }] = &a[..]
        else {
            panic!("not finished: {a:?}")
        };
        assert_eq!(message, "1 of 4 VMs moved");
        assert_eq!(
            error,
            "3 of 4 VMs stay on the host: vm1: VM vm1 is Stopped; vm2: migration failed; vm3: outcome unknown"
        );
        assert!(
            d.step(Event::Listed(vms(1))).is_empty(),
            "a finished drain does nothing"
        );
    }

    #[test]
    fn a_host_whose_vms_cannot_be_listed_fails_the_drain() {
        let mut d = Drain::new();
        let a = d.step(Event::ListFailed("disk on fire".into()));
        assert!(
            matches!(&a[..], [Action::Finish { succeeded: false, error: Some(e), .. }] if e.contains("disk on fire"))
        );
    }
}
