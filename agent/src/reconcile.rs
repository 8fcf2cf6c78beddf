//! The reconciler: desired VMs and observed domains in, actions out. Pure
//! logic with an explicit `now`, so every rule is testable without libvirt.
//!
//! Rules:
//! - A desired VM that is missing is defined; one whose spec changed is
//!   redefined (libvirt applies it at the next cold boot).
//! - Power is driven towards the desired state (start, pause, resume,
//!   graceful shutdown). A VM that is shutting down is left to finish.
//! - A domain NovaCron defined that is no longer desired is removed with
//!   its volumes.
//! - Domains NovaCron did not define are never touched; a name clash with
//!   one is reported as drift.
//! - A VM whose last action failed is retried with exponential backoff and
//!   reported as drift meanwhile.
//! - HA: an HA VM is started, restarted after a crash or resumed only when
//!   the [`Gate`] (the lease's `may_start_ha` at planning time) allows it;
//!   otherwise it is drift ("waiting for the HA lease"). Stopping, pausing,
//!   removing and defining are always allowed.
//! - Epochs: a desired VM whose epoch is lower than the highest seen for it
//!   (in desired states or domain metadata, kept in an
//!   [`EpochGuard`]) is never defined or started; a higher one, or a
//!   changed HA flag, retags the domain's metadata before it is started.
//! - Departed VMs (restarted on another host while this one was fenced)
//!   are destroyed and undefined, their volumes deleted only when their
//!   disks are not shared; they are never started here.
//!
//! Layering: this module sits beside the libvirt driver, not on it. It
//! imports no driver module (`hypervisor`, `vmops`, `migrate`, `events`):
//! it sees domains through its own [`Observed`], which the driver converts
//! its observations into, and compares definitions through the pure
//! [`crate::drift`] hash.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use novacron_shared::ids::{OpId, VmId};
use novacron_shared::protocol::{Departed, Drift, DriftKind, VmState};
use novacron_shared::spec::{DesiredVm, Power};

use crate::drift;
use crate::lease::EpochGuard;

/// A domain as the reconciler needs to see it to plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its state.
    pub state: VmState,
    /// What NovaCron recorded on it; `None` when NovaCron did not define it.
    pub managed: Option<Managed>,
}

/// What NovaCron recorded on a domain it defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    /// The drift hash of the spec the definition was made from.
    pub spec_hash: String,
    /// Whether its metadata marks it HA.
    pub ha: bool,
    /// The placement epoch in its metadata.
    pub epoch: u64,
}

/// Whether HA VMs may be started now: the lease's answer when the plan is
/// made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// An HA VM may be started, restarted or resumed.
    pub ha_allowed: bool,
    /// The lease state, for the drift message.
    pub lease: &'static str,
}

impl Gate {
    /// HA VMs may start (a live lease).
    pub fn open() -> Self {
        Self {
            ha_allowed: true,
            lease: "leased",
        }
    }

    /// HA VMs may not start; `lease` says why (the lease state).
    pub fn closed(lease: &'static str) -> Self {
        Self {
            ha_allowed: false,
            lease,
        }
    }
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Define a missing VM (volumes, seed, domain).
    Define(DesiredVm),
    /// Replace the definition of a VM whose spec changed.
    Redefine(DesiredVm),
    /// Start it (or resume it, if paused).
    Start(Target),
    /// Pause it.
    Suspend(Target),
    /// Resume it.
    Resume(Target),
    /// Shut it down gracefully.
    Shutdown(Target),
    /// Remove a managed domain that is no longer desired.
    Remove {
        /// Its name.
        name: String,
        /// Its UUID.
        uuid: String,
    },
    /// Rewrite a domain's HA flag and epoch in its metadata (the
    /// definition itself matches).
    Retag(DesiredVm),
    /// Remove an HA VM that now runs elsewhere: destroy, undefine, and
    /// delete its volumes unless `keep_disks`.
    Depart {
        /// Its name.
        name: String,
        /// Its UUID.
        uuid: String,
        /// Its disks are on shared storage, in use on the other host.
        keep_disks: bool,
    },
}

