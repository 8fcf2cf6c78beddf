//! Live migration and drain, run as operations.
//!
//! A migration: pre-checks (VM running, source connected, target connected,
//! accepting migrations and passing the scheduler's filters), then one
//! transaction claims the target's capacity and marks the VM as migrating
//! for both hosts; both agents must acknowledge that desired state (they
//! leave the domain alone from then on) before the source agent is told to
//! migrate peer to peer. The VM's record moves to the target only when the
//! source reports success; on failure it stays on the source and the claim
//! is released. When the outcome is unknown (the source agent vanished or
//! the server restarted), the VM's location is decided from fresh
//! inventories of both hosts, never by guessing: the claim keeps both
//! agents' hands off until then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::protocol::{CommandKind, CommandOutcome, VmState};
use tokio::sync::mpsc;

use super::{lock, request_for, Fleet, VmError};
use crate::store::{
    MigrationClaim, OperationKind, OperationRecord, OperationState, PlacementRules, Progress, StoreError,
};

/// How often an uncertain migration re-reads both hosts.
const RESOLVE_EVERY: Duration = Duration::from_secs(3);
/// How long past the agent's own deadline an uncertain migration is
/// watched before it is left to the operator (the claim stays).
const RESOLVE_GRACE: Duration = Duration::from_secs(600);
/// Progress is persisted at most this often (every report is published).
const PERSIST_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A claimed migration, ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    claim: MigrationClaim,
    dest_uri: String,
    op: OperationRecord,
}

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

impl Fleet {
    /// Checks, claims and starts a live migration of `vm` to `target` (or
    /// the scheduler's choice); returns the operation at once.
    pub fn migrate(
        self: &Arc<Self>,
        vm: VmId,
        target: Option<HostId>,
        actor: &str,
    ) -> Result<OperationRecord, VmError> {
        let prepared = self.prepare_migration(vm, target, actor)?;
        let op = prepared.op.clone();
        let fleet = self.clone();
        tokio::spawn(async move {
            fleet.run_migration(prepared).await;
        });
        Ok(op)
    }

    fn migration_uri(&self, host: HostId) -> Option<String> {
        let s = self.lock_sessions().get(&host).cloned()?;
        let inv = lock(&s.inventory);
        inv.as_ref().and_then(|i| i.migration_uri.clone())
    }

    /// The VM's state in the host's latest inventory (None: not there, or
    /// no inventory).
    fn observed_state(&self, host: HostId, vm: VmId) -> Option<VmState> {
        let s = self.lock_sessions().get(&host).cloned()?;
        let uuid = vm.to_string();
        let inv = lock(&s.inventory);
        inv.as_ref()
            .and_then(|i| i.vms.iter().find(|o| o.uuid == uuid).map(|o| o.state))
    }

    fn connected(&self, host: HostId) -> bool {
        self.lock_sessions().contains_key(&host)
    }

