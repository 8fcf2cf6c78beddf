//! Request-pipeline tests over a real store and a real listener: audit
//! before mutation, and 405 with `Allow`; one file per resource beside it
//! ([`burst`]).

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use novacron_api::client::{ApiClient, ClientError};
use novacron_api::ErrorCode;
use novacron_shared::clock::Clock;
use serde_json::json;

use super::audit::AuditSink;
use super::Api;
use crate::config::{AgentPolicy, ApiConfig, MigrationPolicy};
use crate::fleet::Fleet;
use crate::store::{ApiTokenRecord, AuditRecord, Role, Store, StoreError};

mod burst;

/// A test double: an audit log that cannot be written (a full disk, say).
#[derive(Debug)]
struct FailingAuditSink;

impl AuditSink for FailingAuditSink {
    fn append(&self, _: &AuditRecord) -> Result<u64, StoreError> {
        Err(redb::StorageError::Io(std::io::Error::other("the audit log's disk is full")).into())
    }

    fn finish(&self, _: u64, _: u16, _: &str) -> Result<(), StoreError> {
        Err(redb::StorageError::Io(std::io::Error::other("the audit log's disk is full")).into())
    }
}

const TOKEN: &str = "nca_test_admin";

/// An API over a fresh store with one admin token, writing its audit
/// entries to `audit` (the store itself when `None`), served on loopback.
async fn serve(dir: &std::path::Path, audit: Option<Arc<dyn AuditSink>>) -> (ApiClient, Store) {
    let (api, store, _) = serve_fleet(dir, audit).await;
    (api, store)
}

/// [`serve`], also returning the fleet behind the API.
async fn serve_fleet(
    dir: &std::path::Path,
    audit: Option<Arc<dyn AuditSink>>,
) -> (ApiClient, Store, Arc<Fleet>) {
    serve_fleet_ha(dir, audit, crate::config::HaConfig::default()).await
}

