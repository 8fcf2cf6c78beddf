//! The HA controller: which VMs of fenced hosts to restart elsewhere, in
//! which order, which to report lost, and when a returning host is clean.
//!
//! Pure: `now`, the hosts' lease states and the VMs in; decisions out. Its
//! driver (`super::driver`) carries the decisions out through the fleet's
//! action channel and reports back with [`Controller::restart_done`] and
//! [`Controller::restart_failed`].
//!
//! # Rules
//!
//! - Only a host whose lease state is `Fenced` has its VMs restarted: the
//!   server's lease view says so only after the host's agent must have
//!   killed its HA VMs (`novacron_shared::lease`), or once its hardware
//!   fence confirmed it off. Never while the mass-failure guard
//!   ([`super::guard`]) holds that host.
//! - **Isolation response** `keep-running`: an agent keeps its VMs past
//!   its lease, so the lease wait alone proves nothing. A fenced host's
//!   VMs restart only when its hardware fence confirmed it off, or — with
//!   disk locks (`ha.disk_locks`) — after the lease wait, onto a host of
//!   the same lock space, where the start waits on the lock until the old
//!   copy is gone. Without either (a fence still running, or failed) the
//!   VMs wait (*fencing*; a failed fence is an alert, retried).
//! - **Hardware fence** (configured): a host whose lease expired (or that
//!   is fenced by the wait) and whose restart the guard allows is fenced
//!   ([`Decision::Fence`], once while its fence is idle). In `self-fence`
//!   a failed fence falls back to the lease wait.
//! - A VM is restarted when it is HA and should be running; not while it
//!   is in a live migration (the migration driver decides where it is
//!   first). Restarts are proposed higher `ha_priority` first, then oldest
//!   VM first; each carries the epoch the VM had, which the fleet raises
//!   by one if the VM is still there at that epoch (compare-and-set).
//! - A restart that found no host waits `retry` before it is proposed
//!   again, with the scheduler's reasons shown; a VM whose host stops being
//!   fenced (it came back) or that left the host is no longer restarted.
//! - Every other VM of a fenced host (not HA, or stopped) is reported lost
//!   once per fence; it is never moved.
//! - A host `Returning` (declared fenced, heard again) whose agent has
//!   reconciled (the moved VMs are gone from it) is reported clean — but
//!   never while a restart of one of its VMs is in flight: the host's next
//!   lease must not come before the fleet has committed or refused that
//!   restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use novacron_shared::ids::{HostId, VmId};

use novacron_shared::protocol::IsolationResponse;

use super::fence::FenceStatus;
use super::guard::{Guard, GuardChange, GuardPolicy, GuardState, HostLease};
use super::lease::{HostState, Loss};

/// How the controller acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Restarts at all (`[ha] enabled`); when off, VMs of fenced hosts are
    /// shown waiting and nothing moves.
    pub enabled: bool,
    /// The mass-failure guard's thresholds.
    pub guard: GuardPolicy,
    /// A VM that did not fit is proposed again after this.
    pub retry: Duration,
    /// What isolated agents do with their HA VMs (`[ha] isolation`).
    pub isolation: IsolationResponse,
    /// Disks of HA VMs are guarded by libvirt's lock manager
    /// (`[ha] disk_locks`): restarts stay within one lock space.
    pub disk_locks: bool,
    /// A hardware fence command is configured (`[ha.fence]`).
    pub hardware_fence: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            enabled: true,
            guard: GuardPolicy::default(),
            retry: Duration::from_secs(5),
            isolation: IsolationResponse::SelfFence,
            disk_locks: false,
            hardware_fence: false,
        }
    }
}

/// One host, as the controller needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInput {
    /// The host.
    pub id: HostId,
    /// Its lease state (as the lease view's last tick reported it).
    pub lease: HostState,
    /// Its agent has reconciled to its current desired state, and none of
    /// the VMs that departed from it is still defined there.
    pub reconciled: bool,
    /// Its lease loss under way or the last one (the lease view's).
    pub loss: Option<Loss>,
    /// Its hardware fence (idle when none is configured).
    pub fence: FenceStatus,
}

impl HostInput {
    /// A host with no loss recorded and an idle fence.
    pub fn new(id: HostId, lease: HostState, reconciled: bool) -> Self {
        Self {
            id,
            lease,
            reconciled,
            loss: None,
            fence: FenceStatus::Idle,
        }
    }
}

/// One VM, as the controller needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmInput {
    /// The VM.
    pub id: VmId,
    /// The host it is placed on.
    pub host: Option<HostId>,
    /// It is HA.
    pub ha: bool,
    /// Its restart priority (higher first).
    pub priority: u8,
    /// It should be running.
    pub running: bool,
    /// Its placement epoch.
    pub epoch: u64,
    /// A live migration of it is under way.
    pub migrating: bool,
    /// When it was created, Unix ms (older first among equals).
    pub created_ms: u64,
}