    fn prepare_migration(&self, vm: VmId, target: Option<HostId>, actor: &str) -> Result<Prepared, VmError> {
        let rec = self.store.vm(vm)?.ok_or(VmError::NotFound(vm))?;
        self.not_migrating(vm)?;
        let Some(source) = rec.host() else {
            return Err(VmError::Invalid(format!(
                "VM {} is not on a host of the fleet; only VMs on a host can be live-migrated",
                rec.vm.spec.name
            )));
        };
        if !self.connected(source) {
            return Err(VmError::NotConnected(format!(
                "the VM's host {source} is not connected; a live migration needs its agent"
            )));
        }
        match self.observed_state(source, vm) {
            Some(VmState::Running | VmState::Paused) => {}
            Some(s) => {
                return Err(VmError::Busy(format!(
                    "VM {} is {s:?} on host {source}; only a running or paused VM can be live-migrated",
                    rec.vm.spec.name
                )))
            }
            None => {
                return Err(VmError::Busy(format!(
                    "VM {} is not running on host {source} yet (its agent has not reported it)",
                    rec.vm.spec.name
                )))
            }
        }
        let mut sched = lock(&self.scheduler);
        let mut hosts = self.scheduler_hosts()?;
        match target {
            Some(t) if t == source => {
                return Err(VmError::Invalid(format!("host: the VM already runs on host {t}")));
            }
            Some(t) => {
                if !hosts.iter().any(|h| h.id == t) {
                    return Err(VmError::Invalid(format!("host: no host with id {t}")));
                }
                if !self.connected(t) {
                    return Err(VmError::NotConnected(format!("target host {t} is not connected")));
                }
                if self.migration_uri(t).is_none() {
                    return Err(VmError::Busy(format!(
                        "host {t} takes no live migrations: its agent has no vms.migration_uri"
                    )));
                }
                hosts.retain(|h| h.id == t);
            }
            None => {
                hosts.retain(|h| h.id != source && self.migration_uri(h.id).is_some());
                if hosts.is_empty() {
                    return Err(VmError::Busy(
                        "no other host takes live migrations (connected, with vms.migration_uri set)".into(),
                    ));
                }
            }
        }
        let rules = PlacementRules {
            host: None,
            ..rec.rules.clone()
        };
        let to = sched
            .place(&self.sched_policy, &hosts, &request_for(&rec.vm.spec, &rules))
            .map_err(VmError::NoFit)?;
        let dest_uri = self
            .migration_uri(to)
            .ok_or_else(|| VmError::NotConnected(format!("target host {to} went away")))?;
        let now = self.clock.unix_ms();
        let op = OperationRecord {
            id: OpId::random(),
            kind: OperationKind::Migrate,
            vm: Some(vm),
            host: Some(source),
            target: Some(to),
            state: OperationState::Pending,
            progress: Progress {
                percent: 0,
                message: format!("capacity claimed on host {to}"),
            },
            error: None,
            actor: actor.to_string(),
            created_ms: now,
            updated_ms: now,
        };
        let claim = MigrationClaim {
            vm,
            source,
            target: to,
            op: op.id,
            started_ms: now,
        };
        let claimed = self.store.claim_migration(&claim);
        *lock(&self.usage) = None;
        if let Err(refusal) = claimed? {
            return Err(VmError::Busy(refusal.to_string()));
        }
        drop(sched);
        self.store.put_operation(&op)?;
        self.bus.operation(&op);
        tracing::info!(vm = %rec.vm.spec.name, %source, target = %to, op = %op.id, "live migration claimed");
        self.push_both(source, to);
        Ok(Prepared { claim, dest_uri, op })
    }

    fn push_both(&self, a: HostId, b: HostId) {
        for h in [a, b] {
            match self.store.desired(h) {
                Ok(Some(d)) => self.push_desired(h, d),
                Ok(None) => {}
                Err(e) => tracing::error!(host = %h, error = %e, "cannot read the desired state"),
            }
        }
    }

    /// Stores and publishes an operation change.
    fn update_op(&self, op: &mut OperationRecord, persist: bool) {
        op.updated_ms = self.clock.unix_ms();
        if persist || op.state.is_final() {
            if let Err(e) = self.store.put_operation(op) {
                tracing::error!(op = %op.id, error = %e, "cannot store the operation");
            }
        }
        self.bus.operation(op);
    }

    fn set_progress(&self, op: &mut OperationRecord, percent: u8, message: String, persist: bool) {
        op.progress = Progress { percent, message };
        self.update_op(op, persist);
    }

