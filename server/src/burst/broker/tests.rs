//! The broker on a manual clock against a scripted stand-in cloud
//! (`cloud.rs` says why): launches exactly once through lost answers and
//! restarts, retries with backoff shown on the VM, permanent errors and
//! timeouts release the budget, deletes terminate, cost accrues per second
//! with the one-minute minimum, vanished instances send the VM back to
//! pending, orphans are reported and terminated after their grace, and
//! the budget events fire at 80 % and 100 %.

use std::sync::Arc;
use std::time::Duration;

use novacron_cloud::{InstanceState, MicroUsd, ProviderError};
use novacron_shared::clock::{Clock, ManualClock};
use novacron_shared::placement::{BurstRule, Placement};
use novacron_shared::spec::{CloudInit, DiskSpec, Power, VmSpec};

use super::*;
use crate::config::{AwsConfig, BurstConfig};
use crate::fleet::CreateVm;
use crate::store::{PlacementRules, Store};

mod cloud;
use cloud::{Call, Fault, ScriptedCloud};

struct Bed {
    _dir: tempfile::TempDir,
    fleet: Arc<Fleet>,
    clock: Arc<ManualClock>,
    cloud: Arc<ScriptedCloud>,
    broker: Broker,
}

fn config(edit: impl FnOnce(&mut BurstConfig)) -> BurstConfig {
    let mut c = BurstConfig {
        enabled: true,
        aws: Some(AwsConfig {
            call_timeout: Duration::from_secs(5),
            images: [("debian.qcow2".to_string(), "ami-1".to_string())].into(),
            ..AwsConfig::new("us-east-1")
        }),
        ..BurstConfig::default()
    };
    edit(&mut c);
    c
}

fn bed(edit: impl FnOnce(&mut BurstConfig)) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.redb")).unwrap();
    let (clock, manual) = Clock::manual();
    // Wall time on 2026-12-10, so months are real months.
    manual.jump_wall(Duration::from_millis(1_796_860_800_000), true);
    let (ca, _) =
        novacron_shared::pki::FleetCa::generate("t", clock.wall(), Duration::from_secs(3600)).unwrap();
    let fleet = Fleet::new(
        store,
        ca,
        crate::config::AgentPolicy::default(),
        crate::scheduler::Policy::default(),
        crate::config::MigrationPolicy::default(),
        clock,
    )
    .unwrap();
    let cloud = Arc::new(ScriptedCloud::new());
    let shared = Arc::new(Shared::new(
        config(edit),
        "nc-test".into(),
        Some(cloud.clone() as Arc<dyn Provider>),
    ));
    fleet.set_burst(shared.clone());
    let broker = Broker::new(fleet.clone(), shared).unwrap();
    Bed {
        _dir: dir,
        fleet,
        clock: manual,
        cloud,
        broker,
    }
}

impl Bed {
    /// A burstable VM (2 vCPUs, 3000 MiB: a t3.medium) no host fits.
    fn burstable(&self, name: &str) -> VmId {
        let mut spec = VmSpec::minimal(name, 2, 3000);
        spec.disks.push(DiskSpec {
            name: "root".into(),
            size_mib: None,
            template: Some("debian.qcow2".into()),
        });
        spec.cloud_init = Some(CloudInit {
            user_data: Some("#cloud-config\nhostname: x\n".into()),
            ssh_authorized_keys: vec![],
        });
        let rec = self
            .fleet
            .create_vm(CreateVm {
                spec,
                power: Power::Running,
                placement: PlacementRules {
                    burst: Some(BurstRule {
                        repatriate: true,
                        ..BurstRule::default()
                    }),
                    ..PlacementRules::default()
                },
            })
            .unwrap();
        assert!(
            matches!(rec.placement, Placement::Pending { .. }),
            "{:?}",
            rec.placement
        );
        rec.vm.id
    }

    fn record(&self, vm: VmId) -> Option<CloudRecord> {
        self.fleet.store().cloud_record(vm).unwrap()
    }

    fn placement(&self, vm: VmId) -> Placement {
        self.fleet.store().vm(vm).unwrap().unwrap().placement
    }

    async fn tick_after(&mut self, d: Duration) {
        self.clock.advance(d);
        self.broker.tick().await;
    }
}

