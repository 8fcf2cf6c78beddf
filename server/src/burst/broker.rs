//! The burst broker: the one task that talks to the cloud provider.
//!
//! Each `[burst] interval`, or when woken (a VM went pending, a burst VM
//! was deleted or powered), one tick:
//!
//! 1. drives every cloud record one step ([`lifecycle`]): launch (looking
//!    the launch id's tag up first on any retry and after a restart),
//!    describe, stop/start to follow the VM's desired power, terminate,
//!    accrue cost, finish or abandon a move home;
//! 2. places waiting VMs on hosts that fit now, and asks the [`policy`]
//!    which of the others burst (the rest wait with the reason shown);
//! 3. starts moving burst VMs home when a host fits them;
//! 4. lists the fleet's instances by tag to find orphans;
//! 5. publishes the status (API, Prometheus) and the budget events.
//!
//! A launch id is committed before its RunInstances, so nothing this task
//! does can start two instances for one decision (see `store/burst.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use novacron_cloud::{MicroUsd, Provider};
use novacron_shared::clock::Clock;
use novacron_shared::ids::VmId;
use novacron_shared::placement::Placement;
use rand::Rng;

use super::{cost, policy, OrphanView, PendingView, Shared, Status};
use crate::fleet::Fleet;
use crate::store::{CloudRecord, CloudState, VmRecord};
use crate::telemetry::TELEMETRY;

mod lifecycle;
#[cfg(test)]
mod tests;

/// A launch failed for good holds its VM from bursting again this long.
const HOLD_AFTER_FAILURE_MS: u64 = 10 * 60 * 1000;

/// Where a test can stop the broker to kill the server (`NOVACRON_CRASH_AT`):
/// the crash-consistency tests kill -9 the server at these points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the launch id is committed, before RunInstances.
    LaunchStored,
    /// After RunInstances answered, before the answer is committed.
    LaunchAnswered,
}

impl CrashPoint {
    fn from_env() -> Option<Self> {
        match std::env::var("NOVACRON_CRASH_AT").ok()?.as_str() {
            "burst-launch-stored" => Some(Self::LaunchStored),
            "burst-launch-answered" => Some(Self::LaunchAnswered),
            other => {
                tracing::warn!(point = other, "NOVACRON_CRASH_AT names no crash point; ignored");
                None
            }
        }
    }
}

/// The broker's state (all in memory; the store holds what must survive).
pub struct Broker {
    fleet: Arc<Fleet>,
    shared: Arc<Shared>,
    provider: Arc<dyn Provider>,
    clock: Clock,
    /// Launch ids committed by this process and not tried yet: their first
    /// RunInstances needs no lookup (nothing can have launched them).
    fresh: HashSet<String>,
    /// VMs whose launch failed for good: held until, and why.
    held: HashMap<VmId, (u64, String)>,
    /// Instances of this fleet no VM owns, by instance id.
    orphans: HashMap<String, OrphanView>,
    /// Budget levels last seen (hourly, monthly), for the 80 %/100 % events.
    levels: (policy::Level, policy::Level),
    crash_at: Option<CrashPoint>,
}

/// Runs the broker until the process ends; with bursting off, only the
/// placement of waiting VMs (`placement.wait`) when a host fits.
/// `beat` is this loop's watchdog heartbeat (see [`novacron_shared::notify`]).
pub async fn run(fleet: Arc<Fleet>, shared: Arc<Shared>, beat: novacron_shared::notify::Beat) {
    let Some(mut b) = Broker::new(fleet.clone(), shared.clone()) else {
        return run_waiting(fleet, shared, beat).await;
    };
    tracing::info!(
        provider = b.provider.name(),
        region = b.provider.region(),
        fleet = %b.shared.fleet_tag,
        "burst broker started"
    );
    // The caps are config: exposed once, for the budget alert.
    TELEMETRY.burst_hourly_cap.set(b.shared.caps.per_hour.dollars());
    TELEMETRY.burst_month_cap.set(b.shared.caps.per_month.dollars());
    loop {
        beat.beat().await;
        b.tick().await;
        let interval = b.shared.cfg.interval;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = b.shared.wake.notified() => {}
        }
    }
}

