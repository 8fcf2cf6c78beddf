//! `GET /v1/burst`: viewers read it; without the burst side it says
//! "disabled" with the default caps; with one it shows the broker's last
//! published status (caps, use, instances with their names, waiting VMs,
//! orphans) as the API's types.

use std::sync::Arc;

use hyper::Method;
use novacron_api::burst::{BurstStatus, CloudState};
use novacron_api::client::ApiClient;
use novacron_cloud::{Instance, InstanceType, LaunchSpec, MicroUsd, Provider, ProviderError, ProviderFuture};
use novacron_shared::ids::{HostId, VmId};

use super::{refusal, serve_fleet};
use crate::burst::{OrphanView, PendingView, Shared, Status};
use crate::config::BurstConfig;
use crate::store::{ApiTokenRecord, CloudInstance, CloudRecord, Repatriation, Role};

/// A test double: a provider with a name and a region that refuses every
/// call (the API only reads the published status; a call would be a bug).
struct NamedOnly;

fn refused<'a, T: Send + 'a>() -> ProviderFuture<'a, T> {
    Box::pin(async {
        Err(ProviderError::Permanent {
            code: "TestDouble".into(),
            message: "the API must not call the provider".into(),
        })
    })
}

impl Provider for NamedOnly {
    fn name(&self) -> &str {
        "aws"
    }
    fn region(&self) -> &str {
        "eu-west-1"
    }
    fn instance_types(&self) -> &[InstanceType] {
        &[]
    }
    fn launch<'a>(&'a self, _: &'a LaunchSpec) -> ProviderFuture<'a, Instance> {
        refused()
    }
    fn describe<'a>(&'a self, _: &'a [String]) -> ProviderFuture<'a, Vec<Instance>> {
        refused()
    }
    fn list_by_tag<'a>(&'a self, _: &'a str, _: &'a str) -> ProviderFuture<'a, Vec<Instance>> {
        refused()
    }
    fn start<'a>(&'a self, _: &'a str) -> ProviderFuture<'a, ()> {
        refused()
    }
    fn stop<'a>(&'a self, _: &'a str) -> ProviderFuture<'a, ()> {
        refused()
    }
    fn terminate<'a>(&'a self, _: &'a str) -> ProviderFuture<'a, ()> {
        refused()
    }
}

fn record(vm: u128, state: crate::store::CloudState) -> CloudRecord {
    CloudRecord {
        vm: VmId(vm),
        provider: "aws".into(),
        launch_id: format!("launch-{vm}"),
        state,
        instance: None,
        instance_type: "t3.micro".into(),
        per_hour: MicroUsd(10_400),
        image: "ami-0abc".into(),
        decided_ms: 1_000,
        reasons: "no host has 4 free vCPUs".into(),
        accrued: MicroUsd(0),
        billed_until_ms: None,
        run_started_ms: None,
        attempts: 0,
        last_error: None,
        retry_at_ms: None,
        step_started_ms: 1_000,
        repatriation: None,
        deleted: false,
    }
}