/// The next launch takes effect but its answer is lost.
fn lose_next_launch_answer(cloud: &ScriptedCloud) {
    cloud.fault(
        Call::Launch,
        Fault::Lost(ProviderError::Transient("HTTP 500: InternalError".into())),
    );
}

fn throttled() -> ProviderError {
    ProviderError::Throttled("RequestLimitExceeded: Request limit exceeded.".into())
}

#[tokio::test]
async fn a_burstable_vm_launches_once_with_its_type_tags_and_user_data() {
    let mut b = bed(|_| {});
    let vm = b.burstable("web");
    b.broker.tick().await;
    let live = b.cloud.live();
    assert_eq!(live.len(), 1);
    let i = &live[0];
    assert_eq!(i.instance_type, "t3.medium");
    assert_eq!(i.image, "ami-1");
    assert_eq!(i.tags.get(novacron_cloud::TAG_VM), Some(&vm.to_string()));
    assert_eq!(
        i.tags.get(novacron_cloud::TAG_FLEET).map(String::as_str),
        Some("nc-test")
    );
    let rec = b.record(vm).unwrap();
    assert_eq!(i.tags.get(novacron_cloud::TAG_LAUNCH), Some(&rec.launch_id));
    assert_eq!(rec.state, CloudState::Running);
    assert!(rec.reasons.contains("no host fits"), "{}", rec.reasons);
    assert_eq!(
        b.placement(vm),
        Placement::Cloud {
            provider: "aws".into(),
            instance: i.id.clone()
        }
    );
    // Nothing launches again on later ticks; the first launch needed no lookup.
    b.tick_after(Duration::from_secs(5)).await;
    assert_eq!((b.cloud.count(Call::Launch), b.cloud.live().len()), (1, 1));
}

#[tokio::test]
async fn a_lost_launch_answer_is_found_by_tag_not_launched_again() {
    let mut b = bed(|_| {});
    lose_next_launch_answer(&b.cloud);
    let vm = b.burstable("web");
    b.broker.tick().await;
    let rec = b.record(vm).unwrap();
    assert_eq!(rec.state, CloudState::Launching);
    assert_eq!(rec.attempts, 1);
    assert!(rec.last_error.as_deref().unwrap_or("").contains("InternalError"));
    let retry_at = rec.retry_at_ms.unwrap();
    // Before the backoff ends nothing is tried.
    b.broker.tick().await;
    assert_eq!(b.cloud.count(Call::Launch), 1);
    b.clock
        .advance(Duration::from_millis(retry_at - b.fleet.clock().unix_ms() + 1));
    b.broker.tick().await;
    assert_eq!(b.cloud.count(Call::Launch), 1, "the lookup found the instance");
    assert_eq!(b.cloud.live().len(), 1);
    assert_eq!(b.record(vm).unwrap().state, CloudState::Running);
}

#[tokio::test]
async fn a_restarted_broker_looks_the_launch_up_before_launching() {
    let mut b = bed(|_| {});
    let vm = b.burstable("web");
    // The decision was committed and RunInstances went through, but the
    // server died before it recorded the answer: a fresh broker (no memory
    // of fresh launch ids) finds it by tag.
    let claimed = {
        b.cloud.fault(
            Call::Launch,
            Fault::Lost(ProviderError::Transient("connection reset".into())),
        );
        b.broker.tick().await;
        b.record(vm).unwrap()
    };
    let mut reset = claimed.clone();
    reset.attempts = 0;
    reset.retry_at_ms = None;
    reset.last_error = None;
    b.fleet
        .store()
        .cloud_update(&claimed, &reset, None, None)
        .unwrap()
        .unwrap();
    let shared = b.fleet.burst().unwrap().clone();
    let mut fresh = Broker::new(b.fleet.clone(), shared).unwrap();
    fresh.tick().await;
    assert_eq!(b.cloud.count(Call::Launch), 1);
    assert_eq!(b.cloud.live().len(), 1, "exactly one instance");
    assert_eq!(b.record(vm).unwrap().state, CloudState::Running);
}