/// Places waiting VMs when a host fits them (bursting off), and keeps
/// their reasons current.
async fn run_waiting(fleet: Arc<Fleet>, shared: Arc<Shared>, beat: novacron_shared::notify::Beat) {
    loop {
        beat.beat().await;
        let waiting = place_waiting(&fleet, &HashSet::new());
        let pending = waiting
            .into_iter()
            .map(|(vm, reason)| {
                if let Err(e) = fleet.store().set_pending_reason(vm.vm.id, &reason) {
                    tracing::warn!(vm = %vm.vm.id, error = %e, "cannot record a waiting VM's reason");
                }
                PendingView {
                    vm: vm.vm.id,
                    name: vm.vm.spec.name,
                    burstable: false,
                    reason,
                }
            })
            .collect();
        shared.publish(Status {
            pending,
            ..Status::default()
        });
        tokio::select! {
            () = tokio::time::sleep(shared.cfg.interval) => {}
            () = shared.wake.notified() => {}
        }
    }
}

/// Places every waiting VM (but those in `skip`) that a host fits now;
/// returns the others with the scheduler's reasons.
fn place_waiting(fleet: &Fleet, skip: &HashSet<VmId>) -> Vec<(VmRecord, String)> {
    let pending = match fleet.pending_vms() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the waiting VMs");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for vm in pending {
        if skip.contains(&vm.vm.id) {
            continue;
        }
        match fleet.place_waiting(&vm) {
            Ok(Ok(_)) => {}
            Ok(Err(nofit)) => out.push((vm, nofit.to_string())),
            Err(e) => tracing::debug!(vm = %vm.vm.spec.name, error = %e, "waiting VM not placed"),
        }
    }
    out
}

impl Broker {
    /// A broker for `shared`'s provider (none when bursting is off); it
    /// reads the time from the fleet's clock.
    pub fn new(fleet: Arc<Fleet>, shared: Arc<Shared>) -> Option<Self> {
        let provider = shared.provider.clone()?;
        Some(Broker {
            clock: fleet.clock().clone(),
            fleet,
            provider,
            fresh: HashSet::new(),
            held: HashMap::new(),
            orphans: HashMap::new(),
            levels: (policy::Level::Below, policy::Level::Below),
            crash_at: CrashPoint::from_env(),
            shared,
        })
    }

