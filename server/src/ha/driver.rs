//! The HA driver: runs the pure pieces against the live fleet. It ticks
//! the fleet's lease view, feeds the controller the fleet view, carries
//! the controller's decisions out through the fleet's action channel, and
//! publishes the HA status the API shows.
//!
//! It also runs the hardware fences the controller asks for
//! (`fences`: a host confirmed off is fenced in the lease view at once),
//! and shows restarted VMs whose start waits on a disk lock still held
//! elsewhere (drift of kind `DiskLockHeld` on their new host: an expected
//! wait, one event per wait).
//!
//! One task; it holds no lock of the fleet across an await. It wakes when
//! the lease view can change by time alone, when the controller has a
//! retry or a release step due, when a fence command ends or a failed
//! fence is due again, when a host's facts change (connect, disconnect,
//! report, inventory, maintenance), when an operator releases *held*, and
//! at least every [`MAX_SLEEP`].

mod fences;

use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_shared::ids::{HostId, VmId};
use novacron_shared::spec::Power;

use super::controller::{Controller, Decision, HostInput, Policy, VmInput};
use super::guard::{GuardPolicy, GuardState};
use super::lease::HostState;
use crate::fleet::ha::{HaStatus, Held, HostFence, LockWait, VmHa, VmHaState};
use crate::fleet::view::{Action, ActionError, Outcome};
use crate::fleet::{Fleet, VmError};
use crate::telemetry::TELEMETRY;

/// Longest the driver sleeps without a reason to wake.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Who the operation log names for the driver's actions.
const ACTOR: &str = "ha-controller";

/// The controller's policy from the server's `[ha]` config. With the
/// witness on, lost leases count for the guard's memory
/// (`WitnessTiming::guard_memory`).
pub fn policy(c: &crate::config::HaConfig) -> Policy {
    Policy {
        enabled: c.enabled,
        guard: GuardPolicy {
            ratio: c.mass_failure_ratio,
            window: c.mass_failure_window,
            release_step: c.release_step,
            memory: c.witness.enabled.then(|| c.witness_timing().guard_memory()),
        },
        retry: c.retry,
        isolation: c.isolation,
        disk_locks: c.disk_locks,
        hardware_fence: c.hardware_fence().is_some(),
    }
}

/// Runs for the life of the server.
/// `beat` is this loop's watchdog heartbeat (see [`novacron_shared::notify`]).
pub async fn run(fleet: Arc<Fleet>, beat: novacron_shared::notify::Beat) {
    let clock = fleet.clock().clone();
    let known: Vec<HostId> = match fleet.store().hosts() {
        Ok(h) => h.into_iter().map(|h| h.id).collect(),
        Err(e) => {
            tracing::error!(error = %e, "HA driver cannot read the hosts; HA restarts are off until the server restarts");
            return;
        }
    };
    let mut ctl = Controller::new(policy(fleet.ha_config()), known, clock.now());
    let mut changes = fleet.lease_changes();
    let mut releases = fleet.release_requests();
    releases.borrow_and_update();
    let actions = fleet.actions();
    let mut names = std::collections::HashMap::new();
    let (mut fences, mut fence_done) = fences::Fences::new(fleet.ha_config());
    let mut lock_waits = LockWaits::default();
    loop {
        beat.beat().await;
        let now = clock.now();
        match fleet.tick_leases(now) {
            Ok(moves) => {
                for t in moves {
                    note_transition(&fleet, t.host, t.from, t.to);
                }
            }
            // The lease view moved on; a host declared fenced restarts
            // nothing until its flag is stored (retried at every tick).
            Err(e) => tracing::error!(error = %e, "HA: cannot store a fenced host's flag; retrying"),
        }
        // Every VM is read only while some host is fenced (the controller
        // has VMs to restart or report); else the hosts are enough.
        let fenced = fleet.lease_states().values().any(|s| *s == HostState::Fenced);
        let view = match if fenced || !ctl.vms().is_empty() {
            fleet.view()
        } else {
            fleet.view_hosts()
        } {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "HA driver cannot read the fleet view; retrying");
                tokio::time::sleep(MAX_SLEEP).await;
                continue;
            }
        };
        let named: Vec<(HostId, HostState, String)> = view
            .hosts
            .iter()
            .map(|h| (h.id, h.lease, h.name.clone()))
            .collect();
        fences.settle(&fleet, &named);
        fences.poll(&fleet, now);
        let losses = fleet.lease_losses(now);
        let hosts: Vec<HostInput> = view
            .hosts
            .iter()
            .map(|h| HostInput {
                id: h.id,
                lease: h.lease,
                reconciled: h.reconciled,
                loss: losses.get(&h.id).copied(),
                fence: fences.status(h.id).0,
            })
            .collect();
        let vms: Vec<VmInput> = view
            .vms
            .iter()
            .map(|v| VmInput {
                id: v.id,
                host: v.placement.host(),
                ha: v.ha,
                priority: v.ha_priority,
                running: v.power == Power::Running,
                epoch: v.epoch,
                migrating: v.migrating_to.is_some(),
                created_ms: v.created_ms,
            })
            .collect();
        names.clear();
        names.extend(view.vms.iter().map(|v| (v.id, v.name.clone())));
        let mut decisions = Vec::new();
        if releases.has_changed().unwrap_or(false) {
            releases.borrow_and_update();
            decisions.extend(ctl.release(&hosts));
        }
        decisions.extend(ctl.step(now, &hosts, &vms));
        for d in decisions {
            if let Decision::Fence { host } = d {
                fences.start(&fleet, host);
                continue;
            }
            carry_out(&fleet, &actions, &mut ctl, d, &names).await;
        }
        lock_waits.observe(&fleet, &view, now);
        publish(&fleet, &ctl, &hosts, &fences, &lock_waits, now);

        let now = clock.now();
        let wake = [
            fleet.next_lease_tick(now),
            ctl.next_wakeup(),
            fences.next_wakeup(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map_or(MAX_SLEEP, |t| t.saturating_duration_since(now).min(MAX_SLEEP));
        tokio::select! {
            () = tokio::time::sleep(wake) => {}
            r = changes.changed() => if r.is_err() { return },
            r = releases.changed() => if r.is_err() { return },
            Some(done) = fence_done.recv() => fences.done(&fleet, clock.now(), done),
        }
    }
}