/// What the driver must do or report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart `vm` (now on fenced `from`, at `epoch`) on another host.
    Restart {
        /// The VM.
        vm: VmId,
        /// The fenced host it is on.
        from: HostId,
        /// Its epoch as seen; the fleet raises it by one.
        epoch: u64,
    },
    /// Power `host` off through its hardware fence (its lease expired and
    /// the guard allows its restart).
    Fence {
        /// The host.
        host: HostId,
    },
    /// Returning `host` is reconciled: it may hold a lease again.
    ReturnedClean {
        /// The host.
        host: HostId,
    },
    /// `vm` (not HA, or not running) is on fenced `host`: lost until it
    /// comes back.
    Lost {
        /// The VM.
        vm: VmId,
        /// Its host.
        host: HostId,
    },
    /// The mass-failure guard held: no restarts.
    Held {
        /// Hosts that went silent together.
        silent: usize,
        /// Hosts monitored.
        monitored: usize,
    },
    /// The guard started releasing by itself (hosts came back).
    Releasing,
    /// The guard is normal again.
    Released {
        /// An operator released it.
        by_operator: bool,
    },
}

/// Why a VM of a fenced host is not running yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// A restart is being carried out.
    Restarting,
    /// No host fits (the scheduler's reasons), tried again at `retry_at`.
    NoFit {
        /// The reasons.
        why: String,
        /// When it is proposed again.
        retry_at: Instant,
    },
    /// The mass-failure guard holds its host.
    Held,
    /// It is in a live migration.
    Migrating,
    /// HA restarts are off (`[ha] enabled = false`).
    Disabled,
    /// `keep-running` without disk locks: its host must be confirmed off
    /// by the hardware fence first (`failed`: the last round failed; it is
    /// retried).
    Fencing {
        /// The fence's last round failed.
        failed: bool,
    },
}

impl Waiting {
    /// For the operator.
    pub fn describe(&self, now: Instant) -> String {
        match self {
            Waiting::Restarting => "restarting on another host".into(),
            Waiting::NoFit { why, retry_at } => format!(
                "no host fits ({why}); trying again in {}",
                novacron_shared::duration::format(retry_at.saturating_duration_since(now))
            ),
            Waiting::Held => "held: many hosts went silent at once (the server's own network is suspect); \
                 release with `novacron ha release` once the hosts are known to be down"
                .into(),
            Waiting::Migrating => "a live migration of it is under way".into(),
            Waiting::Disabled => "HA restarts are off ([ha] enabled = false)".into(),
            Waiting::Fencing { failed: false } => {
                "fencing: its host keeps running its copy (keep-running); waiting for the hardware fence to confirm it off".into()
            }
            Waiting::Fencing { failed: true } => {
                "fencing failed: the hardware fence could not confirm its host off; retried (keep-running, no disk locks)".into()
            }
        }
    }
}

/// The HA state of one VM of a fenced host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// The fenced host it is on.
    pub host: HostId,
    /// Since when it is in this state.
    pub since: Instant,
    /// HA and waiting to be restarted, or `None`: lost (not HA or stopped).
    pub waiting: Option<Waiting>,
}

/// The controller (pure).
#[derive(Debug, Clone)]
pub struct Controller {
    policy: Policy,
    guard: Guard,
    /// VMs of fenced hosts, by VM.
    vms: BTreeMap<VmId, VmStatus>,
    /// Returning hosts already reported clean (until their state changes).
    reported_clean: BTreeSet<HostId>,
}

impl Controller {
    /// The controller of a server that started at `now`, knowing `known`
    /// hosts.
    pub fn new(policy: Policy, known: impl IntoIterator<Item = HostId>, now: Instant) -> Self {
        Self {
            guard: Guard::new(policy.guard, known, now),
            policy,
            vms: BTreeMap::new(),
            reported_clean: BTreeSet::new(),
        }
    }

    /// The guard's state.
    pub fn guard(&self) -> &GuardState {
        self.guard.state()
    }

    /// The VMs of fenced hosts: waiting or lost.
    pub fn vms(&self) -> &BTreeMap<VmId, VmStatus> {
        &self.vms
    }

