//! One cloud record, one step: launching → running ⇄ stopping/stopped/
//! starting → terminating → gone, with the provider's answers committed by
//! compare-and-set on the record (a VM deleted meanwhile wins, and is
//! terminated on the next tick).
//!
//! - A launch looks its launch id's tag up before any retry and after a
//!   restart (only a launch id committed by this process and never tried
//!   skips it), so a lost answer never makes a second instance.
//! - Throttles and server errors are retried with capped, jittered backoff
//!   and shown on the VM (`attempts`, `last_error`, `retry_at_ms`); a
//!   permanent error, or retries past `launch_timeout` with no instance
//!   found by tag, end the launch and release its budget.
//! - Cost is accrued per tick while the instance is billed (running), and
//!   a run is billed a minute at least.
//! - A move home terminates the instance only once the host's copy runs;
//!   it is abandoned (the host's copy dropped) when the host's copy does
//!   not run within `repatriate_timeout`, or when the instance's
//!   termination is not confirmed within `max_overlap`.

use std::collections::{BTreeMap, HashMap};

use novacron_cloud::{Instance, InstanceState, LaunchSpec, MicroUsd, ProviderError};
use novacron_shared::placement::Placement;

use super::{count_error, Broker, CrashPoint, HOLD_AFTER_FAILURE_MS};
use crate::burst::cost;
use crate::store::{CloudInstance, CloudRecord, CloudRefusal, CloudState, Spend};
use crate::telemetry::TELEMETRY;

/// RunInstances calls in flight at once for one tick's new decisions.
pub(super) const LAUNCH_CONCURRENCY: usize = 16;