#[tokio::test]
async fn throttles_back_off_are_shown_then_succeed() {
    let mut b = bed(|c| c.retry_max = Duration::from_secs(8));
    // The first launch is throttled; each retry looks its tag up first,
    // and the next two lookups are throttled too.
    b.cloud.fault(Call::Launch, Fault::Fail(throttled()));
    b.cloud.fault(Call::LookupLaunch, Fault::Fail(throttled()));
    b.cloud.fault(Call::LookupLaunch, Fault::Fail(throttled()));
    let vm = b.burstable("web");
    b.broker.tick().await;
    let mut waits = Vec::new();
    while let Some(r) = b.record(vm).filter(|r| r.state == CloudState::Launching) {
        assert!(r
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("RequestLimitExceeded"));
        assert_eq!(
            r.attempts as usize,
            waits.len() + 1,
            "each try is counted on the VM"
        );
        let wait = r.retry_at_ms.unwrap() - b.fleet.clock().unix_ms();
        waits.push(wait);
        assert!(waits.len() <= 3, "{waits:?}");
        // Just before the retry is due nothing is tried.
        let calls = b.cloud.count(Call::LookupLaunch);
        b.tick_after(Duration::from_millis(wait - 1)).await;
        assert_eq!(b.cloud.count(Call::LookupLaunch), calls);
        b.tick_after(Duration::from_millis(1)).await;
    }
    assert_eq!(waits.len(), 3, "{waits:?}");
    assert!(waits.iter().all(|w| *w <= 8000), "capped: {waits:?}");
    assert!(waits[2] >= 2000, "the backoff grows: {waits:?}");
    let r = b.record(vm).unwrap();
    assert_eq!(
        (r.state, r.attempts, r.last_error.clone()),
        (CloudState::Running, 0, None)
    );
    assert_eq!((b.cloud.count(Call::Launch), b.cloud.live().len()), (2, 1));
}

#[tokio::test]
async fn a_permanent_error_ends_the_launch_and_releases_the_budget() {
    let mut b = bed(|c| c.max_instances = 1);
    b.cloud.fault(
        Call::Launch,
        Fault::Fail(ProviderError::Permanent {
            code: "InvalidAMIID.NotFound".into(),
            message: "The image id '[ami-1]' does not exist".into(),
        }),
    );
    let vm = b.burstable("web");
    b.broker.tick().await;
    assert!(b.record(vm).is_none(), "the launch ended");
    let Placement::Pending { reason } = b.placement(vm) else {
        panic!("pending")
    };
    assert!(reason.contains("InvalidAMIID.NotFound"), "{reason}");
    assert!(b.cloud.live().is_empty());
    // The budget is free: another VM bursts at once, while the failed one
    // is held.
    let other = b.burstable("db");
    b.broker.tick().await;
    assert_eq!(b.record(other).map(|r| r.state), Some(CloudState::Running));
    let s = b.fleet.burst().unwrap().status();
    assert!(
        s.pending.iter().any(|p| p.vm == vm && p.reason.contains("held")),
        "{:?}",
        s.pending
    );
}

#[tokio::test]
async fn retries_past_the_launch_timeout_end_the_launch_when_nothing_was_made() {
    let mut b = bed(|c| {
        c.launch_timeout = Duration::from_secs(30);
        c.retry_max = Duration::from_secs(10);
    });
    let vm = b.burstable("web");
    for _ in 0..20 {
        b.cloud.fault(
            Call::Launch,
            Fault::Fail(ProviderError::Transient("HTTP 503".into())),
        );
    }
    b.broker.tick().await;
    for _ in 0..10 {
        if b.record(vm).is_none() {
            break;
        }
        b.tick_after(Duration::from_secs(10)).await;
    }
    assert!(b.record(vm).is_none(), "ended after the timeout");
    let Placement::Pending { reason } = b.placement(vm) else {
        panic!("pending")
    };
    assert!(reason.contains("no launch within 30s"), "{reason}");
}

#[tokio::test]
async fn deleting_a_burst_vm_terminates_its_instance_and_frees_its_share() {
    let mut b = bed(|c| c.max_instances = 1);
    let vm = b.burstable("web");
    b.broker.tick().await;
    let waiting = b.burstable("db");
    b.broker.tick().await;
    assert!(b.record(waiting).is_none(), "the cap holds it");
    b.fleet.delete_vm(vm).unwrap();
    assert!(b.record(vm).unwrap().deleted);
    b.broker.tick().await;
    assert!(b.record(vm).is_none());
    assert_eq!(
        b.cloud.live().len(),
        1,
        "the deleted VM's instance is gone, the waiting VM's runs"
    );
    assert!(b.record(waiting).is_some());
}