/// No token: 401; a viewer reads it; without the burst side it is off,
/// with the default caps, no fleet tag and nothing listed.
#[tokio::test]
async fn viewers_read_it_and_without_the_burst_side_it_is_off_with_the_default_caps() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (api, store, fleet) = serve_fleet(tmp.path(), None).await;
    assert!(fleet.burst().is_none());
    let anonymous = ApiClient::new(api.base().clone(), None);
    let r = anonymous.call(Method::GET, "/v1/burst", None).await;
    assert_eq!(r.map_err(refusal).err().map(|r| r.0), Some(401));
    let viewer = "nca_test_viewer";
    store
        .put_api_token(
            &crate::secrets::hash(viewer),
            &ApiTokenRecord {
                name: "screen".into(),
                role: Role::Viewer,
                created_ms: 0,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let as_viewer = ApiClient::new(api.base().clone(), Some(viewer.into()));
    let v: BurstStatus = as_viewer.burst().await.unwrap_or_else(|e| panic!("{e}"));
    let caps = BurstConfig::default();
    assert!(!v.enabled);
    assert_eq!((v.provider, v.region, v.fleet.as_str()), (None, None, ""));
    assert_eq!(v.budget.max_instances, caps.max_instances);
    assert_eq!(v.budget.max_usd_per_hour, caps.max_usd_per_hour);
    assert_eq!(v.budget.max_usd_per_month, caps.max_usd_per_month);
    assert_eq!(
        (v.budget.instances, v.budget.usd_per_hour, v.budget.month_usd),
        (0, 0.0, 0.0)
    );
    let now = crate::burst::cost::month_of(fleet.clock().unix_ms());
    assert_eq!(v.budget.month, crate::burst::cost::month_name(now));
    assert!(v.instances.is_empty() && v.pending.is_empty() && v.orphans.is_empty());
    assert_eq!(v.total_usd, 0.0);
}

/// With the burst side attached, the reply is its caps, the provider's
/// name and region, the fleet tag and the broker's last published status.
#[tokio::test]
async fn it_shows_the_published_status_with_names_and_dollars() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (api, _store, fleet) = serve_fleet(tmp.path(), None).await;
    let cfg = BurstConfig {
        enabled: true,
        max_instances: 3,
        max_usd_per_hour: 1.5,
        max_usd_per_month: 200.0,
        ..BurstConfig::default()
    };
    let provider: Arc<dyn Provider> = Arc::new(NamedOnly);
    let shared = Arc::new(Shared::new(cfg, "nc-0123456789abcdef".into(), Some(provider)));
    fleet.set_burst(shared.clone());

    let mut running = record(1, crate::store::CloudState::Running);
    running.instance = Some(CloudInstance {
        id: "i-0123".into(),
        private_ip: Some("10.0.0.7".into()),
        public_ip: None,
        provider_state: "running".into(),
    });
    running.accrued = MicroUsd(2_500_000);
    running.repatriation = Some(Repatriation {
        host: HostId(4),
        started_ms: 5_000,
        running_ms: None,
    });
    let mut launching = record(2, crate::store::CloudState::Launching);
    launching.last_error = Some("throttled by the provider: RequestLimitExceeded".into());
    launching.attempts = 2;
    let mut gone = record(3, crate::store::CloudState::Terminating);
    gone.deleted = true;
    shared.publish(Status {
        records: vec![
            (running, Some("web-1".into())),
            (launching, Some("web-2".into())),
            (gone, None),
        ],
        pending: vec![PendingView {
            vm: VmId(9),
            name: "db-1".into(),
            burstable: true,
            reason: "the instance cap (3) is reached".into(),
        }],
        orphans: vec![OrphanView {
            instance: "i-0999".into(),
            instance_type: "m5.large".into(),
            provider_state: "running".into(),
            vm_tag: None,
            first_seen_ms: 7_000,
            terminate_at_ms: Some(9_000),
        }],
        instances: 2,
        per_hour: MicroUsd(20_800),
        month: 202_612,
        month_spent: MicroUsd(12_340_000),
        total: MicroUsd(15_000_000),
    });

    let v = api.burst().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(v.enabled);
    assert_eq!(v.provider.as_deref(), Some("aws"));
    assert_eq!(v.region.as_deref(), Some("eu-west-1"));
    assert_eq!(v.fleet, "nc-0123456789abcdef");
    let b = &v.budget;
    assert_eq!((b.max_instances, b.instances), (3, 2));
    assert_eq!((b.max_usd_per_hour, b.usd_per_hour), (1.5, 0.0208));
    assert_eq!((b.max_usd_per_month, b.month_usd), (200.0, 12.34));
    assert_eq!(b.month, "2026-12");
    assert_eq!(v.total_usd, 15.0);
    assert_eq!(v.instances.len(), 3);
    let web1 = &v.instances[0];
    assert_eq!(web1.name.as_deref(), Some("web-1"));
    assert_eq!(web1.state, CloudState::Running);
    assert_eq!(web1.instance.as_deref(), Some("i-0123"));
    assert_eq!(web1.private_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!((web1.usd_per_hour, web1.accrued_usd), (0.0104, 2.5));
    assert_eq!(web1.repatriation.as_ref().map(|r| r.host), Some(HostId(4)));
    let web2 = &v.instances[1];
    assert_eq!(web2.state, CloudState::Launching);
    assert_eq!(web2.instance, None);
    assert_eq!(web2.attempts, 2);
    assert!(web2
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("RequestLimitExceeded")));
    assert_eq!(
        (v.instances[2].name.as_deref(), v.instances[2].deleted),
        (None, true)
    );
    assert_eq!(v.pending.len(), 1);
    assert_eq!(
        (v.pending[0].name.as_str(), v.pending[0].burstable),
        ("db-1", true)
    );
    assert!(v.pending[0].reason.contains("instance cap"));
    assert_eq!(v.orphans.len(), 1);
    assert_eq!(v.orphans[0].instance, "i-0999");
    assert_eq!(v.orphans[0].terminate_at_ms, Some(9_000));

    // Turned off in the config: still shown, but not enabled.
    let off = Shared::new(BurstConfig::default(), "nc-x".into(), Some(Arc::new(NamedOnly)));
    let s = super::super::burst::status(Some(&off), 0);
    assert!(!s.enabled);
    assert_eq!(s.budget.month, "1970-01");
}