    /// Waits until `host` reported converging on (or past) its current
    /// desired generation.
    async fn acknowledged(&self, host: HostId, deadline: Instant) -> Result<bool, StoreError> {
        let want = self.store.desired(host)?.map_or(0, |d| d.generation);
        while self.clock.now() < deadline {
            let got = self
                .lock_sessions()
                .get(&host)
                .and_then(|s| lock(&s.report).as_ref().map(|r| r.generation));
            if got.is_some_and(|g| g >= want) {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    /// Runs a claimed migration to its end.
    async fn run_migration(self: Arc<Self>, p: Prepared) -> bool {
        let Prepared {
            claim,
            dest_uri,
            mut op,
        } = p;
        op.state = OperationState::Running;
        self.set_progress(
            &mut op,
            0,
            "waiting for both agents to leave the VM alone".into(),
            true,
        );
        let deadline = self.clock.now() + self.migration.prepare_timeout;
        for h in [claim.source, claim.target] {
            if !self.acknowledged(h, deadline).await.unwrap_or(false) {
                let msg = format!(
                    "host {h} did not acknowledge the migration within {}; nothing was moved",
                    novacron_shared::duration::format(self.migration.prepare_timeout)
                );
                return self.finish_migration(&claim, &mut op, false, Some(msg));
            }
        }
        self.set_progress(&mut op, 0, format!("migrating to host {}", claim.target), true);
        let (tx, mut rx) = mpsc::unbounded_channel::<(u8, String)>();
        let timeout = self.migration.timeout;
        let kind = CommandKind::Migrate {
            vm: claim.vm,
            dest_uri,
            bandwidth_mib_s: self.migration.bandwidth_mib_s,
            timeout_secs: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
        };
        let fleet = self.clone();
        let mut progress_op = op.clone();
        let progress = tokio::spawn(async move {
            let mut last_persist = fleet.clock.now();
            while let Some((pct, msg)) = rx.recv().await {
                let persist = fleet.clock.since(last_persist) >= PERSIST_PROGRESS_EVERY;
                if persist {
                    last_persist = fleet.clock.now();
                }
                fleet.set_progress(&mut progress_op, pct.min(99), msg, persist);
            }
            progress_op.progress
        });
        let r = self
            .command_with_progress(
                claim.source,
                op.id,
                kind,
                timeout + Duration::from_secs(60),
                Some(tx),
            )
            .await;
        if let Ok(last) = progress.await {
            op.progress = last;
        }
        match r {
            Ok((_, CommandOutcome::Done)) => self.finish_migration(&claim, &mut op, true, None),
            Ok((_, CommandOutcome::Failed { message })) => {
                self.finish_migration(&claim, &mut op, false, Some(message))
            }
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "migration outcome unknown; asking both hosts");
                self.resolve(claim, op).await
            }
        }
    }

    /// Ends a migration: moves the VM's record when `moved`, releases the
    /// claim, tells both agents, finishes the operation.
    fn finish_migration(
        &self,
        claim: &MigrationClaim,
        op: &mut OperationRecord,
        moved: bool,
        error: Option<String>,
    ) -> bool {
        let ended = self.store.end_migration(claim.vm, moved);
        *lock(&self.usage) = None;
        if let Err(e) = ended {
            // The claim stays: both agents keep their hands off.
            tracing::error!(op = %op.id, error = %e, "cannot record the migration's end");
            op.state = OperationState::Failed;
            op.error = Some(format!("the server could not record the outcome: {e}"));
            self.update_op(op, true);
            return false;
        }
        self.push_both(claim.source, claim.target);
        if moved {
            op.state = OperationState::Succeeded;
            op.progress = Progress {
                percent: 100,
                message: format!("runs on host {}", claim.target),
            };
            self.bus.vm(
                Some(claim.target),
                claim.vm,
                format!("VM migrated from host {} to host {}", claim.source, claim.target),
            );
            tracing::info!(vm = %claim.vm, source = %claim.source, target = %claim.target, "live migration succeeded");
        } else {
            op.state = OperationState::Failed;
            op.error = Some(format!(
                "{}; the VM keeps running on host {}",
                error.as_deref().unwrap_or("the migration failed"),
                claim.source
            ));
            tracing::warn!(vm = %claim.vm, error = ?op.error, "live migration failed");
        }
        self.update_op(op, true);
        moved
    }

    /// Decides an uncertain migration from fresh inventories of both hosts.
    async fn resolve(self: Arc<Self>, claim: MigrationClaim, mut op: OperationRecord) -> bool {
        let agent_deadline =
            Duration::from_millis(claim.started_ms) + self.migration.timeout + Duration::from_secs(30);
        let give_up = agent_deadline + RESOLVE_GRACE;
        loop {
            let now = Duration::from_millis(self.clock.unix_ms());
            if now > give_up {
                op.state = OperationState::Failed;
                op.error = Some(format!(
                    "could not tell where VM {} runs; both hosts keep their hands off it until an operator checks hosts {} and {}",
                    claim.vm, claim.source, claim.target
                ));
                self.update_op(&mut op, true);
                return false;
            }
            let fresh = tokio::join!(
                self.command(claim.source, CommandKind::RefreshInventory, RESOLVE_EVERY * 3),
                self.command(claim.target, CommandKind::RefreshInventory, RESOLVE_EVERY * 3),
            );
            if matches!(fresh, (Ok(_), Ok(_))) {
                let w = whereabouts(
                    self.observed_state(claim.source, claim.vm),
                    self.observed_state(claim.target, claim.vm),
                );
                match w {
                    Whereabouts::Target => return self.finish_migration(&claim, &mut op, true, None),
                    Whereabouts::Source if now > agent_deadline => {
                        let msg =
                            "the source agent lost track of the migration and the VM is still there".into();
                        return self.finish_migration(&claim, &mut op, false, Some(msg));
                    }
                    _ => {}
                }
                let pct = op.progress.percent;
                self.set_progress(&mut op, pct, "outcome unknown; watching both hosts".into(), false);
            } else {
                let pct = op.progress.percent;
                self.set_progress(
                    &mut op,
                    pct,
                    "outcome unknown; waiting for both hosts to connect".into(),
                    false,
                );
            }
            tokio::time::sleep(RESOLVE_EVERY).await;
        }
    }

    /// Cordons a host and live-migrates its running VMs away, one at a
    /// time; returns the operation at once.
    pub fn drain(self: &Arc<Self>, host: HostId, actor: &str) -> Result<OperationRecord, VmError> {
        if !self.set_cordon(host, true)? {
            return Err(VmError::Invalid(format!("no host with id {host}")));
        }
        let now = self.clock.unix_ms();
        let mut op = OperationRecord {
            id: OpId::random(),
            kind: OperationKind::Drain,
            vm: None,
            host: Some(host),
            target: None,
            state: OperationState::Running,
            progress: Progress {
                percent: 0,
                message: "host cordoned".into(),
            },
            error: None,
            actor: actor.to_string(),
            created_ms: now,
            updated_ms: now,
        };
        self.store.put_operation(&op)?;
        self.bus.operation(&op);
        let fleet = self.clone();
        let ret = op.clone();
        let actor = actor.to_string();
        tokio::spawn(async move {
            let vms = match fleet.store.desired(host) {
                Ok(d) => d.map(|d| d.vms).unwrap_or_default(),
                Err(e) => {
                    op.state = OperationState::Failed;
                    op.error = Some(format!("cannot list the host's VMs: {e}"));
                    fleet.update_op(&mut op, true);
                    return;
                }
            };
            let total = vms.len();
            let mut moved = 0;
            let mut problems = Vec::new();
            for (i, vm) in vms.iter().enumerate() {
                let pct = u8::try_from(i * 100 / total.max(1)).unwrap_or(99);
                fleet.set_progress(
                    &mut op,
                    pct,
                    format!("migrating {} ({} of {total})", vm.spec.name, i + 1),
                    true,
                );
                match fleet.prepare_migration(vm.id, None, &actor) {
                    Ok(p) => {
                        if fleet.clone().run_migration(p).await {
                            moved += 1;
                        } else {
                            let why = fleet.store.migration(vm.id).ok().flatten().map_or_else(
                                || "migration failed".to_string(),
                                |_| "outcome unknown".to_string(),
                            );
                            problems.push(format!("{}: {why}", vm.spec.name));
                        }
                    }
                    Err(e) => problems.push(format!("{}: {e}", vm.spec.name)),
                }
            }
            if problems.is_empty() {
                op.state = OperationState::Succeeded;
                op.progress = Progress {
                    percent: 100,
                    message: format!("drained: {moved} VMs moved; the host stays cordoned"),
                };
            } else {
                op.state = OperationState::Failed;
                op.progress.message = format!("{moved} of {total} VMs moved");
                op.error = Some(format!(
                    "{} of {total} VMs stay on the host: {}",
                    problems.len(),
                    problems.join("; ")
                ));
            }
            fleet.update_op(&mut op, true);
        });
        Ok(ret)
    }

    /// At start-up: operations a previous run left unfinished are resumed
    /// (migrations with a claim are resolved from the hosts' inventories)
    /// or failed with a clear reason.
    pub fn resume_operations(self: Arc<Self>) {
        let ops = match self.store.unfinished_operations() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read unfinished operations");
                return;
            }
        };
        for mut op in ops {
            let claim = op.vm.and_then(|vm| self.store.migration(vm).ok().flatten());
            match (op.kind, claim) {
                (OperationKind::Migrate, Some(claim)) if claim.op == op.id => {
                    tracing::info!(op = %op.id, vm = %claim.vm, "resuming an interrupted migration");
                    let fleet = self.clone();
                    tokio::spawn(async move {
                        fleet.resolve(claim, op).await;
                    });
                }
                _ => {
                    op.state = OperationState::Failed;
                    op.error = Some(match op.kind {
                        OperationKind::Drain => {
                            "the server restarted during the drain; the host stays cordoned, run the drain again".into()
                        }
                        OperationKind::Migrate => "the server restarted before the migration started".into(),
                    });
                    self.update_op(&mut op, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