/// Records the decision → RunInstances delay of a first attempt.
fn observe_decision(rec: &CloudRecord, now: u64) {
    TELEMETRY
        .burst_decision_seconds
        .observe(now.saturating_sub(rec.decided_ms) as f64 / 1000.0);
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Broker {
    /// Drives one record one step (`observed`: this tick's describe, when
    /// it succeeded).
    pub(super) async fn step(&mut self, rec: CloudRecord, observed: Option<&HashMap<String, Instance>>) {
        let now = self.now_ms();
        if rec.retry_at_ms.is_some_and(|t| now < t) {
            return;
        }
        match rec.state {
            CloudState::Launching => self.launch(rec, now).await,
            CloudState::Terminating => self.terminate(rec, now).await,
            CloudState::Running | CloudState::Stopping | CloudState::Stopped | CloudState::Starting => {
                if let Some(obs) = observed {
                    self.follow(rec, obs, now).await;
                }
            }
        }
    }

    fn vm_name(&self, rec: &CloudRecord) -> String {
        match self.fleet.store().vm(rec.vm) {
            Ok(Some(v)) => v.vm.spec.name,
            _ => rec.vm.to_string(),
        }
    }

    /// Instances this launch made that still live (by its tag).
    async fn launched_by(&self, rec: &CloudRecord) -> Result<Vec<Instance>, ProviderError> {
        let found = self
            .provider
            .list_by_tag(novacron_cloud::TAG_LAUNCH, &rec.launch_id)
            .await?;
        Ok(found.into_iter().filter(|i| !i.state.ended()).collect())
    }

    async fn launch(&mut self, rec: CloudRecord, now: u64) {
        if !self.fresh.remove(&rec.launch_id) {
            // A retry, or a launch from before a restart: it may have
            // happened even though no answer was committed.
            match self.launched_by(&rec).await {
                Ok(found) => {
                    if let Some(i) = found.into_iter().next() {
                        return self.adopt(rec, i, now, "adopted").await;
                    }
                }
                Err(e) => return self.retry(rec, &e, now),
            }
        }
        self.crash_point(CrashPoint::LaunchStored).await;
        let Some(spec) = self.launch_spec(&rec) else {
            // Deleted: the delete set the record to terminate; nothing to do.
            return;
        };
        if rec.attempts == 0 {
            observe_decision(&rec, self.now_ms());
        }
        match self.provider.launch(&spec).await {
            Ok(i) => {
                self.crash_point(CrashPoint::LaunchAnswered).await;
                self.adopt(rec, i, now, "launched").await;
            }
            Err(e) => self.launch_failed(rec, e, now).await,
        }
    }

    /// Launches records this tick's decisions committed, up to
    /// [`LAUNCH_CONCURRENCY`] RunInstances at once (no lookup: nothing can
    /// have launched them), then commits each answer in turn.
    pub(super) async fn launch_fresh(&mut self, recs: Vec<CloudRecord>, now: u64) {
        for r in &recs {
            self.fresh.remove(&r.launch_id);
        }
        if recs.is_empty() {
            return;
        }
        self.crash_point(CrashPoint::LaunchStored).await;
        for chunk in recs.chunks(LAUNCH_CONCURRENCY) {
            let mut calls = tokio::task::JoinSet::new();
            for rec in chunk {
                let Some(spec) = self.launch_spec(rec) else {
                    continue;
                };
                observe_decision(rec, self.now_ms());
                let (provider, rec) = (self.provider.clone(), rec.clone());
                calls.spawn(async move {
                    let answer = provider.launch(&spec).await;
                    (rec, answer)
                });
            }
            let mut answers = Vec::with_capacity(chunk.len());
            while let Some(joined) = calls.join_next().await {
                match joined {
                    Ok(a) => answers.push(a),
                    // The record stays launching; its next try looks its
                    // tag up first.
                    Err(e) => tracing::error!(error = %e, "burst: a launch task failed"),
                }
            }
            if !answers.is_empty() {
                self.crash_point(CrashPoint::LaunchAnswered).await;
            }
            for (rec, answer) in answers {
                match answer {
                    Ok(i) => self.adopt(rec, i, now, "launched").await,
                    Err(e) => self.launch_failed(rec, e, now).await,
                }
            }
        }
    }

    /// What to launch for `rec` (`None` when its VM is gone).
    fn launch_spec(&self, rec: &CloudRecord) -> Option<LaunchSpec> {
        let Ok(Some(vm)) = self.fleet.store().vm(rec.vm) else {
            return None;
        };
        let mut tags = BTreeMap::new();
        tags.insert(novacron_cloud::TAG_VM.to_string(), rec.vm.to_string());
        tags.insert(
            novacron_cloud::TAG_FLEET.to_string(),
            self.shared.fleet_tag.clone(),
        );
        tags.insert(novacron_cloud::TAG_LAUNCH.to_string(), rec.launch_id.clone());
        tags.insert("Name".to_string(), vm.vm.spec.name.clone());
        let aws = self.shared.cfg.aws.as_ref();
        Some(LaunchSpec {
            launch_id: rec.launch_id.clone(),
            instance_type: rec.instance_type.clone(),
            image: rec.image.clone(),
            user_data: vm.vm.spec.cloud_init.as_ref().and_then(|c| c.user_data.clone()),
            subnet: aws.and_then(|a| a.subnet_id.clone()),
            security_groups: aws.map(|a| a.security_group_ids.clone()).unwrap_or_default(),
            key_name: aws.and_then(|a| a.key_name.clone()),
            tags,
        })
    }

    async fn launch_failed(&mut self, rec: CloudRecord, e: ProviderError, now: u64) {
        count_error(&e);
        let timed_out = now.saturating_sub(rec.step_started_ms) >= ms(self.shared.cfg.launch_timeout);
        if e.retryable() && !timed_out {
            return self.retry(rec, &e, now);
        }
        if e.retryable() {
            // The launch may have gone through: release only when its tag
            // finds nothing.
            match self.launched_by(&rec).await {
                Ok(found) if !found.is_empty() => {
                    if let Some(i) = found.into_iter().next() {
                        return self.adopt(rec, i, now, "adopted").await;
                    }
                }
                Ok(_) => {}
                Err(e2) => return self.retry(rec, &e2, now),
            }
        }
        let why = if timed_out && e.retryable() {
            format!(
                "no launch within {} ({e})",
                novacron_shared::duration::format(self.shared.cfg.launch_timeout)
            )
        } else {
            e.to_string()
        };
        let name = self.vm_name(&rec);
        match self
            .fleet
            .store()
            .cloud_forget(&rec, None, Some(format!("burst failed: {why}")))
        {
            Ok(Ok(left)) => self.fleet.left_host(left),
            Ok(Err(r)) => return tracing::info!(vm = %name, %r, "burst: failed launch not released"),
            Err(e) => return tracing::error!(vm = %name, error = %e, "burst: cannot release a failed launch"),
        }
        TELEMETRY.burst_launches.with_label_values(&["failed"]).inc();
        self.held
            .insert(rec.vm, (now.saturating_add(HOLD_AFTER_FAILURE_MS), why.clone()));
        tracing::warn!(vm = %name, launch = %rec.launch_id, error = %why, "burst: launch failed");
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "ALERT: VM {name}'s launch in {} failed: {why}; its budget is released and it waits",
                rec.provider
            ),
        );
    }

    /// Commits an instance the provider gave (or a lookup found).
    async fn adopt(&mut self, rec: CloudRecord, i: Instance, now: u64, how: &'static str) {
        let mut new = rec.clone();
        new.state = match i.state {
            InstanceState::Stopped => CloudState::Stopped,
            InstanceState::Stopping => CloudState::Stopping,
            _ => CloudState::Running,
        };
        new.instance = Some(CloudInstance {
            id: i.id.clone(),
            private_ip: i.private_ip.clone(),
            public_ip: i.public_ip.clone(),
            provider_state: i.state.to_string(),
        });
        if new.state == CloudState::Running {
            new.billed_until_ms = Some(now);
            new.run_started_ms = Some(now);
        }
        new.attempts = 0;
        new.last_error = None;
        new.retry_at_ms = None;
        new.step_started_ms = now;
        let placement = Placement::Cloud {
            provider: rec.provider.clone(),
            instance: i.id.clone(),
        };
        let name = self.vm_name(&rec);
        match self.fleet.store().cloud_update(&rec, &new, None, Some(placement)) {
            Ok(Ok(_)) => {}
            Ok(Err(CloudRefusal::Changed)) => {
                // Deleted meanwhile: keep the instance id so it is terminated.
                if let Ok(Some(mut cur)) = self.fleet.store().cloud_record(rec.vm) {
                    if cur.launch_id == rec.launch_id {
                        let old = cur.clone();
                        cur.instance = new.instance.clone();
                        if let Err(e) = self.fleet.store().cloud_update(&old, &cur, None, None) {
                            tracing::error!(vm = %name, error = %e, "burst: cannot record a launched instance");
                        }
                    }
                }
                return;
            }
            Ok(Err(r)) => return tracing::warn!(vm = %name, %r, "burst: launched instance not recorded"),
            Err(e) => {
                return tracing::error!(vm = %name, error = %e, "burst: cannot record a launched instance")
            }
        }
        TELEMETRY.burst_launches.with_label_values(&[how]).inc();
        tracing::info!(vm = %name, instance = %i.id, instance_type = %rec.instance_type, how, "burst: instance recorded");
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "VM {name} runs in {} as {} ({}, {}/h{})",
                rec.provider,
                i.id,
                rec.instance_type,
                rec.per_hour,
                i.private_ip.map(|ip| format!(", {ip}")).unwrap_or_default()
            ),
        );
    }

    /// Records a retryable failure: backoff, shown on the VM.
    fn retry(&mut self, rec: CloudRecord, e: &ProviderError, now: u64) {
        let mut new = rec.clone();
        new.attempts = rec.attempts.saturating_add(1);
        let wait = self.backoff(new.attempts);
        new.last_error = Some(e.to_string());
        new.retry_at_ms = Some(now.saturating_add(wait));
        let name = self.vm_name(&rec);
        tracing::warn!(vm = %name, attempt = new.attempts, retry_in_ms = wait, error = %e, "burst: provider call failed; retrying");
        if let Err(err) = self.fleet.store().cloud_update(&rec, &new, None, None) {
            tracing::error!(vm = %name, error = %err, "burst: cannot record a retry");
        }
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "VM {name}: {e} (attempt {}); retrying in {}",
                new.attempts,
                novacron_shared::duration::format(std::time::Duration::from_millis(wait))
            ),
        );
    }

    /// Follows a launched instance: its state, cost, the VM's desired power
    /// and a move home.
    async fn follow(&mut self, rec: CloudRecord, obs: &HashMap<String, Instance>, now: u64) {
        let Some(inst) = rec.instance.clone() else {
            return;
        };
        let seen = obs.get(&inst.id).filter(|i| !i.state.ended());
        let Some(i) = seen else {
            return self.vanished(rec, now, obs.get(&inst.id).map(|i| i.state.to_string()));
        };
        let mut new = rec.clone();
        if let Some(ni) = new.instance.as_mut() {
            ni.provider_state = i.state.to_string();
            ni.private_ip.clone_from(&i.private_ip);
            ni.public_ip.clone_from(&i.public_ip);
        }
        let spend = bill(&mut new, i.state.billed(), now);
        new.state = match (rec.state, &i.state) {
            (CloudState::Stopping | CloudState::Running, InstanceState::Stopped) => CloudState::Stopped,
            (CloudState::Starting | CloudState::Stopped, InstanceState::Running) => CloudState::Running,
            (s, _) => s,
        };
        let mut placement = None;
        let mut left = None;
        let name = self.vm_name(&rec);
        let vm = self.fleet.store().vm(rec.vm).ok().flatten();
        if let Some(rp) = new.repatriation.as_mut() {
            if rp.running_ms.is_none() {
                if self.fleet.observed_running(rec.vm, rp.host) {
                    rp.running_ms = Some(now);
                    new.state = CloudState::Terminating;
                    new.attempts = 0;
                    new.retry_at_ms = None;
                    new.step_started_ms = now;
                    self.fleet.bus.burst(
                        Some(rec.vm),
                        format!(
                            "VM {name} runs on host {}: terminating its instance {}",
                            rp.host, inst.id
                        ),
                    );
                } else if now.saturating_sub(rp.started_ms) > ms(self.shared.cfg.repatriate_timeout) {
                    left = Some(rp.host);
                    self.fleet.bus.burst(
                        Some(rec.vm),
                        format!(
                            "VM {name} did not run on host {} within {}: the move home is abandoned, it stays in {}",
                            rp.host,
                            novacron_shared::duration::format(self.shared.cfg.repatriate_timeout),
                            rec.provider
                        ),
                    );
                    new.repatriation = None;
                    placement = Some(Placement::Cloud {
                        provider: rec.provider.clone(),
                        instance: inst.id.clone(),
                    });
                }
            }
        } else if let Some(vm) = &vm {
            use novacron_shared::spec::Power;
            match (vm.vm.power, new.state) {
                (Power::Stopped | Power::Paused, CloudState::Running) => {
                    match self.provider.stop(&inst.id).await {
                        Ok(()) => {
                            new.state = CloudState::Stopping;
                            new.last_error = None;
                        }
                        Err(e) => {
                            count_error(&e);
                            new.last_error = Some(e.to_string());
                        }
                    }
                }
                (Power::Running, CloudState::Stopped) => match self.provider.start(&inst.id).await {
                    Ok(()) => {
                        new.state = CloudState::Starting;
                        new.last_error = None;
                    }
                    Err(e) => {
                        count_error(&e);
                        new.last_error = Some(e.to_string());
                    }
                },
                _ => {}
            }
        }
        if new == rec {
            return;
        }
        let spend = Some(Spend {
            month: cost::month_of(now),
            amount: spend,
        });
        match self.fleet.store().cloud_update(&rec, &new, spend, placement) {
            Ok(Ok(_)) => {
                if left.is_some() {
                    self.fleet.left_host(left);
                }
            }
            Ok(Err(r)) => tracing::debug!(vm = %name, %r, "burst: record changed meanwhile; next tick"),
            Err(e) => tracing::error!(vm = %name, error = %e, "burst: cannot update a cloud record"),
        }
    }

    /// The instance is gone from the provider without being asked: the VM
    /// goes back to pending (or stays on the host it was moving to).
    fn vanished(&mut self, rec: CloudRecord, now: u64, last_state: Option<String>) {
        let name = self.vm_name(&rec);
        let id = rec.instance.as_ref().map(|i| i.id.clone()).unwrap_or_default();
        let mut closed = rec.clone();
        let spend = bill(&mut closed, false, now);
        let pending = (!rec.deleted && rec.repatriation.is_none()).then(|| {
            format!(
                "its instance {id} is gone from {} ({}): waiting for a host or a new burst",
                rec.provider,
                last_state.as_deref().unwrap_or("not listed")
            )
        });
        let spend = Some(Spend {
            month: cost::month_of(now),
            amount: spend,
        });
        match self.fleet.store().cloud_forget(&rec, spend, pending) {
            Ok(Ok(left)) => self.fleet.left_host(left),
            Ok(Err(r)) => return tracing::debug!(vm = %name, %r, "burst: record changed meanwhile"),
            Err(e) => {
                return tracing::error!(vm = %name, error = %e, "burst: cannot forget a vanished instance")
            }
        }
        TELEMETRY.burst_vanished.inc();
        tracing::warn!(vm = %name, instance = %id, "burst: the instance is gone from the provider");
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "ALERT: VM {name}'s instance {id} is gone from {} ({}); the VM waits for a host or a new burst",
                rec.provider,
                last_state.as_deref().unwrap_or("not listed")
            ),
        );
        self.shared.wake.notify_one();
    }

    /// Terminates the instance (or every instance its launch made, when no
    /// id was recorded), then forgets the record.
    async fn terminate(&mut self, rec: CloudRecord, now: u64) {
        let ids = match &rec.instance {
            Some(i) => vec![i.id.clone()],
            None => match self.launched_by(&rec).await {
                Ok(found) => found.into_iter().map(|i| i.id).collect(),
                Err(e) => return self.terminate_failed(rec, &e, now),
            },
        };
        for id in &ids {
            if let Err(e) = self.provider.terminate(id).await {
                return self.terminate_failed(rec, &e, now);
            }
        }
        let name = self.vm_name(&rec);
        let mut closed = rec.clone();
        let spend = bill(&mut closed, false, now);
        let total = closed.accrued;
        let spend = Some(Spend {
            month: cost::month_of(now),
            amount: spend,
        });
        let pending =
            (!rec.deleted && rec.repatriation.is_none()).then(|| "its instance was terminated".to_string());
        match self.fleet.store().cloud_forget(&rec, spend, pending) {
            Ok(Ok(left)) => self.fleet.left_host(left),
            Ok(Err(r)) => return tracing::debug!(vm = %name, %r, "burst: record changed meanwhile"),
            Err(e) => {
                return tracing::error!(vm = %name, error = %e, "burst: cannot forget a terminated instance")
            }
        }
        let what = match (&rec.repatriation, rec.deleted) {
            (_, true) => "the VM was deleted".to_string(),
            (Some(rp), false) => format!("VM {name} is home on host {}", rp.host),
            (None, false) => "released".to_string(),
        };
        tracing::info!(vm = %name, instances = ?ids, cost = %total, "burst: instance terminated");
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "instance {} of VM {name} terminated ({what}); it cost {total}",
                if ids.is_empty() {
                    "(none was launched)".to_string()
                } else {
                    ids.join(", ")
                }
            ),
        );
    }

    fn terminate_failed(&mut self, rec: CloudRecord, e: &ProviderError, now: u64) {
        count_error(e);
        let overlap = ms(self.shared.cfg.max_overlap);
        let Some(rp) = rec
            .repatriation
            .clone()
            .filter(|rp| rp.running_ms.is_some_and(|r| now.saturating_sub(r) > overlap))
        else {
            return self.retry(rec, e, now);
        };
        // Both copies would run longer than promised: drop the host's copy.
        let mut new = rec.clone();
        new.state = CloudState::Running;
        new.repatriation = None;
        new.last_error = Some(e.to_string());
        let placement = rec.instance.as_ref().map(|i| Placement::Cloud {
            provider: rec.provider.clone(),
            instance: i.id.clone(),
        });
        let name = self.vm_name(&rec);
        match self.fleet.store().cloud_update(&rec, &new, None, placement) {
            Ok(Ok(_)) => self.fleet.left_host(Some(rp.host)),
            Ok(Err(r)) => return tracing::debug!(vm = %name, %r, "burst: record changed meanwhile"),
            Err(err) => return tracing::error!(vm = %name, error = %err, "burst: cannot abandon a move home"),
        }
        self.fleet.bus.burst(
            Some(rec.vm),
            format!(
                "ALERT: VM {name}'s instance could not be terminated within {} of its copy running on host {} ({e}): the host's copy is removed and the VM stays in {}",
                novacron_shared::duration::format(self.shared.cfg.max_overlap),
                rp.host,
                rec.provider
            ),
        );
    }
}

/// Accounts the record's billing up to `now`: while `billed`, per second
/// since the last account; when a billed run ends, the rest of it (a
/// minute at least). Returns what was added.
fn bill(r: &mut CloudRecord, billed: bool, now: u64) -> MicroUsd {
    let add = match (r.billed_until_ms, billed) {
        (Some(until), true) => {
            r.billed_until_ms = Some(now.max(until));
            cost::accrue(r.per_hour, until, now)
        }
        (Some(until), false) => {
            let started = r.run_started_ms.unwrap_or(until);
            r.billed_until_ms = None;
            r.run_started_ms = None;
            cost::close_run(r.per_hour, started, until, now)
        }
        (None, true) => {
            r.billed_until_ms = Some(now);
            r.run_started_ms = Some(now);
            MicroUsd(0)
        }
        (None, false) => MicroUsd(0),
    };
    r.accrued = r.accrued.plus(add);
    add
}