#[tokio::test]
async fn cost_accrues_per_second_while_running_with_a_minute_at_least() {
    let mut b = bed(|_| {});
    let vm = b.burstable("web");
    b.broker.tick().await;
    let per_hour = b.record(vm).unwrap().per_hour;
    assert_eq!(per_hour, MicroUsd(41_600));
    b.tick_after(Duration::from_secs(1800)).await;
    assert_eq!(
        b.record(vm).unwrap().accrued,
        MicroUsd(20_800),
        "half an hour of $0.0416/h"
    );
    // Stopped: the run ends, billing stops.
    b.fleet.set_power(vm, Power::Stopped).unwrap();
    b.tick_after(Duration::from_secs(10)).await;
    assert_eq!(b.record(vm).unwrap().state, CloudState::Stopping);
    b.tick_after(Duration::from_secs(10)).await;
    let r = b.record(vm).unwrap();
    assert_eq!(r.state, CloudState::Stopped);
    let at_stop = r.accrued;
    b.tick_after(Duration::from_secs(3600)).await;
    assert_eq!(
        b.record(vm).unwrap().accrued,
        at_stop,
        "nothing accrues while stopped"
    );
    // Started again for 5 s, then deleted: billed a minute.
    b.fleet.set_power(vm, Power::Running).unwrap();
    b.tick_after(Duration::from_secs(1)).await;
    b.tick_after(Duration::from_secs(1)).await;
    assert_eq!(b.record(vm).unwrap().state, CloudState::Running);
    b.tick_after(Duration::from_secs(5)).await;
    b.fleet.delete_vm(vm).unwrap();
    b.broker.tick().await;
    let month = b
        .fleet
        .store()
        .burst_spend(cost::month_of(b.fleet.clock().unix_ms()))
        .unwrap();
    assert_eq!(
        month,
        at_stop.plus(per_hour.for_ms(60_000)),
        "the second run is billed its minute"
    );
}

#[tokio::test]
async fn an_instance_gone_from_the_cloud_sends_its_vm_back_to_pending() {
    let mut b = bed(|c| c.max_instances = 1);
    let vm = b.burstable("web");
    b.broker.tick().await;
    let old = b.record(vm).unwrap();
    let id = old.instance.clone().unwrap().id;
    let mut events = b.fleet.bus.subscribe();
    b.cloud.set_state(&id, InstanceState::Terminated);
    // Its next launch is throttled, so the new decision stays visible.
    b.cloud.fault(Call::Launch, Fault::Fail(throttled()));
    b.tick_after(Duration::from_secs(5)).await;
    let mut saw = false;
    while let Ok(e) = events.try_recv() {
        saw |= e.message.contains(&id) && e.message.contains("gone");
    }
    assert!(saw, "the vanished instance is reported");
    let r = b.record(vm).unwrap();
    assert_ne!(r.launch_id, old.launch_id, "a new decision, not the old record");
    assert_eq!((r.state, r.instance), (CloudState::Launching, None));
    assert!(matches!(b.placement(vm), Placement::Pending { .. }));
}

#[tokio::test]
async fn an_orphan_is_reported_then_terminated_after_its_grace() {
    let mut b = bed(|c| c.orphan_terminate_after = Some(Duration::from_secs(60)));
    let stray = b.cloud.add(&[(novacron_cloud::TAG_FLEET, "nc-test")]);
    let other_fleet = b.cloud.add(&[(novacron_cloud::TAG_FLEET, "nc-other")]);
    b.broker.tick().await;
    let s = b.fleet.burst().unwrap().status();
    assert_eq!(
        s.orphans.iter().map(|o| o.instance.as_str()).collect::<Vec<_>>(),
        [stray.as_str()]
    );
    b.tick_after(Duration::from_secs(30)).await;
    assert_eq!(b.cloud.live().len(), 2, "within the grace it is only reported");
    b.tick_after(Duration::from_secs(31)).await;
    let live: Vec<String> = b.cloud.live().into_iter().map(|i| i.id).collect();
    assert_eq!(live, [other_fleet], "another fleet's instance is never touched");
    assert!(b.fleet.burst().unwrap().status().orphans.is_empty());
}