/// The VM an action is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The VM.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// The operation that asked for it.
    pub op_id: OpId,
}

impl Action {
    /// The VM's name (the backoff key).
    pub fn vm_name(&self) -> &str {
        match self {
            Action::Define(v) | Action::Redefine(v) | Action::Retag(v) => &v.spec.name,
            Action::Start(t) | Action::Suspend(t) | Action::Resume(t) | Action::Shutdown(t) => &t.name,
            Action::Remove { name, .. } | Action::Depart { name, .. } => name,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Define(v) => write!(f, "define {} (op {})", v.spec.name, v.op_id),
            Action::Redefine(v) => write!(f, "redefine {} (op {})", v.spec.name, v.op_id),
            Action::Start(t) => write!(f, "start {} (op {})", t.name, t.op_id),
            Action::Suspend(t) => write!(f, "pause {} (op {})", t.name, t.op_id),
            Action::Resume(t) => write!(f, "resume {} (op {})", t.name, t.op_id),
            Action::Shutdown(t) => write!(f, "shut down {} (op {})", t.name, t.op_id),
            Action::Remove { name, .. } => write!(f, "remove {name}"),
            Action::Retag(v) => write!(
                f,
                "retag {} (ha {}, epoch {}; op {})",
                v.spec.name, v.spec.ha, v.epoch, v.op_id
            ),
            Action::Depart { name, keep_disks, .. } => {
                if *keep_disks {
                    write!(f, "remove departed {name} (keeping its shared disks)")
                } else {
                    write!(f, "remove departed {name} with its disks")
                }
            }
        }
    }
}

/// One pass's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What to do now.
    pub actions: Vec<Action>,
    /// What is wrong and cannot be fixed now.
    pub drift: Vec<Drift>,
    /// VMs in a transition (shutting down) that will settle by themselves.
    pub settling: usize,
}

impl Plan {
    /// Whether the host matches the desired state.
    pub fn converged(&self) -> bool {
        self.actions.is_empty() && self.drift.is_empty() && self.settling == 0
    }
}

#[derive(Debug, Clone)]
struct Failure {
    count: u32,
    retry_at: Instant,
    message: String,
    kind: DriftKind,
}

/// Why an action failed, as the reconciler keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    /// For the operator.
    pub message: String,
    /// [`DriftKind::DiskLockHeld`] for a start refused by a disk lock (an
    /// expected wait, retried on its own schedule); else
    /// [`DriftKind::Failed`].
    pub kind: DriftKind,
}

impl From<&str> for ActionError {
    fn from(message: &str) -> Self {
        Self {
            message: message.to_string(),
            kind: DriftKind::Failed,
        }
    }
}

/// The reconciler's memory between passes: failures and their backoff,
/// and the highest epoch seen per VM.
#[derive(Debug, Default)]
pub struct Reconciler {
    failures: HashMap<String, Failure>,
    epochs: EpochGuard,
    /// The generation the host last fully matched (for logging transitions).
    pub converged_generation: Option<u64>,
}

/// First retry delay after a failure.
pub const RETRY_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// First retry delay after a start refused by a disk lock: the other copy
/// may be gone in a moment (its host was just killed, or just fenced).
pub const LOCK_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay for a disk lock: a failover waits on it.
pub const LOCK_RETRY_MAX: Duration = Duration::from_secs(15);

impl Reconciler {
    /// Plans one pass with the HA gate closed and nothing departed (HA
    /// VMs are defined but never started): for tools and benchmarks.
    pub fn plan(&self, now: Instant, desired: &[DesiredVm], observed: &[Observed]) -> Plan {
        self.plan_with(now, desired, &[], observed, Gate::closed("not consulted"))
    }