    /// One pass over records, waiting VMs, repatriation and orphans.
    pub async fn tick(&mut self) {
        let records = match self.fleet.store().cloud_records() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "burst: cannot read the cloud records");
                return;
            }
        };
        let observed = self.describe(&records).await;
        for rec in records {
            self.step(rec, observed.as_ref()).await;
        }
        let pending = self.place_or_burst().await;
        self.repatriate();
        let listed = self.find_orphans().await;
        self.publish(pending, listed);
    }

    fn now_ms(&self) -> u64 {
        self.clock.unix_ms()
    }

    /// One describe for every instance the records name; `None` when the
    /// provider could not be asked (nothing is concluded from silence).
    async fn describe(&self, records: &[CloudRecord]) -> Option<HashMap<String, novacron_cloud::Instance>> {
        let ids: Vec<String> = records
            .iter()
            .filter_map(|r| r.instance.as_ref().map(|i| i.id.clone()))
            .collect();
        if ids.is_empty() {
            return Some(HashMap::new());
        }
        match self.provider.describe(&ids).await {
            Ok(list) => Some(list.into_iter().map(|i| (i.id.clone(), i)).collect()),
            Err(e) => {
                count_error(&e);
                tracing::warn!(error = %e, "burst: describing the instances failed; retried next tick");
                None
            }
        }
    }

    /// Waiting VMs: placed on a host when one fits, else burst when the
    /// policy says so, else their reason is updated. Returns what waits.
    async fn place_or_burst(&mut self) -> Vec<PendingView> {
        let now = self.now_ms();
        let fleet = self.fleet.clone();
        let store = fleet.store();
        let bursting: HashSet<VmId> = match store.cloud_records() {
            Ok(r) => r.into_iter().map(|r| r.vm).collect(),
            Err(e) => {
                tracing::error!(error = %e, "burst: cannot read the cloud records");
                return Vec::new();
            }
        };
        self.held.retain(|_, (until, _)| *until > now);
        let mut candidates = Vec::new();
        let mut by_id: HashMap<VmId, VmRecord> = HashMap::new();
        for (vm, mut nofit) in place_waiting(&fleet, &bursting) {
            // A VM that should not run is not worth an instance.
            let runs = vm.vm.power == novacron_shared::spec::Power::Running;
            if !runs && vm.rules.burst.is_some() {
                nofit.push_str("; not burst while it should not run");
            }
            let rule = vm.rules.burst.clone().filter(|_| runs);
            let image = match &rule {
                Some(r) => self.shared.image_for(&vm.vm.spec, r),
                None => Err(String::new()),
            };
            let held = self.held.get(&vm.vm.id).cloned();
            candidates.push(policy::Candidate {
                vm: vm.vm.id,
                vcpus: vm.vm.spec.vcpus,
                memory_mib: vm.vm.spec.memory_mib,
                rule,
                image,
                since_ms: vm.created_ms,
                no_fit: nofit,
                held_until_ms: held.as_ref().map(|h| h.0),
                held_why: held.map(|h| h.1),
            });
            by_id.insert(vm.vm.id, vm);
        }
        let budget = self.budget(now);
        let settings = policy::Settings {
            caps: self.shared.caps,
            burst_after_ms: u64::try_from(self.shared.cfg.burst_after.as_millis()).unwrap_or(u64::MAX),
            types: self.provider.instance_types(),
        };
        let mut waiting = Vec::new();
        let mut fresh = Vec::new();
        for d in policy::decide(&settings, now, budget, &candidates) {
            match d {
                policy::Decision::Wait { vm, reason } => {
                    if let Err(e) = store.set_pending_reason(vm, &reason) {
                        tracing::warn!(%vm, error = %e, "burst: cannot record a waiting VM's reason");
                    }
                    if let Some(r) = by_id.get(&vm) {
                        waiting.push(PendingView {
                            vm,
                            name: r.vm.spec.name.clone(),
                            burstable: r.rules.burst.is_some(),
                            reason,
                        });
                    }
                }
                policy::Decision::Launch {
                    vm,
                    instance_type,
                    image,
                    reasons,
                } => {
                    let Some(rec) = by_id.get(&vm) else { continue };
                    if let Some(claimed) = self.claim(rec, &instance_type, image, reasons, now) {
                        fresh.push(claimed);
                    }
                }
            }
        }
        self.launch_fresh(fresh, now).await;
        waiting
    }

    /// Commits a burst decision (the launch id before any launch); returns
    /// the record to launch.
    fn claim(
        &mut self,
        vm: &VmRecord,
        t: &novacron_cloud::InstanceType,
        image: String,
        reasons: String,
        now: u64,
    ) -> Option<CloudRecord> {
        let launch_id = format!("nc-{}", novacron_shared::ids::OpId::random());
        let rec = CloudRecord {
            vm: vm.vm.id,
            provider: self.provider.name().to_string(),
            launch_id: launch_id.clone(),
            state: CloudState::Launching,
            instance: None,
            instance_type: t.name.clone(),
            per_hour: t.per_hour,
            image,
            decided_ms: now,
            reasons: reasons.clone(),
            accrued: MicroUsd(0),
            billed_until_ms: None,
            run_started_ms: None,
            attempts: 0,
            last_error: None,
            retry_at_ms: None,
            step_started_ms: now,
            repatriation: None,
            deleted: false,
        };
        let why = format!(
            "launching in {} as {} ({}/h; launch {launch_id})",
            self.provider.name(),
            t.name,
            t.per_hour
        );
        match self.fleet.store().cloud_claim(&rec, why.clone()) {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => {
                tracing::info!(vm = %vm.vm.spec.name, %refused, "burst: not claimed");
                return None;
            }
            Err(e) => {
                tracing::error!(vm = %vm.vm.spec.name, error = %e, "burst: cannot commit the burst decision");
                return None;
            }
        }
        tracing::info!(vm = %vm.vm.spec.name, %launch_id, instance_type = %t.name, %reasons, "burst decided");
        self.fleet.bus.burst(
            Some(vm.vm.id),
            format!(
                "VM {} bursts to {}: {reasons}; {why}",
                vm.vm.spec.name,
                self.provider.name()
            ),
        );
        self.fresh.insert(launch_id);
        Some(rec)
    }

    /// What the counted instances use of the caps now.
    fn budget(&self, now: u64) -> policy::Budget {
        let mut b = policy::Budget::default();
        if let Ok(records) = self.fleet.store().cloud_records() {
            for r in records.iter().filter(|r| counted(r)) {
                b.instances += 1;
                b.per_hour = b.per_hour.plus(r.per_hour);
            }
        }
        b.month_spent = self
            .fleet
            .store()
            .burst_spend(cost::month_of(now))
            .unwrap_or_default();
        b
    }

    /// Starts moving burst VMs home when a host fits them.
    fn repatriate(&mut self) {
        if !self.shared.cfg.repatriate {
            return;
        }
        let now = self.now_ms();
        let Ok(records) = self.fleet.store().cloud_records() else {
            return;
        };
        for rec in records {
            if rec.deleted || rec.repatriation.is_some() || rec.state != CloudState::Running {
                continue;
            }
            let Ok(Some(vm)) = self.fleet.store().vm(rec.vm) else {
                continue;
            };
            let wants = vm.rules.burst.as_ref().is_some_and(|r| r.repatriate)
                && vm.vm.power == novacron_shared::spec::Power::Running;
            if !wants || !matches!(vm.placement, Placement::Cloud { .. }) {
                continue;
            }
            match self.fleet.repatriate(&vm, &rec, now) {
                Ok(Ok(host)) => {
                    tracing::info!(vm = %vm.vm.spec.name, %host, "burst: moving home");
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::debug!(vm = %vm.vm.spec.name, error = %e, "burst: not moved home"),
            }
        }
    }

    /// Lists the fleet's instances and updates the orphans; terminates
    /// those past `orphan_terminate_after`. Returns whether the list was
    /// read.
    async fn find_orphans(&mut self) -> bool {
        let listed = match self
            .provider
            .list_by_tag(novacron_cloud::TAG_FLEET, &self.shared.fleet_tag)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                count_error(&e);
                tracing::warn!(error = %e, "burst: listing the fleet's instances failed");
                return false;
            }
        };
        let Ok(records) = self.fleet.store().cloud_records() else {
            return false;
        };
        let known_ids: HashSet<&str> = records
            .iter()
            .filter_map(|r| r.instance.as_ref().map(|i| i.id.as_str()))
            .collect();
        let known_launches: HashSet<&str> = records.iter().map(|r| r.launch_id.as_str()).collect();
        let now = self.now_ms();
        let grace = self
            .shared
            .cfg
            .orphan_terminate_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut seen = HashSet::new();
        for i in listed {
            if i.state.ended() || known_ids.contains(i.id.as_str()) {
                continue;
            }
            let launch = i.tags.get(novacron_cloud::TAG_LAUNCH).map(String::as_str);
            if launch.is_some_and(|l| known_launches.contains(l)) {
                continue; // a launch being adopted
            }
            seen.insert(i.id.clone());
            let entry = self.orphans.entry(i.id.clone()).or_insert_with(|| {
                tracing::warn!(instance = %i.id, "burst: an instance of this fleet belongs to no VM");
                self.fleet.bus.burst(
                    None,
                    format!(
                        "ALERT: instance {} ({}) in {} is tagged with this fleet but belongs to no VM{}",
                        i.id,
                        i.instance_type,
                        self.provider.name(),
                        match grace {
                            Some(g) => format!(
                                "; it is terminated in {}",
                                novacron_shared::duration::format(Duration::from_millis(g))
                            ),
                            None => "; only reported ([burst] orphan_terminate_after is not set)".into(),
                        }
                    ),
                );
                OrphanView {
                    instance: i.id.clone(),
                    instance_type: i.instance_type.clone(),
                    provider_state: i.state.to_string(),
                    vm_tag: i.tags.get(novacron_cloud::TAG_VM).cloned(),
                    first_seen_ms: now,
                    terminate_at_ms: grace.map(|g| now.saturating_add(g)),
                }
            });
            entry.provider_state = i.state.to_string();
            if entry.terminate_at_ms.is_some_and(|t| now >= t) {
                match self.provider.terminate(&i.id).await {
                    Ok(()) => {
                        tracing::warn!(instance = %i.id, "burst: orphan terminated");
                        self.fleet.bus.burst(
                            None,
                            format!("orphan instance {} terminated after its grace period", i.id),
                        );
                        seen.remove(&i.id);
                    }
                    Err(e) => {
                        count_error(&e);
                        tracing::warn!(instance = %i.id, error = %e, "burst: terminating an orphan failed");
                    }
                }
            }
        }
        self.orphans.retain(|id, _| seen.contains(id));
        true
    }

    /// Publishes the status, sets the gauges, raises the budget events.
    fn publish(&mut self, pending: Vec<PendingView>, _listed: bool) {
        let store = self.fleet.store();
        let now = self.now_ms();
        let month = cost::month_of(now);
        let records = store.cloud_records().unwrap_or_default();
        let mut s = Status {
            pending,
            orphans: self.orphans.values().cloned().collect(),
            month,
            month_spent: store.burst_spend(month).unwrap_or_default(),
            total: store.burst_spend_total().unwrap_or_default(),
            ..Status::default()
        };
        s.orphans.sort_by(|a, b| a.instance.cmp(&b.instance));
        let mut per_state: HashMap<CloudState, i64> = HashMap::new();
        TELEMETRY.burst_vm_cost.reset();
        for r in records {
            if counted(&r) {
                s.instances += 1;
                s.per_hour = s.per_hour.plus(r.per_hour);
            }
            *per_state.entry(r.state).or_default() += 1;
            let name = store.vm(r.vm).ok().flatten().map(|v| v.vm.spec.name);
            TELEMETRY
                .burst_vm_cost
                .with_label_values(&[name.as_deref().unwrap_or(&r.vm.to_string())])
                .set(r.accrued.dollars());
            s.records.push((r, name));
        }
        for st in crate::telemetry::CLOUD_STATES {
            TELEMETRY
                .burst_instances
                .with_label_values(&[crate::telemetry::cloud_state_label(st)])
                .set(per_state.get(&st).copied().unwrap_or(0));
        }
        TELEMETRY.burst_month_spend.set(s.month_spent.dollars());
        TELEMETRY.burst_hourly_rate.set(s.per_hour.dollars());
        TELEMETRY
            .burst_orphans
            .set(i64::try_from(s.orphans.len()).unwrap_or(i64::MAX));
        let caps = self.shared.caps;
        let hourly = policy::level(s.per_hour, caps.per_hour);
        let monthly = policy::level(s.month_spent, caps.per_month);
        for (what, before, now_level, used, cap) in [
            ("hourly", self.levels.0, hourly, s.per_hour, caps.per_hour),
            ("monthly", self.levels.1, monthly, s.month_spent, caps.per_month),
        ] {
            if let Some(l) = policy::rose(before, now_level) {
                let pct = if l == policy::Level::Reached { 100 } else { 80 };
                let msg = format!(
                    "ALERT: the {what} cloud budget is at {pct} % ({used} of {cap}){}",
                    if l == policy::Level::Reached {
                        "; no new bursts until it falls"
                    } else {
                        ""
                    }
                );
                tracing::warn!(budget = what, percent = pct, "{msg}");
                self.fleet.bus.burst(None, msg);
            }
        }
        self.levels = (hourly, monthly);
        self.shared.publish(s);
    }

    /// Backoff before the next try of a step tried `attempts` times.
    fn backoff(&self, attempts: u32) -> u64 {
        let mut b = novacron_shared::backoff::Backoff::new(Duration::from_secs(1), self.shared.cfg.retry_max);
        for _ in 0..attempts.saturating_sub(1).min(31) {
            b.next_delay(0.0);
        }
        let d = b.next_delay(rand::rng().random::<f64>());
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Stops here when a test asked for it, to be killed.
    async fn crash_point(&self, p: CrashPoint) {
        if self.crash_at == Some(p) {
            tracing::warn!(point = ?p, "crash point reached: waiting to be killed");
            std::future::pending::<()>().await;
        }
    }
}

/// Whether a record counts against the caps.
fn counted(r: &CloudRecord) -> bool {
    !r.deleted && r.state != CloudState::Terminating
}

fn count_error(e: &novacron_cloud::ProviderError) {
    let kind = match e {
        novacron_cloud::ProviderError::Throttled(_) => "throttled",
        novacron_cloud::ProviderError::Transient(_) => "transient",
        novacron_cloud::ProviderError::Permanent { .. } => "permanent",
    };
    TELEMETRY.burst_errors.with_label_values(&[kind]).inc();
}