#[tokio::test]
async fn an_orphan_without_a_grace_is_only_reported() {
    let mut b = bed(|_| {});
    let stray = b.cloud.add(&[(novacron_cloud::TAG_FLEET, "nc-test")]);
    b.broker.tick().await;
    b.tick_after(Duration::from_secs(86_400)).await;
    assert_eq!(b.cloud.live().len(), 1);
    let s = b.fleet.burst().unwrap().status();
    assert_eq!(s.orphans[0].instance, stray);
    assert_eq!(s.orphans[0].terminate_at_ms, None);
}

#[tokio::test]
async fn the_budget_events_fire_once_at_80_and_100_percent() {
    // t3.medium at $0.0416/h against a $0.05/h cap: one instance is 83 %.
    let mut b = bed(|c| c.max_usd_per_hour = 0.05);
    let mut events = b.fleet.bus.subscribe();
    b.burstable("web");
    b.broker.tick().await;
    b.tick_after(Duration::from_secs(5)).await;
    let mut alerts = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.message.contains("budget") {
            alerts.push(e.message.clone());
        }
    }
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(
        alerts[0].contains("hourly") && alerts[0].contains("80 %"),
        "{alerts:?}"
    );
    // A second VM would pass the cap: it waits with that reason.
    let second = b.burstable("db");
    b.broker.tick().await;
    let s = b.fleet.burst().unwrap().status();
    let p = s.pending.iter().find(|p| p.vm == second).unwrap();
    assert!(p.reason.contains("hourly cap"), "{}", p.reason);
}

/// The one-instance check of these tests (and of `tests/burst.rs`): the
/// live instances a VM's tag finds.
fn instances_of(cloud: &ScriptedCloud, vm: VmId) -> usize {
    cloud
        .live()
        .iter()
        .filter(|i| i.tags.get(novacron_cloud::TAG_VM) == Some(&vm.to_string()))
        .count()
}

#[tokio::test]
async fn the_one_instance_check_catches_a_broker_that_skips_the_lookup() {
    // The broken variant: after a lost answer the retry is treated as a
    // first launch (no lookup by tag), as a broker trusting client tokens
    // would. The check must see the second instance.
    let mut b = bed(|_| {});
    lose_next_launch_answer(&b.cloud);
    let vm = b.burstable("web");
    b.broker.tick().await;
    assert_eq!(instances_of(&b.cloud, vm), 1);
    let rec = b.record(vm).unwrap();
    b.broker.fresh.insert(rec.launch_id.clone());
    b.clock.advance(Duration::from_millis(
        rec.retry_at_ms.unwrap() - b.fleet.clock().unix_ms(),
    ));
    b.broker.tick().await;
    assert_eq!(instances_of(&b.cloud, vm), 2, "the check finds the double launch");
}

#[tokio::test]
async fn a_vm_that_should_not_run_waits_for_a_host_instead_of_bursting() {
    let mut b = bed(|_| {});
    let vm = b.burstable("web");
    b.fleet.set_power(vm, Power::Stopped).unwrap();
    b.broker.tick().await;
    assert!(b.cloud.live().is_empty());
    let Placement::Pending { reason } = b.placement(vm) else {
        panic!("pending")
    };
    assert!(reason.contains("not burst while it should not run"), "{reason}");
    b.fleet.set_power(vm, Power::Running).unwrap();
    b.broker.tick().await;
    assert_eq!(instances_of(&b.cloud, vm), 1);
}

#[tokio::test]
async fn one_ticks_decisions_launch_in_parallel_batches_once_each() {
    let mut b = bed(|c| c.max_instances = 40);
    // More than one batch of LAUNCH_CONCURRENCY, one answer lost.
    lose_next_launch_answer(&b.cloud);
    let vms: Vec<VmId> = (0..20).map(|i| b.burstable(&format!("web-{i}"))).collect();
    b.broker.tick().await;
    assert_eq!(b.cloud.count(Call::Launch), 20);
    let launching: Vec<VmId> = vms
        .iter()
        .copied()
        .filter(|v| b.record(*v).is_some_and(|r| r.state == CloudState::Launching))
        .collect();
    assert_eq!(launching.len(), 1, "the lost answer waits for its lookup");
    b.tick_after(Duration::from_secs(2)).await;
    for v in &vms {
        assert_eq!(instances_of(&b.cloud, *v), 1, "VM {v}");
        assert_eq!(b.record(*v).map(|r| r.state), Some(CloudState::Running));
    }
    assert_eq!(
        b.cloud.count(Call::Launch),
        20,
        "the lost one was adopted, not launched again"
    );
}
