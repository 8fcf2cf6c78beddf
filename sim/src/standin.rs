//! A stand-in for the HA controller (`novacron_server::ha::controller`),
//! with the interface the lead announced, used until the real one lands on
//! main. The simulation reaches it only through [`crate::world`]'s
//! `controller` alias, so swapping it for the real one is one line.
//!
//! Deliberately plain: restarts every HA VM of a fenced host (by priority,
//! then age), reports non-HA VMs of a fenced host lost once, reports a
//! returning host clean once reconciled, and holds when more than
//! `mass_failure_ratio` of the known hosts left `Online` within
//! `mass_failure_window`; it leaves held when an operator releases it or
//! when every host is online again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use novacron_server::ha::lease::{HostState, Transition};
use novacron_shared::ids::{HostId, VmId};

/// What the controller is told to do.
#[derive(Debug, Clone)]
pub struct Policy {
    /// HA acts at all.
    pub enabled: bool,
    /// Share of known hosts going silent within the window that holds.
    pub mass_failure_ratio: f64,
    /// The window for the ratio.
    pub mass_failure_window: Duration,
    /// How fast held is left (unused by the stand-in).
    pub release_step: Duration,
    /// A restart that found no fit is retried after this.
    pub retry: Duration,
}

/// A host as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct HostInput {
    /// Its id.
    pub id: HostId,
    /// Its lease state.
    pub lease: HostState,
    /// It reported converged to a desired state without the VMs that moved.
    pub reconciled: bool,
}

/// A VM as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct VmInput {
    /// Its id.
    pub id: VmId,
    /// Where it is placed.
    pub host: Option<HostId>,
    /// HA VM.
    pub ha: bool,
    /// Restart priority (higher first).
    pub priority: u8,
    /// Desired power.
    pub running: bool,
    /// Placement epoch.
    pub epoch: u64,
    /// Under live migration.
    pub migrating: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// What the controller decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart `vm` (placed on fenced `from`, at `epoch`) elsewhere.
    Restart {
        /// The VM.
        vm: VmId,
        /// Its fenced host.
        from: HostId,
        /// Its epoch when decided.
        epoch: u64,
    },
    /// A returning host is reconciled: its leases may resume.
    ReturnedClean {
        /// The host.
        host: HostId,
    },
    /// A non-HA VM of a fenced host is lost.
    Lost {
        /// The VM.
        vm: VmId,
        /// Its host.
        host: HostId,
    },
    /// Mass failure: no restarts.
    Held {
        /// Hosts silent within the window.
        silent: usize,
        /// Hosts known.
        monitored: usize,
    },
    /// Held ended.
    Released {
        /// By an operator, or because hosts returned.
        by_operator: bool,
    },
}

/// The stand-in controller.
#[derive(Debug)]
pub struct Controller {
    policy: Policy,
    known: usize,
    held: bool,
    recent: VecDeque<(Instant, HostId)>,
    in_flight: BTreeSet<VmId>,
    retry_at: BTreeMap<VmId, Instant>,
    lost: BTreeSet<VmId>,
    release_asked: bool,
}

impl Controller {
    /// A controller for a server started at `now`.
    pub fn new(policy: Policy, known_hosts: usize, _now: Instant) -> Self {
        Self {
            policy,
            known: known_hosts.max(1),
            held: false,
            recent: VecDeque::new(),
            in_flight: BTreeSet::new(),
            retry_at: BTreeMap::new(),
            lost: BTreeSet::new(),
            release_asked: false,
        }
    }

    /// One step at `now`.
    pub fn step(
        &mut self,
        now: Instant,
        transitions: &[Transition],
        hosts: &[HostInput],
        vms: &[VmInput],
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        if !self.policy.enabled {
            return out;
        }
        self.retry_at.retain(|_, t| *t > now);
        for t in transitions {
            if t.from == HostState::Online && t.to != HostState::Maintenance {
                self.recent.push_back((now, t.host));
            }
        }
        while let Some(&(at, _)) = self.recent.front() {
            if now.saturating_duration_since(at) > self.policy.mass_failure_window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        let silent: BTreeSet<HostId> = self.recent.iter().map(|(_, h)| *h).collect();
        if !self.held && silent.len() as f64 / self.known as f64 > self.policy.mass_failure_ratio {
            self.held = true;
            out.push(Decision::Held {
                silent: silent.len(),
                monitored: self.known,
            });
        }
        if self.held {
            let all_online = hosts.iter().all(|h| h.lease == HostState::Online);
            if self.release_asked || all_online {
                self.held = false;
                self.recent.clear();
                out.push(Decision::Released {
                    by_operator: self.release_asked,
                });
            }
            self.release_asked = false;
        }
        for h in hosts {
            if h.lease == HostState::Returning && h.reconciled {
                out.push(Decision::ReturnedClean { host: h.id });
            }
        }
        if self.held {
            return out;
        }
        let fenced: BTreeSet<HostId> = hosts
            .iter()
            .filter(|h| h.lease == HostState::Fenced)
            .map(|h| h.id)
            .collect();
        let mut todo: Vec<&VmInput> = vms
            .iter()
            .filter(|v| v.host.is_some_and(|h| fenced.contains(&h)) && v.running && !v.migrating)
            .collect();
        todo.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.created_ms.cmp(&b.created_ms)));
        for v in todo {
            let Some(from) = v.host else { continue };
            if !v.ha {
                if self.lost.insert(v.id) {
                    out.push(Decision::Lost { vm: v.id, host: from });
                }
                continue;
            }
            if self.in_flight.contains(&v.id) || self.retry_at.contains_key(&v.id) {
                continue;
            }
            self.in_flight.insert(v.id);
            out.push(Decision::Restart {
                vm: v.id,
                from,
                epoch: v.epoch,
            });
        }
        out
    }

    /// A restart found no fit: retried after `retry`.
    pub fn restart_failed(&mut self, vm: VmId, now: Instant, _why: String) {
        self.in_flight.remove(&vm);
        self.retry_at.insert(vm, now + self.policy.retry);
    }

    /// A restart was carried out.
    pub fn restart_done(&mut self, vm: VmId, _to: HostId, _now: Instant) {
        self.in_flight.remove(&vm);
        self.lost.remove(&vm);
    }

    /// An operator leaves held (at the next step).
    pub fn release(&mut self, _now: Instant) {
        if self.held {
            self.release_asked = true;
        }
    }

    /// When a step is due without new input.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let retry = self.retry_at.values().min().copied();
        let window = self
            .recent
            .front()
            .map(|(at, _)| *at + self.policy.mass_failure_window + Duration::from_millis(1));
        match (retry, window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
