//! The operations driver: claims migrations, reads the clock, carries out
//! the state machines' actions (store, bus, agent commands, waits) and feeds
//! what happened back to them as events. Waits are tokio timers and the
//! sessions' report notifications, never polling loops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use novacron_shared::ids::{HostId, OpId, VmId};
use novacron_shared::protocol::{CommandKind, VmState};
use tokio::sync::mpsc;

use super::drain::{self, Drain};
use super::migration::{self, Migration, RESOLVE_EVERY};
use super::{resume, Now, Resume};
use crate::fleet::{request_for, Fleet, VmError};
use crate::store::{
    MigrationClaim, OperationKind, OperationRecord, OperationState, PlacementRules, Progress, StoreError,
};

/// A claimed migration, ready to run.
#[derive(Debug, Clone)]
struct Prepared {
    claim: MigrationClaim,
    dest_uri: String,
    op: OperationRecord,
}

impl Fleet {
    /// The time for an operation step.
    fn op_now(&self) -> Now {
        Now {
            at: self.clock.now(),
            wall_ms: self.clock.unix_ms(),
        }
    }

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
        self.live(host).and_then(|s| s.migration_uri())
    }

    /// The VM's state in the host's latest inventory (None: not there, or
    /// no inventory).
    fn observed_state(&self, host: HostId, vm: VmId) -> Option<VmState> {
        self.live(host).and_then(|s| s.vm_state(vm))
    }

    fn connected(&self, host: HostId) -> bool {
        self.live(host).is_some()
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
        let mut hosts = self.candidate_hosts()?;
        // An HA VM arrives running: only on a host holding its HA lease
        // (libvirt starts it there without the agent's lease gate).
        let leased = |h: HostId| self.lease_state(h) == Some(crate::ha::lease::HostState::Online);
        if rec.vm.spec.ha {
            if let Some(t) = target.filter(|t| *t != source && !leased(*t)) {
                return Err(VmError::Busy(format!(
                    "host {t} does not hold its HA lease now ({:?}); an HA VM moves only to a host that does",
                    self.lease_state(t)
                )));
            }
            hosts.retain(|h| leased(h.id));
        }
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
        let req = request_for(&rec.vm.spec, &rules);
        // The target's claim is reserved under the placement lock; the
        // claim's commit runs outside it.
        let (to, _) = self
            .placer
            .place_and_reserve(&self.store, hosts, &req, |to| (rec.clone(), Some(to)))?
            .map_err(VmError::NoFit)?;
        let Some(dest_uri) = self.migration_uri(to) else {
            self.placer.release(vm);
            return Err(VmError::NotConnected(format!("target host {to} went away")));
        };
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
        match self.store.claim_migration(&claim) {
            Ok(Ok(())) => self.placer.confirm(vm),
            Ok(Err(refusal)) => {
                self.placer.release(vm);
                return Err(VmError::Busy(refusal.to_string()));
            }
            Err(e) => {
                self.placer.release(vm);
                return Err(e.into());
            }
        }
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

    /// Runs a claimed migration to its end; true when the VM moved.
    async fn run_migration(self: Arc<Self>, p: Prepared) -> bool {
        let Prepared {
            claim,
            dest_uri,
            mut op,
        } = p;
        op.state = OperationState::Running;
        let m = Migration::new(
            claim,
            self.migration.prepare_timeout,
            self.migration.timeout,
            self.op_now(),
        );
        self.drive_migration(m, op, Some(dest_uri), migration::Event::Started)
            .await
    }

    /// The generation each host must report to acknowledge the claim.
    fn wanted_generation(&self, host: HostId) -> Result<u64, StoreError> {
        Ok(self.store.desired(host)?.map_or(0, |d| d.generation))
    }

    /// Feeds `first` and every later event to the migration and carries out
    /// its actions until it ends; true when the VM moved.
    async fn drive_migration(
        self: Arc<Self>,
        mut m: Migration,
        mut op: OperationRecord,
        dest_uri: Option<String>,
        first: migration::Event,
    ) -> bool {
        let claim = m.claim.clone();
        let mut wanted = Vec::new();
        for h in [claim.source, claim.target] {
            match self.wanted_generation(h) {
                Ok(g) => wanted.push((h, g)),
                Err(e) => tracing::error!(host = %h, error = %e, "cannot read the desired state"),
            }
        }
        let mut events = VecDeque::from([first]);
        while let Some(ev) = events.pop_front() {
            for action in m.step(ev, self.op_now()) {
                match action {
                    migration::Action::Progress {
                        percent,
                        message,
                        persist,
                    } => {
                        let pct = percent.unwrap_or(op.progress.percent);
                        self.set_progress(&mut op, pct, message, persist);
                    }
                    migration::Action::AwaitAcks { hosts, until } => {
                        events.push_back(self.await_acks(&hosts, &wanted, until).await);
                    }
                    migration::Action::SendMigrate => {
                        let uri = dest_uri.clone().unwrap_or_default();
                        events.push_back(self.send_migrate(&mut m, &mut op, &claim, uri).await);
                    }
                    migration::Action::Refresh => events.push_back(self.refresh(&claim).await),
                    migration::Action::Sleep(d) => {
                        tokio::time::sleep(d).await;
                        events.push_back(migration::Event::Tick);
                    }
                    migration::Action::Finish { moved, error } => {
                        return self.finish_migration(&claim, &mut op, moved, error);
                    }
                    migration::Action::Abandon { error } => {
                        op.state = OperationState::Failed;
                        op.error = Some(error);
                        self.update_op(&mut op, true);
                        return false;
                    }
                }
            }
        }
        false
    }

    /// Waits until one of `hosts` reported converging on (or past) its
    /// wanted generation, or until `until`.
    async fn await_acks(
        &self,
        hosts: &[HostId],
        wanted: &[(HostId, u64)],
        until: std::time::Instant,
    ) -> migration::Event {
        let mut reports = self.report_changes();
        loop {
            for h in hosts {
                let want = wanted.iter().find(|(w, _)| w == h).map(|(_, g)| *g);
                let got = self.live(*h).and_then(|s| s.reported_generation());
                if let (Some(want), Some(got)) = (want, got) {
                    if got >= want {
                        return migration::Event::Acked(*h);
                    }
                }
            }
            let left = until.saturating_duration_since(self.clock.now());
            if left.is_zero() {
                return migration::Event::Tick;
            }
            // A report (or the sessions closing) wakes us; so does the deadline.
            if tokio::time::timeout(left, reports.changed()).await.is_err() {
                return migration::Event::Tick;
            }
        }
    }

    /// Sends the migrate command, feeding progress to the migration while it
    /// runs; returns how it ended.
    async fn send_migrate(
        &self,
        m: &mut Migration,
        op: &mut OperationRecord,
        claim: &MigrationClaim,
        dest_uri: String,
    ) -> migration::Event {
        let timeout = self.migration.timeout;
        let kind = CommandKind::Migrate {
            vm: claim.vm,
            dest_uri,
            bandwidth_mib_s: self.migration.bandwidth_mib_s,
            timeout_secs: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<(u8, String)>();
        let cmd = self.command_with_progress(
            claim.source,
            op.id,
            kind,
            timeout + Duration::from_secs(60),
            Some(tx),
        );
        tokio::pin!(cmd);
        let result = loop {
            tokio::select! {
                r = &mut cmd => break r,
                Some((percent, message)) = rx.recv() => {
                    for a in m.step(migration::Event::Progress { percent, message }, self.op_now()) {
                        if let migration::Action::Progress { percent, message, persist } = a {
                            let pct = percent.unwrap_or(op.progress.percent);
                            self.set_progress(op, pct, message, persist);
                        }
                    }
                }
            }
        };
        match result {
            Ok((_, outcome)) => migration::Event::Outcome(outcome),
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "migration outcome unknown; asking both hosts");
                migration::Event::Lost(e.to_string())
            }
        }
    }

    /// Asks both hosts for fresh inventories.
    async fn refresh(&self, claim: &MigrationClaim) -> migration::Event {
        let fresh = tokio::join!(
            self.command(claim.source, CommandKind::RefreshInventory, RESOLVE_EVERY * 3),
            self.command(claim.target, CommandKind::RefreshInventory, RESOLVE_EVERY * 3),
        );
        if matches!(fresh, (Ok(_), Ok(_))) {
            migration::Event::Found {
                on_source: self.observed_state(claim.source, claim.vm),
                on_target: self.observed_state(claim.target, claim.vm),
            }
        } else {
            migration::Event::Unreachable
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
        self.placer.invalidate();
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

    /// Cordons a host and live-migrates its running VMs away, one at a
    /// time; returns the operation at once.
    pub fn drain(self: &Arc<Self>, host: HostId, actor: &str) -> Result<OperationRecord, VmError> {
        if !self.set_cordon(host, true)? {
            return Err(VmError::Invalid(format!("no host with id {host}")));
        }
        let now = self.clock.unix_ms();
        let op = OperationRecord {
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
        tokio::spawn(async move { fleet.drive_drain(host, op, actor).await });
        Ok(ret)
    }

    /// Carries a drain's actions out until it ends.
    async fn drive_drain(self: Arc<Self>, host: HostId, mut op: OperationRecord, actor: String) {
        let first = match self.store.desired(host) {
            Ok(d) => drain::Event::Listed(
                d.map(|d| d.vms)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| (v.id, v.spec.name))
                    .collect(),
            ),
            Err(e) => drain::Event::ListFailed(e.to_string()),
        };
        let mut d = Drain::new();
        let mut events = VecDeque::from([first]);
        while let Some(ev) = events.pop_front() {
            for action in d.step(ev) {
                match action {
                    drain::Action::Progress { percent, message } => {
                        self.set_progress(&mut op, percent, message, true);
                    }
                    drain::Action::Migrate(vm) => {
                        let ev = match self.prepare_migration(vm, None, &actor) {
                            Ok(p) => {
                                let moved = self.clone().run_migration(p).await;
                                let unknown = !moved && self.store.migration(vm).ok().flatten().is_some();
                                drain::Event::Ended { moved, unknown }
                            }
                            Err(e) => drain::Event::Refused(e.to_string()),
                        };
                        events.push_back(ev);
                    }
                    drain::Action::Finish {
                        succeeded,
                        message,
                        error,
                    } => {
                        op.state = if succeeded {
                            OperationState::Succeeded
                        } else {
                            OperationState::Failed
                        };
                        if succeeded {
                            op.progress = Progress {
                                percent: 100,
                                message,
                            };
                        } else {
                            op.progress.message = message;
                        }
                        op.error = error;
                        self.update_op(&mut op, true);
                    }
                }
            }
        }
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
            match resume(&op, claim) {
                Resume::Resolve(claim) => {
                    tracing::info!(op = %op.id, vm = %claim.vm, "resuming an interrupted migration");
                    let m = Migration::resumed(claim, self.migration.timeout, self.op_now());
                    let fleet = self.clone();
                    tokio::spawn(async move {
                        fleet.drive_migration(m, op, None, migration::Event::Tick).await;
                    });
                }
                Resume::Fail(why) => {
                    op.state = OperationState::Failed;
                    op.error = Some(why);
                    self.update_op(&mut op, true);
                }
            }
        }
    }
}