fn note_transition(fleet: &Fleet, host: HostId, from: HostState, to: HostState) {
    let what = match to {
        HostState::Online => "holds its lease again",
        HostState::Suspect => "is suspect (heartbeats missed or disconnected)",
        HostState::LeaseExpired => "lease expired: its agent is fencing its HA VMs",
        HostState::Fenced => "is fenced: its agent must have stopped its HA VMs; restarting them elsewhere",
        HostState::Returning => "is back after a fence: no lease until the VMs that moved are gone from it",
        HostState::Maintenance => "is in maintenance: never fenced",
    };
    match to {
        HostState::Online | HostState::Suspect | HostState::Maintenance => {
            tracing::info!(host = %host, ?from, ?to, "HA: host {what}")
        }
        _ => tracing::warn!(host = %host, ?from, ?to, "HA: host {what}"),
    }
    fleet.bus.ha(Some(host), None, format!("host {host} {what}"));
}

async fn carry_out(
    fleet: &Fleet,
    actions: &crate::fleet::view::ActionSender,
    ctl: &mut Controller,
    d: Decision,
    names: &std::collections::HashMap<VmId, String>,
) {
    let name = |vm: &VmId| names.get(vm).cloned().unwrap_or_else(|| vm.to_string());
    match d {
        Decision::Restart { vm, from, epoch } => {
            let r = actions.submit(Action::Restart { vm, from, epoch }, ACTOR).await;
            let now = fleet.clock().now();
            match r {
                Ok(Outcome::Vm(rec)) => {
                    ctl.restart_done(vm);
                    let to = rec.host().map_or_else(|| "-".to_string(), |h| h.to_string());
                    tracing::warn!(vm = %name(&vm), id = %vm, from = %from, to = %to, epoch = rec.vm.epoch, at_ms = fleet.clock().unix_ms(), "HA: VM restarted on another host");
                    fleet.bus.ha(
                        rec.host(),
                        Some(vm),
                        format!(
                            "VM {} restarted on host {to} (from fenced host {from}, epoch {})",
                            name(&vm),
                            rec.vm.epoch
                        ),
                    );
                }
                Ok(other) => {
                    tracing::error!(vm = %vm, outcome = ?other, "HA: unexpected outcome of a restart");
                    ctl.restart_failed(vm, now, "unexpected outcome".into());
                }
                Err(ActionError::Refused(VmError::NoFit(nf))) => {
                    let why = nf.to_string();
                    tracing::warn!(vm = %name(&vm), id = %vm, why = %why, "HA: no host fits the VM of a fenced host; retrying");
                    fleet.bus.ha(
                        Some(from),
                        Some(vm),
                        format!("VM {} waits: no host fits ({why})", name(&vm)),
                    );
                    ctl.restart_failed(vm, now, why);
                }
                Err(e) => {
                    tracing::info!(vm = %vm, error = %e, "HA: restart refused; the controller looks again");
                    ctl.restart_failed(vm, now, e.to_string());
                }
            }
        }
        // Run by the driver's fences (`run`), never reaches here.
        Decision::Fence { .. } => {}
        Decision::ReturnedClean { host } => {
            match actions.submit(Action::ReturnedClean { host }, ACTOR).await {
                Ok(_) => {
                    tracing::info!(host = %host, "HA: returning host reconciled; it may hold a lease again");
                    fleet.bus.ha(
                        Some(host),
                        None,
                        format!("host {host} reconciled after its fence: leases resume"),
                    );
                }
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "HA: could not mark a returning host clean")
                }
            }
        }
        Decision::Lost { vm, host } => {
            tracing::warn!(vm = %name(&vm), id = %vm, host = %host, "HA: VM lost with its fenced host (not HA, or not meant to run); not restarted");
            fleet.bus.ha(
                Some(host),
                Some(vm),
                format!("VM {} lost with fenced host {host} (not HA)", name(&vm)),
            );
        }
        Decision::Held { silent, monitored } => {
            TELEMETRY.ha_held.set(1);
            tracing::error!(silent, monitored, "HA: held — many hosts went silent at once; no restarts until they return or an operator releases (`novacron ha release`)");
            fleet.bus.ha(
                None,
                None,
                format!("HA held: {silent} of {monitored} hosts went silent together; no restarts (release with `novacron ha release`)"),
            );
        }
        Decision::Releasing => {
            tracing::warn!("HA: hosts came back; leaving held one fenced host at a time");
            fleet.bus.ha(
                None,
                None,
                "HA leaving held: fenced hosts are released one at a time".into(),
            );
        }
        Decision::Released { by_operator } => {
            TELEMETRY.ha_held.set(0);
            tracing::warn!(by_operator, "HA: no longer held");
            fleet.bus.ha(
                None,
                None,
                if by_operator {
                    "HA released by an operator: fenced hosts' HA VMs restart now".into()
                } else {
                    "HA no longer held".into()
                },
            );
        }
    }
}