    /// Raises the epoch guard with the epochs of `desired` and those in the
    /// metadata of `observed` (a lower epoch than one seen is ignored).
    /// Call before [`Reconciler::plan_with`] on each pass.
    pub fn learn_epochs(&mut self, desired: &[DesiredVm], observed: &[Observed]) {
        for o in observed {
            if let (Some(m), Ok(id)) = (&o.managed, o.uuid.parse::<VmId>()) {
                self.epochs.admit(id, m.epoch);
            }
        }
        for d in desired {
            self.epochs.admit(d.id, d.epoch);
        }
    }

    /// The highest epoch seen for `vm`.
    pub fn highest_epoch(&self, vm: VmId) -> Option<u64> {
        self.epochs.highest(vm)
    }

    /// Plans one pass: `desired` VMs, `departed` ones (restarted
    /// elsewhere), what libvirt shows, and whether HA VMs may start now.
    pub fn plan_with(
        &self,
        now: Instant,
        desired: &[DesiredVm],
        departed: &[Departed],
        observed: &[Observed],
        gate: Gate,
    ) -> Plan {
        let mut plan = Plan::default();
        let by_uuid: HashMap<&str, &Observed> = observed.iter().map(|o| (o.uuid.as_str(), o)).collect();
        let by_name: HashMap<&str, &Observed> = observed.iter().map(|o| (o.name.as_str(), o)).collect();
        let gone: HashMap<String, bool> = departed
            .iter()
            .map(|d| (d.vm.to_string(), d.keep_disks))
            .collect();
        let mut wanted = HashSet::new();
        for d in desired {
            let uuid = d.id.to_string();
            wanted.insert(uuid.clone());
            if gone.contains_key(&uuid) {
                // Contradictory; the safe reading is that it runs elsewhere.
                plan.drift.push(Drift {
                    vm: d.spec.name.clone(),
                    kind: DriftKind::Failed,
                    message: "listed both as desired and as departed; treated as departed".into(),
                });
                continue;
            }
            let seen = self
                .epochs
                .highest(d.id)
                .into_iter()
                .chain(
                    by_uuid
                        .get(uuid.as_str())
                        .and_then(|o| o.managed.as_ref())
                        .map(|m| m.epoch),
                )
                .max();
            if let Some(seen) = seen.filter(|&s| d.epoch < s) {
                plan.drift.push(Drift {
                    vm: d.spec.name.clone(),
                    kind: DriftKind::Failed,
                    message: format!(
                        "stale epoch {} < {seen}: a newer placement exists; not defined or started here",
                        d.epoch
                    ),
                });
                continue;
            }
            if let Some(f) = self.failures.get(&d.spec.name) {
                if now < f.retry_at {
                    plan.drift.push(Drift {
                        vm: d.spec.name.clone(),
                        kind: f.kind,
                        message: format!(
                            "{} (attempt {}; retrying in {}s)",
                            f.message,
                            f.count,
                            f.retry_at.saturating_duration_since(now).as_secs().max(1)
                        ),
                    });
                    continue;
                }
            }
            let target = || Target {
                id: d.id,
                name: d.spec.name.clone(),
                op_id: d.op_id,
            };
            let Some(o) = by_uuid.get(uuid.as_str()) else {
                match by_name.get(d.spec.name.as_str()) {
                    Some(other) => plan.drift.push(Drift {
                        vm: d.spec.name.clone(),
                        kind: DriftKind::Failed,
                        message: format!(
                            "a different domain (UUID {}) already uses this name here; it is left alone",
                            other.uuid
                        ),
                    }),
                    None => plan.actions.push(Action::Define(d.clone())),
                }
                continue;
            };
            let Some(managed) = &o.managed else {
                plan.drift.push(Drift {
                    vm: d.spec.name.clone(),
                    kind: DriftKind::Failed,
                    message:
                        "a domain with this VM's UUID exists but NovaCron did not define it; it is left alone"
                            .into(),
                });
                continue;
            };
            if o.name != d.spec.name {
                plan.drift.push(Drift {
                    vm: d.spec.name.clone(),
                    kind: DriftKind::Failed,
                    message: format!("defined here as {:?}; renaming is not supported", o.name),
                });
                continue;
            }
            if !drift::matches(&managed.spec_hash, d) {
                plan.actions.push(Action::Redefine(d.clone()));
                continue;
            }
            if managed.ha != d.spec.ha || managed.epoch < d.epoch {
                plan.actions.push(Action::Retag(d.clone()));
                continue;
            }
            let action = match (d.power, o.state) {
                (_, VmState::ShuttingDown) => {
                    plan.settling += 1;
                    None
                }
                (Power::Running, VmState::Running) | (Power::Paused, VmState::Paused) => None,
                (Power::Stopped, VmState::Stopped) | (Power::Stopped, VmState::Crashed) => None,
                (Power::Running, VmState::Paused) => Some(Action::Resume(target())),
                (Power::Running, VmState::Stopped | VmState::Crashed) => Some(Action::Start(target())),
                (Power::Paused, VmState::Running) => Some(Action::Suspend(target())),
                (Power::Paused, VmState::Stopped | VmState::Crashed) => Some(Action::Start(target())),
                (Power::Stopped, VmState::Running | VmState::Paused) => Some(Action::Shutdown(target())),
                (_, s @ (VmState::Suspended | VmState::Unknown)) => {
                    plan.drift.push(Drift {
                        vm: d.spec.name.clone(),
                        kind: DriftKind::Failed,
                        message: format!("the domain is {s:?}, which the agent does not change by itself"),
                    });
                    None
                }
            };
            let starts = matches!(action, Some(Action::Start(_) | Action::Resume(_)));
            if starts && d.spec.ha && !gate.ha_allowed {
                plan.drift.push(Drift {
                    vm: d.spec.name.clone(),
                    kind: DriftKind::WaitingForLease,
                    message: format!("waiting for the HA lease (state {})", gate.lease),
                });
                continue;
            }
            plan.actions.extend(action);
        }
        for o in observed {
            if o.managed.is_none() {
                continue;
            }
            let keep = gone.get(&o.uuid).copied();
            if keep.is_none() && wanted.contains(&o.uuid) {
                continue;
            }
            if self.failures.get(&o.name).is_some_and(|f| now < f.retry_at) {
                plan.drift.push(Drift {
                    vm: o.name.clone(),
                    kind: DriftKind::Failed,
                    message: "no longer wanted here; removing it failed, will retry".into(),
                });
                continue;
            }
            plan.actions.push(match keep {
                Some(keep_disks) => Action::Depart {
                    name: o.name.clone(),
                    uuid: o.uuid.clone(),
                    keep_disks,
                },
                None => Action::Remove {
                    name: o.name.clone(),
                    uuid: o.uuid.clone(),
                },
            });
        }
        plan
    }

    /// Records an action's outcome.
    pub fn record(&mut self, now: Instant, vm: &str, result: Result<(), ActionError>) {
        match result {
            Ok(()) => {
                self.failures.remove(vm);
            }
            Err(ActionError { message, kind }) => {
                let count = self.failures.get(vm).map_or(1, |f| f.count + 1);
                let (base, max) = match kind {
                    DriftKind::DiskLockHeld => (LOCK_RETRY_BASE, LOCK_RETRY_MAX),
                    DriftKind::Failed | DriftKind::WaitingForLease => (RETRY_BASE, RETRY_MAX),
                };
                let delay = base.saturating_mul(1u32 << (count - 1).min(16)).min(max);
                self.failures.insert(
                    vm.to_string(),
                    Failure {
                        count,
                        retry_at: now + delay,
                        message,
                        kind,
                    },
                );
            }
        }
    }

    /// Forgets failures of VMs that are gone from both sides.
    pub fn forget_except(&mut self, names: &HashSet<&str>) {
        self.failures.retain(|k, _| names.contains(k.as_str()));
    }
}

#[cfg(test)]
mod tests;