    /// When time alone can bring a new decision (a retry, a release step).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let retries = self.vms.values().filter_map(|s| match &s.waiting {
            Some(Waiting::NoFit { retry_at, .. }) => Some(*retry_at),
            _ => None,
        });
        retries.chain(self.guard.next_wakeup()).min()
    }

    /// An operator releases the guard.
    pub fn release(&mut self, hosts: &[HostInput]) -> Option<Decision> {
        let leases = leases(hosts);
        self.guard.release(&leases).map(guard_decision)
    }

    /// The fleet carried out the restart of `vm`.
    pub fn restart_done(&mut self, vm: VmId) {
        self.vms.remove(&vm);
    }

    /// The fleet refused the restart of `vm` (no host fits, or it changed
    /// meanwhile): proposed again after `retry`.
    pub fn restart_failed(&mut self, vm: VmId, now: Instant, why: String) {
        if let Some(s) = self.vms.get_mut(&vm) {
            s.since = now;
            s.waiting = Some(Waiting::NoFit {
                why,
                retry_at: now.checked_add(self.policy.retry).unwrap_or(now),
            });
        }
    }

    /// Decides at `now`.
    pub fn step(&mut self, now: Instant, hosts: &[HostInput], vms: &[VmInput]) -> Vec<Decision> {
        let mut out = Vec::new();
        if let Some(c) = self.guard.observe(now, &leases(hosts)) {
            out.push(guard_decision(c));
        }
        let fenced: BTreeSet<HostId> = hosts
            .iter()
            .filter(|h| h.lease == HostState::Fenced)
            .map(|h| h.id)
            .collect();
        // Forget VMs whose host is no longer fenced, or that left it.
        let on: BTreeMap<VmId, &VmInput> = vms.iter().map(|v| (v.id, v)).collect();
        self.vms.retain(|id, s| {
            fenced.contains(&s.host) && on.get(id).is_some_and(|v| v.host == Some(s.host))
                || matches!(s.waiting, Some(Waiting::Restarting))
        });

        let mut candidates: Vec<&VmInput> = Vec::new();
        for v in vms {
            let Some(host) = v.host.filter(|h| fenced.contains(h)) else {
                continue;
            };
            if !(v.ha && v.running) {
                if let std::collections::btree_map::Entry::Vacant(e) = self.vms.entry(v.id) {
                    e.insert(VmStatus {
                        host,
                        since: now,
                        waiting: None,
                    });
                    out.push(Decision::Lost { vm: v.id, host });
                }
                continue;
            }
            let cur = self.vms.get(&v.id).and_then(|s| s.waiting.clone());
            let wait = match cur {
                Some(Waiting::Restarting) => continue,
                Some(Waiting::NoFit { retry_at, .. }) if now < retry_at => continue,
                _ if !self.policy.enabled => Some(Waiting::Disabled),
                _ if v.migrating => Some(Waiting::Migrating),
                _ if !self.guard.allows(host) => Some(Waiting::Held),
                _ => self.fence_wait(host, hosts),
            };
            match wait {
                Some(w) => self.set_waiting(v.id, host, now, w),
                None => candidates.push(v),
            }
        }
        if self.policy.hardware_fence {
            for h in hosts {
                let expired = matches!(h.lease, HostState::LeaseExpired | HostState::Fenced);
                if expired && h.fence == FenceStatus::Idle && self.guard.allows(h.id) {
                    out.push(Decision::Fence { host: h.id });
                }
            }
        }
        candidates.sort_by_key(|v| (std::cmp::Reverse(v.priority), v.created_ms, v.id));
        for v in candidates {
            let host = v.host.unwrap_or(HostId(0));
            self.set_waiting(v.id, host, now, Waiting::Restarting);
            out.push(Decision::Restart {
                vm: v.id,
                from: host,
                epoch: v.epoch,
            });
        }

        self.reported_clean.retain(|h| {
            hosts
                .iter()
                .any(|x| x.id == *h && x.lease == HostState::Returning)
        });
        for h in hosts {
            if h.lease != HostState::Returning || !h.reconciled || self.reported_clean.contains(&h.id) {
                continue;
            }
            let in_flight = self
                .vms
                .values()
                .any(|s| s.host == h.id && s.waiting == Some(Waiting::Restarting));
            if !in_flight {
                self.reported_clean.insert(h.id);
                out.push(Decision::ReturnedClean { host: h.id });
            }
        }
        out
    }

    /// In `keep-running`, what a restart from fenced `host` still waits
    /// for (module header).
    fn fence_wait(&self, host: HostId, hosts: &[HostInput]) -> Option<Waiting> {
        if self.policy.isolation == IsolationResponse::SelfFence || self.policy.disk_locks {
            return None;
        }
        let fence = hosts.iter().find(|h| h.id == host).map(|h| h.fence);
        match fence {
            Some(FenceStatus::Off) => None,
            Some(FenceStatus::Failed) => Some(Waiting::Fencing { failed: true }),
            _ => Some(Waiting::Fencing { failed: false }),
        }
    }

    fn set_waiting(&mut self, vm: VmId, host: HostId, now: Instant, w: Waiting) {
        match self.vms.get_mut(&vm) {
            Some(s) if s.waiting.as_ref() == Some(&w) && s.host == host => {}
            Some(s) => {
                s.host = host;
                s.since = now;
                s.waiting = Some(w);
            }
            None => {
                self.vms.insert(
                    vm,
                    VmStatus {
                        host,
                        since: now,
                        waiting: Some(w),
                    },
                );
            }
        }
    }
}

fn leases(hosts: &[HostInput]) -> Vec<HostLease> {
    hosts
        .iter()
        .map(|h| HostLease {
            id: h.id,
            lease: h.lease,
            loss: h.loss,
        })
        .collect()
}

fn guard_decision(c: GuardChange) -> Decision {
    match c {
        GuardChange::Held { silent, monitored } => Decision::Held { silent, monitored },
        GuardChange::Releasing => Decision::Releasing,
        GuardChange::Normal { by_operator } => Decision::Released { by_operator },
    }
}

#[cfg(test)]
mod tests;