/// [`serve_fleet`] with an `[ha]` config.
async fn serve_fleet_ha(
    dir: &std::path::Path,
    audit: Option<Arc<dyn AuditSink>>,
    ha: crate::config::HaConfig,
) -> (ApiClient, Store, Arc<Fleet>) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    let store = Store::open(&dir.join("db.redb")).unwrap_or_else(|e| panic!("{e}"));
    let hash = crate::secrets::hash(TOKEN);
    let admin = ApiTokenRecord {
        name: "admin".into(),
        role: Role::Admin,
        created_ms: 0,
    };
    store
        .put_api_token(&hash, &admin)
        .unwrap_or_else(|e| panic!("{e}"));
    let clock = Clock::system();
    let (ca, _) = novacron_shared::pki::FleetCa::generate("test", clock.wall(), Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("{e}"));
    let fleet = Fleet::with_ha(
        store.clone(),
        ca,
        AgentPolicy::default(),
        crate::scheduler::Policy::default(),
        MigrationPolicy::default(),
        ha,
        clock.clone(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let audit = audit.unwrap_or_else(|| Arc::new(store.clone()));
    let api = Api::with_audit(fleet.clone(), store.clone(), audit, ApiConfig::default(), clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(api.serve(listener));
    (
        ApiClient::new(novacron_api::client::ApiUrl::plain(addr), Some(TOKEN.into())),
        store,
        fleet,
    )
}

fn refusal(e: ClientError) -> (u16, Option<ErrorCode>) {
    let code = e.code();
    match e {
        ClientError::Refused { status, .. } => (status, code),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn vm_body() -> serde_json::Value {
    json!({"spec": {"name": "web-1", "vcpus": 1, "memory_mib": 128}})
}

/// With the audit log failing, mutations are refused with 503 before they
/// run: no token is stored, and the VM request never reaches the fleet
/// (with a working log the same request gets the fleet's own answer).
#[tokio::test]
async fn nothing_is_done_when_the_audit_log_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (ok_api, ok_store) = serve(&tmp.path().join("working"), None).await;
    let (api, store) = serve(&tmp.path().join("failing"), Some(Arc::new(FailingAuditSink))).await;

    // Control: with a working log, both mutations run.
    let created = ok_api
        .call(
            Method::POST,
            "/v1/api-tokens",
            Some(json!({"name": "ci", "role": "viewer"})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created["name"], "ci");
    assert_eq!(ok_store.api_tokens().unwrap_or_else(|e| panic!("{e}")).len(), 2);
    let no_host = ok_api.call(Method::POST, "/v1/vms", Some(vm_body())).await;
    assert_eq!(
        no_host.map_err(refusal).err(),
        Some((409, Some(ErrorCode::NoCapacity))),
        "with a working log the fleet answers (no host can take it)"
    );
    assert_eq!(
        ok_store.audit(None, 10).unwrap_or_else(|e| panic!("{e}")).len(),
        2
    );

    // The same requests with a log that cannot be written.
    let token = api
        .call(
            Method::POST,
            "/v1/api-tokens",
            Some(json!({"name": "ci", "role": "viewer"})),
        )
        .await;
    assert_eq!(
        token.map_err(refusal).err(),
        Some((503, Some(ErrorCode::AuditUnavailable)))
    );
    let tokens = store.api_tokens().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.len(), 1, "no token was created: {tokens:?}");
    let vm = api.call(Method::POST, "/v1/vms", Some(vm_body())).await;
    assert_eq!(
        vm.map_err(refusal).err(),
        Some((503, Some(ErrorCode::AuditUnavailable))),
        "refused before the fleet saw it"
    );
    assert!(store.vms(None, 10).unwrap_or_else(|e| panic!("{e}")).is_empty());

    // Reads are not audited, so they still work.
    let hosts = api.call(Method::GET, "/v1/hosts", None).await;
    assert_eq!(hosts.unwrap_or_else(|e| panic!("{e}")), json!({"hosts": []}));
}

/// A path with the wrong method gets 405 and `Allow` naming its methods.
#[tokio::test]
async fn a_wrong_method_gets_405_with_allow() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (api, _store) = serve(tmp.path(), None).await;
    let addr = api.base().to_string();
    let addr = addr.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("PATCH /v1/vms HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = reply.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{reply}");
    assert!(head.contains("\r\nallow: post, get\r\n"), "{reply}");
    assert!(reply.contains("\"code\":\"method_not_allowed\""), "{reply}");
}

/// `/v1/ha` shows the lease timing and the guard; releasing is for admins
/// and reaches the HA driver's channel; maintenance reaches the lease view.
#[tokio::test]
async fn ha_overview_release_and_maintenance() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (api, store, fleet) = serve_fleet(tmp.path(), None).await;
    let operator = "nca_test_operator";
    store
        .put_api_token(
            &crate::secrets::hash(operator),
            &ApiTokenRecord {
                name: "op".into(),
                role: Role::Operator,
                created_ms: 0,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let as_operator = ApiClient::new(api.base().clone(), Some(operator.into()));

    let v = api
        .call(Method::GET, "/v1/ha", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let timing = fleet.ha_config().timing();
    assert_eq!(v["guard"], "normal");
    assert_eq!(v["enabled"], true);
    assert_eq!(v["lease_ms"], timing.lease.as_millis() as u64);
    assert_eq!(v["fenced_after_ms"], fleet.ha_fence_wait().as_millis() as u64);
    assert!(
        fleet.ha_fence_wait() > timing.fenced_after(),
        "the witness grace is part of the wait"
    );

    let mut releases = fleet.release_requests();
    releases.borrow_and_update();
    let refused = as_operator
        .call(Method::POST, "/v1/ha/release", Some(json!({})))
        .await;
    assert_eq!(refused.map_err(refusal).err().map(|r| r.0), Some(403));
    assert!(
        !releases.has_changed().unwrap_or(true),
        "a refused release reaches nobody"
    );
    api.call(Method::POST, "/v1/ha/release", Some(json!({})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        releases.has_changed().unwrap_or(false),
        "the driver is asked to release"
    );

    let unknown = "/v1/hosts/00000000-0000-0000-0000-000000000009/maintenance";
    let r = as_operator
        .call(Method::POST, unknown, Some(json!({"maintenance": true})))
        .await;
    assert_eq!(r.map_err(refusal).err().map(|r| r.0), Some(404));
    let h = crate::store::HostRecord {
        id: novacron_shared::ids::HostId(1),
        name: "h1".into(),
        addresses: vec![],
        capacity: Default::default(),
        agent_version: "0".into(),
        first_seen_ms: 0,
        last_seen_ms: 0,
        state: crate::store::HostState::Offline,
        cert_serial: "1".into(),
        cert_not_after: 0,
    };
    store.put_hosts(&[h]).unwrap_or_else(|e| panic!("{e}"));
    let path = "/v1/hosts/00000000-0000-0000-0000-000000000001/maintenance";
    let bad = as_operator
        .call(Method::POST, path, Some(json!({"maintenance": "yes"})))
        .await;
    assert_eq!(bad.map_err(refusal).err().map(|r| r.0), Some(400));
    as_operator
        .call(Method::POST, path, Some(json!({"maintenance": true})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    fleet
        .tick_leases(fleet.clock().now())
        .unwrap_or_else(|e| panic!("{e}"));
    let host = api
        .call(
            Method::GET,
            "/v1/hosts/00000000-0000-0000-0000-000000000001",
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host["lease"], "maintenance", "{host}");
    let v = api
        .call(Method::GET, "/v1/ha", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["hosts"][0]["lease"], "maintenance", "{v}");
}

/// A body past the limit gets a 413 the client can read (the server reads
/// it through instead of closing on a client still sending); a VM spec at
/// its own limits fits the body limit.
#[tokio::test]
async fn an_oversized_body_gets_a_readable_413_and_a_full_spec_fits() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (api, _store) = serve(tmp.path(), None).await;
    let big = "x".repeat(super::MAX_BODY + 1024);
    let r = api
        .call(Method::POST, "/v1/vms", Some(json!({"spec": {"name": big}})))
        .await;
    assert_eq!(
        r.map_err(refusal).err(),
        Some((413, Some(ErrorCode::BodyTooLarge)))
    );
    let user_data = "y".repeat(novacron_shared::spec::MAX_USER_DATA);
    let r = api
        .call(
            Method::POST,
            "/v1/vms",
            Some(json!({"spec": {"name": "web-1", "vcpus": 1, "memory_mib": 128,
                                 "cloud_init": {"user_data": user_data}}})),
        )
        .await;
    assert_eq!(
        r.map_err(refusal).err(),
        Some((409, Some(ErrorCode::NoCapacity))),
        "read and checked, not refused for its size"
    );
}

/// `POST /v1/hosts/{host}/fence` runs the configured fence command now
/// (admin only, audited) and answers with what it said; `GET /v1/ha`
/// shows the guards' settings and the witness.
#[tokio::test]
async fn the_hardware_fence_runs_on_demand_for_admins_and_the_overview_shows_the_guards() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let script = tmp.path().join("fence");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"bmc $1 $2\"\ncase $2 in status) exit 2;; off) exit 0;; esac\nexit 1\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let ha = crate::config::HaConfig {
        hardware_fence: Some(crate::config::HardwareFence {
            command: vec![script.display().to_string(), "{host}".into(), "{action}".into()],
            timeout: Duration::from_secs(20),
            retries: 2,
            hosts: Default::default(),
        }),
        ..Default::default()
    };
    let (api, store, _fleet) = serve_fleet_ha(&tmp.path().join("d"), None, ha).await;
    let v = api
        .call(Method::GET, "/v1/ha", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["isolation"], "self-fence", "{v}");
    assert_eq!(v["hardware_fence"], true);
    assert_eq!(v["disk_locks"], false);
    assert_eq!(v["witness"]["enabled"], true);
    assert_eq!(v["fencing"], json!([]));
    assert_eq!(v["lock_waits"], json!([]));

    let path = "/v1/hosts/00000000-0000-0000-0000-000000000001/fence";
    let r = api.call(Method::POST, path, Some(json!({"action": "off"}))).await;
    assert_eq!(r.map_err(refusal).err().map(|r| r.0), Some(404));
    let h = crate::store::HostRecord {
        id: novacron_shared::ids::HostId(1),
        name: "h1".into(),
        addresses: vec![],
        capacity: Default::default(),
        agent_version: "0".into(),
        first_seen_ms: 0,
        last_seen_ms: 0,
        state: crate::store::HostState::Offline,
        cert_serial: "1".into(),
        cert_not_after: 0,
    };
    store.put_hosts(&[h]).unwrap_or_else(|e| panic!("{e}"));
    let operator = "nca_test_operator";
    store
        .put_api_token(
            &crate::secrets::hash(operator),
            &ApiTokenRecord {
                name: "op".into(),
                role: Role::Operator,
                created_ms: 0,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let as_operator = ApiClient::new(api.base().clone(), Some(operator.into()));
    let r = as_operator
        .call(Method::POST, path, Some(json!({"action": "off"})))
        .await;
    assert_eq!(r.map_err(refusal).err().map(|r| r.0), Some(403), "admins only");
    let r = api.call(Method::POST, path, Some(json!({"action": "on"}))).await;
    assert_eq!(
        r.map_err(refusal).err().map(|r| r.0),
        Some(400),
        "on is not offered"
    );
    let status = api
        .call(Method::POST, path, Some(json!({"action": "status"})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["power"], "off", "{status}");
    assert_eq!(status["exit_code"], 2);
    assert_eq!(status["output"], "bmc h1 status\n");
    let off = api
        .call(Method::POST, path, Some(json!({"action": "off"})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(off["done"], true, "{off}");
    assert_eq!(off["timed_out"], false);
    let audit = store.audit(None, 50).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        audit.iter().filter(|a| a.path.ends_with("/fence")).count() >= 3,
        "every fence request is audited: {audit:?}"
    );
    let host = api
        .call(
            Method::GET,
            "/v1/hosts/00000000-0000-0000-0000-000000000001",
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host["fence"]["state"], "idle", "{host}");
    assert_eq!(host["isolation"], "self-fence");
}