/// Restarted VMs whose start waits on a disk lock held elsewhere.
#[derive(Default)]
struct LockWaits {
    /// By VM: the host it waits on, since when.
    waits: std::collections::BTreeMap<VmId, (HostId, Instant)>,
}

impl LockWaits {
    /// Reads the hosts' latest reconcile reports: an HA VM placed on a
    /// host reporting drift of kind `DiskLockHeld` for it waits; one event
    /// when a wait begins.
    fn observe(&mut self, fleet: &Fleet, view: &crate::fleet::view::FleetView, now: Instant) {
        let held = fleet.disk_lock_waits();
        let mut seen = std::collections::BTreeSet::new();
        for v in view.vms.iter().filter(|v| v.ha) {
            let Some(host) = v.placement.host() else {
                continue;
            };
            if !held.get(&host).is_some_and(|names| names.contains(&v.name)) {
                continue;
            }
            seen.insert(v.id);
            if self.waits.get(&v.id).is_none_or(|(h, _)| *h != host) {
                self.waits.insert(v.id, (host, now));
                tracing::info!(vm = %v.name, id = %v.id, host = %host, "HA: VM waits for its disk lock (another copy, or its old host, still holds it)");
                fleet.bus.ha(
                    Some(host),
                    Some(v.id),
                    format!(
                        "VM {} waits on host {host}: disk lock held elsewhere (the old copy is not gone yet); retried, not an error",
                        v.name
                    ),
                );
            }
        }
        self.waits.retain(|vm, _| seen.contains(vm));
    }
}

/// Publishes the controller's state for the API.
fn publish(
    fleet: &Fleet,
    ctl: &Controller,
    hosts: &[HostInput],
    fences: &fences::Fences,
    lock_waits: &LockWaits,
    now: Instant,
) {
    for state in crate::telemetry::LEASE_STATES {
        let n = hosts.iter().filter(|h| h.lease == state).count();
        TELEMETRY
            .ha_hosts
            .with_label_values(&[crate::telemetry::lease_state_label(state)])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let to_ms = |t: Instant| {
        let ago = now.saturating_duration_since(t);
        fleet
            .clock()
            .unix_ms()
            .saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))
    };
    let held = match ctl.guard() {
        GuardState::Held {
            since,
            silent,
            monitored,
        } => Some(Held {
            since_ms: to_ms(*since),
            silent: *silent,
            monitored: *monitored,
        }),
        _ => None,
    };
    let vms = ctl
        .vms()
        .iter()
        .map(|(id, s)| {
            (
                *id,
                VmHa {
                    state: match &s.waiting {
                        None => VmHaState::Lost,
                        Some(super::controller::Waiting::Restarting) => VmHaState::Restarting,
                        Some(_) => VmHaState::Waiting,
                    },
                    why: s.waiting.as_ref().map_or_else(
                        || "not HA (or not meant to run): lost until its host comes back".to_string(),
                        |w| w.describe(now),
                    ),
                    since_ms: to_ms(s.since),
                },
            )
        })
        .collect();
    let fences = fences
        .all()
        .into_iter()
        .map(|(h, (state, error))| (h, HostFence { state, error }))
        .collect();
    let lock_waits = lock_waits
        .waits
        .iter()
        .map(|(vm, (host, since))| {
            (
                *vm,
                LockWait {
                    host: *host,
                    since_ms: to_ms(*since),
                },
            )
        })
        .collect();
    fleet.publish_ha_status(HaStatus {
        held,
        releasing: matches!(ctl.guard(), GuardState::Releasing { .. }),
        vms,
        fences,
        lock_waits,
    });
}
